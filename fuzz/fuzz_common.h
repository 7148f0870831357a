/*
 * fuzz_common.h - shared input decoding of the C-core fuzz targets (libFuzzer, ASan + UBSan).
 *
 * One fuzz input lays out a hostile guest: a fixed 96-byte header (zero-padded when the input
 * is shorter) followed by the guest memory contents. The header is read with a cursor:
 *
 *   regions:  u8 count (1..4), then per region u16 host offset, u16 length, u8 mode,
 *             u64 gpa (mode bit 0 clear: gpa = (u32)gpa << 4, small and aligned; set: raw)
 *   queues:   per queue u8 log2 size (% 9: 1..256), u16 desc/avail/used offsets in the arena
 *             (aligned, clamped so the ring fits), u16 last_avail_idx, u8 flags (bit 0 EVENT_IDX,
 *             bit 1 MRG_RXBUF, bit 2 a call eventfd), u8 header length selector
 *   steps:    the rest of the header, read by each target (which operation, budgets, ...)
 *
 * The guest memory is one malloc'd arena of FZ_ARENA bytes (ASan's redzones on both sides): the
 * rings live inside it and every region is a slice of it, so buffers may alias rings, as a
 * hostile guest's can. After every operation fz_check_queue() asserts the core's own
 * bookkeeping (a consumed chain is a published used entry, a broken queue says why).
 *
 * Only the public API of vx_core.h is used.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#define _GNU_SOURCE
#include "vx_core.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define FZ_ARENA 65536u
#define FZ_HDR 96u
#define FZ_MAX_QUEUES 4

struct fz_cur {
    const uint8_t *p;
    size_t n;
};

static inline uint64_t fz_bytes(struct fz_cur *c, unsigned k)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < k; i++) {
        uint8_t b = 0;
        if (c->n) {
            b = *c->p++;
            c->n--;
        }
        v |= (uint64_t)b << (8 * i);
    }
    return v;
}
#define fz_u8(c) ((uint8_t)fz_bytes((c), 1))
#define fz_u16(c) ((uint16_t)fz_bytes((c), 2))
#define fz_u32(c) ((uint32_t)fz_bytes((c), 4))
#define fz_u64(c) (fz_bytes((c), 8))

struct fz_queue {
    struct vx_vq *vq;
    uint32_t size;
    uint8_t *desc, *avail, *used;
    uint16_t start_last_avail;
    uint16_t start_used;
    int started;
};

struct fz_guest {
    uint8_t *arena;
    struct vx_region regions[4];
    struct vx_mem mem;
    struct fz_queue q[FZ_MAX_QUEUES];
    unsigned nq;
    int tainted; /* an op returned -1: what it consumed may stay unpublished (the device breaks) */
    uint8_t hdr[FZ_HDR]; /* the header, zero-padded */
    struct fz_cur steps; /* the rest of the header */
    const uint8_t *data; /* input after the header (also a source of frames) */
    size_t ndata;
};

static int fz_call_fd = -2;

static inline int fz_eventfd(void)
{
    if (fz_call_fd == -2)
        fz_call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fz_call_fd;
}

static inline uint32_t fz_place(uint16_t off, uint32_t align, uint32_t len)
{
    uint32_t o = off & ~(align - 1);
    if (o + len > FZ_ARENA)
        o = (FZ_ARENA - len) & ~(align - 1);
    return o;
}

static const uint32_t fz_hdr_lens[8] = {12, 10, 0, 12, 64, 13, 1, 65};

/* FZ_TRACE=1 in the environment: print each step (to read a crash input) */
static inline void fz_trace(unsigned step, unsigned op, unsigned arg)
{
    static int on = -1;
    if (on < 0)
        on = getenv("FZ_TRACE") != NULL;
    if (on)
        fprintf(stderr, "step %u: op %u arg %u\n", step, op, arg);
}

static inline void fz_abort(const char *what, unsigned q, unsigned a, unsigned b)
{
    fprintf(stderr, "fuzz invariant broken: %s (queue %u: %u vs %u)\n", what, q, a, b);
    abort();
}

/* decode regions and `nq` queues; returns 0 or -1 (input unusable: skip it) */
static inline int fz_setup(struct fz_guest *g, const uint8_t *data, size_t size, unsigned nq)
{
    memset(g, 0, sizeof(*g));
    memcpy(g->hdr, data, size < FZ_HDR ? size : FZ_HDR);
    struct fz_cur c = {g->hdr, FZ_HDR};
    g->arena = calloc(1, FZ_ARENA);
    if (!g->arena)
        return -1;
    g->data = size > FZ_HDR ? data + FZ_HDR : NULL;
    g->ndata = size > FZ_HDR ? size - FZ_HDR : 0;
    if (g->ndata)
        memcpy(g->arena, g->data, g->ndata < FZ_ARENA ? g->ndata : FZ_ARENA);

    unsigned nr = 1 + fz_u8(&c) % 4;
    for (unsigned i = 0; i < nr; i++) {
        uint32_t off = fz_u16(&c) % FZ_ARENA;
        uint32_t len = fz_u16(&c);
        uint8_t mode = fz_u8(&c);
        uint64_t gpa = fz_u64(&c);
        if (len == 0 || off + len > FZ_ARENA)
            len = FZ_ARENA - off;
        if (!(mode & 1))
            gpa = (uint64_t)(uint32_t)gpa << 4;
        g->regions[i].gpa = gpa;
        g->regions[i].size = len;
        g->regions[i].uva = gpa;
        g->regions[i].host = (uint64_t)(uintptr_t)(g->arena + off);
    }
    g->mem.nregions = nr;
    g->mem.regions = g->regions;

    g->nq = nq;
    for (unsigned i = 0; i < nq; i++) {
        struct fz_queue *q = &g->q[i];
        q->size = 1u << (fz_u8(&c) % 9);
        uint32_t d = fz_place(fz_u16(&c), 16, 16 * q->size);
        uint32_t a = fz_place(fz_u16(&c), 2, 6 + 2 * q->size);
        uint32_t u = fz_place(fz_u16(&c), 4, 6 + 8 * q->size);
        uint16_t last = fz_u16(&c);
        uint8_t flags = fz_u8(&c);
        uint32_t hlen = fz_hdr_lens[fz_u8(&c) % 8];
        q->desc = g->arena + d;
        q->avail = g->arena + a;
        q->used = g->arena + u;
        q->vq = vx_vq_new(q->size);
        if (!q->vq)
            return -1;
        uint32_t f = (flags & 1 ? VX_F_EVENT_IDX : 0) | (flags & 2 ? VX_F_MRG_RXBUF : 0);
        int call = flags & 4 ? fz_eventfd() : -1;
        q->started = vx_vq_start(q->vq, &g->mem, q->desc, q->avail, q->used, last, f, hlen,
                                 call) == 0;
        q->start_last_avail = vx_vq_last_avail_idx(q->vq);
        q->start_used = vx_vq_used_idx(q->vq);
        if (q->started && q->start_last_avail != last)
            fz_abort("last_avail_idx after start", i, q->start_last_avail, last);
    }
    g->steps = c;
    return 0;
}

/* the core's own bookkeeping on queue i after an operation returned */
static inline void fz_check_queue(struct fz_guest *g, unsigned i)
{
    struct fz_queue *q = &g->q[i];
    const char *err = vx_vq_error(q->vq);
    struct vx_stats *st = vx_vq_stats(q->vq);
    if (st->errors > 1)
        fz_abort("more than one guest error counted", i, (unsigned)st->errors, 1);
    if (err) {
        if (!*err)
            fz_abort("empty error message", i, 0, 0);
        return;
    }
    if (g->tainted)
        return;
    /* every chain taken from the avail ring is completed, once the call has returned */
    uint16_t consumed = (uint16_t)(vx_vq_last_avail_idx(q->vq) - q->start_last_avail);
    uint16_t published = (uint16_t)(vx_vq_used_idx(q->vq) - q->start_used);
    if (consumed != published)
        fz_abort("chains consumed != used entries published", i, consumed, published);
}

/* the driver moves avail->idx (a step of a target): by k entries from the device's position */
static inline void fz_bump_avail(struct fz_guest *g, unsigned i, uint8_t k)
{
    struct fz_queue *q = &g->q[i];
    uint16_t idx = (uint16_t)(vx_vq_last_avail_idx(q->vq) + k);
    memcpy(q->avail + 2, &idx, 2);
}

/* after an operation on queues a and b (b may equal a) returned r: -1 means one of them broke */
static inline void fz_check_result(struct fz_guest *g, unsigned a, unsigned b, int r)
{
    if (r == -1 && !vx_vq_error(g->q[a].vq) && !vx_vq_error(g->q[b].vq))
        fz_abort("-1 returned with no queue broken", a, b, 0);
    if (r < -1)
        fz_abort("return below -1", a, b, 0);
    if (r == -1)
        g->tainted = 1;
    for (unsigned i = 0; i < g->nq; i++)
        fz_check_queue(g, i);
}

static inline void fz_teardown(struct fz_guest *g)
{
    for (unsigned i = 0; i < g->nq; i++)
        vx_vq_free(g->q[i].vq);
    free(g->arena);
}

#endif
