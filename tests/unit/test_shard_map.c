/* test_shard_map.c -- backend/shard_map.c, static and against a real etcd.
 *
 * Static: the config's entries, every rule of isr_remove/isr_add/promote
 * and its errors, on_change.
 * etcd (skipped, exit 77, without /usr/bin/etcd): etcd started on free
 * loopback ports with a temp data dir and fast elections (so a 1 s lease
 * TTL is honoured), stopped by PID. Seeding happens once (a second node with
 * other owners in its file sees the first map; another shard count is
 * refused); changes reach a second map instance through its watch; a change
 * at a stale epoch fails; promote is refused while the leader key is held
 * and allowed once the old lease is revoked (clean close) or has run out
 * (a child process holding it killed with SIGKILL), and raises the epoch;
 * a handover by the live primary moves role and leader key in one txn;
 * lease_ok drops to 0 before the TTL ends when etcd is SIGSTOPped, and
 * comes back after SIGCONT; with etcd stopped the calls fail and the map
 * keeps what it had.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "check.h"
#include "config.h"
#include "etcd.h"
#include "etcd_server.h"
#include "shard_map.h"
#include "test_util.h"

#define TTL_MS 1000
#define TIMEOUT_MS 1000

static char tmpdir[] = "/tmp/test_shard_map.XXXXXX";
static char err[1024];
static int etcd_port, peer_port;
/* fast elections: etcd's smallest lease TTL is 1.5 election timeouts */
static const char *const fast_etcd[] = {"--heartbeat-interval", "25", "--election-timeout", "250",
                                        NULL};

/* Three nodes, 4 shards: a owns 0-1, b 2, c 3. Replicas: b of 0-1, c of
 * 0 and 2, a of 3. The owners can be rotated (a test of seeding). */
static void load_conf(struct config *cfg, const char *name, const char *secret, unsigned shards,
                      int etcd, int rotate)
{
    char path[300];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s.conf", tmpdir, name);
    f = fopen(path, "w");
    if (!f)
        exit(2);
    fprintf(f,
            "[cluster]\nshards = %u\nepoch = 7\nsecret = %s\ntimeout_ms = %d\n"
            "lease_ttl_ms = %d\n",
            shards, secret, TIMEOUT_MS, TTL_MS);
    if (etcd)
        fprintf(f, "etcd = http://127.0.0.1:%d\n", etcd_port);
    if (!rotate)
        fprintf(f,
                "[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0-1\nreplicas = 3\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 2\nreplicas = 0-1\n"
                "[node c]\nurl = http://127.0.0.1:3\ndata_dir = c\nshards = 3-%u\n"
                "replicas = 0,2\n",
                shards - 1);
    else
        fprintf(f, "[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 2-%u\n"
                   "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 0\n"
                   "[node c]\nurl = http://127.0.0.1:3\ndata_dir = c\nshards = 1\n",
                shards - 1);
    fclose(f);
    if (config_load(path, cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "config_load: %s\n", err);
        exit(2);
    }
}

/* on_change counter */
struct changes {
    atomic_int n[16];
    atomic_int total;
};

static void on_change(void *ctx, unsigned shard)
{
    struct changes *c = ctx;
    if (shard < 16)
        atomic_fetch_add(&c->n[shard], 1);
    atomic_fetch_add(&c->total, 1);
}

static struct shard_copies get(struct shard_map *m, unsigned shard)
{
    struct shard_copies c;
    memset(&c, 0xee, sizeof(c));
    CHECK_RC(shard_map_get(m, shard, &c), 0);
    return c;
}

/* Wait (deadline 10 s) until shard's epoch/in_sync/leader are as wanted
 * in m (-1/UINT32_MAX/-2: any). */
static int wait_for(struct shard_map *m, unsigned shard, uint64_t epoch, uint32_t in_sync,
                    int leader)
{
    double end = now_s() + 10;
    while (now_s() < end) {
        struct shard_copies c;
        shard_map_get(m, shard, &c);
        if ((epoch == UINT64_MAX || c.epoch == epoch) &&
            (in_sync == UINT32_MAX || c.in_sync == in_sync) &&
            (leader == -2 || shard_map_leader(m, shard) == leader))
            return 1;
        usleep(10000);
    }
    return 0;
}

/* ---- static ---- */

static void test_static(void)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL;
    struct changes ch = {0};
    struct shard_copies c;

    load_conf(&cfg, "static", "static-secret-0123", 4, 0, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 3, &b, err, sizeof(err)), -EINVAL);
    CHECK(b == NULL);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        return;
    shard_map_on_change(a, on_change, &ch);
    c = get(a, 0);
    CHECK(c.epoch == 7 && c.primary == 0 && c.nreplicas == 2);
    CHECK(c.replicas[0] == 1 && c.replicas[1] == 2 && c.in_sync == 3); /* all in sync */
    c = get(a, 3);
    CHECK(c.primary == 2 && c.nreplicas == 1 && c.replicas[0] == 0 && c.in_sync == 1);
    c = get(a, 1);
    CHECK(c.primary == 0 && c.nreplicas == 1 && c.replicas[0] == 1);
    CHECK_RC(shard_map_get(a, 4, &c), -ENOENT); /* no shard: a split may make it */
    CHECK_RC(shard_map_get(a, CONFIG_MAX_SHARDS, &c), -EINVAL);
    CHECK(shard_map_leader(a, 0) == 0 && shard_map_leader(a, 2) == 1);
    CHECK(shard_map_lease_ok(a) == 1);

    /* isr rules */
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 6), -ESTALE);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 8), -ESTALE);
    CHECK_RC(shard_map_isr_remove(b, 0, 2, 7), -EPERM); /* b is not the primary */
    CHECK_RC(shard_map_isr_remove(a, 2, 1, 7), -EPERM);
    CHECK_RC(shard_map_isr_remove(a, 0, 0, 7), -ENOENT); /* the primary itself */
    CHECK_RC(shard_map_isr_remove(a, 1, 2, 7), -ENOENT); /* c holds no copy of 1 */
    CHECK_RC(shard_map_isr_remove(a, 0, 3, 7), -EINVAL);
    CHECK_RC(shard_map_isr_remove(a, 9, 1, 7), -ENOENT);
    CHECK_RC(shard_map_isr_remove(a, CONFIG_MAX_SHARDS, 1, 7), -EINVAL);
    CHECK(atomic_load(&ch.total) == 0);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 7), 0);
    CHECK(get(a, 0).in_sync == 2 && atomic_load(&ch.n[0]) == 1);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 7), 0); /* again: nothing changes */
    CHECK(get(a, 0).in_sync == 2 && atomic_load(&ch.n[0]) == 1);
    CHECK(get(b, 0).in_sync == 3); /* static: b's map is its own */

    /* promote: only an in-sync replica */
    CHECK_RC(shard_map_promote(a, 0, 1, 7), -EPERM);
    CHECK_RC(shard_map_promote(a, 0, 2, 6), -ESTALE);
    CHECK_RC(shard_map_promote(a, 0, 2, 7), 0);
    c = get(a, 0);
    CHECK(c.epoch == 8 && c.primary == 2 && c.nreplicas == 2);
    CHECK(c.replicas[0] == 1 && c.replicas[1] == 0 && c.in_sync == 0);
    CHECK(shard_map_leader(a, 0) == 2);
    CHECK(atomic_load(&ch.n[0]) == 2);
    CHECK_RC(shard_map_promote(a, 0, 2, 8), 0); /* already */
    CHECK_RC(shard_map_isr_add(a, 0, 0, 8), -EPERM); /* a is no longer primary */
    CHECK_RC(shard_map_isr_add(a, 0, 0, 7), -ESTALE);
    shard_map_on_change(a, NULL, NULL);
    shard_map_close(a);
    shard_map_close(b);
    shard_map_close(NULL);

    /* an etcd nobody listens on: open fails within timeout_ms, saying why */
    etcd_port = free_port();
    load_conf(&cfg, "no-etcd", "static-secret-0123", 4, 1, 0);
    double t0 = now_s();
    a = (struct shard_map *)&cfg;
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), -EHOSTUNREACH);
    CHECK(a == NULL);
    CHECKF(now_s() - t0 < TIMEOUT_MS / 1000.0 + 0.5, "took %.2f s", now_s() - t0);
    CHECKF(strstr(err, "127.0.0.1") != NULL, "err '%s'", err);
    etcd_port = 0;
}

/* ---- etcd ---- */

static int64_t version_of(struct etcd *e, const char *key)
{
    void *v = NULL;
    size_t vl;
    struct etcd_kv meta = {0};
    if (etcd_get(e, key, strlen(key), &v, &vl, &meta, err, sizeof(err)) != 0)
        return -1;
    free(v);
    return meta.version;
}

/* The map prefix for secret, found in etcd: the one key ending in
 * "/shards" whose map is not yet known. */
struct find {
    char prefix[64];
    int n;
};
static int on_find(void *ctx, const struct etcd_kv *kv)
{
    struct find *f = ctx;
    if (kv->klen > 7 && memcmp((const char *)kv->key + kv->klen - 7, "/shards", 7) == 0) {
        snprintf(f->prefix, sizeof(f->prefix), "%.*s", (int)(kv->klen - 6),
                 (const char *)kv->key);
        f->n++;
    }
    return 0;
}

static void test_seed(struct etcd *e)
{
    static struct config cfg, rot, eight;
    struct shard_map *a = NULL, *b = NULL, *x = NULL;
    struct shard_copies c;
    struct find f = {"", 0};
    char key[128];

    load_conf(&cfg, "seed", "seed-secret-0123456", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    if (!a) {
        fprintf(stderr, "open: %s\n", err);
        return;
    }
    c = get(a, 0);
    CHECK(c.epoch == 7 && c.primary == 0 && c.nreplicas == 2 && c.replicas[0] == 1 &&
          c.replicas[1] == 2);
    CHECK(c.in_sync == 0); /* seeded: nobody in sync until its primary says so */
    CHECK(get(a, 3).primary == 2 && get(a, 2).primary == 1);
    CHECK(shard_map_leader(a, 0) == 0 && shard_map_leader(a, 1) == 0);
    CHECK(shard_map_leader(a, 2) == -1); /* b is not running */
    CHECK(shard_map_lease_ok(a) == 1);

    /* the keys, each created once */
    CHECK_RC(etcd_get_prefix(e, ETCD_S("/shardfs/"), on_find, &f, NULL, err, sizeof(err)), 0);
    CHECKF(f.n == 1 && strlen(f.prefix) == 9 + 16 + 1, "n %d prefix %s", f.n, f.prefix);
    CHECK(strstr(f.prefix, "seed-secret") == NULL);
    snprintf(key, sizeof(key), "%sshard/0000", f.prefix);
    CHECK(version_of(e, key) == 1);
    snprintf(key, sizeof(key), "%sleader/0001", f.prefix);
    CHECK(version_of(e, key) == 1);
    snprintf(key, sizeof(key), "%snode/a", f.prefix);
    CHECK(version_of(e, key) == 1);

    /* a second node whose file has other owners: etcd is the truth */
    load_conf(&rot, "seed-rotated", "seed-secret-0123456", 4, 1, 1);
    CHECK_RC(shard_map_open(&rot, 1, &b, err, sizeof(err)), 0);
    if (b) {
        c = get(b, 0);
        CHECK(c.primary == 0 && c.nreplicas == 2 && c.epoch == 7);
        CHECK(get(b, 2).primary == 1);
        CHECK(shard_map_leader(b, 2) == 1); /* b took its own */
        CHECK(wait_for(a, 2, UINT64_MAX, UINT32_MAX, 1));
        snprintf(key, sizeof(key), "%sshard/0000", f.prefix);
        CHECK(version_of(e, key) == 1);
    }
    /* another shard count under the same secret: refused */
    load_conf(&eight, "seed-eight", "seed-secret-0123456", 8, 1, 0);
    CHECK_RC(shard_map_open(&eight, 2, &x, err, sizeof(err)), -EINVAL);
    CHECKF(strstr(err, "a store of 4 shards") && strstr(err, "this file has 8"), "err %s", err);
    CHECK(x == NULL);
    shard_map_close(b);
    shard_map_close(a);
}

/* The map's prefix as DESIGN.md defines it: /shardfs/ + 16 hex digits of
 * SHA-256("shardfs cluster id\0" SECRET) + /. */
static void prefix_of(const char *secret, char *out, size_t len)
{
    static const char tag[] = "shardfs cluster id";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    EVP_MD_CTX *x = EVP_MD_CTX_new();
    size_t n;

    if (!x || !EVP_DigestInit_ex(x, EVP_sha256(), NULL) || !EVP_DigestUpdate(x, tag, sizeof(tag)) ||
        !EVP_DigestUpdate(x, secret, strlen(secret)) || !EVP_DigestFinal_ex(x, md, &mdlen))
        exit(2);
    EVP_MD_CTX_free(x);
    n = (size_t)snprintf(out, len, "/shardfs/");
    for (int i = 0; i < 8; i++)
        n += (size_t)snprintf(out + n, len - n, "%02x", md[i]);
    snprintf(out + n, len - n, "/");
}

static void test_changes_and_promote(struct etcd *e)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL, *a2 = NULL;
    struct changes cb = {0};
    struct shard_copies c;
    double t0;

    load_conf(&cfg, "promote", "promote-secret-01234", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        return;
    shard_map_on_change(b, on_change, &cb);

    /* isr changes: only the live primary, only at the shard's epoch */
    CHECK_RC(shard_map_isr_add(a, 0, 1, 6), -ESTALE);
    CHECK_RC(shard_map_isr_add(b, 0, 1, 7), -EPERM);
    CHECK_RC(shard_map_isr_add(a, 0, 0, 7), -ENOENT);
    CHECK_RC(shard_map_isr_add(a, 0, 1, 7), 0);
    CHECK(get(a, 0).in_sync == 1);
    /* the watch brings it to b, and b's listener hears of it */
    CHECK(wait_for(b, 0, 7, 1, 0));
    t0 = now_s() + 5;
    while (atomic_load(&cb.n[0]) == 0 && now_s() < t0)
        usleep(10000);
    CHECK(atomic_load(&cb.n[0]) >= 1);
    CHECK_RC(shard_map_isr_add(a, 0, 2, 7), 0);
    CHECK_RC(shard_map_isr_remove(a, 0, 2, 7), 0);
    CHECK_RC(shard_map_isr_remove(a, 0, 2, 7), 0);
    CHECK(wait_for(b, 0, 7, 1, 0));

    /* The leader key taken over behind a's back (as by a promotion a's map
     * has not heard of yet): etcd refuses a's in-sync change, and a's
     * lease_ok drops once its watch delivers the put. */
    {
        char prefix[64], key[128];
        int64_t foreign = 0;
        prefix_of("promote-secret-01234", prefix, sizeof(prefix));
        snprintf(key, sizeof(key), "%sleader/0001", prefix);
        CHECK(version_of(e, key) == 1);
        CHECK(shard_map_lease_ok(a) == 1);
        CHECK_RC(etcd_lease_grant(e, 30, &foreign, err, sizeof(err)), 0);
        CHECK_RC(etcd_put(e, ETCD_S(key), ETCD_S("b"), foreign, NULL, err, sizeof(err)), 0);
        CHECK_RC(shard_map_isr_add(a, 1, 1, 7), -EPERM);
        CHECK(get(a, 1).in_sync == 0);
        CHECK(wait_for(a, 1, 7, 0, 1));
        CHECK(shard_map_lease_ok(a) == 0);
        /* that lease ends: a takes its key back (it is still the primary) */
        CHECK_RC(etcd_lease_revoke(e, foreign, err, sizeof(err)), 0);
        CHECK(wait_for(a, 1, 7, 0, 0));
        t0 = now_s() + 5;
        while (!shard_map_lease_ok(a) && now_s() < t0)
            usleep(10000);
        CHECK(shard_map_lease_ok(a) == 1);
        CHECK_RC(shard_map_isr_add(a, 1, 1, 7), 0);
    }

    /* promote: c's copy is not in sync; b's is, but a's lease holds the key */
    CHECK_RC(shard_map_promote(b, 0, 2, 7), -EPERM); /* not self */
    CHECK_RC(shard_map_promote(b, 0, 1, 6), -ESTALE);
    CHECK_RC(shard_map_promote(b, 0, 1, 7), -EBUSY);
    CHECK(get(b, 0).epoch == 7 && get(b, 0).primary == 0);
    /* a closes cleanly: its lease is revoked, its leader keys go */
    shard_map_close(a);
    a = NULL;
    CHECK(wait_for(b, 0, 7, UINT32_MAX, -1));
    CHECK_RC(shard_map_promote(b, 0, 1, 7), 0);
    c = get(b, 0);
    CHECK(c.epoch == 8 && c.primary == 1 && c.nreplicas == 2);
    CHECK(c.replicas[0] == 2 && c.replicas[1] == 0 && c.in_sync == 0);
    CHECK(shard_map_leader(b, 0) == 1);
    CHECK(shard_map_lease_ok(b) == 1);
    CHECK_RC(shard_map_promote(b, 0, 1, 7), -ESTALE);
    CHECK_RC(shard_map_isr_add(b, 0, 1, 8), -ENOENT);
    /* a restarts: it sees the new epoch, is primary of shard 1 only */
    CHECK_RC(shard_map_open(&cfg, 0, &a2, err, sizeof(err)), 0);
    if (a2) {
        c = get(a2, 0);
        CHECK(c.epoch == 8 && c.primary == 1 && c.replicas[1] == 0);
        CHECK(shard_map_leader(a2, 0) == 1 && shard_map_leader(a2, 1) == 0);
        CHECK(shard_map_lease_ok(a2) == 1);
        /* the old primary cannot change the shard any more */
        CHECK_RC(shard_map_isr_add(a2, 0, 2, 8), -EPERM);
        CHECK_RC(shard_map_isr_add(a2, 0, 2, 7), -ESTALE);
    }
    shard_map_close(b);
    shard_map_close(a2);
}

/* b's listener during a handover to b: how often b's lease_ok was 0 when
 * its map changed (b must never see itself primary without its key). */
struct lease_watch {
    struct shard_map *m;
    atomic_int calls, not_ok;
};

static void on_change_lease(void *ctx, unsigned shard)
{
    struct lease_watch *w = ctx;

    (void)shard;
    atomic_fetch_add(&w->calls, 1);
    if (!shard_map_lease_ok(w->m))
        atomic_fetch_add(&w->not_ok, 1);
}

/* The planned handover (shardfs promote): by the live primary only, to an
 * in-sync replica, raising the epoch; the leader key moves to the new
 * primary's lease in the same txn (no moment without a leader); the old
 * primary stays an in-sync replica in the new one's slot. */
static void test_handover(void)
{
    static struct config cfg, scfg;
    struct shard_map *a = NULL, *b = NULL, *c = NULL, *st = NULL;
    struct shard_copies x;

    load_conf(&scfg, "handover-static", "handover-secret-0123", 4, 0, 0);
    CHECK_RC(shard_map_open(&scfg, 0, &st, err, sizeof(err)), 0);
    if (st)
        CHECK_RC(shard_map_handover(st, 0, 1, 7), -EOPNOTSUPP);
    shard_map_close(st);

    load_conf(&cfg, "handover", "handover-secret-0123", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 2, &c, err, sizeof(err)), 0);
    if (!a || !b || !c)
        goto out;
    /* shard 0: primary a, replicas b (in sync) and c (not) */
    CHECK_RC(shard_map_isr_add(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 1, 0) && wait_for(c, 0, 7, 1, 0));
    CHECK_RC(shard_map_handover(b, 0, 2, 7), -EPERM); /* b is no primary */
    CHECK_RC(shard_map_handover(a, 0, 2, 7), -EPERM); /* c is not in sync */
    CHECK_RC(shard_map_handover(a, 0, 1, 6), -ESTALE);
    CHECK_RC(shard_map_handover(a, 2, 0, 7), -EPERM); /* b's shard, not a's */
    CHECK_RC(shard_map_handover(a, 0, 0, 7), 0);      /* already a's */
    CHECK(get(a, 0).epoch == 7);

    {
        struct lease_watch lw = {.m = b};
        double end = now_s() + 5;

        while (!shard_map_lease_ok(b) && now_s() < end)
            usleep(10000);
        shard_map_on_change(b, on_change_lease, &lw);
        CHECK_RC(shard_map_handover(a, 0, 1, 7), 0);
        CHECK(wait_for(b, 0, 8, 1, 1));
        shard_map_on_change(b, NULL, NULL);
        CHECK(atomic_load(&lw.calls) >= 1);
        CHECKF(atomic_load(&lw.not_ok) == 0, "b's lease_ok was 0 at %d of %d map changes",
               atomic_load(&lw.not_ok), atomic_load(&lw.calls));
    }
    x = get(a, 0);
    CHECK(x.epoch == 8 && x.primary == 1 && x.nreplicas == 2);
    CHECK(x.replicas[0] == 0 && x.replicas[1] == 2 && x.in_sync == 1);
    CHECK(shard_map_leader(a, 0) == 1);
    CHECK(shard_map_lease_ok(a) == 1); /* still the primary of shard 1 */
    /* b and c see role and key move together: c never sees no leader */
    CHECK(wait_for(b, 0, 8, 1, 1) && wait_for(c, 0, 8, 1, 1));
    CHECK(get(b, 0).primary == 1);
    {
        double end = now_s() + 5;
        while (!shard_map_lease_ok(b) && now_s() < end)
            usleep(10000);
        CHECK(shard_map_lease_ok(b) == 1); /* b holds the key with its own lease */
    }
    /* a cannot act on it any more; b can, and hands it back */
    CHECK_RC(shard_map_isr_remove(a, 0, 2, 8), -EPERM);
    CHECK_RC(shard_map_handover(a, 0, 1, 8), 0); /* already b's */
    CHECK_RC(shard_map_handover(b, 0, 0, 8), 0);
    x = get(b, 0);
    CHECK(x.epoch == 9 && x.primary == 0 && x.replicas[0] == 1 && x.in_sync == 1);
    CHECK(wait_for(a, 0, 9, 1, 0));

    /* to a node with no live lease: refused, nothing changes */
    CHECK_RC(shard_map_isr_add(a, 0, 2, 9), 0);
    shard_map_close(c);
    c = NULL;
    CHECK_RC(shard_map_handover(a, 0, 2, 9), -EHOSTUNREACH);
    x = get(a, 0);
    CHECK(x.epoch == 9 && x.primary == 0 && shard_map_leader(a, 0) == 0);
out:
    shard_map_close(a);
    shard_map_close(b);
    shard_map_close(c);
}

/* The rules of replica add/drop, pure. */
static void test_placement_rules(void)
{
    struct shard_copies c = {.epoch = 3, .primary = 0, .nreplicas = 1, .replicas = {1},
                             .in_sync = 1};

    CHECK_RC(shard_copies_add_replica(&c, 0), -EEXIST); /* the primary */
    CHECK_RC(shard_copies_add_replica(&c, 1), -EEXIST); /* already a replica */
    CHECK_RC(shard_copies_add_replica(&c, -1), -EINVAL);
    CHECK_RC(shard_copies_add_replica(&c, 2), 0);
    CHECK(c.nreplicas == 2 && c.replicas[1] == 2 && c.in_sync == 1 && c.epoch == 3);
    CHECK_RC(shard_copies_add_replica(&c, 3), 0);
    CHECK_RC(shard_copies_add_replica(&c, 4), -ENOSPC); /* a primary and 3 replicas */
    CHECK(c.nreplicas == 3);
    /* replicas 1 (in sync), 2, 3; in sync: 1 and 3 */
    c.in_sync = 1u | 4u;
    CHECK_RC(shard_copies_drop_replica(&c, 0), -EPERM);
    CHECK_RC(shard_copies_drop_replica(&c, 5), -ENOENT);
    CHECK_RC(shard_copies_drop_replica(&c, 2), 0); /* 3 moves down, its bit too */
    CHECK(c.nreplicas == 2 && c.replicas[0] == 1 && c.replicas[1] == 3 && c.in_sync == 3u);
    CHECK_RC(shard_copies_drop_replica(&c, 1), 0);
    CHECK(c.nreplicas == 1 && c.replicas[0] == 3 && c.in_sync == 1u && c.primary == 0);
    /* the only in-sync replica stays; one out of sync may go */
    CHECK_RC(shard_copies_drop_replica(&c, 3), -EBUSY);
    CHECK_RC(shard_copies_add_replica(&c, 1), 0);
    CHECK_RC(shard_copies_drop_replica(&c, 1), 0);
    c.in_sync = 0;
    CHECK_RC(shard_copies_drop_replica(&c, 3), 0);
    CHECK(c.nreplicas == 0 && c.in_sync == 0);
}

/* replica add/drop in etcd: made by a process that is no node (self -1,
 * the CLI), seen by the nodes' maps through their watches; refused by the
 * static map; a primary's isr_add of the new copy works on the new entry. */
static void test_placement(void)
{
    static struct config cfg, scfg;
    struct shard_map *a = NULL, *b = NULL, *cli = NULL, *st = NULL;
    struct shard_copies x;

    load_conf(&scfg, "placement-static", "placement-secret-0123", 4, 0, 0);
    CHECK_RC(shard_map_open(&scfg, -1, &st, err, sizeof(err)), 0);
    if (st) {
        CHECK_RC(shard_map_replica_add(st, 2, 0), -EOPNOTSUPP);
        CHECK_RC(shard_map_replica_drop(st, 0, 1), -EOPNOTSUPP);
    }
    shard_map_close(st);

    load_conf(&cfg, "placement", "placement-secret-0123", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, -1, &cli, err, sizeof(err)), 0);
    if (!a || !b || !cli)
        goto out;
    /* shard 1: primary a, replica b; add c */
    CHECK_RC(shard_map_isr_add(a, 1, 1, 7), 0);
    CHECK(wait_for(cli, 1, 7, 1, 0));
    CHECK_RC(shard_map_replica_add(cli, 1, 0), -EEXIST);
    CHECK_RC(shard_map_replica_add(cli, 1, 2), 0);
    x = get(cli, 1);
    CHECK(x.nreplicas == 2 && x.replicas[1] == 2 && x.in_sync == 1 && x.epoch == 7);
    {
        double end = now_s() + 10;
        /* both nodes' watches: each map hears of the change on its own */
        while ((get(a, 1).nreplicas != 2 || get(b, 1).nreplicas != 2) && now_s() < end)
            usleep(10000);
    }
    CHECK(get(a, 1).nreplicas == 2 && get(b, 1).nreplicas == 2);
    /* the primary puts the new copy in sync (it saw it level) */
    CHECK_RC(shard_map_isr_add(a, 1, 2, 7), 0);
    CHECK(wait_for(cli, 1, 7, 3, 0));
    /* a stale view in cli is put right by the compare: b is dropped from
     * a's fresh entry, not from an old one */
    CHECK_RC(shard_map_replica_drop(cli, 1, 0), -EPERM);
    CHECK_RC(shard_map_replica_drop(cli, 1, 1), 0);
    x = get(cli, 1);
    CHECK(x.nreplicas == 1 && x.replicas[0] == 2 && x.in_sync == 1 && x.primary == 0);
    CHECK(wait_for(a, 1, 7, 1, 0));
    CHECK(get(a, 1).replicas[0] == 2);
    CHECK_RC(shard_map_replica_drop(cli, 1, 2), -EBUSY); /* the only in-sync copy */
    CHECK_RC(shard_map_isr_add(a, 1, 1, 7), -ENOENT);   /* b holds none any more */
out:
    shard_map_close(a);
    shard_map_close(b);
    shard_map_close(cli);
}

/* ---- resharding ---- */

/* The map's layout as "D D D D ..." (one depth per slot). */
static const char *layout_of(struct shard_map *m)
{
    static char out[64];
    uint8_t depth[CONFIG_MAX_SHARDS];
    unsigned slots = 0;
    size_t n = 0;

    if (shard_map_layout(m, depth, &slots) != 0)
        return "bad";
    for (unsigned i = 0; i < slots && n + 4 < sizeof(out); i++)
        n += (size_t)snprintf(out + n, sizeof(out) - n, "%s%u", i ? " " : "", depth[i]);
    return out;
}

/* The rules, on the static map: split 0 (depth 2) makes 4, building until
 * the commit, with 0's copies; merge folds it back; abandon drops it. */
static void test_reshard_static(void)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL;
    struct changes ch = {0};
    struct shard_copies c;

    load_conf(&cfg, "reshard-static", "reshard-secret-0123", 4, 0, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        goto out;
    shard_map_on_change(a, on_change, &ch);
    CHECK(get(a, 0).depth == 2 && get(a, 3).depth == 2 && !get(a, 0).building);
    CHECKF(strcmp(layout_of(a), "2 2 2 2") == 0, "layout %s", layout_of(a));

    CHECK_RC(shard_map_split_begin(a, 2, 2), -EPERM);  /* b's shard */
    CHECK_RC(shard_map_split_begin(b, 0, 2), -EPERM);
    CHECK_RC(shard_map_split_begin(a, 0, 3), -ESTALE); /* 0 has depth 2 */
    CHECK_RC(shard_map_split_begin(a, 5, 2), -EINVAL); /* no shard of depth 2 is 5 */
    CHECK_RC(shard_map_split_begin(a, 0, 10), -ENOSPC);
    CHECK_RC(shard_map_split_commit(a, 0, 2), -ENOENT); /* not begun */
    CHECK(atomic_load(&ch.total) == 0);
    CHECK_RC(shard_map_split_begin(a, 0, 2), 0);
    c = get(a, 4);
    CHECK(c.building == 1 && c.depth == 3 && c.primary == 0 && c.epoch == 7);
    CHECK(c.nreplicas == 2 && c.replicas[0] == 1 && c.replicas[1] == 2 && c.in_sync == 0);
    CHECK(shard_map_leader(a, 4) == 0);
    CHECK(atomic_load(&ch.n[0]) == 1 && atomic_load(&ch.n[4]) == 1);
    CHECKF(strcmp(layout_of(a), "2 2 2 2") == 0, "layout %s", layout_of(a)); /* not placed */
    CHECK_RC(shard_map_split_begin(a, 0, 2), 0);        /* a resumed split */
    CHECK_RC(shard_map_split_begin(a, 4, 3), -EBUSY);   /* building shards do not split */
    CHECK_RC(shard_map_merge(a, 0, 3), -ESTALE);
    CHECK_RC(shard_map_split_commit(a, 0, 2), 0);
    CHECK(get(a, 0).depth == 3 && get(a, 4).depth == 3 && !get(a, 4).building);
    CHECKF(strcmp(layout_of(a), "3 2 2 2 3 2 2 2") == 0, "layout %s", layout_of(a));
    CHECK_RC(shard_map_split_commit(a, 0, 2), 0);       /* done already */
    CHECK_RC(shard_map_split_abandon(a, 0, 2), -EBUSY); /* committed */
    CHECK_RC(shard_map_merge(a, 0, 2), -ESTALE);
    CHECK_RC(shard_map_merge(a, 4, 3), -EINVAL);        /* the upper buddy */
    CHECK_RC(shard_map_merge(b, 0, 3), 0); /* b's map never split: nothing to do */
    CHECK_RC(shard_map_merge(a, 0, 3), 0);
    CHECK_RC(shard_map_get(a, 4, &c), -ENOENT);
    CHECK(get(a, 0).depth == 2 && shard_map_leader(a, 4) == -1);
    CHECKF(strcmp(layout_of(a), "2 2 2 2") == 0, "layout %s", layout_of(a));
    CHECK_RC(shard_map_merge(a, 0, 3), 0);              /* done already */
    CHECK_RC(shard_map_merge(a, 0, 2), -EINVAL);        /* below the made-with count */
    /* begun, then given up */
    CHECK_RC(shard_map_split_begin(a, 1, 2), 0);
    CHECK(get(a, 5).building == 1 && get(a, 5).replicas[0] == 1 && get(a, 5).nreplicas == 1);
    CHECK_RC(shard_map_split_abandon(a, 1, 2), 0);
    CHECK_RC(shard_map_get(a, 5, &c), -ENOENT);
    CHECK_RC(shard_map_split_abandon(a, 1, 2), 0);
    CHECK(get(b, 0).depth == 2 && shard_map_get(b, 4, &c) == -ENOENT); /* b's is its own */
    shard_map_on_change(a, NULL, NULL);
out:
    shard_map_close(a);
    shard_map_close(b);
}

/* Wait (10 s) until f(m) holds. */
static int wait_until(struct shard_map *m, int (*f)(struct shard_map *m))
{
    double end = now_s() + 10;
    while (now_s() < end) {
        if (f(m))
            return 1;
        usleep(10000);
    }
    return 0;
}
static int sees_4_building(struct shard_map *m)
{
    struct shard_copies c;
    return shard_map_get(m, 4, &c) == 0 && c.building && shard_map_leader(m, 4) == 0;
}
static int sees_split(struct shard_map *m)
{
    return strcmp(layout_of(m), "3 2 2 2 3 2 2 2") == 0;
}
static int sees_merged(struct shard_map *m)
{
    struct shard_copies c;
    return shard_map_get(m, 4, &c) == -ENOENT && shard_map_leader(m, 4) == -1 &&
           strcmp(layout_of(m), "2 2 2 2") == 0;
}
static int sees_depthless(struct shard_map *m)
{
    struct shard_copies c;
    return shard_map_get(m, 3, &c) == 0 && c.in_sync == 1 && c.depth == 2;
}

/* In etcd: the entries and leader keys a split and a merge write, seen by
 * every map's watch and by a map opened afterwards. */
static void test_reshard_etcd(struct etcd *e)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL, *cli = NULL, *late = NULL;
    struct shard_copies c;
    char prefix[64], key[128];
    const char *old = "{\"epoch\":\"7\",\"primary\":\"c\",\"replicas\":[\"a\"],\"in_sync\":[\"a\"]}";

    load_conf(&cfg, "reshard", "reshard-secret-01234", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, -1, &cli, err, sizeof(err)), 0);
    if (!a || !b || !cli)
        goto out;
    CHECK(wait_for(a, 0, 7, UINT32_MAX, 0));
    CHECKF(strcmp(layout_of(cli), "2 2 2 2") == 0, "layout %s", layout_of(cli));
    /* an entry written before layouts: the depth of the made-with count */
    prefix_of("reshard-secret-01234", prefix, sizeof(prefix));
    snprintf(key, sizeof(key), "%sshard/0003", prefix);
    CHECK_RC(etcd_put(e, key, strlen(key), old, strlen(old), 0, NULL, err, sizeof(err)), 0);
    CHECK(wait_until(cli, sees_depthless));

    CHECK_RC(shard_map_split_begin(b, 0, 2), -EPERM);
    CHECK_RC(shard_map_split_begin(cli, 0, 2), -EPERM);
    CHECK_RC(shard_map_split_begin(a, 0, 2), 0);
    CHECK(shard_map_lease_ok(a) == 1); /* it holds 4's leader key too */
    CHECK(wait_until(cli, sees_4_building) && wait_until(b, sees_4_building));
    c = get(cli, 4);
    CHECK(c.depth == 3 && c.primary == 0 && c.nreplicas == 2 && c.replicas[0] == 1 &&
          c.in_sync == 0 && c.epoch == 7);
    CHECKF(strcmp(layout_of(cli), "2 2 2 2") == 0, "layout %s", layout_of(cli));
    CHECK_RC(shard_map_split_begin(a, 0, 2), 0); /* resumed */
    CHECK_RC(shard_map_split_commit(b, 0, 2), -EPERM);
    CHECK_RC(shard_map_split_commit(a, 0, 2), 0);
    CHECK(wait_until(cli, sees_split) && wait_until(b, sees_split));
    /* a map opened now reads it whole */
    CHECK_RC(shard_map_open(&cfg, 2, &late, err, sizeof(err)), 0);
    if (late) {
        CHECKF(sees_split(late), "layout %s", layout_of(late));
        CHECK(shard_map_leader(late, 4) == 0 && !get(late, 4).building);
    }
    CHECK_RC(shard_map_merge(b, 0, 3), -EPERM);
    CHECK_RC(shard_map_merge(a, 0, 3), 0);
    CHECK(wait_until(cli, sees_merged) && wait_until(b, sees_merged));
    if (late)
        CHECK(wait_until(late, sees_merged));
    CHECK(shard_map_lease_ok(a) == 1);
    CHECK_RC(shard_map_merge(a, 0, 3), 0); /* done already */
    /* begun by a, given up by the CLI (no lease needed) */
    CHECK_RC(shard_map_split_begin(a, 1, 2), 0);
    CHECK_RC(shard_map_split_abandon(cli, 1, 2), 0);
    CHECK_RC(shard_map_get(cli, 5, &c), -ENOENT);
    CHECK(shard_map_leader(cli, 5) == -1);
    {
        double end = now_s() + 10;
        while (shard_map_get(a, 5, &c) != -ENOENT && now_s() < end)
            usleep(10000);
    }
    CHECK_RC(shard_map_get(a, 5, &c), -ENOENT);
    CHECK(shard_map_lease_ok(a) == 1);
out:
    shard_map_close(late);
    shard_map_close(a);
    shard_map_close(b);
    shard_map_close(cli);
}

/* A primary killed with SIGKILL: its key stays until its lease runs out. */
static void test_promote_after_expiry(void)
{
    static struct config cfg;
    struct shard_map *a = NULL;
    int ready[2];
    pid_t child;
    char byte;
    double t_kill, took;
    int rc;

    load_conf(&cfg, "expiry", "expiry-secret-012345", 4, 1, 0);
    if (pipe(ready) != 0)
        exit(2);
    child = fork();
    if (child < 0)
        exit(2);
    if (child == 0) {
        /* node c, primary of shard 3 (replica a): a in sync, then wait */
        struct shard_map *cm = NULL;
        if (shard_map_open(&cfg, 2, &cm, err, sizeof(err)) != 0 ||
            shard_map_isr_add(cm, 3, 0, 7) != 0) {
            fprintf(stderr, "child: %s\n", err);
            _exit(1);
        }
        if (write(ready[1], "r", 1) != 1)
            _exit(1);
        for (;;)
            pause();
    }
    close(ready[1]);
    CHECK(read(ready[0], &byte, 1) == 1);
    close(ready[0]);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    if (!a) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return;
    }
    CHECK(wait_for(a, 3, 7, 1, 2));
    CHECK_RC(shard_map_promote(a, 3, 0, 7), -EBUSY);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    t_kill = now_s();
    CHECK_RC(shard_map_promote(a, 3, 0, 7), -EBUSY); /* the lease is still alive */
    do {
        usleep(20000);
        rc = shard_map_promote(a, 3, 0, 7);
    } while (rc == -EBUSY && now_s() < t_kill + 10);
    took = now_s() - t_kill;
    CHECK_RC(rc, 0);
    /* etcd's TTL of 1 s (its expiry runs every 500 ms) */
    CHECKF(took > 0.3 && took < 3.0, "took %.2f s", took);
    CHECK(get(a, 3).epoch == 8 && get(a, 3).primary == 0 && shard_map_leader(a, 3) == 0);
    CHECK(shard_map_lease_ok(a) == 1);
    shard_map_close(a);
}

/* lease_ok before the TTL ends, and calls with etcd unreachable. */
static void test_lease_loss(pid_t etcd_pid)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL;
    double t_stop, t_lost = 0, end;
    struct shard_copies before;

    load_conf(&cfg, "loss", "loss-secret-0123456789", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        return;
    CHECK_RC(shard_map_isr_add(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 1, 0));
    /* renewals keep it alive well past the TTL */
    end = now_s() + 2.5 * TTL_MS / 1000.0;
    while (now_s() < end) {
        CHECK(shard_map_lease_ok(a) == 1);
        usleep(50000);
    }
    before = get(b, 0);
    CHECK(shard_map_lease_ok(a) == 1);
    kill(etcd_pid, SIGSTOP);
    t_stop = now_s();
    end = t_stop + 3;
    while (now_s() < end) {
        if (!shard_map_lease_ok(a)) {
            t_lost = now_s();
            break;
        }
        usleep(2000);
    }
    CHECK(t_lost > 0);
    CHECKF(t_lost - t_stop < TTL_MS / 1000.0, "lease_ok still 1 %.3f s after etcd stopped",
           t_lost - t_stop);
    /* nothing changes and nothing promotes while etcd is away */
    int rc = shard_map_promote(b, 0, 1, 7);
    CHECKF(rc == -ETIMEDOUT || rc == -EHOSTUNREACH, "rc %d", rc);
    rc = shard_map_isr_remove(a, 0, 1, 7);
    CHECKF(rc == -ETIMEDOUT || rc == -EHOSTUNREACH || rc == -EPERM || rc == -EAGAIN, "rc %d", rc);
    struct shard_copies now = get(b, 0);
    CHECK(now.epoch == before.epoch && now.primary == before.primary &&
          now.in_sync == before.in_sync);
    kill(etcd_pid, SIGCONT);
    /* back: a gets a lease (the old one may have run out meanwhile) and its keys */
    end = now_s() + 15;
    while (!shard_map_lease_ok(a) && now_s() < end)
        usleep(20000);
    CHECK(shard_map_lease_ok(a) == 1);
    CHECK(shard_map_leader(a, 0) == 0 || wait_for(a, 0, 7, UINT32_MAX, 0));
    /* unless b promoted in between (it did not try): a is still the primary */
    CHECK(get(a, 0).primary == 0 && get(a, 0).epoch == 7);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 0, 0));
    shard_map_close(b);
    shard_map_close(a);
}

/* ---- a TCP proxy in front of etcd, to cut the map off while etcd runs on */

#define PROXY_CONNS 32
struct proxy {
    int listen_fd, port;
    int fd[2 * PROXY_CONNS]; /* pairs: client, upstream; -1 free */
    atomic_int frozen, stop;
    atomic_int cut; /* set: the proxy thread closes every connection, then clears it */
    _Atomic double last_c2s; /* when bytes last went from the map to etcd */
    pthread_t th;
};

static int connect_etcd(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)etcd_port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static void proxy_drop(struct proxy *p, int pair)
{
    close(p->fd[2 * pair]);
    close(p->fd[2 * pair + 1]);
    p->fd[2 * pair] = p->fd[2 * pair + 1] = -1;
}

static void *proxy_main(void *arg)
{
    struct proxy *p = arg;
    char buf[65536];

    while (!atomic_load(&p->stop)) {
        struct pollfd pf[2 * PROXY_CONNS + 1];
        int idx[2 * PROXY_CONNS + 1], n = 0;

        if (atomic_load(&p->cut)) {
            for (int j = 0; j < PROXY_CONNS; j++)
                if (p->fd[2 * j] >= 0)
                    proxy_drop(p, j);
            atomic_store(&p->cut, 0);
        }
        if (atomic_load(&p->frozen)) { /* nothing moves, nothing is closed */
            usleep(5000);
            continue;
        }
        pf[n] = (struct pollfd){p->listen_fd, POLLIN, 0};
        idx[n++] = -1;
        for (int i = 0; i < 2 * PROXY_CONNS; i++)
            if (p->fd[i] >= 0) {
                pf[n] = (struct pollfd){p->fd[i], POLLIN, 0};
                idx[n++] = i;
            }
        if (poll(pf, (nfds_t)n, 10) <= 0)
            continue;
        for (int k = 0; k < n && !atomic_load(&p->frozen); k++) {
            if (!pf[k].revents)
                continue;
            if (idx[k] < 0) {
                int c = accept(p->listen_fd, NULL, NULL), u = c >= 0 ? connect_etcd() : -1, j;
                for (j = 0; j < PROXY_CONNS && p->fd[2 * j] >= 0; j++)
                    ;
                if (c < 0 || u < 0 || j == PROXY_CONNS) {
                    if (c >= 0)
                        close(c);
                    if (u >= 0)
                        close(u);
                    continue;
                }
                p->fd[2 * j] = c;
                p->fd[2 * j + 1] = u;
                continue;
            }
            int i = idx[k], other = i ^ 1;
            if (p->fd[i] < 0)
                continue;
            ssize_t got = read(p->fd[i], buf, sizeof(buf));
            if (got <= 0) {
                proxy_drop(p, i / 2);
                continue;
            }
            if (i % 2 == 0)
                atomic_store(&p->last_c2s, now_s());
            if (write(p->fd[other], buf, (size_t)got) != got)
                proxy_drop(p, i / 2);
        }
    }
    return NULL;
}

static void proxy_start(struct proxy *p)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);

    memset(p, 0, sizeof(*p));
    for (int i = 0; i < 2 * PROXY_CONNS; i++)
        p->fd[i] = -1;
    p->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (p->listen_fd < 0 || bind(p->listen_fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        listen(p->listen_fd, 64) != 0 ||
        getsockname(p->listen_fd, (struct sockaddr *)&a, &len) != 0 ||
        pthread_create(&p->th, NULL, proxy_main, p) != 0) {
        perror("proxy");
        exit(2);
    }
    p->port = ntohs(a.sin_port);
}

static void proxy_stop(struct proxy *p)
{
    atomic_store(&p->frozen, 0);
    atomic_store(&p->stop, 1);
    pthread_join(p->th, NULL);
    for (int j = 0; j < PROXY_CONNS; j++)
        if (p->fd[2 * j] >= 0)
            proxy_drop(p, j);
    close(p->listen_fd);
}

/* The map cut off from an etcd that runs on: lease_ok must be 0 before
 * the last renewal that reached etcd plus the TTL, and before etcd drops
 * the leader key. */
static void test_partition(struct etcd *e)
{
    static struct config cfg;
    struct shard_map *a = NULL;
    struct proxy px;
    char prefix[64], key[128];
    double t_freeze, t_lost = 0, t_last, t_gone = 0, end;
    int held_at_loss;

    proxy_start(&px);
    load_conf(&cfg, "partition", "partition-secret-01234", 4, 1, 0);
    /* the map talks to etcd through the proxy */
    snprintf(cfg.etcd, sizeof(cfg.etcd), "http://127.0.0.1:%d", px.port);
    prefix_of("partition-secret-01234", prefix, sizeof(prefix));
    snprintf(key, sizeof(key), "%sleader/0000", prefix);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    if (!a)
        goto out;
    for (int round = 0; round < 3; round++) {
        /* renewals go through; cut at a different phase of them each round */
        usleep(1500000 + 111000 * (unsigned)round);
        CHECK(shard_map_lease_ok(a) == 1);
        atomic_store(&px.frozen, 1);
        t_freeze = now_s();
        end = t_freeze + 3;
        t_lost = 0;
        while (now_s() < end) {
            if (!shard_map_lease_ok(a)) {
                t_lost = now_s();
                break;
            }
            usleep(1000);
        }
        t_last = atomic_load(&px.last_c2s);
        held_at_loss = version_of(e, key) > 0;
        CHECK(t_lost > 0);
        CHECKF(t_lost < t_last + TTL_MS / 1000.0,
               "lease_ok until %.3f s after the last request reached etcd", t_lost - t_last);
        CHECK(held_at_loss);
        /* etcd drops the key later (its TTL, then its expiry check) */
        end = now_s() + 5;
        while (now_s() < end && version_of(e, key) > 0)
            usleep(5000);
        t_gone = now_s();
        CHECK(version_of(e, key) < 0);
        CHECKF(t_gone > t_lost, "key gone %.3f s before lease_ok dropped", t_lost - t_gone);
        /* connected again: a new lease, the key taken back */
        atomic_store(&px.frozen, 0);
        end = now_s() + 10;
        while (!shard_map_lease_ok(a) && now_s() < end)
            usleep(10000);
        CHECK(shard_map_lease_ok(a) == 1);
        CHECK(version_of(e, key) > 0);
    }
out:
    shard_map_close(a);
    proxy_stop(&px);
}

/* A map whose watch was away while etcd compacted the changes it missed:
 * it reads the whole map again, leader keys deleted meanwhile included. */
static void test_watch_compacted(struct etcd *e)
{
    static struct config cfg, via;
    struct shard_map *a = NULL, *b = NULL;
    struct changes cb = {0};
    struct proxy px;
    int64_t rev = 0;
    double end;

    proxy_start(&px);
    load_conf(&cfg, "compact", "compact-secret-0123456", 4, 1, 0);
    via = cfg;
    snprintf(via.etcd, sizeof(via.etcd), "http://127.0.0.1:%d", px.port);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&via, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        goto out;
    shard_map_on_change(b, on_change, &cb);
    CHECK_RC(shard_map_isr_add(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 1, 0));
    /* b cut off: its watch breaks and cannot come back */
    atomic_store(&px.frozen, 1);
    atomic_store(&px.cut, 1);
    end = now_s() + 5;
    while (atomic_load(&px.cut) && now_s() < end)
        usleep(1000);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 7), 0);
    shard_map_close(a); /* its leader keys go */
    a = NULL;
    CHECK_RC(etcd_put(e, ETCD_S("compact-here"), ETCD_S("1"), 0, &rev, err, sizeof(err)), 0);
    CHECK_RC(etcd_compact(etcd_port, rev), 0);
    usleep(300000);
    CHECK(get(b, 0).in_sync == 1 && shard_map_leader(b, 0) == 0); /* b has not heard */
    atomic_store(&cb.total, 0);
    atomic_store(&px.frozen, 0);
    CHECK(wait_for(b, 0, 7, 0, -1));
    CHECK(shard_map_leader(b, 1) == -1);
    CHECK(shard_map_leader(b, 2) == 1); /* its own, kept or taken back */
    end = now_s() + 5;
    while (atomic_load(&cb.n[1]) == 0 && now_s() < end)
        usleep(10000);
    CHECK(atomic_load(&cb.n[1]) >= 1); /* shard 1 changed only by its leader key */
out:
    shard_map_close(b);
    shard_map_close(a);
    proxy_stop(&px);
}

/* etcd stopped and started again: the map keeps what it has meanwhile,
 * calls fail fast, and afterwards the lease, the leader keys and the watch
 * come back by themselves. Returns the new etcd's pid. */
static pid_t test_etcd_restart(pid_t pid)
{
    static struct config cfg;
    struct shard_map *a = NULL, *b = NULL;
    struct changes cb = {0};
    double t0, end;
    int rc;

    load_conf(&cfg, "restart", "restart-secret-0123456", 4, 1, 0);
    CHECK_RC(shard_map_open(&cfg, 0, &a, err, sizeof(err)), 0);
    CHECK_RC(shard_map_open(&cfg, 1, &b, err, sizeof(err)), 0);
    if (!a || !b)
        goto out;
    CHECK_RC(shard_map_isr_add(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 1, 0));
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    t0 = now_s();
    rc = shard_map_isr_remove(a, 0, 1, 7);
    CHECKF(rc == -EHOSTUNREACH, "rc %d", rc);
    CHECKF(now_s() - t0 < TIMEOUT_MS / 1000.0 + 0.5, "took %.2f s", now_s() - t0);
    CHECK_RC(shard_map_promote(b, 0, 1, 7), -EHOSTUNREACH);
    CHECK(get(a, 0).in_sync == 1 && get(b, 0).in_sync == 1 && get(b, 0).primary == 0);
    CHECK(shard_map_leader(b, 0) == 0);
    end = now_s() + 2;
    while (shard_map_lease_ok(a) && now_s() < end)
        usleep(5000);
    CHECK(shard_map_lease_ok(a) == 0);
    CHECKF(now_s() - t0 < TTL_MS / 1000.0, "lease_ok for %.2f s", now_s() - t0);

    pid = start_etcd(tmpdir, etcd_port, peer_port, fast_etcd);
    end = now_s() + 30;
    while (!shard_map_lease_ok(a) && now_s() < end)
        usleep(20000);
    CHECK(shard_map_lease_ok(a) == 1);
    CHECK(shard_map_leader(a, 0) == 0 && get(a, 0).epoch == 7);
    /* b's watch is connected again: it hears of a's next change */
    shard_map_on_change(b, on_change, &cb);
    CHECK_RC(shard_map_isr_remove(a, 0, 1, 7), 0);
    CHECK(wait_for(b, 0, 7, 0, 0));
    CHECK(atomic_load(&cb.n[0]) >= 1);
out:
    shard_map_close(b);
    shard_map_close(a);
    return pid;
}

int main(void)
{
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 2;
    }
    test_static();
    test_placement_rules();
    test_reshard_static();
    if (access(ETCD_BIN, X_OK) != 0) {
        printf("test_shard_map: %s not installed, etcd parts skipped\n", ETCD_BIN);
        rm_rf(tmpdir);
        return failures ? check_summary("shard_map") : 77;
    }
    peer_port = free_port();
    etcd_port = free_port();
    while (peer_port == etcd_port)
        peer_port = free_port();
    pid_t pid = start_etcd(tmpdir, etcd_port, peer_port, fast_etcd);
    char url[64];
    struct etcd *e = NULL;
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", etcd_port);
    CHECK_RC(etcd_new(url, TIMEOUT_MS, &e, err, sizeof(err)), 0);
    int up = e && etcd_wait_up(e, err, sizeof(err));
    CHECKF(up, "etcd did not come up: %s (see %s/etcd.log)", err, tmpdir);
    if (up) {
        test_seed(e);
        test_changes_and_promote(e);
        test_handover();
        test_placement();
        test_reshard_etcd(e);
        test_promote_after_expiry();
        test_lease_loss(pid);
        test_partition(e);
        test_watch_compacted(e);
        pid = test_etcd_restart(pid);
    }
    etcd_free(e);
    kill(pid, SIGCONT);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    if (!failures)
        rm_rf(tmpdir);
    else
        fprintf(stderr, "etcd's data and log left in %s\n", tmpdir);
    return check_summary("shard_map");
}
