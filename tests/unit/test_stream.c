/* test_stream.c -- unit tests for the change stream: backend/stream.c and
 * the stream half of backend/shard_lmdb.c (issue 10).
 *
 *  - entry encoding: round trip of several concatenated entries; every
 *    truncation, a length over BATCH_MAX, a batch that is not a batch give
 *    -EINVAL; decoding never reads past len (the buffer ends at a PROT_NONE
 *    page, so an over-read is a SIGSEGV, with or without ASan);
 *  - the checksum: a pinned value (every node and version must agree), and
 *    each input (prev, epoch, lsn, a batch byte) changes it;
 *  - apply_pos: positions, lsns increasing, the check chained as
 *    stream_check_next() says, the epoch (default, set_epoch); on_apply;
 *  - apply_at: a replica fed from a primary's stream_read ends with the same
 *    position and the same records; a wrong check, an old lsn: -ESTALE and
 *    nothing changed; asserts not checked; gaps allowed;
 *  - stream_read: none newer (0), from the base, max_bytes (at least one
 *    entry), fn stopping with 1 or an error, -ESTALE (unknown lsn, wrong
 *    check, ahead of the shard), -ERANGE (trimmed);
 *  - retention: by size and by age at commits, never after a hold; a
 *    released hold lets the trim go on;
 *  - local keys: batches cannot write the stream or the shard's own
 *    records; a range delete over every key keeps them; scans hide them;
 *  - snapshot: begin empties and marks (-EAGAIN / -EBUSY while marked, also
 *    after a reopen and after kill -9), load skips local keys, done sets the
 *    position, then apply_at catches up to an identical copy;
 *  - durability: reopen and kill -9 keep the position and the entries;
 *    lsns after a reopen or a kill -9 are above every lsn handed out before
 *    (a gap, never a reuse); a redo log record of the version before the
 *    stream is replayed at the next lsn;
 *  - the content checksum: equal for two copies of one history that retain
 *    different streams; a value changed, a record added or removed behind a
 *    copy's back changes it; -EAGAIN when a batch lands during the pass.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <lmdb.h>
#include <xxhash.h>

#include "batch.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "stream.h"
#include "check.h"
#include "test_util.h"

static char tmpdir[] = "/tmp/shardfs-test-stream-XXXXXX";

static const char *path_of(const char *name)
{
    static char buf[4][4300];
    static int turn;
    char *p = buf[turn++ % 4];
    snprintf(p, 4300, "%s/%s", tmpdir, name);
    return p;
}

static struct shard *open_opts(const char *name, const struct shard_lmdb_options *opt)
{
    struct shard *s = NULL;
    char err[1024] = "";
    int rc = shard_lmdb_open(path_of(name), 3, opt, &s, err, sizeof(err));

    CHECKF(rc == 0 && s, "open %s: %d %s", name, rc, err);
    return rc == 0 ? s : NULL;
}

static struct shard *open_shard(const char *name)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 3600 * 1000};
    return open_opts(name, &opt);
}

/* Batch i: a put of "kNNNN" (i % 50) with a value naming i, sometimes a delete. */
static void make_batch(struct batch *b, unsigned i)
{
    char k[16], v[64];

    batch_reset(b);
    snprintf(k, sizeof(k), "k%04u", i % 50);
    snprintf(v, sizeof(v), "value of batch %u", i);
    batch_put(b, k, strlen(k), v, strlen(v));
    if (i % 7 == 0) {
        snprintf(k, sizeof(k), "k%04u", (i * 3) % 50);
        batch_del(b, k, strlen(k));
    }
}

static int put1(struct shard *s, unsigned i, struct stream_pos *p)
{
    struct batch b;
    int rc;

    batch_init(&b);
    make_batch(&b, i);
    rc = shard_lmdb_apply_pos(s, &b, p);
    batch_free(&b);
    return rc;
}

/* ---- a dump of the data records, for "the same shard" ---- */

struct dump {
    char *buf;
    size_t len, cap;
};

static int dump_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct dump *d = ctx;
    size_t need = d->len + kl + vl + 32;
    if (need > d->cap) {
        d->cap = need * 2;
        d->buf = xrealloc(d->buf, d->cap);
    }
    d->len += (size_t)snprintf(d->buf + d->len, 32, "%zu:", kl);
    memcpy(d->buf + d->len, k, kl);
    d->len += kl;
    d->len += (size_t)snprintf(d->buf + d->len, 32, "=%zu:", vl);
    memcpy(d->buf + d->len, v, vl);
    d->len += vl;
    return 0;
}

static struct dump dump_of(struct shard *s)
{
    struct dump d = {0};
    CHECK_RC(shard_scan(s, NULL, 0, NULL, 0, dump_fn, &d), 0);
    return d;
}

static int dump_eq(const struct dump *a, const struct dump *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->buf, b->buf, a->len) == 0);
}

/* rep is an exact copy of pri: the same position and the same records. */
static void check_copy(struct shard *pri, struct shard *rep, int line)
{
    struct stream_pos a, b;
    int ra = shard_lmdb_position(pri, &a), rb = shard_lmdb_position(rep, &b);

    check(ra == 0 && rb == 0 && stream_pos_eq(&a, &b), __FILE__, line, "same position",
          "rc %d/%d, lsn %llu/%llu", ra, rb, (unsigned long long)a.lsn, (unsigned long long)b.lsn);
    struct dump da = dump_of(pri), db = dump_of(rep);
    check(da.len > 0 && dump_eq(&da, &db), __FILE__, line, "same records", NULL);
    free(da.buf);
    free(db.buf);
}

/* ---- collecting a stream ---- */

#define MAXE 4096
struct got {
    int n;
    struct stream_pos p[MAXE];
    uint64_t t[MAXE];
    uint8_t *batch[MAXE];
    size_t len[MAXE];
    size_t bytes;
    int stop_at;        /* return 1 at this entry (1-based), 0: never */
    int fail_at;        /* return -EIO at this entry */
};

static int got_fn(void *ctx, const struct stream_pos *p, uint64_t time_ms, const uint8_t *batch,
                  size_t len)
{
    struct got *g = ctx;
    if (g->n >= MAXE)
        return -ENOBUFS;
    if (g->fail_at && g->n + 1 == g->fail_at)
        return -EIO;
    g->p[g->n] = *p;
    g->t[g->n] = time_ms;
    g->batch[g->n] = xmemdup(batch, len);
    g->len[g->n] = len;
    g->bytes += len;
    g->n++;
    return g->stop_at && g->n == g->stop_at ? 1 : 0;
}

static void got_free(struct got *g)
{
    for (int i = 0; i < g->n; i++)
        free(g->batch[i]);
    g->n = 0;
    g->bytes = 0;
}

/* Read everything after `after`, in max_bytes pieces. Returns the last rc
 * (0 at the end) and fills g. */
static int read_all(struct shard *s, const struct stream_pos *after, size_t max_bytes,
                    struct got *g)
{
    struct stream_pos at = *after;
    int rc;

    while ((rc = shard_lmdb_stream_read(s, &at, max_bytes, got_fn, g)) > 0)
        at = g->p[g->n - 1];
    return rc;
}

static const struct stream_pos zero_pos;

/* ---- encoding ---- */

/* A buffer of n bytes that ends right at a PROT_NONE page. */
static uint8_t *guarded(const uint8_t *src, size_t n, void **map, size_t *maplen)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = (n + (size_t)page - 1) / (size_t)page + 1;
    uint8_t *m = mmap(NULL, pages * (size_t)page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    mprotect(m + (pages - 1) * (size_t)page, (size_t)page, PROT_NONE);
    uint8_t *p = m + (pages - 1) * (size_t)page - n;
    if (n)
        memcpy(p, src, n);
    *map = m;
    *maplen = pages * (size_t)page;
    return p;
}

static int walk(const uint8_t *buf, size_t len, int *count)
{
    struct stream_pos p;
    uint64_t t;
    const uint8_t *b;
    size_t bl, pos = 0;
    int rc;

    *count = 0;
    while ((rc = stream_entry_next(buf, len, &pos, &p, &t, &b, &bl)) == 1)
        (*count)++;
    return rc;
}

static void test_encoding(void)
{
    struct batch b[3];
    uint8_t buf[4096];
    size_t len = 0;
    struct stream_pos ps[3] = {{1, 5, 0x1111}, {1, 9, 0x2222}, {UINT64_MAX, UINT64_MAX - 1, 7}};
    uint64_t times[3] = {0, 1733480000123ull, UINT64_MAX};

    for (int i = 0; i < 3; i++) {
        batch_init(&b[i]);
        make_batch(&b[i], (unsigned)i * 7);
    }
    batch_reset(&b[2]); /* an empty batch is a valid entry too */
    for (int i = 0; i < 3; i++) {
        size_t n = stream_entry_encode(buf + len, &ps[i], times[i], b[i].buf, b[i].len);
        CHECK(n == STREAM_ENTRY_HDR + b[i].len);
        len += n;
    }
    /* The documented layout, byte by byte for the first entry. */
    CHECK(buf[0] == 1 && buf[8] == 5 && buf[16] == 0x11 && buf[17] == 0x11);
    CHECK(buf[32] == (uint8_t)b[0].len && buf[33] == (uint8_t)(b[0].len >> 8));
    CHECK(memcmp(buf + STREAM_ENTRY_HDR, b[0].buf, b[0].len) == 0);

    void *map;
    size_t maplen;
    uint8_t *g = guarded(buf, len, &map, &maplen);
    {
        struct stream_pos p;
        uint64_t t;
        const uint8_t *bb;
        size_t bl, pos = 0;
        for (int i = 0; i < 3; i++) {
            CHECK_RC(stream_entry_next(g, len, &pos, &p, &t, &bb, &bl), 1);
            CHECK(stream_pos_eq(&p, &ps[i]) && t == times[i]);
            CHECK(bl == b[i].len && (bl == 0 || memcmp(bb, b[i].buf, bl) == 0));
        }
        CHECK_RC(stream_entry_next(g, len, &pos, &p, &t, &bb, &bl), 0);
        CHECK(pos == len);
    }
    /* Every truncation: -EINVAL (or 0 entries at a boundary), never a read
     * past the end (the guard page). */
    size_t e1 = STREAM_ENTRY_HDR + b[0].len, e2 = e1 + STREAM_ENTRY_HDR + b[1].len;
    for (size_t cut = 0; cut < len; cut++) {
        void *m2;
        size_t ml2;
        uint8_t *t = guarded(buf, cut, &m2, &ml2);
        int count, rc = walk(t, cut, &count);
        int boundary = cut == 0 || cut == e1 || cut == e2;
        CHECKF(boundary ? rc == 0 : rc == -EINVAL, "cut at %zu: rc %d", cut, rc);
        CHECKF(count == (cut >= e2 ? 2 : cut >= e1 ? 1 : 0), "cut at %zu: %d entries", cut, count);
        munmap(m2, ml2);
    }
    /* A length beyond the buffer, beyond BATCH_MAX, or a batch that is not
     * one; *pos stays at the bad entry. */
    {
        uint8_t bad[256];
        memcpy(bad, buf, e1);
        struct stream_pos p;
        uint64_t t;
        const uint8_t *bb;
        size_t bl, pos = 0;
        bad[32] = 0xff; bad[33] = 0xff; bad[34] = 0xff; bad[35] = 0x7f;
        CHECK_RC(stream_entry_next(bad, e1, &pos, &p, &t, &bb, &bl), -EINVAL);
        CHECK(pos == 0);
        memcpy(bad, buf, e1);
        bad[32] = 0; bad[33] = 0; bad[34] = 0; bad[35] = 0x04; /* 64 MiB + */
        bad[32] = 1;
        CHECK_RC(stream_entry_next(bad, e1, &pos, &p, &t, &bb, &bl), -EINVAL);
        memcpy(bad, buf, e1);
        bad[STREAM_ENTRY_HDR] = 99; /* no such op */
        CHECK_RC(stream_entry_next(bad, e1, &pos, &p, &t, &bb, &bl), -EINVAL);
        memcpy(bad, buf, e1);
        bad[STREAM_ENTRY_HDR + 1] = 0xff; /* key length past the batch */
        CHECK_RC(stream_entry_next(bad, e1, &pos, &p, &t, &bb, &bl), -EINVAL);
        CHECK(pos == 0);
    }
    munmap(map, maplen);
    for (int i = 0; i < 3; i++)
        batch_free(&b[i]);
}

static void test_check(void)
{
    const uint8_t batch[] = {1, 1, 0, 0, 0, 'k', 1, 0, 0, 0, 'v'};
    uint64_t c = stream_check_next(0, 1, 1, batch, sizeof(batch));

    /* Pinned: the check is compared across nodes and versions. */
    CHECKF(c == 0x0a005eada0130f4bull, "check of the pinned case: 0x%016llx", (unsigned long long)c);
    CHECK(stream_check_next(1, 1, 1, batch, sizeof(batch)) != c);
    CHECK(stream_check_next(0, 2, 1, batch, sizeof(batch)) != c);
    CHECK(stream_check_next(0, 1, 2, batch, sizeof(batch)) != c);
    uint8_t other[sizeof(batch)];
    memcpy(other, batch, sizeof(batch));
    other[sizeof(other) - 1] = 'w';
    CHECK(stream_check_next(0, 1, 1, other, sizeof(other)) != c);
    CHECK(stream_check_next(0, 1, 1, batch, sizeof(batch) - 1) != c);
    /* Chained: the same batch at the next lsn after two different histories. */
    CHECK(stream_check_next(c, 1, 2, batch, sizeof(batch)) !=
          stream_check_next(stream_check_next(0, 1, 1, other, sizeof(other)), 1, 2, batch,
                            sizeof(batch)));
}


/* ---- positions ---- */

struct heard {
    int n;
    unsigned index;
    struct stream_pos last;
};

static void on_apply(void *ctx, unsigned index, const struct stream_pos *p)
{
    struct heard *h = ctx;
    h->n++;
    h->index = index;
    h->last = *p;
}

static void test_apply_pos(void)
{
    struct shard *s = open_shard("pos");
    struct stream_pos p, prev = zero_pos, cur;
    struct batch b;
    struct heard h = {0};

    if (!s)
        return;
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(stream_pos_eq(&cur, &zero_pos));
    shard_lmdb_on_apply(s, on_apply, &h);
    batch_init(&b);
    for (unsigned i = 1; i <= 20; i++) {
        if (i == 11)
            shard_lmdb_set_epoch(s, 42);
        make_batch(&b, i);
        CHECK_RC(shard_lmdb_apply_pos(s, &b, &p), 0);
        CHECKF(p.lsn > prev.lsn, "batch %u: lsn %llu after %llu", i, (unsigned long long)p.lsn,
               (unsigned long long)prev.lsn);
        CHECK(p.epoch == (i <= 10 ? 0u : 42u));
        CHECK(p.check == stream_check_next(prev.check, p.epoch, p.lsn, b.buf, b.len));
        CHECK(h.n == (int)i && h.index == 3 && stream_pos_eq(&h.last, &p));
        CHECK_RC(shard_lmdb_position(s, &cur), 0);
        CHECK(stream_pos_eq(&cur, &p));
        prev = p;
    }
    /* Through the plain interface too (shard_apply has no position out). */
    make_batch(&b, 21);
    CHECK_RC(shard_apply(s, &b), 0);
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(cur.lsn > prev.lsn && cur.check == stream_check_next(prev.check, 42, cur.lsn, b.buf, b.len));
    CHECK(h.n == 21);
    /* A failed batch (an assert) hands out nothing. */
    batch_reset(&b);
    batch_add(&b, BATCH_ASSERT_ABSENT, "k0001", 5, NULL, 0);
    batch_put(&b, "zz", 2, "x", 1);
    CHECK_RC(shard_lmdb_apply_pos(s, &b, &p), -EEXIST);
    CHECK_RC(shard_lmdb_position(s, &p), 0);
    CHECK(stream_pos_eq(&p, &cur) && h.n == 21);
    /* An empty batch: the current position. */
    batch_reset(&b);
    CHECK_RC(shard_lmdb_apply_pos(s, &b, &p), 0);
    CHECK(stream_pos_eq(&p, &cur) && h.n == 21);
    shard_lmdb_on_apply(s, NULL, NULL);
    make_batch(&b, 22);
    CHECK_RC(shard_apply(s, &b), 0);
    CHECK(h.n == 21); /* removed */
    batch_free(&b);
    shard_close(s);
}

/* The data batches of a stream, one entry each, as a replica sees them. */
static void test_read_and_apply_at(void)
{
    struct shard *pri = open_shard("pri"), *rep = open_shard("rep");
    struct stream_pos pos[41], cur;
    struct got g = {0};
    struct batch b;

    if (!pri || !rep)
        return;
    batch_init(&b);
    shard_lmdb_set_epoch(pri, 5);
    pos[0] = zero_pos;
    for (unsigned i = 1; i <= 40; i++)
        CHECK_RC(put1(pri, i, &pos[i]), 0);

    /* Nothing newer than the position; all of it from the empty base. */
    CHECK_RC(shard_lmdb_stream_read(pri, &pos[40], 1 << 20, got_fn, &g), 0);
    CHECK(g.n == 0);
    CHECK_RC(shard_lmdb_stream_read(pri, &zero_pos, 1 << 20, got_fn, &g), 40);
    for (int i = 0; i < g.n; i++) {
        make_batch(&b, (unsigned)i + 1);
        CHECK(stream_pos_eq(&g.p[i], &pos[i + 1]));
        CHECK(g.len[i] == b.len && memcmp(g.batch[i], b.buf, b.len) == 0);
        CHECK(g.t[i] > 1700000000000ull);
    }
    got_free(&g);
    /* max_bytes: about that much, at least one entry. */
    CHECK_RC(shard_lmdb_stream_read(pri, &pos[10], 1, got_fn, &g), 1);
    CHECK(g.n == 1 && stream_pos_eq(&g.p[0], &pos[11]));
    got_free(&g);
    CHECK_RC(shard_lmdb_stream_read(pri, &pos[10], 3 * (STREAM_ENTRY_HDR + 20), got_fn, &g), 3);
    got_free(&g);
    /* fn stops with 1 (that entry counts) or fails. */
    g.stop_at = 2;
    CHECK_RC(shard_lmdb_stream_read(pri, &pos[0], 1 << 20, got_fn, &g), 2);
    got_free(&g);
    g.stop_at = 0;
    g.fail_at = 3;
    CHECK_RC(shard_lmdb_stream_read(pri, &pos[0], 1 << 20, got_fn, &g), -EIO);
    got_free(&g);
    g.fail_at = 0;
    /* Not positions of this history. */
    struct stream_pos bad = pos[20];
    bad.check ^= 1;
    CHECK_RC(shard_lmdb_stream_read(pri, &bad, 1 << 20, got_fn, &g), -ESTALE);
    bad = pos[20];
    bad.epoch++;
    CHECK_RC(shard_lmdb_stream_read(pri, &bad, 1 << 20, got_fn, &g), -ESTALE);
    bad = pos[40];
    bad.lsn++;
    CHECK_RC(shard_lmdb_stream_read(pri, &bad, 1 << 20, got_fn, &g), -ESTALE); /* ahead */
    bad = pos[40];
    bad.check ^= 1;
    CHECK_RC(shard_lmdb_stream_read(pri, &bad, 1 << 20, got_fn, &g), -ESTALE); /* same lsn */
    bad = (struct stream_pos){0, 0, 99};
    CHECK_RC(shard_lmdb_stream_read(pri, &bad, 1 << 20, got_fn, &g), -ESTALE); /* not the base */
    CHECK(g.n == 0);

    /* The replica: in pieces, each entry continuing its own history. */
    CHECK_RC(read_all(pri, &zero_pos, 100, &g), 0);
    CHECK(g.n == 40);
    for (int i = 0; i < g.n; i++) {
        struct batch eb = {.buf = g.batch[i], .len = g.len[i], .count = 1};
        if (i == 5) {
            struct stream_pos wrong = g.p[i];
            wrong.check ^= 4;
            CHECK_RC(shard_lmdb_apply_at(rep, &wrong, &eb), -ESTALE);
            CHECK_RC(shard_lmdb_apply_at(rep, &g.p[i - 1], &eb), -ESTALE); /* old lsn */
            /* The right check for an lsn that does not move forward. */
            struct stream_pos same = {5, g.p[i - 1].lsn, 0};
            same.check = stream_check_next(g.p[i - 1].check, 5, same.lsn, eb.buf, eb.len);
            CHECK_RC(shard_lmdb_apply_at(rep, &same, &eb), -ESTALE);
            CHECK_RC(shard_lmdb_position(rep, &cur), 0);
            CHECK(stream_pos_eq(&cur, &g.p[i - 1])); /* nothing changed */
        }
        CHECK_RC(shard_lmdb_apply_at(rep, &g.p[i], &eb), 0);
    }
    check_copy(pri, rep, __LINE__);
    /* The replica serves the same stream (it can be promoted). */
    {
        struct got g2 = {0};
        CHECK_RC(shard_lmdb_stream_read(rep, &pos[30], 1 << 20, got_fn, &g2), 10);
        for (int i = 0; i < g2.n; i++)
            CHECK(stream_pos_eq(&g2.p[i], &pos[31 + i]) && g2.len[i] == g.len[30 + i]);
        got_free(&g2);
    }
    got_free(&g);
    /* Asserts are not checked on a replica, and lsns may jump. */
    batch_reset(&b);
    batch_add(&b, BATCH_ASSERT_ABSENT, "k0001", 5, NULL, 0);
    batch_put(&b, "k0001", 5, "replica", 7);
    struct stream_pos at = {6, pos[40].lsn + 1000, 0};
    at.check = stream_check_next(pos[40].check, at.epoch, at.lsn, b.buf, b.len);
    CHECK_RC(shard_lmdb_apply_at(rep, &at, &b), 0);
    CHECK_RC(shard_lmdb_position(rep, &cur), 0);
    CHECK(stream_pos_eq(&cur, &at));
    char v[16];
    size_t vl = 0;
    CHECK_RC(shard_get(rep, "k0001", 5, 0, v, sizeof(v), &vl), 7);
    CHECK(vl == 7 && memcmp(v, "replica", 7) == 0);
    /* Promoted: its own lsns continue above every lsn it holds. */
    shard_lmdb_set_epoch(rep, 7);
    CHECK_RC(put1(rep, 99, &cur), 0);
    CHECK(cur.lsn > at.lsn && cur.epoch == 7);
    /* An empty batch is not a stream entry. */
    batch_reset(&b);
    CHECK_RC(shard_lmdb_apply_at(rep, &at, &b), -EINVAL);
    batch_free(&b);
    shard_close(pri);
    shard_close(rep);
}

/* ---- retention ---- */

static void test_retention(void)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 3600 * 1000, .stream_bytes = 2000};
    struct shard *s = open_opts("trim", &opt);
    struct stream_pos pos[201], cur;
    struct got g = {0};

    if (!s)
        return;
    pos[0] = zero_pos;
    shard_lmdb_stream_hold(s, 9, 50);  /* keep everything after lsn 50... */
    shard_lmdb_stream_hold(s, SHARD_LMDB_HOLDS, 0); /* out of range: ignored */
    for (unsigned i = 1; i <= 200; i++) {
        CHECK_RC(put1(s, i, &pos[i]), 0);
        if (i % 40 == 0)
            CHECK_RC(shard_lmdb_flush(s, 1), 0); /* a commit: trims */
    }
    /* Each entry is 24 + ~30 bytes: 2000 bytes keep ~37, the hold more. */
    CHECK_RC(read_all(s, &pos[0], 1 << 20, &g), -ERANGE);
    CHECK(g.n == 0);
    CHECK_RC(read_all(s, &pos[49], 1 << 20, &g), -ERANGE);
    got_free(&g);
    CHECK_RC(read_all(s, &pos[50], 1 << 20, &g), 0);
    CHECK(g.n == 150 && stream_pos_eq(&g.p[149], &pos[200]));
    got_free(&g);
    /* The hold moves on: the next commit trims up to the size. */
    shard_lmdb_stream_hold(s, 9, 120);
    CHECK_RC(put1(s, 201, &cur), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK_RC(read_all(s, &pos[50], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[120], 1 << 20, &g), 0);
    CHECK(g.n == 81);
    got_free(&g);
    /* Released: down to about stream_bytes; the oldest left is readable
     * from the base (the entry before it), which is one of ours. */
    shard_lmdb_stream_hold(s, 9, UINT64_MAX);
    CHECK_RC(put1(s, 202, &cur), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK_RC(read_all(s, &pos[120], 1 << 20, &g), -ERANGE);
    int from = -1;
    for (int i = 121; i <= 200 && from < 0; i++) {
        int rc = read_all(s, &pos[i], 1 << 20, &g);
        if (rc == 0)
            from = i;
        else
            CHECK_RC(rc, -ERANGE);
        if (rc == 0) {
            CHECKF(g.bytes + (size_t)g.n * 24 <= 2000 + 100 && g.n > 20, "%d entries, %zu bytes kept",
                   g.n, g.bytes);
        }
        got_free(&g);
    }
    CHECK(from > 120);
    /* The trim is durable with its base: the same after a reopen. */
    shard_close(s);
    s = open_opts("trim", &opt);
    if (!s)
        return;
    CHECK_RC(read_all(s, &pos[from], 1 << 20, &g), 0);
    CHECK(g.n == 202 - from);
    got_free(&g);
    CHECK_RC(read_all(s, &pos[from - 1], 1 << 20, &g), -ERANGE);
    shard_close(s);

    /* By age. */
    struct shard_lmdb_options aged = {.commit_interval_ms = 3600 * 1000, .stream_age_ms = 30};
    s = open_opts("aged", &aged);
    if (!s)
        return;
    for (unsigned i = 1; i <= 10; i++)
        CHECK_RC(put1(s, i, &pos[i]), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK_RC(read_all(s, &pos[0], 1 << 20, &g), 0); /* young: all kept */
    CHECK(g.n == 10);
    got_free(&g);
    usleep(80 * 1000);
    shard_lmdb_stream_hold(s, 0, 4);
    CHECK_RC(put1(s, 11, &pos[11]), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK_RC(read_all(s, &pos[3], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[4], 1 << 20, &g), 0); /* held */
    CHECK(g.n == 7);
    got_free(&g);
    shard_close(s);
}

/* ---- local keys ---- */

static void test_local_keys(void)
{
    struct shard *s = open_shard("local");
    struct stream_pos p, cur;
    struct batch b;
    struct got g = {0};
    uint8_t lkey[9] = {'L', 0, 0, 0, 0, 0, 0, 0, 1};

    if (!s)
        return;
    batch_init(&b);
    for (unsigned i = 1; i <= 5; i++)
        CHECK_RC(put1(s, i, &p), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    batch_put(&b, "Mpos", 4, "x", 1);
    CHECK_RC(shard_apply(s, &b), -EINVAL);
    batch_reset(&b);
    batch_put(&b, lkey, sizeof(lkey), "x", 1);
    CHECK_RC(shard_apply(s, &b), -EINVAL);
    batch_reset(&b);
    batch_del(&b, "Mseq", 4);
    CHECK_RC(shard_apply(s, &b), -EINVAL);
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(stream_pos_eq(&cur, &p));
    /* Scans do not show them; a range delete of every key keeps them. */
    struct dump d = dump_of(s);
    CHECK(d.buf && d.len > 0);
    if (d.buf) {
        CHECK(!memmem(d.buf, d.len, "Mpos", 4) && !memmem(d.buf, d.len, "Mseq", 4));
        CHECK(!memmem(d.buf, d.len, "1:L", 3) && !memmem(d.buf, d.len, "9:L", 3));
    }
    free(d.buf);
    batch_reset(&b);
    batch_add(&b, BATCH_DEL_RANGE, "\0", 1, "\xff\xff", 2);
    batch_put(&b, "Mshard", 6, "fs meta", 7); /* not local: the fs's own */
    CHECK_RC(shard_lmdb_apply_pos(s, &b, &p), 0);
    d = dump_of(s);
    CHECK(d.len == strlen("6:Mshard=7:fs meta") && memcmp(d.buf, "6:Mshard=7:fs meta", d.len) == 0);
    free(d.buf);
    CHECK_RC(read_all(s, &zero_pos, 1 << 20, &g), 0);
    CHECK(g.n == 6 && stream_pos_eq(&g.p[5], &p));
    got_free(&g);
    struct shard_stat st;
    CHECK_RC(shard_stat(s, &st), 0);
    CHECKF(st.records == 1, "stat counts %llu records", (unsigned long long)st.records);
    batch_free(&b);
    shard_close(s);
}

/* ---- snapshots ---- */

struct copy {
    struct shard *to;
    struct batch b;
};

static int copy_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct copy *c = ctx;
    batch_put(&c->b, k, kl, v, vl);
    if (c->b.count >= 7) {
        int rc = shard_lmdb_load(c->to, &c->b);
        batch_reset(&c->b);
        return rc;
    }
    return 0;
}

static int copy_all(struct shard *from, struct shard *to)
{
    struct copy c = {.to = to};
    int rc;

    batch_init(&c.b);
    rc = shard_scan(from, NULL, 0, NULL, 0, copy_fn, &c);
    if (rc == 0 && c.b.count)
        rc = shard_lmdb_load(to, &c.b);
    batch_free(&c.b);
    return rc;
}

static void catch_up(struct shard *pri, struct shard *rep, const struct stream_pos *after)
{
    struct got g = {0};

    CHECK_RC(read_all(pri, after, 1 << 20, &g), 0);
    for (int i = 0; i < g.n; i++) {
        struct batch eb = {.buf = g.batch[i], .len = g.len[i], .count = 1};
        CHECK_RC(shard_lmdb_apply_at(rep, &g.p[i], &eb), 0);
    }
    got_free(&g);
}

static void test_snapshot(void)
{
    struct shard *pri = open_shard("spri"), *rep = open_shard("srep");
    struct stream_pos p0, cur, p;
    struct batch b;
    struct got g = {0};

    if (!pri || !rep)
        return;
    batch_init(&b);
    for (unsigned i = 1; i <= 60; i++)
        CHECK_RC(put1(pri, i, &p), 0);
    for (unsigned i = 500; i < 520; i++) /* the replica's own diverged history */
        CHECK_RC(put1(rep, i, &p), 0);
    batch_put(&b, "x", 1, "y", 1);
    CHECK_RC(shard_lmdb_load(rep, &b), -EINVAL); /* no snapshot begun */
    CHECK_RC(shard_lmdb_snapshot_done(rep, &p), -EINVAL);

    CHECK_RC(shard_lmdb_position(pri, &p0), 0); /* before the copy */
    CHECK_RC(shard_lmdb_snapshot_begin(rep), 0);
    CHECK_RC(shard_lmdb_position(rep, &cur), -EAGAIN);
    CHECK_RC(shard_lmdb_stream_read(rep, &zero_pos, 100, got_fn, &g), -EAGAIN);
    CHECK_RC(shard_lmdb_apply_pos(rep, &b, &cur), -EBUSY);
    CHECK_RC(shard_lmdb_apply_at(rep, &p0, &b), -EAGAIN);
    struct dump d = dump_of(rep);
    CHECK(d.len == 0); /* emptied */
    free(d.buf);
    /* The fuzzy copy: writes go on at the primary while it is taken. */
    for (unsigned i = 61; i <= 70; i++)
        CHECK_RC(put1(pri, i, &p), 0);
    CHECK_RC(copy_all(pri, rep), 0);
    for (unsigned i = 71; i <= 80; i++)
        CHECK_RC(put1(pri, i, &p), 0);
    /* Local keys in a page are skipped; only puts and deletes. */
    batch_reset(&b);
    batch_put(&b, "Mpos", 4, "garbage", 7);
    batch_put(&b, "Mlsn", 4, "garbage!", 8);
    uint8_t lkey[9] = {'L', 0, 0, 0, 0, 0, 0, 0, 2};
    batch_put(&b, lkey, sizeof(lkey), "entry", 5);
    CHECK_RC(shard_lmdb_load(rep, &b), 0);
    batch_reset(&b);
    batch_add(&b, BATCH_DEL_RANGE, "a", 1, "b", 1);
    CHECK_RC(shard_lmdb_load(rep, &b), -EINVAL);
    /* Still marked after a reopen. */
    shard_close(rep);
    rep = open_shard("srep");
    if (!rep)
        return;
    CHECK_RC(shard_lmdb_position(rep, &cur), -EAGAIN);
    CHECK_RC(shard_lmdb_snapshot_done(rep, &p0), 0);
    CHECK_RC(shard_lmdb_position(rep, &cur), 0);
    CHECK(stream_pos_eq(&cur, &p0));
    /* The replica's stream starts at the base. */
    CHECK_RC(shard_lmdb_stream_read(rep, &zero_pos, 100, got_fn, &g), -ERANGE);
    CHECK_RC(shard_lmdb_stream_read(rep, &p0, 100, got_fn, &g), 0);
    catch_up(pri, rep, &p0);
    check_copy(pri, rep, __LINE__);
    /* And after a reopen (the log replay of loads and done). */
    shard_close(rep);
    rep = open_shard("srep");
    if (!rep)
        return;
    check_copy(pri, rep, __LINE__);

    /* kill -9 in the middle of a snapshot: marked after the restart, until
     * a new snapshot completes. */
    shard_close(rep);
    pid_t pid = fork();
    if (pid == 0) {
        struct shard *c = NULL;
        char err[256];
        struct shard_lmdb_options opt = {.commit_interval_ms = 3600 * 1000};
        if (shard_lmdb_open(path_of("srep"), 3, &opt, &c, err, sizeof(err)) ||
            shard_lmdb_snapshot_begin(c) || copy_all(pri, c))
            _exit(1);
        _exit(0); /* no close, no commit */
    }
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    rep = open_shard("srep");
    if (!rep)
        return;
    CHECK_RC(shard_lmdb_position(rep, &cur), -EAGAIN);
    CHECK_RC(shard_lmdb_snapshot_begin(rep), 0);
    CHECK_RC(shard_lmdb_position(pri, &p0), 0);
    CHECK_RC(copy_all(pri, rep), 0);
    CHECK_RC(shard_lmdb_snapshot_done(rep, &p0), 0);
    CHECK_RC(put1(pri, 81, &p), 0);
    catch_up(pri, rep, &p0);
    check_copy(pri, rep, __LINE__);
    batch_free(&b);
    shard_close(pri);
    shard_close(rep);
}


/* kill -9 at random moments while a replica catches up (a snapshot, then
 * apply_at entry by entry): after each, the replica either says -EAGAIN (a
 * snapshot was under way: it takes a new one) or holds a position of the
 * primary's history from which it catches up to an exact copy. */
static void test_kill9_catch_up(void)
{
    struct shard *pri = open_shard("kpri"), *rep;
    struct stream_pos pos[301], p;
    unsigned seed = 12345;
    int marked = 0, valid = 0, killed = 0;

    if (!pri)
        return;
    pos[0] = zero_pos;
    for (unsigned i = 1; i <= 300; i++)
        CHECK_RC(put1(pri, i, &pos[i]), 0);
    for (int round = 0; round < 24; round++) {
        /* Every sixth round the kill lands mid-snapshot for sure (the
         * child says when its snapshot began, then waits): random moments
         * alone missed the short snapshot in all 24 rounds of one run. */
        int forced = round % 6 == 0, began[2] = {-1, -1};
        if (forced && pipe(began) != 0)
            exit(2);
        pid_t pid = fork();
        if (pid == 0) {
            struct shard *c = NULL;
            char err[256];
            struct shard_lmdb_options opt = {.commit_interval_ms = 5};
            struct got g = {0};
            if (shard_lmdb_open(path_of("krep"), 3, &opt, &c, err, sizeof(err)))
                _exit(1);
            /* Until killed: catch up from where the replica is, then
             * take a new snapshot and catch up again, and so on. */
            for (int turn = 0;; turn++) {
                int rc = shard_lmdb_position(c, &p);
                if (rc == -EAGAIN || (round + turn) % 3 == 0) {
                    /* The copy is of the state at 300, the base 200: the
                     * entries 201..300 are replayed over it (blind ops). */
                    if (shard_lmdb_snapshot_begin(c))
                        _exit(1);
                    if (forced && turn == 0) {
                        if (write(began[1], "s", 1) != 1)
                            _exit(1);
                        sleep(10); /* killed meanwhile */
                    }
                    if (copy_all(pri, c) || shard_lmdb_snapshot_done(c, &pos[200]))
                        _exit(1);
                    p = pos[200];
                } else if (rc) {
                    _exit(1);
                }
                for (;;) {
                    rc = shard_lmdb_stream_read(pri, &p, 1, got_fn, &g);
                    if (rc == 0)
                        break;
                    struct batch eb = {.buf = g.batch[0], .len = g.len[0], .count = 1};
                    if (rc != 1 || shard_lmdb_apply_at(c, &g.p[0], &eb))
                        _exit(1);
                    p = g.p[0];
                    got_free(&g);
                }
            }
            _exit(0);
        }
        seed = seed * 1103515245u + 12345u;
        if (forced) {
            char byte;
            CHECK(read(began[0], &byte, 1) == 1);
            close(began[0]);
            close(began[1]);
        } else {
            usleep(2000 + (seed >> 8) % 80000);
        }
        kill(pid, SIGKILL);
        int status = -1;
        waitpid(pid, &status, 0);
        killed += WIFSIGNALED(status);
        CHECKF(WIFSIGNALED(status), "round %d: the child failed (status %d)", round, status);
        rep = open_shard("krep");
        if (!rep)
            return;
        int rc = shard_lmdb_position(rep, &p);
        if (rc == -EAGAIN) {
            marked++;
        } else {
            struct got g = {0};
            CHECKF(rc == 0, "round %d: position %d", round, rc);
            /* A position of the primary's history (or the empty shard). */
            CHECKF(p.lsn == 0 || (p.lsn <= 300 && stream_pos_eq(&p, &pos[p.lsn])),
                   "round %d: position lsn %llu is not the primary's", round,
                   (unsigned long long)p.lsn);
            valid += p.lsn > 0;
            catch_up(pri, rep, &p); /* from the empty shard too */
            check_copy(pri, rep, __LINE__);
            got_free(&g);
        }
        shard_close(rep);
    }
    printf("  24 rounds, %d killed: %d found mid-snapshot (EAGAIN), %d at a position\n", killed,
           marked, valid);
    CHECK(valid > 0 && marked > 0);
    shard_close(pri);
}

/* ---- durability of positions and lsns ---- */

static void test_reopen(void)
{
    struct shard *s = open_shard("reopen");
    struct stream_pos p, cur, last = zero_pos;
    struct got g = {0}, g2 = {0};

    if (!s)
        return;
    shard_lmdb_set_epoch(s, 3);
    for (unsigned i = 1; i <= 30; i++) {
        CHECK_RC(put1(s, i, &p), 0);
        if (i == 10)
            CHECK_RC(shard_sync(s), 0);
    }
    last = p;
    CHECK_RC(read_all(s, &zero_pos, 1 << 20, &g), 0);
    shard_close(s);
    s = open_shard("reopen");
    if (!s)
        return;
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(stream_pos_eq(&cur, &last));
    CHECK_RC(read_all(s, &zero_pos, 1 << 20, &g2), 0);
    CHECK(g.n == 30 && g2.n == 30);
    for (int i = 0; i < g.n && i < g2.n; i++)
        CHECK(stream_pos_eq(&g.p[i], &g2.p[i]) && g.t[i] == g2.t[i] && g.len[i] == g2.len[i] &&
              memcmp(g.batch[i], g2.batch[i], g.len[i]) == 0);
    got_free(&g2);
    /* The epoch of the last batch until set; lsns jump past the reservation:
     * a gap, never a reuse. */
    CHECK_RC(put1(s, 31, &p), 0);
    CHECK(p.epoch == 3);
    CHECKF(p.lsn > last.lsn + 1, "lsn after reopen %llu, before %llu", (unsigned long long)p.lsn,
           (unsigned long long)last.lsn);
    shard_close(s);

    /* kill -9 with nothing committed since the sync: the log replay gives
     * the same entries and position, and lsns above all handed out. */
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        struct shard *c = NULL;
        char err[256];
        struct shard_lmdb_options opt = {.commit_interval_ms = 3600 * 1000};
        struct stream_pos cp;
        close(fds[0]);
        if (shard_lmdb_open(path_of("reopen"), 3, &opt, &c, err, sizeof(err)))
            _exit(1);
        for (unsigned i = 32; i <= 60; i++) {
            if (put1(c, i, &cp) || write(fds[1], &cp, sizeof(cp)) != sizeof(cp))
                _exit(1);
            if (i == 40)
                shard_lmdb_flush(c, 1);
        }
        _exit(0);
    }
    close(fds[1]);
    struct stream_pos handed[64];
    int n = 0;
    while (n < 64 && read(fds[0], &handed[n], sizeof(handed[n])) == sizeof(handed[n]))
        n++;
    close(fds[0]);
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0 && n == 29);
    s = open_shard("reopen");
    if (!s)
        return;
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(n > 0 && stream_pos_eq(&cur, &handed[n - 1]));
    got_free(&g);
    CHECK_RC(read_all(s, &p, 1 << 20, &g), 0);
    CHECK(g.n == n);
    for (int i = 0; i < g.n && i < n; i++)
        CHECK(stream_pos_eq(&g.p[i], &handed[i]));
    got_free(&g);
    CHECK_RC(put1(s, 61, &p), 0);
    CHECK(n > 0 && p.lsn > handed[n - 1].lsn + 1);
    shard_close(s);
}

/* A redo log record written before the stream existed ("SLOG", 24-byte
 * header) is replayed as a batch at the next lsn of the last epoch. */
static void test_legacy_log(void)
{
    struct shard *s = open_shard("legacy");
    struct stream_pos p, cur;
    struct batch b;
    uint8_t rec[256];

    if (!s)
        return;
    shard_lmdb_set_epoch(s, 2);
    CHECK_RC(put1(s, 1, &p), 0);
    CHECK_RC(shard_sync(s), 0);
    shard_close(s);
    batch_init(&b);
    batch_put(&b, "old", 3, "format", 6);
    uint64_t seq = 0;
    /* Each open commits once (its reservation): read the committed Mseq. */
    s = open_shard("legacy");
    if (!s)
        return;
    uint8_t v[8];
    size_t vl = 0;
    CHECK_RC(shard_get(s, "Mseq", 4, 0, v, 8, &vl), 8);
    for (int i = 7; i >= 0; i--)
        seq = seq << 8 | v[i];
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    shard_close(s);
    const uint32_t magic = 0x474f4c53u;
    for (int i = 0; i < 4; i++)
        rec[i] = (uint8_t)(magic >> (8 * i));
    for (int i = 0; i < 4; i++)
        rec[4 + i] = (uint8_t)(b.len >> (8 * i));
    for (int i = 0; i < 8; i++)
        rec[8 + i] = (uint8_t)((seq + 1) >> (8 * i));
    uint64_t x = XXH3_64bits_withSeed(b.buf, b.len, seq + 1);
    for (int i = 0; i < 8; i++)
        rec[16 + i] = (uint8_t)(x >> (8 * i));
    memcpy(rec + 24, b.buf, b.len);
    char logp[4300];
    snprintf(logp, sizeof(logp), "%s/redo.log", path_of("legacy"));
    int fd = open(logp, O_WRONLY | O_TRUNC);
    CHECK(fd >= 0 && write(fd, rec, 24 + b.len) == (ssize_t)(24 + b.len));
    close(fd);
    s = open_shard("legacy");
    if (!s)
        return;
    CHECK_RC(shard_get(s, "old", 3, 0, v, 8, &vl), 6);
    CHECK_RC(shard_lmdb_position(s, &p), 0);
    CHECK(p.epoch == 2 && p.lsn == cur.lsn + 1 &&
          p.check == stream_check_next(cur.check, 2, cur.lsn + 1, b.buf, b.len));
    batch_free(&b);
    shard_close(s);
}

/* The 'L' records in the committed state of the closed shard `name`. */
static long count_entries(const char *name)
{
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    MDB_dbi dbi;
    MDB_val k = {.mv_size = 1, .mv_data = "L"}, v;
    long n = -1;

    if (mdb_env_create(&env) || mdb_env_set_mapsize(env, 1ull << 30) ||
        mdb_env_open(env, path_of(name), MDB_RDONLY | MDB_NOLOCK, 0644) ||
        mdb_txn_begin(env, NULL, MDB_RDONLY, &txn) || mdb_dbi_open(txn, NULL, 0, &dbi) ||
        mdb_cursor_open(txn, dbi, &cur))
        goto out;
    n = 0;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size < 1 || *(const uint8_t *)k.mv_data != 'L')
            break;
        n++;
    }
out:
    if (cur)
        mdb_cursor_close(cur);
    if (txn)
        mdb_txn_abort(txn);
    if (env)
        mdb_env_close(env);
    return n;
}

/* A shard without replicas keeps positions but no entries; one reopened
 * with a stream starts it at its position; one reopened without drops the
 * entries an earlier run left at its next commit. */
static void test_no_stream(void)
{
    struct shard_lmdb_options off = {.commit_interval_ms = 3600 * 1000, .no_stream = 1};
    struct shard_lmdb_options on = {.commit_interval_ms = 3600 * 1000};
    struct stream_pos pos[61], cur;
    struct got g = {0};
    struct shard *s = open_opts("nostream", &off);

    if (!s)
        return;
    pos[0] = zero_pos;
    for (unsigned i = 1; i <= 20; i++)
        CHECK_RC(put1(s, i, &pos[i]), 0);
    CHECK(pos[20].lsn > pos[19].lsn && pos[19].lsn > pos[1].lsn);
    CHECK_RC(shard_lmdb_position(s, &cur), 0);
    CHECK(stream_pos_eq(&cur, &pos[20]));
    CHECK_RC(read_all(s, &pos[0], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[19], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[20], 1 << 20, &g), 0);
    CHECK(g.n == 0);
    got_free(&g);
    shard_close(s);
    CHECK(count_entries("nostream") == 0);

    /* With a stream now: entries after the position it had. */
    s = open_opts("nostream", &on);
    if (!s)
        return;
    for (unsigned i = 21; i <= 40; i++)
        CHECK_RC(put1(s, i, &pos[i]), 0);
    CHECK_RC(read_all(s, &pos[19], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[20], 1 << 20, &g), 0);
    CHECK(g.n == 20 && stream_pos_eq(&g.p[19], &pos[40]));
    got_free(&g);
    shard_close(s);
    CHECK(count_entries("nostream") == 20);

    /* Without again: the leftover entries go at the next commit. */
    s = open_opts("nostream", &off);
    if (!s)
        return;
    for (unsigned i = 41; i <= 60; i++)
        CHECK_RC(put1(s, i, &pos[i]), 0);
    CHECK_RC(shard_lmdb_flush(s, 1), 0);
    CHECK_RC(read_all(s, &pos[40], 1 << 20, &g), -ERANGE);
    CHECK_RC(read_all(s, &pos[60], 1 << 20, &g), 0);
    CHECK(g.n == 0);
    got_free(&g);
    shard_close(s);
    CHECK(count_entries("nostream") == 0);
}

/* ---- the content checksum (fsck --replicas) ---- */

/* Put key=value into the committed state of the closed shard `name` with
 * raw LMDB (a copy damaged behind the shard's back); an empty value
 * deletes key. 0 or an LMDB code. */
static int raw_put(const char *name, const char *key, const char *val, size_t vlen)
{
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_dbi dbi;
    MDB_val k = {.mv_size = strlen(key), .mv_data = (void *)key};
    MDB_val v = {.mv_size = vlen, .mv_data = (void *)val};
    int rc;

    rc = mdb_env_create(&env);
    if (!rc)
        rc = mdb_env_set_mapsize(env, 1ull << 30);
    if (!rc)
        rc = mdb_env_open(env, path_of(name), MDB_NOLOCK, 0644);
    if (!rc)
        rc = mdb_txn_begin(env, NULL, 0, &txn);
    if (!rc)
        rc = mdb_dbi_open(txn, NULL, 0, &dbi);
    if (!rc)
        rc = vlen ? mdb_put(txn, dbi, &k, &v, 0) : mdb_del(txn, dbi, &k, NULL);
    if (!rc) {
        rc = mdb_txn_commit(txn);
        txn = NULL;
    }
    if (txn)
        mdb_txn_abort(txn);
    if (env)
        mdb_env_close(env);
    return rc;
}

/* Apply to rep what pri has after rep's position, as a replica does. */
static void follow(struct shard *pri, struct shard *rep)
{
    struct stream_pos at;
    struct got g = {0};

    CHECK_RC(shard_lmdb_position(rep, &at), 0);
    CHECK_RC(read_all(pri, &at, 1 << 20, &g), 0);
    for (int i = 0; i < g.n; i++) {
        struct batch eb = {.buf = g.batch[i], .len = g.len[i], .count = 1};
        CHECK_RC(shard_lmdb_apply_at(rep, &g.p[i], &eb), 0);
    }
    got_free(&g);
}

static int sum_eq(const struct shard_lmdb_sum *a, const struct shard_lmdb_sum *b)
{
    return stream_pos_eq(&a->pos, &b->pos) && a->records == b->records &&
           a->bytes == b->bytes && memcmp(a->digest, b->digest, sizeof(a->digest)) == 0;
}

struct sum_writer {
    struct shard *s;
    atomic_int stop;
    unsigned applied;
};

static void *sum_writer_main(void *arg)
{
    struct sum_writer *w = arg;

    while (!atomic_load(&w->stop)) {
        if (put1(w->s, 7 + w->applied % 40, NULL) != 0)
            break;
        w->applied++;
    }
    return NULL;
}

/* Two copies of one history hold different local records (the primary
 * trims its stream hard, the replica keeps it all; their Mseq and Mlsn
 * differ) and the same data: the same digest at the same position, over
 * several pieces of the pass. One record changed, added or removed behind
 * the shard's back (the position unchanged) changes it. A batch applied
 * during the pass makes it -EAGAIN, never a digest of a moving shard. */
static void test_checksum(void)
{
    struct shard_lmdb_options trim = {.commit_interval_ms = 3600 * 1000, .stream_bytes = 4096};
    struct shard *pri = open_opts("sum-pri", &trim), *rep = open_shard("sum-rep");
    struct shard_lmdb_sum a, b, c;
    struct sum_writer w = {0};
    struct stream_pos pos;
    pthread_t t;
    struct batch bt;
    static uint8_t big[64 << 10];
    int eagain = 0;

    if (!pri || !rep)
        return;
    batch_init(&bt);
    shard_lmdb_set_epoch(pri, 3);
    /* Empty: the empty position, the same digest. */
    CHECK_RC(shard_lmdb_checksum(pri, &a), 0);
    CHECK_RC(shard_lmdb_checksum(rep, &b), 0);
    CHECK(a.records == 0 && a.pos.lsn == 0 && sum_eq(&a, &b));
    /* ~12 MiB of 64 KiB values (three pieces and more), small batches. */
    for (unsigned i = 0; i < 200; i++) {
        char k[16];

        memset(big, 'a' + (int)(i % 26), sizeof(big));
        snprintf(k, sizeof(k), "big%04u", i);
        batch_reset(&bt);
        batch_put(&bt, k, strlen(k), big, sizeof(big));
        CHECK_RC(shard_lmdb_apply_pos(pri, &bt, NULL), 0);
        CHECK_RC(put1(pri, i, NULL), 0);
        follow(pri, rep);
        if (i % 50 == 0)
            CHECK_RC(shard_lmdb_flush(pri, 1), 0); /* commits: the stream is trimmed */
    }
    CHECK_RC(shard_lmdb_flush(pri, 1), 0);
    CHECK_RC(shard_lmdb_checksum(pri, &a), 0);
    CHECK_RC(shard_lmdb_checksum(rep, &b), 0);
    CHECK_RC(shard_lmdb_position(pri, &pos), 0);
    CHECK(stream_pos_eq(&a.pos, &pos) && a.records >= 200 + 40);
    CHECK(a.bytes > 200u * sizeof(big) && a.bytes > 3u * SHARD_LMDB_SUM_PIECE);
    CHECK(sum_eq(&a, &b));
    /* The same data, a different retained stream: the local records did
     * differ (else this test proves nothing about leaving them out). */
    shard_close(pri);
    shard_close(rep);
    CHECK(count_entries("sum-pri") < count_entries("sum-rep"));
    pri = open_opts("sum-pri", &trim);
    rep = open_shard("sum-rep");
    if (!pri || !rep)
        goto out;
    CHECK_RC(shard_lmdb_checksum(pri, &c), 0);
    CHECK(sum_eq(&a, &c)); /* and a reopen changes nothing */
    CHECK_RC(shard_lmdb_checksum(rep, &c), 0);
    CHECK(sum_eq(&a, &c));

    /* Damaged behind the replica's back, each way: one byte of a value (its
     * length kept), a new record, a record gone. The position stays; the
     * digest moves. */
    char old[64];
    size_t oldlen = 0;
    CHECK(shard_get(rep, "k0001", 5, 0, old, sizeof(old), &oldlen) > 0 && oldlen < sizeof(old));
    old[oldlen - 1] ^= 1;
    const struct {
        const char *key, *val;
        size_t vlen;
    } damage[] = {{"k0001", old, oldlen}, {"k0003x", "extra", 5}, {"big0007", "", 0}};
    for (size_t i = 0; i < sizeof(damage) / sizeof(damage[0]); i++) {
        shard_close(rep);
        rep = NULL;
        CHECK_RC(raw_put("sum-rep", damage[i].key, damage[i].val, damage[i].vlen), 0);
        rep = open_shard("sum-rep");
        if (!rep)
            goto out;
        CHECK_RC(shard_lmdb_checksum(rep, &c), 0);
        CHECKF(stream_pos_eq(&c.pos, &a.pos) && memcmp(c.digest, a.digest, sizeof(a.digest)),
               "damage %zu not seen", i);
    }

    /* A writer during the pass: -EAGAIN (a pass of 12 MiB in 4 MiB pieces
     * gives the writer the lock between them), or, when it did not get
     * in, a digest whose position was the shard's all along. */
    w.s = pri;
    atomic_init(&w.stop, 0);
    CHECK(pthread_create(&t, NULL, sum_writer_main, &w) == 0);
    for (int i = 0; i < 2000 && !eagain; i++) {
        int rc = shard_lmdb_checksum(pri, &c);
        CHECK(rc == 0 || rc == -EAGAIN);
        eagain += rc == -EAGAIN;
    }
    atomic_store(&w.stop, 1);
    pthread_join(t, NULL);
    CHECKF(eagain && w.applied > 0, "no pass saw the writer (%u batches)", w.applied);
out:
    batch_free(&bt);
    shard_close(pri);
    shard_close(rep);
}

int main(void)
{
    static const struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"entry encoding", test_encoding},
        {"check", test_check},
        {"apply_pos", test_apply_pos},
        {"stream_read and apply_at", test_read_and_apply_at},
        {"retention and holds", test_retention},
        {"local keys", test_local_keys},
        {"snapshot", test_snapshot},
        {"kill -9 while catching up", test_kill9_catch_up},
        {"reopen, kill -9, lsn reservation", test_reopen},
        {"redo log of the version before", test_legacy_log},
        {"no stream", test_no_stream},
        {"content checksum", test_checksum},
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
    rm_rf(tmpdir);
    return check_summary("stream");
}
