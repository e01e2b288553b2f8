/* namespace.h -- filesystem semantics over shards.
 *
 * Entries, inodes, chunks and xattrs (record.h) spread over the store's shards
 * by placement.h; this module implements create, unlink, rename, link, rmdir,
 * read, write, truncate and xattrs on top of the shard interface, including the
 * ordered multi-shard protocols (DESIGN.md, "Multi-shard operations"). It knows
 * no FUSE types, so the FUSE adapter, fsck and later the HTTP key API share it.
 *
 * Errors: 0 (or a byte count) or a negative errno, POSIX-style (-ENOENT,
 * -EEXIST, -ENOTEMPTY, -EISDIR, -ENOTDIR, -EINVAL, -ENODATA, -ERANGE, ...).
 *
 * Threads: every function may be called from any thread. Changes to one inode
 * are serialised by a striped lock inside this module; callers hold no locks.
 *
 * Memory: all buffers are the caller's; struct inode is returned by value.
 */
#ifndef SHARDFS_NAMESPACE_H
#define SHARDFS_NAMESPACE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <time.h>

#include "batch.h"
#include "config.h"
#include "record.h"
#include "shard.h"
#include "store_lock.h"

struct remote;

struct ns;

/* Asked when an inode's last name goes away (unlink, rmdir, rename over it):
 * return 1 if the inode, file or directory, is still open (it is then kept,
 * with nlink 0 and an orphan mark, until ns_reap()), 0 to delete it at once. */
typedef int (*ns_is_open_fn)(void *ctx, const struct ino_id *id);

/* Called for each directory entry; the name is borrowed for the call. The
 * callback MUST NOT call back into the namespace. A call with name NULL
 * (and nlen 0, id NULL) says the listing starts again: forget the entries
 * given so far (a shard's layout changed under it, ns_set_relayout);
 * returning non-zero then makes the listing fail with EIO. */
typedef int (*ns_dirent_fn)(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                            uint8_t dtype);

/* Open the store as node `node` of cfg: lock this node's data directory
 * (store_lock.h: lock says how to wait for another process and what to record;
 * NULL fails at once if the store is in use), check its layout, open the
 * shards it owns (LMDB) and reach the others over HTTP (shard_remote.h),
 * create the root on first use (shard 0's owner), and finish any multi-shard
 * operation a crash interrupted on its own shards. -errno and a message in
 * err (-EBUSY: another process has the store open). */
#define NS_OPEN_NO_RECOVER 1u   /* leave crash leftovers for fsck to see */
int ns_open(const struct config *cfg, int node, unsigned flags, const struct store_lock_opts *lock,
            struct ns **out, char *err, size_t errlen);
void ns_close(struct ns *ns);

/* How the last process that served this data directory stopped: 0 it
 * closed the store, 1 it died (kill -9), 2 the machine stopped under it (a
 * power cut); see runmark.h. After 1 or 2 a multi-shard operation may be
 * half done in a way recovery does not see (fsck_after_unclean_stop()). */
int ns_unclean_stop(const struct ns *ns);
/* A full fsck --repair of the store succeeded: the mark of an unclean stop
 * goes at ns_close() (until then a failed open or a crash keeps it). */
void ns_repaired(struct ns *ns);
/* 1 if every shard of the store is local (a single-node store). */
int ns_all_local(const struct ns *ns);
/* fn(ctx, name, since) for every node this process has marked down
 * (shard_remote.h: a connection to it failed and none has been answered
 * since; since is the wall-clock time of the mark). Nothing for a
 * single-node store. */
void ns_nodes_down(struct ns *ns, void (*fn)(void *ctx, const char *node, time_t since),
                   void *ctx);

/* The slots of the store's layout (placement.h): the number of shards,
 * unless some shard was split (reshard.h). Loops over the shards visit the
 * slots i with ns_is_shard(); every slot i has a shard, ns_shard(ns, i),
 * the same for all slots of one shard. */
unsigned ns_shard_count(const struct ns *ns);
/* 1 if slot index is a shard's own: the shard numbered index. */
int ns_is_shard(const struct ns *ns, unsigned index);
/* The layout lock. Every operation below runs with it held for reading
 * (ns_hold; a thread may nest holds of one ns); ns_quiesce() takes it for
 * writing: it returns once no operation is in flight and keeps new ones
 * waiting until ns_unquiesce(). A caller of ns_quiesce() must hold nothing. */
void ns_hold(struct ns *ns);
void ns_unhold(struct ns *ns);
void ns_quiesce(struct ns *ns);
void ns_unquiesce(struct ns *ns);

/* Layout changes (reshard.h), made between ns_quiesce() and ns_unquiesce():
 * split: shard s (depth d) becomes s and s + 2^d, the latter served by
 * `to` (open, its records already there). 0, -EINVAL (not a shard),
 * -ENOSPC (past CONFIG_MAX_SHARDS).
 * merge: the buddies low and low + 2^(d-1) become low; returns the upper
 * one's shard for the caller to close, or NULL (not such a pair). */
int ns_layout_split(struct ns *ns, unsigned s, struct shard *to);
struct shard *ns_layout_merge(struct ns *ns, unsigned low);

/* A shard of another node refused an operation for another layout (wire.h,
 * "Layouts"; the op did nothing there): fn(ctx) brings this namespace's
 * layout up to date (the shard map: ns_quiesce, ns_layout_split/merge) and
 * returns 0 if it changed it, else -errno. It runs on the thread of an
 * operation, holding nothing. The operation then runs again (up to 4
 * times, also when fn changed nothing: another thread may have learnt it
 * meanwhile; a listing tells its callback to start again: ns_dirent_fn);
 * without fn, or after the last try, the operation fails with EIO.
 * Set before the namespace is used. A cluster without a shard map has a
 * fn from ns_open: it learns from the remote layer what the refusing
 * nodes told (remote_told_depth), and ns_open asks every remote shard. */
typedef int (*ns_relayout_fn)(void *ctx);
void ns_set_relayout(struct ns *ns, ns_relayout_fn fn, void *ctx);

/* The shard a record with placement hash h lives on. */
unsigned ns_home(const struct ns *ns, uint64_t hash);
/* The depth of the shard of slot index (placement.h). */
unsigned ns_shard_depth(const struct ns *ns, unsigned index);
/* 1 if this node owns shard index (it is an LMDB environment here). */
int ns_shard_is_local(const struct ns *ns, unsigned index);
/* 1 if id's inode (and so its data) lives on a shard this node does not
 * hold: a change of it is a round trip to another node. */
int ns_inode_is_remote(const struct ns *ns, const struct ino_id *id);
struct shard *ns_shard(struct ns *ns, unsigned index);
/* This node's replica of shard index (shards.conf `replicas`): an LMDB
 * shard ns_open() opened beside the namespace for the replica-sync thread
 * (replica_sync.h). The namespace never uses it: it reaches that shard at
 * its primary, like any other node's. NULL if this node holds none. */
struct shard *ns_replica(struct ns *ns, unsigned index);
/* Put wrap (e.g. shard_repl.h's wrapper around ns_shard(ns, index)) in
 * place of a shard this node owns; from then on the namespace uses and
 * closes wrap, whose close must close the shard it wraps. Before any other
 * thread uses ns. 0, or -EINVAL when index is not this node's. */
int ns_shard_wrap(struct ns *ns, unsigned index, struct shard *wrap);
/* Put s in place of shard index, whatever it was, and return what was
 * there (now the caller's, to close); the namespace uses and closes s from
 * then on. For a failover (failover.h), whose shard switches between the
 * local copy and the remote one. Before any other thread uses ns. NULL for
 * a bad index. */
struct shard *ns_shard_swap(struct ns *ns, unsigned index, struct shard *s);
/* The remote shards' shared state (shard_remote.h); NULL when every shard
 * is local. */
struct remote *ns_remote(struct ns *ns);

/* Copies of shards that move at runtime (`shardfs replica add/drop`,
 * fs/failover.h), in the directory ns_open() would use, DATA_DIR/shard-N.
 * ns_replica_take: hand ns_replica(ns, index) to the caller (to close);
 * ns no longer has it. NULL if none.
 * ns_copy_open: open (creating) the LMDB copy of shard index with the
 * options ns_open() gives a replica; the caller closes it. 0, or -errno
 * with a reason in err.
 * ns_copy_remove: delete that directory (its copy closed): renamed to
 * shard-N.dropped durably first, then emptied and removed. 0 also when it
 * does not exist; -errno. */
struct shard *ns_replica_take(struct ns *ns, unsigned index);
int ns_copy_open(struct ns *ns, unsigned index, struct shard **out, char *err, size_t errlen);
int ns_copy_remove(struct ns *ns, unsigned index);
unsigned ns_entry_shard(const struct ns *ns, const struct ino_id *dir, const char *name,
                        size_t nlen);
unsigned ns_inode_shard(const struct ns *ns, const struct ino_id *id);

int ns_getattr(struct ns *ns, const struct ino_id *id, struct inode *out);
/* ns_getattr under the inode's lock, so it falls before or after any change
 * of this process to the inode, never between the change's decisions and
 * its apply: an unlink asks is_open (ns_is_open_fn) under that lock, so an
 * open counted before this read is seen, or this read sees the inode gone. */
int ns_getattr_ordered(struct ns *ns, const struct ino_id *id, struct inode *out);
/* ns_getattr, or the inode as this process read or wrote it at most
 * max_age_ms ago (attribute caching, for a kernel that asks again); *age_ms
 * says how old the answer is (0: read now). */
int ns_getattr_recent(struct ns *ns, const struct ino_id *id, unsigned max_age_ms,
                      struct inode *out, unsigned *age_ms);
int ns_lookup(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              struct inode *out);
/* ns_lookup, or -ENOENT at once when this process found the name missing
 * at most max_age_ms ago and created no such name since (names on remote
 * shards only). */
int ns_lookup_recent(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                     unsigned max_age_ms, struct inode *out);
/* The entry alone: the id and the DT_* type name names in dir (one read,
 * where ns_lookup makes two), for walking through directories. */
int ns_lookup_id(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                 struct ino_id *id, uint8_t *dtype);

/* Create a regular file, directory, symlink (target != NULL), fifo, socket or
 * device. -EEXIST if the name exists. */
int ns_mknode(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              uint32_t mode, uint32_t rdev, uint32_t uid, uint32_t gid, const char *target,
              struct inode *out);
/* ns_mknode of a regular file that the caller opens: with other nodes, its
 * open registration (below) goes in the create's own batch. */
int ns_create_open(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                   uint32_t mode, uint32_t uid, uint32_t gid, struct inode *out);
int ns_unlink(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              ns_is_open_fn is_open, void *ctx);
/* An open directory (is_open) stays, empty, until ns_reap(), as a file does. */
int ns_rmdir(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
             ns_is_open_fn is_open, void *ctx);

#define NS_RENAME_NOREPLACE 1u
#define NS_RENAME_EXCHANGE 2u
int ns_rename(struct ns *ns, const struct ino_id *odir, const char *oname, size_t olen,
              const struct ino_id *ndir, const char *nname, size_t nlen, unsigned flags,
              ns_is_open_fn is_open, void *ctx);
int ns_link(struct ns *ns, const struct ino_id *id, const struct ino_id *ndir, const char *name,
            size_t nlen, struct inode *out);

/* Attribute changes: set the fields named in mask. */
#define NS_SET_MODE 0x1u
#define NS_SET_UID 0x2u
#define NS_SET_GID 0x4u
#define NS_SET_SIZE 0x8u
#define NS_SET_ATIME 0x10u
#define NS_SET_MTIME 0x20u
#define NS_SET_ATIME_NOW 0x40u
#define NS_SET_MTIME_NOW 0x80u
#define NS_SET_CTIME 0x100u
#define NS_SET_KILL_SUIDGID 0x200u
/* Change nothing and answer -ENOENT if the file has no name left (nlink 0:
 * unlinked or replaced, kept only for those who have it open). */
#define NS_SET_LINKED 0x400u
/* With other nodes: register this node's open of the file (the open
 * registry, below) in the same batch. Alone (with NS_SET_LINKED or not)
 * the record is not changed, only read and asserted: an open's read. */
#define NS_SET_REGISTER 0x800u
struct ns_setattr {
    unsigned mask;
    uint32_t mode, uid, gid;
    uint64_t size;
    struct timespec atime, mtime, ctime;
};
int ns_setattr(struct ns *ns, const struct ino_id *id, const struct ns_setattr *sa,
               struct inode *out);

/* Read up to size bytes at off into buf; holes read as zeros. Returns bytes. */
ssize_t ns_read(struct ns *ns, const struct ino_id *id, uint64_t off, size_t size, void *buf);
/* ns_read as of the inode record ino, read before (by ns_lookup, say): a
 * file small enough to be held in the record is read from ino alone, a
 * larger one from its chunks as they are now. */
ssize_t ns_read_at(struct ns *ns, const struct inode *ino, uint64_t off, size_t size, void *buf);
/* Write size bytes at off (at the end of the file when append); returns bytes
 * written, and the file's new size in *new_size when not NULL. */
ssize_t ns_write(struct ns *ns, const struct ino_id *id, uint64_t off, const void *buf,
                 size_t size, int append, int kill_suidgid, uint64_t *new_size);
/* ns_write (not an append) that gives the inode it left in *after. */
ssize_t ns_write_ino(struct ns *ns, const struct ino_id *id, uint64_t off, const void *buf,
                     size_t size, struct inode *after);

/* Pipelined writes (write_behind.h). ns_write_plan builds, with no round
 * trip, the batch of a write of [off, off + size) onto the inode *base (as
 * a write not yet landed will leave it): it asserts *base, puts the chunks
 * and the new inode, which it also gives in *after. Only a write that
 * reads no old chunk can be planned: base a regular file larger than
 * RECORD_INLINE_MAX, and off in a chunk at or past base's end; else
 * -EINVAL. behind: the write that leaves *base may still be in flight, and
 * the shard waits a little for it (BATCH_AWAIT_VALUE). 0, or -errno (b is then freed). ns_write_planned applies b (and
 * frees it): 0; -EAGAIN if the inode is not *base (the write before has
 * not landed, or another change came first); -EBADSLT if the shard's
 * layout changed; either way nothing changed and the write is to be done
 * again with ns_write_ino once the writes before it are done; or -errno. */
int ns_write_plannable(const struct inode *base, uint64_t off);
int ns_write_plan(struct ns *ns, const struct inode *base, uint64_t off, const void *buf,
                  size_t size, int behind, struct batch *b, struct inode *after);
int ns_write_planned(struct ns *ns, struct batch *b, const struct inode *after);

int ns_readdir(struct ns *ns, const struct ino_id *dir, ns_dirent_fn fn, void *ctx);

/* A directory entry with its inode when that came along: ino is NULL for an
 * inode that lives on another shard than its entry (renamed since it was
 * made) or was gone; the caller reads those itself. ino is borrowed. */
typedef int (*ns_direntplus_fn)(void *ctx, const char *name, size_t nlen,
                                const struct ino_id *id, uint8_t dtype,
                                const struct inode *ino);
/* ns_readdir with each entry's inode read on the entry's shard in the same
 * scan: a listing with attributes (readdirplus) in one round trip per shard,
 * every shard asked at once. */
int ns_readdir_plus(struct ns *ns, const struct ino_id *dir, ns_direntplus_fn fn, void *ctx);

/* The inodes of ids[0..n): one round trip per shard for every 128 of them,
 * every shard asked at once. fn gets (ctx, index in ids, inode) for each
 * one read; one that is gone or could not be read is left out (read it
 * alone for its error). 0, or -errno (-ENOMEM). */
typedef void (*ns_inode_fn)(void *ctx, unsigned i, const struct inode *ino);
int ns_getattr_many(struct ns *ns, const struct ino_id *ids, unsigned n, ns_inode_fn fn,
                    void *ctx);

/* xattrs; flags are XATTR_CREATE / XATTR_REPLACE. get/list with size 0 return
 * the size needed; -ERANGE if size is too small. */
int ns_setxattr(struct ns *ns, const struct ino_id *id, const char *name, const void *value,
                size_t size, int flags);
ssize_t ns_getxattr(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                    size_t size);
/* ns_getxattr, or -ENODATA at once when the inode as this process read or
 * wrote it at most max_age_ms ago promised no xattrs (INODE_NO_XATTR): the
 * kernel asks for security.capability before every write(2). */
ssize_t ns_getxattr_recent(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                           size_t size, unsigned max_age_ms);
ssize_t ns_listxattr(struct ns *ns, const struct ino_id *id, char *list, size_t size);
int ns_removexattr(struct ns *ns, const struct ino_id *id, const char *name);

/* The last close (or unmount) of an inode whose last name is gone (nlink 0;
 * a linked inode is left alone): delete it, or, with other nodes and when
 * its last name went less than 10 s ago, leave it to its shard's owner for
 * their readers (DESIGN.md, "Multi-shard operations"). 0 also when it is
 * gone already. */
int ns_reap(struct ns *ns, const struct ino_id *id);
/* With other nodes, a file a rename replaced is kept for their readers for
 * 10 s; the node that owns its shard deletes it then. Start that node's
 * reaper thread (after fork: call from the serving process). is_open(ctx,
 * id), may be NULL, says the file is open in this process: then its last
 * close deletes it (and is_open must see to that, as fs_is_open does).
 * Nothing to do on a single-node store. 0 or -errno. */
int ns_reaper_start(struct ns *ns, ns_is_open_fn is_open, void *ctx);
/* Which shards "this node's shards" are for the reaper (kept files and
 * orphans, here and in ns_reaper_stop): by default those the config gives
 * the node; with a shard map that moves primaries, leads(ctx, shard) says
 * whether this node is the shard's primary now (1), so a shard promoted to
 * another node is looked after there, and not by its config owner, now its
 * replica or dead. Set before ns_reaper_start. */
typedef int (*ns_leads_fn)(void *ctx, unsigned shard);
void ns_set_leads(struct ns *ns, ns_leads_fn fn, void *ctx);
/* Stop the reaper and delete every kept file of this node's shards (a
 * clean stop leaves none); after it, is_open is not called again. Call
 * once nothing can replace files any more (the mount and the key API are
 * gone). NULL-safe. ns_close() only stops the thread. */
void ns_reaper_stop(struct ns *ns);

/* The open registry (DESIGN.md, "Files open on other nodes"). With other
 * nodes, each node that has a file open holds a registration of it on the
 * file's shard ('R' records: ns_create_open, NS_SET_REGISTER), and the
 * unlink or rename that takes the file's last name keeps it, with an orphan
 * mark, while any is there. ns_unregister drops this node's registration
 * (its last close of the file; ns_reap does it for an orphan). The node
 * owning the shard deletes an orphan once no live process has it open: a
 * registration is live while its process runs. alive(ctx, node) says
 * whether another node is (1), or is known dead (0: its etcd lease ended),
 * or cannot tell (-errno: alive); without it every other node is presumed
 * alive, and a node's registrations go when it restarts. Set before
 * ns_reaper_start. Nothing of this on a single-node store. */
typedef int (*ns_node_alive_fn)(void *ctx, const char *node);
int ns_unregister(struct ns *ns, const struct ino_id *id);
/* ns_unregister of n files in one batch per shard; rcs[i] is the result for
 * ids[i]. -EIO if any failed, -ENOMEM (nothing done), or 0. */
int ns_unregister_many(struct ns *ns, const struct ino_id *ids, size_t n, int *rcs);
void ns_set_node_alive(struct ns *ns, ns_node_alive_fn fn, void *ctx);

int ns_statfs(struct ns *ns, struct statvfs *st);
/* Make what is applied durable: the inode's shard, or every shard (id NULL). */
int ns_sync(struct ns *ns, const struct ino_id *id);

/* Finish interrupted multi-shard operations (intent records) and delete
 * orphaned inodes; report(ctx, line) is told what was done. Returns the number
 * of repairs or -errno. With dry_run nothing is changed. */
typedef void (*ns_report_fn)(void *ctx, const char *line);
int ns_recover(struct ns *ns, int dry_run, ns_report_fn report, void *ctx);

#endif
