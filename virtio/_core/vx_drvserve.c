/*
 * vx_drvserve.c - a load generator's driver thread, its whole loop in C: the notification path
 * (per-queue call eventfds under one epoll, or a posted-interrupt domain) and the pairs' turns
 * (vx_drvpair.c) until a deadline. Contract in vx_drv.h; virtio.driver.serve is the Python face.
 * What differs between the two paths is only how the driver learns which pairs have work.
 * Threads: a vx_drvserve (and its pairs) belongs to one thread at a time.
 */
#include "vx_core.h"
#include "vx_internal.h" /* cpu_relax, now_ns */

#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <unistd.h>

_Static_assert(VX_PI_MAX_BITS == 256, "vx_drvserve.pair_of_bit is sized for 256 bits");

/* the wait's timeout: what is left of the deadline, at most max_wait_ms, at least 1 ms */
static int wait_ms(const struct vx_drvserve *s, uint64_t now, uint64_t until)
{
    uint64_t left = until > now ? (until - now + 999999u) / 1000000u : 0;
    if (left > s->max_wait_ms)
        left = s->max_wait_ms;
    return left ? (int)left : 1;
}

int32_t vx_drvserve_epoll(struct vx_drvserve *s)
{
    if (s->npairs < 1 || s->npairs > VX_DRVSERVE_MAX_PAIRS)
        return -EINVAL;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        return -errno;
    for (uint32_t p = 0; p < s->npairs; p++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = p};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, s->call_fds[p], &ev) < 0) {
            int e = errno;
            close(ep);
            return -e;
        }
    }
    s->epfd = ep;
    return 0;
}

static int64_t turn(struct vx_drvserve *s, uint32_t pair)
{
    int32_t r = vx_drvpair_turn(&s->pairs[pair]);
    if (r < 0)
        s->err_pair = pair;
    return r;
}

/* one eventfd round: frames received, or < 0 */
static int64_t eventfd_round(struct vx_drvserve *s, int timeout_ms)
{
    struct epoll_event ev[VX_DRVSERVE_MAX_PAIRS];
    int n = epoll_wait(s->epfd, ev, (int)s->npairs, timeout_ms);
    s->syscalls++;
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    int64_t got = 0;
    for (int i = 0; i < n; i++) {
        uint32_t p = ev[i].data.u32;
        uint64_t count;
        /* EAGAIN: another round's read took it; the turn finds what there is */
        if (read(s->call_fds[p], &count, sizeof count) == (ssize_t)sizeof count)
            s->wakeups++;
        s->syscalls++;
        int64_t r = turn(s, p);
        if (r < 0)
            return r;
        got += r;
    }
    return got;
}

/* posted: the driver keeps running (SN set: the backend posts without notifying) for up to
 * spin_ns, never past the deadline, taking the bitmap again; 1 if bits came meanwhile */
static int spin_take(struct vx_drvserve *s, uint64_t *w, uint64_t deadline)
{
    if (!s->spin_ns)
        return 0;
    uint64_t until = now_ns() + s->spin_ns;
    if (until > deadline)
        until = deadline;
    do {
        for (int i = 0; i < 16; i++)
            cpu_relax();
        if (vx_pi_take(s->pi, w))
            return 1;
    } while (now_ns() < until);
    return 0;
}

/* one posted round: frames received, or < 0 */
static int64_t posted_round(struct vx_drvserve *s, int timeout_ms, uint64_t deadline)
{
    uint64_t w[4];
    if (!vx_pi_take(s->pi, w) && !spin_take(s, w, deadline)) {
        if (s->spin_ns && now_ns() >= deadline)
            return 0; /* spun to the deadline: no sleep after it */
        if (!vx_pi_prepare_sleep(s->pi)) {
            struct pollfd pfd = {.fd = s->wake_fd, .events = POLLIN};
            s->sleeps++;
            int n = poll(&pfd, 1, timeout_ms);
            s->syscalls++;
            if (n > 0) {
                uint64_t count;
                if (read(s->wake_fd, &count, sizeof count) == (ssize_t)sizeof count)
                    s->wakeups++;
                s->syscalls++;
            }
            vx_pi_running(s->pi);
            if (n < 0 && errno != EINTR)
                return -errno;
        }
        if (!vx_pi_take(s->pi, w))
            return 0;
    }
    int64_t got = 0;
    for (int i = 0; i < 4; i++) {
        for (uint64_t bits = w[i]; bits; bits &= bits - 1) {
            uint32_t p = s->pair_of_bit[64 * i + __builtin_ctzll(bits)];
            if (p >= s->npairs)
                continue; /* a bit of no pair of ours (VX_DRVSERVE_NO_PAIR) */
            int64_t r = turn(s, p);
            if (r < 0)
                return r;
            got += r;
        }
    }
    return got;
}

int64_t vx_drvserve_run(struct vx_drvserve *s, uint64_t until_ns)
{
    s->err_pair = UINT32_MAX; /* set only by a pair's failed turn */
    if (s->npairs < 1 || s->npairs > VX_DRVSERVE_MAX_PAIRS || (!s->pi && s->epfd < 0))
        return -EINVAL;
    int64_t total = 0;
    uint64_t now = now_ns();
    while (now < until_ns) {
        int64_t r = s->pi ? posted_round(s, wait_ms(s, now, until_ns), until_ns)
                          : eventfd_round(s, wait_ms(s, now, until_ns));
        if (r < 0)
            return r;
        total += r;
        s->rounds++;
        now = now_ns();
    }
    return total;
}
