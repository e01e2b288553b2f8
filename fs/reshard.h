/* reshard.h -- split and merge the shards of a store (issue 11).
 *
 * A split of shard s at depth d makes s and s + 2^d at depth d + 1: the
 * records of s whose placement hash has bit d set move to the new shard,
 * every other record stays, nothing else is read or written (placement.h,
 * "layouts"). A merge folds s + 2^(d-1) back into s (the lower of two
 * buddies at the same depth), at depth d - 1.
 *
 * It works on a store without replicas or etcd (store_layout_static): a
 * single node, or a node of such a cluster changing one of its own
 * shards, whose new shard stays on it (the other nodes learn the layout
 * from its refusals, wire.h "Layouts"); and, mounted only, on a cluster
 * with etcd, where the shard's primary changes it and every copy follows
 * (reshard_online below). Unmounted, the command takes the
 * store's lock (reshard_split/merge/resume); mounted, it asks the daemon
 * (control.h), which runs reshard_online(). Each change runs in phases,
 * and the state file DATA_DIR/RESHARD ("split S D" or "merge S D") is
 * written durably before the first and removed after the last, so a change
 * killed at any point is finished by reshard_resume() (which every
 * unmounted reshard runs first) and a daemon refuses to mount a store with
 * one in flight:
 *
 *  1. copy     split: the records of s with bit d set into a fresh
 *              shard-(s + 2^d) (a leftover of a killed copy is removed
 *              first); merge: every record of the upper buddy into the
 *              lower one (puts of the same values: a repeat is harmless).
 *              The target is synced at the end.
 *  2. cut-over DATA_DIR/STORE gets the new layout (store_layout.h), in one
 *              rename: the point where the change happened. Then the
 *              shards' own `Mshard` records get their new depth.
 *  3. purge    split: the moved records are deleted from s; merge: the
 *              upper buddy's directory is removed. Then RESHARD goes.
 *
 * Resume: with the layout in STORE still the old one, the change starts
 * again at 1; with the new one, it goes on at 2's second half. A change
 * that fails before its cut-over (a full disk, a cancel) is taken back at
 * once instead: a split's target is removed, a merge's copies are deleted
 * from the lower buddy, and RESHARD goes.
 *
 * Records that are not placed (`M` records of the fs layer) stay where they
 * are; the shard's local records (its stream, positions) are its own.
 *
 * Errors: 0 or -errno, with a message in err. Not thread-safe (a command).
 */
#ifndef SHARDFS_RESHARD_H
#define SHARDFS_RESHARD_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

struct reshard_stats {
    const char *phase;      /* "copy", "cut-over", "purge", "done" */
    uint64_t records;       /* records copied so far (the phase's count in purge) */
    uint64_t bytes;         /* key and value bytes copied */
    uint64_t estimate;      /* bytes the copy is expected to take (0: unknown) */
    uint64_t purged;        /* records deleted from the source */
    double seconds;         /* since the change began */
};

/* Called about twice a second during a phase and once at its end. */
typedef void (*reshard_progress_fn)(void *ctx, const struct reshard_stats *st);

struct reshard_opts {
    unsigned wait_ms;       /* how long to wait for the store's lock */
    reshard_progress_fn progress;
    void *ctx;
    /* Filled at the end: what the change did, and the shards it made or
     * kept (split: s and s + 2^d; merge: the survivor twice). */
    struct reshard_stats done;
    unsigned shard_a, shard_b, depth;
    double pause_ms;        /* online: how long operations waited at the cut-over */
    uint64_t mirrored;      /* online: writes during the copy passed on to the target */
};

/* Split shard s of the store of node; cfg must hold the store's layout
 * (store_layout_apply()). -EINVAL: s is not a shard, or another node's;
 * -ERANGE: the new shard's number would reach CONFIG_MAX_SHARDS;
 * -EOPNOTSUPP: a store with replicas or etcd; -EAGAIN: another process
 * has the store open. */
int reshard_split(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen);

/* Merge shard s with its buddy (see above). -EBUSY also when the buddy was
 * split further (merge its halves first); -EINVAL: s is not a shard or has
 * depth 0. */
int reshard_merge(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen);

/* Finish a change a kill interrupted. 1 when there was one (o->done says
 * what), 0 when there was none, or -errno. */
int reshard_resume(struct config *cfg, int node, struct reshard_opts *o, char *err,
                   size_t errlen);

/* Online: split (merge 0) or merge shard s of a store this process has
 * open and mounted (ns; in a cluster, srv is the node's server, which
 * serves its shards to the others: changed in step with ns), while
 * operations go on.
 * Until the copy is done, the shard is replaced in the namespace by a
 * mirror that passes every write to the target too (reshard.c); the
 * cut-over runs with the namespace quiesced (ns_quiesce: no operation in
 * flight, new ones wait), then the purge runs beside the operations. A
 * failure before the cut-over (a write to the target failed; *cancel set,
 * the mount going away) undoes the change: a split removes the target, a
 * merge deletes its copies from the lower buddy (if that fails too, the
 * state stays for `shardfs reshard resume`, which deletes them first).
 * From the cut-over to the end of the purge, and during a merge's copy,
 * scans of the shard that holds records of the other half skip them
 * (reshard.c, hidden halves). A failure after the cut-over keeps the
 * state; while it is there, another change is refused with -EBUSY. The
 * caller runs one change at a time and holds nothing of ns. Errors as
 * above. */
/*
 * In a cluster with etcd (fo: the node's failover, failover.h), the change
 * runs on the primary of the shard (of both buddies for a merge: hand one
 * over first, `shardfs promote`) and every copy of it follows (reshard.c,
 * "online in a cluster"; DESIGN.md, Resharding in a cluster). No state
 * file: the map holds the change (a split's target "building" until its
 * cut-over). RESHARD_RESUME finishes a split this node's shard was left
 * in by a kill (-ENOENT when there is none); a split asked again does the
 * same. -EPERM: this node is not the shard's primary.
 */
enum reshard_op { RESHARD_SPLIT, RESHARD_MERGE, RESHARD_RESUME };
struct ns;
struct node_server;
struct failover;
int reshard_online(struct ns *ns, struct node_server *srv, struct failover *fo,
                   const struct config *cfg, int node, int op, unsigned s,
                   const volatile int *cancel, struct reshard_opts *o, char *err, size_t errlen);

/* 1 if DATA_DIR/RESHARD of node exists (a change is in flight), 0 if not,
 * -1 with the reason in err. With what (may be NULL), the change it names:
 * "split S D" or "merge S D" ("" if unreadable). */
int reshard_pending(const struct config *cfg, int node, char *what, size_t whatlen, char *err,
                    size_t errlen);

#endif
