/*
 * vx_net_tx.c - the net TX direction: TX chains consumed into a sink, into an RX queue (echo, fwd)
 * or into an fd (tx_to_fd).
 *
 * Threads: the TX queue's owning worker (fwd writes the RX queue under its lock).
 */
#include "vx_internal.h"

#include <pthread.h>

/* ------------------------------------------------------------------------------------------ */
/* net operations                                                                               */

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

/*
 * The sink works in stages of up to VX_SINK_STAGE chains: walk them (descriptors checked, buffers
 * translated) and prefetch the first bytes of each frame, then copy them all. The frame data was
 * just written by the driver on another core; copying it right after the walk stalls on each
 * line in turn, prefetching the stage first overlaps those misses (DPDK's vhost dequeue does the
 * same). A chain is completed (used entry) only after its copy.
 */
#define VX_SINK_STAGE 32

struct sink_item {
    const uint8_t *src; /* the frame (net header skipped), NULL: copy through a cursor */
    uint32_t len;
    uint16_t head;
};

static inline uint8_t *sink_dst(struct vx_vq *tx, struct sink_ring *ring, uint32_t len)
{
    if (likely(ring != NULL && len <= VX_SINK_SLOT_LEN))
        return ring->buf + (size_t)(ring->next++ & (VX_SINK_SLOTS - 1)) * VX_SINK_SLOT_LEN;
    return tx->scratch;
}

/* copy every staged frame out, then complete its chain (in stage order); returns 0 */
static inline uint32_t sink_flush(struct vx_vq *tx, struct sink_ring *ring,
                                  const struct sink_item *stage, uint32_t ns)
{
    for (uint32_t i = 0; i < ns; i++) {
        memcpy(sink_dst(tx, ring, stage[i].len), stage[i].src, stage[i].len);
        vq_push(tx, stage[i].head, 0);
    }
    return 0;
}

int vx_net_tx_sink(struct vx_vq *tx, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns)
{
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    const uint32_t hlen = tx->hdr_len;
    struct sink_ring *ring = sink_ring_get();
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0;
    for (;;) {
        while (done < n) {
            struct sink_item stage[VX_SINK_STAGE];
            uint32_t ns = 0;
            int full = 0;
            while (done < n && ns < VX_SINK_STAGE) {
                uint16_t slot = tx->last_avail_idx & tx->mask;
                uint16_t head = tx->avail->ring[slot];
                __builtin_prefetch(&tx->desc[tx->avail->ring[(slot + 1) & tx->mask] & tx->mask]);
                if (vq_walk(tx, head) < 0)
                    return -1;
                tx->last_avail_idx++;
                done++;
                if (unlikely(tx->rlen < hlen || tx->rlen - hlen > VX_SCRATCH_LEN)) {
                    if (tx->rlen < hlen)
                        tx->stats.dropped++;
                    else
                        tx->stats.too_big++;
                    ns = sink_flush(tx, ring, stage, ns); /* keep the avail order */
                    vq_push(tx, head, 0);
                    continue;
                }
                uint32_t len = (uint32_t)(tx->rlen - hlen);
                const struct vx_seg *sg = tx->segs;
                const uint8_t *src = NULL;
                if (likely(tx->nread == 1))
                    src = sg[0].ptr + hlen;
                else if (tx->nread == 2 && sg[0].len == hlen)
                    src = sg[1].ptr; /* header in its own buffer, frame in one */
                if (likely(src != NULL)) {
                    __builtin_prefetch(src);
                    if (len > 64)
                        __builtin_prefetch(src + 64);
                    stage[ns].src = src;
                    stage[ns].len = len;
                    stage[ns].head = head;
                    ns++;
                } else { /* scattered: copy now, through a cursor (segs are per chain), after
                          * the stage so that used entries keep the avail order */
                    ns = sink_flush(tx, ring, stage, ns);
                    struct cur c;
                    cur_init(&c, sg, tx->nread);
                    cur_skip(&c, hlen);
                    cur_read(&c, sink_dst(tx, ring, len), len);
                    vq_push(tx, head, 0);
                }
                tx->stats.packets++;
                tx->stats.bytes += len;
                bytes += len;
                if (bytes >= max_bytes) {
                    full = 1;
                    break;
                }
            }
            sink_flush(tx, ring, stage, ns);
            if (full)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            vx_vq_signal(tx); /* completions first: the driver must not wait on our spin */
            int r = vq_spin(tx, &spin_left);
            if (r <= 0) {
                if (r < 0)
                    return -1;
                break;
            }
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx); /* publish what this snapshot consumed before taking the next */
        }
        if (m < 0)
            return -1;
        if (m == 0)
            break;
        n = m;
    }
out:
    vx_vq_signal(tx);
    return done;
}

/*
 * TX chains of `tx` delivered into `rx`. locked: take rx's lock around the deliveries (the rx
 * queue may be written by other threads; never held while spinning). Returns TX chains consumed,
 * or -1 if TX broke (or rx broke and rx_fatal).
 */
static int tx_to_rx(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                    int swap, int locked, int rx_fatal, uint64_t spin_ns)
{
    if (unlikely(rx_fatal && rx->broken))
        return -1;
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    const uint32_t hlen = tx->hdr_len;
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0, wrote = 0, ret;
    if (locked)
        vq_lock(rx);
    for (;;) {
        while (done < n) {
            uint16_t head = tx->avail->ring[tx->last_avail_idx & tx->mask];
            if (vq_walk(tx, head) < 0) {
                ret = -1;
                goto fail;
            }
            tx->last_avail_idx++;
            vq_push(tx, head, 0);
            done++;
            if (unlikely(tx->rlen < hlen || tx->rlen - hlen > 65535 + 64)) {
                tx->stats.dropped++;
                continue;
            }
            uint8_t thdr[10] = {0};
            struct rx_src src;
            cur_init(&src.cur, tx->segs, tx->nread);
            cur_read(&src.cur, thdr, hlen < 10 ? hlen : 10);
            cur_skip(&src.cur, hlen > 10 ? hlen - 10 : 0);
            src.len = (uint32_t)(tx->rlen - hlen);
            src.hdr = thdr;
            src.swap_mac = swap;
            int r = rx_deliver(rx, &src);
            if (r < 0) {
                if (rx_fatal) {
                    ret = -1;
                    goto fail;
                }
                tx->stats.dropped++;
                continue;
            }
            if (r == 0) {
                tx->stats.dropped++;
                continue;
            }
            wrote = 1;
            tx->stats.packets++;
            tx->stats.bytes += src.len;
            bytes += src.len;
            if (bytes >= max_bytes)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            /* completions of both rings first, and no lock held while we wait */
            if (wrote || rx->nshadow)
                vx_vq_signal(rx);
            wrote = 0;
            if (locked)
                vq_unlock(rx);
            vx_vq_signal(tx);
            int r = vq_spin(tx, &spin_left);
            if (locked)
                vq_lock(rx);
            if (r < 0) {
                ret = -1;
                goto fail;
            }
            if (r == 0)
                break;
            if (rx_fatal && rx->broken) { /* echo: the RX ring broke while we waited */
                ret = -1;
                goto fail;
            }
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx);
        }
        if (m < 0) {
            ret = -1;
            goto fail;
        }
        if (m == 0)
            break;
        n = m;
    }
out:
    if (wrote || rx->nshadow)
        vx_vq_signal(rx);
    if (locked)
        vq_unlock(rx);
    vx_vq_signal(tx);
    return done;
fail:
    if (wrote || rx->nshadow)
        vx_vq_signal(rx);
    if (locked)
        vq_unlock(rx);
    return ret;
}

int vx_net_echo(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns)
{
    return tx_to_rx(tx, rx, max_pkts, max_bytes, 1, 0, 1, spin_ns);
}

int vx_net_fwd(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
               uint64_t spin_ns)
{
    return tx_to_rx(tx, rx, max_pkts, max_bytes, 0, 1, 0, spin_ns);
}

int vx_net_tx_to_fd(struct vx_vq *tx, int fd, uint32_t max_pkts, uint64_t max_bytes,
                    uint64_t spin_ns)
{
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0;
    for (;;) {
        while (done < n) {
            uint16_t head = tx->avail->ring[tx->last_avail_idx & tx->mask];
            if (vq_walk(tx, head) < 0)
                return -1;
            if (unlikely(tx->rlen < tx->hdr_len)) {
                tx->stats.dropped++;
            } else {
                uint32_t k = tx->nread;
                if (k > 1024)
                    k = 1024; /* IOV_MAX; longer chains are truncated */
                for (uint32_t i = 0; i < k; i++) {
                    tx->iov[i].iov_base = tx->segs[i].ptr;
                    tx->iov[i].iov_len = tx->segs[i].len;
                }
                ssize_t w = writev(fd, tx->iov, k);
                if (w < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        tx->stats.eagain++;
                        goto out; /* chain stays in the ring; no spinning on a full fd */
                    }
                    if (errno == EINTR)
                        continue;
                    tx->stats.io_errors++;
                    tx->stats.dropped++;
                } else {
                    uint64_t len = tx->rlen - tx->hdr_len;
                    tx->stats.packets++;
                    tx->stats.bytes += len;
                    bytes += len;
                }
            }
            tx->last_avail_idx++;
            vq_push(tx, head, 0);
            done++;
            if (bytes >= max_bytes)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            vx_vq_signal(tx);
            int r = vq_spin(tx, &spin_left);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx);
        }
        if (m < 0)
            return -1;
        if (m == 0)
            break;
        n = m;
    }
out:
    vx_vq_signal(tx);
    return done;
}

