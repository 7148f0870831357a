/*
 * vx_tx.h - INTERNAL (not fed to the cffi cdef): the one TX loop.
 *
 * Every TX operation (vx_net_tx_sink, vx_net_echo, vx_net_fwd, vx_net_tx_to_fd, vx_switch_tx) is
 * tx_run() with its own struct tx_action: what to do with one chain, plus the hooks around the
 * loop (locks, publication of the queues the action wrote). tx_run is always_inline and every
 * caller passes a `static const` action, so the compiler folds the action's constants and calls
 * its functions directly (inlined): each operation is compiled as its own specialised loop, with
 * no indirect call and no test of the action kind per chain.
 *
 * One turn of the loop:
 *  1. stage: walk up to action->stage chains from the avail ring (descriptors checked, buffers
 *     translated), classify each (flat frame, scattered, malformed, oversize) and, when the stage
 *     holds more than one chain, prefetch the first bytes of each frame: the driver just wrote
 *     them on another core, and touching them right after the walk would stall on each line in
 *     turn (DPDK's vhost dequeue prefetches the same way); non-temporal by default, so that
 *     those lines do not stay in this core's L2, or as the ring's tx_prefetch says
 *     (vx_vq_set_tx_prefetch; see the prefetch). A scattered chain ends the stage: its
 *     segments (tx->segs) are only valid until the next walk.
 *  2. act on the staged chains in avail order, and complete each (a used entry) after its action:
 *     used entries always keep the avail order (VIRTIO_F_IN_ORDER); a stage followed by more
 *     chains of the same snapshot publishes its used entries before the next stage.
 * The byte budget: staging stops once the staged frames, all counted, would reach the budget, so
 * a call stops at exactly the chain it would stop at without the stage.
 * Busy-poll (spin_ns), the packet budget and the avail re-reads are as described in vx_core.h.
 *
 * Threads: the TX queue's owning worker.
 */
#ifndef VX_TX_H
#define VX_TX_H

#include "vx_internal.h"

/* chains walked, classified and prefetched before the action runs on them (the largest stage) */
#define VX_TX_STAGE_MAX 32
/* frames longer than this are prefetched a second cache line further */
#define VX_TX_PREFETCH_LINE 64
/* the first line or two of a staged frame, for reading; loc: __builtin_prefetch's locality
 * (a constant: 0 non-temporal, 3 all levels) */
#define TX_PREFETCH_FRAME(p, len, loc)                                                        \
    do {                                                                                       \
        __builtin_prefetch((p), 0, (loc));                                                     \
        if ((len) > VX_TX_PREFETCH_LINE)                                                       \
            __builtin_prefetch((p) + VX_TX_PREFETCH_LINE, 0, (loc));                           \
    } while (0)
/* what the walk found in one chain (struct tx_item.kind) */
enum tx_kind {
    TX_FLAT = 0,      /* header and frame each in one buffer: hdr / frame pointers valid */
    TX_SCATTERED = 1, /* anything else: read it through tx->segs (valid: it ends the stage) */
    TX_MALFORMED = 2, /* shorter than header + action->min_frame: completed, counted dropped */
    TX_OVERSIZE = 3   /* frame longer than action->max_frame: completed, dropped or too_big */
};

struct tx_item {
    const uint8_t *hdr;   /* TX_FLAT: the net header (tx->hdr_len bytes) */
    const uint8_t *frame; /* TX_FLAT: the frame (len bytes) */
    uint32_t len;         /* TX_FLAT, TX_SCATTERED: frame bytes (the chain's readable bytes minus
                           * the net header) */
    uint16_t head;
    uint8_t kind;         /* enum tx_kind */
};

/* what an action did with one chain */
enum tx_verdict {
    TX_SENT = 0,    /* completed; counted as a packet (packets, bytes, the byte budget) */
    TX_DROPPED = 1, /* completed; the action counted why (dropped, io_errors, ...) */
    TX_RETRY = 2,   /* not completed: run the action on it again (EINTR) */
    TX_STOP = 3,    /* not completed, left in the ring: the call ends here normally (EAGAIN) */
    TX_FAIL = 4     /* completed; the call fails (-1): a queue it must not outlive broke */
};

struct tx_action {
    uint32_t stage;        /* chains per stage, 1..VX_TX_STAGE_MAX (> 1: prefetch pipeline; 1:
                            * the action may also read tx->segs of a TX_FLAT chain) */
    uint32_t min_frame;    /* frames shorter than this are TX_MALFORMED */
    uint32_t max_frame;    /* frames longer than this are TX_OVERSIZE; 0: no limit */
    int oversize_too_big;  /* TX_OVERSIZE counts as too_big (else as dropped) */
    int budget_after_drop; /* the byte budget is checked after every completed chain, not only
                            * after a TX_SENT one (max_bytes 0 then ends a call after one chain) */
    int segs_only;         /* stage 1 only: the action reads tx->segs, the loop does not look for
                            * a flat frame (kind is TX_SCATTERED, hdr / frame unset) */
    /* before the turn: <= 0 ends the call with that value, 1 goes on (NULL: go on) */
    int (*precheck)(void *ctx, struct vx_vq *tx);
    /* the turn has chains (NULL: nothing to do) */
    void (*begin)(void *ctx);
    /* one staged chain (not TX_MALFORMED / TX_OVERSIZE): an enum tx_verdict */
    int (*chain)(void *ctx, struct vx_vq *tx, const struct tx_item *it);
    /* before a busy-poll wait: publish what the action wrote, release locks (NULL: nothing) */
    void (*before_wait)(void *ctx);
    /* before a busy-poll wait: the earliest held-interrupt deadline of the queues the action
     * wrote (0: none; NULL: none); the wait ends there, since their driver may be waiting for
     * that interrupt before it gives the TX ring more */
    uint64_t (*held_until)(void *ctx);
    /* after it (spun: the wait's result): retake locks; < 0 fails the call (NULL: 0) */
    int (*after_wait)(void *ctx, int spun);
    /* the call ends (either way): publish what the action wrote, release locks (NULL: nothing) */
    void (*end)(void *ctx);
};

/* the first VX_NET_HDR_BASE_LEN bytes of the chain's net header into thdr (the rest zeroed) */
static inline void tx_item_header(const struct vx_vq *tx, const struct tx_item *it,
                                  uint8_t thdr[VX_NET_HDR_BASE_LEN])
{
    const uint32_t hlen = tx->hdr_len;
    const uint32_t k = hlen < VX_NET_HDR_BASE_LEN ? hlen : VX_NET_HDR_BASE_LEN;
    memset(thdr, 0, VX_NET_HDR_BASE_LEN);
    if (likely(it->kind == TX_FLAT)) {
        memcpy(thdr, it->hdr, k);
    } else {
        struct cur c;
        cur_init(&c, tx->segs, tx->nread);
        cur_read(&c, thdr, k);
    }
}

/* a cursor over the chain's frame (net header skipped); `one` backs it for a TX_FLAT chain */
static inline void tx_item_frame(const struct vx_vq *tx, const struct tx_item *it,
                                 struct vx_seg *one, struct cur *c)
{
    if (likely(it->kind == TX_FLAT)) {
        one->ptr = (uint8_t *)it->frame;
        one->len = it->len;
        cur_init(c, one, it->len ? 1 : 0);
    } else {
        cur_init(c, tx->segs, tx->nread);
        cur_skip(c, tx->hdr_len);
    }
}

/*
 * The TX loop: chains of `tx` through action A (ctx: its state). Returns the chains completed
 * (>= 0), or -1 when tx broke or A failed the call.
 */
static inline __attribute__((always_inline)) int
tx_run(struct vx_vq *tx, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns,
       const struct tx_action *A, void *ctx)
{
    if (A->precheck) {
        int p = A->precheck(ctx, tx);
        if (p <= 0)
            return p;
    }
    if (max_pkts > VX_CALL_MAX)
        max_pkts = VX_CALL_MAX;
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    if (A->begin)
        A->begin(ctx);
    const uint32_t hlen = tx->hdr_len;
    const uint32_t pf = tx->tx_prefetch; /* VX_TX_PREFETCH_* */
    uint64_t bytes = 0, spin_left = spin_ns; /* bytes: of the frames sent in this call */
    uint32_t sent = 0;                        /* frames sent in this call (stats at the end) */
    int done = 0, walk_failed = 0, walk_missed = 0;
    for (;;) {
        while (done < n) {
            struct tx_item stage[VX_TX_STAGE_MAX];
            uint32_t ns = 0;
            const uint32_t lim = (uint32_t)(n - done) < A->stage ? (uint32_t)(n - done) : A->stage;
            uint16_t idx = tx->last_avail_idx;
            uint64_t staged = bytes; /* bytes if every staged frame is sent */
            /* 1. stage */
            while (ns < lim) {
                uint16_t slot = idx++ & tx->mask;
                uint16_t head = tx->avail->ring[slot];
                if (A->stage > 1)
                    __builtin_prefetch(&tx->desc[tx->avail->ring[(slot + 1) & tx->mask] & tx->mask]);
                int w = vq_walk_tx(tx, head);
                if (unlikely(w)) {
                    /* act on the chains before it, then fail (or, on an IOTLB miss, end the
                     * call with this chain left in the ring) */
                    if (w < 0)
                        walk_failed = 1;
                    else
                        walk_missed = 1;
                    break;
                }
                struct tx_item *it = &stage[ns++];
                it->head = head;
                if (unlikely(tx->rlen < (uint64_t)hlen + A->min_frame)) {
                    it->kind = TX_MALFORMED;
                } else if (A->max_frame && unlikely(tx->rlen - hlen > A->max_frame)) {
                    it->kind = TX_OVERSIZE;
                } else {
                    uint32_t len = (uint32_t)(tx->rlen - hlen);
                    it->len = len;
                    staged += len;
                    if (A->segs_only) {
                        it->kind = TX_SCATTERED; /* stage 1: the action reads tx->segs */
                    } else if (likely(tx->nread == 1)) {
                        it->kind = TX_FLAT;
                        it->hdr = tx->segs[0].ptr;
                        it->frame = tx->segs[0].ptr + hlen;
                    } else if (tx->nread == 2 && tx->segs[0].len == hlen) {
                        it->kind = TX_FLAT; /* header in its own buffer, frame in one */
                        it->hdr = tx->segs[0].ptr;
                        it->frame = tx->segs[1].ptr;
                    } else {
                        it->kind = TX_SCATTERED;
                        break;
                    }
                    if (A->stage > 1 && pf != VX_TX_PREFETCH_NONE) {
                        /* non-temporal (PREFETCHNTA, the default): the frame is read once,
                         * and a line of the driver's left in our L2 makes the driver's next
                         * write to it (its next frame in that buffer) wait for an
                         * invalidation here. Which hint the driver's core pays least for
                         * depends on the cache path between the two cores, so the worker
                         * measures it (tx_prefetch auto): guest TX 64 B, 2 devices on an AMD
                         * EPYC guest, 15.7 Mpps with T0 against 10.1 with NTA in one run, the
                         * reverse in others (docs/benchmarks.md, 2026-12-03) */
                        if (pf == VX_TX_PREFETCH_NTA)
                            TX_PREFETCH_FRAME(it->frame, len, 0);
                        else
                            TX_PREFETCH_FRAME(it->frame, len, 3);
                    }
                    if (staged >= max_bytes)
                        break;
                    continue;
                }
                if (A->budget_after_drop && staged >= max_bytes)
                    break;
            }
            /* 2. act and complete, in avail order */
            for (uint32_t i = 0; i < ns; i++) {
                const struct tx_item *it = &stage[i];
                if (unlikely(it->kind >= TX_MALFORMED)) {
                    if (it->kind == TX_OVERSIZE && A->oversize_too_big)
                        tx->stats.too_big++;
                    else
                        tx->stats.dropped++;
                    tx->last_avail_idx++;
                    vq_push(tx, it->head, 0);
                    done++;
                    if (A->budget_after_drop && bytes >= max_bytes)
                        goto out;
                    continue;
                }
                int v;
                do
                    v = A->chain(ctx, tx, it);
                while (v == TX_RETRY);
                if (v == TX_STOP)
                    goto out;
                tx->last_avail_idx++;
                vq_push(tx, it->head, 0);
                done++;
                if (likely(v == TX_SENT)) {
                    sent++;
                    bytes += it->len;
                    if (bytes >= max_bytes)
                        goto out;
                } else if (v == TX_FAIL) {
                    goto fail;
                } else if (A->budget_after_drop && bytes >= max_bytes) {
                    goto out;
                }
            }
            if (unlikely(walk_failed))
                goto fail;
            if (unlikely(walk_missed))
                goto out;
            /* more of this snapshot to go: publish the stage's completions now, so the driver
             * can reuse those descriptors while we copy the rest (not once per snapshot of up
             * to a whole ring) */
            if (done < n)
                vq_flush(tx);
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            /* every completion first, and no lock held: the driver must not wait on our spin */
            if (A->before_wait)
                A->before_wait(ctx);
            vx_vq_notify_decide(tx);
            uint64_t until = __atomic_load_n(&tx->irq_deadline, __ATOMIC_RELAXED);
            if (A->held_until)
                until = deadline_min(until, A->held_until(ctx));
            int r = vq_spin(tx, &spin_left, until);
            int f = A->after_wait ? A->after_wait(ctx, r) : 0;
            if (r < 0 || f < 0)
                goto fail;
            if (r == 0)
                break;
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx); /* publish what this snapshot consumed before taking the next */
        }
        if (m < 0)
            goto fail;
        if (m == 0)
            break;
        n = m;
    }
out:
    if (unlikely(walk_failed))
        goto fail;
    tx->stats.packets += sent;
    tx->stats.bytes += bytes;
    if (A->end)
        A->end(ctx);
    vx_vq_notify_decide(tx);
    return done;
fail:
    tx->stats.packets += sent;
    tx->stats.bytes += bytes;
    if (A->end)
        A->end(ctx);
    return -1;
}

#endif
