/*
 * vx_iotlb.c - the device IOTLB of VIRTIO_F_ACCESS_PLATFORM: a sorted table of IOVA ranges,
 * each mapped to a host pointer with a permission, consulted by the chain walk (vx_ring.c) for
 * every descriptor and indirect table of a queue that has one.
 *
 * SECURITY: the frontend fills the table (IOTLB_MSG UPDATE) and the guest's descriptors pick the
 * IOVAs: a translation must lie inside mappings that exist now and carry the permission the
 * device needs (device-readable buffers RO, device-writable WO); a buffer may span several
 * mappings (split into several segments), never a hole. A removed mapping is never used again:
 * removals happen only while no batch runs on the device's queues (vx_core.h, "Handoff"), and
 * every lookup is validated against the seqlock.
 *
 * Threads: vx_iotlb_update/invalidate/rehost/clear/take_misses: the control thread only;
 * vx_iotlb_translate and the walk helpers: any worker, concurrently.
 */
#include "vx_internal.h"

#include <sys/eventfd.h>

struct iotlb_entry {
    uint64_t iova;
    uint64_t size;
    uint64_t uaddr;
    uint64_t host;
    uint32_t perm;
};

struct iotlb_miss {
    uint64_t iova;
    uint32_t perm;
    uint32_t reported; /* handed out by vx_iotlb_take_misses */
};

struct vx_iotlb {
    uint32_t seq; /* odd while the control thread changes entries */
    uint32_t n;
    uint32_t cap;
    int miss_fd;
    struct iotlb_entry *e;   /* cap entries, sorted by iova, disjoint */
    struct iotlb_entry *tmp; /* cap entries: invalidate builds the new table here */
    int miss_lock;
    uint32_t nmiss;
    struct iotlb_miss miss[VX_IOTLB_MISS_SLOTS];
    struct vx_iotlb_stats stats;
};

#define STAT_ADD(t, f) __atomic_fetch_add(&(t)->stats.f, 1, __ATOMIC_RELAXED)

struct vx_iotlb *vx_iotlb_new(uint32_t capacity, int miss_fd)
{
    if (capacity == 0)
        return NULL;
    struct vx_iotlb *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->e = calloc(capacity, sizeof(*t->e));
    t->tmp = calloc(capacity, sizeof(*t->tmp));
    if (!t->e || !t->tmp) {
        vx_iotlb_free(t);
        return NULL;
    }
    t->cap = capacity;
    t->miss_fd = miss_fd;
    return t;
}

void vx_iotlb_free(struct vx_iotlb *t)
{
    if (!t)
        return;
    free(t->e);
    free(t->tmp);
    free(t);
}

void vx_iotlb_set_miss_fd(struct vx_iotlb *t, int miss_fd)
{
    __atomic_store_n(&t->miss_fd, miss_fd, __ATOMIC_RELEASE);
}

static void write_begin(struct vx_iotlb *t)
{
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void write_end(struct vx_iotlb *t)
{
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE);
}

static void miss_lock(struct vx_iotlb *t)
{
    while (__atomic_exchange_n(&t->miss_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
}

static void miss_unlock(struct vx_iotlb *t) { __atomic_store_n(&t->miss_lock, 0, __ATOMIC_RELEASE); }

/* index of the first entry whose end is above iova (n if none); entries are disjoint, sorted */
static uint32_t find(const struct iotlb_entry *e, uint32_t n, uint64_t iova)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (e[mid].iova + (e[mid].size - 1) < iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int vx_iotlb_update(struct vx_iotlb *t, uint64_t iova, uint64_t size, uint64_t uaddr,
                    uint64_t host, uint32_t perm)
{
    if (size == 0 || iova + (size - 1) < iova || uaddr + (size - 1) < uaddr ||
        host + (size - 1) < host || perm < VX_IOTLB_PERM_RO || perm > VX_IOTLB_PERM_RW)
        return VX_IOTLB_BAD;
    const uint64_t last = iova + (size - 1);
    uint32_t i = find(t->e, t->n, iova);
    if (i < t->n && t->e[i].iova <= last) {
        const struct iotlb_entry *o = &t->e[i];
        if (o->iova == iova && o->size == size && o->uaddr == uaddr && o->host == host &&
            o->perm == perm) {
            t->stats.repeats++;
            return VX_IOTLB_REPEAT;
        }
        return VX_IOTLB_OVERLAP;
    }
    if (t->n >= t->cap)
        return VX_IOTLB_FULL;
    write_begin(t);
    memmove(&t->e[i + 1], &t->e[i], (size_t)(t->n - i) * sizeof(*t->e));
    t->e[i] = (struct iotlb_entry){iova, size, uaddr, host, perm};
    t->n++;
    write_end(t);
    t->stats.updates++;
    /* pending misses this mapping answers are forgotten: a walk that misses again records anew */
    miss_lock(t);
    uint32_t k = 0;
    for (uint32_t j = 0; j < t->nmiss; j++) {
        uint64_t m = t->miss[j].iova; /* a page */
        if (m <= last && m + 0xfff >= iova)
            continue;
        t->miss[k++] = t->miss[j];
    }
    t->nmiss = k;
    miss_unlock(t);
    return VX_IOTLB_OK;
}

uint32_t vx_iotlb_invalidate(struct vx_iotlb *t, uint64_t iova, uint64_t size)
{
    if (size == 0)
        return 0;
    uint64_t last = iova + (size - 1);
    if (last < iova)
        last = UINT64_MAX;
    uint32_t out = 0, touched = 0;
    for (uint32_t i = 0; i < t->n; i++) {
        struct iotlb_entry e = t->e[i];
        uint64_t elast = e.iova + (e.size - 1);
        if (elast < iova || e.iova > last) {
            t->tmp[out++] = e;
            continue;
        }
        touched++;
        int left = e.iova < iova, right = elast > last;
        /* a split needs one more slot; without it the whole entry goes (a later miss refetches) */
        if (left && right && out + 2 + (t->n - i - 1) > t->cap)
            left = right = 0;
        if (left) {
            struct iotlb_entry l = e;
            l.size = iova - e.iova;
            t->tmp[out++] = l;
        }
        if (right) {
            struct iotlb_entry r = e;
            uint64_t cut = last + 1 - e.iova;
            r.iova = last + 1;
            r.size = e.size - cut;
            r.uaddr = e.uaddr + cut;
            r.host = e.host + cut;
            t->tmp[out++] = r;
        }
    }
    if (!touched)
        return 0;
    write_begin(t);
    memcpy(t->e, t->tmp, (size_t)out * sizeof(*t->e));
    t->n = out;
    write_end(t);
    t->stats.invalidations++;
    t->stats.removed += touched;
    return touched;
}

uint32_t vx_iotlb_rehost(struct vx_iotlb *t, const struct vx_mem *mem)
{
    uint32_t out = 0, dropped = 0;
    for (uint32_t i = 0; i < t->n; i++) {
        struct iotlb_entry e = t->e[i];
        int found = 0;
        for (uint32_t j = 0; mem && j < mem->nregions; j++) {
            const struct vx_region *r = &mem->regions[j];
            uint64_t off = e.uaddr - r->uva;
            if (e.uaddr >= r->uva && off < r->size && e.size <= r->size - off) {
                e.host = r->host + off;
                found = 1;
                break;
            }
        }
        if (found)
            t->tmp[out++] = e;
        else
            dropped++;
    }
    write_begin(t);
    memcpy(t->e, t->tmp, (size_t)out * sizeof(*t->e));
    t->n = out;
    write_end(t);
    return dropped;
}

void vx_iotlb_clear(struct vx_iotlb *t)
{
    write_begin(t);
    t->n = 0;
    write_end(t);
    miss_lock(t);
    t->nmiss = 0;
    miss_unlock(t);
}

uint32_t vx_iotlb_count(const struct vx_iotlb *t) { return t->n; }

int vx_iotlb_meets(const struct vx_iotlb *t, uint64_t iova, uint64_t size)
{
    if (size == 0)
        return 0;
    uint64_t last = iova + (size - 1);
    if (last < iova)
        last = UINT64_MAX;
    uint32_t i = find(t->e, t->n, iova);
    return i < t->n && t->e[i].iova <= last;
}
struct vx_iotlb_stats *vx_iotlb_stats(struct vx_iotlb *t) { return &t->stats; }

uint32_t vx_iotlb_take_misses(struct vx_iotlb *t, uint64_t *iovas, uint32_t *perms, uint32_t max)
{
    uint32_t k = 0;
    miss_lock(t);
    for (uint32_t j = 0; j < t->nmiss && k < max; j++) {
        if (t->miss[j].reported)
            continue;
        t->miss[j].reported = 1;
        iovas[k] = t->miss[j].iova;
        perms[k] = t->miss[j].perm;
        k++;
    }
    miss_unlock(t);
    return k;
}

static void record_miss(struct vx_iotlb *t, uint64_t iova, uint32_t perm)
{
    int wake = 0;
    iova &= ~(uint64_t)0xfff; /* one miss per page: the frontend answers whole pages */
    miss_lock(t);
    uint32_t j;
    for (j = 0; j < t->nmiss; j++)
        if (t->miss[j].iova == iova) {
            t->miss[j].perm |= perm;
            break;
        }
    if (j == t->nmiss) {
        if (t->nmiss == VX_IOTLB_MISS_SLOTS) {
            /* full: forget the misses already sent (an unanswerable one must not hold its slot
             * for ever); a walk that still needs one records and sends it again */
            uint32_t k = 0;
            for (uint32_t i = 0; i < t->nmiss; i++)
                if (!t->miss[i].reported)
                    t->miss[k++] = t->miss[i];
            t->nmiss = k;
        }
        if (t->nmiss < VX_IOTLB_MISS_SLOTS) {
            t->miss[t->nmiss++] = (struct iotlb_miss){iova, perm, 0};
            wake = 1;
            STAT_ADD(t, misses);
        } else {
            STAT_ADD(t, miss_dropped);
        }
    }
    miss_unlock(t);
    int fd = __atomic_load_n(&t->miss_fd, __ATOMIC_ACQUIRE);
    if (wake && fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(fd, &one, sizeof(one));
        (void)w;
    }
}

/* one lookup under the seqlock: the entry holding iova extended over the entries that follow it
 * contiguously (iova, uaddr and host) with the permission; *contig capped at len */
static int lookup(struct vx_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                  uint64_t *host, uint64_t *uaddr, uint64_t *contig)
{
    for (;;) {
        uint32_t s = __atomic_load_n(&t->seq, __ATOMIC_ACQUIRE);
        if (unlikely(s & 1)) {
            cpu_relax();
            continue;
        }
        uint32_t n = __atomic_load_n(&t->n, __ATOMIC_RELAXED);
        if (n > t->cap)
            n = t->cap;
        const struct iotlb_entry *e = t->e;
        uint32_t i = find(e, n, iova);
        int r = VX_IOTLB_MISS;
        uint64_t h = 0, u = 0, got = 0;
        if (i < n && e[i].iova <= iova) {
            if ((e[i].perm & perm) != perm) {
                r = VX_IOTLB_DENIED;
            } else {
                uint64_t off = iova - e[i].iova;
                h = e[i].host + off;
                u = e[i].uaddr + off;
                got = e[i].size - off;
                r = VX_IOTLB_OK;
                while (got < len && i + 1 < n) {
                    const struct iotlb_entry *a = &e[i], *b = &e[i + 1];
                    if (b->iova != a->iova + a->size || b->host != a->host + a->size ||
                        b->uaddr != a->uaddr + a->size || (b->perm & perm) != perm)
                        break;
                    got += b->size;
                    i++;
                }
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (likely(__atomic_load_n(&t->seq, __ATOMIC_RELAXED) == s)) {
            *host = h;
            *uaddr = u;
            *contig = got < len ? got : len;
            return r;
        }
        STAT_ADD(t, retries);
    }
}

int vx_iotlb_translate(struct vx_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                       int record, uint64_t *host, uint64_t *uaddr, uint64_t *contig)
{
    int r = lookup(t, iova, len, perm, host, uaddr, contig);
    if (r == VX_IOTLB_MISS && record)
        record_miss(t, iova, perm);
    if (r == VX_IOTLB_DENIED)
        STAT_ADD(t, denied);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* the walk's side (vx_ring.c)                                                                  */

static const char *perm_name(uint32_t perm) { return perm == VX_IOTLB_PERM_WO ? "write" : "read"; }

int vq_iotlb_segs(struct vx_vq *vq, uint64_t iova, uint32_t len, uint32_t perm, uint32_t *nseg,
                  uint16_t head)
{
    uint64_t left = len, at = iova;
    while (left) {
        uint64_t host, uaddr, got;
        if (unlikely(at < iova))
            return vq_break(vq, "buffer IOVA %#llx+%u wraps (chain %u)",
                            (unsigned long long)iova, len, head);
        int r = vx_iotlb_translate(vq->iotlb, at, left, perm, 1, &host, &uaddr, &got);
        if (r == VX_IOTLB_MISS) {
            vq->iotlb_last_miss = at;
            return 1;
        }
        if (r == VX_IOTLB_DENIED)
            return vq_break(vq, "buffer IOVA %#llx of chain %u: the mapping does not allow a "
                                "device %s", (unsigned long long)at, head, perm_name(perm));
        if (unlikely(*nseg >= vq->seg_cap))
            return vq_break(vq, "chain %u has more than %u buffer segments", head, vq->seg_cap);
        vq->segs[*nseg].ptr = (uint8_t *)(uintptr_t)host;
        vq->segs[*nseg].len = (uint32_t)got;
        (*nseg)++;
        at += got;
        left -= got;
    }
    return 0;
}

int vq_iotlb_table(struct vx_vq *vq, uint64_t iova, uint32_t len, const uint8_t **out,
                   uint16_t head)
{
    uint64_t host, uaddr, got;
    int r = vx_iotlb_translate(vq->iotlb, iova, len, VX_IOTLB_PERM_RO, 1, &host, &uaddr, &got);
    if (r == VX_IOTLB_OK && got == len) {
        *out = (const uint8_t *)(uintptr_t)host;
        return 0;
    }
    /* a table over several mappings: gathered into the queue's own copy (one fetch, too) */
    uint64_t done = 0;
    while (r == VX_IOTLB_OK) {
        memcpy(vq->ind_buf + done, (const void *)(uintptr_t)host, got);
        done += got;
        if (done == len) {
            *out = vq->ind_buf;
            return 0;
        }
        r = vx_iotlb_translate(vq->iotlb, iova + done, len - done, VX_IOTLB_PERM_RO, 1, &host,
                               &uaddr, &got);
    }
    if (r == VX_IOTLB_MISS) {
        vq->iotlb_last_miss = iova + done;
        return 1;
    }
    return vq_break(vq, "indirect table IOVA %#llx of chain %u: the mapping does not allow a "
                        "device read", (unsigned long long)(iova + done), head);
}

int vq_iotlb_probe(struct vx_vq *vq, uint64_t need)
{
    const uint16_t start = vq->last_avail_idx;
    const uint16_t n = (uint16_t)(vq->avail_idx - start);
    uint64_t have = 0;
    int missed = 0;
    for (uint16_t i = 0; i < n && (have < need || missed); i++) {
        uint16_t head = vq->avail->ring[(uint16_t)(start + i) & vq->mask];
        int w = vq_walk(vq, head);
        if (w < 0)
            return -1;
        if (w)
            missed = 1;
        else
            have += vq->wlen;
    }
    return missed;
}

int vx_vq_set_iotlb(struct vx_vq *vq, struct vx_iotlb *t)
{
    if (t && !vq->ind_buf) {
        uint32_t cap = VX_IOTLB_SEG_FACTOR * vq->size;
        struct vx_seg *segs = calloc(cap, sizeof(*segs));
        struct iovec *iov = calloc(cap, sizeof(*iov));
        uint8_t *ind = malloc((size_t)vq->size * sizeof(struct vring_desc));
        if (!segs || !iov || !ind) {
            free(segs);
            free(iov);
            free(ind);
            return vq_break(vq, "cannot allocate the IOTLB segment arrays");
        }
        free(vq->segs);
        free(vq->iov);
        vq->segs = segs;
        vq->iov = iov;
        vq->ind_buf = ind;
        vq->seg_cap = cap;
    }
    vq->iotlb = t;
    vq->iotlb_last_miss = 0;
    return 0;
}

uint64_t vx_vq_iotlb_last_miss(const struct vx_vq *vq) { return vq->iotlb_last_miss; }
