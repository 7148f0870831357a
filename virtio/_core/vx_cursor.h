/*
 * vx_cursor.h - INTERNAL (not fed to the cffi cdef): segments of a walked chain and the copy
 * cursors that gather from / scatter into them.
 *
 * A cursor walks an array of segments (host pointer + length, already checked against guest
 * memory by the chain walk); every copy is bounded by the segments' lengths.
 */
#ifndef VX_CURSOR_H
#define VX_CURSOR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* one buffer of a walked chain, translated to a host pointer */
struct vx_seg {
    uint8_t *ptr;
    uint32_t len;
};

struct cur {
    const struct vx_seg *s;
    uint32_t n, i, off;
};

static inline void cur_init(struct cur *c, const struct vx_seg *s, uint32_t n)
{
    c->s = s;
    c->n = n;
    c->i = 0;
    c->off = 0;
}

/* dst may itself be guest memory (RX fast path: a TX chain read straight into an RX buffer),
 * which a guest may make overlap the source: memmove, never memcpy */
static inline size_t cur_read(struct cur *c, void *dst, size_t len)
{
    uint8_t *d = dst;
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        memmove(d + done, c->s[c->i].ptr + c->off, k);
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

static inline size_t cur_write(struct cur *c, const void *src, size_t len)
{
    const uint8_t *p = src;
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        memcpy(c->s[c->i].ptr + c->off, p + done, k);
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

static inline size_t cur_skip(struct cur *c, size_t len)
{
    size_t done = 0;
    while (done < len && c->i < c->n) {
        size_t k = c->s[c->i].len - c->off;
        if (k > len - done)
            k = len - done;
        done += k;
        c->off += k;
        if (c->off == c->s[c->i].len) {
            c->i++;
            c->off = 0;
        }
    }
    return done;
}

/* copy up to len bytes from src cursor to dst cursor */
/* both cursors may be guest buffers, which a hostile (or careless) guest may make overlap:
 * memmove, never memcpy */
static inline size_t cur_copy(struct cur *dst, struct cur *src, size_t len)
{
    size_t done = 0;
    while (done < len && dst->i < dst->n && src->i < src->n) {
        size_t k = dst->s[dst->i].len - dst->off;
        size_t ks = src->s[src->i].len - src->off;
        if (k > ks)
            k = ks;
        if (k > len - done)
            k = len - done;
        memmove(dst->s[dst->i].ptr + dst->off, src->s[src->i].ptr + src->off, k);
        done += k;
        dst->off += k;
        src->off += k;
        if (dst->off == dst->s[dst->i].len) {
            dst->i++;
            dst->off = 0;
        }
        if (src->off == src->s[src->i].len) {
            src->i++;
            src->off = 0;
        }
    }
    return done;
}

/* host pointer of byte `pos` of a cursor's data (NULL if beyond) */
static inline uint8_t *cur_at(const struct vx_seg *s, uint32_t n, size_t pos)
{
    for (uint32_t i = 0; i < n; i++) {
        if (pos < s[i].len)
            return s[i].ptr + pos;
        pos -= s[i].len;
    }
    return NULL;
}

#endif
