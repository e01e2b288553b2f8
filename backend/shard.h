/* shard.h -- the shard interface.
 *
 * A shard is an ordered map from binary keys (1..511 bytes) to binary values,
 * with atomic batches. The filesystem layer talks to every shard through this
 * table and never knows whether a shard is a local LMDB environment
 * (shard_lmdb.c) or, later, a remote one over HTTP, or a fault-injecting
 * wrapper in tests.
 *
 * Errors: every slot returns 0 (or a count) on success and a negative errno:
 *   -ENOENT  key not found          -EEXIST  BATCH_ASSERT_ABSENT failed
 *   -EAGAIN  BATCH_ASSERT_VALUE failed (the caller re-reads and retries)
 *   -ENOTEMPTY  BATCH_ASSERT_EMPTY failed
 *   -ENOSPC  out of space           -EIO     anything the store cannot explain
 *
 * Consistency: a successful apply() is visible to every later call on any
 * thread, and survives the death of the process (kill -9). sync() makes every
 * applied batch survive power loss as well.
 *
 * Threads: all slots may be called from any thread concurrently.
 *
 * Not waiting: a thread that must never wait (a node server's I/O thread,
 * which serves many connections) brackets its calls with
 * shard_nowait_begin() and shard_nowait_end(). In between, a slot that would
 * wait for the disk, for another node or for a lock another thread holds
 * MUST instead return -EWOULDBLOCK at once, having changed nothing, after
 * calling shard_nowait_refuse(); shard_nowait_end() then returns 1 and the
 * caller does the work again on a thread that may wait. On a local shard
 * whose lock is free, reads and scans are done (the caller bounds a scan),
 * and so is an apply that needs no commit and no new look at the disk's
 * free space (its redo log write goes to the page cache); a sync, a scan of
 * several shards and everything remote are refused. The mode is per thread
 * and does not nest.
 */
#ifndef SHARDFS_SHARD_H
#define SHARDFS_SHARD_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "batch.h"

/* How long a batch led by BATCH_AWAIT_VALUE (batch.h) may wait at its
 * shard for the key to hold the value: the sender's batch before it is in
 * flight, and arrives within a round trip. */
#define SHARD_AWAIT_MS 500u

struct shard;

/* Scan callback: key and value are borrowed for the duration of the call only.
 * Return 0 to go on, 1 to stop early, or a negative errno to abort the scan
 * (the scan returns it). The callback MUST NOT call into the same shard. */
typedef int (*shard_scan_fn)(void *ctx, const uint8_t *key, size_t klen, const uint8_t *val,
                             size_t vlen);

/* One read of shard_get_many(). The key is key[0..klen), followed, when link
 * is not 0, by the first link bytes of the previous read's value (a pointer
 * chase: a directory entry names the inode to read next). The value's first
 * buflen bytes (at most SHARD_READ_VALUE_MAX) land in buf. */
#define SHARD_READS_MAX 16u
#define SHARD_READ_VALUE_MAX (64u << 10)
struct shard_read {
    const uint8_t *key;
    size_t klen;
    size_t link;
    void *buf;
    size_t buflen;
    /* out */
    int rc;                 /* 0, -ENOENT (or the linked read's was), -EINVAL */
    size_t len;             /* bytes copied into buf */
    size_t vlen;            /* the whole value's length */
};

/* The join of shard_scan_join(): each record's value names a second key,
 * prefix || the value's first `link` bytes (a directory entry names its
 * inode), read as of the same moment on the same shard. */
#define SHARD_JOIN_PREFIX_MAX 16u
struct shard_join {
    const uint8_t *prefix;  /* 1..SHARD_JOIN_PREFIX_MAX bytes */
    size_t plen;
    size_t link;            /* 1..BATCH_KEY_MAX - plen */
};

/* Scan-with-join callback: as shard_scan_fn, plus the joined key's value
 * (borrowed likewise), or jval NULL and jlen 0 when that key is not on this
 * shard or the value is shorter than the link. */
typedef int (*shard_join_fn)(void *ctx, const uint8_t *key, size_t klen, const uint8_t *val,
                             size_t vlen, const uint8_t *jval, size_t jlen);

struct shard_stat {
    uint64_t records;       /* keys in the shard */
    uint64_t bytes;         /* bytes used by the store */
    uint64_t pending;       /* batches applied but not yet synced */
};

struct shard_ops {
    /* MUST: copy at most buflen bytes of the value of key, starting at byte
     * off, into buf. Returns the bytes copied (0 if off >= value length) and
     * stores the full value length in *vlen; -ENOENT if the key is absent. */
    int (*get)(struct shard *s, const void *key, size_t klen, size_t off, void *buf,
               size_t buflen, size_t *vlen);
    /* MUST: call fn for every key in [start, end) in key order; end NULL means
     * "to the end". Returns 0, or what fn returned when it stopped (1 or <0). */
    int (*scan)(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                shard_scan_fn fn, void *ctx);
    /* MUST: apply an encoded batch atomically: all of it or none of it. */
    int (*apply)(struct shard *s, const struct batch *b);
    /* MUST: make every applied batch durable against power loss. */
    int (*sync)(struct shard *s);
    /* MAY: do n (1..SHARD_READS_MAX) reads as of one moment: one round trip
     * for a remote shard. Each read's outcome is in its rc; the call returns
     * 0, or a negative errno when none could be done (-EINVAL for a bad
     * list, the transport's errors). Without it, shard_get_many() does the
     * reads one get at a time. */
    int (*get_many)(struct shard *s, struct shard_read *r, unsigned n);
    /* MAY: scan as scan() does, handing fn each record with the value of
     * the key its value names (struct shard_join), both as of one moment:
     * one round trip for a remote shard. Without it, shard_scan_join()
     * scans, then gets each joined key. */
    int (*scan_join)(struct shard *s, const void *start, size_t slen, const void *end,
                     size_t elen, const struct shard_join *j, shard_join_fn fn, void *ctx);
    /* MAY (wrappers): the remote shard an op on s goes to now, when it goes
     * there without any bookkeeping by s, else NULL. Lets a fan-out
     * (shard_scan_many) ask many remote shards at once through wrappers. */
    struct shard *(*remote_now)(struct shard *s);
    /* MAY: fill counters; -ENOSYS if unknown. */
    int (*stat)(struct shard *s, struct shard_stat *st);
    /* MAY (pass-through wrappers, as a resharding's mirror): the shard s
     * wraps, so that a server serving s still finds the replicated
     * primary's wrapper under it (shard_unwrap). */
    struct shard *(*inner)(struct shard *s);
    /* MUST: flush, sync and free; s is gone afterwards. NULL-safe in wrapper. */
    void (*close)(struct shard *s);
};

/* Every implementation embeds this first. */
struct shard {
    const struct shard_ops *ops;
    unsigned index;         /* shard number in the store */
};

/* Enter or leave the calling thread's no-waiting mode (above);
 * shard_nowait_end() returns 1 if a slot refused since the begin, else 0. */
void shard_nowait_begin(void);
int shard_nowait_end(void);
/* For implementations: 1 if the thread is in no-waiting mode (the refusal is
 * then recorded, so return -EWOULDBLOCK), 0 if the slot may wait. */
int shard_nowait_refuse(void);
/* For implementations that can try first (a lock): 1 if waiting is not
 * allowed; call shard_nowait_refuse() when the try fails. */
int shard_nowait_active(void);

static inline int shard_get(struct shard *s, const void *k, size_t kl, size_t off, void *buf,
                            size_t buflen, size_t *vlen)
{
    return s->ops->get(s, k, kl, off, buf, buflen, vlen);
}
static inline int shard_scan(struct shard *s, const void *start, size_t sl, const void *end,
                             size_t el, shard_scan_fn fn, void *ctx)
{
    return s->ops->scan(s, start, sl, end, el, fn, ctx);
}
static inline int shard_apply(struct shard *s, const struct batch *b)
{
    if (b->error)
        return b->error;
    return s->ops->apply(s, b);
}
static inline int shard_sync(struct shard *s)
{
    return s->ops->sync(s);
}
/* The key of read i of r, resolved (its link followed): 0 and the length in
 * *klen, or the read's rc when it cannot be made (the linked read failed:
 * -ENOENT; too short a value, a bad or over-long key: -EINVAL). */
int shard_read_key(const struct shard_read *r, unsigned i, uint8_t out[BATCH_KEY_MAX],
                   size_t *klen);
/* Check a read list before doing it: 0 or -EINVAL. */
int shard_reads_check(const struct shard_read *r, unsigned n);
/* s->ops->get_many, or the reads one get at a time when s has none. */
int shard_get_many(struct shard *s, struct shard_read *r, unsigned n);

/* Check a join: 0 or -EINVAL. */
int shard_join_check(const struct shard_join *j);
/* The joined key of a record's value: 0 and its length in *klen, or -ENOENT
 * when the value is shorter than the link. */
int shard_join_key(const struct shard_join *j, const uint8_t *val, size_t vlen,
                   uint8_t out[BATCH_KEY_MAX], size_t *klen);
/* The joined value of a record whose value is val, read from s by a get:
 * into buf (SHARD_READ_VALUE_MAX bytes), or, when longer, into a buffer of
 * its own in *big (the caller frees it, NULL otherwise). 0 with *jval and
 * *jlen (NULL and 0: no such key, or val shorter than the link), or
 * -errno. For joins done by hand. */
int shard_join_get(struct shard *s, const struct shard_join *j, const uint8_t *val, size_t vlen,
                   uint8_t *buf, uint8_t **big, const uint8_t **jval, size_t *jlen);
/* s->ops->scan_join, or (a shard without one) a scan whose records are
 * gathered, then each joined key read with a get: not one moment. */
int shard_scan_join(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                    const struct shard_join *j, shard_join_fn fn, void *ctx);

static inline int shard_stat(struct shard *s, struct shard_stat *st)
{
    return s->ops->stat ? s->ops->stat(s, st) : -ENOSYS;
}
static inline void shard_close(struct shard *s)
{
    if (s)
        s->ops->close(s);
}

/* s without its pass-through wrappers (ops->inner); NULL-safe. */
static inline struct shard *shard_unwrap(struct shard *s)
{
    while (s && s->ops->inner)
        s = s->ops->inner(s);
    return s;
}

#endif
