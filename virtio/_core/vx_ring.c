/*
 * vx_ring.c - split virtqueue device side: queue life cycle, the avail side (pending entries,
 * kick suppression), the descriptor chain walk and the bounded busy-poll.
 *
 * SECURITY: everything read from guest memory is hostile. Descriptors are copied to the stack
 * before use (no double fetch), indexes are bounded by the ring size, chains by the ring size
 * (loops), indirect tables by size*16 bytes and never nested, every buffer must lie inside one
 * memory region (with overflow checks), descriptor lengths are capped. A violation breaks only
 * the queue it was found on (vq->broken), and a broken queue never touches guest memory again.
 *
 * Threads: a queue's owning worker thread (life cycle calls: the control thread, queue stopped).
 * A shared ring (vx_vq_set_shared: two ops write it from two threads) is read and re-armed by
 * pending, set_notify and the busy-poll's re-read under its lock.
 */
#include "vx_internal.h"

#include <stdarg.h>

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                      */

int vq_break(struct vx_vq *vq, const char *fmt, ...)
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

uint8_t *gpa_slow(struct vx_vq *vq, uint64_t gpa, uint64_t len)
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

/* ------------------------------------------------------------------------------------------ */
/* queue life cycle                                                                             */

struct vx_vq *vx_vq_new(uint32_t size)
{
    if (size == 0 || size > VX_MAX_QUEUE_SIZE || (size & (size - 1)))
        return NULL;
    struct vx_vq *vq = calloc(1, sizeof(*vq));
    if (!vq)
        return NULL;
    vq->size = size;
    vq->mask = size - 1;
    vq->call_fd = -1;
    vq->pi_fd = -1;
    vq->seg_cap = size;
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
    free(vq->ind_buf);
    free(vq);
}

int vx_vq_remap(struct vx_vq *vq, const struct vx_mem *mem, void *desc, void *avail, void *used)
{
    if (!mem || !desc || !avail || !used)
        return vq_break(vq, "remap: null ring pointer or memory table");
    if (((uintptr_t)desc & (VRING_DESC_ALIGN - 1)) || ((uintptr_t)avail & (VRING_AVAIL_ALIGN - 1)) ||
        ((uintptr_t)used & (VRING_USED_ALIGN - 1)))
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
    if (hdr_len > VX_MAX_HDR_LEN)
        return vq_break(vq, "net header length %u > %u", hdr_len, (unsigned)VX_MAX_HDR_LEN);
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
    vq->irq_deadline = 0; /* an interrupt held before a stop was flushed by the detach */
    vq->irq_pending = 0;
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

int vx_vq_set_tx_prefetch(struct vx_vq *vq, uint32_t mode)
{
    if (mode > VX_TX_PREFETCH_NONE)
        return -1;
    vq->tx_prefetch = mode;
    return 0;
}

uint32_t vx_vq_tx_prefetch(const struct vx_vq *vq) { return vq->tx_prefetch; }

uint16_t vx_vq_last_avail_idx(const struct vx_vq *vq) { return vq->last_avail_idx; }
uint16_t vx_vq_used_idx(const struct vx_vq *vq) { return vq->used_idx; }
const char *vx_vq_error(const struct vx_vq *vq) { return vq->broken ? vq->err : NULL; }
struct vx_stats *vx_vq_stats(struct vx_vq *vq) { return &vq->stats; }

/* ------------------------------------------------------------------------------------------ */
/* avail side                                                                                   */

void vx_vq_set_shared(struct vx_vq *vq, int shared)
{
    __atomic_store_n(&vq->shared, shared ? 1 : 0, __ATOMIC_RELAXED);
}

/* a shared ring's avail_idx and last_avail_idx move under its lock: a reader of avail->idx
 * storing an older avail_idx behind the other writer's back would hand out stale heads */
static inline int shared_lock(struct vx_vq *vq)
{
    if (likely(!__atomic_load_n(&vq->shared, __ATOMIC_RELAXED)))
        return 0;
    vq_lock(vq);
    return 1;
}

int vx_vq_pending(struct vx_vq *vq)
{
    if (unlikely(vq->broken || !vq->started))
        return vq->broken ? -1 : 0;
    if (likely(!shared_lock(vq)))
        return vq_avail(vq);
    int n = vq_avail(vq);
    vq_unlock(vq);
    return n;
}

static int set_notify(struct vx_vq *vq, int enable)
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

int vx_vq_set_notify(struct vx_vq *vq, int enable)
{
    if (likely(!shared_lock(vq)))
        return set_notify(vq, enable);
    int r = set_notify(vq, enable);
    vq_unlock(vq);
    return r;
}

/*
 * Walk the chain at `head` into vq->segs: readable segments first, then writable ones.
 * Fills nread/nwrite/rlen/wlen. Returns 0, -1 (queue broken) or VX_WALK_MISS (an IOVA of a
 * queue with an IOTLB has no mapping: nothing consumed).
 */
int vq_walk(struct vx_vq *vq, uint16_t head)
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
            if (unlikely(d.len == 0 || d.len % sizeof(struct vring_desc) ||
                         d.len > size * sizeof(struct vring_desc)))
                return vq_break(vq, "indirect table len %u in chain %u: want a multiple of 16 in "
                                    "16..%u", d.len, head, size * (unsigned)sizeof(struct vring_desc));
            const uint8_t *t;
            if (vq->iotlb) {
                int r = vq_iotlb_table(vq, d.addr, d.len, &t, head);
                if (r)
                    return r;
            } else {
                t = gpa_to_host(vq, d.addr, d.len);
                if (unlikely(!t))
                    return vq_break(vq, "indirect table %#llx+%u outside guest memory",
                                    (unsigned long long)d.addr, d.len);
            }
            if (unlikely((uintptr_t)t & 7))
                return vq_break(vq, "indirect table %#llx misaligned", (unsigned long long)d.addr);
            table = (const struct vring_desc *)t;
            tmax = d.len / sizeof(struct vring_desc);
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
            if (vq->iotlb) {
                uint32_t before = nseg;
                int r = vq_iotlb_segs(vq, d.addr, d.len,
                                      (d.flags & VRING_DESC_F_WRITE) ? VX_IOTLB_PERM_WO
                                                                     : VX_IOTLB_PERM_RO,
                                      &nseg, head);
                if (r)
                    return r;
                if (d.flags & VRING_DESC_F_WRITE) {
                    nwrite += nseg - before;
                    wlen += d.len;
                } else {
                    rlen += d.len;
                }
                goto next;
            }
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
    next:
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
/* bounded busy-poll                                                                            */

#define VX_SPIN_CHECK 32 /* avail->idx reads (one pause each) between two clock reads */


/*
 * Wait for avail->idx to move past the last value we read (vq->avail_idx): re-read it with a
 * pause in between, and read the clock every VX_SPIN_CHECK reads, until it moves or the call's
 * remaining spin budget *left_ns is used up (the time spent here is taken from it). Returns 1
 * when new entries are there (vq->avail_idx updated, the jump checked like every avail read),
 * 0 when the budget ran out or the clock reached until_ns (0: no such bound; a held interrupt's
 * deadline: the driver may be waiting for that interrupt to give us more, so the spin must not
 * outlast it), -1 when the queue broke (a bogus avail->idx).
 *
 * The caller has published every used entry and decided every interrupt before calling: the
 * driver never waits on anything of ours while we spin. Nothing is read from the guest here
 * except avail->idx, which vq_avail() checks.
 */
int vq_spin(struct vx_vq *vq, uint64_t *left_ns, uint64_t until_ns)
{
    if (*left_ns == 0 || unlikely(vq->broken))
        return vq->broken ? -1 : 0;
    const uint64_t t0 = now_ns();
    if (until_ns && t0 >= until_ns)
        return 0;
    vq->stats.spins++;
    const uint16_t seen = vq->avail_idx;
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
            const int locked = shared_lock(vq); /* never held while spinning */
            int a = vq_avail(vq);               /* acquire; checks the jump */
            if (unlikely(locked))
                vq_unlock(vq);
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
        if (t - t0 >= *left_ns || (until_ns && t >= until_ns))
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
