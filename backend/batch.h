/* batch.h -- an atomic list of operations on one shard.
 *
 * A batch is what a shard applies atomically: puts, deletes, range deletes and
 * preconditions (a key is absent, or holds exactly a given value). The encoded
 * form is also the record format of the shard redo log and, later, the body of
 * an HTTP batch request, so it is self-delimiting and checked on decode:
 *
 *   op:u8  klen:u32le  key  [vlen:u32le value]      (value for PUT, ASSERT_VALUE)
 *   DEL_RANGE and ASSERT_EMPTY carry their end key as the value: [key, end)
 *
 * Memory: a batch owns its buffer (batch_free); the iterator hands out pointers
 * into that buffer, valid until the batch changes or is freed. Not thread-safe.
 */
#ifndef SHARDFS_BATCH_H
#define SHARDFS_BATCH_H

#include <stddef.h>
#include <stdint.h>

#define BATCH_KEY_MAX 511u          /* LMDB's default key limit */
#define BATCH_VALUE_MAX (16u << 20) /* one value; chunks are far smaller */
#define BATCH_MAX (64u << 20)       /* one encoded batch */

enum batch_op {
    BATCH_PUT = 1,
    BATCH_DEL = 2,          /* deleting a missing key is not an error */
    BATCH_DEL_RANGE = 3,    /* every key in [key, end) */
    BATCH_ASSERT_ABSENT = 4, /* fails the batch with -EEXIST if key exists */
    BATCH_ASSERT_VALUE = 5,  /* fails with -EAGAIN unless key holds exactly value */
    BATCH_ASSERT_EMPTY = 6,  /* fails with -ENOTEMPTY if a key in [key, end) exists */
    /* BATCH_ASSERT_VALUE that the shard may wait for, up to SHARD_AWAIT_MS
     * (shard.h): the sender has a batch in flight that makes key hold
     * value (pipelined writes of one file). Only as a batch's first item. */
    BATCH_AWAIT_VALUE = 7,
};
#define BATCH_OP_MAX BATCH_AWAIT_VALUE

struct batch {
    uint8_t *buf;
    size_t len, cap;
    unsigned count;
    int error;              /* sticky: first -errno from a batch_add */
};

struct batch_item {
    enum batch_op op;
    const uint8_t *key, *val;
    size_t klen, vlen;
};

void batch_init(struct batch *b);
void batch_free(struct batch *b);
void batch_reset(struct batch *b);

/* Append one operation. Returns 0 or -ENAMETOOLONG (key), -EFBIG (value or
 * batch too large), -ENOMEM; the error also sticks in b->error so callers may
 * add several and check once. */
int batch_add(struct batch *b, enum batch_op op, const void *key, size_t klen,
              const void *val, size_t vlen);

static inline int batch_put(struct batch *b, const void *k, size_t kl, const void *v, size_t vl)
{
    return batch_add(b, BATCH_PUT, k, kl, v, vl);
}
static inline int batch_del(struct batch *b, const void *k, size_t kl)
{
    return batch_add(b, BATCH_DEL, k, kl, NULL, 0);
}

/* Append every operation of from to b (a copy; from is unchanged). Returns 0
 * or from's sticky error, -EFBIG or -ENOMEM, which also stick in b->error. */
int batch_append(struct batch *b, const struct batch *from);

/* Walk an encoded batch: *pos starts at 0. Returns 1 and fills *it, 0 at the
 * end, -EINVAL on a malformed encoding (never reads past len). */
int batch_next(const uint8_t *buf, size_t len, size_t *pos, struct batch_item *it);

/* Check a whole encoding; returns the op count or -EINVAL. */
int batch_validate(const uint8_t *buf, size_t len);

/* Key order, as the shards sort: bytes (memcmp), a prefix first. */
int batch_key_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen);
/* The smallest key after k (keys are at most BATCH_KEY_MAX bytes), for
 * paging a scan: k + "\0" when there is room; otherwise k with its last
 * byte incremented, 0xff bytes at the end dropped first (no key between k
 * and that one can exist, since every longer key with prefix k would be too
 * long). Returns the length, 0 when k is the largest key there is, or -1 for
 * a key that is too long. */
int batch_key_after(const uint8_t *k, size_t klen, uint8_t out[BATCH_KEY_MAX]);

#endif
