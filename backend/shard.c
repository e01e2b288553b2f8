/* shard.c -- what every shard implementation shares: resolving the keys of a
 * shard_get_many() list, doing the list one get at a time for a shard that
 * has no get_many of its own (test wrappers), and the per-thread no-waiting
 * mode (shard.h). */
#include <stdlib.h>
#include <string.h>

#include "shard.h"

static _Thread_local int nowait_on;      /* between shard_nowait_begin/end */
static _Thread_local int nowait_refused; /* a slot refused since the begin */

void shard_nowait_begin(void)
{
    nowait_on = 1;
    nowait_refused = 0;
}

int shard_nowait_end(void)
{
    nowait_on = 0;
    return nowait_refused;
}

int shard_nowait_active(void)
{
    return nowait_on;
}

int shard_nowait_refuse(void)
{
    if (nowait_on)
        nowait_refused = 1;
    return nowait_on;
}

int shard_reads_check(const struct shard_read *r, unsigned n)
{
    if (n == 0 || n > SHARD_READS_MAX)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        if (r[i].klen + r[i].link == 0 || r[i].klen + r[i].link > BATCH_KEY_MAX)
            return -EINVAL;
        if (r[i].buflen > SHARD_READ_VALUE_MAX || (r[i].buflen && !r[i].buf))
            return -EINVAL;
        if (r[i].link && i == 0)
            return -EINVAL;
    }
    return 0;
}

int shard_read_key(const struct shard_read *r, unsigned i, uint8_t out[BATCH_KEY_MAX],
                   size_t *klen)
{
    const struct shard_read *q = &r[i];

    memcpy(out, q->key, q->klen);
    *klen = q->klen;
    if (!q->link)
        return 0;
    if (r[i - 1].rc)
        return -ENOENT; /* nothing to follow */
    if (r[i - 1].len < q->link)
        return -EINVAL;
    memcpy(out + q->klen, r[i - 1].buf, q->link);
    *klen += q->link;
    return 0;
}

int shard_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    int rc = shard_reads_check(r, n);

    if (rc)
        return rc;
    if (s->ops->get_many)
        return s->ops->get_many(s, r, n);
    /* One get at a time: no single moment, which only test wrappers use. */
    for (unsigned i = 0; i < n; i++) {
        uint8_t key[BATCH_KEY_MAX];
        size_t klen;

        r[i].len = r[i].vlen = 0;
        r[i].rc = shard_read_key(r, i, key, &klen);
        if (r[i].rc)
            continue;
        rc = shard_get(s, key, klen, 0, r[i].buf, r[i].buflen, &r[i].vlen);
        if (rc == -ENOENT) {
            r[i].rc = rc;
            continue;
        }
        if (rc < 0)
            return rc;
        r[i].len = (size_t)rc;
    }
    return 0;
}

int shard_join_check(const struct shard_join *j)
{
    if (!j || !j->prefix || j->plen == 0 || j->plen > SHARD_JOIN_PREFIX_MAX || j->link == 0 ||
        j->link > BATCH_KEY_MAX - j->plen)
        return -EINVAL;
    return 0;
}

int shard_join_key(const struct shard_join *j, const uint8_t *val, size_t vlen,
                   uint8_t out[BATCH_KEY_MAX], size_t *klen)
{
    if (vlen < j->link)
        return -ENOENT;
    memcpy(out, j->prefix, j->plen);
    memcpy(out + j->plen, val, j->link);
    *klen = j->plen + j->link;
    return 0;
}

/* ---- the join done by hand: gather the records, then get each ---- */

struct gathered {
    uint8_t *buf; /* records: size_t klen, size_t vlen, key, value */
    size_t len, cap;
};

static int gather_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct gathered *g = ctx;
    size_t need = 2 * sizeof(size_t) + kl + vl;

    if (g->len + need > g->cap) {
        size_t cap = g->cap ? g->cap : 4096;
        uint8_t *p;

        while (cap < g->len + need)
            cap *= 2;
        if (!(p = realloc(g->buf, cap)))
            return -ENOMEM;
        g->buf = p;
        g->cap = cap;
    }
    memcpy(g->buf + g->len, &kl, sizeof(kl));
    memcpy(g->buf + g->len + sizeof(kl), &vl, sizeof(vl));
    memcpy(g->buf + g->len + 2 * sizeof(size_t), k, kl);
    memcpy(g->buf + g->len + 2 * sizeof(size_t) + kl, v, vl);
    g->len += need;
    return 0;
}

int shard_join_get(struct shard *s, const struct shard_join *j, const uint8_t *val, size_t vlen,
                   uint8_t *buf, uint8_t **big, const uint8_t **jval, size_t *jlen)
{
    uint8_t key[BATCH_KEY_MAX];
    size_t klen, full = 0;
    int rc;

    *big = NULL;
    *jval = NULL;
    *jlen = 0;
    if (shard_join_key(j, val, vlen, key, &klen) != 0)
        return 0;
    rc = shard_get(s, key, klen, 0, buf, SHARD_READ_VALUE_MAX, &full);
    if (rc >= 0 && full > SHARD_READ_VALUE_MAX) {
        if (!(*big = malloc(full)))
            return -ENOMEM;
        rc = shard_get(s, key, klen, 0, *big, full, &full);
    }
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    *jval = *big ? *big : buf;
    *jlen = (size_t)rc;
    return 0;
}

/* Hand one gathered record to fn with its joined value read by a get. */
static int deliver_gathered(struct shard *s, const struct shard_join *j, const uint8_t *k,
                            size_t kl, const uint8_t *v, size_t vl, uint8_t *buf,
                            shard_join_fn fn, void *ctx)
{
    const uint8_t *jval;
    uint8_t *big;
    size_t jlen;
    int rc = shard_join_get(s, j, v, vl, buf, &big, &jval, &jlen);

    if (rc == 0)
        rc = fn(ctx, k, kl, v, vl, jval, jlen);
    free(big);
    return rc;
}

int shard_scan_join(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                    const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    struct gathered g = {0};
    uint8_t *buf = NULL;
    int rc = shard_join_check(j);

    if (rc)
        return rc;
    if (s->ops->scan_join)
        return s->ops->scan_join(s, start, slen, end, elen, j, fn, ctx);
    rc = shard_scan(s, start, slen, end, elen, gather_one, &g);
    if (rc == 0 && g.len && !(buf = malloc(SHARD_READ_VALUE_MAX)))
        rc = -ENOMEM;
    for (size_t p = 0; rc == 0 && p < g.len;) {
        size_t kl, vl;

        memcpy(&kl, g.buf + p, sizeof(kl));
        memcpy(&vl, g.buf + p + sizeof(kl), sizeof(vl));
        p += 2 * sizeof(size_t);
        rc = deliver_gathered(s, j, g.buf + p, kl, g.buf + p + kl, vl, buf, fn, ctx);
        p += kl + vl;
    }
    free(buf);
    free(g.buf);
    return rc;
}
