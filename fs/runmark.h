/* runmark.h -- did the last daemon of a store stop without closing it?
 *
 * A daemon that opens a data directory to serve it writes DATA_DIR/RUNNING
 * (durably) naming this boot of the machine (/proc/sys/kernel/random/boot_id)
 * and removes it when it closes the store. Finding the file at the next open
 * means the last daemon did not close: if the boot is the same, the daemon
 * died (kill -9, a crash) and the page cache kept everything it wrote; a
 * multi-shard operation it was in the middle of may be half done (a
 * directory's link count not yet raised, a replaced file not yet dropped).
 * If the boot differs, the machine stopped (a power cut, a kernel crash):
 * each shard is still consistent, but the shards may have kept different
 * amounts of their unsynced tails, so any recent multi-shard operation can
 * be half there (DESIGN.md, "After an unclean stop").
 *
 * Errors: 0 or -errno. Not thread-safe; called once at open and at close.
 */
#ifndef SHARDFS_RUNMARK_H
#define SHARDFS_RUNMARK_H

enum runmark_last {
    RUNMARK_CLEAN = 0,          /* closed, or a new store */
    RUNMARK_DAEMON_DIED = 1,    /* not closed, same boot */
    RUNMARK_MACHINE_STOPPED = 2 /* not closed, the machine restarted since */
};

/* Tell how the last run ended (*last) and, when mark is set, write RUNNING
 * for this boot and this process, durably (file and directory synced)
 * before anything in the store changes. */
int runmark_begin(const char *data_dir, int mark, enum runmark_last *last);

/* The store was closed cleanly: remove RUNNING. */
void runmark_end(const char *data_dir);

#endif
