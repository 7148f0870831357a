/*
 * vx_switch.c - L2 learning switch: FDB (lock-free open addressing), ports of RX queues, and the
 * switch TX operation (learn, look up, deliver or flood; RX queues written under their lock).
 *
 * Threads: vx_switch_tx from any worker owning a TX queue; add/remove port from the control
 * thread (remove waits for senders inside a delivery to that port).
 */
#include "vx_internal.h"

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

