/* durable.h -- making names durable: fsync of directories.
 *
 * An fsync of a file makes its data and size durable, not its name: a file
 * created or renamed in a directory survives a power cut only once the
 * directory itself is synced (POSIX; ext4 often does it anyway, other
 * filesystems do not). Every place that creates or renames a file the store
 * needs after a crash calls one of these. Both return 0 or -errno and are
 * safe from any thread.
 */
#ifndef SHARDFS_DURABLE_H
#define SHARDFS_DURABLE_H

#include <stddef.h>

/* fsync the directory dir. */
int durable_sync_dir(const char *dir);

/* fsync the directory that holds path (path's parent; "." for a bare name). */
int durable_sync_parent(const char *path);

/* Replace the file at path with len bytes of data, durably and at once:
 * written to PATH.tmp, fsynced, renamed over path, and the directory
 * synced, so a crash leaves the old content or the new, never a mix. */
int durable_replace_file(const char *path, const void *data, size_t len);

/* Remove directory dir and the files in it (no subdirectories), for good:
 * dir is first renamed to `gone` and that rename made durable, so a crash
 * never leaves a half-deleted dir (a shard's redo logs without its
 * data.mdb, which a later open would take for a shard); a `gone` left by
 * an earlier crash is removed first. 0 also when dir is not there. */
int durable_remove_dir(const char *dir, const char *gone);

#endif
