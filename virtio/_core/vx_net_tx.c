/*
 * vx_net_tx.c - the net TX direction: TX chains consumed into a sink, into an RX queue (echo, fwd)
 * or into an fd (tx_to_fd). Each operation is the one TX loop (vx_tx.h) with its action here;
 * the switch's action is in vx_switch.c.
 *
 * Threads: the TX queue's owning worker (fwd and echo_shared write the RX queue under its lock).
 */
#include "vx_tx.h"

#include <pthread.h>

/* ------------------------------------------------------------------------------------------ */
/* sink: copy each frame out, count it, drop it                                                 */

/*
 * The sink's copy destination: a rotating set of VX_SINK_SLOTS buffers of VX_SINK_SLOT_LEN bytes
 * per thread (one set per worker however many sink queues it serves), not one cache-hot scratch
 * buffer. The size copies what DPDK's vhost PMD + testpmd rxonly really write into: mbufs from
 * the lcore's mempool cache, which hands the same ~32 mbufs (one burst, ~70 KiB) back burst
 * after burst (LIFO). 64 slots (128 KiB: out of L1, in L2) is slightly harsher than that; 2048
 * slots (4 MiB, out of L2) measured 3-4x slower than scratch at 1500 B in bench/micro_core.py,
 * a cost DPDK does not pay. Frames longer than a slot go to the queue's scratch buffer.
 */
struct sink_ring {
    uint8_t *buf;
    uint32_t next;
};

static pthread_key_t sink_key;
static pthread_once_t sink_once = PTHREAD_ONCE_INIT;
static __thread struct sink_ring *tls_sink;

static void sink_ring_free(void *p)
{
    struct sink_ring *r = p;
    free(r->buf);
    free(r);
}

static void sink_key_init(void)
{
    (void)pthread_key_create(&sink_key, sink_ring_free);
}

/* this thread's ring, allocated on first use (NULL if that fails: the scratch buffer is used) */
static struct sink_ring *sink_ring_get(void)
{
    struct sink_ring *r = tls_sink;
    if (likely(r != NULL))
        return r;
    pthread_once(&sink_once, sink_key_init);
    r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->buf = malloc((size_t)VX_SINK_SLOTS * VX_SINK_SLOT_LEN);
    if (!r->buf) {
        free(r);
        return NULL;
    }
    (void)pthread_setspecific(sink_key, r);
    tls_sink = r;
    return r;
}

static inline uint8_t *sink_dst(struct vx_vq *tx, struct sink_ring *ring, uint32_t len)
{
    if (likely(ring != NULL && len <= VX_SINK_SLOT_LEN))
        return ring->buf + (size_t)(ring->next++ & (VX_SINK_SLOTS - 1)) * VX_SINK_SLOT_LEN;
    return tx->scratch;
}

struct sink_ctx {
    struct sink_ring *ring;
};

static inline void sink_begin(void *ctx)
{
    ((struct sink_ctx *)ctx)->ring = sink_ring_get();
}

static inline int sink_chain(void *ctx, struct vx_vq *tx, const struct tx_item *it)
{
    uint8_t *dst = sink_dst(tx, ((struct sink_ctx *)ctx)->ring, it->len);
    if (likely(it->kind == TX_FLAT)) {
        memcpy(dst, it->frame, it->len);
    } else {
        struct cur c;
        cur_init(&c, tx->segs, tx->nread);
        cur_skip(&c, tx->hdr_len);
        cur_read(&c, dst, it->len);
    }
    return TX_SENT;
}

/* frames up to the scratch buffer's size; longer ones count as too_big */
static const struct tx_action SINK = {
    .stage = VX_TX_STAGE_MAX,
    .max_frame = VX_SCRATCH_LEN,
    .oversize_too_big = 1,
    .begin = sink_begin,
    .chain = sink_chain,
};

int vx_net_tx_sink(struct vx_vq *tx, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns)
{
    struct sink_ctx ctx = {NULL};
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &SINK, &ctx);
}

/* ------------------------------------------------------------------------------------------ */
/* TX into an RX queue: echo (MACs swapped, back into the same device) and fwd (another device) */

struct to_rx_ctx {
    struct vx_vq *rx;
    int swap_mac; /* echo: swap destination and source MAC */
    int locked;   /* fwd, echo_shared: rx may be written by other threads: hold its lock (never
                   * while spinning) */
    int rx_fatal; /* echo: rx breaking fails the call; fwd: its frames are dropped */
    int wrote;    /* delivered into rx since its last publication */
};

static inline int to_rx_precheck(void *ctx, struct vx_vq *tx)
{
    const struct to_rx_ctx *x = ctx;
    (void)tx;
    return unlikely(x->rx_fatal && x->rx->broken) ? -1 : 1;
}

static inline void to_rx_lock(void *ctx)
{
    struct to_rx_ctx *x = ctx;
    if (x->locked)
        vq_lock(x->rx);
}

/* publish rx (used entries and interrupt) if anything went in, then drop its lock */
static inline void to_rx_release(void *ctx)
{
    struct to_rx_ctx *x = ctx;
    if (x->wrote || x->rx->nshadow)
        vx_vq_notify_decide(x->rx);
    x->wrote = 0;
    if (x->locked)
        vq_unlock(x->rx);
}

static inline uint64_t to_rx_held_until(void *ctx)
{
    return __atomic_load_n(&((struct to_rx_ctx *)ctx)->rx->irq_deadline, __ATOMIC_RELAXED);
}

static inline int to_rx_resume(void *ctx, int spun)
{
    struct to_rx_ctx *x = ctx;
    to_rx_lock(ctx);
    /* echo: the RX ring broke while we waited */
    return spun > 0 && x->rx_fatal && x->rx->broken ? -1 : 0;
}

static inline int to_rx_chain(void *ctx, struct vx_vq *tx, const struct tx_item *it)
{
    struct to_rx_ctx *x = ctx;
    uint8_t thdr[VX_NET_HDR_BASE_LEN];
    struct vx_seg one;
    struct rx_src src;
    tx_item_header(tx, it, thdr);
    tx_item_frame(tx, it, &one, &src.cur);
    src.len = it->len;
    src.hdr = thdr;
    src.swap_mac = x->swap_mac;
    int r = rx_deliver(x->rx, &src);
    if (r < 0 && x->rx_fatal)
        return TX_FAIL;
    if (r <= 0) { /* rx broke (fwd), no room or too big: the frame is dropped */
        tx->stats.dropped++;
        return TX_DROPPED;
    }
    x->wrote = 1;
    return TX_SENT;
}

static const struct tx_action TO_RX = {
    .stage = VX_TX_STAGE_MAX,
    .max_frame = VX_MAX_FRAME_LEN,
    .precheck = to_rx_precheck,
    .begin = to_rx_lock,
    .chain = to_rx_chain,
    .before_wait = to_rx_release,
    .held_until = to_rx_held_until,
    .after_wait = to_rx_resume,
    .end = to_rx_release,
};

int vx_net_echo(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns)
{
    struct to_rx_ctx ctx = {.rx = rx, .swap_mac = 1, .locked = 0, .rx_fatal = 1};
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &TO_RX, &ctx);
}

int echo_shared(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns)
{
    struct to_rx_ctx ctx = {.rx = rx, .swap_mac = 1, .locked = 1, .rx_fatal = 1};
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &TO_RX, &ctx);
}

int vx_net_fwd(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
               uint64_t spin_ns)
{
    struct to_rx_ctx ctx = {.rx = rx, .swap_mac = 0, .locked = 1, .rx_fatal = 0};
    if (rx)
        __atomic_store_n(&rx->irq_shared, 1, __ATOMIC_RELAXED); /* never moderated */
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &TO_RX, &ctx);
}

/* ------------------------------------------------------------------------------------------ */
/* TX into an fd: writev of each chain, net header included (a TAP fd with IFF_VNET_HDR)        */

struct to_fd_ctx {
    int fd;
};

/* stage 1, segs_only: tx->segs are this chain's */
static inline int to_fd_chain(void *ctx, struct vx_vq *tx, const struct tx_item *it)
{
    (void)it;
    uint32_t k = tx->nread < VX_IOV_MAX ? tx->nread : VX_IOV_MAX; /* longer chains truncated */
    for (uint32_t i = 0; i < k; i++) {
        tx->iov[i].iov_base = tx->segs[i].ptr;
        tx->iov[i].iov_len = tx->segs[i].len;
    }
    ssize_t w = writev(((struct to_fd_ctx *)ctx)->fd, tx->iov, k);
    if (likely(w >= 0))
        return TX_SENT;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        tx->stats.eagain++;
        return TX_STOP; /* chain stays in the ring; no spinning on a full fd */
    }
    if (errno == EINTR)
        return TX_RETRY;
    tx->stats.io_errors++;
    tx->stats.dropped++;
    return TX_DROPPED;
}

/* one chain per stage: a syscall per chain dwarfs the cache misses a prefetch would hide, and
 * an EAGAIN must leave the rest of the ring unwalked */
static const struct tx_action TO_FD = {
    .stage = 1,
    .budget_after_drop = 1,
    .segs_only = 1,
    .chain = to_fd_chain,
};

int vx_net_tx_to_fd(struct vx_vq *tx, int fd, uint32_t max_pkts, uint64_t max_bytes,
                    uint64_t spin_ns)
{
    struct to_fd_ctx ctx = {fd};
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &TO_FD, &ctx);
}
