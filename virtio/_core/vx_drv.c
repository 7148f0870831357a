/*
 * vx_drv.c - DRIVER-SIDE TEST SUPPORT, not part of the device data path: compiled into the C
 * core's one cffi module, called only by virtio.testing.RecyclingDriver (benchmarks).
 *
 * A trivial guest for benchmarks: descriptor i permanently describes buffer i (one buffer per
 * chain); the driver posts every descriptor once, then recycles whatever the device returned,
 * publishing avail->idx once per call (release store; used->idx read with acquire). Trusts the
 * device (it is our own).
 */
#include "vx_core.h"

#include <string.h>

struct drv_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* split ring layout (VIRTIO 1.2, 2.7.6 and 2.7.8): avail = le16 flags, le16 idx, le16 ring[];
 * used = le16 flags, le16 idx, {le32 id, le32 len} ring[] */
struct drv_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct drv_used_elem {
    uint32_t id;
    uint32_t len;
};

struct drv_used {
    uint16_t flags;
    uint16_t idx;
    struct drv_used_elem ring[];
};

static inline uint16_t *avail_ring(struct vx_drv *d) { return ((struct drv_avail *)d->avail)->ring; }
static inline uint16_t *avail_idx(struct vx_drv *d) { return &((struct drv_avail *)d->avail)->idx; }
static inline uint16_t *used_idx(struct vx_drv *d) { return &((struct drv_used *)d->used)->idx; }
static inline const struct drv_used_elem *used_ring(struct vx_drv *d)
{
    return ((const struct drv_used *)d->used)->ring;
}

void vx_drv_fill_descs(struct vx_drv *d, uint64_t buf_gpa, uint32_t stride, uint32_t len,
                       uint16_t flags)
{
    struct drv_desc *desc = d->desc;
    for (uint32_t i = 0; i < d->size; i++) {
        desc[i].addr = buf_gpa + (uint64_t)i * stride;
        desc[i].len = len;
        desc[i].flags = flags;
        desc[i].next = 0;
    }
}

uint32_t vx_drv_post_all(struct vx_drv *d)
{
    uint16_t *ring = avail_ring(d);
    for (uint32_t i = 0; i < d->size; i++)
        ring[(uint16_t)(d->avail_idx + i) & (d->size - 1)] = (uint16_t)i;
    d->avail_idx = (uint16_t)(d->avail_idx + d->size);
    __atomic_store_n(avail_idx(d), d->avail_idx, __ATOMIC_RELEASE);
    return d->size;
}

uint32_t vx_drv_recycle(struct vx_drv *d)
{
    uint16_t u = __atomic_load_n(used_idx(d), __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(u - d->last_used);
    uint16_t *ring = avail_ring(d);
    const struct drv_used_elem *used = used_ring(d);
    const uint32_t mask = d->size - 1;
    for (uint16_t k = 0; k < n; k++) {
        uint32_t id = used[(uint16_t)(d->last_used + k) & mask].id;
        ring[(uint16_t)(d->avail_idx + k) & mask] = (uint16_t)id;
    }
    d->last_used = u;
    d->avail_idx = (uint16_t)(d->avail_idx + n);
    if (n)
        __atomic_store_n(avail_idx(d), d->avail_idx, __ATOMIC_RELEASE);
    return n;
}
