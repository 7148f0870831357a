/*
 * vx_internal.h - INTERNAL header of the C core (not fed to the cffi cdef; Python never sees it):
 * the ring layouts, struct vx_vq, and the static inline helpers every data-path file shares
 * (guest address translation, avail reads, the used shadow, the TX turn). Functions shared
 * between files but not public are declared here with VX_HIDDEN.
 *
 * Files of the core: vx_ring.c (queue life cycle, avail side, chain walk, busy-poll),
 * vx_used.c (used shadow publication and the interrupt decision), vx_cursor.h (copy cursors),
 * vx_tx.h (the one TX loop), vx_net_rx.c (RX delivery), vx_net_tx.c (the sink, echo, fwd and
 * tx_to_fd actions), vx_switch.c (L2 switch and its TX action), vx_round.c (vx_op / vx_round),
 * vx_drv.c (driver-side test support), vx_iotlb.c (the device IOTLB of ACCESS_PLATFORM).
 * vx_kq.c and vx_wait.c (kicked queues and the worker's wait) use only the public API and share
 * vx_wait.h instead of this header.
 */
#ifndef VX_INTERNAL_H
#define VX_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "vx_core.h"
#include "vx_cursor.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* shared between the core's files, not exported from the module */
#define VX_HIDDEN __attribute__((visibility("hidden")))

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* virtio-net header (VIRTIO 1.2, 5.1.6): its first 10 bytes (flags, gso_type, hdr_len, gso_size,
 * csum_start, csum_offset) are passed from TX to RX; with 12 or more bytes, bytes 10..11 are
 * le16 num_buffers (the RX chains one mergeable frame used) */
#define VX_NET_HDR_BASE_LEN 10
#define VX_NET_HDR_NUM_BUFFERS 10 /* offset of num_buffers */
#define VX_NET_HDR_MRG_LEN 12     /* a header that has num_buffers */
#define VX_MAX_HDR_LEN 64         /* largest net header a queue accepts (vx_vq_start) */
/* largest frame delivered into an RX queue (echo, fwd, switch): a 64 KiB GSO frame + slack */
#define VX_MAX_FRAME_LEN (65535 + 64)
#define VX_IOV_MAX 1024 /* Linux IOV_MAX: the fd paths truncate longer chains to this */
#define VX_MAC_PAIR_LEN 12 /* destination + source MAC: what echo swaps */

#define VX_MAX_QUEUE_SIZE 32768 /* the largest split ring (VIRTIO 1.2, 2.7) */
/* frames (TX chains, RX deliveries) one data-path call handles at most, whatever max_pkts asks
 * (the largest turn_max_packets): a ring that refills itself as we complete chains (a used ring
 * laid over the avail ring makes every publication look like new entries), or an RX frame that
 * takes no chain (empty, no header, MRG_RXBUF), must not hold a call and its worker for ever */
#define VX_CALL_MAX 65536u
/* ring alignments (VIRTIO 1.2, 2.7.1): descriptor table, avail ring, used ring */
#define VRING_DESC_ALIGN 16
#define VRING_AVAIL_ALIGN 2
#define VRING_USED_ALIGN 4
#define VX_ERR_LEN 192 /* a broken queue's message (vx_vq_error) */
#define VX_NS_PER_SEC 1000000000ull

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};

/* A queue's interrupt policy: what vx_vq_notify_decide does with a publication the driver wants
 * signalled. IMMEDIATE (0, a new queue's): send at once. CONFIGURED: the queue's struct
 * vx_irq_config (immediate, moderated or adaptive). Sending is the call eventfd, or, with a
 * posted-interrupt descriptor (pi), a posted bit and maybe the domain's wake eventfd. */
enum vx_notify_policy {
    VX_NOTIFY_POLICY_IMMEDIATE = 0, /* no irq_cfg, or its mode says so */
    VX_NOTIFY_POLICY_CONFIGURED = 1 /* irq_cfg set: its mode decides per publication */
};

struct vx_vq {
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t *used_event;  /* &avail->ring[size] */
    uint16_t *avail_event; /* &used->ring[size] */
    const struct vx_mem *mem;
    uint32_t cache; /* index of the last region hit */
    uint32_t size;
    uint32_t mask;
    uint32_t flags;
    uint32_t hdr_len;
    int call_fd;
    int started;
    int notify_enabled;
    uint16_t last_avail_idx;
    uint16_t avail_idx; /* last value read from avail->idx */
    uint16_t used_idx;  /* published used->idx */
    uint16_t signalled_used; /* used->idx at the last interrupt decision */
    int signalled_valid;     /* a decision was made since start (signalled_used is meaningful) */
    uint32_t notify_policy;  /* enum vx_notify_policy */
    uint32_t tx_prefetch;    /* VX_TX_PREFETCH_*: how TX loops prefetch staged frames */
    /* interrupt policy state (vx_used.c) */
    const struct vx_irq_config *irq_cfg; /* NULL: immediate */
    uint64_t irq_deadline;   /* a held interrupt is due at this CLOCK_MONOTONIC ns (0: none) */
    uint32_t irq_pending;    /* completions published since the first held one */
    int irq_shared;          /* written by other threads (switch, fwd RX): never moderated */
    int irq_active;          /* ADAPTIVE: moderation on */
    uint64_t irq_win_start;  /* ADAPTIVE: the rate window's start ... */
    uint64_t irq_win_count;  /* ... and completions in it */
    uint64_t irq_advance_ns; /* the worker's timer wake-up lateness, learnt (vx_vq_irq_flush_timed) */
    struct vx_pi_desc *pi;   /* posted interrupts: the domain's descriptor (NULL: eventfd) */
    uint32_t pi_bit;
    int pi_fd;
    uint32_t nshadow;
    struct vring_used_elem *shadow; /* 2 * size */
    /* chain of the current descriptor being handled: readable segs then writable segs */
    struct vx_seg *segs; /* size entries */
    uint32_t nread, nwrite;
    uint64_t rlen, wlen;
    struct iovec *iov; /* size entries */
    uint8_t *scratch;  /* VX_SCRATCH_LEN */
    int lock;
    int shared;        /* written by two ops on two threads (vx_vq_set_shared): owner calls lock */
    uint32_t rr;
    int broken;
    char err[VX_ERR_LEN];
    struct vx_stats stats;
    /* ACCESS_PLATFORM (vx_iotlb.c): descriptors are IOVAs translated through iotlb (NULL: GPAs);
     * segs and iov then hold seg_cap entries (a buffer may span several mappings) */
    struct vx_iotlb *iotlb;
    uint32_t seg_cap;     /* entries of segs and iov */
    uint8_t *ind_buf;     /* size * 16 bytes: an indirect table gathered from several mappings */
    uint64_t iotlb_last_miss;
};

#define VX_IOTLB_SEG_FACTOR 4 /* segs per ring entry with an IOTLB (buffers crossing pages) */

/* The walk through the IOTLB (vx_iotlb.c): 0 done, 1 miss (recorded, the chain stays in the
 * ring), -1 the queue broke (a permission the mapping lacks, too many segments). */
int vq_iotlb_segs(struct vx_vq *vq, uint64_t iova, uint32_t len, uint32_t perm, uint32_t *nseg,
                  uint16_t head) VX_HIDDEN;
/* RX of a queue with an IOTLB: walk the avail chains (without consuming them) until `need`
 * writable bytes are covered; 0 all mapped, 1 some chain missed (each chain's first missing page
 * is recorded: the whole ring is asked for at once), -1 broken. */
int vq_iotlb_probe(struct vx_vq *vq, uint64_t need) VX_HIDDEN;
int vq_iotlb_table(struct vx_vq *vq, uint64_t iova, uint32_t len, const uint8_t **out,
                   uint16_t head) VX_HIDDEN;

int vq_break(struct vx_vq *vq, const char *fmt, ...) VX_HIDDEN
    __attribute__((format(printf, 2, 3)));
uint8_t *gpa_slow(struct vx_vq *vq, uint64_t gpa, uint64_t len) VX_HIDDEN;

static inline void vq_lock(struct vx_vq *vq)
{
    if (likely(!__atomic_exchange_n(&vq->lock, 1, __ATOMIC_ACQUIRE)))
        return;
    __atomic_fetch_add(&vq->stats.lock_contended, 1, __ATOMIC_RELAXED);
    for (;;) {
        while (__atomic_load_n(&vq->lock, __ATOMIC_RELAXED))
            cpu_relax();
        if (!__atomic_exchange_n(&vq->lock, 1, __ATOMIC_ACQUIRE))
            return;
    }
}

static inline void vq_unlock(struct vx_vq *vq)
{
    __atomic_store_n(&vq->lock, 0, __ATOMIC_RELEASE);
}

/* host pointer of [gpa, gpa+len), len > 0, fully inside one region; NULL otherwise */
static inline uint8_t *gpa_to_host(struct vx_vq *vq, uint64_t gpa, uint64_t len)
{
    const struct vx_region *r = &vq->mem->regions[vq->cache];
    uint64_t off = gpa - r->gpa;
    if (likely(gpa >= r->gpa && off < r->size && len <= r->size - off))
        return (uint8_t *)(uintptr_t)(r->host + off);
    return gpa_slow(vq, gpa, len);
}

/* entries available (reads avail->idx with acquire); -1 and broken if the guest lies */
static inline int vq_avail(struct vx_vq *vq)
{
    uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(idx - vq->last_avail_idx);
    if (unlikely(n > vq->size))
        return vq_break(vq, "avail idx %u is %u ahead of last_avail_idx %u (ring size %u)", idx,
                        n, vq->last_avail_idx, vq->size);
    vq->avail_idx = idx;
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* used side                                                                                    */

static inline void vq_flush(struct vx_vq *vq)
{
    uint32_t n = vq->nshadow;
    if (!n)
        return;
    uint16_t start = vq->used_idx;
    uint32_t slot = start & vq->mask;
    uint32_t first = vq->size - slot;
    if (first > n)
        first = n;
    memcpy(&vq->used->ring[slot], vq->shadow, first * sizeof(struct vring_used_elem));
    if (n > first)
        memcpy(&vq->used->ring[0], vq->shadow + first, (n - first) * sizeof(struct vring_used_elem));
    vq->used_idx = (uint16_t)(start + n);
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
    vq->nshadow = 0;
    vq->stats.batches++;
}

/* shadow has 2*size entries: a frame being assembled (<= size chains) never forces a flush */
static inline void vq_push_nf(struct vx_vq *vq, uint16_t head, uint32_t len)
{
    vq->shadow[vq->nshadow].id = head;
    vq->shadow[vq->nshadow].len = len;
    vq->nshadow++;
    vq->stats.chains++;
}

static inline void vq_push(struct vx_vq *vq, uint16_t head, uint32_t len)
{
    if (unlikely(vq->nshadow >= vq->size))
        vq_flush(vq);
    vq->shadow[vq->nshadow].id = head;
    vq->shadow[vq->nshadow].len = len;
    vq->nshadow++;
    vq->stats.chains++;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * VX_NS_PER_SEC + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* chain walk and busy-poll (vx_ring.c)                                                         */

/*
 * Walk the chain at `head` into vq->segs: readable segments first, then writable ones.
 * Fills nread/nwrite/rlen/wlen. Returns 0, -1 (queue broken) or, with an IOTLB, VX_WALK_MISS:
 * an IOVA had no mapping (the miss is recorded); the caller leaves the chain in the ring and ends
 * its batch.
 */
#define VX_WALK_MISS 1
int vq_walk(struct vx_vq *vq, uint16_t head) VX_HIDDEN;

/*
 * vq_walk for the chain a TX driver posts most (testpmd's virtio-user, Linux with a pushed
 * header): one direct, device-readable descriptor inside one guest memory region. Inlined in the
 * TX loop: no call, no loop, no indirect or IOTLB branches (a chain walk cost ~107 instructions,
 * ~15 of them the call). Anything else, or anything it would have to refuse, goes to vq_walk,
 * which does every check and reports the error: same results, same vq fields filled.
 */
static inline __attribute__((always_inline)) int vq_walk_tx(struct vx_vq *vq, uint16_t head)
{
    if (likely(head < vq->size && !vq->iotlb)) {
        struct vring_desc d;
        memcpy(&d, &vq->desc[head], sizeof(d)); /* one fetch */
        if (likely(!(d.flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE))
                   && d.len && d.len <= VX_MAX_BUF_LEN)) {
            uint8_t *p = gpa_to_host(vq, d.addr, d.len);
            if (likely(p != NULL)) {
                vq->segs[0].ptr = p;
                vq->segs[0].len = d.len;
                vq->nread = 1;
                vq->nwrite = 0;
                vq->rlen = d.len;
                vq->wlen = 0;
                return 0;
            }
        }
    }
    return vq_walk(vq, head);
}

/* Wait (bounded by *left_ns) for avail->idx to move; 1 moved, 0 budget used up, -1 broke. */
int vq_spin(struct vx_vq *vq, uint64_t *left_ns, uint64_t until_ns) VX_HIDDEN;

/* the earlier of two CLOCK_MONOTONIC deadlines, 0 meaning none */
static inline uint64_t deadline_min(uint64_t a, uint64_t b)
{
    return !a ? b : (!b || a < b) ? a : b;
}


/* The start of every TX turn: how many chains this turn may take (0: nothing to do, -1: the
 * queue is broken or just broke). Counts an empty ring. */
static inline int tx_turn_begin(struct vx_vq *tx, uint32_t max_pkts)
{
    if (unlikely(tx->broken))
        return -1;
    if (unlikely(!tx->started))
        return 0;
    int n = vq_avail(tx);
    if (n <= 0) {
        if (n == 0)
            tx->stats.ring_empty++;
        return n;
    }
    if ((uint32_t)n > max_pkts)
        n = (int)max_pkts;
    return n;
}


/*
 * A TX call consumed every chain of its avail snapshot (`done` chains, below max_pkts). With spin
 * budget left, is there more? Re-reads avail->idx. Returns the new chain limit (> done), 0 when
 * the ring is empty, -1 when the queue broke.
 */
static inline int tx_reread(struct vx_vq *tx, uint32_t max_pkts, int done)
{
    int a = vq_avail(tx);
    if (a <= 0)
        return a;
    uint32_t room = max_pkts - (uint32_t)done;
    return done + (int)((uint32_t)a > room ? room : (uint32_t)a);
}

/* ------------------------------------------------------------------------------------------ */
/* RX delivery (vx_net_rx.c)                                                                    */

struct rx_src {
    struct cur cur;      /* positioned at the first frame byte */
    uint32_t len;        /* frame bytes */
    const uint8_t *hdr;  /* 10 header bytes to pass through, or NULL for a zero header */
    int swap_mac;
};

/*
 * Deliver one frame. Returns 1 delivered, 0 dropped (counted), -1 rx broken.
 * Caller holds the rx lock if the queue is shared.
 */
int rx_deliver(struct vx_vq *rx, struct rx_src *src) VX_HIDDEN;

/* the ops of a ring shared by two writers (struct vx_op shared_rx): vx_net_rx_fill and
 * vx_net_echo with the RX ring's lock held around each fill step / batch (never a spin) */
int rx_fill_shared(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
                   uint64_t spin_ns) VX_HIDDEN;
int echo_shared(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns) VX_HIDDEN;

#endif
