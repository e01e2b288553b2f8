/* shard_lmdb.h -- a shard in one local LMDB environment.
 *
 * DESIGN (durability with batched syncs)
 * Each shard keeps one long-lived LMDB write transaction under a mutex; every
 * get, scan and batch runs inside it, so readers see every applied batch. A
 * batch is applied in a nested transaction and appended, with a sequence
 * number and checksum, to the shard's redo log with one write(2) before
 * apply() returns: the kernel has it, so it survives kill -9 of the daemon.
 * The parent transaction is committed every commit_interval_ms, when more
 * than commit_bytes are pending, or on sync(). LMDB syncs a commit's data
 * pages before it writes the meta page (MDB_NOMETASYNC: the meta page itself
 * is synced by the next commit or by sync()), so a machine crash leaves one
 * of the last two committed states, never a corrupt file. The committed state
 * records the last log sequence number it contains. There are two logs, used
 * in turns: a log is rewound only once all its records are inside a commit
 * whose meta page is surely on disk (the one before the last), so the
 * batches a power cut can take out of LMDB are always still in a log. On
 * open, the records of both logs newer than that number are replayed in
 * order (a torn, corrupt or out-of-sequence record ends a log's part); the
 * result is committed and synced before the logs are emptied. Batches after
 * the surviving commit are lost in a machine crash unless the log reached
 * the disk; sync() (fsync) makes everything applied survive power loss. Free
 * pages are given back to the filesystem (hole punching) on a disk running
 * low, only those no surviving state can use (see free_pages_punch()).
 * tests/crashsim/ checks all of this against simulated power cuts.
 *
 * The environment uses MDB_NOLOCK (all access is through our own mutex, and
 * the store directory is flock()ed by the daemon) and a large map that grows
 * as needed. A failed commit (a full disk) keeps the log; the transaction is
 * rebuilt from the log and the commit retried later, so nothing acknowledged
 * is lost. A batch is admitted only if the disk can take everything pending,
 * so disk-full surfaces as -ENOSPC from apply() while the shard stays
 * committable.
 *
 * STREAM (issue 10): every applied batch gets a position (stream.h) and an
 * entry 'L' lsn:u64be -> epoch:u64le check:u64le time_ms:u64le batch, put
 * in the same nested transaction as the batch's data together with the
 * shard's position ("Mpos"). The redo log record carries the position and
 * time in its header (not the entry: the batch bytes are logged once), and
 * replay rebuilds the entry and "Mpos" from it, so a committed or replayed
 * state holds exactly the position of its last batch. LSNs come from a
 * durable reservation ("Mlsn", committed and synced, above every lsn handed
 * out): at open the next lsn starts at the reservation (a gap, never a
 * reuse), and it is raised at commits well before it is reached. Old entries
 * are trimmed at commits (size, age, holds); "Mbase" is the position just
 * before the oldest retained entry. See DESIGN.md "Change stream".
 */
#ifndef SHARDFS_SHARD_LMDB_H
#define SHARDFS_SHARD_LMDB_H

#include "shard.h"
#include "stream.h"

struct shard_lmdb_options {
    unsigned commit_interval_ms;    /* 0 means 200 */
    size_t commit_bytes;            /* commit when this much is pending; 0 means 32 MiB */
    size_t stream_bytes;            /* stream retention by size; 0 means 64 MiB */
    unsigned stream_age_ms;         /* stream retention by age; 0 means 10 min */
    uint64_t lsn_step;              /* how far the durable lsn reservation runs
                                     * ahead; 0 means 2^20 (tests: small, so
                                     * it is raised often) */
    int no_stream;                  /* keep positions but no 'L' entries: a
                                     * shard without replicas, which would
                                     * pay for a second copy of every batch
                                     * in LMDB for nobody (the stream's base
                                     * follows the position, so a reader of
                                     * any older position gets -ERANGE) */
};

/* Open (creating if needed) the shard in directory dir, replaying its redo
 * log. Returns 0 and *out, or -errno with a reason in err. */
int shard_lmdb_open(const char *dir, unsigned index, const struct shard_lmdb_options *opt,
                    struct shard **out, char *err, size_t errlen);

/* Commit the shard if it has pending batches older than its interval (or
 * force). Called by the flusher thread; returns 0 or -errno. */
int shard_lmdb_flush(struct shard *s, int force);

/* Map an LMDB return code to a negative errno. */
int shard_lmdb_errno(int mdb_rc);

/* ---- the change stream (issue 10; see "STREAM" above and stream.h) ----
 * Every function below takes a shard opened by shard_lmdb_open() (never a
 * remote one) and is safe from any thread. */

/* The shard's position: the last batch applied ({0,0,0} if none). -EAGAIN
 * while a snapshot is in progress (also after a restart mid-snapshot): the
 * shard is not a usable copy until shard_lmdb_snapshot_done(). */
int shard_lmdb_position(struct shard *s, struct stream_pos *out);

/* The epoch new batches of this (primary) shard get; set by the map's owner.
 * Until set, the epoch of the shard's last batch (0 for an empty shard). */
void shard_lmdb_set_epoch(struct shard *s, uint64_t epoch);

/* shard_apply() that also returns the new batch's position in *out (out may
 * be NULL). An empty batch changes nothing and returns the current position.
 * Errors as shard_apply(); -EBUSY while a snapshot is in progress. */
int shard_lmdb_apply_pos(struct shard *s, const struct batch *b, struct stream_pos *out);

/* Replica side: apply b at pos, which must continue this shard's history:
 * pos->lsn > current lsn and pos->check == stream_check_next(current check,
 * pos->epoch, pos->lsn, b) (else -ESTALE, nothing changed). Asserts in b are
 * NOT checked and there is no early space admission (a replica must not
 * refuse what its primary accepted); a real ENOSPC/EIO is returned. Written
 * to the redo log like any apply before it returns (kill -9 safe). -EAGAIN
 * while a snapshot is in progress; -EINVAL for an empty or failed batch. */
int shard_lmdb_apply_at(struct shard *s, const struct stream_pos *pos, const struct batch *b);

/* Call fn for each retained entry after `after`, in order, until about
 * max_bytes were handed out (at least one entry). Returns the count (0: none
 * newer), -ERANGE when entries after `after` are no longer retained (the
 * reader needs a snapshot), -ESTALE when `after` is not a position of this
 * history (no entry with that lsn and check, and not the shard's base): a
 * diverged copy, which needs a snapshot too. -EAGAIN while a snapshot is in
 * progress. fn's pointers are borrowed for the call; fn runs under the
 * shard's lock and MUST NOT call into the shard; it returns 0 to go on, 1 to
 * stop after this entry (it counts), or a negative errno, returned as is. */
typedef int (*stream_entry_fn)(void *ctx, const struct stream_pos *p, uint64_t time_ms,
                               const uint8_t *batch, size_t len);
int shard_lmdb_stream_read(struct shard *s, const struct stream_pos *after, size_t max_bytes,
                           stream_entry_fn fn, void *ctx);

/* Retention: entries are trimmed (at commit time) beyond
 * options.stream_bytes and stream_age_ms, EXCEPT those after a hold. A hold
 * is a slot (0..SHARD_LMDB_HOLDS-1, e.g. one per replica node index) with an
 * lsn: keep every entry after it. lsn UINT64_MAX releases the slot (all are
 * released at open). Holds are in memory. A slot out of range is ignored. */
#define SHARD_LMDB_HOLDS 64
void shard_lmdb_stream_hold(struct shard *s, unsigned slot, uint64_t lsn);

/* Called (no shard lock held) after every batch applied (apply, apply_pos,
 * apply_at), with the shard's index and the batch's position: for waking
 * long polls. One listener; fn NULL removes it (once this returns, no call
 * is running or will start). fn may call into the shard, except
 * shard_lmdb_on_apply() itself. */
void shard_lmdb_on_apply(struct shard *s,
                         void (*fn)(void *ctx, unsigned index, const struct stream_pos *p),
                         void *ctx);

/* Snapshot (fuzzy, Redis/ARIES style; no LMDB read txns: MDB_NOLOCK forbids
 * them). A replica catching up from scratch:
 * 1. shard_lmdb_snapshot_begin(): the shard empties itself (every record but
 *    its own local 'M' records: Mseq, Mpos, Mbase, Mlsn, Msnap) and marks
 *    itself "snapshot in progress", committed and synced before it returns.
 *    From then on, also after a restart, shard_lmdb_position() (and
 *    stream_read, apply_at, apply_pos) return -EAGAIN / -EBUSY.
 * 2. shard_lmdb_load() for each page of the primary's records (taken with
 *    the scan route AFTER the primary's position P0 was read): plain puts,
 *    no position, no stream entry; keys of 'L' records and of the local 'M'
 *    records above are skipped (they describe the primary, not this copy).
 *    Only BATCH_PUT and BATCH_DEL items (else -EINVAL, nothing changed).
 *    Logged like any apply (kill -9 safe). -EINVAL without a snapshot begun.
 * 3. shard_lmdb_snapshot_done(P0): the position (and the stream's base)
 *    becomes P0 and the mark goes, in one logged record; the replica then
 *    applies the primary's stream after P0 with apply_at. Replaying (P0, now]
 *    over the fuzzy copy gives the exact state (blind ops, last wins).
 * A crash before done's record is on disk leaves the mark: begin again. */
int shard_lmdb_snapshot_begin(struct shard *s);
int shard_lmdb_load(struct shard *s, const struct batch *b);
int shard_lmdb_snapshot_done(struct shard *s, const struct stream_pos *base);

/* ---- a copy's content checksum (`shardfs fsck --replicas`) ----
 *
 * shard_lmdb_checksum: XXH3-128 over every record of the shard that a scan
 * shows, in key order, each as u32le klen, key, u32le vlen, value; and the
 * position it was taken at. Left out are exactly the records that describe
 * one copy rather than the data, which two faithful copies hold differently
 * (key_is_local in shard_lmdb.c, the ones a snapshot neither empties nor
 * copies): "Mseq" (this copy's redo log sequence), "Mpos" (the position:
 * reported beside the digest, not in it), "Mbase" and the 'L' entries (how
 * much stream this copy retains: trimmed by size, age and the holds of its
 * own replicas, so a replica and its primary keep different tails of one
 * history; the position's rolling check already vouches for the history),
 * "Mlsn" (this copy's lsn reservation) and "Msnap". Two copies at the same
 * position with the same digest hold the same data, byte for byte.
 *
 * The pass takes the shard's lock in pieces (about SHARD_LMDB_SUM_PIECE
 * bytes each), so reads go on between them; the position must be the same
 * at every piece, else -EAGAIN: the caller must keep batches out for the
 * pass (the primary freezes its writes, a replica pauses applying).
 * 0 and *out; -EAGAIN also during a snapshot; LMDB's errors. Any thread;
 * not in no-waiting mode (it waits for the lock). */
#define SHARD_LMDB_SUM_LEN 16
#define SHARD_LMDB_SUM_PIECE (4u << 20)
struct shard_lmdb_sum {
    struct stream_pos pos;                /* the position hashed at */
    uint8_t digest[SHARD_LMDB_SUM_LEN];   /* XXH3-128, canonical (big-endian) */
    uint64_t records, bytes;              /* hashed: records, key + value bytes */
};
int shard_lmdb_checksum(struct shard *s, struct shard_lmdb_sum *out);

/* The same pass over whatever the shard holds while batches go on, for
 * its reads alone: brings a copy's pages into the page cache before a
 * pass that holds writes (a cold pass reads the disk a page at a time,
 * ~100x slower here). 0 or LMDB's errors. */
int shard_lmdb_warm(struct shard *s);

#endif
