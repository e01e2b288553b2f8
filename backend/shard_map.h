/* shard_map.h -- the live shard map: who holds which copy of every shard.
 *
 * For each shard: its primary (the node that serves every operation on it),
 * its replicas (0-3 nodes keeping a copy current), which replicas are in the
 * in-sync set (may be promoted; with ack = replica every write waits for
 * them) and the shard's epoch, raised by every promotion. Nodes are named by
 * their index in the config's nodes[].
 *
 * Two kinds of map, one API:
 *  - static (no `etcd` in shards.conf): the config's owners and replicas.
 *    Every replica starts in the in-sync set. Changes (isr_remove, isr_add,
 *    promote) are made in this process's memory only; nothing else sees
 *    them, and they are gone at restart. No leases: lease_ok is always 1.
 *  - etcd (`etcd = URL,...`): the map lives in etcd under
 *    /shardfs/CLUSTER-ID/ (DESIGN.md, "Shard map", has the keys and the
 *    transactions). It is written from the config on the first start (only
 *    what is absent is created; a seeded in-sync set is EMPTY: a replica
 *    joins it by isr_add once its primary saw it caught up) and is the
 *    truth from then on. This node holds an etcd lease of lease_ttl_ms,
 *    renewed every third of it by a keep-alive thread, and the primary of a
 *    shard holds the shard's leader key, attached to that lease. A watch
 *    thread keeps the in-memory map current. Changes are etcd transactions
 *    that compare the shard key's mod revision (and the leader key), so two
 *    nodes changing one shard cannot both win.
 *
 * Errors (0 or -errno): -EINVAL a shard or node out of range; -ESTALE the
 * epoch given is not the shard's epoch (the caller's view is old: get the
 * shard again); -EPERM the change is not this node's to make (see each
 * call); -ENOENT the node holds no replica of the shard, or no shard has
 * that index now (resharding, below, makes and takes shards); -EBUSY promote while
 * the shard's leader key is held (its primary's lease is alive); -EAGAIN
 * this node has no etcd lease at the moment. When etcd cannot be reached the
 * calls fail with etcd.h's errors (-EHOSTUNREACH, -ETIMEDOUT, -EAGAIN,
 * -EIO) and change nothing; the map keeps what it has, and nothing promotes.
 *
 * Threads: every call may be made from any thread once shard_map_open
 * returned, except shard_map_close. The on_change listener runs on the
 * map's watch thread, its keep-alive thread or the thread of the call that
 * made the change, with no lock of the map held; it may call shard_map_get
 * and shard_map_leader, and must not block for long (it delays the watch).
 * The etcd map starts two threads: open it after daemonizing.
 */
#ifndef SHARDFS_SHARD_MAP_H
#define SHARDFS_SHARD_MAP_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

#define SHARD_MAP_COPIES_MAX 4 /* a primary and CONFIG_REPLICAS_MAX replicas */

struct shard_copies {
    uint64_t epoch;    /* the shard's epoch: raised by every promotion */
    unsigned depth;    /* the shard's local depth (backend/placement.h) */
    int building;      /* 1: being split off shard - 2^(depth-1), not placed yet (below) */
    int primary;       /* node index; -1 only if the map names a node the config lacks */
    unsigned nreplicas;
    int replicas[SHARD_MAP_COPIES_MAX - 1]; /* node indexes (-1: a node the config lacks) */
    uint32_t in_sync;  /* bit i: replicas[i] is in the in-sync set */
};

struct shard_map;

/* Open the map of cfg as node self (an index into cfg->nodes, or -1 for a
 * process that is no node: it may read the map and watch it, but holds no
 * lease, makes no change and lease_ok is 0 in etcd mode). cfg is copied
 * where needed; it need not outlive the map.
 * With etcd: takes a lease, registers the node, seeds what is absent, reads
 * the whole map, takes the leader key of each shard this node is the
 * primary of (also one left by this node's previous run, whose lease may
 * not have run out yet), then starts the watch and keep-alive threads. Fails
 * (with a reason in err) when etcd cannot be reached within timeout_ms, or
 * when etcd holds the map of another shard count (-EINVAL). */
int shard_map_open(const struct config *cfg, int self, struct shard_map **out, char *err,
                   size_t errlen);
/* Stop the threads and, with etcd, revoke this node's lease: its leader keys
 * go at once, so a replica may take over without waiting for the TTL.
 * NULL-safe. */
void shard_map_close(struct shard_map *m);

/* A copy of the shard's entry. 0; -ENOENT no shard has that index now (a
 * split did not make it yet, or a merge took it); -EINVAL shard >=
 * CONFIG_MAX_SHARDS. */
int shard_map_get(struct shard_map *m, unsigned shard, struct shard_copies *out);

/* The layout the map holds (placed shards only, building ones are not):
 * depth[i] for every slot i < 2^G (G the largest depth), as struct
 * config's depth[] (placement.h), and *slots = 2^G. 0, or -EIO when the
 * entries do not make a layout (a shard missing below another's depth). */
int shard_map_layout(struct shard_map *m, uint8_t depth[CONFIG_MAX_SHARDS], unsigned *slots);

/* 1 if the map names this map's node (self) the shard's primary, else 0
 * (also for a map opened with self -1, and a bad shard). */
int shard_map_is_primary(struct shard_map *m, unsigned shard);

/* The node whose lease holds the shard's leader key: with etcd, the node
 * that may act as the shard's primary now, -1 while nobody does (between a
 * primary's death and a promotion); the static map returns its primary.
 * -EINVAL for a bad shard. */
int shard_map_leader(struct shard_map *m, unsigned shard);

/* fn(ctx, shard) after the shard's entry or its leader key changed in this
 * map (by a call of this process or, with etcd, of any node). One listener;
 * NULL removes it. After this returns, the previous listener is not called
 * any more (it may be running right now on another thread: the call waits
 * for it). */
void shard_map_on_change(struct shard_map *m, void (*fn)(void *ctx, unsigned shard), void *ctx);

/* Take node out of the shard's in-sync set (0 also when it was not in it),
 * or put it back (isr_add). epoch is the shard's epoch the caller acts in.
 * Only the shard's primary may do it: -EPERM when self is not the primary
 * or, with etcd, does not hold the shard's leader key with its lease. When
 * this returns 0, the change is durable in etcd and in this map. */
int shard_map_isr_remove(struct shard_map *m, unsigned shard, int node, uint64_t epoch);
int shard_map_isr_add(struct shard_map *m, unsigned shard, int node, uint64_t epoch);

/* Make node the shard's primary at epoch + 1: node must be one of its
 * replicas in the in-sync set (-EPERM otherwise; 0 if node already is the
 * primary). The old primary becomes a replica out of the in-sync set; the
 * others keep their places. With etcd, node must be self (it takes the
 * leader key with its own lease), and it succeeds only while the leader key
 * is absent (-EBUSY): the old primary's lease has run out or was revoked.
 * epoch must be the shard's epoch (-ESTALE). */
int shard_map_promote(struct shard_map *m, unsigned shard, int node, uint64_t epoch);

/* A planned handover (`shardfs promote`, fs/failover.h): self, the live
 * primary (it holds the leader key with its lease), makes node, one of
 * the shard's in-sync replicas, its primary at epoch + 1, in one txn that
 * also moves the leader key to node's lease (read from node's node/NAME
 * key): the role never passes through "no leader". self takes node's slot
 * among the replicas and stays in the in-sync set: the caller stopped
 * acknowledging and saw node level before this. etcd only:
 * -EOPNOTSUPP for the static map. 0 also when node already is the
 * primary; -ESTALE the epoch moved; -EPERM self is not the live primary,
 * or node is not in the in-sync set; -ENOENT node holds no replica;
 * -EHOSTUNREACH node has no live lease (not running); -EAGAIN this node
 * has no lease. */
int shard_map_handover(struct shard_map *m, unsigned shard, int node, uint64_t epoch);

/* Where copies live (`shardfs replica add/drop`, issue 10): the rules,
 * pure, on an entry c (shard_map.c applies them in its txns; unit-tested).
 *  add:  node joins c's replicas at the end, NOT in the in-sync set (its
 *        copy starts empty; its primary adds it by isr_add once it saw it
 *        level). 0; -EEXIST node is the primary or already a replica;
 *        -ENOSPC c already has SHARD_MAP_COPIES_MAX - 1 replicas; -EINVAL
 *        node < 0.
 *  drop: node leaves c's replicas and the in-sync set at once (the other
 *        replicas keep their order and bits). 0; -EPERM node is the
 *        primary (promote another node first); -ENOENT node holds no
 *        replica; -EBUSY node is the only in-sync replica: without it no
 *        copy could take over from the primary (add another and let it get
 *        in sync first). A last replica that is not in sync may go. */
int shard_copies_add_replica(struct shard_copies *c, int node);
int shard_copies_drop_replica(struct shard_copies *c, int node);

/* The same as etcd transactions on the shard key (compare-and-swap on its
 * mod revision, so they cannot interleave with an isr change, a promotion
 * or a handover; a loser re-reads and judges again). Any process may make
 * them, also a map opened with self -1 (the CLI): the primary and the
 * nodes concerned follow through their watches (fs/failover.h). The epoch
 * does not change. Errors: the rules' above, -EOPNOTSUPP for the static
 * map (the file is the map), etcd's errors; 0 once the change is in etcd
 * and in this map. */
int shard_map_replica_add(struct shard_map *m, unsigned shard, int node);
int shard_map_replica_drop(struct shard_map *m, unsigned shard, int node);

/* Resharding (fs/reshard.h; DESIGN.md "Shard map"). A split of shard s at
 * depth d makes t = s + 2^d, in two steps, each one etcd txn made by s's
 * live primary (self: it holds s's leader key with its lease):
 *  split_begin:  creates t's entry {epoch: s's, primary: self, replicas:
 *                s's, in_sync: none, depth: d + 1, building} and its leader
 *                key on self's lease. A building shard is not placed (s
 *                still owns its keys): its primary fills it, its replicas
 *                copy it as they copy any shard, and it is served only to
 *                them. 0 also when t is that already (a resumed split);
 *                -EEXIST t exists as something else; -EBUSY s is building.
 *  split_commit: the cut-over: s's depth d + 1 and t no longer building,
 *                comparing both entries and both leader keys (self's). 0
 *                also when done already; -ENOENT no t.
 *  split_abandon: t's entry and leader key go (t building); any process
 *                may (no lease). 0 also when there is no t; -EBUSY t is
 *                committed.
 * merge folds s's buddy u = s + 2^(d-1) (both at depth d, neither
 * building, both led by self) back: s's depth d - 1, u's entry and leader
 * key deleted, in one txn; the caller copied u's records into s before. 0
 * also when done already; -EINVAL s is no lower buddy at d, d - 1 is below
 * the depth of the count the map was made with, or u is building or has
 * another depth.
 * All: depth is s's depth before the change (-ESTALE when s has another,
 * not the one the change gives it); -ENOENT no shard s; -EPERM self is not
 * the (live) primary; -ENOSPC t would be CONFIG_MAX_SHARDS or more; the
 * errors of etcd. With the static map the same rules change this
 * process's memory only. The listener hears of s and t. */
int shard_map_split_begin(struct shard_map *m, unsigned shard, unsigned depth);
int shard_map_split_commit(struct shard_map *m, unsigned shard, unsigned depth);
int shard_map_split_abandon(struct shard_map *m, unsigned shard, unsigned depth);
int shard_map_merge(struct shard_map *m, unsigned shard, unsigned depth);

/* 1: this node may acknowledge writes as a primary now; 0: it must not.
 * Static map: always 1. etcd: 1 only while this node's lease is certainly
 * alive in etcd -- the last grant or renewal that succeeded, counted from
 * when its request was SENT, plus the TTL, minus a margin (a tenth of the
 * TTL) for clock rates, is still in the future -- and it holds the leader
 * key of every shard the map makes it the primary of. So a primary cut off
 * from etcd stops acknowledging before its lease can have expired there,
 * and before a replica can be promoted in its place. Cheap (no lock). */
int shard_map_lease_ok(struct shard_map *m);

/* Whether node is alive in etcd: 1 while its node/NAME key exists (its
 * lease runs), 0 once it is gone (the lease ended: killed, or cut off from
 * etcd for a TTL), or -errno (-EOPNOTSUPP without etcd; etcd's error).
 * One etcd read; for the open registry's reaper (fs/namespace.h). */
int shard_map_node_alive(struct shard_map *m, int node);

#endif
