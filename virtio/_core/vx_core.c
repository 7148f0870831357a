/*
 * vx_core.c - split virtqueue device side, net data path and L2 switch of vhostx.
 *
 * SECURITY: everything read from guest memory is hostile. Descriptors are copied to the stack
 * before use (no double fetch), indexes are bounded by the ring size, chains by the ring size
 * (loops), indirect tables by size*16 bytes and never nested, every buffer must lie inside one
 * memory region (with overflow checks), descriptor lengths are capped. A violation breaks only
 * the queue it was found on (vq->broken), and a broken queue never touches guest memory again.
 *
 * Performance: no malloc and no syscall per packet (except the fd paths' readv/writev and the
 * call eventfd write once per batch); used entries are collected in a shadow array and published
 * with one release store of used->idx per call.
 */
#define _GNU_SOURCE
#include "vx_core.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

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

struct vx_seg {
    uint8_t *ptr;
    uint32_t len;
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
    uint16_t signalled_used;
    int signalled_valid;
    uint32_t nshadow;
    struct vring_used_elem *shadow; /* 2 * size */
    /* chain of the current descriptor being handled: readable segs then writable segs */
    struct vx_seg *segs; /* size entries */
    uint32_t nread, nwrite;
    uint64_t rlen, wlen;
    struct iovec *iov; /* size entries */
    uint8_t *scratch;  /* VX_SCRATCH_LEN */
    int lock;
    uint32_t rr;
    int broken;
    char err[192];
    struct vx_stats stats;
};

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                      */

static int vq_break(struct vx_vq *vq, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int vq_break(struct vx_vq *vq, const char *fmt, ...)
{
    if (!vq->broken) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(vq->err, sizeof(vq->err), fmt, ap);
        va_end(ap);
        vq->broken = 1;
        vq->stats.errors++;
    }
    return -1;
}

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

static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static uint8_t *gpa_slow(struct vx_vq *vq, uint64_t gpa, uint64_t len)
{
    const struct vx_mem *m = vq->mem;
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vx_region *r = &m->regions[i];
        uint64_t off = gpa - r->gpa;
        if (gpa >= r->gpa && off < r->size && len <= r->size - off) {
            vq->cache = i;
            return (uint8_t *)(uintptr_t)(r->host + off);
        }
    }
    return NULL;
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

/* ------------------------------------------------------------------------------------------ */
/* queue life cycle                                                                             */

struct vx_vq *vx_vq_new(uint32_t size)
{
    if (size == 0 || size > 32768 || (size & (size - 1)))
        return NULL;
    struct vx_vq *vq = calloc(1, sizeof(*vq));
    if (!vq)
        return NULL;
    vq->size = size;
    vq->mask = size - 1;
    vq->call_fd = -1;
    vq->shadow = calloc(2 * (size_t)size, sizeof(*vq->shadow));
    vq->segs = calloc(size, sizeof(*vq->segs));
    vq->iov = calloc(size, sizeof(*vq->iov));
    vq->scratch = malloc(VX_SCRATCH_LEN);
    if (!vq->shadow || !vq->segs || !vq->iov || !vq->scratch) {
        vx_vq_free(vq);
        return NULL;
    }
    return vq;
}

void vx_vq_free(struct vx_vq *vq)
{
    if (!vq)
        return;
    free(vq->shadow);
    free(vq->segs);
    free(vq->iov);
    free(vq->scratch);
    free(vq);
}

int vx_vq_remap(struct vx_vq *vq, const struct vx_mem *mem, void *desc, void *avail, void *used)
{
    if (!mem || !desc || !avail || !used)
        return vq_break(vq, "remap: null ring pointer or memory table");
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return vq_break(vq, "ring addresses misaligned (desc 16, avail 2, used 4)");
    vq->mem = mem;
    vq->cache = 0;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->used_event = &vq->avail->ring[vq->size];
    vq->avail_event = (uint16_t *)&vq->used->ring[vq->size];
    if (mem->nregions == 0)
        return vq_break(vq, "memory table has no region");
    return 0;
}

int vx_vq_start(struct vx_vq *vq, const struct vx_mem *mem, void *desc, void *avail, void *used,
                uint16_t last_avail_idx, uint32_t flags, uint32_t hdr_len, int call_fd)
{
    if (hdr_len > 64)
        return vq_break(vq, "net header length %u > 64", hdr_len);
    if (vx_vq_remap(vq, mem, desc, avail, used) < 0)
        return -1;
    vq->flags = flags;
    vq->hdr_len = hdr_len;
    vq->call_fd = call_fd;
    vq->last_avail_idx = last_avail_idx;
    vq->avail_idx = last_avail_idx;
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->signalled_used = vq->used_idx;
    vq->signalled_valid = 0;
    vq->nshadow = 0;
    vq->notify_enabled = 1;
    vq->started = 1;
    /* kicks on, in the ring as in our state: a stale avail_event, or a NO_NOTIFY left in
     * used->flags by an earlier backend (or by a queue detached while its kicks were off),
     * would swallow the driver's kicks while we believe them enabled */
    if (flags & VX_F_EVENT_IDX)
        __atomic_store_n(vq->avail_event, last_avail_idx, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&vq->used->flags, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return 0;
}

void vx_vq_set_call_fd(struct vx_vq *vq, int call_fd) { vq->call_fd = call_fd; }
uint16_t vx_vq_last_avail_idx(const struct vx_vq *vq) { return vq->last_avail_idx; }
uint16_t vx_vq_used_idx(const struct vx_vq *vq) { return vq->used_idx; }
const char *vx_vq_error(const struct vx_vq *vq) { return vq->broken ? vq->err : NULL; }
struct vx_stats *vx_vq_stats(struct vx_vq *vq) { return &vq->stats; }

/* ------------------------------------------------------------------------------------------ */
/* avail side                                                                                   */

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

int vx_vq_pending(struct vx_vq *vq)
{
    if (unlikely(vq->broken || !vq->started))
        return vq->broken ? -1 : 0;
    return vq_avail(vq);
}

int vx_vq_set_notify(struct vx_vq *vq, int enable)
{
    if (vq->broken)
        return -1;
    if (!vq->started)
        return 0;
    vq->notify_enabled = enable;
    if (enable) {
        vq->stats.notify_on++;
        if (vq->flags & VX_F_EVENT_IDX) {
            uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
            __atomic_store_n(vq->avail_event, idx, __ATOMIC_RELAXED);
        } else {
            __atomic_store_n(&vq->used->flags, 0, __ATOMIC_RELAXED);
        }
        /* no lost kicks: our enable must be visible before the caller re-reads avail->idx */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    } else {
        vq->stats.notify_off++;
        if (!(vq->flags & VX_F_EVENT_IDX))
            __atomic_store_n(&vq->used->flags, VRING_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
        /* under EVENT_IDX: avail_event is simply no longer advanced */
    }
    return 0;
}

/*
 * Walk the chain at `head` into vq->segs: readable segments first, then writable ones.
 * Fills nread/nwrite/rlen/wlen. Returns 0 or -1 (queue broken).
 */
static int vq_walk(struct vx_vq *vq, uint16_t head)
{
    const uint32_t size = vq->size;
    const struct vring_desc *table = vq->desc;
    uint32_t tmax = size; /* entries in the current table */
    uint32_t idx = head;
    uint32_t count = 0, nseg = 0, nwrite = 0;
    uint64_t rlen = 0, wlen = 0;
    int indirect = 0, seen_write = 0;

    if (unlikely(idx >= size))
        return vq_break(vq, "avail ring head %u >= ring size %u", idx, size);
    for (;;) {
        struct vring_desc d;
        memcpy(&d, &table[idx], sizeof(d)); /* one fetch */
        if (unlikely(++count > tmax))
            return vq_break(vq, "descriptor chain from head %u longer than %u: loop", head, tmax);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (unlikely(indirect))
                return vq_break(vq, "nested indirect table in chain %u", head);
            if (unlikely(d.flags & VRING_DESC_F_NEXT))
                return vq_break(vq, "indirect descriptor with NEXT in chain %u", head);
            if (unlikely(d.len == 0 || (d.len & 15) || d.len > size * 16u))
                return vq_break(vq, "indirect table len %u in chain %u: want a multiple of 16 in "
                                    "16..%u", d.len, head, size * 16u);
            const uint8_t *t = gpa_to_host(vq, d.addr, d.len);
            if (unlikely(!t))
                return vq_break(vq, "indirect table %#llx+%u outside guest memory",
                                (unsigned long long)d.addr, d.len);
            if (unlikely((uintptr_t)t & 7))
                return vq_break(vq, "indirect table %#llx misaligned", (unsigned long long)d.addr);
            table = (const struct vring_desc *)t;
            tmax = d.len / 16;
            idx = 0;
            count = 0;
            indirect = 1;
            continue;
        }
        if (d.flags & VRING_DESC_F_WRITE)
            seen_write = 1;
        else if (unlikely(seen_write))
            return vq_break(vq, "device-readable buffer after a writable one in chain %u", head);
        if (d.len) {
            if (unlikely(d.len > VX_MAX_BUF_LEN))
                return vq_break(vq, "descriptor len %u > cap %u in chain %u", d.len,
                                (unsigned)VX_MAX_BUF_LEN, head);
            uint8_t *p = gpa_to_host(vq, d.addr, d.len);
            if (unlikely(!p))
                return vq_break(vq, "buffer %#llx+%u outside guest memory (chain %u)",
                                (unsigned long long)d.addr, d.len, head);
            if (unlikely(nseg >= size))
                return vq_break(vq, "chain %u has more than %u buffers", head, size);
            if (d.flags & VRING_DESC_F_WRITE) {
                nwrite++;
                wlen += d.len;
            } else {
                rlen += d.len;
            }
            vq->segs[nseg].ptr = p;
            vq->segs[nseg].len = d.len;
            nseg++;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        idx = d.next;
        if (unlikely(idx >= tmax))
            return vq_break(vq, "next %u out of range %u in chain %u", idx, tmax, head);
    }
    vq->nread = nseg - nwrite;
    vq->nwrite = nwrite;
    vq->rlen = rlen;
    vq->wlen = wlen;
    return 0;
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

/* ------------------------------------------------------------------------------------------ */
/* gather / scatter cursors                                                                     */

struct cur {
    const struct vx_seg *s;
    uint32_t n, i, off;
};

static inline void cur_init(struct cur *c, const struct vx_seg *s, uint32_t n)
{
    c->s = s;
    c->n = n;
    c->i = 0;
    c->off = 0;
}

static inline size_t cur_read(struct cur *c, void *dst, size_t len)
{
    uint8_t *d = dst;
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        memcpy(d + done, c->s[c->i].ptr + c->off, k);
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

static inline size_t cur_write(struct cur *c, const void *src, size_t len)
{
    const uint8_t *p = src;
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        memcpy(c->s[c->i].ptr + c->off, p + done, k);
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

static inline size_t cur_skip(struct cur *c, size_t len)
{
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

/* copy up to len bytes from src cursor to dst cursor; both may be guest buffers, which a
 * hostile (or careless) guest may make overlap: memmove, never memcpy */
static inline size_t cur_copy(struct cur *dst, struct cur *src, size_t len)
{
    size_t done = 0;
    while (done < len && dst->i < dst->n && src->i < src->n) {
        size_t k = dst->s[dst->i].len - dst->off;
        size_t ks = src->s[src->i].len - src->off;
        if (k > ks)
            k = ks;
        if (k > len - done)
            k = len - done;
        memmove(dst->s[dst->i].ptr + dst->off, src->s[src->i].ptr + src->off, k);
        done += k;
        dst->off += k;
        src->off += k;
        if (dst->off == dst->s[dst->i].len) {
            dst->i++;
            dst->off = 0;
        }
        if (src->off == src->s[src->i].len) {
            src->i++;
            src->off = 0;
        }
    }
    return done;
}

/* host pointer of byte `pos` of a cursor's data (NULL if beyond) */
static inline uint8_t *cur_at(const struct vx_seg *s, uint32_t n, size_t pos)
{
    for (uint32_t i = 0; i < n; i++) {
        if (pos < s[i].len)
            return s[i].ptr + pos;
        pos -= s[i].len;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* RX delivery: header + frame from a source cursor into one or more RX chains                  */

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
static int rx_deliver(struct vx_vq *rx, struct rx_src *src)
{
    uint8_t hdr[64];
    uint8_t prefix[12];
    uint32_t hlen = rx->hdr_len;
    uint32_t plen = 0;
    uint64_t total = (uint64_t)hlen + src->len;

    if (unlikely(rx->broken))
        return -1;
    if (unlikely(!rx->started)) {
        rx->stats.ring_full++;
        return 0;
    }
    memset(hdr, 0, hlen);
    if (src->hdr)
        memcpy(hdr, src->hdr, hlen < 10 ? hlen : 10);
    if (hlen >= 12) {
        hdr[10] = 1;
        hdr[11] = 0;
    }
    if (src->swap_mac && src->len >= 12) {
        uint8_t m[12];
        cur_read(&src->cur, m, 12);
        memcpy(prefix, m + 6, 6);
        memcpy(prefix + 6, m, 6);
        plen = 12;
    }

    uint16_t avail_n = (uint16_t)(rx->avail_idx - rx->last_avail_idx);
    if (avail_n == 0) {
        int a = vq_avail(rx);
        if (a < 0)
            return -1;
        avail_n = a;
        if (avail_n == 0) {
            rx->stats.ring_full++;
            return 0;
        }
    }

    if (!(rx->flags & VX_F_MRG_RXBUF)) {
        uint16_t head = rx->avail->ring[rx->last_avail_idx & rx->mask];
        if (vq_walk(rx, head) < 0)
            return -1;
        if (unlikely(rx->nread))
            return vq_break(rx, "RX chain %u has device-readable buffers", head);
        if (unlikely(rx->wlen < total)) {
            rx->stats.too_big++;
            return 0; /* chain left in the ring */
        }
        struct cur d;
        cur_init(&d, rx->segs, rx->nwrite);
        cur_write(&d, hdr, hlen);
        cur_write(&d, prefix, plen);
        cur_copy(&d, &src->cur, src->len - plen);
        rx->last_avail_idx++;
        vq_push(rx, head, (uint32_t)total);
        rx->stats.packets++;
        rx->stats.bytes += src->len;
        return 1;
    }

    /* mergeable buffers: header + frame spread over as many chains as needed. One publication
     * never holds more used entries than the ring has slots: a frame that would push the shadow
     * past `size` (the driver may post chains while we work) starts over after a flush of the
     * frames before it. */
    if (rx->nshadow >= rx->size)
        vq_flush(rx);
    const struct cur cur0 = src->cur;
    uint16_t start_avail;
    uint32_t start_shadow, nbufs, hdr_done, pre_done;
    uint8_t *nb0, *nb1;
    uint64_t left;
retry:
    start_avail = rx->last_avail_idx;
    start_shadow = rx->nshadow;
    nb0 = nb1 = NULL;
    nbufs = 0;
    left = total;
    hdr_done = pre_done = 0;
    while (left) {
        int a = (uint16_t)(rx->avail_idx - rx->last_avail_idx);
        if (a == 0) {
            a = vq_avail(rx);
            if (a < 0)
                return -1;
        }
        if (a == 0 || rx->nshadow >= rx->size) {
            rx->last_avail_idx = start_avail;
            rx->nshadow = start_shadow;
            rx->stats.chains -= nbufs;
            if (a != 0 && start_shadow > 0) {
                vq_flush(rx);
                src->cur = cur0;
                goto retry;
            }
            rx->stats.ring_full++;
            return 0;
        }
        uint16_t head = rx->avail->ring[rx->last_avail_idx & rx->mask];
        if (vq_walk(rx, head) < 0)
            return -1;
        if (unlikely(rx->nread))
            return vq_break(rx, "RX chain %u has device-readable buffers", head);
        struct cur d;
        cur_init(&d, rx->segs, rx->nwrite);
        if (nbufs == 0 && hlen >= 12) {
            nb0 = cur_at(rx->segs, rx->nwrite, 10);
            nb1 = cur_at(rx->segs, rx->nwrite, 11);
        }
        uint64_t put = 0;
        if (hdr_done < hlen) {
            size_t k = cur_write(&d, hdr + hdr_done, hlen - hdr_done);
            hdr_done += k;
            put += k;
        }
        if (hdr_done == hlen && pre_done < plen) {
            size_t k = cur_write(&d, prefix + pre_done, plen - pre_done);
            pre_done += k;
            put += k;
        }
        if (hdr_done == hlen && pre_done == plen)
            put += cur_copy(&d, &src->cur, left - put);
        rx->last_avail_idx++;
        vq_push_nf(rx, head, (uint32_t)put);
        nbufs++;
        left -= put;
    }
    if (nb0) {
        *nb0 = (uint8_t)nbufs;
        if (nb1)
            *nb1 = (uint8_t)(nbufs >> 8);
    }
    rx->stats.packets++;
    rx->stats.bytes += src->len;
    return 1;
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


/* ------------------------------------------------------------------------------------------ */
/* bounded busy-poll                                                                            */

#define VX_SPIN_CHECK 32 /* avail->idx reads (one pause each) between two clock reads */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Wait for avail->idx to move past the last value we read (vq->avail_idx): re-read it with a
 * pause in between, and read the clock every VX_SPIN_CHECK reads, until it moves or the call's
 * remaining spin budget *left_ns is used up (the time spent here is taken from it). Returns 1
 * when new entries are there (vq->avail_idx updated, the jump checked like every avail read),
 * 0 when the budget ran out, -1 when the queue broke (a bogus avail->idx).
 *
 * The caller has published every used entry and decided every interrupt before calling: the
 * driver never waits on anything of ours while we spin. Nothing is read from the guest here
 * except avail->idx, which vq_avail() checks.
 */
static int vq_spin(struct vx_vq *vq, uint64_t *left_ns)
{
    if (*left_ns == 0 || unlikely(vq->broken))
        return vq->broken ? -1 : 0;
    vq->stats.spins++;
    const uint16_t seen = vq->avail_idx;
    const uint64_t t0 = now_ns();
    uint64_t t = t0;
    int r = 0;
    for (;;) {
        uint32_t i;
        for (i = 0; i < VX_SPIN_CHECK; i++) {
            if (__atomic_load_n(&vq->avail->idx, __ATOMIC_RELAXED) != seen)
                break;
            cpu_relax();
        }
        if (i < VX_SPIN_CHECK) {
            int a = vq_avail(vq); /* acquire; checks the jump */
            if (a < 0) {
                r = -1;
                break;
            }
            if (vq->avail_idx != seen) {
                r = 1;
                break;
            }
            /* it moved and came back (a guest playing games): keep waiting */
        }
        t = now_ns();
        if (t - t0 >= *left_ns)
            break;
    }
    if (r != 0)
        t = now_ns();
    uint64_t spent = t - t0;
    *left_ns = spent >= *left_ns ? 0 : *left_ns - spent;
    vq->stats.spin_ns += spent;
    if (r > 0)
        vq->stats.spin_found++;
    return r;
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
/* net operations                                                                               */

/*
 * The sink's copy destination: a rotating set of VX_SINK_SLOTS buffers of VX_SINK_SLOT_LEN bytes
 * per thread (one set per worker however many sink queues it serves), not one cache-hot scratch
 * buffer. The size copies what DPDK's vhost PMD + testpmd rxonly really write into: mbufs from
 * the lcore's mempool cache, which hands the same ~32 mbufs (one burst, ~70 KiB) back burst
 * after burst (LIFO). 64 slots (128 KiB: out of L1, in L2) is slightly harsher than that; 2048
 * slots (4 MiB, out of L2) measured 3-4x slower than scratch at 1500 B in bench/micro_core.py,
 * a cost DPDK does not pay. Frames longer than a slot go to the queue's scratch buffer.
 */
struct sink_ring {
    uint8_t *buf;
    uint32_t next;
};

static pthread_key_t sink_key;
static pthread_once_t sink_once = PTHREAD_ONCE_INIT;
static __thread struct sink_ring *tls_sink;

static void sink_ring_free(void *p)
{
    struct sink_ring *r = p;
    free(r->buf);
    free(r);
}

static void sink_key_init(void)
{
    (void)pthread_key_create(&sink_key, sink_ring_free);
}

/* this thread's ring, allocated on first use (NULL if that fails: the scratch buffer is used) */
static struct sink_ring *sink_ring_get(void)
{
    struct sink_ring *r = tls_sink;
    if (likely(r != NULL))
        return r;
    pthread_once(&sink_once, sink_key_init);
    r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->buf = malloc((size_t)VX_SINK_SLOTS * VX_SINK_SLOT_LEN);
    if (!r->buf) {
        free(r);
        return NULL;
    }
    (void)pthread_setspecific(sink_key, r);
    tls_sink = r;
    return r;
}

/*
 * The sink works in stages of up to VX_SINK_STAGE chains: walk them (descriptors checked, buffers
 * translated) and prefetch the first bytes of each frame, then copy them all. The frame data was
 * just written by the driver on another core; copying it right after the walk stalls on each
 * line in turn, prefetching the stage first overlaps those misses (DPDK's vhost dequeue does the
 * same). A chain is completed (used entry) only after its copy.
 */
#define VX_SINK_STAGE 32

struct sink_item {
    const uint8_t *src; /* the frame (net header skipped), NULL: copy through a cursor */
    uint32_t len;
    uint16_t head;
};

static inline uint8_t *sink_dst(struct vx_vq *tx, struct sink_ring *ring, uint32_t len)
{
    if (likely(ring != NULL && len <= VX_SINK_SLOT_LEN))
        return ring->buf + (size_t)(ring->next++ & (VX_SINK_SLOTS - 1)) * VX_SINK_SLOT_LEN;
    return tx->scratch;
}

/* copy every staged frame out, then complete its chain (in stage order); returns 0 */
static inline uint32_t sink_flush(struct vx_vq *tx, struct sink_ring *ring,
                                  const struct sink_item *stage, uint32_t ns)
{
    for (uint32_t i = 0; i < ns; i++) {
        memcpy(sink_dst(tx, ring, stage[i].len), stage[i].src, stage[i].len);
        vq_push(tx, stage[i].head, 0);
    }
    return 0;
}

int vx_net_tx_sink(struct vx_vq *tx, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns)
{
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    const uint32_t hlen = tx->hdr_len;
    struct sink_ring *ring = sink_ring_get();
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0;
    for (;;) {
        while (done < n) {
            struct sink_item stage[VX_SINK_STAGE];
            uint32_t ns = 0;
            int full = 0;
            while (done < n && ns < VX_SINK_STAGE) {
                uint16_t slot = tx->last_avail_idx & tx->mask;
                uint16_t head = tx->avail->ring[slot];
                __builtin_prefetch(&tx->desc[tx->avail->ring[(slot + 1) & tx->mask] & tx->mask]);
                if (vq_walk(tx, head) < 0)
                    return -1;
                tx->last_avail_idx++;
                done++;
                if (unlikely(tx->rlen < hlen || tx->rlen - hlen > VX_SCRATCH_LEN)) {
                    if (tx->rlen < hlen)
                        tx->stats.dropped++;
                    else
                        tx->stats.too_big++;
                    ns = sink_flush(tx, ring, stage, ns); /* keep the avail order */
                    vq_push(tx, head, 0);
                    continue;
                }
                uint32_t len = (uint32_t)(tx->rlen - hlen);
                const struct vx_seg *sg = tx->segs;
                const uint8_t *src = NULL;
                if (likely(tx->nread == 1))
                    src = sg[0].ptr + hlen;
                else if (tx->nread == 2 && sg[0].len == hlen)
                    src = sg[1].ptr; /* header in its own buffer, frame in one */
                if (likely(src != NULL)) {
                    __builtin_prefetch(src);
                    if (len > 64)
                        __builtin_prefetch(src + 64);
                    stage[ns].src = src;
                    stage[ns].len = len;
                    stage[ns].head = head;
                    ns++;
                } else { /* scattered: copy now, through a cursor (segs are per chain), after
                          * the stage so that used entries keep the avail order */
                    ns = sink_flush(tx, ring, stage, ns);
                    struct cur c;
                    cur_init(&c, sg, tx->nread);
                    cur_skip(&c, hlen);
                    cur_read(&c, sink_dst(tx, ring, len), len);
                    vq_push(tx, head, 0);
                }
                tx->stats.packets++;
                tx->stats.bytes += len;
                bytes += len;
                if (bytes >= max_bytes) {
                    full = 1;
                    break;
                }
            }
            sink_flush(tx, ring, stage, ns);
            if (full)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            vx_vq_signal(tx); /* completions first: the driver must not wait on our spin */
            int r = vq_spin(tx, &spin_left);
            if (r <= 0) {
                if (r < 0)
                    return -1;
                break;
            }
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx); /* publish what this snapshot consumed before taking the next */
        }
        if (m < 0)
            return -1;
        if (m == 0)
            break;
        n = m;
    }
out:
    vx_vq_signal(tx);
    return done;
}

int vx_net_rx_fill(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
                   uint64_t spin_ns)
{
    if (unlikely(rx->broken))
        return -1;
    if (unlikely(!rx->started))
        return 0;
    struct vx_seg seg = {(uint8_t *)frame, len};
    uint64_t spin_left = spin_ns;
    int done = 0;
    while ((uint32_t)done < max_pkts) {
        struct rx_src src;
        cur_init(&src.cur, &seg, len ? 1 : 0);
        src.len = len;
        src.hdr = NULL;
        src.swap_mac = 0;
        int r = rx_deliver(rx, &src);
        if (r < 0)
            return -1;
        if (r > 0) {
            done++;
            continue;
        }
        /* No room. Without MRG_RXBUF a non-empty ring means the head chain is too small: no
         * wait helps. Otherwise (empty ring, or not enough chains for the frame) wait for more,
         * once this call has done some work and with spin budget left. */
        int starved = (rx->flags & VX_F_MRG_RXBUF) || rx->avail_idx == rx->last_avail_idx;
        if (!starved || done == 0 || spin_left == 0)
            break;
        if (vx_vq_signal(rx) < 0) /* publish and interrupt before we wait */
            return -1;
        int s = vq_spin(rx, &spin_left);
        if (s < 0)
            return -1;
        if (s == 0)
            break;
        rx->stats.ring_full--; /* the wait found buffers: nothing was refused after all */
    }
    if (vx_vq_signal(rx) < 0)
        return -1;
    return done;
}

/*
 * TX chains of `tx` delivered into `rx`. locked: take rx's lock around the deliveries (the rx
 * queue may be written by other threads; never held while spinning). Returns TX chains consumed,
 * or -1 if TX broke (or rx broke and rx_fatal).
 */
static int tx_to_rx(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                    int swap, int locked, int rx_fatal, uint64_t spin_ns)
{
    if (unlikely(rx_fatal && rx->broken))
        return -1;
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    const uint32_t hlen = tx->hdr_len;
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0, wrote = 0, ret;
    if (locked)
        vq_lock(rx);
    for (;;) {
        while (done < n) {
            uint16_t head = tx->avail->ring[tx->last_avail_idx & tx->mask];
            if (vq_walk(tx, head) < 0) {
                ret = -1;
                goto fail;
            }
            tx->last_avail_idx++;
            vq_push(tx, head, 0);
            done++;
            if (unlikely(tx->rlen < hlen || tx->rlen - hlen > 65535 + 64)) {
                tx->stats.dropped++;
                continue;
            }
            uint8_t thdr[10] = {0};
            struct rx_src src;
            cur_init(&src.cur, tx->segs, tx->nread);
            cur_read(&src.cur, thdr, hlen < 10 ? hlen : 10);
            cur_skip(&src.cur, hlen > 10 ? hlen - 10 : 0);
            src.len = (uint32_t)(tx->rlen - hlen);
            src.hdr = thdr;
            src.swap_mac = swap;
            int r = rx_deliver(rx, &src);
            if (r < 0) {
                if (rx_fatal) {
                    ret = -1;
                    goto fail;
                }
                tx->stats.dropped++;
                continue;
            }
            if (r == 0) {
                tx->stats.dropped++;
                continue;
            }
            wrote = 1;
            tx->stats.packets++;
            tx->stats.bytes += src.len;
            bytes += src.len;
            if (bytes >= max_bytes)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            /* completions of both rings first, and no lock held while we wait */
            if (wrote || rx->nshadow)
                vx_vq_signal(rx);
            wrote = 0;
            if (locked)
                vq_unlock(rx);
            vx_vq_signal(tx);
            int r = vq_spin(tx, &spin_left);
            if (locked)
                vq_lock(rx);
            if (r < 0) {
                ret = -1;
                goto fail;
            }
            if (r == 0)
                break;
            if (rx_fatal && rx->broken) { /* echo: the RX ring broke while we waited */
                ret = -1;
                goto fail;
            }
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx);
        }
        if (m < 0) {
            ret = -1;
            goto fail;
        }
        if (m == 0)
            break;
        n = m;
    }
out:
    if (wrote || rx->nshadow)
        vx_vq_signal(rx);
    if (locked)
        vq_unlock(rx);
    vx_vq_signal(tx);
    return done;
fail:
    if (wrote || rx->nshadow)
        vx_vq_signal(rx);
    if (locked)
        vq_unlock(rx);
    return ret;
}

int vx_net_echo(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
                uint64_t spin_ns)
{
    return tx_to_rx(tx, rx, max_pkts, max_bytes, 1, 0, 1, spin_ns);
}

int vx_net_fwd(struct vx_vq *tx, struct vx_vq *rx, uint32_t max_pkts, uint64_t max_bytes,
               uint64_t spin_ns)
{
    return tx_to_rx(tx, rx, max_pkts, max_bytes, 0, 1, 0, spin_ns);
}

int vx_net_tx_to_fd(struct vx_vq *tx, int fd, uint32_t max_pkts, uint64_t max_bytes,
                    uint64_t spin_ns)
{
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0;
    for (;;) {
        while (done < n) {
            uint16_t head = tx->avail->ring[tx->last_avail_idx & tx->mask];
            if (vq_walk(tx, head) < 0)
                return -1;
            if (unlikely(tx->rlen < tx->hdr_len)) {
                tx->stats.dropped++;
            } else {
                uint32_t k = tx->nread;
                if (k > 1024)
                    k = 1024; /* IOV_MAX; longer chains are truncated */
                for (uint32_t i = 0; i < k; i++) {
                    tx->iov[i].iov_base = tx->segs[i].ptr;
                    tx->iov[i].iov_len = tx->segs[i].len;
                }
                ssize_t w = writev(fd, tx->iov, k);
                if (w < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        tx->stats.eagain++;
                        goto out; /* chain stays in the ring; no spinning on a full fd */
                    }
                    if (errno == EINTR)
                        continue;
                    tx->stats.io_errors++;
                    tx->stats.dropped++;
                } else {
                    uint64_t len = tx->rlen - tx->hdr_len;
                    tx->stats.packets++;
                    tx->stats.bytes += len;
                    bytes += len;
                }
            }
            tx->last_avail_idx++;
            vq_push(tx, head, 0);
            done++;
            if (bytes >= max_bytes)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            vx_vq_signal(tx);
            int r = vq_spin(tx, &spin_left);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx);
        }
        if (m < 0)
            return -1;
        if (m == 0)
            break;
        n = m;
    }
out:
    vx_vq_signal(tx);
    return done;
}

int vx_net_rx_from_fd(struct vx_vq *rx, int fd, uint32_t max_pkts, uint64_t spin_ns)
{
    if (unlikely(rx->broken))
        return -1;
    if (unlikely(!rx->started))
        return 0;
    const uint32_t hlen = rx->hdr_len;
    uint64_t spin_left = spin_ns;
    int done = 0;
    while ((uint32_t)done < max_pkts) {
        if ((uint16_t)(rx->avail_idx - rx->last_avail_idx) == 0) {
            int a = vq_avail(rx);
            if (a < 0)
                return -1;
            if (a == 0 && done > 0 && spin_left) {
                /* out of RX buffers after some work: publish, then wait for the driver's
                 * refill (the fd may hold more; we only learn that by reading it) */
                if (vx_vq_signal(rx) < 0)
                    return -1;
                a = vq_spin(rx, &spin_left);
                if (a < 0)
                    return -1;
                if (a > 0)
                    continue;
            }
            if (a == 0) {
                rx->stats.ring_full++;
                break;
            }
        }
        if (rx->flags & VX_F_MRG_RXBUF) {
            struct iovec iov = {rx->scratch, VX_SCRATCH_LEN};
            ssize_t r = readv(fd, &iov, 1);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    rx->stats.eagain++;
                else
                    rx->stats.io_errors++;
                break;
            }
            if (r == 0)
                break;
            if ((size_t)r < hlen) {
                rx->stats.dropped++;
                continue;
            }
            struct vx_seg seg = {rx->scratch + hlen, (uint32_t)(r - hlen)};
            struct rx_src src;
            cur_init(&src.cur, &seg, seg.len ? 1 : 0);
            src.len = seg.len;
            src.hdr = rx->scratch;
            src.swap_mac = 0;
            int d = rx_deliver(rx, &src);
            if (d < 0)
                return -1;
            if (d > 0)
                done++;
            continue;
        }
        uint16_t head = rx->avail->ring[rx->last_avail_idx & rx->mask];
        if (vq_walk(rx, head) < 0)
            return -1;
        if (unlikely(rx->nread))
            return vq_break(rx, "RX chain %u has device-readable buffers", head);
        uint32_t k = rx->nwrite < 1024 ? rx->nwrite : 1024;
        for (uint32_t i = 0; i < k; i++) {
            rx->iov[i].iov_base = rx->segs[i].ptr;
            rx->iov[i].iov_len = rx->segs[i].len;
        }
        ssize_t r = readv(fd, rx->iov, k);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                rx->stats.eagain++;
            else
                rx->stats.io_errors++;
            break; /* chain stays in the ring */
        }
        if (r == 0)
            break;
        if ((size_t)r < hlen) {
            rx->stats.dropped++;
            continue; /* chain reused for the next read */
        }
        if (hlen >= 12) {
            uint8_t *p0 = cur_at(rx->segs, k, 10), *p1 = cur_at(rx->segs, k, 11);
            if (p0)
                *p0 = 1;
            if (p1)
                *p1 = 0;
        }
        rx->last_avail_idx++;
        vq_push(rx, head, (uint32_t)r);
        rx->stats.packets++;
        rx->stats.bytes += (uint64_t)r - hlen;
        done++;
    }
    if (vx_vq_signal(rx) < 0)
        return -1;
    return done;
}

/* ------------------------------------------------------------------------------------------ */
/* L2 learning switch                                                                           */

struct sw_port {
    int active;
    uint32_t nrxq;
    uint32_t rr;
    struct vx_vq *rxq[VX_SWITCH_MAX_RXQ];
};

struct vx_switch {
    uint64_t fdb[VX_SWITCH_FDB_SIZE]; /* (mac << 16) | (port + 1); 0 empty; ~0 tombstone */
    struct sw_port ports[VX_SWITCH_MAX_PORTS];
    int admin_lock;
    struct vx_switch_stats stats;
};

#define FDB_TOMB UINT64_MAX
#define FDB_PROBE 32

static inline uint64_t mac48(const uint8_t *m)
{
    return ((uint64_t)m[0] << 40) | ((uint64_t)m[1] << 32) | ((uint64_t)m[2] << 24) |
           ((uint64_t)m[3] << 16) | ((uint64_t)m[4] << 8) | (uint64_t)m[5];
}

static inline uint32_t fdb_hash(uint64_t mac)
{
    return (uint32_t)((mac * 0x9E3779B97F4A7C15ull) >> 51) & (VX_SWITCH_FDB_SIZE - 1);
}

struct vx_switch *vx_switch_new(void)
{
    return calloc(1, sizeof(struct vx_switch));
}

void vx_switch_free(struct vx_switch *sw) { free(sw); }
struct vx_switch_stats *vx_switch_stats(struct vx_switch *sw) { return &sw->stats; }

static int fdb_find(struct vx_switch *sw, uint64_t mac)
{
    uint32_t h = fdb_hash(mac);
    for (uint32_t i = 0; i < FDB_PROBE; i++) {
        uint64_t e = __atomic_load_n(&sw->fdb[(h + i) & (VX_SWITCH_FDB_SIZE - 1)], __ATOMIC_ACQUIRE);
        if (e == 0)
            return -1;
        if (e != FDB_TOMB && (e >> 16) == mac)
            return (int)(e & 0xFFFF) - 1;
    }
    return -1;
}

static void fdb_learn(struct vx_switch *sw, uint64_t mac, int port)
{
    uint32_t h = fdb_hash(mac);
    uint64_t val = (mac << 16) | (uint64_t)(port + 1);
    for (uint32_t i = 0; i < FDB_PROBE; i++) {
        uint64_t *slot = &sw->fdb[(h + i) & (VX_SWITCH_FDB_SIZE - 1)];
        uint64_t e = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        if (e == val)
            return;
        if (e != 0 && e != FDB_TOMB && (e >> 16) == mac) {
            __atomic_store_n(slot, val, __ATOMIC_RELEASE);
            __atomic_fetch_add(&sw->stats.moved, 1, __ATOMIC_RELAXED);
            return;
        }
        if (e == 0) {
            if (__atomic_compare_exchange_n(slot, &e, val, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                __atomic_fetch_add(&sw->stats.learned, 1, __ATOMIC_RELAXED);
                return;
            }
            if ((e >> 16) == mac) /* somebody learned it concurrently */
                return;
        }
    }
    __atomic_fetch_add(&sw->stats.fdb_full, 1, __ATOMIC_RELAXED);
}

int vx_switch_lookup(struct vx_switch *sw, const uint8_t *mac)
{
    return fdb_find(sw, mac48(mac));
}

int vx_switch_add_port(struct vx_switch *sw, struct vx_vq **rxqs, uint32_t nrxq)
{
    if (nrxq == 0 || nrxq > VX_SWITCH_MAX_RXQ)
        return -1;
    while (__atomic_exchange_n(&sw->admin_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    int port = -1;
    for (int p = 0; p < VX_SWITCH_MAX_PORTS; p++) {
        if (!__atomic_load_n(&sw->ports[p].active, __ATOMIC_ACQUIRE)) {
            port = p;
            break;
        }
    }
    if (port >= 0) {
        struct sw_port *sp = &sw->ports[port];
        for (uint32_t i = 0; i < nrxq; i++)
            sp->rxq[i] = rxqs[i];
        sp->nrxq = nrxq;
        sp->rr = 0;
        __atomic_store_n(&sp->active, 1, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&sw->admin_lock, 0, __ATOMIC_RELEASE);
    return port;
}

int vx_switch_remove_port(struct vx_switch *sw, int port)
{
    if (port < 0 || port >= VX_SWITCH_MAX_PORTS || !sw->ports[port].active)
        return -1;
    struct sw_port *sp = &sw->ports[port];
    /* after this loop no sender is inside a delivery to this port, and none will start one */
    for (uint32_t i = 0; i < sp->nrxq; i++)
        vq_lock(sp->rxq[i]);
    __atomic_store_n(&sp->active, 0, __ATOMIC_RELEASE);
    for (uint32_t i = 0; i < sp->nrxq; i++)
        vq_unlock(sp->rxq[i]);
    for (uint32_t i = 0; i < VX_SWITCH_FDB_SIZE; i++) {
        uint64_t e = __atomic_load_n(&sw->fdb[i], __ATOMIC_ACQUIRE);
        if (e != 0 && e != FDB_TOMB && (int)(e & 0xFFFF) - 1 == port)
            __atomic_compare_exchange_n(&sw->fdb[i], &e, FDB_TOMB, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED);
    }
    return 0;
}

static inline uint32_t flow_hash(const uint8_t *h, uint32_t n)
{
    uint64_t x = mac48(h) * 0x9E3779B97F4A7C15ull ^ mac48(h + 6);
    if (n >= 34 && h[12] == 0x08 && h[13] == 0x00) {
        uint32_t ips[2];
        memcpy(ips, h + 26, 8);
        x ^= ((uint64_t)ips[0] << 32 | ips[1]) * 0xC2B2AE3D27D4EB4Full;
        if (n >= 38 && (h[14] & 0x0F) == 5 && (h[23] == 6 || h[23] == 17)) {
            uint32_t ports;
            memcpy(&ports, h + 34, 4);
            x ^= (uint64_t)ports * 0x165667B19E3779F9ull;
        }
    }
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return (uint32_t)(x >> 32);
}

/* deliver one TX chain (tx->segs) to one port; returns 1 if delivered */
struct sw_touched {
    struct vx_vq *rx;
    int port;
};

static int sw_deliver(struct vx_switch *sw, struct vx_vq *tx, int port, uint32_t fhash,
                      const uint8_t *thdr, struct sw_touched *touched, uint32_t *ntouched)
{
    struct sw_port *sp = &sw->ports[port];
    if (!__atomic_load_n(&sp->active, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&sw->stats.dest_down, 1, __ATOMIC_RELAXED);
        return 0;
    }
    uint32_t nq = sp->nrxq;
    if (nq == 0)
        return 0;
    struct vx_vq *rx = sp->rxq[nq == 1 ? 0 : fhash % nq];
    vq_lock(rx);
    int r = 0;
    if (__atomic_load_n(&sp->active, __ATOMIC_ACQUIRE) && !rx->broken) {
        struct rx_src src;
        cur_init(&src.cur, tx->segs, tx->nread);
        cur_skip(&src.cur, tx->hdr_len);
        src.len = (uint32_t)(tx->rlen - tx->hdr_len);
        src.hdr = thdr;
        src.swap_mac = 0;
        r = rx_deliver(rx, &src);
        if (r < 0)
            r = 0;
    } else {
        __atomic_fetch_add(&sw->stats.dest_down, 1, __ATOMIC_RELAXED);
    }
    vq_unlock(rx);
    if (r > 0) {
        uint32_t i;
        for (i = 0; i < *ntouched; i++)
            if (touched[i].rx == rx)
                break;
        if (i == *ntouched) {
            if (*ntouched < 64) {
                touched[*ntouched].rx = rx;
                touched[*ntouched].port = port;
                (*ntouched)++;
            } else { /* too many destinations in one batch: signal now */
                vq_lock(rx);
                if (__atomic_load_n(&sp->active, __ATOMIC_ACQUIRE))
                    vx_vq_signal(rx);
                vq_unlock(rx);
            }
        }
    }
    return r;
}

static void sw_signal_touched(struct vx_switch *sw, struct sw_touched *touched, uint32_t *ntouched)
{
    for (uint32_t i = 0; i < *ntouched; i++) {
        struct vx_vq *rx = touched[i].rx;
        vq_lock(rx);
        if (__atomic_load_n(&sw->ports[touched[i].port].active, __ATOMIC_ACQUIRE))
            vx_vq_signal(rx);
        vq_unlock(rx);
    }
    *ntouched = 0;
}

int vx_switch_tx(struct vx_switch *sw, int port, struct vx_vq *tx, uint32_t max_pkts,
                 uint64_t max_bytes, uint64_t spin_ns)
{
    if (unlikely(tx->broken))
        return -1;
    if (port < 0 || port >= VX_SWITCH_MAX_PORTS)
        return 0;
    int n = tx_turn_begin(tx, max_pkts);
    if (n <= 0)
        return n;
    const uint32_t hlen = tx->hdr_len;
    struct sw_touched touched[64];
    uint32_t ntouched = 0;
    uint64_t bytes = 0, spin_left = spin_ns;
    int done = 0;
    for (;;) {
        while (done < n) {
            uint16_t head = tx->avail->ring[tx->last_avail_idx & tx->mask];
            if (vq_walk(tx, head) < 0) {
                done = -1;
                goto out;
            }
            tx->last_avail_idx++;
            vq_push(tx, head, 0);
            done++;
            if (unlikely(tx->rlen < hlen + 14 || tx->rlen - hlen > 65535 + 64)) {
                tx->stats.dropped++;
                continue;
            }
            uint8_t thdr[10] = {0};
            uint8_t eth[38];
            struct cur c;
            cur_init(&c, tx->segs, tx->nread);
            cur_read(&c, thdr, hlen < 10 ? hlen : 10);
            cur_skip(&c, hlen > 10 ? hlen - 10 : 0);
            uint32_t elen = (uint32_t)cur_read(&c, eth, sizeof(eth));
            uint32_t flen = (uint32_t)(tx->rlen - hlen);
            const uint8_t *dst = eth, *srcm = eth + 6;
            if (!(srcm[0] & 1) && mac48(srcm) != 0)
                fdb_learn(sw, mac48(srcm), port);
            uint32_t fh = flow_hash(eth, elen);
            int delivered = 0;
            int dport = (dst[0] & 1) ? -1 : fdb_find(sw, mac48(dst));
            if (dport >= 0) {
                if (dport == port) {
                    __atomic_fetch_add(&sw->stats.hairpin, 1, __ATOMIC_RELAXED);
                } else {
                    __atomic_fetch_add(&sw->stats.unicast, 1, __ATOMIC_RELAXED);
                    delivered += sw_deliver(sw, tx, dport, fh, thdr, touched, &ntouched);
                }
            } else {
                __atomic_fetch_add(&sw->stats.flooded, 1, __ATOMIC_RELAXED);
                for (int p = 0; p < VX_SWITCH_MAX_PORTS; p++) {
                    if (p == port || !__atomic_load_n(&sw->ports[p].active, __ATOMIC_RELAXED))
                        continue;
                    delivered += sw_deliver(sw, tx, p, fh, thdr, touched, &ntouched);
                }
            }
            if (!delivered)
                tx->stats.dropped++;
            tx->stats.packets++;
            tx->stats.bytes += flen;
            bytes += flen;
            if (bytes >= max_bytes)
                goto out;
        }
        if ((uint32_t)done >= max_pkts || spin_left == 0)
            break;
        int m = tx_reread(tx, max_pkts, done);
        if (m == 0) {
            sw_signal_touched(sw, touched, &ntouched); /* every completion before we wait */
            vx_vq_signal(tx);
            int r = vq_spin(tx, &spin_left);
            if (r < 0) {
                done = -1;
                goto out;
            }
            if (r == 0)
                break;
            m = tx_reread(tx, max_pkts, done);
        } else if (m > 0) {
            vq_flush(tx);
        }
        if (m < 0) {
            done = -1;
            goto out;
        }
        if (m == 0)
            break;
        n = m;
    }
out:
    sw_signal_touched(sw, touched, &ntouched);
    if (done < 0)
        return -1;
    vx_vq_signal(tx);
    return done;
}

/* ------------------------------------------------------------------------------------------ */
/* port operations as data, poll rounds                                                         */

uint64_t vx_now_ns(void) { return now_ns(); }

int vx_op_run(struct vx_op *op, uint32_t max_pkts, uint64_t max_bytes, uint64_t spin_ns)
{
    switch (op->kind) {
    case VX_OP_TX_SINK:
        return vx_net_tx_sink(op->vq, max_pkts, max_bytes, spin_ns);
    case VX_OP_RX_FILL:
        return vx_net_rx_fill(op->vq, op->frame, op->frame_len, max_pkts, spin_ns);
    case VX_OP_ECHO:
        return vx_net_echo(op->vq, op->peer, max_pkts, max_bytes, spin_ns);
    case VX_OP_FWD:
        return vx_net_fwd(op->vq, op->peer, max_pkts, max_bytes, spin_ns);
    case VX_OP_TX_TO_FD:
        return vx_net_tx_to_fd(op->vq, op->fd, max_pkts, max_bytes, spin_ns);
    case VX_OP_RX_FROM_FD:
        return vx_net_rx_from_fd(op->vq, op->fd, max_pkts, spin_ns);
    case VX_OP_SWITCH_TX:
        return vx_switch_tx(op->sw, op->port, op->vq, max_pkts, max_bytes, spin_ns);
    default:
        return -2;
    }
}

#define VX_ROUND_CLOCK 4 /* passes between two clock reads in a round (a power of two) */

int vx_round(struct vx_op **ops, uint32_t n, uint32_t max_passes, uint64_t max_ns,
             uint64_t coalesce_ns)
{
    for (uint32_t i = 0; i < n; i++) {
        struct vx_op *op = ops[i];
        op->result = 0;
        op->batches = op->found = op->full = 0;
        op->pkts = 0;
        op->last_work_ns = 0;
    }
    if (n == 0 || max_passes == 0)
        return 0;
    const uint64_t t0 = now_ns();
    uint64_t t = t0;
    uint32_t pass = 0;
    while (pass < max_passes) {
        int any = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct vx_op *op = ops[i];
            if (coalesce_ns && t < op->next_ns)
                continue; /* served less than coalesce_ns ago: let the ring fill up */
            int r = vx_op_run(op, op->max_pkts, op->max_bytes, 0);
            op->result = r;
            if (unlikely(r < 0)) {
                if (r == -1)
                    op->batches++;
                return -(int)(i + 1);
            }
            op->batches++;
            op->next_ns = t + coalesce_ns;
            if (r > 0) {
                op->found++;
                op->pkts += (uint64_t)r;
                op->last_work_ns = t;
                if ((uint32_t)r >= op->max_pkts)
                    op->full++;
                any = 1;
            }
        }
        pass++;
        if (!any)
            cpu_relax();
        /* the clock every VX_ROUND_CLOCK passes without coalescing (a busy pass takes
         * microseconds, an empty one well under one; reading the clock each time cost ~7% of a
         * busy round), every pass with it */
        if (coalesce_ns || (pass & (VX_ROUND_CLOCK - 1)) == 0 || pass >= max_passes) {
            t = now_ns();
            if (t - t0 >= max_ns)
                break;
        }
    }
    return (int)pass;
}
