/* test_shard_remote.c -- unit tests for backend/shard_remote.c.
 *
 * Two servers play the other side:
 *  - a fake node inside this test: a thread with a listening socket on
 *    127.0.0.1:0 and one thread per connection, speaking just enough
 *    HTTP/1.1 (request line, headers, Content-Length bodies, keep-alive). It
 *    checks every signature with wire_verify() (signed for its own URL, the
 *    body's digest as declared), counts nonces of answered requests seen
 *    again, serves two in-memory sorted
 *    maps with the wire.h semantics (get/scan/apply/sync/stat, 409 with
 *    X-Shardfs-Errno, 307 for shards it does not own or older epochs), and
 *    can be told to misbehave: delay or never answer, 503 N times, close the
 *    connection without a reply (before or after applying), redirect
 *    anywhere (itself: a loop; a bad Location), cut scans after N records
 *    with a "lazy" X-Shardfs-More, ignore the asked length of a get. It
 *    counts accepts, requests per op and bad signatures;
 *  - the real thing: node_server_start() of two nodes, each serving a real
 *    shard_lmdb in a temp directory.
 * The same conformance checks run against both: binary round trips of
 * get/scan/apply/sync/stat, offsets and vlen, -ENOENT, 409 -> -EEXIST and
 * -EAGAIN (atomically), -EINVAL for bad keys and batches, 16 MiB values,
 * scan pagination over 600 keys, bounds, early stop, callback errors, a
 * page boundary right after a 511-byte key (the successor is not key+"\0"),
 * scan records larger than WIRE_SCAN_REPLY_MAX, a client whose config has
 * the owners swapped (followed 307, remote_owner_url updated), a client with
 * an older epoch (307 to the same node; the newer epoch is adopted), a wrong
 * secret (-EACCES), remote_ping, and 8 threads doing gets and applies.
 * Against the fake only (faults need a server that obeys): a server that
 * never answers gives -ETIMEDOUT within timeout_ms (300) + 500 ms; a closed
 * port -EHOSTUNREACH at once for apply and within the timeout for get; get
 * retried after two 503s and after a dropped connection; a 503 that never
 * ends gives -EIO within the bound; apply never retried (503, a lost
 * reply on a fresh and on a reused keep-alive connection, where curl would
 * resend by itself); redirect loops and bad Locations are -EIO; an
 * oversized get reply is -EIO and the handle stays usable; a 20 MiB value
 * read in WIRE_GET_MAX pieces; every 511-byte successor case with one record
 * per page; 200 sequential gets over one TCP connection; no request carries
 * "Expect: 100-continue" or a bad signature, and no answered request's
 * nonce comes again (every attempt, and every redirect, is signed anew).
 * Exits non-zero on any failed check.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "config.h"
#include "endian.h"
#include "node_server.h"
#include "placement.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "shard_remote.h"
#include "wire.h"
#include "check.h"
#include "get_many_check.h"
#include "scan_join_check.h"
#include "test_util.h"

#define SECRET "0123456789abcdef"
#define TIMEOUT_MS 300
#define EPOCH 2

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void fill_value(uint8_t *v, size_t len, unsigned seed)
{
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < len; i++) {
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        v[i] = (uint8_t)z;
    }
}

/* ---- an in-memory sorted map (the fake's shard) ---- */

struct kv {
    uint8_t *k, *v;
    size_t kl, vl;
};

struct kvmap {
    struct kv *e;
    size_t n, cap;
};

static int key_cmp(const uint8_t *a, size_t al, const uint8_t *b, size_t bl)
{
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c)
        return c;
    return al < bl ? -1 : al > bl;
}

/* Index of the first entry >= key. */
static size_t kv_lower(const struct kvmap *m, const uint8_t *k, size_t kl)
{
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (key_cmp(m->e[mid].k, m->e[mid].kl, k, kl) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static struct kv *kv_find(const struct kvmap *m, const uint8_t *k, size_t kl)
{
    size_t i = kv_lower(m, k, kl);
    if (i < m->n && key_cmp(m->e[i].k, m->e[i].kl, k, kl) == 0)
        return &m->e[i];
    return NULL;
}

/* Set key to v (taken over); the old value, if any, goes to *old (its key
 * stays in the map: old->k is NULL). Returns 1 if the key was there. */
static int kv_set(struct kvmap *m, const uint8_t *k, size_t kl, uint8_t *v, size_t vl,
                  struct kv *old)
{
    size_t i = kv_lower(m, k, kl);
    memset(old, 0, sizeof(*old));
    if (i < m->n && key_cmp(m->e[i].k, m->e[i].kl, k, kl) == 0) {
        *old = m->e[i];
        m->e[i].v = v;
        m->e[i].vl = vl;
        old->k = NULL;
        return 1;
    }
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 64;
        m->e = xrealloc(m->e, m->cap * sizeof(*m->e));
    }
    memmove(m->e + i + 1, m->e + i, (m->n - i) * sizeof(*m->e));
    m->e[i] = (struct kv){.k = xmemdup(k, kl), .kl = kl, .v = v, .vl = vl};
    m->n++;
    return 0;
}

/* Remove entry i; its key and value go to *old. */
static void kv_remove(struct kvmap *m, size_t i, struct kv *old)
{
    *old = m->e[i];
    memmove(m->e + i, m->e + i + 1, (m->n - i - 1) * sizeof(*m->e));
    m->n--;
}

static void kv_clear(struct kvmap *m)
{
    for (size_t i = 0; i < m->n; i++) {
        free(m->e[i].k);
        free(m->e[i].v);
    }
    free(m->e);
    memset(m, 0, sizeof(*m));
}

/* An undo record: the key and what it held before (had = 0: absent). */
struct undo {
    uint8_t *k, *v;
    size_t kl, vl;
    int had;
};

struct undo_log {
    struct undo *u;
    size_t n, cap;
};

static void undo_push(struct undo_log *l, const uint8_t *k, size_t kl, int had, uint8_t *v,
                      size_t vl)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->u = xrealloc(l->u, l->cap * sizeof(*l->u));
    }
    l->u[l->n++] = (struct undo){.k = xmemdup(k, kl), .kl = kl, .had = had, .v = v, .vl = vl};
}

/* A batch applied to m in order; a failed precondition undoes all of it. */
static int kv_apply(struct kvmap *m, const uint8_t *buf, size_t len)
{
    struct undo_log log = {0};
    struct batch_item it;
    size_t pos = 0;
    int rc = 0, n;

    while (rc == 0 && (n = batch_next(buf, len, &pos, &it)) == 1) {
        struct kv old, *e;
        switch (it.op) {
        case BATCH_PUT: {
            int had = kv_set(m, it.key, it.klen, xmemdup(it.val, it.vlen), it.vlen, &old);
            undo_push(&log, it.key, it.klen, had, old.v, old.vl);
            break;
        }
        case BATCH_DEL: {
            size_t i = kv_lower(m, it.key, it.klen);
            if (i < m->n && key_cmp(m->e[i].k, m->e[i].kl, it.key, it.klen) == 0) {
                kv_remove(m, i, &old);
                undo_push(&log, old.k, old.kl, 1, old.v, old.vl);
                free(old.k);
            }
            break;
        }
        case BATCH_DEL_RANGE: {
            size_t i = kv_lower(m, it.key, it.klen);
            while (i < m->n && key_cmp(m->e[i].k, m->e[i].kl, it.val, it.vlen) < 0) {
                kv_remove(m, i, &old);
                undo_push(&log, old.k, old.kl, 1, old.v, old.vl);
                free(old.k);
            }
            break;
        }
        case BATCH_ASSERT_ABSENT:
            if (kv_find(m, it.key, it.klen))
                rc = -EEXIST;
            break;
        case BATCH_ASSERT_VALUE:
            e = kv_find(m, it.key, it.klen);
            if (!e || e->vl != it.vlen || (it.vlen && memcmp(e->v, it.val, it.vlen) != 0))
                rc = -EAGAIN;
            break;
        default:
            rc = -EINVAL;
        }
    }
    if (rc == 0 && n < 0)
        rc = -EINVAL;
    /* Undo in reverse on failure; drop the saved values on success. */
    for (size_t j = log.n; j-- > 0;) {
        struct undo *u = &log.u[j];
        if (rc) {
            struct kv old;
            if (u->had) {
                kv_set(m, u->k, u->kl, u->v, u->vl, &old);
                u->v = NULL;
            } else {
                size_t i = kv_lower(m, u->k, u->kl);
                kv_remove(m, i, &old);
                free(old.k);
            }
            free(old.v);
        }
        free(u->v);
        free(u->k);
    }
    free(log.u);
    return rc;
}

/* ---- the fake node ---- */

#define FAKE_MAX_CONNS 64
#define FAKE_NONCES (1u << 18) /* more than the requests of all fake tests */

struct fake {
    int lfd;
    unsigned port;
    char url[64];
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* protected by lock: */
    struct kvmap map[2];
    uint64_t pending; /* applies since the last sync */
    unsigned owned;   /* bit i set: shard i is ours, else 307 to other_url */
    char other_url[64];
    uint64_t epoch; /* requests with an older epoch get 307 */
    char secret[64];
    unsigned accepts, requests, ops[WIRE_OP_GETV + 1], auth_failures, expect_seen, bad_requests;
    unsigned nonce_repeats; /* requests whose nonce an earlier one carried */
    uint8_t (*nonces)[WIRE_NONCE_BYTES]; /* FAKE_NONCES slots, all zero = free */
    uint64_t last_epoch;  /* X-Shardfs-Epoch of the last request */
    int delay_ms;         /* before each shard reply; -1: never reply */
    int fail503;          /* this many shard requests get 503 */
    int drop;             /* this many shard requests: close without reply */
    int drop_after_apply; /* this many applies: apply, then close */
    int ignore_len;       /* get sends the whole value from off */
    int lazy_more;        /* a full page says "more" even if nothing follows */
    int ignore_end;       /* a scan sends records past its end key too */
    unsigned scan_page;   /* records per scan reply at most; 0: limit only */
    char redirect_to[64]; /* set: every shard request gets 307 there */
    int bad_location;     /* ... with a Location that is not ours + path */
    int stop;
    unsigned active;
    int fds[FAKE_MAX_CONNS];
};

struct http_req {
    char method[16];
    char target[WIRE_PATH_MAX + 256];
    char epoch[32], date[32], auth[128], nonce[64], digest[128];
    int has_epoch, has_date, has_auth;
    const uint8_t *body;
    size_t body_len;
};

struct http_reply {
    int status;
    uint8_t *body;
    size_t len;
    char hdrs[1024]; /* extra header lines, each ending in \r\n */
};

enum fake_action { ACT_REPLY, ACT_DROP, ACT_HANG };

static void reply_hdr(struct http_reply *rp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void reply_hdr(struct http_reply *rp, const char *fmt, ...)
{
    size_t used = strlen(rp->hdrs);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rp->hdrs + used, sizeof(rp->hdrs) - used, fmt, ap);
    va_end(ap);
}

static void reply_err(struct http_reply *rp, int err)
{
    const char *name = wire_errno_name(err);
    rp->status = wire_status_of_errno(err);
    if (name)
        reply_hdr(rp, "%s: %s\r\n", WIRE_HDR_ERRNO, name);
}

/* "off=1&len=2": the value of name, as a number; -1 absent or bad. */
static int64_t query_num(const char *query, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = query; p && *p; p = strchr(p, '&'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, nl) == 0 && p[nl] == '=') {
            char *end;
            long long v = strtoll(p + nl + 1, &end, 10);
            if (end == p + nl + 1 || (*end && *end != '&') || v < 0)
                return -1;
            return v;
        }
    }
    return -1;
}

static void fake_get(struct fake *f, unsigned shard, const char *query, const struct http_req *rq,
                     struct http_reply *rp)
{
    int64_t off = query_num(query, "off"), len = query_num(query, "len");
    struct kv *e;

    if (off < 0 || len < 0 || rq->body_len == 0 || rq->body_len > BATCH_KEY_MAX)
        return reply_err(rp, -EINVAL);
    if (len > WIRE_GET_MAX)
        len = WIRE_GET_MAX;
    pthread_mutex_lock(&f->lock);
    e = kv_find(&f->map[shard], rq->body, rq->body_len);
    if (e) {
        size_t from = (size_t)off < e->vl ? (size_t)off : e->vl;
        size_t n = e->vl - from;
        if (!f->ignore_len && n > (size_t)len)
            n = (size_t)len;
        rp->status = 200;
        rp->body = xmemdup(e->v + from, n);
        rp->len = n;
        reply_hdr(rp, "%s: %zu\r\n", WIRE_HDR_VLEN, e->vl);
    }
    pthread_mutex_unlock(&f->lock);
    if (!e)
        reply_err(rp, -ENOENT);
}

/* getv, by the wire.h text: every read under the lock (one moment). */
static void fake_getv(struct fake *f, unsigned shard, const struct http_req *rq,
                      struct http_reply *rp)
{
    struct shard_read rd[SHARD_READS_MAX];
    uint8_t vals[SHARD_READS_MAX][4096];
    unsigned n = 0;

    if (wire_getv_request_decode(rq->body, rq->body_len, rd, &n) != 0)
        return reply_err(rp, -EINVAL);
    pthread_mutex_lock(&f->lock);
    for (unsigned i = 0; i < n; i++) {
        uint8_t key[BATCH_KEY_MAX];
        size_t kl;
        struct kv *e;

        rd[i].buf = vals[i];
        if (rd[i].buflen > sizeof(vals[i]))
            rd[i].buflen = sizeof(vals[i]); /* the fake's limit; tests stay under it */
        rd[i].rc = shard_read_key(rd, i, key, &kl);
        if (rd[i].rc)
            continue;
        e = kv_find(&f->map[shard], key, kl);
        if (!e) {
            rd[i].rc = -ENOENT;
            continue;
        }
        rd[i].vlen = e->vl;
        rd[i].len = e->vl < rd[i].buflen ? e->vl : rd[i].buflen;
        memcpy(vals[i], e->v, rd[i].len);
    }
    pthread_mutex_unlock(&f->lock);
    rp->len = wire_getv_reply_size(rd, n);
    rp->body = malloc(rp->len ? rp->len : 1);
    wire_getv_reply_encode(rp->body, rd, n);
    rp->status = 200;
}

static void fake_scan(struct fake *f, unsigned shard, const char *query, const struct http_req *rq,
                      struct http_reply *rp)
{
    int64_t limit = query_num(query, "limit");
    const uint8_t *start, *end;
    size_t slen, elen, cap = 0, count = 0;
    int more = 0;

    if (limit <= 0 || wire_scan_request_decode(rq->body, rq->body_len, &start, &slen, &end, &elen))
        return reply_err(rp, -EINVAL);
    /* The client must never need a start key longer than a key. */
    if (slen > BATCH_KEY_MAX) {
        pthread_mutex_lock(&f->lock);
        f->bad_requests++;
        pthread_mutex_unlock(&f->lock);
        return reply_err(rp, -ENAMETOOLONG);
    }
    if (limit > WIRE_SCAN_LIMIT_MAX)
        limit = WIRE_SCAN_LIMIT_MAX;
    pthread_mutex_lock(&f->lock);
    if (f->scan_page && (uint64_t)limit > f->scan_page)
        limit = f->scan_page;
    struct kvmap *m = &f->map[shard];
    size_t i = kv_lower(m, start, slen);
    for (; i < m->n; i++) {
        struct kv *e = &m->e[i];
        if (end && !f->ignore_end && key_cmp(e->k, e->kl, end, elen) >= 0)
            break;
        size_t rec = wire_scan_record_size(e->kl, e->vl);
        if ((int64_t)count == limit || (count && rp->len + rec > WIRE_SCAN_REPLY_MAX)) {
            more = 1;
            break;
        }
        if (rp->len + rec > cap) {
            cap = (rp->len + rec) * 2;
            rp->body = xrealloc(rp->body, cap);
        }
        wire_scan_record_encode(rp->body + rp->len, e->k, e->kl, e->v, e->vl);
        rp->len += rec;
        count++;
    }
    if (f->lazy_more && (int64_t)count == limit)
        more = 1;
    pthread_mutex_unlock(&f->lock);
    rp->status = 200;
    if (more)
        reply_hdr(rp, "%s: 1\r\n", WIRE_HDR_MORE);
}

/* Count a nonce we saw before. */
static void fake_nonce_seen(struct fake *f, const char *hex)
{
    uint8_t n[WIRE_NONCE_BYTES];
    uint32_t i;

    if (!wire_hex_decode(hex, WIRE_NONCE_LEN, n))
        return;
    memcpy(&i, n, sizeof(i));
    pthread_mutex_lock(&f->lock);
    for (i &= FAKE_NONCES - 1;; i = (i + 1) & (FAKE_NONCES - 1)) {
        static const uint8_t zero[WIRE_NONCE_BYTES];

        if (memcmp(f->nonces[i], n, sizeof(n)) == 0) {
            f->nonce_repeats++;
            break;
        }
        if (memcmp(f->nonces[i], zero, sizeof(zero)) == 0) {
            memcpy(f->nonces[i], n, sizeof(n));
            break;
        }
    }
    pthread_mutex_unlock(&f->lock);
}

/* Decide what to do with one request; fills rp for ACT_REPLY. */
static enum fake_action fake_handle(struct fake *f, const struct http_req *rq,
                                    struct http_reply *rp)
{
    char path[WIRE_PATH_MAX + 256];
    const char *query = "";
    unsigned shard;
    enum wire_op op;
    int64_t date = rq->has_date ? strtoll(rq->date, NULL, 10) : 0;
    uint64_t epoch = rq->has_epoch ? strtoull(rq->epoch, NULL, 10) : 0;
    int delay, fail503 = 0, drop = 0, drop_after = 0;
    char secret[64], redirect_to[64], other[64];
    int bad_location;
    uint64_t my_epoch;
    unsigned owned;

    pthread_mutex_lock(&f->lock);
    f->requests++;
    f->last_epoch = epoch;
    snprintf(secret, sizeof(secret), "%s", f->secret);
    pthread_mutex_unlock(&f->lock);

    rp->status = 500;
    /* Signed for us, over the body that came. */
    char digest[WIRE_DIGEST_LEN + 1];
    struct wire_signed ws = {.method = rq->method,
                             .node_url = f->url,
                             .path_query = rq->target,
                             .epoch = rq->has_epoch ? rq->epoch : "",
                             .date = date,
                             .nonce = rq->nonce,
                             .digest = rq->digest,
                             .body_len = rq->body_len};
    wire_body_mac(secret, rq->nonce, rq->body, rq->body_len, digest);
    if (!rq->has_date || !rq->has_auth || wire_verify(secret, &ws, (int64_t)time(NULL), rq->auth) ||
        strcmp(digest, rq->digest) != 0) {
        pthread_mutex_lock(&f->lock);
        f->auth_failures++;
        pthread_mutex_unlock(&f->lock);
        reply_err(rp, -EACCES);
        return ACT_REPLY;
    }
    snprintf(path, sizeof(path), "%s", rq->target);
    char *qm = strchr(path, '?');
    if (qm) {
        *qm = '\0';
        query = rq->target + (qm - path) + 1;
    }
    if (strcmp(path, "/v1/config") == 0) {
        static const char doc[] = "{\"epoch\":2,\"shards\":[]}";
        rp->status = strcmp(rq->method, "GET") == 0 ? 200 : 405;
        rp->body = xmemdup(doc, sizeof(doc) - 1);
        rp->len = sizeof(doc) - 1;
        return ACT_REPLY;
    }
    if (wire_parse_shard_path(path, &shard, &op) != 0 || shard >= 2) {
        reply_err(rp, -ENOENT);
        return ACT_REPLY;
    }

    pthread_mutex_lock(&f->lock);
    f->ops[op]++;
    if (!rq->has_epoch)
        f->bad_requests++;
    if (f->drop > 0) {
        f->drop--;
        drop = 1;
    }
    if (f->fail503 > 0) {
        f->fail503--;
        fail503 = 1;
    }
    if (op == WIRE_OP_APPLY && f->drop_after_apply > 0) {
        f->drop_after_apply--;
        drop_after = 1;
    }
    delay = f->delay_ms;
    snprintf(redirect_to, sizeof(redirect_to), "%s", f->redirect_to);
    snprintf(other, sizeof(other), "%s", f->other_url);
    bad_location = f->bad_location;
    my_epoch = f->epoch;
    owned = f->owned;
    pthread_mutex_unlock(&f->lock);

    if (drop)
        return ACT_DROP;
    if (delay < 0)
        return ACT_HANG;
    if (delay > 0)
        sleep_ms((unsigned)delay);
    if (fail503) {
        rp->status = 503;
        return ACT_REPLY;
    }
    if (redirect_to[0] || epoch < my_epoch || !(owned & (1u << shard))) {
        const char *to = redirect_to[0] ? redirect_to : (owned & (1u << shard)) ? f->url : other;
        rp->status = 307;
        reply_hdr(rp, "Location: %s%s\r\n%s: %" PRIu64 "\r\n", to,
                  bad_location ? "/v1/shard/9/get" : rq->target, WIRE_HDR_EPOCH, my_epoch);
        return ACT_REPLY;
    }
    if (strcmp(rq->method, op == WIRE_OP_STAT ? "GET" : "POST") != 0) {
        rp->status = 405;
        return ACT_REPLY;
    }
    switch (op) {
    case WIRE_OP_GET:
        fake_get(f, shard, query, rq, rp);
        break;
    case WIRE_OP_GETV:
        fake_getv(f, shard, rq, rp);
        break;
    case WIRE_OP_SCAN:
        fake_scan(f, shard, query, rq, rp);
        break;
    case WIRE_OP_APPLY: {
        int rc = batch_validate(rq->body, rq->body_len);
        if (rc >= 0) {
            pthread_mutex_lock(&f->lock);
            rc = kv_apply(&f->map[shard], rq->body, rq->body_len);
            if (rc == 0)
                f->pending++;
            pthread_mutex_unlock(&f->lock);
        }
        if (rc < 0)
            reply_err(rp, rc);
        else
            rp->status = 204;
        if (drop_after)
            return ACT_DROP;
        break;
    }
    case WIRE_OP_SYNC:
        if (rq->body_len) {
            reply_err(rp, -EINVAL);
            break;
        }
        pthread_mutex_lock(&f->lock);
        f->pending = 0;
        pthread_mutex_unlock(&f->lock);
        rp->status = 204;
        break;
    case WIRE_OP_STAT: {
        char doc[128];
        uint64_t bytes = 0;
        pthread_mutex_lock(&f->lock);
        for (size_t i = 0; i < f->map[shard].n; i++)
            bytes += f->map[shard].e[i].kl + f->map[shard].e[i].vl;
        int n = snprintf(doc, sizeof(doc),
                         "{\"records\": %zu, \"bytes\": %" PRIu64 ", \"pending\": %" PRIu64 "}",
                         f->map[shard].n, bytes, f->pending);
        pthread_mutex_unlock(&f->lock);
        rp->status = 200;
        rp->body = xmemdup(doc, (size_t)n);
        rp->len = (size_t)n;
        break;
    }
    case WIRE_OP_STREAM:
    case WIRE_OP_POSITION:
    case WIRE_OP_PUSH:
        rp->status = 404; /* replication: not this fake's business */
        break;
    }
    return ACT_REPLY;
}

static int send_all(int fd, const void *p, size_t len, int more)
{
    const uint8_t *b = p;
    while (len) {
        ssize_t n = send(fd, b, len, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        b += n;
        len -= (size_t)n;
    }
    return 0;
}

static const char *status_text(int st)
{
    switch (st) {
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 307:
        return "Temporary Redirect";
    case 404:
        return "Not Found";
    case 409:
        return "Conflict";
    case 503:
        return "Service Unavailable";
    default:
        return "Whatever";
    }
}

/* Parse the head in buf[0..hlen) into rq; 0, or -1 when malformed. */
static int parse_head(struct fake *f, char *head, struct http_req *rq, size_t *clen)
{
    char *save = NULL, *line = strtok_r(head, "\r\n", &save);
    int chunked = 0;

    memset(rq, 0, sizeof(*rq));
    *clen = 0;
    if (!line || sscanf(line, "%15s %767s HTTP/1.1", rq->method, rq->target) != 2)
        return -1;
    while ((line = strtok_r(NULL, "\r\n", &save))) {
        char *colon = strchr(line, ':');
        if (!colon)
            return -1;
        *colon = '\0';
        char *v = colon + 1;
        while (*v == ' ')
            v++;
#define IS(name) (strcasecmp(line, name) == 0)
        if (IS("Content-Length"))
            *clen = strtoull(v, NULL, 10);
        else if (IS("Transfer-Encoding"))
            chunked = 1;
        else if (IS(WIRE_HDR_EPOCH))
            rq->has_epoch = snprintf(rq->epoch, sizeof(rq->epoch), "%s", v) > 0;
        else if (IS(WIRE_HDR_DATE))
            rq->has_date = snprintf(rq->date, sizeof(rq->date), "%s", v) > 0;
        else if (IS(WIRE_HDR_AUTH))
            rq->has_auth = snprintf(rq->auth, sizeof(rq->auth), "%s", v) > 0;
        else if (IS(WIRE_HDR_NONCE))
            snprintf(rq->nonce, sizeof(rq->nonce), "%s", v);
        else if (IS(WIRE_HDR_DIGEST))
            snprintf(rq->digest, sizeof(rq->digest), "%s", v);
        else if (IS("Expect") && *v) {
            pthread_mutex_lock(&f->lock);
            f->expect_seen++;
            pthread_mutex_unlock(&f->lock);
        }
#undef IS
    }
    return chunked ? -1 : 0;
}

struct conn_arg {
    struct fake *f;
    int fd;
};

static void *fake_conn(void *p)
{
    struct conn_arg *a = p;
    struct fake *f = a->f;
    int fd = a->fd;
    size_t len = 0, cap = 131072;
    uint8_t *buf = xmalloc(cap);

    free(a);
    for (;;) {
        uint8_t *eoh;
        /* Read up to the end of the head. */
        while (!(eoh = len >= 4 ? memmem(buf, len, "\r\n\r\n", 4) : NULL)) {
            if (cap - len < 65536) {
                cap *= 2;
                buf = xrealloc(buf, cap);
            }
            if (len > 65536)
                goto out;
            ssize_t n = recv(fd, buf + len, cap - len, 0);
            if (n <= 0)
                goto out;
            len += (size_t)n;
        }
        size_t hlen = (size_t)(eoh - buf) + 4, clen;
        char head[65536 + 8];
        struct http_req rq;
        memcpy(head, buf, hlen - 2);
        head[hlen - 2] = '\0';
        if (parse_head(f, head, &rq, &clen) != 0 || clen > WIRE_BODY_MAX) {
            pthread_mutex_lock(&f->lock);
            f->bad_requests++;
            pthread_mutex_unlock(&f->lock);
            goto out;
        }
        while (len < hlen + clen) {
            if (cap < hlen + clen) {
                cap = hlen + clen;
                buf = xrealloc(buf, cap);
            }
            ssize_t n = recv(fd, buf + len, cap - len, 0);
            if (n <= 0)
                goto out;
            len += (size_t)n;
        }
        rq.body = buf + hlen;
        rq.body_len = clen;

        struct http_reply rp = {0};
        enum fake_action act = fake_handle(f, &rq, &rp);
        /* A request answered must never come again; one dropped unanswered
         * may (curl resends it by itself on a reused connection, as a node
         * that never read it would want). */
        if (act == ACT_REPLY)
            fake_nonce_seen(f, rq.nonce);
        if (act == ACT_DROP) {
            free(rp.body);
            goto out;
        }
        if (act == ACT_HANG) {
            /* Say nothing until the client gives up (or we stop). */
            for (;;) {
                struct pollfd pfd = {.fd = fd, .events = POLLIN};
                int stop;
                pthread_mutex_lock(&f->lock);
                stop = f->stop;
                pthread_mutex_unlock(&f->lock);
                if (stop || poll(&pfd, 1, 20) != 0)
                    goto out;
            }
        }
        char head_out[2048];
        int n = snprintf(head_out, sizeof(head_out), "HTTP/1.1 %d %s\r\n%s", rp.status,
                         status_text(rp.status), rp.hdrs);
        if (rp.status != 204)
            n += snprintf(head_out + n, sizeof(head_out) - (size_t)n, "Content-Length: %zu\r\n",
                          rp.len);
        n += snprintf(head_out + n, sizeof(head_out) - (size_t)n, "\r\n");
        int bad = send_all(fd, head_out, (size_t)n, rp.len > 0) ||
                  (rp.len && send_all(fd, rp.body, rp.len, 0));
        free(rp.body);
        if (bad)
            goto out;
        memmove(buf, buf + hlen + clen, len - hlen - clen);
        len -= hlen + clen;
    }
out:
    free(buf);
    pthread_mutex_lock(&f->lock);
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        if (f->fds[i] == fd)
            f->fds[i] = -1;
    close(fd);
    f->active--;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

static void *fake_accept(void *p)
{
    struct fake *f = p;
    for (;;) {
        struct pollfd pfd = {.fd = f->lfd, .events = POLLIN};
        int stop;
        pthread_mutex_lock(&f->lock);
        stop = f->stop;
        pthread_mutex_unlock(&f->lock);
        if (stop)
            break;
        if (poll(&pfd, 1, 20) <= 0)
            continue;
        int fd = accept(f->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&f->lock);
        int slot = -1;
        for (int i = 0; i < FAKE_MAX_CONNS && slot < 0; i++)
            if (f->fds[i] < 0)
                slot = i;
        if (slot < 0) {
            pthread_mutex_unlock(&f->lock);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        f->fds[slot] = fd;
        f->accepts++;
        f->active++;
        pthread_mutex_unlock(&f->lock);
        struct conn_arg *a = xmalloc(sizeof(*a));
        a->f = f;
        a->fd = fd;
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, fake_conn, a) != 0) {
            perror("pthread_create");
            exit(2);
        }
        pthread_attr_destroy(&attr);
    }
    return NULL;
}

static int listen_any(unsigned *port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        perror("listen");
        exit(2);
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

/* A port nobody listens on (bound, then closed). */
static unsigned free_port(void)
{
    unsigned port;
    close(listen_any(&port));
    return port;
}

static void fake_start(struct fake *f, unsigned owned)
{
    memset(f, 0, sizeof(*f));
    f->lfd = listen_any(&f->port);
    snprintf(f->url, sizeof(f->url), "http://127.0.0.1:%u", f->port);
    snprintf(f->secret, sizeof(f->secret), "%s", SECRET);
    f->owned = owned;
    f->epoch = EPOCH;
    f->nonces = calloc(FAKE_NONCES, sizeof(*f->nonces));
    if (!f->nonces)
        exit(2);
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        f->fds[i] = -1;
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);
    if (pthread_create(&f->thread, NULL, fake_accept, f) != 0) {
        perror("pthread_create");
        exit(2);
    }
}

static void fake_stop(struct fake *f)
{
    pthread_mutex_lock(&f->lock);
    f->stop = 1;
    pthread_mutex_unlock(&f->lock);
    pthread_join(f->thread, NULL);
    close(f->lfd);
    pthread_mutex_lock(&f->lock);
    for (int i = 0; i < FAKE_MAX_CONNS; i++)
        if (f->fds[i] >= 0)
            shutdown(f->fds[i], SHUT_RDWR);
    while (f->active)
        pthread_cond_wait(&f->cond, &f->lock);
    pthread_mutex_unlock(&f->lock);
    kv_clear(&f->map[0]);
    kv_clear(&f->map[1]);
    free(f->nonces);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
}

/* Reset the misbehaviour knobs. */
static void fake_behave(struct fake *f)
{
    pthread_mutex_lock(&f->lock);
    f->delay_ms = f->fail503 = f->drop = f->drop_after_apply = f->ignore_len = 0;
    f->lazy_more = f->bad_location = f->ignore_end = 0;
    f->scan_page = 0;
    f->redirect_to[0] = '\0';
    pthread_mutex_unlock(&f->lock);
}

#define FAKE_SET(f, field, value)                                                                  \
    do {                                                                                           \
        pthread_mutex_lock(&(f)->lock);                                                            \
        (f)->field = (value);                                                                      \
        pthread_mutex_unlock(&(f)->lock);                                                          \
    } while (0)

static unsigned fake_get_u(struct fake *f, const unsigned *field)
{
    pthread_mutex_lock(&f->lock);
    unsigned v = *field;
    pthread_mutex_unlock(&f->lock);
    return v;
}
#define FAKE_GET(f, field) fake_get_u((f), &(f)->field)

static void fake_put_direct(struct fake *f, unsigned shard, const void *k, size_t kl, const void *v,
                            size_t vl)
{
    struct kv old;
    pthread_mutex_lock(&f->lock);
    kv_set(&f->map[shard], k, kl, xmemdup(v, vl), vl, &old);
    free(old.v);
    pthread_mutex_unlock(&f->lock);
}

/* ---- configs ---- */

static char tmpdir[] = "/tmp/shardfs-test-remote-XXXXXX";

/* Write a two-node config and load it into *cfg. */
static void make_config(struct config *cfg, const char *name, const char *url_a, const char *url_b,
                        int swapped, unsigned epoch, const char *secret)
{
    char path[PATH_MAX], err[512];
    FILE *fp;

    snprintf(path, sizeof(path), "%s/%s.conf", tmpdir, name);
    fp = fopen(path, "w");
    if (!fp) {
        perror(path);
        exit(2);
    }
    fprintf(fp,
            "[cluster]\nshards = 2\nepoch = %u\nsecret = %s\ntimeout_ms = %d\n"
            "[node a]\nurl = %s\ndata_dir = %s/a\nshards = %d\n"
            "[node b]\nurl = %s\ndata_dir = %s/b\nshards = %d\n",
            epoch, secret, TIMEOUT_MS, url_a, tmpdir, swapped ? 1 : 0, url_b, tmpdir,
            swapped ? 0 : 1);
    fclose(fp);
    if (config_load(path, cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "config_load: %s\n", err);
        exit(2);
    }
}

/* A cluster the conformance checks run against. */
struct target {
    const char *name;
    struct config *cfg;     /* epoch EPOCH, a owns 0, b owns 1 */
    struct config *swapped; /* the same, owners swapped */
    struct config *old;     /* epoch EPOCH - 1 */
    struct config *badsecret;
    const char *url_a, *url_b;
    struct fake *fa, *fb; /* NULL for the real servers */
};

struct client {
    struct remote *r;
    struct shard *s[2];
};

static void client_open(struct client *c, const struct config *cfg)
{
    char err[256];
    int rc = remote_new(cfg, -1, &c->r, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "remote_new: %s\n", err);
        exit(2);
    }
    for (unsigned i = 0; i < 2; i++)
        if (shard_remote_open(c->r, i, &c->s[i]) != 0) {
            fprintf(stderr, "shard_remote_open failed\n");
            exit(2);
        }
}

static void client_close(struct client *c)
{
    shard_close(c->s[0]);
    shard_close(c->s[1]);
    remote_free(c->r);
}

/* ---- helpers on shards ---- */

static int put1(struct shard *s, const void *k, size_t kl, const void *v, size_t vl)
{
    struct batch b;
    batch_init(&b);
    batch_put(&b, k, kl, v, vl);
    int rc = shard_apply(s, &b);
    batch_free(&b);
    return rc;
}

static void expect_value(struct shard *s, const void *k, size_t kl, const void *want, size_t wl,
                         const char *file, int line)
{
    uint8_t *buf = xmalloc(wl + 16);
    size_t vlen = (size_t)-1;
    int rc = shard_get(s, k, kl, 0, buf, wl + 16, &vlen);
    check(rc == (int)wl && vlen == wl && (wl == 0 || memcmp(buf, want, wl) == 0), file, line, "get",
          "rc %d (%s) vlen %zu, want %zu bytes", rc, rc < 0 ? strerror(-rc) : "ok", vlen, wl);
    free(buf);
}
#define EXPECT_VALUE(s, k, kl, v, vl) expect_value((s), (k), (kl), (v), (vl), __FILE__, __LINE__)

struct collect {
    unsigned count, stop_at;
    int ret; /* returned at stop_at */
    int out_of_order;
    uint8_t last[BATCH_KEY_MAX];
    size_t last_len;
    uint8_t first[BATCH_KEY_MAX];
    size_t first_len;
    uint8_t keys[64][BATCH_KEY_MAX]; /* the last 64 keys: record i at i % 64 */
    size_t klens[64];
};

static int collect_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct collect *c = ctx;
    if (c->count && key_cmp(k, kl, c->last, c->last_len) <= 0)
        c->out_of_order++;
    memcpy(c->last, k, kl);
    c->last_len = kl;
    if (c->count == 0) {
        memcpy(c->first, k, kl);
        c->first_len = kl;
    }
    memcpy(c->keys[c->count % 64], k, kl);
    c->klens[c->count % 64] = kl;
    (void)v;
    (void)vl;
    c->count++;
    if (c->stop_at && c->count == c->stop_at)
        return c->ret;
    return 0;
}

/* ---- conformance: the same checks against any server ---- */

static void c_roundtrip(struct target *t)
{
    struct client c;
    client_open(&c, t->cfg);
    uint8_t key[] = {0x00, 0xff, 'k', 0x00, 0x0a, 0x0d};
    uint8_t val[1000];
    for (size_t i = 0; i < sizeof(val); i++)
        val[i] = (uint8_t)(i * 7);

    for (unsigned sh = 0; sh < 2; sh++) {
        struct shard *s = c.s[sh];
        uint8_t buf[2000];
        size_t vlen = 0;

        CHECK_RC(put1(s, key, sizeof(key), val, sizeof(val)), 0);
        EXPECT_VALUE(s, key, sizeof(key), val, sizeof(val));
        /* offset and a short buffer */
        CHECK_RC(shard_get(s, key, sizeof(key), 100, buf, 50, &vlen), 50);
        CHECK(vlen == sizeof(val) && memcmp(buf, val + 100, 50) == 0);
        CHECK_RC(shard_get(s, key, sizeof(key), 990, buf, 50, &vlen), 10);
        CHECK(memcmp(buf, val + 990, 10) == 0);
        /* off at and past the end, an empty buffer: 0 bytes, vlen known */
        vlen = 0;
        CHECK_RC(shard_get(s, key, sizeof(key), 1000, buf, 50, &vlen), 0);
        CHECK(vlen == sizeof(val));
        vlen = 0;
        CHECK_RC(shard_get(s, key, sizeof(key), 5000, buf, 50, &vlen), 0);
        CHECK(vlen == sizeof(val));
        vlen = 0;
        CHECK_RC(shard_get(s, key, sizeof(key), 0, NULL, 0, &vlen), 0);
        CHECK(vlen == sizeof(val));
        /* an empty value */
        CHECK_RC(put1(s, "empty", 5, "", 0), 0);
        EXPECT_VALUE(s, "empty", 5, "", 0);
        /* absent keys; the shard the key is not in */
        CHECK_RC(shard_get(s, "absent", 6, 0, buf, sizeof(buf), &vlen), -ENOENT);
        CHECK_RC(shard_get(c.s[1 - sh], "empty", 5, 0, buf, sizeof(buf), &vlen), -ENOENT);
        /* delete */
        struct batch b;
        batch_init(&b);
        batch_del(&b, "empty", 5);
        CHECK_RC(shard_apply(s, &b), 0);
        batch_free(&b);
        CHECK_RC(shard_get(s, "empty", 5, 0, buf, sizeof(buf), &vlen), -ENOENT);
        /* an empty batch is a no-op */
        batch_init(&b);
        CHECK_RC(shard_apply(s, &b), 0);
        batch_free(&b);
    }
    /* every byte value in keys and values */
    uint8_t k2[256], v2[256];
    for (int i = 0; i < 256; i++)
        k2[i] = v2[i] = (uint8_t)(255 - i);
    CHECK_RC(put1(c.s[0], k2, sizeof(k2), v2, sizeof(v2)), 0);
    EXPECT_VALUE(c.s[0], k2, sizeof(k2), v2, sizeof(v2));
    client_close(&c);
}

/* getv: the get_many checks through the wire, on both shards. */
static void c_get_many(struct target *t)
{
    struct client c;

    client_open(&c, t->cfg);
    for (unsigned sh = 0; sh < 2; sh++)
        check_get_many(c.s[sh]);
    client_close(&c);
}

static void c_errors(struct target *t)
{
    struct client c;
    client_open(&c, t->cfg);
    struct shard *s = c.s[0];
    struct batch b;
    uint8_t buf[64], longkey[BATCH_KEY_MAX + 1];
    size_t vlen;

    CHECK_RC(put1(s, "pre", 3, "v1", 2), 0);
    /* ASSERT_ABSENT on a present key: -EEXIST, and the put with it undone */
    batch_init(&b);
    batch_put(&b, "pre-other", 9, "x", 1);
    batch_add(&b, BATCH_ASSERT_ABSENT, "pre", 3, NULL, 0);
    CHECK_RC(shard_apply(s, &b), -EEXIST);
    batch_free(&b);
    CHECK_RC(shard_get(s, "pre-other", 9, 0, buf, sizeof(buf), &vlen), -ENOENT);
    /* ASSERT_VALUE with the wrong value: -EAGAIN; with the right one: ok */
    batch_init(&b);
    batch_add(&b, BATCH_ASSERT_VALUE, "pre", 3, "v2", 2);
    batch_put(&b, "pre", 3, "v3", 2);
    CHECK_RC(shard_apply(s, &b), -EAGAIN);
    batch_free(&b);
    EXPECT_VALUE(s, "pre", 3, "v1", 2);
    batch_init(&b);
    batch_add(&b, BATCH_ASSERT_VALUE, "pre", 3, "v1", 2);
    batch_put(&b, "pre", 3, "v3", 2);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
    EXPECT_VALUE(s, "pre", 3, "v3", 2);
    /* keys the store cannot have; a malformed batch */
    memset(longkey, 'L', sizeof(longkey));
    CHECK_RC(shard_get(s, longkey, sizeof(longkey), 0, buf, sizeof(buf), &vlen), -EINVAL);
    CHECK_RC(shard_get(s, "", 0, 0, buf, sizeof(buf), &vlen), -EINVAL);
    uint8_t junk[] = {9, 1, 0, 0, 0, 'x'};
    b = (struct batch){.buf = junk, .len = sizeof(junk), .cap = sizeof(junk), .count = 1};
    CHECK_RC(shard_apply(s, &b), -EINVAL);
    /* a sticky batch error never leaves the client */
    batch_init(&b);
    CHECK_RC(batch_put(&b, longkey, sizeof(longkey), "x", 1), -ENAMETOOLONG);
    CHECK_RC(shard_apply(s, &b), -ENAMETOOLONG);
    batch_free(&b);
    client_close(&c);

    /* a wrong secret: every request is refused, nothing is done */
    client_open(&c, t->badsecret);
    CHECK_RC(put1(c.s[0], "bad", 3, "x", 1), -EACCES);
    CHECK_RC(shard_get(c.s[0], "pre", 3, 0, buf, sizeof(buf), &vlen), -EACCES);
    client_close(&c);
    client_open(&c, t->cfg);
    CHECK_RC(shard_get(c.s[0], "bad", 3, 0, buf, sizeof(buf), &vlen), -ENOENT);
    client_close(&c);
}

static void c_big_values(struct target *t)
{
    struct client c;
    /* The default bound, not the 300 ms the timeout checks need: applying
     * 16 MiB (twice in LMDB with its stream entry, perhaps with a commit)
     * can take longer than that without progress on a busy 2-CPU VM. */
    struct config *cfg = xmalloc(sizeof(*cfg));
    *cfg = *t->cfg;
    cfg->timeout_ms = 5000;
    client_open(&c, cfg);
    size_t n = BATCH_VALUE_MAX;
    uint8_t *v = xmalloc(n), *buf = xmalloc(n + (1u << 20));
    size_t vlen = 0;

    fill_value(v, n, 16);
    CHECK_RC(put1(c.s[1], "big", 3, v, n), 0);
    CHECK_RC(shard_get(c.s[1], "big", 3, 0, buf, n + (1u << 20), &vlen), (int)n);
    CHECK(vlen == n && memcmp(buf, v, n) == 0);
    CHECK_RC(shard_get(c.s[1], "big", 3, 3u << 20, buf, 2u << 20, &vlen), 2u << 20);
    CHECK(memcmp(buf, v + (3u << 20), 2u << 20) == 0);
    CHECK_RC(shard_get(c.s[1], "big", 3, n - 5, buf, 2u << 20, &vlen), 5);
    CHECK(memcmp(buf, v + n - 5, 5) == 0);

    /* two records, each larger than a whole scan reply should be: the
     * server sends one per page, the client takes them */
    size_t m = WIRE_SCAN_REPLY_MAX + 1000;
    CHECK_RC(put1(c.s[1], "huge1", 5, v, m), 0);
    CHECK_RC(put1(c.s[1], "huge2", 5, v + 1, m), 0);
    struct collect col = {0};
    CHECK_RC(shard_scan(c.s[1], "huge", 4, "hugf", 4, collect_fn, &col), 0);
    CHECK(col.count == 2 && col.out_of_order == 0);
    struct batch b;
    batch_init(&b);
    batch_del(&b, "huge1", 5);
    batch_del(&b, "huge2", 5);
    batch_del(&b, "big", 3);
    CHECK_RC(shard_apply(c.s[1], &b), 0);
    batch_free(&b);
    free(v);
    free(buf);
    client_close(&c);
    free(cfg);
}

/* 600 keys 0x01 be16(i) + i bytes of junk; the 511-byte boundary keys. */
static size_t scan_key(uint8_t *k, unsigned i)
{
    k[0] = 0x01;
    k[1] = (uint8_t)(i >> 8);
    k[2] = (uint8_t)i;
    size_t len = 3 + i % 7;
    for (size_t j = 3; j < len; j++)
        k[j] = (uint8_t)(i * j);
    return len;
}

/* Keys around the successor of 511-byte keys, all with prefix 0x02, in
 * order. The server's first page of a REMOTE_SCAN_FIRST_LIMIT (256) scan
 * ends right after k1 when 255 fillers come first. */
static size_t edge_key(uint8_t *k, int which)
{
    switch (which) {
    case 0: /* 0x02 'k' 0xff...: successor is 0x02 'l' */
        k[0] = 0x02;
        k[1] = 'k';
        memset(k + 2, 0xff, BATCH_KEY_MAX - 2);
        return BATCH_KEY_MAX;
    case 1:
        k[0] = 0x02;
        k[1] = 'l';
        return 2;
    case 2: /* 0x02 'm'...'m': successor 0x02 'm'... 'n' is key 3 */
        k[0] = 0x02;
        memset(k + 1, 'm', BATCH_KEY_MAX - 1);
        return BATCH_KEY_MAX;
    case 3:
        k[0] = 0x02;
        memset(k + 1, 'm', BATCH_KEY_MAX - 2);
        k[BATCH_KEY_MAX - 1] = 'n';
        return BATCH_KEY_MAX;
    case 4: /* 0x02 0xff...: successor 0x03, the end of the range */
        k[0] = 0x02;
        memset(k + 1, 0xff, BATCH_KEY_MAX - 1);
        return BATCH_KEY_MAX;
    }
    return 0;
}

static void put_edge_keys(struct shard *s, int fillers)
{
    struct batch b;
    uint8_t k[BATCH_KEY_MAX];
    batch_init(&b);
    for (int i = 0; i < fillers; i++) {
        k[0] = 0x02;
        k[1] = 'a';
        k[2] = (uint8_t)(i >> 8);
        k[3] = (uint8_t)i;
        batch_put(&b, k, 4, "f", 1);
    }
    for (int w = 0; w < 5; w++) {
        size_t kl = edge_key(k, w);
        batch_put(&b, k, kl, &w, sizeof(w));
    }
    /* the largest key there is, in its own range 0xff... */
    memset(k, 0xff, BATCH_KEY_MAX);
    batch_put(&b, k, BATCH_KEY_MAX, "top", 3);
    k[BATCH_KEY_MAX - 1] = 0xfe;
    batch_put(&b, k, BATCH_KEY_MAX, "below", 5);
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);
}

static void check_edge_scan(struct shard *s, int fillers, const char *file, int line)
{
    struct collect *col = calloc(1, sizeof(*col));
    uint8_t k[BATCH_KEY_MAX];
    int rc = shard_scan(s, "\x02", 1, "\x03", 1, collect_fn, col);
    int ok = rc == 0 && col->count == (unsigned)fillers + 5 && col->out_of_order == 0;
    for (int w = 0; ok && w < 5; w++) {
        size_t kl = edge_key(k, w);
        unsigned at = (unsigned)(fillers + w) % 64;
        ok = col->klens[at] == kl && memcmp(col->keys[at], k, kl) == 0;
    }
    check(ok, file, line, "511-byte key successors", "rc %d, %u records (want %d)", rc, col->count,
          fillers + 5);
    /* up to the end of the key space, the last key being all 0xff */
    memset(col, 0, sizeof(*col));
    memset(k, 0xff, 2);
    rc = shard_scan(s, k, 2, NULL, 0, collect_fn, col);
    check(rc == 0 && col->count == 2 && col->last_len == BATCH_KEY_MAX &&
              col->last[BATCH_KEY_MAX - 1] == 0xff,
          file, line, "scan to the largest key", "rc %d, %u records", rc, col->count);
    free(col);
}

static void c_scan(struct target *t)
{
    struct client c;
    client_open(&c, t->cfg);
    struct shard *s = c.s[0];
    struct batch b;
    uint8_t k[16];
    unsigned n = 600;

    batch_init(&b);
    for (unsigned i = 0; i < n; i++) {
        size_t kl = scan_key(k, i);
        batch_put(&b, k, kl, k, kl); /* value = key */
    }
    CHECK_RC(shard_apply(s, &b), 0);
    batch_free(&b);

    /* everything in [0x01, 0x02): more than one page */
    struct collect *col = calloc(1, sizeof(*col));
    CHECK_RC(shard_scan(s, "\x01", 1, "\x02", 1, collect_fn, col), 0);
    CHECKF(col->count == n && col->out_of_order == 0, "%u records", col->count);
    /* bounds: [key 100, key 400) */
    uint8_t lo[16], hi[16];
    size_t lol = scan_key(lo, 100), hil = scan_key(hi, 400);
    memset(col, 0, sizeof(*col));
    CHECK_RC(shard_scan(s, lo, lol, hi, hil, collect_fn, col), 0);
    CHECKF(col->count == 300 && col->first_len == lol && memcmp(col->first, lo, lol) == 0,
           "%u records", col->count);
    /* an empty range, a start past everything */
    memset(col, 0, sizeof(*col));
    CHECK_RC(shard_scan(s, hi, hil, hi, hil, collect_fn, col), 0);
    CHECK(col->count == 0);
    /* stop early with 1, in the second page; an error from the callback */
    memset(col, 0, sizeof(*col));
    col->stop_at = 300;
    col->ret = 1;
    CHECK_RC(shard_scan(s, "\x01", 1, "\x02", 1, collect_fn, col), 1);
    CHECK(col->count == 300);
    memset(col, 0, sizeof(*col));
    col->stop_at = 3;
    col->ret = -ECANCELED;
    CHECK_RC(shard_scan(s, "\x01", 1, "\x02", 1, collect_fn, col), -ECANCELED);
    CHECK(col->count == 3);
    /* from the very first key of the shard (no start) */
    memset(col, 0, sizeof(*col));
    CHECK_RC(shard_scan(s, NULL, 0, "\x01\x00\x05", 3, collect_fn, col), 0);
    /* keys 0..4, and c_roundtrip's key 0x00 0xff ... before them */
    CHECKF(col->count == 6 && col->first_len == 6 && col->first[0] == 0, "%u", col->count);
    free(col);

    /* a page boundary right after a 511-byte key */
    put_edge_keys(s, 255);
    check_edge_scan(s, 255, __FILE__, __LINE__);
    client_close(&c);
}

static void c_stat_sync(struct target *t)
{
    struct client c;
    client_open(&c, t->cfg);
    struct shard_stat st = {0}, st2 = {0};

    CHECK_RC(shard_stat(c.s[1], &st), 0);
    CHECK_RC(put1(c.s[1], "stat-a", 6, "12345", 5), 0);
    CHECK_RC(put1(c.s[1], "stat-b", 6, "12345", 5), 0);
    CHECK_RC(shard_stat(c.s[1], &st2), 0);
    CHECKF(st2.records == st.records + 2, "%" PRIu64 " -> %" PRIu64, st.records, st2.records);
    CHECK(st2.bytes > 0);
    CHECK(st2.pending >= 1);
    CHECK_RC(shard_sync(c.s[1]), 0);
    CHECK_RC(shard_stat(c.s[1], &st2), 0);
    CHECKF(st2.pending == 0, "%" PRIu64, st2.pending);
    double rtt = -1;
    CHECK_RC(remote_ping(c.r, 0, &rtt), 0);
    CHECK(rtt >= 0 && rtt < TIMEOUT_MS);
    CHECK_RC(remote_ping(c.r, 1, &rtt), 0);
    CHECK_RC(remote_ping(c.r, 2, &rtt), -EINVAL);
    client_close(&c);
}

/* Owners swapped in the client's config: the nodes redirect, the client
 * follows and remembers. An older epoch: the node redirects to itself with
 * its epoch, which the client adopts. */
static void c_redirect(struct target *t)
{
    struct client c;
    uint8_t buf[16];
    size_t vlen;

    client_open(&c, t->cfg);
    CHECK_RC(put1(c.s[0], "redir0", 6, "zero", 4), 0);
    CHECK_RC(put1(c.s[1], "redir1", 6, "one", 3), 0);
    client_close(&c);

    client_open(&c, t->swapped);
    CHECK(strcmp(remote_owner_url(c.r, 0), t->url_b) == 0);
    unsigned before = t->fb ? FAKE_GET(t->fb, requests) : 0;
    EXPECT_VALUE(c.s[0], "redir0", 6, "zero", 4);
    const char *u0 = remote_owner_url(c.r, 0);
    CHECKF(strcmp(u0, t->url_a) == 0, "owner of 0 is %s", u0);
    CHECK(remote_owner_url(c.r, 2) == NULL);
    EXPECT_VALUE(c.s[1], "redir1", 6, "one", 3);
    CHECK(strcmp(remote_owner_url(c.r, 1), t->url_b) == 0);
    if (t->fb) {
        unsigned mid = FAKE_GET(t->fb, requests);
        CHECK(mid == before + 2); /* the 307 for shard 0, the get of shard 1 */
        EXPECT_VALUE(c.s[0], "redir0", 6, "zero", 4);
        CHECK(FAKE_GET(t->fb, requests) == mid); /* straight to a now */
    }
    /* the URL handed out stays valid and right */
    CHECK(strcmp(u0, t->url_a) == 0);
    client_close(&c);

    client_open(&c, t->old);
    EXPECT_VALUE(c.s[0], "redir0", 6, "zero", 4);
    CHECK(strcmp(remote_owner_url(c.r, 0), t->url_a) == 0);
    if (t->fa) {
        pthread_mutex_lock(&t->fa->lock);
        uint64_t e = t->fa->last_epoch;
        pthread_mutex_unlock(&t->fa->lock);
        CHECKF(e == EPOCH, "last epoch %" PRIu64, e);
    }
    CHECK_RC(put1(c.s[1], "redir1", 6, "uno", 3), 0);
    CHECK_RC(shard_get(c.s[1], "redir1", 6, 0, buf, sizeof(buf), &vlen), 3);
    client_close(&c);
}

struct worker {
    struct client *c;
    unsigned id, errors, gets;
};

static void *worker_fn(void *p)
{
    struct worker *w = p;
    char key[32], val[64], want[64];
    uint8_t buf[128];
    size_t vlen;

    for (unsigned i = 0; i < 100; i++) {
        unsigned j = (w->id * 31 + i) % 40;
        snprintf(key, sizeof(key), "t-%u", j);
        snprintf(want, sizeof(want), "value of %u", j);
        int rc = shard_get(w->c->s[j % 2], key, strlen(key), 0, buf, sizeof(buf), &vlen);
        if (rc != (int)strlen(want) || memcmp(buf, want, (size_t)rc) != 0)
            w->errors++;
        w->gets++;
        if (i % 10 == 0) {
            snprintf(key, sizeof(key), "w-%u-%u", w->id, i);
            snprintf(val, sizeof(val), "by %u", w->id);
            if (put1(w->c->s[i % 2], key, strlen(key), val, strlen(val)) != 0)
                w->errors++;
            rc = shard_get(w->c->s[i % 2], key, strlen(key), 0, buf, sizeof(buf), &vlen);
            if (rc != (int)strlen(val) || memcmp(buf, val, (size_t)rc) != 0)
                w->errors++;
        }
    }
    return NULL;
}

static void c_threads(struct target *t)
{
    struct client c;
    struct worker w[8];
    pthread_t th[8];
    char key[32], val[64];

    client_open(&c, t->cfg);
    for (unsigned j = 0; j < 40; j++) {
        snprintf(key, sizeof(key), "t-%u", j);
        snprintf(val, sizeof(val), "value of %u", j);
        CHECK_RC(put1(c.s[j % 2], key, strlen(key), val, strlen(val)), 0);
    }
    for (unsigned i = 0; i < 8; i++) {
        w[i] = (struct worker){.c = &c, .id = i};
        pthread_create(&th[i], NULL, worker_fn, &w[i]);
    }
    unsigned errors = 0, gets = 0;
    for (unsigned i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        errors += w[i].errors;
        gets += w[i].gets;
    }
    CHECKF(errors == 0 && gets == 800, "%u errors in %u gets", errors, gets);
    client_close(&c);
}

/* A fresh local (LMDB) shard in tmpdir/WHAT-TARGET, for fan-outs that mix
 * local and remote shards; exits the test on failure. */
static struct shard *local_shard_open(const struct target *t, const char *what)
{
    char dir[PATH_MAX], err[256];
    struct shard *local = NULL;

    snprintf(dir, sizeof(dir), "%s/%s-%s", tmpdir, what, t->name);
    mkdir(dir, 0700);
    if (shard_lmdb_open(dir, 0, &(struct shard_lmdb_options){0}, &local, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_lmdb_open: %s\n", err);
        exit(2);
    }
    return local;
}

/* shard_scan_many over two remote shards and a local one; with swapped
 * owners every parallel first page is redirected and redone. */
static void c_scan_many(struct target *t)
{
    struct shard *local = local_shard_open(t, "many");
    struct collect *col = calloc(1, sizeof(*col));
    struct client c, sw;
    uint8_t k[8];

    client_open(&c, t->cfg);
    client_open(&sw, t->swapped);
    struct shard *three[3] = {c.s[0], local, c.s[1]};
    unsigned want[3] = {300, 5, 10};
    for (unsigned i = 0; i < 3; i++) {
        struct batch b;
        batch_init(&b);
        for (unsigned j = 0; j < want[i]; j++) {
            k[0] = 0x05, k[1] = (uint8_t)i, k[2] = (uint8_t)(j >> 8), k[3] = (uint8_t)j;
            batch_put(&b, k, 4, k, 4);
        }
        CHECK_RC(shard_apply(three[i], &b), 0);
        batch_free(&b);
    }
    /* shard after shard, in the order given: keys ascend throughout */
    CHECK_RC(shard_scan_many(three, 3, "\x05", 1, "\x06", 1, collect_fn, col), 0);
    CHECKF(col->count == 315 && col->out_of_order == 0, "%u records, %d out of order", col->count,
           col->out_of_order);
    /* stopped with 1 (0 comes back), an error from the callback */
    memset(col, 0, sizeof(*col));
    col->stop_at = 200, col->ret = 1;
    CHECK_RC(shard_scan_many(three, 3, "\x05", 1, "\x06", 1, collect_fn, col), 0);
    CHECK(col->count == 200);
    memset(col, 0, sizeof(*col));
    col->stop_at = 302, col->ret = -ECANCELED;
    CHECK_RC(shard_scan_many(three, 3, "\x05", 1, "\x06", 1, collect_fn, col), -ECANCELED);
    CHECK(col->count == 302);
    /* wrong owners: the redirects are followed by the ordinary scan */
    struct shard *swapped[2] = {sw.s[0], sw.s[1]};
    memset(col, 0, sizeof(*col));
    CHECK_RC(shard_scan_many(swapped, 2, "\x05", 1, "\x06", 1, collect_fn, col), 0);
    CHECKF(col->count == 310 && col->out_of_order == 0, "%u records", col->count);
    CHECK_RC(shard_scan_many(NULL, 0, NULL, 0, NULL, 0, collect_fn, col), 0);
    client_close(&sw);
    client_close(&c);
    shard_close(local);
    free(col);
}

/* Scans with a join: of one remote shard; of two remote shards and a local
 * one at once (shard_scan_many_join), also with every owner wrong (each
 * first page redirected and redone the ordinary way); then the joined keys
 * read back by shard_get_many_fan in one go, the same three ways. The fake
 * node predates joins (it ignores the query): against it the client reads
 * the joined keys itself. */
static void c_scan_join(struct target *t)
{
    struct shard *local = local_shard_open(t, "join");
    struct client c, sw;

    client_open(&c, t->cfg);
    client_open(&sw, t->swapped);
    struct shard *three[3] = {c.s[0], local, c.s[1]};
    for (unsigned i = 0; i < 3; i++)
        CHECK_RC(sj_fill(three[i], (uint8_t)(10 + i)), 0);
    check_scan_join(c.s[0], 10, "remote");
    check_scan_join(sw.s[1], 12, "remote, redirected");

    struct shard *swapped[3] = {sw.s[0], local, sw.s[1]};
    struct shard *const *sets[2] = {three, swapped};
    for (unsigned set = 0; set < 2; set++) {
        struct sj_collect col = {0};
        int rc = shard_scan_many_join(sets[set], 3, "\x0b", 1, "\x0c", 1, &sj_join, sj_fn, &col);
        CHECKF(rc == 0 && col.count == 3 * SJ_N && col.joined == 3 * SJ_N / 2 && col.wrong == 0,
               "scan many with a join (%s): rc %d, %u records, %u joined, %u wrong",
               set ? "redirected" : "direct", rc, col.count, col.joined, col.wrong);
        memset(&col, 0, sizeof(col));
        col.stop_at = SJ_N + 5, col.ret = 1;
        rc = shard_scan_many_join(sets[set], 3, "\x0b", 1, "\x0c", 1, &sj_join, sj_fn, &col);
        CHECKF(rc == 0 && col.count == SJ_N + 5, "stopped: rc %d, %u", rc, col.count);

        /* The joined keys: 2 present and 1 absent a shard; and a bad list. */
        uint8_t keys[3][3][3], bufs[3][3][512];
        struct shard_read r[3][3];
        struct shard_reads g[4];
        for (unsigned i = 0; i < 3; i++) {
            for (unsigned j = 0; j < 3; j++) {
                keys[i][j][0] = 0x0c, keys[i][j][1] = (uint8_t)(10 + i);
                keys[i][j][2] = (uint8_t)(j == 2 ? 3 : 2 * j + 4);
                r[i][j] = (struct shard_read){.key = keys[i][j], .klen = 3, .buf = bufs[i][j],
                                              .buflen = sizeof(bufs[i][j])};
            }
            g[i] = (struct shard_reads){.s = sets[set][i], .r = r[i], .n = 3, .rc = 99};
        }
        g[3] = (struct shard_reads){.s = sets[set][0], .r = r[0], .n = 0, .rc = 99};
        CHECK_RC(shard_get_many_fan(g, 4), 0);
        for (unsigned i = 0; i < 3; i++) {
            uint8_t want[512];
            CHECKF(g[i].rc == 0, "get many fan (%s), shard %u: rc %d", set ? "redirected" : "direct",
                   i, g[i].rc);
            for (unsigned j = 0; j < 2; j++) {
                size_t n = sj_joined((uint8_t)(10 + i), 2 * j + 4, want);
                CHECKF(r[i][j].rc == 0 && r[i][j].len == n && memcmp(bufs[i][j], want, n) == 0,
                       "get many fan: read %u/%u: rc %d len %zu", i, j, r[i][j].rc, r[i][j].len);
            }
            CHECK_RC(r[i][2].rc, -ENOENT);
        }
        CHECK_RC(g[3].rc, -EINVAL);
    }
    CHECK_RC(shard_get_many_fan(NULL, 0), 0);
    client_close(&sw);
    client_close(&c);
    shard_close(local);
}

static void run_conformance(struct target *t)
{
    static const struct {
        const char *name;
        void (*fn)(struct target *);
    } tests[] = {
        {"round trips", c_roundtrip},      {"errors", c_errors},
        {"big values", c_big_values},      {"scan", c_scan},
        {"stat, sync, ping", c_stat_sync}, {"redirects and epochs", c_redirect},
        {"8 threads", c_threads},          {"scan many", c_scan_many},
        {"get many", c_get_many},          {"scan with a join", c_scan_join},
    };
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        int before = failures;
        double t0 = now_ms();
        tests[i].fn(t);
        printf("%s: %s: %s (%.0f ms)\n", t->name, tests[i].name,
               failures == before ? "ok" : "FAILED", now_ms() - t0);
        fflush(stdout);
    }
}

/* ---- faults: against the fake only ---- */

static struct fake fa, fb;
static struct config cfg_fake, cfg_fake_swapped, cfg_fake_old, cfg_fake_badsecret, cfg_dead;

static void f_timeout(void)
{
    struct client c;
    uint8_t buf[16];
    size_t vlen;

    client_open(&c, &cfg_fake);
    CHECK_RC(put1(c.s[0], "slow", 4, "v", 1), 0);
    /* a node that never answers: -ETIMEDOUT within the bound, for a read
     * (retries must not stretch it) and for a write */
    FAKE_SET(&fa, delay_ms, -1);
    double t0 = now_ms();
    CHECK_RC(shard_get(c.s[0], "slow", 4, 0, buf, sizeof(buf), &vlen), -ETIMEDOUT);
    double el = now_ms() - t0;
    CHECKF(el >= TIMEOUT_MS - 50 && el < TIMEOUT_MS + 500, "%.0f ms", el);
    t0 = now_ms();
    CHECK_RC(put1(c.s[0], "slow", 4, "w", 1), -ETIMEDOUT);
    el = now_ms() - t0;
    CHECKF(el < TIMEOUT_MS + 500, "%.0f ms", el);
    /* it accepted the connections: slow, not down */
    CHECK_RC(remote_node_down(c.r, 0, NULL), 0);
    t0 = now_ms();
    CHECK_RC(shard_scan(c.s[0], NULL, 0, NULL, 0, collect_fn, &(struct collect){0}), -ETIMEDOUT);
    CHECK_RC(shard_sync(c.s[0]), -ETIMEDOUT);
    struct shard_stat st;
    CHECK_RC(shard_stat(c.s[0], &st), -ETIMEDOUT);
    double rtt;
    CHECK_RC(remote_ping(c.r, 0, &rtt), 0); /* /v1/config is not delayed */
    el = now_ms() - t0;
    CHECKF(el < 3 * TIMEOUT_MS + 1000, "%.0f ms", el);
    /* a fan-out waits for a dead node once, not twice */
    t0 = now_ms();
    CHECK_RC(shard_scan_many(c.s, 2, NULL, 0, NULL, 0, collect_fn, &(struct collect){0}),
             -ETIMEDOUT);
    el = now_ms() - t0;
    CHECKF(el < TIMEOUT_MS + 500, "%.0f ms", el);
    /* slow nodes are waited for at once: about one delay, not two */
    FAKE_SET(&fa, delay_ms, 250);
    FAKE_SET(&fb, delay_ms, 250);
    t0 = now_ms();
    /* (a range of one page each: every page is delayed) */
    CHECK_RC(shard_scan_many(c.s, 2, "\x07", 1, "\x08", 1, collect_fn, &(struct collect){0}), 0);
    el = now_ms() - t0;
    CHECKF(el >= 240 && el < 450, "%.0f ms for two 250 ms scans", el);
    fake_behave(&fb);
    /* slow but in time: fine */
    FAKE_SET(&fa, delay_ms, 100);
    CHECK_RC(shard_get(c.s[0], "slow", 4, 0, buf, sizeof(buf), &vlen), 1);
    fake_behave(&fa);
    client_close(&c);

    /* nobody listening: a refused connection marks the node down, so
     * apply and get both fail at once (get is not retried until the
     * bound), and so do the requests after them, a fan-out included */
    client_open(&c, &cfg_dead);
    t0 = now_ms();
    CHECK_RC(put1(c.s[0], "x", 1, "y", 1), -EHOSTUNREACH);
    el = now_ms() - t0;
    CHECKF(el < 100, "%.0f ms", el);
    t0 = now_ms();
    CHECK_RC(shard_get(c.s[1], "x", 1, 0, buf, sizeof(buf), &vlen), -EHOSTUNREACH);
    CHECK_RC(shard_get(c.s[1], "x", 1, 0, buf, sizeof(buf), &vlen), -EHOSTUNREACH);
    CHECK_RC(shard_stat(c.s[0], &st), -EHOSTUNREACH);
    CHECK_RC(shard_scan_many(c.s, 2, NULL, 0, NULL, 0, collect_fn, &(struct collect){0}),
             -EHOSTUNREACH);
    el = now_ms() - t0;
    CHECKF(el < 100, "%.0f ms", el);
    CHECK_RC(remote_ping(c.r, 1, &rtt), -EHOSTUNREACH);
    client_close(&c);

    /* a black hole: a listener whose queue is full drops our SYNs, so the
     * connect runs out of time. That marks the node down too; then only one
     * request every 500 ms probes it (a connect timeout again), the others
     * fail at once. A request that connected and then timed out (the first
     * part of this function) marked nothing. */
    static struct config cfg_hole;
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    unsigned hole_port;
    int hole = listen_any(&hole_port), filler = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char url_hole[64], url_none[64];

    CHECK(hole >= 0 && filler >= 0 && listen(hole, 0) == 0);
    CHECK(getsockname(hole, (struct sockaddr *)&sa, &sl) == 0);
    CHECK(connect(filler, (struct sockaddr *)&sa, sl) == 0); /* fills the queue */
    snprintf(url_hole, sizeof(url_hole), "http://127.0.0.1:%u", hole_port);
    snprintf(url_none, sizeof(url_none), "http://127.0.0.1:%u", free_port());
    make_config(&cfg_hole, "hole", url_hole, url_none, 0, EPOCH, SECRET);
    client_open(&c, &cfg_hole);
    t0 = now_ms();
    CHECK_RC(shard_get(c.s[0], "x", 1, 0, buf, sizeof(buf), &vlen), -ETIMEDOUT);
    el = now_ms() - t0;
    CHECKF(el >= TIMEOUT_MS - 50 && el < TIMEOUT_MS + 300, "%.0f ms", el);
    t0 = now_ms();
    for (int i = 0; i < 20; i++)
        CHECK_RC(shard_get(c.s[0], "x", 1, 0, buf, sizeof(buf), &vlen), -EHOSTUNREACH);
    el = now_ms() - t0;
    CHECKF(el < 100, "%.0f ms for 20 gets of a node marked down", el);
    usleep(550 * 1000);
    t0 = now_ms();
    CHECK_RC(shard_get(c.s[0], "x", 1, 0, buf, sizeof(buf), &vlen), -ETIMEDOUT); /* the probe */
    CHECK_RC(shard_get(c.s[0], "x", 1, 0, buf, sizeof(buf), &vlen), -EHOSTUNREACH);
    el = now_ms() - t0;
    CHECKF(el >= TIMEOUT_MS - 50 && el < TIMEOUT_MS + 300, "%.0f ms", el);
    time_t since = 0;
    CHECK_RC(remote_node_down(c.r, 0, &since), 1);
    CHECK(since > 0 && since <= time(NULL));
    CHECK_RC(remote_node_down(c.r, 1, &since), 0);
    client_close(&c);
    close(filler);
    close(hole);
}

static void f_retries(void)
{
    struct client c;
    uint8_t buf[16];
    size_t vlen;
    unsigned before;

    client_open(&c, &cfg_fake);
    CHECK_RC(put1(c.s[0], "r", 1, "v", 1), 0);
    /* two 503s, then the value */
    FAKE_SET(&fa, fail503, 2);
    before = FAKE_GET(&fa, ops[WIRE_OP_GET]);
    CHECK_RC(shard_get(c.s[0], "r", 1, 0, buf, sizeof(buf), &vlen), 1);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_GET]) == before + 3);
    /* 503 for ever: -EIO (wire.h's 503) within the bound, several tries */
    FAKE_SET(&fa, fail503, 1000000);
    before = FAKE_GET(&fa, ops[WIRE_OP_GET]);
    double t0 = now_ms();
    CHECK_RC(shard_get(c.s[0], "r", 1, 0, buf, sizeof(buf), &vlen), -EIO);
    double el = now_ms() - t0;
    CHECKF(el < TIMEOUT_MS + 500, "%.0f ms", el);
    CHECKF(FAKE_GET(&fa, ops[WIRE_OP_GET]) >= before + 3, "%u tries",
           FAKE_GET(&fa, ops[WIRE_OP_GET]) - before);
    FAKE_SET(&fa, fail503, 0);
    /* stat and scan are retried too */
    FAKE_SET(&fa, fail503, 1);
    struct shard_stat st;
    CHECK_RC(shard_stat(c.s[0], &st), 0);
    FAKE_SET(&fa, fail503, 1);
    CHECK_RC(shard_scan(c.s[0], NULL, 0, NULL, 0, collect_fn, &(struct collect){0}), 0);
    /* a connection closed without a reply: a get tries again */
    FAKE_SET(&fa, drop, 1);
    before = FAKE_GET(&fa, ops[WIRE_OP_GET]);
    CHECK_RC(shard_get(c.s[0], "r", 1, 0, buf, sizeof(buf), &vlen), 1);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_GET]) == before + 2);

    /* apply: a 503 is returned as it is, one request */
    FAKE_SET(&fa, fail503, 1);
    before = FAKE_GET(&fa, ops[WIRE_OP_APPLY]);
    CHECK_RC(put1(c.s[0], "r", 1, "w", 1), -EIO);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_APPLY]) == before + 1);
    EXPECT_VALUE(c.s[0], "r", 1, "v", 1);
    /* a lost reply: -EIO, one request, and the batch did happen. The
     * connection was reused (keep-alive), where curl on its own would send
     * the request again on a fresh one: it connects anew, but may not
     * rewind the body, so nothing is sent there. */
    FAKE_SET(&fa, drop_after_apply, 1);
    before = FAKE_GET(&fa, ops[WIRE_OP_APPLY]);
    unsigned acc = FAKE_GET(&fa, accepts);
    CHECK_RC(put1(c.s[0], "r", 1, "x", 1), -EIO);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_APPLY]) == before + 1);
    CHECK(FAKE_GET(&fa, accepts) <= acc + 1);
    EXPECT_VALUE(c.s[0], "r", 1, "x", 1);
    /* the same (lost before it was applied) on a fresh connection: a new
     * client has no connection yet */
    struct client c2;
    client_open(&c2, &cfg_fake);
    FAKE_SET(&fa, drop, 1);
    before = FAKE_GET(&fa, ops[WIRE_OP_APPLY]);
    acc = FAKE_GET(&fa, accepts);
    CHECK_RC(put1(c2.s[0], "r", 1, "y", 1), -EIO);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_APPLY]) == before + 1);
    CHECK(FAKE_GET(&fa, accepts) == acc + 1);
    EXPECT_VALUE(c2.s[0], "r", 1, "x", 1);
    client_close(&c2);
    /* sync is not retried either */
    FAKE_SET(&fa, fail503, 1);
    before = FAKE_GET(&fa, ops[WIRE_OP_SYNC]);
    CHECK_RC(shard_sync(c.s[0]), -EIO);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_SYNC]) == before + 1);
    fake_behave(&fa);
    client_close(&c);
}

static void f_redirects(void)
{
    struct client c;
    uint8_t buf[16];
    size_t vlen;

    client_open(&c, &cfg_fake);
    CHECK_RC(put1(c.s[0], "loop", 4, "v", 1), 0);
    /* a node that redirects to itself for ever: -EIO after 3 redirects */
    pthread_mutex_lock(&fa.lock);
    snprintf(fa.redirect_to, sizeof(fa.redirect_to), "%s", fa.url);
    pthread_mutex_unlock(&fa.lock);
    unsigned before = FAKE_GET(&fa, ops[WIRE_OP_GET]);
    CHECK_RC(shard_get(c.s[0], "loop", 4, 0, buf, sizeof(buf), &vlen), -EIO);
    CHECK(FAKE_GET(&fa, ops[WIRE_OP_GET]) == before + 4);
    /* a Location that is not "URL + our path": -EIO, owner unchanged */
    FAKE_SET(&fa, bad_location, 1);
    CHECK_RC(shard_get(c.s[0], "loop", 4, 0, buf, sizeof(buf), &vlen), -EIO);
    CHECK(strcmp(remote_owner_url(c.r, 0), fa.url) == 0);
    fake_behave(&fa);
    /* an apply is redirected too (the node did nothing) */
    pthread_mutex_lock(&fa.lock);
    snprintf(fa.redirect_to, sizeof(fa.redirect_to), "%s", fb.url);
    pthread_mutex_unlock(&fa.lock);
    FAKE_SET(&fb, owned, 3);
    CHECK_RC(put1(c.s[0], "moved", 5, "v", 1), 0);
    CHECK(strcmp(remote_owner_url(c.r, 0), fb.url) == 0);
    fake_behave(&fa);
    EXPECT_VALUE(c.s[0], "moved", 5, "v", 1); /* served by b now */
    pthread_mutex_lock(&fb.lock);
    CHECK(kv_find(&fb.map[0], (const uint8_t *)"moved", 5) != NULL);
    pthread_mutex_unlock(&fb.lock);
    pthread_mutex_lock(&fa.lock);
    CHECK(kv_find(&fa.map[0], (const uint8_t *)"moved", 5) == NULL);
    pthread_mutex_unlock(&fa.lock);
    FAKE_SET(&fb, owned, 2);
    client_close(&c);
}

static int count_records(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    (void)k, (void)kl, (void)v, (void)vl;
    (*(unsigned *)ctx)++;
    return 0;
}

static void f_replies(void)
{
    struct client c;
    uint8_t buf[64];
    size_t vlen;

    client_open(&c, &cfg_fake);
    /* a server sending more than asked for: -EIO, and the client goes on */
    CHECK_RC(put1(c.s[0], "long", 4, "0123456789012345678901234567890123456789", 40), 0);
    FAKE_SET(&fa, ignore_len, 1);
    CHECK_RC(shard_get(c.s[0], "long", 4, 0, buf, 10, &vlen), -EIO);
    FAKE_SET(&fa, ignore_len, 0);
    CHECK_RC(shard_get(c.s[0], "long", 4, 0, buf, 10, &vlen), 10);

    /* a 20 MiB value (more than a get reply may hold) in two pieces */
    size_t n = 20u << 20;
    uint8_t *v = xmalloc(n), *out = xmalloc(24u << 20);
    fill_value(v, n, 20);
    fake_put_direct(&fb, 1, "huge", 4, v, n);
    unsigned before = FAKE_GET(&fb, ops[WIRE_OP_GET]);
    CHECK_RC(shard_get(c.s[1], "huge", 4, 0, out, 24u << 20, &vlen), (int)n);
    CHECK(vlen == n && memcmp(out, v, n) == 0);
    CHECK(FAKE_GET(&fb, ops[WIRE_OP_GET]) == before + 2);
    /* exactly one piece's worth, and the tail from an offset */
    before = FAKE_GET(&fb, ops[WIRE_OP_GET]);
    CHECK_RC(shard_get(c.s[1], "huge", 4, 0, out, WIRE_GET_MAX, &vlen), (int)WIRE_GET_MAX);
    CHECK(FAKE_GET(&fb, ops[WIRE_OP_GET]) == before + 1);
    CHECK_RC(shard_get(c.s[1], "huge", 4, WIRE_GET_MAX - 1, out, 24u << 20, &vlen),
             (int)(n - WIRE_GET_MAX + 1));
    CHECK(memcmp(out, v + WIRE_GET_MAX - 1, n - WIRE_GET_MAX + 1) == 0);
    struct batch b;
    batch_init(&b);
    batch_del(&b, "huge", 4);
    CHECK_RC(shard_apply(c.s[1], &b), 0);
    batch_free(&b);
    free(v);
    free(out);

    /* a getv list over SHARD_READS_MAX reads of BATCH_KEY_MAX-byte keys
     * would not fit the request buffer: refused before it is encoded */
    {
        static uint8_t big[BATCH_KEY_MAX];
        struct shard_read r[SHARD_READS_MAX + 1];

        memset(big, 'k', sizeof(big));
        for (unsigned i = 0; i <= SHARD_READS_MAX; i++)
            r[i] = (struct shard_read){.key = big, .klen = sizeof(big)};
        CHECK_RC(c.s[0]->ops->get_many(c.s[0], r, SHARD_READS_MAX + 1), -EINVAL);
    }

    /* records past the end asked for: -EIO (callers size what they take
     * from a key by the range they asked for) */
    unsigned seen = 0;
    CHECK_RC(put1(c.s[0], "ra", 2, "1", 1), 0);
    CHECK_RC(put1(c.s[0], "rb", 2, "2", 1), 0);
    CHECK_RC(put1(c.s[0], "rc", 2, "3", 1), 0);
    CHECK_RC(shard_scan(c.s[0], "ra", 2, "rb", 2, count_records, &seen), 0);
    CHECK(seen == 1);
    FAKE_SET(&fa, ignore_end, 1);
    CHECK_RC(shard_scan(c.s[0], "ra", 2, "rb", 2, count_records, &seen), -EIO);
    FAKE_SET(&fa, ignore_end, 0);

    /* one record per page, "more" even after the last one: every 511-byte
     * successor case, and a scan that ends at the largest key */
    FAKE_SET(&fa, scan_page, 1);
    FAKE_SET(&fa, lazy_more, 1);
    check_edge_scan(c.s[0], 255, __FILE__, __LINE__);
    fake_behave(&fa);
    CHECK(FAKE_GET(&fa, bad_requests) == 0);
    client_close(&c);
}

static void f_keepalive(void)
{
    struct client c;
    uint8_t buf[16];
    size_t vlen;
    int bad = 0;

    client_open(&c, &cfg_fake);
    CHECK_RC(put1(c.s[1], "ka", 2, "v", 1), 0);
    unsigned acc = FAKE_GET(&fb, accepts);
    for (int i = 0; i < 200; i++)
        bad += shard_get(c.s[1], "ka", 2, 0, buf, sizeof(buf), &vlen) != 1;
    CHECK(bad == 0);
    CHECKF(FAKE_GET(&fb, accepts) == acc, "%u new connections", FAKE_GET(&fb, accepts) - acc);
    client_close(&c);
    /* a fresh client: exactly one connection for 200 requests */
    client_open(&c, &cfg_fake);
    acc = FAKE_GET(&fb, accepts);
    for (int i = 0; i < 200; i++)
        bad += shard_get(c.s[1], "ka", 2, 0, buf, sizeof(buf), &vlen) != 1;
    CHECK(bad == 0);
    CHECKF(FAKE_GET(&fb, accepts) == acc + 1, "%u connections", FAKE_GET(&fb, accepts) - acc);
    client_close(&c);
}

static void run_fake(void)
{
    char url_dead_a[64], url_dead_b[64];

    fake_start(&fa, 1);
    fake_start(&fb, 2);
    snprintf(fa.other_url, sizeof(fa.other_url), "%s", fb.url);
    snprintf(fb.other_url, sizeof(fb.other_url), "%s", fa.url);
    make_config(&cfg_fake, "fake", fa.url, fb.url, 0, EPOCH, SECRET);
    make_config(&cfg_fake_swapped, "fake-swapped", fa.url, fb.url, 1, EPOCH, SECRET);
    make_config(&cfg_fake_old, "fake-old", fa.url, fb.url, 0, EPOCH - 1, SECRET);
    make_config(&cfg_fake_badsecret, "fake-bad", fa.url, fb.url, 0, EPOCH, "not-the-secret-at-all");
    snprintf(url_dead_a, sizeof(url_dead_a), "http://127.0.0.1:%u", free_port());
    snprintf(url_dead_b, sizeof(url_dead_b), "http://127.0.0.1:%u/", free_port());
    make_config(&cfg_dead, "dead", url_dead_a, url_dead_b, 0, EPOCH, SECRET);

    struct target t = {.name = "fake",
                       .cfg = &cfg_fake,
                       .swapped = &cfg_fake_swapped,
                       .old = &cfg_fake_old,
                       .badsecret = &cfg_fake_badsecret,
                       .url_a = fa.url,
                       .url_b = fb.url,
                       .fa = &fa,
                       .fb = &fb};
    run_conformance(&t);

    static const struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"timeouts and dead nodes", f_timeout},
        {"retries", f_retries},
        {"redirect faults", f_redirects},
        {"bad and big replies", f_replies},
        {"keep-alive", f_keepalive},
    };
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        int before = failures;
        double t0 = now_ms();
        tests[i].fn();
        printf("fake: %s: %s (%.0f ms)\n", tests[i].name, failures == before ? "ok" : "FAILED",
               now_ms() - t0);
        fflush(stdout);
    }
    unsigned auth = FAKE_GET(&fa, auth_failures) + FAKE_GET(&fb, auth_failures);
    CHECKF(auth == 2, "%u bad signatures (want the 2 of the wrong secret)", auth);
    CHECK(FAKE_GET(&fa, expect_seen) + FAKE_GET(&fb, expect_seen) == 0);
    CHECKF(FAKE_GET(&fa, nonce_repeats) + FAKE_GET(&fb, nonce_repeats) == 0, "%u repeated nonces",
           FAKE_GET(&fa, nonce_repeats) + FAKE_GET(&fb, nonce_repeats));
    CHECK(FAKE_GET(&fa, bad_requests) + FAKE_GET(&fb, bad_requests) == 0);
    fake_stop(&fa);
    fake_stop(&fb);
}

/* ---- the real node server over shard_lmdb ---- */

static struct config cfg_real, cfg_real_swapped, cfg_real_old, cfg_real_badsecret;
static void c_layout(struct shard *const *lmdb, struct node_server *const *srv);

static void run_real(void)
{
    char url_a[64], url_b[64], dir[PATH_MAX], err[512];
    struct shard *lmdb[2] = {NULL, NULL};
    struct node_server *srv[2] = {NULL, NULL};

    snprintf(url_a, sizeof(url_a), "http://127.0.0.1:%u", free_port());
    snprintf(url_b, sizeof(url_b), "http://127.0.0.1:%u", free_port());
    make_config(&cfg_real, "real", url_a, url_b, 0, EPOCH, SECRET);
    make_config(&cfg_real_swapped, "real-swapped", url_a, url_b, 1, EPOCH, SECRET);
    make_config(&cfg_real_old, "real-old", url_a, url_b, 0, EPOCH - 1, SECRET);
    make_config(&cfg_real_badsecret, "real-bad", url_a, url_b, 0, EPOCH, "not-the-secret-at-all");

    for (unsigned i = 0; i < 2; i++) {
        snprintf(dir, sizeof(dir), "%s/shard%u", tmpdir, i);
        mkdir(dir, 0700);
        if (shard_lmdb_open(dir, i, &(struct shard_lmdb_options){0}, &lmdb[i], err, sizeof(err)) !=
            0) {
            fprintf(stderr, "shard_lmdb_open: %s\n", err);
            exit(2);
        }
    }
    for (int n = 0; n < 2; n++) {
        struct shard *mine[2] = {n == 0 ? lmdb[0] : NULL, n == 1 ? lmdb[1] : NULL};
        int rc = node_server_start(&cfg_real, n, mine, NULL, NULL, &srv[n], err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "node_server_start: %s\n", err);
            exit(2);
        }
    }
    struct target t = {.name = "node_server",
                       .cfg = &cfg_real,
                       .swapped = &cfg_real_swapped,
                       .old = &cfg_real_old,
                       .badsecret = &cfg_real_badsecret,
                       .url_a = url_a,
                       .url_b = url_b};
    run_conformance(&t);

    /* the client's writes are in the shards behind the servers */
    uint8_t buf[16];
    size_t vlen;
    CHECK_RC(shard_get(lmdb[0], "redir0", 6, 0, buf, sizeof(buf), &vlen), 4);
    CHECK_RC(shard_get(lmdb[1], "redir1", 6, 0, buf, sizeof(buf), &vlen), 3);
    CHECK(memcmp(buf, "uno", 3) == 0);
    c_layout(lmdb, srv);
    node_server_stop(srv[0]);
    node_server_stop(srv[1]);
    shard_close(lmdb[0]);
    shard_close(lmdb[1]);
}

/* ---- layouts (wire.h): keys "K" + 8 bytes are placed by those bytes ---- */

static int test_key_hash(const uint8_t *k, size_t kl, uint64_t *h)
{
    if (kl != 9 || k[0] != 'K')
        return -EINVAL;
    *h = endian_get_be64(k + 1);
    return 0;
}

static size_t placed_key(uint8_t k[9], uint64_t h)
{
    k[0] = 'K';
    endian_put_be64(k + 1, h);
    return 9;
}

static int count_fn(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    uint64_t h;

    (void)v, (void)vl;
    *(unsigned *)ctx += test_key_hash(k, kl, &h) == 0;
    return 0;
}

/* Node a splits its shard 0 into 0 and 2 (depth 2), served beside it: the
 * client's old layout is refused and told the new depth; once it has the
 * new one (and shard 2, at a's url without being told) it is served. Then
 * a merges them back, and the client's split layout is refused alike. */
static void c_layout_change(struct client *c, struct shard *const *lmdb,
                            struct node_server *const *srv)
{
    const uint8_t split[4] = {2, 1, 2, 1}, base[2] = {1, 1};
    struct shard *lmdb2 = NULL, *s2 = NULL;
    char dir[PATH_MAX], err[256];
    uint8_t k2[9], k4[9], buf[8];
    size_t vlen;

    snprintf(dir, sizeof(dir), "%s/shard2", tmpdir);
    mkdir(dir, 0700);
    if (shard_lmdb_open(dir, 2, &(struct shard_lmdb_options){0}, &lmdb2, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_lmdb_open: %s\n", err);
        exit(2);
    }
    placed_key(k2, 0x22); /* bits 10: shard 0 at depth 1, shard 2 at depth 2 */
    placed_key(k4, 0x24); /* bits 00: shard 0 either way */
    node_server_quiesce(srv[0]);
    CHECK_RC(node_server_set_layout(srv[0], split, 3), -EINVAL); /* not a power of two */
    CHECK_RC(node_server_set_layout(srv[0], split, 4), 0);
    node_server_set_shard(srv[0], 2, lmdb2);
    node_server_unquiesce(srv[0]);

    CHECK(remote_told_depth(c->r, 0) == -1);
    CHECK_RC(put1(c->s[0], k2, 9, "old", 3), -EBADSLT);
    CHECKF(remote_told_depth(c->r, 0) == 2, "told %d", remote_told_depth(c->r, 0));
    CHECK_RC(shard_get(lmdb[0], k2, 9, 0, buf, sizeof(buf), &vlen), -ENOENT);
    remote_depth_set(c->r, 0, 2);
    remote_depth_set(c->r, 2, 2);
    CHECK(remote_told_depth(c->r, 0) == -1);
    CHECK_RC(shard_remote_open(c->r, 2, &s2), 0);
    CHECK_RC(put1(s2, k2, 9, "new", 3), 0);
    CHECK_RC(put1(c->s[0], k4, 9, "four", 4), 0);
    CHECK_RC(put1(c->s[0], k2, 9, "no", 2), -EBADSLT); /* now shard 2's key */
    CHECK_RC(shard_get(lmdb2, k2, 9, 0, buf, sizeof(buf), &vlen), 3);
    CHECK(memcmp(buf, "new", 3) == 0);
    CHECK_RC(shard_get(lmdb[0], k4, 9, 0, buf, sizeof(buf), &vlen), 4);
    CHECK_RC(shard_get(lmdb[0], k2, 9, 0, buf, sizeof(buf), &vlen), -ENOENT);

    node_server_quiesce(srv[0]);
    CHECK_RC(node_server_set_layout(srv[0], base, 2), 0);
    node_server_set_shard(srv[0], 2, NULL);
    node_server_unquiesce(srv[0]);
    CHECK_RC(shard_get(s2, k2, 9, 0, buf, sizeof(buf), &vlen), -EBADSLT);
    CHECKF(remote_told_depth(c->r, 2) == 1, "told %d", remote_told_depth(c->r, 2));
    CHECK_RC(put1(c->s[0], k4, 9, "four", 4), -EBADSLT);
    CHECKF(remote_told_depth(c->r, 0) == 1, "told %d", remote_told_depth(c->r, 0));
    remote_depth_set(c->r, 0, 1);
    CHECK_RC(put1(c->s[0], k4, 9, "vier", 4), 0);
    shard_close(s2);
    shard_close(lmdb2);
}

/* The servers of cfg_real (2 shards, depth 1) refuse a key homed on the
 * other shard and a request of another depth, with -EBADSLT and nothing
 * done; ranges and keys that are not placed pass. */
static void c_layout(struct shard *const *lmdb, struct node_server *const *srv)
{
    struct client c;
    struct shard_read rd;
    struct batch b;
    uint8_t k0[9], k1[9], k2[9], buf[8];
    size_t vlen;
    unsigned seen = 0;

    placement_set_key_hash(test_key_hash);
    client_open(&c, &cfg_real);
    placed_key(k0, 0x10);  /* shard 0 */
    placed_key(k1, 0x11);  /* shard 1 */
    placed_key(k2, 0x12);  /* shard 0 */
    CHECK_RC(put1(c.s[0], k0, 9, "zero", 4), 0);
    CHECK_RC(put1(c.s[1], k1, 9, "one", 3), 0);
    /* a key of the other shard: refused, nothing written */
    CHECK_RC(put1(c.s[1], k2, 9, "two", 3), -EBADSLT);
    CHECK_RC(shard_get(lmdb[1], k2, 9, 0, buf, sizeof(buf), &vlen), -ENOENT);
    batch_init(&b);
    batch_put(&b, k1, 9, "uno", 3);
    batch_put(&b, k0, 9, "mixed", 5); /* one foreign key refuses the batch */
    CHECK_RC(shard_apply(c.s[1], &b), -EBADSLT);
    batch_free(&b);
    CHECK_RC(shard_get(lmdb[1], k1, 9, 0, buf, sizeof(buf), &vlen), 3);
    CHECK(memcmp(buf, "one", 3) == 0);
    CHECK_RC(shard_get(c.s[0], k1, 9, 0, buf, sizeof(buf), &vlen), -EBADSLT);
    rd = (struct shard_read){.key = k1, .klen = 9, .buf = buf, .buflen = sizeof(buf)};
    CHECK_RC(shard_get_many(c.s[0], &rd, 1), -EBADSLT);
    CHECK_RC(shard_get(c.s[0], k0, 9, 0, buf, sizeof(buf), &vlen), 4);
    /* not placed, and ranges: the shard's own business */
    CHECK_RC(put1(c.s[1], "Mmeta", 5, "m", 1), 0);
    batch_init(&b);
    batch_add(&b, BATCH_DEL_RANGE, "K", 1, "L", 1);
    CHECK_RC(shard_apply(c.s[1], &b), 0);
    batch_free(&b);
    CHECK_RC(shard_get(lmdb[1], k1, 9, 0, buf, sizeof(buf), &vlen), -ENOENT);
    /* another depth of shard 0 (a split or merge we have not seen) */
    remote_depth_set(c.r, 0, 2);
    CHECK_RC(put1(c.s[0], k2, 9, "two", 3), -EBADSLT);
    CHECK_RC(shard_scan(c.s[0], NULL, 0, NULL, 0, count_fn, &seen), -EBADSLT);
    CHECK_RC(shard_get(c.s[0], k0, 9, 0, buf, sizeof(buf), &vlen), -EBADSLT);
    CHECK_RC(shard_get(lmdb[0], k2, 9, 0, buf, sizeof(buf), &vlen), -ENOENT);
    remote_depth_set(c.r, 0, 1);
    CHECK_RC(put1(c.s[0], k2, 9, "two", 3), 0);
    CHECK_RC(shard_scan(c.s[0], "K", 1, "L", 1, count_fn, &seen), 0);
    CHECKF(seen == 2, "%u placed records on shard 0 (want k0 and k2)", seen);
    c_layout_change(&c, lmdb, srv);
    client_close(&c);
    placement_set_key_hash(NULL);
}

static void cleanup(void)
{
    rm_rf(tmpdir);
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    run_fake();
    run_real();
    cleanup();
    return check_summary("shard_remote");
}
