/*
 * vx_net_rx.c - the net RX direction: frames delivered into RX chains (header prepended, mergeable
 * buffers), from a constant frame (rx_fill), from an fd (rx_from_fd) and from TX chains of
 * another queue (rx_deliver, used by vx_net_tx.c and vx_switch.c).
 *
 * Threads: the RX queue's owning worker; rx_deliver for fwd, the switch and a shared ring's two
 * writers (rx_fill_shared, echo_shared): under the RX lock.
 */
#include "vx_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* RX delivery: header + frame from a source cursor into one or more RX chains                  */

/*
 * The common RX chain: one writable descriptor (no NEXT, not indirect) of at least `total` bytes
 * inside guest memory. Its buffer's host pointer, or NULL for any other chain (the general path
 * then walks it and applies every check and error). One fetch of the descriptor; nothing acted
 * on unless it qualifies.
 */
static inline uint8_t *rx_one_buffer(struct vx_vq *rx, uint16_t head, uint64_t total)
{
    /* with ACCESS_PLATFORM descriptor addresses are IOVAs: only the walk translates them
     * (through the IOTLB, permissions checked), so the direct path is for guest physical ones */
    if (unlikely(head >= rx->size || rx->iotlb))
        return NULL;
    struct vring_desc d;
    memcpy(&d, &rx->desc[head], sizeof(d));
    if (d.flags != VRING_DESC_F_WRITE || d.len < total || d.len > VX_MAX_BUF_LEN)
        return NULL;
    return gpa_to_host(rx, d.addr, d.len);
}

/*
 * Deliver one frame. Returns 1 delivered, 0 dropped (counted), -1 rx broken.
 * Caller holds the rx lock if the queue is shared.
 */
int rx_deliver(struct vx_vq *rx, struct rx_src *src)
{
    uint8_t hdr[VX_MAX_HDR_LEN];
    uint8_t prefix[VX_MAC_PAIR_LEN];
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
        memcpy(hdr, src->hdr, hlen < VX_NET_HDR_BASE_LEN ? hlen : VX_NET_HDR_BASE_LEN);
    if (hlen >= VX_NET_HDR_MRG_LEN) { /* num_buffers = 1; mergeable frames rewrite it */
        hdr[VX_NET_HDR_NUM_BUFFERS] = 1;
        hdr[VX_NET_HDR_NUM_BUFFERS + 1] = 0;
    }
    if (src->swap_mac && src->len >= VX_MAC_PAIR_LEN) {
        const uint32_t alen = VX_MAC_PAIR_LEN / 2;
        uint8_t m[VX_MAC_PAIR_LEN];
        cur_read(&src->cur, m, VX_MAC_PAIR_LEN);
        memcpy(prefix, m + alen, alen);
        memcpy(prefix + alen, m, alen);
        plen = VX_MAC_PAIR_LEN;
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

    if (total) { /* one buffer holds it all: with or without MRG_RXBUF, num_buffers = 1 */
        uint16_t head = rx->avail->ring[rx->last_avail_idx & rx->mask];
        uint8_t *p = rx_one_buffer(rx, head, total);
        if (p) {
            memcpy(p, hdr, hlen);
            memcpy(p + hlen, prefix, plen);
            cur_read(&src->cur, p + hlen + plen, src->len - plen);
            rx->last_avail_idx++;
            vq_push(rx, head, (uint32_t)total);
            rx->stats.packets++;
            rx->stats.bytes += src->len;
            return 1;
        }
    }

    if (!(rx->flags & VX_F_MRG_RXBUF)) {
        uint16_t head = rx->avail->ring[rx->last_avail_idx & rx->mask];
        int w = vq_walk(rx, head);
        if (unlikely(w)) {
            if (w < 0)
                return -1;
            rx->stats.ring_full++; /* IOTLB miss: the chain stays, the frame is dropped */
            return 0;
        }
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
        int w = vq_walk(rx, head);
        if (unlikely(w)) {
            if (w < 0)
                return -1;
            /* IOTLB miss: every chain of this frame goes back, the frame is dropped */
            rx->last_avail_idx = start_avail;
            rx->nshadow = start_shadow;
            rx->stats.chains -= nbufs;
            rx->stats.ring_full++;
            return 0;
        }
        if (unlikely(rx->nread))
            return vq_break(rx, "RX chain %u has device-readable buffers", head);
        struct cur d;
        cur_init(&d, rx->segs, rx->nwrite);
        if (nbufs == 0 && hlen >= VX_NET_HDR_MRG_LEN) { /* where num_buffers goes */
            nb0 = cur_at(rx->segs, rx->nwrite, VX_NET_HDR_NUM_BUFFERS);
            nb1 = cur_at(rx->segs, rx->nwrite, VX_NET_HDR_NUM_BUFFERS + 1);
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

/* ------------------------------------------------------------------------------------------ */
/* rx_fill: a constant frame                                                                    */

/* chains looked up (and their buffers prefetched) before the first of them is written */
#define VX_RX_FILL_BATCH 16
/* used entries rx_fill publishes at once at most (one used->idx store): the driver consumes
 * (and refills) the first frames of a long call while the call writes the next ones, instead of
 * waiting for all of them; a publication costs one store. The interrupt decision still comes
 * once per call (and before a busy-poll wait), over everything published since the last one. */
#define VX_RX_FILL_PUBLISH 32

/*
 * The bytes every chain of one rx_fill call receives: the net header (zero; num_buffers = 1 when
 * the header has it) then the frame, built once per call in rx->scratch. Returns their count, or
 * 0 when they do not fit (every frame then goes through rx_deliver).
 */
static uint32_t rx_fill_image(struct vx_vq *rx, const uint8_t *frame, uint32_t len)
{
    const uint32_t hlen = rx->hdr_len;
    uint64_t total = (uint64_t)hlen + len;
    if (total == 0 || total > VX_SCRATCH_LEN)
        return 0;
    memset(rx->scratch, 0, hlen);
    if (hlen >= VX_NET_HDR_MRG_LEN)
        rx->scratch[VX_NET_HDR_NUM_BUFFERS] = 1;
    memcpy(rx->scratch + hlen, frame, len);
    return (uint32_t)total;
}

/*
 * The common chain, one writable descriptor that holds the whole image, without the general
 * walk and cursors: look up to VX_RX_FILL_BATCH chains up first (one fetch of each descriptor,
 * prefetching the buffers to be written), then copy the image into each and queue its used
 * entry. With or without MRG_RXBUF such a chain carries the frame alone (num_buffers = 1, as
 * rx_deliver writes it). Stops before the first chain that is anything else (more descriptors,
 * indirect, too short, outside guest memory, a bogus head): rx_deliver takes that one and
 * applies every check and error of the general path. Returns the frames delivered (<= want),
 * -1 when avail->idx is bogus.
 */
static int rx_fill_simple(struct vx_vq *rx, const uint8_t *img, uint32_t total, uint32_t len,
                          uint32_t want)
{
    uint8_t *dst[VX_RX_FILL_BATCH];
    uint16_t heads[VX_RX_FILL_BATCH];
    uint32_t done = 0;
    int refreshed = 0;
    while (done < want) {
        uint32_t n = (uint16_t)(rx->avail_idx - rx->last_avail_idx);
        if (n == 0) {
            if (refreshed) /* once per call: then rx_deliver finds the ring empty and counts it */
                break;
            int a = vq_avail(rx);
            if (a < 0)
                return -1;
            refreshed = 1;
            if (a == 0)
                break;
            n = (uint32_t)a;
        }
        uint32_t k = want - done;
        if (k > n)
            k = n;
        if (k > VX_RX_FILL_BATCH)
            k = VX_RX_FILL_BATCH;
        if (k > rx->size)
            k = rx->size;
        if (rx->nshadow + k > rx->size) /* the shadow holds 2 * size: as vq_push would */
            vq_flush(rx);
        uint32_t m = 0;
        for (; m < k; m++) {
            uint16_t head = rx->avail->ring[(uint16_t)(rx->last_avail_idx + m) & rx->mask];
            uint8_t *p = rx_one_buffer(rx, head, total);
            if (!p)
                break;
            __builtin_prefetch(p, 1);
            __builtin_prefetch(p + total - 1, 1);
            dst[m] = p;
            heads[m] = head;
        }
        struct vring_used_elem *u = rx->shadow + rx->nshadow;
        for (uint32_t i = 0; i < m; i++) {
            memcpy(dst[i], img, total);
            u[i].id = heads[i];
            u[i].len = total;
        }
        rx->nshadow += m;
        rx->last_avail_idx = (uint16_t)(rx->last_avail_idx + m);
        done += m;
        if (rx->nshadow >= VX_RX_FILL_PUBLISH)
            vq_flush(rx);
        if (m < k)
            break;
    }
    rx->stats.chains += done;
    rx->stats.packets += done;
    rx->stats.bytes += (uint64_t)done * len;
    return (int)done;
}

/*
 * rx_fill itself. locked (a constant in each of the two instances): the ring has another writer
 * (echo_tx), so every step that reads avail, consumes chains, writes used entries, publishes or
 * decides the interrupt holds rx's lock; the lock is dropped for the busy-poll wait. The image
 * in rx->scratch is this op's alone (no other writer uses the RX ring's scratch buffer).
 */
static inline __attribute__((always_inline)) int
rx_fill_run(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
            uint64_t spin_ns, const int locked)
{
    if (unlikely(rx->broken))
        return -1;
    if (unlikely(!rx->started))
        return 0;
    if (max_pkts > VX_CALL_MAX)
        max_pkts = VX_CALL_MAX;
    struct vx_seg seg = {(uint8_t *)frame, len};
    const uint32_t total = max_pkts ? rx_fill_image(rx, frame, len) : 0;
    uint64_t spin_left = spin_ns;
    int done = 0;
    if (locked)
        vq_lock(rx);
    while ((uint32_t)done < max_pkts) {
        if (total) {
            int k = rx_fill_simple(rx, rx->scratch, total, len, max_pkts - (uint32_t)done);
            if (k < 0)
                goto broken;
            done += k;
            if ((uint32_t)done >= max_pkts)
                break;
        }
        struct rx_src src;
        cur_init(&src.cur, &seg, len ? 1 : 0);
        src.len = len;
        src.hdr = NULL;
        src.swap_mac = 0;
        int r = rx_deliver(rx, &src);
        if (r < 0)
            goto broken;
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
        if (vx_vq_notify_decide(rx) < 0) /* publish and interrupt before we wait */
            goto broken;
        const uint64_t until = rx->irq_deadline;
        if (locked)
            vq_unlock(rx); /* the other writer must not wait on our spin */
        int s = vq_spin(rx, &spin_left, until);
        if (locked)
            vq_lock(rx);
        if (s < 0)
            goto broken;
        if (s == 0)
            break;
        rx->stats.ring_full--; /* the wait found buffers: nothing was refused after all */
    }
    if (vx_vq_notify_decide(rx) < 0)
        goto broken;
    if (locked)
        vq_unlock(rx);
    return done;
broken:
    if (locked)
        vq_unlock(rx);
    return -1;
}

int vx_net_rx_fill(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
                   uint64_t spin_ns)
{
    return rx_fill_run(rx, frame, len, max_pkts, spin_ns, 0);
}

int rx_fill_shared(struct vx_vq *rx, const uint8_t *frame, uint32_t len, uint32_t max_pkts,
                   uint64_t spin_ns)
{
    return rx_fill_run(rx, frame, len, max_pkts, spin_ns, 1);
}

int vx_net_rx_from_fd(struct vx_vq *rx, int fd, uint32_t max_pkts, uint64_t spin_ns)
{
    if (unlikely(rx->broken))
        return -1;
    if (unlikely(!rx->started))
        return 0;
    if (max_pkts > VX_CALL_MAX)
        max_pkts = VX_CALL_MAX;
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
                if (vx_vq_notify_decide(rx) < 0)
                    return -1;
                a = vq_spin(rx, &spin_left, rx->irq_deadline);
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
            if (unlikely(rx->iotlb)) {
                /* every buffer a frame may take must be mapped before the frame leaves the fd */
                int p = vq_iotlb_probe(rx, (uint64_t)hlen + VX_MAX_FRAME_LEN);
                if (p) {
                    if (p < 0)
                        return -1;
                    break; /* IOTLB miss: the data waits in the fd until the update */
                }
            }
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
        int w = vq_walk(rx, head);
        if (unlikely(w)) {
            if (w < 0)
                return -1;
            break; /* IOTLB miss: the chain stays in the ring, the data in the fd */
        }
        if (unlikely(rx->nread))
            return vq_break(rx, "RX chain %u has device-readable buffers", head);
        uint32_t k = rx->nwrite < VX_IOV_MAX ? rx->nwrite : VX_IOV_MAX;
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
        if (hlen >= VX_NET_HDR_MRG_LEN) { /* num_buffers = 1 */
            uint8_t *p0 = cur_at(rx->segs, k, VX_NET_HDR_NUM_BUFFERS);
            uint8_t *p1 = cur_at(rx->segs, k, VX_NET_HDR_NUM_BUFFERS + 1);
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
    if (vx_vq_notify_decide(rx) < 0)
        return -1;
    return done;
}

