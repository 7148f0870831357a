/*
 * vx_wait.h - INTERNAL (not fed to the cffi cdef): what the two files of the worker's wait share.
 *
 * vx_kq.c serves one kicked queue (its turn: the batch, the stream wait, kicks back on and the
 * re-check); vx_wait.c is the wait a worker thread blocks in (epoll sources, the run queue,
 * deadlines, the loop). Both use only the core's public API (vx_core.h): rings and operations
 * are opaque handles to them, and struct vx_wait is private to vx_wait.c.
 *
 * Threads: everything on one wait and its kqs from the worker thread that owns it.
 */
#ifndef VX_WAIT_H
#define VX_WAIT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "vx_core.h"

#ifndef VX_HIDDEN
#define VX_HIDDEN __attribute__((visibility("hidden")))
#endif
#ifndef likely
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#endif

/* vx_kq.c */

/* read a kick eventfd empty (EAGAIN: already drained by an earlier event) */
void drain(int fd) VX_HIDDEN;
/* the queue goes to the Python side (state VX_KQ_PY, why); returns VX_TURN_HANDED */
int hand(struct vx_kq *kq, uint32_t why) VX_HIDDEN;
/* kicks off for a queue that woke up; -1: its ring is broken (handed over) */
int kq_suppress(struct vx_kq *kq) VX_HIDDEN;
/* one turn of a queue whose kicks are off (a VX_TURN_*); solo: no other queue waits for this
 * thread (the batch may busy-poll) */
int kq_turn(struct vx_kq *kq, int solo, uint32_t poll_start, uint32_t budget_to_python) VX_HIDDEN;

/* vx_wait.c */

/* TEST SUPPORT: the wait's hook (vx_wait_set_hook), if any, at one point (VX_HOOK_*) of a turn */
void wait_hook(struct vx_wait *w, uint32_t point, uint32_t id) VX_HIDDEN;

#endif
