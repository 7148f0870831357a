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
 * count the outcome. Step 3 is the interrupt policy (immediate, moderated, adaptive: struct
 * vx_irq_config); step 4 writes the call eventfd or posts to a posted-interrupt descriptor.
 * The driver side of that descriptor (vx_pi_*) lives here too: the ordering rules are one.
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

/* TEST SUPPORT: the posted-interrupt race windows (vx_pi_set_test_hook) */
static void (*pi_hook)(void *, uint32_t);
static void *pi_hook_arg;

void vx_pi_set_test_hook(void (*hook)(void *, uint32_t), void *arg)
{
    pi_hook_arg = arg;
    pi_hook = hook;
}

static inline void pi_test_hook(uint32_t point)
{
    if (unlikely(pi_hook != NULL))
        pi_hook(pi_hook_arg, point);
}

static inline void eventfd_signal(int fd)
{
    const uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r; /* EAGAIN: the counter is already non-zero, the driver will wake */
}

/* posted: set the queue's request bit, full fence, then notify only on the 0 -> 1 transition
 * of ON with SN clear (the driver runs, or was already told, otherwise) */
static inline int notify_post(struct vx_vq *vq)
{
    struct vx_pi_desc *d = vq->pi;
    __atomic_fetch_or(&d->pir[vq->pi_bit >> 6], 1ull << (vq->pi_bit & 63), __ATOMIC_SEQ_CST);
    pi_test_hook(1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t c = __atomic_load_n(&d->control, __ATOMIC_SEQ_CST);
    if (c & (VX_PI_ON | VX_PI_SN))
        return VX_NOTIFY_POSTED;
    uint32_t old = __atomic_fetch_or(&d->control, VX_PI_ON, __ATOMIC_SEQ_CST);
    if (old & (VX_PI_ON | VX_PI_SN))
        return VX_NOTIFY_POSTED; /* a stale ON under SN is cleared by the driver's next sleep */
    if (vq->pi_fd >= 0)
        eventfd_signal(vq->pi_fd);
    return VX_NOTIFY_POSTED_WAKE;
}

/* 4. the interrupt itself: one eventfd write, or a post */
static inline int notify_send(struct vx_vq *vq)
{
    if (vq->pi)
        return notify_post(vq);
    if (vq->call_fd < 0)
        return VX_NOTIFY_NO_FD;
    eventfd_signal(vq->call_fd);
    return VX_NOTIFY_SENT;
}

/* ADAPTIVE: is moderation on? Re-decided once per window from the window's completion rate. */
static inline int irq_adaptive(struct vx_vq *vq, const struct vx_irq_config *cfg, uint64_t now,
                               uint32_t n)
{
    uint64_t win = __atomic_load_n(&cfg->window_ns, __ATOMIC_RELAXED);
    vq->irq_win_count += n;
    uint64_t el = now - vq->irq_win_start;
    if (el >= win || !vq->irq_win_start) {
        if (vq->irq_win_start && el) {
            double pps = (double)vq->irq_win_count * 1e9 / (double)el;
            uint64_t on = __atomic_load_n(&cfg->on_pps, __ATOMIC_RELAXED);
            uint64_t off = __atomic_load_n(&cfg->off_pps, __ATOMIC_RELAXED);
            if (!vq->irq_active && pps >= (double)on) {
                vq->irq_active = 1;
                vq->stats.irq_adaptive_on++;
            } else if (vq->irq_active && pps < (double)off) {
                vq->irq_active = 0;
                vq->stats.irq_adaptive_off++;
            }
        }
        vq->irq_win_start = now;
        vq->irq_win_count = 0;
    }
    return vq->irq_active;
}

/* a held interrupt goes out now (its deadline, its frames, a policy change, a flush) */
static inline int irq_release(struct vx_vq *vq)
{
    vq->irq_deadline = 0;
    vq->irq_pending = 0;
    return notify_send(vq);
}

/* a held interrupt goes out because its deadline passed: how late (send time - deadline) */
static inline void irq_count_late(struct vx_vq *vq, uint64_t now)
{
    uint64_t late = now - vq->irq_deadline;
    vq->stats.irq_deadline_fired++;
    vq->stats.irq_late_ns += late;
    if (late > vq->stats.irq_late_max_ns)
        vq->stats.irq_late_max_ns = late;
}

/* ADAPTIVE: a hold its deadline ends with one completion coalesced nothing: the queue is in
 * request-response (ping-pong), where holding is pure latency. Moderation goes off until the
 * next window's rate turns it on again (so at most one held completion per window). */
static inline void irq_adaptive_lone(struct vx_vq *vq)
{
    const struct vx_irq_config *cfg = vq->irq_cfg;
    if (vq->irq_active && vq->irq_pending <= 1 && cfg &&
        __atomic_load_n(&cfg->mode, __ATOMIC_RELAXED) == VX_IRQ_ADAPTIVE) {
        vq->irq_active = 0;
        vq->stats.irq_adaptive_off++;
    }
}

/* 3. the queue's interrupt policy: what becomes of a publication of n completions the driver
 * wants signalled (wanted) or not. A publication while an interrupt is held joins it (the
 * driver asked once; its used_event has not moved since). */
static inline int notify_policy_apply(struct vx_vq *vq, int wanted, uint32_t n)
{
    const struct vx_irq_config *cfg = vq->irq_cfg;
    if (vq->notify_policy == VX_NOTIFY_POLICY_IMMEDIATE || !cfg) {
        if (unlikely(vq->irq_deadline))
            return irq_release(vq);
        return wanted ? notify_send(vq) : VX_NOTIFY_SUPPRESSED;
    }
    int held = vq->irq_deadline != 0;
    if (!wanted && !held)
        return VX_NOTIFY_SUPPRESSED;
    uint32_t mode = __atomic_load_n(&cfg->mode, __ATOMIC_RELAXED);
    uint32_t frames = __atomic_load_n(&cfg->frames, __ATOMIC_RELAXED);
    uint64_t delay = __atomic_load_n(&cfg->delay_ns, __ATOMIC_RELAXED);
    if (mode == VX_IRQ_IMMEDIATE || frames <= 1 || !delay || vq->irq_shared)
        return held ? irq_release(vq) : notify_send(vq);
    uint64_t now = now_ns();
    if (mode == VX_IRQ_ADAPTIVE && !irq_adaptive(vq, cfg, now, n))
        return held ? irq_release(vq) : notify_send(vq);
    vq->irq_pending += n;
    if (!held)
        vq->irq_deadline = now + delay;
    if (vq->irq_pending >= frames)
        return irq_release(vq);
    if (now >= vq->irq_deadline) {
        irq_count_late(vq, now);
        irq_adaptive_lone(vq);
        return irq_release(vq);
    }
    return VX_NOTIFY_DEFERRED;
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
    case VX_NOTIFY_DEFERRED:
        vq->stats.interrupts_deferred++;
        break;
    case VX_NOTIFY_POSTED:
        vq->stats.interrupts_posted++;
        break;
    case VX_NOTIFY_POSTED_WAKE:
        vq->stats.pi_notifications++;
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
    int outcome = notify_policy_apply(vq, wanted, (uint16_t)(new_idx - old));
    notify_count(vq, outcome);
    return outcome;
}

void vx_vq_set_irq(struct vx_vq *vq, const struct vx_irq_config *cfg)
{
    vq->irq_cfg = cfg;
    vq->notify_policy = cfg ? VX_NOTIFY_POLICY_CONFIGURED : VX_NOTIFY_POLICY_IMMEDIATE;
    vq->irq_active = 0;
    vq->irq_win_start = vq->irq_win_count = 0;
}

uint64_t vx_vq_irq_deadline(const struct vx_vq *vq)
{
    return __atomic_load_n(&vq->irq_deadline, __ATOMIC_RELAXED);
}

uint64_t vx_vq_irq_flush(struct vx_vq *vq, uint64_t now)
{
    if (!__atomic_load_n(&vq->irq_deadline, __ATOMIC_RELAXED))
        return 0;
    vq_lock(vq);
    uint64_t d = vq->irq_deadline;
    if (d && now >= d && !vq->broken) {
        if (now != UINT64_MAX) {
            irq_count_late(vq, now);
            irq_adaptive_lone(vq);
        }
        int outcome = irq_release(vq);
        notify_count(vq, outcome);
        vq->stats.irq_deadline_flushes++;
        d = 0;
    } else if (vq->broken) {
        vq->irq_deadline = d = 0;
    }
    vq_unlock(vq);
    return d;
}

/* Timer-lateness compensation (the idea of KVM's lapic_timer_advance_ns). A worker sleeping
 * until a deadline wakes some microseconds after it (10-20 us on a loaded VM even with a 1 us
 * timer slack), which would add that much to every held interrupt. The queue learns that
 * lateness and asks to be woken that much early; woken early, it spins the rest, so the
 * interrupt goes out at its deadline, never before. Learning, at each timed flush: looked at
 * after the deadline, advance += 1.5 us; at or before it, advance -= 0.5 us; kept in
 * [0, cap]. That tracks the 75th percentile of the wake-up lateness (late a quarter of the
 * time) and ignores its tail: a worker descheduled for milliseconds moves it by 1.5 us. */
#define IRQ_ADVANCE_MAX_NS 50000ull
#define IRQ_ADVANCE_UP_NS 1500ull
#define IRQ_ADVANCE_DOWN_NS 500ull

static inline uint64_t irq_advance_cap(const struct vx_vq *vq)
{
    uint64_t delay = vq->irq_cfg ? __atomic_load_n(&vq->irq_cfg->delay_ns, __ATOMIC_RELAXED) : 0;
    uint64_t cap = delay / 4; /* never spin for more than a quarter of the hold */
    return cap < IRQ_ADVANCE_MAX_NS ? cap : IRQ_ADVANCE_MAX_NS;
}

static inline void irq_advance_learn(struct vx_vq *vq, uint64_t now, uint64_t d, uint64_t cap)
{
    uint64_t a = vq->irq_advance_ns;
    if (now > d)
        a += IRQ_ADVANCE_UP_NS;
    else
        a = a > IRQ_ADVANCE_DOWN_NS ? a - IRQ_ADVANCE_DOWN_NS : 0;
    vq->irq_advance_ns = a < cap ? a : cap;
}

uint64_t vx_vq_irq_flush_timed(struct vx_vq *vq, uint64_t now)
{
    uint64_t d = __atomic_load_n(&vq->irq_deadline, __ATOMIC_RELAXED);
    if (!d)
        return 0;
    uint64_t cap = irq_advance_cap(vq);
    uint64_t adv = vq->irq_advance_ns < cap ? vq->irq_advance_ns : cap;
    uint64_t wake = d > adv ? d - adv : 0;
    if (now < wake && wake - now <= cap)
        now = now_ns(); /* close: the caller's clock may predate a spin for another queue */
    if (now < wake)
        return wake;
    irq_advance_learn(vq, now, d, cap);
    while (now < d) { /* woken early: at most the advance */
        cpu_relax();
        now = now_ns();
    }
    uint64_t left = vx_vq_irq_flush(vq, now);
    if (!left)
        return 0;
    /* the hold changed meanwhile (it cannot move later for the owner; be safe) */
    return left > adv ? left - adv : left;
}

int vx_vq_set_posted(struct vx_vq *vq, struct vx_pi_desc *desc, uint32_t bit, int wake_fd)
{
    if (desc && (bit >= VX_PI_MAX_BITS || ((uintptr_t)desc & (VX_PI_DESC_SIZE - 1))))
        return -1;
    vq->pi = desc;
    vq->pi_bit = bit;
    vq->pi_fd = desc ? wake_fd : -1;
    return 0;
}

/* ---- the driver side of a posted-interrupt descriptor ---- */

void vx_pi_running(struct vx_pi_desc *d)
{
    __atomic_fetch_or(&d->control, VX_PI_SN, __ATOMIC_SEQ_CST);
}

int vx_pi_take(struct vx_pi_desc *d, uint64_t *out)
{
    int bits = 0;
    for (int i = 0; i < 4; i++) {
        /* a plain load first: an empty word costs no locked exchange */
        uint64_t w = __atomic_load_n(&d->pir[i], __ATOMIC_RELAXED);
        if (w)
            w = __atomic_exchange_n(&d->pir[i], 0, __ATOMIC_ACQUIRE);
        out[i] = w;
        bits += __builtin_popcountll(w);
    }
    return bits;
}

int vx_pi_prepare_sleep(struct vx_pi_desc *d)
{
    /* the exitless EOI: ON cleared by a store (notifications re-armed), SN cleared (going to
     * sleep: the next post must notify); then the full fence, then the re-read of PIR */
    __atomic_fetch_and(&d->control, ~(uint32_t)(VX_PI_ON | VX_PI_SN), __ATOMIC_SEQ_CST);
    pi_test_hook(2);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int i = 0; i < 4; i++) {
        if (__atomic_load_n(&d->pir[i], __ATOMIC_SEQ_CST)) {
            __atomic_fetch_or(&d->control, VX_PI_SN, __ATOMIC_SEQ_CST);
            return 1;
        }
    }
    return 0;
}

int vx_vq_signal(struct vx_vq *vq)
{
    const int shared = __atomic_load_n(&vq->shared, __ATOMIC_RELAXED);
    if (unlikely(shared))
        vq_lock(vq); /* the other writer may be filling the used shadow */
    int outcome = vx_vq_notify_decide(vq);
    if (unlikely(shared))
        vq_unlock(vq);
    return outcome < 0 ? -1 : outcome == VX_NOTIFY_SENT;
}
