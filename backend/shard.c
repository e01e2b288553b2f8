/* shard.c -- what every shard implementation shares: resolving the keys of a
 * shard_get_many() list, doing the list one get at a time for a shard that
 * has no get_many of its own (test wrappers), and the per-thread no-waiting
 * mode (shard.h). */
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
