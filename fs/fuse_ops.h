/* fuse_ops.h -- the low-level FUSE adapter.
 *
 * Translates FUSE requests into namespace calls. Node ids handed to the kernel
 * are pointers to struct node (the root is FUSE_ROOT_ID); a node lives while
 * the kernel holds a lookup reference or a file handle on it.
 *
 * Cache coherence: in single-node mode every change to the store goes through
 * this mount, and the kernel keeps its own entry, attribute and page caches in
 * step with the requests it sends. Entry, negative-entry and attribute
 * timeouts are therefore long (cache_timeout in shards.conf) and open files
 * keep their page cache (keep_cache). With other writers (shared: other
 * nodes, the HTTP API) it is close-to-open: missing names are not cached and
 * every open drops the file's cached pages and attributes; and a write-only
 * O_APPEND open uses direct I/O, so that each write(2) of up to max_write
 * (1 MiB, less a page for an unaligned buffer) reaches the store whole and
 * goes at the end of the file in one piece. DESIGN.md has the reasoning.
 *
 * Threads: the callbacks run on libfuse's worker threads; the node table has
 * its own lock. fs_start() adds one thread, which drops what O_DIRECT writes
 * changed from the kernel's page cache and then answers them (fuse_ops.c).
 */
#ifndef SHARDFS_FUSE_OPS_H
#define SHARDFS_FUSE_OPS_H

#include <fuse_lowlevel.h>

#include "namespace.h"

struct fs;

/* The state passed as userdata to fuse_session_new(). ns stays the caller's.
 * shared: other writers exist (see above). */
struct fs *fs_new(struct ns *ns, double cache_timeout, int shared);
/* Serve se: the session of the invalidations (close-to-open, O_DIRECT
 * writes); starts the invalidation thread. Call after fork(), before the
 * session loop. 0 or -errno. */
int fs_start(struct fs *fs, struct fuse_session *se);
/* After the session loop ended and before fuse_session_destroy(): answer
 * what the invalidation thread holds and stop it, then delete the unlinked
 * files and directories whose last close the kernel never told (it drops
 * the releases still queued when the mount goes). NULL-safe, idempotent. */
void fs_stop(struct fs *fs);
/* Stops the thread if fs_stop() was not called; accepts NULL. */
void fs_free(struct fs *fs);

/* An ns_is_open_fn (ctx: the struct fs): 1 while the kernel holds the inode
 * open through this mount, so its last name may go but not its data. */
int fs_is_open(void *ctx, const struct ino_id *id);

extern const struct fuse_lowlevel_ops fs_fuse_ops;

#endif
