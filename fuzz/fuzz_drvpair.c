/*
 * fuzz_drvpair.c - the driver side against a hostile device: one queue pair's driver turn
 * (vx_drvpair_turn over two vx_drvq, vx_drvq.c's batch entry points) while the device writes
 * whatever it likes into the used rings (used->idx, used entries' ids and lengths, used flags,
 * avail_event) and into the RX buffers (num_buffers of a MRG_RXBUF header).
 *
 * Input: a header of u8 flags (bit 0 EVENT_IDX, bit 1 IN_ORDER, bit 2 MRG_RXBUF), u8 ring size
 * (2 << (u8 % 5): 2..32), u8 window, u8 buffer-size selector; then per step the device's writes:
 * u8 ring (bit 0: 0 RX, 1 TX), u16 used->idx, u8 count of used entries, that many (u16 slot,
 * u32 id, u32 len), u16 avail_event, u16 used flags, u16 num_buffers into a random RX buffer.
 * After every turn: a failing turn names a ring (err_ring 0 or 1) and stops the input (a driver
 * treats it as fatal); otherwise each ring's free descriptors and the descriptors of its chains
 * in flight add up to its size, the pair's in-flight count never exceeds its window, and the
 * turn never received more frames than the RX ring could hold.
 *
 * Only the public API of vx_core.h (and vx_drv.h, which it includes) is used.
 */
#include "fuzz_common.h"

#define DP_MAX 32u
#define DP_FRAME 60u
#define DP_HDR 12u

struct dp_ring {
    struct drvq_mem { /* the alignments VIRTIO 1.2 2.7 requires of a split ring */
        _Alignas(16) uint8_t desc[16 * DP_MAX];
        _Alignas(2) uint8_t avail[6 + 2 * DP_MAX];
        _Alignas(4) uint8_t used[6 + 8 * DP_MAX];
    } m;
    uint16_t free_ids[DP_MAX], chain_next[DP_MAX], chain_len[DP_MAX], order[DP_MAX],
        scratch[DP_MAX];
    struct vx_drvq q;
};

static void ring_init(struct dp_ring *r, uint32_t size, uint32_t flags)
{
    memset(r, 0, sizeof *r);
    r->q.desc = r->m.desc;
    r->q.avail = r->m.avail;
    r->q.used = r->m.used;
    r->q.free_ids = r->free_ids;
    r->q.chain_next = r->chain_next;
    r->q.chain_len = r->chain_len;
    r->q.order = r->order;
    r->q.scratch = r->scratch;
    r->q.size = size;
    r->q.flags = flags;
    vx_drvq_reset(&r->q, 0);
}

static void ring_check(const struct dp_ring *r, unsigned which)
{
    uint32_t held = 0;
    for (uint32_t i = 0; i < r->q.size; i++)
        held += r->chain_len[i];
    if (r->q.num_free + held != r->q.size)
        fz_abort("free + held descriptors != ring size", which, r->q.num_free + held, r->q.size);
    if (r->q.in_flight > r->q.size)
        fz_abort("more chains in flight than the ring holds", which, r->q.in_flight, r->q.size);
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct dp_ring rx, tx;
    static uint8_t rx_bufs[DP_MAX * 256], tx_bufs[DP_MAX * 256], scratch[64 * 256];
    static uint8_t frames[DP_MAX * DP_FRAME];
    static uint32_t lens[DP_MAX];
    struct fz_cur c = {data, size};
    uint8_t fl = fz_u8(&c);
    uint32_t qsize = 1u << (1 + fz_u8(&c) % 5);
    uint32_t window = 1 + fz_u8(&c) % qsize;
    uint32_t buf_size = (uint32_t[]){32, 64, 128, 256}[fz_u8(&c) % 4];
    uint32_t qflags = (fl & 1 ? VX_DRVQ_EVENT_IDX : 0) | (fl & 2 ? VX_DRVQ_IN_ORDER : 0);
    ring_init(&rx, qsize, qflags);
    ring_init(&tx, qsize, qflags);
    memset(frames, 0xA5, sizeof frames);
    for (uint32_t i = 0; i < DP_MAX; i++)
        lens[i] = DP_FRAME;
    struct vx_drvpair p = {
        .rx = &rx.q, .tx = &tx.q, .rx_bufs = rx_bufs, .rx_addr = 0x10000, .tx_bufs = tx_bufs,
        .tx_addr = 0x20000, .rx_buf_size = buf_size, .tx_buf_size = buf_size,
        .hdr_len = DP_HDR, .mrg_rxbuf = fl & 4 ? 1 : 0, .frames = frames, .lens = lens,
        .scratch = scratch, .scratch_len = sizeof scratch, .window = window,
        .rx_kick_fd = -1, .tx_kick_fd = -1,
    };
    for (unsigned s = 0; s < 16; s++) {
        int32_t r = vx_drvpair_turn(&p);
        fz_trace(s, (unsigned)(r < 0 ? -r : r), p.inflight);
        if (r < 0) {
            if (p.err_ring != 0 && p.err_ring != 1)
                fz_abort("a failed turn names no ring", 0, (unsigned)p.err_ring, 0);
            return 0;
        }
        if ((uint32_t)r > qsize)
            fz_abort("one turn received more frames than the RX ring holds", 0, (unsigned)r, qsize);
        ring_check(&rx, 0);
        ring_check(&tx, 1);
        if (p.inflight > p.window)
            fz_abort("more frames in flight than the window", 0, p.inflight, p.window);
        if (!c.n)
            return 0;
        /* the device's writes */
        struct dp_ring *w = fz_u8(&c) & 1 ? &tx : &rx;
        uint16_t idx = fz_u16(&c);
        unsigned n = fz_u8(&c) % 8;
        for (unsigned k = 0; k < n; k++) {
            uint16_t slot = fz_u16(&c) % qsize;
            put32(w->m.used + 4 + 8 * slot, fz_u32(&c));
            put32(w->m.used + 8 + 8 * slot, fz_u32(&c));
        }
        put16(w->m.used + 2, idx);
        put16(w->m.used + 4 + 8 * qsize, fz_u16(&c)); /* avail_event */
        put16(w->m.used, fz_u16(&c));                 /* used flags */
        uint16_t nb = fz_u16(&c);
        put16(rx_bufs + (nb % qsize) * buf_size + 10, fz_u16(&c)); /* num_buffers */
    }
    return 0;
}
