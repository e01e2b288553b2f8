/* test_placement.c -- unit tests for backend/placement.c.
 *
 * Covers: the rsync temporary-name rule (a table of names that match and names
 * that must not), placement_entry_hash against an independent computation of
 * XXH3_64(dir id || name, seed 0) (which pins placement to XXH3 with seed 0) and
 * against frozen golden constants, placement_shard_of for every power-of-two
 * count, the shard-split property (doubling the count moves exactly the hashes
 * whose bit log2(N) is set, from s to s + N), and placement_valid_count.
 * Exits non-zero on any failed check.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "placement.h"
#include "check.h"

/* Deterministic pseudo-random numbers (splitmix64). */
static uint64_t rng_state = 0x5eed5eed12345678ull;
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The reference: XXH3_64, seed 0, over the 16 id bytes followed by the name. */
static uint64_t ref_hash(const uint8_t dir[16], const char *name, size_t nlen)
{
    uint8_t buf[16 + 512];
    memcpy(buf, dir, 16);
    memcpy(buf + 16, name, nlen);
    return XXH3_64bits(buf, 16 + nlen);
}

/* ---- placement_rsync_base ---- */

static const struct rsync_case {
    const char *name;
    const char *base; /* NULL: must not match */
} rsync_cases[] = {
    {".foo.c.AbC123", "foo.c"},
    {".a.XXXXXX", "a"}, /* exactly 9 bytes, the shortest match */
    {".foo.abcdef", "foo"},
    {".foo.ABCDEF", "foo"},
    {".foo.000000", "foo"},
    {".foo.zZ9aA0", "foo"},
    {".foo.bar.Qw3rTy", "foo.bar"},
    {"..foo.abcdef", ".foo"}, /* temp name of the dot file ".foo" */
    {"...abcdef", "."},       /* NAME is the single byte "." */
    {".a b.abc123", "a b"},
    {".\xc3\xa9t\xc3\xa9.abc123", "\xc3\xa9t\xc3\xa9"}, /* UTF-8 NAME is fine */
    {"foo", NULL},
    {"", NULL},
    {".", NULL},
    {"..", NULL},
    {".foo", NULL},
    {".foo.abc", NULL},     /* only 3 characters after the dot */
    {".foo.abcde", NULL},   /* 5 */
    {".foo.abcdefg", NULL}, /* 7: the byte 7 from the end is not a dot */
    {".foo.abc12!", NULL},  /* not alphanumeric */
    {".foo.abc_12", NULL},
    {".foo.abc-12", NULL},
    {".foo.abc 12", NULL},
    {".foo.abc.12", NULL},
    {".foo.abcd\xc3\xa9", NULL}, /* non-ASCII is not [A-Za-z0-9] */
    {"..abcdef", NULL},          /* empty NAME */
    {"foo.abcdef", NULL},        /* no leading dot */
    {"xa.abcdef", NULL},         /* 9 bytes, no leading dot */
    {".ab.cdefg", NULL},         /* 9 bytes, dot in the wrong place */
    {".abcdefgh", NULL},         /* 9 bytes, no second dot */
    {"a.a.abcdef", NULL},
    {".foo.abcdef.", NULL},
    {".foo.abcdef ", NULL},
};

static void test_rsync_base(void)
{
    for (size_t i = 0; i < sizeof(rsync_cases) / sizeof(rsync_cases[0]); i++) {
        const struct rsync_case *c = &rsync_cases[i];
        size_t nlen = strlen(c->name);
        const char *sentinel = "untouched", *base = sentinel;
        size_t base_len = 12345;
        int rc = placement_rsync_base(c->name, nlen, &base, &base_len);

        if (c->base) {
            CHECKF(rc == 1, "\"%s\": rc %d, want a match", c->name, rc);
            if (rc != 1)
                continue;
            CHECKF(base == c->name + 1, "\"%s\": NAME must point into the name", c->name);
            CHECKF(base_len == strlen(c->base) && memcmp(base, c->base, base_len) == 0,
                   "\"%s\": base \"%.*s\", want \"%s\"", c->name, (int)base_len, base, c->base);
        } else {
            CHECKF(rc == 0, "\"%s\": rc %d, want no match", c->name, rc);
            CHECKF(base == sentinel && base_len == 12345, "\"%s\": outputs written on no match",
                   c->name);
        }
    }

    /* name_len, not NUL termination, decides: a matching prefix of a longer
     * buffer matches, and a NUL inside the suffix does not. */
    const char *longer = ".foo.abcdefXYZ";
    const char *base = NULL;
    size_t base_len = 0;
    CHECK(placement_rsync_base(longer, 11, &base, &base_len) == 1);
    CHECK(base_len == 3 && memcmp(base, "foo", 3) == 0);
    CHECK(placement_rsync_base(".foo.abc\0ef", 11, &base, &base_len) == 0);

    /* A 255-byte name (the longest a directory entry can have). */
    char big[256];
    memset(big, 'n', sizeof(big));
    big[0] = '.';
    memcpy(big + 255 - 7, ".R4nd0m", 7);
    CHECK(placement_rsync_base(big, 255, &base, &base_len) == 1);
    CHECK(base == big + 1 && base_len == 255 - 8);
}

/* ---- placement_entry_hash ---- */

static void test_entry_hash(void)
{
    uint8_t dir[16], dir2[16], zero[16] = {0};
    for (int i = 0; i < 16; i++) {
        dir[i] = (uint8_t)(0xa0 + i);
        dir2[i] = dir[i];
    }
    dir2[15] ^= 1; /* differs in one bit */

    /* The library itself: the published XXH3_64 of the empty input. */
    CHECK(XXH3_64bits("", 0) == 0x2D06800538D394C2ull);

    /* Independent computation for a table of names. */
    static const char *const names[] = {
        "x",
        "foo.c",
        "a",
        "README",
        "Makefile",
        ".hidden",
        ".foo.abc",
        "name with spaces",
        "\xc3\xa9t\xc3\xa9",
        "..abcdef",
        ".foo.abc12!",
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        size_t n = strlen(names[i]);
        CHECKF(placement_entry_hash(dir, names[i], n) == ref_hash(dir, names[i], n), "\"%s\"",
               names[i]);
        CHECKF(placement_entry_hash(zero, names[i], n) == ref_hash(zero, names[i], n), "\"%s\"",
               names[i]);
        CHECKF(placement_entry_hash(dir, names[i], n) != placement_entry_hash(dir2, names[i], n),
               "\"%s\": another directory must give another hash", names[i]);
    }

    /* Random names of every length up to 255 bytes. */
    for (int len = 1; len <= 255; len++) {
        char name[256];
        for (int j = 0; j < len; j++)
            name[j] = (char)('a' + rng() % 26);
        CHECKF(placement_entry_hash(dir, name, (size_t)len) == ref_hash(dir, name, (size_t)len),
               "random name of %d bytes", len);
    }

    /* The rsync rule: a temporary name hashes like its final name. */
    CHECK(placement_entry_hash(dir, ".x.AbC123", 9) == placement_entry_hash(dir, "x", 1));
    CHECK(placement_entry_hash(dir, ".x.AbC123", 9) == ref_hash(dir, "x", 1));
    CHECK(placement_entry_hash(dir, ".foo.c.AbC123", 13) == placement_entry_hash(dir, "foo.c", 5));
    CHECK(placement_entry_hash(dir2, ".x.AbC123", 9) == placement_entry_hash(dir2, "x", 1));
    CHECK(placement_entry_hash(dir, ".x.AbC123", 9) != placement_entry_hash(dir2, ".x.AbC123", 9));
    /* Not temporary names: hashed as they are. */
    CHECK(placement_entry_hash(dir, ".x.AbC12", 8) == ref_hash(dir, ".x.AbC12", 8));
    CHECK(placement_entry_hash(dir, ".x.AbC12", 8) != placement_entry_hash(dir, "x", 1));
    CHECK(placement_entry_hash(dir, ".x.AbC1!", 8) == ref_hash(dir, ".x.AbC1!", 8));
    /* Every temp suffix of a name lands where the name does. */
    for (int i = 0; i < 100; i++) {
        static const char alnum[] =
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        char tmp[32] = ".data.bin.";
        for (int j = 0; j < 6; j++)
            tmp[10 + j] = alnum[rng() % 62];
        CHECKF(placement_entry_hash(dir, tmp, 16) == placement_entry_hash(dir, "data.bin", 8),
               "%.16s", tmp);
    }

    /* Frozen golden values: placement must never change between versions,
     * or every node would look for records in the wrong shard. */
    static const struct {
        uint8_t first; /* dir = first, first+1, ..., first+15 */
        const char *name;
        uint64_t hash;
    } golden[] = {
        {0x00, "x", 0x386d4c309f1ae9b8ull},
        {0x10, "foo.c", 0x3c4b4d26849dd35bull},
        {0xf0, "a-much-longer-file-name-to-cross-the-16-byte-boundary.txt", 0x2c2547973bb86f85ull},
    };
    for (size_t i = 0; i < sizeof(golden) / sizeof(golden[0]); i++) {
        uint8_t d[16];
        for (int j = 0; j < 16; j++)
            d[j] = (uint8_t)(golden[i].first + j);
        uint64_t h = placement_entry_hash(d, golden[i].name, strlen(golden[i].name));
        CHECKF(h == golden[i].hash, "\"%s\": 0x%016llx, want 0x%016llx", golden[i].name,
               (unsigned long long)h, (unsigned long long)golden[i].hash);
    }
}

/* ---- shards ---- */

static void test_shard_of(void)
{
    for (int i = 0; i < 1000; i++) {
        uint64_t h = rng();
        for (unsigned n = 1; n <= PLACEMENT_MAX_SHARDS; n *= 2) {
            unsigned s = placement_shard_of(h, n);
            CHECKF(s == (unsigned)(h & (n - 1)), "h=%016llx n=%u", (unsigned long long)h, n);
            CHECK(s < n);
        }
    }
    CHECK(placement_shard_of(UINT64_MAX, 1) == 0);
    CHECK(placement_shard_of(UINT64_MAX, 1024) == 1023);
    CHECK(placement_shard_of(0, 1024) == 0);
    CHECK(placement_shard_of(0x400, 1024) == 0);
    CHECK(placement_shard_of(0x3ff, 1024) == 1023);
}

/* Doubling N splits shard s into s and s + N: a record moves iff bit log2(N)
 * of its hash is set, and never anywhere else. */
static void test_split(void)
{
    uint8_t dir[16];
    unsigned moved[17] = {0};

    for (int i = 0; i < 16; i++)
        dir[i] = (uint8_t)rng();
    for (int i = 0; i < 10000; i++) {
        char name[32];
        int nlen = snprintf(name, sizeof(name), "file-%d-%08llx", i,
                            (unsigned long long)(rng() & 0xffffffffu));
        uint64_t h = placement_entry_hash(dir, name, (size_t)nlen);
        unsigned bit = 0;
        for (unsigned n = 1; n < PLACEMENT_MAX_SHARDS; n *= 2, bit++) {
            unsigned a = placement_shard_of(h, n), b = placement_shard_of(h, 2 * n);
            int set = (int)((h >> bit) & 1);
            if (!(b == a || b == a + n) || (b == a + n) != set) {
                CHECKF(0, "h=%016llx N=%u: shard %u -> %u", (unsigned long long)h, n, a, b);
                break;
            }
            moved[bit] += set;
        }
    }
    /* The hash is spread: about half the records move at every split. */
    for (unsigned bit = 0; bit < 16; bit++)
        CHECKF(moved[bit] > 4500 && moved[bit] < 5500, "bit %u: %u of 10000 move", bit, moved[bit]);
}

static void test_valid_count(void)
{
    static const struct {
        unsigned long n;
        int valid;
    } cases[] = {
        {0, 0},
        {1, 1},
        {2, 1},
        {3, 0},
        {4, 1},
        {5, 0},
        {6, 0},
        {7, 0},
        {8, 1},
        {12, 0},
        {1023, 0},
        {1024, 1},
        {1025, 0},
        {32768, 1},
        {49152, 0},
        {65535, 0},
        {65536, 1},
        {65537, 0},
        {131072, 0},
        {1ul << 20, 0},
        {0x80000000ul, 0},
        {ULONG_MAX, 0},
        {ULONG_MAX / 2 + 1, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        CHECKF(placement_valid_count(cases[i].n) == cases[i].valid, "n=%lu: want %d", cases[i].n,
               cases[i].valid);
    for (unsigned long n = 1; n <= PLACEMENT_MAX_SHARDS; n *= 2)
        CHECKF(placement_valid_count(n) == 1, "n=%lu", n);
}

/* ---- layouts ---- */

/* The reference home of h: the one shard (s, d) of the list with
 * h & (2^d - 1) == s; -1 if none or several claim it. */
static int ref_home(const unsigned *id, const unsigned *dep, unsigned n, uint64_t h)
{
    int home = -1;

    for (unsigned k = 0; k < n; k++)
        if ((h & ((1ull << dep[k]) - 1)) == id[k]) {
            if (home >= 0)
                return -1;
            home = (int)id[k];
        }
    return home;
}

/* Random splits and merges from 4 uniform shards: after every step the
 * layout is valid, its shards are exactly the reference list, every hash's
 * home is the reference's, and a split moved exactly the hashes of s with
 * bit d set. */
static void test_layout(void)
{
    uint8_t depth[1024];
    unsigned slots = 4, id[1024], dep[1024], n = 4, max = 1024;

    for (unsigned i = 0; i < 4; i++) {
        depth[i] = 2;
        id[i] = i;
        dep[i] = 2;
    }
    CHECK_RC(placement_layout_check(depth, slots), 0);
    for (int step = 0; step < 400; step++) {
        unsigned k = (unsigned)(rng() % n), s = id[k], d = dep[k], into = 0;
        int split = n < 40 && (rng() % 3) != 0;

        if (split) {
            int rc = placement_split(depth, &slots, max, s);
            if ((2u << d) > max) {
                CHECK_RC(rc, -ENOSPC);
                continue;
            }
            CHECK_RC(rc, 0);
            dep[k] = d + 1;
            id[n] = s + (1u << d);
            dep[n++] = d + 1;
        } else {
            unsigned buddy = s ^ (1u << (d - 1)), b = n;
            if (d == 0)
                continue;
            for (unsigned j = 0; j < n; j++)
                if (id[j] == buddy && dep[j] == d)
                    b = j;
            int rc = placement_merge(depth, &slots, s, &into);
            if (b == n) {
                CHECK_RC(rc, -EBUSY);
                continue;
            }
            CHECK_RC(rc, 0);
            CHECK(into == (s < buddy ? s : buddy));
            unsigned keep = s < buddy ? k : b, gone = s < buddy ? b : k;
            dep[keep] = d - 1;
            id[gone] = id[n - 1];
            dep[gone] = dep[n - 1];
            n--;
        }
        CHECK_RC(placement_layout_check(depth, slots), 0);
        unsigned deepest = 0, count = 0;
        for (unsigned j = 0; j < n; j++)
            deepest = dep[j] > deepest ? dep[j] : deepest;
        CHECKF(slots == 1u << deepest, "slots %u, deepest %u", slots, deepest);
        for (unsigned i = 0; i < slots; i++)
            count += (unsigned)placement_is_shard(depth, i);
        CHECKF(count == n, "%u shards in the layout, %u in the reference", count, n);
        for (int t = 0; t < 200; t++) {
            uint64_t h = rng();
            int want = ref_home(id, dep, n, h);
            unsigned got = placement_home(h, depth, slots);
            if ((int)got != want) {
                CHECKF(0, "step %d h=%016llx: home %u, want %d", step, (unsigned long long)h,
                       got, want);
                break;
            }
            if (split && want == (int)s + (1 << d))
                CHECK(((h >> d) & 1) && (h & ((1ull << d) - 1)) == s);
        }
    }
    /* Bad input. */
    unsigned one = 1, none = 0;
    uint8_t flat[2] = {1, 1};
    CHECK_RC(placement_split(flat, &one, 2, 1), -EINVAL);  /* slot out of range */
    CHECK_RC(placement_merge(flat, &one, 0, &none), -EINVAL); /* depth 1 needs 2 slots */
    flat[0] = 0;
    CHECK_RC(placement_layout_check(flat, 2), -EINVAL);      /* slot 1 disagrees */
    CHECK_RC(placement_layout_check(flat, 3), -EINVAL);      /* not a power of two */
}

int main(void)
{
    test_layout();
    test_rsync_base();
    test_entry_hash();
    test_shard_of();
    test_split();
    test_valid_count();
    return check_summary("placement");
}
