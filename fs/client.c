/* client.c -- get, put, rm, ls, status, promote and replica (client.h). */
#include "client.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "control.h"
#include "node_server.h"
#include "placement.h"
#include "reshard.h"
#include "shard_map.h"
#include "store_layout.h"
#include "wire.h"

#define CLIENT_ERR_MAX 1024
#define CLIENT_PATH_MAX CLIENT_KV_PATH_SIZE(4096u) /* a PATH_MAX path */

int client_open(struct client *c, const char *conf, const char *node_arg)
{
    char err[CLIENT_ERR_MAX];

    memset(c, 0, sizeof(*c));
    c->node = -1;
    if (config_load(conf, &c->cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    if (!c->cfg.secret[0]) {
        fprintf(stderr,
                "shardfs: %s: the [cluster] has no secret; nodes serve HTTP only with one\n", conf);
        return -1;
    }
    for (unsigned i = 0; i < c->cfg.node_count && c->node < 0; i++) {
        const char *url = c->cfg.nodes[i].url;
        size_t ulen = strlen(url);

        while (ulen > 0 && url[ulen - 1] == '/')
            ulen--;
        if (!url[0])
            continue;
        if (!node_arg || !strcmp(node_arg, c->cfg.nodes[i].name) ||
            (!strncmp(node_arg, url, ulen) && (!node_arg[ulen] || !strcmp(node_arg + ulen, "/"))))
            c->node = (int)i;
    }
    if (c->node < 0) {
        fprintf(stderr, "shardfs: %s: %s\n", conf,
                node_arg ? "no node has that name or url" : "no node has a url");
        if (node_arg)
            fprintf(stderr, "shardfs: unknown node '%s'\n", node_arg);
        return -1;
    }
    if (remote_new(&c->cfg, -1, &c->remote, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    return 0;
}

void client_close(struct client *c)
{
    remote_free(c->remote);
    c->remote = NULL;
}

int client_kv_path(const char *path, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    int w = snprintf(out, cap, "%s%s", NODE_KV_PREFIX, path[0] == '/' ? "" : "/");
    size_t n = w < 0 ? cap : (size_t)w;

    if (n >= cap)
        goto too_long;
    for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
        int plain = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                    (*p >= '0' && *p <= '9') || strchr("-._~/", *p);
        if (n + 4 > cap)
            goto too_long;
        if (plain) {
            out[n++] = (char)*p;
        } else {
            out[n++] = '%';
            out[n++] = hex[*p >> 4];
            out[n++] = hex[*p & 15];
        }
    }
    out[n] = '\0';
    return 0;
too_long:
    if (cap)
        out[0] = '\0';
    return -ENAMETOOLONG;
}

/* ---- option parsing shared by the commands ---- */

struct opts {
    const char *conf, *node;
    const char *args[2];
    int nargs;
    const char *wait; /* -w SECONDS (replica), NULL */
};

static const struct option client_long_opts[] = {
    {"conf", required_argument, NULL, 'c'},
    {"node", required_argument, NULL, 'n'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* Parse "-c CONF --node NODE ARGS" (and -w SECONDS if with_wait); min..max
 * positional arguments. Returns 0, 1 after --help, or -1 after printing the
 * usage to stderr. */
static int parse_opts_w(int argc, char **argv, const char *usage, int min, int max,
                        int with_wait, struct opts *o)
{
    int opt;

    memset(o, 0, sizeof(*o));
    o->conf = "shards.conf";
    optind = 1;
    while ((opt = getopt_long(argc, argv, with_wait ? "+c:n:w:h" : "+c:n:h", client_long_opts,
                              NULL)) != -1) {
        switch (opt) {
        case 'c':
            o->conf = optarg;
            break;
        case 'n':
            o->node = optarg;
            break;
        case 'w':
            o->wait = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return 1;
        default:
            fputs(usage, stderr);
            return -1;
        }
    }
    o->nargs = argc - optind;
    if (o->nargs < min || o->nargs > max) {
        fputs(usage, stderr);
        return -1;
    }
    for (int i = 0; i < o->nargs; i++)
        o->args[i] = argv[optind + i];
    return 0;
}

static int parse_opts(int argc, char **argv, const char *usage, int min, int max, struct opts *o)
{
    return parse_opts_w(argc, argv, usage, min, max, 0, o);
}

/* Set up c for o; fills path with the API path of o->args[0] if want_path.
 * Returns 0 or an exit status. */
static int open_for(struct client *c, const struct opts *o, char *path, size_t cap)
{
    if (client_open(c, o->conf, o->node) != 0)
        return 2;
    if (path && client_kv_path(o->args[0], path, cap) != 0) {
        fprintf(stderr, "shardfs: %s: path too long\n", o->args[0]);
        return 2;
    }
    return 0;
}

static int report(const char *what, const char *path, int rc)
{
    if (rc == 0)
        return 0;
    fprintf(stderr, "shardfs: %s %s: %s\n", what, path, strerror(-rc));
    return 1;
}

/* One command that is one request on its PATH argument (default "/"). */
struct call {
    const char *what, *usage, *method;
    int min_args, max_args;
    remote_sink_fn sink;    /* for the reply body, with ctx */
    int (*done)(void *ctx); /* after a success, with ctx; -errno */
};

static int run_call(const struct call *k, void *ctx, int argc, char **argv)
{
    static struct client c;
    static char path[CLIENT_PATH_MAX];
    struct opts o;
    int rc = parse_opts(argc, argv, k->usage, k->min_args, k->max_args, &o);

    if (rc)
        return rc > 0 ? 0 : 2;
    if (o.nargs == 0)
        o.args[0] = "/";
    rc = open_for(&c, &o, path, sizeof(path));
    if (rc)
        return rc;
    rc = remote_api_call(c.remote, (unsigned)c.node, k->method, path, NULL, 0, k->sink, ctx, NULL);
    if (rc == 0 && k->done)
        rc = k->done(ctx);
    client_close(&c);
    return report(k->what, o.args[0], rc);
}

/* ---- get ---- */

static const char usage_get[] =
    "usage: shardfs get [-c CONF] [--node NODE] PATH\n"
    "\n"
    "Write the file PATH of the store to stdout (a directory: its JSON\n"
    "listing), read through NODE's key API (a node name or url of CONF;\n"
    "default the first node).\n";

static int sink_stdout(void *ctx, const void *data, size_t len)
{
    (void)ctx;
    return fwrite(data, 1, len, stdout) == len ? 0 : -EIO;
}

static int flush_stdout(void *ctx)
{
    (void)ctx;
    return fflush(stdout) == 0 ? 0 : -EIO;
}

int cmd_get(int argc, char **argv)
{
    static const struct call k = {"get", usage_get, "GET", 1, 1, sink_stdout, flush_stdout};

    return run_call(&k, NULL, argc, argv);
}

/* ---- put ---- */

static const char usage_put[] =
    "usage: shardfs put [-c CONF] [--node NODE] PATH [FILE]\n"
    "\n"
    "Store the bytes of FILE (default: stdin) as the file PATH, atomically,\n"
    "creating missing directories; PATH ending in / makes a directory.\n";

/* All of fd into a malloc()ed buffer, at most max bytes. */
static int slurp(int fd, size_t max, uint8_t **out, size_t *len)
{
    size_t cap = 1u << 16, n = 0;
    uint8_t *buf = malloc(cap), *nb;
    ssize_t r;

    if (!buf)
        return -ENOMEM;
    for (;;) {
        if (n == cap) {
            if (cap > max) {
                free(buf);
                return -EFBIG;
            }
            nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(buf);
            return -errno;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    if (n > max) {
        free(buf);
        return -EFBIG;
    }
    *out = buf;
    *len = n;
    return 0;
}

int cmd_put(int argc, char **argv)
{
    static struct client c;
    static char path[CLIENT_PATH_MAX];
    struct opts o;
    uint8_t *body = NULL;
    size_t len = 0;
    int fd = STDIN_FILENO;
    int rc = parse_opts(argc, argv, usage_put, 1, 2, &o);

    if (rc)
        return rc > 0 ? 0 : 2;
    if (o.nargs == 2 && (fd = open(o.args[1], O_RDONLY | O_CLOEXEC)) < 0) {
        fprintf(stderr, "shardfs: %s: %s\n", o.args[1], strerror(errno));
        return 1;
    }
    rc = slurp(fd, WIRE_BODY_MAX - 4096, &body, &len);
    if (fd != STDIN_FILENO)
        close(fd);
    if (rc == -EFBIG) {
        fprintf(stderr,
                "shardfs: put %s: over %u MiB, the key API's cap; copy it through a mount\n",
                o.args[0], (WIRE_BODY_MAX - 4096) >> 20);
        return 1;
    }
    if (rc)
        return report("put", o.args[1] ? o.args[1] : "(stdin)", rc);
    rc = open_for(&c, &o, path, sizeof(path));
    if (rc == 0) {
        rc = remote_api_call(c.remote, (unsigned)c.node, "PUT", path, body, len, NULL, NULL, NULL);
        rc = report("put", o.args[0], rc);
    }
    free(body);
    client_close(&c);
    return rc;
}

/* ---- rm ---- */

static const char usage_rm[] = "usage: shardfs rm [-c CONF] [--node NODE] PATH\n"
                               "\n"
                               "Remove the file PATH, or the directory PATH if it is empty.\n";

int cmd_rm(int argc, char **argv)
{
    static const struct call k = {"rm", usage_rm, "DELETE", 1, 1, NULL, NULL};

    return run_call(&k, NULL, argc, argv);
}

/* ---- ls ---- */

static const char usage_ls[] =
    "usage: shardfs ls [-c CONF] [--node NODE] [PATH]\n"
    "\n"
    "List the directory PATH (default /), one name a line, directories with\n"
    "a trailing /, like ls -p.\n";

struct growbuf {
    char *p;
    size_t len, cap;
};

static int sink_buf(void *ctx, const void *data, size_t len)
{
    struct growbuf *b = ctx;

    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np)
            return -ENOMEM;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
    return 0;
}

/* Print the listing; -EIO if it is no listing (e.g. PATH is a file). */
static int print_listing(void *ctx)
{
    struct growbuf *b = ctx;
    json_t *doc = b->p ? json_loadb(b->p, b->len, 0, NULL) : NULL;
    json_t *entries = json_object_get(doc, "entries"), *e;
    size_t i;
    int rc = json_is_array(entries) ? 0 : -ENOTDIR;

    json_array_foreach(entries, i, e)
    {
        const char *name = json_string_value(json_object_get(e, "name"));
        const char *type = json_string_value(json_object_get(e, "type"));

        if (!name) /* not UTF-8: shown as the server sent it, in hex */
            printf("(hex)%s\n", json_string_value(json_object_get(e, "name_hex")));
        else
            printf("%s%s\n", name, type && !strcmp(type, "dir") ? "/" : "");
    }
    json_decref(doc);
    return rc;
}

int cmd_ls(int argc, char **argv)
{
    static const struct call k = {"ls", usage_ls, "GET", 0, 1, sink_buf, print_listing};
    struct growbuf b = {0};
    int rc = run_call(&k, &b, argc, argv);

    free(b.p);
    return rc;
}

/* ---- status ---- */

/* Since when node `name` is down, as the earliest mark any live node has
 * of it (GET /v1/nodes, kv_api.h): 0 and *since, *by (the live node's
 * name), or -ENOENT if no live node has it marked. */
static int down_since(struct client *c, const int *up, const char *name, time_t *since,
                      const char **by)
{
    int found = -ENOENT;

    for (unsigned i = 0; i < c->cfg.node_count; i++) {
        struct growbuf b = {0};
        json_t *doc = NULL, *t;

        if (up[i] && remote_api_call(c->remote, i, "GET", "/v1/nodes", NULL, 0, sink_buf, &b,
                                     NULL) == 0 && b.p)
            doc = json_loads(b.p, 0, NULL);
        t = json_object_get(json_object_get(doc, "down"), name);
        if (json_is_integer(t) && (found || (time_t)json_integer_value(t) < *since)) {
            *since = (time_t)json_integer_value(t);
            *by = c->cfg.nodes[i].name;
            found = 0;
        }
        json_decref(doc);
        free(b.p);
    }
    return found;
}

/* node's answer to a signed GET of path_query, as JSON (NULL on any
 * failure, which *rc then tells). */
static json_t *get_json(struct client *c, unsigned node, const char *path_query, int *rc)
{
    struct growbuf b = {0};
    json_t *doc = NULL;

    *rc = remote_api_call(c->remote, node, "GET", path_query, NULL, 0, sink_buf, &b, NULL);
    if (*rc == 0 && !(doc = b.p ? json_loadb(b.p, b.len, 0, NULL) : NULL))
        *rc = -EIO;
    free(b.p);
    return doc;
}

/* The element of array whose member key is the string or integer want. */
static json_t *json_find(json_t *array, const char *key, const char *want_s, json_int_t want_i)
{
    size_t i;
    json_t *e;

    json_array_foreach(array, i, e)
    {
        json_t *v = json_object_get(e, key);
        if ((want_s && json_is_string(v) && !strcmp(json_string_value(v), want_s)) ||
            (!want_s && json_is_integer(v) && json_integer_value(v) == want_i))
            return e;
    }
    return NULL;
}

static long long jint(json_t *obj, const char *key)
{
    return (long long)json_integer_value(json_object_get(obj, key));
}

/* The STATE column of a replica copy from its node's own account
 * (GET /v1/replicas): the phase, and for a snapshot its progress. */
static void copy_state(json_t *mine, char *out, size_t len)
{
    const char *phase = json_string_value(json_object_get(mine, "phase"));
    const char *error = json_string_value(json_object_get(mine, "error"));
    int n;

    if (!phase) {
        snprintf(out, len, "-");
        return;
    }
    n = snprintf(out, len, "%s", phase);
    if (!strcmp(phase, "snapshot") && n >= 0 && (size_t)n < len) {
        long long eta = jint(mine, "snap_eta_ms");
        n += snprintf(out + n, len - (size_t)n, " %.1f MiB, %lld of %lld records, %.1f MiB/s",
                      (double)jint(mine, "snap_bytes") / 1048576.0, jint(mine, "snap_records"),
                      jint(mine, "snap_total_records"),
                      json_real_value(json_object_get(mine, "snap_rate")) / 1048576.0);
        if (eta >= 0 && n >= 0 && (size_t)n < len)
            n += snprintf(out + n, len - (size_t)n, ", ETA %.1f s", (double)eta / 1000.0);
    }
    if (error && error[0] && n >= 0 && (size_t)n < len)
        snprintf(out + n, len - (size_t)n, " (last error: %s)", error);
}

/* A joiner's state: where it enters the in-sync set. */
static void append_joining(char *state, size_t len, long long join_lsn)
{
    size_t n = strlen(state);

    if (n < len)
        snprintf(state + n, len - n, "; joins at lsn %lld", join_lsn);
}

/* Every copy of every shard, for a cluster with replicas: the primary's
 * view (GET /v1/shard/N/position: its position, and for each replica the
 * position it acknowledged, whether it is in the in-sync set and how far
 * behind it is) and each replica's own (GET /v1/replicas on its node: the
 * position it holds, its phase, a snapshot's progress). */
static void print_copies(struct client *c, const int *up, const struct shard_copies *copies,
                         const unsigned char *shown, unsigned nshow)
{
    json_t *own[CONFIG_MAX_NODES] = {0};
    int rc;

    for (unsigned i = 0; i < c->cfg.node_count; i++)
        own[i] = up[i] ? get_json(c, i, "/v1/replicas", &rc) : NULL;
    printf("\n%-6s %-12s %-8s %6s %12s %8s %8s %7s  %s\n", "SHARD", "NODE", "ROLE", "EPOCH",
           "LSN", "LAG", "LAG_MS", "IN_SYNC", "STATE");
    for (unsigned s = 0; s < nshow; s++) {
        int owner = copies[s].primary;
        char path[64];
        json_t *pos = NULL, *peers;

        if (!shown[s])
            continue;
        snprintf(path, sizeof(path), "/v1/shard/%u/position", s);
        rc = -EHOSTUNREACH;
        if (owner < 0) {
            printf("%-6u %-12s %-8s %6s %12s %8s %8s %7s  (no primary)\n", s, "-", "primary",
                   "-", "-", "-", "-", "-");
            continue;
        }
        if (up[owner])
            pos = get_json(c, (unsigned)owner, path, &rc);
        if (pos)
            printf("%-6u %-12s %-8s %6lld %12lld %8s %8s %7s  %s\n", s, c->cfg.nodes[owner].name,
                   "primary", jint(pos, "epoch"), jint(pos, "lsn"), "-", "-", "-", "serving");
        else
            printf("%-6u %-12s %-8s %6s %12s %8s %8s %7s  (%s)\n", s, c->cfg.nodes[owner].name,
                   "primary", "-", "-", "-", "-", "-", strerror(-rc));
        peers = json_object_get(pos, "replicas");
        for (unsigned k = 0; k < copies[s].nreplicas; k++) {
            int node = copies[s].replicas[k];
            const char *name;
            json_t *peer, *mine;
            char epoch[24] = "-", lsn[24] = "-", lag[24] = "-", lag_ms[24] = "-", state[256];
            json_t *from;
            int joining;

            if (node < 0)
                continue; /* a node the map names but this config lacks */
            name = c->cfg.nodes[node].name;
            peer = json_find(peers, "node", name, 0);
            mine = json_find(json_object_get(own[node], "replicas"), "shard", NULL, s);
            from = mine ? mine : peer;

            if (mine) /* the primary's view has no epoch of the copy */
                snprintf(epoch, sizeof(epoch), "%lld", jint(mine, "epoch"));
            if (from)
                snprintf(lsn, sizeof(lsn), "%lld", jint(from, "lsn"));
            if (peer) {
                snprintf(lag, sizeof(lag), "%lld", jint(peer, "lag_batches"));
                snprintf(lag_ms, sizeof(lag_ms), "%lld", jint(peer, "lag_ms"));
            } else if (mine) {
                snprintf(lag_ms, sizeof(lag_ms), "%lld", jint(mine, "lag_ms"));
            }
            if (mine)
                copy_state(mine, state, sizeof(state));
            else
                snprintf(state, sizeof(state), "%s", up[node] ? "-" : "(node down)");
            joining = peer && json_is_true(json_object_get(peer, "joining"));
            if (joining) /* writes wait for it already (DESIGN: joining) */
                append_joining(state, sizeof(state), jint(peer, "join_lsn"));
            printf("%-6u %-12s %-8s %6s %12s %8s %8s %7s  %s\n", s, name, "replica", epoch, lsn,
                   lag, lag_ms,
                   !peer                                              ? "?"
                   : json_is_true(json_object_get(peer, "in_sync")) ? "yes"
                   : joining                                          ? "joining"
                                                                      : "no",
                   state);
        }
        json_decref(pos);
    }
    for (unsigned i = 0; i < c->cfg.node_count; i++)
        json_decref(own[i]);
}

static const char usage_status[] =
    "usage: shardfs status [-c CONF]\n"
    "\n"
    "Print every node of CONF (up or down, address, round-trip time; for a\n"
    "node that is down, since when the live nodes have it marked down) and\n"
    "every shard (owner, records, bytes, batches not yet synced); with replicas,\n"
    "every copy of every shard (node, role, epoch, LSN, lag in batches and ms\n"
    "as its primary sees it, in the in-sync set, joining it (writes wait for it\n"
    "already; it enters at the lsn shown) or not, and the copy's own state:\n"
    "streaming, waiting for its primary, or a snapshot's progress). Exits 1 if\n"
    "a node is down.\n"
    "A single-node store (one node owning every shard, no replicas, no etcd) is\n"
    "not asked over HTTP: its layout (every shard and its depth) is printed, and\n"
    "a split or merge in flight with its phase and progress (from the daemon\n"
    "of a mounted store), or one that was interrupted. Exits 1 for an\n"
    "interrupted change (`shardfs reshard resume` finishes it). In a cluster\n"
    "without replicas or etcd, the same for each node whose data_dir is on this\n"
    "machine.\n";

/* The change of node's layout in flight, if any: its progress from the
 * daemon of the mounted store, or that it was interrupted. prefix names
 * the node in a cluster. The exit code: 1 for an interrupted change. */
static int status_change(const struct config *cfg, int node, const char *prefix)
{
    struct control_change ch;
    char what[64], err[1024];
    int pending, rc;

    pending = reshard_pending(cfg, node, what, sizeof(what), err, sizeof(err));
    if (pending < 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return 2;
    }
    rc = control_status(cfg, node, &ch, err, sizeof(err));
    if (rc == 0 && ch.running) {
        const struct reshard_stats *st = &ch.st;

        printf("\n%sin flight: %s of shard %u: %s, %llu records, %.1f MiB", prefix,
               ch.merge ? "merge" : "split", ch.shard, st->phase,
               (unsigned long long)st->records, st->bytes / 1048576.0);
        if (st->estimate)
            printf(" of about %.1f MiB", st->estimate / 1048576.0);
        if (st->purged)
            printf(", %llu purged", (unsigned long long)st->purged);
        printf(", %.1f s\n", st->seconds);
        return 0;
    }
    if (pending) {
        printf("\n%sinterrupted: %s (the daemon that made it is gone); `shardfs reshard "
               "resume` finishes it\n",
               prefix, what[0] ? what : "a change of the layout");
        return 1;
    }
    if (!prefix[0])
        printf("\nno change of the layout in flight%s\n", rc == 0 ? " (mounted)" : "");
    return 0;
}

/* `shardfs status` of a single-node store that serves no HTTP (no secret):
 * its layout and the change of it in flight. */
static int status_single(const struct config *cfg)
{
    struct store_layout l;
    char err[1024];

    if (store_layout_read(cfg, 0, &l, err, sizeof(err)) < 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return 2;
    }
    printf("store: %s, one node, made with %u shards, %u slots\n\n", cfg->nodes[0].data_dir,
           l.base, l.slots);
    printf("%-6s %s\n", "SHARD", "DEPTH");
    for (unsigned i = 0; i < l.slots; i++)
        if (placement_is_shard(l.depth, i))
            printf("%-6u %u\n", i, l.depth[i]);
    return status_change(cfg, 0, "");
}

int cmd_status(int argc, char **argv)
{
    static struct client c;
    int up[CONFIG_MAX_NODES] = {0}, prc[CONFIG_MAX_NODES] = {0}, down = 0;
    struct opts o;
    int rc = parse_opts(argc, argv, usage_status, 0, 0, &o);

    if (rc)
        return rc > 0 ? 0 : 2;
    {
        static struct config cfg;
        char err[CLIENT_ERR_MAX];

        if (config_load(o.conf, &cfg, err, sizeof(err)) != 0) {
            fprintf(stderr, "shardfs: %s\n", err);
            return 2;
        }
        if (store_layout_single_node(&cfg, 0) && !cfg.secret[0])
            return status_single(&cfg);
    }
    rc = open_for(&c, &o, NULL, 0);
    if (rc)
        return rc;
    printf("cluster: %u shards, epoch %llu, %u nodes, timeout %u ms\n\n", c.cfg.shard_count,
           (unsigned long long)c.cfg.epoch, c.cfg.node_count, c.cfg.timeout_ms);
    printf("%-12s %-5s %-32s %10s\n", "NODE", "STATE", "URL", "RTT");
    double rtt[CONFIG_MAX_NODES] = {0};
    for (unsigned i = 0; i < c.cfg.node_count; i++) {
        prc[i] = remote_ping(c.remote, i, &rtt[i]);
        up[i] = prc[i] == 0;
        down += !up[i];
    }
    /* Who holds what: the shard map (etcd's, which failovers change, or the
     * file's). */
    static struct shard_copies copies[CONFIG_MAX_SHARDS];
    static unsigned char shown[CONFIG_MAX_SHARDS];
    struct shard_map *map = NULL;
    unsigned nshow = c.cfg.shard_count;
    char merr[256];

    if (c.cfg.etcd[0] && shard_map_open(&c.cfg, -1, &map, merr, sizeof(merr)) != 0)
        fprintf(stderr, "shardfs: the shard map in etcd: %s; showing shards.conf's\n", merr);
    if (map)
        nshow = CONFIG_MAX_SHARDS; /* the map's shards: splits add some (reshard.h) */
    for (unsigned s = 0; s < nshow; s++) {
        shown[s] = s < c.cfg.shard_count;
        if (s < c.cfg.shard_count) {
            copies[s] = (struct shard_copies){.primary = c.cfg.owner[s],
                                              .nreplicas = c.cfg.nreplicas[s]};
            for (unsigned k = 0; k < c.cfg.nreplicas[s]; k++)
                copies[s].replicas[k] = c.cfg.replicas[s][k];
        }
        if (map && shard_map_get(map, s, &copies[s]) == 0) {
            shown[s] = 1;
            remote_owner_set(c.remote, s, copies[s].primary);
        } else if (map) {
            shown[s] = 0;
        }
    }
    shard_map_close(map);
    /* In config order, once every node was pinged: a down node's line asks
     * the live ones since when they have it marked. */
    for (unsigned i = 0; i < c.cfg.node_count; i++) {
        char when[32] = "";
        const char *by = NULL;
        time_t since;
        struct tm tm;

        if (up[i]) {
            printf("%-12s %-5s %-32s %7.2f ms\n", c.cfg.nodes[i].name, "up", c.cfg.nodes[i].url,
                   rtt[i]);
            continue;
        }
        if (down_since(&c, up, c.cfg.nodes[i].name, &since, &by) == 0 && gmtime_r(&since, &tm))
            strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", &tm);
        if (when[0])
            printf("%-12s %-5s %-32s %10s  (%s; down since %s, seen by %s)\n",
                   c.cfg.nodes[i].name, "down", c.cfg.nodes[i].url, "-", strerror(-prc[i]), when,
                   by);
        else
            printf("%-12s %-5s %-32s %10s  (%s)\n", c.cfg.nodes[i].name, "down",
                   c.cfg.nodes[i].url, "-", strerror(-prc[i]));
    }
    printf("\n%-6s %-12s %12s %14s %8s\n", "SHARD", "OWNER", "RECORDS", "BYTES", "PENDING");
    for (unsigned s = 0; s < nshow; s++) {
        int owner = copies[s].primary;
        struct shard *sh = NULL;
        struct shard_stat st;
        int src = -EHOSTUNREACH;

        if (!shown[s])
            continue;
        if (map && copies[s].building) {
            /* not placed yet: its primary fills it (reshard.h) */
            printf("%-6u %-12s %12s %14s %8s  (building: being split off shard %u, depth %u)\n",
                   s, owner >= 0 ? c.cfg.nodes[owner].name : "-", "-", "-", "-",
                   s - (1u << (copies[s].depth - 1)), copies[s].depth);
            continue;
        }
        if (owner < 0) {
            printf("%-6u %-12s %12s %14s %8s  (no primary)\n", s, "-", "-", "-", "-");
            continue;
        }
        if (up[owner] && shard_remote_open(c.remote, s, &sh) == 0) {
            src = shard_stat(sh, &st);
            shard_close(sh);
        }
        if (src == 0)
            printf("%-6u %-12s %12llu %14llu %8llu\n", s, c.cfg.nodes[owner].name,
                   (unsigned long long)st.records, (unsigned long long)st.bytes,
                   (unsigned long long)st.pending);
        else
            printf("%-6u %-12s %12s %14s %8s  (%s)\n", s, c.cfg.nodes[owner].name, "-", "-", "-",
                   strerror(-src));
    }
    if (map) { /* map is closed: only whether there was one */
        int deeper = 0;

        for (unsigned s = 0; s < nshow; s++)
            deeper |= shown[s] && copies[s].depth != c.cfg.shard_bits && !copies[s].building;
        if (deeper) {
            printf("\nlayout (the shard map):");
            for (unsigned s = 0; s < nshow; s++)
                if (shown[s] && !copies[s].building)
                    printf(" %u:%u", s, copies[s].depth);
            printf(" (shard:depth)\n");
        }
    }
    for (unsigned s = 0; s < nshow; s++) {
        if (shown[s] && ((s < c.cfg.shard_count && c.cfg.nreplicas[s]) || copies[s].nreplicas)) {
            print_copies(&c, up, copies, shown, nshow);
            break;
        }
    }
    /* Changes of the layout of the nodes whose data is on this machine (with
     * etcd: a change their daemons are making). */
    for (unsigned i = 0; (store_layout_static(&c.cfg) || c.cfg.etcd[0]) && i < c.cfg.node_count;
         i++) {
        char prefix[CONFIG_NAME_MAX + 16] = "";

        if (access(c.cfg.nodes[i].data_dir, F_OK) != 0)
            continue;
        if (c.cfg.node_count > 1)
            snprintf(prefix, sizeof(prefix), "node %s: ", c.cfg.nodes[i].name);
        if (status_change(&c.cfg, (int)i, prefix) == 1)
            down = 1; /* an interrupted change of the layout */
    }
    client_close(&c);
    return down ? 1 : 0;
}

/* ---- promote ---- */

static const char usage_promote[] =
    "usage: shardfs promote [-c CONF] SHARD NODE\n"
    "\n"
    "Hand the primary role of shard SHARD over to NODE, without loss, for\n"
    "maintenance: NODE must hold a replica of SHARD that is in its in-sync\n"
    "set (shardfs status). The current primary holds new writes on SHARD,\n"
    "waits until NODE's copy has everything it applied (a bounded wait, else\n"
    "it gives up and goes on serving), then moves the role and its leader key\n"
    "to NODE in one etcd transaction (the epoch goes up by one); the writes it\n"
    "held go to NODE, and the old primary stays an in-sync replica. Needs the\n"
    "shard map in etcd (an etcd directive). Exits 0 when NODE is the primary,\n"
    "1 when the handover was refused or failed (nothing changed), 2 on bad\n"
    "usage or configuration.\n";

static int parse_shard(const char *s, unsigned count, unsigned *out)
{
    char *end;
    unsigned long v;

    if (!s[0] || s[0] == '-' || s[0] == '+')
        return -EINVAL;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v >= count)
        return -EINVAL;
    *out = (unsigned)v;
    return 0;
}

/* Whether node is among c's replicas: its slot, or -1. */
static int replica_slot_of(const struct shard_copies *c, int node)
{
    for (unsigned i = 0; i < c->nreplicas; i++)
        if (c->replicas[i] == node)
            return (int)i;
    return -1;
}

/* What the map says about shard n and node `to`, checked before asking the
 * primary (which checks again, authoritatively). 0, or 1 after printing
 * why not. */
static int promote_check(const struct client *c, unsigned n, int to,
                         const struct shard_copies *sc, int leader)
{
    const char *name = c->cfg.nodes[to].name;
    int slot = replica_slot_of(sc, to);

    if (sc->primary == to) {
        fprintf(stderr, "shardfs: promote: %s already is the primary of shard %u (epoch %llu)\n",
                name, n, (unsigned long long)sc->epoch);
        return 1;
    }
    if (slot < 0) {
        fprintf(stderr, "shardfs: promote: %s holds no copy of shard %u (its primary is %s)\n",
                name, n, sc->primary >= 0 ? c->cfg.nodes[sc->primary].name : "unknown");
        return 1;
    }
    if (!(sc->in_sync >> slot & 1)) {
        fprintf(stderr,
                "shardfs: promote: %s's copy of shard %u is not in sync with its primary %s; "
                "wait until it is (shardfs status) and try again\n",
                name, n, sc->primary >= 0 ? c->cfg.nodes[sc->primary].name : "unknown");
        return 1;
    }
    if (sc->primary < 0 || leader != sc->primary) {
        fprintf(stderr,
                "shardfs: promote: shard %u has no live primary at the moment (a failover "
                "is due); nothing to hand over\n",
                n);
        return 1;
    }
    return 0;
}

int cmd_promote(int argc, char **argv)
{
    static struct client c;
    struct growbuf b = {0};
    struct shard_copies sc;
    struct shard_map *map = NULL;
    json_t *doc = NULL, *req = NULL;
    char merr[256], *body = NULL;
    unsigned n;
    int to = -1, leader, rc;
    struct opts o;

    rc = parse_opts(argc, argv, usage_promote, 2, 2, &o);
    if (rc)
        return rc > 0 ? 0 : 2;
    rc = open_for(&c, &o, NULL, 0);
    if (rc)
        return rc;
    rc = 2;
    /* with etcd, a split makes shards past the config's count: the map says */
    if (parse_shard(o.args[0], c.cfg.etcd[0] ? CONFIG_MAX_SHARDS : c.cfg.shard_count, &n) < 0) {
        fprintf(stderr, "shardfs: promote: no shard '%s' (the store has shards 0-%u)\n",
                o.args[0], c.cfg.shard_count - 1);
        goto out;
    }
    for (unsigned i = 0; i < c.cfg.node_count; i++)
        if (!strcmp(c.cfg.nodes[i].name, o.args[1]))
            to = (int)i;
    if (to < 0) {
        fprintf(stderr, "shardfs: promote: unknown node '%s' (%s names no such node)\n",
                o.args[1], o.conf);
        goto out;
    }
    if (!c.cfg.etcd[0]) {
        fprintf(stderr,
                "shardfs: promote: %s has no etcd directive: the shard map is the file "
                "itself. Without etcd a handover is manual: stop the nodes, make %s the "
                "owner of shard %u in the file (the old one a replica), start them again\n",
                o.conf, o.args[1], n);
        goto out;
    }
    rc = 1;
    if (shard_map_open(&c.cfg, -1, &map, merr, sizeof(merr)) != 0) {
        fprintf(stderr, "shardfs: promote: the shard map in etcd: %s\n", merr);
        goto out;
    }
    if (shard_map_get(map, n, &sc) != 0) {
        fprintf(stderr, "shardfs: promote: no shard '%s' (the store has shards 0-%u, and those "
                "splits made: shardfs status)\n", o.args[0], c.cfg.shard_count - 1);
        shard_map_close(map);
        rc = 2;
        goto out;
    }
    leader = shard_map_leader(map, n);
    shard_map_close(map);
    if (promote_check(&c, n, to, &sc, leader))
        goto out;
    req = json_pack("{s:I,s:s}", "shard", (json_int_t)n, "node", o.args[1]);
    body = req ? json_dumps(req, JSON_COMPACT) : NULL;
    if (!body) {
        fprintf(stderr, "shardfs: promote: out of memory\n");
        goto out;
    }
    /* The primary's node does it: only the process that acknowledges the
     * shard's writes can stop acknowledging them and see the replica level. */
    rc = remote_api_call(c.remote, (unsigned)sc.primary, "POST", "/v1/promote", body,
                         strlen(body), sink_buf, &b, NULL);
    if (rc == 0 && !(doc = b.p ? json_loadb(b.p, b.len, 0, NULL) : NULL))
        rc = -EIO;
    if (rc < 0) {
        fprintf(stderr,
                "shardfs: promote: shard %u: asking its primary %s failed: %s (see shardfs "
                "status for where the shard is now)\n",
                n, c.cfg.nodes[sc.primary].name, strerror(-rc));
        rc = 1;
        goto out;
    }
    if (!json_is_true(json_object_get(doc, "done"))) {
        fprintf(stderr, "shardfs: promote: %s\n",
                json_string_value(json_object_get(doc, "error"))
                    ? json_string_value(json_object_get(doc, "error"))
                    : "refused");
        rc = 1;
        goto out;
    }
    printf("shard %u: primary %s -> %s, epoch %lld -> %lld (lsn %lld; writes held %lld ms)\n", n,
           c.cfg.nodes[sc.primary].name, o.args[1], jint(doc, "old_epoch"), jint(doc, "epoch"),
           jint(doc, "lsn"), jint(doc, "frozen_ms"));
    rc = 0;
out:
    json_decref(doc);
    json_decref(req);
    free(body);
    free(b.p);
    client_close(&c);
    return rc;
}

/* ---- replica add / drop ---- */

static const char usage_replica[] =
    "usage: shardfs replica add  [-c CONF] [-w SECONDS] SHARD NODE\n"
    "       shardfs replica drop [-c CONF] [-w SECONDS] SHARD NODE\n"
    "\n"
    "Change where the copies of shard SHARD live, online (the shard map in etcd;\n"
    "needs an etcd directive).\n"
    "  add   NODE gets a replica of SHARD: one etcd transaction adds it to the\n"
    "        shard's replicas, out of the in-sync set; NODE sees it, creates its\n"
    "        copy and catches up from the primary (a snapshot, then the stream);\n"
    "        once level, the primary puts it in the in-sync set (then writes with\n"
    "        ack = replica wait for it, and it may be promoted). Waits up to -w\n"
    "        SECONDS (default 120; 0: do not wait) until NODE is in sync.\n"
    "  drop  NODE's replica leaves the shard's replicas and its in-sync set in one\n"
    "        transaction (its primary stops waiting for it), then NODE stops\n"
    "        pulling it, closes it and deletes its files. The primary cannot be\n"
    "        dropped (promote another node first), nor the only in-sync replica\n"
    "        (no copy could take over: add another one first); a last replica\n"
    "        out of sync can. Waits up to -w SECONDS (default 30) for NODE to let\n"
    "        go of its copy.\n"
    "Exits 0 when done, 1 when refused or failed (or NODE not in sync in time:\n"
    "the copy stays and goes on catching up), 2 on bad usage or configuration.\n";

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static double mono_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* NODE's own account of its copy of shard n (GET /v1/replicas), or NULL. */
static json_t *replica_entry(struct client *c, int node, unsigned n)
{
    int rc;
    json_t *doc = get_json(c, (unsigned)node, "/v1/replicas", &rc);
    json_t *e = json_find(json_object_get(doc, "replicas"), "shard", NULL, n);

    json_incref(e);
    json_decref(doc);
    return e;
}

/* The names of c's replicas ("b, c*"; * in sync) into out. */
static void replicas_text(const struct client *cl, const struct shard_copies *c, char *out,
                          size_t len)
{
    size_t n = 0;

    out[0] = '\0';
    for (unsigned i = 0; i < c->nreplicas && n < len; i++) {
        int w = snprintf(out + n, len - n, "%s%s%s", i ? ", " : "",
                         c->replicas[i] >= 0 ? cl->cfg.nodes[c->replicas[i]].name : "?",
                         c->in_sync >> i & 1 ? "*" : "");
        n += w > 0 ? (size_t)w : 0;
    }
    if (!c->nreplicas)
        snprintf(out, len, "none");
}

/* Why the rules refuse (rc of shard_copies_add/drop_replica), in words. */
static void replica_refused(const struct client *cl, int add, unsigned n, int node,
                            const struct shard_copies *c, int rc)
{
    const char *name = cl->cfg.nodes[node].name;
    const char *what = add ? "add" : "drop";

    if (rc == -EEXIST && c->primary == node)
        fprintf(stderr, "shardfs: replica %s: %s is the primary of shard %u; it holds a copy "
                "already\n", what, name, n);
    else if (rc == -EEXIST)
        fprintf(stderr, "shardfs: replica %s: %s already holds a replica of shard %u\n", what,
                name, n);
    else if (rc == -ENOSPC)
        fprintf(stderr, "shardfs: replica %s: shard %u already has %d replicas, the most the "
                "map holds; drop one first\n", what, n, SHARD_MAP_COPIES_MAX - 1);
    else if (rc == -EPERM)
        fprintf(stderr, "shardfs: replica %s: %s is the primary of shard %u; promote another "
                "node first (shardfs promote %u NODE), then drop it\n", what, name, n, n);
    else if (rc == -ENOENT)
        fprintf(stderr, "shardfs: replica %s: %s holds no replica of shard %u\n", what, name, n);
    else if (rc == -EBUSY)
        fprintf(stderr, "shardfs: replica %s: %s holds the only in-sync replica of shard %u: "
                "without it no copy could take over from its primary. Add another "
                "(shardfs replica add %u NODE) and let it get in sync first\n", what, name, n,
                n);
    else
        fprintf(stderr, "shardfs: replica %s: shard %u: the map change failed: %s\n", what, n,
                strerror(-rc));
}

/* After an add: wait until node is in the shard's in-sync set (the map's
 * watch brings it), printing where its copy is now and then. 0 or 1. */
static int replica_add_wait(struct client *cl, struct shard_map *map, unsigned n, int node,
                            double wait_s)
{
    double t0 = mono_s(), last = t0;
    struct shard_copies c;

    for (;;) {
        int slot;

        shard_map_get(map, n, &c);
        slot = replica_slot_of(&c, node);
        if (slot < 0) {
            fprintf(stderr, "shardfs: replica add: %s is no replica of shard %u any more "
                    "(dropped meanwhile?)\n", cl->cfg.nodes[node].name, n);
            return 1;
        }
        if (c.in_sync >> slot & 1) {
            printf("shard %u: %s is in sync (%.1f s)\n", n, cl->cfg.nodes[node].name,
                   mono_s() - t0);
            return 0;
        }
        if (mono_s() - t0 >= wait_s)
            break;
        if (mono_s() - last >= 5) {
            json_t *e = replica_entry(cl, node, n);
            char state[256] = "no answer";

            if (e)
                copy_state(e, state, sizeof(state));
            printf("shard %u: %s catching up: %s, lsn %lld of %lld\n", n,
                   cl->cfg.nodes[node].name, state, e ? jint(e, "lsn") : -1LL,
                   e ? jint(e, "primary_lsn") : -1LL);
            fflush(stdout);
            json_decref(e);
            last = mono_s();
        }
        sleep_ms(50);
    }
    {
        json_t *e = replica_entry(cl, node, n);
        char state[256] = "its node does not say";

        if (e)
            copy_state(e, state, sizeof(state));
        fprintf(stderr, "shardfs: replica add: shard %u: %s is not in sync after %.0f s (%s, "
                "lsn %lld, its primary's %lld); the copy stays and goes on catching up "
                "(shardfs status)\n", n, cl->cfg.nodes[node].name, wait_s, state,
                e ? jint(e, "lsn") : -1LL, e ? jint(e, "primary_lsn") : -1LL);
        json_decref(e);
    }
    return 1;
}

/* After a drop: wait until node no longer lists its copy (it let go and
 * removed the files). 0, or 1 if it did not say so in time. */
static int replica_drop_wait(struct client *cl, unsigned n, int node, double wait_s)
{
    double t0 = mono_s();
    double rtt;

    while (mono_s() - t0 < wait_s) {
        json_t *e;

        if (remote_ping(cl->remote, (unsigned)node, &rtt) != 0)
            break;
        e = replica_entry(cl, node, n);
        if (!e) {
            printf("shard %u: %s let go of its copy and removed its files (%.1f s)\n", n,
                   cl->cfg.nodes[node].name, mono_s() - t0);
            return 0;
        }
        json_decref(e);
        sleep_ms(50);
    }
    printf("shard %u: %s did not confirm within %.0f s (not running?); it removes its copy "
           "when it sees the map\n", n, cl->cfg.nodes[node].name, wait_s);
    return 0;
}

int cmd_replica(int argc, char **argv)
{
    static struct client c;
    struct shard_map *map = NULL;
    struct shard_copies sc, want;
    char merr[256], list[256];
    double wait_s, rtt;
    unsigned n;
    int add, node = -1, rc;
    struct opts o;

    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        fputs(usage_replica, stdout);
        return 0;
    }
    if (argc < 2 || (strcmp(argv[1], "add") != 0 && strcmp(argv[1], "drop") != 0)) {
        fputs(usage_replica, stderr);
        return 2;
    }
    add = !strcmp(argv[1], "add");
    rc = parse_opts_w(argc - 1, argv + 1, usage_replica, 2, 2, 1, &o);
    if (rc)
        return rc > 0 ? 0 : 2;
    wait_s = add ? 120 : 30;
    if (o.wait) {
        char *end;

        errno = 0;
        wait_s = strtod(o.wait, &end);
        if (errno || end == o.wait || *end || wait_s < 0 || wait_s > 86400) {
            fprintf(stderr, "shardfs: replica: -w wants seconds (0-86400), not '%s'\n", o.wait);
            return 2;
        }
    }
    rc = open_for(&c, &o, NULL, 0);
    if (rc)
        return rc;
    rc = 2;
    if (parse_shard(o.args[0], c.cfg.etcd[0] ? CONFIG_MAX_SHARDS : c.cfg.shard_count, &n) < 0) {
        fprintf(stderr, "shardfs: replica %s: no shard '%s' (the store has shards 0-%u)\n",
                argv[1], o.args[0], c.cfg.shard_count - 1);
        goto out;
    }
    for (unsigned i = 0; i < c.cfg.node_count; i++)
        if (!strcmp(c.cfg.nodes[i].name, o.args[1]))
            node = (int)i;
    if (node < 0) {
        fprintf(stderr, "shardfs: replica %s: unknown node '%s' (%s names no such node)\n",
                argv[1], o.args[1], o.conf);
        goto out;
    }
    if (!c.cfg.etcd[0]) {
        fprintf(stderr,
                "shardfs: replica %s: %s has no etcd directive: the shard map is the file "
                "itself. Edit the 'replicas =' line of [node %s] in it (the same file on every "
                "node) and restart the nodes\n",
                argv[1], o.conf, o.args[1]);
        goto out;
    }
    rc = 1;
    if (shard_map_open(&c.cfg, -1, &map, merr, sizeof(merr)) != 0) {
        fprintf(stderr, "shardfs: replica %s: the shard map in etcd: %s\n", argv[1], merr);
        goto out;
    }
    if (shard_map_get(map, n, &sc) != 0) {
        fprintf(stderr, "shardfs: replica %s: no shard '%s' (the store has shards 0-%u, and those "
                "splits made: shardfs status)\n", argv[1], o.args[0], c.cfg.shard_count - 1);
        rc = 2;
        goto out;
    }
    want = sc;
    rc = add ? shard_copies_add_replica(&want, node) : shard_copies_drop_replica(&want, node);
    if (rc < 0) {
        replica_refused(&c, add, n, node, &sc, rc);
        rc = 1;
        goto out;
    }
    if (add && remote_ping(c.remote, (unsigned)node, &rtt) != 0) {
        fprintf(stderr, "shardfs: replica add: %s does not answer at %s; start it first\n",
                o.args[1], c.cfg.nodes[node].url);
        rc = 1;
        goto out;
    }
    rc = add ? shard_map_replica_add(map, n, node) : shard_map_replica_drop(map, n, node);
    if (rc < 0) {
        shard_map_get(map, n, &sc); /* what the refusal was judged on */
        replica_refused(&c, add, n, node, &sc, rc);
        rc = 1;
        goto out;
    }
    shard_map_get(map, n, &sc);
    replicas_text(&c, &sc, list, sizeof(list));
    printf("shard %u: %s %s (primary %s, epoch %llu; replicas now %s; * in sync)\n", n,
           o.args[1], add ? "added as a replica" : "dropped",
           sc.primary >= 0 ? c.cfg.nodes[sc.primary].name : "-", (unsigned long long)sc.epoch,
           list);
    fflush(stdout);
    if (wait_s <= 0)
        rc = 0;
    else
        rc = add ? replica_add_wait(&c, map, n, node, wait_s) : replica_drop_wait(&c, n, node,
                                                                                 wait_s);
out:
    shard_map_close(map);
    client_close(&c);
    return rc;
}
