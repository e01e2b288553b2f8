/* shard_remote.c -- the shard interface over HTTP (wire.h), with libcurl.
 *
 * A remote shard is a struct shard whose slots turn into one signed HTTP
 * request each (two or more for a get larger than WIRE_GET_MAX or a scan the
 * server cuts short) to the node that currently owns the shard. Everything
 * the shards share lives in struct remote: the config, the owner table, the
 * epoch we speak and a pool of curl easy handles.
 *
 * DESIGN
 * 1. A request takes an easy handle from the pool (or makes one), so each
 *    handle is used by one thread at a time, and puts it back afterwards.
 *    A handle keeps its connections alive, so a thread doing requests one
 *    after another reuses one TCP connection. Handles are made with
 *    CURLOPT_NOSIGNAL (we have threads and timeouts), TCP keep-alive, only
 *    http/https, and never follow redirects themselves.
 * 2. Every attempt is signed afresh (wire.h) for the URL it goes to (after
 *    a redirect: the new owner's), with X-Shardfs-Date time(NULL) and a new
 *    X-Shardfs-Nonce, so a node never sees one nonce twice from us; the
 *    body's X-Shardfs-Digest is computed once a request. "Expect:" is sent
 *    empty (no 100-continue round trip) and POST bodies are
 *    application/octet-stream. (curl's own resend of a request on a
 *    reused connection that died repeats the headers, nonce included: the
 *    node never read them the first time, or it would have answered.)
 * 3. A request has one deadline, cfg->timeout_ms (5000 when 0) after it
 *    starts. Every attempt gets the time that is left as its curl timeout,
 *    connect included; an attempt is not started with less than
 *    REMOTE_MIN_ATTEMPT_MS left. So a dead node costs at most timeout_ms plus
 *    one callback's worth, never a hang.
 * 4. A 307 carries the owner's URL with our path and query (Location) and
 *    the redirecting node's epoch. We remember the URL as the shard's owner
 *    (owner[]), adopt a newer epoch (a node redirects requests from an older
 *    epoch, possibly to itself, so without adopting it a client with an old
 *    config could never be served), re-sign and send again. At most
 *    REMOTE_MAX_REDIRECTS per request, within the same deadline; more is
 *    -EIO (following a map, 9, a pause and another round first).
 *    Redirects are followed for every operation: a 307 means the node did
 *    nothing.
 * 5. get, scan and stat are idempotent: a transport failure or a 503 is
 *    retried after 20, 40, 80 ... ms (at most REMOTE_BACKOFF_MAX_MS), as long
 *    as the deadline allows; then the last error is returned. apply and sync
 *    are sent once: a lost reply cannot be told from a lost request, so the
 *    caller gets -EIO (or the mapped status) and decides. Because curl itself
 *    resends a request whose reused keep-alive connection turned out dead,
 *    bodies go through a read callback whose rewind is refused for apply:
 *    curl then fails with CURLE_SEND_FAIL_REWIND (-EIO) instead of sending a
 *    batch a second time. (An empty sync body needs no rewind, and a second
 *    sync is harmless.)
 * 6. Replies have hard caps. A get reply is written straight into the
 *    caller's buffer and may not be longer than what was asked for; a scan
 *    reply may reach WIRE_SCAN_REPLY_MAX plus one largest record (the server
 *    cannot cut a record in two); anything else 64 KiB. Going over aborts
 *    the transfer: -EIO. Bodies of error replies are counted and dropped.
 * 7. Errors: transport failures map in remote_errno_of_curl(), HTTP statuses
 *    only through wire_errno_of_status(). A reply we cannot parse (a missing
 *    X-Shardfs-Vlen, a malformed scan reply, bad JSON) is -EIO.
 * 8. Dead nodes fail fast. A node (of cfg; a URL learnt from a redirect that
 *    is no configured node is not tracked) is marked down, with the time,
 *    when an attempt could not connect to it: refused, unreachable, or a
 *    connect that ran out a budget of at least REMOTE_DOWN_CONNECT_MS (or
 *    half of timeout_ms if that is less). Only
 *    then: an HTTP status, a reset or a timeout after the connection was
 *    made (on_prereq ran) say the node is there, perhaps slow or loaded, and
 *    marking it down would turn a slow request into failures of every
 *    request. While a node is down no request for it is retried, and its
 *    connect is bounded by REMOTE_DOWN_CONNECT_MS. After a refusal every
 *    request still makes its one attempt: a refusal costs a round trip, and
 *    so a restarted node is used by the very next request. After a connect
 *    timeout (a black hole, each try costs a second) requests fail at once
 *    with -EHOSTUNREACH except one every REMOTE_PROBE_MS, the probe. The
 *    probe is lazy, the request itself: no thread, so nothing to start after
 *    fork and nothing to do for a node nobody asks for. Any HTTP answer to
 *    any request marks the node up.
 *
 * 9. Following a shard map (remote_owner_set, an etcd map: failover.h). The
 *    owner of a shard is then the node the map names, updated as the map
 *    changes, and "none" between a primary's death and a promotion. A
 *    request for a shard with no owner, or whose owner is down (its connect
 *    failed: nothing was sent, so an apply may go again), or that got a 503
 *    (the node did nothing), waits for owner[] to change, at most
 *    REMOTE_PROBE_MS at a time, and tries again, until its deadline: then
 *    -EHOSTUNREACH. So a write that meets a dead primary goes to the
 *    promoted replica as soon as the map names it, within timeout_ms. More
 *    than REMOTE_MAX_REDIRECTS redirects (nodes whose maps disagree while a
 *    change reaches them) back off and start again, within the deadline.
 *
 * Threads: the pool, owner[], the interned URLs and the epoch are protected
 * by remote.lock; nothing else is shared. The only global state is
 * curl_global_init(), done once (pthread_once) and never undone.
 */
#include "shard_remote.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "clock.h"
#include "curl_defaults.h"
#include "stream.h"
#include "wire.h"

#define REMOTE_DEFAULT_TIMEOUT_MS 5000u
#define REMOTE_MAX_REDIRECTS 3
#define REMOTE_TOLD_NONE 0xff
#define REMOTE_BACKOFF_FIRST_MS 20
#define REMOTE_BACKOFF_MAX_MS 500
#define REMOTE_MIN_ATTEMPT_MS 10 /* no new attempt with less time left */
#define REMOTE_PROBE_MS 500         /* a down node is tried again this often */
#define REMOTE_TLS_LOG_MS 10000     /* a TLS failure with a node is logged this often */
#define REMOTE_DOWN_CONNECT_MS 1000 /* a connect timeout marks down from here */
#define REMOTE_SMALL_REPLY_MAX (64u << 10)
/* POST bodies up to this go out with the headers (curl's own limit for that). */
#define REMOTE_INLINE_BODY_MAX (64u << 10)
/* A scan reply is cut near WIRE_SCAN_REPLY_MAX, but always holds at least
 * one record, and one record can be as large as a value can be. */
#define REMOTE_SCAN_REPLY_MAX (WIRE_SCAN_REPLY_MAX + 8u + BATCH_KEY_MAX + BATCH_VALUE_MAX + 4096u)
#define REMOTE_SCAN_FIRST_LIMIT 256u /* records asked for in a scan's first page */
#define REMOTE_POOL_IDLE_MAX 64u     /* idle handles kept; more are cleaned up */
#define REMOTE_MULTI_IDLE_MAX 16u    /* idle multi handles kept (multi_take) */
#define REMOTE_MULTI_CONNS 32L       /* connections a multi handle keeps open */
#define REMOTE_URLS_MAX 1024u        /* distinct redirect targets remembered */
#define REMOTE_LOCATION_MAX (CONFIG_URL_MAX + WIRE_PATH_MAX + 64u)
/* Shard paths are short; a key API path is up to 4096 bytes, each of which
 * may be percent-encoded. */
#define REMOTE_PATH_QUERY_MAX (3u * 4096u + 64u)

/* ---- the shared state ---- */

/* An owner URL learnt from a redirect. Never freed before remote_free(), so
 * pointers handed out by remote_owner_url() stay valid. */
struct remote_url {
    struct remote_url *next;
    char url[];
};

/* A pooled easy handle. */
struct conn {
    struct conn *next;
    CURL *curl;
};

/* What we know of a configured node (DESIGN 8). */
struct node_health {
    int64_t down_ms;    /* CLOCK_MONOTONIC ms it was marked down; 0: up */
    time_t down_since;  /* the same moment on the wall clock, for status */
    int64_t probe_at;   /* while down: the next request is let through then */
    int refused;        /* the last failure was a refusal (an answer, in a way) */
    int64_t tls_said_ms; /* when a TLS failure with it was last logged */
};

struct remote {
    const struct config *cfg;
    int self; /* this node, or -1 */
    unsigned timeout_ms;
    pthread_mutex_t lock;
    /* protected by lock: */
    const char *owner[CONFIG_MAX_SHARDS]; /* cfg->nodes[].url or a remote_url */
    struct remote_url *urls;
    unsigned url_count;
    uint64_t epoch; /* max(cfg->epoch, epochs of redirects) */
    struct conn *idle;
    unsigned idle_count;
    CURLM *multi_idle[REMOTE_MULTI_IDLE_MAX]; /* fan-outs' multi handles (multi_take) */
    unsigned multi_count;
    struct node_health health[CONFIG_MAX_NODES];
    /* DESIGN 9: set by remote_owner_set(); under lock */
    int follow;
    uint64_t owner_gen[CONFIG_MAX_SHARDS]; /* bumped by every change of owner[] */
    /* Our layout: the local depth of each shard (wire.h, "Layouts"); set
     * from cfg, changed by remote_depth_set(); atomic bytes, no lock. */
    uint8_t depth[CONFIG_MAX_SHARDS];
    uint8_t told[CONFIG_MAX_SHARDS]; /* a 421's depth of the shard; REMOTE_TOLD_NONE */
    pthread_cond_t owner_cond;             /* owner[] changed (CLOCK_MONOTONIC) */
};

struct shard_remote {
    struct shard base;
    struct remote *r;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init_once(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- the handle pool ---- */

/* What every easy handle of ours is set to once. With https:// nodes the
 * peer's certificate and host name are checked (curl's default) against the
 * cluster's CA only, not the system's. */
static void handle_defaults(const struct remote *r, CURL *h)
{
    if (r->cfg->tls_ca[0]) {
        curl_easy_setopt(h, CURLOPT_CAINFO, r->cfg->tls_ca);
        curl_easy_setopt(h, CURLOPT_CAPATH, NULL);
    }
    curl_defaults(h);
}

static struct conn *pool_take(struct remote *r)
{
    struct conn *c;

    pthread_mutex_lock(&r->lock);
    c = r->idle;
    if (c) {
        r->idle = c->next;
        r->idle_count--;
    }
    pthread_mutex_unlock(&r->lock);
    if (c)
        return c;

    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->curl = curl_easy_init();
    if (!c->curl) {
        free(c);
        return NULL;
    }
    handle_defaults(r, c->curl);
    return c;
}

static void pool_put(struct remote *r, struct conn *c)
{
    if (!c)
        return;
    /* Nothing of the finished request may dangle in the handle. */
    curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, NULL);
    pthread_mutex_lock(&r->lock);
    if (r->idle_count < REMOTE_POOL_IDLE_MAX) {
        c->next = r->idle;
        r->idle = c;
        r->idle_count++;
        c = NULL;
    }
    pthread_mutex_unlock(&r->lock);
    if (c) {
        curl_easy_cleanup(c->curl);
        free(c);
    }
}

/* A multi handle for a fan-out. An easy handle added to a multi handle
 * uses the multi's connections, not its own, and curl_multi_cleanup()
 * closes them: a multi made for each fan-out (a directory listing) opened
 * a TCP connection to every node it asked, every time. The multi handles
 * are kept, so are their connections. NULL when out of memory. */
static CURLM *multi_take(struct remote *r)
{
    CURLM *m = NULL;

    pthread_mutex_lock(&r->lock);
    if (r->multi_count)
        m = r->multi_idle[--r->multi_count];
    pthread_mutex_unlock(&r->lock);
    if (!m && (m = curl_multi_init()))
        curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, REMOTE_MULTI_CONNS);
    return m;
}

static void multi_put(struct remote *r, CURLM *m)
{
    if (!m)
        return;
    pthread_mutex_lock(&r->lock);
    if (r->multi_count < REMOTE_MULTI_IDLE_MAX) {
        r->multi_idle[r->multi_count++] = m;
        m = NULL;
    }
    pthread_mutex_unlock(&r->lock);
    if (m)
        curl_multi_cleanup(m);
}

/* ---- one request ---- */

/* A response header we keep: the value, and whether it was too long. */
struct hdr {
    int set, trunc;
    char v[64];
};

struct request {
    /* filled by the caller */
    const char *method; /* "GET" or "POST" */
    char path_query[REMOTE_PATH_QUERY_MAX];
    const uint8_t *body;
    size_t body_len;
    int idempotent; /* retried, and its body may be resent */
    int fixed;      /* a 200 body goes to out[0..out_cap) */
    uint8_t *out;
    size_t out_cap;
    size_t reply_max;    /* cap of reply (and of dropped bodies) */
    int keep_body;       /* 0: count a 2xx body but do not keep it */
    remote_sink_fn sink; /* set: a 2xx body goes here, piece by piece */
    void *sink_ctx;
    int stream; /* bound the time without progress, not the whole exchange */
    unsigned limit_ms; /* > 0: the whole call gets at most this, not timeout_ms */
    int probe;  /* see the node as it is now: never failed fast (remote_ping) */
    long connect_max_ms; /* > 0: the connect phase gets at most this */

    /* the reply */
    long status;    /* final HTTP status */
    size_t out_len; /* bytes written to out */
    uint8_t *reply; /* malloc()ed 2xx body; caller frees */
    size_t reply_len, reply_cap;
    struct hdr vlen, more, join, errno_name, epoch, shard, depth;
    char location[REMOTE_LOCATION_MAX];
    int location_set, location_trunc;

    /* transfer state */
    long cur_status; /* status line of the response being read */
    size_t sent, dropped;
    unsigned sends;  /* times curl began to send this request (prereq) */
    int overflow, nomem, sink_err;
};

static void request_reset_reply(struct request *q)
{
    memset(&q->vlen, 0, sizeof(q->vlen));
    memset(&q->more, 0, sizeof(q->more));
    memset(&q->join, 0, sizeof(q->join));
    memset(&q->errno_name, 0, sizeof(q->errno_name));
    memset(&q->epoch, 0, sizeof(q->epoch));
    memset(&q->shard, 0, sizeof(q->shard));
    memset(&q->depth, 0, sizeof(q->depth));
    q->location[0] = '\0';
    q->location_set = q->location_trunc = 0;
    q->cur_status = 0;
    q->out_len = q->reply_len = q->dropped = 0;
}

static void request_free(struct request *q)
{
    free(q->reply);
    q->reply = NULL;
    q->reply_len = q->reply_cap = 0;
}

static size_t on_read(char *p, size_t size, size_t n, void *ud)
{
    struct request *q = ud;
    size_t len = size * n, left = q->body_len - q->sent;

    if (len > left)
        len = left;
    if (len)
        memcpy(p, q->body + q->sent, len);
    q->sent += len;
    return len;
}

/* curl asks to rewind the body when it must send it again (a reused
 * connection died under it). Allowed only for idempotent requests. */
static int on_seek(void *ud, curl_off_t offset, int origin)
{
    struct request *q = ud;

    if (!q->idempotent || origin != SEEK_SET || offset < 0 || (uint64_t)offset > q->body_len)
        return CURL_SEEKFUNC_FAIL;
    q->sent = (size_t)offset;
    return CURL_SEEKFUNC_OK;
}

/* curl is about to send the request: the second time for one exchange is
 * curl resending on its own (a reused connection died under the first),
 * allowed only for idempotent requests: an apply may have been applied. */
static int on_prereq(void *ud, char *ip, char *local_ip, int port, int local_port)
{
    struct request *q = ud;

    (void)ip, (void)local_ip, (void)port, (void)local_port;
    if (++q->sends > 1 && !q->idempotent)
        return CURL_PREREQFUNC_ABORT;
    return CURL_PREREQFUNC_OK;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct request *q = ud;
    size_t len = size * n;

    if (q->cur_status < 200 || q->cur_status > 299 || !q->keep_body) {
        /* Error bodies and bodies nobody reads: count and drop, up to the
         * reply's cap but at least a small reply's (a getv of a few bytes
         * still hears why it was refused). */
        size_t drop_max = q->reply_max > REMOTE_SMALL_REPLY_MAX ? q->reply_max
                                                                : REMOTE_SMALL_REPLY_MAX;

        if (q->dropped > drop_max || len > drop_max - q->dropped) {
            q->overflow = 1;
            return 0;
        }
        q->dropped += len;
        return len;
    }
    if (q->sink) {
        int rc = q->sink(q->sink_ctx, p, len);
        if (rc < 0) {
            q->sink_err = rc;
            return 0; /* abort the transfer */
        }
        return len;
    }
    if (q->fixed && q->cur_status == 200) {
        if (len > q->out_cap - q->out_len) {
            q->overflow = 1;
            return 0;
        }
        if (len)
            memcpy(q->out + q->out_len, p, len);
        q->out_len += len;
        return len;
    }
    if (len > q->reply_max - q->reply_len) {
        q->overflow = 1;
        return 0;
    }
    if (q->reply_len + len > q->reply_cap) {
        size_t cap = q->reply_cap ? q->reply_cap : 4096;
        while (cap < q->reply_len + len)
            cap = cap > q->reply_max / 2 ? q->reply_max : cap * 2;
        uint8_t *nb = realloc(q->reply, cap);
        if (!nb) {
            q->nomem = 1;
            return 0;
        }
        q->reply = nb;
        q->reply_cap = cap;
    }
    memcpy(q->reply + q->reply_len, p, len);
    q->reply_len += len;
    return len;
}

static void hdr_store(struct hdr *h, const char *v, size_t len)
{
    h->set = 1;
    h->trunc = len >= sizeof(h->v);
    if (h->trunc)
        len = sizeof(h->v) - 1;
    memcpy(h->v, v, len);
    h->v[len] = '\0';
}

static int hdr_is(const char *name, size_t nlen, const char *want)
{
    return nlen == strlen(want) && strncasecmp(name, want, nlen) == 0;
}

int remote_header_line(const char *p, size_t len, long *status, const char **name,
                       size_t *nlen, const char **value, size_t *vlen)
{
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        size_t i = 5;
        long st = 0;
        int digits = 0;

        while (i < len && p[i] != ' ')
            i++;
        while (++i < len && p[i] >= '0' && p[i] <= '9' && digits < 3) {
            st = st * 10 + (p[i] - '0');
            digits++;
        }
        *status = digits == 3 ? st : 0;
        return 1;
    }
    const char *colon = memchr(p, ':', len);
    if (!colon)
        return 0;
    const char *v = colon + 1, *end = p + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    *name = p;
    *nlen = (size_t)(colon - p);
    *value = v;
    *vlen = (size_t)(end - v);
    return 2;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct request *q = ud;
    size_t len = size * n, nlen, vlen;
    const char *name, *v;
    long st;

    switch (remote_header_line(p, len, &st, &name, &nlen, &v, &vlen)) {
    case 1:
        /* A new response (after a 1xx, or the first): forget the last one. */
        request_reset_reply(q);
        q->cur_status = st;
        return len;
    case 0:
        return len;
    }
    if (hdr_is(name, nlen, WIRE_HDR_VLEN))
        hdr_store(&q->vlen, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_MORE))
        hdr_store(&q->more, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_JOIN))
        hdr_store(&q->join, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_ERRNO))
        hdr_store(&q->errno_name, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_EPOCH))
        hdr_store(&q->epoch, v, vlen);
    else if (hdr_is(name, nlen, REMOTE_HDR_SHARD))
        hdr_store(&q->shard, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_DEPTH))
        hdr_store(&q->depth, v, vlen);
    else if (hdr_is(name, nlen, "Location")) {
        q->location_set = 1;
        q->location_trunc = vlen >= sizeof(q->location);
        if (!q->location_trunc) {
            memcpy(q->location, v, vlen);
            q->location[vlen] = '\0';
        }
    }
    return len;
}

/* A decimal header value; 0 or -EIO (missing, too long, not a number). */
static int hdr_u64(const struct hdr *h, uint64_t *out)
{
    uint64_t n = 0;

    if (!h->set || h->trunc || !h->v[0])
        return -EIO;
    for (const char *s = h->v; *s; s++) {
        if (*s < '0' || *s > '9')
            return -EIO;
        if (n > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return -EIO;
        n = n * 10 + (uint64_t)(*s - '0');
    }
    *out = n;
    return 0;
}

/* The one translation of transport failures (anything that is not an HTTP
 * status) into errno. A refused connection is -EHOSTUNREACH, like a host
 * that does not resolve: both say "that node is not serving", which is what
 * shard_remote.h promises for a dead node; -ECONNREFUSED would leak a detail
 * callers cannot act on differently. */
static int remote_errno_of_curl(CURLcode cc, const struct request *q)
{
    if (q && q->sink_err)
        return q->sink_err;
    if (q && q->nomem)
        return -ENOMEM;
    if (q && q->overflow)
        return -EIO;
    switch (cc) {
    case CURLE_OK:
        return 0;
    case CURLE_OPERATION_TIMEDOUT:
        return -ETIMEDOUT;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
        return -EHOSTUNREACH;
    case CURLE_OUT_OF_MEMORY:
        return -ENOMEM;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    default:
        return -EIO;
    }
}

/* Failures worth another attempt of an idempotent request. */
static int curl_retryable(CURLcode cc, const struct request *q)
{
    if (q->nomem || q->overflow || q->sink_err)
        return 0;
    switch (cc) {
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return 1;
    default:
        return 0;
    }
}

/* The signed headers (wire.h) of one request: see remote_sign() in the
 * header. The body's tag is keyed by the nonce, so it is computed for every
 * attempt. 0 or -ENOMEM. */
static int sign_headers(const struct remote *r, const char *base, uint64_t epoch,
                        const char *method, const char *path_query, const void *body,
                        size_t body_len, struct curl_slist **out)
{
    char auth[WIRE_AUTH_LEN + 1], line[WIRE_AUTH_LEN + 64], nonce[WIRE_NONCE_LEN + 1];
    char epoch_text[24], digest[WIRE_DIGEST_LEN + 1] = "";
    struct curl_slist *hdrs = NULL, *t;
    int post = strcmp(method, "POST") == 0, put = strcmp(method, "PUT") == 0;
    struct wire_signed ws = {.method = method,
                             .node_url = base,
                             .path_query = path_query,
                             .epoch = epoch_text,
                             .date = (int64_t)time(NULL),
                             .nonce = nonce,
                             .digest = digest,
                             .body_len = body_len};

    snprintf(epoch_text, sizeof(epoch_text), "%" PRIu64, epoch);
    /* No nonce (getrandom failed) or no MAC: an empty auth, which the node
     * refuses (401), rather than a request anyone could replay. */
    if (wire_nonce_new(nonce) < 0 ||
        wire_body_mac(r->cfg->secret, nonce, body, body_len, digest) < 0 ||
        wire_sign(r->cfg->secret, &ws, auth) < 0)
        auth[0] = '\0';

#define ADD_HDR(...)                                                                               \
    do {                                                                                           \
        snprintf(line, sizeof(line), __VA_ARGS__);                                                 \
        t = curl_slist_append(hdrs, line);                                                         \
        if (!t)                                                                                    \
            goto nomem;                                                                            \
        hdrs = t;                                                                                  \
    } while (0)
    ADD_HDR("%s: %s", WIRE_HDR_EPOCH, epoch_text);
    ADD_HDR("%s: %" PRId64, WIRE_HDR_DATE, ws.date);
    ADD_HDR("%s: %s", WIRE_HDR_NONCE, nonce);
    ADD_HDR("%s: %s", WIRE_HDR_DIGEST, digest);
    ADD_HDR("%s: %s", WIRE_HDR_AUTH, auth);
    ADD_HDR("Expect:");
    if (post || put)
        ADD_HDR("Content-Type: application/octet-stream");
#undef ADD_HDR
    *out = hdrs;
    return 0;

nomem:
    curl_slist_free_all(hdrs);
    *out = NULL;
    return -ENOMEM;
}

/* Set h up for one HTTP exchange of q with base (an owner URL) within
 * budget_ms; *hdrs must be given to exchange_finish() after the transfer.
 * CURLE_OK or CURLE_OUT_OF_MEMORY. */
static CURLcode exchange_setup(const struct remote *r, CURL *h, const char *base, uint64_t epoch,
                               struct request *q, int64_t budget_ms, struct curl_slist **hdrs_out)
{
    char url[CONFIG_URL_MAX + sizeof(q->path_query) + 1];
    struct curl_slist *hdrs = NULL;
    size_t blen = strlen(base);
    int post = strcmp(q->method, "POST") == 0, put = strcmp(q->method, "PUT") == 0;

    while (blen > 0 && base[blen - 1] == '/')
        blen--;
    snprintf(url, sizeof(url), "%.*s%s", (int)blen, base, q->path_query);
    if (sign_headers(r, base, epoch, q->method, q->path_query, q->body, q->body_len, &hdrs)) {
        q->nomem = 1;
        *hdrs_out = NULL;
        return CURLE_OUT_OF_MEMORY;
    }

    curl_easy_setopt(h, CURLOPT_URL, url);
    /* A pooled handle may carry the last request's method: start from GET. */
    curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, NULL);
    if (post && q->body_len <= REMOTE_INLINE_BODY_MAX) {
        /* From memory: curl sends it in the same packet as the headers, so
         * the node wakes once for the request, not twice. */
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)q->body_len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, q->body_len ? (const char *)q->body : "");
    } else if (post || put) {
        if (post) {
            curl_easy_setopt(h, CURLOPT_POST, 1L);
            curl_easy_setopt(h, CURLOPT_POSTFIELDS, NULL);
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)q->body_len);
        } else {
            curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
            curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)q->body_len);
        }
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, q);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, q);
    } else if (strcmp(q->method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (strcmp(q->method, "GET") != 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, q->method); /* DELETE */
    }
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, q);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, q);
    if (budget_ms < 1)
        budget_ms = 1; /* 0 would mean "no timeout" to curl */
    /* A stream (a large file through the API) may take long, but must not
     * stall: then the budget is for connecting and for each stretch
     * without a byte. */
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, q->stream ? 0L : (long)budget_ms);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, q->stream ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, q->stream ? (long)(budget_ms + 999) / 1000 : 0L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
                     q->connect_max_ms > 0 && q->connect_max_ms < budget_ms ? q->connect_max_ms
                                                                           : (long)budget_ms);

    curl_easy_setopt(h, CURLOPT_PREREQFUNCTION, on_prereq);
    curl_easy_setopt(h, CURLOPT_PREREQDATA, q);
    request_reset_reply(q);
    q->sent = 0;
    q->sends = 0;
    q->overflow = q->nomem = 0;
    q->status = 0;
    *hdrs_out = hdrs;
    return CURLE_OK;
}

/* After the transfer cc of q on h: the status, and nothing left dangling. */
static CURLcode exchange_finish(CURL *h, struct request *q, struct curl_slist *hdrs, CURLcode cc)
{
    if (cc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &q->status);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hdrs);
    return cc;
}

/* One HTTP exchange with base (an owner URL) within budget_ms. Returns the
 * curl code; q->status holds the HTTP status when it is CURLE_OK. */
static CURLcode exchange(const struct remote *r, CURL *h, const char *base, uint64_t epoch,
                         struct request *q, int64_t budget_ms)
{
    struct curl_slist *hdrs;
    CURLcode cc = exchange_setup(r, h, base, epoch, q, budget_ms, &hdrs);

    if (cc != CURLE_OK)
        return cc;
    return exchange_finish(h, q, hdrs, curl_easy_perform(h));
}

/* Remember a URL for good (see struct remote_url). Called with lock held;
 * NULL when there are too many or no memory. */
static const char *url_intern(struct remote *r, const char *url, size_t len)
{
    for (unsigned i = 0; i < r->cfg->node_count; i++)
        if (strlen(r->cfg->nodes[i].url) == len && memcmp(r->cfg->nodes[i].url, url, len) == 0)
            return r->cfg->nodes[i].url;
    for (struct remote_url *u = r->urls; u; u = u->next)
        if (strlen(u->url) == len && memcmp(u->url, url, len) == 0)
            return u->url;
    if (r->url_count >= REMOTE_URLS_MAX)
        return NULL;
    struct remote_url *u = malloc(sizeof(*u) + len + 1);
    if (!u)
        return NULL;
    memcpy(u->url, url, len);
    u->url[len] = '\0';
    u->next = r->urls;
    r->urls = u;
    r->url_count++;
    return u->url;
}

/* Act on a 307: the owner URL is Location without our path and query (so it
 * must end with them), http(s)://HOST..., no spaces or control characters.
 * Updates owner[shard] and the epoch. 0 or -EIO. */
static int follow_redirect(struct remote *r, unsigned shard, const struct request *q)
{
    size_t llen, plen = strlen(q->path_query), blen, scheme;
    uint64_t epoch = 0;

    if (!q->location_set || q->location_trunc)
        return -EIO;
    llen = strlen(q->location);
    if (llen <= plen || strcmp(q->location + llen - plen, q->path_query) != 0)
        return -EIO;
    blen = llen - plen;
    scheme = strncmp(q->location, "http://", 7) == 0    ? 7
             : strncmp(q->location, "https://", 8) == 0 ? 8
                                                        : 0;
    if (scheme == 0 || blen <= scheme || blen > CONFIG_URL_MAX)
        return -EIO;
    for (size_t i = 0; i < blen; i++) {
        unsigned char c = (unsigned char)q->location[i];
        if (c <= ' ' || c >= 0x7f)
            return -EIO;
    }
    if (q->epoch.set && hdr_u64(&q->epoch, &epoch) != 0)
        return -EIO;

    int rc = 0;
    pthread_mutex_lock(&r->lock);
    const char *u = url_intern(r, q->location, blen);
    if (u && r->owner[shard] != u) {
        r->owner[shard] = u;
        r->owner_gen[shard]++;
        pthread_cond_broadcast(&r->owner_cond);
    } else if (!u) {
        rc = -EIO;
    }
    if (epoch > r->epoch)
        r->epoch = epoch;
    pthread_mutex_unlock(&r->lock);
    return rc;
}

/* DESIGN 9: wait until owner[shard] is no longer the one of generation gen,
 * or REMOTE_PROBE_MS passed, or the deadline. 0, or -EHOSTUNREACH when the
 * deadline is too near for another attempt. */
static int owner_wait(struct remote *r, unsigned shard, uint64_t gen, int64_t deadline)
{
    int64_t now = clock_mono_ms(), until = now + REMOTE_PROBE_MS;
    struct timespec ts;

    if (now + REMOTE_MIN_ATTEMPT_MS >= deadline)
        return -EHOSTUNREACH;
    if (until > deadline - REMOTE_MIN_ATTEMPT_MS)
        until = deadline - REMOTE_MIN_ATTEMPT_MS;
    clock_deadline_in(&ts, until - now);
    pthread_mutex_lock(&r->lock);
    while (r->owner_gen[shard] == gen &&
           pthread_cond_timedwait(&r->owner_cond, &r->lock, &ts) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* A status that is no success, as errno (wire.h's table). */
static int status_errno(const struct request *q)
{
    if (q->status >= 200 && q->status <= 299)
        return 0;
    return wire_errno_of_status(q->status,
                                q->errno_name.set && !q->errno_name.trunc ? q->errno_name.v : NULL);
}

/* ---- node health (DESIGN 8) ---- */

/* The configured node whose URL is url (a pointer from owner[] or
 * cfg->nodes[]: url_intern() hands out the configured string for a
 * configured URL), or -1. */
static int node_of_url(const struct remote *r, const char *url)
{
    for (unsigned i = 0; i < r->cfg->node_count; i++)
        if (r->cfg->nodes[i].url == url)
            return (int)i;
    return -1;
}

/* May an attempt go to node (-1: untracked) now? 0: yes; 1: yes, as the
 * probe of a down node (its connect gets at most REMOTE_DOWN_CONNECT_MS);
 * -EHOSTUNREACH: no, it is down, did not even refuse (a connect timeout),
 * and another attempt probed it less than REMOTE_PROBE_MS ago. probe: always
 * let through (remote_ping). Called with lock held. */
static int health_gate(struct remote *r, int node, int probe)
{
    struct node_health *h;
    int64_t now;

    if (node < 0 || r->health[node].down_ms == 0)
        return 0;
    h = &r->health[node];
    now = clock_mono_ms();
    if (!probe && !h->refused && now < h->probe_at)
        return -EHOSTUNREACH;
    h->probe_at = now + REMOTE_PROBE_MS;
    return 1;
}

/* A TLS handshake that fails is a configuration problem (a certificate
 * the cluster's CA did not sign, a name it does not cover), not a dead
 * node: say so on stderr, at most every REMOTE_TLS_LOG_MS per node, since
 * the caller sees only EIO. */
static void tls_note(struct remote *r, int node, CURLcode cc)
{
    int64_t now = clock_mono_ms();
    int say;

    if (cc != CURLE_PEER_FAILED_VERIFICATION && cc != CURLE_SSL_CONNECT_ERROR &&
        cc != CURLE_SSL_CACERT_BADFILE && cc != CURLE_SSL_CERTPROBLEM)
        return;
    pthread_mutex_lock(&r->lock);
    say = r->health[node].tls_said_ms == 0 ||
          now - r->health[node].tls_said_ms >= REMOTE_TLS_LOG_MS;
    if (say)
        r->health[node].tls_said_ms = now;
    pthread_mutex_unlock(&r->lock);
    if (say)
        fprintf(stderr, "shardfs: node %s (%s): TLS failed: %s (is its certificate signed by "
                        "tls_ca and made for its url's host?)\n",
                r->cfg->nodes[node].name, r->cfg->nodes[node].url, curl_easy_strerror(cc));
}

/* An attempt on node ended with cc, its connect allowed connect_ms: an HTTP
 * answer marks the node up; a failure to connect at all marks it down
 * (keeping the time of a mark already there). Anything else tells nothing
 * (DESIGN 8). Returns 1 when this attempt marked the node down. */
static int health_note(struct remote *r, int node, CURLcode cc, const struct request *q,
                       int64_t connect_ms)
{
    /* A connect squeezed into the end of a request's time proves nothing. */
    int64_t floor_ms = r->timeout_ms / 2 < REMOTE_DOWN_CONNECT_MS ? r->timeout_ms / 2
                                                                  : REMOTE_DOWN_CONNECT_MS;
    int down;

    if (node < 0)
        return 0;
    tls_note(r, node, cc);
    down = cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST ||
           (cc == CURLE_OPERATION_TIMEDOUT && q->sends == 0 && connect_ms >= floor_ms);
    if (cc != CURLE_OK && !down)
        return 0;
    pthread_mutex_lock(&r->lock);
    struct node_health *h = &r->health[node];
    if (!down) {
        h->down_ms = 0;
    } else {
        int64_t now = clock_mono_ms();
        if (h->down_ms == 0) {
            h->down_ms = now;
            h->down_since = time(NULL);
        }
        h->probe_at = now + REMOTE_PROBE_MS;
        /* curl reports a connect that ran out of time as a timeout, so
         * this is a refusal or an unreachable host, seen quickly: the next
         * request may try again, at the cost of a round trip. */
        h->refused = cc == CURLE_COULDNT_CONNECT;
    }
    pthread_mutex_unlock(&r->lock);
    return down;
}

/* A 421 for shard: remember the depth its node has (remote_told_depth). */
static void note_told(struct remote *r, unsigned shard, const struct request *q)
{
    uint64_t d;

    if (hdr_u64(&q->depth, &d) == 0 && d < 32)
        __atomic_store_n(&r->told[shard], (uint8_t)d, __ATOMIC_RELEASE);
}

/* Send q to the owner of shard (or, with shard < 0, to node `node`),
 * following redirects and retrying idempotent requests, all within
 * timeout_ms. 0 when a 2xx status came back (q->status tells which), else
 * -errno. On return the caller owns q->reply (request_free). */
static int remote_call(struct remote *r, int shard, unsigned node, struct request *q)
{
    int64_t deadline = clock_mono_ms() +
                       (q->limit_ms && q->limit_ms < r->timeout_ms ? q->limit_ms : r->timeout_ms);
    int64_t backoff = REMOTE_BACKOFF_FIRST_MS;
    int redirects = 0, rc;
    struct conn *c;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* a round trip is waiting (shard.h) */
    c = pool_take(r);
    if (!c)
        return -ENOMEM;
    for (;;) {
        char base[CONFIG_URL_MAX + 1];
        uint64_t epoch, gen = 0;
        int target, gate, follow = 0;

        pthread_mutex_lock(&r->lock);
        target = shard >= 0 ? node_of_url(r, r->owner[shard]) : (int)node;
        snprintf(base, sizeof(base), "%s", shard >= 0 ? r->owner[shard] : r->cfg->nodes[node].url);
        epoch = r->epoch;
        gate = health_gate(r, target, q->probe);
        if (shard >= 0 && r->follow) {
            follow = 1;
            gen = r->owner_gen[shard];
        }
        pthread_mutex_unlock(&r->lock);
        if (!base[0] || gate < 0) {
            rc = -EHOSTUNREACH; /* no URL configured, or known to be down */
            if (follow && owner_wait(r, (unsigned)shard, gen, deadline) == 0)
                continue; /* DESIGN 9: wait for the map to name a live owner */
            break;
        }

        int64_t left = deadline - clock_mono_ms();
        if (left < 1) {
            rc = -ETIMEDOUT;
            break;
        }
        q->connect_max_ms = gate > 0 ? REMOTE_DOWN_CONNECT_MS : 0;
        CURLcode cc = exchange(r, c->curl, base, epoch, q, left);
        if (health_note(r, target, cc, q,
                        q->connect_max_ms > 0 && q->connect_max_ms < left ? q->connect_max_ms
                                                                          : left)) {
            /* Not retried: the next attempt is the probe's, REMOTE_PROBE_MS on. */
            rc = remote_errno_of_curl(cc, q);
            if (follow && owner_wait(r, (unsigned)shard, gen, deadline) == 0)
                continue; /* nothing was sent: DESIGN 9 */
            break;
        }
        if (cc == CURLE_OK && q->status == 307 && shard >= 0) {
            if (++redirects > REMOTE_MAX_REDIRECTS) {
                rc = -EIO;
                /* DESIGN 9: nodes whose maps disagree for a moment (a change
                 * on its way through their watches, as at a handover) send
                 * the request round; a 307 did nothing: wait, then again. */
                if (!follow || clock_mono_ms() + backoff + REMOTE_MIN_ATTEMPT_MS > deadline)
                    break;
                sleep_ms(backoff);
                backoff = backoff * 2 > REMOTE_BACKOFF_MAX_MS ? REMOTE_BACKOFF_MAX_MS : backoff * 2;
                redirects = 0;
                continue;
            }
            rc = follow_redirect(r, (unsigned)shard, q);
            if (rc)
                break;
            continue;
        }
        int retry;
        if (cc != CURLE_OK) {
            rc = remote_errno_of_curl(cc, q);
            retry = curl_retryable(cc, q);
        } else {
            rc = status_errno(q);
            if (rc == -EBADSLT && shard >= 0)
                note_told(r, (unsigned)shard, q);
            retry = q->status == 503;
            if (retry && follow) {
                /* the node did nothing; the map may name another soon */
                if (owner_wait(r, (unsigned)shard, gen, deadline) < 0)
                    break;
                continue;
            }
        }
        if (!retry || !q->idempotent)
            break;
        if (clock_mono_ms() + backoff + REMOTE_MIN_ATTEMPT_MS > deadline)
            break;
        sleep_ms(backoff);
        backoff = backoff * 2 > REMOTE_BACKOFF_MAX_MS ? REMOTE_BACKOFF_MAX_MS : backoff * 2;
    }
    pool_put(r, c);
    return rc;
}

/* ---- the shard slots ---- */

static const struct shard_ops shard_remote_ops;

static struct shard_remote *to_remote(struct shard *s)
{
    return (struct shard_remote *)s;
}

/* The path and query of op on the remote shard s; the data ops carry our
 * depth of the shard (wire.h, "Layouts"). */
static int shard_path(struct request *q, struct shard *s, enum wire_op op, const char *query)
{
    int layout = wire_op_has_layout(op);
    unsigned depth = __atomic_load_n(&to_remote(s)->r->depth[s->index], __ATOMIC_ACQUIRE);
    size_t size = sizeof(q->path_query);
    int n = wire_shard_path(q->path_query, size, s->index, op), k;

    if (n < 0)
        return n;
    if (query || layout) {
        k = snprintf(q->path_query + n, size - (size_t)n, "?%s%s", query ? query : "",
                     query && layout ? "&" : "");
        if (k < 0 || (size_t)k >= size - (size_t)n)
            return -ENAMETOOLONG;
        n += k;
    }
    if (layout && (size_t)snprintf(q->path_query + n, size - (size_t)n, "depth=%u", depth) >=
                      size - (size_t)n)
        return -ENAMETOOLONG;
    return 0;
}

/* The value is fetched in pieces of at most WIRE_GET_MAX; a value that
 * changes between two pieces gives a mix of both (a single piece is atomic). */
static int remote_get(struct shard *s, const void *key, size_t klen, size_t off, void *buf,
                      size_t buflen, size_t *vlen)
{
    struct shard_remote *sr = to_remote(s);
    size_t done = 0;
    uint64_t full = 0;
    char query[64];

    if (buflen > INT_MAX)
        buflen = INT_MAX;
    do {
        struct request q = {.method = "POST",
                            .body = key,
                            .body_len = klen,
                            .idempotent = 1,
                            .fixed = 1,
                            .keep_body = 1,
                            .reply_max = REMOTE_SMALL_REPLY_MAX};
        size_t want = buflen - done < WIRE_GET_MAX ? buflen - done : WIRE_GET_MAX;
        uint64_t at = (uint64_t)off + done;
        int rc;

        q.out = want ? (uint8_t *)buf + done : NULL;
        q.out_cap = want;
        snprintf(query, sizeof(query), "off=%" PRIu64 "&len=%zu", at, want);
        rc = shard_path(&q, s, WIRE_OP_GET, query);
        if (rc == 0)
            rc = remote_call(sr->r, (int)s->index, 0, &q);
        if (rc == 0 && (q.status != 200 || hdr_u64(&q.vlen, &full) != 0))
            rc = -EIO;
        /* More bytes than the value has past `at` is a broken server. */
        if (rc == 0 && q.out_len > (full > at ? full - at : 0))
            rc = -EIO;
        request_free(&q);
        if (rc)
            return rc;
        done += q.out_len;
        if (q.out_len < want || (uint64_t)off + done >= full)
            break;
    } while (done < buflen);
    if (vlen)
        *vlen = (size_t)full;
    return (int)done;
}

/* What a scan hands its records to: fn, or with a join jfn (shard.h). */
struct scan_sink {
    const struct shard_join *j; /* NULL: a plain scan */
    shard_scan_fn fn;
    shard_join_fn jfn;
    void *ctx;
    struct shard *s; /* for the joined keys of a reply without them */
    uint8_t *jbuf;   /* their values (SHARD_READ_VALUE_MAX bytes), lazily */
};

/* A scan request for [from, end) with a record limit (and the join of k, if
 * any); its body in *body (the caller frees it). 0 or -errno. */
static int scan_request(struct request *q, uint8_t **body, struct shard *s, const void *from,
                        size_t flen, const void *end, size_t elen, unsigned limit,
                        const struct scan_sink *k)
{
    size_t blen = wire_scan_request_size(flen, elen);
    char query[32 + 2 * SHARD_JOIN_PREFIX_MAX + 32];
    int n;

    *q = (struct request){
        .method = "POST", .idempotent = 1, .keep_body = 1, .reply_max = REMOTE_SCAN_REPLY_MAX};
    *body = malloc(blen ? blen : 1);
    if (!*body)
        return -ENOMEM;
    wire_scan_request_encode(*body, from, flen, end, elen);
    q->body = *body;
    q->body_len = blen;
    n = snprintf(query, sizeof(query), "limit=%u%s", limit, k->j ? "&" : "");
    if (k->j && wire_join_query(query + n, sizeof(query) - (size_t)n, k->j) != 0)
        return -EINVAL;
    return shard_path(q, s, WIRE_OP_SCAN, query);
}

/* The next record of a reply to k: wire_scan_reply_next's result. */
static int sink_next(struct scan_sink *k, const struct request *q, size_t *pos,
                     const uint8_t **key, size_t *klen, const uint8_t **val, size_t *vlen,
                     const uint8_t **jval, size_t *jlen)
{
    *jval = NULL;
    *jlen = 0;
    if (k->j && q->join.set && strcmp(q->join.v, "1") == 0)
        return wire_scan_join_reply_next(q->reply, q->reply_len, pos, key, klen, val, vlen, jval,
                                         jlen);
    return wire_scan_reply_next(q->reply, q->reply_len, pos, key, klen, val, vlen);
}

static int sink_deliver(struct scan_sink *k, const struct request *q, const uint8_t *key,
                        size_t klen, const uint8_t *val, size_t vlen, const uint8_t *jval,
                        size_t jlen)
{
    uint8_t *big = NULL;
    int rc;

    if (!k->j)
        return k->fn(k->ctx, key, klen, val, vlen);
    /* A node that predates joins sent the records alone: read the joined
     * keys here, after the reply (no request of the scan is in flight). */
    if (!(q->join.set && strcmp(q->join.v, "1") == 0)) {
        if (!k->jbuf && !(k->jbuf = malloc(SHARD_READ_VALUE_MAX)))
            return -ENOMEM;
        rc = shard_join_get(k->s, k->j, val, vlen, k->jbuf, &big, &jval, &jlen);
        if (rc)
            return rc;
    }
    rc = k->jfn(k->ctx, key, klen, val, vlen, jval, jlen);
    free(big);
    return rc;
}

/* Hand the records of one scan reply (for a scan from `from`) to k. On 0,
 * *nlen says where the next page starts: next[0..*nlen), or 0 when the scan
 * is complete. Otherwise fn's return (1: stopped) or -errno. */
static int scan_page(const struct request *q, const uint8_t *from, size_t flen, const void *end,
                     size_t elen, struct scan_sink *k, uint8_t next[BATCH_KEY_MAX], int *nlen)
{
    const uint8_t *key, *val, *jval, *last = NULL;
    size_t klen, vlen, jlen, lastlen = 0, pos = 0;
    int more = q->more.set && strcmp(q->more.v, "1") == 0, n, rc = 0;

    *nlen = 0;
    if (q->status != 200)
        return -EIO;
    while ((n = sink_next(k, q, &pos, &key, &klen, &val, &vlen, &jval, &jlen)) != 0) {
        /* Keys must come in order and from `from` on: a server that went
         * back could make us page forever. And before `end`: callers size
         * what they take from a key by the range they asked for. */
        if (n < 0 || (last ? batch_key_cmp(key, klen, last, lastlen) <= 0
                           : batch_key_cmp(key, klen, from ? from : (const uint8_t *)"", flen) < 0))
            return -EIO;
        if (end && batch_key_cmp(key, klen, end, elen) >= 0)
            return -EIO;
        last = key;
        lastlen = klen;
        rc = sink_deliver(k, q, key, klen, val, vlen, jval, jlen);
        if (rc)
            return rc;
    }
    if (!more)
        return 0;
    /* Cut short: go on after the last key. */
    n = last ? batch_key_after(last, lastlen, next) : -1;
    if (n < 0)
        return -EIO; /* "more" without a record: no progress possible */
    if (n > 0 && !(end && batch_key_cmp(next, (size_t)n, end, elen) >= 0))
        *nlen = n;
    return 0;
}

/* The pages of a scan from `from`, the first asking for `limit` records.
 * Each next page asks for 4 times more, up to WIRE_SCAN_LIMIT_MAX. The reply
 * of a page is fully received (and its handle back in the pool) before fn
 * sees its first record. */
static int scan_pages(struct shard *s, const void *start, size_t slen, const void *end, size_t elen,
                      unsigned limit, struct scan_sink *k)
{
    struct shard_remote *sr = to_remote(s);
    uint8_t next[BATCH_KEY_MAX], from[BATCH_KEY_MAX];
    size_t flen = slen;
    int nlen, rc;

    if (slen > sizeof(from))
        return -EINVAL;
    if (slen)
        memcpy(from, start, slen);
    k->s = s;
    for (;;) {
        struct request q;
        uint8_t *body = NULL;

        rc = scan_request(&q, &body, s, start ? from : NULL, flen, end, elen, limit, k);
        if (rc == 0)
            rc = remote_call(sr->r, (int)s->index, 0, &q);
        free(body);
        if (rc == 0)
            rc = scan_page(&q, start ? from : NULL, flen, end, elen, k, next, &nlen);
        request_free(&q);
        if (rc || nlen == 0)
            return rc;
        memcpy(from, next, (size_t)nlen);
        flen = (size_t)nlen;
        start = from;
        limit = limit * 4 > WIRE_SCAN_LIMIT_MAX ? WIRE_SCAN_LIMIT_MAX : limit * 4;
    }
}

/* The first page asks for REMOTE_SCAN_FIRST_LIMIT records: many scans stop
 * early ("is this directory empty?"). */
static int sink_scan(struct shard *s, const void *start, size_t slen, const void *end,
                     size_t elen, struct scan_sink *k)
{
    return scan_pages(s, start, slen, end ? end : NULL, end ? elen : 0, REMOTE_SCAN_FIRST_LIMIT,
                      k);
}

static int remote_scan(struct shard *s, const void *start, size_t slen, const void *end,
                       size_t elen, shard_scan_fn fn, void *ctx)
{
    struct scan_sink k = {.fn = fn, .ctx = ctx};

    return sink_scan(s, start, slen, end, elen, &k);
}

static int remote_scan_join(struct shard *s, const void *start, size_t slen, const void *end,
                            size_t elen, const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    struct scan_sink k = {.j = j, .jfn = fn, .ctx = ctx};
    int rc = sink_scan(s, start, slen, end, elen, &k);

    free(k.jbuf);
    return rc;
}

/* ---- fan-out: the first page of many scans at once ---- */

/* One shard of a shard_scan_many(). */
struct fan {
    struct shard *s;
    struct shard *orig; /* the shard as given (a failover switch: s is its remote) */
    struct remote *r; /* NULL: a local shard */
    struct request q;
    uint8_t *body;
    struct conn *c;
    struct curl_slist *hdrs;
    CURLcode cc;
    int running;
    int node; /* the owner as a configured node, or -1 (DESIGN 8) */
    int down; /* not sent: the node is known to be down */
};

/* Send f's request (f->q, made) on multi handle m. 0, or -errno (then
 * the op is done the ordinary way later). */
static int fan_send(CURLM *m, struct fan *f)
{
    struct remote *r = f->r;
    char base[CONFIG_URL_MAX + 1];
    uint64_t epoch;
    int gate;

    pthread_mutex_lock(&r->lock);
    snprintf(base, sizeof(base), "%s", r->owner[f->s->index]);
    epoch = r->epoch;
    f->node = node_of_url(r, r->owner[f->s->index]);
    gate = health_gate(r, f->node, 0);
    pthread_mutex_unlock(&r->lock);
    if (gate < 0) {
        f->down = 1;
        return gate;
    }
    f->q.connect_max_ms = gate > 0 ? REMOTE_DOWN_CONNECT_MS : 0;
    if (!base[0] || !(f->c = pool_take(r)))
        return -EHOSTUNREACH;
    if (exchange_setup(r, f->c->curl, base, epoch, &f->q, r->timeout_ms, &f->hdrs) != CURLE_OK)
        return -ENOMEM;
    curl_easy_setopt(f->c->curl, CURLOPT_PRIVATE, f);
    if (curl_multi_add_handle(m, f->c->curl) != CURLM_OK) {
        exchange_finish(f->c->curl, &f->q, f->hdrs, CURLE_FAILED_INIT);
        f->hdrs = NULL;
        return -ENOMEM;
    }
    f->running = 1;
    return 0;
}

/* Start f's first page on multi handle m: fan_send's result. */
static int fan_start(CURLM *m, struct fan *f, const void *start, size_t slen, const void *end,
                     size_t elen, const struct scan_sink *k)
{
    int rc = scan_request(&f->q, &f->body, f->s, start, slen, end, elen,
                          REMOTE_SCAN_FIRST_LIMIT, k);

    return rc ? rc : fan_send(m, f);
}

/* Drive m until every transfer is done; each bounds itself (timeout_ms). */
static void fan_run(CURLM *m)
{
    int running = 1, left;
    CURLMsg *msg;

    while (running) {
        if (curl_multi_perform(m, &running) != CURLM_OK)
            break;
        while ((msg = curl_multi_info_read(m, &left))) {
            struct fan *f = NULL;
            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&f);
            if (f)
                f->cc = msg->data.result;
        }
        if (running && curl_multi_poll(m, NULL, 0, 100, NULL) != CURLM_OK)
            break;
    }
}

/* A local shard's records for k. */
static int local_deliver(struct shard *s, const void *start, size_t slen, const void *end,
                         size_t elen, const struct scan_sink *k)
{
    if (k->j)
        return shard_scan_join(s, start, slen, end, elen, k->j, k->jfn, k->ctx);
    return shard_scan(s, start, slen, end, elen, k->fn, k->ctx);
}

/* Run m's transfers to their end, note each node's health and put every
 * handle back in its pool. */
static void fan_collect(CURLM *m, struct fan *fans, unsigned n)
{
    fan_run(m);
    for (unsigned i = 0; i < n; i++) {
        struct fan *f = &fans[i];
        if (f->running) {
            int64_t budget = f->r->timeout_ms;

            curl_multi_remove_handle(m, f->c->curl);
            exchange_finish(f->c->curl, &f->q, f->hdrs, f->cc);
            if (f->q.connect_max_ms > 0 && f->q.connect_max_ms < budget)
                budget = f->q.connect_max_ms;
            health_note(f->r, f->node, f->cc, &f->q, budget);
            f->running = 0;
        }
        if (f->c)
            pool_put(f->r, f->c);
        f->c = NULL;
        free(f->body);
        f->body = NULL;
    }
}

/* 1 if f's node is down or did not answer (timeout, refused): without the
 * map to follow (remote_owner_set) it is not asked again, since the caller
 * would wait twice the bound. */
static int fan_node_failed(const struct fan *f)
{
    return f->down || f->cc == CURLE_OPERATION_TIMEDOUT || f->cc == CURLE_COULDNT_CONNECT;
}

static int remote_follows(struct remote *r)
{
    int follow;

    pthread_mutex_lock(&r->lock);
    follow = r->follow;
    pthread_mutex_unlock(&r->lock);
    return follow;
}

/* Hand f's records to k: from its parallel first page if that worked, else
 * by an ordinary scan (which follows redirects and retries). */
static int fan_deliver(struct fan *f, const void *start, size_t slen, const void *end, size_t elen,
                       struct scan_sink *k)
{
    uint8_t next[BATCH_KEY_MAX];
    int nlen, rc;

    if (!f->r)
        return local_deliver(f->s, start, slen, end, elen, k);
    if (fan_node_failed(f)) {
        /* Following the map, the ordinary way waits for a new owner. */
        if (remote_follows(f->r))
            return local_deliver(f->orig, start, slen, end, elen, k);
        return f->down ? -EHOSTUNREACH : remote_errno_of_curl(f->cc, &f->q);
    }
    if (f->cc != CURLE_OK || f->q.status != 200)
        return sink_scan(f->s, start, slen, end, elen, k);
    k->s = f->s;
    rc = scan_page(&f->q, start, slen, end, elen, k, next, &nlen);
    if (rc || nlen == 0)
        return rc;
    return scan_pages(f->s, next, (size_t)nlen, end, elen, REMOTE_SCAN_FIRST_LIMIT * 4, k);
}

/* The remote shard behind s when an op on s goes there now (a failover
 * switch in the replica role, shard.h's remote_now), else s itself. */
static struct shard *fan_target(struct shard *s)
{
    struct shard *t = s->ops->remote_now ? s->ops->remote_now(s) : NULL;

    return t ? t : s;
}

/* The remote that an op on s goes to now (fan_target), or NULL. */
static struct remote *remote_now_of(struct shard *s)
{
    struct shard *t = fan_target(s);

    return t->ops == &shard_remote_ops ? to_remote(t)->r : NULL;
}

/* The remote of the first of shards that is remote now, or NULL. */
static struct remote *fan_remote(struct shard *const *shards, unsigned n)
{
    struct remote *r = NULL;

    for (unsigned i = 0; i < n && !r; i++)
        r = remote_now_of(shards[i]);
    return r;
}

static int scan_many(struct shard *const *shards, unsigned n, const void *start, size_t slen,
                     const void *end, size_t elen, struct scan_sink *k)
{
    struct fan *fans;
    CURLM *m;
    int rc = 0;

    struct remote *mr = NULL; /* the multi handle's pool */

    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* scans and round trips wait (shard.h) */
    fans = calloc(n ? n : 1, sizeof(*fans));
    mr = fan_remote(shards, n);
    m = mr ? multi_take(mr) : NULL;
    if (!end)
        elen = 0;
    for (unsigned i = 0; fans && i < n; i++) {
        struct shard *t = fan_target(shards[i]);

        fans[i].s = fans[i].orig = shards[i];
        fans[i].cc = CURLE_FAILED_INIT; /* "not done in parallel" until it is */
        fans[i].node = -1;
        if (t->ops == &shard_remote_ops) {
            fans[i].s = t;
            fans[i].r = to_remote(t)->r;
            if (m)
                fan_start(m, &fans[i], start, slen, end, elen, k);
        }
    }
    if (m && fans)
        fan_collect(m, fans, n);
    /* Every handle is back in its pool before fn runs: fn may do I/O. */
    for (unsigned i = 0; fans && i < n && rc == 0; i++)
        rc = fan_deliver(&fans[i], start, slen, end, elen, k);
    for (unsigned i = 0; fans && i < n; i++)
        request_free(&fans[i].q);
    if (!fans)
        for (unsigned i = 0; i < n && rc == 0; i++)
            rc = local_deliver(shards[i], start, slen, end, elen, k);
    multi_put(mr, m);
    free(fans);
    free(k->jbuf);
    k->jbuf = NULL;
    return rc < 0 ? rc : 0;
}

int shard_scan_many(struct shard *const *shards, unsigned n, const void *start, size_t slen,
                    const void *end, size_t elen, shard_scan_fn fn, void *ctx)
{
    struct scan_sink k = {.fn = fn, .ctx = ctx};

    return scan_many(shards, n, start, slen, end, elen, &k);
}

int shard_scan_many_join(struct shard *const *shards, unsigned n, const void *start, size_t slen,
                         const void *end, size_t elen, const struct shard_join *j,
                         shard_join_fn fn, void *ctx)
{
    struct scan_sink k = {.j = j, .jfn = fn, .ctx = ctx};

    if (shard_join_check(j) != 0)
        return -EINVAL;
    return scan_many(shards, n, start, slen, end, elen, &k);
}

/* A getv request for r[0..n) (checked by the caller), its body in *body
 * (the caller frees it). 0 or -errno. */
static int getv_request(struct request *q, uint8_t **body, struct shard *s,
                        const struct shard_read *r, unsigned n)
{
    size_t cap = 0;

    *q = (struct request){.method = "POST", .idempotent = 1, .keep_body = 1};
    for (unsigned i = 0; i < n; i++)
        cap += 12 + r[i].buflen;
    q->reply_max = cap;
    q->body_len = wire_getv_request_size(r, n);
    if (!(*body = malloc(q->body_len)))
        return -ENOMEM;
    wire_getv_request_encode(*body, r, n);
    q->body = *body;
    return shard_path(q, s, WIRE_OP_GETV, NULL);
}

int shard_get_many_fan(struct shard_reads *g, unsigned n)
{
    struct fan *fans;
    CURLM *m;

    struct remote *mr = NULL;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* round trips wait (shard.h) */
    fans = calloc(n ? n : 1, sizeof(*fans));
    for (unsigned i = 0; i < n && !mr; i++)
        mr = remote_now_of(g[i].s);
    m = mr ? multi_take(mr) : NULL;
    for (unsigned i = 0; fans && m && i < n; i++) {
        struct shard *t = fan_target(g[i].s);
        struct fan *f = &fans[i];

        f->cc = CURLE_FAILED_INIT;
        f->node = -1;
        g[i].rc = shard_reads_check(g[i].r, g[i].n);
        if (g[i].rc || t->ops != &shard_remote_ops)
            continue;
        f->s = t;
        f->r = to_remote(t)->r;
        if (getv_request(&f->q, &f->body, t, g[i].r, g[i].n) == 0)
            fan_send(m, f);
    }
    if (m && fans)
        fan_collect(m, fans, n);
    for (unsigned i = 0; i < n; i++) {
        struct fan *f = fans ? &fans[i] : NULL;

        if (f && f->r && f->cc == CURLE_OK && f->q.status == 200)
            g[i].rc = wire_getv_reply_decode(f->q.reply, f->q.reply_len, g[i].r, g[i].n) == 0
                          ? 0
                          : -EIO;
        else if (f && f->r && fan_node_failed(f) && !remote_follows(f->r))
            g[i].rc = f->down ? -EHOSTUNREACH : remote_errno_of_curl(f->cc, &f->q);
        else if (!(f && f->r && g[i].rc))
            g[i].rc = shard_get_many(g[i].s, g[i].r, g[i].n); /* local, or the ordinary way */
        if (f)
            request_free(&f->q);
    }
    multi_put(mr, m);
    free(fans);
    return 0;
}

/* The reads in one getv request; the reply is at most every value asked for
 * plus 12 bytes each. */
static int remote_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    struct shard_remote *sr = to_remote(s);
    uint8_t body[WIRE_GETV_REQUEST_MAX];
    size_t cap = 0;
    struct request q = {.method = "POST", .idempotent = 1, .keep_body = 1};
    int rc;

    /* shard_get_many() checked the list, so it fits; a caller that did not
     * gets -EINVAL rather than a write past body. */
    if (shard_reads_check(r, n) != 0)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++)
        cap += 12 + r[i].buflen;
    q.reply_max = cap;
    q.body = body;
    q.body_len = wire_getv_request_size(r, n);
    wire_getv_request_encode(body, r, n);
    rc = shard_path(&q, s, WIRE_OP_GETV, NULL);
    if (rc == 0)
        rc = remote_call(sr->r, (int)s->index, 0, &q);
    if (rc == 0 && (q.status != 200 || wire_getv_reply_decode(q.reply, q.reply_len, r, n) != 0))
        rc = -EIO;
    request_free(&q);
    return rc;
}

static int remote_apply(struct shard *s, const struct batch *b)
{
    struct shard_remote *sr = to_remote(s);
    struct request q = {.method = "POST",
                        .body = b->buf,
                        .body_len = b->len,
                        .keep_body = 1,
                        .reply_max = REMOTE_SMALL_REPLY_MAX};
    int rc;

    if (b->error)
        return b->error;
    if (b->count == 0)
        return 0; /* like shard_lmdb: nothing to do, nothing to ask */
    if (b->len > WIRE_BODY_MAX)
        return -EFBIG;
    rc = shard_path(&q, s, WIRE_OP_APPLY, NULL);
    if (rc == 0)
        rc = remote_call(sr->r, (int)s->index, 0, &q);
    request_free(&q);
    return rc;
}

static int remote_sync(struct shard *s)
{
    struct shard_remote *sr = to_remote(s);
    struct request q = {.method = "POST", .keep_body = 1, .reply_max = REMOTE_SMALL_REPLY_MAX};
    int rc = shard_path(&q, s, WIRE_OP_SYNC, NULL);

    if (rc == 0)
        rc = remote_call(sr->r, (int)s->index, 0, &q);
    request_free(&q);
    return rc;
}

static int json_u64(json_t *obj, const char *name, uint64_t *out)
{
    json_t *v = json_object_get(obj, name);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -EIO;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

static int remote_stat(struct shard *s, struct shard_stat *st)
{
    struct shard_remote *sr = to_remote(s);
    struct request q = {
        .method = "GET", .idempotent = 1, .keep_body = 1, .reply_max = REMOTE_SMALL_REPLY_MAX};
    struct shard_stat got;
    int rc = shard_path(&q, s, WIRE_OP_STAT, NULL);

    if (rc == 0)
        rc = remote_call(sr->r, (int)s->index, 0, &q);
    if (rc == 0 && q.status != 200)
        rc = -EIO;
    if (rc == 0) {
        json_t *root = json_loadb((const char *)q.reply, q.reply_len, 0, NULL);
        if (!json_is_object(root) || json_u64(root, "records", &got.records) ||
            json_u64(root, "bytes", &got.bytes) || json_u64(root, "pending", &got.pending))
            rc = -EIO;
        json_decref(root);
    }
    request_free(&q);
    if (rc == 0)
        *st = got;
    return rc;
}

/* Nothing to flush: every applied batch is already on its node. */
static void remote_close(struct shard *s)
{
    free(to_remote(s));
}

static const struct shard_ops shard_remote_ops = {
    .get = remote_get,
    .get_many = remote_get_many,
    .scan = remote_scan,
    .scan_join = remote_scan_join,
    .apply = remote_apply,
    .sync = remote_sync,
    .stat = remote_stat,
    .close = remote_close,
};

/* ---- the public functions ---- */

int remote_new(const struct config *cfg, int self, struct remote **out, char *err, size_t errlen)
{
    struct remote *r;

    *out = NULL;
    if (!cfg || cfg->shard_count == 0 || cfg->shard_count > CONFIG_MAX_SHARDS ||
        cfg->node_count > CONFIG_MAX_NODES || self < -1 ||
        (self >= 0 && (unsigned)self >= cfg->node_count)) {
        snprintf(err, errlen, "remote: bad config or node %d", self);
        return -EINVAL;
    }
    pthread_once(&curl_once, curl_init_once);
    if (curl_init_rc != CURLE_OK) {
        snprintf(err, errlen, "curl_global_init: %s", curl_easy_strerror(curl_init_rc));
        return -EIO;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "remote: out of memory");
        return -ENOMEM;
    }
    r->cfg = cfg;
    r->self = self;
    r->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : REMOTE_DEFAULT_TIMEOUT_MS;
    r->epoch = cfg->epoch;
    memcpy(r->depth, cfg->depth, cfg->shard_count);
    memset(r->told, REMOTE_TOLD_NONE, sizeof(r->told));
    for (unsigned i = 0; i < cfg->shard_count; i++) {
        int o = cfg->owner[i];
        r->owner[i] = o >= 0 && (unsigned)o < cfg->node_count ? cfg->nodes[o].url : "";
    }
    pthread_mutex_init(&r->lock, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&r->owner_cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    *out = r;
    return 0;
}

void remote_free(struct remote *r)
{
    if (!r)
        return;
    while (r->idle) {
        struct conn *c = r->idle;
        r->idle = c->next;
        curl_easy_cleanup(c->curl);
        free(c);
    }
    while (r->multi_count)
        curl_multi_cleanup(r->multi_idle[--r->multi_count]);
    while (r->urls) {
        struct remote_url *u = r->urls;
        r->urls = u->next;
        free(u);
    }
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->owner_cond);
    free(r);
}

void remote_depth_set(struct remote *r, unsigned index, unsigned depth)
{
    if (index < CONFIG_MAX_SHARDS && depth < 32) {
        __atomic_store_n(&r->depth[index], (uint8_t)depth, __ATOMIC_RELEASE);
        __atomic_store_n(&r->told[index], REMOTE_TOLD_NONE, __ATOMIC_RELEASE);
    }
}

int remote_told_depth(struct remote *r, unsigned index)
{
    uint8_t d;

    if (index >= CONFIG_MAX_SHARDS)
        return -1;
    d = __atomic_load_n(&r->told[index], __ATOMIC_ACQUIRE);
    return d == REMOTE_TOLD_NONE ? -1 : d;
}

void remote_owner_set(struct remote *r, unsigned index, int node)
{
    const char *u;

    if (index >= CONFIG_MAX_SHARDS)
        return;
    u = node >= 0 && (unsigned)node < r->cfg->node_count ? r->cfg->nodes[node].url : "";
    pthread_mutex_lock(&r->lock);
    r->follow = 1;
    if (r->owner[index] != u) {
        r->owner[index] = u;
        r->owner_gen[index]++;
        pthread_cond_broadcast(&r->owner_cond);
    }
    pthread_mutex_unlock(&r->lock);
}

int shard_remote_open(struct remote *r, unsigned index, struct shard **out)
{
    struct shard_remote *sr;

    *out = NULL;
    if (index >= CONFIG_MAX_SHARDS)
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    if (!r->owner[index]) /* split off a base shard: beside it until told */
        r->owner[index] = r->owner[index & (r->cfg->shard_count - 1)];
    pthread_mutex_unlock(&r->lock);
    sr = calloc(1, sizeof(*sr));
    if (!sr)
        return -ENOMEM;
    sr->base.ops = &shard_remote_ops;
    sr->base.index = index;
    sr->r = r;
    *out = &sr->base;
    return 0;
}

/* The pointer stays valid until remote_free(): URLs learnt from redirects
 * are kept, never freed or overwritten, while the remote lives. */
const char *remote_owner_url(struct remote *r, unsigned index)
{
    const char *u;

    if (index >= CONFIG_MAX_SHARDS)
        return NULL;
    pthread_mutex_lock(&r->lock);
    u = r->owner[index];
    pthread_mutex_unlock(&r->lock);
    return u;
}

int remote_api_call(struct remote *r, unsigned node, const char *method, const char *path_query,
                    const void *body, size_t len, remote_sink_fn sink, void *ctx, long *status)
{
    struct request q = {.method = method,
                        .body = body,
                        .body_len = len,
                        .keep_body = 1,
                        .sink = sink,
                        .sink_ctx = ctx,
                        .stream = 1,
                        .reply_max = 1u << 20};
    int rc;

    if (node >= r->cfg->node_count)
        return -EINVAL;
    if (strlen(path_query) >= sizeof(q.path_query))
        return -ENAMETOOLONG;
    strcpy(q.path_query, path_query);
    if (!sink)
        q.keep_body = 0;
    rc = remote_call(r, -1, node, &q);
    request_free(&q);
    if (status)
        *status = q.status;
    return rc;
}

int remote_push(void *ctx, unsigned shard, int node, uint64_t epoch, const struct stream_pos *after,
                const void *body, size_t len, unsigned limit_ms, struct stream_pos *pos,
                uint64_t *synced)
{
    struct remote *r = ctx;
    struct request q = {.method = "POST",
                        .body = body,
                        .body_len = len,
                        .keep_body = 1,
                        .limit_ms = limit_ms,
                        .reply_max = REMOTE_SMALL_REPLY_MAX};
    json_t *doc = NULL, *v;
    const char *text;
    int n, rc;

    if (node < 0 || (unsigned)node >= r->cfg->node_count || r->self < 0)
        return -EINVAL;
    if (len > WIRE_BODY_MAX)
        return -EFBIG;
    n = wire_shard_path(q.path_query, sizeof(q.path_query), shard, WIRE_OP_PUSH);
    if (n < 0)
        return n;
    if ((size_t)snprintf(q.path_query + n, sizeof(q.path_query) - (size_t)n,
                         "?node=%s&epoch=%" PRIu64 "&after=" STREAM_POS_FMT,
                         r->cfg->nodes[r->self].name, epoch, after->epoch, after->lsn,
                         after->check) >= sizeof(q.path_query) - (size_t)n)
        return -ENAMETOOLONG;
    rc = remote_call(r, -1, (unsigned)node, &q);
    if (rc == 0) {
        doc = json_loadb((const char *)q.reply, q.reply_len, 0, NULL);
        v = json_object_get(doc, "synced");
        text = json_string_value(json_object_get(doc, "position"));
        if (!text || stream_pos_parse(text, pos) < 0 || !json_is_integer(v) ||
            json_integer_value(v) < 0)
            rc = -EIO;
        else
            *synced = (uint64_t)json_integer_value(v);
    }
    json_decref(doc);
    request_free(&q);
    return rc;
}

/* ---- many API calls on one thread ---- */

struct loop_slot {
    struct remote_api_req *call;
    struct request q;
    CURL *curl;
    struct curl_slist *hdrs;
};

/* Start the next call in slot sl. 1 when started, 0 when there is no next
 * call, -ENOMEM. A call that cannot start is done at once with its error. */
static int loop_start(struct remote *r, CURLM *m, struct loop_slot *sl,
                      struct remote_api_req *(*next)(void *),
                      void (*done)(void *, struct remote_api_req *), void *ctx)
{
    for (;;) {
        struct remote_api_req *call = next(ctx);
        int rc = 0;

        if (!call)
            return 0;
        sl->call = call;
        sl->q = (struct request){.method = call->method, .body = call->body,
                                 .body_len = call->len, .keep_body = call->sink != NULL,
                                 .sink = call->sink, .sink_ctx = call->sink_ctx, .stream = 1,
                                 .reply_max = 1u << 20};
        if (call->node >= r->cfg->node_count || !r->cfg->nodes[call->node].url[0])
            rc = call->node >= r->cfg->node_count ? -EINVAL : -EHOSTUNREACH;
        else if (strlen(call->path_query) >= sizeof(sl->q.path_query))
            rc = -ENAMETOOLONG;
        if (rc == 0) {
            uint64_t epoch;

            pthread_mutex_lock(&r->lock);
            epoch = r->epoch;
            pthread_mutex_unlock(&r->lock);
            strcpy(sl->q.path_query, call->path_query);
            if (exchange_setup(r, sl->curl, r->cfg->nodes[call->node].url, epoch, &sl->q,
                               r->timeout_ms, &sl->hdrs) != CURLE_OK)
                rc = -ENOMEM;
        }
        if (rc == 0) {
            curl_easy_setopt(sl->curl, CURLOPT_PRIVATE, sl);
            if (curl_multi_add_handle(m, sl->curl) == CURLM_OK)
                return 1;
            exchange_finish(sl->curl, &sl->q, sl->hdrs, CURLE_FAILED_INIT);
            rc = -ENOMEM;
        }
        request_free(&sl->q);
        call->rc = rc;
        call->status = 0;
        call->shard = -1;
        done(ctx, call);
        if (rc == -ENOMEM)
            return rc;
    }
}

/* The transfer of slot sl ended with cc: tell the caller. */
static void loop_finish(CURLM *m, struct loop_slot *sl, CURLcode cc,
                        void (*done)(void *, struct remote_api_req *), void *ctx)
{
    uint64_t shard;

    curl_multi_remove_handle(m, sl->curl);
    exchange_finish(sl->curl, &sl->q, sl->hdrs, cc);
    sl->hdrs = NULL;
    sl->call->rc = cc != CURLE_OK ? remote_errno_of_curl(cc, &sl->q) : status_errno(&sl->q);
    sl->call->status = sl->q.status;
    sl->call->shard = hdr_u64(&sl->q.shard, &shard) == 0 && shard <= LONG_MAX ? (long)shard : -1;
    request_free(&sl->q);
    done(ctx, sl->call);
    sl->call = NULL;
}

int remote_api_loop(struct remote *r, unsigned parallel,
                    struct remote_api_req *(*next)(void *ctx),
                    void (*done)(void *ctx, struct remote_api_req *call), void *ctx)
{
    struct loop_slot *slots = NULL;
    CURLM *m = NULL;
    unsigned active = 0;
    int rc = 0, more = 1;

    if (parallel == 0 || parallel > REMOTE_LOOP_MAX)
        return -EINVAL;
    slots = calloc(parallel, sizeof(*slots));
    m = curl_multi_init();
    if (!slots || !m) {
        rc = -ENOMEM;
        goto out;
    }
    for (unsigned i = 0; i < parallel; i++) {
        slots[i].curl = curl_easy_init();
        if (!slots[i].curl) {
            rc = -ENOMEM;
            goto out;
        }
        handle_defaults(r, slots[i].curl);
    }
    for (unsigned i = 0; more && i < parallel; i++) {
        int st = loop_start(r, m, &slots[i], next, done, ctx);
        if (st < 0)
            rc = st;
        more = st > 0;
        active += st > 0;
    }
    while (active) {
        int running, left;
        CURLMsg *msg;

        if (curl_multi_perform(m, &running) != CURLM_OK) {
            rc = -EIO;
            break;
        }
        while ((msg = curl_multi_info_read(m, &left))) {
            struct loop_slot *sl = NULL;
            int st;

            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&sl);
            loop_finish(m, sl, msg->data.result, done, ctx);
            active--;
            st = more ? loop_start(r, m, sl, next, done, ctx) : 0;
            if (st < 0)
                rc = st;
            more = st > 0;
            active += st > 0;
        }
        if (active && curl_multi_poll(m, NULL, 0, 100, NULL) != CURLM_OK) {
            rc = -EIO;
            break;
        }
    }
out:
    for (unsigned i = 0; slots && i < parallel; i++) {
        if (slots[i].call)
            loop_finish(m, &slots[i], CURLE_ABORTED_BY_CALLBACK, done, ctx);
        if (slots[i].curl)
            curl_easy_cleanup(slots[i].curl);
    }
    if (m)
        curl_multi_cleanup(m);
    free(slots);
    return rc;
}

int remote_node_down(struct remote *r, unsigned node, time_t *since)
{
    int down;

    if (node >= r->cfg->node_count)
        return -EINVAL;
    pthread_mutex_lock(&r->lock);
    down = r->health[node].down_ms != 0;
    if (down && since)
        *since = r->health[node].down_since;
    pthread_mutex_unlock(&r->lock);
    return down;
}

/* One attempt, no retry: the point is to see the node as it is now. The
 * reply body (the node's config) is read and dropped, up to a cap. */
int remote_ping(struct remote *r, unsigned node, double *rtt_ms)
{
    struct request q = {.method = "GET",
                        .path_query = "/v1/config",
                        .keep_body = 0,
                        .probe = 1,
                        .reply_max = 1u << 20};
    struct timespec a, b;
    int rc;

    if (node >= r->cfg->node_count)
        return -EINVAL;
    clock_gettime(CLOCK_MONOTONIC, &a);
    rc = remote_call(r, -1, node, &q);
    clock_gettime(CLOCK_MONOTONIC, &b);
    request_free(&q);
    if (rc == 0 && q.status != 200)
        rc = -EIO;
    if (rc == 0 && rtt_ms)
        *rtt_ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    return rc;
}

/* ---- for modules with transfers of their own ---- */

void remote_curl_defaults(struct remote *r, CURL *h)
{
    handle_defaults(r, h);
}

int remote_sign(struct remote *r, const char *base, const char *method, const char *path_query,
                const void *body, size_t len, struct curl_slist **out)
{
    uint64_t epoch;

    pthread_mutex_lock(&r->lock);
    epoch = r->epoch;
    pthread_mutex_unlock(&r->lock);
    return sign_headers(r, base, epoch, method, path_query, body, len, out);
}
