/*
 * vx_wait.c - the wait a worker thread blocks in: epoll over its command eventfd, the kick and
 * data fds of its C-served queues and the fds Python serves itself, the run queue of kicked
 * queues (each turn is vx_kq.c's kq_turn), the deadline slots and the queues' held interrupts.
 *
 * The contract is in vx_core.h ("kicked queues and the worker's wait"); shared declarations in
 * vx_wait.h. This file only uses the core's public API: it knows rings and operations as opaque
 * handles.
 *
 * Kick eventfds are registered edge-triggered and drained on every event, so an event is never
 * lost and never repeats; the command fd is level-triggered and left for the Python side to read.
 *
 * Threads: everything on one wait from the worker thread that owns it.
 */
#include "vx_wait.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

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
        uint64_t d = now == UINT64_MAX ? vx_vq_irq_flush(vqs[i], now)
                                       : vx_vq_irq_flush_timed(vqs[i], now);
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

void wait_hook(struct vx_wait *w, uint32_t point, uint32_t id)
{
    if (unlikely(w->hook))
        w->hook(w->hook_arg, point, id);
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
