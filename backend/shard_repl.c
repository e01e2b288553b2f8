/* shard_repl.c -- the primary's side of a replicated shard (shard_repl.h).
 *
 * DESIGN
 *  The wrapper keeps, under one mutex, what each replica last reported
 *  (peers[], indexed by node) and the positions of the last
 *  SHARD_REPL_LAG_WINDOW batches it applied (ring[], sorted by lsn, with
 *  the monotonic time each was applied: lag in batches and in ms). A write
 *  that waits for acks sleeps on `reported`, which every report
 *  broadcasts; its deadline is replica_lag_ms after the batch was applied.
 *  Laggards are removed from the in-sync set with the map's call made
 *  without our mutex held (with etcd it is a network transaction), under
 *  the shard epoch read when the write began: if another node was promoted
 *  meanwhile, the removal fails and so does the write.
 *  The primary's position is tracked here (the highest lsn apply_pos gave)
 *  rather than asked of the LMDB shard on every report: every write of a
 *  primary goes through its wrapper, and a report must not wait for the
 *  shard's lock (it is made on a node server I/O thread).
 *  Stream holds (shard_lmdb_stream_hold, slot = node index) are set by
 *  reports and released lazily, at applies and reports, for a node silent
 *  for SHARD_REPL_HOLD_MS; the LMDB shard's own lock is never taken under
 *  ours.
 *
 * DESIGN: handover (shardfs promote, fs/failover.c drives it)
 *  Every apply and sync passes write_enter(): `writing` counts those past
 *  it. shard_repl_freeze() sets `frozen` (new writes wait on `thawed`)
 *  and waits for `writing` to reach 0, so the position it returns is final:
 *  nothing is applied after it while frozen. shard_repl_thaw(moved = 0)
 *  lets the held writes go on as if nothing happened; thaw(moved = 1), after
 *  the map gave the role away, makes them and every later op return
 *  -EREMCHG before touching the copy: the switch (failover.c) and the node
 *  server (503) send them on to the new primary.
 */
#include "shard_repl.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shard_lmdb.h"

struct peer {
    struct stream_pos applied; /* last reported */
    uint64_t synced;
    int64_t report_ms; /* monotonic ms of its last request; 0 never */
    int held;          /* its stream hold is set */
    int needs_snapshot;
};

struct lag_mark {
    uint64_t lsn;
    int64_t ms; /* monotonic, when applied */
};

struct shard_repl {
    struct shard base;
    struct shard *inner;
    struct shard_map *map;
    int self;
    int ack;
    unsigned lag_ms;
    pthread_mutex_t lock;
    pthread_cond_t reported; /* a report came (CLOCK_MONOTONIC) */
    /* under lock: */
    uint64_t epoch;        /* last set on the LMDB shard */
    struct stream_pos pos; /* the primary's position */
    struct peer peers[CONFIG_MAX_NODES];
    struct lag_mark ring[SHARD_REPL_LAG_WINDOW];
    unsigned ring_start, ring_len; /* ring[ring_start..] oldest first */
    uint64_t sync_wanted;          /* highest lsn a sync waited for the replicas to sync */
    int frozen;                    /* a handover holds new writes (shard_repl_freeze) */
    int moved;                     /* the handover was made: every op is refused (atomic) */
    unsigned writing;              /* applies and syncs past the freeze check */
    pthread_cond_t thawed;         /* frozen or writing dropped (CLOCK_MONOTONIC) */
    void (*sync_fn)(void *ctx, unsigned index);
    void *sync_ctx;
};

static const struct shard_ops repl_ops;

static struct shard_repl *repl_of(struct shard *s)
{
    return (struct shard_repl *)s;
}

static int64_t mono_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ---- reads: the LMDB shard's ---- */

/* The role moved by a handover: a read here could miss what the new
 * primary acknowledged since (cheap: a flag set once, never cleared). */
static int moved(struct shard_repl *r)
{
    return __atomic_load_n(&r->moved, __ATOMIC_ACQUIRE);
}

static int repl_get(struct shard *s, const void *key, size_t klen, size_t off, void *buf,
                    size_t buflen, size_t *vlen)
{
    if (moved(repl_of(s)))
        return -EREMCHG;
    return shard_get(repl_of(s)->inner, key, klen, off, buf, buflen, vlen);
}

static int repl_scan(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                     shard_scan_fn fn, void *ctx)
{
    if (moved(repl_of(s)))
        return -EREMCHG;
    return shard_scan(repl_of(s)->inner, start, slen, end, elen, fn, ctx);
}

static int repl_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    if (moved(repl_of(s)))
        return -EREMCHG;
    return shard_get_many(repl_of(s)->inner, r, n);
}

static int repl_stat(struct shard *s, struct shard_stat *st)
{
    if (moved(repl_of(s)))
        return -EREMCHG;
    return shard_stat(repl_of(s)->inner, st);
}

/* ---- the map ---- */

static int in_sync_count(const struct shard_copies *c);

/* Whether a write acknowledged now is fenced against a promotion we have
 * not heard of: by our lease (no other node can take the leader key before
 * it runs out), or, with ack = replica, by the in-sync replicas whose acks
 * it waits for: promotion needs an in-sync replica (an etcd txn), and a
 * promoted replica pulls from nobody, so a deposed primary waits for its
 * ack in vain and then fails to remove it from the in-sync set (a txn
 * that the promotion made fail). So while etcd is away (restarting, or
 * unreachable from here) the primaries of replicated shards keep serving;
 * a shard without an in-sync replica stops with the lease. `replicas`:
 * the in-sync replicas it waits for (before), or that acked (after). */
static int fenced(const struct shard_repl *r, int replicas)
{
    return shard_map_lease_ok(r->map) || (r->ack == CONFIG_ACK_REPLICA && replicas > 0);
}

/* Whether this node may acknowledge a write now: the map naming it the
 * primary, and fenced(). 0 and the shard's copies, or -EHOSTUNREACH (or
 * the map's error). Keeps the LMDB shard's epoch that of the map. */
static int may_ack(struct shard_repl *r, struct shard_copies *c)
{
    int rc;

    rc = shard_map_get(r->map, r->base.index, c);
    if (rc < 0)
        return rc;
    if (c->primary != r->self || !fenced(r, in_sync_count(c)))
        return -EHOSTUNREACH;
    pthread_mutex_lock(&r->lock);
    if (c->epoch != r->epoch) {
        r->epoch = c->epoch;
        shard_lmdb_set_epoch(r->inner, c->epoch);
    }
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* After a write: whether it may be acknowledged. Another node may have
 * been promoted while it applied or waited, or the lease run out: then
 * only the acks of `acked` in-sync replicas (wait_replicas) fence it. */
static int still_primary(struct shard_repl *r, uint64_t epoch, int acked)
{
    struct shard_copies c;

    if (shard_map_get(r->map, r->base.index, &c) < 0 || c.primary != r->self ||
        c.epoch != epoch)
        return -EHOSTUNREACH;
    if (!fenced(r, acked))
        return -EHOSTUNREACH;
    return 0;
}

static int in_sync_count(const struct shard_copies *c)
{
    int n = 0;

    for (unsigned i = 0; i < c->nreplicas; i++)
        n += (c->in_sync >> i) & 1u;
    return n;
}

/* The index of node among c's replicas, or -1. */
static int replica_slot(const struct shard_copies *c, int node)
{
    for (unsigned i = 0; i < c->nreplicas; i++)
        if (c->replicas[i] == node)
            return (int)i;
    return -1;
}

/* ---- positions, lag and holds (under lock) ---- */

/* The primary applied a batch at p: the ring keeps lsn order even when two
 * applies finish out of order. */
static void note_applied(struct shard_repl *r, const struct stream_pos *p, int64_t now)
{
    unsigned i;

    if (p->lsn > r->pos.lsn)
        r->pos = *p;
    if (r->ring_len &&
        r->ring[(r->ring_start + r->ring_len - 1) % SHARD_REPL_LAG_WINDOW].lsn >= p->lsn) {
        /* out of order, or an empty batch's current position: rare */
        for (i = 0; i < r->ring_len; i++)
            if (r->ring[(r->ring_start + i) % SHARD_REPL_LAG_WINDOW].lsn == p->lsn)
                return;
    }
    if (r->ring_len == SHARD_REPL_LAG_WINDOW) {
        r->ring_start = (r->ring_start + 1) % SHARD_REPL_LAG_WINDOW;
        r->ring_len--;
    }
    i = r->ring_len++;
    while (i > 0 && r->ring[(r->ring_start + i - 1) % SHARD_REPL_LAG_WINDOW].lsn > p->lsn) {
        r->ring[(r->ring_start + i) % SHARD_REPL_LAG_WINDOW] =
            r->ring[(r->ring_start + i - 1) % SHARD_REPL_LAG_WINDOW];
        i--;
    }
    r->ring[(r->ring_start + i) % SHARD_REPL_LAG_WINDOW] = (struct lag_mark){p->lsn, now};
}

/* Batches applied after lsn, and how long the oldest of them has waited. */
static void lag_of(const struct shard_repl *r, uint64_t lsn, int64_t now, uint64_t *batches,
                   uint64_t *ms)
{
    unsigned lo = 0, hi = r->ring_len;

    /* the first mark with a larger lsn */
    while (lo < hi) {
        unsigned mid = lo + (hi - lo) / 2;

        if (r->ring[(r->ring_start + mid) % SHARD_REPL_LAG_WINDOW].lsn <= lsn)
            lo = mid + 1;
        else
            hi = mid;
    }
    *batches = r->ring_len - lo;
    *ms = 0;
    if (lo < r->ring_len) {
        int64_t d = now - r->ring[(r->ring_start + lo) % SHARD_REPL_LAG_WINDOW].ms;
        *ms = d > 0 ? (uint64_t)d : 0;
    }
}

/* Slots whose hold to release (a node silent too long); under lock. The
 * caller releases them without the lock. */
static uint64_t stale_holds(struct shard_repl *r, int64_t now)
{
    uint64_t mask = 0;

    for (unsigned n = 0; n < CONFIG_MAX_NODES; n++) {
        struct peer *p = &r->peers[n];

        if (p->held && now - p->report_ms > SHARD_REPL_HOLD_MS) {
            p->held = 0;
            mask |= 1ull << n;
        }
    }
    return mask;
}

static void release_holds(struct shard_repl *r, uint64_t mask)
{
    for (unsigned n = 0; mask; n++, mask >>= 1)
        if (mask & 1)
            shard_lmdb_stream_hold(r->inner, n, UINT64_MAX);
}

/* ---- waiting for the replicas ---- */

static void deadline_of(int64_t ms, struct timespec *t)
{
    t->tv_sec = (time_t)(ms / 1000);
    t->tv_nsec = (long)(ms % 1000) * 1000000L;
}

/* Wait until every replica in the in-sync set has reported lsn (applied, or
 * synced with `synced`), at most replica_lag_ms from start; then take the
 * laggards out of the in-sync set (epoch: the shard's epoch this write was
 * made under). 0, -EIO when a removal failed, or the map's error. */
static int wait_replicas(struct shard_repl *r, uint64_t lsn, int synced, uint64_t epoch,
                         int64_t start, int *acked)
{
    int64_t deadline = start + r->lag_ms;
    struct shard_copies c;
    struct timespec t;
    int rc = 0;

    deadline_of(deadline, &t);
    pthread_mutex_lock(&r->lock);
    for (;;) {
        int laggards[SHARD_MAP_COPIES_MAX - 1], nlag = 0;

        *acked = 0;
        rc = shard_map_get(r->map, r->base.index, &c);
        if (rc < 0)
            break;
        for (unsigned i = 0; i < c.nreplicas; i++) {
            const struct peer *p;

            if (!((c.in_sync >> i) & 1u) || c.replicas[i] < 0 || c.replicas[i] >= CONFIG_MAX_NODES)
                continue;
            p = &r->peers[c.replicas[i]];
            if ((synced ? p->synced : p->applied.lsn) < lsn)
                laggards[nlag++] = c.replicas[i];
            else
                (*acked)++;
        }
        if (nlag == 0)
            break;
        if (mono_ms() < deadline) {
            pthread_cond_timedwait(&r->reported, &r->lock, &t);
            continue;
        }
        /* Out of time: the laggards leave the in-sync set, by a recorded
         * change, before we acknowledge without them. */
        pthread_mutex_unlock(&r->lock);
        for (int i = 0; i < nlag && rc == 0; i++) {
            int e = shard_map_isr_remove(r->map, r->base.index, laggards[i], epoch);

            /* -ENOENT: `replica drop` took it out of the replicas (and the
             * in-sync set) by a recorded change we had not seen yet: not
             * waited for any more, no failure */
            if (e < 0 && e != -ENOENT)
                rc = -EIO;
        }
        pthread_mutex_lock(&r->lock);
        if (rc < 0)
            break;
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

/* ---- writes ---- */

/* A write's way in while a handover may be going on (DESIGN: handover):
 * held while frozen, refused with -EREMCHG once the role moved (nothing
 * applied: the caller sends it to the new primary), counted in `writing`
 * otherwise. In no-waiting mode a held write refuses (-EWOULDBLOCK) and is
 * redone on a worker: an I/O thread must not wait for a handover. */
static int write_enter(struct shard_repl *r)
{
    int rc = 0;

    pthread_mutex_lock(&r->lock);
    if (r->frozen && !moved(r) && shard_nowait_refuse()) {
        rc = -EWOULDBLOCK;
        goto out;
    }
    while (r->frozen && !moved(r))
        pthread_cond_wait(&r->thawed, &r->lock);
    if (moved(r)) {
        rc = -EREMCHG;
        goto out;
    }
    r->writing++;
out:
    pthread_mutex_unlock(&r->lock);
    return rc;
}

static void write_leave(struct shard_repl *r)
{
    pthread_mutex_lock(&r->lock);
    if (--r->writing == 0)
        pthread_cond_broadcast(&r->thawed);
    pthread_mutex_unlock(&r->lock);
}

static int repl_apply_in(struct shard_repl *r, const struct batch *b)
{
    struct shard_copies c;
    struct stream_pos pos;
    int64_t now;
    uint64_t stale;
    int acked = 0, wait, rc = may_ack(r, &c);

    if (rc < 0)
        return rc;
    wait = r->ack == CONFIG_ACK_REPLICA && in_sync_count(&c) > 0;
    /* Refuse before anything is applied: the redo on a worker must not
     * apply the batch twice. */
    if (wait && shard_nowait_refuse())
        return -EWOULDBLOCK;
    rc = shard_lmdb_apply_pos(r->inner, b, &pos);
    if (rc < 0)
        return rc;
    now = mono_ms();
    pthread_mutex_lock(&r->lock);
    note_applied(r, &pos, now);
    stale = stale_holds(r, now);
    pthread_mutex_unlock(&r->lock);
    release_holds(r, stale);
    if (wait) {
        rc = wait_replicas(r, pos.lsn, 0, c.epoch, now, &acked);
        if (rc < 0)
            return rc;
    }
    return still_primary(r, c.epoch, acked);
}

static int repl_apply(struct shard *s, const struct batch *b)
{
    struct shard_repl *r = repl_of(s);
    int rc = write_enter(r);

    if (rc < 0)
        return rc;
    rc = repl_apply_in(r, b);
    write_leave(r);
    return rc;
}

static int repl_sync_in(struct shard_repl *r)
{
    struct shard_copies c;
    void (*fn)(void *, unsigned);
    void *ctx;
    uint64_t lsn;
    int acked = 0, rc;

    rc = may_ack(r, &c);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&r->lock);
    lsn = r->pos.lsn; /* what was applied before this sync began */
    pthread_mutex_unlock(&r->lock);
    rc = shard_sync(r->inner);
    if (rc < 0)
        return rc;
    if (r->ack == CONFIG_ACK_REPLICA && in_sync_count(&c) > 0 && lsn > 0) {
        pthread_mutex_lock(&r->lock);
        if (lsn > r->sync_wanted)
            r->sync_wanted = lsn;
        fn = r->sync_fn;
        ctx = r->sync_ctx;
        pthread_mutex_unlock(&r->lock);
        if (fn)
            fn(ctx, r->base.index); /* wake the replicas' long polls */
        rc = wait_replicas(r, lsn, 1, c.epoch, mono_ms(), &acked);
        if (rc < 0)
            return rc;
    }
    return still_primary(r, c.epoch, acked);
}

static int repl_sync(struct shard *s)
{
    struct shard_repl *r = repl_of(s);
    int rc;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* an fsync, and perhaps the replicas' */
    rc = write_enter(r);
    if (rc < 0)
        return rc;
    rc = repl_sync_in(r);
    write_leave(r);
    return rc;
}

/* The wrapper alone (shard_repl_free, repl_close). */
static void repl_free(struct shard_repl *r)
{
    pthread_cond_destroy(&r->thawed);
    pthread_cond_destroy(&r->reported);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

static void repl_close(struct shard *s)
{
    struct shard_repl *r = repl_of(s);

    shard_close(r->inner);
    repl_free(r);
}

void shard_repl_free(struct shard *s)
{
    if (s)
        repl_free(repl_of(s));
}

static const struct shard_ops repl_ops = {
    .get = repl_get,
    .scan = repl_scan,
    .apply = repl_apply,
    .sync = repl_sync,
    .get_many = repl_get_many,
    .stat = repl_stat,
    .close = repl_close,
};

/* ---- the public calls ---- */

int shard_repl_new(struct shard *lmdb, struct shard_map *map, const struct config *cfg, int self,
                   struct shard **out)
{
    struct shard_repl *r;
    struct shard_copies c;
    pthread_condattr_t ca;
    int rc;

    *out = NULL;
    if (!lmdb || !map || !cfg || self < 0 || (unsigned)self >= cfg->node_count)
        return -EINVAL;
    rc = shard_map_get(map, lmdb->index, &c);
    if (rc < 0)
        return rc;
    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    rc = shard_lmdb_position(lmdb, &r->pos);
    if (rc < 0) {
        free(r);
        return rc;
    }
    if (pthread_condattr_init(&ca) != 0) {
        free(r);
        return -ENOMEM;
    }
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->reported, &ca);
    pthread_cond_init(&r->thawed, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&r->lock, NULL);
    r->base.ops = &repl_ops;
    r->base.index = lmdb->index;
    r->inner = lmdb;
    r->map = map;
    r->self = self;
    r->ack = cfg->ack;
    r->lag_ms = cfg->replica_lag_ms;
    r->epoch = c.epoch;
    shard_lmdb_set_epoch(lmdb, c.epoch);
    *out = &r->base;
    return 0;
}

int shard_repl_is(const struct shard *s)
{
    return s && s->ops == &repl_ops;
}

struct shard *shard_repl_inner(struct shard *s)
{
    return repl_of(s)->inner;
}

/* node's peer record if it is a replica of r's shard in the map, with the
 * map's copies in *c; else NULL. */
static struct peer *replica_peer(struct shard_repl *r, int node, struct shard_copies *c, int *rc)
{
    *rc = shard_map_get(r->map, r->base.index, c);
    if (*rc < 0)
        return NULL;
    if (node < 0 || node >= CONFIG_MAX_NODES || replica_slot(c, node) < 0) {
        *rc = -EINVAL;
        return NULL;
    }
    return &r->peers[node];
}

void shard_repl_map_changed(struct shard *s)
{
    struct shard_repl *r = repl_of(s);
    struct shard_copies c;
    uint64_t gone = 0;

    if (shard_map_get(r->map, r->base.index, &c) < 0)
        return;
    pthread_mutex_lock(&r->lock);
    for (unsigned n = 0; n < CONFIG_MAX_NODES; n++) {
        if (replica_slot(&c, (int)n) >= 0)
            continue;
        if (r->peers[n].held)
            gone |= 1ull << n;
        /* no replica any more: a later add starts from nothing, and its old
         * reports must not count as its position (wait_level) */
        memset(&r->peers[n], 0, sizeof(r->peers[n]));
    }
    pthread_cond_broadcast(&r->reported); /* waits judge the in-sync set again */
    pthread_mutex_unlock(&r->lock);
    release_holds(r, gone);
}

int shard_repl_report(struct shard *s, int node, const struct stream_pos *applied,
                      uint64_t synced_lsn)
{
    struct shard_repl *r = repl_of(s);
    struct shard_copies c;
    struct peer *p;
    int64_t now = mono_ms();
    uint64_t stale;
    int rc, rejoin;

    p = replica_peer(r, node, &c, &rc);
    if (!p)
        return rc;
    pthread_mutex_lock(&r->lock);
    p->applied = *applied;
    p->synced = synced_lsn;
    p->report_ms = now;
    p->needs_snapshot = 0;
    p->held = 1;
    rejoin = !((c.in_sync >> replica_slot(&c, node)) & 1u) && applied->lsn == r->pos.lsn;
    pthread_cond_broadcast(&r->reported);
    stale = stale_holds(r, now);
    pthread_mutex_unlock(&r->lock);
    shard_lmdb_stream_hold(r->inner, (unsigned)node, applied->lsn);
    release_holds(r, stale);
    if (!rejoin)
        return 0;
    /* Caught up: back into the in-sync set, by the map (a network
     * transaction with etcd: not on a thread that must not wait). */
    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    return shard_map_isr_add(r->map, r->base.index, node, c.epoch);
}

int shard_repl_needs_snapshot(struct shard *s, int node, const struct stream_pos *base)
{
    struct shard_repl *r = repl_of(s);
    struct shard_copies c;
    struct peer *p;
    int rc;

    p = replica_peer(r, node, &c, &rc);
    if (!p)
        return rc;
    pthread_mutex_lock(&r->lock);
    p->needs_snapshot = 1;
    p->report_ms = mono_ms();
    p->held = 1;
    pthread_mutex_unlock(&r->lock);
    shard_lmdb_stream_hold(r->inner, (unsigned)node, base->lsn);
    return 0;
}

uint64_t shard_repl_sync_wanted(struct shard *s, int node)
{
    struct shard_repl *r = repl_of(s);
    uint64_t want = 0;

    if (node < 0 || node >= CONFIG_MAX_NODES)
        return 0;
    pthread_mutex_lock(&r->lock);
    if (r->peers[node].synced < r->sync_wanted)
        want = r->sync_wanted;
    pthread_mutex_unlock(&r->lock);
    return want;
}

void shard_repl_on_sync_wanted(struct shard *s, void (*fn)(void *ctx, unsigned index), void *ctx)
{
    struct shard_repl *r = repl_of(s);

    pthread_mutex_lock(&r->lock);
    r->sync_fn = fn;
    r->sync_ctx = fn ? ctx : NULL;
    pthread_mutex_unlock(&r->lock);
}

int shard_repl_status(struct shard *s, struct shard_repl_status *out)
{
    struct shard_repl *r = repl_of(s);
    struct shard_copies c;
    int64_t now = mono_ms();
    int rc = shard_map_get(r->map, r->base.index, &c);

    memset(out, 0, sizeof(*out));
    if (rc < 0)
        return rc;
    out->epoch = c.epoch;
    pthread_mutex_lock(&r->lock);
    out->position = r->pos;
    for (unsigned i = 0; i < c.nreplicas && i < SHARD_MAP_COPIES_MAX - 1; i++) {
        struct shard_repl_peer *o = &out->replicas[out->nreplicas++];
        int node = c.replicas[i];
        const struct peer *p;

        o->node = node;
        o->in_sync = (int)((c.in_sync >> i) & 1u);
        o->last_report_ms = -1;
        if (node < 0 || node >= CONFIG_MAX_NODES)
            continue;
        p = &r->peers[node];
        o->needs_snapshot = p->needs_snapshot;
        o->applied = p->applied;
        o->synced_lsn = p->synced;
        if (p->report_ms)
            o->last_report_ms = now - p->report_ms;
        lag_of(r, p->applied.lsn, now, &o->lag_batches, &o->lag_ms);
    }
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* ---- handover (shardfs promote) ---- */

int shard_repl_wait_level(struct shard *s, int node, uint64_t lsn, unsigned timeout_ms)
{
    struct shard_repl *r = repl_of(s);
    int64_t deadline = mono_ms() + timeout_ms;
    struct timespec t;
    int rc = 0;

    if (node < 0 || node >= CONFIG_MAX_NODES)
        return -EINVAL;
    deadline_of(deadline, &t);
    pthread_mutex_lock(&r->lock);
    while (r->peers[node].applied.lsn < lsn) {
        if (mono_ms() >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
        pthread_cond_timedwait(&r->reported, &r->lock, &t);
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

int shard_repl_freeze(struct shard *s, unsigned timeout_ms, struct stream_pos *pos)
{
    struct shard_repl *r = repl_of(s);
    int64_t deadline = mono_ms() + timeout_ms;
    struct timespec t;
    int rc = 0;

    deadline_of(deadline, &t);
    pthread_mutex_lock(&r->lock);
    if (r->frozen || moved(r)) {
        pthread_mutex_unlock(&r->lock);
        return -EBUSY;
    }
    r->frozen = 1;
    while (r->writing > 0) {
        if (mono_ms() >= deadline) {
            rc = -ETIMEDOUT;
            break;
        }
        pthread_cond_timedwait(&r->thawed, &r->lock, &t);
    }
    if (rc < 0) {
        r->frozen = 0;
        pthread_cond_broadcast(&r->thawed);
    }
    *pos = r->pos;
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void shard_repl_thaw(struct shard *s, int moved)
{
    struct shard_repl *r = repl_of(s);

    pthread_mutex_lock(&r->lock);
    r->frozen = 0;
    if (moved)
        __atomic_store_n(&r->moved, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&r->thawed);
    pthread_mutex_unlock(&r->lock);
}
