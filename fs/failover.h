/* failover.h -- automatic failover through the etcd shard map (issue 10).
 *
 * Only with an `etcd` directive (shard_map.h's etcd map); the static map
 * stays manual. Every shard of the namespace becomes a switch: the node's
 * copy behind a shard_repl wrapper while this node is the shard's primary,
 * the shard at its primary over HTTP (shard_remote.h) otherwise. Which
 * copies this node holds is the map's word (not shards.conf's, once the map
 * is seeded): a failover thread opens and drops copies as the map changes
 * (`shardfs replica add/drop`: DESIGN: placement in failover.c) and keeps
 * each copy's role in step with the map:
 *
 *  - Promotion: the shard's leader key is gone (its primary's etcd lease
 *    ended) and this node is an in-sync replica: it waits a little, longer
 *    the further behind its primary it was (so the most advanced in-sync
 *    replica goes first, DESIGN.md "Failover"), checks again, stops pulling
 *    the copy (replica_sync_kick_wait), wraps it in a new shard_repl, hands
 *    that to the node server and makes the etcd transaction
 *    (shard_map_promote: in the in-sync set, leader key absent, epoch + 1).
 *    On success the namespace uses the copy locally; else it is pulled
 *    again.
 *  - Step-down: the map names another primary of a shard this node serves
 *    (its lease ran out and a replica was promoted): the namespace goes to
 *    the new primary, the node server redirects to it, and the replica-sync
 *    thread pulls the copy from it (a diverged tail: ESTALE, a snapshot).
 *    Acknowledging already stopped when the lease was no longer certain
 *    (shard_repl refuses).
 *  - Start: a copy is served as primary only if the map names this node
 *    AND it holds the shard's leader key with its new lease (taken when
 *    the map opened, or later by the map's keep-alive thread; the thread
 *    then takes the role).
 *  - Handover (failover_handover, `shardfs promote`): the primary holds
 *    new writes, waits until the chosen in-sync replica has all it
 *    applied, and moves role and leader key to it in one txn; the held
 *    writes go to the new primary.
 *  - Clients: every shard's owner in this process's remote shards follows
 *    the map's leader key (remote_owner_set): no leader, or a dead one,
 *    and requests wait for the next, up to timeout_ms.
 *
 * Order: failover_open() after ns_open() and shard_map_open() (instead of
 * wrapping the primaries), the node server started with failover_started
 * as its node_server_repl.started, failover_start() with the replica-sync
 * thread, failover_stop() before that thread stops, ns_close() (it closes
 * the switches), failover_close(), shard_map_close().
 *
 * Threads: open/start/stop/close from one thread; primary_of from the
 * replica-sync thread; the switches from any thread.
 */
#ifndef SHARDFS_FAILOVER_H
#define SHARDFS_FAILOVER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "namespace.h"
#include "node_server.h"
#include "replica_sync.h"
#include "shard_map.h"

struct failover;

/* Put a switch in ns for every shard, with the copies the map gives node
 * (ns_open opened shards.conf's: those the map does not give are closed, one
 * it made empty removed; those it gives but the file does not are opened)
 * and their roles as the map has them now. local[i] (cfg->shard_count
 * entries) gets this node's LMDB copy of shard i, or NULL; the switches own
 * the copies. cfg, ns and map must outlive fo.
 * 0, or -errno with a reason in err; *out is set in both cases (NULL
 * only when out of memory) and goes to failover_close() after ns_close(). */
int failover_open(const struct config *cfg, int node, struct ns *ns, struct shard_map *map,
                  struct shard **local, struct failover **out, char *err, size_t errlen);

/* node_server_repl.started: keep srv, give it the primaries' wrappers. */
void failover_started(void *fo, struct node_server *srv);

/* replica_sync's primary_of (ctx: the failover): this node while it serves
 * the shard (or is being promoted), else the map's primary. */
int failover_primary_of(void *fo, unsigned shard, uint64_t *epoch);

/* Listen to the map, start the failover thread. rs: the replica-sync
 * thread, started with every copy of local[] and failover_primary_of (it
 * must run also with no copy: copies may be added, replica_sync_add).
 * 0 or -errno with a reason. */
int failover_start(struct failover *fo, struct replica_sync *rs, char *err, size_t errlen);
/* Stop listening and the thread. NULL-safe. */
void failover_stop(struct failover *fo);
/* After ns_close(). NULL-safe. */
void failover_close(struct failover *fo);

/* A planned handover of shard n to node `to` (`shardfs promote`; DESIGN:
 * handover in failover.c): this node must be the shard's serving primary
 * and `to` one of its in-sync replicas. The primary holds new writes,
 * waits until `to` has everything it applied, then moves the role and the
 * leader key to `to` in one etcd txn (shard_map_handover) and hands the
 * held writes on to it. Blocks for at most 6/10 of timeout_ms plus the txn.
 * 0 and *out; else -errno with a reason in err, and nothing changed (this
 * node still serves): -EPERM not the primary here, or `to` not in sync;
 * -EBUSY a handover of n runs; -EALREADY `to` is this node; -ENOENT `to`
 * holds no replica; -ETIMEDOUT `to` did not catch up in time;
 * -EHOSTUNREACH `to` is not alive in etcd; etcd's errors. Any thread that
 * may wait (a node server worker). */
struct failover_handed {
    uint64_t old_epoch, new_epoch;
    uint64_t lsn;      /* the position handed over */
    int64_t frozen_ms; /* how long writes were held */
    int64_t took_ms;
};
int failover_handover(struct failover *fo, unsigned n, int to, struct failover_handed *out,
                      char *err, size_t errlen);

/* The primary's wrapper (shard_repl.h) of shard n while this node serves
 * it, kept this shard's (its use counted like an op in flight, and no
 * handover of n starts) until failover_primary_put(fo, n); NULL when this
 * node does not serve n or a handover of n runs. For the content check
 * (replication.c), which freezes it for one hash pass. */
struct shard *failover_primary_get(struct failover *fo, unsigned n);
void failover_primary_put(struct failover *fo, unsigned n);

/* Resharding (fs/reshard.c; DESIGN.md, Resharding in a cluster).
 * failover_switch: shard n's switch, made when the map holds n (a split's
 * target, building); NULL when it does not. It is the namespace's once
 * its layout has n (failover_follow_paused), else failover_close's.
 * failover_copy: this node's copy of n (the LMDB shard), or NULL; the
 * caller holds n's primary (failover_primary_get), so it stays.
 * failover_follow_paused: make the namespace's layout (and the node
 * server's) the map's, with no operation in flight in either (the caller
 * quiesced them): 1 changed, 0 the same, -errno. The failover thread does
 * the same by itself after every change of the map, and a shard's refusal
 * for another layout (ns_set_relayout) waits for the map to bring it. */
struct shard_map *failover_map(struct failover *fo);
struct shard *failover_switch(struct failover *fo, unsigned n);
struct shard *failover_copy(struct failover *fo, unsigned n);
int failover_follow_paused(struct failover *fo);

/* How many times this process promoted a copy / stepped down. */
void failover_counts(struct failover *fo, unsigned *promotions, unsigned *demotions);

#endif
