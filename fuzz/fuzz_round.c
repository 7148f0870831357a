/*
 * fuzz_round.c - port operations as data and poll rounds: vx_op_run and vx_round over up to six
 * vx_op of every kind (an unknown kind too) on three queues and a switch, with coalescing; RX_FILL
 * and ECHO ops sometimes with shared_rx (their RX ring locked: no path may take it twice).
 *
 * Queues 0..2 in one fuzzed guest memory (see fuzz_common.h); ops name them by index.
 */
#include "fuzz_common.h"

#include <sys/socket.h>

static int fz_sock[2] = {-1, -1};

static void drain(void)
{
    uint8_t buf[4096];
    while (read(fz_sock[1], buf, sizeof(buf)) > 0)
        ;
    while (read(fz_sock[0], buf, sizeof(buf)) > 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (fz_sock[0] < 0 &&
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fz_sock) < 0)
        abort();
    struct fz_guest g;
    if (fz_setup(&g, data, size, 3) < 0) {
        fz_teardown(&g);
        return 0;
    }
    struct vx_switch *sw = vx_switch_new();
    if (!sw)
        abort();
    struct vx_vq *p0[1] = {g.q[1].vq}, *p1[1] = {g.q[2].vq};
    int pa = vx_switch_add_port(sw, p0, 1);
    (void)vx_switch_add_port(sw, p1, 1);
    static const uint8_t frame[64] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 8, 0};
    struct vx_op ops[6];
    struct vx_op *opp[6];
    unsigned n = 1 + fz_u8(&g.steps) % 6;
    for (unsigned i = 0; i < n; i++) {
        uint8_t k = fz_u8(&g.steps), qs = fz_u8(&g.steps), b = fz_u8(&g.steps);
        memset(&ops[i], 0, sizeof(ops[i]));
        ops[i].kind = k % 9; /* 0 and 8: unknown kinds */
        ops[i].vq = g.q[qs % 3].vq;
        ops[i].peer = g.q[(qs >> 2) % 3].vq;
        ops[i].sw = sw;
        ops[i].port = qs & 0x40 ? pa + 7 : pa;
        ops[i].fd = qs & 0x80 ? -1 : fz_sock[(k >> 4) & 1];
        ops[i].frame = frame;
        ops[i].frame_len = b % 65;
        ops[i].max_pkts = b % 9 ? b % 9 : 64;
        ops[i].max_bytes = b & 0x80 ? 500 : ~0ull;
        ops[i].idle_ns = b & 0x40 ? 1 : 0; /* vx_round_until: idle ends the round */
        /* batch waiting: a target that the ring (half its size) and the budget may cap, a
         * maximum wait short enough (1 us) or long enough (100 us) to skip ops in a round */
        ops[i].batch_target = k & 0x20 ? 16u + (b & 0x3f) : 0;
        ops[i].batch_wait_max_ns = k & 0x40 ? 1000 : 100000;
        opp[i] = &ops[i];
        if (ops[i].peer == ops[i].vq && (ops[i].kind == VX_OP_ECHO || ops[i].kind == VX_OP_FWD))
            ops[i].peer = g.q[(qs % 3 + 1) % 3].vq; /* a queue is never its own peer */
        if (k & 0x80) { /* an RX ring with two writers (echo_tx): its lock, taken alone here */
            ops[i].shared_rx = 1;
            vx_vq_set_shared(ops[i].kind == VX_OP_ECHO ? ops[i].peer : ops[i].vq, 1);
        }
    }
    for (unsigned s = 0; s < 4; s++) {
        uint8_t op = fz_u8(&g.steps), arg = fz_u8(&g.steps);
        fz_trace(s, op, arg);
        int r;
        switch (op % 4) {
        case 0:
        case 1:
            /* op & 8: the round that looks at idle ops every pass (no wait) */
            r = op & 8 ? vx_round_until(opp, n, 1 + arg % 8, 1, 200000, op & 4 ? 1000 : 0, NULL)
                       : vx_round(opp, n, 1 + arg % 8, 200000, op & 4 ? 1000 : 0);
            if (r == 0 || r > (int)(1 + arg % 8) || r < -(int)n)
                fz_abort("vx_round result out of range", 0, (unsigned)r, n);
            if (r < 0 && opp[-r - 1]->result >= 0)
                fz_abort("vx_round stopped at an op that did not fail", 0, (unsigned)(-r), 0);
            if (r < 0)
                g.tainted = 1;
            for (unsigned i = 0; i < n; i++)
                if (opp[i]->batch_wait_ns > opp[i]->batch_wait_max_ns)
                    fz_abort("batch wait past its maximum", 0, (unsigned)opp[i]->batch_wait_ns, i);
            break;
        case 2:
            r = vx_op_run(opp[arg % n], opp[arg % n]->max_pkts, opp[arg % n]->max_bytes, 0);
            if (r < -2 || (r == -2 && opp[arg % n]->kind >= 1 && opp[arg % n]->kind <= 7))
                fz_abort("vx_op_run result", 0, (unsigned)r, opp[arg % n]->kind);
            if (r == -1)
                g.tainted = 1;
            break;
        case 3:
            fz_bump_avail(&g, arg % 3, (uint8_t)(arg >> 2));
            break;
        }
        drain();
        for (unsigned i = 0; i < g.nq; i++)
            fz_check_queue(&g, i);
    }
    vx_switch_free(sw);
    fz_teardown(&g);
    return 0;
}
