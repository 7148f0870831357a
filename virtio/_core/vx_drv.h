/*
 * vx_drv.h - the C core's driver side (the guest's side of a split virtqueue), part of the
 * public API with vx_core.h (tools/build_core.py makes the cdef of both; vx_core.h includes
 * this file): the memory-order fences the Python driver uses (vx_fence.c), the trivial
 * recycling guest of the benchmarks (vx_drv.c), the per-queue driver state and its batch
 * entry points (vx_drvq.c), and a queue pair's whole driver turn (vx_drvpair.c).
 *
 * Threads: a struct vx_drvq or vx_drvpair belongs to one thread at a time.
 */
#ifndef VX_DRV_H
#define VX_DRV_H

#include <stdint.h>

/* ---- memory order for the driver side in Python (virtio.driver.split; vx_fence.c) ---- */
void vx_fence_release(void); /* earlier loads and stores before later stores */
void vx_fence_acquire(void); /* earlier loads before later loads and stores */
void vx_fence_full(void);    /* all of the above, and earlier stores before later loads */

/* ---- driver-side TEST SUPPORT (vx_drv.c; only virtio.testing calls it, for benchmarks): a
 * trivial guest that recycles fixed buffers ---- */
struct vx_drv {
    void *desc;
    void *avail;
    void *used;
    uint32_t size;
    uint16_t avail_idx;
    uint16_t last_used;
};
void vx_drv_fill_descs(struct vx_drv *d, uint64_t buf_gpa, uint32_t stride, uint32_t len,
                       uint16_t flags);
uint32_t vx_drv_post_all(struct vx_drv *d);
uint32_t vx_drv_recycle(struct vx_drv *d);

/* ==== the driver side of a split virtqueue (vx_drvq.c; virtio.driver.split.DriverQueue) ==== *
 * The guest's side: free descriptors, chains in flight and shadow indexes live here; the
 * arrays (size entries each) are allocated by the Python face. Returns: >= 0 a count or a head
 * id; -1 more used entries than chains in flight / no room (err_a, err_b), -2 IN_ORDER
 * violation (err_a head, err_b expected, err_c used index) or indirect chain too long, -3 a
 * used head not in flight (err_a), -4 a length beyond the buffer (err_a len, err_b head),
 * -5 an RX length shorter than the net header, -6 a bad num_buffers (err_a). */
enum {
    VX_DRVQ_EVENT_IDX = 1,
    VX_DRVQ_IN_ORDER = 2,
    VX_DRVQ_INDIRECT_MAX = 16,
};

struct vx_drvbuf {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t pad;
};

struct vx_drvq {
    void *desc;            /* descriptor table, avail ring, used ring in this process */
    void *avail;
    void *used;
    void *ind;             /* indirect tables: VX_DRVQ_INDIRECT_MAX entries per descriptor */
    uint64_t ind_addr;     /* device address of ind */
    uint16_t *free_ids;    /* a deque of free descriptor ids (a stack, a FIFO under IN_ORDER) */
    uint16_t *chain_next;  /* private next links of the chains in flight */
    uint16_t *chain_len;   /* descriptors held by each head in flight; 0: not in flight */
    uint16_t *order;       /* IN_ORDER: heads in avail order */
    uint16_t *scratch;
    uint32_t size;
    uint32_t flags;        /* VX_DRVQ_* */
    uint32_t free_head;
    uint32_t num_free;
    uint32_t order_head;
    uint32_t order_len;
    uint32_t in_flight;
    uint16_t avail_idx;    /* next avail slot (not yet published) */
    uint16_t published;    /* last published avail->idx */
    uint16_t last_used;
    uint16_t irq_enabled;
    uint32_t err_a;
    uint32_t err_b;
    uint32_t err_c;
    uint64_t posted;       /* frames posted by vx_drvq_tx_frames */
    uint64_t reaped;       /* used entries taken */
    uint64_t kicks;        /* vx_drvq_publish calls that asked for a kick */
};

void vx_drvq_reset(struct vx_drvq *q, uint16_t start_idx);
/* bookkeeping for the single-chain API (no fences: the caller orders its loads and stores) */
int32_t vx_drvq_add(struct vx_drvq *q, const struct vx_drvbuf *bufs, uint32_t n, uint32_t indirect);
int32_t vx_drvq_take_used(struct vx_drvq *q, uint16_t idx, uint32_t *ids, uint32_t *lens);
/* batches, fences inside; buffer i (bufs + i * buf_size, device address bufs_addr + ...)
 * belongs to descriptor i */
uint32_t vx_drvq_publish(struct vx_drvq *q);
int32_t vx_drvq_reap(struct vx_drvq *q);
int32_t vx_drvq_tx_frames(struct vx_drvq *q, uint8_t *bufs, uint64_t bufs_addr, uint32_t buf_size,
                          uint32_t hdr_len, const uint8_t *data, const uint32_t *lens, uint32_t n);
uint32_t vx_drvq_rx_post(struct vx_drvq *q, uint64_t bufs_addr, uint32_t buf_size);
int32_t vx_drvq_rx_frames(struct vx_drvq *q, const uint8_t *bufs, uint32_t buf_size,
                          uint32_t hdr_len, uint32_t mrg_rxbuf, uint8_t *out, uint32_t out_cap,
                          uint32_t *lens, uint32_t max_frames);

/* ==== one queue pair's driver turn (vx_drvpair.c; virtio.driver.pairs) =================== *
 * A load generator's driver, all its per-packet work in C: a vx_drvpair is an RX and a TX
 * vx_drvq of one virtio-net queue pair with their fixed buffers, the frames it keeps sending
 * (`frames`, `window` of them back to back, lengths in `lens`) and up to `window` of them in
 * flight. vx_drvpair_turn: reap the RX ring (frames counted and dropped; the used_event re-arm
 * and the re-check for entries published meanwhile, as virtqueue_enable_cb does), re-post RX
 * buffers, publish, reap TX, top TX up to `window` frames in flight, publish; the kicks the
 * device asks for are eventfd writes (kick_fd < 0: counted in `kicks_wanted`, not written).
 * vx_drvpair_turns: the turns of pairs[idx[0..n)). Returns frames received, or < 0 (the
 * vx_drvq return of the ring that failed: err_ring says which, 0 RX, 1 TX; err_pair which pair). */
struct vx_drvpair {
    struct vx_drvq *rx;
    struct vx_drvq *tx;
    uint8_t *rx_bufs;         /* fixed buffers: buffer i belongs to descriptor i */
    uint64_t rx_addr;
    uint8_t *tx_bufs;
    uint64_t tx_addr;
    uint32_t rx_buf_size;
    uint32_t tx_buf_size;
    uint32_t hdr_len;
    uint32_t mrg_rxbuf;
    const uint8_t *frames;    /* `window` frames back to back */
    const uint32_t *lens;
    uint8_t *scratch;         /* where reaped frames are copied (discarded) */
    uint32_t scratch_len;
    uint32_t window;
    uint32_t inflight;
    int32_t rx_kick_fd;
    int32_t tx_kick_fd;
    int32_t err_ring;
    uint64_t received;
    uint64_t sent;
    uint64_t kicks;           /* eventfd writes done */
    uint64_t kicks_wanted;    /* kicks the device asked for with kick_fd < 0 */
};

int32_t vx_drvpair_turn(struct vx_drvpair *p);
int64_t vx_drvpair_turns(struct vx_drvpair *pairs, const uint32_t *idx, uint32_t n,
                         uint32_t *err_pair);

/* ==== a driver thread's whole loop (vx_drvserve.c; virtio.driver.serve) ==================== *
 * A load generator's driver thread serving `npairs` vx_drvpair until a deadline, its
 * notification path in C as well as its per-packet work: learn which pairs have RX completions,
 * give those pairs their turn (vx_drvpair_turn), repeat. Two paths:
 *  - eventfd (`pi` NULL): `epfd` is an epoll over the pairs' RX call eventfds made by
 *    vx_drvserve_epoll (event data = the pair); a round is one epoll_wait and one read per
 *    eventfd it names, then those pairs' turns;
 *  - posted (`pi` set): a round takes the domain's request bitmap (vx_pi_take; bit b names pair
 *    pair_of_bit[b], VX_DRVSERVE_NO_PAIR for none) and turns those pairs; an empty bitmap is
 *    taken again for up to `spin_ns` (the driver still running, SN set: posts need no
 *    notification), then the sleep protocol: vx_pi_prepare_sleep, and only if nothing is
 *    pending a poll on `wake_fd` and its read, then vx_pi_running.
 * A wait lasts at most `max_wait_ms` (and never past the deadline). Counters: `syscalls`
 * (epoll_wait, poll, eventfd reads; kicks are the pairs'), `wakeups` (notifications seen:
 * eventfd reads that found a count, posted wake-ups), `rounds`, `sleeps` (posted: polls).
 * vx_drvserve_run returns frames received, or < 0: a vx_drvq error of pair `err_pair` (its
 * err_ring says which ring), or, err_pair UINT32_MAX, -errno of a failed epoll_wait / poll
 * (-EINVAL: no path set up). */
enum { VX_DRVSERVE_NO_PAIR = 0xffff, VX_DRVSERVE_MAX_PAIRS = 128 };
struct vx_drvserve {
    struct vx_drvpair *pairs;
    uint32_t npairs;          /* 1..VX_DRVSERVE_MAX_PAIRS */
    uint32_t max_wait_ms;
    uint32_t spin_ns;         /* posted path: how long an empty bitmap is re-taken */
    const int32_t *call_fds;  /* eventfd path: the pairs' RX call eventfds, pair order */
    int32_t epfd;             /* eventfd path: vx_drvserve_epoll's; -1 otherwise */
    int32_t wake_fd;          /* posted path: the domain's wake eventfd */
    struct vx_pi_desc *pi;    /* posted path: the domain's descriptor; NULL: eventfd path */
    uint16_t pair_of_bit[256]; /* VX_PI_MAX_BITS */
    uint32_t err_pair;
    uint64_t syscalls;
    uint64_t wakeups;
    uint64_t rounds;
    uint64_t sleeps;
};
/* epoll over call_fds[0..npairs) into s->epfd (the caller closes it); 0 or -errno. */
int32_t vx_drvserve_epoll(struct vx_drvserve *s);
/* Serve until CLOCK_MONOTONIC reaches until_ns. */
int64_t vx_drvserve_run(struct vx_drvserve *s, uint64_t until_ns);

#endif
