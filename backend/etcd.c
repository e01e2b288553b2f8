/* etcd.c -- the etcd v3 JSON gateway client (etcd.h).
 *
 * DESIGN
 * 1. Every call is one POST of a JSON body to <endpoint>/v3/..., answered by
 *    one JSON object (watch: a stream of them). Bytes (keys, values,
 *    range_end) go base64 (OpenSSL's EVP_EncodeBlock/EVP_DecodeBlock);
 *    int64 numbers go out as JSON strings, as the gateway writes them, and
 *    are read from strings or integers. Fields at their default (0, false,
 *    empty, PUT) are left out by the gateway, so a missing field is 0.
 * 2. A call has one deadline, timeout_ms after it starts. It tries the
 *    current endpoint; if the attempt did not connect, the next one, each
 *    with the time left split evenly over the endpoints not yet tried as its
 *    connect timeout, so a silent endpoint cannot eat the whole budget.
 *    After a success the endpoint that answered becomes the current one.
 * 3. Replies are collected in a buffer capped at ETCD_REPLY_MAX. A non-2xx
 *    reply carries {"error", "code"}: the gRPC code maps in
 *    etcd_errno_of_grpc(); the message goes to err.
 * 4. Watch: the gateway answers POST /v3/watch with a chunked stream of
 *    {"result": WatchResponse} objects, one after another, split across
 *    curl's write callbacks at arbitrary bytes. The write callback appends
 *    to a buffer and cuts it into whole objects by counting braces outside
 *    strings (JSON strings may hold braces and escaped quotes), parsing and
 *    delivering each as it completes.
 */
#include "etcd.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "clock.h"
#include "curl_defaults.h"

#define ETCD_POOL_MAX 8 /* idle curl handles kept */

struct etcd {
    char *endpoint[ETCD_MAX_ENDPOINTS]; /* base URLs, no trailing '/' */
    unsigned nendpoints;
    unsigned timeout_ms;
    pthread_mutex_t lock;
    unsigned current;            /* protected by lock: endpoint to try first */
    CURL *idle[ETCD_POOL_MAX];   /* protected by lock */
    unsigned nidle;              /* protected by lock */
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- errors */

/* gRPC status code -> -errno: the only place they are translated. */
static int etcd_errno_of_grpc(long code)
{
    switch (code) {
    case 3: /* INVALID_ARGUMENT */
    case 9: /* FAILED_PRECONDITION */
        return -EINVAL;
    case 4: /* DEADLINE_EXCEEDED */
        return -ETIMEDOUT;
    case 5: /* NOT_FOUND */
        return -ENOENT;
    case 6: /* ALREADY_EXISTS */
        return -EEXIST;
    case 7:  /* PERMISSION_DENIED */
    case 16: /* UNAUTHENTICATED */
        return -EACCES;
    case 8: /* RESOURCE_EXHAUSTED: etcd's "database space exceeded" */
        return -ENOSPC;
    case 11: /* OUT_OF_RANGE: a compacted or future revision */
        return -ERANGE;
    case 14: /* UNAVAILABLE: no leader, etcd stopping */
        return -EAGAIN;
    default:
        return -EIO;
    }
}

/* ---- base64 and JSON helpers */

/* A NUL-terminated base64 string of p[0..n), or NULL (out of memory). */
static char *b64_encode(const void *p, size_t n)
{
    if (n > INT_MAX / 2)
        return NULL;
    char *s = malloc(4 * ((n + 2) / 3) + 1);
    if (!s)
        return NULL;
    EVP_EncodeBlock((unsigned char *)s, p, (int)n);
    return s;
}

/* Decode base64 s into a malloc'd buffer (NUL-terminated past *len). -EIO
 * when s is no base64. EVP_DecodeBlock counts padding as zero bytes, so the
 * '=' at the end are taken off the length. */
static int b64_decode(const char *s, void **out, size_t *len)
{
    size_t n = strlen(s);
    if (n % 4 != 0 || n > INT_MAX)
        return -EIO;
    unsigned char *d = malloc(n / 4 * 3 + 1);
    if (!d)
        return -ENOMEM;
    int got = EVP_DecodeBlock(d, (const unsigned char *)s, (int)n);
    if (got < 0) {
        free(d);
        return -EIO;
    }
    size_t pad = (n >= 1 && s[n - 1] == '=') + (n >= 2 && s[n - 2] == '=');
    *len = (size_t)got - pad;
    d[*len] = 0;
    *out = d;
    return 0;
}

/* Set obj[name] to base64 of p[0..n). -ENOMEM. */
static int json_set_bytes(json_t *obj, const char *name, const void *p, size_t n)
{
    char *s = b64_encode(p, n);
    if (!s)
        return -ENOMEM;
    int rc = json_object_set_new(obj, name, json_string(s)) == 0 ? 0 : -ENOMEM;
    free(s);
    return rc;
}

static int json_set_int64(json_t *obj, const char *name, int64_t v)
{
    char buf[24];
    snprintf(buf, sizeof(buf), "%" PRId64, v);
    return json_object_set_new(obj, name, json_string(buf)) == 0 ? 0 : -ENOMEM;
}

/* obj[name] as an int64: a decimal string or an integer; missing is 0.
 * -EIO when it is something else. */
static int json_get_int64(const json_t *obj, const char *name, int64_t *v)
{
    const json_t *j = json_object_get(obj, name);
    *v = 0;
    if (!j)
        return 0;
    if (json_is_integer(j)) {
        *v = json_integer_value(j);
        return 0;
    }
    if (!json_is_string(j))
        return -EIO;
    const char *s = json_string_value(j);
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return -EIO;
    *v = x;
    return 0;
}

/* obj[name] (base64) decoded into a malloc'd buffer; missing is empty. */
static int json_get_bytes(const json_t *obj, const char *name, void **p, size_t *n)
{
    const json_t *j = json_object_get(obj, name);
    if (!j)
        return b64_decode("", p, n);
    if (!json_is_string(j))
        return -EIO;
    return b64_decode(json_string_value(j), p, n);
}

/* The key after every key starting with prefix: prefix with its last byte
 * below 0xff incremented and what follows dropped; "\0" (every key to the
 * end) when there is none (empty prefix or all 0xff), as etcd defines
 * range_end. Sets obj["range_end"]. */
static int json_set_prefix_end(json_t *obj, const void *prefix, size_t plen)
{
    const unsigned char *p = prefix;
    size_t n = plen;
    while (n > 0 && p[n - 1] == 0xff)
        n--;
    if (n == 0) {
        unsigned char zero = 0;
        return json_set_bytes(obj, "range_end", &zero, 1);
    }
    unsigned char *end = malloc(n);
    if (!end)
        return -ENOMEM;
    memcpy(end, p, n);
    end[n - 1]++;
    int rc = json_set_bytes(obj, "range_end", end, n);
    free(end);
    return rc;
}

/* A KeyValue object -> struct etcd_kv, with key and value decoded into
 * *kbuf and *vbuf (malloc'd, the caller frees them whatever is returned). */
static int kv_of_json(const json_t *j, struct etcd_kv *kv, void **kbuf, void **vbuf)
{
    int rc;
    memset(kv, 0, sizeof(*kv));
    *kbuf = *vbuf = NULL;
    if (!json_is_object(j))
        return -EIO;
    if ((rc = json_get_bytes(j, "key", kbuf, &kv->klen)) < 0 ||
        (rc = json_get_bytes(j, "value", vbuf, &kv->vlen)) < 0 ||
        (rc = json_get_int64(j, "create_revision", &kv->create_revision)) < 0 ||
        (rc = json_get_int64(j, "mod_revision", &kv->mod_revision)) < 0 ||
        (rc = json_get_int64(j, "version", &kv->version)) < 0 ||
        (rc = json_get_int64(j, "lease", &kv->lease)) < 0)
        return rc;
    kv->key = *kbuf;
    kv->value = *vbuf;
    return 0;
}

/* Each KeyValue of the array kvs to fn. The last key seen is left in
 * *last and *lastlen (malloc'd; the caller frees) when last is not NULL. */
static int kvs_each(const json_t *kvs, int (*fn)(void *, const struct etcd_kv *), void *ctx,
                    void **last, size_t *lastlen)
{
    size_t i;
    const json_t *j;
    if (!kvs)
        return 0;
    if (!json_is_array(kvs))
        return -EIO;
    json_array_foreach(kvs, i, j)
    {
        struct etcd_kv kv;
        void *k, *v;
        int rc = kv_of_json(j, &kv, &k, &v);
        if (rc == 0 && fn)
            rc = fn(ctx, &kv);
        free(v);
        if (last && rc >= 0) {
            free(*last);
            *last = k;
            *lastlen = kv.klen;
        } else {
            free(k);
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- transport */

struct reply {
    char *buf;
    size_t len, cap;
    int over; /* went over ETCD_REPLY_MAX */
};

static int reply_append(struct reply *r, const char *p, size_t n)
{
    if (n > ETCD_REPLY_MAX - r->len) {
        r->over = 1;
        return -EIO;
    }
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n + 1)
            cap *= 2;
        char *b = realloc(r->buf, cap);
        if (!b)
            return -ENOMEM;
        r->buf = b;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, p, n);
    r->len += n;
    r->buf[r->len] = 0;
    return 0;
}

static size_t reply_write(char *p, size_t size, size_t nmemb, void *ctx)
{
    return reply_append(ctx, p, size * nmemb) == 0 ? size * nmemb : 0;
}

static CURL *handle_get(struct etcd *e)
{
    CURL *h = NULL;
    pthread_mutex_lock(&e->lock);
    if (e->nidle > 0)
        h = e->idle[--e->nidle];
    pthread_mutex_unlock(&e->lock);
    if (!h)
        h = curl_easy_init();
    return h;
}

static void handle_put(struct etcd *e, CURL *h)
{
    if (!h)
        return;
    pthread_mutex_lock(&e->lock);
    if (e->nidle < ETCD_POOL_MAX) {
        e->idle[e->nidle++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&e->lock);
    if (h)
        curl_easy_cleanup(h);
}

/* Options every request has. write_fn gets the body; xfer (may be NULL) is
 * the progress callback (watch cancellation). */
static void handle_setup(CURL *h, const char *url, const char *body, struct curl_slist *hdrs,
                         curl_write_callback write_fn, void *wctx)
{
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_defaults(h);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_fn);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, wctx);
}

/* Did this attempt fail before anything was sent? Then the next endpoint
 * may be tried, also for requests that are not idempotent. */
static int failed_to_connect(CURL *h, CURLcode cc)
{
    if (cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST)
        return 1;
    if (cc == CURLE_OPERATION_TIMEDOUT) {
        curl_off_t connect_us = 0;
        curl_easy_getinfo(h, CURLINFO_CONNECT_TIME_T, &connect_us);
        return connect_us == 0;
    }
    return 0;
}

/* How an attempt went, for the caller. */
struct attempt {
    CURLcode cc;
    long status;
    char cerr[CURL_ERROR_SIZE];
};

/* POST body to path on the endpoints in turn (DESIGN 2); perform is called
 * once per attempt with the handle set up (it may add options) and returns
 * the curl code. Returns 0 when an endpoint answered with any HTTP status
 * (in a->status), else -EHOSTUNREACH (no endpoint connected) or the mapped
 * curl error, with a reason. watch != 0: no overall timeout (the stream
 * lasts), only the connect timeout. */
static int etcd_send(struct etcd *e, CURL *h, const char *path, const char *body,
                     curl_write_callback write_fn, void *wctx, int watch,
                     int (*before)(CURL *, void *), void *bctx, struct attempt *a, char *err,
                     size_t errlen)
{
    struct curl_slist *hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    if (!hdrs)
        return -ENOMEM;
    int64_t deadline = clock_mono_ms() + e->timeout_ms;
    pthread_mutex_lock(&e->lock);
    unsigned first = e->current;
    pthread_mutex_unlock(&e->lock);
    int rc = -EHOSTUNREACH;
    char url[1024];
    for (unsigned i = 0; i < e->nendpoints; i++) {
        unsigned ep = (first + i) % e->nendpoints;
        int64_t left = deadline - clock_mono_ms();
        if (left < 1) {
            rc = -ETIMEDOUT;
            set_err(err, errlen, "etcd: no answer within %u ms", e->timeout_ms);
            break;
        }
        if ((size_t)snprintf(url, sizeof(url), "%s%s", e->endpoint[ep], path) >= sizeof(url)) {
            rc = -EINVAL;
            set_err(err, errlen, "etcd: URL too long");
            break;
        }
        handle_setup(h, url, body, hdrs, write_fn, wctx);
        a->cerr[0] = 0;
        curl_easy_setopt(h, CURLOPT_ERRORBUFFER, a->cerr);
        long connect_ms = (long)(left / (e->nendpoints - i));
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, connect_ms > 0 ? connect_ms : 1L);
        if (!watch)
            curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)left);
        if (before && (rc = before(h, bctx)) < 0)
            break;
        a->cc = curl_easy_perform(h);
        a->status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a->status);
        if (a->cc == CURLE_OK || (watch && a->status != 0)) {
            pthread_mutex_lock(&e->lock);
            e->current = ep;
            pthread_mutex_unlock(&e->lock);
            rc = 0;
            break;
        }
        if (failed_to_connect(h, a->cc)) {
            rc = -EHOSTUNREACH;
            set_err(err, errlen, "etcd: cannot connect to %s: %s", e->endpoint[ep],
                    a->cerr[0] ? a->cerr : curl_easy_strerror(a->cc));
            continue;
        }
        if (a->cc == CURLE_OPERATION_TIMEDOUT)
            rc = -ETIMEDOUT;
        else if (a->cc == CURLE_OUT_OF_MEMORY)
            rc = -ENOMEM;
        else
            rc = -EIO;
        set_err(err, errlen, "etcd: %s: %s", e->endpoint[ep],
                a->cerr[0] ? a->cerr : curl_easy_strerror(a->cc));
        break;
    }
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hdrs);
    return rc;
}

/* The error of a non-2xx gateway reply: {"error": msg, "code": grpc}. */
static int reply_error(const struct reply *r, long status, char *err, size_t errlen)
{
    json_t *j = r->buf ? json_loadb(r->buf, r->len, 0, NULL) : NULL;
    int64_t code = -1;
    const char *msg = NULL;
    if (j && json_is_object(j)) {
        if (json_get_int64(j, "code", &code) < 0)
            code = -1;
        msg = json_string_value(json_object_get(j, "error"));
    }
    int rc = code >= 0 ? etcd_errno_of_grpc((long)code) : -EIO;
    set_err(err, errlen, "etcd: HTTP %ld: %s", status, msg ? msg : "(no error message)");
    json_decref(j);
    return rc;
}

/* One request: POST req (consumed) to path, the 2xx reply parsed into
 * *out (the caller decrefs). */
static int etcd_call(struct etcd *e, const char *path, json_t *req, json_t **out, char *err,
                     size_t errlen)
{
    int rc;
    char *body = NULL;
    struct reply r = {0};
    struct attempt a;
    CURL *h = NULL;
    *out = NULL;
    if (!req || !(body = json_dumps(req, JSON_COMPACT))) {
        rc = -ENOMEM;
        goto out;
    }
    if (!(h = handle_get(e))) {
        rc = -ENOMEM;
        goto out;
    }
    rc = etcd_send(e, h, path, body, reply_write, &r, 0, NULL, NULL, &a, err, errlen);
    if (rc < 0) {
        if (r.over) {
            rc = -EIO;
            set_err(err, errlen, "etcd: reply to %s over %u bytes", path, ETCD_REPLY_MAX);
        }
        goto out;
    }
    if (a.status < 200 || a.status > 299) {
        rc = reply_error(&r, a.status, err, errlen);
        goto out;
    }
    json_error_t je;
    *out = r.buf ? json_loadb(r.buf, r.len, 0, &je) : NULL;
    if (!*out || !json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        rc = -EIO;
        set_err(err, errlen, "etcd: reply to %s is not a JSON object", path);
        goto out;
    }
    rc = 0;
out:
    handle_put(e, h);
    json_decref(req);
    free(body);
    free(r.buf);
    if (rc == -ENOMEM)
        set_err(err, errlen, "etcd: %s: out of memory", path);
    return rc;
}

/* header.revision of a reply (0 if absent). */
static int64_t header_revision(const json_t *reply)
{
    int64_t rev = 0;
    if (json_get_int64(json_object_get(reply, "header"), "revision", &rev) < 0)
        rev = 0;
    return rev;
}

/* ---- setup */

/* curl_global_init is not thread-safe: once per process, from the first
 * etcd_new (shard_remote.c does the same; curl counts the calls). */
static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init_once(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int etcd_new(const char *endpoints, unsigned timeout_ms, struct etcd **out, char *err,
             size_t errlen)
{
    int rc;
    struct etcd *e = calloc(1, sizeof(*e));
    *out = NULL;
    if (err && errlen)
        err[0] = 0;
    if (!e)
        return -ENOMEM;
    pthread_once(&curl_once, curl_init_once);
    if (curl_init_rc != CURLE_OK) {
        set_err(err, errlen, "curl_global_init: %s", curl_easy_strerror(curl_init_rc));
        free(e);
        return -EIO;
    }
    pthread_mutex_init(&e->lock, NULL);
    e->timeout_ms = timeout_ms ? timeout_ms : 5000;
    const char *p = endpoints ? endpoints : "";
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        while (n > 0 && p[n - 1] == '/')
            n--;
        if (n == 0 || (strncmp(p, "http://", 7) != 0 && strncmp(p, "https://", 8) != 0)) {
            rc = -EINVAL;
            set_err(err, errlen, "etcd endpoints '%s': each must be http://host:port", endpoints);
            goto fail;
        }
        if (e->nendpoints == ETCD_MAX_ENDPOINTS) {
            rc = -EINVAL;
            set_err(err, errlen, "etcd endpoints: more than %d", ETCD_MAX_ENDPOINTS);
            goto fail;
        }
        if (!(e->endpoint[e->nendpoints] = strndup(p, n))) {
            rc = -ENOMEM;
            goto fail;
        }
        e->nendpoints++;
        if (!comma)
            break;
        p = comma + 1;
    }
    *out = e;
    return 0;
fail:
    etcd_free(e);
    return rc;
}

void etcd_free(struct etcd *e)
{
    if (!e)
        return;
    for (unsigned i = 0; i < e->nidle; i++)
        curl_easy_cleanup(e->idle[i]);
    for (unsigned i = 0; i < e->nendpoints; i++)
        free(e->endpoint[i]);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

/* ---- kv */

/* A RangeRequest for key (or prefix). */
static json_t *range_request(const void *key, size_t klen, int prefix)
{
    json_t *j = json_object();
    if (!j || json_set_bytes(j, "key", key, klen) < 0 ||
        (prefix && json_set_prefix_end(j, key, klen) < 0)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

int etcd_get(struct etcd *e, const void *key, size_t klen, void **value, size_t *vlen,
             struct etcd_kv *meta, char *err, size_t errlen)
{
    json_t *reply = NULL;
    void *k = NULL;
    struct etcd_kv kv;
    *value = NULL;
    *vlen = 0;
    if (err && errlen)
        err[0] = 0;
    int rc = etcd_call(e, "/v3/kv/range", range_request(key, klen, 0), &reply, err, errlen);
    if (rc < 0)
        goto out;
    const json_t *kvs = json_object_get(reply, "kvs");
    if (!kvs || json_array_size(kvs) == 0) {
        rc = -ENOENT;
        set_err(err, errlen, "etcd: no such key");
        goto out;
    }
    rc = kv_of_json(json_array_get(kvs, 0), &kv, &k, value);
    if (rc < 0) {
        free(*value);
        *value = NULL;
        set_err(err, errlen, "etcd: malformed range reply");
        goto out;
    }
    *vlen = kv.vlen;
    if (meta) {
        *meta = kv;
        meta->key = meta->value = NULL;
    }
out:
    free(k);
    json_decref(reply);
    return rc;
}

int etcd_get_prefix(struct etcd *e, const void *prefix, size_t plen, etcd_kv_fn fn, void *ctx,
                    int64_t *revision, char *err, size_t errlen)
{
    int rc = 0;
    int64_t rev = 0;
    void *from = NULL; /* next page starts here (malloc'd) */
    size_t flen = plen;
    json_t *reply = NULL;
    if (err && errlen)
        err[0] = 0;
    if (!(from = malloc(plen + 1))) {
        rc = -ENOMEM;
        goto out;
    }
    if (plen)
        memcpy(from, prefix, plen);
    for (;;) {
        json_t *req = json_object();
        if (!req || json_set_bytes(req, "key", from, flen) < 0 ||
            json_set_prefix_end(req, prefix, plen) < 0 ||
            json_set_int64(req, "limit", ETCD_PAGE_KEYS) < 0 ||
            (rev && json_set_int64(req, "revision", rev) < 0)) {
            json_decref(req);
            rc = -ENOMEM;
            goto out;
        }
        rc = etcd_call(e, "/v3/kv/range", req, &reply, err, errlen);
        if (rc < 0)
            goto out;
        if (!rev)
            rev = header_revision(reply);
        void *last = NULL;
        size_t lastlen = 0;
        rc = kvs_each(json_object_get(reply, "kvs"), fn, ctx, &last, &lastlen);
        if (rc == -EIO)
            set_err(err, errlen, "etcd: malformed range reply");
        int more = json_is_true(json_object_get(reply, "more"));
        json_decref(reply);
        reply = NULL;
        if (rc != 0 || !more || !last) {
            free(last);
            rc = rc > 0 ? 0 : rc;
            goto out;
        }
        /* The next page starts just after the last key: last + "\0". */
        void *next = realloc(last, lastlen + 1);
        if (!next) {
            free(last);
            rc = -ENOMEM;
            goto out;
        }
        ((unsigned char *)next)[lastlen] = 0;
        free(from);
        from = next;
        flen = lastlen + 1;
    }
out:
    if (revision)
        *revision = rev;
    json_decref(reply);
    free(from);
    return rc;
}

static json_t *put_request(const void *key, size_t klen, const void *value, size_t vlen,
                           int64_t lease)
{
    json_t *j = json_object();
    if (!j || json_set_bytes(j, "key", key, klen) < 0 ||
        json_set_bytes(j, "value", value, vlen) < 0 ||
        (lease && json_set_int64(j, "lease", lease) < 0)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

int etcd_put(struct etcd *e, const void *key, size_t klen, const void *value, size_t vlen,
             int64_t lease, int64_t *revision, char *err, size_t errlen)
{
    json_t *reply = NULL;
    if (err && errlen)
        err[0] = 0;
    int rc = etcd_call(e, "/v3/kv/put", put_request(key, klen, value, vlen, lease), &reply, err,
                       errlen);
    if (rc == 0 && revision)
        *revision = header_revision(reply);
    json_decref(reply);
    return rc;
}

int etcd_delete(struct etcd *e, const void *key, size_t klen, int prefix, int64_t *deleted,
                int64_t *revision, char *err, size_t errlen)
{
    json_t *reply = NULL;
    int64_t n = 0;
    if (err && errlen)
        err[0] = 0;
    int rc = etcd_call(e, "/v3/kv/deleterange", range_request(key, klen, prefix), &reply, err,
                       errlen);
    if (rc == 0 && json_get_int64(reply, "deleted", &n) < 0) {
        rc = -EIO;
        set_err(err, errlen, "etcd: malformed deleterange reply");
    }
    if (rc == 0 && deleted)
        *deleted = n;
    if (rc == 0 && revision)
        *revision = header_revision(reply);
    json_decref(reply);
    return rc;
}

/* ---- txn */

static const char *const target_name[] = {"VERSION", "CREATE", "MOD", "VALUE", "LEASE"};
/* The JSON field holding the compared number or value, by target. */
static const char *const target_field[] = {"version", "create_revision", "mod_revision", "value",
                                           "lease"};
static const char *const result_name[] = {"EQUAL", "NOT_EQUAL", "GREATER", "LESS"};

static json_t *cmp_json(const struct etcd_cmp *c)
{
    json_t *j = json_object();
    if ((unsigned)c->target > ETCD_LEASE || (unsigned)c->result > ETCD_LESS) {
        json_decref(j);
        return NULL;
    }
    int bad = !j || json_set_bytes(j, "key", c->key, c->klen) < 0 ||
              json_object_set_new(j, "target", json_string(target_name[c->target])) != 0 ||
              json_object_set_new(j, "result", json_string(result_name[c->result])) != 0;
    if (!bad)
        bad = c->target == ETCD_VALUE
                  ? json_set_bytes(j, "value", c->value, c->vlen) < 0
                  : json_set_int64(j, target_field[c->target], c->number) < 0;
    if (bad) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static json_t *op_json(const struct etcd_op *o)
{
    json_t *inner, *j;
    const char *name;
    switch (o->type) {
    case ETCD_OP_PUT:
        inner = put_request(o->key, o->klen, o->value, o->vlen, o->lease);
        name = "request_put";
        break;
    case ETCD_OP_DELETE:
        inner = range_request(o->key, o->klen, o->prefix);
        name = "request_delete_range";
        break;
    case ETCD_OP_RANGE:
        inner = range_request(o->key, o->klen, o->prefix);
        name = "request_range";
        break;
    default:
        return NULL;
    }
    if (!inner)
        return NULL;
    j = json_object();
    if (!j || json_object_set_new(j, name, inner) != 0) {
        json_decref(j);
        return NULL;
    }
    return j;
}

/* An array of ops as JSON, NULL on a bad op or no memory. */
static json_t *ops_json(const struct etcd_op *ops, unsigned n)
{
    json_t *a = json_array();
    for (unsigned i = 0; a && i < n; i++) {
        json_t *o = op_json(&ops[i]);
        if (!o || json_array_append_new(a, o) != 0) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

struct txn_range_ctx {
    struct etcd_txn *t;
    unsigned op;
};

static int txn_kv(void *ctx, const struct etcd_kv *kv)
{
    struct txn_range_ctx *c = ctx;
    return c->t->on_kv(c->t->ctx, c->op, kv);
}

int etcd_txn(struct etcd *e, struct etcd_txn *t, char *err, size_t errlen)
{
    int rc;
    json_t *reply = NULL, *cmps = json_array(), *req = json_object();
    if (err && errlen)
        err[0] = 0;
    t->succeeded = 0;
    t->revision = 0;
    if (!req || !cmps) {
        rc = -ENOMEM;
        goto out;
    }
    for (unsigned i = 0; i < t->ncmp; i++) {
        json_t *c = cmp_json(&t->cmp[i]);
        if (!c || json_array_append_new(cmps, c) != 0) {
            rc = -EINVAL;
            set_err(err, errlen, "etcd txn: compare %u is invalid (or no memory)", i);
            goto out;
        }
    }
    /* json_object_set_new takes its value also when it fails. */
    int bad = json_object_set_new(req, "compare", cmps) != 0;
    cmps = NULL;
    bad |= json_object_set_new(req, "success", ops_json(t->success, t->nsuccess)) != 0;
    bad |= json_object_set_new(req, "failure", ops_json(t->failure, t->nfailure)) != 0;
    if (bad) {
        rc = -EINVAL;
        set_err(err, errlen, "etcd txn: an op is invalid (or no memory)");
        goto out;
    }
    rc = etcd_call(e, "/v3/kv/txn", req, &reply, err, errlen);
    req = NULL; /* consumed */
    if (rc < 0)
        goto out;
    t->succeeded = json_is_true(json_object_get(reply, "succeeded"));
    t->revision = header_revision(reply);
    const json_t *resps = json_object_get(reply, "responses");
    size_t i;
    const json_t *r;
    if (!t->on_kv || !resps)
        goto out;
    json_array_foreach(resps, i, r)
    {
        const json_t *range = json_object_get(r, "response_range");
        if (!range)
            continue;
        struct txn_range_ctx c = {t, (unsigned)i};
        rc = kvs_each(json_object_get(range, "kvs"), txn_kv, &c, NULL, NULL);
        if (rc != 0) {
            if (rc == -EIO)
                set_err(err, errlen, "etcd: malformed txn reply");
            rc = rc > 0 ? 0 : rc;
            goto out;
        }
    }
out:
    json_decref(cmps);
    json_decref(req);
    json_decref(reply);
    return rc;
}

/* ---- leases */

static json_t *lease_request(int64_t id, const char *field)
{
    json_t *j = json_object();
    if (!j || json_set_int64(j, field, id) < 0) {
        json_decref(j);
        return NULL;
    }
    return j;
}

int etcd_lease_grant(struct etcd *e, int64_t ttl_s, int64_t *id, char *err, size_t errlen)
{
    json_t *reply = NULL;
    if (err && errlen)
        err[0] = 0;
    *id = 0;
    int rc = etcd_call(e, "/v3/lease/grant", lease_request(ttl_s, "TTL"), &reply, err, errlen);
    if (rc == 0 && (json_get_int64(reply, "ID", id) < 0 || *id == 0)) {
        rc = -EIO;
        set_err(err, errlen, "etcd: lease grant reply has no ID");
    }
    json_decref(reply);
    return rc;
}

int etcd_lease_keepalive(struct etcd *e, int64_t id, int64_t *ttl_s, char *err, size_t errlen)
{
    json_t *reply = NULL;
    int64_t ttl = 0;
    if (err && errlen)
        err[0] = 0;
    /* A bidirectional stream in gRPC; the gateway answers one request body
     * with one {"result": LeaseKeepAliveResponse} and ends. An expired lease
     * comes back with no TTL (0). */
    int rc = etcd_call(e, "/v3/lease/keepalive", lease_request(id, "ID"), &reply, err, errlen);
    if (rc < 0)
        goto out;
    const json_t *res = json_object_get(reply, "result");
    if (!res) {
        rc = -EIO;
        set_err(err, errlen, "etcd: keepalive reply has no result");
        goto out;
    }
    if (json_get_int64(res, "TTL", &ttl) < 0) {
        rc = -EIO;
        set_err(err, errlen, "etcd: keepalive reply has a bad TTL");
        goto out;
    }
    if (ttl <= 0) {
        rc = -ENOENT;
        set_err(err, errlen, "etcd: lease %" PRId64 " expired", id);
    }
out:
    if (ttl_s)
        *ttl_s = rc == 0 ? ttl : 0;
    json_decref(reply);
    return rc;
}

int etcd_lease_revoke(struct etcd *e, int64_t id, char *err, size_t errlen)
{
    json_t *reply = NULL;
    if (err && errlen)
        err[0] = 0;
    /* 3.4 serves LeaseRevoke at /v3/kv/lease/revoke (/v3/lease/revoke is a
     * 404 there; 3.5 has both). */
    int rc = etcd_call(e, "/v3/kv/lease/revoke", lease_request(id, "ID"), &reply, err, errlen);
    json_decref(reply);
    return rc;
}

/* ---- watch */

struct watch_ctx {
    const struct etcd_watch_req *req;
    etcd_event_fn fn;
    void *ctx;
    struct reply buf;  /* bytes not yet cut into objects */
    size_t scan;       /* how far buf was scanned for the current object */
    int depth, in_str, esc;
    int rc;            /* 1: stopped (fn/cancel), <0: error; 0: going on */
    CURL *h;
    int64_t answer_by; /* ms (now_ms): no HTTP status by then is -ETIMEDOUT */
    unsigned timeout_ms;
    char *err;
    size_t errlen;
};

/* One {"result": WatchResponse} (or {"error": ...}). */
static int watch_message(struct watch_ctx *w, const char *p, size_t n)
{
    json_error_t je;
    json_t *j = json_loadb(p, n, 0, &je);
    int rc = 0;
    if (!j || !json_is_object(j)) {
        rc = -EIO;
        set_err(w->err, w->errlen, "etcd watch: bad JSON in stream: %s", j ? "" : je.text);
        goto out;
    }
    const json_t *res = json_object_get(j, "result");
    if (!res) {
        /* The gateway ends a stream with {"error": {"grpc_code", "message",
         * ...}} (etcd stopping, a lost leader); a reply that never was a
         * stream has {"error": "...", "code": N}. Either way the watch is
         * over: the caller watches again from where it got to. */
        const json_t *e = json_object_get(j, "error");
        const char *msg = json_is_object(e) ? json_string_value(json_object_get(e, "message"))
                                            : json_string_value(e);
        rc = -EPIPE;
        set_err(w->err, w->errlen, "etcd watch ended: %s", msg ? msg : "error in stream");
        goto out;
    }
    int64_t compact = 0;
    json_get_int64(res, "compact_revision", &compact);
    if (json_is_true(json_object_get(res, "canceled"))) {
        const char *why = json_string_value(json_object_get(res, "cancel_reason"));
        if (compact > 0) {
            rc = -ERANGE;
            set_err(w->err, w->errlen,
                    "etcd watch: revision %" PRId64 " compacted (compact revision %" PRId64 ")",
                    w->req->start_revision, compact);
        } else {
            rc = -EPIPE;
            set_err(w->err, w->errlen, "etcd watch canceled: %s", why ? why : "(no reason)");
        }
        goto out;
    }
    size_t i;
    const json_t *ev;
    json_array_foreach(json_object_get(res, "events"), i, ev)
    {
        struct etcd_event event;
        void *k, *v;
        const char *type = json_string_value(json_object_get(ev, "type"));
        event.type = type && strcmp(type, "DELETE") == 0 ? ETCD_EVENT_DELETE : ETCD_EVENT_PUT;
        rc = kv_of_json(json_object_get(ev, "kv"), &event.kv, &k, &v);
        if (rc == 0)
            rc = w->fn(w->ctx, &event);
        else
            set_err(w->err, w->errlen, "etcd watch: malformed event");
        free(k);
        free(v);
        if (rc != 0)
            break;
    }
out:
    json_decref(j);
    return rc;
}

/* Cut whole objects off the front of w->buf (DESIGN 4). */
static int watch_cut(struct watch_ctx *w)
{
    size_t start = 0;
    int rc = 0;
    for (size_t i = w->scan; i < w->buf.len && rc == 0; i++) {
        char c = w->buf.buf[i];
        if (w->in_str) {
            if (w->esc)
                w->esc = 0;
            else if (c == '\\')
                w->esc = 1;
            else if (c == '"')
                w->in_str = 0;
            continue;
        }
        if (c == '"') {
            w->in_str = 1;
        } else if (c == '{') {
            if (w->depth == 0) {
                start = i; /* anything before it is whitespace between objects */
            }
            w->depth++;
        } else if (c == '}') {
            if (w->depth == 0) {
                set_err(w->err, w->errlen, "etcd watch: stray '}' in stream");
                return -EIO;
            }
            if (--w->depth == 0) {
                rc = watch_message(w, w->buf.buf + start, i + 1 - start);
                start = i + 1;
            }
        } else if (w->depth == 0 && c != ' ' && c != '\n' && c != '\r' && c != '\t') {
            set_err(w->err, w->errlen, "etcd watch: unexpected byte 0x%02x in stream",
                    (unsigned char)c);
            return -EIO;
        }
        w->scan = i + 1;
    }
    if (w->depth == 0)
        start = w->scan; /* only whitespace left: drop it */
    memmove(w->buf.buf, w->buf.buf + start, w->buf.len - start);
    w->buf.len -= start;
    w->scan -= start;
    return rc;
}

static size_t watch_write(char *p, size_t size, size_t nmemb, void *ctx)
{
    struct watch_ctx *w = ctx;
    size_t n = size * nmemb;
    if (w->rc != 0)
        return 0;
    if (reply_append(&w->buf, p, n) < 0) {
        w->rc = -EIO;
        set_err(w->err, w->errlen, "etcd watch: message over %u bytes", ETCD_REPLY_MAX);
        return 0;
    }
    /* A reply other than 200 is no stream but one error object: keep it
     * whole for reply_error(). */
    long status = 0;
    curl_easy_getinfo(w->h, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200)
        return n;
    int rc = watch_cut(w);
    if (rc == 0 && w->req->cancel && atomic_load(w->req->cancel))
        rc = 1;
    if (rc != 0) {
        w->rc = rc;
        return 0;
    }
    return n;
}

static int watch_progress(void *ctx, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
    struct watch_ctx *w = ctx;
    (void)dt, (void)dn, (void)ut, (void)un;
    if (w->req->cancel && atomic_load(w->req->cancel)) {
        w->rc = 1;
        return 1;
    }
    /* The stream itself may be silent for ever, but etcd answers a watch
     * (its "created" message) at once: a server that took the connection
     * and says nothing is as dead as one that refused it. */
    long status = 0;
    curl_easy_getinfo(w->h, CURLINFO_RESPONSE_CODE, &status);
    if (status == 0 && clock_mono_ms() > w->answer_by) {
        w->rc = -ETIMEDOUT;
        set_err(w->err, w->errlen, "etcd watch: no answer within %u ms", w->timeout_ms);
        return 1;
    }
    return 0;
}

static int watch_before(CURL *h, void *ctx)
{
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, watch_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, ctx);
    return 0;
}

int etcd_watch(struct etcd *e, const struct etcd_watch_req *req, etcd_event_fn fn, void *ctx,
               char *err, size_t errlen)
{
    int rc;
    char *body = NULL;
    struct attempt a;
    CURL *h = NULL;
    struct watch_ctx w = {.req = req, .fn = fn, .ctx = ctx, .err = err, .errlen = errlen};
    json_t *create = range_request(req->key, req->klen, req->prefix);
    json_t *top = json_object();
    if (err && errlen)
        err[0] = 0;
    if (!create || !top ||
        (req->start_revision && json_set_int64(create, "start_revision", req->start_revision)) ||
        json_object_set(top, "create_request", create) != 0 ||
        !(body = json_dumps(top, JSON_COMPACT)) || !(h = curl_easy_init())) {
        rc = -ENOMEM;
        goto out;
    }
    /* A handle of its own, not the pool's: it is held for as long as the
     * watch lasts. */
    w.h = h;
    w.timeout_ms = e->timeout_ms;
    w.answer_by = clock_mono_ms() + e->timeout_ms;
    rc = etcd_send(e, h, "/v3/watch", body, watch_write, &w, 1, watch_before, &w, &a, err,
                   errlen);
    if (w.rc != 0) {
        rc = w.rc > 0 ? 0 : w.rc;
        goto out;
    }
    if (rc < 0 && a.status == 0)
        goto out;
    if (a.status != 200) {
        rc = reply_error(&w.buf, a.status, err, errlen);
        goto out;
    }
    /* The stream ended without fn or cancel stopping it. */
    rc = -EPIPE;
    set_err(err, errlen, "etcd watch: stream ended (%s)",
            a.cc == CURLE_OK ? "closed by etcd" : (a.cerr[0] ? a.cerr : curl_easy_strerror(a.cc)));
out:
    if (h)
        curl_easy_cleanup(h);
    json_decref(create);
    json_decref(top);
    free(body);
    free(w.buf.buf);
    return rc;
}
