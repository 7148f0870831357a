/*
 * vx_wait.c - kicked queues served in C, and the wait a worker thread blocks in.
 *
 * The contract is in vx_core.h ("kicked queues and the worker's wait"). This file only uses the
 * core's public API (vx_op_run, vx_vq_set_notify, vx_vq_pending, vx_vq_signal, vx_now_ns): it
 * knows rings and operations as opaque handles.
 *
 * The lost-kick race: the driver reads our "kicks off" (VRING_USED_F_NO_NOTIFY, or avail_event
 * under EVENT_IDX) after publishing avail->idx and decides not to kick. A queue therefore goes
 * back to sleep only after kicks are on again (vx_vq_set_notify(1) ends with a full barrier) and
 * a re-read of avail->idx found nothing: whatever the driver published before seeing kicks on
 * is found by that re-read, whatever it published later comes with a kick.
 *
 * Kick eventfds are registered edge-triggered and drained on every event, so an event is never
 * lost and never repeats; the command fd is level-triggered and left for the Python side to read.
 */
#define _GNU_SOURCE
#include "vx_core.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define WAIT_EVENTS 64 /* epoll events taken per look (<= VX_WAIT_REPORT_MAX) */

enum { SRC_CMD = 1, SRC_KICK = 2, SRC_DATA = 3, SRC_PY = 4 };

struct src {
    int kind;
    int fd;
    struct vx_kq *kq; /* SRC_KICK, SRC_DATA */
    struct src *next; /* the wait's list of watched fds (SRC_PY) */
};

struct vx_wait {
    int epfd;
    struct src cmd;
    struct src *py;        /* watched fds */
    struct src *dead;      /* srcs whose fd could not be unregistered (closed under us) */
    struct vx_kq **kqs;    /* every added kq (their rings' held interrupts are honoured) */
    uint32_t nkqs, capkqs;
    struct vx_kq *head;    /* run queue */
    struct vx_kq *tail;
    uint32_t nrun;
    uint32_t poll_start;   /* a batch serving at least this many items is handed over (0: never) */
    uint32_t budget_to_python;
    int have_pwait2;
    int slack_set;         /* the waiting thread's timer slack lowered (moderation deadlines) */
    uint64_t deadline[VX_WAIT_SLOTS];
    void (*hook)(void *, uint32_t, uint32_t);
    void *hook_arg;
    struct vx_wait_report rep;
    struct vx_wait_stats stats;
};

/* ------------------------------------------------------------------------------------------ */
/* one kicked queue                                                                             */

static void drain(int fd)
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
    struct vx_wait *w = kq->owner;
    if (unlikely(w && w->hook))
        w->hook(w->hook_arg, point, kq->id);
}

static int hand(struct vx_kq *kq, uint32_t why)
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
 * So such a queue waits, up to its busy-poll window, for avail->idx to move. Only for queues
 * without a data fd (their work depends on the ring alone). Returns the entries pending (> 0),
 * 0 when the window passed without any, < 0 when the ring broke.
 */
static int kq_stream_wait(struct vx_kq *kq, uint64_t spin_ns)
{
    const uint64_t t0 = vx_now_ns();
    for (;;) {
        for (int i = 0; i < STREAM_CHECK; i++) {
            int n = vx_vq_pending(kq->op->vq);
            if (n != 0)
                return n;
            pause_cpu();
        }
        if (vx_now_ns() - t0 >= spin_ns)
            return 0;
    }
}

/* One turn of a queue whose kicks are off: one batch, then the re-arm unless its budget ran out.
 * solo: no other queue waits for this thread (the batch may busy-poll). */
static int kq_turn(struct vx_kq *kq, int solo, uint32_t poll_start, uint32_t budget_to_python)
{
    struct vx_op *op = kq->op;
    uint64_t spin = solo && kq->spin_ns ? __atomic_load_n(kq->spin_ns, __ATOMIC_RELAXED) : 0;
    const int streaming = kq->data_fd < 0 && kq->last > 0 && (uint32_t)kq->last >= kq->max_pkts;
    int r = vx_op_run(op, kq->max_pkts, kq->max_bytes, spin);
    if (r == 0 && spin && streaming) {
        kq->stats.stream_waits++;
        int p = kq_stream_wait(kq, spin);
        if (p < 0)
            r = -1;
        else if (p > 0) {
            kq->stats.stream_found++;
            r = vx_op_run(op, kq->max_pkts, kq->max_bytes, spin);
        }
    }
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
    kq->state = VX_KQ_IDLE;
    return VX_TURN_IDLE;
broken:
    kq->last = -1;
    return hand(kq, VX_WHY_BROKEN);
}

/* Kicks off for a queue that woke up; -1: its ring is broken (handed over). */
static int kq_suppress(struct vx_kq *kq)
{
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

/* ------------------------------------------------------------------------------------------ */
/* the wait                                                                                     */

static void runq_push(struct vx_wait *w, struct vx_kq *kq)
{
    kq->state = VX_KQ_RUN;
    kq->next = NULL;
    if (w->tail)
        w->tail->next = kq;
    else
        w->head = kq;
    w->tail = kq;
    w->nrun++;
}

static struct vx_kq *runq_pop(struct vx_wait *w)
{
    struct vx_kq *kq = w->head;
    if (kq) {
        w->head = kq->next;
        if (!w->head)
            w->tail = NULL;
        kq->next = NULL;
        w->nrun--;
    }
    return kq;
}

static void runq_unlink(struct vx_wait *w, struct vx_kq *kq)
{
    struct vx_kq **pp = &w->head, *prev = NULL;
    while (*pp && *pp != kq) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return;
    *pp = kq->next;
    if (w->tail == kq)
        w->tail = prev;
    kq->next = NULL;
    w->nrun--;
}

static void report_id(struct vx_wait *w, struct vx_kq *kq)
{
    struct vx_wait_report *rep = &w->rep;
    rep->ids[rep->nids++] = kq->id;
    rep->reasons |= VX_WAIT_SCHED;
}

struct vx_wait *vx_wait_new(int cmd_fd)
{
    struct vx_wait *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) {
        free(w);
        return NULL;
    }
    w->cmd.kind = SRC_CMD;
    w->cmd.fd = cmd_fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->cmd};
    if (cmd_fd >= 0 && epoll_ctl(w->epfd, EPOLL_CTL_ADD, cmd_fd, &ev) < 0) {
        int e = errno;
        close(w->epfd);
        free(w);
        errno = e;
        return NULL;
    }
    w->have_pwait2 = 1;
    return w;
}

void vx_wait_free(struct vx_wait *w)
{
    if (!w)
        return;
    while (w->py) {
        struct src *s = w->py;
        w->py = s->next;
        free(s);
    }
    while (w->dead) {
        struct src *s = w->dead;
        w->dead = s->next;
        free(s);
    }
    /* kqs still added keep their srcs until vx_wait_remove; forget them here */
    free(w->kqs);
    close(w->epfd);
    free(w);
}

static struct src *src_add(struct vx_wait *w, int kind, int fd, struct vx_kq *kq)
{
    struct src *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->kind = kind;
    s->fd = fd;
    s->kq = kq;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = s};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int e = errno;
        free(s);
        errno = e;
        return NULL;
    }
    return s;
}

static void src_del(struct vx_wait *w, struct src *s)
{
    if (!s)
        return;
    if (epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->fd, NULL) < 0) {
        /* the fd was closed while registered: if a duplicate keeps the file open, epoll may
         * still report it with this pointer; keep the src, inert, until the wait goes away */
        s->kind = 0;
        s->kq = NULL;
        s->next = w->dead;
        w->dead = s;
        return;
    }
    free(s);
}

int vx_wait_add(struct vx_wait *w, struct vx_kq *kq)
{
    if (kq->owner || !kq->op)
        return -EINVAL;
    kq->src[0] = kq->src[1] = NULL;
    if (kq->kick_fd >= 0 && !(kq->src[0] = src_add(w, SRC_KICK, kq->kick_fd, kq)))
        return -errno;
    if (kq->data_fd >= 0 && !(kq->src[1] = src_add(w, SRC_DATA, kq->data_fd, kq))) {
        int e = errno;
        src_del(w, kq->src[0]);
        kq->src[0] = NULL;
        return -e;
    }
    if (w->nkqs == w->capkqs) {
        uint32_t cap = w->capkqs ? 2 * w->capkqs : 16;
        struct vx_kq **a = realloc(w->kqs, cap * sizeof(*a));
        if (!a) {
            for (int i = 0; i < 2; i++) {
                src_del(w, kq->src[i]);
                kq->src[i] = NULL;
            }
            return -ENOMEM;
        }
        w->kqs = a;
        w->capkqs = cap;
    }
    w->kqs[w->nkqs++] = kq;
    kq->owner = w;
    kq->state = VX_KQ_PY;
    kq->next = NULL;
    return 0;
}

/* the held interrupts of a kq's rings: those due at now go out; the earliest still held */
static uint64_t kq_irq(struct vx_kq *kq, uint64_t now)
{
    uint64_t next = 0;
    struct vx_vq *vqs[2] = {kq->op->vq, kq->op->peer};
    for (int i = 0; i < 2; i++) {
        if (!vqs[i] || !vx_vq_irq_deadline(vqs[i]))
            continue;
        uint64_t d = vx_vq_irq_flush(vqs[i], now);
        if (d && (!next || d < next))
            next = d;
    }
    return next;
}

int vx_wait_remove(struct vx_wait *w, struct vx_kq *kq)
{
    if (kq->owner != w)
        return -EINVAL;
    if (kq->state == VX_KQ_RUN)
        runq_unlink(w, kq);
    /* a queue detached or migrated with a held interrupt: it goes out now */
    kq_irq(kq, UINT64_MAX);
    for (uint32_t i = 0; i < w->nkqs; i++) {
        if (w->kqs[i] == kq) {
            w->kqs[i] = w->kqs[--w->nkqs];
            break;
        }
    }
    for (int i = 0; i < 2; i++) {
        src_del(w, kq->src[i]);
        kq->src[i] = NULL;
    }
    kq->owner = NULL;
    kq->state = VX_KQ_PY;
    return 0;
}

int vx_wait_watch(struct vx_wait *w, int fd)
{
    for (struct src *s = w->py; s; s = s->next)
        if (s->fd == fd)
            return -EEXIST;
    struct src *s = src_add(w, SRC_PY, fd, NULL);
    if (!s)
        return -errno;
    s->next = w->py;
    w->py = s;
    return 0;
}

int vx_wait_unwatch(struct vx_wait *w, int fd)
{
    for (struct src **pp = &w->py; *pp; pp = &(*pp)->next) {
        if ((*pp)->fd == fd) {
            struct src *s = *pp;
            *pp = s->next;
            src_del(w, s);
            return 0;
        }
    }
    return -ENOENT;
}

void vx_wait_configure(struct vx_wait *w, uint32_t poll_start, uint32_t budget_to_python)
{
    w->poll_start = poll_start;
    w->budget_to_python = budget_to_python;
}

void vx_wait_set_deadline(struct vx_wait *w, uint32_t slot, uint64_t at_ns)
{
    if (slot < VX_WAIT_SLOTS)
        w->deadline[slot] = at_ns;
}

struct vx_wait_report *vx_wait_report(struct vx_wait *w) { return &w->rep; }
struct vx_wait_stats *vx_wait_stats(struct vx_wait *w) { return &w->stats; }

void vx_wait_set_hook(struct vx_wait *w, void (*fn)(void *, uint32_t, uint32_t), void *arg)
{
    w->hook = fn;
    w->hook_arg = arg;
}

/* The earliest deadline (0: none); due slots are reported and cleared, due held interrupts of
 * the wait's queues are sent (nothing to report: the wait goes on). */
static uint64_t deadlines(struct vx_wait *w, uint64_t now)
{
    uint64_t next = 0;
    for (uint32_t i = 0; i < w->nkqs; i++) {
        uint64_t d = kq_irq(w->kqs[i], now);
        if (d && (!next || d < next))
            next = d;
    }
    for (uint32_t i = 0; i < VX_WAIT_SLOTS; i++) {
        uint64_t d = w->deadline[i];
        if (!d)
            continue;
        if (now >= d) {
            w->rep.due |= 1u << i;
            w->rep.reasons |= VX_WAIT_TIMER;
            w->deadline[i] = 0;
        } else if (!next || d < next) {
            next = d;
        }
    }
    return next;
}

int vx_wait_ready(struct vx_wait *w, uint64_t now)
{
    if (w->head)
        return 1;
    for (uint32_t i = 0; i < VX_WAIT_SLOTS; i++)
        if (w->deadline[i] && now >= w->deadline[i])
            return 1;
    for (uint32_t i = 0; i < w->nkqs; i++) {
        struct vx_vq *vqs[2] = {w->kqs[i]->op->vq, w->kqs[i]->op->peer};
        for (int j = 0; j < 2; j++) {
            uint64_t d = vqs[j] ? vx_vq_irq_deadline(vqs[j]) : 0;
            if (d && now >= d)
                return 1;
        }
    }
    struct pollfd p = {.fd = w->epfd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* A queue woke up (kick or data fd). serve: into the run queue; else handed over. */
static void wake(struct vx_wait *w, struct vx_kq *kq, int serve)
{
    if (kq->state != VX_KQ_IDLE)
        return; /* already runnable, or the Python side holds it */
    if (kq_suppress(kq) < 0) {
        report_id(w, kq);
        return;
    }
    if (serve) {
        runq_push(w, kq);
    } else {
        hand(kq, VX_WHY_KICK);
        report_id(w, kq);
    }
}

static void dispatch(struct vx_wait *w, const struct epoll_event *evs, int n, int serve)
{
    struct vx_wait_report *rep = &w->rep;
    for (int i = 0; i < n; i++) {
        struct src *s = evs[i].data.ptr;
        switch (s->kind) {
        case SRC_CMD:
            rep->reasons |= VX_WAIT_CMD;
            break;
        case SRC_PY:
            rep->fds[rep->nfds++] = s->fd;
            rep->reasons |= VX_WAIT_FDS;
            break;
        case SRC_KICK:
            drain(s->fd);
            s->kq->stats.kicks++;
            wake(w, s->kq, serve);
            break;
        case SRC_DATA:
            wake(w, s->kq, serve);
            break;
        default: /* inert (see src_del) */
            break;
        }
    }
}

/* One epoll look; timeout_ns < 0: until an event, 0: none. */
static int look(struct vx_wait *w, int64_t timeout_ns, int serve)
{
    struct epoll_event evs[WAIT_EVENTS];
    int n;
    for (;;) {
        if (timeout_ns == 0) {
            n = epoll_wait(w->epfd, evs, WAIT_EVENTS, 0);
        } else if (timeout_ns < 0) {
            n = epoll_wait(w->epfd, evs, WAIT_EVENTS, -1);
        } else if (w->have_pwait2) {
            struct timespec ts = {.tv_sec = timeout_ns / 1000000000,
                                  .tv_nsec = timeout_ns % 1000000000};
            n = epoll_pwait2(w->epfd, evs, WAIT_EVENTS, &ts, NULL);
            if (n < 0 && errno == ENOSYS) {
                w->have_pwait2 = 0;
                continue;
            }
        } else {
            int64_t ms = (timeout_ns + 999999) / 1000000;
            n = epoll_wait(w->epfd, evs, WAIT_EVENTS, ms > 0x7fffffff ? 0x7fffffff : (int)ms);
        }
        if (n >= 0 || errno != EINTR)
            break;
        if (timeout_ns != 0)
            return 0; /* a signal: let the deadlines be looked at again */
    }
    if (n < 0)
        return -1;
    dispatch(w, evs, n, serve);
    return n;
}

int vx_wait_run(struct vx_wait *w, int serve)
{
    struct vx_wait_report *rep = &w->rep;
    rep->reasons = rep->due = rep->nfds = rep->nids = 0;
    w->stats.calls++;
    if (!w->slack_set) {
        /* deadlines (held interrupts) are tens of microseconds: the default 50 us timer
         * slack of a normal thread would add up to that much to each */
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        w->slack_set = 1;
    }
    uint64_t t = vx_now_ns();
    if (!serve) {
        if (look(w, 0, 0) < 0)
            return -1;
        while (w->head && rep->nids < VX_WAIT_REPORT_MAX) {
            struct vx_kq *kq = runq_pop(w);
            hand(kq, VX_WHY_KICK);
            report_id(w, kq);
        }
        deadlines(w, t);
        return (int)rep->reasons;
    }
    uint32_t since_look = 0;
    for (;;) {
        uint64_t next = deadlines(w, t);
        if (rep->reasons)
            return (int)rep->reasons;
        if (!w->head) {
            int64_t timeout = next ? (int64_t)(next - t) : -1;
            w->stats.sleeps++;
            w->stats.loops++;
            if (look(w, timeout, 1) < 0)
                return -1;
            uint64_t t1 = vx_now_ns();
            w->stats.idle_ns += t1 - t;
            t = t1;
            since_look = 0;
            continue;
        }
        if (since_look && since_look >= w->nrun) { /* each queued kq had a batch: look for news */
            if (look(w, 0, 1) < 0)
                return -1;
            since_look = 0;
            t = vx_now_ns();
            continue;
        }
        struct vx_kq *kq = runq_pop(w);
        int r = kq_turn(kq, w->head == NULL, w->poll_start, w->budget_to_python);
        since_look++;
        w->stats.loops++;
        w->stats.batches++;
        uint64_t t1 = vx_now_ns();
        if (kq->last > 0)
            w->stats.busy_ns += t1 - t;
        else
            w->stats.idle_ns += t1 - t;
        t = t1;
        if (r == VX_TURN_AGAIN)
            runq_push(w, kq);
        else if (r == VX_TURN_HANDED)
            report_id(w, kq);
    }
}
