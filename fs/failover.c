/* failover.c -- automatic failover through the etcd shard map (failover.h).
 *
 * DESIGN
 *  The switch (struct fo_shard) is what the namespace holds for a shard
 *  this node has a copy of. Under fo->lock it has a role: REPLICA (ops go
 *  to the remote shard), PROMOTING (the same, while the copy is being
 *  taken over) or PRIMARY (ops go to the current shard_repl wrapper; a
 *  count of those in flight lets a step-down wait for them). Wrappers are
 *  never freed while the node runs: a request in the node server may still
 *  hold one it replaced; they go at the switch's close (ns_close, after the
 *  server stopped). A new promotion makes a new wrapper: the old one's
 *  view of its replicas' reports and of its position is of another time.
 *
 *  One thread reconciles every copy with the map, when the map's listener
 *  signals a change and every TTL/4 anyway:
 *    want = the map names this node primary and its leader key is ours;
 *    want and role REPLICA          -> take the role (start, or a leader
 *                                      key the keep-alive took again);
 *    another primary, role PRIMARY  -> step down;
 *    no leader, in the in-sync set  -> promote (below).
 *  Placement (`shardfs replica add/drop`): every shard has a switch, also
 *  one this node holds no copy of (ops go to its remote shard), so a copy
 *  can come and go at runtime without touching the namespace's table.
 *  reconcile() first makes the copies here what the map says (the map, not
 *  shards.conf, from the first start on):
 *    the map names this node (primary or replica), no copy open
 *                              -> open/create DATA_DIR/shard-N, hand it to
 *                                 the node server (its long polls) and the
 *                                 replica-sync thread (it catches up: a
 *                                 snapshot from the empty position);
 *    it does not, a copy open, role REPLICA
 *                              -> the sync thread lets go of it (no pull in
 *                                 flight after replica_sync_remove), the
 *                                 server too, then it is closed and its
 *                                 directory removed.
 *  The drop's txn took the copy out of the in-sync set in the same change,
 *  so its primary stopped waiting for it (shard_repl_map_changed, or the
 *  -ENOENT of an isr_remove that had not seen it) whichever of the two
 *  nodes' watches comes first. A copy is never dropped while served: the
 *  rules refuse to drop the primary, and a step-down comes first.
 *  Choosing the most advanced in-sync replica without an election: each
 *  candidate waits FO_STEP_MS for every batch it was behind its primary at
 *  the primary's last reply (at most FO_BEHIND_MAX of them), plus its slot
 *  in the replica list times FO_SLOT_MS (a tie-break), then looks at the
 *  map again: a replica that was level promotes first, and the others see
 *  the leader key taken. With ack = replica every acknowledged write is on
 *  every in-sync replica anyway, so a less advanced winner loses only
 *  unacknowledged batches, and the more advanced loser, whose history then
 *  diverged, catches up by a snapshot (ESTALE).
 */
#include "failover.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "clock.h"
#include "shard_lmdb.h"
#include "shard_remote.h"
#include "shard_repl.h"

#define FO_STEP_MS 50     /* a candidate's wait per batch behind */
#define FO_BEHIND_MAX 20u /* batches counted */
#define FO_SLOT_MS 30     /* per slot in the replica list */

enum fo_role { FO_REPLICA = 0, FO_PROMOTING, FO_PRIMARY };

struct fo_shard {
    struct shard base; /* the switch */
    struct failover *fo;
    struct shard *lmdb;   /* this node's copy, the switch's (NULL: none); the
                           * failover thread changes it (placement) */
    struct shard *remote; /* the shard at its primary */
    int unfit;            /* never take the primary role: see failover_open */
    int in_ns;            /* under fo->lock: the namespace's layout holds it (it
                           * closes it); else failover_close does */
    int handing;          /* under fo->lock: a handover (failover_handover) runs */
    /* under fo->lock: */
    enum fo_role role;
    struct shard *primary; /* the wrapper served while PRIMARY */
    struct shard **old;    /* wrappers replaced, freed at close */
    unsigned nold;
    unsigned active; /* ops on `primary` in flight */
};

struct failover {
    const struct config *cfg;
    int self;
    struct ns *ns;
    struct shard_map *map;
    struct remote *remote;
    struct node_server *srv;
    struct replica_sync *rs;
    struct fo_shard *sh[CONFIG_MAX_SHARDS]; /* NULL: no copy here */

    pthread_mutex_t lock;
    pthread_cond_t cond; /* a change (dirty), stop, or ops drained */
    unsigned char dirty[CONFIG_MAX_SHARDS];
    int stop;
    unsigned promotions, demotions;
    pthread_t thread;
    int started;
};

/* ---- the switch ---- */

static struct fo_shard *sw_of(struct shard *s)
{
    return (struct fo_shard *)s;
}

/* The shard an op goes to now; *local says whether it must be left. */
static struct shard *sw_enter(struct fo_shard *f, int *local)
{
    struct shard *s;

    pthread_mutex_lock(&f->fo->lock);
    *local = f->role == FO_PRIMARY && f->primary;
    if (*local) {
        f->active++;
        s = f->primary;
    } else {
        s = f->remote;
    }
    pthread_mutex_unlock(&f->fo->lock);
    return s;
}

static void sw_leave(struct fo_shard *f, int local)
{
    if (!local)
        return;
    pthread_mutex_lock(&f->fo->lock);
    if (--f->active == 0)
        pthread_cond_broadcast(&f->fo->cond);
    pthread_mutex_unlock(&f->fo->lock);
}

/* An op on the wrapper t came back -EREMCHG: a handover gave the role away
 * and nothing was done. Wait (up to timeout_ms) for the step-down that
 * follows, which the map's change set going; 1: do the op again (it goes
 * to the new primary), 0: give up with the error. */
static int sw_moved(struct fo_shard *f, struct shard *t)
{
    struct failover *fo = f->fo;
    struct timespec ts;
    int again;

    clock_deadline_in(&ts, fo->cfg->timeout_ms ? fo->cfg->timeout_ms : 5000);
    pthread_mutex_lock(&fo->lock);
    while (f->role == FO_PRIMARY && f->primary == t &&
           pthread_cond_timedwait(&fo->cond, &fo->lock, &ts) != ETIMEDOUT)
        ;
    again = !(f->role == FO_PRIMARY && f->primary == t);
    pthread_mutex_unlock(&fo->lock);
    return again;
}

/* Run op on the shard the switch points at; again after a handover. */
#define SW_RUN(s, call)                                                                        \
    do {                                                                                       \
        struct fo_shard *f_ = sw_of(s);                                                        \
        struct shard *t;                                                                       \
        int local;                                                                             \
                                                                                               \
        for (;;) {                                                                             \
            t = sw_enter(f_, &local);                                                          \
            rc = (call);                                                                       \
            sw_leave(f_, local);                                                               \
            if (!local || rc != -EREMCHG || !sw_moved(f_, t))                                  \
                break;                                                                         \
        }                                                                                      \
    } while (0)

static int sw_get(struct shard *s, const void *key, size_t klen, size_t off, void *buf,
                  size_t buflen, size_t *vlen)
{
    int rc;

    SW_RUN(s, shard_get(t, key, klen, off, buf, buflen, vlen));
    return rc;
}

static int sw_scan(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                   shard_scan_fn fn, void *ctx)
{
    int rc;

    SW_RUN(s, shard_scan(t, start, slen, end, elen, fn, ctx));
    return rc;
}

static int sw_scan_join(struct shard *s, const void *start, size_t slen, const void *end,
                        size_t elen, const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    int rc;

    SW_RUN(s, shard_scan_join(t, start, slen, end, elen, j, fn, ctx));
    return rc;
}

/* The remote shard while ops go there (no count to keep), else NULL. */
static struct shard *sw_remote_now(struct shard *s)
{
    struct fo_shard *f = sw_of(s);
    struct shard *t;
    int local;

    t = sw_enter(f, &local);
    sw_leave(f, local);
    return local ? NULL : t;
}

static int sw_apply(struct shard *s, const struct batch *b)
{
    int rc;

    SW_RUN(s, shard_apply(t, b));
    return rc;
}

static int sw_sync(struct shard *s)
{
    int rc;

    SW_RUN(s, shard_sync(t));
    return rc;
}

static int sw_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    int rc;

    SW_RUN(s, shard_get_many(t, r, n));
    return rc;
}

static int sw_stat(struct shard *s, struct shard_stat *st)
{
    int rc;

    SW_RUN(s, shard_stat(t, st));
    return rc;
}

/* ns_close(): every thread that used it is gone. */
static void sw_close(struct shard *s)
{
    struct fo_shard *f = sw_of(s);

    for (unsigned i = 0; i < f->nold; i++)
        shard_repl_free(f->old[i]);
    free(f->old);
    shard_repl_free(f->primary);
    if (f->remote)
        shard_close(f->remote);
    if (f->lmdb)
        shard_close(f->lmdb);
    if (f->fo)
        f->fo->sh[s->index] = NULL;
    free(f);
}

static const struct shard_ops switch_ops = {
    .get = sw_get,
    .scan = sw_scan,
    .scan_join = sw_scan_join,
    .remote_now = sw_remote_now,
    .apply = sw_apply,
    .sync = sw_sync,
    .get_many = sw_get_many,
    .stat = sw_stat,
    .close = sw_close,
};

/* Keep w for the switch's close (lock held). -ENOMEM: w leaks, and is
 * still never used after it was replaced. */
static void retire_locked(struct fo_shard *f, struct shard *w)
{
    struct shard **o;

    if (!w)
        return;
    o = realloc(f->old, (f->nold + 1) * sizeof(*o));
    if (!o)
        return;
    f->old = o;
    f->old[f->nold++] = w;
}

/* ---- roles ---- */

/* A new wrapper around f's copy, served by the node server. */
static int wrap_new(struct failover *fo, struct fo_shard *f, struct shard **w)
{
    struct shard_repl_push push = {remote_push, fo->remote};
    int rc = shard_repl_new(f->lmdb, fo->map, fo->cfg, fo->self, &push, w);

    if (rc == 0 && fo->srv)
        node_server_set_shard(fo->srv, f->base.index, *w);
    return rc;
}

/* Serve f as its primary with the wrapper w (role PROMOTING or REPLICA
 * before: no pull of it is in flight). */
static void role_primary(struct failover *fo, struct fo_shard *f, struct shard *w)
{
    pthread_mutex_lock(&fo->lock);
    retire_locked(f, f->primary);
    f->primary = w;
    f->role = FO_PRIMARY;
    pthread_mutex_unlock(&fo->lock);
}

/* Step down: the namespace goes to the new primary (ops on the wrapper
 * drain first: they fail, the map names another), the server redirects,
 * the copy is pulled again. */
static void step_down(struct failover *fo, struct fo_shard *f, const char *why)
{
    unsigned n = f->base.index;

    pthread_mutex_lock(&fo->lock);
    f->role = FO_REPLICA;
    pthread_cond_broadcast(&fo->cond); /* ops refused by a handover go on (sw_moved) */
    while (f->active > 0)
        pthread_cond_wait(&fo->cond, &fo->lock);
    fo->demotions++;
    pthread_mutex_unlock(&fo->lock);
    if (fo->srv)
        node_server_set_shard(fo->srv, n, NULL);
    replica_sync_kick(fo->rs, n);
    fprintf(stderr, "shardfs: shard %u: %s\n", n, why);
}

/* Sleep ms, or until stop. 1 if stopped. */
static int fo_nap(struct failover *fo, int64_t ms)
{
    struct timespec ts;
    int stop;

    clock_deadline_in(&ts, ms);
    pthread_mutex_lock(&fo->lock);
    while (!fo->stop && pthread_cond_timedwait(&fo->cond, &fo->lock, &ts) != ETIMEDOUT)
        ;
    stop = fo->stop;
    pthread_mutex_unlock(&fo->lock);
    return stop;
}

/* Whether node self may be promoted in c: an in-sync replica; its slot. */
static int in_sync_slot(const struct shard_copies *c, int self)
{
    for (unsigned i = 0; i < c->nreplicas; i++)
        if (c->replicas[i] == self)
            return c->in_sync >> i & 1 ? (int)i : -1;
    return -1;
}

/* A batch of the new epoch (the delete of an 'M' key nobody writes), so
 * that no promoted copy is at lsn 0: an empty copy the map names primary
 * is then surely a wiped one (copy_unfit). Replicated like any batch. */
static void mark_promoted(struct fo_shard *f, struct shard *w)
{
    static const char key[] = "Mpromoted";
    struct batch b;
    int rc;

    batch_init(&b);
    batch_del(&b, key, sizeof(key) - 1);
    rc = shard_apply(w, &b);
    batch_free(&b);
    if (rc < 0)
        fprintf(stderr, "shardfs: shard %u: the promotion's first batch failed: %s\n",
                f->base.index, strerror(-rc));
}

/* DESIGN: the candidate's wait, then the promotion. */
static void promote(struct failover *fo, struct fo_shard *f, const struct shard_copies *seen,
                    int slot)
{
    unsigned n = f->base.index;
    struct replica_status st;
    struct shard_copies c;
    struct stream_pos pos;
    struct shard *w = NULL;
    uint64_t behind = 0;
    int64_t t0 = clock_mono_ms();
    int rc;

    if (replica_sync_status(fo->rs, n, &st) == 0 && st.primary_pos.lsn > st.pos.lsn)
        behind = st.primary_pos.lsn - st.pos.lsn;
    if (behind > FO_BEHIND_MAX)
        behind = FO_BEHIND_MAX;
    if (fo_nap(fo, (int64_t)behind * FO_STEP_MS + (int64_t)slot * FO_SLOT_MS))
        return;
    if (shard_map_get(fo->map, n, &c) < 0 || c.epoch != seen->epoch ||
        shard_map_leader(fo->map, n) != -1 || in_sync_slot(&c, fo->self) < 0)
        return; /* another was faster, or the primary is back */
    pthread_mutex_lock(&fo->lock);
    f->role = FO_PROMOTING;
    pthread_mutex_unlock(&fo->lock);
    replica_sync_kick_wait(fo->rs, n); /* no pull in flight from here on */
    rc = shard_lmdb_position(f->lmdb, &pos);
    if (rc == 0)
        rc = wrap_new(fo, f, &w);
    if (rc == 0)
        rc = shard_map_promote(fo->map, n, fo->self, c.epoch);
    if (rc == 0) {
        shard_lmdb_set_epoch(f->lmdb, c.epoch + 1);
        role_primary(fo, f, w);
        mark_promoted(f, w);
        pthread_mutex_lock(&fo->lock);
        fo->promotions++;
        pthread_mutex_unlock(&fo->lock);
        fprintf(stderr,
                "shardfs: shard %u: promoted to primary at epoch %llu (lsn %llu, %lld ms after "
                "its leader key went)\n",
                n, (unsigned long long)(c.epoch + 1), (unsigned long long)pos.lsn,
                (long long)(clock_mono_ms() - t0));
        return;
    }
    /* not ours: pulled again */
    if (w) {
        if (fo->srv)
            node_server_set_shard(fo->srv, n, NULL);
        pthread_mutex_lock(&fo->lock);
        retire_locked(f, w);
        pthread_mutex_unlock(&fo->lock);
    }
    pthread_mutex_lock(&fo->lock);
    f->role = FO_REPLICA;
    pthread_mutex_unlock(&fo->lock);
    replica_sync_kick(fo->rs, n);
    if (rc != -EBUSY && rc != -ESTALE && rc != -EPERM)
        fprintf(stderr, "shardfs: shard %u: promotion failed: %s\n", n, strerror(-rc));
}

/* 1 if c names node (primary or replica). */
static int map_holds(const struct shard_copies *c, int node)
{
    if (c->primary == node)
        return 1;
    for (unsigned i = 0; i < c->nreplicas; i++)
        if (c->replicas[i] == node)
            return 1;
    return 0;
}

/* 1 if copy may not serve as primary of c: no usable position (a
 * snapshot was cut short), or empty although the shard was promoted at
 * least once (so it had a primary that held its history). */
static int copy_unfit(struct shard *lmdb, const struct shard_copies *c, const struct config *cfg)
{
    struct stream_pos p;
    int rc = shard_lmdb_position(lmdb, &p);

    if (rc < 0)
        return 1;
    return p.lsn == 0 && c->epoch > cfg->epoch;
}

/* DESIGN: placement. The map gave this node a copy of f's shard. */
static void copy_add(struct failover *fo, struct fo_shard *f, const struct shard_copies *c)
{
    unsigned n = f->base.index;
    struct shard *lmdb = NULL;
    char err[512];
    int rc = ns_copy_open(fo->ns, n, &lmdb, err, sizeof(err));

    if (rc) {
        fprintf(stderr, "shardfs: shard %u: the map gives this node a copy, but it cannot be "
                "opened: %s\n", n, err);
        return;
    }
    pthread_mutex_lock(&fo->lock);
    f->lmdb = lmdb;
    /* named primary with no copy here (no txn of ours does that: only an
     * in-sync replica becomes one): never serve what was just created */
    f->unfit = c->primary == fo->self && !c->building && copy_unfit(lmdb, c, fo->cfg);
    pthread_mutex_unlock(&fo->lock);
    node_server_set_local(fo->srv, n, lmdb);
    rc = replica_sync_add(fo->rs, n, lmdb);
    fprintf(stderr, "shardfs: shard %u: this node holds a copy now (epoch %llu, primary %s)%s%s\n",
            n, (unsigned long long)c->epoch, c->primary >= 0 ? fo->cfg->nodes[c->primary].name : "-",
            rc ? "; replica sync: " : "; catching up", rc ? strerror(-rc) : "");
}

/* DESIGN: placement. The map took f's copy away (role REPLICA). */
static void copy_drop(struct failover *fo, struct fo_shard *f)
{
    unsigned n = f->base.index;
    struct shard *lmdb;
    int rc;

    replica_sync_remove(fo->rs, n); /* from here no pull of it is in flight or applied */
    node_server_set_local(fo->srv, n, NULL);
    pthread_mutex_lock(&fo->lock);
    lmdb = f->lmdb;
    f->lmdb = NULL;
    f->unfit = 0;
    pthread_mutex_unlock(&fo->lock);
    shard_close(lmdb);
    rc = ns_copy_remove(fo->ns, n);
    if (rc)
        fprintf(stderr, "shardfs: shard %u: this node's copy was dropped, but removing its "
                "files failed: %s\n", n, strerror(-rc));
    else
        fprintf(stderr, "shardfs: shard %u: this node's copy was dropped and its files "
                "removed\n", n);
}

/* DESIGN: resharding. The map holds no shard n any more (a merge took it,
 * or an abandoned split): no role, no copy. The switch stays (the
 * namespace of this or another thread may still route to it until it
 * follows the layout); a later split making n again reuses it. */
static void shard_gone(struct failover *fo, struct fo_shard *f)
{
    enum fo_role role;

    pthread_mutex_lock(&fo->lock);
    role = f->role;
    pthread_mutex_unlock(&fo->lock);
    if (role == FO_PRIMARY)
        step_down(fo, f, "the shard map holds it no more (merged, or its split taken back)");
    if (f->lmdb)
        copy_drop(fo, f);
}

/* DESIGN: one copy against the map. */
static void reconcile(struct failover *fo, struct fo_shard *f)
{
    unsigned n = f->base.index;
    struct shard_copies c;
    enum fo_role role;
    int leader, slot;

    if (shard_map_get(fo->map, n, &c) < 0) {
        shard_gone(fo, f);
        return;
    }
    leader = shard_map_leader(fo->map, n);
    pthread_mutex_lock(&fo->lock);
    role = f->role;
    pthread_mutex_unlock(&fo->lock);
    if (role == FO_PRIMARY && c.primary != fo->self) {
        step_down(fo, f, "another node is its primary now; this copy is a replica");
        role = FO_REPLICA;
    }
    if (c.primary >= 0 && map_holds(&c, fo->self) && !f->lmdb)
        copy_add(fo, f, &c);
    else if (c.primary >= 0 && !map_holds(&c, fo->self) && f->lmdb && role == FO_REPLICA)
        copy_drop(fo, f);
    if (!f->lmdb)
        return;
    if (role == FO_REPLICA && c.primary == fo->self && leader == fo->self && !f->unfit) {
        struct shard *w = NULL;

        /* the map names us and our lease holds the key: take the role */
        pthread_mutex_lock(&fo->lock);
        f->role = FO_PROMOTING;
        pthread_mutex_unlock(&fo->lock);
        replica_sync_kick_wait(fo->rs, n);
        if (wrap_new(fo, f, &w) == 0) {
            role_primary(fo, f, w);
            return;
        }
        pthread_mutex_lock(&fo->lock);
        f->role = FO_REPLICA;
        pthread_mutex_unlock(&fo->lock);
        replica_sync_kick(fo->rs, n);
        return;
    }
    if (role == FO_REPLICA && leader == -1 && c.primary != fo->self && !c.building &&
        (slot = in_sync_slot(&c, fo->self)) >= 0 && shard_map_lease_ok(fo->map))
        promote(fo, f, &c, slot);
}

/* Requests for shard n go where the map's leader key says; a shard the
 * map holds no more (a merge took it) keeps its last owner: a request
 * with the old layout gets that node's 421 and the sender follows the map
 * (layout_follow), where a blank owner would make it wait for a leader
 * that never comes. */
static void owner_follow(struct failover *fo, unsigned n)
{
    struct shard_copies c;

    if (shard_map_get(fo->map, n, &c) == 0)
        remote_owner_set(fo->remote, n, shard_map_leader(fo->map, n));
}

/* ---- switches the map makes, and the layout (DESIGN: resharding) ---- */

/* A switch for shard n, which a split made: ops go to its remote shard
 * until the failover thread gives it a copy and a role. Not in the
 * namespace until layout_follow puts it there. */
static struct fo_shard *switch_new(struct failover *fo, unsigned n)
{
    struct fo_shard *f = calloc(1, sizeof(*f));

    if (!f)
        return NULL;
    f->base.ops = &switch_ops;
    f->base.index = n;
    f->fo = fo;
    remote_owner_set(fo->remote, n, shard_map_leader(fo->map, n));
    if (shard_remote_open(fo->remote, n, &f->remote) != 0) {
        free(f);
        return NULL;
    }
    return f;
}

/* Shard n's switch; made when the map holds n and none exists yet. NULL
 * when the map holds no n, or out of memory. */
static struct fo_shard *switch_of(struct failover *fo, unsigned n)
{
    struct shard_copies c;
    struct fo_shard *f, *made;

    if (n >= CONFIG_MAX_SHARDS)
        return NULL;
    pthread_mutex_lock(&fo->lock);
    f = fo->sh[n];
    pthread_mutex_unlock(&fo->lock);
    if (f || shard_map_get(fo->map, n, &c) != 0)
        return f;
    made = switch_new(fo, n);
    if (!made)
        return NULL;
    pthread_mutex_lock(&fo->lock);
    f = fo->sh[n];
    if (!f)
        f = fo->sh[n] = made;
    pthread_mutex_unlock(&fo->lock);
    if (f != made) { /* another thread made it first */
        shard_close(made->remote);
        free(made);
    }
    return f;
}

static struct fo_shard *switch_get(struct failover *fo, unsigned n)
{
    struct fo_shard *f;

    if (n >= CONFIG_MAX_SHARDS)
        return NULL;
    pthread_mutex_lock(&fo->lock);
    f = fo->sh[n];
    pthread_mutex_unlock(&fo->lock);
    return f;
}

/* Split ns's shard i (depth d) once, with the switch of i + 2^d. */
static int follow_split(struct failover *fo, unsigned i, unsigned d)
{
    unsigned t = i + (1u << d);
    struct fo_shard *f = switch_of(fo, t);
    int rc;

    if (!f)
        return -ENOMEM;
    rc = ns_layout_split(fo->ns, i, &f->base);
    if (rc)
        return rc;
    pthread_mutex_lock(&fo->lock);
    f->in_ns = 1;
    pthread_mutex_unlock(&fo->lock);
    remote_depth_set(fo->remote, i, d + 1);
    remote_depth_set(fo->remote, t, d + 1);
    return 1;
}

/* Merge ns's buddies at depth d that hold slot i; 0 when the upper one
 * is split further (its own turn comes first). */
static int follow_merge(struct failover *fo, unsigned i, unsigned d)
{
    unsigned low = i & ~(1u << (d - 1)), up = low + (1u << (d - 1));
    struct ns *ns = fo->ns;
    struct shard *gone;

    if (!ns_is_shard(ns, low) || !ns_is_shard(ns, up) || ns_shard_depth(ns, low) != d ||
        ns_shard_depth(ns, up) != d)
        return 0;
    gone = ns_layout_merge(ns, low);
    if (!gone)
        return 0;
    pthread_mutex_lock(&fo->lock);
    sw_of(gone)->in_ns = 0; /* a switch: every shard of the namespace is one */
    pthread_mutex_unlock(&fo->lock);
    remote_depth_set(fo->remote, low, d - 1);
    remote_depth_set(fo->remote, up, d - 1);
    return 1;
}

/* 1 if the namespace's layout is not the map's (want, slots). */
static int layout_differs(struct failover *fo, const uint8_t *want, unsigned slots)
{
    unsigned n = ns_shard_count(fo->ns);

    for (unsigned i = 0; i < n || i < slots; i++)
        if (ns_shard_depth(fo->ns, i % n) != want[i % slots])
            return 1;
    return 0;
}

int failover_follow_paused(struct failover *fo)
{
    uint8_t want[CONFIG_MAX_SHARDS];
    unsigned slots;
    int changed = 0, rc = 0;

    if (shard_map_layout(fo->map, want, &slots) != 0)
        return -EIO;
    for (int again = 1; again && rc >= 0;) {
        again = 0;
        for (unsigned i = 0; i < ns_shard_count(fo->ns) && rc >= 0; i++) {
            unsigned d = ns_shard_depth(fo->ns, i), w = want[i % slots];

            if (!ns_is_shard(fo->ns, i) || w == d)
                continue;
            rc = w > d ? follow_split(fo, i, d) : follow_merge(fo, i, d);
            if (rc > 0)
                again = changed = 1;
        }
    }
    if (changed && fo->srv)
        node_server_set_layout(fo->srv, want, slots);
    if (rc < 0)
        fprintf(stderr, "shardfs: cannot take the shard map's layout: %s\n", strerror(-rc));
    return rc < 0 ? rc : changed;
}

/* The namespace's layout made the map's, operations paused meanwhile.
 * 1 changed, 0 nothing to change, -errno. */
static int layout_follow(struct failover *fo)
{
    uint8_t want[CONFIG_MAX_SHARDS];
    unsigned slots;
    int rc;

    if (shard_map_layout(fo->map, want, &slots) != 0 || !layout_differs(fo, want, slots))
        return 0;
    ns_quiesce(fo->ns);
    if (fo->srv)
        node_server_quiesce(fo->srv);
    rc = failover_follow_paused(fo);
    if (fo->srv)
        node_server_unquiesce(fo->srv);
    ns_unquiesce(fo->ns);
    if (rc > 0)
        fprintf(stderr, "shardfs: took the shard map's layout (%u slots)\n",
                ns_shard_count(fo->ns));
    return rc;
}

/* ns_relayout_fn: a shard refused an operation for another layout. The
 * node that refused acted on a map change this node's watch may not have
 * brought yet: wait for it a little. 0 when the layout changed. */
#define FO_RELAYOUT_WAIT_MS 2000
#define FO_RELAYOUT_STEP_MS 10
static int relayout(void *ctx)
{
    struct failover *fo = ctx;
    int64_t until = clock_mono_ms() + FO_RELAYOUT_WAIT_MS;
    int rc;

    while ((rc = layout_follow(fo)) == 0 && clock_mono_ms() < until)
        usleep(FO_RELAYOUT_STEP_MS * 1000);
    return rc > 0 ? 0 : rc < 0 ? rc : -ENOENT;
}

static void *fo_main(void *arg)
{
    struct failover *fo = arg;
    unsigned period = fo->cfg->lease_ttl_ms / 4;

    pthread_setname_np(pthread_self(), "failover");
    for (;;) {
        unsigned char todo[CONFIG_MAX_SHARDS];
        struct timespec ts;
        int any = 0;

        clock_deadline_in(&ts, period);
        pthread_mutex_lock(&fo->lock);
        for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
            any |= fo->dirty[i];
        while (!fo->stop && !any &&
               pthread_cond_timedwait(&fo->cond, &fo->lock, &ts) != ETIMEDOUT)
            for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
                any |= fo->dirty[i];
        memcpy(todo, fo->dirty, sizeof(todo));
        memset(fo->dirty, 0, sizeof(fo->dirty));
        if (fo->stop) {
            pthread_mutex_unlock(&fo->lock);
            break;
        }
        pthread_mutex_unlock(&fo->lock);
        /* a periodic round looks at every copy (todo unused then); a
         * shard a split made gets its switch here */
        for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
            struct fo_shard *f = todo[i] ? switch_of(fo, i) : switch_get(fo, i);

            if (f && (todo[i] || !any))
                reconcile(fo, f);
        }
        layout_follow(fo);
        /* A redirect from a node with an older view may have pointed a
         * shard's requests at a primary the map no longer names (the map
         * then says nothing new): the map's word again, every round. */
        for (unsigned i = 0; !any && i < CONFIG_MAX_SHARDS; i++)
            if (switch_get(fo, i))
                owner_follow(fo, i);
    }
    return NULL;
}

/* The map changed shard n (any thread, no lock of the map held). */
static void on_map_change(void *ctx, unsigned n)
{
    struct failover *fo = ctx;

    owner_follow(fo, n);
    replica_sync_kick(fo->rs, n);
    pthread_mutex_lock(&fo->lock);
    if (n < CONFIG_MAX_SHARDS && fo->sh[n] && fo->sh[n]->role == FO_PRIMARY && fo->sh[n]->primary)
        shard_repl_map_changed(fo->sh[n]->primary);
    fo->dirty[n] = 1;
    pthread_cond_broadcast(&fo->cond);
    pthread_mutex_unlock(&fo->lock);
}

/* ---- planned handover (shardfs promote) ---- */

/* DESIGN: handover. The primary hands shard n to `to`, an in-sync replica:
 *  1. catch-up: wait (writes flowing) until `to` has reported the position
 *     the primary had when the call began: most of a lag is made up
 *     while nobody waits;
 *  2. freeze the wrapper (shard_repl_freeze): new writes are held, those
 *     in progress finish; P = the position now, final;
 *  3. wait until `to` has reported P: its copy holds every batch this
 *     primary applied, acknowledged or not;
 *  4. shard_map_handover: primary = to, epoch + 1, the leader key on to's
 *     lease, this node an in-sync replica, in one etcd txn;
 *  5. thaw(moved): the held writes and every later op on the wrapper get
 *     -EREMCHG, nothing done: the switch does them again at the new
 *     primary, the node server answers 503 (the client retries where the
 *     map points). The map's change steps this copy down (reconcile) and
 *     `to` takes the role (the map names it and its lease holds the key).
 *  A failure in 2-4 thaws without moving: the held writes go on here, and
 *  the handover is as if never asked. A txn whose outcome is unknown (an
 *  etcd error, not a refusal) keeps the freeze until the map tells, or a
 *  lease TTL passed (handover_unsure). The freeze lasts at most
 *  FO_FREEZE_PART of timeout_ms, so a held write still has time to be
 *  done again within its client's timeout_ms. No write is acknowledged by
 *  both: this node acknowledges nothing after step 2 (the wrapper refuses
 *  from step 5 on), and `to` serves only once the txn of step 4 is made. */
#define FO_CATCHUP_PART 4 /* tenths of timeout_ms for step 1 */
#define FO_UNSURE_STEP_MS 20

/* The txn of step 4 failed with rc, which may not mean "not made" (a reply
 * lost on its way back: etcd may have made it). Still frozen, look at the
 * map for a lease TTL: the watch brings a change that was made within
 * milliseconds while etcd answers, and if it does not answer, this node's
 * lease_ok drops within the TTL anyway. 0 if `to` became the primary
 * (the role moved after all), else rc. */
static int handover_unsure(struct failover *fo, unsigned n, int to, int rc)
{
    int64_t until = clock_mono_ms() + fo->cfg->lease_ttl_ms;
    struct shard_copies c;

    for (;;) {
        if (shard_map_get(fo->map, n, &c) == 0 && c.primary == to)
            return 0;
        if (clock_mono_ms() >= until || fo_nap(fo, FO_UNSURE_STEP_MS))
            return rc;
    }
}
#define FO_FREEZE_PART 2  /* tenths of timeout_ms for steps 2-3 */

int failover_handover(struct failover *fo, unsigned n, int to, struct failover_handed *out,
                      char *err, size_t errlen)
{
    unsigned tmo = fo->cfg->timeout_ms ? fo->cfg->timeout_ms : 5000;
    struct fo_shard *f = switch_get(fo, n);
    struct shard_repl_status st;
    struct shard_copies c;
    struct stream_pos p;
    struct shard *w = NULL;
    const char *name;
    int64_t t0 = clock_mono_ms(), t_frozen = 0;
    int rc, frozen = 0, moved = 0, slot = -1;

    memset(out, 0, sizeof(*out));
    if (!f || to < 0 || (unsigned)to >= fo->cfg->node_count) {
        snprintf(err, errlen, "no such shard or node");
        return -EINVAL;
    }
    name = fo->cfg->nodes[to].name;
    rc = shard_map_get(fo->map, n, &c);
    if (rc < 0) {
        snprintf(err, errlen, "shard %u: %s", n, strerror(-rc));
        return rc;
    }
    out->old_epoch = c.epoch;
    pthread_mutex_lock(&fo->lock);
    if (f && f->role == FO_PRIMARY && !f->handing && c.primary == fo->self) {
        f->handing = 1;
        f->active++; /* the wrapper stays this shard's until we are done */
        w = f->primary;
    }
    rc = f && f->handing && !w ? -EBUSY : 0;
    pthread_mutex_unlock(&fo->lock);
    if (!w) {
        if (rc == -EBUSY)
            snprintf(err, errlen, "shard %u: another handover of it is under way", n);
        else
            snprintf(err, errlen, "shard %u: %s is not its primary", n,
                     fo->cfg->nodes[fo->self].name);
        return rc ? rc : -EPERM;
    }
    if (to == fo->self) {
        rc = -EALREADY;
        snprintf(err, errlen, "shard %u: %s already is its primary", n, name);
        goto out;
    }
    for (unsigned i = 0; i < c.nreplicas; i++)
        if (c.replicas[i] == to)
            slot = (int)i;
    if (slot < 0 || !(c.in_sync >> slot & 1)) {
        rc = slot < 0 ? -ENOENT : -EPERM;
        snprintf(err, errlen, "shard %u: %s %s", n, name,
                 slot < 0 ? "holds no replica of it" : "is not in its in-sync set");
        goto out;
    }
    /* step 1 */
    rc = shard_repl_status(w, &st);
    if (rc == 0 && st.position.lsn == 0) {
        /* never written: a batch first, so that the new primary is not at
         * lsn 0 under an epoch past the config's (copy_unfit) */
        mark_promoted(f, w);
        rc = shard_repl_status(w, &st);
    }
    if (rc == 0)
        rc = shard_repl_wait_level(w, to, st.position.lsn, tmo * FO_CATCHUP_PART / 10);
    if (rc == 0) {
        /* step 2 */
        t_frozen = clock_mono_ms();
        rc = shard_repl_freeze(w, tmo * FO_FREEZE_PART / 10, &p);
        frozen = rc == 0;
    }
    if (rc == 0) {
        /* step 3, in what is left of the freeze's time */
        int64_t left = tmo * FO_FREEZE_PART / 10 - (clock_mono_ms() - t_frozen);

        rc = shard_repl_wait_level(w, to, p.lsn, left > 0 ? (unsigned)left : 0);
    }
    if (rc == -ETIMEDOUT) {
        snprintf(err, errlen,
                 "shard %u: %s did not catch up with its primary in time; handover "
                 "abandoned, %s stays the primary",
                 n, name, fo->cfg->nodes[fo->self].name);
        goto out;
    }
    if (rc < 0) {
        snprintf(err, errlen, "shard %u: %s", n, strerror(-rc));
        goto out;
    }
    /* step 4 */
    rc = shard_map_handover(fo->map, n, to, c.epoch);
    if (rc < 0 && rc != -ESTALE && rc != -EPERM && rc != -ENOENT)
        rc = handover_unsure(fo, n, to, rc);
    if (rc < 0) {
        snprintf(err, errlen, "shard %u: the map change failed: %s%s", n, strerror(-rc),
                 rc == -EPERM    ? " (not in the in-sync set, or this node lost its lease)"
                 : rc == -ESTALE ? " (the shard's epoch moved meanwhile)"
                                 : "");
        goto out;
    }
    moved = 1;
    out->new_epoch = c.epoch + 1;
    out->lsn = p.lsn;
    out->frozen_ms = clock_mono_ms() - t_frozen;
    out->took_ms = clock_mono_ms() - t0;
    fprintf(stderr,
            "shardfs: shard %u: handed over to %s at epoch %llu (lsn %llu, writes held %lld "
            "ms)\n",
            n, name, (unsigned long long)out->new_epoch, (unsigned long long)p.lsn,
            (long long)out->frozen_ms);
out:
    if (frozen || moved)
        shard_repl_thaw(w, moved);
    pthread_mutex_lock(&fo->lock);
    f->handing = 0;
    if (--f->active == 0)
        pthread_cond_broadcast(&fo->cond);
    pthread_mutex_unlock(&fo->lock);
    return rc;
}

struct shard *failover_primary_get(struct failover *fo, unsigned n)
{
    struct fo_shard *f = switch_get(fo, n);
    struct shard *w = NULL;

    if (!f)
        return NULL;
    pthread_mutex_lock(&fo->lock);
    if (f->role == FO_PRIMARY && f->primary && !f->handing) {
        f->handing = 1;
        f->active++;
        w = f->primary;
    }
    pthread_mutex_unlock(&fo->lock);
    return w;
}

struct shard_map *failover_map(struct failover *fo)
{
    return fo->map;
}

struct shard *failover_switch(struct failover *fo, unsigned n)
{
    struct fo_shard *f = switch_of(fo, n);

    return f ? &f->base : NULL;
}

struct shard *failover_copy(struct failover *fo, unsigned n)
{
    struct fo_shard *f = switch_get(fo, n);
    struct shard *lmdb = NULL;

    if (f) {
        pthread_mutex_lock(&fo->lock);
        lmdb = f->lmdb;
        pthread_mutex_unlock(&fo->lock);
    }
    return lmdb;
}

void failover_primary_put(struct failover *fo, unsigned n)
{
    struct fo_shard *f = fo->sh[n];

    pthread_mutex_lock(&fo->lock);
    f->handing = 0;
    if (--f->active == 0)
        pthread_cond_broadcast(&fo->cond);
    pthread_mutex_unlock(&fo->lock);
}

/* ---- the public calls ---- */

int failover_primary_of(void *ctx, unsigned n, uint64_t *epoch)
{
    struct failover *fo = ctx;
    struct shard_copies c;
    enum fo_role role = FO_REPLICA;

    if (shard_map_get(fo->map, n, &c) != 0)
        return -1;
    *epoch = c.epoch;
    pthread_mutex_lock(&fo->lock);
    if (n < CONFIG_MAX_SHARDS && fo->sh[n])
        role = fo->sh[n]->role;
    pthread_mutex_unlock(&fo->lock);
    return role != FO_REPLICA ? fo->self : c.primary;
}

int failover_open(const struct config *cfg, int node, struct ns *ns, struct shard_map *map,
                  struct shard **local, struct failover **out, char *err, size_t errlen)
{
    struct failover *fo = calloc(1, sizeof(*fo));
    int rc = 0;

    *out = fo;
    if (!fo) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    fo->cfg = cfg;
    fo->self = node;
    fo->ns = ns;
    fo->map = map;
    fo->remote = ns_remote(ns);
    pthread_mutex_init(&fo->lock, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&fo->cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    if (!fo->remote) {
        snprintf(err, errlen, "failover: every shard is local");
        return -EINVAL;
    }
    /* Every shard gets a switch (DESIGN: placement); the copies here are
     * those the map names, whatever shards.conf said (ns_open opened the
     * file's). */
    for (unsigned i = 0; i < cfg->shard_count; i++) {
        struct fo_shard *f;
        struct shard_copies c;
        struct shard *rep = ns_replica_take(ns, i);
        int holds, known;

        local[i] = NULL;
        if (!ns_is_shard(ns, i))
            continue; /* a slot of a shallower shard (the map's layout: main.c) */
        remote_owner_set(fo->remote, i, shard_map_leader(map, i));
        rc = shard_map_get(map, i, &c);
        holds = rc == 0 && map_holds(&c, node);
        known = rc == 0 && c.primary >= 0; /* else it names a node this file lacks */
        f = rc == 0 ? calloc(1, sizeof(*f)) : NULL;
        if (!f) {
            shard_close(rep);
            rc = rc ? rc : -ENOMEM;
            snprintf(err, errlen, "shard %u: failover: %s", i, strerror(-rc));
            break;
        }
        f->base.ops = &switch_ops;
        f->base.index = i;
        f->fo = fo;
        f->in_ns = 1;
        if (ns_shard_is_local(ns, i)) {
            rc = shard_remote_open(fo->remote, i, &f->remote);
            if (rc) {
                free(f);
                shard_close(rep);
                snprintf(err, errlen, "shard %u: failover: %s", i, strerror(-rc));
                break;
            }
            /* from here the namespace closes f (and what f owns) */
            f->lmdb = ns_shard_swap(ns, i, &f->base);
        } else {
            f->remote = ns_shard_swap(ns, i, &f->base);
            f->lmdb = rep;
            rep = NULL;
        }
        fo->sh[i] = f;
        if (known && !holds && f->lmdb) {
            /* the map took this copy away (replica drop, also while this
             * node was down): not kept. ns_open made it if shards.conf
             * names it: an empty one goes again; one holding data stays on
             * disk (the map is the truth, but data is not deleted on its
             * word at a start: that is the drop's own act) */
            struct stream_pos p;
            int empty = shard_lmdb_position(f->lmdb, &p) == 0 && p.lsn == 0;

            shard_close(f->lmdb);
            f->lmdb = NULL;
            if (empty)
                ns_copy_remove(ns, i);
        } else if (known && holds && !f->lmdb) {
            /* a copy the map gave this node (replica add) */
            rc = ns_copy_open(ns, i, &f->lmdb, err, errlen);
            if (rc)
                break;
        }
        local[i] = f->lmdb;
        if (!f->lmdb)
            continue;
        if (c.primary == node && copy_unfit(f->lmdb, &c, cfg)) {
            /* An empty (wiped) copy or a half-made snapshot, of a shard
             * that was promoted since the map was seeded: the data is on
             * the other copies. Serving it would hand them an empty
             * history to snapshot. The shard stays without a primary
             * (we hold its leader key) until an operator acts. */
            f->unfit = 1;
            fprintf(stderr,
                    "shardfs: shard %u: the map names this node its primary (epoch %llu), "
                    "but this copy is empty or incomplete; NOT serving it\n",
                    i, (unsigned long long)c.epoch);
        } else if (c.primary == node && shard_map_leader(map, i) == node) {
            rc = shard_repl_new(f->lmdb, map, cfg, node,
                                &(struct shard_repl_push){remote_push, fo->remote}, &f->primary);
            if (rc == 0)
                f->role = FO_PRIMARY;
        } else if (c.primary == node) {
            /* named, but the key is not ours (yet): a replica until the
             * keep-alive takes it, or another is promoted */
            fprintf(stderr,
                    "shardfs: shard %u: the map names this node its primary, but its "
                    "leader key is not ours; serving it once it is\n",
                    i);
        }
        if (rc) {
            snprintf(err, errlen, "shard %u: failover: %s", i, strerror(-rc));
            break;
        }
    }
    if (rc == 0) {
        /* the map's layout (main.c opened the namespace with it; it may
         * have changed since), and a refusal for another one follows it */
        rc = failover_follow_paused(fo);
        if (rc < 0)
            snprintf(err, errlen, "failover: the shard map's layout: %s", strerror(-rc));
        ns_set_relayout(ns, relayout, fo);
    }
    return rc < 0 ? rc : 0;
}

void failover_started(void *ctx, struct node_server *srv)
{
    struct failover *fo = ctx;

    pthread_mutex_lock(&fo->lock);
    fo->srv = srv;
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
        if (fo->sh[i])
            node_server_set_shard(srv, i, fo->sh[i]->role == FO_PRIMARY ? fo->sh[i]->primary
                                                                          : NULL);
    pthread_mutex_unlock(&fo->lock);
    {
        /* the server was made with the config's layout, which the map may
         * have changed since (failover_open followed it): the namespace's */
        uint8_t depth[CONFIG_MAX_SHARDS];
        unsigned n = ns_shard_count(fo->ns);

        for (unsigned i = 0; i < n; i++)
            depth[i] = (uint8_t)ns_shard_depth(fo->ns, i);
        node_server_set_layout(srv, depth, n);
    }
}

int failover_start(struct failover *fo, struct replica_sync *rs, char *err, size_t errlen)
{
    sigset_t all, old;
    int rc;

    fo->rs = rs;
    shard_map_on_change(fo->map, on_map_change, fo);
    /* what changed before we listened (a shard a split made too) */
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
        struct shard_copies c;

        if (fo->sh[i] || shard_map_get(fo->map, i, &c) == 0)
            on_map_change(fo, i);
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = -pthread_create(&fo->thread, NULL, fo_main, fo);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        snprintf(err, errlen, "failover: cannot start its thread: %s", strerror(-rc));
        shard_map_on_change(fo->map, NULL, NULL);
        return rc;
    }
    fo->started = 1;
    return 0;
}

void failover_stop(struct failover *fo)
{
    if (!fo)
        return;
    shard_map_on_change(fo->map, NULL, NULL); /* waits for a call in progress */
    if (fo->started) {
        pthread_mutex_lock(&fo->lock);
        fo->stop = 1;
        pthread_cond_broadcast(&fo->cond);
        pthread_mutex_unlock(&fo->lock);
        pthread_join(fo->thread, NULL);
        fo->started = 0;
    }
}

void failover_close(struct failover *fo)
{
    if (!fo)
        return;
    failover_stop(fo);
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
        struct fo_shard *f = fo->sh[i];

        if (f && !f->in_ns) {
            f->fo = NULL;
            sw_close(&f->base); /* no namespace closes it */
        } else if (f) {
            f->fo = NULL; /* ns_close did not run: the switch outlives us */
        }
    }
    pthread_cond_destroy(&fo->cond);
    pthread_mutex_destroy(&fo->lock);
    free(fo);
}

void failover_counts(struct failover *fo, unsigned *promotions, unsigned *demotions)
{
    pthread_mutex_lock(&fo->lock);
    *promotions = fo->promotions;
    *demotions = fo->demotions;
    pthread_mutex_unlock(&fo->lock);
}
