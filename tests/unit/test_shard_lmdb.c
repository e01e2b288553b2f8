/* test_shard_lmdb.c -- unit tests for backend/shard_lmdb.c.
 *
 * Everything runs on real shards in a fresh directory under /tmp:
 *  - get: whole values, offset/partial reads, vlen, empty values, binary and
 *    511-byte keys, -ENOENT; values survive close + reopen;
 *  - open errors (a file, an unreachable path, a corrupt data.mdb);
 *  - scan: key order, [start, end) bounds (a table), early stop with 1, error
 *    propagation from the callback; del_range bounds, incl. over many leaf
 *    pages and up to the last key;
 *  - batches are atomic: a failed ASSERT_ABSENT (-EEXIST) or ASSERT_VALUE
 *    (-EAGAIN), a malformed encoding or a sticky b->error leave the shard
 *    exactly as it was (no op of the batch applied, nothing logged);
 *  - durability without commit: a child process applies 1000 batches with a
 *    60 s commit interval and _exit()s without closing; the parent reopens and
 *    finds every batch (replayed from redo.log, whose records are checked
 *    against the documented format). Also with a commit in the middle, with
 *    failing batches mixed in, and with SIGKILL at arbitrary moments while a
 *    fast flusher is committing;
 *  - torn log tails: garbage, truncated records, bad checksums, wrong magic,
 *    gaps, huge lengths, zeros after the good records are ignored, the good
 *    records replayed, and the shard stays usable;
 *  - stale logs: records already inside the committed state are not replayed
 *    again; the record after them is; a record beyond a gap is not replayed,
 *    neither at once nor later when the sequence numbers catch up with it;
 *  - large values (2000 x 64 KiB, beyond the 16 MiB commit threshold), 200 MiB
 *    of 1 MiB values (stat bytes grows), sync/flush/stat.pending, the flusher
 *    thread, and 4 threads applying and reading concurrently.
 * With SHARDFS_SLOW_TESTS=1 in the environment, also fills more than the
 * initial 1 GiB map inside one transaction (the MDB_MAP_FULL -> grow path).
 * Exits non-zero on any failed check.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "batch.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "check.h"
#include "get_many_check.h"
#include "scan_join_check.h"
#include "test_util.h"

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- files ---- */

static char tmpdir[] = "/tmp/shardfs-test-lmdb-XXXXXX";

/* tmpdir/name/file (file may be NULL), in one of a few rotating buffers. */
static const char *path_of(const char *name, const char *file)
{
    static char bufs[8][512];
    static int next;
    char *p = bufs[next++ % 8];
    if (file)
        snprintf(p, 512, "%s/%s/%s", tmpdir, name, file);
    else
        snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

static long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static uint8_t *read_all(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    long size = file_size(path);
    uint8_t *p;

    *len = 0;
    if (fd < 0 || size < 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    p = xmalloc((size_t)size);
    if (read(fd, p, (size_t)size) != size) {
        close(fd);
        free(p);
        return NULL;
    }
    close(fd);
    *len = (size_t)size;
    return p;
}

static int write_all(const char *path, const void *data, size_t len, int append)
{
    int fd = open(path, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0)
        return -1;
    ssize_t n = len ? write(fd, data, len) : 0;
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* ---- the redo log format (shard_lmdb.c):
 *   magic:u32le len:u32le seq:u64le check:u64le payload[len]
 *   check = XXH3_64(payload, seed = seq), magic "SLOG" ---- */

#define LOG_MAGIC 0x474f4c53u
#define LOG_HDR 24u
#define LOG_MAGIC2 0x32474c53u /* the stream's format: position in the header */
#define LOG_HDR2 64u

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* Encode one record into out (LOG_HDR + plen bytes). */
static size_t log_record(uint8_t *out, uint32_t magic, uint64_t seq, const uint8_t *payload,
                         uint32_t plen, uint64_t check_xor)
{
    put_le(out, magic, 4);
    put_le(out + 4, plen, 4);
    put_le(out + 8, seq, 8);
    put_le(out + 16, XXH3_64bits_withSeed(payload, plen, seq) ^ check_xor, 8);
    if (plen)
        memcpy(out + LOG_HDR, payload, plen);
    return LOG_HDR + plen;
}

struct logrec {
    uint64_t seq;
    size_t off, len;
};

/* Parse a redo log: the well-formed records from the start (the stream's
 * format, LOG_MAGIC2 with a 64-byte header, or the one before it). Returns
 * their count (up to max in recs) and the byte length they cover in *good. */
static int log_parse(const uint8_t *p, size_t size, struct logrec *recs, int max, size_t *good)
{
    size_t off = 0;
    int n = 0;

    while (size - off >= LOG_HDR) {
        uint32_t magic = (uint32_t)get_le(p + off, 4), len = (uint32_t)get_le(p + off + 4, 4);
        uint64_t seq = get_le(p + off + 8, 8), check;
        size_t hdr = magic == LOG_MAGIC2 ? LOG_HDR2 : LOG_HDR;
        if ((magic != LOG_MAGIC && magic != LOG_MAGIC2) || size - off < hdr ||
            len > size - off - hdr)
            break;
        if (magic == LOG_MAGIC2)
            check = XXH3_64bits_withSeed(p + off + hdr, len,
                                         XXH3_64bits_withSeed(p + off + LOG_HDR, LOG_HDR2 - LOG_HDR, seq));
        else
            check = XXH3_64bits_withSeed(p + off + hdr, len, seq);
        if (check != get_le(p + off + 16, 8))
            break;
        if (n < max)
            recs[n] = (struct logrec){seq, off + hdr, len};
        n++;
        off += hdr + len;
    }
    if (good)
        *good = off;
    return n;
}

/* ---- shards ---- */

static struct shard *open_shard(const char *name, unsigned interval_ms, size_t commit_bytes)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = interval_ms,
                                     .commit_bytes = commit_bytes};
    struct shard *s = NULL;
    char err[1024] = "";
    int rc = shard_lmdb_open(path_of(name, NULL), 7, &opt, &s, err, sizeof(err));

    CHECKF(rc == 0 && s != NULL, "shard_lmdb_open(%s): %d: %s", name, rc, err);
    if (rc == 0)
        CHECK(s->index == 7);
    return rc == 0 ? s : NULL;
}

static int put_kv(struct shard *s, const void *k, size_t kl, const void *v, size_t vl)
{
    struct batch b;
    batch_init(&b);
    batch_put(&b, k, kl, v, vl);
    int rc = shard_apply(s, &b);
    batch_free(&b);
    return rc;
}

static int put_str(struct shard *s, const char *k, const char *v)
{
    return put_kv(s, k, strlen(k), v, strlen(v));
}

/* Check that key holds exactly val. */
static void expect_kv(struct shard *s, const void *k, size_t kl, const void *val, size_t vl,
                      const char *file, int line)
{
    size_t cap = vl + 16, got_len = (size_t)-1;
    uint8_t *buf = xmalloc(cap);
    int rc = shard_get(s, k, kl, 0, buf, cap, &got_len);

    check(rc == (int)vl && got_len == vl && memcmp(buf, val, vl) == 0, file, line,
          "key holds the value", "key \"%.*s\": rc %d, vlen %zu, want %zu bytes", (int)kl,
          (const char *)k, rc, got_len, vl);
    free(buf);
}
#define EXPECT_STR(s, k, v) expect_kv((s), (k), strlen(k), (v), strlen(v), __FILE__, __LINE__)
#define EXPECT_ABSENT(s, k)                                                                        \
    do {                                                                                           \
        uint8_t b_[8];                                                                             \
        int r_ = shard_get((s), (k), strlen(k), 0, b_, sizeof(b_), NULL);                          \
        check(r_ == -ENOENT, __FILE__, __LINE__, "\"" #k "\" absent", "%s: rc %d", (k), r_);       \
    } while (0)

static struct shard_stat stat_of(struct shard *s)
{
    struct shard_stat st;
    memset(&st, 0xee, sizeof(st));
    int rc = shard_stat(s, &st);
    CHECKF(rc == 0, "shard_stat: %d", rc);
    return st;
}

/* ---- scan collection ---- */

struct collect {
    int n;
    char keys[64][16];
    size_t klens[64];
    int stop_after; /* return 1 after this many calls (0: never) */
    int fail_after; /* return -ECANCELED after this many (0: never) */
    int bad_values; /* values that are not "V" + key */
};

static int collect_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct collect *c = ctx;
    if (c->n < 64 && kl < 16) {
        memcpy(c->keys[c->n], k, kl);
        c->klens[c->n] = kl;
    }
    if (vl != kl + 1 || v[0] != 'V' || memcmp(v + 1, k, kl) != 0)
        c->bad_values++;
    c->n++;
    if (c->fail_after && c->n >= c->fail_after)
        return -ECANCELED;
    if (c->stop_after && c->n >= c->stop_after)
        return 1;
    return 0;
}

/* Keys joined by '|' for readable comparisons ("\xff" shown as "~", NUL as "0"). */
static void joined(const struct collect *c, char *out, size_t outlen)
{
    size_t o = 0;
    out[0] = 0;
    for (int i = 0; i < c->n && i < 64; i++) {
        if (i && o + 1 < outlen)
            out[o++] = '|';
        for (size_t j = 0; j < c->klens[i] && o + 1 < outlen; j++) {
            char ch = c->keys[i][j];
            out[o++] = ch == '\xff' ? '~' : ch == 0 ? '0' : ch;
        }
    }
    out[o] = 0;
}

/* ---- a deterministic workload with a model of its result ----
 * Batch i puts "s%06u" (its tag) and a model key "m%04u", sometimes deletes
 * one, sometimes deletes a range of five, sometimes asserts a model key's
 * current value (succeeds), and with allow_fail sometimes ends with an
 * assertion that fails (-EAGAIN or -EEXIST), so nothing of it may apply. */

#define MK 200
struct model {
    uint8_t present[MK];
    uint8_t len[MK];
    char val[MK][16];
};

static size_t mkey(char *out, unsigned k)
{
    return (size_t)snprintf(out, 16, "m%04u", k);
}

static int gen_batch(unsigned i, int allow_fail, const struct model *m, struct model *next,
                     struct batch *b)
{
    uint64_t r = mix64(i * 7919ull + 17);
    char key[16], val[16];
    size_t kl, vl;
    int rc = 0;

    *next = *m;
    batch_reset(b);
    kl = (size_t)snprintf(key, sizeof(key), "s%06u", i);
    vl = (size_t)snprintf(val, sizeof(val), "%u", i);
    batch_put(b, key, kl, val, vl);

    unsigned k1 = (unsigned)(r % MK);
    kl = mkey(key, k1);
    vl = (size_t)snprintf(val, sizeof(val), "v%u", i);
    batch_put(b, key, kl, val, vl);
    next->present[k1] = 1;
    next->len[k1] = (uint8_t)vl;
    memcpy(next->val[k1], val, vl);

    if ((r >> 8) % 5 == 0) {
        unsigned k2 = (unsigned)((r >> 16) % MK);
        batch_del(b, key, mkey(key, k2));
        next->present[k2] = 0;
    }
    if ((r >> 24) % 25 == 0) {
        unsigned k3 = (unsigned)((r >> 32) % MK);
        char end[16];
        size_t el = mkey(end, k3 + 5);
        batch_add(b, BATCH_DEL_RANGE, key, mkey(key, k3), end, el);
        for (unsigned k = k3; k < k3 + 5 && k < MK; k++)
            next->present[k] = 0;
    }
    if ((r >> 40) % 8 == 0) {
        unsigned k4 = (unsigned)((r >> 44) % MK);
        kl = mkey(key, k4);
        if (next->present[k4])
            batch_add(b, BATCH_ASSERT_VALUE, key, kl, next->val[k4], next->len[k4]);
        else
            batch_add(b, BATCH_ASSERT_ABSENT, key, kl, NULL, 0);
    }
    if (allow_fail) {
        switch ((r >> 52) % 16) {
        case 0:
            batch_add(b, BATCH_ASSERT_VALUE, key, mkey(key, (unsigned)((r >> 56) % MK)), "nope", 4);
            rc = -EAGAIN;
            break;
        case 1:
            kl = (size_t)snprintf(key, sizeof(key), "s%06u", i); /* put above */
            batch_add(b, BATCH_ASSERT_ABSENT, key, kl, NULL, 0);
            rc = -EEXIST;
            break;
        }
    }
    return rc;
}

/* The model after batches [0, n); ok[i] says whether batch i succeeds. */
static void run_model(unsigned n, int allow_fail, struct model *m, uint8_t *ok)
{
    struct model next;
    struct batch b;

    batch_init(&b);
    memset(m, 0, sizeof(*m));
    for (unsigned i = 0; i < n; i++) {
        int rc = gen_batch(i, allow_fail, m, &next, &b);
        if (rc == 0)
            *m = next;
        if (ok)
            ok[i] = rc == 0;
    }
    batch_free(&b);
}

/* The encoding of batch i (from the model state after [0, i)). */
static struct batch batch_number(unsigned i, int allow_fail)
{
    struct model m, next;
    struct batch b;
    run_model(i, allow_fail, &m, NULL);
    batch_init(&b);
    gen_batch(i, allow_fail, &m, &next, &b);
    return b;
}

/* Apply batches [from, to) to s, each must give the model's result. Returns
 * the first i that did not, or to. Calls shard_sync after batch sync_at. */
static unsigned apply_range(struct shard *s, unsigned from, unsigned to, int allow_fail,
                            long sync_at, int ack_fd)
{
    struct model m, next;
    struct batch b;

    run_model(from, allow_fail, &m, NULL);
    batch_init(&b);
    for (unsigned i = from; i < to; i++) {
        int want = gen_batch(i, allow_fail, &m, &next, &b);
        int rc = shard_apply(s, &b);
        if (rc != want) {
            fprintf(stderr, "batch %u: rc %d, want %d\n", i, rc, want);
            batch_free(&b);
            return i;
        }
        if (rc == 0)
            m = next;
        if ((long)i == sync_at && shard_sync(s) != 0) {
            fprintf(stderr, "batch %u: shard_sync failed\n", i);
            batch_free(&b);
            return i;
        }
        if (ack_fd >= 0 && write(ack_fd, &i, sizeof(i)) != sizeof(i))
            break;
    }
    batch_free(&b);
    return to;
}

/* Check that s holds exactly the model after [0, n). */
static void verify_model(struct shard *s, unsigned n, int allow_fail, const char *what)
{
    struct model m;
    uint8_t *ok = xmalloc(n);
    char key[16], want[16], got[32];
    int bad = 0, present = 0;
    char first[128] = "";

    run_model(n, allow_fail, &m, ok);
    for (unsigned k = 0; k < MK; k++) {
        size_t kl = mkey(key, k), vlen = 0;
        int rc = shard_get(s, key, kl, 0, got, sizeof(got), &vlen);
        int good = m.present[k]
                       ? rc == m.len[k] && vlen == m.len[k] && memcmp(got, m.val[k], m.len[k]) == 0
                       : rc == -ENOENT;
        present += m.present[k];
        if (!good && bad++ == 0)
            snprintf(first, sizeof(first), "%s: rc %d, want %s", key, rc,
                     m.present[k] ? "present" : "absent");
    }
    for (unsigned i = 0; i < n; i++) {
        size_t kl = (size_t)snprintf(key, sizeof(key), "s%06u", i), vlen = 0;
        size_t wl = (size_t)snprintf(want, sizeof(want), "%u", i);
        int rc = shard_get(s, key, kl, 0, got, sizeof(got), &vlen);
        int good = ok[i] ? rc == (int)wl && memcmp(got, want, wl) == 0 : rc == -ENOENT;
        if (!good && bad++ == 0)
            snprintf(first, sizeof(first), "%s: rc %d, want %s", key, rc,
                     ok[i] ? "present" : "absent (failed batch)");
    }
    /* Nothing beyond batch n. */
    for (unsigned i = n; i < n + 50; i++) {
        size_t kl = (size_t)snprintf(key, sizeof(key), "s%06u", i);
        if (shard_get(s, key, kl, 0, got, sizeof(got), NULL) != -ENOENT && bad++ == 0)
            snprintf(first, sizeof(first), "%s: present, batch never applied", key);
    }
    struct collect c = {0};
    int rc = shard_scan(s, "m", 1, "n", 1, collect_fn, &c);
    CHECKF(rc == 0 && c.n == present, "%s: scan of model keys: rc %d, %d keys, want %d", what, rc,
           c.n, present);
    CHECKF(bad == 0, "%s: %d wrong keys after %u batches; first: %s", what, bad, n, first);
    free(ok);
}

/* In a forked child: the shard name, opened like open_shard() does, or
 * _exit(10). */
static struct shard *child_open(const char *name, unsigned interval_ms, size_t commit_bytes)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = interval_ms,
                                     .commit_bytes = commit_bytes};
    struct shard *s = NULL;
    char err[1024];

    if (shard_lmdb_open(path_of(name, NULL), 7, &opt, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "child: %s\n", err);
        _exit(10);
    }
    return s;
}

/* Run apply_range in a child process that then dies without closing the
 * shard (no commit: only the redo log has the batches). */
static int crash_child(const char *name, unsigned from, unsigned to, int allow_fail, long sync_at)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        struct shard *s = child_open(name, 60000, 0);
        if (apply_range(s, from, to, allow_fail, sync_at, -1) != to)
            _exit(11);
        _exit(0); /* like kill -9: no close, no commit */
    }
    int st = 0;
    if (waitpid(pid, &st, 0) != pid)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* ==== tests ==== */

static void test_open_errors(void)
{
    struct shard *s = (struct shard *)1;
    char err[1024] = "";
    const char *file = path_of("a-file", NULL);

    CHECK(write_all(file, "x", 1, 0) == 0);
    int rc = shard_lmdb_open(file, 0, NULL, &s, err, sizeof(err));
    CHECKF(rc < 0 && err[0], "open on a regular file: rc %d, err \"%s\"", rc, err);
    err[0] = 0;
    rc = shard_lmdb_open("/proc/no/such/dir", 0, NULL, &s, err, sizeof(err));
    CHECKF(rc < 0 && err[0], "open below /proc: rc %d, err \"%s\"", rc, err);
    /* A data.mdb that is no LMDB file. */
    CHECK(mkdir(path_of("bad-mdb", NULL), 0755) == 0);
    {
        static uint8_t junk[16384];
        memset(junk, 0x5a, sizeof(junk));
        CHECK(write_all(path_of("bad-mdb", "data.mdb"), junk, sizeof(junk), 0) == 0);
    }
    err[0] = 0;
    rc = shard_lmdb_open(path_of("bad-mdb", NULL), 0, NULL, &s, err, sizeof(err));
    CHECKF(rc < 0 && err[0], "open of a corrupt data.mdb: rc %d, err \"%s\"", rc, err);
    shard_close(NULL); /* NULL-safe */
}

/* get_many: the LMDB one (one transaction), and shard_get_many()'s
 * fallback for a shard without get_many, on the same checks. */
static void test_get_many(void)
{
    struct shard *s = open_shard("get_many", 60000, 0);
    const struct shard_ops *own;
    struct shard_ops plain;

    if (!s)
        return;
    CHECK(s->ops->get_many != NULL);
    check_get_many(s);
    own = s->ops;
    plain = *own;
    plain.get_many = NULL;
    s->ops = &plain;
    check_get_many(s);
    s->ops = own;
    shard_close(s);
}

/* The shard's own scan with a join, then the one shard.c does by hand for
 * a shard without it (a scan, then a get of each joined key). */
static void test_scan_join(void)
{
    struct shard *s = open_shard("scan_join", 60000, 0);
    const struct shard_ops *own;
    struct shard_ops plain;

    if (!s)
        return;
    CHECK(s->ops->scan_join != NULL);
    CHECK_RC(sj_fill(s, 1), 0);
    CHECK_RC(sj_fill(s, 2), 0);
    check_scan_join(s, 1, "lmdb");
    check_scan_join(s, 2, "lmdb");
    own = s->ops;
    plain = *own;
    plain.scan_join = NULL;
    s->ops = &plain;
    check_scan_join(s, 1, "scan and gets");
    s->ops = own;
    shard_close(s);
}

static void test_get(void)
{
    struct shard *s = open_shard("get", 60000, 0); /* no commits behind our back */
    uint8_t buf[64], longkey[BATCH_KEY_MAX];
    size_t vlen;

    if (!s)
        return;
    memset(longkey, 'K', sizeof(longkey));
    CHECK_RC(put_str(s, "digits", "0123456789"), 0);
    CHECK_RC(put_str(s, "empty", ""), 0);
    CHECK_RC(put_kv(s, "bin\0key", 7, "\0\xff\0", 3), 0);
    CHECK_RC(put_kv(s, longkey, sizeof(longkey), "long", 4), 0);
    CHECK_RC(put_kv(s, "\xff", 1, "ff", 2), 0);

    EXPECT_STR(s, "digits", "0123456789");
    EXPECT_STR(s, "empty", "");
    expect_kv(s, "bin\0key", 7, "\0\xff\0", 3, __FILE__, __LINE__);
    expect_kv(s, longkey, sizeof(longkey), "long", 4, __FILE__, __LINE__);
    expect_kv(s, "\xff", 1, "ff", 2, __FILE__, __LINE__);
    EXPECT_ABSENT(s, "bin"); /* a prefix of a key is another key */
    EXPECT_ABSENT(s, "digits0");
    EXPECT_ABSENT(s, "nothing");

    /* Offset and partial reads: rc is the bytes copied, *vlen the full length,
     * and nothing beyond the copied bytes is written. */
    static const struct {
        size_t off, buflen;
        int rc;
        const char *bytes;
    } reads[] = {
        {0, 64, 10, "0123456789"},
        {0, 10, 10, "0123456789"},
        {0, 4, 4, "0123"},
        {3, 4, 4, "3456"},
        {8, 4, 2, "89"},
        {9, 1, 1, "9"},
        {9, 64, 1, "9"},
        {10, 4, 0, ""},
        {11, 4, 0, ""},
        {1000000, 4, 0, ""},
        {0, 0, 0, ""},
        {5, 0, 0, ""},
        {(size_t)-1, 4, 0, ""},
    };
    for (size_t i = 0; i < sizeof(reads) / sizeof(reads[0]); i++) {
        memset(buf, '#', sizeof(buf));
        vlen = 12345;
        int rc = shard_get(s, "digits", 6, reads[i].off, buf, reads[i].buflen, &vlen);
        CHECKF(rc == reads[i].rc, "read at %zu of %zu: rc %d, want %d", reads[i].off,
               reads[i].buflen, rc, reads[i].rc);
        CHECKF(vlen == 10, "read at %zu of %zu: vlen %zu", reads[i].off, reads[i].buflen, vlen);
        CHECKF(memcmp(buf, reads[i].bytes, strlen(reads[i].bytes)) == 0 &&
                   buf[strlen(reads[i].bytes)] == '#',
               "read at %zu of %zu: bytes", reads[i].off, reads[i].buflen);
    }
    /* Only the length: no buffer at all. */
    vlen = 0;
    CHECK_RC(shard_get(s, "digits", 6, 0, NULL, 0, &vlen), 0);
    CHECK(vlen == 10);
    /* vlen may be NULL. */
    memset(buf, 0, sizeof(buf));
    CHECK_RC(shard_get(s, "digits", 6, 2, buf, 3, NULL), 3);
    CHECK(memcmp(buf, "234", 3) == 0);
    vlen = 99;
    CHECK_RC(shard_get(s, "empty", 5, 0, buf, sizeof(buf), &vlen), 0);
    CHECK(vlen == 0);
    CHECK_RC(shard_get(s, "missing", 7, 0, buf, sizeof(buf), &vlen), -ENOENT);
    CHECK_RC(shard_get(s, "missing", 7, 0, buf, sizeof(buf), NULL), -ENOENT);

    /* Overwrite, delete, delete of a missing key. */
    CHECK_RC(put_str(s, "digits", "abc"), 0);
    EXPECT_STR(s, "digits", "abc");
    struct batch b;
    batch_init(&b);
    batch_del(&b, "digits", 6);
    batch_del(&b, "never-there", 11);
    CHECK_RC(shard_apply(s, &b), 0);
    EXPECT_ABSENT(s, "digits");
    /* Within one batch, ops apply in order. */
    batch_reset(&b);
    batch_put(&b, "order1", 6, "first", 5);
    batch_del(&b, "order1", 6);
    batch_del(&b, "order2", 6);
    batch_put(&b, "order2", 6, "second", 6);
    batch_put(&b, "order3", 6, "a", 1);
    batch_put(&b, "order3", 6, "b", 1);
    CHECK_RC(shard_apply(s, &b), 0);
    EXPECT_ABSENT(s, "order1");
    EXPECT_STR(s, "order2", "second");
    EXPECT_STR(s, "order3", "b");

    /* An empty batch is a no-op. */
    struct shard_stat st0 = stat_of(s);
    batch_reset(&b);
    CHECK_RC(shard_apply(s, &b), 0);
    CHECK(stat_of(s).pending == st0.pending);
    batch_free(&b);

    /* Everything survives close and reopen. */
    shard_close(s);
    s = open_shard("get", 60000, 0);
    if (!s)
        return;
    CHECK(stat_of(s).pending == 0);
    EXPECT_STR(s, "empty", "");
    expect_kv(s, "bin\0key", 7, "\0\xff\0", 3, __FILE__, __LINE__);
    expect_kv(s, longkey, sizeof(longkey), "long", 4, __FILE__, __LINE__);
    EXPECT_STR(s, "order2", "second");
    EXPECT_STR(s, "order3", "b");
    EXPECT_ABSENT(s, "digits");
    EXPECT_ABSENT(s, "order1");
    shard_close(s);
}

/* del_range and scan over many leaf pages: the cursor walks across page
 * boundaries while deleting. */
static void test_del_range_pages(void)
{
    struct shard *s = open_shard("pages", 60000, 0);
    struct batch b;
    char key[16], val[200];
    enum { N = 5000 };

    if (!s)
        return;
    memset(val, 'v', sizeof(val));
    batch_init(&b);
    for (int i = 0; i < N; i++) {
        batch_put(&b, key, (size_t)snprintf(key, sizeof(key), "p%05d", i), val, sizeof(val));
        if (i % 500 == 499) {
            CHECK_RC(shard_apply(s, &b), 0);
            batch_reset(&b);
        }
    }
    CHECK_RC(put_str(s, "zzz", "after"), 0);
    struct collect c = {0};
    CHECK_RC(shard_scan(s, "p", 1, "q", 1, collect_fn, &c), 0);
    CHECK(c.n == N);

    /* The middle: [p01000, p04000). */
    batch_reset(&b);
    batch_add(&b, BATCH_DEL_RANGE, "p01000", 6, "p04000", 6);
    CHECK_RC(shard_apply(s, &b), 0);
    memset(&c, 0, sizeof(c));
    CHECK_RC(shard_scan(s, "p", 1, "q", 1, collect_fn, &c), 0);
    CHECKF(c.n == N - 3000, "%d keys left", c.n);
    CHECK_RC(shard_get(s, "p00999", 6, 0, NULL, 0, NULL), 0);
    CHECK_RC(shard_get(s, "p01000", 6, 0, NULL, 0, NULL), -ENOENT);
    CHECK_RC(shard_get(s, "p03999", 6, 0, NULL, 0, NULL), -ENOENT);
    CHECK_RC(shard_get(s, "p04000", 6, 0, NULL, 0, NULL), 0);

    /* The tail of the p keys, many pages, up to the last key before "zzz";
     * and in the same batch a put inside the range after the delete. */
    batch_reset(&b);
    batch_add(&b, BATCH_DEL_RANGE, "p04500", 6, "q", 1);
    batch_put(&b, "p04600", 6, "back", 4);
    CHECK_RC(shard_apply(s, &b), 0);
    memset(&c, 0, sizeof(c));
    CHECK_RC(shard_scan(s, "p04000", 6, NULL, 0, collect_fn, &c), 0);
    CHECKF(c.n == 500 + 1 + 1, "%d keys from p04000 on", c.n); /* p04000..p04499, p04600, zzz */
    EXPECT_STR(s, "p04600", "back");
    EXPECT_STR(s, "zzz", "after");

    /* Every other key, one DEL each, in one batch; then a scan counts. */
    batch_reset(&b);
    for (int i = 0; i < 1000; i += 2)
        batch_del(&b, key, (size_t)snprintf(key, sizeof(key), "p%05d", i));
    CHECK_RC(shard_apply(s, &b), 0);
    memset(&c, 0, sizeof(c));
    CHECK_RC(shard_scan(s, "p", 1, "p01", 3, collect_fn, &c), 0);
    CHECK(c.n == 500);

    /* The same after replaying the log. */
    shard_close(s);
    s = open_shard("pages", 60000, 0);
    if (s) {
        memset(&c, 0, sizeof(c));
        CHECK_RC(shard_scan(s, "p", 1, "q", 1, collect_fn, &c), 0);
        CHECKF(c.n == 500 + 500 + 1, "%d p keys after reopen", c.n);
        shard_close(s);
    }
    batch_free(&b);
}

/* Put key (at most 16 bytes) with the value "V" + key that collect_fn expects. */
static void batch_put_scan_key(struct batch *b, const char *key, size_t len)
{
    uint8_t v[17];
    v[0] = 'V';
    memcpy(v + 1, key, len);
    batch_put(b, key, len, v, len + 1);
}

static void put_scan_keys(struct shard *s, const char *const *keys, const size_t *lens, int n)
{
    struct batch b;
    batch_init(&b);
    /* Inserted out of order, over several batches. */
    for (int j = n - 1; j >= 0; j -= 2)
        batch_put_scan_key(&b, keys[j], lens[j]);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_reset(&b);
    for (int j = 1; j < n; j += 2)
        batch_put_scan_key(&b, keys[j], lens[j]);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
}

static void test_scan(void)
{
    /* A long interval: no commit, so no "Mseq" metadata key in the way. */
    struct shard *s = open_shard("scan", 60000, 0);
    static const char *const keys[] = {"\0", "a",  "b", "ba",   "bab",     "bb",
                                       "c",  "cz", "d", "\xff", "\xff\xff"};
    static const size_t lens[] = {1, 1, 1, 2, 3, 2, 1, 2, 1, 1, 2};
    const int nkeys = 11;
    char got[512];

    if (!s)
        return;
    {
        struct collect c = {0};
        CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, collect_fn, &c), 0);
        CHECK(c.n == 0); /* empty shard */
    }
    put_scan_keys(s, keys, lens, nkeys);

    static const struct {
        const char *start;
        size_t slen;
        const char *end; /* NULL: to the end */
        size_t elen;
        const char *want;
    } cases[] = {
        {NULL, 0, NULL, 0, "0|a|b|ba|bab|bb|c|cz|d|~|~~"},
        {"", 0, NULL, 0, "0|a|b|ba|bab|bb|c|cz|d|~|~~"},
        {"b", 1, "c", 1, "b|ba|bab|bb"},
        {"b", 1, "bb", 2, "b|ba|bab"},
        {"ba", 2, NULL, 0, "ba|bab|bb|c|cz|d|~|~~"},
        {"bc", 2, "cz", 2, "c"},      /* start between keys; end excluded */
        {"bc", 2, "cz\0", 3, "c|cz"}, /* "cz" < "cz\0" */
        {"c", 1, "c", 1, ""},         /* empty range */
        {"d", 1, "a", 1, ""},         /* end before start */
        {NULL, 0, "b", 1, "0|a"},
        {NULL, 0, "", 0, ""}, /* nothing is below "" */
        {"\xff", 1, NULL, 0, "~|~~"},
        {"\xff\xff\xff", 3, NULL, 0, ""},
        {"ba", 2, "bab", 3, "ba"},
        {"ba", 2, "baa", 3, "ba"},
        {"ba", 2, "bac", 3, "ba|bab"},
        {"\0", 1, "\0\0", 2, "0"},
        {"a", 1, "\xff\xff\xff", 3, "a|b|ba|bab|bb|c|cz|d|~|~~"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct collect c = {0};
        int rc = shard_scan(s, cases[i].start, cases[i].slen, cases[i].end, cases[i].elen,
                            collect_fn, &c);
        joined(&c, got, sizeof(got));
        CHECKF(rc == 0 && strcmp(got, cases[i].want) == 0,
               "scan case %zu: rc %d, \"%s\", want \"%s\"", i, rc, got, cases[i].want);
        CHECK(c.bad_values == 0);
    }

    /* Early stop: the callback's 1 ends the scan and is returned. */
    for (int stop = 1; stop <= 3; stop++) {
        struct collect c = {.stop_after = stop};
        CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, collect_fn, &c), 1);
        CHECK(c.n == stop);
    }
    {
        struct collect c = {.stop_after = nkeys};
        CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, collect_fn, &c), 1);
        CHECK(c.n == nkeys);
    }
    /* Errors from the callback abort the scan and come back. */
    for (int fail = 1; fail <= 3; fail++) {
        struct collect c = {.fail_after = fail};
        CHECK_RC(shard_scan(s, "b", 1, NULL, 0, collect_fn, &c), -ECANCELED);
        CHECK(c.n == fail);
    }
    /* The shard is fine after an aborted scan. */
    {
        struct collect c = {0};
        CHECK_RC(shard_scan(s, "b", 1, "c", 1, collect_fn, &c), 0);
        CHECK(c.n == 4);
    }

    /* del_range: [key, end). */
    static const struct {
        const char *start;
        size_t slen;
        const char *end;
        size_t elen;
        const char *left;
    } ranges[] = {
        {"d", 1, "a", 1, "0|a|b|ba|bab|bb|c|cz|d|~|~~"}, /* end before start: nothing */
        {"c", 1, "c", 1, "0|a|b|ba|bab|bb|c|cz|d|~|~~"}, /* empty */
        {"ba", 2, "bb", 2, "0|a|b|bb|c|cz|d|~|~~"},
        {"bz", 2, "c\0", 2, "0|a|b|bb|cz|d|~|~~"},
        {"\xff", 1, "\xff\xff", 2, "0|a|b|bb|cz|d|~~"},
        {"0", 1, "b", 1, "0|b|bb|cz|d|~~"}, /* "0" is not the NUL key */
        {"\0", 1, "d", 1, "d|~~"},
        {"\xfe", 1, "\xff\xff\xff", 3, "d"}, /* the last keys */
    };
    for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
        struct batch b;
        struct collect c = {0};
        batch_init(&b);
        batch_add(&b, BATCH_DEL_RANGE, ranges[i].start, ranges[i].slen, ranges[i].end,
                  ranges[i].elen);
        CHECK_RC(shard_apply(s, &b), 0);
        batch_free(&b);
        CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, collect_fn, &c), 0);
        joined(&c, got, sizeof(got));
        CHECKF(strcmp(got, ranges[i].left) == 0, "del_range %zu: left \"%s\", want \"%s\"", i, got,
               ranges[i].left);
    }
    /* A del_range that deletes the last keys of the shard. */
    {
        struct batch b;
        struct collect c = {0};
        batch_init(&b);
        batch_add(&b, BATCH_DEL_RANGE, "\0", 1, "\xff\xff\xff", 3);
        int rc = shard_apply(s, &b);
        batch_free(&b);
        CHECKF(rc == 0, "del_range emptying the shard: rc %d (%s)", rc, strerror(-rc));
        CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, collect_fn, &c), 0);
        CHECKF(c.n == 0, "%d keys left", c.n);
    }
    /* A put after a del_range in the same batch survives it. */
    put_scan_keys(s, keys, lens, nkeys);
    {
        struct batch b;
        struct collect c = {0};
        batch_init(&b);
        batch_add(&b, BATCH_DEL_RANGE, "b", 1, "c", 1);
        batch_put(&b, "bab", 3, "Vbab", 4);
        CHECK_RC(shard_apply(s, &b), 0);
        batch_free(&b);
        CHECK_RC(shard_scan(s, "a", 1, "d", 1, collect_fn, &c), 0);
        joined(&c, got, sizeof(got));
        CHECKF(strcmp(got, "a|bab|c|cz") == 0, "got \"%s\"", got);
    }
    /* The replayed log gives the same result as the applied batches. */
    shard_close(s);
    s = open_shard("scan", 60000, 0);
    if (s) {
        struct collect c = {0};
        CHECK_RC(shard_scan(s, "a", 1, "d", 1, collect_fn, &c), 0);
        joined(&c, got, sizeof(got));
        CHECKF(strcmp(got, "a|bab|c|cz") == 0, "after reopen: \"%s\"", got);
        shard_close(s);
    }
}

/* Snapshot of the whole shard as one string, for "nothing changed" checks. */
struct dump {
    char *buf;
    size_t len, cap;
};
static int dump_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct dump *d = ctx;
    size_t need = d->len + kl + vl + 64;
    if (need > d->cap) {
        d->cap = need * 2;
        d->buf = realloc(d->buf, d->cap);
        if (!d->buf)
            return -ENOMEM;
    }
    d->len += (size_t)sprintf(d->buf + d->len, "%zu:", kl);
    memcpy(d->buf + d->len, k, kl);
    d->len += kl;
    d->len += (size_t)sprintf(d->buf + d->len, "=%zu:", vl);
    memcpy(d->buf + d->len, v, vl);
    d->len += vl;
    return 0;
}
static struct dump dump_shard(struct shard *s)
{
    struct dump d = {0};
    int rc = shard_scan(s, NULL, 0, NULL, 0, dump_fn, &d);
    CHECKF(rc == 0, "dump: %d", rc);
    return d;
}
static int dump_equal(const struct dump *a, const struct dump *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->buf, b->buf, a->len) == 0);
}

static void test_atomicity(void)
{
    struct shard *s = open_shard("atomic", 60000, 0);
    struct batch b;
    const char *log = path_of("atomic", "redo.log");

    if (!s)
        return;
    batch_init(&b);
    for (int i = 0; i < 20; i++) {
        char k[16], v[16];
        snprintf(k, sizeof(k), "r%02d", i);
        snprintf(v, sizeof(v), "val%d", i);
        batch_put(&b, k, strlen(k), v, strlen(v));
    }
    batch_put(&b, "x", 1, "1", 1);
    batch_put(&b, "y", 1, "2", 1);
    CHECK_RC(shard_apply(s, &b), 0);

    struct dump before = dump_shard(s);
    struct shard_stat st0 = stat_of(s);
    long log0 = file_size(log);

    /* Batches that must fail as a whole, whatever their other ops are. */
    struct fail_case {
        const char *what;
        int rc;
    };
    static const struct fail_case fails[] = {
        {"assert_absent on an existing key, first", -EEXIST},
        {"assert_absent on an existing key, last", -EEXIST},
        {"assert_value with another value", -EAGAIN},
        {"assert_value with a longer value", -EAGAIN},
        {"assert_value with an empty value", -EAGAIN},
        {"assert_value on a missing key, empty value", -EAGAIN},
        {"assert_value on a missing key", -EAGAIN},
        {"assert_absent on a key put earlier in the batch", -EEXIST},
        {"assert_value on a key deleted earlier in the batch", -EAGAIN},
        {"assert_value on a key range-deleted earlier", -EAGAIN},
        {"del_range of almost everything, then a failed assert", -EAGAIN},
        {"many puts, then a failed assert", -EEXIST},
        {"assert_empty on a range holding a key", -ENOTEMPTY},
        {"assert_empty on a range holding only its start key", -ENOTEMPTY},
        {"assert_empty on a range a put earlier in the batch filled", -ENOTEMPTY},
    };
    for (size_t i = 0; i < sizeof(fails) / sizeof(fails[0]); i++) {
        batch_reset(&b);
        switch (i) {
        case 0:
            batch_add(&b, BATCH_ASSERT_ABSENT, "x", 1, NULL, 0);
            batch_put(&b, "new", 3, "n", 1);
            break;
        case 1:
            batch_put(&b, "new", 3, "n", 1);
            batch_put(&b, "x", 1, "changed", 7);
            batch_del(&b, "y", 1);
            batch_add(&b, BATCH_ASSERT_ABSENT, "r05", 3, NULL, 0);
            break;
        case 2:
            batch_put(&b, "new", 3, "n", 1);
            batch_add(&b, BATCH_ASSERT_VALUE, "x", 1, "2", 1);
            break;
        case 3:
            batch_add(&b, BATCH_ASSERT_VALUE, "x", 1, "10", 2);
            break;
        case 4:
            batch_add(&b, BATCH_ASSERT_VALUE, "x", 1, "", 0);
            break;
        case 5:
            batch_add(&b, BATCH_ASSERT_VALUE, "q", 1, "", 0);
            break;
        case 6:
            batch_put(&b, "q2", 2, "v", 1);
            batch_add(&b, BATCH_ASSERT_VALUE, "q", 1, "v", 1);
            break;
        case 7:
            batch_put(&b, "w", 1, "a", 1);
            batch_add(&b, BATCH_ASSERT_ABSENT, "w", 1, NULL, 0);
            break;
        case 8:
            batch_del(&b, "x", 1);
            batch_add(&b, BATCH_ASSERT_VALUE, "x", 1, "1", 1);
            break;
        case 9:
            batch_add(&b, BATCH_DEL_RANGE, "r", 1, "s", 1);
            batch_add(&b, BATCH_ASSERT_VALUE, "r07", 3, "val7", 4);
            break;
        case 10:
            batch_add(&b, BATCH_DEL_RANGE, "\0", 1, "y", 1);
            batch_add(&b, BATCH_ASSERT_VALUE, "y", 1, "3", 1);
            break;
        case 11:
            for (int j = 0; j < 500; j++) {
                char k[16];
                snprintf(k, sizeof(k), "many%03d", j);
                batch_put(&b, k, strlen(k), k, strlen(k));
                if (j % 10 == 0)
                    batch_del(&b, "r01", 3);
            }
            batch_add(&b, BATCH_ASSERT_ABSENT, "many499", 7, NULL, 0);
            break;
        case 12:
            batch_put(&b, "new", 3, "n", 1);
            batch_add(&b, BATCH_ASSERT_EMPTY, "r", 1, "s", 1);
            break;
        case 13:
            batch_add(&b, BATCH_ASSERT_EMPTY, "r05", 3, "r05\0", 4);
            break;
        case 14:
            batch_put(&b, "u1", 2, "v", 1);
            batch_add(&b, BATCH_ASSERT_EMPTY, "u", 1, "v", 1);
            break;
        }
        CHECK(b.error == 0);
        int rc = shard_apply(s, &b);
        CHECKF(rc == fails[i].rc, "%s: rc %d, want %d", fails[i].what, rc, fails[i].rc);
        struct dump after = dump_shard(s);
        CHECKF(dump_equal(&before, &after), "%s: the shard changed", fails[i].what);
        free(after.buf);
        struct shard_stat st = stat_of(s);
        CHECKF(st.pending == st0.pending && st.records == st0.records, "%s: stat changed",
               fails[i].what);
        CHECKF(file_size(log) == log0, "%s: the failed batch was logged", fails[i].what);
    }

    /* A malformed encoding fails with -EINVAL after a valid first op: the
     * first op is not applied either. */
    {
        struct batch bad;
        batch_init(&bad);
        batch_put(&bad, "garbled", 7, "g", 1);
        size_t good = bad.len;
        batch_put(&bad, "pad", 3, "p", 1);
        bad.buf[good] = 0x7f; /* op byte of the second item */
        CHECK_RC(shard_apply(s, &bad), -EINVAL);
        batch_free(&bad);
        EXPECT_ABSENT(s, "garbled");
        CHECK(file_size(log) == log0);
    }
    /* A batch with a sticky error is refused as a whole. */
    {
        uint8_t longkey[BATCH_KEY_MAX + 1];
        memset(longkey, 'k', sizeof(longkey));
        batch_reset(&b);
        batch_put(&b, "sticky", 6, "s", 1);
        batch_put(&b, longkey, sizeof(longkey), "s", 1);
        CHECK_RC(shard_apply(s, &b), -ENAMETOOLONG);
        EXPECT_ABSENT(s, "sticky");
    }

    /* Asserts that hold let the batch through. */
    batch_reset(&b);
    batch_add(&b, BATCH_ASSERT_EMPTY, "r05\0", 4, "r06", 3); /* between two keys */
    batch_add(&b, BATCH_ASSERT_EMPTY, "z", 1, "zz", 2);       /* past the last key */
    batch_add(&b, BATCH_ASSERT_EMPTY, "r07", 3, "r07", 3);    /* an empty range */
    batch_add(&b, BATCH_ASSERT_VALUE, "x", 1, "1", 1);
    batch_add(&b, BATCH_ASSERT_ABSENT, "q", 1, NULL, 0);
    batch_put(&b, "x", 1, "11", 2);
    batch_put(&b, "q", 1, "", 0);
    batch_add(&b, BATCH_ASSERT_VALUE, "q", 1, "", 0); /* empty value, present */
    batch_put(&b, "w", 1, "a", 1);
    batch_add(&b, BATCH_ASSERT_VALUE, "w", 1, "a", 1); /* sees the put before it */
    batch_del(&b, "y", 1);
    batch_add(&b, BATCH_ASSERT_ABSENT, "y", 1, NULL, 0); /* sees the delete */
    batch_add(&b, BATCH_ASSERT_EMPTY, "y", 1, "y\0", 2);  /* so does an empty range */
    CHECK_RC(shard_apply(s, &b), 0);
    EXPECT_STR(s, "x", "11");
    EXPECT_STR(s, "q", "");
    EXPECT_STR(s, "w", "a");
    EXPECT_ABSENT(s, "y");
    CHECK(stat_of(s).pending == st0.pending + 1);

    /* The log holds exactly the successful batches, in order. */
    {
        size_t len = 0, goodlen = 0;
        uint8_t *p = read_all(log, &len);
        struct logrec recs[8];
        int n = log_parse(p, len, recs, 8, &goodlen);
        CHECKF(n == 2 && goodlen == len, "%d records in %zu of %zu bytes", n, goodlen, len);
        if (n == 2) {
            CHECK(recs[0].seq + 1 == recs[1].seq);
            CHECK(recs[1].len == b.len && memcmp(p + recs[1].off, b.buf, b.len) == 0);
        }
        free(p);
    }
    batch_free(&b);
    free(before.buf);

    /* And after a reopen (replay of that log), the same. */
    shard_close(s);
    s = open_shard("atomic", 60000, 0);
    if (!s)
        return;
    EXPECT_STR(s, "x", "11");
    EXPECT_STR(s, "q", "");
    EXPECT_ABSENT(s, "y");
    EXPECT_ABSENT(s, "new");
    EXPECT_ABSENT(s, "garbled");
    EXPECT_ABSENT(s, "many000");
    EXPECT_STR(s, "r01", "val1");
    shard_close(s);
}

/* Durability without commit: the child dies without closing. */
static void test_crash(void)
{
    const char *log = path_of("crash", "redo.log");

    /* 1000 batches, all acknowledged, nothing committed. */
    int st = crash_child("crash", 0, 1000, 0, -1);
    CHECKF(st == 0, "child exit status %d", st);

    /* The log is a clean sequence of 1000 records, seq 1..1000, each payload
     * the batch as encoded. */
    size_t len = 0, good = 0;
    uint8_t *p = read_all(log, &len);
    static struct logrec recs[1100];
    int n = log_parse(p, len, recs, 1100, &good);
    CHECKF(n == 1000 && good == len, "%d records, %zu of %zu bytes", n, good, len);
    for (int i = 0; i < n && i < 1000; i += 37) {
        struct batch b = batch_number((unsigned)i, 0);
        CHECKF(recs[i].seq == (uint64_t)i + 1, "record %d: seq %llu", i,
               (unsigned long long)recs[i].seq);
        CHECKF(recs[i].len == b.len && memcmp(p + recs[i].off, b.buf, b.len) == 0,
               "record %d: payload differs from the batch", i);
        batch_free(&b);
    }
    free(p);

    struct shard *s = open_shard("crash", 60000, 0);
    if (!s)
        return;
    verify_model(s, 1000, 0, "after the crash");
    /* Recovery committed what it replayed. */
    CHECK(stat_of(s).pending == 0);
    shard_close(s);
    s = open_shard("crash", 60000, 0);
    if (!s)
        return;
    verify_model(s, 1000, 0, "reopened after recovery");
    shard_close(s);

    /* Failing batches mixed in, and a commit half way: 500 more batches, sync
     * after #1249, crash. */
    st = crash_child("crash2", 0, 1000, 1, -1);
    CHECKF(st == 0, "child exit status %d", st);
    s = open_shard("crash2", 60000, 0);
    if (s) {
        verify_model(s, 1000, 1, "crash with failed batches");
        shard_close(s);
    }
    st = crash_child("crash2", 1000, 1500, 1, 1249);
    CHECKF(st == 0, "child exit status %d", st);
    /* The log starts with the records since the sync, numbered on from the
     * batches before it (across commits and reopens); it may hold stale
     * records of earlier cycles after them. */
    p = read_all(path_of("crash2", "redo.log"), &len);
    n = log_parse(p, len, recs, 1100, &good);
    {
        uint8_t ok[1500];
        struct model m;
        int want = 0, first = 1, run = n > 0;
        run_model(1500, 1, &m, ok);
        for (int i = 0; i < 1250; i++)
            first += ok[i];
        for (int i = 1250; i < 1500; i++)
            want += ok[i];
        while (run < n && run < 1100 && recs[run].seq == recs[run - 1].seq + 1)
            run++;
        CHECKF(n > 0 && recs[0].seq == (uint64_t)first,
               "first record after the sync: seq %llu, want %d",
               n > 0 ? (unsigned long long)recs[0].seq : 0ull, first);
        CHECKF(run == want, "log after the sync: %d records in sequence, want %d", run, want);
    }
    free(p);
    s = open_shard("crash2", 60000, 0);
    if (s) {
        verify_model(s, 1500, 1, "crash after a mid-way sync");
        shard_close(s);
    }
}

/* SIGKILL at arbitrary moments while the flusher commits all the time: every
 * acknowledged batch survives. */
static void test_kill9(void)
{
    unsigned done = 0;

    for (int round = 0; round < 6; round++) {
        int fds[2];
        if (pipe(fds) != 0) {
            perror("pipe");
            exit(2);
        }
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid == 0) {
            close(fds[0]);
            struct shard *s = child_open("kill9", 5, 16384);
            apply_range(s, done, done + 1000000, 0, -1, fds[1]);
            _exit(11);
        }
        close(fds[1]);
        /* Let it run to a point that differs per round, then kill it. */
        unsigned acked = 0, got, target = 300 + (unsigned)round * 600;
        int have = 0;
        while (read(fds[0], &got, sizeof(got)) == sizeof(got)) {
            acked = got + 1;
            have = 1;
            if (acked >= done + target)
                break;
        }
        kill(pid, SIGKILL);
        int st = 0;
        waitpid(pid, &st, 0);
        close(fds[0]);
        CHECKF(have && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "round %d: child status 0x%x",
               round, st);
        if (!have)
            return;

        struct shard *s = open_shard("kill9", 0, 0);
        if (!s)
            return;
        /* The child may have applied a few more than it acknowledged. */
        unsigned n = acked;
        for (;;) {
            char key[16];
            size_t kl = (size_t)snprintf(key, sizeof(key), "s%06u", n);
            uint8_t v[16];
            if (shard_get(s, key, kl, 0, v, sizeof(v), NULL) < 0)
                break;
            n++;
        }
        verify_model(s, n, 0, "after kill -9");
        printf("  kill -9 round %d: %u batches acknowledged, %u found\n", round, acked, n);
        shard_close(s);
        done = n;
    }
}

/* Append tail bytes to the log of a crashed shard; reopen. */
enum tail_kind {
    TAIL_RANDOM,
    TAIL_HEADER_ONLY,
    TAIL_TRUNCATED,
    TAIL_BAD_CHECK,
    TAIL_BAD_MAGIC,
    TAIL_GAP,
    TAIL_BAD_PAYLOAD,
    TAIL_HUGE_LEN,
    TAIL_ZEROS,
    TAIL_GOOD_THEN_GARBAGE,
    TAIL_DUPLICATE,
    TAIL_KINDS
};
static const char *const tail_names[] = {
    "random bytes",
    "header only",
    "truncated record",
    "bad checksum",
    "bad magic",
    "sequence gap",
    "invalid payload",
    "huge length",
    "zeros",
    "good record then garbage",
    "duplicate of the last record",
};

static void test_torn_tail(void)
{
    const unsigned N = 150, M = 60;

    for (int kind = 0; kind < TAIL_KINDS; kind++) {
        char name[32];
        snprintf(name, sizeof(name), "torn-%d", kind);
        const char *log = path_of(name, "redo.log");
        int st = crash_child(name, 0, N, 0, -1);
        CHECKF(st == 0, "%s: child exit status %d", tail_names[kind], st);

        /* Without failing batches, batch i is record seq i + 1. */
        struct batch next = batch_number(N, 0);
        uint8_t *rec = xmalloc(LOG_HDR + next.len + 64);
        uint8_t tail[8192];
        size_t tl = 0;
        unsigned expect_n = N;
        memset(tail, 0, sizeof(tail));
        switch (kind) {
        case TAIL_RANDOM:
            for (tl = 0; tl < 7; tl++)
                tail[tl] = (uint8_t)mix64(tl);
            break;
        case TAIL_HEADER_ONLY:
            tl = log_record(rec, LOG_MAGIC, N + 1, next.buf, (uint32_t)next.len, 0);
            memcpy(tail, rec, LOG_HDR);
            tl = LOG_HDR;
            break;
        case TAIL_TRUNCATED:
            tl = log_record(tail, LOG_MAGIC, N + 1, next.buf, (uint32_t)next.len, 0) - 3;
            break;
        case TAIL_BAD_CHECK:
            tl = log_record(tail, LOG_MAGIC, N + 1, next.buf, (uint32_t)next.len, 1);
            break;
        case TAIL_BAD_MAGIC:
            tl = log_record(tail, LOG_MAGIC ^ 0x100, N + 1, next.buf, (uint32_t)next.len, 0);
            break;
        case TAIL_GAP:
            tl = log_record(tail, LOG_MAGIC, N + 2, next.buf, (uint32_t)next.len, 0);
            break;
        case TAIL_BAD_PAYLOAD: {
            /* A correct checksum over a payload that is no batch. */
            uint8_t *junk = xmalloc(next.len);
            memcpy(junk, next.buf, next.len);
            junk[0] = 0x33; /* no such op */
            tl = log_record(tail, LOG_MAGIC, N + 1, junk, (uint32_t)next.len, 0);
            free(junk);
            break;
        }
        case TAIL_HUGE_LEN:
            tl = log_record(tail, LOG_MAGIC, N + 1, next.buf, (uint32_t)next.len, 0);
            put_le(tail + 4, 0xfffffff0u, 4);
            break;
        case TAIL_ZEROS:
            tl = 4096;
            break;
        case TAIL_GOOD_THEN_GARBAGE:
            tl = log_record(tail, LOG_MAGIC, N + 1, next.buf, (uint32_t)next.len, 0);
            for (int j = 0; j < 100; j++)
                tail[tl++] = (uint8_t)mix64((uint64_t)j + 99);
            expect_n = N + 1; /* the good record is replayed */
            break;
        case TAIL_DUPLICATE: {
            /* The last record once more: seq N, already replayed. */
            struct batch last = batch_number(N - 1, 0);
            tl = log_record(tail, LOG_MAGIC, N, last.buf, (uint32_t)last.len, 0);
            batch_free(&last);
            break;
        }
        }
        free(rec);
        batch_free(&next);
        CHECK(write_all(log, tail, tl, 1) == 0);

        struct shard *s = open_shard(name, 60000, 0);
        if (!s)
            continue;
        verify_model(s, expect_n, 0, tail_names[kind]);
        CHECK(stat_of(s).pending == 0);
        shard_close(s);

        /* The shard goes on: more batches, another crash, all there. */
        st = crash_child(name, expect_n, expect_n + M, 0, -1);
        CHECKF(st == 0, "%s: second child exit status %d", tail_names[kind], st);
        s = open_shard(name, 60000, 0);
        if (!s)
            continue;
        verify_model(s, expect_n + M, 0, tail_names[kind]);
        shard_close(s);
    }

    /* Garbage after the (stale) records of a cleanly closed shard: ignored,
     * and new records written after the reopen are found. */
    static const uint8_t junk[] = "this is not a log record at all, not even close";
    CHECK(crash_child("torn-clean", 0, 40, 0, -1) == 0);
    struct shard *s = open_shard("torn-clean", 60000, 0);
    if (!s)
        return;
    shard_close(s);
    CHECK(write_all(path_of("torn-clean", "redo.log"), junk, sizeof(junk), 1) == 0);
    s = open_shard("torn-clean", 60000, 0);
    if (!s)
        return;
    verify_model(s, 40, 0, "garbage after a clean close");
    shard_close(s);
    CHECK(crash_child("torn-clean", 40, 80, 0, -1) == 0);
    s = open_shard("torn-clean", 60000, 0);
    if (!s)
        return;
    verify_model(s, 80, 0, "garbage after a clean close, then more");
    shard_close(s);
}

/* Records the committed state already contains stay in the log (it is rewound,
 * not truncated, after a commit, and a crash may leave anything behind): they
 * are never replayed again; the record after them is. */
static void test_stale_log(void)
{
    const char *log = path_of("stale", "redo.log");
    struct shard *s = open_shard("stale", 60000, 0);
    size_t oldlen = 0;
    uint8_t *old;

    if (!s)
        return;
    CHECK_RC(put_str(s, "k", "v1"), 0);   /* seq 1 */
    CHECK_RC(put_str(s, "k2", "a"), 0);   /* seq 2 */
    CHECK_RC(put_str(s, "gone", "g"), 0); /* seq 3 */
    old = read_all(log, &oldlen);
    CHECK(old && oldlen > 0);
    {
        struct logrec recs[4];
        CHECK(log_parse(old, oldlen, recs, 4, NULL) == 3);
        CHECK(recs[0].seq == 1 && recs[2].seq == 3);
    }
    CHECK_RC(put_str(s, "k", "v4"), 0); /* seq 4 */
    struct batch b;
    batch_init(&b);
    batch_del(&b, "gone", 4); /* seq 5 */
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
    CHECK(stat_of(s).pending == 5);
    CHECK_RC(shard_sync(s), 0);
    CHECK(stat_of(s).pending == 0);
    shard_close(s);

    /* Whatever the log file still holds is stale now. */
    s = open_shard("stale", 60000, 0);
    if (!s)
        return;
    EXPECT_STR(s, "k", "v4");
    EXPECT_STR(s, "k2", "a");
    EXPECT_ABSENT(s, "gone");
    CHECK(stat_of(s).pending == 0);
    shard_close(s);

    /* The old records (seq 1..3) put back: not replayed. */
    CHECK(write_all(log, old, oldlen, 0) == 0);
    s = open_shard("stale", 60000, 0);
    if (!s)
        return;
    EXPECT_STR(s, "k", "v4");
    EXPECT_STR(s, "k2", "a");
    EXPECT_ABSENT(s, "gone");
    CHECK(stat_of(s).pending == 0);
    shard_close(s);

    /* Stale records followed by the next one (seq 6): that one is replayed. */
    struct batch nb;
    batch_init(&nb);
    batch_put(&nb, "k", 1, "v6", 2);
    batch_put(&nb, "k6", 2, "six", 3);
    uint8_t *buf = xmalloc(oldlen + LOG_HDR + nb.len);
    memcpy(buf, old, oldlen);
    size_t bl = oldlen + log_record(buf + oldlen, LOG_MAGIC, 6, nb.buf, (uint32_t)nb.len, 0);
    CHECK(write_all(log, buf, bl, 0) == 0);
    s = open_shard("stale", 60000, 0);
    if (!s)
        return;
    EXPECT_STR(s, "k", "v6");
    EXPECT_STR(s, "k6", "six");
    EXPECT_ABSENT(s, "gone");
    CHECK(stat_of(s).pending == 0); /* replayed and committed */
    shard_close(s);
    s = open_shard("stale", 60000, 0); /* ... and not replayed again */
    if (!s)
        return;
    EXPECT_STR(s, "k", "v6");
    shard_close(s);
    batch_free(&nb);
    free(buf);

    /* A crash with the old records in the file: the child's own records come
     * first (the append position is after the last replayed record), stale
     * ones after them. */
    CHECK(write_all(log, old, oldlen, 0) == 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        struct shard *cs = child_open("stale", 60000, 0);
        if (put_str(cs, "k", "child") != 0 || put_str(cs, "k9", "nine") != 0)
            _exit(11);
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status 0x%x", st);
    s = open_shard("stale", 60000, 0);
    if (s) {
        EXPECT_STR(s, "k", "child");
        EXPECT_STR(s, "k9", "nine");
        EXPECT_STR(s, "k2", "a");
        EXPECT_ABSENT(s, "gone");
        shard_close(s);
    }
    free(old);
}

/* A record beyond a gap (seq committed + 2, as left behind by a crash that
 * lost part of the log) is not replayed at open -- and must not be replayed
 * later either, once the sequence numbers catch up with it. */
static void test_gap_record(void)
{
    const char *log = path_of("gap", "redo.log");
    struct shard *s = open_shard("gap", 60000, 0);
    struct batch b;
    uint8_t rec[128];

    if (!s)
        return;
    CHECK_RC(put_str(s, "k", "a"), 0); /* seq 1 */
    shard_close(s);                    /* committed: 1 */

    /* The log holds [seq 1 (stale)]; add a record seq 3 behind it. */
    batch_init(&b);
    batch_put(&b, "k", 1, "LOST", 4);
    size_t rl = log_record(rec, LOG_MAGIC, 3, b.buf, (uint32_t)b.len, 0);
    batch_free(&b);
    CHECK(write_all(log, rec, rl, 1) == 0);

    s = open_shard("gap", 60000, 0);
    if (!s)
        return;
    EXPECT_STR(s, "k", "a");           /* seq 3 is not a continuation of 1 */
    CHECK_RC(put_str(s, "k", "b"), 0); /* seq 2 */
    EXPECT_STR(s, "k", "b");
    shard_close(s); /* committed: 2 */

    s = open_shard("gap", 60000, 0);
    if (!s)
        return;
    size_t vlen = 0;
    char got[16] = "";
    int rc = shard_get(s, "k", 1, 0, got, sizeof(got) - 1, &vlen);
    CHECKF(rc == 1 && got[0] == 'b',
              "k is \"%.*s\" (rc %d), want \"b\": the record beyond "
              "the gap was replayed",
              rc > 0 ? rc : 0, got, rc);
    shard_close(s);
}

static void fill_value(uint8_t *v, size_t len, unsigned i)
{
    uint64_t x = mix64(i);
    for (size_t j = 0; j + 8 <= len; j += 8) {
        memcpy(v + j, &x, 8);
        x += 0x9e3779b97f4a7c15ull;
    }
}

/* A set of large values: value i is len bytes of fill_value(seed + i) under
 * the key "<tag><i>" (i in width digits). A failed put or a wrong value counts
 * in bad; the first `shown` of them also fail a check at the caller's line,
 * the rest only count (the tests end with CHECK(vs.bad == 0)). */
struct valset {
    char tag;
    int width;
    unsigned seed;
    size_t len;
    int shown;
    int bad;
    uint8_t *want, *got; /* scratch buffers of len bytes */
};

static struct valset valset_new(char tag, int width, unsigned seed, size_t len, int shown)
{
    return (struct valset){tag, width, seed, len, shown, 0, xmalloc(len), xmalloc(len)};
}

static void valset_free(struct valset *vs)
{
    free(vs->want);
    free(vs->got);
}

static const char *valset_key(const struct valset *vs, unsigned i, char key[16])
{
    snprintf(key, 16, "%c%0*u", vs->tag, vs->width, i);
    return key;
}

static void valset_put(struct valset *vs, struct shard *s, unsigned i, const char *file, int line)
{
    char key[16];
    valset_key(vs, i, key);
    fill_value(vs->want, vs->len, vs->seed + i);
    int rc = put_kv(s, key, strlen(key), vs->want, vs->len);
    if (rc != 0 && vs->bad++ < vs->shown)
        check(0, file, line, "0", "put %u: %d (%s)", i, rc, strerror(-rc));
}

/* Check values 0, step, 2 * step, ... below n; what ends the message. */
static void valset_check(struct valset *vs, struct shard *s, unsigned n, unsigned step,
                         const char *what, const char *file, int line)
{
    char key[16];
    for (unsigned i = 0; i < n; i += step) {
        size_t vlen = 0;
        valset_key(vs, i, key);
        fill_value(vs->want, vs->len, vs->seed + i);
        int rc = shard_get(s, key, strlen(key), 0, vs->got, vs->len, &vlen);
        int ok = rc == (int)vs->len && vlen == vs->len && memcmp(vs->want, vs->got, vs->len) == 0;
        if (!ok && vs->bad++ < vs->shown)
            check(0, file, line, "0", "value %u differs%s", i, what);
    }
}
#define VALSET_PUT(vs, s, i) valset_put((vs), (s), (i), __FILE__, __LINE__)
#define VALSET_CHECK(vs, s, n, step, what)                                                         \
    valset_check((vs), (s), (n), (step), (what), __FILE__, __LINE__)

static void test_large_values(void)
{
    enum { N = 2000, VLEN = 64 * 1024 };
    struct valset vs = valset_new('V', 5, 0, VLEN, 1);
    struct shard *s = open_shard("large", 60000, 0); /* only the size threshold commits */
    const char *log = path_of("large", "redo.log");
    double t0 = now_s();

    if (!s)
        goto out;
    long maxlog = 0;
    for (unsigned i = 0; i < N; i++) {
        VALSET_PUT(&vs, s, i);
        long ls = file_size(log);
        maxlog = ls > maxlog ? ls : maxlog;
    }
    struct shard_stat st = stat_of(s);
    /* 2000 x 64 KiB = 125 MiB: committed every 32 MiB (the default
     * commit_bytes) along the way. */
    CHECKF(st.pending > 0 && st.pending <= (32u << 20) / VLEN + 1, "pending %llu",
           (unsigned long long)st.pending);
    CHECKF(maxlog <= (32l << 20) + 2 * (VLEN + 64), "log grew to %ld bytes", maxlog);
    VALSET_CHECK(&vs, s, N, 1, "");
    /* Partial reads across the value. */
    uint8_t *v = vs.want, *got = vs.got;
    fill_value(v, VLEN, 1234);
    for (size_t off = 0; off < VLEN + 10; off += 4093) {
        size_t vlen = 0;
        int rc = shard_get(s, "V01234", 6, off, got, 5000, &vlen);
        size_t want = off >= VLEN ? 0 : VLEN - off < 5000 ? VLEN - off : 5000;
        CHECKF(rc == (int)want && vlen == VLEN && memcmp(got, v + off, want) == 0,
               "read at %zu: rc %d", off, rc);
    }
    CHECK_RC(shard_sync(s), 0);
    st = stat_of(s);
    CHECK(st.pending == 0);
    CHECKF(st.bytes >= (uint64_t)N * VLEN, "stat bytes %llu", (unsigned long long)st.bytes);
    shard_close(s);
    s = open_shard("large", 60000, 0);
    if (!s)
        goto out;
    VALSET_CHECK(&vs, s, N, 7, " after reopen");
    shard_close(s);
    CHECK(vs.bad == 0);
    printf("  large values: %.1f s\n", now_s() - t0);
out:
    valset_free(&vs);
}

static void test_growth(void)
{
    enum { N = 200, VLEN = 1 << 20 };
    struct valset vs = valset_new('G', 4, 100000, VLEN, 1);
    struct shard *s = open_shard("grow", 0, 0);
    double t0 = now_s();

    if (!s)
        goto out;
    uint64_t bytes0 = stat_of(s).bytes;
    CHECK(bytes0 < (1u << 20));
    for (unsigned i = 0; i < N; i++)
        VALSET_PUT(&vs, s, i);
    struct shard_stat st = stat_of(s);
    CHECK(st.records >= N);
    VALSET_CHECK(&vs, s, N, 1, "");
    CHECK_RC(shard_sync(s), 0);
    /* stat's bytes count the committed state. */
    st = stat_of(s);
    CHECKF(st.bytes >= (uint64_t)N * VLEN && st.bytes > bytes0, "stat bytes %llu after %d MiB",
           (unsigned long long)st.bytes, N);
    CHECK(file_size(path_of("grow", "data.mdb")) >= (long)N * VLEN);
    shard_close(s);
    s = open_shard("grow", 0, 0);
    if (!s)
        goto out;
    CHECK(stat_of(s).bytes >= (uint64_t)N * VLEN);
    VALSET_CHECK(&vs, s, N, 13, " after reopen");
    /* Deleting frees records. */
    struct batch b;
    batch_init(&b);
    batch_add(&b, BATCH_DEL_RANGE, "G", 1, "H", 1);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
    EXPECT_ABSENT(s, "G0000");
    shard_close(s);
    CHECK(vs.bad == 0);
    printf("  200 MiB: %.1f s\n", now_s() - t0);
out:
    valset_free(&vs);
}

/* More than the initial 1 GiB map inside one transaction: apply must hit
 * MDB_MAP_FULL, commit, grow the map and retry, transparently. Slow and
 * disk-hungry (about 2.5 GB), so only with SHARDFS_SLOW_TESTS=1. */
static void test_map_full(void)
{
    enum { N = 1300, VLEN = 1 << 20 };
    const char *slow = getenv("SHARDFS_SLOW_TESTS");
    if (!slow || strcmp(slow, "1") != 0)
        return;

    struct valset vs = valset_new('F', 4, 200000, VLEN, 3);
    struct shard *s = open_shard("mapfull", 60000, (size_t)8 << 30);
    double t0 = now_s();

    if (!s)
        goto out;
    for (unsigned i = 0; i < N; i++)
        VALSET_PUT(&vs, s, i);
    VALSET_CHECK(&vs, s, N, 1, "");
    shard_close(s);
    s = open_shard("mapfull", 60000, 0);
    if (!s)
        goto out;
    VALSET_CHECK(&vs, s, N, 11, " after reopen");
    shard_close(s);
    CHECK(vs.bad == 0);
    printf("  map growth past 1 GiB: %.1f s\n", now_s() - t0);
out:
    valset_free(&vs);
}

static void test_sync_and_flush(void)
{
    struct shard *s = open_shard("sync", 60000, 0);
    const char *log = path_of("sync", "redo.log");
    char k[16];

    if (!s)
        return;
    struct shard_stat st = stat_of(s);
    CHECK(st.pending == 0 && st.records == 0);
    for (int i = 0; i < 10; i++) {
        snprintf(k, sizeof(k), "p%d", i);
        CHECK_RC(put_str(s, k, "x"), 0);
    }
    st = stat_of(s);
    CHECK(st.pending == 10);
    CHECK(st.records == 10);
    CHECK(file_size(log) >= 10 * (24 + 1 + 4 + 2 + 4 + 1));
    /* Not due yet: flush without force does nothing. */
    CHECK_RC(shard_lmdb_flush(s, 0), 0);
    CHECK(stat_of(s).pending == 10);
    CHECK_RC(shard_sync(s), 0);
    st = stat_of(s);
    CHECK(st.pending == 0);
    CHECK(st.records >= 10); /* plus the shard's own metadata */
    uint64_t records = st.records;
    CHECK_RC(shard_sync(s), 0); /* nothing to do */
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK(stat_of(s).pending == 0);
    /* Forced flush commits. */
    for (int i = 0; i < 3; i++) {
        snprintf(k, sizeof(k), "q%d", i);
        CHECK_RC(put_str(s, k, "y"), 0);
    }
    CHECK(stat_of(s).pending == 3);
    CHECK(stat_of(s).records == records + 3);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK(stat_of(s).pending == 0);
    /* Deletes count down. */
    struct batch b;
    batch_init(&b);
    batch_add(&b, BATCH_DEL_RANGE, "q", 1, "r", 1);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
    CHECK(stat_of(s).records == records);
    shard_close(s);

    /* The flusher thread commits on its own after the interval. */
    s = open_shard("flusher", 50, 0);
    if (!s)
        return;
    for (int i = 0; i < 5; i++) {
        snprintf(k, sizeof(k), "f%d", i);
        CHECK_RC(put_str(s, k, "z"), 0);
    }
    double t0 = now_s();
    while (stat_of(s).pending != 0 && now_s() - t0 < 5)
        usleep(10000);
    CHECKF(stat_of(s).pending == 0, "flusher did not commit within %.1f s", now_s() - t0);
    EXPECT_STR(s, "f4", "z");
    shard_close(s);
}

struct thread_arg {
    struct shard *s;
    int t;
    int errors;
};

static void *worker(void *p)
{
    struct thread_arg *a = p;
    struct batch b;
    char key[32], val[32], got[32];

    batch_init(&b);
    for (int i = 0; i < 2000; i++) {
        size_t kl = (size_t)snprintf(key, sizeof(key), "t%d-%05d", a->t, i);
        size_t vl = (size_t)snprintf(val, sizeof(val), "value-%d-%d", a->t, i);
        batch_reset(&b);
        batch_add(&b, BATCH_ASSERT_ABSENT, key, kl, NULL, 0);
        batch_put(&b, key, kl, val, vl);
        if (i % 3 == 0) {
            char extra[32];
            size_t el = (size_t)snprintf(extra, sizeof(extra), "t%d-tmp", a->t);
            batch_put(&b, extra, el, val, vl);
        }
        if (shard_apply(a->s, &b) != 0)
            a->errors++;
        size_t vlen = 0;
        int rc = shard_get(a->s, key, kl, 0, got, sizeof(got), &vlen);
        if (rc != (int)vl || vlen != vl || memcmp(got, val, vl) != 0)
            a->errors++;
        if (i % 250 == 0) {
            char start[8], end[8];
            snprintf(start, sizeof(start), "t%d-", a->t);
            snprintf(end, sizeof(end), "t%d-t", a->t);
            struct collect c = {0};
            if (shard_scan(a->s, start, strlen(start), end, strlen(end), collect_fn, &c) != 0 ||
                c.n != i + 1)
                a->errors++;
        }
        if (a->t == 0 && i % 500 == 499 && shard_sync(a->s) != 0)
            a->errors++;
        if (a->t == 1 && i % 100 == 0) {
            struct shard_stat st;
            if (shard_stat(a->s, &st) != 0)
                a->errors++;
        }
    }
    batch_free(&b);
    return NULL;
}

static void verify_threads(struct shard *s, const char *what)
{
    char key[32], val[32], got[32];
    int bad = 0;
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 2000; i++) {
            size_t kl = (size_t)snprintf(key, sizeof(key), "t%d-%05d", t, i);
            size_t vl = (size_t)snprintf(val, sizeof(val), "value-%d-%d", t, i);
            size_t vlen = 0;
            int rc = shard_get(s, key, kl, 0, got, sizeof(got), &vlen);
            if (rc != (int)vl || memcmp(got, val, vl) != 0)
                bad++;
        }
    CHECKF(bad == 0, "%s: %d keys wrong", what, bad);
}

static void test_threads(void)
{
    struct shard *s = open_shard("threads", 0, 0); /* the default 200 ms flusher runs too */
    pthread_t th[4];
    struct thread_arg args[4];

    if (!s)
        return;
    for (int t = 0; t < 4; t++) {
        args[t] = (struct thread_arg){s, t, 0};
        CHECK(pthread_create(&th[t], NULL, worker, &args[t]) == 0);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        CHECKF(args[t].errors == 0, "thread %d: %d errors", t, args[t].errors);
    }
    verify_threads(s, "after the threads");
    shard_close(s);
    s = open_shard("threads", 0, 0);
    if (!s)
        return;
    verify_threads(s, "after reopen");
    shard_close(s);
}

/* A scan that holds the shard's lock while `hold` is set. */
static volatile int hold, holding;

static int hold_lock(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    (void)ctx, (void)k, (void)kl, (void)v, (void)vl;
    holding = 1;
    while (hold)
        usleep(1000);
    return 1;
}

static void *scan_holding(void *arg)
{
    shard_scan(arg, NULL, 0, NULL, 0, hold_lock, NULL);
    return NULL;
}

/* No-waiting mode (shard.h): what may be done is done, the rest refused
 * with nothing changed. */
static void test_nowait(void)
{
    struct shard *s = open_shard("nowait", 60000, 4096);
    uint8_t big[5000], buf[16];
    struct shard_stat st;
    struct batch b;
    pthread_t th;
    size_t vlen = 0;

    if (!s)
        return;
    memset(big, 'b', sizeof(big));
    shard_nowait_begin();
    CHECK_RC(put_str(s, "small", "v"), 0); /* no commit due: done */
    CHECK_RC(shard_get(s, "small", 5, 0, buf, sizeof(buf), &vlen), 1);
    CHECK_RC(shard_stat(s, &st), 0);
    CHECK_RC(shard_nowait_end(), 0);
    CHECK(st.pending == 1);
    /* A batch that would make the shard commit is left to a thread that may. */
    shard_nowait_begin();
    CHECK_RC(put_kv(s, "big", 3, big, sizeof(big)), -EWOULDBLOCK);
    CHECK_RC(shard_sync(s), -EWOULDBLOCK);
    CHECK_RC(shard_nowait_end(), 1);
    CHECK_RC(shard_get(s, "big", 3, 0, buf, sizeof(buf), &vlen), -ENOENT);
    CHECK(stat_of(s).pending == 1);
    CHECK_RC(put_kv(s, "big", 3, big, sizeof(big)), 0);
    CHECK(stat_of(s).pending == 0); /* it committed */
    /* The lock held by another thread: refused, not waited for. */
    hold = 1;
    holding = 0;
    CHECK(pthread_create(&th, NULL, scan_holding, s) == 0);
    while (!holding)
        usleep(1000);
    shard_nowait_begin();
    CHECK_RC(shard_get(s, "small", 5, 0, buf, sizeof(buf), &vlen), -EWOULDBLOCK);
    batch_init(&b);
    batch_put(&b, "x", 1, "y", 1);
    CHECK_RC(shard_apply(s, &b), -EWOULDBLOCK);
    CHECK_RC(shard_nowait_end(), 1);
    hold = 0;
    pthread_join(th, NULL);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
    CHECK_RC(shard_get(s, "x", 1, 0, buf, sizeof(buf), &vlen), 1);
    shard_close(s);
}

static void cleanup(void)
{
    rm_rf(tmpdir);
}

int main(void)
{
    static const struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"open errors", test_open_errors},
        {"get", test_get},
        {"get_many", test_get_many},
        {"scan with a join", test_scan_join},
        {"scan", test_scan},
        {"del_range across pages", test_del_range_pages},
        {"atomicity", test_atomicity},
        {"crash without commit", test_crash},
        {"kill -9", test_kill9},
        {"torn log tail", test_torn_tail},
        {"stale log", test_stale_log},
        {"record beyond a gap", test_gap_record},
        {"sync and flush", test_sync_and_flush},
        {"threads", test_threads},
        {"no-waiting mode", test_nowait},
        {"large values", test_large_values},
        {"200 MiB", test_growth},
        {"map full (SHARDFS_SLOW_TESTS=1)", test_map_full},
    };

    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        int before = failures;
        double t0 = now_s();
        tests[i].fn();
        printf("%s: %s (%.2f s)\n", tests[i].name, failures == before ? "ok" : "FAILED",
               now_s() - t0);
        fflush(stdout);
    }
    cleanup();
    return check_summary("shard_lmdb");
}
