/*
 * fuzz_chain.c - the descriptor chain walker: direct and indirect tables, loops, bounds.
 *
 * One TX queue over the fuzzed guest; steps (from the header) run tx_sink (which walks every
 * avail chain: readable buffers copied out, header skipped), pending, kick suppression on/off,
 * signal, remap, and the driver moving avail->idx. See fuzz_common.h for the input layout.
 */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_guest g;
    if (fz_setup(&g, data, size, 1) < 0) {
        fz_teardown(&g);
        return 0;
    }
    struct vx_vq *tx = g.q[0].vq;
    for (unsigned s = 0; s < 8; s++) {
        uint8_t op = fz_u8(&g.steps);
        uint8_t arg = fz_u8(&g.steps);
        fz_trace(s, op, arg);
        int r = 0;
        switch (op % 8) {
        case 0:
            r = vx_net_tx_sink(tx, arg ? arg : 0xFFFFFFFFu, ~0ull, 0);
            break;
        case 1:
            r = vx_net_tx_sink(tx, 1 + arg % 8, 64u * (1 + arg / 8), 0);
            break;
        case 2:
            r = vx_vq_pending(tx);
            if (r > (int)g.q[0].size)
                fz_abort("pending beyond the ring size", 0, (unsigned)r, g.q[0].size);
            break;
        case 3:
            r = vx_vq_set_notify(tx, arg & 1);
            break;
        case 4:
            r = vx_vq_signal(tx);
            break;
        case 5:
            fz_bump_avail(&g, 0, arg);
            break;
        case 6: /* the memory table changes: same rings, regions trimmed */
            g.regions[0].size = g.regions[0].size > arg ? g.regions[0].size - arg : 1;
            r = vx_vq_remap(tx, &g.mem, g.q[0].desc, g.q[0].avail, g.q[0].used);
            break;
        case 7:
            r = vx_net_tx_sink(tx, arg ? arg : 1, ~0ull, 2000); /* busy-poll path, <= 2 us */
            break;
        }
        fz_check_result(&g, 0, 0, r);
    }
    fz_teardown(&g);
    return 0;
}
