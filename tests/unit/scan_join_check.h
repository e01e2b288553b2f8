/* scan_join_check.h -- the checks of shard_scan_join() every shard must pass
 * (test-only; included by test_shard_lmdb.c and test_shard_remote.c after
 * check.h).
 *
 * sj_fill(s, tag) puts SJ_N records "\x0b" tag j in s, each value naming a
 * second key "\x0c" + its first two bytes (tag, j); that key exists for even
 * j only, with a value whose length depends on j; the last record's value is
 * one byte, shorter than the link. sj_fn checks every record a joined scan
 * hands over against that: the joined value present and exact for even j,
 * absent for the others. check_scan_join(s, tag) scans one shard with the
 * join, stops early with 1, passes a callback's error through, and refuses
 * bad joins (-EINVAL).
 */
#ifndef SHARDFS_TESTS_UNIT_SCAN_JOIN_CHECK_H
#define SHARDFS_TESTS_UNIT_SCAN_JOIN_CHECK_H

#include <string.h>

#include "batch.h"
#include "shard.h"

#define SJ_N 40u

static const uint8_t sj_prefix[1] = {0x0c};
static const struct shard_join sj_join = {.prefix = sj_prefix, .plen = 1, .link = 2};

/* The joined value of (tag, j): 3 + j * 7 bytes of a pattern. */
static size_t sj_joined(uint8_t tag, unsigned j, uint8_t *out)
{
    size_t n = 3 + (size_t)j * 7;

    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)(tag * 31 + j * 7 + i);
    return n;
}

static int sj_fill(struct shard *s, uint8_t tag)
{
    struct batch b;
    uint8_t k[4], v[3], jv[512];
    int rc;

    batch_init(&b);
    for (unsigned j = 0; j < SJ_N; j++) {
        k[0] = 0x0b, k[1] = tag, k[2] = (uint8_t)j;
        v[0] = tag, v[1] = (uint8_t)j, v[2] = 'v';
        batch_put(&b, k, 3, v, j == SJ_N - 1 ? 1 : 3);
        if (j % 2 == 0 && j != SJ_N - 1) {
            k[0] = 0x0c, k[1] = tag, k[2] = (uint8_t)j;
            batch_put(&b, k, 3, jv, sj_joined(tag, j, jv));
        }
    }
    rc = shard_apply(s, &b);
    batch_free(&b);
    return rc;
}

struct sj_collect {
    unsigned count, joined, wrong, stop_at;
    int ret; /* returned at stop_at */
    uint8_t last[BATCH_KEY_MAX];
    size_t last_len;
};

static int sj_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl,
                 const uint8_t *jv, size_t jl)
{
    struct sj_collect *c = ctx;
    uint8_t want[512];
    unsigned j;

    if (kl != 3 || k[0] != 0x0b || vl < 1 || v[0] != k[1]) {
        c->wrong++;
        goto out;
    }
    if (c->count && (kl < c->last_len ? memcmp(k, c->last, kl) <= 0
                                      : memcmp(k, c->last, c->last_len) <= 0))
        c->wrong++; /* out of order */
    j = k[2];
    if (j % 2 == 0 && j != SJ_N - 1) {
        size_t n = sj_joined(k[1], j, want);
        if (!jv || jl != n || memcmp(jv, want, n) != 0)
            c->wrong++;
        c->joined++;
    } else if (jv || jl) {
        c->wrong++;
    }
out:
    memcpy(c->last, k, kl < sizeof(c->last) ? kl : sizeof(c->last));
    c->last_len = kl;
    c->count++;
    if (c->stop_at && c->count == c->stop_at)
        return c->ret;
    return 0;
}

/* SJ_N records of tag on s, sj_fill()ed before. */
static void check_scan_join(struct shard *s, uint8_t tag, const char *what)
{
    struct sj_collect c = {0};
    uint8_t start[2] = {0x0b, tag}, end[2] = {0x0b, (uint8_t)(tag + 1)};
    const struct shard_join no_prefix = {.prefix = sj_prefix, .plen = 0, .link = 2};
    const struct shard_join no_link = {.prefix = sj_prefix, .plen = 1, .link = 0};
    const struct shard_join too_long = {.prefix = sj_prefix, .plen = 1, .link = BATCH_KEY_MAX};
    int rc = shard_scan_join(s, start, 2, end, 2, &sj_join, sj_fn, &c);

    CHECKF(rc == 0 && c.count == SJ_N && c.joined == SJ_N / 2 && c.wrong == 0,
           "%s: scan with join: rc %d, %u records, %u joined, %u wrong", what, rc, c.count,
           c.joined, c.wrong);
    memset(&c, 0, sizeof(c));
    c.stop_at = 7, c.ret = 1;
    rc = shard_scan_join(s, start, 2, end, 2, &sj_join, sj_fn, &c);
    CHECKF(rc == 1 && c.count == 7 && c.wrong == 0, "%s: stopped scan with join: rc %d, %u", what,
           rc, c.count);
    memset(&c, 0, sizeof(c));
    c.stop_at = 3, c.ret = -ECANCELED;
    rc = shard_scan_join(s, start, 2, end, 2, &sj_join, sj_fn, &c);
    CHECKF(rc == -ECANCELED && c.count == 3, "%s: failed scan with join: rc %d", what, rc);
    CHECKF(shard_scan_join(s, start, 2, end, 2, &no_prefix, sj_fn, &c) == -EINVAL &&
               shard_scan_join(s, start, 2, end, 2, &no_link, sj_fn, &c) == -EINVAL &&
               shard_scan_join(s, start, 2, end, 2, &too_long, sj_fn, &c) == -EINVAL &&
               shard_scan_join(s, start, 2, end, 2, NULL, sj_fn, &c) == -EINVAL,
           "%s: bad joins are refused", what);
}

#endif
