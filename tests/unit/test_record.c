/* test_record.c -- unit tests for fs/record.c.
 *
 * Covers: the key encoders produce the documented layout (type byte, 16-byte
 * id, big-endian chunk index, name) and chunk keys sort numerically;
 * record_id_prefix is a prefix of the owned keys; record_prefix_end (carry over
 * trailing 0xff bytes, all-0xff -> 0, and the end bounds every key of the
 * prefix); record_placement of every record type (entries by
 * placement_entry_hash incl. the rsync rule, the others by the first 8 id bytes
 * big-endian; 'M', unknown types and short keys -> -EINVAL); record_id_make /
 * record_id_hash; record_id_ino (root -> 1, others never 0 or 1); the inode
 * value's byte layout (record.c's table, incl. alloc at 92 and the tail at 100)
 * and a round trip of every field (nanoseconds, negative seconds, parent,
 * alloc, tails of 0, 1 and RECORD_TAIL_MAX bytes); decode rejecting a
 * wrong version, short values, a tail_len that does not match the length or is
 * too big; entry values and their wrong-length rejection.
 * Exits non-zero on any failed check.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "placement.h"
#include "record.h"
#include "check.h"
#include "test_util.h"

static uint64_t rng_state = 0xfeedfacecafebeefull;
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint64_t le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* memcmp order of byte strings, shorter first on a common prefix (LMDB's). */
static int keycmp(const uint8_t *a, size_t al, const uint8_t *b, size_t bl)
{
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

static struct ino_id sample_id(void)
{
    struct ino_id id;
    for (int i = 0; i < RECORD_ID_LEN; i++)
        id.b[i] = (uint8_t)(0x11 * (i + 1)); /* 11 22 33 ... ff 10 */
    return id;
}

/* ---- ids ---- */

static void test_ids(void)
{
    struct ino_id id;

    record_id_make(&id, 0x0102030405060708ull, 0x1112131415161718ull);
    for (int i = 0; i < 8; i++) {
        CHECK(id.b[i] == i + 1);
        CHECK(id.b[8 + i] == 0x11 + i);
    }
    CHECK(record_id_hash(&id) == 0x0102030405060708ull);

    for (int i = 0; i < 1000; i++) {
        uint64_t h = rng(), u = rng();
        record_id_make(&id, h, u);
        CHECK(record_id_hash(&id) == h);
        CHECK(be64(id.b) == h && be64(id.b + 8) == u);
        CHECK(!record_id_is_root(&id) || (h == 0 && u == 1));
        uint64_t ino = record_id_ino(&id);
        CHECKF(ino != 0 && ino != 1, "id %016llx%016llx -> ino %llu", (unsigned long long)h,
               (unsigned long long)u, (unsigned long long)ino);
        /* Stable: the same id always gives the same st_ino. */
        CHECK(record_id_ino(&id) == ino);
    }

    /* The root. */
    CHECK(record_id_is_root(&record_root_id));
    CHECK(record_id_ino(&record_root_id) == 1);
    CHECK(record_id_hash(&record_root_id) == 0);
    for (int i = 0; i < 15; i++)
        CHECK(record_root_id.b[i] == 0);
    CHECK(record_root_id.b[15] == 1);
    record_id_make(&id, 0, 1);
    CHECK(record_id_is_root(&id) && record_id_ino(&id) == 1);

    /* Ids near the root are not the root. */
    static const struct {
        uint64_t h, u;
    } near[] = {{0, 0}, {0, 2}, {1, 1}, {0, 0x100}, {0x8000000000000000ull, 1}, {~0ull, ~0ull}};
    for (size_t i = 0; i < sizeof(near) / sizeof(near[0]); i++) {
        record_id_make(&id, near[i].h, near[i].u);
        CHECK(!record_id_is_root(&id));
        uint64_t ino = record_id_ino(&id);
        CHECKF(ino != 1 && ino != 0, "near-root id %zu -> %llu", i, (unsigned long long)ino);
    }

    /* Distinct ids give distinct st_ino (no collision among a few thousand). */
    enum { N = 4096 };
    uint64_t *inos = xmalloc(N * sizeof(*inos));
    for (int i = 0; i < N; i++) {
        record_id_make(&id, 0x1234, (uint64_t)i);
        inos[i] = record_id_ino(&id);
        for (int j = 0; j < i; j++)
            if (inos[j] == inos[i]) {
                CHECKF(0, "st_ino collision between unique %d and %d", i, j);
                break;
            }
    }
    free(inos);
}

/* ---- keys ---- */

static void test_keys(void)
{
    struct ino_id id = sample_id();
    uint8_t key[RECORD_KEY_MAX], pre[RECORD_KEY_MAX];
    size_t n;

    /* 'E' dir name */
    n = record_entry_key(key, &id, "hello", 5);
    CHECK(n == 1 + 16 + 5);
    CHECK(key[0] == 'E' && key[0] == REC_ENTRY);
    CHECK(memcmp(key + 1, id.b, 16) == 0);
    CHECK(memcmp(key + 17, "hello", 5) == 0);

    /* A 255-byte name fills RECORD_KEY_MAX exactly. */
    char longname[RECORD_NAME_MAX];
    memset(longname, 'L', sizeof(longname));
    n = record_entry_key(key, &id, longname, RECORD_NAME_MAX);
    CHECK(n == RECORD_KEY_MAX && key[RECORD_KEY_MAX - 1] == 'L');
    /* One byte more: an empty key (which every shard refuses), nothing written. */
    {
        char longer[RECORD_NAME_MAX + 1];
        memset(longer, 'M', sizeof(longer));
        memset(key, 0, sizeof(key));
        CHECK(record_entry_key(key, &id, longer, sizeof(longer)) == 0);
        CHECK(record_xattr_key(key, &id, longer, sizeof(longer)) == 0);
        CHECK(key[0] == 0);
    }
    /* An intent with both names at 255 bytes (namespace.c's layout). */
    CHECK(RECORD_INTENT_MAX == 1 + 64 + 2 + 1 + 255 + 1 + 255);

    /* 'I' id */
    n = record_inode_key(key, &id);
    CHECK(n == 17 && key[0] == 'I' && memcmp(key + 1, id.b, 16) == 0);

    /* 'C' id index:u64be */
    n = record_chunk_key(key, &id, 0x0102030405060708ull);
    CHECK(n == 25 && key[0] == 'C' && memcmp(key + 1, id.b, 16) == 0);
    for (int i = 0; i < 8; i++)
        CHECK(key[17 + i] == i + 1);
    n = record_chunk_key(key, &id, 0);
    CHECK(n == 25 && be64(key + 17) == 0);
    n = record_chunk_key(key, &id, UINT64_MAX);
    CHECK(n == 25 && be64(key + 17) == UINT64_MAX);

    /* Chunk keys sort by index, numerically. */
    static const uint64_t idx[] = {0,          1,
                                   2,          255,
                                   256,        257,
                                   65535,      65536,
                                   1ull << 32, (1ull << 32) + 1,
                                   1ull << 56, UINT64_MAX - 1,
                                   UINT64_MAX};
    for (size_t i = 0; i + 1 < sizeof(idx) / sizeof(idx[0]); i++) {
        uint8_t a[32], b[32];
        size_t al = record_chunk_key(a, &id, idx[i]), bl = record_chunk_key(b, &id, idx[i + 1]);
        CHECKF(keycmp(a, al, b, bl) < 0, "chunk %llu vs %llu", (unsigned long long)idx[i],
               (unsigned long long)idx[i + 1]);
    }

    /* 'X' id name */
    n = record_xattr_key(key, &id, "user.foo", 8);
    CHECK(n == 25 && key[0] == 'X' && memcmp(key + 1, id.b, 16) == 0);
    CHECK(memcmp(key + 17, "user.foo", 8) == 0);

    /* 'O' id, 'T' id */
    n = record_orphan_key(key, &id);
    CHECK(n == 17 && key[0] == 'O' && memcmp(key + 1, id.b, 16) == 0);
    n = record_intent_key(key, &id);
    CHECK(n == 17 && key[0] == 'T' && memcmp(key + 1, id.b, 16) == 0);

    /* The id prefix is a prefix of what the id owns. */
    static const enum record_type types[] = {REC_ENTRY, REC_INODE,  REC_CHUNK,
                                             REC_XATTR, REC_ORPHAN, REC_INTENT};
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        n = record_id_prefix(pre, types[t], &id);
        CHECK(n == 17 && pre[0] == (uint8_t)types[t] && memcmp(pre + 1, id.b, 16) == 0);
    }
    n = record_id_prefix(pre, REC_CHUNK, &id);
    CHECK(record_chunk_key(key, &id, 42) > n && memcmp(key, pre, n) == 0);
    n = record_id_prefix(pre, REC_XATTR, &id);
    CHECK(record_xattr_key(key, &id, "user.a", 6) > n && memcmp(key, pre, n) == 0);
    n = record_id_prefix(pre, REC_ENTRY, &id);
    CHECK(record_entry_key(key, &id, "a", 1) > n && memcmp(key, pre, n) == 0);
    n = record_id_prefix(pre, REC_INODE, &id);
    CHECK(record_inode_key(key, &id) == n && memcmp(key, pre, n) == 0);
}

static void test_prefix_end(void)
{
    static const struct {
        const char *prefix;
        size_t plen;
        const char *end; /* NULL: none */
        size_t elen;
    } cases[] = {
        {"ab", 2, "ac", 2},
        {"a", 1, "b", 1},
        {"\x00", 1, "\x01", 1},
        {"\xfe", 1, "\xff", 1},
        {"a\xff", 2, "b", 1},
        {"a\xff\xff", 3, "b", 1},
        {"a\xfe\xff", 3, "a\xff", 2},
        {"\x01\xff\xff\xff", 4, "\x02", 1},
        {"\xff", 1, NULL, 0},
        {"\xff\xff", 2, NULL, 0},
        {"\xff\xff\xff\xff", 4, NULL, 0},
        {"", 0, NULL, 0},
        {"a\x00\xff", 3, "a\x01", 2},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t out[32];
        memset(out, 0xcc, sizeof(out));
        size_t n = record_prefix_end(out, (const uint8_t *)cases[i].prefix, cases[i].plen);
        CHECKF(n == cases[i].elen, "case %zu: length %zu, want %zu", i, n, cases[i].elen);
        if (cases[i].end && n == cases[i].elen)
            CHECKF(memcmp(out, cases[i].end, n) == 0, "case %zu: wrong bytes", i);
    }

    /* The end of an id prefix bounds every key of that id, and nothing of the
     * next type/id lies in between. Ids with trailing 0xff bytes carry. */
    struct ino_id ids[3];
    ids[0] = sample_id();
    memset(ids[1].b, 0xff, 16);
    memset(ids[2].b, 0x00, 16);
    ids[2].b[3] = 0x7f;
    memset(ids[2].b + 8, 0xff, 8);
    for (int j = 0; j < 3; j++) {
        uint8_t pre[32], end[32], key[RECORD_KEY_MAX];
        size_t pl = record_id_prefix(pre, REC_CHUNK, &ids[j]);
        size_t el = record_prefix_end(end, pre, pl);
        CHECK(el > 0);
        CHECK(keycmp(pre, pl, end, el) < 0);
        static const uint64_t idx[] = {0, 1, UINT64_MAX};
        for (int k = 0; k < 3; k++) {
            size_t kl = record_chunk_key(key, &ids[j], idx[k]);
            CHECK(keycmp(pre, pl, key, kl) <= 0 && keycmp(key, kl, end, el) < 0);
        }
        size_t kl = record_xattr_key(key, &ids[j], "\xff\xff\xff", 3);
        size_t xl = record_id_prefix(pre, REC_XATTR, &ids[j]);
        uint8_t xend[32];
        size_t xel = record_prefix_end(xend, pre, xl);
        CHECK(keycmp(key, kl, xend, xel) < 0);
        /* The inode record of the next type is not inside. */
        kl = record_id_prefix(key, REC_CHUNK + 1, &ids[j]);
        CHECK(keycmp(key, kl, end, el) >= 0);
    }
    /* An all-0xff id under 'C' ends at "D". */
    {
        uint8_t pre[32], end[32];
        size_t pl = record_id_prefix(pre, REC_CHUNK, &ids[1]);
        size_t el = record_prefix_end(end, pre, pl);
        CHECK(el == 1 && end[0] == 'D');
    }
}

/* ---- placement of records ---- */

static void test_placement(void)
{
    struct ino_id id, dir = sample_id();
    uint8_t key[RECORD_KEY_MAX + 8];
    uint64_t h;
    size_t n;

    record_id_make(&id, 0xdeadbeef01234567ull, 42);

    /* Entries: by (dir, name), with the rsync rule. */
    static const char *const names[] = {"x", "foo.c", ".x.AbC123", ".foo.c.AbC123", "..abcdef"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        size_t nl = strlen(names[i]);
        n = record_entry_key(key, &dir, names[i], nl);
        h = 0;
        CHECKF(record_placement(key, n, &h) == 0, "\"%s\"", names[i]);
        CHECKF(h == placement_entry_hash(dir.b, names[i], nl), "\"%s\"", names[i]);
    }
    n = record_entry_key(key, &dir, ".x.AbC123", 9);
    CHECK(record_placement(key, n, &h) == 0 && h == placement_entry_hash(dir.b, "x", 1));
    {
        char longname[RECORD_NAME_MAX];
        memset(longname, 'q', sizeof(longname));
        n = record_entry_key(key, &dir, longname, sizeof(longname));
        CHECK(record_placement(key, n, &h) == 0);
        CHECK(h == placement_entry_hash(dir.b, longname, sizeof(longname)));
        /* 256 bytes of name: longer than any entry key can be. */
        key[n] = 'q';
        CHECK(record_placement(key, n + 1, &h) == -EINVAL);
    }
    /* An entry key without a name is malformed. */
    n = record_id_prefix(key, REC_ENTRY, &dir);
    CHECK(record_placement(key, n, &h) == -EINVAL);

    /* Everything an inode owns goes where the id says: first 8 bytes, BE. */
    n = record_inode_key(key, &id);
    h = 0;
    CHECK(record_placement(key, n, &h) == 0 && h == 0xdeadbeef01234567ull);
    n = record_chunk_key(key, &id, 7);
    h = 0;
    CHECK(record_placement(key, n, &h) == 0 && h == 0xdeadbeef01234567ull);
    n = record_xattr_key(key, &id, "user.x", 6);
    h = 0;
    CHECK(record_placement(key, n, &h) == 0 && h == 0xdeadbeef01234567ull);
    n = record_orphan_key(key, &id);
    h = 0;
    CHECK(record_placement(key, n, &h) == 0 && h == 0xdeadbeef01234567ull);
    n = record_intent_key(key, &id);
    h = 0;
    CHECK(record_placement(key, n, &h) == 0 && h == 0xdeadbeef01234567ull);
    n = record_inode_key(key, &record_root_id);
    h = 1;
    CHECK(record_placement(key, n, &h) == 0 && h == 0);
    for (int i = 0; i < 100; i++) {
        uint64_t r = rng();
        record_id_make(&id, r, rng());
        n = record_chunk_key(key, &id, rng());
        CHECK(record_placement(key, n, &h) == 0 && h == r && h == record_id_hash(&id));
    }

    /* A new file's entry and inode land together (record.h): the inode id's
     * hash is the entry's placement hash. */
    uint64_t eh = placement_entry_hash(dir.b, "newfile", 7);
    record_id_make(&id, eh, 99);
    uint64_t a, b;
    n = record_entry_key(key, &dir, "newfile", 7);
    CHECK(record_placement(key, n, &a) == 0);
    n = record_inode_key(key, &id);
    CHECK(record_placement(key, n, &b) == 0);
    CHECK(a == b);

    /* Unplaced and malformed keys. */
    static const char *const bad_types = "MZAe\0\xff";
    for (int t = 0; t < 6; t++) {
        memset(key, 0x42, 40);
        key[0] = (uint8_t)bad_types[t];
        CHECKF(record_placement(key, 30, &h) == -EINVAL, "type 0x%02x", key[0]);
    }
    CHECK(record_placement((const uint8_t *)"Mseq", 4, &h) == -EINVAL);
    CHECK(record_placement((const uint8_t *)"Mshard", 6, &h) == -EINVAL);
    n = record_inode_key(key, &id);
    for (size_t len = 0; len < 17; len++)
        CHECKF(record_placement(key, len, &h) == -EINVAL, "inode key of %zu bytes", len);
    n = record_entry_key(key, &dir, "x", 1);
    for (size_t len = 0; len < 18; len++)
        CHECKF(record_placement(key, len, &h) == -EINVAL, "entry key of %zu bytes", len);
}

/* ---- values ---- */

static void fill_inode(struct inode *ino, uint32_t tail_len)
{
    memset(ino, 0, sizeof(*ino));
    record_id_make(&ino->id, 0xa1a2a3a4a5a6a7a8ull, 0xb1b2b3b4b5b6b7b8ull);
    ino->mode = S_IFREG | 04755;
    ino->uid = 0xfffffffeu;
    ino->gid = 0x12345678u;
    ino->nlink = 0x87654321u;
    ino->rdev = 0x0badcafeu;
    ino->flags = INODE_DYING | 0x80000000u;
    ino->size = 0xfedcba9876543210ull;
    ino->alloc = 0x0123456789abcdefull;
    ino->atime.tv_sec = 1700000000;
    ino->atime.tv_nsec = 999999999;
    ino->mtime.tv_sec = -1234567890; /* before 1970 */
    ino->mtime.tv_nsec = 1;
    ino->ctime.tv_sec = (time_t)0x7ffffffff; /* past 2038 */
    ino->ctime.tv_nsec = 500000000;
    record_id_make(&ino->parent, 0xc1c2c3c4c5c6c7c8ull, 0xd1d2d3d4d5d6d7d8ull);
    ino->tail_len = tail_len;
    for (uint32_t i = 0; i < tail_len && i < RECORD_TAIL_MAX; i++)
        ino->tail[i] = (uint8_t)(i * 7 + 3);
}

static int inode_equal(const struct inode *a, const struct inode *b)
{
    return memcmp(&a->id, &b->id, sizeof(a->id)) == 0 && a->mode == b->mode && a->uid == b->uid &&
           a->gid == b->gid && a->nlink == b->nlink && a->rdev == b->rdev && a->flags == b->flags &&
           a->size == b->size && a->alloc == b->alloc && a->atime.tv_sec == b->atime.tv_sec &&
           a->atime.tv_nsec == b->atime.tv_nsec && a->mtime.tv_sec == b->mtime.tv_sec &&
           a->mtime.tv_nsec == b->mtime.tv_nsec && a->ctime.tv_sec == b->ctime.tv_sec &&
           a->ctime.tv_nsec == b->ctime.tv_nsec &&
           memcmp(&a->parent, &b->parent, sizeof(a->parent)) == 0 && a->tail_len == b->tail_len &&
           memcmp(a->tail, b->tail, a->tail_len) == 0;
}

static void test_inode(void)
{
    static const uint32_t tails[] = {
        0, 1, 2, 100, RECORD_INLINE_MAX, RECORD_TAIL_MAX - 1, RECORD_TAIL_MAX};
    uint8_t *val = xmalloc(RECORD_INODE_MAX);
    struct inode in, *out = xmalloc(sizeof(*out));

    CHECK(RECORD_INODE_HDR == 100); /* the layout documented in record.c */
    CHECK(RECORD_INODE_MAX == RECORD_INODE_HDR + RECORD_TAIL_MAX);

    for (size_t t = 0; t < sizeof(tails) / sizeof(tails[0]); t++) {
        fill_inode(&in, tails[t]);
        size_t n = record_inode_encode(val, &in);
        CHECKF(n == RECORD_INODE_HDR + tails[t], "tail %u: length %zu", tails[t], n);

        /* The documented layout. */
        CHECK(val[0] == 1 && val[1] == 0 && val[2] == 0 && val[3] == 0);
        CHECK(le(val + 4, 4) == in.flags);
        CHECK(le(val + 8, 4) == in.mode);
        CHECK(le(val + 12, 4) == in.uid);
        CHECK(le(val + 16, 4) == in.gid);
        CHECK(le(val + 20, 4) == in.nlink);
        CHECK(le(val + 24, 4) == in.rdev);
        CHECK(le(val + 28, 4) == tails[t]);
        CHECK(le(val + 32, 8) == in.size);
        CHECK(le(val + 40, 8) == (uint64_t)in.atime.tv_sec);
        CHECK(le(val + 48, 8) == (uint64_t)in.mtime.tv_sec);
        CHECK(le(val + 56, 8) == (uint64_t)in.ctime.tv_sec);
        CHECK(le(val + 64, 4) == (uint64_t)in.atime.tv_nsec);
        CHECK(le(val + 68, 4) == (uint64_t)in.mtime.tv_nsec);
        CHECK(le(val + 72, 4) == (uint64_t)in.ctime.tv_nsec);
        CHECK(memcmp(val + 76, in.parent.b, 16) == 0);
        CHECK(le(val + 92, 8) == in.alloc);
        CHECK(memcmp(val + 100, in.tail, tails[t]) == 0);
        /* The id is not stored: it is the key. */
        CHECK(memmem(val, n, in.id.b, 16) == NULL);

        /* Round trip, from an exactly-sized buffer. */
        uint8_t *exact = xmalloc(n);
        memcpy(exact, val, n);
        memset(out, 0x77, sizeof(*out));
        CHECKF(record_inode_decode(exact, n, &in.id, out) == 0, "tail %u", tails[t]);
        CHECKF(inode_equal(&in, out), "tail %u: round trip differs", tails[t]);

        /* The id comes from the caller, not from the value. */
        struct ino_id other;
        record_id_make(&other, 5, 6);
        CHECK(record_inode_decode(exact, n, &other, out) == 0);
        CHECK(memcmp(&out->id, &other, sizeof(other)) == 0);

        /* Wrong versions. */
        static const uint8_t versions[] = {0, 2, 0x81, 0xff};
        for (size_t v = 0; v < sizeof(versions); v++) {
            exact[0] = versions[v];
            CHECKF(record_inode_decode(exact, n, &in.id, out) == -EIO, "version %u", versions[v]);
        }
        exact[0] = 1;

        /* Every shorter length (tail_len no longer matches, or no header). */
        for (size_t len = 0; len < n; len++) {
            uint8_t *p = xmalloc(len);
            memcpy(p, exact, len);
            CHECKF(record_inode_decode(p, len, &in.id, out) == -EIO, "tail %u, %zu of %zu bytes",
                   tails[t], len, n);
            free(p);
        }
        free(exact);

        /* One byte too many. */
        uint8_t *longer = xmalloc(n + 1);
        memcpy(longer, val, n);
        longer[n] = 0;
        CHECK(record_inode_decode(longer, n + 1, &in.id, out) == -EIO);
        free(longer);
    }

    /* A tail_len field that disagrees with the length, either way. */
    fill_inode(&in, 10);
    size_t n = record_inode_encode(val, &in);
    static const uint32_t wrong[] = {0, 9, 11, RECORD_TAIL_MAX, RECORD_TAIL_MAX + 1, 0xffffffffu};
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        uint8_t *p = xmalloc(n);
        memcpy(p, val, n);
        p[28] = (uint8_t)wrong[i];
        p[29] = (uint8_t)(wrong[i] >> 8);
        p[30] = (uint8_t)(wrong[i] >> 16);
        p[31] = (uint8_t)(wrong[i] >> 24);
        CHECKF(record_inode_decode(p, n, &in.id, out) == -EIO, "tail_len %u in %zu bytes", wrong[i],
               n);
        free(p);
    }
    /* tail_len > RECORD_TAIL_MAX even when the length would match. */
    {
        size_t len = RECORD_INODE_HDR + RECORD_TAIL_MAX + 1;
        uint8_t *p = xmalloc(len);
        fill_inode(&in, 0);
        record_inode_encode(p, &in);
        memset(p + RECORD_INODE_HDR, 'x', RECORD_TAIL_MAX + 1);
        p[28] = (uint8_t)(RECORD_TAIL_MAX + 1);
        p[29] = (uint8_t)((RECORD_TAIL_MAX + 1) >> 8);
        CHECK(record_inode_decode(p, len, &in.id, out) == -EIO);
        free(p);
    }
    /* encode clamps a tail_len beyond RECORD_TAIL_MAX. */
    fill_inode(&in, RECORD_TAIL_MAX);
    in.tail_len = RECORD_TAIL_MAX + 100;
    n = record_inode_encode(val, &in);
    CHECK(n == RECORD_INODE_MAX);
    CHECK(le(val + 28, 4) == RECORD_TAIL_MAX);
    CHECK(record_inode_decode(val, n, &in.id, out) == 0 && out->tail_len == RECORD_TAIL_MAX);

    /* Extremes of every field. */
    memset(&in, 0, sizeof(in));
    in.mode = 0xffffffffu;
    in.uid = in.gid = in.nlink = in.rdev = in.flags = 0xffffffffu;
    in.size = UINT64_MAX;
    in.alloc = UINT64_MAX;
    in.atime.tv_sec = INT64_MIN;
    in.mtime.tv_sec = INT64_MAX;
    in.ctime.tv_sec = 0;
    in.atime.tv_nsec = in.mtime.tv_nsec = in.ctime.tv_nsec = 999999999;
    memset(in.parent.b, 0xff, 16);
    n = record_inode_encode(val, &in);
    CHECK(n == RECORD_INODE_HDR);
    CHECK(record_inode_decode(val, n, &in.id, out) == 0 && inode_equal(&in, out));
    memset(&in, 0, sizeof(in));
    n = record_inode_encode(val, &in);
    CHECK(record_inode_decode(val, n, &in.id, out) == 0 && inode_equal(&in, out));

    free(out);
    free(val);
}

static void test_entry(void)
{
    struct ino_id id = sample_id(), got;
    uint8_t val[RECORD_ENTRY_LEN], dtype = 0;
    static const uint8_t dtypes[] = {DT_REG, DT_DIR, DT_LNK,     DT_FIFO, DT_SOCK,
                                     DT_CHR, DT_BLK, DT_UNKNOWN, 0xff};

    CHECK(RECORD_ENTRY_LEN == 17);
    for (size_t i = 0; i < sizeof(dtypes); i++) {
        record_entry_encode(val, &id, dtypes[i]);
        CHECK(memcmp(val, id.b, 16) == 0 && val[16] == dtypes[i]);
        uint8_t *p = xmalloc(RECORD_ENTRY_LEN);
        memcpy(p, val, RECORD_ENTRY_LEN);
        memset(&got, 0, sizeof(got));
        dtype = 0x55;
        CHECK(record_entry_decode(p, RECORD_ENTRY_LEN, &got, &dtype) == 0);
        CHECK(memcmp(&got, &id, sizeof(id)) == 0 && dtype == dtypes[i]);
        free(p);
    }
    uint8_t big[RECORD_ENTRY_LEN + 8] = {0};
    static const size_t bad_lens[] = {0, 1, 15, 16, 18, 24};
    for (size_t i = 0; i < sizeof(bad_lens) / sizeof(bad_lens[0]); i++) {
        uint8_t *p = xmalloc(bad_lens[i]);
        memcpy(p, big, bad_lens[i]);
        CHECKF(record_entry_decode(p, bad_lens[i], &got, &dtype) == -EIO, "length %zu",
               bad_lens[i]);
        free(p);
    }
}

int main(void)
{
    test_ids();
    test_keys();
    test_prefix_end();
    test_placement();
    test_inode();
    test_entry();
    return check_summary("record");
}
