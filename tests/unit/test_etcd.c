/* test_etcd.c -- backend/etcd.c against a real etcd (Debian's etcd-server).
 *
 * Starts /usr/bin/etcd on two free loopback ports with a temp data dir
 * (skips, exit 77, when it is not installed), waits for it with a deadline,
 * and exercises every call: binary keys and values (NUL, 0xff), get_prefix
 * (order, the prefix's end, paging past ETCD_PAGE_KEYS), delete of a key and
 * a prefix, a txn that succeeds and one that fails (with a range in the
 * failure branch), a lease left to expire and one kept alive, revoke, a
 * watch from a past revision seeing put/put/delete in order, a live watch (a
 * 200 KB message) and its cancellation, a watch from a compacted revision,
 * six threads on one handle; the endpoint list starts with a dead endpoint.
 * A server that accepts and never answers times calls and a watch out. At the end
 * etcd is stopped by PID and calls must fail within timeout_ms, a running
 * watch with -EPIPE.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>

#include "check.h"
#include "etcd.h"
#include "etcd_server.h"
#include "test_util.h"

#define TIMEOUT_MS 2000u

static char err[512];

/* ---- callbacks that collect what they are given */

struct seen {
    unsigned n;
    char key[2048][32];
    size_t klen[2048];
    char value[2048][32];
    int64_t rev[2048];
    size_t vlen[2048];
    int type[2048];
    unsigned stop_after; /* 0: never */
};

static void seen_add(struct seen *s, const void *k, size_t kl, const void *v, size_t vl,
                     int64_t rev, int type)
{
    if (s->n >= 2048)
        return;
    memcpy(s->key[s->n], k, kl < 31 ? kl : 31);
    s->klen[s->n] = kl;
    memcpy(s->value[s->n], v, vl < 31 ? vl : 31);
    s->rev[s->n] = rev;
    s->vlen[s->n] = vl;
    s->type[s->n] = type;
    s->n++;
}

static int on_kv(void *ctx, const struct etcd_kv *kv)
{
    struct seen *s = ctx;
    seen_add(s, kv->key, kv->klen, kv->value, kv->vlen, kv->mod_revision, -1);
    return s->stop_after && s->n >= s->stop_after;
}

static int on_txn_kv(void *ctx, unsigned op, const struct etcd_kv *kv)
{
    struct seen *s = ctx;
    seen_add(s, kv->key, kv->klen, kv->value, kv->vlen, kv->mod_revision, (int)op);
    return 0;
}

static int on_event(void *ctx, const struct etcd_event *ev)
{
    struct seen *s = ctx;
    seen_add(s, ev->kv.key, ev->kv.klen, ev->kv.value, ev->kv.vlen, ev->kv.mod_revision,
             (int)ev->type);
    return s->stop_after && s->n >= s->stop_after;
}

/* A watch on a thread. */
struct watcher {
    struct etcd *e;
    struct etcd_watch_req req;
    struct seen seen;
    atomic_int cancel;
    int rc;
    char err[256];
    pthread_t th;
};

static void *watch_thread(void *arg)
{
    struct watcher *w = arg;
    w->rc = etcd_watch(w->e, &w->req, on_event, &w->seen, w->err, sizeof(w->err));
    return NULL;
}

static struct watcher *watcher_start(struct etcd *e, const char *prefix, int64_t from)
{
    struct watcher *w = calloc(1, sizeof(*w));
    if (!w)
        exit(2);
    w->e = e;
    w->req = (struct etcd_watch_req){prefix, strlen(prefix), 1, from, &w->cancel};
    if (pthread_create(&w->th, NULL, watch_thread, w) != 0)
        exit(2);
    return w;
}

/* Wait until w saw n events (deadline 10 s). */
static int watcher_wait(struct watcher *w, unsigned n)
{
    double end = now_s() + 10;
    while (now_s() < end) {
        if (__atomic_load_n(&w->seen.n, __ATOMIC_ACQUIRE) >= n)
            return 1;
        usleep(20000);
    }
    return 0;
}

/* ---- the parts */

static const unsigned char bkey[] = {'b', 0, 0xff, 'k'};
static const unsigned char bval[] = {0, 0xff, 0, 'v', 0xff};

static void test_kv(struct etcd *e)
{
    void *v = NULL;
    size_t vl = 0;
    struct etcd_kv meta;
    int64_t rev1 = 0, rev2 = 0, n = 0;

    CHECK_RC(etcd_put(e, bkey, sizeof(bkey), bval, sizeof(bval), 0, &rev1, err, sizeof(err)), 0);
    CHECK(rev1 > 0);
    CHECK_RC(etcd_get(e, bkey, sizeof(bkey), &v, &vl, &meta, err, sizeof(err)), 0);
    CHECK(vl == sizeof(bval) && v && memcmp(v, bval, vl) == 0);
    CHECK(meta.version == 1 && meta.mod_revision == rev1 && meta.create_revision == rev1);
    CHECK(meta.lease == 0);
    free(v);
    /* The key without its last byte, and a value of zero bytes. */
    CHECK_RC(etcd_get(e, bkey, 3, &v, &vl, NULL, err, sizeof(err)), -ENOENT);
    CHECK(v == NULL);
    CHECK_RC(etcd_put(e, bkey, sizeof(bkey), "", 0, 0, &rev2, err, sizeof(err)), 0);
    CHECK(rev2 == rev1 + 1);
    CHECK_RC(etcd_get(e, bkey, sizeof(bkey), &v, &vl, &meta, err, sizeof(err)), 0);
    CHECK(vl == 0 && meta.version == 2 && meta.create_revision == rev1);
    free(v);

    /* get_prefix: order, binary bytes, and the prefix's end ("p0" is just
     * past "p/", "p/\xff\xff" inside). */
    const char *keys[] = {"p/c", "p0", "p/a", "p/\xff\xff", "p.", "p/b"};
    for (unsigned i = 0; i < 6; i++)
        CHECK_RC(etcd_put(e, ETCD_S(keys[i]), ETCD_S(keys[i]), 0, NULL, err, sizeof(err)), 0);
    struct seen *s = calloc(1, sizeof(*s));
    int64_t rev = 0;
    CHECK_RC(etcd_get_prefix(e, ETCD_S("p/"), on_kv, s, &rev, err, sizeof(err)), 0);
    CHECKF(s->n == 4, "%u keys", s->n);
    CHECK(s->n == 4 && strcmp(s->key[0], "p/a") == 0 && strcmp(s->key[1], "p/b") == 0 &&
          strcmp(s->key[2], "p/c") == 0 && strcmp(s->key[3], "p/\xff\xff") == 0);
    CHECK(strcmp(s->value[1], "p/b") == 0);
    CHECK(rev >= rev2 + 6);
    /* Stopping early. */
    memset(s, 0, sizeof(*s));
    s->stop_after = 2;
    CHECK_RC(etcd_get_prefix(e, ETCD_S("p/"), on_kv, s, NULL, err, sizeof(err)), 0);
    CHECK(s->n == 2);

    /* Paging: more keys than one page, all of them, in order. */
    unsigned many = ETCD_PAGE_KEYS + 50;
    for (unsigned i = 0; i < many; i++) {
        char k[32];
        snprintf(k, sizeof(k), "m/%05u", i);
        if (etcd_put(e, ETCD_S(k), "x", 1, 0, NULL, err, sizeof(err)) != 0) {
            CHECKF(0, "put %s: %s", k, err);
            break;
        }
    }
    memset(s, 0, sizeof(*s));
    CHECK_RC(etcd_get_prefix(e, ETCD_S("m/"), on_kv, s, NULL, err, sizeof(err)), 0);
    CHECKF(s->n == many, "%u of %u keys", s->n, many);
    int ordered = 1;
    for (unsigned i = 0; i < s->n; i++) {
        char k[32];
        snprintf(k, sizeof(k), "m/%05u", i);
        ordered &= strcmp(s->key[i], k) == 0;
    }
    CHECK(ordered);

    /* Delete: a key, a prefix, a missing key (0 deleted, no error). */
    CHECK_RC(etcd_delete(e, bkey, sizeof(bkey), 0, &n, NULL, err, sizeof(err)), 0);
    CHECK(n == 1);
    CHECK_RC(etcd_get(e, bkey, sizeof(bkey), &v, &vl, NULL, err, sizeof(err)), -ENOENT);
    CHECK_RC(etcd_delete(e, ETCD_S("m/"), 1, &n, NULL, err, sizeof(err)), 0);
    CHECK(n == many);
    CHECK_RC(etcd_delete(e, ETCD_S("p/"), 1, &n, &rev, err, sizeof(err)), 0);
    CHECK(n == 4);
    CHECK_RC(etcd_get(e, ETCD_S("p0"), &v, &vl, NULL, err, sizeof(err)), 0);
    free(v);
    CHECK_RC(etcd_delete(e, ETCD_S("nothing"), 0, &n, NULL, err, sizeof(err)), 0);
    CHECK(n == 0);
    free(s);
}

static void test_txn(struct etcd *e)
{
    int64_t rev = 0;
    void *v = NULL;
    size_t vl = 0;
    struct etcd_kv meta;
    CHECK_RC(etcd_put(e, ETCD_S("shard/3/primary"), ETCD_S("node-a"), 0, &rev, err, sizeof(err)),
             0);

    /* Succeeds: the primary is as we saw it, and no isr key exists yet. */
    struct etcd_cmp when[] = {
        etcd_cmp_mod(ETCD_S("shard/3/primary"), ETCD_EQUAL, rev),
        etcd_cmp_value(ETCD_S("shard/3/primary"), ETCD_EQUAL, ETCD_S("node-a")),
        etcd_cmp_create(ETCD_S("shard/3/isr"), ETCD_EQUAL, 0),
        etcd_cmp_version(ETCD_S("shard/3/primary"), ETCD_LESS, 2),
    };
    struct etcd_op then[] = {
        etcd_op_put(ETCD_S("shard/3/primary"), ETCD_S("node-b"), 0),
        etcd_op_put(bkey, sizeof(bkey), bval, sizeof(bval), 0),
        etcd_op_range(ETCD_S("shard/3/"), 1),
    };
    struct seen *s = calloc(1, sizeof(*s));
    struct etcd_txn t = {ETCD_WHEN(when), ETCD_THEN(then), .on_kv = on_txn_kv, .ctx = s};
    CHECK_RC(etcd_txn(e, &t, err, sizeof(err)), 0);
    CHECK(t.succeeded == 1 && t.revision == rev + 1);
    /* The range sees the put before it in the same txn. */
    CHECKF(s->n == 1 && s->type[0] == 2 && strcmp(s->value[0], "node-b") == 0, "n %u", s->n);
    CHECK_RC(etcd_get(e, ETCD_S("shard/3/primary"), &v, &vl, &meta, err, sizeof(err)), 0);
    CHECK(vl == 6 && memcmp(v, "node-b", 6) == 0 && meta.mod_revision == t.revision);
    free(v);
    CHECK_RC(etcd_get(e, bkey, sizeof(bkey), &v, &vl, NULL, err, sizeof(err)), 0);
    CHECK(vl == sizeof(bval) && memcmp(v, bval, vl) == 0);
    free(v);

    /* Fails: the same compares again (the mod_revision moved on); the
     * failure branch reads the key and deletes the binary one. */
    memset(s, 0, sizeof(*s));
    struct etcd_op otherwise[] = {
        etcd_op_range(ETCD_S("shard/3/primary"), 0),
        etcd_op_delete(bkey, sizeof(bkey), 0),
    };
    struct etcd_txn f = {ETCD_WHEN(when), ETCD_THEN(then), ETCD_ELSE(otherwise), .on_kv = on_txn_kv,
                         .ctx = s};
    CHECK_RC(etcd_txn(e, &f, err, sizeof(err)), 0);
    CHECK(f.succeeded == 0 && f.revision == t.revision + 1);
    CHECK(s->n == 1 && s->type[0] == 0 && strcmp(s->value[0], "node-b") == 0);
    CHECK_RC(etcd_get(e, bkey, sizeof(bkey), &v, &vl, NULL, err, sizeof(err)), -ENOENT);

    /* NOT_EQUAL / GREATER on numbers; no compares at all is true. */
    struct etcd_cmp when2[] = {
        etcd_cmp_value(ETCD_S("shard/3/primary"), ETCD_NOT_EQUAL, ETCD_S("node-a")),
        etcd_cmp_version(ETCD_S("shard/3/primary"), ETCD_GREATER, 1),
        etcd_cmp_lease(ETCD_S("shard/3/primary"), ETCD_EQUAL, 0),
    };
    struct etcd_txn t2 = {ETCD_WHEN(when2)};
    CHECK_RC(etcd_txn(e, &t2, err, sizeof(err)), 0);
    CHECK(t2.succeeded == 1);
    struct etcd_txn t3 = {0};
    CHECK_RC(etcd_txn(e, &t3, err, sizeof(err)), 0);
    CHECK(t3.succeeded == 1);

    /* An invalid txn: one key put twice in a branch. */
    struct etcd_op twice[] = {
        etcd_op_put(ETCD_S("dup"), ETCD_S("1"), 0),
        etcd_op_put(ETCD_S("dup"), ETCD_S("2"), 0),
    };
    struct etcd_txn bad = {ETCD_THEN(twice)};
    err[0] = 0;
    CHECK_RC(etcd_txn(e, &bad, err, sizeof(err)), -EINVAL);
    CHECKF(strstr(err, "duplicate") != NULL, "err '%s'", err);
    CHECK_RC(etcd_delete(e, ETCD_S("shard/"), 1, NULL, NULL, err, sizeof(err)), 0);
    free(s);
}

static void test_leases(struct etcd *e)
{
    int64_t id = 0, kept = 0, ttl = 0;
    void *v = NULL;
    size_t vl = 0;
    struct etcd_kv meta;

    /* A lease left to expire takes its key with it. */
    CHECK_RC(etcd_lease_grant(e, 1, &id, err, sizeof(err)), 0);
    CHECK(id != 0);
    CHECK_RC(etcd_put(e, ETCD_S("lease/short"), ETCD_S("x"), id, NULL, err, sizeof(err)), 0);
    CHECK_RC(etcd_get(e, ETCD_S("lease/short"), &v, &vl, &meta, err, sizeof(err)), 0);
    CHECK(meta.lease == id);
    free(v);
    /* A lease kept alive keeps its key, for longer than its TTL. */
    CHECK_RC(etcd_lease_grant(e, 2, &kept, err, sizeof(err)), 0);
    CHECK_RC(etcd_put(e, ETCD_S("lease/kept"), ETCD_S("y"), kept, NULL, err, sizeof(err)), 0);
    double start = now_s(), gone_at = 0;
    int keep_ok = 1;
    while (now_s() - start < 6) {
        int rc = etcd_get(e, ETCD_S("lease/short"), &v, &vl, NULL, err, sizeof(err));
        free(v);
        if (rc == -ENOENT && !gone_at)
            gone_at = now_s() - start;
        if (etcd_lease_keepalive(e, kept, &ttl, err, sizeof(err)) != 0 || ttl < 1)
            keep_ok = 0;
        usleep(300000);
    }
    CHECKF(gone_at > 0.5 && gone_at < 5, "short lease key gone after %.2f s", gone_at);
    CHECK(keep_ok);
    CHECK_RC(etcd_get(e, ETCD_S("lease/kept"), &v, &vl, NULL, err, sizeof(err)), 0);
    free(v);
    CHECK_RC(etcd_lease_keepalive(e, id, &ttl, err, sizeof(err)), -ENOENT);
    CHECK(ttl == 0);
    CHECK_RC(etcd_put(e, ETCD_S("lease/x"), ETCD_S("x"), id, NULL, err, sizeof(err)), -ENOENT);
    /* Revoke takes the key at once; a second revoke: -ENOENT. */
    CHECK_RC(etcd_lease_revoke(e, kept, err, sizeof(err)), 0);
    CHECK_RC(etcd_get(e, ETCD_S("lease/kept"), &v, &vl, NULL, err, sizeof(err)), -ENOENT);
    CHECK_RC(etcd_lease_revoke(e, kept, err, sizeof(err)), -ENOENT);
}

static void test_watch(struct etcd *e)
{
    int64_t r1 = 0, r2 = 0, r3 = 0;
    CHECK_RC(etcd_put(e, ETCD_S("w/a"), bval, sizeof(bval), 0, &r1, err, sizeof(err)), 0);
    CHECK_RC(etcd_put(e, ETCD_S("w/b"), ETCD_S("2"), 0, &r2, err, sizeof(err)), 0);
    CHECK_RC(etcd_put(e, ETCD_S("x/other"), ETCD_S("no"), 0, NULL, err, sizeof(err)), 0);
    CHECK_RC(etcd_delete(e, ETCD_S("w/a"), 0, NULL, &r3, err, sizeof(err)), 0);

    /* From a past revision, on this thread, until fn stops it. */
    struct seen *s = calloc(1, sizeof(*s));
    s->stop_after = 3;
    struct etcd_watch_req req = {ETCD_S("w/"), 1, r1, NULL};
    CHECK_RC(etcd_watch(e, &req, on_event, s, err, sizeof(err)), 0);
    CHECK(s->n == 3);
    CHECK(s->type[0] == ETCD_EVENT_PUT && s->rev[0] == r1 && strcmp(s->key[0], "w/a") == 0 &&
          memcmp(s->value[0], bval, sizeof(bval)) == 0);
    CHECK(s->type[1] == ETCD_EVENT_PUT && s->rev[1] == r2 && strcmp(s->value[1], "2") == 0);
    CHECK(s->type[2] == ETCD_EVENT_DELETE && s->rev[2] == r3 && strcmp(s->key[2], "w/a") == 0);
    free(s);

    /* Live, on a thread: events written after it started; then cancelled. */
    struct watcher *w = watcher_start(e, "w/", 0);
    usleep(300000); /* let it be created; a put before that is missed, and the check says so */
    /* 200 KB: its message spans many of curl's write callbacks. */
    size_t bigsize = 200000;
    unsigned char *big = xmalloc(bigsize);
    for (size_t i = 0; i < bigsize; i++)
        big[i] = (unsigned char)(i * 7 + (i >> 8));
    CHECK_RC(etcd_put(e, ETCD_S("w/live"), big, bigsize, 0, NULL, err, sizeof(err)), 0);
    CHECK_RC(etcd_put(e, ETCD_S("w/{\"}"), ETCD_S("}{\\\""), 0, NULL, err, sizeof(err)), 0);
    CHECK(watcher_wait(w, 2));
    CHECK(w->seen.n >= 2 && strcmp(w->seen.key[0], "w/live") == 0 &&
          w->seen.vlen[0] == bigsize && memcmp(w->seen.value[0], big, 31) == 0 &&
          strcmp(w->seen.value[1], "}{\\\"") == 0);
    free(big);
    double t0 = now_s();
    atomic_store(&w->cancel, 1);
    pthread_join(w->th, NULL);
    CHECKF(now_s() - t0 < 2.5, "cancel took %.2f s", now_s() - t0);
    CHECKF(w->rc == 0, "watch rc %d: %s", w->rc, w->err);
    free(w);
}

static int client_port;

static int compact(int64_t rev)
{
    return etcd_compact(client_port, rev);
}

/* A watch from a compacted revision: -ERANGE, saying so. */
static void test_watch_compacted(struct etcd *e)
{
    int64_t rev = 0;
    CHECK_RC(etcd_put(e, ETCD_S("c/a"), ETCD_S("1"), 0, &rev, err, sizeof(err)), 0);
    CHECK_RC(compact(rev), 0);
    struct seen *s = calloc(1, sizeof(*s));
    struct etcd_watch_req req = {ETCD_S("c/"), 1, rev - 1, NULL};
    err[0] = 0;
    CHECK_RC(etcd_watch(e, &req, on_event, s, err, sizeof(err)), -ERANGE);
    CHECKF(strstr(err, "compacted") != NULL, "err '%s'", err);
    CHECK(s->n == 0);
    /* From the compact revision on, it works. */
    s->stop_after = 1;
    req.start_revision = rev;
    CHECK_RC(etcd_watch(e, &req, on_event, s, err, sizeof(err)), 0);
    CHECK(s->n == 1 && s->rev[0] == rev);
    free(s);
}

/* Several threads on one struct etcd at once (the handle pool): each
 * writes and reads back its own keys. */
struct worker {
    struct etcd *e;
    unsigned id;
    int bad;
    pthread_t th;
};

static void *worker_thread(void *arg)
{
    struct worker *w = arg;
    char e2[256];
    for (unsigned i = 0; i < 40; i++) {
        char k[32], val[32];
        void *v = NULL;
        size_t vl = 0;
        snprintf(k, sizeof(k), "t/%u/%u", w->id, i);
        snprintf(val, sizeof(val), "v%u.%u", w->id, i);
        if (etcd_put(w->e, ETCD_S(k), ETCD_S(val), 0, NULL, e2, sizeof(e2)) != 0 ||
            etcd_get(w->e, ETCD_S(k), &v, &vl, NULL, e2, sizeof(e2)) != 0 ||
            vl != strlen(val) || memcmp(v, val, vl) != 0)
            w->bad++;
        free(v);
    }
    return NULL;
}

static void test_threads(struct etcd *e)
{
    struct worker w[6];
    for (unsigned i = 0; i < 6; i++) {
        w[i] = (struct worker){e, i, 0, 0};
        if (pthread_create(&w[i].th, NULL, worker_thread, &w[i]) != 0)
            exit(2);
    }
    int bad = 0;
    for (unsigned i = 0; i < 6; i++) {
        pthread_join(w[i].th, NULL);
        bad += w[i].bad;
    }
    CHECKF(bad == 0, "%d failed calls", bad);
    int64_t n = 0;
    CHECK_RC(etcd_delete(e, ETCD_S("t/"), 1, &n, NULL, err, sizeof(err)), 0);
    CHECK(n == 6 * 40);
}

/* A server that takes connections and never answers: calls and a watch
 * end within timeout_ms with -ETIMEDOUT. */
static void test_silent_server(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        perror("silent server");
        exit(2);
    }
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", ntohs(a.sin_port));
    struct etcd *e = NULL;
    CHECK_RC(etcd_new(url, 500, &e, err, sizeof(err)), 0);
    double t0 = now_s();
    int64_t id;
    CHECK_RC(etcd_lease_grant(e, 5, &id, err, sizeof(err)), -ETIMEDOUT);
    CHECKF(now_s() - t0 < 1.0, "took %.2f s", now_s() - t0);
    t0 = now_s();
    struct seen *s = calloc(1, sizeof(*s));
    struct etcd_watch_req req = {ETCD_S("w/"), 1, 0, NULL};
    CHECK_RC(etcd_watch(e, &req, on_event, s, err, sizeof(err)), -ETIMEDOUT);
    CHECKF(now_s() - t0 < 2.0, "watch took %.2f s", now_s() - t0);
    free(s);
    etcd_free(e);
    close(fd);
}

int main(void)
{
    if (access(ETCD_BIN, X_OK) != 0) {
        printf("test_etcd: %s not installed, skipped\n", ETCD_BIN);
        return 77;
    }
    char dir[] = "/tmp/test_etcd.XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    int client = free_port(), peer = free_port(), dead = free_port();
    while (peer == client)
        peer = free_port();
    client_port = client;
    pid_t pid = start_etcd(dir, client, peer, NULL);
    test_silent_server();

    /* A dead endpoint first: every call must get past it. */
    char endpoints[128];
    snprintf(endpoints, sizeof(endpoints), "http://127.0.0.1:%d,http://127.0.0.1:%d/", dead,
             client);
    struct etcd *e = NULL;
    CHECK_RC(etcd_new("127.0.0.1:2379", 0, &e, err, sizeof(err)), -EINVAL);
    CHECK_RC(etcd_new("http://a,", 0, &e, err, sizeof(err)), -EINVAL);
    CHECK_RC(etcd_new(endpoints, TIMEOUT_MS, &e, err, sizeof(err)), 0);
    if (!e)
        return 1;

    int up = etcd_wait_up(e, err, sizeof(err));
    CHECKF(up, "etcd did not come up: %s (see %s/etcd.log)", err, dir);
    if (up) {
        test_kv(e);
        test_txn(e);
        test_leases(e);
        test_watch(e);
        test_threads(e);
        test_watch_compacted(e);
    }

    /* etcd stopped: a running watch ends with -EPIPE, calls fail within
     * timeout_ms with a reason. */
    struct watcher *w = watcher_start(e, "w/", 0);
    usleep(300000);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    double t0 = now_s();
    void *v = NULL;
    size_t vl;
    err[0] = 0;
    int rc = etcd_get(e, ETCD_S("hello"), &v, &vl, NULL, err, sizeof(err));
    double took = now_s() - t0;
    CHECK_RC(rc, -EHOSTUNREACH);
    CHECKF(took < TIMEOUT_MS / 1000.0 + 0.5, "took %.2f s", took);
    CHECKF(strstr(err, "cannot connect") != NULL, "err '%s'", err);
    pthread_join(w->th, NULL);
    CHECKF(w->rc == -EPIPE, "watch rc %d: %s", w->rc, w->err);
    free(w);
    etcd_free(e);
    if (!failures)
        rm_rf(dir);
    else
        fprintf(stderr, "etcd's data and log left in %s\n", dir);
    return check_summary("etcd");
}
