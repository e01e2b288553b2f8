/* shim.c -- an LD_PRELOAD library that records file I/O for the crash
 * simulator (tests/crashsim/crashsim.py).
 *
 * Every call that changes a file or a directory under $CRASHSIM_DIR (at
 * any depth) is passed to libc and, once it succeeded, appended to
 * $CRASHSIM_TRACE as one record:
 *
 *   op:u8 plen:u16le path[plen] a:u64le b:u64le dlen:u32le data[dlen]
 *
 *   'W' write     path, a = offset, data = the bytes written
 *   'T' truncate  path, a = new size
 *   'P' punch     path, a = offset, b = length (zeros, size kept)
 *   'A' allocate  path, a = offset, b = length (size grows, content kept)
 *   'S' sync      path (fsync or fdatasync of a file or a directory)
 *   'C' create    path (a new name, an empty file)
 *   'K' mkdir     path (a new name, an empty directory)
 *   'U' unlink    path
 *   'R' rename    path -> data (the new name)
 *   'M' mark      data = text from crashsim_mark() (the workload's acks)
 *
 * Writes through a descriptor opened with O_SYNC or O_DSYNC are followed by
 * their own 'S'. Paths are absolute. The calls are recorded under one mutex
 * held across the real call, so the trace order is an order the calls could
 * have run in. statvfs() and fstatvfs() report $CRASHSIM_FREE bytes free
 * when it is set, so a workload can take the shard's low-disk paths (hole
 * punching, log truncation) on any disk.
 *
 * Reads are not recorded: the simulator only needs what reaches the disk.
 * A call the shim does not know (mmap writes, msync, copy_file_range) is
 * not used by LMDB without MDB_WRITEMAP or by shard_lmdb.c.
 */
/* The shim defines both the plain and the 64-bit names of each call, so it
 * must see the plain declarations (meson adds -D_FILE_OFFSET_BITS=64). */
#undef _FILE_OFFSET_BITS
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FDS 4096

struct fd_info {
    char *path;             /* absolute, inside the watched dir; NULL if not */
    int dsync;
    int append;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static char watch[PATH_MAX];
static size_t watch_len;
static int trace_fd = -1;
static long long free_bytes = -1;
static struct fd_info fds[MAX_FDS];

#define REAL(name) static __typeof__(name) *real_##name
REAL(open);
REAL(openat);
REAL(close);
REAL(write);
REAL(writev);
REAL(pwrite);
REAL(pwritev);
REAL(fsync);
REAL(fdatasync);
REAL(ftruncate);
REAL(fallocate);
REAL(posix_fallocate);
REAL(rename);
REAL(unlink);
REAL(mkdir);
REAL(statvfs);
REAL(fstatvfs);
REAL(lseek);

static void *next_sym(const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    if (!p) {
        fprintf(stderr, "crashsim shim: no symbol %s\n", name);
        abort();
    }
    return p;
}

static void init(void)
{
    const char *d = getenv("CRASHSIM_DIR"), *t = getenv("CRASHSIM_TRACE");
    const char *f = getenv("CRASHSIM_FREE");

    real_open = next_sym("open");
    real_openat = next_sym("openat");
    real_close = next_sym("close");
    real_write = next_sym("write");
    real_writev = next_sym("writev");
    real_pwrite = next_sym("pwrite");
    real_pwritev = next_sym("pwritev");
    real_fsync = next_sym("fsync");
    real_fdatasync = next_sym("fdatasync");
    real_ftruncate = next_sym("ftruncate");
    real_fallocate = next_sym("fallocate");
    real_posix_fallocate = next_sym("posix_fallocate");
    real_rename = next_sym("rename");
    real_unlink = next_sym("unlink");
    real_mkdir = next_sym("mkdir");
    real_statvfs = next_sym("statvfs");
    real_fstatvfs = next_sym("fstatvfs");
    real_lseek = next_sym("lseek");
    if (f)
        free_bytes = strtoll(f, NULL, 10);
    if (!d || !t)
        return;
    if (snprintf(watch, sizeof(watch), "%s", d) >= (int)sizeof(watch))
        abort();
    watch_len = strlen(watch);
    while (watch_len > 1 && watch[watch_len - 1] == '/')
        watch[--watch_len] = 0;
    trace_fd = real_open(t, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (trace_fd < 0) {
        perror("crashsim shim: trace");
        abort();
    }
}

#define ENSURE_INIT() pthread_once(&once, init)

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void write_all(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = real_write(trace_fd, p, len);
        if (n <= 0) {
            perror("crashsim shim: writing the trace");
            abort();
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Append one record; the data may come in pieces (an iovec). */
static void record(char op, const char *path, uint64_t a, uint64_t b, const struct iovec *iov,
                   int iovcnt, size_t dlen)
{
    uint8_t hdr[1 + 2];
    uint8_t nums[8 + 8 + 4];
    size_t plen = strlen(path);

    hdr[0] = (uint8_t)op;
    put_le(hdr + 1, plen, 2);
    put_le(nums, a, 8);
    put_le(nums + 8, b, 8);
    put_le(nums + 16, dlen, 4);
    write_all(hdr, sizeof(hdr));
    write_all(path, plen);
    write_all(nums, sizeof(nums));
    for (int i = 0; i < iovcnt && dlen; i++) {
        size_t n = iov[i].iov_len < dlen ? iov[i].iov_len : dlen;
        write_all(iov[i].iov_base, n);
        dlen -= n;
    }
}

static void record_simple(char op, const char *path, uint64_t a, uint64_t b)
{
    record(op, path, a, b, NULL, 0, 0);
}

/* The absolute form of path (relative to dirfd or the cwd) if it names the
 * watched directory or something under it. */
static int watched(int dirfd, const char *path, char *out)
{
    char base[PATH_MAX];

    if (trace_fd < 0 || !path)
        return 0;
    if (path[0] == '/') {
        if (snprintf(out, PATH_MAX, "%s", path) >= PATH_MAX)
            return 0;
    } else {
        if (dirfd != AT_FDCWD && dirfd >= 0 && dirfd < MAX_FDS && fds[dirfd].path)
            snprintf(base, sizeof(base), "%s", fds[dirfd].path);
        else if (!getcwd(base, sizeof(base)))
            return 0;
        if (snprintf(out, PATH_MAX, "%s/%s", base, path) >= PATH_MAX)
            return 0;
    }
    size_t n = strlen(out);
    while (n > 1 && out[n - 1] == '/')
        out[--n] = 0;
    if (strcmp(out, watch) == 0)
        return 1;
    return n > watch_len + 1 && strncmp(out, watch, watch_len) == 0 && out[watch_len] == '/';
}

static const struct fd_info *tracked(int fd)
{
    if (trace_fd < 0 || fd < 0 || fd >= MAX_FDS || !fds[fd].path)
        return NULL;
    return &fds[fd];
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode)
{
    char abs[PATH_MAX];
    int fd, existed = 1;

    ENSURE_INIT();
    if (!watched(dirfd, path, abs))
        return real_openat(dirfd, path, flags, mode);
    pthread_mutex_lock(&lock);
    if (flags & O_CREAT) {
        struct stat st;
        existed = stat(abs, &st) == 0;
    }
    fd = real_openat(dirfd, path, flags, mode);
    if (fd >= 0 && fd < MAX_FDS) {
        free(fds[fd].path);
        fds[fd].path = strdup(abs);
        fds[fd].dsync = (flags & (O_SYNC | O_DSYNC)) != 0;
        fds[fd].append = (flags & O_APPEND) != 0;
        if (!existed)
            record_simple('C', abs, 0, 0);
        else if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY)
            record_simple('T', abs, 0, 0);
    }
    pthread_mutex_unlock(&lock);
    return fd;
}

static mode_t open_mode(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return do_open(AT_FDCWD, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return do_open(dirfd, path, flags, mode);
}

int creat(const char *path, mode_t mode)
{
    return do_open(AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC, mode);
}

int close(int fd)
{
    ENSURE_INIT();
    if (fd >= 0 && fd < MAX_FDS && fds[fd].path) {
        pthread_mutex_lock(&lock);
        free(fds[fd].path);
        fds[fd].path = NULL;
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}

/* Record a write of n bytes at off from iov, and its sync on an O_DSYNC fd. */
static void record_write(const struct fd_info *fi, off_t off, const struct iovec *iov, int iovcnt,
                         ssize_t n)
{
    if (n <= 0)
        return;
    record('W', fi->path, (uint64_t)off, 0, iov, iovcnt, (size_t)n);
    if (fi->dsync)
        record_simple('S', fi->path, 0, 0);
}

/* Where a write at the file position goes: the position, or the end of the
 * file for O_APPEND. */
static off_t position_of(int fd, const struct fd_info *fi)
{
    if (fi->append) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : 0;
    }
    return real_lseek(fd, 0, SEEK_CUR);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    const struct fd_info *fi;
    ssize_t n;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_writev(fd, iov, iovcnt);
    pthread_mutex_lock(&lock);
    off_t off = position_of(fd, fi);
    n = real_writev(fd, iov, iovcnt);
    record_write(fi, off, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    return n;
}

ssize_t write(int fd, const void *buf, size_t len)
{
    struct iovec iov = {(void *)buf, len};
    const struct fd_info *fi;
    ssize_t n;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_write(fd, buf, len);
    pthread_mutex_lock(&lock);
    off_t off = position_of(fd, fi);
    n = real_write(fd, buf, len);
    record_write(fi, off, &iov, 1, n);
    pthread_mutex_unlock(&lock);
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    const struct fd_info *fi;
    ssize_t n;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_pwritev(fd, iov, iovcnt, off);
    pthread_mutex_lock(&lock);
    n = real_pwritev(fd, iov, iovcnt, off);
    record_write(fi, off, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    return pwritev(fd, iov, iovcnt, off);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    struct iovec iov = {(void *)buf, len};
    const struct fd_info *fi;
    ssize_t n;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_pwrite(fd, buf, len, off);
    pthread_mutex_lock(&lock);
    n = real_pwrite(fd, buf, len, off);
    record_write(fi, off, &iov, 1, n);
    pthread_mutex_unlock(&lock);
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
    return pwrite(fd, buf, len, off);
}

static int sync_common(int fd, int data_only)
{
    const struct fd_info *fi;
    int rc;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return data_only ? real_fdatasync(fd) : real_fsync(fd);
    pthread_mutex_lock(&lock);
    rc = data_only ? real_fdatasync(fd) : real_fsync(fd);
    if (rc == 0)
        record_simple('S', fi->path, 0, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

int fsync(int fd)
{
    return sync_common(fd, 0);
}

int fdatasync(int fd)
{
    return sync_common(fd, 1);
}

int ftruncate(int fd, off_t len)
{
    const struct fd_info *fi;
    int rc;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_ftruncate(fd, len);
    pthread_mutex_lock(&lock);
    rc = real_ftruncate(fd, len);
    if (rc == 0)
        record_simple('T', fi->path, (uint64_t)len, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

int ftruncate64(int fd, off_t len)
{
    return ftruncate(fd, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    const struct fd_info *fi;
    int rc;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_fallocate(fd, mode, off, len);
    pthread_mutex_lock(&lock);
    rc = real_fallocate(fd, mode, off, len);
    if (rc == 0) {
        if (mode & 0x02 /* FALLOC_FL_PUNCH_HOLE */)
            record_simple('P', fi->path, (uint64_t)off, (uint64_t)len);
        else if (!(mode & 0x01 /* FALLOC_FL_KEEP_SIZE */))
            record_simple('A', fi->path, (uint64_t)off, (uint64_t)len);
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
    return fallocate(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len)
{
    const struct fd_info *fi;
    int rc;

    ENSURE_INIT();
    if (!(fi = tracked(fd)))
        return real_posix_fallocate(fd, off, len);
    pthread_mutex_lock(&lock);
    rc = real_posix_fallocate(fd, off, len);
    if (rc == 0)
        record_simple('A', fi->path, (uint64_t)off, (uint64_t)len);
    pthread_mutex_unlock(&lock);
    return rc;
}

int posix_fallocate64(int fd, off_t off, off_t len)
{
    return posix_fallocate(fd, off, len);
}

int rename(const char *from, const char *to)
{
    char a[PATH_MAX], b[PATH_MAX];
    int rc, wa, wb;

    ENSURE_INIT();
    wa = watched(AT_FDCWD, from, a);
    wb = watched(AT_FDCWD, to, b);
    if (!wa && !wb)
        return real_rename(from, to);
    if (wa != wb) {
        /* Into or out of the watched directory: not something the
         * simulator models. */
        fprintf(stderr, "crashsim shim: rename across the watched directory: %s -> %s\n", from,
                to);
        abort();
    }
    pthread_mutex_lock(&lock);
    rc = real_rename(from, to);
    if (rc == 0) {
        struct iovec iov = {b, strlen(b)};
        record('R', a, 0, 0, &iov, 1, iov.iov_len);
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int unlink(const char *path)
{
    char abs[PATH_MAX];
    int rc;

    ENSURE_INIT();
    if (!watched(AT_FDCWD, path, abs))
        return real_unlink(path);
    pthread_mutex_lock(&lock);
    rc = real_unlink(path);
    if (rc == 0)
        record_simple('U', abs, 0, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

int mkdir(const char *path, mode_t mode)
{
    char abs[PATH_MAX];
    int rc;

    ENSURE_INIT();
    if (!watched(AT_FDCWD, path, abs))
        return real_mkdir(path, mode);
    pthread_mutex_lock(&lock);
    rc = real_mkdir(path, mode);
    if (rc == 0)
        record_simple('K', abs, 0, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

static void fake_free(struct statvfs *st)
{
    if (free_bytes >= 0 && st->f_frsize) {
        st->f_bavail = (fsblkcnt_t)(free_bytes / (long long)st->f_frsize);
        st->f_bfree = st->f_bavail;
    }
}

int statvfs(const char *path, struct statvfs *st)
{
    ENSURE_INIT();
    int rc = real_statvfs(path, st);
    if (rc == 0)
        fake_free(st);
    return rc;
}

int statvfs64(const char *path, struct statvfs64 *st)
{
    return statvfs(path, (struct statvfs *)st); /* the same layout on 64-bit */
}

int fstatvfs(int fd, struct statvfs *st)
{
    ENSURE_INIT();
    int rc = real_fstatvfs(fd, st);
    if (rc == 0)
        fake_free(st);
    return rc;
}

int fstatvfs64(int fd, struct statvfs64 *st)
{
    return fstatvfs(fd, (struct statvfs *)st);
}

/* Called by the workload (found with dlsym) to put its acknowledgements in
 * the trace, in order with the I/O. */
void crashsim_mark(const char *text)
{
    struct iovec iov = {(void *)text, strlen(text)};

    ENSURE_INIT();
    if (trace_fd < 0)
        return;
    pthread_mutex_lock(&lock);
    record('M', watch, 0, 0, &iov, 1, iov.iov_len);
    pthread_mutex_unlock(&lock);
}
