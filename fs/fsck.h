/* fsck.h -- the store checker and repairer.
 *
 * fsck_run() reads every record of every shard of an open namespace (opened
 * with NS_OPEN_NO_RECOVER, so crash leftovers are still visible) and checks:
 * entries whose inode is missing (dangling), entries in a missing or non-
 * directory parent, inodes no entry names (orphans; marks of files unlinked
 * while open), link counts (files: names; directories: 2 + subdirectories),
 * directory parent pointers, chunks and xattrs without an inode or beyond the
 * end of file, records on the wrong shard, half-done multi-shard operations
 * (intent records) and directories left marked dying.
 *
 * It prints one line per problem to out. With repair it fixes each one without
 * losing data: half-done operations are rolled forward or back, orphaned
 * inodes with a size or children go to /lost+found, link counts are recounted.
 *
 * Returns the number of problems found (0 = clean) or a negative errno.
 * Single-threaded: the namespace must not be in use by anything else.
 */
#ifndef SHARDFS_FSCK_H
#define SHARDFS_FSCK_H

#include <stdio.h>

#include "namespace.h"

int fsck_run(struct ns *ns, int repair, FILE *out);

/* At the start of serving a store (before the FUSE session and the node
 * server): if its last daemon did not close it (ns_unclean_stop(): killed,
 * or the machine stopped), a multi-shard operation may be half done without
 * an intent saying so; on a single-node store run fsck_run(ns, 1, out) then,
 * saying why; on a cluster only say that fsck should be run. Returns 0 or
 * -errno; a failed check is said on out too, and the caller serves the store
 * as it is (the mark stays for the next mount). */
int fsck_after_unclean_stop(struct ns *ns, FILE *out);

#endif
