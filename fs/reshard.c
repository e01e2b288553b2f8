/* reshard.c -- split and merge shards of a single-node store (reshard.h).
 *
 * The copy reads the source with one scan (LMDB's order) and writes the
 * target in batches of about COPY_BATCH bytes; the purge collects the keys
 * to delete in batches of PURGE_KEYS (a scan cannot write the shard it
 * scans) and goes on after the last one. Both go through the shard
 * interface, so the target's redo log makes every batch survive a kill, and
 * the shard's own `Mshard` record is written like any other.
 */
#include "reshard.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "durable.h"
#include "placement.h"
#include "record.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "store_layout.h"
#include "store_lock.h"

#define COPY_BATCH (4u << 20)
#define PURGE_KEYS 8192u
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
    struct timespec t0, last;
    struct reshard_stats st;
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

/* A test's kill point: SHARDFS_TEST_KILL_AT=PHASE kills this process
 * (SIGKILL, as kill -9 would) once the phase has done part of its work. */
static void kill_point(const char *phase)
{
    const char *at = getenv("SHARDFS_TEST_KILL_AT");

    if (at && !strcmp(at, phase))
        raise(SIGKILL);
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
    char path[PATH_MAX + 16], tmp[PATH_MAX + 32], text[64];
    int fd, n, rc = state_path(j->cfg, j->node, path, sizeof(path));

    if (rc)
        return rc;
    n = snprintf(text, sizeof(text), "%s %u %u\n", j->op == OP_SPLIT ? "split" : "merge", j->s,
                 j->d);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    errno = 0;
    if (write(fd, text, (size_t)n) != n || fsync(fd) != 0)
        rc = errno ? -errno : -EIO;
    close(fd);
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    return rc ? rc : durable_sync_parent(path);
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

int reshard_pending(const struct config *cfg, int node, char *err, size_t errlen)
{
    char path[PATH_MAX + 16];

    if (state_path(cfg, node, path, sizeof(path))) {
        snprintf(err, errlen, "%s: data_dir path too long", cfg->path);
        return -1;
    }
    if (access(path, F_OK) == 0)
        return 1;
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
    int rc;
};

static int copy_flush(struct copy *c)
{
    int rc = c->b.count ? shard_apply(c->to, &c->b) : 0;

    batch_reset(&c->b);
    return rc;
}

static int copy_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct copy *c = ctx;
    uint64_t h;
    int rc;

    if (record_placement(k, kl, &h))
        return 0; /* not placed: the shard's own */
    if (!c->all && !((h >> c->bit) & 1))
        return 0;
    rc = batch_put(&c->b, k, kl, v, vl);
    if (rc)
        return rc;
    c->j->st.records++;
    c->j->st.bytes += kl + vl;
    if (c->b.len >= COPY_BATCH) {
        rc = copy_flush(c);
        if (rc)
            return rc;
        kill_point("copy");
        report(c->j, 0);
    }
    return 0;
}

/* Copy from shard `from` into `to`: every placed record (all) or those with
 * hash bit `bit` set; then sync `to`. */
static int copy_records(struct job *j, struct shard *from, struct shard *to, int all, unsigned bit)
{
    struct copy c = {.j = j, .to = to, .all = all, .bit = bit};
    struct shard_stat ss;
    int rc;

    batch_init(&c.b);
    j->st.phase = "copy";
    j->st.estimate = shard_stat(from, &ss) == 0 ? (all ? ss.bytes : ss.bytes / 2) : 0;
    report(j, 1);
    rc = shard_scan(from, NULL, 0, NULL, 0, copy_one, &c);
    if (rc == 0)
        rc = copy_flush(&c);
    batch_free(&c.b);
    if (rc == 0)
        kill_point("copy"); /* also a copy smaller than a batch */
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

struct purge {
    struct batch b;
    unsigned bit;
    uint8_t last[BATCH_KEY_MAX];
    size_t lastlen;
};

static int purge_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct purge *p = ctx;
    uint64_t h;

    (void)v, (void)vl;
    memcpy(p->last, k, kl);
    p->lastlen = kl;
    if (record_placement(k, kl, &h) || !((h >> p->bit) & 1))
        return 0;
    batch_del(&p->b, k, kl);
    return p->b.count >= PURGE_KEYS ? 1 : 0;
}

/* Delete from sh every placed record whose hash has `bit` set; sync. */
static int purge_records(struct job *j, struct shard *sh, unsigned bit)
{
    struct purge p = {.bit = bit};
    uint8_t start[BATCH_KEY_MAX];
    size_t slen = 0;
    int rc;

    batch_init(&p.b);
    j->st.phase = "purge";
    report(j, 1);
    do {
        batch_reset(&p.b);
        rc = shard_scan(sh, slen ? start : NULL, slen, NULL, 0, purge_one, &p);
        if (rc >= 0 && p.b.count) {
            int r = shard_apply(sh, &p.b);
            if (r)
                rc = r;
            j->st.purged += p.b.count;
            kill_point("purge");
            report(j, 0);
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

/* ---- the phases ---- */

static int cut_over(struct job *j, const struct store_layout *next)
{
    int rc;

    j->st.phase = "cut-over";
    rc = store_layout_write(j->cfg, j->node, next);
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
            rc = copy_records(j, src, dst, 0, j->d);
        if (rc == 0)
            rc = meta_write(dst, t, j->d + 1);
        if (rc == 0)
            rc = shard_sync(dst);
        shard_close(dst);
        dst = NULL;
        if (rc == 0)
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
        if (rc == 0)
            rc = copy_records(j, high, low, 1, 0);
        shard_close(high);
        if (rc == 0)
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

    if (rc == 0)
        rc = state_remove(j);
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
    if (!store_layout_single_node(cfg, node)) {
        snprintf(err, errlen,
                 "%s: resharding works on a single-node store (one node, every shard its own, "
                 "no replicas, no etcd) for now",
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
    int after = j->op == OP_SPLIT ? j->l.depth[j->s % j->l.slots] == j->d + 1
                                  : j->l.depth[j->s % j->l.slots] == j->d - 1;
    if (j->s >= CONFIG_MAX_SHARDS || j->d > 10 || (j->op == OP_MERGE && j->d == 0)) {
        snprintf(err, errlen, "%s/RESHARD: shard or depth out of range",
                 cfg->nodes[node].data_dir);
        return -EINVAL;
    }
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

int reshard_split(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen)
{
    struct job j;
    int resumed, rc = job_open(&j, cfg, node, o, err, errlen, &resumed);

    if (rc)
        goto out;
    if (s >= j.l.slots || !placement_is_shard(j.l.depth, s)) {
        snprintf(err, errlen, "shard %u: no such shard (the store has %u slots)", s, j.l.slots);
        rc = -EINVAL;
        goto out;
    }
    j.op = OP_SPLIT;
    j.s = s;
    j.d = j.l.depth[s];
    if ((2u << j.d) > CONFIG_MAX_SHARDS) {
        snprintf(err, errlen, "shard %u: a split would make shard %u, past the limit of %u", s,
                 s + (1u << j.d), CONFIG_MAX_SHARDS);
        rc = -ENOSPC;
        goto out;
    }
    rc = job_start(&j);
out:
    job_close(&j);
    return rc;
}

int reshard_merge(struct config *cfg, int node, unsigned s, struct reshard_opts *o, char *err,
                  size_t errlen)
{
    struct job j;
    int resumed, rc = job_open(&j, cfg, node, o, err, errlen, &resumed);
    unsigned d;

    if (rc)
        goto out;
    if (s >= j.l.slots || !placement_is_shard(j.l.depth, s) || j.l.depth[s] == 0) {
        snprintf(err, errlen, "shard %u: no such shard, or it has no buddy to merge with", s);
        rc = -EINVAL;
        goto out;
    }
    d = j.l.depth[s];
    j.op = OP_MERGE;
    j.s = s & ((1u << (d - 1)) - 1);
    j.d = d;
    if (j.l.depth[j.s] != d || j.l.depth[j.s + (1u << (d - 1))] != d) {
        snprintf(err, errlen,
                 "shard %u: its buddy %u was split further; merge that first",
                 s, s ^ (1u << (d - 1)));
        rc = -EBUSY;
        goto out;
    }
    rc = job_start(&j);
out:
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
