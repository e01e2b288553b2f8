/* get_many_check.h -- the checks of shard_get_many() every shard must pass
 * (test-only; included by test_shard_lmdb.c and test_shard_remote.c after
 * check.h).
 *
 * check_get_many(s) puts a few records in s, then reads them back in lists:
 * plain reads, an absent key among present ones, links (a key followed by
 * the first bytes of the previous value: found, pointing nowhere, from an
 * absent read, from too short a value), a value longer than its buffer
 * (len cut, vlen whole), a zero-length buffer, binary keys and values, a
 * linked key reaching BATCH_KEY_MAX exactly, and the bad lists that must
 * give -EINVAL (empty, too many reads, a link on the first read, a key made
 * longer than BATCH_KEY_MAX by its link, a buffer over SHARD_READ_VALUE_MAX).
 */
#ifndef SHARDFS_TESTS_UNIT_GET_MANY_CHECK_H
#define SHARDFS_TESTS_UNIT_GET_MANY_CHECK_H

#include <string.h>

#include "batch.h"
#include "shard.h"

static int gm_put(struct shard *s, const void *k, size_t kl, const void *v, size_t vl)
{
    struct batch b;
    int rc;

    batch_init(&b);
    batch_put(&b, k, kl, v, vl);
    rc = shard_apply(s, &b);
    batch_free(&b);
    return rc;
}

static void gm_read(struct shard_read *r, const void *key, size_t klen, size_t link, void *buf,
                    size_t buflen)
{
    memset(r, 0, sizeof(*r));
    r->key = key;
    r->klen = klen;
    r->link = link;
    r->buf = buf;
    r->buflen = buflen;
    r->rc = 12345; /* must be overwritten */
}

static void check_get_many(struct shard *s)
{
    /* "E\0dir" -> "ID1\xff..." : a pointer; "I" + "ID1\xff" -> the target */
    static const uint8_t ptr_key[] = {'E', 0x00, 'd', 'i', 'r'};
    static const uint8_t ptr_val[] = {'I', 'D', '1', 0xff, 0x00, 'x'};
    static const uint8_t tgt_key[] = {'I', 'I', 'D', '1', 0xff};
    static const uint8_t tgt_val[] = {0x00, 't', 'a', 'r', 'g', 'e', 't', 0xff};
    uint8_t long_key[BATCH_KEY_MAX], big[3000];
    uint8_t b[6][4096];
    struct shard_read r[SHARD_READS_MAX + 1];

    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (uint8_t)(i * 13 + 1);
    memset(long_key, 'K', sizeof(long_key)); /* not 'L': the stream's type */
    memcpy(long_key + sizeof(long_key) - 4, "ID1\xff", 4);
    CHECK_RC(gm_put(s, ptr_key, sizeof(ptr_key), ptr_val, sizeof(ptr_val)), 0);
    CHECK_RC(gm_put(s, tgt_key, sizeof(tgt_key), tgt_val, sizeof(tgt_val)), 0);
    CHECK_RC(gm_put(s, "big", 3, big, sizeof(big)), 0);
    CHECK_RC(gm_put(s, "short", 5, "ab", 2), 0);
    CHECK_RC(gm_put(s, long_key, sizeof(long_key), "long", 4), 0);

    /* the pointer chase, one absent key, a plain read */
    gm_read(&r[0], ptr_key, sizeof(ptr_key), 0, b[0], 64);
    gm_read(&r[1], "I", 1, 4, b[1], 64);
    gm_read(&r[2], "nothing", 7, 0, b[2], 64);
    gm_read(&r[3], "big", 3, 0, b[3], sizeof(big));
    CHECK_RC(shard_get_many(s, r, 4), 0);
    CHECK(r[0].rc == 0 && r[0].len == sizeof(ptr_val) && r[0].vlen == sizeof(ptr_val));
    CHECK(memcmp(b[0], ptr_val, sizeof(ptr_val)) == 0);
    CHECK(r[1].rc == 0 && r[1].len == sizeof(tgt_val) && r[1].vlen == sizeof(tgt_val));
    CHECK(memcmp(b[1], tgt_val, sizeof(tgt_val)) == 0);
    CHECK(r[2].rc == -ENOENT && r[2].len == 0);
    CHECK(r[3].rc == 0 && r[3].len == sizeof(big) && memcmp(b[3], big, sizeof(big)) == 0);

    /* links that lead nowhere: from an absent read, to an absent key, from
     * too short a value; a buffer shorter than the value; no buffer */
    gm_read(&r[0], "nothing", 7, 0, b[0], 64);
    gm_read(&r[1], "I", 1, 4, b[1], 64);
    gm_read(&r[2], "big", 3, 0, b[2], 100);
    gm_read(&r[3], "X", 1, 2, b[3], 64);
    gm_read(&r[4], "short", 5, 0, b[4], 64);
    gm_read(&r[5], "Y", 1, 3, b[5], 64);
    CHECK_RC(shard_get_many(s, r, 6), 0);
    CHECK(r[0].rc == -ENOENT);
    CHECK(r[1].rc == -ENOENT && r[1].len == 0);
    CHECK(r[2].rc == 0 && r[2].len == 100 && r[2].vlen == sizeof(big));
    CHECK(memcmp(b[2], big, 100) == 0);
    CHECK(r[3].rc == -ENOENT); /* "X" + big[0..2] is no key */
    CHECK(r[4].rc == 0 && r[4].len == 2 && memcmp(b[4], "ab", 2) == 0);
    CHECK(r[5].rc == -EINVAL); /* "ab" has no 3 bytes to follow */
    gm_read(&r[0], "big", 3, 0, NULL, 0);
    CHECK_RC(shard_get_many(s, r, 1), 0);
    CHECK(r[0].rc == 0 && r[0].len == 0 && r[0].vlen == sizeof(big));

    /* a linked key of exactly BATCH_KEY_MAX bytes */
    gm_read(&r[0], ptr_key, sizeof(ptr_key), 0, b[0], 64);
    gm_read(&r[1], long_key, sizeof(long_key) - 4, 4, b[1], 64);
    CHECK_RC(shard_get_many(s, r, 2), 0);
    CHECK(r[1].rc == 0 && r[1].len == 4 && memcmp(b[1], "long", 4) == 0);

    /* bad lists */
    CHECK_RC(shard_get_many(s, r, 0), -EINVAL);
    for (unsigned i = 0; i <= SHARD_READS_MAX; i++)
        gm_read(&r[i], "big", 3, 0, NULL, 0);
    CHECK_RC(shard_get_many(s, r, SHARD_READS_MAX), 0);
    CHECK_RC(shard_get_many(s, r, SHARD_READS_MAX + 1), -EINVAL);
    gm_read(&r[0], "I", 1, 4, b[0], 64);
    CHECK_RC(shard_get_many(s, r, 1), -EINVAL);
    gm_read(&r[0], ptr_key, sizeof(ptr_key), 0, b[0], 64);
    gm_read(&r[1], long_key, sizeof(long_key), 4, b[1], 64);
    CHECK_RC(shard_get_many(s, r, 2), -EINVAL);
    gm_read(&r[1], "big", 3, 0, big, SHARD_READ_VALUE_MAX + 1);
    CHECK_RC(shard_get_many(s, r, 2), -EINVAL);
}

#endif
