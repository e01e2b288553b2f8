/* replication.c -- a node's replication, wired together (replication.h).
 *
 * Shards this node is the primary of (cfg owner, which the static map
 * keeps) and that have replicas in the map get the shard_repl wrapper, so
 * their writes wait for the in-sync replicas (ack = replica). The local
 * table handed to the node server holds the LMDB shard of every copy here,
 * primary or replica: the stream route reads a primary's LMDB shard, and a
 * request for a shard this node holds only a replica of is redirected to
 * the primary (the server's rule, node_server.h). The replica-sync thread
 * asks the map where each primary is and is kicked by the map's changes.
 * With etcd, failover.h does the wrapping instead: every shard gets a switch
 * in the namespace, the copies here are those the map gives this node (and
 * change with it: `shardfs replica add/drop`), the replica-sync thread gets
 * every copy (it leaves alone those this node serves) and the failover
 * thread moves the roles with the map.
 */
#include "replication.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "failover.h"
#include "replica_sync.h"
#include "shard_map.h"
#include "shard_remote.h"
#include "shard_repl.h"
#include "wire.h"

#define REPLICATION_ROUTE "/v1/replicas"
#define REPLICATION_PROMOTE "/v1/promote"
#define REPLICATION_CHECKSUM "/v1/checksum"
#define CHECKSUM_WAIT_DEFAULT_MS 10000u
#define CHECKSUM_WAIT_MAX_MS 60000u

struct replication {
    const struct config *cfg;
    int node;
    struct ns *ns;
    struct shard_map *map;
    struct replica_sync *sync;
    struct failover *fo; /* with etcd: failover.h */
    struct shard *local[CONFIG_MAX_SHARDS];
    struct node_server_repl server;
    struct remote *own_remote; /* for pushes when ns has none (every shard local) */
    struct shard_repl_push push;
    /* the pushes this node's replicas get (node_server.h) use `sync`:
     * replication_sync_stop takes it away under the write lock */
    pthread_rwlock_t sync_lock;
};

/* node_server_repl.push: a primary's entries for our replica. */
static int push_in(void *ctx, unsigned shard, int from, uint64_t epoch,
                   const struct stream_pos *after, const uint8_t *body, size_t len,
                   struct stream_pos *pos, uint64_t *synced)
{
    struct replication *rep = ctx;
    int rc;

    *pos = (struct stream_pos){0, 0, 0};
    *synced = 0;
    if (shard_nowait_active() ? pthread_rwlock_tryrdlock(&rep->sync_lock) != 0
                              : pthread_rwlock_rdlock(&rep->sync_lock) != 0) {
        shard_nowait_refuse();
        return -EWOULDBLOCK;
    }
    rc = replica_sync_push(rep->sync, shard, from, epoch, after, body, len, pos, synced);
    pthread_rwlock_unlock(&rep->sync_lock);
    return rc;
}

/* Shard indexes to look at: with failover the map's (a split adds
 * shards), else the config's. */
static unsigned shard_limit(const struct replication *rep)
{
    return rep->fo ? CONFIG_MAX_SHARDS : rep->cfg->shard_count;
}

int replication_wanted(const struct config *cfg)
{
    for (unsigned i = 0; i < cfg->shard_count; i++)
        if (cfg->nreplicas[i])
            return 1;
    return 0;
}

int replication_open(const struct config *cfg, int node, struct ns *ns, struct replication **out,
                     char *err, size_t errlen)
{
    struct replication *rep = calloc(1, sizeof(*rep));
    int rc;

    *out = NULL;
    if (!rep) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rep->cfg = cfg;
    rep->node = node;
    rep->ns = ns;
    pthread_rwlock_init(&rep->sync_lock, NULL);
    rep->push.fn = remote_push;
    rep->push.ctx = ns_remote(ns);
    if (!rep->push.ctx) {
        rc = remote_new(cfg, node, &rep->own_remote, err, errlen);
        if (rc)
            goto fail;
        rep->push.ctx = rep->own_remote;
    }
    rc = shard_map_open(cfg, node, &rep->map, err, errlen);
    if (rc)
        goto fail;
    if (cfg->etcd[0]) {
        /* the roles follow the map: failover.h wraps what it serves */
        rc = failover_open(cfg, node, ns, rep->map, rep->local, &rep->fo, err, errlen);
        if (rc)
            goto fail;
        rep->server.started = failover_started;
        rep->server.started_ctx = rep->fo;
    }
    for (unsigned i = 0; !rep->fo && i < cfg->shard_count; i++) {
        struct shard_copies c;
        struct shard *w;

        rep->local[i] = ns_replica(ns, i);
        if (!ns_shard_is_local(ns, i))
            continue;
        rep->local[i] = ns_shard(ns, i);
        rc = shard_map_get(rep->map, i, &c);
        if (rc == 0 && c.nreplicas == 0)
            continue;
        if (rc == 0)
            rc = shard_repl_new(ns_shard(ns, i), rep->map, cfg, node, &rep->push, &w);
        if (rc == 0)
            rc = ns_shard_wrap(ns, i, w);
        if (rc) {
            snprintf(err, errlen, "shard %u: replication: %s", i, strerror(-rc));
            goto fail;
        }
    }
    rep->server.map = rep->map;
    rep->server.local = rep->local;
    rep->server.push = push_in;
    rep->server.push_ctx = rep;
    *out = rep;
    return 0;
fail:
    /* Wrappers already in ns borrow the map: the caller closes ns first. */
    *out = rep;
    return rc;
}

struct failover *replication_failover(struct replication *rep)
{
    return rep ? rep->fo : NULL;
}

const struct node_server_repl *replication_server(struct replication *rep)
{
    return rep ? &rep->server : NULL;
}

/* replica_sync's primary_of: the map's primary. */
static int primary_of(void *ctx, unsigned shard, uint64_t *epoch)
{
    struct shard_copies c;

    if (shard_map_get(ctx, shard, &c) != 0)
        return -1;
    *epoch = c.epoch;
    return c.primary;
}

static void on_map_change(void *ctx, unsigned shard)
{
    replica_sync_kick(ctx, shard);
}

int replication_sync_start(struct replication *rep, char *err, size_t errlen)
{
    struct shard *replicas[CONFIG_MAX_SHARDS];
    int rc;

    for (unsigned i = 0; i < rep->cfg->shard_count; i++)
        replicas[i] = rep->fo ? rep->local[i] : ns_replica(rep->ns, i);
    rc = replica_sync_start(rep->cfg, rep->node, replicas,
                            rep->fo ? failover_primary_of : primary_of,
                            rep->fo ? (void *)rep->fo : (void *)rep->map, &rep->sync, err, errlen);
    if (rc == 0 && rep->fo)
        return failover_start(rep->fo, rep->sync, err, errlen);
    if (rc == 0 && rep->sync)
        shard_map_on_change(rep->map, on_map_change, rep->sync);
    return rc;
}

void replication_sync_stop(struct replication *rep)
{
    struct replica_sync *sync;

    if (!rep)
        return;
    failover_stop(rep->fo); /* no promotion waits for the sync thread any more */
    if (rep->sync)
        shard_map_on_change(rep->map, NULL, NULL); /* waits for a call in progress */
    pthread_rwlock_wrlock(&rep->sync_lock); /* no push in progress, none to come */
    sync = rep->sync;
    rep->sync = NULL;
    pthread_rwlock_unlock(&rep->sync_lock);
    replica_sync_stop(sync);
}

void replication_close(struct replication *rep)
{
    if (!rep)
        return;
    replication_sync_stop(rep);
    failover_close(rep->fo);
    shard_map_close(rep->map);
    remote_free(rep->own_remote);
    pthread_rwlock_destroy(&rep->sync_lock);
    free(rep);
}

/* ---- GET /v1/replicas ---- */

static json_t *json_u64(uint64_t v)
{
    return json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v);
}

static json_t *copy_json(const struct replication *rep, unsigned shard,
                         const struct replica_status *st)
{
    char check[24];

    snprintf(check, sizeof(check), "%" PRIu64, st->pos.check);
    return json_pack("{s:I,s:s,s:s,s:o,s:o,s:s,s:o,s:o,s:o,s:s,s:o,s:o,s:o,s:o,s:f,s:I,"
                     "s:o,s:I,s:I,s:b,s:s,s:o,s:o}",
                     "shard", (json_int_t)shard, "primary",
                     st->primary >= 0 ? rep->cfg->nodes[st->primary].name : "", "phase",
                     replica_phase_name(st->phase), "epoch", json_u64(st->pos.epoch), "lsn",
                     json_u64(st->pos.lsn), "check", check, "synced", json_u64(st->synced),
                     "primary_lsn", json_u64(st->primary_pos.lsn), "lag_ms",
                     json_u64(st->lag_ms), "error",
                     st->last_error ? strerror(-st->last_error) : "", "snapshots",
                     json_u64(st->snapshots), "snap_bytes", json_u64(st->snap_bytes),
                     "snap_records", json_u64(st->snap_records), "snap_total_records",
                     json_u64(st->snap_total_records), "snap_rate", st->snap_rate, "snap_eta_ms",
                     (json_int_t)st->snap_eta_ms, "replies", json_u64(st->replies),
                     "last_status", (json_int_t)st->last_status, "last_reply_ago_ms",
                     (json_int_t)st->last_reply_ago_ms, "in_flight", st->in_flight, "at", st->at,
                     "restarts", json_u64(st->restarts), "pushes", json_u64(st->pushes));
}

static int route_is(const struct node_request *req, const char *path, const char *method,
                    struct node_response *resp, int *handled)
{
    *handled = req->path_len == strlen(path) && memcmp(req->path, path, req->path_len) == 0;
    if (!*handled || strcmp(req->method, method) == 0)
        return *handled;
    node_response_error(resp, -EINVAL, "%s wants %s", path, method);
    resp->status = 405;
    resp->errno_name[0] = '\0';
    node_response_header(resp, "Allow", "%s", method);
    return 0;
}

/* POST /v1/promote (replication.h): the handover, on a worker thread. */
static void route_promote(struct replication *rep, const struct node_request *req,
                          struct node_response *resp)
{
    json_t *in = req->body ? json_loadb((const char *)req->body, req->body_len, 0, NULL) : NULL;
    json_t *shard = json_object_get(in, "shard"), *node = json_object_get(in, "node");
    struct failover_handed h;
    char err[512] = "";
    int to = -1, rc;

    if (!json_is_integer(shard) || !json_is_string(node) || json_integer_value(shard) < 0 ||
        json_integer_value(shard) >= (json_int_t)shard_limit(rep)) {
        json_decref(in);
        node_response_error(resp, -EINVAL, "want {\"shard\": 0..%u, \"node\": NAME}",
                            shard_limit(rep) - 1);
        return;
    }
    for (unsigned i = 0; i < rep->cfg->node_count; i++)
        if (strcmp(rep->cfg->nodes[i].name, json_string_value(node)) == 0)
            to = (int)i;
    if (to < 0) {
        rc = -EINVAL;
        snprintf(err, sizeof(err), "no node named %s", json_string_value(node));
    } else if (!rep->fo) {
        rc = -EOPNOTSUPP;
        snprintf(err, sizeof(err), "promote needs the shard map in etcd (an etcd directive)");
    } else {
        rc = failover_handover(rep->fo, (unsigned)json_integer_value(shard), to, &h, err,
                               sizeof(err));
    }
    if (rc == 0)
        node_response_json(resp, json_pack("{s:b,s:I,s:s,s:s,s:I,s:I,s:I,s:I,s:I}", "done", 1, "shard",
                                   json_integer_value(shard), "from",
                                   rep->cfg->nodes[rep->node].name, "to",
                                   rep->cfg->nodes[to].name, "old_epoch",
                                   (json_int_t)h.old_epoch, "epoch", (json_int_t)h.new_epoch,
                                   "lsn", (json_int_t)h.lsn, "frozen_ms",
                                   (json_int_t)h.frozen_ms, "took_ms", (json_int_t)h.took_ms));
    else
        node_response_json(resp, json_pack("{s:b,s:s,s:s}", "done", 0, "errno",
                                   wire_errno_name(rc) ? wire_errno_name(rc) : strerror(-rc),
                                   "error", err));
    json_decref(in);
}

/* ---- POST /v1/checksum (replication.h): the content check ---- */

/* The wrapper of shard n if this node serves it as primary (kept until
 * primary_put with etcd), else NULL. */
static struct shard *primary_get(struct replication *rep, unsigned n)
{
    struct shard_copies c;
    struct shard *w;

    if (rep->fo)
        return failover_primary_get(rep->fo, n);
    w = ns_shard(rep->ns, n);
    if (shard_map_get(rep->map, n, &c) != 0 || c.primary != rep->node || !shard_repl_is(w))
        return NULL;
    return w;
}

static void primary_put(struct replication *rep, unsigned n)
{
    if (rep->fo)
        failover_primary_put(rep->fo, n);
}

/* A replica that asked within this long is alive: worth waiting for. */
#define DRAIN_ALIVE_MS 3000

void replication_drain(struct replication *rep, unsigned timeout_ms)
{
    int64_t until = clock_mono_ms() + timeout_ms;

    for (unsigned n = 0; rep && n < shard_limit(rep); n++) {
        struct shard_repl_status st;
        struct shard *w = primary_get(rep, n);

        if (!w)
            continue;
        if (shard_repl_status(w, &st) == 0)
            for (unsigned i = 0; i < st.nreplicas; i++) {
                const struct shard_repl_peer *r = &st.replicas[i];
                int64_t left = until - clock_mono_ms();

                if (left <= 0)
                    break;
                if (r->last_report_ms < 0 || r->last_report_ms > DRAIN_ALIVE_MS ||
                    r->applied.lsn >= st.position.lsn)
                    continue;
                shard_repl_wait_level(w, r->node, st.position.lsn, (unsigned)left);
            }
        primary_put(rep, n);
    }
}

/* As primary: freeze the writes, hash the copy at its position P, set the
 * replicas' checkpoint at P for ttl_ms, thaw. *frozen_ms: how long writes
 * were held. 0 or -errno with a reason. */
static int checksum_as_primary(struct replication *rep, unsigned n, unsigned ttl_ms,
                               struct shard_lmdb_sum *sum, int64_t *frozen_ms, char *err,
                               size_t errlen)
{
    unsigned tmo = rep->cfg->timeout_ms ? rep->cfg->timeout_ms : 5000;
    struct shard *w = primary_get(rep, n);
    struct stream_pos p;
    int64_t t0;
    int rc;

    *frozen_ms = 0;
    if (!w) {
        snprintf(err, errlen, "shard %u: %s is not its serving primary (or a handover runs)", n,
                 rep->cfg->nodes[rep->node].name);
        return -EPERM;
    }
    /* The pages first, writes flowing: the held pass then reads memory. */
    rc = shard_lmdb_warm(shard_repl_inner(w));
    if (rc < 0) {
        snprintf(err, errlen, "shard %u: reading the primary's copy: %s", n, strerror(-rc));
        goto out;
    }
    /* As a handover's freeze: held writes keep time to be done again. */
    t0 = clock_mono_ms();
    rc = shard_repl_freeze(w, tmo * 2 / 10, &p);
    if (rc < 0) {
        snprintf(err, errlen, "shard %u: writes in progress did not finish in time: %s", n,
                 strerror(-rc));
        goto out;
    }
    rc = shard_lmdb_checksum(shard_repl_inner(w), sum);
    if (rc == 0 && !stream_pos_eq(&sum->pos, &p))
        rc = -EAGAIN; /* not expected: every write goes through the frozen wrapper */
    if (rc == 0)
        rc = shard_repl_checkpoint_set(w, &p, ttl_ms);
    shard_repl_thaw(w, 0);
    *frozen_ms = clock_mono_ms() - t0;
    if (rc < 0)
        snprintf(err, errlen, "shard %u: hashing the primary's copy: %s", n, strerror(-rc));
out:
    primary_put(rep, n);
    return rc;
}

static json_t *sum_json(const struct replication *rep, unsigned n, const char *role,
                        const struct shard_lmdb_sum *sum, int64_t frozen_ms, int64_t took_ms)
{
    char check[24], digest[2 * SHARD_LMDB_SUM_LEN + 1];

    snprintf(check, sizeof(check), "%" PRIu64, sum->pos.check);
    for (unsigned i = 0; i < SHARD_LMDB_SUM_LEN; i++)
        snprintf(digest + 2 * i, 3, "%02x", sum->digest[i]);
    return json_pack("{s:b,s:I,s:s,s:s,s:o,s:o,s:s,s:s,s:o,s:o,s:I,s:I}", "done", 1, "shard",
                     (json_int_t)n, "node", rep->cfg->nodes[rep->node].name, "role", role,
                     "epoch", json_u64(sum->pos.epoch), "lsn", json_u64(sum->pos.lsn), "check",
                     check, "digest", digest, "records", json_u64(sum->records), "bytes",
                     json_u64(sum->bytes), "frozen_ms", (json_int_t)frozen_ms, "took_ms",
                     (json_int_t)took_ms);
}

/* A u64 member given as a JSON integer or a decimal string. 0 or -EINVAL. */
static int json_u64_of(json_t *obj, const char *key, uint64_t *out)
{
    json_t *v = json_object_get(obj, key);
    const char *s;
    char *end;

    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *out = (uint64_t)json_integer_value(v);
        return 0;
    }
    s = json_string_value(v);
    if (!s || !*s || *s == '-' || *s == '+')
        return -EINVAL;
    errno = 0;
    *out = strtoull(s, &end, 10);
    return errno || *end ? -EINVAL : 0;
}

/* Read this node's copy of shard n (its data file) into the page cache:
 * a cold replica's hash pass would read the disk while the primary's
 * ack = replica writers wait for it (the primary warms its own copy the
 * same way before it holds them, shard_lmdb_warm). By path, not through
 * the copy's handle, which a `replica drop` may close meanwhile: reading
 * a file that was renamed or deleted is harmless. 0 and *bytes read, or
 * -errno. */
static int warm_copy_file(const struct replication *rep, unsigned n, uint64_t *bytes)
{
    enum { CHUNK = 1 << 20 };
    char path[PATH_MAX];
    char *buf = NULL;
    int fd = -1, rc = 0;
    ssize_t got;

    *bytes = 0;
    if (snprintf(path, sizeof(path), "%s/shard-%u/data.mdb", rep->cfg->nodes[rep->node].data_dir,
                 n) >= (int)sizeof(path))
        return -ENAMETOOLONG;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    buf = malloc(CHUNK);
    if (!buf) {
        rc = -ENOMEM;
        goto out;
    }
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    while ((got = pread(fd, buf, CHUNK, (off_t)*bytes)) > 0)
        *bytes += (uint64_t)got;
    if (got < 0)
        rc = -errno;
out:
    free(buf);
    close(fd);
    return rc;
}

/* POST /v1/checksum {"shard":N,"warm":true} (replication.h). */
static void route_warm(struct replication *rep, unsigned n, struct node_response *resp)
{
    int64_t t0 = clock_mono_ms();
    uint64_t bytes;
    int rc = warm_copy_file(rep, n, &bytes);

    if (rc == 0)
        node_response_json(resp, json_pack("{s:b,s:o,s:I}", "done", 1, "bytes", json_u64(bytes),
                                           "took_ms", (json_int_t)(clock_mono_ms() - t0)));
    else
        node_response_json(resp, json_pack("{s:b,s:s,s:s}", "done", 0, "errno",
                                           wire_errno_name(rc) ? wire_errno_name(rc)
                                                               : strerror(-rc),
                                           "error", rc == -ENOENT ? "no copy of the shard here"
                                                                  : strerror(-rc)));
}

/* POST /v1/checksum, on a worker: {"shard":N[,"wait_ms":W]} asks the
 * primary; with "epoch", "lsn" and "check" it asks this node's replica
 * for its hash at that position, waiting up to wait_ms. */
static void route_checksum(struct replication *rep, const struct node_request *req,
                           struct node_response *resp)
{
    json_t *in = req->body ? json_loadb((const char *)req->body, req->body_len, 0, NULL) : NULL;
    json_t *shard = json_object_get(in, "shard");
    struct shard_lmdb_sum sum;
    struct stream_pos at, now = {0, 0, 0};
    uint64_t wait_ms = CHECKSUM_WAIT_DEFAULT_MS;
    int64_t t0 = clock_mono_ms(), frozen_ms = 0;
    char err[256] = "", check[24];
    unsigned n;
    int rc, as_replica;

    if (!rep) {
        json_decref(in);
        node_response_json(resp, json_pack("{s:b,s:s,s:s}", "done", 0, "errno", "EOPNOTSUPP",
                                           "error", "this node has no replicated shard"));
        return;
    }
    if (!json_is_integer(shard) || json_integer_value(shard) < 0 ||
        json_integer_value(shard) >= (json_int_t)shard_limit(rep) ||
        (json_object_get(in, "wait_ms") && json_u64_of(in, "wait_ms", &wait_ms) < 0)) {
        json_decref(in);
        node_response_error(resp, -EINVAL, "want {\"shard\": N[, \"wait_ms\": MS]"
                                           "[, \"epoch\": E, \"lsn\": L, \"check\": C]}");
        return;
    }
    n = (unsigned)json_integer_value(shard);
    if (json_is_true(json_object_get(in, "warm"))) {
        json_decref(in);
        route_warm(rep, n, resp);
        return;
    }
    if (wait_ms > CHECKSUM_WAIT_MAX_MS)
        wait_ms = CHECKSUM_WAIT_MAX_MS;
    as_replica = json_object_get(in, "lsn") != NULL;
    if (as_replica && (json_u64_of(in, "epoch", &at.epoch) < 0 ||
                       json_u64_of(in, "lsn", &at.lsn) < 0 ||
                       json_u64_of(in, "check", &at.check) < 0)) {
        json_decref(in);
        node_response_error(resp, -EINVAL, "bad epoch, lsn or check");
        return;
    }
    json_decref(in);
    if (!as_replica) {
        rc = checksum_as_primary(rep, n, (unsigned)wait_ms + 1000u, &sum, &frozen_ms, err,
                                 sizeof(err));
    } else {
        rc = replica_sync_checksum(rep->sync, n, &at, (unsigned)wait_ms, &sum, &now);
        if (rc == -ENOENT)
            snprintf(err, sizeof(err), "%s holds no replica of shard %u",
                     rep->cfg->nodes[rep->node].name, n);
        else if (rc == -ETIMEDOUT)
            snprintf(err, sizeof(err), "behind: at lsn %" PRIu64 " (epoch %" PRIu64
                     "), not at lsn %" PRIu64 " within %" PRIu64 " ms",
                     now.lsn, now.epoch, at.lsn, wait_ms);
        else if (rc < 0)
            snprintf(err, sizeof(err), "hashing the replica's copy: %s", strerror(-rc));
    }
    if (rc == 0) {
        node_response_json(resp, sum_json(rep, n, as_replica ? "replica" : "primary", &sum,
                                          frozen_ms, clock_mono_ms() - t0));
        return;
    }
    snprintf(check, sizeof(check), "%" PRIu64, now.check);
    node_response_json(resp, json_pack("{s:b,s:s,s:s,s:o,s:o,s:s}", "done", 0, "errno",
                                       wire_errno_name(rc) ? wire_errno_name(rc) : strerror(-rc),
                                       "error", err, "epoch", json_u64(as_replica ? now.epoch : 0),
                                       "lsn", json_u64(as_replica ? now.lsn : 0), "check",
                                       as_replica ? check : "0"));
}

int replication_route(struct replication *rep, const struct node_request *req,
                      struct node_response *resp)
{
    json_t *list;
    int handled;

    if (route_is(req, REPLICATION_PROMOTE, "POST", resp, &handled)) {
        if (rep)
            route_promote(rep, req, resp);
        else
            node_response_json(resp, json_pack("{s:b,s:s,s:s}", "done", 0, "errno", "EOPNOTSUPP",
                                       "error", "this node has no replicated shard"));
        return 0;
    }
    if (handled)
        return 0;
    if (route_is(req, REPLICATION_CHECKSUM, "POST", resp, &handled)) {
        route_checksum(rep, req, resp);
        return 0;
    }
    if (handled)
        return 0;
    if (!route_is(req, REPLICATION_ROUTE, "GET", resp, &handled))
        return handled ? 0 : 1;
    list = json_array();
    for (unsigned i = 0; list && rep && i < shard_limit(rep); i++) {
        struct replica_status st;

        if (replica_sync_status(rep->sync, i, &st) == 0 && st.primary != rep->node &&
            json_array_append_new(list, copy_json(rep, i, &st)) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    node_response_json(resp, list ? json_pack("{s:s,s:o}", "node",
                                      rep ? rep->cfg->nodes[rep->node].name : "", "replicas",
                                      list)
                          : NULL);
    return 0;
}
