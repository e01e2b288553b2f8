/* replication.h -- a node's replication, wired together (issue 10).
 *
 * What a mount or a serve of a node with replicated shards runs beside the
 * namespace: the shard map (shard_map.h), the primary's wrapper
 * (shard_repl.h) around every shard this node is the primary of that has
 * replicas, what the node server needs to serve the stream and position
 * routes (node_server.h), the replica-sync thread for the shards this node
 * holds replicas of (replica_sync.h), and the route GET /v1/replicas that
 * tells `shardfs status` how each replica copy here is doing:
 *
 *   200 {"node":"b","replicas":[{"shard":3,"primary":"a","phase":"streaming",
 *        "epoch":E,"lsn":L,"check":"C","synced":S,"primary_lsn":P,
 *        "lag_ms":MS,"error":"" | "strerror text","snapshots":N,
 *        "snap_bytes":B,"snap_records":R,"snap_total_records":T,
 *        "snap_rate":BYTES_PER_S,"snap_eta_ms":MS | -1}, ...]}
 *
 * ("check" a decimal string: JSON numbers lose u64 bits). The primary's side
 * of the same copies is wire.h's GET /v1/shard/N/position.
 *
 * And POST /v1/promote, body {"shard":N,"node":"b"}, made to the shard's
 * primary by `shardfs promote`: the planned handover of the shard's primary
 * role to node b (failover_handover, failover.h). It blocks up to about
 * 6/10 of timeout_ms. The outcome is a 200 either way, since the request
 * itself was fine and the client wants the reason (error bodies do not
 * reach it):
 *
 *   200 {"done":true,"shard":N,"from":"a","to":"b","old_epoch":E,
 *        "epoch":E+1,"lsn":L,"frozen_ms":MS,"took_ms":MS}
 *   200 {"done":false,"errno":"ETIMEDOUT","error":"why, in words"}
 *
 * (400 for a body that is not that object; without etcd, done:false.)
 *
 * And POST /v1/checksum, the content check of `shardfs fsck --replicas`
 * (DESIGN.md "Checking replicas"). Body {"shard":N,"wait_ms":W} to the
 * shard's primary: it holds the shard's writes (shard_repl_freeze) for one
 * hash pass of its copy (shard_lmdb_checksum) at its position P, sets the
 * replicas' checkpoint at P for W + 1 s (shard_repl_checkpoint_set) and
 * lets the writes go. Body {"shard":N,"epoch":E,"lsn":L,"check":"C",
 * "wait_ms":W} to a node holding a replica: its hash at exactly (E,L,C),
 * waiting up to W ms (default 10 s, at most 60 s) for the copy to get there
 * and be hashed (replica_sync_checksum). Both answer 200:
 *
 *   {"done":true,"shard":N,"node":"b","role":"primary"|"replica","epoch":E,
 *    "lsn":L,"check":"C","digest":"32 hex digits","records":R,"bytes":B,
 *    "frozen_ms":MS (the primary's hold),"took_ms":MS}
 *   {"done":false,"errno":"ETIMEDOUT","error":"behind: ...","epoch":E,
 *    "lsn":L,"check":"C" (where the replica's copy is)}
 *
 * Body {"shard":N,"warm":true} to a node holding a copy, before the
 * primary is asked: it reads the copy's file into the page cache, so that
 * its hash at P, which holds the primary's ack = replica writers, reads
 * memory, not the disk. 200 {"done":true,"bytes":B,"took_ms":MS}, or
 * done:false with the errno (ENOENT: no copy of N here).
 *
 * Order (each step after the one before; stop in reverse):
 *   replication_open()  after ns_open(): the map, the wrappers
 *   node_server_start_repl(..., replication_server(rep), ...)
 *   replication_sync_start()  the replica-sync thread
 *   ...
 *   replication_drain(), replication_sync_stop(), node_server_stop(), ns_close(),
 *   replication_close()  (the wrappers closed by ns_close borrow the map)
 *
 * Threads: open/start/stop/close from one thread; the route from any.
 */
#ifndef SHARDFS_REPLICATION_H
#define SHARDFS_REPLICATION_H

#include <stddef.h>

#include "config.h"
#include "namespace.h"
#include "node_server.h"

struct replication;

/* 1 if cfg has replicas at all (then a node needs a url and a secret). */
int replication_wanted(const struct config *cfg);

/* Open the shard map for node `node` of cfg and wrap ns's shards that have
 * replicas (ns_shard_wrap). cfg and ns must outlive rep (ns until
 * replication_close, which comes after ns_close). 0, or -errno with a
 * reason in err; *out is set in both cases (NULL only when out of memory)
 * and must go to replication_close() after ns_close(): a failure may leave
 * wrappers in ns that borrow the map. */
int replication_open(const struct config *cfg, int node, struct ns *ns, struct replication **out,
                     char *err, size_t errlen);
/* What node_server_start_repl() takes; valid until replication_close(). */
/* The node's failover (failover.h) with etcd, else NULL; NULL-safe. */
struct failover;
struct failover *replication_failover(struct replication *rep);

const struct node_server_repl *replication_server(struct replication *rep);
/* Start the replica-sync thread (a node with no replica starts none) and
 * let the map's changes reach it. 0 or -errno with a reason. */
int replication_sync_start(struct replication *rep, char *err, size_t errlen);
/* Before an orderly stop, the node server still serving: wait, up to
 * timeout_ms in all, until every live replica (one that asked within the
 * last 3 s) of each shard this node leads holds what the primary applied.
 * So a stop with ack = primary does not leave a replica behind by the last
 * writes, nor by those of the stop itself (ns_reaper_stop deletes files).
 * NULL-safe; a replica that does not get there is left to catch up later. */
void replication_drain(struct replication *rep, unsigned timeout_ms);
/* Stop the thread (its replica shards synced). NULL-safe. */
void replication_sync_stop(struct replication *rep);
/* Close the map. After ns_close(). NULL-safe. */
void replication_close(struct replication *rep);

/* Serve GET /v1/replicas and POST /v1/promote (above) and return 0, or
 * return 1 for any other path (the caller's handler answers it). The GET
 * never waits (fine on a node server's I/O thread); the POST waits, and
 * the node server runs every POST on a worker. */
int replication_route(struct replication *rep, const struct node_request *req,
                      struct node_response *resp);

#endif
