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
 *  `waiting` counts the applies and syncs that wait for acks (an apply
 *  from before it is applied, so the LMDB shard's apply listener already
 *  sees it): the stream route answers a long poll at once when someone
 *  waits, and otherwise gathers entries for a few ms (node_server.c).
 *  Stream holds (shard_lmdb_stream_hold, slot = node index) are set by
 *  reports and released lazily, at applies and reports, for a node silent
 *  for SHARD_REPL_HOLD_MS; the LMDB shard's own lock is never taken under
 *  ours.
 *
 * DESIGN: joining (a replica back into the in-sync set)
 *  Only in-sync replicas may be promoted, so one must not enter the set
 *  lacking a write acknowledged without it. Adding it is an etcd txn that
 *  takes a while, and writes go on meanwhile: with the set empty they
 *  wait for nobody. So a replica that reports a position near ours
 *  becomes a joiner: every write that notes its position after that waits
 *  for the joiners too (as for the set's members), or, if it had decided
 *  before not to wait (a write is refused before it applies, never after),
 *  raises the joiner's join_lsn to its own lsn. The joiner is added once
 *  it reported join_lsn, with no write between that decision and its
 *  noting (`unwaited` 0): from then on every write waits for it
 *  (JOIN_ADDING), and everything acknowledged without it, it has. A joiner
 *  that lags is dropped as a member would be; under isr_lock, which the
 *  add holds across its txn, so a drop never races an add in flight. A
 *  report's join_lsn never moves once set (ack = replica: writes that wait
 *  do not raise it), so a replica catching up with a continuous writer is
 *  not starved by needing the exact position at one look.
 *
 * DESIGN: pushes (cfg replica_push, on by default)
 *  A write that waits for a replica's ack and finds no push to it in
 *  flight pushes itself: it reads the stream after the replica's last
 *  acked position (up to SHARD_REPL_PUSH_MAX) and POSTs it to the
 *  replica's node (push.fn: remote_push), whose answer, the copy's new
 *  position, is reported like a pull's (shard_repl_report). Writes that
 *  find a push in flight wait for the report, as before, so concurrent
 *  writers share pushes (group commit); one whose batch came after the
 *  push read the stream pushes next. An ack then costs one round trip and
 *  two thread hand-offs (the replica node's I/O thread and back), where a
 *  pull costs its reply, the next request and four hand-offs (writer ->
 *  long poll -> sync thread -> the next request -> writer); see README for
 *  the figures. Pushes run only where waiting is allowed (FUSE threads, the
 *  shard workers): an apply that must wait is refused in no-waiting mode
 *  before anything happens, so an I/O thread never pushes, and the push
 *  route on the replica waits for nothing remote (its own pool, like the
 *  stream route's), so two nodes pushing to each other always drain.
 *  A push that fails (the copy takes none now: a snapshot, a content
 *  check, a new primary; the node is down; a timeout) leaves the peer to
 *  its pulls for SHARD_REPL_PUSH_RETRY_MS: `pull_acks_until` makes the
 *  applies wake the long polls again (shard_repl_acks_wanted) and the
 *  replica's parked pull is woken at once. A peer under a content
 *  check's checkpoint is never pushed to (its pulls stop it at P). The
 *  pulls go on meanwhile: a replica that acked a push lately is
 *  push-fed (shard_repl_push_fed), its long poll waits to its deadline
 *  without being woken by applies and then reads from the position its
 *  pushes reached; a report from a pull sent before the last pushes
 *  (lower than what they acked) does not move the peer back.
 *  Fencing is unchanged: the replica takes a push only from the primary
 *  and epoch its own map names, and its copy only while streaming
 *  (replica_sync.c, step 8); an ack still means "in its redo log".
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
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "placement.h"
#include "shard_lmdb.h"

struct peer {
    struct stream_pos applied; /* last reported */
    uint64_t synced;
    int64_t report_ms; /* monotonic ms of its last request; 0 never */
    int held;          /* its stream hold is set */
    int needs_snapshot;
    int joining;       /* JOIN_*: on its way back into the in-sync set */
    uint64_t join_lsn; /* it may join once it applied this (DESIGN: joining) */
    /* a content check's checkpoint (shard_repl_checkpoint_set) */
    struct stream_pos cp;
    uint64_t cp_id;
    int64_t cp_until;  /* monotonic ms; 0: none */
    /* pushes (DESIGN: pushes) */
    int pushing;          /* a writer is pushing to it */
    int64_t push_ok_ms;   /* monotonic ms of the last push it acked; 0: none lately */
    int64_t push_retry_ms; /* no push before this (the last one failed) */
};

enum { JOIN_NONE = 0, JOIN_WAIT, JOIN_ADDING };

/* Pushes (DESIGN: pushes): at most this much of the stream a push (but
 * one entry, whatever its size); a peer whose push failed gets none for
 * this long (its pulls carry its acks); a push ack this recent makes the
 * peer push-fed. */
#define SHARD_REPL_PUSH_MAX (4u << 20)
#define SHARD_REPL_PUSH_RETRY_MS 1000
#define SHARD_REPL_PUSH_FRESH_MS 1000

/* A replica this close to our position (in lsns) becomes a joiner: the
 * writes that then wait for it wait for a few batches at most. */
#define SHARD_REPL_JOIN_GAP 256u

struct lag_mark {
    uint64_t lsn;
    int64_t ms; /* monotonic, when applied */
};

struct shard_repl {
    struct shard base;
    struct shard *inner;
    struct shard_map *map;
    int cfg_etcd; /* the map is etcd's: shards have depths of their own */
    int self;
    int ack;
    unsigned lag_ms;
    pthread_mutex_t lock;
    pthread_cond_t reported; /* a report came (CLOCK_MONOTONIC) */
    atomic_int waiting;      /* applies and syncs waiting for acks, or about to */
    /* under lock: */
    uint64_t epoch;        /* last set on the LMDB shard */
    struct stream_pos pos; /* the primary's position */
    struct peer peers[CONFIG_MAX_NODES];
    struct lag_mark ring[SHARD_REPL_LAG_WINDOW];
    unsigned ring_start, ring_len; /* ring[ring_start..] oldest first */
    uint64_t sync_wanted;          /* highest lsn a sync waited for the replicas to sync */
    uint64_t cp_last;              /* the last checkpoint id handed out */
    int frozen;                    /* a handover holds new writes (shard_repl_freeze) */
    int moved;                     /* the handover was made: every op is refused (atomic) */
    unsigned writing;              /* applies and syncs past the freeze check */
    unsigned joiners;              /* peers joining (peer.joining != JOIN_NONE) */
    unsigned unwaited;             /* applies between deciding not to wait and noting */
    pthread_mutex_t isr_lock;      /* held across our in-sync set changes (joining) */
    pthread_cond_t thawed;         /* frozen or writing dropped (CLOCK_MONOTONIC) */
    void (*sync_fn)(void *ctx, unsigned index);
    void *sync_ctx;
    struct shard_repl_push push;   /* fn NULL: acks come by the pulls only */
    _Atomic int64_t pull_acks_until; /* a push failed: the pulls carry acks until then */
};

static const struct shard_ops repl_ops;

static struct shard_repl *repl_of(struct shard *s)
{
    return (struct shard_repl *)s;
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

/* Scans show only the records the shard owns at the map's depth of it
 * (DESIGN.md, Resharding in a cluster): a split's moved half stays in the
 * source until its purge, and a merge's copy in the lower buddy before
 * its cut-over, invisible to listings on every node, also after a
 * failover in the middle. A record that is not placed is the shard's. */
struct owned {
    shard_scan_fn fn;
    shard_join_fn jfn;
    void *ctx;
    unsigned index;
    uint64_t mask;
};

static int owns(const struct owned *o, const uint8_t *k, size_t kl)
{
    uint64_t h;

    return placement_key_hash(k, kl, &h) < 0 || (h & o->mask) == o->index;
}

static int owned_scan_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct owned *o = ctx;

    return owns(o, k, kl) ? o->fn(o->ctx, k, kl, v, vl) : 0;
}

static int owned_join_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl,
                          const uint8_t *jv, size_t jl)
{
    struct owned *o = ctx;

    return owns(o, k, kl) ? o->jfn(o->ctx, k, kl, v, vl, jv, jl) : 0;
}

/* 1 and o set when scans of r must be filtered: the map gives the shard
 * a depth (a static map's depth is the config's: nothing to hide). */
static int owned_init(struct shard_repl *r, struct owned *o)
{
    struct shard_copies c;

    if (!r->cfg_etcd || shard_map_get(r->map, r->base.index, &c) != 0 || c.depth >= 64)
        return 0;
    o->index = r->base.index;
    o->mask = (1ull << c.depth) - 1;
    return 1;
}

static int repl_scan(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                     shard_scan_fn fn, void *ctx)
{
    struct shard_repl *r = repl_of(s);
    struct owned o = {.fn = fn, .ctx = ctx};

    if (moved(r))
        return -EREMCHG;
    if (owned_init(r, &o))
        return shard_scan(r->inner, start, slen, end, elen, owned_scan_one, &o);
    return shard_scan(r->inner, start, slen, end, elen, fn, ctx);
}

static int repl_scan_join(struct shard *s, const void *start, size_t slen, const void *end,
                          size_t elen, const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    struct shard_repl *r = repl_of(s);
    struct owned o = {.jfn = fn, .ctx = ctx};

    if (moved(r))
        return -EREMCHG;
    if (owned_init(r, &o))
        return shard_scan_join(r->inner, start, slen, end, elen, j, owned_join_one, &o);
    return shard_scan_join(r->inner, start, slen, end, elen, j, fn, ctx);
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


/* ---- joining (DESIGN: joining) ---- */

/* Under lock: p stops joining. */
static void join_end(struct shard_repl *r, struct peer *p)
{
    if (p->joining != JOIN_NONE) {
        p->joining = JOIN_NONE;
        r->joiners--;
    }
}

/* Under lock: a write that did not wait for the joiners applied lsn. */
static void join_raise(struct shard_repl *r, uint64_t lsn)
{
    for (int n = 0; r->joiners && n < CONFIG_MAX_NODES; n++)
        if (r->peers[n].joining == JOIN_WAIT && r->peers[n].join_lsn < lsn)
            r->peers[n].join_lsn = lsn;
}

/* A laggard leaves the in-sync set, or stops joining; under isr_lock, so
 * an add in flight for it is over first (its txn made or failed). 0 or
 * -EIO when the removal failed. */
static int drop_laggard(struct shard_repl *r, int node, uint64_t epoch)
{
    int rc;

    pthread_mutex_lock(&r->isr_lock);
    pthread_mutex_lock(&r->lock);
    join_end(r, &r->peers[node]);
    pthread_mutex_unlock(&r->lock);
    rc = shard_map_isr_remove(r->map, r->base.index, node, epoch);
    /* -ENOENT: `replica drop` took it out of the replicas (and the in-sync
     * set) by a recorded change we had not seen yet: not waited for any
     * more, no failure */
    rc = rc < 0 && rc != -ENOENT ? -EIO : 0;
    pthread_mutex_unlock(&r->isr_lock);
    return rc;
}

/* The joiner node reported its join_lsn: into the in-sync set, unless it
 * stopped joining meanwhile or a write that did not wait for it is
 * between its decision and its noting. From JOIN_ADDING on every write
 * waits for it. 0 or the map's error (it stays a joiner: the next report
 * tries again). */
static int join_add(struct shard_repl *r, int node, uint64_t epoch)
{
    struct peer *p = &r->peers[node];
    int go, rc = 0;

    pthread_mutex_lock(&r->isr_lock);
    pthread_mutex_lock(&r->lock);
    go = p->joining == JOIN_WAIT && p->applied.lsn >= p->join_lsn && r->unwaited == 0;
    if (go)
        p->joining = JOIN_ADDING;
    pthread_mutex_unlock(&r->lock);
    if (go)
        rc = shard_map_isr_add(r->map, r->base.index, node, epoch);
    if (go && rc < 0) {
        pthread_mutex_lock(&r->lock);
        if (p->joining == JOIN_ADDING)
            p->joining = JOIN_WAIT;
        pthread_mutex_unlock(&r->lock);
    }
    pthread_mutex_unlock(&r->isr_lock);
    return rc;
}

/* ---- pushes (DESIGN: pushes) ---- */

/* Under lock: whether a writer should push to node now. */
static int push_due(struct shard_repl *r, int node, int64_t now)
{
    const struct peer *p = &r->peers[node];

    return r->push.fn && !p->pushing && p->report_ms && now >= p->push_retry_ms &&
           !(p->cp_until && now < p->cp_until); /* a checkpoint: the pulls stop it at P */
}

/* Push to node the stream after its last ack (under lock, which it drops
 * for the read and the round trip). The reply is its report. */
static void push_one(struct shard_repl *r, int node, uint64_t epoch, int64_t deadline)
{
    struct peer *p = &r->peers[node];
    struct stream_pos from = p->applied, pos;
    struct stream_buf e = {.limit = SHARD_REPL_PUSH_MAX};
    void (*wake)(void *, unsigned) = NULL;
    void *wake_ctx = NULL;
    int64_t now = clock_mono_ms();
    uint64_t synced = 0;
    int count, rc;

    p->pushing = 1;
    pthread_mutex_unlock(&r->lock);
    count = shard_lmdb_stream_read(r->inner, &from, SHARD_REPL_PUSH_MAX, stream_buf_add, &e);
    rc = count < 0 ? count : -EAGAIN; /* not retained, or nothing new: the pulls see to it */
    if (count > 0)
        rc = r->push.fn(r->push.ctx, r->base.index, node, epoch, &from, e.buf, e.len,
                        deadline > now ? (unsigned)(deadline - now) : 1u, &pos, &synced);
    free(e.buf);
    if (rc == 0 && pos.lsn < from.lsn)
        rc = -EAGAIN; /* behind what it acked: the pulls sort it out */
    if (rc == 0) {
        pthread_mutex_lock(&r->lock);
        p->push_ok_ms = clock_mono_ms(); /* before the report: it is fresh */
        pthread_mutex_unlock(&r->lock);
        rc = shard_repl_report(&r->base, node, &pos, synced);
    }
    pthread_mutex_lock(&r->lock);
    p->pushing = 0;
    if (rc < 0) {
        now = clock_mono_ms();
        p->push_ok_ms = 0;
        p->push_retry_ms = now + SHARD_REPL_PUSH_RETRY_MS;
        atomic_store(&r->pull_acks_until, now + SHARD_REPL_PUSH_RETRY_MS);
        wake = r->sync_fn;
        wake_ctx = r->sync_ctx;
    }
    pthread_cond_broadcast(&r->reported);
    if (wake) {
        /* its long poll waits quietly while pushes feed it: wake it */
        pthread_mutex_unlock(&r->lock);
        wake(wake_ctx, r->base.index);
        pthread_mutex_lock(&r->lock);
    }
}

/* Under lock: push to one of the laggards if one is due. 1 if a push was
 * made (the caller looks at the acks again), 0 to wait. */
static int push_laggard(struct shard_repl *r, const int *laggards, int nlag, uint64_t epoch,
                        int64_t deadline)
{
    int64_t now = clock_mono_ms();

    if (!r->push.fn || now >= deadline)
        return 0;
    for (int i = 0; i < nlag; i++)
        if (push_due(r, laggards[i], now)) {
            push_one(r, laggards[i], epoch, deadline);
            return 1;
        }
    return 0;
}

/* Wait until every replica in the in-sync set, and every joiner, has reported lsn (applied, or
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

    clock_deadline_at(&t, deadline);
    pthread_mutex_lock(&r->lock);
    for (;;) {
        int laggards[CONFIG_MAX_NODES], nlag = 0;
        uint64_t members = 0;

        *acked = 0;
        rc = shard_map_get(r->map, r->base.index, &c);
        if (rc < 0)
            break;
        for (unsigned i = 0; i < c.nreplicas; i++)
            if (((c.in_sync >> i) & 1u) && c.replicas[i] >= 0 && c.replicas[i] < CONFIG_MAX_NODES)
                members |= 1ull << c.replicas[i];
        for (int n = 0; n < CONFIG_MAX_NODES; n++) {
            const struct peer *p = &r->peers[n];

            if (!((members >> n) & 1u) && !p->joining)
                continue;
            if ((synced ? p->synced : p->applied.lsn) < lsn)
                laggards[nlag++] = n;
            else if ((members >> n) & 1u)
                (*acked)++; /* a joiner's ack fences nothing: it is not in the set */
        }
        if (nlag == 0)
            break;
        if (!synced && push_laggard(r, laggards, nlag, epoch, deadline))
            continue;
        if (clock_mono_ms() < deadline) {
            pthread_cond_timedwait(&r->reported, &r->lock, &t);
            continue;
        }
        /* Out of time: the laggards leave the in-sync set (or stop
         * joining), by a recorded change, before we acknowledge without
         * them. */
        pthread_mutex_unlock(&r->lock);
        for (int i = 0; i < nlag && rc == 0; i++)
            rc = drop_laggard(r, laggards[i], epoch);
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
    pthread_mutex_lock(&r->lock);
    wait = r->ack == CONFIG_ACK_REPLICA && (in_sync_count(&c) > 0 || r->joiners > 0);
    /* Refuse before anything is applied: the redo on a worker must not
     * apply the batch twice. */
    if (wait && shard_nowait_refuse()) {
        pthread_mutex_unlock(&r->lock);
        return -EWOULDBLOCK;
    }
    if (!wait && r->ack == CONFIG_ACK_REPLICA)
        r->unwaited++; /* no joiner is added until it noted (DESIGN: joining) */
    pthread_mutex_unlock(&r->lock);
    /* Counted before the apply, whose listener tells the long polls
     * whether anyone waits for this batch (shard_repl_acks_wanted). */
    if (wait)
        atomic_fetch_add(&r->waiting, 1);
    rc = shard_lmdb_apply_pos(r->inner, b, &pos);
    now = clock_mono_ms();
    pthread_mutex_lock(&r->lock);
    if (!wait && r->ack == CONFIG_ACK_REPLICA)
        r->unwaited--;
    if (rc == 0) {
        note_applied(r, &pos, now);
        if (!wait && r->ack == CONFIG_ACK_REPLICA)
            join_raise(r, pos.lsn);
    }
    stale = stale_holds(r, now);
    pthread_mutex_unlock(&r->lock);
    release_holds(r, stale);
    if (rc == 0 && wait)
        rc = wait_replicas(r, pos.lsn, 0, c.epoch, now, &acked);
    if (wait)
        atomic_fetch_sub(&r->waiting, 1);
    return rc < 0 ? rc : still_primary(r, c.epoch, acked);
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
    int acked = 0, wait, rc;

    rc = may_ack(r, &c);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&r->lock);
    lsn = r->pos.lsn; /* what was applied before this sync began */
    pthread_mutex_unlock(&r->lock);
    rc = shard_sync(r->inner);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&r->lock);
    wait = r->ack == CONFIG_ACK_REPLICA && (in_sync_count(&c) > 0 || r->joiners > 0) && lsn > 0;
    pthread_mutex_unlock(&r->lock);
    if (wait) {
        pthread_mutex_lock(&r->lock);
        if (lsn > r->sync_wanted)
            r->sync_wanted = lsn;
        fn = r->sync_fn;
        ctx = r->sync_ctx;
        pthread_mutex_unlock(&r->lock);
        atomic_fetch_add(&r->waiting, 1);
        if (fn)
            fn(ctx, r->base.index); /* wake the replicas' long polls */
        rc = wait_replicas(r, lsn, 1, c.epoch, clock_mono_ms(), &acked);
        atomic_fetch_sub(&r->waiting, 1);
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
    pthread_mutex_destroy(&r->isr_lock);
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
    .scan_join = repl_scan_join,
    .apply = repl_apply,
    .sync = repl_sync,
    .get_many = repl_get_many,
    .stat = repl_stat,
    .close = repl_close,
};

/* ---- the public calls ---- */

int shard_repl_new(struct shard *lmdb, struct shard_map *map, const struct config *cfg, int self,
                   const struct shard_repl_push *push, struct shard **out)
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
    pthread_mutex_init(&r->isr_lock, NULL);
    atomic_init(&r->waiting, 0);
    r->base.ops = &repl_ops;
    r->base.index = lmdb->index;
    r->inner = lmdb;
    r->map = map;
    r->cfg_etcd = cfg->etcd[0] != 0;
    r->self = self;
    r->ack = cfg->ack;
    r->lag_ms = cfg->replica_lag_ms;
    r->epoch = c.epoch;
    if (push && cfg->replica_push)
        r->push = *push;
    atomic_init(&r->pull_acks_until, 0);
    shard_lmdb_set_epoch(lmdb, c.epoch);
    *out = &r->base;
    return 0;
}

int shard_repl_acks_wanted(struct shard *s)
{
    struct shard_repl *r = repl_of(s);

    /* pushes carry the acks, unless one failed lately */
    return atomic_load(&r->waiting) > 0 &&
           (!r->push.fn || clock_mono_ms() < atomic_load(&r->pull_acks_until));
}

int shard_repl_push_fed(struct shard *s, int node, struct stream_pos *acked)
{
    struct shard_repl *r = repl_of(s);
    int fed;

    if (node < 0 || node >= CONFIG_MAX_NODES)
        return 0;
    pthread_mutex_lock(&r->lock);
    /* under a checkpoint its pulls carry it: not fed */
    fed = r->peers[node].push_ok_ms && !r->peers[node].cp_until &&
          clock_mono_ms() - r->peers[node].push_ok_ms < SHARD_REPL_PUSH_FRESH_MS;
    if (fed)
        *acked = r->peers[node].applied;
    pthread_mutex_unlock(&r->lock);
    return fed;
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
        /* no replica any more: not waited for as a joiner, a later add
         * starts from nothing, and its old reports must not count as its
         * position (wait_level) */
        join_end(r, &r->peers[n]);
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
    int64_t now = clock_mono_ms();
    uint64_t stale, hold = applied->lsn; /* a stale pull's too: it reads from there */
    int rc, rejoin, in;

    p = replica_peer(r, node, &c, &rc);
    if (!p)
        return rc;
    pthread_mutex_lock(&r->lock);
    if (applied->lsn < p->applied.lsn && p->push_ok_ms &&
        now - p->push_ok_ms < SHARD_REPL_PUSH_FRESH_MS) {
        /* a pull sent before the last pushes: its position is stale */
        if (synced_lsn > p->synced)
            p->synced = synced_lsn;
    } else {
        p->applied = *applied;
        p->synced = synced_lsn;
    }
    applied = &p->applied;
    p->report_ms = now;
    p->needs_snapshot = 0;
    p->held = 1;
    in = (c.in_sync >> replica_slot(&c, node)) & 1u;
    if (in)
        join_end(r, p); /* the map has it now */
    else if (p->joining == JOIN_NONE && applied->lsn + SHARD_REPL_JOIN_GAP >= r->pos.lsn) {
        p->joining = JOIN_WAIT;
        p->join_lsn = r->pos.lsn; /* everything so far may be acknowledged without it */
        r->joiners++;
    }
    rejoin = !in && p->joining == JOIN_WAIT && applied->lsn >= p->join_lsn;
    pthread_cond_broadcast(&r->reported);
    stale = stale_holds(r, now);
    pthread_mutex_unlock(&r->lock);
    shard_lmdb_stream_hold(r->inner, (unsigned)node, hold);
    release_holds(r, stale);
    if (!rejoin)
        return 0;
    /* Caught up: back into the in-sync set, by the map (a network
     * transaction with etcd: not on a thread that must not wait). */
    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    return join_add(r, node, c.epoch);
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
    p->push_ok_ms = 0; /* its next report starts it again, whatever it says */
    p->report_ms = clock_mono_ms();
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
    int64_t now = clock_mono_ms();
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
        /* in the map already: a member (its next report ends the join) */
        o->joining = p->joining != JOIN_NONE && !o->in_sync;
        o->join_lsn = o->joining ? p->join_lsn : 0;
        o->applied = p->applied;
        o->synced_lsn = p->synced;
        if (p->report_ms)
            o->last_report_ms = now - p->report_ms;
        lag_of(r, p->applied.lsn, now, &o->lag_batches, &o->lag_ms);
    }
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* ---- content check (fsck --replicas) ---- */

int shard_repl_checkpoint_set(struct shard *s, const struct stream_pos *at, unsigned ttl_ms)
{
    struct shard_repl *r = repl_of(s);
    void (*fn)(void *ctx, unsigned index);
    void *ctx;
    struct shard_copies c;
    int64_t until = clock_mono_ms() + ttl_ms;
    struct timespec now;
    uint64_t id;
    int rc = shard_map_get(r->map, r->base.index, &c);

    if (rc < 0)
        return rc;
    /* Ids from the wall clock: never one a replica saw from an earlier
     * run of this primary (a counter would start again at a restart). */
    clock_gettime(CLOCK_REALTIME, &now);
    id = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    pthread_mutex_lock(&r->lock);
    if (id <= r->cp_last)
        id = r->cp_last + 1;
    r->cp_last = id;
    for (unsigned i = 0; i < c.nreplicas; i++) {
        struct peer *p;

        if (c.replicas[i] < 0 || c.replicas[i] >= CONFIG_MAX_NODES)
            continue;
        p = &r->peers[c.replicas[i]];
        p->cp = *at;
        p->cp_id = id;
        p->cp_until = until;
    }
    fn = r->sync_fn;
    ctx = r->sync_ctx;
    pthread_mutex_unlock(&r->lock);
    if (fn)
        fn(ctx, r->base.index); /* a replica parked at P hears of it now */
    return 0;
}

int shard_repl_checkpoint(struct shard *s, int node, struct stream_pos *at, uint64_t *id)
{
    struct shard_repl *r = repl_of(s);
    struct peer *p;
    int on;

    if (node < 0 || node >= CONFIG_MAX_NODES)
        return 0;
    p = &r->peers[node];
    pthread_mutex_lock(&r->lock);
    if (p->cp_until && clock_mono_ms() >= p->cp_until)
        p->cp_until = 0;
    on = p->cp_until != 0;
    if (on) {
        *at = p->cp;
        *id = p->cp_id;
    }
    pthread_mutex_unlock(&r->lock);
    return on;
}

void shard_repl_checkpoint_done(struct shard *s, int node, uint64_t hashed_id)
{
    struct shard_repl *r = repl_of(s);

    if (node < 0 || node >= CONFIG_MAX_NODES || !hashed_id)
        return;
    pthread_mutex_lock(&r->lock);
    if (r->peers[node].cp_until && hashed_id == r->peers[node].cp_id) {
        r->peers[node].cp_until = 0;
        /* writes waiting for it may push to it again (push_due) */
        pthread_cond_broadcast(&r->reported);
    }
    pthread_mutex_unlock(&r->lock);
}

/* ---- handover (shardfs promote) ---- */

int shard_repl_wait_level(struct shard *s, int node, uint64_t lsn, unsigned timeout_ms)
{
    struct shard_repl *r = repl_of(s);
    int64_t deadline = clock_mono_ms() + timeout_ms;
    struct timespec t;
    int rc = 0;

    if (node < 0 || node >= CONFIG_MAX_NODES)
        return -EINVAL;
    clock_deadline_at(&t, deadline);
    pthread_mutex_lock(&r->lock);
    while (r->peers[node].applied.lsn < lsn) {
        if (clock_mono_ms() >= deadline) {
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
    int64_t deadline = clock_mono_ms() + timeout_ms;
    struct timespec t;
    int rc = 0;

    clock_deadline_at(&t, deadline);
    pthread_mutex_lock(&r->lock);
    if (r->frozen || moved(r)) {
        pthread_mutex_unlock(&r->lock);
        return -EBUSY;
    }
    r->frozen = 1;
    while (r->writing > 0) {
        if (clock_mono_ms() >= deadline) {
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
