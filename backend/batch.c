/* batch.c -- encoding of shard batches (see batch.h for the format).
 *
 * The encoding is a flat byte string so that the same bytes serve as the redo
 * log record and, later, as a request body; decoding checks every length
 * against the buffer before touching it.
 */
#include "batch.h"

#include "endian.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int op_has_value(unsigned op)
{
    return op == BATCH_PUT || op == BATCH_ASSERT_VALUE || op == BATCH_DEL_RANGE ||
           op == BATCH_ASSERT_EMPTY || op == BATCH_AWAIT_VALUE;
}

void batch_init(struct batch *b)
{
    memset(b, 0, sizeof(*b));
}

void batch_free(struct batch *b)
{
    free(b->buf);
    batch_init(b);
}

void batch_reset(struct batch *b)
{
    b->len = 0;
    b->count = 0;
    b->error = 0;
}

static int batch_reserve(struct batch *b, size_t more)
{
    size_t need = b->len + more, cap = b->cap ? b->cap : 256;
    uint8_t *p;

    if (need > BATCH_MAX)
        return -EFBIG;
    if (need <= b->cap)
        return 0;
    while (cap < need)
        cap *= 2;
    p = realloc(b->buf, cap);
    if (!p)
        return -ENOMEM;
    b->buf = p;
    b->cap = cap;
    return 0;
}

int batch_add(struct batch *b, enum batch_op op, const void *key, size_t klen, const void *val,
              size_t vlen)
{
    int rc = 0;
    uint8_t *p;

    if (b->error)
        return b->error;
    if (klen == 0 || klen > BATCH_KEY_MAX) {
        rc = klen ? -ENAMETOOLONG : -EINVAL;
        goto out;
    }
    if (!op_has_value(op))
        vlen = 0;
    if (vlen > BATCH_VALUE_MAX) {
        rc = -EFBIG;
        goto out;
    }
    rc = batch_reserve(b, 1 + 4 + klen + (op_has_value(op) ? 4 + vlen : 0));
    if (rc)
        goto out;
    p = b->buf + b->len;
    *p++ = (uint8_t)op;
    endian_put_le(p, klen, 4);
    memcpy(p + 4, key, klen);
    p += 4 + klen;
    if (op_has_value(op)) {
        endian_put_le(p, vlen, 4);
        if (vlen)
            memcpy(p + 4, val, vlen);
        p += 4 + vlen;
    }
    b->len = (size_t)(p - b->buf);
    b->count++;
out:
    if (rc)
        b->error = rc;
    return rc;
}

int batch_append(struct batch *b, const struct batch *from)
{
    int rc = b->error ? b->error : from->error;

    if (rc == 0)
        rc = batch_reserve(b, from->len);
    if (rc) {
        b->error = rc;
        return rc;
    }
    if (from->len)
        memcpy(b->buf + b->len, from->buf, from->len);
    b->len += from->len;
    b->count += from->count;
    return 0;
}

int batch_next(const uint8_t *buf, size_t len, size_t *pos, struct batch_item *it)
{
    size_t p = *pos;
    uint32_t n;

    if (p == len)
        return 0;
    if (len - p < 5)
        return -EINVAL;
    it->op = (enum batch_op)buf[p];
    if (it->op < BATCH_PUT || it->op > BATCH_OP_MAX)
        return -EINVAL;
    n = (uint32_t)endian_get_le(buf + p + 1, 4);
    p += 5;
    if (n == 0 || n > BATCH_KEY_MAX || n > len - p)
        return -EINVAL;
    it->key = buf + p;
    it->klen = n;
    p += n;
    it->val = NULL;
    it->vlen = 0;
    if (op_has_value(it->op)) {
        if (len - p < 4)
            return -EINVAL;
        n = (uint32_t)endian_get_le(buf + p, 4);
        p += 4;
        if (n > BATCH_VALUE_MAX || n > len - p)
            return -EINVAL;
        it->val = buf + p;
        it->vlen = n;
        p += n;
    }
    *pos = p;
    return 1;
}

int batch_validate(const uint8_t *buf, size_t len)
{
    struct batch_item it;
    size_t pos = 0;
    int rc, count = 0;

    if (len > BATCH_MAX)
        return -EINVAL;
    while ((rc = batch_next(buf, len, &pos, &it)) == 1)
        count++;
    return rc < 0 ? rc : count;
}

int batch_key_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);

    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

int batch_key_after(const uint8_t *k, size_t klen, uint8_t out[BATCH_KEY_MAX])
{
    if (klen > BATCH_KEY_MAX)
        return -1;
    if (klen < BATCH_KEY_MAX) {
        memcpy(out, k, klen);
        out[klen] = 0;
        return (int)klen + 1;
    }
    while (klen > 0 && k[klen - 1] == 0xff)
        klen--;
    if (klen == 0)
        return 0;
    memcpy(out, k, klen);
    out[klen - 1]++;
    return (int)klen;
}
