/*
 * fuzz_tx.c - the TX paths: sink, echo (to the device's own RX), fwd (to another RX under its
 * lock), to-fd (writev into a non-blocking SOCK_SEQPACKET pair, and into a bad fd), and the L2
 * switch (a port of one RX queue sending to a port of two, flooding and learning).
 *
 * Each step also sets the TX ring's frame prefetch hint (nta, t0, none) from its op byte.
 * Queues: 0 TX, 1 RX of the same device, 2 and 3 the RX queues of the other switch port; all in
 * one fuzzed guest memory (see fuzz_common.h), so RX buffers may alias the TX rings.
 */
#include "fuzz_common.h"

#include <sys/socket.h>

static int fz_sock[2] = {-1, -1};

static void drain(void)
{
    uint8_t buf[4096];
    while (read(fz_sock[1], buf, sizeof(buf)) > 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fz_sock[0] < 0 &&
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fz_sock) < 0)
        abort();
    struct fz_guest g;
    if (fz_setup(&g, data, size, 4) < 0) {
        fz_teardown(&g);
        return 0;
    }
    struct vx_vq *tx = g.q[0].vq, *rx = g.q[1].vq;
    struct vx_switch *sw = vx_switch_new();
    if (!sw)
        abort();
    struct vx_vq *own[1] = {rx}, *other[2] = {g.q[2].vq, g.q[3].vq};
    int pa = vx_switch_add_port(sw, own, 1);
    int pb = vx_switch_add_port(sw, other, 2);
    if (pa < 0 || pb < 0)
        abort();
    for (unsigned s = 0; s < 8; s++) {
        uint8_t op = fz_u8(&g.steps);
        uint8_t arg = fz_u8(&g.steps);
        fz_trace(s, op, arg);
        uint32_t pkts = arg % 16 ? arg % 16 : 0xFFFFFFFFu;
        uint64_t bytes = arg & 0x80 ? 100u * (arg & 0x7F) : ~0ull;
        int r = 0;
        unsigned peer = 1;
        vx_vq_set_tx_prefetch(tx, (uint32_t)(op / 9) % 3); /* the frame prefetch hint */
        switch (op % 9) {
        case 0:
            r = vx_net_tx_sink(tx, pkts, bytes, 0);
            break;
        case 1:
            r = vx_net_echo(tx, rx, pkts, bytes, 0);
            break;
        case 2:
            r = vx_net_fwd(tx, g.q[2].vq, pkts, bytes, 0);
            peer = 2;
            break;
        case 3:
            r = vx_net_tx_to_fd(tx, fz_sock[0], pkts, bytes, 0);
            if (arg & 0x40)
                drain(); /* else the socket fills up: EAGAIN leaves chains in the ring */
            break;
        case 4:
            r = vx_net_tx_to_fd(tx, -1, pkts, bytes, 0); /* EBADF: dropped, counted */
            break;
        case 5:
            r = vx_switch_tx(sw, pa, tx, pkts, bytes, 0);
            break;
        case 6:
            fz_bump_avail(&g, arg & 3, (uint8_t)(arg >> 2));
            break;
        case 7:
            r = vx_switch_tx(sw, arg & 0x80 ? -1 : 70, tx, pkts, bytes, 0); /* bad port */
            if (r != 0 && r != -1)
                fz_abort("switch_tx on a bad port did work", 0, (unsigned)r, 0);
            break;
        case 8:
            if (arg & 1)
                vx_switch_remove_port(sw, pb);
            else
                r = vx_net_echo(tx, rx, pkts, bytes, 1000); /* busy-poll path, <= 1 us */
            break;
        }
        fz_check_result(&g, 0, peer, r);
    }
    drain();
    vx_switch_free(sw);
    fz_teardown(&g);
    return 0;
}
