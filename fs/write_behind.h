/* write_behind.h -- writes to another node's shard, answered before they land.
 *
 * A write(2) of a file whose inode lives on another node's shard costs a
 * round trip to that node, and a writer that waits for each one (dd, cp,
 * fio: one write at a time) leaves both nodes idle half the time. So a
 * mount with other nodes takes such writes here: the bytes are copied into
 * a buffer of the file, the write is answered at once, and a worker thread
 * applies the buffer with ns_write() while the writer goes on. Writes that
 * come while a file's batch is in flight are gathered into its next one (up
 * to WB_BATCH_MAX bytes of one contiguous range), so the batches grow to
 * what the round trip allows, and the network and the two nodes work at
 * the same time (Nagle's rule: one batch in flight a file, the next one
 * gathering; no timer).
 *
 * The promise (DESIGN.md, "Writes through another node"): a write() that
 * returned is in this daemon's memory; close() (FLUSH), fsync() and the
 * release of the last descriptor return once every earlier write of the
 * file is applied on its shard, and report the first one that failed. A
 * failed batch is final: the batches gathered after it are dropped, and
 * every later write(), close() and fsync() of the file fails with its error
 * until a close or fsync has reported it; so what the store holds is the
 * file as it was before the failed write plus at most the failed batch's
 * bytes, never a later write without an earlier one.
 * Batches of one file are applied one at a time, in the order written.
 *
 * Coherence in this mount: anything that answers with a file's data or
 * attributes (read, getattr, lookup, readdirplus, open, setattr) drains the
 * file first (wb_drain), so this mount never sees its own writes missing.
 * Other nodes see them after the close, as close-to-open promises.
 *
 * Memory: at most WB_BYTES_MAX bytes are held in all; a writer past that
 * waits for a batch to land.
 *
 * Threads: every function may be called from any thread; wb_start() starts
 * WB_THREADS workers, wb_stop() applies what is held and joins them.
 */
#ifndef SHARDFS_WRITE_BEHIND_H
#define SHARDFS_WRITE_BEHIND_H

#include <stddef.h>
#include <stdint.h>

#include "namespace.h"

#define WB_BATCH_MAX (8u << 20)  /* one batch: a range of one file */
#define WB_BYTES_MAX (64u << 20) /* held in all, gathering and in flight */
#define WB_DEPTH 3        /* batches of one file in flight at once */
#define WB_THREADS 4

struct wb;

/* A write-behind for ns (borrowed: it must outlive the wb). NULL on ENOMEM. */
struct wb *wb_new(struct ns *ns);
/* Start the workers. 0 or -errno. Call after fork(). */
int wb_start(struct wb *wb);
/* Apply everything held (errors are lost: nobody is left to tell), then
 * stop the workers. NULL-safe, idempotent. */
void wb_stop(struct wb *wb);
/* wb_stop() if not done; frees. NULL-safe. */
void wb_free(struct wb *wb);

/* Take a write of size bytes (at most WB_BATCH_MAX) at off of file id:
 * 0 once the bytes are copied (the caller answers the write), or the
 * -errno of an earlier batch of the file that failed (not reported yet;
 * it stays for the close). Waits while the bytes held are over
 * WB_BYTES_MAX or the file's gathering batch cannot take this range. */
int wb_write(struct wb *wb, const struct ino_id *id, uint64_t off, const void *data,
             size_t size, int kill_suidgid);
/* Wait until every write taken for id is applied: 0, or the first failure
 * not yet reported (-errno), which is reported by this call only.
 * Costs one atomic load when nothing is held. */
int wb_drain(struct wb *wb, const struct ino_id *id);
/* wb_drain, leaving a failure for the close to report, before this mount
 * reads or changes id's inode otherwise: the inode the writes behind
 * expect is forgotten (the next one is done alone, and learns it anew). */
void wb_wait(struct wb *wb, const struct ino_id *id);
/* 1 if writes of id are held (gathering, in flight, or a failure to report). */
int wb_holds(struct wb *wb, const struct ino_id *id);
/* Wait until every write taken is applied (failures stay for their files'
 * close). */
void wb_drain_all(struct wb *wb);

#endif
