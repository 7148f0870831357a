/*
 * vx_switch.c - L2 learning switch: FDB (lock-free open addressing), ports of RX queues, and the
 * switch TX operation (learn, look up, deliver or flood; RX queues written under their lock).
 *
 * Threads: vx_switch_tx from any worker owning a TX queue; add/remove port from the control
 * thread (remove waits for senders inside a delivery to that port).
 */
#include "vx_tx.h"

#define VX_ETH_ALEN 6          /* bytes of a MAC address */
#define VX_ETH_HLEN 14         /* destination MAC, source MAC, EtherType */
#define VX_ETH_GROUP_BIT 0x01  /* I/G bit of a MAC's first byte: multicast or broadcast */
#define VX_ETH_TYPE_OFF 12      /* EtherType, big endian */
#define VX_ETHERTYPE_IPV4 0x0800
/* IPv4 header (RFC 791) right after the Ethernet header; the flow hash reads only a header
 * without options (IHL 5: 20 bytes) and, for TCP and UDP, the two ports after it */
#define VX_IP_OFF VX_ETH_HLEN
#define VX_IP_HLEN 20
#define VX_IP_IHL_MIN 5         /* IHL (low nibble of the first byte) of a header without options */
#define VX_IP_PROTO_OFF (VX_IP_OFF + 9)
#define VX_IP_ADDRS_OFF (VX_IP_OFF + 12) /* source and destination address, 8 bytes */
#define VX_IP_PROTO_TCP 6
#define VX_IP_PROTO_UDP 17
#define VX_L4_PORTS_OFF (VX_IP_OFF + VX_IP_HLEN) /* source and destination port, 4 bytes */
/* bytes of a frame the flow hash reads: Ethernet + an IPv4 header without options + L4 ports */
#define VX_FLOW_HDR_LEN (VX_L4_PORTS_OFF + 4)

/* hashing constants: 2^64 / golden ratio (Fibonacci hashing), two xxHash64 primes and the
 * splitmix64 multiplier; any odd constants with well-mixed bits would do */
#define HASH_GOLDEN64 0x9E3779B97F4A7C15ull
#define HASH_PRIME64_2 0xC2B2AE3D27D4EB4Full
#define HASH_PRIME64_5 0x165667B19E3779F9ull
#define HASH_MIX64 0xBF58476D1CE4E5B9ull
#define HASH_MIX_SHIFT 29

struct sw_port {
    int active;
    uint32_t nrxq;
    uint32_t rr;
    struct vx_vq *rxq[VX_SWITCH_MAX_RXQ];
};

struct vx_switch {
    uint64_t fdb[VX_SWITCH_FDB_SIZE]; /* fdb_entry(mac, port); 0 empty; FDB_TOMB removed */
    struct sw_port ports[VX_SWITCH_MAX_PORTS];
    int admin_lock;
    struct vx_switch_stats stats;
};

#define FDB_TOMB UINT64_MAX /* a removed entry: lookups probe past it, learning may not reuse it */
#define FDB_PROBE 32        /* slots probed from an entry's hash before giving up */
#define FDB_PORT_BITS 16    /* an entry: the MAC in the high 48 bits, port + 1 in the low 16 */
#define FDB_PORT_MASK ((1ull << FDB_PORT_BITS) - 1)
#define FDB_SIZE_BITS 13    /* log2(VX_SWITCH_FDB_SIZE) */
_Static_assert((1u << FDB_SIZE_BITS) == VX_SWITCH_FDB_SIZE, "FDB_SIZE_BITS");

static inline uint64_t fdb_entry(uint64_t mac, int port)
{
    return (mac << FDB_PORT_BITS) | (uint64_t)(port + 1);
}

static inline uint64_t fdb_mac(uint64_t e) { return e >> FDB_PORT_BITS; }
static inline int fdb_port(uint64_t e) { return (int)(e & FDB_PORT_MASK) - 1; }

static inline uint64_t mac48(const uint8_t *m)
{
    return ((uint64_t)m[0] << 40) | ((uint64_t)m[1] << 32) | ((uint64_t)m[2] << 24) |
           ((uint64_t)m[3] << 16) | ((uint64_t)m[4] << 8) | (uint64_t)m[5];
}

static inline uint32_t fdb_hash(uint64_t mac)
{
    return (uint32_t)((mac * HASH_GOLDEN64) >> (64 - FDB_SIZE_BITS)) & (VX_SWITCH_FDB_SIZE - 1);
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
        if (e != FDB_TOMB && fdb_mac(e) == mac)
            return fdb_port(e);
    }
    return -1;
}

static void fdb_learn(struct vx_switch *sw, uint64_t mac, int port)
{
    uint32_t h = fdb_hash(mac);
    uint64_t val = fdb_entry(mac, port);
    for (uint32_t i = 0; i < FDB_PROBE; i++) {
        uint64_t *slot = &sw->fdb[(h + i) & (VX_SWITCH_FDB_SIZE - 1)];
        uint64_t e = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        if (e == val)
            return;
        if (e != 0 && e != FDB_TOMB && fdb_mac(e) == mac) {
            __atomic_store_n(slot, val, __ATOMIC_RELEASE);
            __atomic_fetch_add(&sw->stats.moved, 1, __ATOMIC_RELAXED);
            return;
        }
        if (e == 0) {
            if (__atomic_compare_exchange_n(slot, &e, val, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                __atomic_fetch_add(&sw->stats.learned, 1, __ATOMIC_RELAXED);
                return;
            }
            if (fdb_mac(e) == mac) /* somebody learned it concurrently */
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
        for (uint32_t i = 0; i < nrxq; i++) {
            sp->rxq[i] = rxqs[i];
            rxqs[i]->irq_shared = 1; /* written by every port's worker: never moderated */
        }
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
        if (e != 0 && e != FDB_TOMB && fdb_port(e) == port)
            __atomic_compare_exchange_n(&sw->fdb[i], &e, FDB_TOMB, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED);
    }
    return 0;
}

/* the hash of a frame's flow (its first n <= VX_FLOW_HDR_LEN bytes: MACs, and for IPv4 the
 * addresses and the TCP / UDP ports): picks the RX queue of a multiqueue port */
static inline uint32_t flow_hash(const uint8_t *h, uint32_t n)
{
    uint64_t x = mac48(h) * HASH_GOLDEN64 ^ mac48(h + VX_ETH_ALEN);
    const uint16_t type = (uint16_t)(h[VX_ETH_TYPE_OFF] << 8 | h[VX_ETH_TYPE_OFF + 1]);
    if (n >= VX_L4_PORTS_OFF && type == VX_ETHERTYPE_IPV4) {
        uint32_t ips[2];
        memcpy(ips, h + VX_IP_ADDRS_OFF, sizeof(ips));
        x ^= ((uint64_t)ips[0] << 32 | ips[1]) * HASH_PRIME64_2;
        const uint8_t proto = h[VX_IP_PROTO_OFF];
        if (n >= VX_FLOW_HDR_LEN && (h[VX_IP_OFF] & 0x0F) == VX_IP_IHL_MIN &&
            (proto == VX_IP_PROTO_TCP || proto == VX_IP_PROTO_UDP)) {
            uint32_t ports;
            memcpy(&ports, h + VX_L4_PORTS_OFF, sizeof(ports));
            x ^= (uint64_t)ports * HASH_PRIME64_5;
        }
    }
    x ^= x >> HASH_MIX_SHIFT;
    x *= HASH_MIX64;
    return (uint32_t)(x >> 32);
}

/* RX queues written in this call, signalled once at its end (or before it busy-polls) */
#define VX_SWITCH_TOUCHED_MAX 64

struct sw_touched {
    struct vx_vq *rx;
    int port;
};

struct sw_ctx {
    struct vx_switch *sw;
    int port;
    uint32_t ntouched;
    struct sw_touched touched[VX_SWITCH_TOUCHED_MAX];
};

/* deliver one TX chain to one port; returns 1 if delivered */
static int sw_deliver(struct sw_ctx *x, const struct vx_vq *tx, const struct tx_item *it,
                      int port, uint32_t fhash, const uint8_t *thdr)
{
    struct vx_switch *sw = x->sw;
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
        struct vx_seg one;
        struct rx_src src;
        tx_item_frame(tx, it, &one, &src.cur);
        src.len = it->len;
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
        for (i = 0; i < x->ntouched; i++)
            if (x->touched[i].rx == rx)
                break;
        if (i == x->ntouched) {
            if (x->ntouched < VX_SWITCH_TOUCHED_MAX) {
                x->touched[x->ntouched].rx = rx;
                x->touched[x->ntouched].port = port;
                x->ntouched++;
            } else { /* too many destinations in one batch: signal now */
                vq_lock(rx);
                if (__atomic_load_n(&sp->active, __ATOMIC_ACQUIRE))
                    vx_vq_notify_decide(rx);
                vq_unlock(rx);
            }
        }
    }
    return r;
}

/* publish every RX queue written (of a port still there) */
static void sw_signal_touched(void *ctx)
{
    struct sw_ctx *x = ctx;
    for (uint32_t i = 0; i < x->ntouched; i++) {
        struct vx_vq *rx = x->touched[i].rx;
        vq_lock(rx);
        if (__atomic_load_n(&x->sw->ports[x->touched[i].port].active, __ATOMIC_ACQUIRE))
            vx_vq_notify_decide(rx);
        vq_unlock(rx);
    }
    x->ntouched = 0;
}

static inline int sw_precheck(void *ctx, struct vx_vq *tx)
{
    const struct sw_ctx *x = ctx;
    if (unlikely(tx->broken))
        return -1;
    return x->port >= 0 && x->port < VX_SWITCH_MAX_PORTS ? 1 : 0;
}

/* learn the source, look the destination up, deliver (unicast) or flood */
static inline int sw_chain(void *ctx, struct vx_vq *tx, const struct tx_item *it)
{
    struct sw_ctx *x = ctx;
    struct vx_switch *sw = x->sw;
    const int port = x->port;
    uint8_t thdr[VX_NET_HDR_BASE_LEN];
    uint8_t eth[VX_FLOW_HDR_LEN]; /* one copy: the guest may rewrite its buffer meanwhile */
    uint32_t elen;
    tx_item_header(tx, it, thdr);
    if (likely(it->kind == TX_FLAT)) {
        elen = it->len < sizeof(eth) ? it->len : (uint32_t)sizeof(eth);
        memcpy(eth, it->frame, elen);
    } else {
        struct vx_seg one;
        struct cur c;
        tx_item_frame(tx, it, &one, &c);
        elen = (uint32_t)cur_read(&c, eth, sizeof(eth));
    }
    const uint8_t *dst = eth, *srcm = eth + VX_ETH_ALEN;
    if (!(srcm[0] & VX_ETH_GROUP_BIT) && mac48(srcm) != 0)
        fdb_learn(sw, mac48(srcm), port);
    uint32_t fh = flow_hash(eth, elen);
    int delivered = 0;
    int dport = (dst[0] & VX_ETH_GROUP_BIT) ? -1 : fdb_find(sw, mac48(dst));
    if (dport >= 0) {
        if (dport == port) {
            __atomic_fetch_add(&sw->stats.hairpin, 1, __ATOMIC_RELAXED);
        } else {
            __atomic_fetch_add(&sw->stats.unicast, 1, __ATOMIC_RELAXED);
            delivered += sw_deliver(x, tx, it, dport, fh, thdr);
        }
    } else {
        __atomic_fetch_add(&sw->stats.flooded, 1, __ATOMIC_RELAXED);
        for (int p = 0; p < VX_SWITCH_MAX_PORTS; p++) {
            if (p == port || !__atomic_load_n(&sw->ports[p].active, __ATOMIC_RELAXED))
                continue;
            delivered += sw_deliver(x, tx, it, p, fh, thdr);
        }
    }
    if (!delivered)
        tx->stats.dropped++;
    return TX_SENT; /* counted as sent (packets, bytes) even when no port took it */
}

/* frames of at least an Ethernet header, at most VX_MAX_FRAME_LEN */
static const struct tx_action SWITCH = {
    .stage = VX_TX_STAGE_MAX,
    .min_frame = VX_ETH_HLEN,
    .max_frame = VX_MAX_FRAME_LEN,
    .precheck = sw_precheck,
    .chain = sw_chain,
    .before_wait = sw_signal_touched,
    .end = sw_signal_touched,
};

int vx_switch_tx(struct vx_switch *sw, int port, struct vx_vq *tx, uint32_t max_pkts,
                 uint64_t max_bytes, uint64_t spin_ns)
{
    struct sw_ctx ctx;
    ctx.sw = sw;
    ctx.port = port;
    ctx.ntouched = 0;
    return tx_run(tx, max_pkts, max_bytes, spin_ns, &SWITCH, &ctx);
}
