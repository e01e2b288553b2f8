/* store_lock.c -- one process at a time in a node's data directory (see
 * store_lock.h).
 *
 * LOCK holds "PID\nWHAT\n" and, for a mount, "MOUNTPOINT\n". The holder
 * writes it right after taking the lock, over whatever the previous holder
 * left, and then cuts the file to its length; so a reader may for a moment
 * see the previous holder's pid (a process that is gone: it is then not
 * named) but never a torn line that it would take for a number.
 */
#include "store_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#define POLL_MS 10
#define WHAT_MAX 16

/* What the holder wrote into LOCK. */
struct holder {
    long pid; /* 0: unknown, or no longer running */
    char what[WHAT_MAX];
    char mountpoint[PATH_MAX];
};

static uint64_t monotonic_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

static int pid_alive(long pid)
{
    return pid > 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM);
}

/* Take the next line of *p (NUL-terminated in place), or NULL. */
static char *next_line(char **p)
{
    char *line = *p, *nl = line ? strchr(line, '\n') : NULL;

    if (!nl)
        return NULL;
    *nl = 0;
    *p = nl + 1;
    return line;
}

static void holder_read(int fd, struct holder *h)
{
    char buf[PATH_MAX + 64], *p = buf, *line, *end;
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);

    memset(h, 0, sizeof(*h));
    if (n <= 0)
        return;
    buf[n] = 0;
    line = next_line(&p);
    if (!line)
        return;
    errno = 0;
    h->pid = strtol(line, &end, 10);
    if (errno || end == line || *end || !pid_alive(h->pid)) {
        h->pid = 0;
        return;
    }
    if ((line = next_line(&p)) != NULL)
        snprintf(h->what, sizeof(h->what), "%s", line);
    if ((line = next_line(&p)) != NULL && line[0] == '/')
        snprintf(h->mountpoint, sizeof(h->mountpoint), "%s", line);
}

static void holder_write(int fd, const struct store_lock_opts *o)
{
    char rec[PATH_MAX + 64];
    const char *mp = o->mountpoint;
    int len;

    if (mp && (mp[0] != '/' || strchr(mp, '\n')))
        mp = NULL; /* the record is line-based; a reader just names no mountpoint */
    len = snprintf(rec, sizeof(rec), "%ld\n%.*s\n%s%s", (long)getpid(), WHAT_MAX - 1,
                   o->what ? o->what : "shardfs", mp ? mp : "", mp ? "\n" : "");
    if (len < 0 || (size_t)len >= sizeof(rec))
        return;
    /* Only a message of a later process depends on this record: a failure
     * here costs it the pid in its message, nothing else. */
    if (pwrite(fd, rec, (size_t)len, 0) != len)
        return;
    if (ftruncate(fd, len) != 0) {
        /* the previous record's tail stays behind the lines we read */
    }
}

/* Undo the octal escapes (\040 and the like) of a /proc/self/mountinfo field. */
static void mountinfo_unescape(char *s)
{
    char *out = s;

    for (; *s; s++) {
        if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
            s[3] >= '0' && s[3] <= '7') {
            *out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
            s += 3;
        } else {
            *out++ = *s;
        }
    }
    *out = 0;
}

/* 1 if path is a shardfs mount now. Once umount(2) has returned, the mount
 * is gone from here, even while its daemon is still closing the store. */
static int is_shardfs_mount(const char *path)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;

    if (!f)
        return 0;
    while (!found && getline(&line, &cap, f) > 0) {
        /* ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE ... */
        char *save = NULL, *field = strtok_r(line, " ", &save);
        for (int i = 1; field && i <= 4; i++)
            field = strtok_r(NULL, " ", &save);
        if (!field)
            continue;
        mountinfo_unescape(field);
        if (strcmp(field, path) != 0)
            continue;
        char *dash = save ? strstr(save, " - ") : NULL;
        found = dash && strncmp(dash + 3, "fuse.shardfs ", 13) == 0;
    }
    free(line);
    fclose(f);
    return found;
}

/* "pid N, mount of /x" or "" when the holder is not known. */
static void holder_describe(const struct holder *h, char *out, size_t len)
{
    if (!h->pid)
        out[0] = 0;
    else if (h->mountpoint[0])
        snprintf(out, len, " (pid %ld, %s of %s)", h->pid, h->what, h->mountpoint);
    else
        snprintf(out, len, " (pid %ld, %s)", h->pid, h->what);
}

int store_lock_acquire(const char *data_dir, const struct store_lock_opts *o, int *fd, char *err,
                       size_t errlen)
{
    char path[PATH_MAX + 16], who[PATH_MAX + 64];
    struct holder h;
    uint64_t deadline = monotonic_ms() + o->wait_ms;
    int told = 0, rc;

    *fd = -1;
    snprintf(path, sizeof(path), "%s/LOCK", data_dir);
    int lfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lfd < 0) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return rc;
    }
    while (flock(lfd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK) {
            rc = -errno;
            snprintf(err, errlen, "%s: %s", path, strerror(errno));
            goto fail;
        }
        holder_read(lfd, &h);
        holder_describe(&h, who, sizeof(who));
        if (h.pid && h.mountpoint[0] && !strcmp(h.what, "mount") &&
            is_shardfs_mount(h.mountpoint)) {
            snprintf(err, errlen, "%s: the store is in use: mounted at %s by shardfs pid %ld",
                     data_dir, h.mountpoint, h.pid);
            rc = -EBUSY;
            goto fail;
        }
        if (monotonic_ms() >= deadline) {
            snprintf(err, errlen, "%s: the store is in use by another shardfs process%s%s",
                     data_dir, who, told ? ", which did not finish in time" : "");
            rc = -EBUSY;
            goto fail;
        }
        if (!told && o->waiting) {
            char why[PATH_MAX + 256];
            snprintf(why, sizeof(why),
                     "%s: waiting for the shardfs process that has this store open%s to"
                     " finish (up to %u s)...",
                     data_dir, who, (o->wait_ms + 999) / 1000);
            o->waiting(o->ctx, why);
        }
        told = 1;
        struct timespec ts = {0, POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    holder_write(lfd, o);
    *fd = lfd;
    return 0;
fail:
    close(lfd);
    return rc;
}
