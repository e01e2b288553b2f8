/* test_errno.c -- the errno mapping of the layers.
 *
 * Covers:
 *  - shard_lmdb_errno(): every LMDB return code the shards can see, and
 *    system errors passed through as positive errno values, mapped to the
 *    negative errno of shard.h;
 *  - the namespace's POSIX errors end to end, on a real 4-shard store in a
 *    fresh temporary directory: -EEXIST, -ENAMETOOLONG (255 bytes is fine),
 *    -EINVAL for ".", ".." and "/" names, -ENOENT, -ENOTDIR, -ENOTEMPTY,
 *    -EISDIR, rename's -EINVAL/-EISDIR/-ENOTDIR/-EEXIST/-ENOENT, the xattr
 *    errors (-ENODATA, -EEXIST, -EOPNOTSUPP, -ERANGE), link's -EPERM and
 *    write's -EISDIR; after every failed call the tree is unchanged;
 *  - cross-shard rename, rename-over and exchange of two 255-byte names;
 *  - a create whose reply was lost (applied, then -EIO) succeeds, and one
 *    whose request was lost fails with -EIO and leaves nothing.
 * Exits non-zero on any failed check.
 */
#include <dirent.h>
#include <errno.h>
#include <lmdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "config.h"
#include "namespace.h"
#include "shard_lmdb.h"
#include "check.h"
#include "test_util.h"

/* ---- shard_lmdb_errno ---- */

static void test_lmdb_errno(void)
{
    static const struct {
        const char *what;
        int mdb_rc, want;
    } cases[] = {
        {"MDB_SUCCESS", MDB_SUCCESS, 0},
        {"MDB_NOTFOUND", MDB_NOTFOUND, -ENOENT},
        {"MDB_KEYEXIST", MDB_KEYEXIST, -EEXIST},
        {"MDB_MAP_FULL", MDB_MAP_FULL, -ENOSPC},
        {"MDB_TXN_FULL", MDB_TXN_FULL, -ENOSPC},
        {"MDB_BAD_VALSIZE", MDB_BAD_VALSIZE, -EINVAL},
        {"MDB_CORRUPTED", MDB_CORRUPTED, -EIO},
        {"MDB_PAGE_NOTFOUND", MDB_PAGE_NOTFOUND, -EIO},
        {"MDB_INVALID", MDB_INVALID, -EIO},
        {"MDB_PANIC", MDB_PANIC, -EIO},
        {"MDB_VERSION_MISMATCH", MDB_VERSION_MISMATCH, -EIO},
        {"MDB_BAD_TXN", MDB_BAD_TXN, -EIO},
        {"MDB_BAD_RSLOT", MDB_BAD_RSLOT, -EIO},
        {"MDB_INCOMPATIBLE", MDB_INCOMPATIBLE, -EIO},
        {"MDB_PAGE_FULL", MDB_PAGE_FULL, -EIO},
        {"MDB_CURSOR_FULL", MDB_CURSOR_FULL, -EIO},
        {"MDB_DBS_FULL", MDB_DBS_FULL, -EIO},
        {"MDB_TLS_FULL", MDB_TLS_FULL, -EIO},
        {"MDB_BAD_DBI", MDB_BAD_DBI, -EIO},
        {"MDB_READERS_FULL", MDB_READERS_FULL, -EAGAIN},
        {"MDB_MAP_RESIZED", MDB_MAP_RESIZED, -EAGAIN},
        /* LMDB passes system errors through as positive errno values. */
        {"ENOSPC", ENOSPC, -ENOSPC},
        {"EIO", EIO, -EIO},
        {"ENOMEM", ENOMEM, -ENOMEM},
        {"EACCES", EACCES, -EACCES},
        {"EROFS", EROFS, -EROFS},
        {"EDQUOT", EDQUOT, -EDQUOT},
        {"EINVAL", EINVAL, -EINVAL},
        {"ENOENT", ENOENT, -ENOENT},
        /* Anything else is an unexplained store error. */
        {"-1", -1, -EIO},
        {"-30800", -30800, -EIO},
        {"MDB_LAST_ERRCODE + 1", MDB_LAST_ERRCODE + 1, -EIO},
        {"4096", 4096, -EIO},
        {"INT_MIN", -2147483647 - 1, -EIO},
        {"INT_MAX", 2147483647, -EIO},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int got = shard_lmdb_errno(cases[i].mdb_rc);
        CHECKF(got == cases[i].want, "%s (%d): got %d, want %d", cases[i].what, cases[i].mdb_rc,
               got, cases[i].want);
    }
    /* Every positive errno passes through, never as a success or positive. */
    for (int e = 1; e < 134; e++)
        CHECKF(shard_lmdb_errno(e) == -e, "errno %d", e);
    /* Every LMDB error maps to a negative errno. */
    for (int rc = MDB_KEYEXIST; rc <= MDB_LAST_ERRCODE; rc++)
        CHECKF(shard_lmdb_errno(rc) < 0, "LMDB code %d", rc);
}

/* ---- the namespace ---- */

static char tmpdir[] = "/tmp/shardfs-test-errno-XXXXXX";
static struct config cfg; /* large: static */

static void cleanup(void)
{
    rm_rf(tmpdir);
}

static struct ns *open_store(void)
{
    char path[PATH_MAX], err[1024] = "";
    struct ns *ns = NULL;
    FILE *f;

    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        exit(2);
    }
    snprintf(path, sizeof(path), "%s/shards.conf", tmpdir);
    f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs("[cluster]\nshards = 4\n[node local]\ndata_dir = ./data\nshards = all\n", f);
    fclose(f);
    if (config_load(path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "config_load: %s\n", err);
        cleanup();
        exit(2);
    }
    int rc = ns_open(&cfg, 0, 0, NULL, &ns, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "ns_open: %d: %s\n", rc, err);
        cleanup();
        exit(2);
    }
    return ns;
}

static const struct ino_id *root = &record_root_id;

static int mk(struct ns *ns, const struct ino_id *dir, const char *name, uint32_t mode,
              struct inode *out)
{
    struct inode tmp;
    return ns_mknode(ns, dir, name, strlen(name), mode, 0, 0, 0, NULL, out ? out : &tmp);
}

static int lookup(struct ns *ns, const struct ino_id *dir, const char *name, struct inode *out)
{
    struct inode tmp;
    return ns_lookup(ns, dir, name, strlen(name), out ? out : &tmp);
}

static int ren(struct ns *ns, const struct ino_id *od, const char *on, const struct ino_id *nd,
               const char *nn, unsigned flags)
{
    return ns_rename(ns, od, on, strlen(on), nd, nn, strlen(nn), flags, NULL, NULL);
}

static int count_entry(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                       uint8_t dtype)
{
    (void)nlen, (void)id, (void)dtype;
    if (!name) /* the listing starts again */
        *(int *)ctx = 0;
    else
        (*(int *)ctx)++;
    return 0;
}

static int entries(struct ns *ns, const struct ino_id *dir)
{
    int n = 0, rc = ns_readdir(ns, dir, count_entry, &n);
    return rc < 0 ? rc : n;
}

/* A name in dir on another shard than (odir, oname): name's last byte is
 * varied until the two entries are apart. */
static void name_apart(struct ns *ns, const struct ino_id *odir, const char *oname,
                       const struct ino_id *dir, char *name, size_t nlen)
{
    static const char set[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

    for (size_t i = 0; i < sizeof(set) - 1; i++) {
        name[nlen - 1] = set[i];
        if (ns_entry_shard(ns, odir, oname, strlen(oname)) != ns_entry_shard(ns, dir, name, nlen))
            return;
    }
    CHECK(!"no name on another shard");
}

/* Cross-shard renames and exchanges of two RECORD_NAME_MAX-byte names: the
 * intent record holds both names at their longest (RECORD_INTENT_MAX; it
 * overflowed a 512-byte buffer once). */
static void test_long_names_across_shards(struct ns *ns)
{
    char a[RECORD_NAME_MAX + 1], b[RECORD_NAME_MAX + 1], far[RECORD_NAME_MAX + 2];
    struct inode d1, d2, fa, fb, tmp;

    CHECK_RC(mk(ns, root, "long1", S_IFDIR | 0755, &d1), 0);
    CHECK_RC(mk(ns, root, "long2", S_IFDIR | 0755, &d2), 0);
    memset(a, 'a', RECORD_NAME_MAX);
    a[RECORD_NAME_MAX] = 0;
    memset(b, 'b', RECORD_NAME_MAX);
    b[RECORD_NAME_MAX] = 0;
    name_apart(ns, &d1.id, a, &d2.id, b, RECORD_NAME_MAX);

    /* rename to a new name */
    CHECK_RC(mk(ns, &d1.id, a, S_IFREG | 0644, &fa), 0);
    CHECK_RC(ns_write(ns, &fa.id, 0, "A", 1, 0, 0, NULL), 1);
    CHECK_RC(ren(ns, &d1.id, a, &d2.id, b, 0), 0);
    CHECK_RC(lookup(ns, &d1.id, a, NULL), -ENOENT);
    CHECK_RC(lookup(ns, &d2.id, b, &tmp), 0);
    CHECK(memcmp(&tmp.id, &fa.id, sizeof(fa.id)) == 0);
    /* over an existing long name */
    CHECK_RC(mk(ns, &d1.id, a, S_IFREG | 0644, &fb), 0);
    CHECK_RC(ren(ns, &d1.id, a, &d2.id, b, 0), 0);
    CHECK_RC(lookup(ns, &d2.id, b, &tmp), 0);
    CHECK(memcmp(&tmp.id, &fb.id, sizeof(fb.id)) == 0);
    CHECK_RC(ns_getattr(ns, &fa.id, &tmp), -ENOENT); /* the replaced file is gone */
    /* exchange, both ways */
    CHECK_RC(mk(ns, &d1.id, a, S_IFDIR | 0755, &fa), 0);
    CHECK_RC(ren(ns, &d1.id, a, &d2.id, b, NS_RENAME_EXCHANGE), 0);
    CHECK_RC(lookup(ns, &d1.id, a, &tmp), 0);
    CHECK(memcmp(&tmp.id, &fb.id, sizeof(fb.id)) == 0);
    CHECK_RC(lookup(ns, &d2.id, b, &tmp), 0);
    CHECK(memcmp(&tmp.id, &fa.id, sizeof(fa.id)) == 0);
    CHECK_RC(ns_getattr(ns, &fa.id, &tmp), 0);
    CHECK(memcmp(&tmp.parent, &d2.id, sizeof(d2.id)) == 0); /* the moved dir's ".." */
    /* one byte more is refused, and changes nothing */
    memset(far, 'c', sizeof(far) - 1);
    far[sizeof(far) - 1] = 0;
    CHECK_RC(ren(ns, &d1.id, a, &d2.id, far, 0), -ENAMETOOLONG);
    CHECK_RC(ren(ns, &d1.id, far, &d2.id, b, 0), -ENAMETOOLONG);
    CHECK_RC(lookup(ns, &d1.id, a, &tmp), 0);
    CHECK(memcmp(&tmp.id, &fb.id, sizeof(fb.id)) == 0);
    CHECK_RC(ns_recover(ns, 1, NULL, NULL), 0); /* no intent left behind */
    CHECK_RC(ns_unlink(ns, &d1.id, a, RECORD_NAME_MAX, NULL, NULL), 0);
    CHECK_RC(ns_rmdir(ns, &d2.id, b, RECORD_NAME_MAX, NULL, NULL), 0);
    CHECK_RC(entries(ns, &d1.id), 0);
    CHECK_RC(entries(ns, &d2.id), 0);
}

static void test_namespace(void)
{
    struct ns *ns = open_store();
    struct inode d, sub, f, g, e, tmp;
    char name[300];

    CHECK(ns_shard_count(ns) == 4);

    /* Set up: /d (dir), /d/sub (dir), /d/sub/deep (dir), /f, /g (files),
     * /e (empty dir), /d/inner (file). */
    CHECK_RC(mk(ns, root, "d", S_IFDIR | 0755, &d), 0);
    CHECK_RC(mk(ns, &d.id, "sub", S_IFDIR | 0755, &sub), 0);
    CHECK_RC(mk(ns, &sub.id, "deep", S_IFDIR | 0755, NULL), 0);
    CHECK_RC(mk(ns, &d.id, "inner", S_IFREG | 0644, NULL), 0);
    CHECK_RC(mk(ns, root, "f", S_IFREG | 0644, &f), 0);
    CHECK_RC(mk(ns, root, "g", S_IFREG | 0644, &g), 0);
    CHECK_RC(mk(ns, root, "e", S_IFDIR | 0755, &e), 0);
    CHECK_RC(ns_write(ns, &f.id, 0, "hello", 5, 0, 0, NULL), 5);
    CHECK_RC(entries(ns, root), 4);

    /* create */
    CHECK_RC(mk(ns, root, "f", S_IFREG | 0644, NULL), -EEXIST);
    CHECK_RC(mk(ns, root, "d", S_IFREG | 0644, NULL), -EEXIST);
    CHECK_RC(mk(ns, root, "f", S_IFDIR | 0755, NULL), -EEXIST);
    CHECK_RC(ns_mknode(ns, root, "ln", 2, S_IFLNK | 0777, 0, 0, 0, "f", &tmp), 0);
    CHECK_RC(ns_mknode(ns, root, "ln", 2, S_IFLNK | 0777, 0, 0, 0, "g", &tmp), -EEXIST);
    memset(name, 'n', sizeof(name));
    CHECK_RC(ns_mknode(ns, root, name, 256, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -ENAMETOOLONG);
    CHECK_RC(ns_mknode(ns, root, name, 300, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -ENAMETOOLONG);
    CHECK_RC(ns_lookup(ns, root, name, 256, &tmp), -ENAMETOOLONG);
    CHECK_RC(ns_mknode(ns, root, name, 255, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), 0);
    CHECK_RC(ns_lookup(ns, root, name, 255, &tmp), 0);
    CHECK_RC(ns_unlink(ns, root, name, 255, NULL, NULL), 0);
    CHECK_RC(ns_mknode(ns, root, ".", 1, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -EINVAL);
    CHECK_RC(ns_mknode(ns, root, "..", 2, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -EINVAL);
    CHECK_RC(ns_mknode(ns, root, "a/b", 3, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -EINVAL);
    CHECK_RC(ns_mknode(ns, root, "", 0, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -EINVAL);
    CHECK_RC(ns_mknode(ns, root, "a\0b", 3, S_IFREG | 0644, 0, 0, 0, NULL, &tmp), -EINVAL);
    /* A file is no directory. */
    CHECK_RC(mk(ns, &f.id, "x", S_IFREG | 0644, NULL), -ENOTDIR);

    /* lookup */
    CHECK_RC(lookup(ns, root, "missing", NULL), -ENOENT);
    CHECK_RC(lookup(ns, &d.id, "f", NULL), -ENOENT);
    CHECK_RC(lookup(ns, root, "f", NULL), 0);
    CHECK_RC(lookup(ns, root, "d", NULL), 0);

    /* rmdir / unlink */
    CHECK_RC(ns_rmdir(ns, root, "d", 1, NULL, NULL), -ENOTEMPTY);
    CHECK_RC(lookup(ns, root, "d", NULL), 0);
    CHECK_RC(mk(ns, &d.id, "after-failed-rmdir", S_IFREG | 0644, NULL), 0); /* not left dying */
    CHECK_RC(ns_unlink(ns, &d.id, "after-failed-rmdir", 18, NULL, NULL), 0);
    CHECK_RC(ns_unlink(ns, root, "d", 1, NULL, NULL), -EISDIR);
    CHECK_RC(ns_unlink(ns, root, "e", 1, NULL, NULL), -EISDIR);
    CHECK_RC(lookup(ns, root, "e", NULL), 0);
    CHECK_RC(ns_rmdir(ns, root, "f", 1, NULL, NULL), -ENOTDIR);
    CHECK_RC(lookup(ns, root, "f", NULL), 0);
    CHECK_RC(ns_rmdir(ns, root, "missing", 7, NULL, NULL), -ENOENT);
    CHECK_RC(ns_unlink(ns, root, "missing", 7, NULL, NULL), -ENOENT);

    /* rename */
    CHECK_RC(ren(ns, root, "d", &sub.id, "d", 0), -EINVAL); /* into its own subdir */
    CHECK_RC(ren(ns, root, "d", &d.id, "d2", 0), -EINVAL);  /* into itself */
    CHECK_RC(ren(ns, &d.id, "sub", &sub.id, "x", 0), -EINVAL);
    CHECK_RC(lookup(ns, root, "d", NULL), 0);
    CHECK_RC(lookup(ns, &d.id, "sub", NULL), 0);
    CHECK_RC(ren(ns, root, "f", root, "e", 0), -EISDIR);  /* file over dir */
    CHECK_RC(ren(ns, root, "e", root, "f", 0), -ENOTDIR); /* dir over file */
    CHECK_RC(ren(ns, root, "d", root, "e", 0), 0);        /* dir over an empty dir: fine */
    CHECK_RC(lookup(ns, root, "e", &tmp), 0);
    CHECK(memcmp(&tmp.id, &d.id, sizeof(d.id)) == 0);
    CHECK_RC(lookup(ns, root, "d", NULL), -ENOENT);
    CHECK_RC(ren(ns, root, "e", root, "d", 0), 0); /* and back */
    CHECK_RC(mk(ns, root, "e", S_IFDIR | 0755, &e), 0);
    CHECK_RC(mk(ns, &e.id, "x", S_IFREG | 0644, NULL), 0);
    CHECK_RC(ren(ns, root, "d", root, "e", 0), -ENOTEMPTY); /* over a non-empty dir */
    CHECK_RC(lookup(ns, &e.id, "x", NULL), 0);
    CHECK_RC(mk(ns, &e.id, "y", S_IFREG | 0644, NULL), 0); /* e not left dying */
    CHECK_RC(ren(ns, root, "f", root, "g", NS_RENAME_NOREPLACE), -EEXIST);
    CHECK_RC(ren(ns, root, "f", root, "d", NS_RENAME_NOREPLACE), -EEXIST);
    CHECK_RC(ren(ns, root, "f", root, "nowhere", NS_RENAME_EXCHANGE), -ENOENT);
    CHECK_RC(ren(ns, root, "missing", root, "g", NS_RENAME_EXCHANGE), -ENOENT);
    CHECK_RC(ren(ns, root, "missing", root, "nowhere", 0), -ENOENT);
    CHECK_RC(ren(ns, root, "f", root, "g", NS_RENAME_EXCHANGE | NS_RENAME_NOREPLACE), -EINVAL);
    CHECK_RC(ren(ns, root, "f", &f.id, "x", 0), -ENOTDIR); /* target dir is a file */
    CHECK_RC(ren(ns, root, "f", root, ".", 0), -EINVAL);
    CHECK_RC(ns_rename(ns, root, "f", 1, root, name, 256, 0, NULL, NULL), -ENAMETOOLONG);
    CHECK_RC(lookup(ns, root, "f", &tmp), 0);
    CHECK(memcmp(&tmp.id, &f.id, sizeof(f.id)) == 0);
    CHECK_RC(lookup(ns, root, "g", &tmp), 0);
    CHECK(memcmp(&tmp.id, &g.id, sizeof(g.id)) == 0);
    CHECK_RC(ren(ns, root, "f", root, "g", NS_RENAME_EXCHANGE), 0);
    CHECK_RC(lookup(ns, root, "g", &tmp), 0);
    CHECK(memcmp(&tmp.id, &f.id, sizeof(f.id)) == 0);
    CHECK_RC(ren(ns, root, "f", root, "g", NS_RENAME_EXCHANGE), 0);

    /* xattrs */
    char buf[64];
    CHECK_RC(ns_getxattr(ns, &f.id, "user.missing", buf, sizeof(buf)), -ENODATA);
    CHECK_RC(ns_getxattr(ns, &f.id, "user.missing", NULL, 0), -ENODATA);
    CHECK_RC(ns_removexattr(ns, &f.id, "user.missing"), -ENODATA);
    CHECK_RC(ns_setxattr(ns, &f.id, "user.a", "value", 5, 0), 0);
    CHECK_RC(ns_setxattr(ns, &f.id, "user.a", "other", 5, XATTR_CREATE), -EEXIST);
    CHECK_RC(ns_setxattr(ns, &f.id, "user.b", "value", 5, XATTR_REPLACE), -ENODATA);
    CHECK_RC(ns_getxattr(ns, &f.id, "user.b", buf, sizeof(buf)), -ENODATA);
    CHECK_RC(ns_setxattr(ns, &f.id, "user.a", "value2", 6, XATTR_REPLACE), 0);
    CHECK_RC(ns_setxattr(ns, &f.id, "user.c", "v", 1, XATTR_CREATE), 0);
    CHECK_RC(ns_setxattr(ns, &f.id, "security.x", "v", 1, 0), -EOPNOTSUPP);
    CHECK_RC(ns_setxattr(ns, &f.id, "system.posix_acl_access", "v", 1, 0), -EOPNOTSUPP);
    CHECK_RC(ns_setxattr(ns, &f.id, "nonamespace", "v", 1, 0), -EOPNOTSUPP);
    CHECK_RC(ns_setxattr(ns, &f.id, "", "v", 1, 0), -EINVAL);
    /* unsupported namespaces say so (ls then stops asking for every file) */
    CHECK_RC(ns_getxattr(ns, &f.id, "security.x", buf, sizeof(buf)), -EOPNOTSUPP);
    CHECK_RC(ns_getxattr(ns, &f.id, "system.posix_acl_access", buf, sizeof(buf)), -EOPNOTSUPP);
    CHECK_RC(ns_getxattr(ns, &f.id, "user.a", NULL, 0), 6); /* size query */
    CHECK_RC(ns_getxattr(ns, &f.id, "user.a", buf, 5), -ERANGE);
    CHECK_RC(ns_getxattr(ns, &f.id, "user.a", buf, 1), -ERANGE);
    memset(buf, 0, sizeof(buf));
    CHECK_RC(ns_getxattr(ns, &f.id, "user.a", buf, 6), 6);
    CHECK(memcmp(buf, "value2", 6) == 0);
    CHECK_RC(ns_listxattr(ns, &f.id, NULL, 0), (long)(sizeof("user.a") + sizeof("user.c")));
    CHECK_RC(ns_listxattr(ns, &f.id, buf, 3), -ERANGE);
    {
        char longx[300] = "user.";
        memset(longx + 5, 'x', 260);
        longx[265] = 0;
        CHECK_RC(ns_setxattr(ns, &f.id, longx, "v", 1, 0), -ERANGE);
    }
    CHECK_RC(ns_removexattr(ns, &f.id, "user.c"), 0);
    CHECK_RC(ns_getxattr(ns, &f.id, "user.c", buf, sizeof(buf)), -ENODATA);

    /* link */
    CHECK_RC(ns_link(ns, &d.id, root, "dlink", 5, &tmp), -EPERM);
    CHECK_RC(lookup(ns, root, "dlink", NULL), -ENOENT);
    CHECK_RC(ns_link(ns, &f.id, root, "g", 1, &tmp), -EEXIST);
    CHECK_RC(ns_link(ns, &f.id, &f.id, "x", 1, &tmp), -ENOTDIR);
    CHECK_RC(ns_getattr(ns, &f.id, &tmp), 0);
    CHECK(tmp.nlink == 1); /* failed links leave the count alone */
    CHECK_RC(ns_link(ns, &f.id, &d.id, "flink", 5, &tmp), 0);
    CHECK(tmp.nlink == 2);

    /* data */
    CHECK_RC(ns_write(ns, &d.id, 0, "x", 1, 0, 0, NULL), -EISDIR);
    CHECK_RC(ns_write(ns, &d.id, 0, "x", 1, 1, 0, NULL), -EISDIR);
    CHECK_RC(ns_read(ns, &d.id, 0, sizeof(buf), buf), -EISDIR);
    memset(buf, 0, sizeof(buf));
    CHECK_RC(ns_read(ns, &f.id, 0, sizeof(buf), buf), 5);
    CHECK(memcmp(buf, "hello", 5) == 0);

    /* Operations on an inode that does not exist. */
    struct ino_id ghost;
    record_id_make(&ghost, 0x1234, 0x5678);
    CHECK_RC(ns_getattr(ns, &ghost, &tmp), -ENOENT);
    CHECK_RC(mk(ns, &ghost, "x", S_IFREG | 0644, NULL), -ENOENT);
    CHECK_RC(ns_setxattr(ns, &ghost, "user.a", "v", 1, 0), -ENOENT);
    CHECK_RC(ns_getxattr(ns, &ghost, "user.a", buf, sizeof(buf)), -ENOENT);
    CHECK_RC(ns_write(ns, &ghost, 0, "x", 1, 0, 0, NULL), -ENOENT);

    /* Nothing above changed the tree behind our back. */
    CHECK_RC(entries(ns, root), 5);  /* d e f g ln */
    CHECK_RC(entries(ns, &d.id), 3); /* sub inner flink */
    CHECK_RC(entries(ns, &e.id), 2); /* x y */

    test_long_names_across_shards(ns);
    ns_close(ns);
}

/* ---- a create whose reply was lost ----
 * A shard wrapper whose next apply is lost: LOST_REPLY applies the batch and
 * answers -EIO (the primary died after a replica took it); LOST_REQUEST
 * answers -EIO and applies nothing. Everything else passes through. */
enum { PASS, LOST_REPLY, LOST_REQUEST };

struct lossy {
    struct shard base;
    struct shard *inner;
    int mode;
    int refuse; /* every op: -EBADSLT (the node has another layout) */
};

static struct shard *inner_of(struct shard *s)
{
    return ((struct lossy *)s)->inner;
}

static int lossy_get(struct shard *s, const void *k, size_t kl, size_t off, void *buf, size_t bl,
                     size_t *vl)
{
    if (((struct lossy *)s)->refuse)
        return -EBADSLT;
    return shard_get(inner_of(s), k, kl, off, buf, bl, vl);
}

static int lossy_scan(struct shard *s, const void *a, size_t al, const void *b, size_t bl,
                      shard_scan_fn fn, void *ctx)
{
    if (((struct lossy *)s)->refuse)
        return -EBADSLT;
    return shard_scan(inner_of(s), a, al, b, bl, fn, ctx);
}

static int lossy_apply(struct shard *s, const struct batch *b)
{
    struct lossy *l = (struct lossy *)s;
    int mode = l->mode, rc = 0;

    if (l->refuse)
        return -EBADSLT;
    l->mode = PASS;
    if (mode != LOST_REQUEST)
        rc = shard_apply(l->inner, b);
    return mode == PASS ? rc : -EIO;
}

static int lossy_sync(struct shard *s)
{
    return shard_sync(inner_of(s));
}

static void lossy_close(struct shard *s)
{
    (void)s;
}

static const struct shard_ops lossy_ops = {
    .get = lossy_get, .scan = lossy_scan, .apply = lossy_apply, .sync = lossy_sync,
    .close = lossy_close};

/* mkstemp during a failover: the create's batch applied, its reply lost.
 * The caller must be told it worked (the file is there, under the id it
 * got), and a lost request must leave nothing. */
static void test_create_lost_reply(void)
{
    struct lossy l = {.base = {.ops = &lossy_ops}};
    const char *names[] = {"made-reply-lost", "made-request-lost"};
    struct inode f, got;
    struct ns *ns;

    cleanup(); /* test_namespace's store; a fresh one */
    memcpy(tmpdir + sizeof(tmpdir) - 7, "XXXXXX", 6);
    ns = open_store();
    for (int k = 0; k < 2; k++) {
        unsigned sh = ns_entry_shard(ns, root, names[k], strlen(names[k]));
        int rc;

        l.inner = ns_shard(ns, sh);
        l.base.index = sh;
        l.mode = k == 0 ? LOST_REPLY : LOST_REQUEST;
        CHECK(ns_shard_swap(ns, sh, &l.base) == l.inner);
        rc = ns_create_open(ns, root, names[k], strlen(names[k]), S_IFREG | 0644, 0, 0, &f);
        ns_shard_swap(ns, sh, l.inner);
        if (k == 0) {
            CHECK_RC(rc, 0);
            CHECK_RC(lookup(ns, root, names[k], &got), 0);
            CHECK(!memcmp(&got.id, &f.id, sizeof(f.id)));
        } else {
            CHECK_RC(rc, -EIO);
            CHECK_RC(lookup(ns, root, names[k], NULL), -ENOENT);
        }
    }
    ns_close(ns);
}

/* ---- a shard that refuses for another layout (wire.h, "Layouts") ---- */

static unsigned relayouts;

/* "Learn the layout": the shard stops refusing; -ENOENT when there was
 * nothing new to learn. */
static int relayout_fix(void *ctx)
{
    struct lossy *l = ctx;

    relayouts++;
    if (!l->refuse)
        return -ENOENT;
    l->refuse = 0;
    return 0;
}

static int relayout_none(void *ctx)
{
    (void)ctx;
    relayouts++;
    return -ENOENT;
}

/* An op refused with -EBADSLT runs again once the layout was learnt; the
 * caller never sees -EBADSLT, and a refusal nobody can resolve is -EIO with
 * nothing made. */
static void test_layout_refused(void)
{
    struct lossy l = {.base = {.ops = &lossy_ops}};
    const char *name = "made-after-relayout";
    unsigned sh;
    struct inode f, got;
    struct ns *ns;

    cleanup();
    memcpy(tmpdir + sizeof(tmpdir) - 7, "XXXXXX", 6);
    ns = open_store();
    sh = ns_entry_shard(ns, root, name, strlen(name));
    l.inner = ns_shard(ns, sh);
    l.base.index = sh;
    CHECK(ns_shard_swap(ns, sh, &l.base) == l.inner);
    /* nobody to learn it from */
    l.refuse = 1;
    CHECK_RC(ns_create_open(ns, root, name, strlen(name), S_IFREG | 0644, 0, 0, &f), -EIO);
    CHECK_RC(lookup(ns, root, name, NULL), -EIO);
    ns_set_relayout(ns, relayout_none, NULL);
    relayouts = 0;
    CHECK_RC(lookup(ns, root, name, NULL), -EIO);
    CHECKF(relayouts == 4, "%u relayouts", relayouts); /* tried again, then EIO */
    /* learnt: the op runs again and works */
    ns_set_relayout(ns, relayout_fix, &l);
    relayouts = 0;
    CHECK_RC(ns_create_open(ns, root, name, strlen(name), S_IFREG | 0644, 0, 0, &f), 0);
    CHECKF(relayouts == 1, "%u relayouts", relayouts);
    l.refuse = 1;
    CHECK_RC(lookup(ns, root, name, &got), 0);
    CHECK(!memcmp(&got.id, &f.id, sizeof(f.id)));
    CHECK_RC(entries(ns, root), 1); /* the failed create left nothing */
    l.refuse = 1;
    relayouts = 0;
    CHECK_RC(entries(ns, root), 1); /* a listing runs again too */
    CHECK(relayouts == 1);
    ns_shard_swap(ns, sh, l.inner);
    ns_close(ns);
}

int main(void)
{
    test_lmdb_errno();
    test_namespace();
    test_create_lost_reply();
    test_layout_refused();
    cleanup();
    return check_summary("errno");
}
