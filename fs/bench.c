/* bench.c -- shardfs bench: load the key API of every node (client.h).
 *
 * KEYS keys of SIZE bytes under a fresh directory; CLIENTS requests are
 * kept in flight by one event-loop thread a CPU (remote_api_loop: a curl
 * multi handle each, as wrk does it), and go round-robin to the nodes that
 * have a url. Three
 * timed phases: PUT every key, GET every key ROUNDS times (each value is
 * checked against what was put: a benchmark that returns wrong bytes has
 * failed), DELETE every key. A GET goes to the node that owns the shard of
 * the key's entry, which the PUT's reply named (X-Shardfs-Shard, kv_api.h):
 * that node reads the key without asking another one, as an owner-aware
 * client would; with --any-node GETs go round-robin like the rest, and two
 * in three take a second hop between nodes (on three nodes). Each phase reports ops/s over its wall time
 * and the p50/p99 latency of single requests, one line a phase:
 *
 *   PUT 10000 ops 2.310 s 4329 ops/s p50 3.10 ms p99 9.80 ms errors 0
 *
 * Each client has its own keep-alive connection.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client.h"

#define BENCH_CLIENTS_MAX REMOTE_LOOP_MAX
#define BENCH_SIZE_MAX (16u << 20)
#define BENCH_PATH_MAX 256

enum phase { PH_PUT, PH_GET, PH_DELETE, PH_COUNT };
static const char *const phase_name[PH_COUNT] = {"PUT", "GET", "DELETE"};

struct bench {
    struct client *c;
    unsigned keys, size, clients, rounds;
    unsigned nodes[CONFIG_MAX_NODES], node_count; /* nodes with a url */
    int *owner;                 /* per key: the node its PUT named, -1: unknown */
    int any_node;               /* --any-node: GETs round-robin too */
    char dir[BENCH_PATH_MAX];
    enum phase phase;
    _Atomic size_t next_op;     /* ops of a phase: keys x rounds (GET) or keys */
    size_t ops;
    double *lat;                /* ms, one per op of this phase */
};

/* One request in flight: a client of the benchmark. */
struct call {
    struct remote_api_req req;
    struct worker *w;
    struct call *next_free;
    size_t op;
    unsigned k;
    double t0;
    char api[CLIENT_KV_PATH_SIZE(BENCH_PATH_MAX + 32)];
    uint8_t *value, *got;
    size_t got_len;
};

/* A thread keeping `parallel` requests in flight (remote_api_loop). */
struct worker {
    struct bench *b;
    pthread_t tid;
    unsigned parallel;
    struct call *calls, *free_calls;
    unsigned errors, wrong;
    int rc;
};

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The value of key k: SIZE bytes from a generator seeded with k. */
static void value_of(unsigned k, uint8_t *out, size_t size)
{
    uint64_t x = 0x9e3779b97f4a7c15ull * (k + 1);

    for (size_t i = 0; i < size; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        out[i] = (uint8_t)x;
    }
}

static int sink_value(void *ctx, const void *data, size_t len)
{
    struct call *c = ctx;

    if (len > c->w->b->size - c->got_len)
        return -EIO; /* longer than what was put */
    memcpy(c->got + c->got_len, data, len);
    c->got_len += len;
    return 0;
}

/* remote_api_loop's next(): the phase's next op in a free call, or NULL.
 * Ops go to the nodes round-robin. */
static struct remote_api_req *next_call(void *ctx)
{
    struct worker *w = ctx;
    struct bench *b = w->b;
    struct call *c = w->free_calls;
    size_t op;
    char path[BENCH_PATH_MAX + 32];

    if (!c)
        return NULL;
    op = atomic_fetch_add(&b->next_op, 1);
    if (op >= b->ops)
        return NULL;
    w->free_calls = c->next_free;
    c->op = op;
    c->k = (unsigned)(op % b->keys);
    snprintf(path, sizeof(path), "%s/k%u", b->dir, c->k);
    client_kv_path(path, c->api, sizeof(c->api));
    c->req = (struct remote_api_req){.node = b->nodes[op % b->node_count],
                                     .method = phase_name[b->phase],
                                     .path_query = c->api};
    if (b->phase == PH_GET && !b->any_node && b->owner[c->k] >= 0)
        c->req.node = (unsigned)b->owner[c->k];
    if (b->phase == PH_PUT) {
        value_of(c->k, c->value, b->size);
        c->req.body = c->value;
        c->req.len = b->size;
    } else if (b->phase == PH_GET) {
        c->got_len = 0;
        c->req.sink = sink_value;
        c->req.sink_ctx = c;
    }
    c->t0 = now_ms();
    return &c->req;
}

/* The node (with a url) that owns shard, or -1. */
static int owner_of(const struct bench *b, long shard)
{
    const struct config *cfg = &b->c->cfg;
    unsigned node;

    if (shard < 0 || (unsigned long)shard >= cfg->shard_count)
        return -1;
    node = cfg->owner[shard];
    return node < cfg->node_count && cfg->nodes[node].url[0] ? (int)node : -1;
}

/* remote_api_loop's done(): latency, errors, and a GET's bytes checked. */
static void call_done(void *ctx, struct remote_api_req *req)
{
    struct worker *w = ctx;
    struct bench *b = w->b;
    struct call *c = (struct call *)req; /* req is the first member */

    b->lat[c->op] = now_ms() - c->t0;
    if (b->phase == PH_PUT && req->rc == 0)
        b->owner[c->k] = owner_of(b, req->shard);
    if (req->rc) {
        if (w->errors++ == 0)
            fprintf(stderr, "shardfs: bench: %s %s/k%u: %s\n", phase_name[b->phase], b->dir,
                    c->k, strerror(-req->rc));
    } else if (b->phase == PH_GET) {
        value_of(c->k, c->value, b->size);
        if ((c->got_len != b->size || memcmp(c->got, c->value, b->size) != 0) && w->wrong++ == 0)
            fprintf(stderr, "shardfs: bench: GET %s/k%u: wrong bytes\n", b->dir, c->k);
    }
    c->next_free = w->free_calls;
    w->free_calls = c;
}

static void *worker_run(void *arg)
{
    struct worker *w = arg;

    w->free_calls = NULL;
    for (unsigned i = w->parallel; i-- > 0;) {
        w->calls[i].next_free = w->free_calls;
        w->free_calls = &w->calls[i];
    }
    w->rc = remote_api_loop(w->b->c->remote, w->parallel, next_call, call_done, w);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* Run one phase on all workers and print its line. Returns its errors. */
static unsigned run_phase(struct bench *b, struct worker *ws, unsigned nw, enum phase ph)
{
    size_t total;
    unsigned errors = 0, wrong = 0;
    double t0, secs;

    b->phase = ph;
    b->ops = (size_t)b->keys * (ph == PH_GET ? b->rounds : 1);
    atomic_store(&b->next_op, 0);
    for (unsigned i = 0; i < nw; i++)
        ws[i].errors = ws[i].wrong = 0;
    t0 = now_ms();
    for (unsigned i = 0; i < nw; i++)
        if (pthread_create(&ws[i].tid, NULL, worker_run, &ws[i]) != 0) {
            worker_run(&ws[i]); /* no thread: do its share here */
            ws[i].tid = 0;
        }
    for (unsigned i = 0; i < nw; i++)
        if (ws[i].tid)
            pthread_join(ws[i].tid, NULL);
    secs = (now_ms() - t0) / 1e3;
    for (unsigned i = 0; i < nw; i++) {
        errors += ws[i].errors;
        wrong += ws[i].wrong;
        if (ws[i].rc) {
            fprintf(stderr, "shardfs: bench: %s: %s\n", phase_name[ph], strerror(-ws[i].rc));
            errors++;
        }
    }
    total = atomic_load(&b->next_op) < b->ops ? atomic_load(&b->next_op) : b->ops;
    qsort(b->lat, total, sizeof(*b->lat), cmp_double);
    printf("%-6s %8zu ops %8.3f s %9.0f ops/s p50 %7.2f ms p99 %7.2f ms errors %u\n",
           phase_name[ph], total, secs, secs > 0 ? (double)total / secs : 0.0,
           total ? b->lat[total / 2] : 0.0, total ? b->lat[total * 99 / 100] : 0.0,
           errors + wrong);
    fflush(stdout);
    return errors + wrong;
}

/* CLIENTS requests in flight, spread over one thread a CPU (at most one a
 * client), each thread an event loop as wrk runs them: a thread a client
 * would measure this machine's context switches as much as the nodes. */
static unsigned worker_count(unsigned clients)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);

    if (cpus < 1)
        cpus = 1;
    return clients < (unsigned long)cpus ? clients : (unsigned)cpus;
}

static const char usage_bench[] =
    "usage: shardfs bench [-c CONF] [-k KEYS] [-s SIZE] [-C CLIENTS] [-r ROUNDS] [--keep]\n"
    "                     [--any-node]\n"
    "\n"
    "Load the key API of every node of CONF: PUT KEYS keys (default 10000) of\n"
    "SIZE bytes (default 1024) with CLIENTS concurrent clients (default 16),\n"
    "GET each ROUNDS times (default 1) checking the bytes, then DELETE them\n"
    "(not with --keep). Requests go round-robin over the nodes, except that a\n"
    "GET goes to the node holding the key's entry, as its PUT's reply said\n"
    "(round-robin too with --any-node). Prints ops/s and p50/p99 latency per\n"
    "phase; exits 1 if any request failed or returned wrong bytes.\n";

enum { OPT_KEEP = 256, OPT_ANY_NODE };

static const struct option bench_opts[] = {
    {"conf", required_argument, NULL, 'c'},
    {"keep", no_argument, NULL, OPT_KEEP},
    {"any-node", no_argument, NULL, OPT_ANY_NODE},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

static int parse_count(const char *s, unsigned long min, unsigned long max, unsigned *out)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        fprintf(stderr, "shardfs: bench: '%s' is not a number in %lu..%lu\n", s, min, max);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

int cmd_bench(int argc, char **argv)
{
    static struct client c;
    struct bench b = {.c = &c, .keys = 10000, .size = 1024, .clients = 16, .rounds = 1};
    struct worker *ws = NULL;
    const char *conf = "shards.conf";
    unsigned failed = 0, nw = 0;
    int opt, keep = 0, rc = 1;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "+c:k:s:C:r:h", bench_opts, NULL)) != -1) {
        int bad = 0;
        switch (opt) {
        case 'c':
            conf = optarg;
            break;
        case 'k':
            bad = parse_count(optarg, 1, 100000000, &b.keys);
            break;
        case 's':
            bad = parse_count(optarg, 0, BENCH_SIZE_MAX, &b.size);
            break;
        case 'C':
            bad = parse_count(optarg, 1, BENCH_CLIENTS_MAX, &b.clients);
            break;
        case 'r':
            bad = parse_count(optarg, 1, 1000, &b.rounds);
            break;
        case OPT_KEEP:
            keep = 1;
            break;
        case OPT_ANY_NODE:
            b.any_node = 1;
            break;
        case 'h':
            fputs(usage_bench, stdout);
            return 0;
        default:
            bad = 1;
        }
        if (bad) {
            fputs(usage_bench, stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fputs(usage_bench, stderr);
        return 2;
    }
    if (client_open(&c, conf, NULL) != 0)
        return 2;
    for (unsigned i = 0; i < c.cfg.node_count; i++)
        if (c.cfg.nodes[i].url[0])
            b.nodes[b.node_count++] = i;
    snprintf(b.dir, sizeof(b.dir), "/bench/run-%ld-%d", (long)time(NULL), (int)getpid());
    nw = worker_count(b.clients);
    ws = calloc(nw, sizeof(*ws));
    b.lat = malloc((size_t)b.keys * b.rounds * sizeof(*b.lat));
    b.owner = malloc((size_t)b.keys * sizeof(*b.owner));
    if (!ws || !b.lat || !b.owner) {
        fprintf(stderr, "shardfs: bench: out of memory\n");
        goto out;
    }
    for (unsigned i = 0; i < nw; i++) {
        ws[i] = (struct worker){.b = &b, .parallel = b.clients / nw + (i < b.clients % nw)};
        ws[i].calls = calloc(ws[i].parallel, sizeof(struct call));
        for (unsigned j = 0; ws[i].calls && j < ws[i].parallel; j++) {
            struct call *c = &ws[i].calls[j];
            c->w = &ws[i];
            c->value = malloc(b.size ? b.size : 1);
            c->got = malloc(b.size ? b.size : 1);
            if (!c->value || !c->got) {
                fprintf(stderr, "shardfs: bench: out of memory\n");
                goto out;
            }
        }
        if (!ws[i].calls) {
            fprintf(stderr, "shardfs: bench: out of memory\n");
            goto out;
        }
    }
    for (unsigned k = 0; k < b.keys; k++)
        b.owner[k] = -1;
    printf("bench: %u keys of %u bytes, %u clients, %u nodes, under %s; GETs to %s\n", b.keys,
           b.size, b.clients, b.node_count, b.dir,
           b.any_node ? "any node (round-robin)" : "the key's owner");
    failed += run_phase(&b, ws, nw, PH_PUT);
    failed += run_phase(&b, ws, nw, PH_GET);
    if (!keep) {
        char api[CLIENT_KV_PATH_SIZE(BENCH_PATH_MAX)];

        failed += run_phase(&b, ws, nw, PH_DELETE);
        client_kv_path(b.dir, api, sizeof(api));
        remote_api_call(c.remote, b.nodes[0], "DELETE", api, NULL, 0, NULL, NULL, NULL);
    }
    rc = failed ? 1 : 0;
out:
    for (unsigned i = 0; ws && i < nw; i++) {
        for (unsigned j = 0; ws[i].calls && j < ws[i].parallel; j++) {
            free(ws[i].calls[j].value);
            free(ws[i].calls[j].got);
        }
        free(ws[i].calls);
    }
    free(ws);
    free(b.lat);
    free(b.owner);
    client_close(&c);
    return rc;
}
