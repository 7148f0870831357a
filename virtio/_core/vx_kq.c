/*
 * vx_kq.c - one kicked queue served in C: its turn (the batch, the stream wait, kicks back on
 * and the re-check) and vx_kq_kick.
 *
 * The contract is in vx_core.h ("kicked queues and the worker's wait"); the wait that runs these
 * turns is vx_wait.c (shared declarations in vx_wait.h). This file only uses the core's public
 * API (vx_op_run, vx_vq_set_notify, vx_vq_pending, vx_vq_signal, vx_now_ns): it knows rings and
 * operations as opaque handles.
 *
 * The lost-kick race: the driver reads our "kicks off" (VRING_USED_F_NO_NOTIFY, or avail_event
 * under EVENT_IDX) after publishing avail->idx and decides not to kick. A queue therefore goes
 * back to sleep only after kicks are on again (vx_vq_set_notify(1) ends with a full barrier) and
 * a re-read of avail->idx found nothing: whatever the driver published before seeing kicks on
 * is found by that re-read, whatever it published later comes with a kick.
 *
 * Kicks stay off past one batch in three turns: the stream wait (an empty batch right after a
 * full or lingering one waits up to the busy-poll window for the refill; not with a data fd),
 * the linger (a batch whose spin caught buffers is requeued), and in vx_wait_run the busy-queue
 * turn (work found while other queues are runnable: requeued); kq_turn tells why.
 *
 * Threads: the worker thread that owns the queue's wait (or, without a wait, the one caller).
 */
#include "vx_wait.h"

#include <poll.h>
#include <unistd.h>

void drain(int fd)
{
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof(v));
    (void)r; /* EAGAIN: a kick already drained by an earlier event */
}

/* The re-check: ring entries pending and, with a data fd, that fd readable. <0: ring broken. */
static int kq_pending(struct vx_kq *kq)
{
    int n = vx_vq_pending(kq->op->vq);
    if (n <= 0 || kq->data_fd < 0)
        return n;
    struct pollfd p = {.fd = kq->data_fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0 && (p.revents & POLLIN) ? n : 0;
}

static inline void hook(struct vx_kq *kq, uint32_t point)
{
    if (kq->owner)
        wait_hook(kq->owner, point, kq->id);
}

int hand(struct vx_kq *kq, uint32_t why)
{
    kq->why = why;
    kq->state = VX_KQ_PY;
    return VX_TURN_HANDED;
}

#define STREAM_CHECK 32 /* ring re-reads (one pause each) between two clock reads */

static inline void pause_cpu(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/*
 * The stream wait. A batch that finds its ring empty at its start never busy-polls (idle queues
 * cost nothing), but a queue whose previous batch used its whole budget is streaming: its driver
 * refills the ring while we serve it, and the refill usually lands within microseconds. Going
 * back to kicks there would cost the driver a kick (a syscall, a VM exit) and this thread a sleep
 * and a wake-up per budget's worth of packets, and lets the two sides fall into a slow lock-step.
 * So such a queue waits, up to its busy-poll window, for avail->idx to move; so does a queue
 * whose previous batch lingered (kq_turn: a driver one round trip away). Only for queues
 * without a data fd (their work depends on the ring alone). Returns the entries pending (> 0),
 * 0 when the window (or a held interrupt's deadline) passed without any, < 0 when the ring
 * broke.
 */
static int kq_stream_wait(struct vx_kq *kq, uint64_t spin_ns)
{
    const uint64_t t0 = vx_now_ns();
    /* nor past a held interrupt's deadline of the op's rings: the driver may wait for it */
    const struct vx_op *op = kq->op;
    const uint64_t a = vx_vq_irq_deadline(op->vq);
    const uint64_t b = op->peer ? vx_vq_irq_deadline(op->peer) : 0;
    const uint64_t until = !a ? b : (!b || a < b) ? a : b;
    for (;;) {
        for (int i = 0; i < STREAM_CHECK; i++) {
            int n = vx_vq_pending(op->vq);
            if (n != 0)
                return n;
            pause_cpu();
        }
        const uint64_t t = vx_now_ns();
        if (t - t0 >= spin_ns || (until && t >= until))
            return 0;
    }
}

/* The busy-poll window of this queue's next batch: the base window (busy_poll_us) or, when its
 * driver came back soon after earlier re-arms, the longer one kq_suppress learnt (at most the
 * cap, busy_poll_max_us). */
static uint64_t kq_window(const struct vx_kq *kq)
{
    if (!kq->spin_ns)
        return 0;
    uint64_t base = __atomic_load_n(&kq->spin_ns[0], __ATOMIC_RELAXED);
    uint64_t cap = __atomic_load_n(&kq->spin_ns[1], __ATOMIC_RELAXED);
    if (!base || cap <= base || kq->win_ns <= base)
        return base;
    return kq->win_ns < cap ? kq->win_ns : cap;
}

/*
 * The adaptive window (the rule of KVM's halt polling, applied to a queue): a wake-up that comes
 * less than the cap after kicks were turned back on means a window that long would have caught
 * the driver without its kick and this thread's sleep and wake-up (which cost far more than the
 * spin on a virtual CPU: the host must run it again); the window doubles, up to the cap. A
 * wake-up later than the cap means the driver really paused: back to the base window, so a
 * queue that goes idle spins at most one cap's worth once.
 */
static void kq_adapt(struct vx_kq *kq)
{
    if (!kq->spin_ns || !kq->rearm_ns)
        return;
    uint64_t base = __atomic_load_n(&kq->spin_ns[0], __ATOMIC_RELAXED);
    uint64_t cap = __atomic_load_n(&kq->spin_ns[1], __ATOMIC_RELAXED);
    if (!base || cap <= base) {
        kq->win_ns = 0;
        return;
    }
    uint64_t cur = kq->win_ns > base ? kq->win_ns : base;
    if (vx_now_ns() - kq->rearm_ns <= cap) {
        kq->win_ns = cur * 2 < cap ? cur * 2 : cap;
        kq->stats.widened++;
    } else {
        kq->win_ns = 0;
    }
}

/* One turn of a queue whose kicks are off: one batch, then the re-arm unless its budget ran out
 * or it lingers. solo: no other queue waits for this thread (the batch may busy-poll). */
int kq_turn(struct vx_kq *kq, int solo, uint32_t poll_start, uint32_t budget_to_python)
{
    struct vx_op *op = kq->op;
    uint64_t spin = solo ? kq_window(kq) : 0;
    /* the driver is refilling: the previous batch used its whole budget, or lingered */
    const int lingered = kq->lingering;
    const int streaming = kq->data_fd < 0 && kq->last > 0 &&
                          ((uint32_t)kq->last >= kq->max_pkts || lingered);
    kq->lingering = 0;
    /* the op's busy-poll counts the buffers its spin found on op->vq (spin_found) */
    const struct vx_stats *vs = vx_vq_stats(op->vq);
    const uint64_t found0 = vs->spin_found;
    int r = vx_op_run(op, kq->max_pkts, kq->max_bytes, spin);
    if (r > 0 && lingered && spin)
        kq->stats.caught++; /* came between the two turns, kicks still off */
    if (r == 0 && spin && streaming) {
        kq->stats.stream_waits++;
        int p = kq_stream_wait(kq, spin);
        if (p < 0)
            r = -1;
        else if (p > 0) {
            kq->stats.stream_found++;
            kq->stats.caught++;
            r = vx_op_run(op, kq->max_pkts, kq->max_bytes, spin);
        }
    }
    const uint64_t spin_caught = vs->spin_found - found0;
    kq->stats.caught += spin_caught;
    kq->last = r;
    kq->stats.turns++;
    if (unlikely(r < 0))
        return hand(kq, VX_WHY_BROKEN);
    if (r == 0) {
        kq->stats.empty_turns++;
    } else {
        kq->stats.packets += (uint64_t)r;
        kq->last_work_ns = vx_now_ns();
    }
    if (poll_start && (uint32_t)r >= poll_start)
        return hand(kq, VX_WHY_POLL);
    if ((uint32_t)r >= kq->max_pkts) {
        if (budget_to_python)
            return hand(kq, VX_WHY_BUDGET);
        kq->stats.budget_exhausted++;
        return VX_TURN_AGAIN;
    }
    if (!solo && r > 0) {
        /* The busy-queue turn: other queues wait for this thread, so this one gets its next
         * batch after each of them had theirs, kicks still off; a turn that finds its ring empty
         * re-arms it. Busy queues sharing a worker are served round robin and none goes back to
         * kicks (a kick and a wake-up each) while it still has work. */
        kq->stats.rearm_deferred++;
        return VX_TURN_AGAIN;
    }
    if (r > 0 && spin_caught && kq->data_fd < 0) {
        /* The linger: the batch's spin caught buffers, so its window, a budget for the whole
         * batch, ran out less than a window after the last of them; the driver is still active
         * (a ping-pong: its next buffer comes a round trip after our completion). Re-arming now
         * sent such a driver to kicks once a window and this thread to sleep. The queue stays
         * runnable, kicks off; its next turn, finding the ring empty, does the stream wait, a
         * whole window from then (after this batch published its completions and decided its
         * interrupts). So every arrival within a window of the previous completion is caught
         * without a kick (caught), and only a driver slower than the window finds the queue
         * asleep (wakes); between the two turns the wait looks at its fds. A batch whose spin
         * caught nothing waited a whole window after its last buffer: it re-arms. */
        kq->stats.lingers++;
        kq->lingering = 1;
        return VX_TURN_AGAIN;
    }
    hook(kq, VX_HOOK_BATCHED);
    if (vx_vq_set_notify(op->vq, 1) < 0)
        goto broken;
    kq->stats.notify_on++;
    hook(kq, VX_HOOK_ENABLED);
    int p = kq_pending(kq);
    if (p < 0)
        goto broken;
    if (p > 0) {
        if (vx_vq_set_notify(op->vq, 0) < 0)
            goto broken;
        kq->stats.notify_off++;
        return VX_TURN_AGAIN;
    }
    vx_vq_signal(op->vq); /* nothing left unpublished (a no-op after a batch) */
    if (kq->spin_ns)
        kq->rearm_ns = vx_now_ns();
    kq->state = VX_KQ_IDLE;
    return VX_TURN_IDLE;
broken:
    kq->last = -1;
    return hand(kq, VX_WHY_BROKEN);
}

/* Kicks off for a queue that woke up; -1: its ring is broken (handed over). */
int kq_suppress(struct vx_kq *kq)
{
    kq->stats.wakes++;
    kq->lingering = 0; /* it slept: its driver came later than a window */
    kq_adapt(kq);
    if (vx_vq_set_notify(kq->op->vq, 0) < 0) {
        kq->last = -1;
        hand(kq, VX_WHY_BROKEN);
        return -1;
    }
    kq->stats.notify_off++;
    return 0;
}

int vx_kq_kick(struct vx_kq *kq, uint32_t poll_start, uint32_t budget_to_python)
{
    if (kq->kick_fd >= 0)
        drain(kq->kick_fd);
    kq->stats.kicks++;
    if (kq_suppress(kq) < 0)
        return VX_TURN_HANDED;
    kq->state = VX_KQ_RUN;
    return kq_turn(kq, 1, poll_start, budget_to_python);
}
