/* stream.c -- positions and entries of a shard's change stream (stream.h).
 *
 * The check is chained: the seed of each batch's XXH3 is itself a hash of
 * the previous check, the epoch and the lsn, so one differing batch (or the
 * same batch at another lsn or epoch) anywhere in a history changes every
 * check after it.
 */
#include "stream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "batch.h"
#include "endian.h"

#define CHECK_SEED 0x5354524d5f763100ull /* "STRM_v1\0": fixed forever */

uint64_t stream_check_next(uint64_t prev_check, uint64_t epoch, uint64_t lsn,
                           const uint8_t *batch, size_t len)
{
    uint8_t head[24];

    endian_put_le(head, prev_check, 8);
    endian_put_le(head + 8, epoch, 8);
    endian_put_le(head + 16, lsn, 8);
    return XXH3_64bits_withSeed(batch, len, XXH3_64bits_withSeed(head, sizeof(head), CHECK_SEED));
}

size_t stream_entry_encode(uint8_t *out, const struct stream_pos *p, uint64_t time_ms,
                           const uint8_t *batch, size_t len)
{
    endian_put_le(out, p->epoch, 8);
    endian_put_le(out + 8, p->lsn, 8);
    endian_put_le(out + 16, p->check, 8);
    endian_put_le(out + 24, time_ms, 8);
    endian_put_le(out + 32, len, 4);
    if (len)
        memcpy(out + STREAM_ENTRY_HDR, batch, len);
    return STREAM_ENTRY_HDR + len;
}

int stream_entry_next(const uint8_t *buf, size_t len, size_t *pos, struct stream_pos *p,
                      uint64_t *time_ms, const uint8_t **batch, size_t *blen)
{
    size_t at = *pos;

    if (at >= len)
        return 0;
    if (len - at < STREAM_ENTRY_HDR)
        return -EINVAL;
    const uint8_t *h = buf + at;
    uint64_t n = endian_get_le(h + 32, 4);
    if (n > BATCH_MAX || n > len - at - STREAM_ENTRY_HDR ||
        batch_validate(h + STREAM_ENTRY_HDR, (size_t)n) < 0)
        return -EINVAL;
    p->epoch = endian_get_le(h, 8);
    p->lsn = endian_get_le(h + 8, 8);
    p->check = endian_get_le(h + 16, 8);
    *time_ms = endian_get_le(h + 24, 8);
    *batch = h + STREAM_ENTRY_HDR;
    *blen = (size_t)n;
    *pos = at + STREAM_ENTRY_HDR + (size_t)n;
    return 1;
}

int stream_buf_add(void *ctx, const struct stream_pos *p, uint64_t time_ms, const uint8_t *batch,
                   size_t len)
{
    struct stream_buf *e = ctx;
    size_t need = STREAM_ENTRY_HDR + len;

    if (e->limit && e->len > 0 && e->len + need > e->limit)
        return 1;
    if (e->len + need > e->cap) {
        size_t cap = e->cap ? e->cap : 64u << 10;
        uint8_t *q;

        while (cap < e->len + need)
            cap *= 2;
        q = realloc(e->buf, cap);
        if (!q)
            return -ENOMEM;
        e->buf = q;
        e->cap = cap;
    }
    e->len += stream_entry_encode(e->buf + e->len, p, time_ms, batch, len);
    return e->upto && p->lsn >= e->upto ? 1 : 0;
}

int stream_pos_parse(const char *v, struct stream_pos *p)
{
    uint64_t f[3];

    for (int i = 0; i < 3; i++) {
        uint64_t n = 0;

        if (*v < '0' || *v > '9')
            return -EINVAL;
        for (; *v >= '0' && *v <= '9'; v++) {
            if (n > (UINT64_MAX - (uint64_t)(*v - '0')) / 10)
                return -EINVAL;
            n = n * 10 + (uint64_t)(*v - '0');
        }
        if (*v != (i < 2 ? '/' : '\0'))
            return -EINVAL;
        v += i < 2;
        f[i] = n;
    }
    *p = (struct stream_pos){f[0], f[1], f[2]};
    return 0;
}
