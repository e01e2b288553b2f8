/* test_shard_repl.c -- unit tests for backend/shard_repl.c, the primary's
 * side of a replicated shard.
 *
 * A real shards.conf (4 shards; node a owns 0-1, b owns 2, c owns 3; b and
 * c hold replicas of shard 0; ack = replica, replica_lag_ms = 1000), a real
 * LMDB shard 0 of node a, the real static shard map, and the wrapper around
 * them. Replicas are played by the test calling shard_repl_report() as the
 * stream route would. The map's isr_remove and lease_ok are wrapped at link
 * time (-Wl,--wrap, tests/unit/meson.build) so that a test can make them
 * fail; otherwise they are the real ones.
 *
 *  - ack = replica: an apply blocks until every in-sync replica reported its
 *    batch's lsn (not before: checked while it waits), and only those;
 *  - a silent replica leaves the in-sync set after replica_lag_ms (by
 *    shard_map_isr_remove, seen in the map) and the write then succeeds;
 *    the next write waits for the others only; a report of the primary's
 *    position puts it back, an older one does not;
 *  - isr_remove failing: the write fails with EIO;
 *  - joining: with the in-sync set empty, a write that comes while a
 *    replica's way back in (isr_add) is in flight waits for that replica's
 *    ack (else the replica would enter the set lacking an acknowledged
 *    write); a joiner a little behind is added once it reported the
 *    position it joined at, also while writes go on; one that lags is
 *    dropped after replica_lag_ms, and the write succeeds;
 *  - no lease: apply and sync fail with EHOSTUNREACH and change nothing;
 *    a lease lost during the wait fails the write too;
 *  - no-waiting mode: an apply that would wait refuses with EWOULDBLOCK
 *    having applied nothing; with ack = primary it is done;
 *  - ack = primary: nothing waits for silent replicas;
 *  - sync waits for the in-sync replicas' synced lsn, calls the sync
 *    listener and tells sync_wanted;
 *  - status: lag in batches and ms, in-sync flags, snapshot marks;
 *  - holds: a report keeps the stream after its lsn through trimming;
 *  - handover: a freeze waits for the writes in progress (bounded), holds
 *    new ones (refuses them in no-waiting mode), thaw(0) lets them go on;
 *    wait_level follows the reports; after thaw(moved) every op, the held
 *    one included, fails with EREMCHG and applies nothing.
 * Exits non-zero on any failed check.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "batch.h"
#include "config.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "shard_map.h"
#include "shard_repl.h"
#include "stream.h"
#include "check.h"
#include "test_util.h"

#define LAG_MS 1000 /* roomy: the ASan build on a loaded VM took 0.3 s for what the checks bound */

/* ---- the map's calls, wrapped at link time ---- */

int __real_shard_map_isr_remove(struct shard_map *m, unsigned shard, int node, uint64_t epoch);
int __wrap_shard_map_isr_remove(struct shard_map *m, unsigned shard, int node, uint64_t epoch);
int __real_shard_map_lease_ok(struct shard_map *m);
int __real_shard_map_isr_add(struct shard_map *m, unsigned shard, int node, uint64_t epoch);
int __wrap_shard_map_isr_add(struct shard_map *m, unsigned shard, int node, uint64_t epoch);
int __wrap_shard_map_lease_ok(struct shard_map *m);

static _Atomic int fail_isr_remove, isr_removes, lease_lost;

int __wrap_shard_map_isr_remove(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    atomic_fetch_add(&isr_removes, 1);
    if (atomic_load(&fail_isr_remove))
        return -ETIMEDOUT; /* etcd unreachable */
    return __real_shard_map_isr_remove(m, shard, node, epoch);
}

/* isr_add blocks while hold_isr_add is set (an etcd txn taking its time);
 * isr_add_waiting says one is blocked. */
static _Atomic int hold_isr_add, isr_add_waiting;

int __wrap_shard_map_isr_add(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    while (atomic_load(&hold_isr_add)) {
        atomic_store(&isr_add_waiting, 1);
        usleep(1000);
    }
    atomic_store(&isr_add_waiting, 0);
    return __real_shard_map_isr_add(m, shard, node, epoch);
}

int __wrap_shard_map_lease_ok(struct shard_map *m)
{
    return atomic_load(&lease_lost) ? 0 : __real_shard_map_lease_ok(m);
}

/* ---- setup ---- */

static char tmpdir[] = "/tmp/shardfs-test-repl-XXXXXX";
static struct config cfg;
static struct shard_map *map;
static struct shard *repl;  /* the wrapper (ack = replica) */
static struct shard *inner; /* its LMDB shard */
static int node_b, node_c;

static void setup(void)
{
    static const char conf[] =
        "[cluster]\nshards = 4\nepoch = 1\nsecret = test-secret-0123456789\n"
        "ack = replica\nreplica_lag_ms = 1000\n"
        "[node a]\nurl = http://127.0.0.1:1\ndata_dir = ./a\nshards = 0-1\n"
        "[node b]\nurl = http://127.0.0.1:2\ndata_dir = ./b\nshards = 2\nreplicas = 0\n"
        "[node c]\nurl = http://127.0.0.1:3\ndata_dir = ./c\nshards = 3\nreplicas = 0\n";
    struct shard_lmdb_options opt = {.commit_interval_ms = 60000, .stream_bytes = 4096};
    char path[PATH_MAX + 64], err[1024];
    FILE *f;

    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        exit(2);
    }
    snprintf(path, sizeof(path), "%s/shards.conf", tmpdir);
    f = fopen(path, "w");
    if (!f || fputs(conf, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
    if (config_load(path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "config_load: %s\n", err);
        exit(2);
    }
    node_b = config_node_index(&cfg, "b");
    node_c = config_node_index(&cfg, "c");
    if (cfg.replica_lag_ms != LAG_MS || cfg.ack != CONFIG_ACK_REPLICA || node_b < 0 || node_c < 0) {
        fprintf(stderr, "the config is not what the tests expect\n");
        exit(2);
    }
    if (shard_map_open(&cfg, 0, &map, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_map_open: %s\n", err);
        exit(2);
    }
    snprintf(path, sizeof(path), "%s/shard-0", tmpdir);
    if (shard_lmdb_open(path, 0, &opt, &inner, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_lmdb_open: %s\n", err);
        exit(2);
    }
    CHECK_RC(shard_repl_new(inner, map, &cfg, 0, NULL, &repl), 0);
    if (!repl)
        exit(2);
    CHECK(shard_repl_is(repl) && !shard_repl_is(inner) && shard_repl_inner(repl) == inner);
}

/* ---- helpers ---- */

static struct stream_pos position(void)
{
    struct stream_pos p = {0};

    CHECK_RC(shard_lmdb_position(inner, &p), 0);
    return p;
}

/* Whether node is in shard 0's in-sync set. */
static int in_sync(int node)
{
    struct shard_copies c;

    CHECK_RC(shard_map_get(map, 0, &c), 0);
    for (unsigned i = 0; i < c.nreplicas; i++)
        if (c.replicas[i] == node)
            return (int)((c.in_sync >> i) & 1u);
    return -1;
}

/* What `shardfs status` hears of node: 1 joining (its join point into
 * *join_lsn), 0 not, -1 not a replica. */
static int joining(int node, uint64_t *join_lsn)
{
    struct shard_repl_status st;

    CHECK_RC(shard_repl_status(repl, &st), 0);
    for (unsigned i = 0; i < st.nreplicas; i++)
        if (st.replicas[i].node == node) {
            *join_lsn = st.replicas[i].join_lsn;
            return st.replicas[i].joining;
        }
    return -1;
}

/* The value of key in the shard ("" if absent) into buf. */
static const char *value_of(const char *key, char *buf, size_t len)
{
    size_t vlen = 0;
    int rc = shard_get(repl, key, strlen(key), 0, buf, len - 1, &vlen);

    buf[rc > 0 ? rc : 0] = '\0';
    return buf;
}

/* An apply of key=val on its own thread, timed. */
struct async_op {
    pthread_t t;
    struct shard *sh;
    const char *key, *val;
    int sync; /* a sync instead */
    _Atomic int done;
    int rc;
    double start, end;
};

static void *async_main(void *arg)
{
    struct async_op *op = arg;
    struct batch b;

    if (op->sync) {
        op->rc = shard_sync(op->sh);
    } else {
        batch_init(&b);
        batch_put(&b, op->key, strlen(op->key), op->val, strlen(op->val));
        op->rc = shard_apply(op->sh, &b);
        batch_free(&b);
    }
    op->end = now_s();
    atomic_store(&op->done, 1);
    return NULL;
}

static void async_start(struct async_op *op, struct shard *sh, const char *key, const char *val)
{
    memset(op, 0, sizeof(*op));
    op->sh = sh;
    op->key = key;
    op->val = val;
    op->start = now_s();
    if (pthread_create(&op->t, NULL, async_main, op) != 0)
        exit(2);
}

static int async_join(struct async_op *op)
{
    pthread_join(op->t, NULL);
    return op->rc;
}

static int apply_now(struct shard *sh, const char *key, const char *val)
{
    struct async_op op;

    async_start(&op, sh, key, val);
    return async_join(&op);
}

/* Wait until lmdb's position moved past lsn (the async apply is in). */
static struct stream_pos wait_applied_in(struct shard *lmdb, uint64_t lsn)
{
    struct stream_pos p = {0};

    for (int i = 0; i < 2000; i++) {
        if (shard_lmdb_position(lmdb, &p) == 0 && p.lsn > lsn)
            return p;
        usleep(1000);
    }
    CHECKF(0, "the apply never reached the shard");
    return p;
}

static struct stream_pos wait_applied(uint64_t lsn)
{
    return wait_applied_in(inner, lsn);
}

/* Both replicas report the current position, everything synced. */
static void both_report(void)
{
    struct stream_pos p = position();

    CHECK_RC(shard_repl_report(repl, node_b, &p, p.lsn), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, p.lsn), 0);
}

/* ---- tests ---- */

static void test_waits_for_every_in_sync_replica(void)
{
    struct stream_pos before, p;
    struct async_op op;
    char buf[64];

    both_report();
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    before = position();
    async_start(&op, repl, "k1", "v1");
    p = wait_applied(before.lsn);
    usleep(100000);
    CHECKF(!atomic_load(&op.done), "the apply returned before any replica reported");
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    usleep(100000);
    CHECKF(!atomic_load(&op.done), "the apply returned with only b's report");
    /* A report of an older position is no ack. */
    CHECK_RC(shard_repl_report(repl, node_c, &before, 0), 0);
    usleep(30000);
    CHECK(!atomic_load(&op.done));
    CHECK_RC(shard_repl_report(repl, node_c, &p, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < (LAG_MS - 50) / 1000.0, "took %.3f s", op.end - op.start);
    CHECK(strcmp(value_of("k1", buf, sizeof(buf)), "v1") == 0);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    CHECK_RC(atomic_load(&isr_removes), 0);
}

/* c's report on its own thread (it may block in a held isr_add). */
struct async_report {
    pthread_t t;
    struct stream_pos p;
    int rc;
};

static void *report_main(void *arg)
{
    struct async_report *ar = arg;

    ar->rc = shard_repl_report(repl, node_c, &ar->p, ar->p.lsn);
    return NULL;
}

static void test_joining(void)
{
    struct stream_pos p, q;
    struct async_report ar;
    struct async_op op;
    uint64_t epoch;
    struct shard_copies c;
    char buf[64];
    uint64_t jl = 0;

    both_report();
    CHECK_RC(shard_map_get(map, 0, &c), 0);
    epoch = c.epoch;
    /* Nobody in sync: a write waits for nobody. */
    CHECK_RC(shard_map_isr_remove(map, 0, node_b, epoch), 0);
    CHECK_RC(shard_map_isr_remove(map, 0, node_c, epoch), 0);
    CHECK(in_sync(node_b) == 0 && in_sync(node_c) == 0);
    async_start(&op, repl, "j1", "v1");
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < 0.5, "took %.3f s", op.end - op.start);

    /* c reports the primary's position: its way back in is a txn, held
     * here; a write meanwhile must wait for c. */
    atomic_store(&hold_isr_add, 1);
    ar.p = position();
    pthread_create(&ar.t, NULL, report_main, &ar);
    for (int i = 0; i < 2000 && !atomic_load(&isr_add_waiting); i++)
        usleep(1000);
    CHECK(atomic_load(&isr_add_waiting));
    p = position();
    async_start(&op, repl, "j2", "v2");
    q = wait_applied(p.lsn);
    usleep(100000);
    CHECKF(!atomic_load(&op.done), "a write was acknowledged without the replica joining");
    atomic_store(&hold_isr_add, 0);
    pthread_join(ar.t, NULL);
    CHECK_RC(ar.rc, 0);
    CHECK(in_sync(node_c) == 1);
    usleep(50000);
    CHECKF(!atomic_load(&op.done), "the write returned before c's ack");
    CHECK_RC(shard_repl_report(repl, node_c, &q, q.lsn), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK(strcmp(value_of("j2", buf, sizeof(buf)), "v2") == 0);

    /* b, a little behind, joins at the position of its first near report,
     * while c acks every write and writes go on. */
    CHECK(in_sync(node_b) == 0);
    p = position();
    CHECK_RC(apply_now(repl, "j3", "v3"), 0); /* waits for c, silent: c leaves */
    CHECK(in_sync(node_c) == 0); /* dropped after replica_lag_ms */
    CHECK(strcmp(value_of("j3", buf, sizeof(buf)), "v3") == 0);
    q = position();
    CHECK_RC(shard_repl_report(repl, node_b, &p, p.lsn), 0); /* one behind: joining */
    CHECK(in_sync(node_b) == 0);
    CHECK(joining(node_b, &jl) == 1 && jl == q.lsn); /* status shows it */
    CHECK(joining(node_c, &jl) == 0);
    async_start(&op, repl, "j4", "v4");
    wait_applied(q.lsn);
    usleep(50000);
    CHECKF(!atomic_load(&op.done), "a write did not wait for the joiner");
    p = position();
    CHECK_RC(shard_repl_report(repl, node_b, &p, p.lsn), 0); /* past its join point */
    CHECK_RC(async_join(&op), 0);
    CHECK(in_sync(node_b) == 1);
    CHECK(joining(node_b, &jl) == 0);

    /* A joiner that goes silent is dropped; the write is acknowledged. */
    p = position();
    async_start(&op, repl, "j5", "v5");
    q = wait_applied(p.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &q, q.lsn), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, p.lsn), 0); /* behind: joining */
    CHECK(in_sync(node_c) == 0);
    async_start(&op, repl, "j6", "v6");
    q = wait_applied(q.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &q, q.lsn), 0);
    usleep(100000);
    CHECKF(!atomic_load(&op.done), "a write did not wait for the joiner");
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start >= (LAG_MS - 20) / 1000.0, "took %.3f s", op.end - op.start);
    CHECK(in_sync(node_c) == 0 && in_sync(node_b) == 1);
    /* Dropped: the next write does not wait for it. */
    p = position();
    async_start(&op, repl, "j7", "v7");
    q = wait_applied(p.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &q, q.lsn), 0);
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < (LAG_MS - 100) / 1000.0, "took %.3f s", op.end - op.start);
    both_report(); /* c level: joins and is added at once */
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
}

/* b acks every batch as it comes, from a thread, until told to stop. */
static _Atomic int acker_stop;
static void *acker_main(void *arg)
{
    struct stream_pos p, last = {0};

    (void)arg;
    while (!atomic_load(&acker_stop)) {
        if (shard_lmdb_position(inner, &p) == 0 && p.lsn != last.lsn) {
            shard_repl_report(repl, node_b, &p, p.lsn);
            last = p;
        }
        usleep(2000);
    }
    return NULL;
}

static void test_silent_replica_leaves_and_rejoins(void)
{
    struct stream_pos old, p;
    struct async_op op;
    pthread_t acker;
    char buf[64];
    double t;

    both_report();
    old = position();
    atomic_store(&acker_stop, 0);
    pthread_create(&acker, NULL, acker_main, NULL);
    /* c is silent: the write waits replica_lag_ms, c leaves, then it is
     * acknowledged. */
    async_start(&op, repl, "k2", "v2");
    CHECK_RC(async_join(&op), 0);
    t = op.end - op.start;
    CHECKF(t >= (LAG_MS - 20) / 1000.0 && t < (LAG_MS + 1500) / 1000.0, "took %.3f s", t);
    CHECK(in_sync(node_c) == 0);
    CHECK(in_sync(node_b) == 1);
    CHECK(atomic_load(&isr_removes) == 1);
    CHECK(strcmp(value_of("k2", buf, sizeof(buf)), "v2") == 0);
    /* The next write waits for b only. */
    async_start(&op, repl, "k3", "v3");
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < (LAG_MS - 100) / 1000.0, "took %.3f s", op.end - op.start);
    atomic_store(&acker_stop, 1);
    pthread_join(acker, NULL);
    /* c reports an old position: still out; the primary's: back in. */
    CHECK_RC(shard_repl_report(repl, node_c, &old, 0), 0);
    CHECK(in_sync(node_c) == 0);
    p = position();
    CHECK_RC(shard_repl_report(repl, node_c, &p, p.lsn), 0);
    CHECK(in_sync(node_c) == 1);
    /* Not a replica of the shard: refused. */
    CHECK_RC(shard_repl_report(repl, 0, &p, p.lsn), -EINVAL);
    CHECK_RC(shard_repl_report(repl, 77, &p, p.lsn), -EINVAL);
}

static void test_isr_remove_failure_fails_the_write(void)
{
    struct async_op op;

    both_report();
    atomic_store(&isr_removes, 0);
    atomic_store(&fail_isr_remove, 1);
    async_start(&op, repl, "k4", "v4");
    CHECK_RC(async_join(&op), -EIO);
    CHECKF(op.end - op.start >= (LAG_MS - 20) / 1000.0, "took %.3f s", op.end - op.start);
    CHECK(atomic_load(&isr_removes) >= 1);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1); /* nothing recorded: still in */
    atomic_store(&fail_isr_remove, 0);
    both_report();
}

/* Without the lease (etcd away, or unreachable from here): with ack =
 * replica a write is fenced by the acks of its in-sync replicas, so it is
 * acknowledged once they all have it, and refused (EIO) when one is silent
 * and cannot be removed from the in-sync set; with ack = primary, or no
 * in-sync replica left, the lease is the only fence: nothing is applied,
 * EHOSTUNREACH. */
static void test_no_lease(struct shard *primary_ack)
{
    struct stream_pos before, p;
    struct async_op op;
    char buf[64];

    both_report();
    atomic_store(&lease_lost, 1);
    /* ack = primary: refused before anything is applied */
    CHECK_RC(apply_now(primary_ack, "nl5", "w5"), -EHOSTUNREACH);
    CHECK_RC(shard_sync(primary_ack), -EHOSTUNREACH);
    CHECK(shard_get(primary_ack, "nl5", 3, 0, buf, sizeof(buf), &(size_t){0}) <= 0);
    /* ack = replica, both replicas acknowledge: acknowledged */
    before = position();
    async_start(&op, repl, "nl5", "w5");
    p = wait_applied(before.lsn);
    usleep(50000);
    CHECK(!atomic_load(&op.done)); /* waits for the replicas, lease or not */
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK(strcmp(value_of("nl5", buf, sizeof(buf)), "w5") == 0);
    /* one silent and the in-sync set out of reach (a deposed primary: its
     * promoted replica pulls from it no more): not acknowledged */
    atomic_store(&fail_isr_remove, 1);
    before = position();
    async_start(&op, repl, "nl6", "w6");
    p = wait_applied(before.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(async_join(&op), -EIO);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    atomic_store(&fail_isr_remove, 0);
    /* c silent and removed: b alone still fences the write */
    before = position();
    async_start(&op, repl, "nl7", "w7");
    p = wait_applied(before.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 0);
    /* and both removed: no fence left, the write is not acknowledged */
    async_start(&op, repl, "nl8", "w8");
    CHECK_RC(async_join(&op), -EHOSTUNREACH);
    CHECK(in_sync(node_b) == 0 && in_sync(node_c) == 0);
    /* nothing to fence with: refused before applying */
    before = position();
    CHECK_RC(apply_now(repl, "nl9", "w9"), -EHOSTUNREACH);
    p = position();
    CHECK(stream_pos_eq(&p, &before));
    CHECK(strcmp(value_of("nl9", buf, sizeof(buf)), "") == 0);
    atomic_store(&lease_lost, 0);
    both_report();
}

static void test_nowait_refuses_before_applying(struct shard *primary_ack)
{
    struct stream_pos before, p;
    struct batch b;
    char buf[64];
    int rc;

    both_report();
    before = position();
    batch_init(&b);
    batch_put(&b, "k7", 2, "v7", 2);
    shard_nowait_begin();
    rc = shard_apply(repl, &b);
    CHECK_RC(shard_nowait_end(), 1);
    CHECK_RC(rc, -EWOULDBLOCK);
    p = position();
    CHECKF(stream_pos_eq(&p, &before), "the refused apply changed the position");
    CHECK(strcmp(value_of("k7", buf, sizeof(buf)), "") == 0);
    shard_nowait_begin();
    rc = shard_sync(repl);
    CHECK_RC(shard_nowait_end(), 1);
    CHECK_RC(rc, -EWOULDBLOCK);
    /* With ack = primary nothing waits: done inline, unless the LMDB shard
     * itself must wait (a commit due): then it refused too. */
    CHECK_RC(shard_apply(primary_ack, &b), 0);
    for (int i = 0; i < 3 && rc != 0; i++) {
        shard_nowait_begin();
        rc = shard_apply(primary_ack, &b);
        CHECK(shard_nowait_end() == (rc == -EWOULDBLOCK));
    }
    CHECK_RC(rc, 0);
    batch_free(&b);
    both_report();
}

static void test_ack_primary_does_not_wait(struct shard *primary_ack)
{
    double t = now_s();

    atomic_store(&isr_removes, 0);
    /* Nobody reports, both are in sync. */
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    for (int i = 0; i < 5; i++)
        CHECK_RC(apply_now(primary_ack, "k8", "v8"), 0);
    CHECKF(now_s() - t < LAG_MS / 1000.0, "5 applies took %.3f s", now_s() - t);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    CHECK(atomic_load(&isr_removes) == 0);
}

static _Atomic int sync_calls;
static void on_sync(void *ctx, unsigned index)
{
    (void)ctx;
    if (index == 0)
        atomic_fetch_add(&sync_calls, 1);
}

static void test_sync_waits_for_synced(void)
{
    struct stream_pos p;
    struct async_op op;

    both_report();
    p = position();
    async_start(&op, repl, "k9", "v9");
    p = wait_applied(p.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);
    shard_repl_on_sync_wanted(repl, on_sync, NULL);
    CHECK(shard_repl_sync_wanted(repl, node_b) == 0);
    memset(&op, 0, sizeof(op));
    op.sh = repl;
    op.sync = 1;
    op.start = now_s();
    pthread_create(&op.t, NULL, async_main, &op);
    for (int i = 0; i < 200 && !atomic_load(&sync_calls); i++)
        usleep(1000);
    CHECK(atomic_load(&sync_calls) == 1);
    CHECK(shard_repl_sync_wanted(repl, node_b) == p.lsn);
    usleep(50000);
    CHECK(!atomic_load(&op.done));
    CHECK_RC(shard_repl_report(repl, node_b, &p, p.lsn), 0);
    CHECK(shard_repl_sync_wanted(repl, node_b) == 0);
    CHECK(shard_repl_sync_wanted(repl, node_c) == p.lsn);
    usleep(50000);
    CHECKF(!atomic_load(&op.done), "sync returned before c synced");
    CHECK_RC(shard_repl_report(repl, node_c, &p, p.lsn), 0);
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < (LAG_MS - 50) / 1000.0, "took %.3f s", op.end - op.start);
    shard_repl_on_sync_wanted(repl, NULL, NULL);
}

static void test_status(void)
{
    struct shard_repl_status st;
    struct stream_pos p;

    /* Both go silent: the first write takes them out of the in-sync set,
     * the next two do not wait. */
    both_report();
    p = position();
    for (int i = 0; i < 3; i++)
        CHECK_RC(apply_now(repl, "s", "x"), 0);
    CHECK(in_sync(node_b) == 0 && in_sync(node_c) == 0);
    CHECK_RC(shard_repl_status(repl, &st), 0);
    CHECK(st.position.lsn > p.lsn && st.nreplicas == 2 && st.epoch > 0);
    for (unsigned i = 0; i < st.nreplicas && i < 2; i++) {
        const struct shard_repl_peer *r = &st.replicas[i];

        CHECK(r->node == node_b || r->node == node_c);
        CHECK(r->in_sync == 0 && r->needs_snapshot == 0);
        CHECK(r->applied.lsn == p.lsn && r->synced_lsn == p.lsn);
        CHECKF(r->lag_batches == 3, "lag %" PRIu64, r->lag_batches);
        CHECKF(r->lag_ms >= LAG_MS - 20 && r->lag_ms < 5000, "lag %" PRIu64 " ms", r->lag_ms);
        CHECK(r->last_report_ms >= LAG_MS - 20 && r->last_report_ms < 5000);
    }
    CHECK_RC(shard_repl_needs_snapshot(repl, node_c, &st.position), 0);
    CHECK_RC(shard_repl_needs_snapshot(repl, 0, &st.position), -EINVAL);
    CHECK_RC(shard_repl_status(repl, &st), 0);
    for (unsigned i = 0; i < st.nreplicas && i < 2; i++)
        CHECK(st.replicas[i].needs_snapshot == (st.replicas[i].node == node_c));
    both_report();
    CHECK_RC(shard_repl_status(repl, &st), 0);
    for (unsigned i = 0; i < st.nreplicas && i < 2; i++)
        CHECK(st.replicas[i].lag_batches == 0 && st.replicas[i].lag_ms == 0 &&
              !st.replicas[i].needs_snapshot && st.replicas[i].in_sync);
}

static int count_entry(void *ctx, const struct stream_pos *p, uint64_t time_ms,
                       const uint8_t *batch, size_t len)
{
    (void)p, (void)time_ms, (void)batch, (void)len;
    ++*(int *)ctx;
    return 0;
}

/* The shard keeps 4 KiB of stream (setup); a replica's report holds what
 * follows its lsn beyond that. */
static void test_holds(void)
{
    static char val[1024];
    struct stream_pos held;
    pthread_t acker;
    int n = 0;

    memset(val, 'h', sizeof(val) - 1);
    /* Only the reports below hold anything. */
    for (unsigned slot = 0; slot < SHARD_LMDB_HOLDS; slot++)
        shard_lmdb_stream_hold(inner, slot, UINT64_MAX);
    both_report();
    held = position();
    /* b acks as it goes; c's hold stays at `held` (it leaves the in-sync
     * set at the first write). */
    atomic_store(&acker_stop, 0);
    pthread_create(&acker, NULL, acker_main, NULL);
    for (int i = 0; i < 20; i++)
        CHECK_RC(apply_now(repl, "hold", val), 0);
    atomic_store(&acker_stop, 1);
    pthread_join(acker, NULL);
    CHECK(in_sync(node_c) == 0);
    CHECK_RC(shard_lmdb_flush(inner, 1), 0);
    CHECK_RC(shard_lmdb_stream_read(inner, &held, 1u << 20, count_entry, &n), 20);
    /* Released (c is no replica any more, as far as the holds know: its slot
     * is freed by hand here), the next commit trims the stream. */
    shard_lmdb_stream_hold(inner, (unsigned)node_c, UINT64_MAX);
    CHECK_RC(apply_now(repl, "hold", "x"), 0);
    CHECK_RC(shard_lmdb_flush(inner, 1), 0);
    n = 0;
    CHECK_RC(shard_lmdb_stream_read(inner, &held, 1u << 20, count_entry, &n), -ERANGE);
    both_report();
}

/* The handover's freeze: it waits for the writes in progress (bounded),
 * holds new ones, and thaw(0) lets them go on; wait_level follows reports. */
static void test_freeze_drains_and_holds(void)
{
    struct stream_pos before, p, frozen_at;
    struct async_op op, held;
    struct batch b;
    char buf[64];
    int rc;

    both_report();
    before = position();
    /* an apply waiting for its acks is a write in progress */
    async_start(&op, repl, "f1", "v1");
    p = wait_applied(before.lsn);
    CHECK_RC(shard_repl_freeze(repl, 100, &frozen_at), -ETIMEDOUT);
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK_RC(shard_repl_freeze(repl, 1000, &frozen_at), 0);
    CHECK(stream_pos_eq(&frozen_at, &p));
    CHECK_RC(shard_repl_freeze(repl, 1000, &frozen_at), -EBUSY);
    /* held, not applied; in no-waiting mode refused for a worker */
    async_start(&held, repl, "f2", "v2");
    usleep(100000);
    CHECKF(!atomic_load(&held.done), "an apply went through a freeze");
    before = position();
    CHECK(stream_pos_eq(&before, &p));
    batch_init(&b);
    batch_put(&b, "f3", 2, "v3", 2);
    shard_nowait_begin();
    rc = shard_apply(repl, &b);
    CHECK_RC(shard_nowait_end(), 1);
    CHECK_RC(rc, -EWOULDBLOCK);
    batch_free(&b);
    /* reads go on */
    CHECK(strcmp(value_of("f1", buf, sizeof(buf)), "v1") == 0);
    /* wait_level: b has p; c is told later */
    CHECK_RC(shard_repl_wait_level(repl, node_b, p.lsn, 10), 0);
    CHECK_RC(shard_repl_wait_level(repl, node_c, p.lsn + 1, 50), -ETIMEDOUT);
    shard_repl_thaw(repl, 0);
    p = wait_applied(p.lsn);
    CHECK_RC(shard_repl_report(repl, node_b, &p, 0), 0);
    CHECK_RC(shard_repl_report(repl, node_c, &p, 0), 0);
    CHECK_RC(shard_repl_wait_level(repl, node_c, p.lsn, 1000), 0);
    CHECK_RC(async_join(&held), 0);
    CHECK(strcmp(value_of("f2", buf, sizeof(buf)), "v2") == 0);
    both_report();
}

/* thaw(moved): the held write and every later op get -EREMCHG, nothing
 * applied. Last: the wrapper serves nothing after it. */
static void test_moved_refuses_everything(struct shard *primary_ack)
{
    struct stream_pos before, after;
    struct shard_stat st;
    struct async_op held;
    char buf[16];
    size_t vlen;

    CHECK_RC(shard_lmdb_position(shard_repl_inner(primary_ack), &before), 0);
    CHECK_RC(shard_repl_freeze(primary_ack, 1000, &after), 0);
    async_start(&held, primary_ack, "m1", "v1");
    usleep(50000);
    CHECK(!atomic_load(&held.done));
    shard_repl_thaw(primary_ack, 1);
    CHECK_RC(async_join(&held), -EREMCHG);
    CHECK_RC(apply_now(primary_ack, "m2", "v2"), -EREMCHG);
    CHECK_RC(shard_sync(primary_ack), -EREMCHG);
    CHECK_RC(shard_get(primary_ack, "k1", 2, 0, buf, sizeof(buf), &vlen), -EREMCHG);
    CHECK_RC(shard_stat(primary_ack, &st), -EREMCHG);
    CHECK_RC(shard_repl_freeze(primary_ack, 10, &after), -EBUSY);
    CHECK_RC(shard_lmdb_position(shard_repl_inner(primary_ack), &after), 0);
    CHECKF(stream_pos_eq(&before, &after), "a refused op changed the position");
}

/* ---- pushes ---- */

/* A replica's node as the pusher sees it: per node, how it answers and
 * what it was sent. */
static _Atomic int push_fail[CONFIG_MAX_NODES], push_calls[CONFIG_MAX_NODES];
static struct stream_pos push_after[CONFIG_MAX_NODES];

static int fake_push(void *ctx, unsigned shard, int node, uint64_t epoch,
                     const struct stream_pos *after, const void *body, size_t len,
                     unsigned limit_ms, struct stream_pos *pos, uint64_t *synced)
{
    struct stream_pos p = *after, q;
    size_t off = 0;
    uint64_t t;
    const uint8_t *b;
    size_t bl;

    (void)ctx, (void)epoch;
    CHECK(shard == 0 && limit_ms > 0 && limit_ms <= LAG_MS && len > 0);
    atomic_fetch_add(&push_calls[node], 1);
    push_after[node] = *after;
    if (atomic_load(&push_fail[node]))
        return -EAGAIN;
    while (stream_entry_next(body, len, &off, &q, &t, &b, &bl) == 1)
        p = q; /* "applied": the copy is at the last entry */
    *pos = p;
    *synced = 0;
    return 0;
}

static struct stream_pos peer_applied(struct shard *w, int node)
{
    struct shard_repl_status st;

    CHECK_RC(shard_repl_status(w, &st), 0);
    for (unsigned i = 0; i < st.nreplicas; i++)
        if (st.replicas[i].node == node)
            return st.replicas[i].applied;
    return (struct stream_pos){0, 0, 0};
}

static void test_pushes(void)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 60000, .stream_bytes = 1u << 20};
    struct shard_repl_push push = {fake_push, NULL};
    struct shard *lmdb = NULL, *w = NULL;
    struct stream_pos p0, p1, p2, acked;
    struct async_op op;
    char path[PATH_MAX + 64], err[512], buf[64];
    int b0, c0;

    snprintf(path, sizeof(path), "%s/shard-0-push", tmpdir);
    CHECK_RC(shard_lmdb_open(path, 0, &opt, &lmdb, err, sizeof(err)), 0);
    if (!lmdb)
        return;
    cfg.replica_push = 1;
    CHECK_RC(shard_repl_new(lmdb, map, &cfg, 0, &push, &w), 0);
    if (!w)
        return;
    /* Both replicas reported once (a push starts from a reported position). */
    CHECK_RC(shard_lmdb_position(lmdb, &p0), 0);
    CHECK_RC(shard_repl_report(w, node_b, &p0, p0.lsn), 0);
    CHECK_RC(shard_repl_report(w, node_c, &p0, p0.lsn), 0);
    CHECK(in_sync(node_b) == 1 && in_sync(node_c) == 1);

    /* 1. The write pushes to both and their answers are the acks: no
     * report from anyone else, and it returns at once. */
    async_start(&op, w, "p1", "v1");
    CHECK_RC(async_join(&op), 0);
    CHECKF(op.end - op.start < (LAG_MS / 2) / 1000.0, "a pushed write took %.3f s",
           op.end - op.start);
    CHECK(atomic_load(&push_calls[node_b]) == 1 && atomic_load(&push_calls[node_c]) == 1);
    CHECK(stream_pos_eq(&push_after[node_b], &p0) && stream_pos_eq(&push_after[node_c], &p0));
    CHECK_RC(shard_lmdb_position(lmdb, &p1), 0);
    acked = peer_applied(w, node_b);
    CHECK(stream_pos_eq(&acked, &p1));
    CHECK(shard_repl_push_fed(w, node_b, &acked) == 1 && stream_pos_eq(&acked, &p1));
    CHECK(shard_get(w, "p1", 2, 0, buf, sizeof(buf), NULL) == 2);
    /* A pull sent before that push reports the older position: no step
     * back, so the next push starts from p1. */
    CHECK_RC(shard_repl_report(w, node_b, &p0, p0.lsn), 0);
    acked = peer_applied(w, node_b);
    CHECK(stream_pos_eq(&acked, &p1));
    CHECK_RC(apply_now(w, "p2", "v2"), 0);
    CHECK(stream_pos_eq(&push_after[node_b], &p1));

    /* 2. c's node takes no pushes: the write waits for c's report (its
     * pull), which acks it; no push to c for a while after the failure,
     * and c is not push-fed. */
    CHECK_RC(shard_lmdb_position(lmdb, &p1), 0);
    atomic_store(&push_fail[node_c], 1);
    c0 = atomic_load(&push_calls[node_c]);
    async_start(&op, w, "p3", "v3");
    p2 = wait_applied_in(lmdb, p1.lsn);
    usleep(100000);
    CHECKF(!atomic_load(&op.done), "the write returned although c's push failed");
    CHECK(atomic_load(&push_calls[node_c]) == c0 + 1);
    CHECK(shard_repl_push_fed(w, node_c, &acked) == 0);
    CHECK(shard_repl_acks_wanted(w) == 1); /* its pulls are answered at once again */
    CHECK_RC(shard_repl_report(w, node_c, &p2, 0), 0);
    CHECK_RC(async_join(&op), 0);
    CHECK(in_sync(node_c) == 1);
    atomic_store(&push_fail[node_c], 0);

    /* 3. A content check's checkpoint stands: nobody is pushed to; the
     * pulls ack. */
    usleep(1100 * 1000); /* c's pause after its failure is over */
    b0 = atomic_load(&push_calls[node_b]);
    c0 = atomic_load(&push_calls[node_c]);
    CHECK_RC(shard_repl_checkpoint_set(w, &p2, 5000), 0);
    async_start(&op, w, "p4", "v4");
    p1 = wait_applied_in(lmdb, p2.lsn);
    usleep(100000);
    CHECK(!atomic_load(&op.done));
    CHECK(atomic_load(&push_calls[node_b]) == b0 && atomic_load(&push_calls[node_c]) == c0);
    CHECK_RC(shard_repl_report(w, node_b, &p1, 0), 0);
    CHECK_RC(shard_repl_report(w, node_c, &p1, 0), 0);
    CHECK_RC(async_join(&op), 0);
    /* the checkpoint done: pushes again */
    {
        struct stream_pos cp;
        uint64_t id = 0;

        CHECK(shard_repl_checkpoint(w, node_b, &cp, &id) == 1);
        shard_repl_checkpoint_done(w, node_b, id);
        CHECK(shard_repl_checkpoint(w, node_c, &cp, &id) == 1);
        shard_repl_checkpoint_done(w, node_c, id);
    }
    CHECK_RC(apply_now(w, "p5", "v5"), 0);
    CHECK(atomic_load(&push_calls[node_b]) == b0 + 1 && atomic_load(&push_calls[node_c]) == c0 + 1);
    shard_close(w);
}

int main(void)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 60000};
    struct config cfg_primary;
    struct shard *primary_ack = NULL, *lmdb2 = NULL;
    char path[PATH_MAX + 64], err[512];

    setup();
    /* Another copy of shard 0, wrapped with ack = primary. */
    cfg_primary = cfg;
    cfg_primary.ack = CONFIG_ACK_PRIMARY;
    snprintf(path, sizeof(path), "%s/shard-0-ack-primary", tmpdir);
    CHECK_RC(shard_lmdb_open(path, 0, &opt, &lmdb2, err, sizeof(err)), 0);
    if (lmdb2)
        CHECK_RC(shard_repl_new(lmdb2, map, &cfg_primary, 0, NULL, &primary_ack), 0);
    if (!primary_ack)
        return check_summary("shard_repl");
    CHECK_RC(shard_repl_new(NULL, map, &cfg, 0, NULL, &(struct shard *){NULL}), -EINVAL);

    test_waits_for_every_in_sync_replica();
    test_silent_replica_leaves_and_rejoins();
    test_isr_remove_failure_fails_the_write();
    test_joining();
    test_no_lease(primary_ack);
    test_nowait_refuses_before_applying(primary_ack);
    test_ack_primary_does_not_wait(primary_ack);
    test_sync_waits_for_synced();
    test_status();
    test_holds();
    test_freeze_drains_and_holds();
    test_moved_refuses_everything(primary_ack);
    test_pushes();

    shard_close(primary_ack);
    shard_close(repl);
    shard_map_close(map);
    rm_rf(tmpdir);
    return check_summary("shard_repl");
}
