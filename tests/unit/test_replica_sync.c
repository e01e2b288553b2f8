/* test_replica_sync.c -- the replica-sync thread (backend/replica_sync.h)
 * against a real primary: node a's server (node_server_start_repl) on
 * 127.0.0.1 serving its LMDB shard 0 through the shard_repl wrapper
 * (ack = replica), and node b's replica of shard 0 kept by replica_sync.
 *
 *  1. streaming: batches applied through the wrapper are acknowledged only
 *     once b holds them (the wrapper waits for b's pull), and b's copy ends
 *     with a's position and a's records;
 *  2. catch-up by snapshot: b's copy is wiped while a writes more than its
 *     stream keeps (stream_bytes 64 KiB), so the empty position is no
 *     longer streamable (409 ERANGE): b copies a's records page by page and
 *     then streams; the status says so (snapshots, records, phase);
 *  3. a dead primary: with a's server stopped, b waits and backs off (a
 *     bounded number of connection attempts, no spin) and catches up when
 *     the server is back;
 *  4. an interrupted snapshot: a copy left marked (snapshot_begin without
 *     done, as a crash leaves it) is emptied and caught up at start;
 *  5. a stuck copy: a fake primary answers 204 with a position ahead; the
 *     copy starts over after RS_STUCK_MS and is level with the real one;
 *  6. the copy removed at runtime (nothing applied to it after) and added
 *     again (it catches up from where it was);
 *  7. pushes taken directly (replica_sync_push, with a's server stopped so
 *     no pull competes): refused from another node or epoch, a gap applies
 *     nothing, the entries bring the copy to a's position and records, the
 *     same ones again change nothing, another history is ESTALE;
 *  8. pushes end to end: a wrapper that pushes (remote_push) to b's own
 *     server, whose push route hands them to the sync thread's copy: the
 *     writes are acknowledged, the copy is level, and pushes applied.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "check.h"
#include "config.h"
#include "node_server.h"
#include "replica_sync.h"
#include "shard_lmdb.h"
#include "shard_map.h"
#include "shard_remote.h"
#include "shard_repl.h"
#include "test_util.h"

static char top[] = "/tmp/shardfs-test-replica-sync-XXXXXX";
static struct config cfg;
static struct shard_map *map_a, *map_b;

static int free_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0) {
        perror("free_port");
        exit(2);
    }
    port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* CPU seconds this process used (all threads). */
static double cpu_s(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static struct shard *open_lmdb(const char *node)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 50, .stream_bytes = 64u << 10};
    char path[PATH_MAX], err[1024];
    struct shard *s = NULL;

    snprintf(path, sizeof(path), "%s/%s", top, node);
    mkdir(path, 0755);
    snprintf(path, sizeof(path), "%s/%s/shard-0", top, node);
    if (shard_lmdb_open(path, 0, &opt, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_lmdb_open %s: %s\n", path, err);
        exit(2);
    }
    return s;
}

static int primary_of(void *ctx, unsigned shard, uint64_t *epoch)
{
    struct shard_copies c;

    if (shard_map_get(ctx, shard, &c) != 0)
        return -1;
    *epoch = c.epoch;
    return c.primary;
}

/* Every record of s, as one buffer of (klen, key, vlen, value)s. */
struct dump {
    uint8_t *p;
    size_t len;
    unsigned n;
};

static int dump_add(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct dump *d = ctx;

    d->p = xrealloc(d->p, d->len + 16 + kl + vl);
    memcpy(d->p + d->len, &kl, sizeof(kl));
    memcpy(d->p + d->len + 8, k, kl);
    memcpy(d->p + d->len + 8 + kl, &vl, sizeof(vl));
    memcpy(d->p + d->len + 16 + kl, v, vl);
    d->len += 16 + kl + vl;
    d->n++;
    return 0;
}

static int same_records(struct shard *a, struct shard *b, unsigned *n)
{
    struct dump da = {0}, db = {0};
    int same;

    shard_scan(a, NULL, 0, NULL, 0, dump_add, &da);
    shard_scan(b, NULL, 0, NULL, 0, dump_add, &db);
    same = da.len == db.len && (da.len == 0 || memcmp(da.p, db.p, da.len) == 0);
    *n = da.n;
    free(da.p);
    free(db.p);
    return same;
}

/* Wait up to ms for b's copy to be at a's position. */
static int level(struct shard *a, struct replica_sync *rs, unsigned ms)
{
    for (unsigned t = 0; t < ms; t += 10) {
        struct stream_pos pa;
        struct replica_status st;

        if (shard_lmdb_position(a, &pa) == 0 && replica_sync_status(rs, 0, &st) == 0 &&
            st.phase == REPLICA_STREAMING && stream_pos_eq(&st.pos, &pa))
            return 1;
        sleep_ms(10);
    }
    return 0;
}

static int put_n(struct shard *s, const char *prefix, unsigned n, size_t vlen)
{
    uint8_t *val = xmalloc(vlen);
    int rc = 0;

    for (unsigned i = 0; i < n && rc == 0; i++) {
        char key[64];
        struct batch b;

        memset(val, (int)(i & 0xff), vlen);
        snprintf(key, sizeof(key), "d%s-%05u", prefix, i);
        batch_init(&b);
        batch_put(&b, key, strlen(key), val, vlen);
        if (i % 7 == 3) {
            snprintf(key, sizeof(key), "d%s-%05u", prefix, i - 2);
            batch_del(&b, key, strlen(key)); /* deletes must reach the copy too */
        }
        rc = shard_apply(s, &b);
        batch_free(&b);
    }
    free(val);
    return rc;
}

static int first_entry(void *ctx, const struct stream_pos *p, uint64_t t, const uint8_t *b,
                       size_t l)
{
    (void)ctx, (void)p, (void)t, (void)b, (void)l;
    return 1;
}

/* A fake primary on a's port that answers every request 204 with a
 * position ahead of every copy: a state no step of the sync should stay
 * in. Runs until fake_stop. */
static atomic_int fake_stop, fake_replies;
static int fake_fd = -1;
static char fake_position[96];

static void *fake_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&fake_stop)) {
        char req[4096], resp[256];
        size_t got = 0;
        int c = accept(fake_fd, NULL, NULL);

        if (c < 0)
            continue;
        while (got < sizeof(req) - 1) {
            ssize_t n = read(c, req + got, sizeof(req) - 1 - got);
            if (n <= 0)
                break;
            got += (size_t)n;
            req[got] = '\0';
            if (strstr(req, "\r\n\r\n"))
                break;
        }
        int len = snprintf(resp, sizeof(resp),
                           "HTTP/1.1 204 No Content\r\nX-Shardfs-Position: %s\r\n"
                           "Connection: close\r\n\r\n",
                           fake_position);
        if (write(c, resp, (size_t)len) == len)
            atomic_fetch_add(&fake_replies, 1);
        close(c);
    }
    return NULL;
}

static pthread_t fake_start(int port, const struct stream_pos *ahead)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    int one = 1;
    pthread_t t;

    snprintf(fake_position, sizeof(fake_position), "%" PRIu64 "/%" PRIu64 "/%" PRIu64,
             ahead->epoch, ahead->lsn, ahead->check);
    fake_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fake_fd < 0 || setsockopt(fake_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        setsockopt(fake_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
        bind(fake_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fake_fd, 16) != 0) {
        perror("fake primary");
        exit(2);
    }
    atomic_store(&fake_stop, 0);
    if (pthread_create(&t, NULL, fake_main, NULL) != 0)
        exit(2);
    return t;
}

static void fake_end(pthread_t t)
{
    atomic_store(&fake_stop, 1);
    pthread_join(t, NULL);
    close(fake_fd);
    fake_fd = -1;
}

static struct node_server *serve_a(struct shard *wrap, struct shard *lmdb)
{
    struct shard *shards[2] = {wrap, NULL}, *local[2] = {lmdb, NULL};
    struct node_server_repl repl = {.map = map_a, .local = local};
    struct node_server *srv = NULL;
    char err[1024];
    int rc = node_server_start_repl(&cfg, 0, shards, &repl, NULL, NULL, &srv, err, sizeof(err));

    if (rc != 0) {
        fprintf(stderr, "node_server_start_repl: %s\n", err);
        exit(2);
    }
    return srv;
}

/* The entries of a's stream after `after`, in one buffer (freed by the
 * caller). */
static struct stream_buf entries_after(struct shard *a, const struct stream_pos *after)
{
    struct stream_buf e = {0};

    CHECK(shard_lmdb_stream_read(a, after, 1u << 20, stream_buf_add, &e) > 0);
    return e;
}

static struct replica_sync *b_sync; /* for b's push route */

static int push_to_b(void *ctx, unsigned shard, int from, uint64_t epoch,
                     const struct stream_pos *after, const uint8_t *body, size_t len,
                     struct stream_pos *pos, uint64_t *synced)
{
    (void)ctx;
    return replica_sync_push(b_sync, shard, from, epoch, after, body, len, pos, synced);
}

/* 7: pushes taken by the copy directly. */
static void test_push_direct(struct shard *a, struct shard *b, struct replica_sync *rs)
{
    struct stream_pos pa, pb, pos, other;
    struct replica_status st;
    struct stream_buf e;
    uint64_t synced, epoch = 0;
    unsigned n = 0;

    CHECK(primary_of(map_b, 0, &epoch) == 0);
    CHECK_RC(shard_lmdb_position(b, &pb), 0);
    CHECK_RC(put_n(a, "seven", 20, 10), 0); /* on the inner shard, nobody pulls */
    CHECK_RC(shard_lmdb_position(a, &pa), 0);
    e = entries_after(a, &pb);
    CHECK_RC(replica_sync_push(rs, 0, 1, epoch, &pb, e.buf, e.len, &pos, &synced), -EAGAIN);
    CHECK_RC(replica_sync_push(rs, 0, 0, epoch + 1, &pb, e.buf, e.len, &pos, &synced), -EAGAIN);
    CHECK_RC(replica_sync_push(rs, 1, 0, epoch, &pb, e.buf, e.len, &pos, &synced), -EAGAIN);
    CHECK_RC(replica_sync_push(NULL, 0, 0, epoch, &pb, e.buf, e.len, &pos, &synced), -EAGAIN);
    /* a gap: entries after a position the copy has not reached */
    other = pa;
    CHECK_RC(replica_sync_push(rs, 0, 0, epoch, &other, e.buf, e.len, &pos, &synced), 0);
    CHECKF(stream_pos_eq(&pos, &pb), "a gap moved the copy to lsn %" PRIu64 " from %" PRIu64,
           pos.lsn, pb.lsn);
    /* another history at the copy's lsn */
    other = pb;
    other.check ^= 1;
    CHECK_RC(replica_sync_push(rs, 0, 0, epoch, &other, e.buf, e.len, &pos, &synced), -ESTALE);
    CHECK_RC(replica_sync_push(rs, 0, 0, epoch, &pb, e.buf, e.len, &pos, &synced), 0);
    CHECKF(stream_pos_eq(&pos, &pa), "pushed to lsn %" PRIu64 ", a is at %" PRIu64, pos.lsn,
           pa.lsn);
    CHECK(same_records(a, b, &n) && n > 0);
    /* the same entries again (a pull or a push that brought them already) */
    CHECK_RC(replica_sync_push(rs, 0, 0, epoch, &pb, e.buf, e.len, &pos, &synced), 0);
    CHECK(stream_pos_eq(&pos, &pa) && same_records(a, b, &n));
    free(e.buf);
    for (int t = 0; t < 50; t++) { /* published at the thread's next step */
        CHECK_RC(replica_sync_status(rs, 0, &st), 0);
        if (st.pushes > 0)
            break;
        sleep_ms(100);
    }
    CHECKF(st.pushes == 1, "pushes %" PRIu64, st.pushes);
}

/* 8: a wrapper that pushes to b's server. */
static void test_push_end_to_end(struct shard *a, struct shard *b, struct replica_sync *rs)
{
    struct shard *none[2] = {NULL, NULL}, *local[2] = {b, NULL}, *wrap;
    struct node_server_repl repl = {.map = map_b, .local = local, .push = push_to_b};
    struct node_server *srv_a, *srv_b = NULL;
    struct remote *remote = NULL;
    struct replica_status st0, st;
    char err[1024];
    unsigned n = 0;

    b_sync = rs;
    CHECK_RC(node_server_start_repl(&cfg, 1, none, &repl, NULL, NULL, &srv_b, err, sizeof(err)),
             0);
    CHECK_RC(remote_new(&cfg, 0, &remote, err, sizeof(err)), 0);
    CHECK_RC(shard_repl_new(a, map_a, &cfg, 0, &(struct shard_repl_push){remote_push, remote},
                            &wrap),
             0);
    srv_a = serve_a(wrap, a);
    CHECKF(level(a, rs, 10000), "b is not level before the pushes");
    CHECK_RC(replica_sync_status(rs, 0, &st0), 0);
    CHECK_RC(put_n(wrap, "eight", 100, 100), 0);
    CHECKF(level(a, rs, 10000), "b is not level after the pushes");
    CHECK(same_records(a, b, &n) && n > 0);
    for (int t = 0; t < 50; t++) {
        CHECK_RC(replica_sync_status(rs, 0, &st), 0);
        if (st.pushes > st0.pushes)
            break;
        sleep_ms(100);
    }
    CHECKF(st.pushes > st0.pushes, "no push applied (%" PRIu64 ")", st.pushes);
    node_server_stop(srv_a);
    node_server_stop(srv_b);
    shard_repl_free(wrap);
    remote_free(remote);
}

int main(void)
{
    char path[PATH_MAX], text[2048], err[1024];
    struct shard *a, *wrap, *b, *replicas[2] = {NULL, NULL};
    struct node_server *srv;
    struct replica_sync *rs = NULL;
    struct replica_status st;
    static const struct stream_pos zero = {0, 0, 0};
    unsigned n = 0;
    FILE *f;

    if (!mkdtemp(top)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(text, sizeof(text),
             "[cluster]\nshards = 2\nepoch = 1\nsecret = replica-sync-test-secret-0123\n"
             "timeout_ms = 2000\nack = replica\nreplica_lag_ms = 1000\n"
             "[node a]\nurl = http://127.0.0.1:%d\ndata_dir = a\nshards = 0\n"
             "[node b]\nurl = http://127.0.0.1:%d\ndata_dir = b\nshards = 1\nreplicas = 0\n",
             free_port(), free_port());
    snprintf(path, sizeof(path), "%s/shards.conf", top);
    f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0 || config_load(path, &cfg, err, sizeof(err))) {
        fprintf(stderr, "config: %s\n", err);
        return 2;
    }
    if (shard_map_open(&cfg, 0, &map_a, err, sizeof(err)) ||
        shard_map_open(&cfg, 1, &map_b, err, sizeof(err))) {
        fprintf(stderr, "shard_map_open: %s\n", err);
        return 2;
    }
    a = open_lmdb("a");
    CHECK_RC(shard_repl_new(a, map_a, &cfg, 0, NULL, &wrap), 0);
    srv = serve_a(wrap, a);

    /* 1. Streaming, acknowledged. */
    b = open_lmdb("b");
    replicas[0] = b;
    CHECK_RC(replica_sync_start(&cfg, 1, replicas, primary_of, map_b, &rs, err, sizeof(err)), 0);
    CHECK(rs != NULL);
    CHECK_RC(put_n(wrap, "one", 200, 100), 0);
    CHECKF(level(a, rs, 10000), "b did not reach a's position");
    CHECK(same_records(a, b, &n) && n > 100);
    CHECK_RC(replica_sync_status(rs, 0, &st), 0);
    CHECK(st.snapshots == 0 && st.primary == 0 && st.last_error == 0);
    CHECK_RC(replica_sync_status(rs, 1, &st), -ENOENT);

    /* 2. Wiped: more than the stream keeps, then an empty copy. */
    replica_sync_stop(rs);
    rs = NULL;
    shard_close(b);
    snprintf(path, sizeof(path), "%s/b", top);
    rm_rf(path);
    CHECK_RC(put_n(wrap, "two", 300, 2000), 0); /* ~600 KB: the stream keeps 64 KB */
    /* The trim comes with a commit of a's shard: wait for it. */
    for (int t = 0; t < 500 && shard_lmdb_stream_read(a, &zero, 100, first_entry, NULL) != -ERANGE;
         t++)
        sleep_ms(10);
    CHECK_RC(shard_lmdb_stream_read(a, &zero, 100, first_entry, NULL), -ERANGE);
    b = open_lmdb("b");
    replicas[0] = b;
    CHECK_RC(replica_sync_start(&cfg, 1, replicas, primary_of, map_b, &rs, err, sizeof(err)), 0);
    CHECKF(level(a, rs, 20000), "b did not catch up by snapshot");
    CHECK(same_records(a, b, &n) && n > 300);
    CHECK_RC(replica_sync_status(rs, 0, &st), 0);
    CHECKF(st.snapshots == 1 && st.snap_records >= 300 && st.snap_bytes > 500000,
           "snapshots %" PRIu64 " records %" PRIu64 " bytes %" PRIu64, st.snapshots,
           st.snap_records, st.snap_bytes);
    CHECK_RC(put_n(wrap, "three", 50, 10), 0); /* streaming again after it */
    CHECK(level(a, rs, 10000) && same_records(a, b, &n));

    /* 3. A dead primary: waiting, then back. */
    node_server_stop(srv);
    double cpu0 = cpu_s();
    sleep_ms(3000);
    /* Backing off, not spinning: a thread retrying without a pause would
     * take the whole 3 s of a CPU. */
    CHECKF(cpu_s() - cpu0 < 0.5, "%.2f s of CPU in 3 s without a primary", cpu_s() - cpu0);
    CHECK_RC(replica_sync_status(rs, 0, &st), 0);
    CHECKF(st.phase == REPLICA_WAITING && st.last_error != 0, "phase %s error %d",
           replica_phase_name(st.phase), st.last_error);
    CHECK_RC(put_n(a, "four", 20, 10), 0); /* on the inner shard: nobody to wait for */
    srv = serve_a(wrap, a);
    CHECKF(level(a, rs, 10000), "b did not come back after its primary did");
    CHECK(same_records(a, b, &n));

    /* 4. Interrupted snapshot: begin without done, then a restart. */
    replica_sync_stop(rs);
    rs = NULL;
    CHECK_RC(shard_lmdb_snapshot_begin(b), 0);
    CHECK_RC(replica_sync_start(&cfg, 1, replicas, primary_of, map_b, &rs, err, sizeof(err)), 0);
    CHECKF(level(a, rs, 20000), "b did not recover from an interrupted snapshot");
    CHECK(same_records(a, b, &n));

    /* 5. A primary whose replies say it is ahead while it sends nothing
     * (no real one should): after RS_STUCK_MS (10 s) the copy starts over
     * on a new connection, and is level once the real primary is back. */
    {
        struct stream_pos pa, ahead;
        int port = atoi(strrchr(cfg.nodes[0].url, ':') + 1);
        pthread_t fake;

        node_server_stop(srv);
        CHECK_RC(shard_lmdb_position(a, &pa), 0);
        ahead = pa;
        ahead.lsn += 100;
        fake = fake_start(port, &ahead);
        for (int t = 0; t < 150; t++) {
            CHECK_RC(replica_sync_status(rs, 0, &st), 0);
            if (st.restarts > 0)
                break;
            sleep_ms(100);
        }
        CHECKF(st.restarts == 1 && atomic_load(&fake_replies) > 2,
               "restarts %" PRIu64 " after %d fake replies", st.restarts,
               atomic_load(&fake_replies));
        fake_end(fake);
        srv = serve_a(wrap, a);
        CHECK_RC(put_n(wrap, "five", 10, 10), 0);
        CHECKF(level(a, rs, 10000), "b did not come back after the fake primary");
        CHECK(same_records(a, b, &n));
    }

    /* 6. The copy taken away and given back at runtime (replica drop and
     * add, fs/failover.c): once remove returned nothing is applied to it
     * any more; an add pulls it again from where it is. */
    {
        struct stream_pos pb, pb2;

        CHECK_RC(replica_sync_remove(rs, 0), 0);
        CHECK_RC(replica_sync_remove(rs, 0), -ENOENT);
        CHECK_RC(replica_sync_status(rs, 0, &st), -ENOENT);
        CHECK_RC(shard_lmdb_position(b, &pb), 0);
        CHECK_RC(put_n(a, "six", 30, 10), 0); /* on the inner shard: nobody waits */
        sleep_ms(1500);
        CHECK_RC(shard_lmdb_position(b, &pb2), 0);
        CHECKF(pb2.lsn == pb.lsn, "b moved from lsn %" PRIu64 " to %" PRIu64 " after its remove",
               pb.lsn, pb2.lsn);
        CHECK_RC(replica_sync_add(rs, 0, b), 0);
        CHECK_RC(replica_sync_add(rs, 0, b), -EEXIST);
        CHECK_RC(replica_sync_add(rs, CONFIG_MAX_SHARDS, b), -EINVAL); /* a split makes any index below */
        CHECK_RC(replica_sync_add(NULL, 0, b), -EINVAL);
        CHECKF(level(a, rs, 10000), "b did not catch up after it was added again");
        CHECK(same_records(a, b, &n));
        CHECK_RC(replica_sync_status(rs, 0, &st), 0);
        CHECK(st.primary == 0);
    }

    /* 7 and 8: pushes */
    node_server_stop(srv);
    test_push_direct(a, b, rs);
    test_push_end_to_end(a, b, rs);
    srv = serve_a(wrap, a);

    replica_sync_stop(rs);
    node_server_stop(srv);
    shard_close(wrap);
    shard_close(b);
    shard_map_close(map_a);
    shard_map_close(map_b);
    rm_rf(top);
    return check_summary("replica_sync");
}
