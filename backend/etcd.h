/* etcd.h -- a small client for etcd's v3 JSON gateway (libcurl + jansson).
 *
 * What it is for: issue 10 keeps the shard map, the per-shard primary leases
 * and the in-sync replica sets in etcd. This module is only the transport:
 * keys and values are opaque bytes, it knows nothing of shards. It speaks the
 * gRPC gateway etcd 3.4 serves on its client URLs (POST /v3/kv/range,
 * /v3/kv/put, /v3/kv/deleterange, /v3/kv/txn, /v3/lease/grant,
 * /v3/lease/keepalive, /v3/kv/lease/revoke, /v3/watch), keys and values
 * base64 in JSON, int64 numbers as JSON strings.
 *
 * Endpoints: a comma-separated list of base URLs. Calls go to the endpoint
 * that last answered; when an attempt cannot connect (refused, unreachable,
 * no connect within its share of the time), the call moves on to the next
 * endpoint, and so on once round the list. Only a failed connect moves on:
 * the request was then never sent, so retrying it is safe also for put and
 * txn. Every call but etcd_watch is bounded by timeout_ms as a whole (connect
 * included), never a hang.
 *
 * Errors: 0 or -errno. gRPC status codes in the gateway's error replies map
 * in one function (NOT_FOUND -ENOENT, INVALID_ARGUMENT -EINVAL,
 * OUT_OF_RANGE -ERANGE (e.g. a compacted revision), DEADLINE_EXCEEDED
 * -ETIMEDOUT, UNAVAILABLE -EAGAIN, RESOURCE_EXHAUSTED -ENOSPC, PERMISSION_DENIED
 * and UNAUTHENTICATED -EACCES, others -EIO); transport failures: no endpoint
 * could be connected -EHOSTUNREACH, time ran out -ETIMEDOUT, a reply over
 * ETCD_REPLY_MAX or not the JSON expected -EIO. Calls that take `err,
 * errlen` also write a one-line reason there on failure (err may be NULL).
 *
 * Memory: keys and values passed in are borrowed for the call. struct
 * etcd_kv handed to a callback points into the reply, valid only during that
 * callback; copy what you keep. etcd_get returns a malloc'd value the caller
 * frees.
 *
 * Threads: a struct etcd may be used from any number of threads at once.
 * Each call takes a curl easy handle from a mutex-protected pool (or makes
 * one) and gives it back, so calls run in parallel and keep their
 * connections alive; callbacks run on the calling thread with no lock held
 * (a callback may call into the same struct etcd). Made after fork only
 * (curl handles do not survive it); the first etcd_new runs
 * curl_global_init once for the process.
 */
#ifndef SHARDFS_ETCD_H
#define SHARDFS_ETCD_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct etcd;

/* A reply body may be at most this large (a get_prefix page, a txn reply,
 * one watch message); more is -EIO. */
#define ETCD_REPLY_MAX (64u << 20)
/* Keys per range request of etcd_get_prefix (it pages, at one revision). */
#define ETCD_PAGE_KEYS 1000

/* endpoints: "http://127.0.0.1:2379[,http://host:port...]" (at most
 * ETCD_MAX_ENDPOINTS); timeout_ms: the bound of each call (5000 if 0).
 * Does not contact etcd. -EINVAL (bad list) or -ENOMEM, with a reason. */
#define ETCD_MAX_ENDPOINTS 16
int etcd_new(const char *endpoints, unsigned timeout_ms, struct etcd **out, char *err,
             size_t errlen);
/* No call may be running. NULL-safe. */
void etcd_free(struct etcd *e);

/* One key as etcd holds it. Revisions and versions as etcd counts them:
 * create_revision/mod_revision are the store revisions of the key's creation
 * and last change, version counts changes since creation (1 after the
 * first put), lease is the lease id attached (0: none). */
struct etcd_kv {
    const void *key;
    size_t klen;
    const void *value;
    size_t vlen;
    int64_t create_revision;
    int64_t mod_revision;
    int64_t version;
    int64_t lease;
};

/* A callback for keys, in key order (bytewise). Return 0 to go on, 1 to
 * stop (the call then returns 0), a -errno to stop with that error. */
typedef int (*etcd_kv_fn)(void *ctx, const struct etcd_kv *kv);

/* Read one key. On 0, *value is a malloc'd copy (NUL-terminated one past
 * *vlen, for text; free it) and *meta (may be NULL) the key's numbers, with
 * meta->key/value NULL. -ENOENT if the key does not exist. */
int etcd_get(struct etcd *e, const void *key, size_t klen, void **value, size_t *vlen,
             struct etcd_kv *meta, char *err, size_t errlen);

/* Every key starting with prefix (klen 0: every key), in key order, to fn,
 * all read at one revision: *revision (may be NULL) gets it (the store's
 * revision when the first page was read). Pages of ETCD_PAGE_KEYS; if that
 * revision is compacted away between pages: -ERANGE. */
int etcd_get_prefix(struct etcd *e, const void *prefix, size_t plen, etcd_kv_fn fn, void *ctx,
                    int64_t *revision, char *err, size_t errlen);

/* Write key = value, attached to lease (0: none; an unknown or expired lease
 * is -ENOENT). *revision (may be NULL) gets the new store revision. */
int etcd_put(struct etcd *e, const void *key, size_t klen, const void *value, size_t vlen,
             int64_t lease, int64_t *revision, char *err, size_t errlen);

/* Delete key, or with prefix != 0 every key starting with it. *deleted (may
 * be NULL) gets how many were deleted (0 is no error), *revision (may be
 * NULL) the store revision after it. */
int etcd_delete(struct etcd *e, const void *key, size_t klen, int prefix, int64_t *deleted,
                int64_t *revision, char *err, size_t errlen);

/* ---- Transactions: if every compare holds, do the success ops, else the
 * failure ops, atomically at one revision. Build them with the inline
 * helpers below, e.g. promoting a replica only if the primary key still has
 * the mod_revision we saw and the in-sync set is the one we read:
 *
 *   struct etcd_cmp when[] = {
 *       etcd_cmp_mod(ETCD_S("shard/3/primary"), ETCD_EQUAL, seen_rev),
 *       etcd_cmp_value(ETCD_S("shard/3/isr"), ETCD_EQUAL, isr, isr_len),
 *   };
 *   struct etcd_op then[] = {
 *       etcd_op_put(ETCD_S("shard/3/primary"), me, me_len, my_lease),
 *   };
 *   struct etcd_txn t = {ETCD_WHEN(when), ETCD_THEN(then)};
 *   rc = etcd_txn(e, &t, err, sizeof(err));  -> t.succeeded, t.revision
 */
enum etcd_target {
    ETCD_VERSION, /* the key's version (0: it does not exist) */
    ETCD_CREATE,  /* create_revision (0: it does not exist) */
    ETCD_MOD,     /* mod_revision (0: it does not exist) */
    ETCD_VALUE,   /* the value, bytewise (a missing key fails any compare) */
    ETCD_LEASE,   /* the lease id (0: none) */
};
enum etcd_result { ETCD_EQUAL, ETCD_NOT_EQUAL, ETCD_GREATER, ETCD_LESS };

struct etcd_cmp {
    const void *key;
    size_t klen;
    enum etcd_target target;
    enum etcd_result result;
    int64_t number;    /* for VERSION, CREATE, MOD, LEASE */
    const void *value; /* for VALUE */
    size_t vlen;
};

enum etcd_op_type {
    ETCD_OP_PUT,    /* key = value (with lease) */
    ETCD_OP_DELETE, /* key, or every key with the prefix */
    ETCD_OP_RANGE,  /* read key or prefix: each key goes to txn->on_kv */
};
struct etcd_op {
    enum etcd_op_type type;
    const void *key;
    size_t klen;
    const void *value; /* PUT */
    size_t vlen;
    int64_t lease; /* PUT; 0: none */
    int prefix;    /* DELETE, RANGE: key is a prefix */
};

/* A key read by the RANGE op number op (index into the branch taken). */
typedef int (*etcd_txn_kv_fn)(void *ctx, unsigned op, const struct etcd_kv *kv);

struct etcd_txn {
    const struct etcd_cmp *cmp; /* all must hold (none: always true) */
    unsigned ncmp;
    const struct etcd_op *success; /* done if they hold */
    unsigned nsuccess;
    const struct etcd_op *failure; /* done if not */
    unsigned nfailure;
    etcd_txn_kv_fn on_kv; /* may be NULL: RANGE results are dropped */
    void *ctx;
    /* Out: */
    int succeeded;    /* 1: the compares held, success ops were done */
    int64_t revision; /* the store revision after the txn */
};

/* 0 whether or not the compares held (see t->succeeded); -errno when the txn
 * could not be done (e.g. -EINVAL: a key put twice in one branch; -ENOENT: a
 * put with an unknown lease). A stop (1) from on_kv still returns 0: the txn
 * was done. */
int etcd_txn(struct etcd *e, struct etcd_txn *t, char *err, size_t errlen);

/* A string key or value as (pointer, length). */
#define ETCD_S(s) (s), strlen(s)
/* Designated initializers of struct etcd_txn from arrays:
 * {ETCD_WHEN(cmps), ETCD_THEN(ops), ETCD_ELSE(ops), .on_kv = f, .ctx = c}. */
#define ETCD_COUNT(a) ((unsigned)(sizeof(a) / sizeof((a)[0])))
#define ETCD_WHEN(a) .cmp = (a), .ncmp = ETCD_COUNT(a)
#define ETCD_THEN(a) .success = (a), .nsuccess = ETCD_COUNT(a)
#define ETCD_ELSE(a) .failure = (a), .nfailure = ETCD_COUNT(a)

static inline struct etcd_cmp etcd_cmp_num(const void *key, size_t klen, enum etcd_target t,
                                           enum etcd_result r, int64_t n)
{
    struct etcd_cmp c = {key, klen, t, r, n, NULL, 0};
    return c;
}
static inline struct etcd_cmp etcd_cmp_version(const void *key, size_t klen, enum etcd_result r,
                                               int64_t version)
{
    return etcd_cmp_num(key, klen, ETCD_VERSION, r, version);
}
/* "key does not exist" is etcd_cmp_create(key, ETCD_EQUAL, 0). */
static inline struct etcd_cmp etcd_cmp_create(const void *key, size_t klen, enum etcd_result r,
                                              int64_t revision)
{
    return etcd_cmp_num(key, klen, ETCD_CREATE, r, revision);
}
static inline struct etcd_cmp etcd_cmp_mod(const void *key, size_t klen, enum etcd_result r,
                                           int64_t revision)
{
    return etcd_cmp_num(key, klen, ETCD_MOD, r, revision);
}
static inline struct etcd_cmp etcd_cmp_lease(const void *key, size_t klen, enum etcd_result r,
                                             int64_t lease)
{
    return etcd_cmp_num(key, klen, ETCD_LEASE, r, lease);
}
static inline struct etcd_cmp etcd_cmp_value(const void *key, size_t klen, enum etcd_result r,
                                             const void *value, size_t vlen)
{
    struct etcd_cmp c = {key, klen, ETCD_VALUE, r, 0, value, vlen};
    return c;
}
static inline struct etcd_op etcd_op_put(const void *key, size_t klen, const void *value,
                                         size_t vlen, int64_t lease)
{
    struct etcd_op o = {ETCD_OP_PUT, key, klen, value, vlen, lease, 0};
    return o;
}
static inline struct etcd_op etcd_op_delete(const void *key, size_t klen, int prefix)
{
    struct etcd_op o = {ETCD_OP_DELETE, key, klen, NULL, 0, 0, prefix};
    return o;
}
static inline struct etcd_op etcd_op_range(const void *key, size_t klen, int prefix)
{
    struct etcd_op o = {ETCD_OP_RANGE, key, klen, NULL, 0, 0, prefix};
    return o;
}

/* ---- Leases. A key put with a lease is deleted when the lease expires or
 * is revoked. */

/* A lease of ttl_s seconds (etcd may round it up to its minimum); *id gets
 * its id. */
int etcd_lease_grant(struct etcd *e, int64_t ttl_s, int64_t *id, char *err, size_t errlen);
/* Renew lease id to its full TTL; *ttl_s (may be NULL) gets the TTL it now
 * has. -ENOENT when the lease expired or was revoked (its keys are gone). One
 * request per call: the caller's thread decides how often (etcd's clients
 * renew every TTL/3). */
int etcd_lease_keepalive(struct etcd *e, int64_t id, int64_t *ttl_s, char *err, size_t errlen);
/* End lease id now, deleting its keys. -ENOENT if it did not exist (any
 * more). */
int etcd_lease_revoke(struct etcd *e, int64_t id, char *err, size_t errlen);

/* ---- Watch. etcd_watch blocks on the calling thread, delivering events to
 * fn in revision order, until fn returns non-zero, *cancel becomes non-zero
 * (checked at least once a second and after every message), or the stream
 * ends. Run it on a thread of its own. */
enum etcd_event_type { ETCD_EVENT_PUT, ETCD_EVENT_DELETE };
struct etcd_event {
    enum etcd_event_type type;
    struct etcd_kv kv; /* DELETE: key and mod_revision (the deletion's) only */
};
/* Return 0 to go on, 1 to stop (etcd_watch returns 0), -errno to stop with it. */
typedef int (*etcd_event_fn)(void *ctx, const struct etcd_event *ev);

struct etcd_watch_req {
    const void *key; /* key, or prefix when prefix != 0 (klen 0: every key) */
    size_t klen;
    int prefix;
    int64_t start_revision; /* first revision to report (0: from now) */
    const atomic_int *cancel; /* may be NULL */
};

/* Returns 0 when fn or *cancel stopped it; -ERANGE when start_revision was
 * compacted (err says the compact revision; read the state again with
 * etcd_get_prefix and watch from its revision + 1); -EHOSTUNREACH when no
 * endpoint could be connected, -ETIMEDOUT when the one connected sent no
 * answer, within timeout_ms; -EPIPE when etcd ended the stream or the
 * connection broke (etcd stopped): watch again from the last mod_revision
 * seen + 1, which loses and repeats nothing. Once answered, the stream is
 * not time-bounded: a watch with no events can last for ever, and it does
 * not notice a network that silently drops packets (TCP keep-alive is on,
 * but takes minutes); a caller that must know sooner watches a key it
 * updates itself (or its lease keep-alive fails first). */
int etcd_watch(struct etcd *e, const struct etcd_watch_req *req, etcd_event_fn fn, void *ctx,
               char *err, size_t errlen);

#endif
