/*
 * fuzz_iotlb.c - the device IOTLB (vx_iotlb.c) against a byte-level model of what it may map.
 *
 * The input is a capacity byte and then 12-byte steps: update, invalidate, translate (with and
 * without recording the miss), meets, take_misses, clear. IOVAs live in a 4 KiB window (so the
 * model is one array of bytes; what lies past it is not modelled), plus steps with huge values
 * for the range checks. The table may
 * hold less than the model (an invalidation that would split an entry in a full table drops the
 * whole entry; a later miss refetches it), never more and never anything else:
 *   - a translation that succeeds gives, at every byte it covers, the host and uaddr the last
 *     update that still stands there gave, with the permission asked for; DENIED only where a
 *     mapping without that permission stands;
 *   - an invalidated byte never translates again until an update maps it anew;
 *   - update answers BAD exactly for size 0, a wrapping range or a permission outside 1..3;
 *     OVERLAP and REPEAT only over mapped bytes; FULL only with the table at its capacity;
 *   - meets() only over mapped bytes; take_misses at most what it was asked.
 * Any breach aborts (libFuzzer reports the input).
 */
#include "vx_core.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SPACE 4096u /* the modelled IOVA window */

struct byte_map {
    uint8_t perm; /* 0: unmapped */
    uint64_t host, uaddr;
};

static struct byte_map model[SPACE];

static void fail(const char *what, uint64_t a, uint64_t b)
{
    fprintf(stderr, "fuzz_iotlb: %s (%#llx, %#llx)\n", what, (unsigned long long)a,
            (unsigned long long)b);
    abort();
}

static uint64_t rd(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int model_any(uint64_t iova, uint64_t size)
{
    for (uint64_t a = iova; a < iova + size && a < SPACE; a++)
        if (model[a].perm)
            return 1;
    return 0;
}

static void check_translation(struct vx_iotlb *t, uint64_t iova, uint64_t len, uint32_t perm,
                              int record)
{
    uint64_t host = 0, uaddr = 0, contig = 0;
    int r = vx_iotlb_translate(t, iova, len, perm, record, &host, &uaddr, &contig);
    if (r == VX_IOTLB_OK) {
        if (contig == 0 || contig > len)
            fail("contig outside 1..len", contig, len);
        for (uint64_t off = 0; off < contig; off++) {
            uint64_t a = iova + off;
            if (a >= SPACE)
                break; /* outside the modelled window */
            if (!model[a].perm)
                fail("translated a byte nothing maps", a, off);
            if ((model[a].perm & perm) != perm)
                fail("translated without the permission", a, model[a].perm);
            if (model[a].host != host + off || model[a].uaddr != uaddr + off)
                fail("translated to the wrong place", a, host + off);
        }
    } else if (r == VX_IOTLB_DENIED) {
        if (iova < SPACE && (!model[iova].perm || (model[iova].perm & perm) == perm))
            fail("denied where no mapping lacks the permission", iova, perm);
    } else if (r != VX_IOTLB_MISS) {
        fail("translate returned something else", (uint64_t)r, iova);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint32_t cap = 1 + data[0] % 16;
    struct vx_iotlb *t = vx_iotlb_new(cap, -1);
    if (!t)
        return 0;
    memset(model, 0, sizeof(model));
    for (size_t at = 1; at + 12 <= size; at += 12) {
        const uint8_t *s = data + at;
        uint8_t op = s[0];
        uint64_t iova = rd(s + 1, 2) % SPACE;
        uint64_t len = 1 + rd(s + 3, 2) % 1024;
        uint64_t host = rd(s + 5, 3) << 8, uaddr = rd(s + 8, 3) << 8;
        uint32_t perm = s[11] & 3;
        if (op & 0x80) { /* the range checks: sizes and addresses near the ends */
            iova = (op & 0x40) ? UINT64_MAX - (rd(s + 1, 2) & 0xff) : iova;
            len = (op & 0x20) ? 0 : (op & 0x10) ? UINT64_MAX - rd(s + 3, 1) : len;
        }
        switch (op % 8) {
        case 0:
        case 1: {
            int r = vx_iotlb_update(t, iova, len, uaddr, host, perm);
            int bad = len == 0 || iova + (len - 1) < iova || uaddr + (len - 1) < uaddr ||
                      host + (len - 1) < host || perm < 1 || perm > 3;
            if ((r == VX_IOTLB_BAD) != bad)
                fail("BAD is not exactly the malformed updates", iova, len);
            if (bad)
                break;
            const int inside = iova < SPACE && len <= SPACE - iova; /* all of it modelled */
            if (r == VX_IOTLB_OVERLAP && inside && !model_any(iova, len))
                fail("overlap with nothing mapped", iova, len);
            if (r == VX_IOTLB_REPEAT && inside &&
                (model[iova].host != host || model[iova].perm != perm))
                fail("repeat of a mapping that is not there", iova, len);
            if (r == VX_IOTLB_FULL && vx_iotlb_count(t) < cap)
                fail("full below the capacity", vx_iotlb_count(t), cap);
            if (r == VX_IOTLB_OK) {
                for (uint64_t off = 0; off < len && iova + off < SPACE; off++)
                    model[iova + off] = (struct byte_map){(uint8_t)perm, host + off, uaddr + off};
            }
            break;
        }
        case 2: {
            vx_iotlb_invalidate(t, iova, len);
            uint64_t last = len ? iova + (len - 1) : iova;
            if (len && last < iova)
                last = UINT64_MAX;
            for (uint64_t a = iova; len && a < SPACE && a <= last; a++)
                model[a].perm = 0;
            break;
        }
        case 3:
        case 4:
            if (perm == 0)
                perm = 1;
            check_translation(t, iova, len ? len : 1, perm, op & 1);
            break;
        case 5:
            if (len && iova < SPACE && len <= SPACE - iova && vx_iotlb_meets(t, iova, len) &&
                !model_any(iova, len))
                fail("meets with nothing mapped", iova, len);
            break;
        case 6: {
            uint64_t iovas[8];
            uint32_t perms[8];
            uint32_t max = s[11] % 9;
            if (vx_iotlb_take_misses(t, iovas, perms, max) > max)
                fail("more misses than asked for", max, 0);
            break;
        }
        case 7:
            if ((s[11] & 0xf0) == 0) {
                vx_iotlb_clear(t);
                memset(model, 0, sizeof(model));
            }
            break;
        }
        if (vx_iotlb_count(t) > cap)
            fail("more entries than the capacity", vx_iotlb_count(t), cap);
    }
    /* every byte the model lost must not translate; every byte still there may */
    for (uint64_t a = 0; a < SPACE; a += 61)
        check_translation(t, a, 64, 1, 0);
    vx_iotlb_free(t);
    return 0;
}
