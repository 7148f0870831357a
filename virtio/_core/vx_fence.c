/*
 * vx_fence.c - memory fences for the driver side written in Python (virtio.driver.split).
 *
 * Python reads and writes guest memory with plain loads and stores (memoryview, struct), which
 * neither the C compiler nor the CPU orders. The driver side needs three orders (VIRTIO 1.2,
 * 2.7.13 and 2.7.7.2), and gets each from one C11 fence here:
 *  - release, before publishing avail->idx: the descriptors and avail entries it wrote are
 *    visible first (x86: a compiler barrier only; aarch64: dmb ish);
 *  - acquire, after reading used->idx: the used entries it then reads are not older than that
 *    index (x86: a compiler barrier only; aarch64: dmb ishld);
 *  - full (sequentially consistent), between a store and a later load the lost-notification
 *    races hinge on: avail->idx published, then the device's avail_event / NO_NOTIFY read (kick
 *    or not); used_event / NO_INTERRUPT rewritten, then used->idx re-read (sleep or not). Only a
 *    full fence orders a store before a later load (x86: a locked instruction or mfence;
 *    aarch64: dmb ish).
 * A cffi call is itself opaque to the compiler; the fence inside orders the hardware.
 *
 * Threads: any (no state).
 */
#include "vx_core.h"

void vx_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
void vx_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void vx_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
