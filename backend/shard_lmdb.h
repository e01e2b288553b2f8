/* shard_lmdb.h -- a shard in one local LMDB environment.
 *
 * DESIGN (durability with batched syncs)
 * Each shard keeps one long-lived LMDB write transaction under a mutex; every
 * get, scan and batch runs inside it, so readers see every applied batch. A
 * batch is applied in a nested transaction and appended, with a sequence
 * number and checksum, to the shard's redo log with one write(2) before
 * apply() returns: the kernel has it, so it survives kill -9 of the daemon.
 * The parent transaction is committed with a full LMDB sync every
 * commit_interval_ms, when it holds more than a few MiB, or on sync(); the
 * committed state records the last sequence number it contains, and the log is
 * truncated. On open, log records newer than that number are replayed in order
 * (a torn or corrupt tail ends the replay). LMDB only ever commits with a full
 * sync, so a machine crash leaves the last committed state, never a corrupt
 * file; batches after it are lost unless the log reached the disk.
 *
 * The environment uses MDB_NOLOCK (all access is through our own mutex, and
 * the store directory is flock()ed by the daemon) and a large map that grows
 * as needed. A failed commit (a full disk) keeps the log; the transaction is
 * rebuilt from the log and the commit retried later, so nothing acknowledged
 * is lost. Disk-full surfaces as -ENOSPC from apply().
 */
#ifndef SHARDFS_SHARD_LMDB_H
#define SHARDFS_SHARD_LMDB_H

#include "shard.h"

struct shard_lmdb_options {
    unsigned commit_interval_ms;    /* 0 means 200 */
    size_t commit_bytes;            /* commit when this much is pending; 0 means 16 MiB */
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
