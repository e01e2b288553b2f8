/* test_fsck.c -- fsck_run() against damage injected with raw shard batches.
 *
 * Each scenario builds on the tree made at the start, damages the store
 * directly, and then checks the cycle: fsck_run(ns, 0) finds the expected
 * problems twice without changing a byte, fsck_run(ns, 1) fixes as many, and a
 * last fsck_run(ns, 0) is clean. Then it looks at what the repair left.
 */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "batch.h"
#include "config.h"
#include "fsck.h"
#include "namespace.h"
#include "placement.h"
#include "record.h"
#include "check.h"

static struct config cfg; /* big: not on the stack */
static struct ns *ns;
static char *last_out;
static const struct ino_id *root = &record_root_id;

/* ---- raw access ---- */

static int raw_apply(unsigned shard, struct batch *b)
{
    int rc = shard_apply(ns_shard(ns, shard), b);
    batch_free(b);
    return rc;
}

static int raw_put(unsigned shard, const void *k, size_t kl, const void *v, size_t vl)
{
    struct batch b;
    batch_init(&b);
    batch_put(&b, k, kl, v, vl);
    return raw_apply(shard, &b);
}

static int raw_del(unsigned shard, const void *k, size_t kl)
{
    struct batch b;
    batch_init(&b);
    batch_del(&b, k, kl);
    return raw_apply(shard, &b);
}

static int raw_get(unsigned shard, const void *k, size_t kl, void *buf, size_t buflen, size_t *vl)
{
    return shard_get(ns_shard(ns, shard), k, kl, 0, buf, buflen, vl);
}

static int put_inode(const struct inode *ino)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    return raw_put(ns_inode_shard(ns, &ino->id), key, record_inode_key(key, &ino->id), val,
                   record_inode_encode(val, ino));
}

static void put_entry(const struct ino_id *dir, const char *name, const struct ino_id *id,
                      uint8_t dtype)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN];
    size_t kl = record_entry_key(key, dir, name, strlen(name));
    record_entry_encode(val, id, dtype);
    CHECK(raw_put(ns_entry_shard(ns, dir, name, strlen(name)), key, kl, val, sizeof(val)) == 0);
}

static void del_entry(const struct ino_id *dir, const char *name)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t kl = record_entry_key(key, dir, name, strlen(name));
    CHECK(raw_del(ns_entry_shard(ns, dir, name, strlen(name)), key, kl) == 0);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static int sum_cb(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    uint64_t *h = ctx;
    /* 'M' records are the shard's own bookkeeping (Mseq changes whenever the
     * flusher commits): not part of what fsck may or may not change. */
    if (kl && k[0] == REC_META)
        return 0;
    *h = fnv(*h, &kl, sizeof(kl));
    *h = fnv(*h, k, kl);
    *h = fnv(*h, &vl, sizeof(vl));
    *h = fnv(*h, v, vl);
    return 0;
}

/* A hash of every record of every shard but shard-local metadata. */
static uint64_t store_sum(void)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned i = 0; i < ns_shard_count(ns); i++) {
        h = fnv(h, &i, sizeof(i));
        CHECK(shard_scan(ns_shard(ns, i), NULL, 0, NULL, 0, sum_cb, &h) == 0);
    }
    return h;
}

/* ---- namespace helpers ---- */

static struct inode mk(const struct ino_id *dir, const char *name, uint32_t mode,
                       const char *target)
{
    struct inode ino;
    int rc = ns_mknode(ns, dir, name, strlen(name), mode, 0, 0, 0, target, &ino);
    if (rc)
        fprintf(stderr, "mknode %s: %s\n", name, strerror(-rc));
    CHECK(rc == 0);
    return ino;
}

static void fill(uint8_t *buf, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)(i * 31 + seed + (i >> 9));
}

static struct inode mkfile(const struct ino_id *dir, const char *name, size_t size, unsigned seed)
{
    struct inode ino = mk(dir, name, S_IFREG | 0644, NULL);
    uint8_t *buf = malloc(size ? size : 1);
    fill(buf, size, seed);
    if (size)
        CHECK(ns_write(ns, &ino.id, 0, buf, size, 0, 0, NULL) == (ssize_t)size);
    free(buf);
    CHECK(ns_getattr(ns, &ino.id, &ino) == 0);
    return ino;
}

/* 1 if id holds exactly size bytes of pattern seed. */
static int content_ok(const struct ino_id *id, size_t size, unsigned seed)
{
    uint8_t *want = malloc(size + 1), *got = malloc(size + 1);
    int ok;
    fill(want, size, seed);
    ok = ns_read(ns, id, 0, size + 1, got) == (ssize_t)size && memcmp(want, got, size) == 0;
    free(want);
    free(got);
    return ok;
}

static int lookup(const struct ino_id *dir, const char *name, struct inode *out)
{
    return ns_lookup(ns, dir, name, strlen(name), out);
}

static struct inode getattr(const struct ino_id *id)
{
    struct inode ino;
    memset(&ino, 0, sizeof(ino));
    CHECK(ns_getattr(ns, id, &ino) == 0);
    return ino;
}

static void hash_name(const struct ino_id *id, char out[34])
{
    out[0] = '#';
    for (int i = 0; i < RECORD_ID_LEN; i++)
        snprintf(out + 1 + 2 * i, 3, "%02x", id->b[i]);
}

/* ---- running fsck ---- */

static int run(int repair)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    int rc = fsck_run(ns, repair, out);

    fclose(out);
    printf("  fsck%s -> %d\n", repair ? " --repair" : "", rc);
    free(last_out);
    last_out = strdup(buf);
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
        printf("    %s\n", line);
    free(buf);
    return rc;
}

/* The cycle every scenario goes through; want < 0: any positive count. */
static void cycle(const char *what, int want)
{
    uint64_t before = store_sum();
    int a, b, r, c;

    printf("%s\n", what);
    a = run(0);
    b = run(0);
    CHECK(a == b);
    CHECK(store_sum() == before);
    if (want >= 0)
        CHECK(a == want);
    else
        CHECK(a > 0);
    /* Repair may find fewer: finishing a half-done directory rename also
     * fixes its ".." and link counts, which the check counts separately. */
    r = run(1);
    CHECK(r > 0 && r <= a);
    c = run(0);
    CHECK(c == 0);
    if (a != (want < 0 ? a : want) || r <= 0 || r > a || c != 0)
        fprintf(stderr, "  in scenario: %s (check %d/%d, repair %d, after %d)\n", what, a, b, r, c);
}

/* ---- intents, as namespace.c writes them ---- */

struct intent_rec {
    uint8_t kind;
    struct ino_id sdir, ddir, sid, did;
    uint8_t stype, dtype;
    const char *sname, *dname;
};

static size_t intent_encode(uint8_t *out, const struct intent_rec *in)
{
    uint8_t *p = out;
    size_t sl = strlen(in->sname), dl = strlen(in->dname);
    *p++ = in->kind;
    memcpy(p, in->sdir.b, 16), p += 16;
    memcpy(p, in->ddir.b, 16), p += 16;
    memcpy(p, in->sid.b, 16), p += 16;
    memcpy(p, in->did.b, 16), p += 16;
    *p++ = in->stype;
    *p++ = in->dtype;
    *p++ = (uint8_t)sl;
    memcpy(p, in->sname, sl), p += sl;
    *p++ = (uint8_t)dl;
    memcpy(p, in->dname, dl), p += dl;
    return (size_t)(p - out);
}

/* Step 1 of a cross-shard rename: the intent on the source entry's shard. */
static void put_intent(const struct intent_rec *in)
{
    uint8_t key[RECORD_KEY_MAX], val[600];
    struct ino_id tid;
    uint64_t h = placement_entry_hash(in->sdir.b, in->sname, strlen(in->sname));
    record_id_make(&tid, h, 0x1234567);
    CHECK(raw_put(ns_entry_shard(ns, &in->sdir, in->sname, strlen(in->sname)), key,
                  record_intent_key(key, &tid), val, intent_encode(val, in)) == 0);
}

/* Step 1 of a cross-shard rename of sid (type stype) from sdir/sname to
 * ddir/dname. */
static void put_rename_intent(const struct ino_id *sdir, const char *sname,
                              const struct ino_id *sid, uint8_t stype, const struct ino_id *ddir,
                              const char *dname)
{
    struct intent_rec in = {.kind = 1,
                            .sdir = *sdir,
                            .ddir = *ddir,
                            .sid = *sid,
                            .stype = stype,
                            .dtype = DT_UNKNOWN,
                            .sname = sname,
                            .dname = dname};
    put_intent(&in);
}

/* Names src in sdir and dst in ddir whose entries live on different shards. */
static void names_apart(const struct ino_id *sdir, const struct ino_id *ddir, const char *stem,
                        char src[32], char dst[32])
{
    for (int i = 0; i < 1000; i++) {
        snprintf(src, 32, "%s_src%d", stem, i);
        snprintf(dst, 32, "%s_dst%d", stem, i);
        if (ns_entry_shard(ns, sdir, src, strlen(src)) !=
            ns_entry_shard(ns, ddir, dst, strlen(dst)))
            return;
    }
    CHECK(!"no names on different shards");
}

/* ---- the scenarios ---- */

static struct inode d, sub, e, f1, f2;

static void build_tree(void)
{
    struct inode ino;

    d = mk(root, "d", S_IFDIR | 0755, NULL);
    sub = mk(&d.id, "sub", S_IFDIR | 0755, NULL);
    e = mk(root, "e", S_IFDIR | 0755, NULL);
    f1 = mkfile(root, "f1", 200000, 1);
    f2 = mkfile(&d.id, "f2", 5, 2);
    CHECK(ns_link(ns, &f1.id, &d.id, "f1link", 6, &ino) == 0);
    CHECK(ns_setxattr(ns, &f1.id, "user.x", "xv", 2, 0) == 0);
    mk(root, "s", S_IFLNK | 0777, "target");
    mk(root, "p", S_IFIFO | 0644, NULL);
}

static void dangling(void)
{
    struct inode g = mkfile(root, "g", 10, 3), ino;
    uint8_t key[RECORD_KEY_MAX];

    CHECK(raw_del(ns_inode_shard(ns, &g.id), key, record_inode_key(key, &g.id)) == 0);
    cycle("dangling entry", 1);
    CHECK(lookup(root, "g", &ino) == -ENOENT);
}

static void link_counts(void)
{
    struct inode ino = getattr(&f1.id);

    ino.nlink += 5;
    put_inode(&ino);
    ino = getattr(&d.id);
    ino.nlink = 7;
    put_inode(&ino);
    ino = getattr(root);
    ino.nlink = 1;
    put_inode(&ino);
    cycle("link counts", 3);
    CHECK(getattr(&f1.id).nlink == 2);
    CHECK(getattr(&d.id).nlink == 3);
    CHECK(getattr(root).nlink == 4); /* d, e */
}

static void chunks(void)
{
    struct inode h = mkfile(root, "h", 150000, 4);
    uint8_t key[RECORD_KEY_MAX], *buf = malloc(RECORD_CHUNK + 1), *want = malloc(150000);
    struct ino_id ghost;
    unsigned s = ns_inode_shard(ns, &h.id);
    size_t vl = 0;

    memset(buf, 7, RECORD_CHUNK + 1);
    fill(want, 150000, 4);
    CHECK(raw_put(ns_inode_shard(ns, &f1.id), key, record_chunk_key(key, &f1.id, 100), buf, 10) ==
          0);
    record_id_make(&ghost, 0xabcdef, 42);
    CHECK(raw_put(ns_inode_shard(ns, &ghost), key, record_chunk_key(key, &ghost, 0), buf, 10) == 0);
    CHECK(raw_put(s, key, record_chunk_key(key, &h.id, 1), buf, RECORD_CHUNK + 1) == 0);
    memcpy(buf, want + 2 * RECORD_CHUNK, 150000 - 2 * RECORD_CHUNK);
    CHECK(raw_put(s, key, record_chunk_key(key, &h.id, 2), buf, 20000) == 0);
    CHECK(raw_put(ns_inode_shard(ns, &f2.id), key, record_chunk_key(key, &f2.id, 0), buf, 10) == 0);
    cycle("chunks: beyond EOF, no inode, too long, past EOF, of an inline file", 5);
    CHECK(raw_get(ns_inode_shard(ns, &f1.id), key, record_chunk_key(key, &f1.id, 100), buf, 0,
                  NULL) == -ENOENT);
    CHECK(raw_get(s, key, record_chunk_key(key, &h.id, 1), buf, 0, NULL) == -ENOENT);
    CHECK(raw_get(s, key, record_chunk_key(key, &h.id, 2), buf, 0, &vl) == 0);
    CHECK(vl == 150000 - 2 * RECORD_CHUNK);
    memset(want + RECORD_CHUNK, 0, RECORD_CHUNK); /* chunk 1 is a hole now */
    CHECK(ns_read(ns, &h.id, 0, 1, buf) == 1);
    uint8_t *got = malloc(150000);
    CHECK(ns_read(ns, &h.id, 0, 150000, got) == 150000 && memcmp(got, want, 150000) == 0);
    CHECK(content_ok(&f2.id, 5, 2));
    CHECK(content_ok(&f1.id, 200000, 1));
    free(got);
    free(buf);
    free(want);
}

static void orphans(void)
{
    struct inode big = mkfile(root, "big", 100000, 5),
                 empty = mk(root, "empty", S_IFREG | 0600, NULL);
    struct inode od = mk(root, "od", S_IFDIR | 0755, NULL), x = mkfile(&od.id, "x", 2, 6);
    struct inode lf, ino;
    char name[34];

    del_entry(root, "big");
    del_entry(root, "empty");
    del_entry(root, "od");
    cycle("orphans: a file with data, an empty file, a directory with a child", 4);
    CHECK(lookup(root, "lost+found", &lf) == 0 && S_ISDIR(lf.mode) && (lf.mode & 0777) == 0700);
    hash_name(&big.id, name);
    CHECK(lookup(&lf.id, name, &ino) == 0 && ino.nlink == 1);
    CHECK(content_ok(&big.id, 100000, 5));
    CHECK(ns_getattr(ns, &empty.id, &ino) == -ENOENT);
    hash_name(&od.id, name);
    CHECK(lookup(&lf.id, name, &ino) == 0 && S_ISDIR(ino.mode));
    CHECK(memcmp(&ino.parent, &lf.id, sizeof(lf.id)) == 0);
    CHECK(lookup(&od.id, "x", &ino) == 0 && content_ok(&x.id, 2, 6));
    CHECK(getattr(&lf.id).nlink == 3);
    CHECK(getattr(root).nlink == 5); /* d, e, lost+found */
}

static void rename_forward(void)
{
    char src[32], dst[32];
    struct inode f, ino;

    names_apart(root, root, "fw", src, dst);
    f = mkfile(root, src, 3000, 7);
    put_rename_intent(root, src, &f.id, DT_REG, root, dst);
    put_entry(root, dst, &f.id, DT_REG);
    cycle("half-done rename, step 2 done", 1);
    CHECK(lookup(root, src, &ino) == -ENOENT);
    CHECK(lookup(root, dst, &ino) == 0 && ino.nlink == 1 && content_ok(&f.id, 3000, 7));
}

static void rename_back(void)
{
    char src[32], dst[32];
    struct inode f, ino;

    names_apart(root, root, "bk", src, dst);
    f = mkfile(root, src, 10, 8);
    put_rename_intent(root, src, &f.id, DT_REG, root, dst);
    cycle("half-done rename, only step 1 done", 1);
    CHECK(lookup(root, src, &ino) == 0 && content_ok(&f.id, 10, 8));
    CHECK(lookup(root, dst, &ino) == -ENOENT);
}

/* A directory moved from d to e: steps 1-2, and none of the fix-ups. */
static void rename_dir(void)
{
    char src[32], dst[32];
    struct inode m, ino;

    names_apart(&d.id, &e.id, "dir", src, dst);
    m = mk(&d.id, src, S_IFDIR | 0755, NULL);
    put_rename_intent(&d.id, src, &m.id, DT_DIR, &e.id, dst);
    put_entry(&e.id, dst, &m.id, DT_DIR);
    cycle("half-done rename of a directory: intent, parent, two link counts", 4);
    CHECK(lookup(&d.id, src, &ino) == -ENOENT);
    CHECK(lookup(&e.id, dst, &ino) == 0 && memcmp(&ino.parent, &e.id, sizeof(e.id)) == 0);
    CHECK(getattr(&d.id).nlink == 3);
    CHECK(getattr(&e.id).nlink == 3);
}

static void dying(void)
{
    struct inode ino = getattr(&d.id);

    ino.flags |= INODE_DYING;
    put_inode(&ino);
    cycle("directory left dying", 1);
    CHECK((getattr(&d.id).flags & INODE_DYING) == 0);
    CHECK(mk(&d.id, "after", S_IFREG | 0644, NULL).nlink == 1);
}

static void wrong_shard(void)
{
    uint8_t key[RECORD_KEY_MAX], val[64];
    size_t kl = record_xattr_key(key, &f1.id, "user.x", 6), vl = 0;
    unsigned s = ns_inode_shard(ns, &f1.id), bad = (s + 1) % ns_shard_count(ns);
    struct inode ino, sym;
    char v[8];

    CHECK(raw_get(s, key, kl, val, sizeof(val), &vl) == 2);
    CHECK(raw_put(bad, key, kl, val, vl) == 0);
    CHECK(raw_del(s, key, kl) == 0);
    CHECK(lookup(root, "s", &sym) == 0);
    kl = record_entry_key(key, root, "s", 1);
    s = ns_entry_shard(ns, root, "s", 1);
    bad = (s + 2) % ns_shard_count(ns);
    CHECK(raw_get(s, key, kl, val, sizeof(val), &vl) == RECORD_ENTRY_LEN);
    CHECK(raw_put(bad, key, kl, val, vl) == 0);
    CHECK(raw_del(s, key, kl) == 0);
    cycle("records on the wrong shard", 2);
    CHECK(ns_getxattr(ns, &f1.id, "user.x", v, sizeof(v)) == 2 && memcmp(v, "xv", 2) == 0);
    CHECK(lookup(root, "s", &ino) == 0 && S_ISLNK(ino.mode));
}

static int always_open(void *ctx, const struct ino_id *id)
{
    (void)ctx, (void)id;
    return 1;
}

static void open_orphan(void)
{
    struct inode o = mkfile(root, "o", 70000, 9), ino;

    CHECK(ns_unlink(ns, root, "o", 1, always_open, NULL) == 0);
    CHECK(ns_getattr(ns, &o.id, &ino) == 0 && ino.nlink == 0);
    cycle("unlinked while open", 1);
    CHECK(ns_getattr(ns, &o.id, &ino) == -ENOENT);
}

static void dir_names(void)
{
    struct inode ino;

    put_entry(&e.id, "dlink", &d.id, DT_DIR);
    cycle("a directory with two names", 1);
    CHECK(lookup(&e.id, "dlink", &ino) == -ENOENT);
    CHECK(lookup(root, "d", &ino) == 0 && getattr(&e.id).nlink == 3);
}

static void entry_type(void)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN + 1], dtype;
    struct ino_id id;
    size_t vl = 0;
    struct inode p;

    CHECK(lookup(root, "p", &p) == 0);
    put_entry(root, "p", &p.id, DT_REG);
    cycle("entry type mismatch", 1);
    CHECK(raw_get(ns_entry_shard(ns, root, "p", 1), key, record_entry_key(key, root, "p", 1), val,
                  sizeof(val), &vl) == RECORD_ENTRY_LEN);
    CHECK(record_entry_decode(val, vl, &id, &dtype) == 0 && dtype == DT_FIFO);
}

/* readdir callback: counts names longer than any name may be. */
static int count_long(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                      uint8_t dtype)
{
    (void)name, (void)id, (void)dtype;
    *(int *)ctx += nlen > RECORD_NAME_MAX;
    return 0;
}

static void malformed(void)
{
    uint8_t key[RECORD_KEY_MAX], longkey[RECORD_KEY_MAX + 45], val[RECORD_ENTRY_LEN];
    struct ino_id junk;
    struct inode ino;
    int longs = 0;

    record_id_make(&junk, 0x5555, 77);
    CHECK(raw_put(ns_inode_shard(ns, &junk), key, record_inode_key(key, &junk), "garbage", 7) == 0);
    CHECK(raw_put(ns_entry_shard(ns, root, "bad", 3), key, record_entry_key(key, root, "bad", 3),
                  "abc", 3) == 0);
    key[record_orphan_key(key, &f1.id)] = 'x'; /* a mark with a key too long */
    CHECK(raw_put(ns_inode_shard(ns, &f1.id), key, 1 + RECORD_ID_LEN + 1, "", 0) == 0);
    /* An entry of a 300-byte name (no placement: on shard 0): readdir
     * passes over it rather than hand a reader a name no buffer holds. */
    record_id_prefix(longkey, REC_ENTRY, root);
    memset(longkey + 1 + RECORD_ID_LEN, 'L', sizeof(longkey) - 1 - RECORD_ID_LEN);
    record_entry_encode(val, &f1.id, DT_REG);
    CHECK(raw_put(0, longkey, sizeof(longkey), val, sizeof(val)) == 0);
    CHECK(ns_readdir(ns, root, count_long, &longs) == 0 && longs == 0);
    cycle("malformed inode, entry (value, key length) and orphan mark records", 4);
    CHECK(lookup(root, "bad", &ino) == -ENOENT);
    CHECK(ns_getattr(ns, &junk, &ino) == -ENOENT);
}

static void unknown(void)
{
    uint64_t before;

    CHECK(raw_put(1, "Zfoo", 4, "bar", 3) == 0);
    before = store_sum();
    printf("unknown record type\n");
    CHECK(run(0) == 1);
    CHECK(run(0) == 1);
    CHECK(store_sum() == before);
    CHECK(run(1) == 1);
    CHECK(strstr(last_out, "left alone): not fixed") != NULL);
    CHECK(store_sum() == before);
    CHECK(raw_del(1, "Zfoo", 4) == 0);
    CHECK(run(0) == 0);
}

/* la and lb name each other and nothing names la from the root. */
static void loop(void)
{
    struct inode la = mk(root, "la", S_IFDIR | 0755, NULL),
                 lb = mk(&la.id, "lb", S_IFDIR | 0755, NULL);
    struct inode lf, ino;
    char na[34], nb[34];

    del_entry(root, "la");
    put_entry(&lb.id, "back", &la.id, DT_DIR);
    ino = getattr(&la.id);
    ino.parent = lb.id;
    put_inode(&ino);
    cycle("directories in a loop cut off from the root", -1);
    CHECK(lookup(root, "lost+found", &lf) == 0);
    hash_name(&la.id, na);
    hash_name(&lb.id, nb);
    CHECK(lookup(&lf.id, na, &ino) == 0 || lookup(&lf.id, nb, &ino) == 0);
}

static void everything(void)
{
    char src[32], dst[32];
    uint8_t key[RECORD_KEY_MAX];
    struct inode g = mkfile(&e.id, "g2", 10, 10), f = mkfile(root, "lost", 5000, 11), ino;
    struct inode r;

    CHECK(raw_del(ns_inode_shard(ns, &g.id), key, record_inode_key(key, &g.id)) == 0);
    ino = getattr(&f1.id);
    ino.nlink = 9;
    put_inode(&ino);
    ino = getattr(&e.id);
    ino.flags |= INODE_DYING;
    put_inode(&ino);
    CHECK(raw_put(ns_inode_shard(ns, &f1.id), key, record_chunk_key(key, &f1.id, 4), "x", 1) == 0);
    del_entry(root, "lost");
    names_apart(root, &e.id, "all", src, dst);
    r = mkfile(root, src, 1000, 12);
    put_rename_intent(root, src, &r.id, DT_REG, &e.id, dst);
    put_entry(&e.id, dst, &r.id, DT_REG);
    cycle("all at once", 6);
    CHECK(content_ok(&f.id, 5000, 11));
    CHECK(lookup(&e.id, dst, &ino) == 0 && content_ok(&r.id, 1000, 12));
    CHECK(getattr(&f1.id).nlink == 2);
    CHECK(content_ok(&f1.id, 200000, 1));
}

/* A half-done exchange of a and b; without_src: the source entry is lost too,
 * so recovery puts it back rather than replacing it. */
static void exchange(int without_src)
{
    char src[32], dst[32], stem[8];
    struct inode a, b, ino;

    snprintf(stem, sizeof(stem), "x%d", without_src);
    names_apart(root, &e.id, stem, src, dst);
    a = mkfile(root, src, 300, 13);
    b = mkfile(&e.id, dst, 400, 14);
    put_intent(&(struct intent_rec){.kind = 2,
                                    .sdir = *root,
                                    .ddir = e.id,
                                    .sid = a.id,
                                    .did = b.id,
                                    .stype = DT_REG,
                                    .dtype = DT_REG,
                                    .sname = src,
                                    .dname = dst});
    put_entry(&e.id, dst, &a.id, DT_REG);
    if (without_src)
        del_entry(root, src);
    cycle(without_src ? "half-done exchange, source entry gone" : "half-done exchange", 1);
    CHECK(lookup(root, src, &ino) == 0 && memcmp(&ino.id, &b.id, sizeof(b.id)) == 0);
    CHECK(lookup(&e.id, dst, &ino) == 0 && memcmp(&ino.id, &a.id, sizeof(a.id)) == 0);
    CHECK(content_ok(&a.id, 300, 13) && content_ok(&b.id, 400, 14));
}

static void inode_shards(void)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    struct inode p, ino;
    size_t kl, vl = 0;
    unsigned s, n = ns_shard_count(ns);

    kl = record_inode_key(key, &f2.id);
    s = ns_inode_shard(ns, &f2.id);
    CHECK(raw_get(s, key, kl, val, sizeof(val), &vl) > 0);
    CHECK(raw_put((s + 1) % n, key, kl, val, vl) == 0); /* a stale copy */
    CHECK(lookup(root, "p", &p) == 0);
    kl = record_inode_key(key, &p.id);
    s = ns_inode_shard(ns, &p.id);
    CHECK(raw_get(s, key, kl, val, sizeof(val), &vl) > 0);
    CHECK(raw_put((s + 3) % n, key, kl, val, vl) == 0);
    CHECK(raw_del(s, key, kl) == 0);
    cycle("inode records: a duplicate and a misplaced one", 2);
    CHECK(lookup(root, "p", &ino) == 0 && S_ISFIFO(ino.mode));
    CHECK(content_ok(&f2.id, 5, 2));
}

static void root_missing(void)
{
    uint8_t key[RECORD_KEY_MAX];
    struct inode ino;

    CHECK(raw_del(ns_inode_shard(ns, root), key, record_inode_key(key, root)) == 0);
    cycle("root inode missing", 1);
    ino = getattr(root);
    CHECK(S_ISDIR(ino.mode));
    CHECK(lookup(root, "d", &ino) == 0 && content_ok(&f1.id, 200000, 1));
}

static void bad_name_and_empty_dir(void)
{
    struct inode nm = mkfile(root, "nm", 1234, 15), ed = mk(root, "ed", S_IFDIR | 0700, NULL);
    struct inode lf, ino;
    char name[34];

    del_entry(root, "nm");
    put_entry(root, "a/b", &nm.id, DT_REG);
    del_entry(root, "ed");
    /* bad name; its file to lost+found; the empty directory deleted; root nlink */
    cycle("bad entry name, empty orphan directory", 4);
    CHECK(lookup(root, "lost+found", &lf) == 0);
    hash_name(&nm.id, name);
    CHECK(lookup(&lf.id, name, &ino) == 0 && content_ok(&nm.id, 1234, 15));
    CHECK(ns_getattr(ns, &ed.id, &ino) == -ENOENT);
}

/* Enough inodes for the table to grow a few times; then damage a few. */
static void many(void)
{
    struct inode big = mk(root, "many", S_IFDIR | 0755, NULL), ino;
    char name[32];

    for (int i = 0; i < 3000; i++) {
        snprintf(name, sizeof(name), "n%d", i);
        if (i % 100 == 0)
            mk(&big.id, name, S_IFDIR | 0755, NULL);
        else
            mk(&big.id, name, S_IFREG | 0644, NULL);
    }
    printf("3000 inodes\n");
    CHECK(run(0) == 0);
    for (int i = 1; i < 3000; i += 500) {
        snprintf(name, sizeof(name), "n%d", i);
        CHECK(lookup(&big.id, name, &ino) == 0);
        ino.nlink = 4;
        put_inode(&ino);
    }
    cycle("3000 inodes, 6 wrong link counts", 6);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

int main(void)
{
    char dir[] = "/tmp/test_fsck.XXXXXX", path[PATH_MAX], err[512];
    FILE *conf;

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(path, sizeof(path), "%s/shards.conf", dir);
    conf = fopen(path, "w");
    if (!conf) {
        perror(path);
        return 1;
    }
    fputs("[cluster]\nshards = 4\n[node local]\ndata_dir = ./data\nshards = all\n", conf);
    fclose(conf);
    if (config_load(path, &cfg, err, sizeof(err)) != 0 ||
        ns_open(&cfg, 0, NS_OPEN_NO_RECOVER, NULL, &ns, err, sizeof(err)) != 0) {
        fprintf(stderr, "setup: %s\n", err);
        return 1;
    }

    build_tree();
    printf("a fresh tree\n");
    CHECK(run(0) == 0);
    CHECK(strstr(last_out, "fsck: clean") != NULL);
    CHECK(run(1) == 0);

    dangling();
    link_counts();
    chunks();
    orphans();
    rename_forward();
    rename_back();
    rename_dir();
    dying();
    wrong_shard();
    open_orphan();
    dir_names();
    entry_type();
    malformed();
    unknown();
    loop();
    exchange(0);
    exchange(1);
    inode_shards();
    root_missing();
    bad_name_and_empty_dir();
    many();
    everything();

    ns_close(ns);
    free(last_out);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return check_summary("fsck");
}
