/*
 * vx_net_rx.c - the net RX direction: frames delivered into RX chains (header prepended, mergeable
 * buffers), from a constant frame (rx_fill), from an fd (rx_from_fd) and from TX chains of
 * another queue (rx_deliver, used by vx_net_tx.c and vx_switch.c).
 *
 * Threads: the RX queue's owning worker; rx_deliver for fwd and the switch: under the RX lock.
 */
#include "vx_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* RX delivery: header + frame from a source cursor into one or more RX chains                  */

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

    /* mergeable buffers: header + frame spread over as many chains as needed */
    if (rx->nshadow >= rx->size)
        vq_flush(rx);
    uint16_t start_avail = rx->last_avail_idx;
    uint32_t start_shadow = rx->nshadow;
    uint8_t *nb0 = NULL, *nb1 = NULL;
    uint32_t nbufs = 0;
    uint64_t left = total;
    uint32_t hdr_done = 0, pre_done = 0;
    while (left) {
        int a = (uint16_t)(rx->avail_idx - rx->last_avail_idx);
        if (a == 0) {
            a = vq_avail(rx);
            if (a < 0)
                return -1;
        }
        if (a == 0 || nbufs >= rx->size) {
            {
                rx->last_avail_idx = start_avail;
                rx->nshadow = start_shadow;
                rx->stats.chains -= nbufs;
                rx->stats.ring_full++;
                return 0;
            }
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
        if (vx_vq_notify_decide(rx) < 0) /* publish and interrupt before we wait */
            return -1;
        int s = vq_spin(rx, &spin_left);
        if (s < 0)
            return -1;
        if (s == 0)
            break;
        rx->stats.ring_full--; /* the wait found buffers: nothing was refused after all */
    }
    if (vx_vq_notify_decide(rx) < 0)
        return -1;
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
                if (vx_vq_notify_decide(rx) < 0)
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

