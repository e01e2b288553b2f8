/* reshard.c -- split and merge shards of a single-node store (reshard.h).
 *
 * The copy reads the source in LMDB's order, a chunk of about COPY_BATCH
 * bytes at a time (each scan stops there; the next starts after its last
 * key), and writes each chunk to the target as one batch; the purge
 * collects the keys to delete in batches of PURGE_KEYS (a scan cannot write
 * the shard it scans) the same way. Both go through the shard interface,
 * so the target's redo log makes every batch survive a kill, and the
 * shard's own `Mshard` record is written like any other. Online (a mounted
 * store), the mirror below keeps the target current while the copy runs.
 */
#include "reshard.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "clock.h"
#include "durable.h"
#include "failover.h"
#include "namespace.h"
#include "node_server.h"
#include "placement.h"
#include "record.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "shard_map.h"
#include "shard_repl.h"
#include "store_layout.h"
#include "store_lock.h"

#define COPY_BATCH (4u << 20)
#define PURGE_KEYS 8192u
/* Online, the mount's writes to the shard wait for the copy's chunk (the
 * mirror's lock) and for the purge's batch (the shard's lock): smaller
 * ones, and a pause as long as each took after it, bound what a write
 * waits (tests/bench/reshard measures a workload's p99 latency). */
#define ONLINE_COPY_BATCH (256u << 10)
#define ONLINE_PURGE_KEYS 256u
#define PROGRESS_NS 500000000ll

enum op { OP_SPLIT, OP_MERGE };

struct job {
    struct config *cfg;
    int node;
    struct reshard_opts *o;
    char *err;
    size_t errlen;
    int lock_fd;
    struct store_layout l;
    enum op op;
    unsigned s, d;          /* split: the shard and its depth before; merge: the lower buddy */
    int resuming;           /* the change was in flight (RESHARD) when the job began */
    struct timespec t0, last;
    struct reshard_stats st;
    const volatile int *cancel; /* online: set when the mount is going away */
    struct node_server *srv; /* online in a cluster: the node's server, which serves its shards */
    int undone;             /* the change failed before its cut-over and was taken back */
};

/* ---- small helpers ---- */

static double since(const struct timespec *t0)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static void report(struct job *j, int force)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    if (!force && (t.tv_sec - j->last.tv_sec) * 1000000000ll + (t.tv_nsec - j->last.tv_nsec) <
                      PROGRESS_NS)
        return;
    j->last = t;
    j->st.seconds = since(&j->t0);
    if (j->o->progress)
        j->o->progress(j->o->ctx, &j->st);
}

/* The phase a test's hold last stopped in (kill_point), reset per change. */
static char held_in[16];

/* A test's kill point: SHARDFS_TEST_KILL_AT=PHASE kills this process
 * (SIGKILL, as kill -9 would) once the phase has done part of its work.
 * SHARDFS_TEST_HOLD_AT=PHASE:MS[,PHASE:MS...] stops the change there for
 * MS ms instead, once a phase and change, so a test can look at the store
 * in the middle of it. */
static void kill_point(const char *phase)
{
    const char *at = getenv("SHARDFS_TEST_KILL_AT"), *hold = getenv("SHARDFS_TEST_HOLD_AT");
    size_t n = strlen(phase);

    if (at && !strcmp(at, phase))
        raise(SIGKILL);
    for (const char *h = hold; h && *h && strcmp(held_in, phase) != 0; h = strchr(h, ',')) {
        h += *h == ',';
        if (!strncmp(h, phase, n) && h[n] == ':') {
            snprintf(held_in, sizeof(held_in), "%s", phase);
            usleep((useconds_t)atoi(h + n + 1) * 1000);
        }
    }
}

static int shard_dir(const struct job *j, unsigned index, const char *suffix, char *out,
                     size_t len)
{
    int n = snprintf(out, len, "%s/shard-%u%s", j->cfg->nodes[j->node].data_dir, index, suffix);

    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

static int open_shard(struct job *j, unsigned index, struct shard **out)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = j->cfg->commit_interval_ms,
                                     .no_stream = 1}; /* as ns_open: no replicas */
    char dir[PATH_MAX + 32];
    int rc = shard_dir(j, index, "", dir, sizeof(dir));

    if (rc) {
        snprintf(j->err, j->errlen, "shard %u: data_dir path too long", index);
        return rc;
    }
    return shard_lmdb_open(dir, index, &opt, out, j->err, j->errlen);
}

/* Remove shard-INDEX for good (durable.h). */
static int shard_remove(struct job *j, unsigned index)
{
    char dir[PATH_MAX + 32], gone[PATH_MAX + 40];
    int rc = shard_dir(j, index, "", dir, sizeof(dir));

    if (rc == 0)
        rc = shard_dir(j, index, ".dropped", gone, sizeof(gone));
    return rc ? rc : durable_remove_dir(dir, gone);
}

/* ---- the state file ---- */

static int state_path(const struct config *cfg, int node, char *out, size_t len)
{
    int n = snprintf(out, len, "%s/RESHARD", cfg->nodes[node].data_dir);

    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

static int state_write(struct job *j)
{
    char path[PATH_MAX + 16], text[64];
    int n, rc = state_path(j->cfg, j->node, path, sizeof(path));

    if (rc)
        return rc;
    n = snprintf(text, sizeof(text), "%s %u %u\n", j->op == OP_SPLIT ? "split" : "merge", j->s,
                 j->d);
    return durable_replace_file(path, text, (size_t)n);
}

/* 1 and the change in j, 0 without a state file, -errno. */
static int state_read(struct job *j)
{
    char path[PATH_MAX + 16], what[16];
    int rc = state_path(j->cfg, j->node, path, sizeof(path));
    FILE *f;

    if (rc)
        return rc;
    f = fopen(path, "re");
    if (!f)
        return errno == ENOENT ? 0 : -errno;
    rc = fscanf(f, "%15s %u %u", what, &j->s, &j->d) == 3 ? 1 : -EINVAL;
    fclose(f);
    if (rc == 1 && !strcmp(what, "split"))
        j->op = OP_SPLIT;
    else if (rc == 1 && !strcmp(what, "merge"))
        j->op = OP_MERGE;
    else
        rc = -EINVAL;
    if (rc < 0)
        snprintf(j->err, j->errlen, "%s: not a reshard state (expected \"split|merge S D\")",
                 path);
    return rc;
}

static int state_remove(struct job *j)
{
    char path[PATH_MAX + 16];
    int rc = state_path(j->cfg, j->node, path, sizeof(path));

    if (rc == 0 && unlink(path) != 0 && errno != ENOENT)
        rc = -errno;
    return rc ? rc : durable_sync_parent(path);
}

int reshard_pending(const struct config *cfg, int node, char *what, size_t whatlen, char *err,
                    size_t errlen)
{
    char path[PATH_MAX + 16];
    FILE *f;

    if (state_path(cfg, node, path, sizeof(path))) {
        snprintf(err, errlen, "%s: data_dir path too long", cfg->path);
        return -1;
    }
    if (what && whatlen)
        what[0] = 0;
    if (access(path, F_OK) == 0) {
        if (what && whatlen && (f = fopen(path, "r"))) {
            if (!fgets(what, (int)whatlen, f))
                what[0] = 0;
            what[strcspn(what, "\n")] = 0;
            fclose(f);
        }
        return 1;
    }
    if (errno == ENOENT)
        return 0;
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    return -1;
}

/* ---- copy ---- */

struct copy {
    struct job *j;
    struct shard *to;
    struct batch b;
    int all;                /* merge: every placed record; split: bit d set */
    unsigned bit;
    uint8_t last[BATCH_KEY_MAX]; /* the last key seen: the next chunk starts after it */
    size_t lastlen;
    size_t chunk;
    size_t seen;            /* bytes read in this chunk, kept or not */
};

/* A test's slow copy: SHARDFS_TEST_SLOW_COPY=1 makes chunks of 64 KiB with
 * 20 ms between them, so a test's writes meet the mirror. */
static size_t chunk_bytes(const struct job *j)
{
    if (getenv("SHARDFS_TEST_SLOW_COPY"))
        return 64u << 10;
    return j->cancel ? ONLINE_COPY_BATCH : COPY_BATCH;
}

/* Online: sleep as long as the step that began at t0 took. */
static void yield_after(const struct job *j, const struct timespec *t0)
{
    if (j->cancel) {
        double us = since(t0) * 1e6;
        usleep((useconds_t)(us < 100000 ? us : 100000));
    }
}

static int copy_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct copy *c = ctx;
    uint64_t h;
    int rc;

    memcpy(c->last, k, kl);
    c->lastlen = kl;
    /* A chunk ends after `chunk` bytes read, too: a long run of records
     * that stay (a large file's) must not hold the mirror's lock long. */
    c->seen += kl + vl;
    if (record_placement(k, kl, &h) || (!c->all && !((h >> c->bit) & 1)))
        return c->seen >= 2 * c->chunk ? 1 : 0; /* stays */
    rc = batch_put(&c->b, k, kl, v, vl);
    if (rc)
        return rc;
    c->j->st.records++;
    c->j->st.bytes += kl + vl;
    return c->b.len >= c->chunk || c->seen >= 2 * c->chunk ? 1 : 0;
}

/* Copy from shard `from` into `to`: every placed record (all) or those with
 * hash bit `bit` set; then sync `to`. A chunk at a time (COPY_BATCH bytes),
 * each read and written with mu held when it is not NULL: the mirror's
 * lock (below), so no write to `from` falls between a chunk's read and
 * its write. */
static int copy_records(struct job *j, struct shard *from, struct shard *to, int all, unsigned bit,
                        pthread_mutex_t *mu)
{
    struct copy c = {.j = j, .to = to, .all = all, .bit = bit, .chunk = chunk_bytes(j)};
    struct timespec c0;
    uint8_t start[BATCH_KEY_MAX];
    size_t slen = 0;
    struct shard_stat ss;
    int rc;

    batch_init(&c.b);
    j->st.phase = "copy";
    j->st.estimate = shard_stat(from, &ss) == 0 ? (all ? ss.bytes : ss.bytes / 2) : 0;
    report(j, 1);
    do {
        clock_gettime(CLOCK_MONOTONIC, &c0);
        if (mu)
            pthread_mutex_lock(mu);
        batch_reset(&c.b);
        c.seen = 0;
        rc = shard_scan(from, slen ? start : NULL, slen, NULL, 0, copy_one, &c);
        if (rc >= 0 && c.b.count) {
            int r = shard_apply(to, &c.b);
            rc = r ? r : rc;
        }
        if (mu)
            pthread_mutex_unlock(mu);
        if (rc == 1) {
            int n = batch_key_after(c.last, c.lastlen, start);
            rc = n < 0 ? n : 1;
            slen = n < 0 ? 0 : (size_t)n;
        }
        if (rc >= 0 && j->cancel && *j->cancel)
            rc = -ECANCELED;
        if (rc == 1 && getenv("SHARDFS_TEST_SLOW_COPY"))
            usleep(20000);
        else if (rc == 1)
            yield_after(j, &c0);
        kill_point("copy");
        report(j, 0);
    } while (rc == 1);
    batch_free(&c.b);
    if (rc == 0)
        rc = shard_sync(to);
    report(j, 1);
    return rc;
}

/* ---- Mshard and purge ---- */

/* Write shard index's Mshard record for its depth (namespace.c checks it at
 * every open: the index and the count of a uniform layout at that depth). */
static int meta_write(struct shard *sh, unsigned index, unsigned depth)
{
    static const char key[] = "Mshard";
    uint8_t val[8];
    struct batch b;
    int rc;

    for (int k = 0; k < 4; k++) {
        val[k] = (uint8_t)(index >> (8 * k));
        val[4 + k] = (uint8_t)((1u << depth) >> (8 * k));
    }
    batch_init(&b);
    batch_put(&b, key, sizeof(key) - 1, val, sizeof(val));
    rc = shard_apply(sh, &b);
    batch_free(&b);
    return rc;
}

#define PURGE_ALL 64u /* purge_records' bit: every placed record */

struct purge {
    struct batch b;
    unsigned bit, max;
    int own;          /* else bit: delete what the shard `index` does not own at mask */
    uint64_t mask;
    unsigned index;
    const char *phase; /* what progress says meanwhile (NULL: "purge") */
    size_t seen, seen_max; /* bytes read in this batch, and the bound */
    uint8_t last[BATCH_KEY_MAX];
    size_t lastlen;
};

static int purge_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct purge *p = ctx;
    uint64_t h;

    (void)v;
    memcpy(p->last, k, kl);
    p->lastlen = kl;
    p->seen += kl + vl; /* the scan read it: a batch's time is bounded by both */
    if (record_placement(k, kl, &h) ||
        (p->own ? (h & p->mask) == p->index : p->bit != PURGE_ALL && !((h >> p->bit) & 1)))
        return p->seen >= p->seen_max ? 1 : 0;
    batch_del(&p->b, k, kl);
    return p->b.count >= p->max || p->seen >= p->seen_max ? 1 : 0;
}

/* The purge of purge_through, as *pp says (bit, or own/mask/index). */
static int purge_run(struct job *j, struct shard *scan, struct shard *sh, const struct purge *pp)
{
    struct purge p = *pp;
    uint8_t start[BATCH_KEY_MAX];
    struct timespec p0;
    size_t slen = 0;
    int rc;

    p.max = j->cancel ? ONLINE_PURGE_KEYS : PURGE_KEYS;
    p.seen_max = 2 * chunk_bytes(j);
    batch_init(&p.b);
    j->st.phase = p.phase ? p.phase : "purge";
    report(j, 1);
    do {
        clock_gettime(CLOCK_MONOTONIC, &p0);
        batch_reset(&p.b);
        p.seen = 0;
        rc = shard_scan(scan, slen ? start : NULL, slen, NULL, 0, purge_one, &p);
        if (rc >= 0 && p.b.count) {
            int r = shard_apply(sh, &p.b);
            if (r)
                rc = r;
            j->st.purged += p.b.count;
            kill_point("purge");
            report(j, 0);
            yield_after(j, &p0);
        }
        if (rc == 1) {
            int n = batch_key_after(p.last, p.lastlen, start);
            if (n < 0)
                rc = n;
            else
                slen = (size_t)n;
        }
    } while (rc == 1);
    batch_free(&p.b);
    if (rc == 0)
        rc = shard_sync(sh);
    report(j, 1);
    return rc;
}

/* purge_records, reading scan and deleting through sh: in a cluster scan
 * is the primary's own copy (its wrapper's scans hide what is not the
 * shard's) and sh the wrapper, whose stream takes the deletes to the
 * replicas. */
static int purge_through(struct job *j, struct shard *scan, struct shard *sh, unsigned bit)
{
    return purge_run(j, scan, sh, &(struct purge){.bit = bit});
}

/* Delete from sh every placed record whose hash has `bit` set (PURGE_ALL:
 * every one); sync. */
static int purge_records(struct job *j, struct shard *sh, unsigned bit)
{
    return purge_through(j, sh, sh, bit);
}

/* ---- the phases ---- */

static int cut_over(struct job *j, const struct store_layout *next)
{
    int rc;

    struct store_layout now;
    char err[256];

    j->st.phase = "cut-over";
    rc = store_layout_write(j->cfg, j->node, next);
    /* A failure after the rename (the directory's fsync) leaves the new
     * STORE in place: the change happened, and what follows must act on
     * that layout, as a resume would. */
    if (rc && store_layout_read(j->cfg, j->node, &now, err, sizeof(err)) == 0 &&
        now.slots == next->slots && memcmp(now.depth, next->depth, now.slots) == 0)
        rc = 0;
    if (rc)
        snprintf(j->err, j->errlen, "%s/STORE: %s", j->cfg->nodes[j->node].data_dir,
                 strerror(-rc));
    else
        kill_point("cut-over");
    return rc;
}

/* Split, from `after` (0: from the copy; 1: the cut-over is done). */
static int split_run(struct job *j, int after)
{
    struct store_layout next = j->l;
    unsigned t = j->s + (1u << j->d);
    struct shard *src = NULL, *dst = NULL;
    int rc;

    if (!after) {
        rc = placement_split(next.depth, &next.slots, CONFIG_MAX_SHARDS, j->s);
        if (rc)
            return rc;
        rc = shard_remove(j, t); /* what a killed copy left */
        if (rc == 0)
            rc = open_shard(j, j->s, &src);
        if (rc == 0)
            rc = open_shard(j, t, &dst);
        if (rc == 0)
            rc = copy_records(j, src, dst, 0, j->d, NULL);
        if (rc == 0)
            rc = meta_write(dst, t, j->d + 1);
        if (rc == 0)
            rc = shard_sync(dst);
        shard_close(dst);
        dst = NULL;
        if (rc) { /* before the cut-over: take it back (a full disk, say) */
            j->undone = shard_remove(j, t) == 0;
            goto out;
        }
        rc = cut_over(j, &next);
        if (rc)
            goto out;
    } else {
        rc = open_shard(j, j->s, &src);
        if (rc)
            goto out;
    }
    rc = meta_write(src, j->s, j->d + 1);
    if (rc == 0)
        rc = purge_records(j, src, j->d);
out:
    shard_close(src);
    j->o->shard_a = j->s;
    j->o->shard_b = t;
    j->o->depth = j->d + 1;
    return rc;
}

/* Take back a merge's copy: delete from low what belongs to the upper
 * buddy (hash bit d - 1 set; low's own records have it clear). */
static int merge_undo(struct job *j, struct shard *low)
{
    const char *phase = j->st.phase;
    int rc = purge_records(j, low, j->d - 1);

    j->st.phase = phase;
    return rc;
}

static int merge_run(struct job *j, int after)
{
    struct store_layout next = j->l;
    unsigned up = j->s + (1u << (j->d - 1)), into;
    struct shard *low = NULL, *high = NULL;
    int rc;

    if (!after) {
        rc = placement_merge(next.depth, &next.slots, j->s, &into);
        if (rc)
            return rc;
        rc = open_shard(j, j->s, &low);
        if (rc == 0)
            rc = open_shard(j, up, &high);
        /* A copy of an earlier try may hold records the upper buddy has
         * deleted since (a try that failed online, the mount going on, or
         * a kill between a mirrored write's two halves): the copy only
         * adds, so they go first. */
        if (rc == 0 && j->resuming)
            rc = merge_undo(j, low);
        if (rc == 0)
            rc = copy_records(j, high, low, 1, 0, NULL);
        shard_close(high);
        if (rc) {
            j->undone = low && merge_undo(j, low) == 0;
            goto out;
        }
        rc = cut_over(j, &next);
        if (rc)
            goto out;
    } else {
        rc = open_shard(j, j->s, &low);
        if (rc)
            goto out;
    }
    rc = meta_write(low, j->s, j->d - 1);
    if (rc == 0)
        rc = shard_sync(low);
    if (rc == 0) {
        j->st.phase = "purge";
        report(j, 1);
        kill_point("purge");
        rc = shard_remove(j, up);
    }
out:
    shard_close(low);
    j->o->shard_a = j->o->shard_b = j->s;
    j->o->depth = j->d - 1;
    return rc;
}

/* Run j's change (its state already written), then drop the state. */
static int job_run(struct job *j, int after)
{
    int rc = j->op == OP_SPLIT ? split_run(j, after) : merge_run(j, after);

    if (rc == 0 || j->undone) {
        int r = state_remove(j); /* done, or nothing happened */
        rc = rc ? rc : r;
    }
    if (rc == 0) {
        j->st.phase = "done";
        report(j, 1);
        j->o->done = j->st;
    } else if (!j->err[0]) {
        snprintf(j->err, j->errlen, "%s of shard %u: %s", j->op == OP_SPLIT ? "split" : "merge",
                 j->s, strerror(-rc));
    }
    return rc;
}

/* ---- open, close, the calls ---- */

/* Lock the store and read its layout; then finish a change in flight
 * (*resumed 1) unless told not to. */
static int job_open(struct job *j, struct config *cfg, int node, struct reshard_opts *o, char *err,
                    size_t errlen, int *resumed)
{
    struct store_lock_opts lock = {.wait_ms = o->wait_ms, .what = "reshard"};
    int rc;

    memset(j, 0, sizeof(*j));
    j->cfg = cfg;
    j->node = node;
    j->o = o;
    j->err = err;
    j->errlen = errlen;
    j->lock_fd = -1;
    err[0] = 0;
    *resumed = 0;
    clock_gettime(CLOCK_MONOTONIC, &j->t0);
    if (!store_layout_static(cfg)) {
        snprintf(err, errlen,
                 "%s: resharding works on a store without replicas or etcd (each node "
                 "changes its own shards) for now",
                 cfg->path);
        return -EOPNOTSUPP;
    }
    rc = store_lock_acquire(cfg->nodes[node].data_dir, &lock, &j->lock_fd, err, errlen);
    if (rc)
        return rc == -EBUSY ? -EAGAIN : rc; /* -EBUSY is a buddy split further */
    rc = store_layout_read(cfg, node, &j->l, err, errlen);
    if (rc) {
        if (rc == 1)
            snprintf(err, errlen, "%s: no store there yet (mount it once first)",
                     cfg->nodes[node].data_dir);
        return -EINVAL;
    }
    rc = state_read(j);
    if (rc <= 0)
        return rc;
    /* A change a kill interrupted: finish it first. */
    if (j->s >= CONFIG_MAX_SHARDS || j->d > 10 || (j->op == OP_MERGE && j->d == 0)) {
        snprintf(err, errlen, "%s/RESHARD: shard or depth out of range",
                 cfg->nodes[node].data_dir);
        return -EINVAL;
    }
    unsigned now = j->l.depth[j->s % j->l.slots];
    int after = j->op == OP_SPLIT ? now == j->d + 1 : now == j->d - 1;
    if (!after && now != j->d) {
        snprintf(err, errlen, "%s/RESHARD names a %s of shard %u at depth %u, but STORE gives "
                 "it depth %u: not a change this store can be in",
                 cfg->nodes[node].data_dir, j->op == OP_SPLIT ? "split" : "merge", j->s, j->d,
                 now);
        return -EINVAL;
    }
    j->resuming = 1;
    rc = job_run(j, after);
    if (rc == 0) {
        *resumed = 1;
        rc = store_layout_read(cfg, node, &j->l, err, errlen);
    }
    return rc;
}

static void job_close(struct job *j)
{
    if (j->lock_fd >= 0)
        close(j->lock_fd);
}

/* The store's layout into cfg, after a change (for the caller's report). */
static void cfg_update(struct job *j)
{
    j->cfg->shard_count = j->l.slots;
    memcpy(j->cfg->depth, j->l.depth, j->l.slots);
    for (unsigned i = 0; i < j->l.slots; i++)
        j->cfg->owner[i] = j->node;
}

/* Run the change set up in j from the start; cfg gets the new layout. */
static int job_start(struct job *j)
{
    int rc;

    memset(&j->st, 0, sizeof(j->st));
    held_in[0] = 0;
    clock_gettime(CLOCK_MONOTONIC, &j->t0);
    rc = state_write(j);
    if (rc == 0)
        rc = job_run(j, 0);
    if (rc == 0)
        rc = store_layout_read(j->cfg, j->node, &j->l, j->err, j->errlen);
    if (rc == 0)
        cfg_update(j);
    return rc;
}

/* A split of s at depth j->d: j->s, and -ERANGE when the new shard would
 * be past CONFIG_MAX_SHARDS. */
static int split_room(struct job *j, unsigned s)
{
    j->s = s;
    if ((2u << j->d) > CONFIG_MAX_SHARDS) {
        snprintf(j->err, j->errlen, "shard %u: a split would make shard %u, past the limit of %u",
                 s, s + (1u << j->d), CONFIG_MAX_SHARDS);
        return -ERANGE;
    }
    return 0;
}

/* Check that the change op of shard s can be made on the layout in j->l,
 * and set j->op, j->s (the shard split, or the lower buddy merged into) and
 * j->d (the depth the change starts from). -EINVAL: s is not a shard, or a
 * merge of a shard at depth 0, of a shard of another node, or in a cluster
 * below the config's count; -ERANGE: a split past CONFIG_MAX_SHARDS;
 * -EBUSY: a merge whose buddy was split further. */
static int job_check(struct job *j, int op, unsigned s)
{
    if (s >= j->l.slots || !placement_is_shard(j->l.depth, s) ||
        (op == OP_MERGE && j->l.depth[s] == 0)) {
        snprintf(j->err, j->errlen, "shard %u: no such shard%s (the store has %u slots)", s,
                 op == OP_MERGE ? ", or it has no buddy to merge with" : "", j->l.slots);
        return -EINVAL;
    }
    if (config_shard_owner(j->cfg, s) != j->node) {
        int o = config_shard_owner(j->cfg, s);

        snprintf(j->err, j->errlen, "shard %u is node %s's: its node changes it (-n %s)", s,
                 j->cfg->nodes[o].name, j->cfg->nodes[o].name);
        return -EINVAL;
    }
    j->op = op;
    j->d = j->l.depth[s];
    if (op == OP_SPLIT)
        return split_room(j, s);
    j->s = s & ((1u << (j->d - 1)) - 1);
    if (j->cfg->node_count > 1 && (1u << (j->d - 1)) < j->l.base) {
        /* Buddies below the config's count are shards of the config, each
         * its node's (maybe another's): only what a split made is merged. */
        snprintf(j->err, j->errlen,
                 "shard %u: in a cluster a merge goes no lower than the %u shards of "
                 "shards.conf, which belong to their nodes",
                 s, j->l.base);
        return -EINVAL;
    }
    if (j->l.depth[j->s] != j->d || j->l.depth[j->s + (1u << (j->d - 1))] != j->d) {
        snprintf(j->err, j->errlen, "shard %u: its buddy %u was split further; merge that first",
                 s, s ^ (1u << (j->d - 1)));
        return -EBUSY;
    }
    return 0;
}

int reshard_split(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen)
{
    struct job j;
    int resumed, rc = job_open(&j, cfg, node, o, err, errlen, &resumed);

    if (rc == 0)
        rc = job_check(&j, OP_SPLIT, s);
    if (rc == 0)
        rc = job_start(&j);
    job_close(&j);
    return rc;
}

int reshard_merge(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen)
{
    struct job j;
    int resumed, rc = job_open(&j, cfg, node, o, err, errlen, &resumed);

    if (rc == 0)
        rc = job_check(&j, OP_MERGE, s);
    if (rc == 0)
        rc = job_start(&j);
    job_close(&j);
    return rc;
}

int reshard_resume(struct config *cfg, int node, struct reshard_opts *o, char *err,
                   size_t errlen)
{
    struct job j;
    int resumed, rc = job_open(&j, cfg, node, o, err, errlen, &resumed);

    if (rc == 0)
        cfg_update(&j);
    job_close(&j);
    return rc < 0 ? rc : resumed;
}

/* ---- online: the mirror ----
 *
 * While a mounted store's shard is copied, the shard is replaced in the
 * namespace by a mirror: reads go to the source as before; a write is
 * applied to the source, then the part of it the target takes (split: the
 * keys with the new bit; merge: all) is applied to the target, both with
 * the mirror's lock held. The copy takes the same lock for each chunk it
 * reads and writes, so the target ends holding exactly what the source
 * holds of its half. Preconditions are checked by the source only (the
 * target's copy may be partial); a range delete is passed on as it is for
 * a split (the target holds only moved keys) and as deletes of the keys of
 * the range that belong to the upper buddy for a merge. */

/* What the mirror and the hide wrapper (below) share: a shard that sends
 * every op to the one it wraps, but for those each of them overrides. */
struct pass {
    struct shard base;
    struct shard *inner;
};

static struct shard *inner_of(struct shard *s)
{
    return ((struct pass *)s)->inner;
}

static int pass_get(struct shard *s, const void *k, size_t kl, size_t off, void *buf, size_t bl,
                    size_t *vl)
{
    return shard_get(inner_of(s), k, kl, off, buf, bl, vl);
}

static int pass_scan(struct shard *s, const void *a, size_t al, const void *b, size_t bl,
                     shard_scan_fn fn, void *ctx)
{
    return shard_scan(inner_of(s), a, al, b, bl, fn, ctx);
}

static int pass_scan_join(struct shard *s, const void *a, size_t al, const void *b, size_t bl,
                          const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    return shard_scan_join(inner_of(s), a, al, b, bl, j, fn, ctx);
}

static int pass_apply(struct shard *s, const struct batch *b)
{
    return shard_apply(inner_of(s), b);
}

static int pass_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    return shard_get_many(inner_of(s), r, n);
}

static int pass_sync(struct shard *s)
{
    return shard_sync(inner_of(s));
}

static int pass_stat(struct shard *s, struct shard_stat *st)
{
    return shard_stat(inner_of(s), st);
}

static void pass_close(struct shard *s)
{
    (void)s; /* the change owns the shards */
}

static struct shard *pass_inner(struct shard *s)
{
    return inner_of(s);
}

static void pass_init(struct pass *p, const struct shard_ops *ops, struct shard *inner)
{
    p->base.ops = ops;
    p->base.index = inner->index;
    p->inner = inner;
}

struct mirror {
    struct pass p;          /* reads go to the source, p.inner */
    struct shard *dst;
    struct shard *dst_all;  /* dst with nothing hidden, for a merge's range deletes */
    pthread_mutex_t mu;
    int all;                /* merge */
    unsigned bit;           /* split: the new bit; merge: the upper buddy's bit */
    int failed;             /* a write to the target failed: the change must stop */
    uint64_t passed;        /* writes passed on to the target */
};

static struct mirror *mirror_of(struct shard *s)
{
    return (struct mirror *)s;
}


/* 1 if key k is the target's. */
static int mir_takes(const struct mirror *m, const uint8_t *k, size_t kl)
{
    uint64_t h;

    if (record_placement(k, kl, &h))
        return 0;
    return m->all || ((h >> m->bit) & 1);
}

struct range_dels {
    const struct mirror *m;
    struct batch *out;
};

static int range_del_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct range_dels *r = ctx;
    uint64_t h;

    (void)v, (void)vl;
    if (record_placement(k, kl, &h) == 0 && ((h >> r->m->bit) & 1))
        batch_del(r->out, k, kl);
    return 0;
}

/* The target's part of batch b. */
static int mir_part(struct mirror *m, const struct batch *b, struct batch *out)
{
    struct batch_item it;
    size_t pos = 0;
    int rc;

    while ((rc = batch_next(b->buf, b->len, &pos, &it)) > 0) {
        switch (it.op) {
        case BATCH_PUT:
        case BATCH_DEL:
            if (mir_takes(m, it.key, it.klen))
                batch_add(out, it.op, it.key, it.klen, it.val, it.vlen);
            break;
        case BATCH_DEL_RANGE:
            if (!m->all) {
                batch_add(out, it.op, it.key, it.klen, it.val, it.vlen);
            } else {
                struct range_dels r = {m, out};
                rc = shard_scan(m->dst_all, it.key, it.klen, it.val, it.vlen, range_del_one,
                                &r);
                if (rc < 0)
                    return rc;
            }
            break;
        default:
            break; /* preconditions: the source's */
        }
    }
    return rc < 0 ? rc : out->error;
}

static int mir_apply(struct shard *s, const struct batch *b)
{
    struct mirror *m = mirror_of(s);
    struct batch part;
    int rc, r;

    /* Two applies and the mirror's lock may wait: never on a thread that
     * must not (a node server's I/O thread, shard.h), which would also run
     * the request again after the source took it. */
    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    batch_init(&part);
    pthread_mutex_lock(&m->mu);
    rc = shard_apply(m->p.inner, b);
    if (rc == 0 && !m->failed) {
        r = mir_part(m, b, &part);
        if (r == 0 && part.count) {
            r = shard_apply(m->dst, &part);
            m->passed++;
        }
        if (r)
            m->failed = r; /* the source has it: the write stands; the change stops */
    }
    pthread_mutex_unlock(&m->mu);
    batch_free(&part);
    return rc;
}

static const struct shard_ops mirror_ops = {
    .get = pass_get,
    .scan = pass_scan,
    .apply = mir_apply,
    .sync = pass_sync,
    .get_many = pass_get_many,
    .scan_join = pass_scan_join,
    .stat = pass_stat,
    .inner = pass_inner,
    .close = pass_close,
};

static void mirror_init(struct mirror *m, struct shard *src, struct shard *dst, int all,
                        unsigned bit)
{
    memset(m, 0, sizeof(*m));
    pass_init(&m->p, &mirror_ops, src);
    m->dst = m->dst_all = dst;
    m->all = all;
    m->bit = bit;
    pthread_mutex_init(&m->mu, NULL);
}

/* ---- hiding a half of a shard from scans ---- */

/* A shard that holds records it is not the home of, in the open window of
 * a change: the source of a split between its cut-over and the end of its
 * purge (the moved half is on the new shard already), and the lower buddy
 * of a merge during its copy (the upper half is still the buddy's). Point
 * operations never meet those records (the layout sends them elsewhere),
 * but a listing scans every shard, and would list them twice or list names
 * deleted since (an rmdir would find its directory not empty). This
 * wrapper skips, in scans, the placed records whose hash has `bit` set;
 * everything else goes to the shard as it is. */
struct hide {
    struct pass p;
    unsigned bit;
};

struct hide_scan {
    unsigned bit;
    shard_scan_fn fn;
    shard_join_fn jfn;
    void *ctx;
};

static struct hide *hide_of(struct shard *s)
{
    return (struct hide *)s;
}

static int hidden(unsigned bit, const uint8_t *k, size_t kl)
{
    uint64_t h;

    return record_placement(k, kl, &h) == 0 && ((h >> bit) & 1);
}

static int hide_scan_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct hide_scan *x = ctx;

    return hidden(x->bit, k, kl) ? 0 : x->fn(x->ctx, k, kl, v, vl);
}

static int hide_join_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl,
                         const uint8_t *jv, size_t jl)
{
    struct hide_scan *x = ctx;

    return hidden(x->bit, k, kl) ? 0 : x->jfn(x->ctx, k, kl, v, vl, jv, jl);
}

static int hide_scan(struct shard *s, const void *a, size_t al, const void *b, size_t bl,
                     shard_scan_fn fn, void *ctx)
{
    struct hide_scan x = {.bit = hide_of(s)->bit, .fn = fn, .ctx = ctx};

    return shard_scan(inner_of(s), a, al, b, bl, hide_scan_one, &x);
}

static int hide_scan_join(struct shard *s, const void *a, size_t al, const void *b, size_t bl,
                          const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    struct hide_scan x = {.bit = hide_of(s)->bit, .jfn = fn, .ctx = ctx};

    return shard_scan_join(inner_of(s), a, al, b, bl, j, hide_join_one, &x);
}


static const struct shard_ops hide_ops = {
    .get = pass_get,
    .scan = hide_scan,
    .apply = pass_apply,
    .sync = pass_sync,
    .get_many = pass_get_many,
    .scan_join = hide_scan_join,
    .stat = pass_stat,
    .inner = pass_inner,
    .close = pass_close,
};

static struct shard *hide_init(struct hide *h, struct shard *inner, unsigned bit)
{
    pass_init(&h->p, &hide_ops, inner);
    h->bit = bit;
    return &h->p.base;
}

/* ---- online: the change ---- */

/* No operation in flight in the namespace or the node's server, new ones
 * waiting, until resume_all. */
static void pause_all(struct job *j, struct ns *ns)
{
    ns_quiesce(ns);
    if (j->srv)
        node_server_quiesce(j->srv);
}

static void resume_all(struct job *j, struct ns *ns)
{
    if (j->srv)
        node_server_unquiesce(j->srv);
    ns_unquiesce(ns);
}

/* Shard index is s for the namespace and the node's server; paused. */
static void serve_as(struct job *j, struct ns *ns, unsigned index, struct shard *s)
{
    ns_shard_swap(ns, index, s);
    if (j->srv)
        node_server_set_shard(j->srv, index, s);
}

/* Shard index is s from now on (a mirror, a hide, or the shard itself
 * again), swapped in with no operation in flight. */
static void serve_paused(struct job *j, struct ns *ns, unsigned index, struct shard *s)
{
    pause_all(j, ns);
    serve_as(j, ns, index, s);
    resume_all(j, ns);
}

static double ms_since(const struct timespec *t0)
{
    return since(t0) * 1000.0;
}

/* The copy of a mounted store's shard `index` (src) into dst through the
 * mirror m; on a failure the mirror is out of the namespace again. */
static int mirrored_copy(struct job *j, struct ns *ns, unsigned index, struct mirror *m,
                         struct shard *src, struct shard *dst, int all, unsigned bit)
{
    int rc;

    mirror_init(m, src, dst, all, bit);
    serve_paused(j, ns, index, &m->p.base);
    rc = copy_records(j, src, dst, all, all ? 0 : bit, &m->mu);
    if (rc == 0 && m->failed)
        rc = m->failed;
    if (rc) {
        serve_paused(j, ns, index, src);
        pthread_mutex_destroy(&m->mu);
    }
    return rc;
}

/* The start of a cut-over: operations paused (the caller ends it with
 * ns_unquiesce and cutover_end), the target synced, STORE rewritten. */
static int cutover_begin(struct job *j, struct ns *ns, struct mirror *m, struct shard *dst,
                         const struct store_layout *next, struct timespec *p0)
{
    int rc;

    j->st.phase = "cut-over";
    report(j, 1);
    clock_gettime(CLOCK_MONOTONIC, p0);
    pause_all(j, ns);
    rc = m->failed ? m->failed : shard_sync(dst);
    return rc ? rc : cut_over(j, next);
}

static void cutover_end(struct job *j, struct mirror *m, const struct timespec *p0)
{
    j->o->pause_ms = ms_since(p0);
    j->o->mirrored = m->passed;
    pthread_mutex_destroy(&m->mu);
}

/* Split shard s of the mounted store: copy through the mirror, then the
 * cut-over with operations paused, then the purge while they go on. */
static int online_split(struct job *j, struct ns *ns)
{
    unsigned t = j->s + (1u << j->d);
    struct shard *src = ns_shard(ns, j->s), *dst = NULL;
    struct store_layout next = j->l;
    struct mirror m;
    struct hide h;
    struct timespec p0;
    int rc;

    rc = placement_split(next.depth, &next.slots, CONFIG_MAX_SHARDS, j->s);
    if (rc == 0)
        rc = state_write(j);
    if (rc == 0)
        rc = shard_remove(j, t);
    if (rc == 0)
        rc = open_shard(j, t, &dst);
    if (rc == 0)
        rc = meta_write(dst, t, j->d + 1);
    if (rc)
        goto fail;
    rc = mirrored_copy(j, ns, j->s, &m, src, dst, 0, j->d);
    if (rc)
        goto fail;
    /* The cut-over: no operation in flight; the target gets what the
     * last writes gave it on disk, STORE the new layout. */
    rc = cutover_begin(j, ns, &m, dst, &next, &p0);
    /* until the purge is done, scans of the source skip the moved half */
    serve_as(j, ns, j->s, rc == 0 ? hide_init(&h, src, j->d) : src);
    if (rc == 0) {
        rc = ns_layout_split(ns, j->s, dst); /* cannot fail: checked above */
        if (rc == 0) {
            /* the namespace's now; the server follows it whatever comes */
            if (j->srv) {
                node_server_set_shard(j->srv, t, dst);
                node_server_set_layout(j->srv, next.depth, next.slots);
            }
            dst = NULL;
            rc = meta_write(src, j->s, j->d + 1);
        }
    }
    resume_all(j, ns);
    cutover_end(j, &m, &p0);
    if (rc == 0) {
        j->o->shard_a = j->s;
        j->o->shard_b = t;
        j->o->depth = j->d + 1;
        rc = purge_records(j, src, j->d);
    }
    /* h lives on this stack: out of the namespace and the server before it
     * goes, purged or not (the records stay hidden by the layout alone:
     * point operations never route to them) */
    serve_paused(j, ns, j->s, src);
    shard_close(dst); /* NULL once the namespace has it; else the state stays */
    return rc;
fail:
    shard_close(dst);
    if (state_remove(j) == 0) /* before the cut-over: nothing happened */
        shard_remove(j, t);
    return rc;
}

/* Merge the upper buddy into j->s of the mounted store. */
static int online_merge(struct job *j, struct ns *ns)
{
    unsigned up = j->s + (1u << (j->d - 1)), into;
    struct shard *low = ns_shard(ns, j->s), *high = ns_shard(ns, up), *gone = NULL;
    struct store_layout next = j->l;
    struct mirror m;
    struct hide h;
    struct timespec p0;
    int rc;

    rc = placement_merge(next.depth, &next.slots, j->s, &into);
    if (rc == 0)
        rc = state_write(j);
    if (rc)
        return rc;
    /* until the cut-over, scans of low skip the copies of up's records */
    serve_paused(j, ns, j->s, hide_init(&h, low, j->d - 1));
    rc = mirrored_copy(j, ns, up, &m, high, low, 1, j->d - 1);
    if (rc) {
        if (merge_undo(j, low) == 0) /* low's own records are not touched */
            state_remove(j);
        serve_paused(j, ns, j->s, low);
        return rc;
    }
    rc = cutover_begin(j, ns, &m, low, &next, &p0);
    serve_as(j, ns, up, high);
    serve_as(j, ns, j->s, low);
    if (rc == 0) {
        gone = ns_layout_merge(ns, j->s);
        if (gone && j->srv) {
            /* the server follows the namespace whatever comes */
            node_server_set_shard(j->srv, up, NULL);
            node_server_set_layout(j->srv, next.depth, next.slots);
        }
        rc = gone ? meta_write(low, j->s, j->d - 1) : -EIO;
    }
    resume_all(j, ns);
    cutover_end(j, &m, &p0);
    /* nobody reaches high any more: every op that could held the layout
     * (namespace and server), and the cut-over waited for them */
    shard_close(gone);
    if (rc == 0)
        rc = shard_sync(low); /* its Mshard before RESHARD goes */
    if (rc)
        return rc; /* RESHARD stays: resume writes Mshard, removes the buddy */
    j->st.phase = "purge";
    report(j, 1);
    kill_point("purge");
    rc = shard_remove(j, up);
    j->o->shard_a = j->o->shard_b = j->s;
    j->o->depth = j->d - 1;
    return rc;
}


/* ---- online in a cluster with etcd (DESIGN.md, Resharding in a cluster) ----
 *
 * The job runs on the primary of the shard it changes, and every copy of
 * the shard changes with it: the map makes the target (split_begin), the
 * failover thread of each node named gives it a copy, this node's takes
 * the target's primary role, and what the copy and the mirror write goes
 * through the target's replicated wrapper, so its replicas build their
 * copies from its stream as they would after a `replica add`. The map's
 * one txn (split_commit, merge) is the cut-over; every node follows the
 * new layout from the map (failover.h). The purge deletes through the
 * source's wrapper, so its replicas purge by the stream too; until it is
 * done, the wrappers' scans hide what a shard does not own at its map
 * depth (shard_repl.c), on every node and after a failover. */

#define CLUSTER_ROLE_MS 10000  /* for the failover thread to take the target's role */
#define CLUSTER_LEVEL_MS 30000 /* for the target's replicas to copy what was written */
#define CLUSTER_FINAL_MS 2000  /* the same in the cut-over's pause: the last writes */
#define CLUSTER_STEP_MS 10

/* A shard whose primary this node holds for the job (no handover meanwhile). */
struct held {
    struct failover *fo;
    unsigned n;
    struct shard *w;    /* the primary's wrapper (shard_repl.h) */
    struct shard *sw;   /* its switch: what the namespace holds */
    struct shard *copy; /* this node's LMDB copy: what the wrapper hides, unhidden */
};

/* Hold shard n's primary role, waiting up to ms for the failover thread to
 * take it. 0, or -EPERM with the reason in j->err. */
static int hold_primary(struct job *j, struct failover *fo, unsigned n, unsigned ms,
                        struct held *h)
{
    int64_t until = clock_mono_ms() + ms;

    memset(h, 0, sizeof(*h));
    h->fo = fo;
    h->n = n;
    while (!(h->w = failover_primary_get(fo, n))) {
        if (clock_mono_ms() >= until) {
            snprintf(j->err, j->errlen,
                     "shard %u: %s is not its primary (run the command on its primary's node; "
                     "`shardfs status` names it), or a handover of it is under way",
                     n, j->cfg->nodes[j->node].name);
            return -EPERM;
        }
        usleep(CLUSTER_STEP_MS * 1000);
    }
    h->sw = failover_switch(fo, n);
    h->copy = failover_copy(fo, n);
    if (!h->sw || !h->copy) {
        failover_primary_put(fo, n);
        h->w = NULL;
        snprintf(j->err, j->errlen, "shard %u: no switch or copy of it here", n);
        return -EIO;
    }
    return 0;
}

static void let_go(struct held *h)
{
    if (h->w)
        failover_primary_put(h->fo, h->n);
    h->w = NULL;
}

/* A shard that may hold records it does not own at its map depth (a
 * split's source until its purge is done, a merge's lower buddy from its
 * copy until its cut-over) carries this record, written through its
 * wrapper: its replicas hold it too, so after a kill or a failover the
 * shard's primary, whoever it is by then, finds it and purges
 * (`shardfs reshard resume`). Ordinary data to the layers below. */
static const char purge_mark[] = "Mreshard-purge";

static int mark_set(struct shard *w, int on)
{
    struct batch b;
    int rc;

    batch_init(&b);
    if (on)
        batch_put(&b, purge_mark, sizeof(purge_mark) - 1, "", 0);
    else
        batch_del(&b, purge_mark, sizeof(purge_mark) - 1);
    rc = shard_apply(w, &b);
    batch_free(&b);
    return rc;
}

/* Delete from h's shard every placed record it does not own at depth,
 * through its wrapper; then its mark. Counted in j->st.purged. */
static int purge_unowned(struct job *j, const struct held *h, unsigned depth)
{
    struct purge p = {.own = 1, .mask = (1ull << depth) - 1, .index = h->n};
    int rc = purge_run(j, h->copy, h->w, &p);

    return rc ? rc : mark_set(h->w, 0);
}

/* What an earlier try left in the target (the copy only adds): gone
 * first, not counted as the change's purge. */
static int clear_target(struct job *j, const struct held *h)
{
    uint64_t purged = j->st.purged;
    int rc = purge_run(j, h->copy, h->w, &(struct purge){.bit = PURGE_ALL, .phase = "copy"});

    j->st.purged = purged;
    return rc;
}

/* Shard index is s for the namespace and srv for the node's server (a
 * mirror for both, or the switch and its wrapper again); paused. */
static void serve_pair(struct job *j, struct ns *ns, unsigned index, struct shard *s,
                       struct shard *srv)
{
    ns_shard_swap(ns, index, s);
    if (j->srv)
        node_server_set_shard(j->srv, index, srv);
}

static void serve_pair_paused(struct job *j, struct ns *ns, unsigned index, struct shard *s,
                              struct shard *srv)
{
    pause_all(j, ns);
    serve_pair(j, ns, index, s, srv);
    resume_all(j, ns);
}

/* Wait up to ms until every replica the map gives shard t has what its
 * primary wrapper w holds now and is in t's in-sync set. 0, or
 * -ETIMEDOUT with the laggard named in j->err. */
static int replicas_level(struct job *j, struct shard_map *map, unsigned t, struct shard *w,
                          unsigned ms)
{
    int64_t until = clock_mono_ms() + ms;
    struct shard_repl_status st;
    struct shard_copies c;
    int rc = shard_repl_status(w, &st);

    if (rc == 0)
        rc = shard_map_get(map, t, &c);
    for (unsigned i = 0; rc == 0 && i < c.nreplicas; i++) {
        /* in slices: a cancel (the mount going away) ends the wait */
        do {
            int64_t left = until - clock_mono_ms();

            rc = shard_repl_wait_level(w, c.replicas[i], st.position.lsn,
                                       left > 200 ? 200 : left > 0 ? (unsigned)left : 0);
        } while (rc == -ETIMEDOUT && clock_mono_ms() < until && !(j->cancel && *j->cancel));
        if (rc == 0)
            continue;
        if (j->cancel && *j->cancel)
            return -ECANCELED;
        snprintf(j->err, j->errlen, "shard %u: its replica on %s did not catch up within %u ms",
                 t, c.replicas[i] >= 0 ? j->cfg->nodes[c.replicas[i]].name : "?", ms);
        return rc;
    }
    while (rc == 0 && shard_map_get(map, t, &c) == 0 &&
           c.in_sync != (1u << c.nreplicas) - 1) {
        if (j->cancel && *j->cancel)
            return -ECANCELED;
        if (clock_mono_ms() >= until) {
            snprintf(j->err, j->errlen,
                     "shard %u: its replicas are level but not all in its in-sync set after "
                     "%u ms", t, ms);
            return -ETIMEDOUT;
        }
        usleep(CLUSTER_STEP_MS * 1000);
    }
    return rc;
}

/* The map's txn of a cut-over returned rc: an etcd error may hide a txn
 * that was made (its reply lost). 0 when the map shows the change made
 * (s at depth want), else rc. */
static int txn_outcome(struct shard_map *map, unsigned s, unsigned want, int rc)
{
    struct shard_copies c;

    for (int k = 0; rc < 0 && rc != -EPERM && rc != -ESTALE && k < 100; k++) {
        if (shard_map_get(map, s, &c) == 0 && c.depth == want && !c.building)
            return 0;
        usleep(CLUSTER_STEP_MS * 1000);
    }
    return rc;
}

/* The cut-over of a cluster's change: paused, this node must still lead
 * `lead` (a failover meanwhile takes the change back), then the map's
 * txn; the namespace gets src's switch back (and the server its wrapper),
 * then follows the map's layout. 1 when the change is made. */
static int cluster_cut_over(struct job *j, struct ns *ns, struct failover *fo,
                            struct shard_map *map, const struct held *src, unsigned lead,
                            int merge)
{
    unsigned s = j->s, d = j->d;
    int rc = 0;

    if (shard_map_leader(map, lead) != j->node || !shard_map_lease_ok(map)) {
        snprintf(j->err, j->errlen, "shard %u: %s lost its lease or the role meanwhile", lead,
                 j->cfg->nodes[j->node].name);
        rc = -EPERM;
    }
    if (rc == 0)
        rc = merge ? shard_map_merge(map, s, d) : shard_map_split_commit(map, s, d);
    if (rc)
        rc = txn_outcome(map, s, merge ? d - 1 : d + 1, rc);
    if (rc && !j->err[0])
        snprintf(j->err, j->errlen, "shard %u: the shard map refused the cut-over: %s", s,
                 strerror(-rc));
    serve_pair(j, ns, src->n, src->sw, src->w);
    if (rc)
        return rc;
    kill_point("cut-over");
    rc = failover_follow_paused(fo);
    if (rc < 0)
        fprintf(stderr, "shardfs: %s of shard %u: made in the map, but this node's layout "
                "did not follow it: %s (the failover thread tries again)\n",
                merge ? "merge" : "split", s, strerror(-rc));
    return 1;
}

/* The copy of src (held here) into dst through a mirror that also takes
 * the writes of the namespace and the server meanwhile; split: the
 * records with bit d, merge (all): every one. On a failure the mirror is
 * out again. */
static int cluster_copy(struct job *j, struct ns *ns, struct mirror *m, const struct held *src,
                        const struct held *dst, int all, unsigned bit)
{
    int rc;

    mirror_init(m, src->w, dst->w, all, bit);
    m->dst_all = dst->copy; /* dst's wrapper hides what the copy put there */
    serve_pair_paused(j, ns, src->n, &m->p.base, &m->p.base);
    rc = copy_records(j, src->w, dst->w, all, bit, &m->mu);
    if (rc == 0 && m->failed)
        rc = m->failed;
    if (rc) {
        serve_pair_paused(j, ns, src->n, src->sw, src->w);
        pthread_mutex_destroy(&m->mu);
    }
    return rc;
}

static int cluster_split(struct job *j, struct ns *ns, struct failover *fo,
                         struct shard_map *map)
{
    unsigned s = j->s, d = j->d, t = s + (1u << d);
    struct held hs, ht = {0};
    struct timespec p0;
    struct mirror m;
    int rc, begun = 0, made = 0;

    rc = hold_primary(j, fo, s, 0, &hs);
    if (rc)
        return rc;
    rc = mark_set(hs.w, 1);
    if (rc == 0)
        rc = shard_map_split_begin(map, s, d);
    if (rc == -EEXIST) {
        /* a split another primary of s began (a failover since): its
         * target goes, every node drops its copy, and this one begins */
        rc = shard_map_split_abandon(map, s, d);
        if (rc == 0)
            rc = shard_map_split_begin(map, s, d);
    }
    if (rc) {
        snprintf(j->err, j->errlen, "shard %u: the shard map refused the split: %s", s,
                 strerror(-rc));
        goto out;
    }
    begun = 1;
    rc = hold_primary(j, fo, t, CLUSTER_ROLE_MS, &ht);
    if (rc == 0)
        rc = clear_target(j, &ht);
    if (rc == 0)
        rc = meta_write(ht.w, t, d + 1);
    if (rc == 0)
        rc = cluster_copy(j, ns, &m, &hs, &ht, 0, d);
    if (rc)
        goto out;
    /* most of the replicas' catching up while writes go on */
    rc = replicas_level(j, map, t, ht.w, CLUSTER_LEVEL_MS);
    if (rc == 0) {
        j->st.phase = "cut-over";
        report(j, 1);
        clock_gettime(CLOCK_MONOTONIC, &p0);
        pause_all(j, ns);
        rc = m.failed ? m.failed : shard_sync(ht.w);
        if (rc == 0)
            rc = replicas_level(j, map, t, ht.w, CLUSTER_FINAL_MS);
        if (rc == 0)
            rc = cluster_cut_over(j, ns, fo, map, &hs, s, 0);
        else
            serve_pair(j, ns, s, hs.sw, hs.w);
        resume_all(j, ns);
        cutover_end(j, &m, &p0);
        made = rc == 1;
        rc = rc == 1 ? 0 : rc;
    } else {
        serve_pair_paused(j, ns, s, hs.sw, hs.w);
        pthread_mutex_destroy(&m.mu);
    }
    if (made) {
        j->o->shard_a = s;
        j->o->shard_b = t;
        j->o->depth = d + 1;
        rc = meta_write(hs.w, s, d + 1);
        if (rc == 0)
            rc = purge_unowned(j, &hs, d + 1);
    }
out:
    let_go(&ht); /* before an abandon: t's step-down waits for it */
    if (begun && !made && shard_map_split_abandon(map, s, d) == 0)
        begun = 0, j->undone = 1;
    if (!made && !begun)
        mark_set(hs.w, 0); /* nothing of the change is left (else resume needs it) */
    let_go(&hs);
    return rc;
}

/* A merge's copies of the upper buddy's records (bit `bit` set) out of
 * the lower one again, not counted as a purge. */
static int clear_merged(struct job *j, const struct held *low, unsigned bit)
{
    uint64_t purged = j->st.purged;
    int rc = purge_run(j, low->copy, low->w,
                       &(struct purge){.bit = bit, .phase = j->st.phase ? j->st.phase : "copy"});

    j->st.purged = purged;
    return rc;
}

static int cluster_merge(struct job *j, struct ns *ns, struct failover *fo,
                         struct shard_map *map)
{
    unsigned s = j->s, d = j->d, u = s + (1u << (d - 1));
    struct held hs, hu = {0};
    struct timespec p0;
    struct mirror m;
    int rc, made = 0;

    rc = hold_primary(j, fo, s, 0, &hs);
    if (rc == 0)
        rc = hold_primary(j, fo, u, 0, &hu);
    if (rc == 0)
        rc = mark_set(hs.w, 1);
    /* what an earlier try copied goes first (u's records: bit d - 1 set) */
    if (rc == 0)
        rc = clear_merged(j, &hs, d - 1);
    if (rc == 0)
        rc = cluster_copy(j, ns, &m, &hu, &hs, 1, d - 1);
    if (rc)
        goto out;
    j->st.phase = "cut-over";
    report(j, 1);
    clock_gettime(CLOCK_MONOTONIC, &p0);
    pause_all(j, ns);
    rc = m.failed ? m.failed : shard_sync(hs.w);
    if (rc == 0 && shard_map_leader(map, u) != j->node) {
        snprintf(j->err, j->errlen, "shard %u: %s lost its role meanwhile", u,
                 j->cfg->nodes[j->node].name);
        rc = -EPERM;
    }
    if (rc == 0)
        rc = cluster_cut_over(j, ns, fo, map, &hu, s, 1);
    else
        serve_pair(j, ns, u, hu.sw, hu.w);
    resume_all(j, ns);
    cutover_end(j, &m, &p0);
    made = rc == 1;
    rc = made ? 0 : rc;
    if (made) {
        j->o->shard_a = j->o->shard_b = s;
        j->o->depth = d - 1;
        rc = meta_write(hs.w, s, d - 1);
        if (rc == 0)
            rc = mark_set(hs.w, 0);
        if (rc == 0)
            rc = shard_sync(hs.w);
        j->st.phase = "purge"; /* u's copies go with its entry (failover.c) */
        report(j, 1);
    }
out:
    let_go(&hu); /* its step-down waits for it */
    if (!made && rc && hs.w && clear_merged(j, &hs, d - 1) == 0 && mark_set(hs.w, 0) == 0)
        j->undone = 1;
    let_go(&hs);
    return rc;
}

/* Check the change against the map (j->op, j->s, j->d set as job_check
 * does for a static store). */
static int cluster_check(struct job *j, struct shard_map *map, int op, unsigned s)
{
    struct shard_copies c = {0}, b;

    if (shard_map_get(map, s, &c) != 0 || c.building) {
        snprintf(j->err, j->errlen, "shard %u: no such shard in the shard map%s", s,
                 c.building ? " (it is being split off another)" : "");
        return -EINVAL;
    }
    j->op = op;
    j->d = c.depth;
    if (op == OP_SPLIT)
        return split_room(j, s);
    if (j->d == 0 || (1u << (j->d - 1)) < j->cfg->file_shards) {
        snprintf(j->err, j->errlen,
                 "shard %u: a merge goes no lower than the %u shards the store was made with",
                 s, j->cfg->file_shards);
        return -EINVAL;
    }
    j->s = s & ((1u << (j->d - 1)) - 1);
    if (shard_map_get(map, j->s, &c) != 0 || c.depth != j->d || c.building ||
        shard_map_get(map, j->s + (1u << (j->d - 1)), &b) != 0 || b.depth != j->d ||
        b.building) {
        snprintf(j->err, j->errlen, "shard %u: its buddy %u was split further; merge that first",
                 s, s ^ (1u << (j->d - 1)));
        return -EBUSY;
    }
    return 0;
}

/* Resume's second part: purge every shard this node leads that carries
 * the mark (a change was killed after its cut-over, or in a merge's
 * copy). 1 when one was found, 0 when none. */
static int cluster_purge_marked(struct job *j, struct failover *fo, struct shard_map *map)
{
    int found = 0;

    for (unsigned n = 0; n < CONFIG_MAX_SHARDS; n++) {
        struct shard_copies c;
        struct held h;
        uint8_t v[1];
        size_t vl;
        int rc;

        if (shard_map_get(map, n, &c) != 0 || c.building || !shard_map_is_primary(map, n) ||
            hold_primary(j, fo, n, 0, &h) != 0)
            continue;
        rc = shard_get(h.w, purge_mark, sizeof(purge_mark) - 1, 0, v, 0, &vl);
        if (rc == 0) {
            found = 1;
            j->op = OP_SPLIT;
            j->s = j->o->shard_a = j->o->shard_b = n;
            j->o->depth = c.depth;
            rc = purge_unowned(j, &h, c.depth);
        }
        let_go(&h);
        if (rc < 0 && rc != -ENOENT) {
            snprintf(j->err, j->errlen, "shard %u: the purge of what it does not own: %s", n,
                     strerror(-rc));
            return rc;
        }
    }
    j->err[0] = 0; /* hold_primary's word on shards this node does not lead */
    if (!found)
        snprintf(j->err, j->errlen, "no split in flight and nothing to purge on the shards %s "
                 "leads", j->cfg->nodes[j->node].name);
    return found;
}

/* Resume: a split this node leads the source of, left building (a kill):
 * run again; then the purges left (cluster_purge_marked). 1 when one was
 * found and finished, 0 when none. */
static int cluster_resume(struct job *j, struct ns *ns, struct failover *fo,
                          struct shard_map *map)
{
    for (unsigned t = 1; t < CONFIG_MAX_SHARDS; t++) {
        struct shard_copies c;
        unsigned s;
        int rc;

        if (shard_map_get(map, t, &c) != 0 || !c.building || c.depth == 0)
            continue;
        s = t - (1u << (c.depth - 1));
        if (!shard_map_is_primary(map, s))
            continue;
        j->op = OP_SPLIT;
        j->s = s;
        j->d = c.depth - 1;
        rc = cluster_split(j, ns, fo, map);
        return rc < 0 ? rc : 1;
    }
    return cluster_purge_marked(j, fo, map);
}

static int reshard_cluster(struct job *j, struct ns *ns, struct failover *fo, int op, unsigned s)
{
    struct shard_map *map = failover_map(fo);
    int rc;

    if (op == RESHARD_RESUME) {
        rc = cluster_resume(j, ns, fo, map);
        if (rc == 0)
            return -ENOENT;
        return rc < 0 ? rc : 0;
    }
    rc = cluster_check(j, map, op == RESHARD_MERGE ? OP_MERGE : OP_SPLIT, s);
    if (rc == 0)
        rc = j->op == OP_SPLIT ? cluster_split(j, ns, fo, map) : cluster_merge(j, ns, fo, map);
    return rc;
}

int reshard_online(struct ns *ns, struct node_server *srv, struct failover *fo,
                   const struct config *cfg, int node, int op, unsigned s,
                   const volatile int *cancel, struct reshard_opts *o, char *err, size_t errlen)
{
    int merge = op == RESHARD_MERGE;
    struct job j;
    int rc;

    memset(&j, 0, sizeof(j));
    j.srv = srv;
    j.cfg = (struct config *)cfg; /* read only here: paths, the layout's base */
    j.node = node;
    j.o = o;
    j.err = err;
    j.errlen = errlen;
    j.lock_fd = -1;
    j.cancel = cancel;
    err[0] = 0;
    held_in[0] = 0;
    o->pause_ms = 0;
    o->mirrored = 0;
    clock_gettime(CLOCK_MONOTONIC, &j.t0);
    if (fo) {
        rc = reshard_cluster(&j, ns, fo, op, s);
        if (rc == 0) {
            j.st.phase = "done";
            report(&j, 1);
            o->done = j.st;
        } else if (!err[0]) {
            snprintf(err, errlen, "%s of shard %u: %s", merge ? "merge" : "split", s,
                     strerror(-rc));
        }
        return rc;
    }
    if (op == RESHARD_RESUME) {
        snprintf(err, errlen, "a mounted store without etcd resumes nothing: unmount it and "
                 "run `shardfs reshard resume`");
        return -EINVAL;
    }
    rc = store_layout_read(cfg, node, &j.l, err, errlen);
    if (rc)
        return rc < 0 ? -EINVAL : -EIO;
    {
        char what[64];
        int p = reshard_pending(cfg, node, what, sizeof(what), err, errlen);

        if (p < 0)
            return -EIO;
        if (p > 0) {
            /* a change of this mount that failed after its cut-over (a
             * full disk): its state must not be overwritten */
            snprintf(err, errlen,
                     "a change that failed is pending (%s): unmount the store and run "
                     "`shardfs reshard resume`",
                     what);
            return -EBUSY;
        }
    }
    rc = job_check(&j, merge ? OP_MERGE : OP_SPLIT, s);
    if (rc == 0 && !ns_is_shard(ns, s)) {
        snprintf(err, errlen, "shard %u: not a shard of the mounted store", s);
        rc = -EINVAL;
    }
    if (rc)
        return rc;
    rc = merge ? online_merge(&j, ns) : online_split(&j, ns);
    if (rc == 0)
        rc = state_remove(&j);
    if (rc == 0) {
        j.st.phase = "done";
        report(&j, 1);
        o->done = j.st;
    } else if (!err[0]) {
        snprintf(err, errlen, "%s of shard %u: %s", merge ? "merge" : "split", s, strerror(-rc));
    }
    return rc;
}
