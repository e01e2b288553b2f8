/* durable.c -- fsync of directories (see durable.h). */
#include "durable.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int durable_sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;

    if (fd < 0)
        return -errno;
    if (fsync(fd) != 0)
        rc = -errno;
    close(fd);
    return rc;
}

int durable_sync_parent(const char *path)
{
    char dir[PATH_MAX];
    size_t n = strlen(path);

    while (n > 1 && path[n - 1] == '/')
        n--;
    while (n > 0 && path[n - 1] != '/')
        n--;
    while (n > 1 && path[n - 1] == '/')
        n--;
    if (n == 0)
        return durable_sync_dir(".");
    if (n >= sizeof(dir))
        return -ENAMETOOLONG;
    memcpy(dir, path, n);
    dir[n] = 0;
    return durable_sync_dir(dir);
}

/* Remove the files of directory dir, then dir. 0 or -errno. */
static int dir_remove(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int rc = 0;

    if (!d)
        return errno == ENOENT ? 0 : -errno;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (unlinkat(dirfd(d), e->d_name, 0) != 0 && errno != ENOENT)
            rc = -errno;
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0 && errno != ENOENT)
        rc = -errno;
    return rc;
}

int durable_remove_dir(const char *dir, const char *gone)
{
    int rc = dir_remove(gone); /* a leftover of an earlier removal */

    if (rc == 0 && rename(dir, gone) != 0)
        return errno == ENOENT ? 0 : -errno;
    if (rc == 0)
        rc = durable_sync_parent(dir);
    if (rc == 0)
        rc = dir_remove(gone);
    return rc;
}

int durable_replace_file(const char *path, const void *data, size_t len)
{
    char tmp[PATH_MAX + 8];
    int fd, rc = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    errno = 0;
    if (write(fd, data, len) != (ssize_t)len || fsync(fd) != 0)
        rc = errno ? -errno : -EIO;
    close(fd);
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    return rc ? rc : durable_sync_parent(path); /* the new name, not only the bytes */
}
