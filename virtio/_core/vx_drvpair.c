/*
 * vx_drvpair.c - one virtio-net queue pair's whole driver turn (the guest's side), for load
 * generators whose per-packet work must not be Python's: reap and drop received frames, keep the
 * RX ring stocked, keep `window` frames in flight on TX, kick when the device asks. Built on the
 * vx_drvq.c batch entry points; contract in vx_drv.h. virtio.driver.pairs is the Python face.
 * Threads: a vx_drvpair (and its two vx_drvq) belongs to one thread at a time.
 */
#include "vx_core.h"

#include <unistd.h>

static void kick(struct vx_drvpair *p, int32_t fd)
{
    if (fd < 0) {
        p->kicks_wanted++;
        return;
    }
    uint64_t one = 1;
    /* a full eventfd counter (EAGAIN) still wakes the device: nothing to retry */
    if (write(fd, &one, sizeof one) == (ssize_t)sizeof one)
        p->kicks++;
}

static int32_t fail(struct vx_drvpair *p, int32_t ring, int32_t rc)
{
    p->err_ring = ring;
    return rc;
}

static inline int more_used(const struct vx_drvq *q)
{
    const uint16_t *idx = (const uint16_t *)q->used + 1;
    return __atomic_load_n(idx, __ATOMIC_ACQUIRE) != q->last_used;
}

int32_t vx_drvpair_turn(struct vx_drvpair *p)
{
    uint32_t lens[64];
    int32_t got = 0;
    /* RX: every whole frame published; rx_frames re-arms used_event (and fences) after what it
     * took, so an entry published meanwhile is seen by the re-check, not lost */
    for (;;) {
        int32_t n = vx_drvq_rx_frames(p->rx, p->rx_bufs, p->rx_buf_size, p->hdr_len,
                                      p->mrg_rxbuf, p->scratch, p->scratch_len, lens, 64);
        if (n < 0)
            return fail(p, 0, n);
        got += n;
        if (n == 0 || !more_used(p->rx))
            break;
    }
    if (vx_drvq_rx_post(p->rx, p->rx_addr, p->rx_buf_size) && vx_drvq_publish(p->rx))
        kick(p, p->rx_kick_fd);
    p->received += (uint64_t)got;
    p->inflight = (uint32_t)got >= p->inflight ? 0 : p->inflight - (uint32_t)got;
    /* TX: free what the device used, top up to the window */
    int32_t r = vx_drvq_reap(p->tx);
    if (r < 0)
        return fail(p, 1, r);
    if (p->inflight < p->window) {
        uint32_t want = p->window - p->inflight;
        int32_t k = vx_drvq_tx_frames(p->tx, p->tx_bufs, p->tx_addr, p->tx_buf_size, p->hdr_len,
                                      p->frames, p->lens, want);
        if (k < 0)
            return fail(p, 1, k);
        p->inflight += (uint32_t)k;
        p->sent += (uint64_t)k;
        if (vx_drvq_publish(p->tx))
            kick(p, p->tx_kick_fd);
    }
    return got;
}

int64_t vx_drvpair_turns(struct vx_drvpair *pairs, const uint32_t *idx, uint32_t n,
                         uint32_t *err_pair)
{
    int64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        int32_t r = vx_drvpair_turn(&pairs[idx[i]]);
        if (r < 0) {
            *err_pair = idx[i];
            return r;
        }
        total += r;
    }
    return total;
}
