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
 */
#ifndef SHARDFS_SHARD_LMDB_H
#define SHARDFS_SHARD_LMDB_H

#include "shard.h"

struct shard_lmdb_options {
    unsigned commit_interval_ms;    /* 0 means 200 */
    size_t commit_bytes;            /* commit when this much is pending; 0 means 32 MiB */
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

#endif
