/* test_batch.c -- unit tests for backend/batch.c.
 *
 * Covers: building batches with every op and walking them back with
 * batch_next (every field of every item), the exact byte layout of the
 * encoding, batch_validate counts, the limits (empty key, 511/512-byte keys,
 * BATCH_VALUE_MAX, BATCH_MAX) and the sticky b->error, batch_reset/batch_free,
 * and the decoder's robustness: every prefix of a valid encoding, every single
 * byte flipped, bad op bytes and huge lengths are rejected with -EINVAL (or,
 * when the mutation happens to still be a valid encoding, decoded without
 * reading outside the buffer). Mutated encodings are copied into exactly-sized
 * malloc'd buffers so that ASan catches any out-of-bounds read.
 * Exits non-zero on any failed check.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"
#include "check.h"
#include "test_util.h"

static void put_u32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static int op_has_value(enum batch_op op)
{
    return op == BATCH_PUT || op == BATCH_DEL_RANGE || op == BATCH_ASSERT_VALUE ||
           op == BATCH_ASSERT_EMPTY || op == BATCH_AWAIT_VALUE;
}

/* ---- a table of operations, built and walked back ---- */

struct op_case {
    enum batch_op op;
    const char *key;
    size_t klen; /* 0: strlen(key) */
    const char *val;
    size_t vlen; /* 0 with val != NULL: strlen(val) */
};

static const struct op_case ops[] = {
    {BATCH_PUT, "key1", 0, "value1", 0},
    {BATCH_PUT, "empty-value", 0, "", 0},
    {BATCH_PUT, "bin\0key", 7, "bin\0\xff\0val", 8},
    {BATCH_DEL, "gone", 0, NULL, 0},
    {BATCH_DEL, "del-with-ignored-value", 0, "ignored", 0}, /* DEL carries no value */
    {BATCH_DEL_RANGE, "a", 0, "b", 0},
    {BATCH_DEL_RANGE, "C\x01", 2, "C\x02", 2},
    {BATCH_ASSERT_ABSENT, "must-not-exist", 0, NULL, 0},
    {BATCH_ASSERT_ABSENT, "absent-ignored", 0, "ignored", 0},
    {BATCH_ASSERT_VALUE, "k", 0, "expected", 0},
    {BATCH_ASSERT_VALUE, "k-empty", 0, "", 0},
    {BATCH_ASSERT_EMPTY, "R\x01", 2, "R\x02", 2},
    {BATCH_PUT, "\xff", 1, "x", 0},
};
#define NOPS (sizeof(ops) / sizeof(ops[0]))

static size_t case_klen(const struct op_case *c)
{
    return c->klen ? c->klen : strlen(c->key);
}

static size_t case_vlen(const struct op_case *c)
{
    if (!c->val)
        return 0;
    return c->vlen ? c->vlen : strlen(c->val);
}

static void build_ops(struct batch *b)
{
    batch_init(b);
    for (size_t i = 0; i < NOPS; i++) {
        int rc =
            batch_add(b, ops[i].op, ops[i].key, case_klen(&ops[i]), ops[i].val, case_vlen(&ops[i]));
        CHECKF(rc == 0, "op %zu: rc %d", i, rc);
    }
}

/* Walk buf and compare every item against the table. */
static void walk_ops(const uint8_t *buf, size_t len)
{
    struct batch_item it;
    size_t pos = 0;
    int rc;

    for (size_t i = 0; i < NOPS; i++) {
        const struct op_case *c = &ops[i];
        size_t klen = case_klen(c), vlen = op_has_value(c->op) ? case_vlen(c) : 0;

        rc = batch_next(buf, len, &pos, &it);
        CHECKF(rc == 1, "item %zu: rc %d", i, rc);
        if (rc != 1)
            return;
        CHECKF(it.op == c->op, "item %zu: op %d, want %d", i, (int)it.op, (int)c->op);
        CHECKF(it.klen == klen && memcmp(it.key, c->key, klen) == 0, "item %zu: key", i);
        CHECKF(it.key >= buf && it.key + it.klen <= buf + len, "item %zu: key outside", i);
        if (op_has_value(c->op)) {
            CHECKF(it.val != NULL, "item %zu: value pointer", i);
            CHECKF(it.vlen == vlen, "item %zu: vlen %zu, want %zu", i, it.vlen, vlen);
            CHECKF(it.val && (vlen == 0 || memcmp(it.val, c->val, vlen) == 0), "item %zu: value",
                   i);
            CHECKF(it.val >= buf && it.val + it.vlen <= buf + len, "item %zu: value outside", i);
        } else {
            CHECKF(it.val == NULL && it.vlen == 0, "item %zu: op without value has one", i);
        }
        CHECK(pos <= len);
    }
    size_t end = pos;
    rc = batch_next(buf, len, &pos, &it);
    CHECKF(rc == 0, "after the last item: rc %d", rc);
    CHECK(pos == end && pos == len);
    /* At the end it stays at the end. */
    CHECK(batch_next(buf, len, &pos, &it) == 0);
}

static void test_roundtrip(void)
{
    struct batch b;

    batch_init(&b);
    CHECK(b.buf == NULL && b.len == 0 && b.count == 0 && b.error == 0);
    CHECK(batch_validate(b.buf, 0) == 0);

    build_ops(&b);
    CHECK(b.error == 0);
    CHECK(b.count == NOPS);
    CHECK(b.len <= b.cap);
    CHECK(batch_validate(b.buf, b.len) == (int)NOPS);
    walk_ops(b.buf, b.len);

    /* The encoded length is exactly the sum of the documented fields. */
    size_t want = 0;
    for (size_t i = 0; i < NOPS; i++)
        want += 1 + 4 + case_klen(&ops[i]) + (op_has_value(ops[i].op) ? 4 + case_vlen(&ops[i]) : 0);
    CHECKF(b.len == want, "len %zu, want %zu", b.len, want);

    /* Also from an exactly-sized copy. */
    uint8_t *copy = xmemdup(b.buf, b.len);
    walk_ops(copy, b.len);
    free(copy);

    /* reset keeps the buffer, empties the batch; it can be reused. */
    uint8_t *old = b.buf;
    size_t cap = b.cap;
    batch_reset(&b);
    CHECK(b.len == 0 && b.count == 0 && b.error == 0);
    CHECK(b.buf == old && b.cap == cap);
    CHECK(batch_put(&b, "k", 1, "v", 1) == 0);
    CHECK(b.count == 1 && batch_validate(b.buf, b.len) == 1);

    batch_free(&b);
    CHECK(b.buf == NULL && b.len == 0 && b.cap == 0 && b.count == 0 && b.error == 0);
    batch_free(&b); /* twice is harmless */
}

/* The byte layout: op:u8 klen:u32le key [vlen:u32le value]. */
static void test_layout(void)
{
    struct batch b;
    /* clang-format off */
    static const uint8_t want[] = {
        BATCH_PUT, 3, 0, 0, 0, 'a', 'b', 'c', 2, 0, 0, 0, 'x', 'y',
        BATCH_DEL, 1, 0, 0, 0, 'd',
        BATCH_DEL_RANGE, 1, 0, 0, 0, 'e', 1, 0, 0, 0, 'f',
        BATCH_ASSERT_ABSENT, 2, 0, 0, 0, 'g', 'h',
        BATCH_ASSERT_VALUE, 1, 0, 0, 0, 'i', 0, 0, 0, 0,
    };
    /* clang-format on */

    batch_init(&b);
    CHECK(batch_put(&b, "abc", 3, "xy", 2) == 0);
    CHECK(batch_del(&b, "d", 1) == 0);
    CHECK(batch_add(&b, BATCH_DEL_RANGE, "e", 1, "f", 1) == 0);
    CHECK(batch_add(&b, BATCH_ASSERT_ABSENT, "gh", 2, NULL, 0) == 0);
    CHECK(batch_add(&b, BATCH_ASSERT_VALUE, "i", 1, NULL, 0) == 0);
    CHECK(b.count == 5);
    CHECKF(b.len == sizeof(want), "len %zu", b.len);
    CHECK(b.len == sizeof(want) && memcmp(b.buf, want, sizeof(want)) == 0);

    /* A key length of 0x00000102 is little-endian on the wire. */
    uint8_t key[258];
    memset(key, 'k', sizeof(key));
    batch_reset(&b);
    CHECK(batch_del(&b, key, sizeof(key)) == 0);
    CHECK(b.len == 1 + 4 + 258);
    CHECK(b.buf[1] == 0x02 && b.buf[2] == 0x01 && b.buf[3] == 0 && b.buf[4] == 0);
    batch_free(&b);
}

/* ---- limits and the sticky error ---- */

static void test_limits(void)
{
    struct batch b;
    uint8_t key[BATCH_KEY_MAX + 2];
    memset(key, 'k', sizeof(key));

    /* Key lengths. */
    static const struct {
        size_t klen;
        int rc;
    } keys[] = {
        {0, -EINVAL}, {1, 0}, {255, 0}, {BATCH_KEY_MAX, 0}, {BATCH_KEY_MAX + 1, -ENAMETOOLONG},
    };
    static const enum batch_op all_ops[] = {BATCH_PUT,          BATCH_DEL,
                                            BATCH_DEL_RANGE,    BATCH_ASSERT_ABSENT,
                                            BATCH_ASSERT_VALUE, BATCH_ASSERT_EMPTY};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        for (size_t o = 0; o < sizeof(all_ops) / sizeof(all_ops[0]); o++) {
            batch_init(&b);
            int rc = batch_add(&b, all_ops[o], key, keys[i].klen, "v", 1);
            CHECKF(rc == keys[i].rc, "op %d klen %zu: rc %d, want %d", (int)all_ops[o],
                   keys[i].klen, rc, keys[i].rc);
            CHECK(b.error == keys[i].rc);
            CHECK(b.count == (rc == 0 ? 1u : 0u));
            CHECK(batch_validate(b.buf, b.len) == (int)b.count);
            batch_free(&b);
        }
    }

    /* Value length: BATCH_VALUE_MAX is fine, one more byte is -EFBIG. */
    uint8_t *big = xmalloc(BATCH_VALUE_MAX + 1);
    memset(big, 0xab, BATCH_VALUE_MAX + 1);
    batch_init(&b);
    CHECK(batch_put(&b, "big", 3, big, BATCH_VALUE_MAX) == 0);
    CHECK(b.count == 1 && b.error == 0);
    CHECK(batch_validate(b.buf, b.len) == 1);
    {
        struct batch_item it;
        size_t pos = 0;
        CHECK(batch_next(b.buf, b.len, &pos, &it) == 1);
        CHECK(it.vlen == BATCH_VALUE_MAX && it.val[0] == 0xab && it.val[it.vlen - 1] == 0xab);
    }
    batch_reset(&b);
    CHECK(batch_put(&b, "big", 3, big, BATCH_VALUE_MAX + 1) == -EFBIG);
    CHECK(b.error == -EFBIG && b.count == 0 && b.len == 0);
    batch_reset(&b);
    CHECK(batch_add(&b, BATCH_ASSERT_VALUE, "big", 3, big, BATCH_VALUE_MAX + 1) == -EFBIG);
    batch_reset(&b);
    CHECK(batch_add(&b, BATCH_DEL_RANGE, "big", 3, big, BATCH_VALUE_MAX + 1) == -EFBIG);
    /* Ops without a value ignore vlen. */
    batch_reset(&b);
    CHECK(batch_add(&b, BATCH_DEL, "k", 1, big, BATCH_VALUE_MAX + 1) == 0);
    CHECK(batch_add(&b, BATCH_ASSERT_ABSENT, "k", 1, big, BATCH_VALUE_MAX + 1) == 0);
    CHECK(b.len == 2 * (1 + 4 + 1));

    /* The whole batch: three 16 MiB values fit in BATCH_MAX (64 MiB), the
     * fourth does not, and leaves the batch as it was. */
    batch_reset(&b);
    for (int i = 0; i < 3; i++)
        CHECK(batch_put(&b, "big", 3, big, BATCH_VALUE_MAX) == 0);
    size_t len3 = b.len;
    CHECK(batch_put(&b, "big", 3, big, BATCH_VALUE_MAX) == -EFBIG);
    CHECK(b.error == -EFBIG && b.count == 3 && b.len == len3);
    CHECK(batch_validate(b.buf, b.len) == 3);
    batch_free(&b);
    free(big);

    /* Sticky error: after a failure, adds fail with the first error and
     * change nothing, until batch_reset. */
    batch_init(&b);
    CHECK(batch_put(&b, "a", 1, "1", 1) == 0);
    size_t len1 = b.len;
    CHECK(batch_put(&b, key, BATCH_KEY_MAX + 1, "2", 1) == -ENAMETOOLONG);
    CHECK(batch_put(&b, "b", 1, "3", 1) == -ENAMETOOLONG);
    CHECK(batch_put(&b, "", 0, "3", 1) == -ENAMETOOLONG); /* the first error stays */
    CHECK(batch_del(&b, "c", 1) == -ENAMETOOLONG);
    CHECK(b.error == -ENAMETOOLONG && b.count == 1 && b.len == len1);
    CHECK(batch_validate(b.buf, b.len) == 1);
    batch_reset(&b);
    CHECK(b.error == 0);
    CHECK(batch_put(&b, "b", 1, "3", 1) == 0 && b.count == 1);
    batch_reset(&b);
    CHECK(batch_put(&b, "", 0, "v", 1) == -EINVAL);
    CHECK(batch_put(&b, "ok", 2, "v", 1) == -EINVAL);
    CHECK(b.error == -EINVAL && b.count == 0);
    batch_free(&b);

    /* An over-long length is rejected before anything is read. */
    CHECK(batch_validate(key, (size_t)BATCH_MAX + 1) == -EINVAL);
}

/* ---- malformed encodings ---- */

/* Decode buf (exactly len bytes, on the heap) all the way; check the result
 * is -EINVAL or a consistent walk within bounds. Returns validate's result. */
static int decode_all(const uint8_t *src, size_t len)
{
    uint8_t *buf = xmemdup(src, len);
    struct batch_item it;
    size_t pos = 0, prev;
    int rc, n = 0;

    for (;;) {
        prev = pos;
        memset(&it, 0x5a, sizeof(it));
        rc = batch_next(buf, len, &pos, &it);
        if (rc != 1)
            break;
        n++;
        CHECK(pos > prev && pos <= len);
        CHECK(it.op >= BATCH_PUT && it.op <= BATCH_OP_MAX);
        CHECK(it.klen >= 1 && it.klen <= BATCH_KEY_MAX);
        CHECK(it.key >= buf + prev && it.key + it.klen <= buf + len);
        if (it.val)
            CHECK(it.val >= buf + prev && it.val + it.vlen <= buf + len);
        /* Touch every byte handed out (ASan checks these reads). */
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < it.klen; i++)
            sink ^= it.key[i];
        for (size_t i = 0; it.val && i < it.vlen; i++)
            sink ^= it.val[i];
        (void)sink;
    }
    CHECK(rc == 0 || rc == -EINVAL);
    if (rc < 0)
        CHECK(pos == prev); /* a failed step does not move */
    int v = batch_validate(buf, len);
    CHECK(v == (rc < 0 ? rc : n));
    free(buf);
    return v;
}

static void test_truncated(void)
{
    struct batch b;
    size_t bounds[NOPS + 1], nb = 0;

    build_ops(&b);
    /* Item boundaries: a prefix ending on one is a valid, shorter batch. */
    {
        struct batch_item it;
        size_t pos = 0;
        bounds[nb++] = 0;
        while (batch_next(b.buf, b.len, &pos, &it) == 1)
            bounds[nb++] = pos;
        CHECK(nb == NOPS + 1);
    }
    for (size_t len = 0; len <= b.len; len++) {
        int want = -EINVAL;
        for (size_t i = 0; i < nb; i++)
            if (bounds[i] == len)
                want = (int)i;
        int rc = decode_all(b.buf, len);
        CHECKF(rc == want, "prefix of %zu of %zu bytes: rc %d, want %d", len, b.len, rc, want);
    }
    batch_free(&b);
}

static void test_mutations(void)
{
    struct batch b;
    uint8_t *buf;

    build_ops(&b);
    buf = xmalloc(b.len);

    /* Every byte, flipped in several ways: whatever it decodes to, nothing is
     * read out of bounds and validate agrees with the walk. */
    static const uint8_t masks[] = {0x01, 0x02, 0x10, 0x80, 0xff};
    for (size_t i = 0; i < b.len; i++) {
        for (size_t m = 0; m < sizeof(masks); m++) {
            memcpy(buf, b.buf, b.len);
            buf[i] ^= masks[m];
            decode_all(buf, b.len);
        }
    }

    /* Bad op bytes at the first item. */
    static const uint8_t bad_ops[] = {0, BATCH_OP_MAX + 1, 8, 0x7f, 0x80, 0xff};
    for (size_t i = 0; i < sizeof(bad_ops); i++) {
        memcpy(buf, b.buf, b.len);
        buf[0] = bad_ops[i];
        CHECKF(decode_all(buf, b.len) == -EINVAL, "op byte %u", bad_ops[i]);
    }
    /* ... and at the last item. */
    {
        struct batch_item it;
        size_t pos = 0, last = 0;
        while (batch_next(b.buf, b.len, &pos, &it) == 1 && pos < b.len)
            last = pos;
        memcpy(buf, b.buf, b.len);
        buf[last] = 0;
        CHECK(decode_all(buf, b.len) == -EINVAL);
    }
    free(buf);
    batch_free(&b);

    /* Hand-made single items with bad lengths. */
    struct {
        const char *what;
        uint8_t op;
        uint32_t klen;    /* as encoded */
        size_t key_bytes; /* bytes of key actually present */
        int has_vlen;
        uint32_t vlen;    /* as encoded */
        size_t val_bytes; /* bytes of value actually present */
        int rc;
    } cases[] = {
        {"ok put", BATCH_PUT, 1, 1, 1, 1, 1, 1},
        {"ok del", BATCH_DEL, 3, 3, 0, 0, 0, 1},
        {"klen 0", BATCH_DEL, 0, 0, 0, 0, 0, -EINVAL},
        {"klen 512", BATCH_DEL, 512, 512, 0, 0, 0, -EINVAL},
        {"klen 511", BATCH_DEL, 511, 511, 0, 0, 0, 1},
        {"klen past the end", BATCH_DEL, 4, 3, 0, 0, 0, -EINVAL},
        {"klen 0xffffffff", BATCH_DEL, 0xffffffffu, 8, 0, 0, 0, -EINVAL},
        {"klen 0x80000000", BATCH_PUT, 0x80000000u, 8, 0, 0, 0, -EINVAL},
        {"klen 0x00000101 short", BATCH_PUT, 0x101u, 8, 0, 0, 0, -EINVAL},
        {"no vlen", BATCH_PUT, 1, 1, 0, 0, 0, -EINVAL},
        {"vlen past the end", BATCH_PUT, 1, 1, 1, 5, 4, -EINVAL},
        {"vlen 0xffffffff", BATCH_PUT, 1, 1, 1, 0xffffffffu, 16, -EINVAL},
        {"vlen BATCH_VALUE_MAX+1", BATCH_ASSERT_VALUE, 1, 1, 1, BATCH_VALUE_MAX + 1, 16, -EINVAL},
        {"vlen 0", BATCH_PUT, 1, 1, 1, 0, 0, 1},
        {"del_range no end", BATCH_DEL_RANGE, 1, 1, 0, 0, 0, -EINVAL},
        {"vlen split", BATCH_PUT, 1, 1, 1, 0, 0, -EINVAL}, /* only 2 bytes of vlen: below */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = 1 + 4 + cases[i].key_bytes + (cases[i].has_vlen ? 4 : 0) + cases[i].val_bytes;
        uint8_t *p = xmalloc(len);
        memset(p, 'z', len);
        p[0] = cases[i].op;
        put_u32le(p + 1, cases[i].klen);
        if (cases[i].has_vlen)
            put_u32le(p + 5 + cases[i].key_bytes, cases[i].vlen);
        if (strcmp(cases[i].what, "vlen split") == 0)
            len -= 2; /* cut inside the vlen field */
        int rc = decode_all(p, len);
        CHECKF(rc == cases[i].rc, "%s: rc %d, want %d", cases[i].what, rc, cases[i].rc);
        free(p);
    }

    /* Fewer than 5 bytes of header. */
    static const uint8_t tiny[] = {BATCH_DEL, 1, 0, 0, 0, 'k'};
    for (size_t len = 1; len < 5; len++)
        CHECKF(decode_all(tiny, len) == -EINVAL, "%zu header bytes", len);
    CHECK(decode_all(tiny, sizeof(tiny)) == 1);

    /* A valid item followed by garbage: the walk returns the first item,
     * then -EINVAL; validate says -EINVAL for the whole. */
    static const uint8_t tail[] = {BATCH_DEL, 1, 0, 0, 0, 'k', 0xee};
    CHECK(decode_all(tail, sizeof(tail)) == -EINVAL);
}

/* Pseudo-random garbage never crashes the decoder. */
static void test_random_garbage(void)
{
    uint64_t s = 0x0123456789abcdefull;
    for (int round = 0; round < 20000; round++) {
        uint8_t tmp[64];
        size_t len = (size_t)(round % 64);
        for (size_t i = 0; i < len; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            tmp[i] = (uint8_t)(s >> 56);
        }
        /* Make plausible headers likely: small op and key lengths. */
        if (len > 0 && round % 2)
            tmp[0] = (uint8_t)(1 + tmp[0] % 5);
        if (len > 4 && round % 4 < 2) {
            tmp[2] = tmp[3] = tmp[4] = 0;
            tmp[1] %= 16;
        }
        decode_all(tmp, len);
    }
}

/* batch_append: the concatenation of two encodings, and errors stick. */
static void test_append(void)
{
    struct batch a, b, empty, bad;

    batch_init(&a);
    batch_init(&b);
    batch_init(&empty);
    batch_init(&bad);
    build_ops(&b);
    CHECK(batch_append(&a, &empty) == 0 && a.len == 0 && a.count == 0);
    CHECK(batch_put(&a, "k", 1, "v", 1) == 0);
    size_t head = a.len;
    CHECK(batch_append(&a, &b) == 0);
    CHECK(a.count == NOPS + 1 && a.len == head + b.len);
    CHECK(memcmp(a.buf + head, b.buf, b.len) == 0);
    CHECK(batch_validate(a.buf, a.len) == (int)NOPS + 1);
    walk_ops(a.buf + head, b.len);

    bad.error = -ENOMEM;
    CHECK(batch_append(&a, &bad) == -ENOMEM && a.error == -ENOMEM);
    batch_free(&a);
    batch_free(&b);
}

int main(void)
{
    test_roundtrip();
    test_append();
    test_layout();
    test_limits();
    test_truncated();
    test_mutations();
    test_random_garbage();
    return check_summary("batch");
}
