/* store_lock.h -- one process at a time in a node's data directory.
 *
 * The process that opens a store (mount, serve, fsck, where) holds an
 * exclusive flock() on DATA_DIR/LOCK for as long as it has the shards open,
 * and writes into that file who it is: its pid, the command, and for a mount
 * the mountpoint. A second process reads it to name what is in its way.
 *
 * A second process waits for the lock, up to a bound, instead of failing at
 * once: `fusermount3 -u` (and umount) return as soon as the kernel has
 * detached the mount, while the daemon is still committing and closing its
 * shards, so a script that unmounts and mounts again (or runs fsck) would
 * otherwise fail now and then. It does not wait when the holder is a mount
 * that is still mounted (the mountpoint it recorded is a shardfs mount in
 * /proc/self/mountinfo): that store is in use, and waiting would not help.
 *
 * Errors: -EBUSY (held by another process; err names it), or -errno of the
 * open. err gets a message in both cases. Not thread-safe; called once per
 * process, from ns_open().
 */
#ifndef SHARDFS_STORE_LOCK_H
#define SHARDFS_STORE_LOCK_H

#include <stddef.h>

/* The default bound of the wait, in milliseconds (`--wait` changes it). */
#define STORE_LOCK_WAIT_MS 10000u

struct store_lock_opts {
    unsigned wait_ms;       /* how long to wait for another holder; 0: fail at once */
    const char *what;       /* this process, recorded for the next one: "mount", "fsck"... */
    const char *mountpoint; /* absolute, recorded when mounting; else NULL */
    /* Told once, when the wait starts, why (a line without newline); may be NULL. */
    void (*waiting)(void *ctx, const char *why);
    void *ctx;
};

/* Lock data_dir/LOCK (created if missing) and record this process in it.
 * Returns 0 with the descriptor in *fd (closing it releases the lock), or
 * -errno with a message in err. */
int store_lock_acquire(const char *data_dir, const struct store_lock_opts *o, int *fd, char *err,
                       size_t errlen);

#endif
