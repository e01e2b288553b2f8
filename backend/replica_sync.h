/* replica_sync.h -- the replica-sync thread: keeps this node's replica
 * shards current with their primaries.
 *
 * One thread per node drives every replica shard the node holds over one
 * curl multi handle: per shard a long-poll of its primary's change stream
 * (GET /v1/shard/N/stream, wire.h), whose entries it applies in order with
 * shard_lmdb_apply_at(); each pull reports the position the replica holds
 * (applied: in its redo log, so kill -9 safe) and the last one it synced,
 * which are the primary's acks (shard_repl.h). A replica that is too far
 * behind (the primary no longer retains the entries after its position,
 * 409 ERANGE) or whose history diverged (409 ESTALE), or whose snapshot was
 * interrupted (shard_lmdb_position() -EAGAIN), catches up by a fuzzy
 * snapshot: the primary's position P0 first, then every record through the
 * scan route, page by page (never the whole shard in memory), then the
 * stream after P0 (replica_sync.c, DESIGN).
 *
 * With ack = replica the primary's writers also push new entries to the
 * copy (replica_sync_push, called by the node server), which answers with
 * the copy's position: the ack in one round trip; pushes and pulls apply
 * to a copy one at a time, each skipping what the other brought.
 *
 * Where the primary is comes from the caller (primary_of: the shard map);
 * replica_sync_kick() says it may have changed. A primary that does not
 * answer is retried with a capped backoff, never in a tight loop.
 *
 * Threads: start/stop from one thread; kick, add, remove and status from
 * any thread (add/remove/kick_wait not from the sync thread). The replica
 * shards are the caller's: they must stay open until replica_sync_stop()
 * (or their replica_sync_remove()) returned, and nobody else may apply to
 * them.
 */
#ifndef SHARDFS_REPLICA_SYNC_H
#define SHARDFS_REPLICA_SYNC_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "stream.h"

struct replica_sync;

/* The node index of shard's primary now (-1: none, e.g. between a death
 * and a promotion), and the shard's epoch in *epoch. Called on the sync
 * thread; must not wait long. */
typedef int (*replica_sync_primary_fn)(void *ctx, unsigned shard, uint64_t *epoch);

/* Start the thread for node self of cfg. replicas[i] (i < cfg->shard_count)
 * is this node's replica of shard i (an LMDB shard), or NULL. cfg must
 * outlive the sync. With no replica at all and no etcd in cfg (the static
 * map never changes where copies live), *out is NULL and nothing runs
 * (stop and status accept it). 0, or -errno with a reason in err. */
int replica_sync_start(const struct config *cfg, int self, struct shard *const *replicas,
                       replica_sync_primary_fn primary_of, void *ctx, struct replica_sync **out,
                       char *err, size_t errlen);
/* Stop the thread (a transfer in flight is dropped; what was applied stays)
 * and sync every replica shard. NULL-safe. */
void replica_sync_stop(struct replica_sync *rs);
/* Where copies live changed (`shardfs replica add/drop`, fs/failover.h):
 * add: keep local (an LMDB shard, the caller's; open until removed or
 * stopped) as this node's copy of shard from now on: the thread reads its
 * position and pulls it from its primary (snapshot catch-up if the primary
 * does not retain what it lacks). remove: stop keeping it: a pull in
 * flight is dropped, what was applied is synced, and once this returns
 * the thread never touches the shard again (the caller may close it and
 * remove its files). Both wait until the thread made the change (one
 * round, at most about a second): not on the sync thread, and not from
 * primary_of. 0; -EEXIST (add: already kept), -ENOENT (remove: not kept),
 * -EINVAL (no thread: rs NULL, or a bad shard). */
int replica_sync_add(struct replica_sync *rs, unsigned shard, struct shard *local);
int replica_sync_remove(struct replica_sync *rs, unsigned shard);

/* Shard's primary or epoch may have changed (shard_map_on_change): the
 * thread asks primary_of again and, if it changed, drops the pull in flight
 * and follows the new primary. Any thread; NULL-safe. */
void replica_sync_kick(struct replica_sync *rs, unsigned shard);

/* replica_sync_kick(), and wait until the thread asked primary_of again:
 * when primary_of now says this node (failover.h: it is being promoted),
 * no pull of the shard is in flight and none will be applied after this
 * returns. Not on the sync thread (primary_of, the map's listener: no). */
void replica_sync_kick_wait(struct replica_sync *rs, unsigned shard);

/* A content check (`shardfs fsck --replicas`): the checksum of this
 * node's replica of shard at exactly position `at`, which its primary
 * took its own checksum at (shard_repl_checkpoint_set). The primary stops
 * the copy's stream at `at` and says so (X-Shardfs-Checkpoint); once the
 * copy is there, the sync thread stops applying to it and a helper thread
 * hashes it (shard_lmdb_checksum), then the pulls go on. This waits up to
 * wait_ms for that hash. 0 and *out; -ETIMEDOUT (the copy did not reach
 * `at` in time: behind), the hash's error, -ENOENT (no replica of shard
 * here). *now gets the copy's position when the call returns. Any thread
 * but the sync thread. */
int replica_sync_checksum(struct replica_sync *rs, unsigned shard, const struct stream_pos *at,
                          unsigned wait_ms, struct shard_lmdb_sum *out, struct stream_pos *now);

/* A push from the primary (wire.h, POST /v1/shard/N/push): node `from`,
 * primary of shard at shard epoch `epoch`, sends the entries of its stream
 * after `after` (body, the stream.h encoding). Applies those after the
 * copy's position, in order, into its redo log (kill -9 safe). 0 (also for
 * a gap: after is past the copy's position; nothing applied) with the
 * copy's position in *pos and its last synced lsn in *synced (set on
 * every return); -EAGAIN (the copy takes no pushes now: none here, a
 * snapshot or a content check in progress, from/epoch not its primary and
 * epoch); -ESTALE (an entry does not continue its history); an apply's
 * error; -EWOULDBLOCK in no-waiting mode (shard.h) when it would wait for
 * the copy: what was applied stays, do it again where it may wait. Any
 * thread but the sync thread; rs NULL gives -EAGAIN. */
int replica_sync_push(struct replica_sync *rs, unsigned shard, int from, uint64_t epoch,
                      const struct stream_pos *after, const uint8_t *body, size_t len,
                      struct stream_pos *pos, uint64_t *synced);

enum replica_phase {
    REPLICA_WAITING = 0, /* for a primary (none, unreachable: backing off) */
    REPLICA_STREAMING,   /* pulling the change stream */
    REPLICA_SNAPSHOT,    /* copying the primary's records (catch-up) */
};

struct replica_status {
    enum replica_phase phase;
    int primary;                   /* node index, -1: none */
    uint64_t epoch;                /* the shard's epoch (the map's) */
    struct stream_pos pos;         /* applied here (kill -9 safe) */
    uint64_t synced;               /* lsn durable here against power loss */
    struct stream_pos primary_pos; /* the primary's, from its last reply ({0} before) */
    uint64_t lag_ms;               /* since this copy was last level with its primary */
    int last_error;                /* -errno of the last failed pull or apply, 0 */
    uint64_t snapshots;            /* snapshots begun since start */
    /* The snapshot in progress, or the last one. */
    uint64_t snap_bytes;           /* key and value bytes copied */
    uint64_t snap_records;         /* records copied */
    uint64_t snap_total_records;   /* the primary's record count at the start, 0 unknown */
    double snap_rate;              /* bytes a second */
    int64_t snap_eta_ms;           /* -1: unknown */
    /* The transport, for diagnosis. */
    uint64_t replies;              /* requests answered (or failed) */
    long last_status;              /* HTTP status of the last reply, 0: failed */
    int64_t last_reply_ago_ms;     /* since the last reply, -1: none yet */
    int in_flight;                 /* a request is out */
    uint64_t restarts;             /* times the copy was found stuck and started over */
    uint64_t pushes;               /* pushes from the primary that applied something */
    char at[CONFIG_URL_MAX + 1];   /* where requests go (the primary's url, or a redirect's) */
};

/* The state of this node's replica of shard: 0, or -ENOENT when this node
 * holds no replica of it (or rs is NULL). */
int replica_sync_status(struct replica_sync *rs, unsigned shard, struct replica_status *out);
/* "waiting", "streaming", "snapshot". */
const char *replica_phase_name(enum replica_phase p);

#endif
