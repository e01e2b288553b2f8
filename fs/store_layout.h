/* store_layout.h -- DATA_DIR/STORE: what a data directory holds, and its
 * shard layout.
 *
 * STORE is a small text file, written when a store is made and rewritten
 * whole (a temporary file, fsync, rename, fsync of the directory) by the
 * cut-over of a split or merge (reshard.h), so it is always one layout or
 * the next, never a mix:
 *
 *   shardfs-store 1          a store that never split: N shards of depth
 *   shards N                 log2 N, the uniform layout
 *
 *   shardfs-store 2          a store split or merged since: N is still the
 *   shards N                 count it was made with (shards.conf's), then
 *   shard S D                one line per shard, its number and depth
 *   ...                      (placement.h, "layouts")
 *
 * A layout that is uniform again (every shard split once, say) is written as
 * format 2 too: shards.conf's `shards` always names the count the store was
 * made with, and an older shardfs (format 1 only) refuses such a store
 * instead of placing records by the wrong count.
 *
 * A store without replicas and etcd (store_layout_static: a single node,
 * or a cluster whose nodes each keep the layout of their own shards) keeps
 * its layout here. With etcd the shard map (shard_map.h) holds it, a depth
 * per shard, and STORE only the count the store was made with
 * (store_layout_check compares nothing else then; fs/main.c loads the
 * map's layout before a serving open). A cluster with replicas but no
 * etcd keeps its uniform layout.
 *
 * Errors: 0 or -1 with "FILE[:LINE]: reason" in err, or -errno.
 */
#ifndef SHARDFS_STORE_LAYOUT_H
#define SHARDFS_STORE_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

struct store_layout {
    unsigned base;                      /* the count the store was made with */
    unsigned slots;                     /* 2^(largest depth) */
    uint8_t depth[CONFIG_MAX_SHARDS];   /* placement.h's layout, slots entries */
};

/* Read DATA_DIR/STORE of node. 0 and *l; 1 when there is none (a new
 * store: *l is cfg's uniform layout); -1 with the reason in err. */
int store_layout_read(const struct config *cfg, int node, struct store_layout *l, char *err,
                      size_t errlen);

/* 1 if l is the uniform layout of its base count. */
int store_layout_is_base(const struct store_layout *l);

/* Replace DATA_DIR/STORE of node with l, durably. 0 or -errno. */
int store_layout_write(const struct config *cfg, int node, const struct store_layout *l);

/* Write the STORE of a new store (cfg's uniform layout) unless there is
 * one. 0 or -errno. */
int store_layout_create(const struct config *cfg, int node);

/* 1 if node is cfg's only node, owns every shard, and the cluster has no
 * replicas and no etcd. */
int store_layout_single_node(const struct config *cfg, int node);

/* 1 if cfg's store has no shard map (etcd) and no replicas: the stores
 * whose layout STORE holds. On a cluster of them each node changes
 * the layout of its own shards (a split puts the new shard beside the old,
 * on the same node) and is the authority on it; the others learn it from
 * its refusals (namespace.c). */
int store_layout_static(const struct config *cfg);

/* Before a store is opened: read its STORE, check it against cfg (the same
 * count as shards.conf, a layout only a single-node store may have), and
 * make cfg's layout the store's: shard_count becomes its number of slots
 * and every slot is node's. May be called again after the layout changed.
 * 0 or -1 with the reason in err. */
int store_layout_apply(struct config *cfg, int node, char *err, size_t errlen);

/* 0 if the STORE of node holds cfg's layout (or there is none yet), else -1
 * with the reason in err: ns_open()'s check that nobody split the store
 * since cfg was loaded. */
int store_layout_check(const struct config *cfg, int node, char *err, size_t errlen);

#endif
