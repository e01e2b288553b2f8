/* workload.c -- the shard workload and the checker of the crash simulator
 * (tests/crashsim/crashsim.py drives both).
 *
 *   workload run DIR SEED N     apply batches 1..N to the shard in DIR, with
 *                               commits and syncs at seeded random points
 *   workload recover DIR        open the shard in DIR (recovery) and close it
 *   workload check SEED         read "DIR MIN MAX" lines on stdin; for each,
 *                               open the shard in DIR, check it and answer
 *                               one line: "ok J" or "bad REASON"
 *
 * Batch i (1-based) is a seeded list of puts and deletes over NKEYS keys
 * "k0000".. with values from 10 bytes to 20 KiB (so commits allocate and
 * free leaf and overflow pages), sometimes a range delete, and always a put
 * of "Mj" = i. The state after batch j is therefore known from the seed
 * alone. run writes marks into the trace (crashsim_mark(), found in the
 * LD_PRELOADed shim): "B 0" and "O 0" around the open (no batch is in
 * flight before it returned), "A i" when apply(i) returned, "S i" when a sync
 * returned after batch i.
 *
 * check opens the shard (which replays the redo log), reads J = "Mj", and
 * requires MIN <= J <= MAX and that every key holds exactly what batches
 * 1..J leave (nothing more, nothing less), reading every record; then it
 * applies one more batch, syncs, reopens and reads everything again, so a
 * damaged free list shows too. Each check runs in a forked child, so a
 * shard that crashes its reader is reported, not fatal.
 *
 * The change stream (issue 10) is checked too. run sets the epoch to
 * EPOCH and opens the shard once, so batch i gets lsn i; the retention is
 * small (STREAM_BYTES), so commits trim, and so is the lsn reservation's
 * step (LSN_STEP), so it is raised all along the run. A state holding
 * batches 1..J must have exactly batch J's position (EPOCH, J, the check
 * chained over batches 1..J); its retained entries must be exactly batches
 * B+1..J for some base B (reading after any earlier position: -ERANGE), each with its
 * position and its bytes; and the batch applied after recovery must get an
 * lsn above every lsn the run had written to a redo log before the crash
 * point (crashsim.py follows the log writes; a reader can only have seen a
 * logged batch): never a reuse; with the position that continues the
 * chain, which a reopen gives back.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "batch.h"
#include "crashsim.h"
#include "shard.h"
#include "shard_lmdb.h"

#define NKEYS 160
#define VALUE_MAX (20u << 10)
#define EPOCH 7u
#define STREAM_BYTES (256u << 10)
#define LSN_STEP 8u            /* the reservation is raised often: at commits,
                                * and with a sync when a burst reaches it */
#define BATCHES_MAX 4096

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    r->s = crashsim_mix64(r->s);
    return r->s;
}

/* One operation of a batch: a put of a value of size len, a delete, or a
 * range delete of keys [key, end). */
struct op {
    int kind;               /* BATCH_PUT, BATCH_DEL or BATCH_DEL_RANGE */
    unsigned key, end;
    size_t len;
};

#define OPS_MAX 8

static unsigned batch_ops(uint64_t seed, uint64_t i, struct op *ops)
{
    struct rng r = {crashsim_mix64(seed ^ crashsim_mix64(i))};
    unsigned n = 1 + (unsigned)(rng_next(&r) % 6);

    for (unsigned k = 0; k < n; k++) {
        uint64_t x = rng_next(&r);
        ops[k].key = (unsigned)(x % NKEYS);
        x >>= 16;
        if (x % 40 == 0) {
            ops[k].kind = BATCH_DEL_RANGE;
            ops[k].end = ops[k].key + 1 + (unsigned)((x >> 8) % 20);
        } else if (x % 4 == 0) {
            ops[k].kind = BATCH_DEL;
        } else {
            ops[k].kind = BATCH_PUT;
            x >>= 8;
            switch (x % 3) {
            case 0:
                ops[k].len = 10 + (x >> 4) % 200;
                break;
            case 1:
                ops[k].len = 1000 + (x >> 4) % 3000;
                break;
            default:
                ops[k].len = 5000 + (x >> 4) % (VALUE_MAX - 5000);
            }
        }
    }
    return n;
}

static void key_of(unsigned k, char out[8])
{
    snprintf(out, 8, "k%04u", k);
}

/* The value batch i puts under key k: len bytes from a seeded stream. */
static void value_of(uint64_t seed, uint64_t i, unsigned k, size_t len, uint8_t *out)
{
    struct rng r = {crashsim_mix64(seed ^ (i << 20) ^ k)};
    for (size_t o = 0; o < len; o += 8) {
        uint64_t x = rng_next(&r);
        size_t n = len - o < 8 ? len - o : 8;
        memcpy(out + o, &x, n);
    }
}

static int make_batch(uint64_t seed, uint64_t i, struct batch *b, uint8_t *val)
{
    struct op ops[OPS_MAX];
    unsigned n = batch_ops(seed, i, ops);
    uint8_t j[8];
    char key[8], end[8];

    batch_reset(b);
    for (unsigned k = 0; k < n; k++) {
        key_of(ops[k].key, key);
        if (ops[k].kind == BATCH_PUT) {
            value_of(seed, i, ops[k].key, ops[k].len, val);
            batch_put(b, key, 5, val, ops[k].len);
        } else if (ops[k].kind == BATCH_DEL) {
            batch_del(b, key, 5);
        } else {
            key_of(ops[k].end, end);
            batch_add(b, BATCH_DEL_RANGE, key, 5, end, 5);
        }
    }
    for (int k = 0; k < 8; k++)
        j[k] = (uint8_t)(i >> (8 * k));
    batch_put(b, "Mj", 2, j, 8);
    return b->error;
}

static int open_shard(const char *dir, struct shard **s)
{
    /* No timed commits: the workload decides when, so a seed is a trace. */
    struct shard_lmdb_options opt = {.commit_interval_ms = 3600 * 1000, .commit_bytes = 96 << 10,
                                     .stream_bytes = STREAM_BYTES, .lsn_step = LSN_STEP};
    char err[512];
    int rc = shard_lmdb_open(dir, 0, &opt, s, err, sizeof(err));
    if (rc)
        fprintf(stderr, "workload: open %s: %s\n", dir, err);
    return rc;
}

static int cmd_run(const char *dir, uint64_t seed, uint64_t n)
{
    struct shard *s;
    struct batch b;
    struct rng r = {crashsim_mix64(seed * 31 + 7)};
    uint8_t *val = malloc(VALUE_MAX);
    int rc;

    crashsim_mark("B", 0);
    if (!val || open_shard(dir, &s))
        return 1;
    crashsim_mark("O", 0);
    shard_lmdb_set_epoch(s, EPOCH);
    batch_init(&b);
    for (uint64_t i = 1; i <= n; i++) {
        struct stream_pos p;
        rc = make_batch(seed, i, &b, val);
        if (rc == 0)
            rc = shard_lmdb_apply_pos(s, &b, &p);
        if (rc == 0 && p.lsn != i) {
            fprintf(stderr, "workload: batch %llu got lsn %llu\n", (unsigned long long)i,
                    (unsigned long long)p.lsn);
            return 1;
        }
        if (rc) {
            fprintf(stderr, "workload: apply %llu: %s\n", (unsigned long long)i, strerror(-rc));
            return 1;
        }
        crashsim_mark("A", i);
        uint64_t x = rng_next(&r) % 16;
        if (x == 0) {
            rc = shard_sync(s);
            if (rc) {
                fprintf(stderr, "workload: sync: %s\n", strerror(-rc));
                return 1;
            }
            crashsim_mark("S", i);
        } else if (x < 3) {
            shard_lmdb_flush(s, 1);
        }
    }
    shard_close(s);
    crashsim_mark("S", n);
    batch_free(&b);
    free(val);
    return 0;
}

static int cmd_recover(const char *dir)
{
    struct shard *s;

    if (open_shard(dir, &s))
        return 1;
    crashsim_mark("O", 0);
    shard_close(s);
    return 0;
}

/* ---- checking ---- */

struct expect {
    int present[NKEYS];
    uint64_t batch[NKEYS];  /* the batch that put the value */
    size_t len[NKEYS];
};

static void expect_after(uint64_t seed, uint64_t j, struct expect *e)
{
    memset(e, 0, sizeof(*e));
    for (uint64_t i = 1; i <= j; i++) {
        struct op ops[OPS_MAX];
        unsigned n = batch_ops(seed, i, ops);
        for (unsigned k = 0; k < n; k++) {
            if (ops[k].kind == BATCH_PUT) {
                e->present[ops[k].key] = 1;
                e->batch[ops[k].key] = i;
                e->len[ops[k].key] = ops[k].len;
            } else if (ops[k].kind == BATCH_DEL) {
                e->present[ops[k].key] = 0;
            } else {
                for (unsigned x = ops[k].key; x < ops[k].end && x < NKEYS; x++)
                    e->present[x] = 0;
            }
        }
    }
}

struct scan_ctx {
    uint64_t seed;
    const struct expect *e;
    int seen[NKEYS];
    uint8_t *val;
    char why[200];
};

static int check_record(void *arg, const uint8_t *key, size_t klen, const uint8_t *val,
                        size_t vlen)
{
    struct scan_ctx *c = arg;
    const char *k = (const char *)key;
    unsigned idx;

    if (klen >= 1 && k[0] == 'M')
        return 0; /* shard metadata and "Mj" */
    if (klen != 5 || k[0] != 'k' || sscanf(k + 1, "%4u", &idx) != 1 || idx >= NKEYS) {
        snprintf(c->why, sizeof(c->why), "unexpected key of %zu bytes", klen);
        return -EIO;
    }
    c->seen[idx] = 1;
    if (!c->e->present[idx]) {
        snprintf(c->why, sizeof(c->why), "key %u present, expected absent", idx);
        return -EIO;
    }
    value_of(c->seed, c->e->batch[idx], idx, c->e->len[idx], c->val);
    if (vlen != c->e->len[idx] || memcmp(val, c->val, vlen) != 0) {
        snprintf(c->why, sizeof(c->why), "key %u: wrong value (%zu bytes, expected %zu of batch %llu)",
                 idx, vlen, c->e->len[idx], (unsigned long long)c->e->batch[idx]);
        return -EIO;
    }
    return 0;
}

/* Read J and every record; 0 and *j if the shard holds exactly the state
 * after batch J. */
static int verify(struct shard *s, uint64_t seed, uint64_t *j, char *why, size_t whylen)
{
    static struct expect e;
    struct scan_ctx c = {.seed = seed, .e = &e};
    uint8_t buf[8];
    size_t vlen = 0;
    int rc = shard_get(s, "Mj", 2, 0, buf, sizeof(buf), &vlen);

    *j = 0;
    if (rc >= 0 && vlen == 8)
        for (int k = 7; k >= 0; k--)
            *j = *j << 8 | buf[k];
    else if (rc != -ENOENT) {
        snprintf(why, whylen, "reading Mj: %s", rc < 0 ? strerror(-rc) : "bad length");
        return -EIO;
    }
    expect_after(seed, *j, &e);
    c.val = malloc(VALUE_MAX);
    if (!c.val)
        return -ENOMEM;
    rc = shard_scan(s, "", 0, NULL, 0, check_record, &c);
    for (unsigned k = 0; rc == 0 && k < NKEYS; k++)
        if (e.present[k] && !c.seen[k]) {
            snprintf(c.why, sizeof(c.why), "key %u missing (batch %llu)", k,
                     (unsigned long long)e.batch[k]);
            rc = -EIO;
        }
    if (rc)
        snprintf(why, whylen, "state after batch %llu: %s", (unsigned long long)*j,
                 c.why[0] ? c.why : strerror(-rc));
    free(c.val);
    return rc;
}

/* The positions of batches 0..n (0: the empty shard), from the seed. */
static int chain_of(uint64_t seed, uint64_t n, struct stream_pos *pos, uint8_t *val)
{
    struct batch b;
    int rc = 0;

    batch_init(&b);
    memset(&pos[0], 0, sizeof(pos[0]));
    for (uint64_t i = 1; i <= n && rc == 0; i++) {
        rc = make_batch(seed, i, &b, val);
        pos[i].epoch = EPOCH;
        pos[i].lsn = i;
        pos[i].check = stream_check_next(pos[i - 1].check, EPOCH, i, b.buf, b.len);
    }
    batch_free(&b);
    return rc;
}

struct entries {
    uint64_t seed, next;    /* the lsn the next entry must have */
    const struct stream_pos *pos;
    struct batch b;
    uint8_t *val;
    char why[200];
};

static int entry_check(void *ctx, const struct stream_pos *p, uint64_t time_ms,
                       const uint8_t *batch, size_t len)
{
    struct entries *e = ctx;

    (void)time_ms;
    if (p->lsn != e->next || memcmp(p, &e->pos[e->next], sizeof(*p)) != 0) {
        snprintf(e->why, sizeof(e->why), "entry lsn %llu (epoch %llu), expected batch %llu's position",
                 (unsigned long long)p->lsn, (unsigned long long)p->epoch,
                 (unsigned long long)e->next);
        return -EIO;
    }
    if (make_batch(e->seed, e->next, &e->b, e->val) || e->b.len != len ||
        memcmp(e->b.buf, batch, len) != 0) {
        snprintf(e->why, sizeof(e->why), "entry %llu: not batch %llu's bytes",
                 (unsigned long long)p->lsn, (unsigned long long)e->next);
        return -EIO;
    }
    e->next++;
    return 0;
}

static int stop_fn(void *ctx, const struct stream_pos *p, uint64_t time_ms, const uint8_t *batch,
                   size_t len)
{
    (void)ctx, (void)p, (void)time_ms, (void)batch, (void)len;
    return 1;
}

/* The stream of a shard holding batches 1..j: position, entries, base. */
static int verify_stream(struct shard *s, uint64_t seed, uint64_t j, const struct stream_pos *pos,
                         uint8_t *val, char *why, size_t whylen)
{
    struct entries e = {.seed = seed, .pos = pos, .val = val};
    struct stream_pos cur;
    uint64_t base;
    int rc = shard_lmdb_position(s, &cur);

    if (rc || memcmp(&cur, &pos[j], sizeof(cur)) != 0) {
        snprintf(why, whylen, "holds batches 1..%llu but its position is rc %d, epoch %llu, lsn %llu%s",
                 (unsigned long long)j, rc, (unsigned long long)cur.epoch,
                 (unsigned long long)cur.lsn,
                 cur.lsn == j ? " (wrong check)" : "");
        return -EIO;
    }
    /* The base: the first position the stream can be read after. */
    for (base = 0; base <= j; base++) {
        rc = shard_lmdb_stream_read(s, &pos[base], 1, stop_fn, NULL);
        if (rc != -ERANGE)
            break;
    }
    if (rc < 0) {
        snprintf(why, whylen, "reading the stream after batch %llu: %s", (unsigned long long)base,
                 strerror(-rc));
        return -EIO;
    }
    batch_init(&e.b);
    e.next = base + 1;
    rc = shard_lmdb_stream_read(s, &pos[base], SIZE_MAX, entry_check, &e);
    batch_free(&e.b);
    if (rc < 0 || e.next != j + 1) {
        snprintf(why, whylen, "the stream after batch %llu: %s", (unsigned long long)base,
                 rc < 0 ? (e.why[0] ? e.why : strerror(-rc)) : "does not end at the position");
        return -EIO;
    }
    return 0;
}

/* The whole check of one crash state, in a child process. */
static int check_state(const char *dir, uint64_t seed, uint64_t min, uint64_t max,
                       uint64_t lsn_max, uint64_t *j,
                       char *why, size_t whylen)
{
    static struct stream_pos pos[BATCHES_MAX + 2];
    struct shard *s;
    struct batch b;
    struct stream_pos next;
    uint64_t j2;
    uint8_t *val = malloc(VALUE_MAX);
    int rc;

    if (max > BATCHES_MAX) {
        snprintf(why, whylen, "more than %u batches", BATCHES_MAX);
        return -EINVAL;
    }
    if (!val || open_shard(dir, &s)) {
        snprintf(why, whylen, "the shard does not open");
        return -EIO;
    }
    rc = verify(s, seed, j, why, whylen);
    if (rc)
        goto out;
    if (*j < min || *j > max) {
        snprintf(why, whylen, "holds batches 1..%llu, expected between %llu and %llu",
                 (unsigned long long)*j, (unsigned long long)min, (unsigned long long)max);
        rc = -EIO;
        goto out;
    }
    rc = chain_of(seed, *j + 1, pos, val);
    if (rc == 0)
        rc = verify_stream(s, seed, *j, pos, val, why, whylen);
    if (rc)
        goto out;
    /* Still usable: one more batch, durable, then everything again. */
    batch_init(&b);
    shard_lmdb_set_epoch(s, EPOCH);
    rc = make_batch(seed, *j + 1, &b, val);
    if (rc == 0)
        rc = shard_lmdb_apply_pos(s, &b, &next);
    if (rc == 0)
        rc = shard_sync(s);
    if (rc == 0 && (next.lsn <= lsn_max || next.epoch != EPOCH ||
                    next.check != stream_check_next(pos[*j].check, EPOCH, next.lsn, b.buf, b.len))) {
        snprintf(why, whylen, "the batch after recovery got lsn %llu (the run logged up to %llu)%s",
                 (unsigned long long)next.lsn, (unsigned long long)lsn_max,
                 next.lsn > lsn_max ? ", a wrong check or epoch" : ": reused");
        rc = -EIO;
        batch_free(&b);
        goto out;
    }
    batch_free(&b);
    if (rc) {
        snprintf(why, whylen, "applying batch %llu after recovery: %s",
                 (unsigned long long)*j + 1, strerror(-rc));
        goto out;
    }
    shard_close(s);
    s = NULL;
    if (open_shard(dir, &s)) {
        snprintf(why, whylen, "the shard does not reopen after one more batch");
        rc = -EIO;
        goto out;
    }
    rc = verify(s, seed, &j2, why, whylen);
    if (rc == 0 && j2 != *j + 1) {
        snprintf(why, whylen, "after one more batch and a sync, holds 1..%llu",
                 (unsigned long long)j2);
        rc = -EIO;
    }
    struct stream_pos cur;
    if (rc == 0 && (shard_lmdb_position(s, &cur) != 0 || memcmp(&cur, &next, sizeof(cur)) != 0)) {
        snprintf(why, whylen, "after one more batch, a sync and a reopen: another position");
        rc = -EIO;
    }
out:
    shard_close(s);
    free(val);
    return rc;
}

int main(int argc, char **argv)
{
    return crashsim_main(argc, argv, "workload", cmd_run, cmd_recover, check_state);
}
