/* stream.h -- positions and entries of a shard's change stream.
 *
 * Every batch a shard applies gets a POSITION: the shard epoch of the
 * primary that made it, an LSN (strictly increasing on a shard, gaps
 * allowed, never handed to two batches, also across a machine crash; see
 * shard_lmdb.h) and a rolling checksum of the whole history up to and
 * including it (LiteFS-style): two copies of a shard at the same lsn with
 * the same check have applied the same batches. {0,0,0} is the empty shard.
 *
 * An ENTRY is one batch with its position and the wall-clock time (ms since
 * the epoch) the shard applied it, encoded for the wire and for a buffer of
 * several entries (little-endian, concatenated, self-delimiting):
 *
 *   epoch:u64le  lsn:u64le  check:u64le  time_ms:u64le  len:u32le  batch[len]
 *
 * The checksum is XXH3-64 (frozen since xxHash 0.8.0, so every node and
 * version agrees) of the batch, seeded with XXH3-64 of (prev, epoch, lsn).
 *
 * Pure functions, no state; decoding checks every length against the buffer
 * and never reads past it.
 */
#ifndef SHARDFS_STREAM_H
#define SHARDFS_STREAM_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>

struct stream_pos {
    uint64_t epoch, lsn, check;
};

/* The check of the batch at (epoch, lsn) that follows a history whose last
 * check is prev_check (0 for the empty shard). */
uint64_t stream_check_next(uint64_t prev_check, uint64_t epoch, uint64_t lsn,
                           const uint8_t *batch, size_t len);

/* 1 if a and b are the same position (all three fields). */
static inline int stream_pos_eq(const struct stream_pos *a, const struct stream_pos *b)
{
    return a->epoch == b->epoch && a->lsn == b->lsn && a->check == b->check;
}

/* A position as text: "E/L/C" in decimal (STREAM_POS_FMT, wire.h's
 * X-Shardfs-Position). stream_pos_parse: 0 and *p, or -EINVAL (not three
 * decimal u64 separated by '/', or anything after them). */
#define STREAM_POS_FMT "%" PRIu64 "/%" PRIu64 "/%" PRIu64
#define STREAM_POS_TEXT_MAX 64 /* with the NUL */
int stream_pos_parse(const char *text, struct stream_pos *p);

#define STREAM_ENTRY_HDR 36u

/* Encode one entry into out, which must hold STREAM_ENTRY_HDR + len bytes.
 * Returns the bytes written. len must be at most BATCH_MAX (batch.h). */
size_t stream_entry_encode(uint8_t *out, const struct stream_pos *p, uint64_t time_ms,
                           const uint8_t *batch, size_t len);

/* Walk a buffer of concatenated entries; *pos starts at 0. Returns 1 and the
 * fields (batch points into buf, borrowed), 0 at the end of buf, -EINVAL on
 * a malformed entry: a truncated header or batch, a batch longer than
 * BATCH_MAX or not a valid batch encoding (batch_validate). Never reads past
 * len; *pos is left at the malformed entry. */
int stream_entry_next(const uint8_t *buf, size_t len, size_t *pos, struct stream_pos *p,
                      uint64_t *time_ms, const uint8_t **batch, size_t *blen);

/* A growing buffer of encoded entries, filled by stream_buf_add (a
 * shard_lmdb_stream_read callback): the body of a stream reply or a push.
 * upto: stop after the entry at this lsn (0: no limit). limit: never grow
 * len past it, but for the first entry (0: no limit). buf is malloc()ed;
 * the owner frees it. */
struct stream_buf {
    uint8_t *buf;
    size_t len, cap;
    uint64_t upto;
    size_t limit;
};

/* Append one entry to ctx (a struct stream_buf). 0 to go on, 1 to stop
 * (the entry at upto was added, or this one is left out: limit), -ENOMEM. */
int stream_buf_add(void *ctx, const struct stream_pos *p, uint64_t time_ms, const uint8_t *batch,
                   size_t len);

#endif
