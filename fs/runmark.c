/* runmark.c -- DATA_DIR/RUNNING: the mark of an open store (see runmark.h).
 *
 * The file holds "shardfs-running\nboot BOOT_ID\npid PID\n". It is written
 * as RUNNING.tmp, synced and renamed, and the directory synced, so after a
 * power cut it is either there, whole, or not there at all (and then the
 * store was not written after this open either: the mark is durable before
 * any shard changes). Its removal at close need not be durable: a mark that
 * comes back after a clean close only costs one needless check.
 */
#include "runmark.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "durable.h"

#define BOOT_ID_MAX 64

static void boot_id(char out[BOOT_ID_MAX])
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");

    snprintf(out, BOOT_ID_MAX, "unknown");
    if (!f)
        return;
    if (fgets(out, BOOT_ID_MAX, f))
        out[strcspn(out, "\n")] = 0;
    fclose(f);
}

static int mark_path(const char *data_dir, const char *name, char *out, size_t len)
{
    return snprintf(out, len, "%s/%s", data_dir, name) >= (int)len ? -ENAMETOOLONG : 0;
}

/* The boot the mark names, or "" when there is no mark. */
static int mark_read(const char *path, char boot[BOOT_ID_MAX])
{
    char line[128];
    FILE *f = fopen(path, "re");

    boot[0] = 0;
    if (!f)
        return errno == ENOENT ? 0 : -errno;
    snprintf(boot, BOOT_ID_MAX, "unknown"); /* a mark without a boot line */
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "boot ", 5) == 0) {
            line[strcspn(line, "\n")] = 0;
            snprintf(boot, BOOT_ID_MAX, "%.*s", BOOT_ID_MAX - 1, line + 5);
        }
    fclose(f);
    return 0;
}

static int mark_write(const char *path, const char *boot)
{
    char text[200];
    int n = snprintf(text, sizeof(text), "shardfs-running\nboot %s\npid %ld\n", boot,
                     (long)getpid());

    return durable_replace_file(path, text, (size_t)n);
}

int runmark_begin(const char *data_dir, int mark, enum runmark_last *last)
{
    char path[PATH_MAX], was[BOOT_ID_MAX], now[BOOT_ID_MAX];
    int rc;

    *last = RUNMARK_CLEAN;
    if (mark_path(data_dir, "RUNNING", path, sizeof(path)))
        return -ENAMETOOLONG;
    rc = mark_read(path, was);
    if (rc)
        return rc;
    boot_id(now);
    if (was[0])
        *last = strcmp(was, now) != 0 ? RUNMARK_MACHINE_STOPPED : RUNMARK_DAEMON_DIED;
    return mark ? mark_write(path, now) : 0;
}

void runmark_end(const char *data_dir)
{
    char path[PATH_MAX];

    if (mark_path(data_dir, "RUNNING", path, sizeof(path)) == 0)
        unlink(path);
}
