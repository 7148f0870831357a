/*
 * fuzz_rx.c - the RX paths: rx_fill with and without MRG_RXBUF (frames spread over chains,
 * num_buffers in the header, short and scattered buffers, rollback when chains run out) and
 * rx_from_fd (readv into the chain, or through the bounce buffer under MRG_RXBUF) from a
 * SOCK_SEQPACKET pair the harness fills with packets cut from the input.
 *
 * Queue 0 is the RX queue; the frame bytes come from the input after the header (so they are
 * also the guest memory's first bytes: a frame may carry descriptors into an aliasing buffer).
 */
#include "fuzz_common.h"

#include <sys/socket.h>

static int fz_sock[2] = {-1, -1};

static void drain(void)
{
    uint8_t buf[4096];
    while (read(fz_sock[0], buf, sizeof(buf)) > 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fz_sock[0] < 0 &&
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fz_sock) < 0)
        abort();
    struct fz_guest g;
    if (fz_setup(&g, data, size, 1) < 0) {
        fz_teardown(&g);
        return 0;
    }
    struct vx_vq *rx = g.q[0].vq;
    static uint8_t big[VX_SCRATCH_LEN + 4096];
    for (unsigned s = 0; s < 8; s++) {
        uint8_t op = fz_u8(&g.steps);
        uint8_t arg = fz_u8(&g.steps);
        fz_trace(s, op, arg);
        uint16_t flen = fz_u16(&g.steps);
        uint32_t len = flen % (g.ndata + 1);
        const uint8_t *frame = g.ndata ? g.data : big;
        /* small budgets, or none at all: the call's own cap (VX_CALL_MAX) must end it even
         * when a "frame" takes no chain (hdr_len 0, MRG_RXBUF and an empty frame) */
        uint32_t pkts = arg % 16 ? arg % 16 : 0xFFFFFFFFu;
        int r = 0;
        switch (op % 6) {
        case 0:
            r = vx_net_rx_fill(rx, frame, len, pkts, 0);
            break;
        case 1: /* a frame longer than any ring holds: too_big / ring_full */
            r = vx_net_rx_fill(rx, big, 1000u + 64u * flen % (sizeof(big) - 1000), pkts, 0);
            break;
        case 2:
            for (unsigned k = 0; k <= (arg & 7); k++)
                (void)!write(fz_sock[1], frame, len > 4096 ? 4096 : len);
            r = vx_net_rx_from_fd(rx, fz_sock[0], pkts, 0);
            drain();
            break;
        case 3:
            r = vx_net_rx_from_fd(rx, -1, pkts, 0);
            break;
        case 4:
            fz_bump_avail(&g, 0, arg);
            break;
        case 5:
            r = vx_net_rx_fill(rx, frame, len, pkts, 1000); /* busy-poll path, <= 1 us */
            break;
        }
        fz_check_result(&g, 0, 0, r);
    }
    fz_teardown(&g);
    return 0;
}
