/*
 * vx_drvq.c - the driver side of one split virtqueue (the guest's side), per-packet work in C.
 *
 * virtio.driver.split.DriverQueue is the Python face: it owns a struct vx_drvq (the ring
 * pointers in this process, the free-descriptor deque, the chains in flight, the shadow
 * indexes) and calls into this file for every per-descriptor step. Two kinds of entry points:
 *  - bookkeeping for DriverQueue's single-chain API (vx_drvq_add, vx_drvq_take_used): no fences
 *    here, DriverQueue issues them around its own loads and stores (vx_fence.c);
 *  - batches with their fences inside, for the net client (virtio.driver.net.NetDriver):
 *    vx_drvq_tx_frames copies frames into fixed buffers and posts them, vx_drvq_rx_post keeps
 *    the RX ring stocked, vx_drvq_rx_frames reaps used RX buffers and copies whole frames out,
 *    vx_drvq_reap frees used TX chains, vx_drvq_publish publishes avail->idx and says whether
 *    the device wants a kick.
 * Fixed buffers: the batch paths tie buffer i (at bufs + i * buf_size, device address
 * bufs_addr + i * buf_size) to descriptor i, so a free descriptor is a free buffer.
 *
 * Layout and order follow VIRTIO 1.2 2.7: release before avail->idx is stored, a full fence
 * between that store and the load of avail_event / used->flags, acquire after used->idx is
 * loaded, a full fence after used_event is rewritten. The device is not trusted: a used entry
 * naming a head not in flight, more used entries than chains in flight, a length beyond the
 * buffer or an IN_ORDER violation is an error (negative return, details in err_a / err_b);
 * nothing is freed twice.
 * Threads: one thread per queue at a time.
 */
#include "vx_core.h"

#include <string.h>

struct drvq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define USED_F_NO_NOTIFY 1
#define NET_HDR_NUM_BUFFERS 10 /* le16 num_buffers in virtio_net_hdr_mrg_rxbuf / v1 */

static inline uint16_t *avail_flags(struct vx_drvq *q) { return (uint16_t *)q->avail; }
static inline uint16_t *avail_idx(struct vx_drvq *q) { return (uint16_t *)q->avail + 1; }
static inline uint16_t *avail_ring(struct vx_drvq *q) { return (uint16_t *)q->avail + 2; }
static inline uint16_t *used_event(struct vx_drvq *q) { return avail_ring(q) + q->size; }
static inline uint16_t *used_flags(struct vx_drvq *q) { return (uint16_t *)q->used; }
static inline uint16_t *used_idx(struct vx_drvq *q) { return (uint16_t *)q->used + 1; }
static inline const uint32_t *used_elem(struct vx_drvq *q, uint16_t i)
{
    return (const uint32_t *)((uint8_t *)q->used + 4) + 2 * (i & (q->size - 1));
}
static inline uint16_t *avail_event(struct vx_drvq *q)
{
    return (uint16_t *)((uint8_t *)q->used + 4 + 8 * q->size);
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

void vx_drvq_reset(struct vx_drvq *q, uint16_t start_idx)
{
    uint32_t in_order = q->flags & VX_DRVQ_IN_ORDER;
    for (uint32_t k = 0; k < q->size; k++) {
        /* a stack pops from the right end: descriptor 0 first; a FIFO takes from the left */
        q->free_ids[k] = (uint16_t)(in_order ? k : q->size - 1 - k);
        q->chain_len[k] = 0;
        q->chain_next[k] = 0;
    }
    q->free_head = 0;
    q->num_free = q->size;
    q->order_head = 0;
    q->order_len = 0;
    q->in_flight = 0;
    q->avail_idx = q->published = q->last_used = start_idx;
    q->irq_enabled = 1;
}

static inline uint16_t take_id(struct vx_drvq *q)
{
    const uint32_t mask = q->size - 1;
    uint16_t id;
    if (q->flags & VX_DRVQ_IN_ORDER) {
        id = q->free_ids[q->free_head & mask];
        q->free_head = (q->free_head + 1) & mask;
    } else {
        id = q->free_ids[(q->free_head + q->num_free - 1) & mask];
    }
    q->num_free--;
    return id;
}

static inline void put_id(struct vx_drvq *q, uint16_t id)
{
    q->free_ids[(q->free_head + q->num_free) & (q->size - 1)] = id;
    q->num_free++;
}

/* offer `head` in the next avail slot (not published) */
static inline void push_head(struct vx_drvq *q, uint16_t head, uint16_t len)
{
    q->chain_len[head] = len;
    q->in_flight++;
    avail_ring(q)[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    if (q->flags & VX_DRVQ_IN_ORDER) {
        q->order[(q->order_head + q->order_len) & (q->size - 1)] = head;
        q->order_len++;
    }
}

int32_t vx_drvq_add(struct vx_drvq *q, const struct vx_drvbuf *bufs, uint32_t n, uint32_t indirect)
{
    struct drvq_desc *desc = q->desc;
    if (n == 0 || (indirect ? q->num_free < 1 : q->num_free < n)) {
        q->err_a = n;
        q->err_b = q->num_free;
        return -1;
    }
    if (indirect) {
        if (n > VX_DRVQ_INDIRECT_MAX || n > q->size) {
            q->err_a = n;
            return -2;
        }
        uint16_t head = take_id(q);
        uint64_t off = (uint64_t)head * VX_DRVQ_INDIRECT_MAX * sizeof(struct drvq_desc);
        struct drvq_desc *table = (struct drvq_desc *)((uint8_t *)q->ind + off);
        for (uint32_t i = 0; i < n; i++) {
            table[i].addr = bufs[i].addr;
            table[i].len = bufs[i].len;
            table[i].flags = (uint16_t)(bufs[i].flags | (i + 1 < n ? DESC_F_NEXT : 0));
            table[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
        }
        desc[head].addr = q->ind_addr + off;
        desc[head].len = (uint32_t)(n * sizeof(struct drvq_desc));
        desc[head].flags = DESC_F_INDIRECT;
        desc[head].next = 0;
        push_head(q, head, 1);
        return head;
    }
    uint16_t head = take_id(q), cur = head;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t nxt = i + 1 < n ? take_id(q) : 0;
        desc[cur].addr = bufs[i].addr;
        desc[cur].len = bufs[i].len;
        desc[cur].flags = (uint16_t)(bufs[i].flags | (i + 1 < n ? DESC_F_NEXT : 0));
        desc[cur].next = nxt;
        q->chain_next[cur] = nxt;
        cur = nxt;
    }
    push_head(q, head, (uint16_t)n);
    return head;
}

/* give back the descriptors of head `hid` (the k-th new used entry); < 0 if the device lied */
static inline int release_head(struct vx_drvq *q, uint32_t hid, uint16_t k)
{
    if (q->flags & VX_DRVQ_IN_ORDER) {
        uint32_t expect = q->order_len ? q->order[q->order_head] : 0xFFFFFFFFu;
        if (hid != expect) {
            q->err_a = hid;
            q->err_b = expect;
            q->err_c = (uint16_t)(q->last_used + k);
            return -2;
        }
        q->order_head = (q->order_head + 1) & (q->size - 1);
        q->order_len--;
    }
    if (hid >= q->size || q->chain_len[hid] == 0) {
        q->err_a = hid;
        return -3;
    }
    uint16_t n = q->chain_len[hid];
    q->chain_len[hid] = 0;
    q->in_flight--;
    if (q->flags & VX_DRVQ_IN_ORDER) {
        uint16_t cur = (uint16_t)hid;
        for (uint16_t i = 0; i < n; i++) {
            put_id(q, cur);
            cur = q->chain_next[cur];
        }
    } else {
        /* a stack: the chain goes back tail first, so its head is the next one taken */
        uint16_t cur = (uint16_t)hid;
        for (uint16_t i = 0; i < n; i++) {
            q->scratch[i] = cur;
            cur = q->chain_next[cur];
        }
        for (uint16_t i = n; i > 0; i--)
            put_id(q, q->scratch[i - 1]);
    }
    return 0;
}

int32_t vx_drvq_take_used(struct vx_drvq *q, uint16_t idx, uint32_t *ids, uint32_t *lens)
{
    uint16_t n = (uint16_t)(idx - q->last_used);
    if (n > q->in_flight) {
        q->err_a = n;
        q->err_b = q->in_flight;
        return -1;
    }
    for (uint16_t k = 0; k < n; k++) {
        const uint32_t *e = used_elem(q, (uint16_t)(q->last_used + k));
        uint32_t hid = e[0], len = e[1];
        int rc = release_head(q, hid, k);
        if (rc < 0) {
            q->last_used = (uint16_t)(q->last_used + k);
            return rc;
        }
        if (ids) {
            ids[k] = hid;
            lens[k] = len;
        }
    }
    q->last_used = idx;
    q->reaped += n;
    return n;
}

/* after reaping: move used_event along (EVENT_IDX, interrupts wanted) before used->idx is
 * read again */
static inline void rearm(struct vx_drvq *q, uint32_t moved)
{
    if ((q->flags & VX_DRVQ_EVENT_IDX) && q->irq_enabled) {
        __atomic_store_n(used_event(q), q->last_used, __ATOMIC_RELAXED);
        if (moved)
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
}

int32_t vx_drvq_reap(struct vx_drvq *q)
{
    uint16_t idx = __atomic_load_n(used_idx(q), __ATOMIC_ACQUIRE);
    int32_t n = vx_drvq_take_used(q, idx, NULL, NULL);
    if (n >= 0)
        rearm(q, (uint32_t)n);
    return n;
}

uint32_t vx_drvq_publish(struct vx_drvq *q)
{
    uint16_t old = q->published, new_idx = q->avail_idx;
    if (old == new_idx)
        return 0;
    __atomic_store_n(avail_idx(q), new_idx, __ATOMIC_RELEASE);
    q->published = new_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int kick;
    if (q->flags & VX_DRVQ_EVENT_IDX)
        kick = need_event(__atomic_load_n(avail_event(q), __ATOMIC_RELAXED), new_idx, old);
    else
        kick = !(__atomic_load_n(used_flags(q), __ATOMIC_RELAXED) & USED_F_NO_NOTIFY);
    if (kick)
        q->kicks++;
    return (uint32_t)kick;
}

int32_t vx_drvq_tx_frames(struct vx_drvq *q, uint8_t *bufs, uint64_t bufs_addr, uint32_t buf_size,
                          uint32_t hdr_len, const uint8_t *data, const uint32_t *lens, uint32_t n)
{
    struct drvq_desc *desc = q->desc;
    uint64_t off = 0;
    uint32_t done = 0;
    if (buf_size == 0)
        return -4;
    for (; done < n; done++) {
        uint64_t total = (uint64_t)hdr_len + lens[done];
        uint32_t nbuf = (uint32_t)((total + buf_size - 1) / buf_size);
        if (nbuf > q->size) {
            q->err_a = lens[done];
            q->err_b = nbuf;
            return -4;
        }
        if (nbuf > q->num_free)
            break;
        uint16_t head = take_id(q), cur = head;
        uint64_t pos = 0; /* bytes of header + frame written so far */
        const uint8_t *src = data + off;
        for (uint32_t b = 0; b < nbuf; b++) {
            uint8_t *dst = bufs + (uint64_t)cur * buf_size;
            uint32_t chunk = (uint32_t)(total - pos < buf_size ? total - pos : buf_size);
            uint32_t w = 0;
            if (pos < hdr_len) {
                uint32_t h = (uint32_t)(hdr_len - pos) < chunk ? (uint32_t)(hdr_len - pos) : chunk;
                memset(dst, 0, h);
                w = h;
            }
            memcpy(dst + w, src, chunk - w);
            src += chunk - w;
            pos += chunk;
            uint16_t nxt = b + 1 < nbuf ? take_id(q) : 0;
            desc[cur].addr = bufs_addr + (uint64_t)cur * buf_size;
            desc[cur].len = chunk;
            desc[cur].flags = b + 1 < nbuf ? DESC_F_NEXT : 0;
            desc[cur].next = nxt;
            q->chain_next[cur] = nxt;
            cur = nxt;
        }
        push_head(q, head, (uint16_t)nbuf);
        off += lens[done];
    }
    q->posted += done;
    return (int32_t)done;
}

uint32_t vx_drvq_rx_post(struct vx_drvq *q, uint64_t bufs_addr, uint32_t buf_size)
{
    struct drvq_desc *desc = q->desc;
    uint32_t n = 0;
    while (q->num_free) {
        uint16_t id = take_id(q);
        desc[id].addr = bufs_addr + (uint64_t)id * buf_size;
        desc[id].len = buf_size;
        desc[id].flags = DESC_F_WRITE;
        desc[id].next = 0;
        push_head(q, id, 1);
        n++;
    }
    return n;
}

int32_t vx_drvq_rx_frames(struct vx_drvq *q, const uint8_t *bufs, uint32_t buf_size,
                          uint32_t hdr_len, uint32_t mrg_rxbuf, uint8_t *out, uint32_t out_cap,
                          uint32_t *lens, uint32_t max_frames)
{
    uint16_t idx = __atomic_load_n(used_idx(q), __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(idx - q->last_used);
    uint32_t frames = 0, used_out = 0;
    uint16_t k = 0;
    int32_t rc = 0;
    if (n > q->in_flight) {
        q->err_a = n;
        q->err_b = q->in_flight;
        return -1;
    }
    while (k < n && frames < max_frames) {
        const uint32_t *e = used_elem(q, (uint16_t)(q->last_used + k));
        uint32_t hid = e[0], len = e[1];
        if (hid >= q->size || q->chain_len[hid] == 0) {
            q->err_a = hid;
            rc = -3;
            break;
        }
        if (len > buf_size || len < hdr_len) {
            q->err_a = len;
            q->err_b = hid;
            rc = len > buf_size ? -4 : -5;
            break;
        }
        const uint8_t *first = bufs + (uint64_t)hid * buf_size;
        uint32_t nbufs = 1;
        if (mrg_rxbuf) {
            nbufs = (uint32_t)first[NET_HDR_NUM_BUFFERS] | (uint32_t)first[NET_HDR_NUM_BUFFERS + 1] << 8;
            if (nbufs == 0 || nbufs > q->size) {
                q->err_a = nbufs;
                rc = -6;
                break;
            }
        }
        if ((uint32_t)k + nbufs > n)
            break; /* the rest of this frame is not published yet: next call */
        /* the frame's length, every buffer checked before anything is copied */
        uint64_t total = len - hdr_len;
        for (uint32_t b = 1; b < nbufs; b++) {
            const uint32_t *f = used_elem(q, (uint16_t)(q->last_used + k + b));
            if (f[0] >= q->size || q->chain_len[f[0]] == 0 || f[1] > buf_size) {
                q->err_a = f[1] > buf_size ? f[1] : f[0];
                q->err_b = f[0];
                rc = f[1] > buf_size ? -4 : -3;
                break;
            }
            total += f[1];
        }
        if (rc < 0)
            break;
        if (used_out + total > out_cap)
            break; /* no room left in `out`: next call */
        for (uint32_t b = 0; b < nbufs; b++) {
            const uint32_t *f = used_elem(q, (uint16_t)(q->last_used + k));
            uint32_t id = f[0], l = f[1], skip = b == 0 ? hdr_len : 0;
            memcpy(out + used_out, bufs + (uint64_t)id * buf_size + skip, l - skip);
            used_out += l - skip;
            rc = release_head(q, id, k);
            if (rc < 0)
                break;
            k++;
        }
        if (rc < 0)
            break;
        lens[frames++] = (uint32_t)total;
    }
    q->last_used = (uint16_t)(q->last_used + k);
    q->reaped += k;
    if (rc < 0)
        return rc;
    rearm(q, k);
    return (int32_t)frames;
}
