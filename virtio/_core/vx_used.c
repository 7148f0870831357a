/*
 * vx_used.c - the used side: publication of the used shadow and the interrupt decision.
 *
 * Used entries are collected in a shadow array (vx_internal.h: vq_push) and published with one
 * release store of used->idx per call; the call eventfd is written at most once per publication,
 * and only when the driver asked for it (EVENT_IDX used_event, or VRING_AVAIL_F_NO_INTERRUPT).
 *
 * Threads: the queue's owning worker (RX queues fed by a switch or fwd: under the queue lock).
 */
#include "vx_internal.h"

static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int vx_vq_signal(struct vx_vq *vq)
{
    if (unlikely(vq->broken))
        return -1;
    if (!vq->started)
        return 0;
    vq_flush(vq);
    if (vq->notify_enabled && (vq->flags & VX_F_EVENT_IDX))
        __atomic_store_n(vq->avail_event, vq->last_avail_idx, __ATOMIC_RELAXED);
    uint16_t new_idx = vq->used_idx, old = vq->signalled_used;
    if (new_idx == old && vq->signalled_valid)
        return 0;
    if (new_idx == old)
        return 0;
    /* no lost interrupts: used->idx must be visible before we read used_event / flags */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int need;
    if (vq->flags & VX_F_EVENT_IDX) {
        uint16_t ev = __atomic_load_n(vq->used_event, __ATOMIC_RELAXED);
        need = !vq->signalled_valid || vring_need_event(ev, new_idx, old);
    } else {
        need = !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    vq->signalled_used = new_idx;
    vq->signalled_valid = 1;
    if (need && vq->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(vq->call_fd, &one, sizeof(one));
        (void)r; /* EAGAIN: the counter is already non-zero, the driver will wake */
        vq->stats.interrupts++;
        return 1;
    }
    vq->stats.interrupts_suppressed++;
    return 0;
}

