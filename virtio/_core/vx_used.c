/*
 * vx_used.c - the used side: publication of the used shadow and the interrupt decision.
 *
 * Used entries are collected in a shadow array (vx_internal.h: vq_push) and published with one
 * release store of used->idx per call; the call eventfd is written at most once per publication,
 * and only when the driver asked for it (EVENT_IDX used_event, or VRING_AVAIL_F_NO_INTERRUPT).
 *
 * vx_vq_notify_decide is THE place where that happens: every path that completes chains ends
 * in it (vx_vq_signal, every net operation, the switch). It runs five steps: publish, ask the
 * driver's suppression (the lost-interrupt fence), apply the queue's interrupt policy, send, and
 * count the outcome. An interrupt policy (moderation, posted interrupts) extends step 3 and adds
 * its outcomes and counters.
 *
 * Threads: the queue's owning worker (RX queues fed by a switch or fwd: under the queue lock).
 */
#include "vx_internal.h"

/* the spec's vring_need_event: has the used index passed `event` moving from old to new_idx? */
static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* 1. publish: the used shadow (one release store of used->idx) and, with kicks on under
 * EVENT_IDX, avail_event = the next avail entry we will read */
static inline void notify_publish(struct vx_vq *vq)
{
    vq_flush(vq);
    if (vq->notify_enabled && (vq->flags & VX_F_EVENT_IDX))
        __atomic_store_n(vq->avail_event, vq->last_avail_idx, __ATOMIC_RELAXED);
}

/* 2. does the driver want an interrupt for used->idx moving from old to new_idx? */
static inline int notify_driver_wants(struct vx_vq *vq, uint16_t new_idx, uint16_t old)
{
    /* no lost interrupts: our used->idx store must be visible before we read the driver's
     * used_event / flags (the driver stores those, fences, then re-reads used->idx) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vq->flags & VX_F_EVENT_IDX) {
        uint16_t ev = __atomic_load_n(vq->used_event, __ATOMIC_RELAXED);
        /* before our first decision, used_event's history is unknown: signal */
        return !vq->signalled_valid || vring_need_event(ev, new_idx, old);
    }
    return !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
}

/* 4. the interrupt itself: one eventfd write */
static inline int notify_send(struct vx_vq *vq)
{
    if (vq->call_fd < 0)
        return VX_NOTIFY_NO_FD;
    const uint64_t one = 1;
    ssize_t r = write(vq->call_fd, &one, sizeof(one));
    (void)r; /* EAGAIN: the counter is already non-zero, the driver will wake */
    return VX_NOTIFY_SENT;
}

/* 3. the queue's interrupt policy: what becomes of a publication the driver wants signalled
 * (wanted) or not. Moderation and posted interrupts add their policies and outcomes here. */
static inline int notify_policy_apply(struct vx_vq *vq, int wanted)
{
    switch (vq->notify_policy) {
    case VX_NOTIFY_POLICY_IMMEDIATE:
    default:
        return wanted ? notify_send(vq) : VX_NOTIFY_SUPPRESSED;
    }
}

/* 5. one counter per outcome */
static inline void notify_count(struct vx_vq *vq, int outcome)
{
    switch (outcome) {
    case VX_NOTIFY_SENT:
        vq->stats.interrupts++;
        break;
    case VX_NOTIFY_SUPPRESSED:
        vq->stats.interrupts_suppressed++;
        break;
    case VX_NOTIFY_NO_FD:
        vq->stats.interrupts_no_fd++;
        break;
    default:
        break;
    }
}

int vx_vq_notify_decide(struct vx_vq *vq)
{
    if (unlikely(vq->broken))
        return VX_NOTIFY_BROKEN;
    if (!vq->started)
        return VX_NOTIFY_NONE;
    notify_publish(vq);
    const uint16_t new_idx = vq->used_idx, old = vq->signalled_used;
    if (new_idx == old)
        return VX_NOTIFY_NONE; /* nothing published since the last decision */
    int wanted = notify_driver_wants(vq, new_idx, old);
    vq->signalled_used = new_idx;
    vq->signalled_valid = 1;
    int outcome = notify_policy_apply(vq, wanted);
    notify_count(vq, outcome);
    return outcome;
}

int vx_vq_signal(struct vx_vq *vq)
{
    int outcome = vx_vq_notify_decide(vq);
    return outcome < 0 ? -1 : outcome == VX_NOTIFY_SENT;
}
