/*
 * vx_round.c - port operations as data (struct vx_op, vx_op_run) and poll rounds (vx_round).
 *
 * A round honours moderation deadlines: at every clock read it sends the held interrupts of its
 * ops' rings (vq and peer) that are due.
 *
 * Coalescing (coalesce_ns): an op not run again within coalesce_ns leaves its ring to the driver
 * meanwhile, and finds more per batch: fewer cache lines cross between the two cores per packet.
 *
 * Threads: the worker thread owning every op's queue (an op with shared_rx writes its RX ring
 * under the ring's lock: another op on another thread writes it too).
 */
#include "vx_internal.h"

uint64_t vx_now_ns(void) { return now_ns(); }

/* paced RX_FILL: frames due now under rate_pps (at most max_pkts) */
static uint32_t rate_allowed(struct vx_op *op, uint32_t max_pkts)
{
    uint64_t now = now_ns();
    if (!op->rate_t0_ns || now < op->rate_t0_ns) {
        op->rate_t0_ns = now;
        op->rate_sent = 0;
    }
    uint64_t due = (uint64_t)((double)(now - op->rate_t0_ns) * (double)op->rate_pps / 1e9);
    uint64_t behind = due > op->rate_sent ? due - op->rate_sent : 0;
    if (behind > 4 * (uint64_t)max_pkts) { /* fell behind (no buffers, idle): restart */
        op->rate_t0_ns = now;
        op->rate_sent = 0;
        return max_pkts;
    }
    return behind > max_pkts ? max_pkts : (uint32_t)behind;
}

int vx_op_run(struct vx_op *op, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns)
{
    switch (op->kind) {
    case VX_OP_TX_SINK:
        return vx_net_tx_sink(op->vq, max_pkts, max_bytes, spin_ns);
    case VX_OP_RX_FILL:
        if (op->rate_pps) {
            uint32_t n = rate_allowed(op, max_pkts);
            if (!n)
                return 0;
            int r = unlikely(op->shared_rx)
                        ? rx_fill_shared(op->vq, op->frame, op->frame_len, n, 0)
                        : vx_net_rx_fill(op->vq, op->frame, op->frame_len, n, 0);
            if (r > 0)
                op->rate_sent += (uint64_t)r;
            return r;
        }
        if (unlikely(op->shared_rx))
            return rx_fill_shared(op->vq, op->frame, op->frame_len, max_pkts, spin_ns);
        return vx_net_rx_fill(op->vq, op->frame, op->frame_len, max_pkts, spin_ns);
    case VX_OP_ECHO:
        if (unlikely(op->shared_rx))
            return echo_shared(op->vq, op->peer, max_pkts, max_bytes, spin_ns);
        return vx_net_echo(op->vq, op->peer, max_pkts, max_bytes, spin_ns);
    case VX_OP_FWD:
        return vx_net_fwd(op->vq, op->peer, max_pkts, max_bytes, spin_ns);
    case VX_OP_TX_TO_FD:
        return vx_net_tx_to_fd(op->vq, op->fd, max_pkts, max_bytes, spin_ns);
    case VX_OP_RX_FROM_FD:
        return vx_net_rx_from_fd(op->vq, op->fd, max_pkts, spin_ns);
    case VX_OP_SWITCH_TX:
        return vx_switch_tx(op->sw, op->port, op->vq, max_pkts, max_bytes, spin_ns);
    default:
        return -2;
    }
}

/* A sink or tx_to_fd op whose TX ring is empty: its batch would only count the empty ring and
 * return 0 (tx_turn_begin); done here without the call (an empty visit cost ~100 instructions,
 * most of them the call into the specialised TX loop and its frame). Anything else (broken,
 * not started, entries there, other kinds with checks of their own first) makes the call. */
static inline int op_tx_empty(struct vx_op *op)
{
    if (op->kind != VX_OP_TX_SINK && op->kind != VX_OP_TX_TO_FD)
        return 0;
    struct vx_vq *vq = op->vq;
    if (unlikely(!vq || vq->broken || !vq->started))
        return 0;
    uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    if (idx != vq->last_avail_idx)
        return 0;
    vq->avail_idx = idx;
    vq->stats.ring_empty++;
    return 1;
}

/* held interrupts of the round's rings that are due at t go out (moderation deadlines) */
static inline void irq_due(struct vx_vq *vq, uint64_t t)
{
    if (vq && unlikely(vq->irq_deadline) && t >= vq->irq_deadline)
        vx_vq_irq_flush(vq, t);
}

static void round_irq_due(struct vx_op **ops, uint32_t n, uint64_t t)
{
    for (uint32_t i = 0; i < n; i++) {
        irq_due(ops[i]->vq, t);
        irq_due(ops[i]->peer, t);
    }
}

/*
 * Batch waiting: why a busy ring is visited less often than the round could.
 * Each visit of a ring the driver is filling reads avail->idx, a line the driver writes on its own
 * core; every batch publishes used->idx, a line the driver reads. A round that looks at a ring
 * after each of the driver's bursts moves both lines between the cores once per burst (32 frames
 * from testpmd), and the driver, whose store of avail->idx is followed by a full barrier, waits
 * for each of those transfers. On guest TX 64 B with 4 queue pairs on one testpmd core the
 * driver is the bottleneck; the larger part of what it lost against DPDK's vhost PMD was the
 * frame lines kept in our L2 (the non-temporal prefetch in vx_tx.h), and this wait took it from
 * 0.92x to 0.97x on top of that (docs/benchmarks.md, 2026-12-02).
 * So an op whose batches carry a stream (at least VX_BATCH_WAIT_FLOOR packets) waits between two
 * visits: the wait doubles (plus 1 us) while its batches stay under half batch_target (or come
 * back empty: the wait was shorter than the driver's gap between bursts), halves when a batch
 * passes batch_target, and never exceeds batch_wait_max_ns; batch_target is capped at half the
 * ring (the driver never finds it full because of the wait) and at the op's budget. A batch of
 * 1 to VX_BATCH_WAIT_FLOOR - 1 packets (a ping-pong, a light stream) ends the waiting at once:
 * latency-bound traffic is visited at every pass, as before; the first frame after a stream
 * stopped may wait up to batch_wait_max_ns.
 * A ring the op fills (RX_FILL, RX_FROM_FD: guest RX) is never waited: its batch is the buffers
 * the driver re-posted, which it re-posts only after receiving, so a wait leaves them empty. With
 * waiting, a guest RX 64 B stream (one device, baseline daemon, testpmd rxonly) settled at about
 * 20 Mpps in 4 of 8 runs, flat for each whole run, against 39-51 in all 8 without: a wait grown
 * while the stream started stays while batches land between half the target and the target.
 */
#define VX_BATCH_WAIT_FLOOR 8
#define VX_BATCH_WAIT_STEP_NS 1000

static inline uint64_t batch_wait(struct vx_op *op, uint32_t r)
{
    if (op->kind == VX_OP_RX_FILL || op->kind == VX_OP_RX_FROM_FD)
        return op->batch_wait_ns = 0; /* a ring we fill: never waited (above) */
    uint32_t target = op->batch_target;
    if (op->vq && target > op->vq->size / 2)
        target = op->vq->size / 2;
    if (target > op->max_pkts)
        target = op->max_pkts;
    uint64_t w = op->batch_wait_ns;
    if (target < 2 * VX_BATCH_WAIT_FLOOR || (r && r < VX_BATCH_WAIT_FLOOR))
        w = 0;
    else if (r == 0)
        w = w ? w * 2 + VX_BATCH_WAIT_STEP_NS : 0; /* waiting, and nothing came: wait longer */
    else if (r > target)
        w /= 2;
    else if (r < target / 2)
        w = w * 2 + VX_BATCH_WAIT_STEP_NS;
    if (w > op->batch_wait_max_ns)
        w = op->batch_wait_max_ns;
    op->batch_wait_ns = w;
    return w;
}

#define VX_ROUND_CLOCK 4 /* passes between two clock reads in a round (a power of two) */

/* vx_round_until's look at check time t: does the owner need to run (an op idle long enough
 * that it may stop polling it, or the wait has something)? An op's idle time is counted up to
 * the clock read before the passes just run (tp: last_work_ns of an op that found work in them),
 * so an op busy in every interval between two clock reads is never idle. */
static int round_yield(struct vx_op **ops, uint32_t n, uint64_t tp, uint64_t t, uint64_t t0,
                       struct vx_wait *w)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct vx_op *op = ops[i];
        if (op->idle_ns && tp - (op->last_work_ns ? op->last_work_ns : t0) >= op->idle_ns)
            return 1;
    }
    return w && vx_wait_ready(w, t);
}

int vx_round_until(struct vx_op **ops, uint32_t n, uint32_t max_passes, uint64_t check_ns,
                   uint64_t max_ns, uint64_t coalesce_ns, struct vx_wait *w)
{
    for (uint32_t i = 0; i < n; i++) {
        struct vx_op *op = ops[i];
        op->result = 0;
        op->batches = op->found = op->full = 0;
        op->pkts = 0;
        op->last_work_ns = 0;
    }
    if (n == 0 || max_passes == 0)
        return 0;
    int timed = coalesce_ns != 0; /* read the clock at every pass */
    for (uint32_t i = 0; i < n; i++)
        if (ops[i]->batch_target)
            timed = 1;
    const uint64_t t0 = now_ns();
    uint64_t t = t0;
    uint64_t next_check = check_ns < max_ns ? t0 + check_ns : UINT64_MAX;
    uint32_t pass = 0;
    while (pass < max_passes) {
        int any = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct vx_op *op = ops[i];
            /* the next op's avail->idx: a line the driver writes on its own core, so a miss
             * at nearly every visit; fetched while this op's batch runs, unless that op is to
             * be skipped (a fetch would move the line all the same) */
            if (i + 1 < n && ops[i + 1]->vq && t >= ops[i + 1]->next_ns) {
                const struct vring_avail *na = ops[i + 1]->vq->avail;
                if (na)
                    __builtin_prefetch(&na->idx);
            }
            if (timed && t < op->next_ns)
                continue; /* served less than its wait ago: let the ring fill up */
            int r = op_tx_empty(op) ? 0 : vx_op_run(op, op->max_pkts, op->max_bytes, 0);
            op->result = r;
            if (unlikely(r < 0)) {
                if (r == -1)
                    op->batches++;
                return -(int)(i + 1);
            }
            op->batches++;
            uint64_t wait = coalesce_ns;
            if (op->batch_target) {
                const uint64_t bw = batch_wait(op, (uint32_t)r);
                if (bw > wait)
                    wait = bw;
            }
            op->next_ns = t + wait;
            if (r > 0) {
                op->found++;
                op->pkts += (uint64_t)r;
                op->last_work_ns = t;
                if ((uint32_t)r >= op->max_pkts)
                    op->full++;
                any = 1;
            }
        }
        pass++;
        if (!any)
            cpu_relax();
        /* the clock every VX_ROUND_CLOCK passes without coalescing (a busy pass takes
         * microseconds, an empty one well under one; reading the clock each time cost ~7% of a
         * busy round), every pass with it */
        if (timed || (pass & (VX_ROUND_CLOCK - 1)) == 0 || pass >= max_passes) {
            const uint64_t tp = t;
            t = now_ns();
            round_irq_due(ops, n, t);
            if (t - t0 >= max_ns)
                break;
            if (t >= next_check) {
                if (round_yield(ops, n, tp, t, t0, w))
                    break;
                next_check = t + check_ns;
            }
        }
    }
    return (int)pass;
}

int vx_round(struct vx_op **ops, uint32_t n, uint32_t max_passes, uint64_t max_ns,
             uint64_t coalesce_ns)
{
    return vx_round_until(ops, n, max_passes, max_ns, max_ns, coalesce_ns, NULL);
}

void vx_round_results(struct vx_op *const *ops, uint32_t n, uint64_t *out)
{
    for (uint32_t i = 0; i < n; i++, out += 5) {
        const struct vx_op *op = ops[i];
        out[0] = op->batches;
        out[1] = op->found;
        out[2] = op->full;
        out[3] = op->pkts;
        out[4] = op->last_work_ns;
    }
}
