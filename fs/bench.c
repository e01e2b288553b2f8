/* bench.c -- shardfs bench: load the key API of every node (client.h).
 *
 * KEYS keys of SIZE bytes under a fresh directory, split over CLIENTS
 * threads; requests go round-robin to the nodes that have a url. Three
 * timed phases: PUT every key, GET every key ROUNDS times (each value is
 * checked against what was put: a benchmark that returns wrong bytes has
 * failed), DELETE every key. Each phase reports ops/s over its wall time
 * and the p50/p99 latency of single requests, one line a phase:
 *
 *   PUT 10000 ops 2.310 s 4329 ops/s p50 3.10 ms p99 9.80 ms errors 0
 *
 * Threads share the client's remote: its handle pool gives each thread its
 * own keep-alive connections.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client.h"

#define BENCH_CLIENTS_MAX 256
#define BENCH_SIZE_MAX (16u << 20)
#define BENCH_PATH_MAX 256

enum phase { PH_PUT, PH_GET, PH_DELETE, PH_COUNT };
static const char *const phase_name[PH_COUNT] = {"PUT", "GET", "DELETE"};

struct bench {
    struct client *c;
    unsigned keys, size, clients, rounds;
    unsigned nodes[CONFIG_MAX_NODES], node_count; /* nodes with a url */
    char dir[BENCH_PATH_MAX];
    enum phase phase;
};

struct worker {
    struct bench *b;
    pthread_t tid;
    unsigned index;
    double *lat; /* ms, one per request of this phase */
    size_t nlat;
    unsigned errors, wrong;
    uint8_t *value, *got;
    size_t got_len;
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
    struct worker *w = ctx;

    if (len > w->b->size - w->got_len)
        return -EIO; /* longer than what was put */
    memcpy(w->got + w->got_len, data, len);
    w->got_len += len;
    return 0;
}

/* One request for key k; its latency is recorded. */
static void one_request(struct worker *w, unsigned k, unsigned seq)
{
    struct bench *b = w->b;
    char path[BENCH_PATH_MAX + 32], api[3 * (BENCH_PATH_MAX + 32)];
    unsigned node = b->nodes[(w->index + seq) % b->node_count];
    double t0;
    int rc;

    snprintf(path, sizeof(path), "%s/k%u", b->dir, k);
    client_kv_path(path, api, sizeof(api));
    t0 = now_ms();
    switch (b->phase) {
    case PH_PUT:
        value_of(k, w->value, b->size);
        rc = remote_api_call(b->c->remote, node, "PUT", api, w->value, b->size, NULL, NULL, NULL);
        break;
    case PH_GET:
        w->got_len = 0;
        rc = remote_api_call(b->c->remote, node, "GET", api, NULL, 0, sink_value, w, NULL);
        break;
    default:
        rc = remote_api_call(b->c->remote, node, "DELETE", api, NULL, 0, NULL, NULL, NULL);
        break;
    }
    w->lat[w->nlat++] = now_ms() - t0;
    if (rc) {
        if (w->errors++ == 0)
            fprintf(stderr, "shardfs: bench: %s %s: %s\n", phase_name[b->phase], path,
                    strerror(-rc));
        return;
    }
    if (b->phase == PH_GET) {
        value_of(k, w->value, b->size);
        if (w->got_len != b->size || memcmp(w->got, w->value, b->size) != 0) {
            if (w->wrong++ == 0)
                fprintf(stderr, "shardfs: bench: GET %s: wrong bytes\n", path);
        }
    }
}

static void *worker_run(void *arg)
{
    struct worker *w = arg;
    struct bench *b = w->b;
    unsigned rounds = b->phase == PH_GET ? b->rounds : 1, seq = 0;

    for (unsigned r = 0; r < rounds; r++)
        for (unsigned k = w->index; k < b->keys; k += b->clients)
            one_request(w, k, seq++);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* Run one phase on all workers and print its line. Returns its errors. */
static unsigned run_phase(struct bench *b, struct worker *ws, enum phase ph)
{
    size_t total = 0, at = 0;
    unsigned errors = 0, wrong = 0;
    double t0, secs, *all;

    b->phase = ph;
    for (unsigned i = 0; i < b->clients; i++) {
        ws[i].nlat = ws[i].errors = ws[i].wrong = 0;
    }
    t0 = now_ms();
    for (unsigned i = 0; i < b->clients; i++)
        if (pthread_create(&ws[i].tid, NULL, worker_run, &ws[i]) != 0) {
            worker_run(&ws[i]); /* no thread: do its share here */
            ws[i].tid = 0;
        }
    for (unsigned i = 0; i < b->clients; i++)
        if (ws[i].tid)
            pthread_join(ws[i].tid, NULL);
    secs = (now_ms() - t0) / 1e3;
    for (unsigned i = 0; i < b->clients; i++) {
        total += ws[i].nlat;
        errors += ws[i].errors;
        wrong += ws[i].wrong;
    }
    all = malloc((total ? total : 1) * sizeof(*all));
    if (!all) {
        fprintf(stderr, "shardfs: bench: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < b->clients; i++) {
        memcpy(all + at, ws[i].lat, ws[i].nlat * sizeof(*all));
        at += ws[i].nlat;
    }
    qsort(all, total, sizeof(*all), cmp_double);
    printf("%-6s %8zu ops %8.3f s %9.0f ops/s p50 %7.2f ms p99 %7.2f ms errors %u\n",
           phase_name[ph], total, secs, secs > 0 ? (double)total / secs : 0.0,
           total ? all[total / 2] : 0.0, total ? all[total * 99 / 100] : 0.0, errors + wrong);
    fflush(stdout);
    free(all);
    return errors + wrong;
}

static const char usage_bench[] =
    "usage: shardfs bench [-c CONF] [-k KEYS] [-s SIZE] [-C CLIENTS] [-r ROUNDS] [--keep]\n"
    "\n"
    "Load the key API of every node of CONF: PUT KEYS keys (default 10000) of\n"
    "SIZE bytes (default 1024) with CLIENTS concurrent clients (default 16),\n"
    "GET each ROUNDS times (default 1) checking the bytes, then DELETE them\n"
    "(not with --keep). Prints ops/s and p50/p99 latency per phase; exits 1\n"
    "if any request failed or returned wrong bytes.\n";

enum { OPT_KEEP = 256 };

static const struct option bench_opts[] = {
    {"conf", required_argument, NULL, 'c'},
    {"keep", no_argument, NULL, OPT_KEEP},
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
    unsigned failed = 0;
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
    ws = calloc(b.clients, sizeof(*ws));
    for (unsigned i = 0; ws && i < b.clients; i++) {
        size_t share = (b.keys / b.clients + 1) * b.rounds;
        ws[i] = (struct worker){.b = &b, .index = i};
        ws[i].lat = malloc(share * sizeof(double));
        ws[i].value = malloc(b.size ? b.size : 1);
        ws[i].got = malloc(b.size ? b.size : 1);
        if (!ws[i].lat || !ws[i].value || !ws[i].got) {
            fprintf(stderr, "shardfs: bench: out of memory\n");
            goto out;
        }
    }
    if (!ws) {
        fprintf(stderr, "shardfs: bench: out of memory\n");
        goto out;
    }
    printf("bench: %u keys of %u bytes, %u clients, %u nodes, under %s\n", b.keys, b.size,
           b.clients, b.node_count, b.dir);
    failed += run_phase(&b, ws, PH_PUT);
    failed += run_phase(&b, ws, PH_GET);
    if (!keep) {
        char api[3 * BENCH_PATH_MAX];

        failed += run_phase(&b, ws, PH_DELETE);
        client_kv_path(b.dir, api, sizeof(api));
        remote_api_call(c.remote, b.nodes[0], "DELETE", api, NULL, 0, NULL, NULL, NULL);
    }
    rc = failed ? 1 : 0;
out:
    for (unsigned i = 0; ws && i < b.clients; i++) {
        free(ws[i].lat);
        free(ws[i].value);
        free(ws[i].got);
    }
    free(ws);
    client_close(&c);
    return rc;
}
