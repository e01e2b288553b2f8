/* shard_repl.h -- the primary's side of a replicated shard (issue 10).
 *
 * A third implementation of struct shard_ops, around the local LMDB shard
 * (shard_lmdb) of a shard this node is the primary of. Reads (get, scan,
 * get_many, stat) go to the LMDB shard unchanged. Writes:
 *
 *  - apply: refused with -EHOSTUNREACH when this node may not acknowledge
 *    as primary (shard_map_lease_ok() is 0, or the map names another
 *    primary), before anything is applied. Else shard_lmdb_apply_pos(); then
 *    with ack = replica (config.h) it waits until every replica in the
 *    shard's in-sync set (shard_map_get) has reported a position at or past
 *    the batch's (shard_repl_report: it holds the batch in its redo log);
 *    a waiting write pushes the new entries to a replica itself when no
 *    push to it is in flight (push, below; shard_repl.c DESIGN: pushes),
 *    and the replica's answer is its report.
 *    A replica that has not within replica_lag_ms is taken out of the
 *    in-sync set with shard_map_isr_remove() BEFORE the write is
 *    acknowledged without it; if that fails the apply fails with -EIO (the
 *    batch is in the primary's copy but was never acknowledged): never a
 *    silent fallback. The lease is checked again before returning 0. With
 *    ack = primary, or no replica in sync, nothing waits.
 *  - sync: the LMDB shard's sync, then (ack = replica) the same wait for
 *    the in-sync replicas' synced lsn to reach the position the primary had
 *    when the sync began, with the same rule for laggards.
 *  - No-waiting mode (shard.h): an apply that would wait for acks refuses
 *    with -EWOULDBLOCK before applying anything; a sync always refuses.
 *
 * A replica leaves the in-sync set only here (a laggard, above); it joins
 * it again (shard_map_isr_add) when it reports the primary's current
 * position. Replicas report through the stream route of node_server.c
 * (wire.h), which calls shard_repl_report(); each report also holds the
 * primary's stream after the reported lsn for that node
 * (shard_lmdb_stream_hold, slot = node index), and a node that has not
 * reported for SHARD_REPL_HOLD_MS loses its hold (checked at applies and
 * reports).
 *
 * Errors: those of the LMDB shard, plus -EHOSTUNREACH (no lease, not the
 * primary), -EIO (a laggard could not be taken out of the in-sync set) and
 * -EREMCHG (a handover gave the role away; nothing was done: below).
 *
 * Threads: every call from any thread; waits are on a condition variable
 * signalled by reports. The map is borrowed and must outlive the shard.
 */
#ifndef SHARDFS_SHARD_REPL_H
#define SHARDFS_SHARD_REPL_H

#include <stdint.h>

#include "config.h"
#include "shard.h"
#include "shard_map.h"
#include "stream.h"

#define SHARD_REPL_HOLD_MS (10 * 60 * 1000) /* a silent node's stream hold lasts this */

/* How a primary pushes entries to a replica's node (remote_push of
 * shard_remote.h): the entries of shard's stream after `after` (body, the
 * stream.h encoding) to node, as the primary at shard epoch `epoch`,
 * within limit_ms. 0 with the replica's position and synced lsn, or
 * -errno. Called from writers' threads (never in no-waiting mode). */
typedef int (*shard_repl_push_fn)(void *ctx, unsigned shard, int node, uint64_t epoch,
                                  const struct stream_pos *after, const void *body, size_t len,
                                  unsigned limit_ms, struct stream_pos *pos, uint64_t *synced);
struct shard_repl_push {
    shard_repl_push_fn fn;
    void *ctx;
};

/* Wrap lmdb (a shard_lmdb shard) of which node self is the primary in map.
 * cfg gives ack, replica_lag_ms and replica_push (copied). push (may be
 * NULL, copied): how writers push to the replicas (cfg->replica_push); without it
 * the acks come by the replicas' pulls only. Sets the LMDB shard's epoch
 * to the map's epoch of the shard. On success the wrapper owns lmdb
 * (closing it closes both). 0 and *out, or -errno (-ENOMEM; -EINVAL for
 * bad arguments; the map's or the shard's error). */
int shard_repl_new(struct shard *lmdb, struct shard_map *map, const struct config *cfg, int self,
                   const struct shard_repl_push *push, struct shard **out);

/* Free the wrapper s but leave its LMDB shard open (a failover hands a
 * copy from one wrapper to the next: fs/failover.h). NULL-safe. */
void shard_repl_free(struct shard *s);

/* 1 if s was made by shard_repl_new(), else 0. */
int shard_repl_is(const struct shard *s);
/* 1 while an apply or sync of s waits (or is about to wait) for its
 * replicas' acks and those come by the pulls (no pushes, or one failed
 * lately): the stream route then answers the replicas' long polls at
 * once instead of gathering entries (node_server.c). Any thread, no lock. */
int shard_repl_acks_wanted(struct shard *s);

/* 1 if replica `node` acked a push within the last second (so its long
 * poll need not be woken by applies: the pushes feed it), with its
 * position as last acked in *acked; else 0. Any thread. */
int shard_repl_push_fed(struct shard *s, int node, struct stream_pos *acked);

/* The LMDB shard inside s (a shard_repl). */
struct shard *shard_repl_inner(struct shard *s);

/* Replica `node` reports (the stream route, after checking that applied is
 * a position of this shard's history): its copy holds everything up to
 * applied (in its redo log) and is synced up to synced_lsn. Wakes the
 * writes waiting for it, holds the stream after applied->lsn for it, and
 * puts it back in the in-sync set if applied is the primary's position.
 * 0, -EINVAL (node is not a replica of this shard in the map), the map's
 * error from shard_map_isr_add, or -EWOULDBLOCK in no-waiting mode when
 * that call was due (do the request again where it may wait). */
int shard_repl_report(struct shard *s, int node, const struct stream_pos *applied,
                      uint64_t synced_lsn);

/* The map changed the shard's entry (fs/failover.c calls it from the map's
 * listener): writes waiting for replicas judge the in-sync set again at
 * once (a `replica drop` took one out), and the stream holds of nodes that
 * are no replica any more are released. Any thread; does not wait. */
void shard_repl_map_changed(struct shard *s);

/* Replica `node` needs a snapshot (its position was not retained or not
 * of this history): hold the stream after base->lsn for it (base is the
 * primary's position the reply names), and remember it for status. 0 or
 * -EINVAL (not a replica). */
int shard_repl_needs_snapshot(struct shard *s, int node, const struct stream_pos *base);

/* The lsn some sync() waits for replica `node` to have synced (so it should
 * sync and report), or 0 when none waits for it. */
uint64_t shard_repl_sync_wanted(struct shard *s, int node);

/* Called when a sync() starts waiting for the replicas' synced lsn, so the
 * stream route can wake their long polls (X-Shardfs-Sync, wire.h). One
 * listener; NULL removes it. fn runs on the syncing thread, no lock held. */
void shard_repl_on_sync_wanted(struct shard *s, void (*fn)(void *ctx, unsigned index), void *ctx);

/* A planned handover (`shardfs promote`, fs/failover.h), in three calls:
 *
 * shard_repl_wait_level: wait until replica `node` has reported lsn (the
 * batches up to it are in its redo log). 0, -ETIMEDOUT after timeout_ms,
 * -EINVAL for a bad node.
 *
 * shard_repl_freeze: stop taking writes: applies and syncs that arrive are
 * held (no-waiting mode: -EWOULDBLOCK, so they wait on a worker), and
 * those already in progress are waited for, up to timeout_ms. Then *pos is
 * the primary's position, and nothing is applied after it until a thaw.
 * 0; -ETIMEDOUT (writes still in progress: not frozen any more); -EBUSY
 * (already frozen, or moved).
 *
 * shard_repl_thaw: end the freeze. moved = 0: the held writes go on.
 * moved = 1 (the map names another primary now): they, and every op on s
 * from now on, reads included, fail with -EREMCHG before touching the copy
 * -- "nothing was done, the shard has another primary". s stays usable
 * for the stream and position routes (shard_repl_report...). */
int shard_repl_wait_level(struct shard *s, int node, uint64_t lsn, unsigned timeout_ms);
int shard_repl_freeze(struct shard *s, unsigned timeout_ms, struct stream_pos *pos);
void shard_repl_thaw(struct shard *s, int moved);

/* A content check (`shardfs fsck --replicas`, fs/replication.c): the
 * primary hashes its copy at P while frozen, and each replica must hash
 * its own at exactly P. So, still frozen, it sets a checkpoint at P for
 * every replica of the shard in the map, standing for ttl_ms: while it
 * stands for a replica, the stream route sends that replica nothing past
 * P and names P in X-Shardfs-Checkpoint (wire.h), and a replica at P
 * hashes its copy before it pulls again (replica_sync_checksum). Each
 * checkpoint has an id (X-Shardfs-Checkpoint-Id), and the replica's pulls
 * say which one it hashed for last (hashed=ID, wire.h), which ends that
 * checkpoint for it. An explicit word, for the checkpoint itself: a
 * stream request may be handled twice (a refused no-waiting try is
 * redone), its reply may not arrive, and a restarted replica's old long
 * poll may still be parked here under the same node name.
 * Waiting replicas' long polls are woken (the sync_wanted listener), so
 * one already at P hears of it at once.
 *
 * shard_repl_checkpoint_set: as above. 0, or the map's error.
 * shard_repl_checkpoint: 1, *at and *id if a checkpoint stands for node,
 * else 0.
 * shard_repl_checkpoint_done: node says it hashed for checkpoint hashed_id
 * (0: none); ends that checkpoint for it. */
int shard_repl_checkpoint_set(struct shard *s, const struct stream_pos *at, unsigned ttl_ms);
int shard_repl_checkpoint(struct shard *s, int node, struct stream_pos *at, uint64_t *id);
void shard_repl_checkpoint_done(struct shard *s, int node, uint64_t hashed_id);

/* For `shardfs status`: the primary's position and each replica of the
 * shard in the map. lag_batches counts the batches the primary applied
 * after the replica's position (at least SHARD_REPL_LAG_WINDOW when it is
 * further behind than the wrapper remembers); lag_ms is how long the
 * oldest of them has been waiting (0 when in step). */
#define SHARD_REPL_LAG_WINDOW 1024u
struct shard_repl_peer {
    int node;                  /* node index */
    int in_sync;               /* in the map's in-sync set */
    int joining;               /* on its way in: writes wait for it (DESIGN: joining) */
    uint64_t join_lsn;         /* it joins once it applied this (when joining) */
    int needs_snapshot;        /* its last request got ERANGE/ESTALE */
    struct stream_pos applied; /* last reported ({0,0,0}: none since start) */
    uint64_t synced_lsn;
    uint64_t lag_batches, lag_ms;
    int64_t last_report_ms; /* ms since its last request, -1 never */
};
struct shard_repl_status {
    struct stream_pos position; /* the primary's */
    uint64_t epoch;             /* the shard's epoch in the map */
    unsigned nreplicas;
    struct shard_repl_peer replicas[SHARD_MAP_COPIES_MAX - 1];
};
int shard_repl_status(struct shard *s, struct shard_repl_status *out);

#endif
