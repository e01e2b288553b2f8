/* main.c -- the shardfs command line: mount, serve, fsck, where; the HTTP
 * clients (get, put, rm, ls, status, bench) are in client.c and bench.c.
 *
 * mount: the configuration and the data directory's layout are checked first,
 * in the calling process, so a bad shards.conf fails before anything is
 * mounted or written. Without -f the process then forks; the child opens the
 * shards (LMDB environments and threads must not cross a fork), mounts, and
 * reports "ready" or an error message through a pipe, so the parent exits 0
 * only once the mount is usable and otherwise prints why it is not.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "client.h"
#include "config.h"
#include "fsck.h"
#include "fuse_ops.h"
#include "kv_api.h"
#include "namespace.h"
#include "node_server.h"
#include "placement.h"
#include "record.h"
#include "replication.h"
#include "shard_map.h"
#include "store_layout.h"
#include "reshard.h"
#include "control.h"

#define ERR_MAX 1024

static struct config cfg; /* large: keep it off the stack */

static const char usage_main[] =
    "usage: shardfs COMMAND [options]\n"
    "\n"
    "commands:\n"
    "  mount [-c CONF] [-n NODE] [-f] [-o OPTS] MOUNTPOINT   mount the store\n"
    "  serve [-c CONF] [-n NODE] [-f]                       run a node without a mount\n"
    "  fsck  [-c CONF] [-n NODE] [--repair]                 check (and repair) the store\n"
    "  fsck  --replicas [-c CONF] [--wait MS]               compare every replica with its primary\n"
    "  where [-c CONF] [-n NODE] PATH                       show which shards hold PATH\n"
    "  (these four take -w SECONDS: how long to wait for another process of the store)\n"
    "  get   [-c CONF] [--node NODE] PATH                   print a file (via the key API)\n"
    "  put   [-c CONF] [--node NODE] PATH [FILE]            store a file (stdin by default)\n"
    "  rm    [-c CONF] [--node NODE] PATH                   remove a file or empty directory\n"
    "  ls    [-c CONF] [--node NODE] [PATH]                 list a directory\n"
    "  status [-c CONF]                                     nodes and shards; a store's layout\n"
    "  promote [-c CONF] SHARD NODE                         hand a shard's primary role to NODE\n"
    "  replica add|drop [-c CONF] [-w SECONDS] SHARD NODE   give NODE a copy of SHARD, or take it\n"
    "  bench [-c CONF] [-k KEYS] [-s SIZE] [-C CLIENTS]     load the key API of all nodes\n"
    "  reshard split|merge|resume [-c CONF] [SHARD|--all]   split or merge shards\n"
    "\n"
    "CONF defaults to ./shards.conf. 'shardfs COMMAND --help' describes a command.\n";

static const char usage_mount[] =
    "usage: shardfs mount [-c CONF] [-n NODE] [-f] [-w SECONDS] [-o FUSE_OPTS] MOUNTPOINT\n"
    "\n"
    "Mount the store described by CONF (default ./shards.conf) at MOUNTPOINT.\n"
    "  -c CONF    configuration file\n"
    "  -n NODE    which [node] of CONF this process is (needed with several nodes)\n"
    "  -f         stay in the foreground (otherwise return once the mount is ready)\n"
    "  -w SECONDS wait this long (default 10) for another shardfs process that has the\n"
    "             store open to finish, e.g. the daemon of a mount just unmounted;\n"
    "             a store that is still mounted fails at once\n"
    "  -o OPTS    extra FUSE mount options, e.g. allow_other\n"
    "Unmount with: fusermount3 -u MOUNTPOINT (everything is committed on the way out;\n"
    "the daemon may still be closing the store for a moment after that returns).\n";

static const char usage_serve[] =
    "usage: shardfs serve [-c CONF] [-n NODE] [-f] [-w SECONDS]\n"
    "\n"
    "Run node NODE of CONF without mounting: open the shards it owns and serve\n"
    "them to the other nodes over HTTP at the node's url (a secret is needed).\n"
    "Without -f it returns once the server is ready. SIGTERM stops it cleanly.\n"
    "-w SECONDS: as for mount.\n";

static const char usage_fsck[] =
    "usage: shardfs fsck [-c CONF] [-n NODE] [-w SECONDS] [--repair]\n"
    "       shardfs fsck --replicas [-c CONF] [--wait MS]\n"
    "\n"
    "Check every shard of an unmounted store: dangling entries, orphan inodes and\n"
    "chunks, link counts, misplaced records and half-done multi-shard operations.\n"
    "Exits 0 when the store is clean, 1 when problems were found (with --repair:\n"
    "when some could not be fixed), 2 on errors. In a cluster, run it for each\n"
    "node (-n) while the other nodes are running: it reaches their shards over HTTP.\n"
    "If another shardfs process has the store open, fsck waits up to -w SECONDS\n"
    "(default 10) for it to finish; a store that is still mounted fails at once.\n"
    "--replicas compares, on the running cluster, every replica of every shard\n"
    "with its primary at one position (shardfs fsck --replicas --help).\n";

static const char usage_where[] =
    "usage: shardfs where [-c CONF] [-n NODE] [-w SECONDS] PATH\n"
    "\n"
    "Print which shard holds the directory entry, the inode and the data of PATH\n"
    "(a path inside the store, e.g. /dir/file). This node's store must not be\n"
    "mounted; in a cluster the other nodes must be running (mounted or serving).\n"
    "-w SECONDS: as for fsck.\n";

static const char usage_reshard[] =
    "usage: shardfs reshard split [-c CONF] [-n NODE] [-w SECONDS] SHARD|--all [--to NODE]\n"
    "       shardfs reshard merge [-c CONF] [-n NODE] [-w SECONDS] SHARD\n"
    "       shardfs reshard resume [-c CONF] [-n NODE] [-w SECONDS]\n"
    "\n"
    "split: shard S of depth D becomes S and S + 2^D, both of depth D + 1; only the\n"
    "records of S whose placement hash has bit D set move. --all splits every shard.\n"
    "merge: S and its buddy S ^ 2^(D-1) (same depth D) become the lower of the two,\n"
    "at depth D - 1. resume: finish a split or merge that was killed (every reshard\n"
    "command does that first; a mount refuses a store with one in flight).\n"
    "Unmounted, the command takes the store's lock (-w SECONDS: as for fsck);\n"
    "mounted, the daemon makes the change while the store is in use\n"
    "(DATA_DIR/CONTROL). In a cluster without etcd, run it on the node that owns\n"
    "the shard (-n NODE; --all: that node's shards): the new shard stays on that\n"
    "node, and the other nodes learn the layout from it. With etcd (replicas or\n"
    "not), run it on the shard's primary, mounted (-n NODE; --all: the shards it\n"
    "leads; merge: it must lead both buddies): the new shard gets the shard's\n"
    "copies, and every node takes the layout from the shard map. --to NODE then\n"
    "makes NODE the new shard's primary (a replica add, a promote and a replica\n"
    "drop of the old primary's copy, as `shardfs replica` and `promote` do).\n"
    "Progress goes to stderr; the layout after the change to stdout, one line per\n"
    "shard: \"shard S depth D\". Exits 0 on success, 1 on a refused change (no such\n"
    "shard, a buddy split further), 2 on errors.\n";

enum { OPT_REPAIR = 256, OPT_HELP };

static const struct option long_opts[] = {
    {"conf", required_argument, NULL, 'c'},    {"node", required_argument, NULL, 'n'},
    {"repair", no_argument, NULL, OPT_REPAIR}, {"help", no_argument, NULL, 'h'},
    {"wait", required_argument, NULL, 'w'},    {NULL, 0, NULL, 0},
};

struct cli {
    const char *conf, *node, *fuse_opts;
    int foreground, repair;
    unsigned wait_ms; /* for the store's lock (store_lock.h) */
    const char *arg;
};

#define WAIT_MAX_S 86400

/* -w SECONDS: a whole number of seconds up to a day. */
static int parse_wait(const char *s, unsigned *ms)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v > WAIT_MAX_S) {
        fprintf(stderr, "shardfs: -w: '%s' is not a number of seconds (0 to %d)\n", s, WAIT_MAX_S);
        return -1;
    }
    *ms = (unsigned)v * 1000u;
    return 0;
}

/* Parse options common to all commands; returns -1 after printing usage on
 * bad input, 1 for --help, 0 otherwise. */
static int parse_cli(int argc, char **argv, const char *optstr, const char *usage, struct cli *c)
{
    int opt;

    memset(c, 0, sizeof(*c));
    c->conf = "shards.conf";
    c->wait_ms = STORE_LOCK_WAIT_MS;
    optind = 1;
    while ((opt = getopt_long(argc, argv, optstr, long_opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            c->conf = optarg;
            break;
        case 'n':
            c->node = optarg;
            break;
        case 'f':
            c->foreground = 1;
            break;
        case 'o':
            c->fuse_opts = optarg;
            break;
        case OPT_REPAIR:
            c->repair = 1;
            break;
        case 'w':
            if (parse_wait(optarg, &c->wait_ms) != 0) {
                fputs(usage, stderr);
                return -1;
            }
            break;
        case 'h':
            fputs(usage, stdout);
            return 1;
        default:
            fputs(usage, stderr);
            return -1;
        }
    }
    if (optind < argc)
        c->arg = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "shardfs: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    return 0;
}

/* Load CONF and pick this node; prints the reason and returns -1 on error. */
static int load_config(const struct cli *c)
{
    char err[ERR_MAX];
    int node;

    if (config_load(c->conf, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    node = config_pick_node(&cfg, c->node, err, sizeof(err));
    if (node < 0 || config_check_data_dir(&cfg, node, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    if (store_layout_apply(&cfg, node, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    return node;
}

/* With etcd the shard map holds the layout (splits and merges change it
 * there): cfg takes it before a serving open, so the namespace opens the
 * shards the map places. A shard a split made gets its base shard's
 * copies in cfg, as the split gave them; the map's word on them is the
 * truth after that (failover.h). 0, or -1 with a reason in err. */
static int map_layout_load(char *err, size_t errlen)
{
    struct shard_map *m = NULL;
    uint8_t depth[CONFIG_MAX_SHARDS];
    unsigned slots;
    int rc;

    if (!cfg.etcd[0])
        return 0;
    rc = shard_map_open(&cfg, -1, &m, err, errlen);
    if (rc == 0 && shard_map_layout(m, depth, &slots) != 0) {
        snprintf(err, errlen, "the shard map in etcd holds no layout (a shard is missing)");
        rc = -EIO;
    }
    shard_map_close(m);
    if (rc)
        return -1;
    cfg.shard_count = slots;
    memcpy(cfg.depth, depth, slots);
    for (cfg.shard_bits = 0; (1u << cfg.shard_bits) < slots; cfg.shard_bits++)
        ;
    for (unsigned i = cfg.file_shards; i < slots; i++) {
        unsigned base = i & (cfg.file_shards - 1);

        cfg.owner[i] = cfg.owner[base];
        cfg.nreplicas[i] = cfg.nreplicas[base];
        memcpy(cfg.replicas[i], cfg.replicas[base], sizeof(cfg.replicas[i]));
    }
    return 0;
}

/* load_config, and refuse a store with a split or merge in flight. */
static int load_store_config(const struct cli *c)
{
    char err[ERR_MAX];
    int node = load_config(c), r;

    if (node < 0)
        return -1;
    r = reshard_pending(&cfg, node, NULL, 0, err, sizeof(err));
    if (r != 0) {
        if (r > 0)
            fprintf(stderr,
                    "shardfs: %s: a split or merge of its shards was interrupted; finish it "
                    "with `shardfs reshard resume -c %s` first\n",
                    cfg.nodes[node].data_dir, c->conf);
        else
            fprintf(stderr, "shardfs: %s\n", err);
        return -1;
    }
    return node;
}

/* ---- the store's lock ---- */

static void say_waiting(void *ctx, const char *why)
{
    (void)ctx;
    fprintf(stderr, "shardfs: %s\n", why);
}

/* How this command waits for the store's lock, and what it records there;
 * mountpoint is absolute or NULL. */
static struct store_lock_opts lock_opts(const struct cli *c, const char *what,
                                        const char *mountpoint)
{
    struct store_lock_opts o = {
        .wait_ms = c->wait_ms, .what = what, .mountpoint = mountpoint, .waiting = say_waiting};
    return o;
}

/* ---- mount ---- */

static char mount_abs[PATH_MAX]; /* the mountpoint, absolute, for the store's lock */

/* Tell the waiting parent how it went: "" for ready, else the message. */
static void report_ready(int fd, const char *msg)
{
    if (fd < 0) {
        if (msg[0])
            fprintf(stderr, "shardfs: %s\n", msg);
        return;
    }
    size_t len = strlen(msg);
    if (write(fd, msg, len + 1) < 0) {
        /* the parent is gone; nothing to tell */
    }
    close(fd);
}

static int build_fuse_args(struct fuse_args *args, const char *extra)
{
    if (fuse_opt_add_arg(args, "shardfs") || fuse_opt_add_arg(args, "-o") ||
        fuse_opt_add_arg(args, "fsname=shardfs,subtype=shardfs,default_permissions"))
        return -1;
    if (extra && (fuse_opt_add_arg(args, "-o") || fuse_opt_add_arg(args, extra)))
        return -1;
    return 0;
}

static void detach_stdio(void)
{
    int fd = open("/dev/null", O_RDWR);
    if (fd < 0)
        return;
    dup2(fd, STDIN_FILENO);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    if (fd > STDERR_FILENO)
        close(fd);
}

/* This node's HTTP server: its shards for the peers and the key API; with
 * replicas in the cluster, the replication of its shards (replication.h). */
struct server {
    struct node_server *srv;
    struct kv_api *api;
    struct replication *rep; /* closed after ns_close(): see replication.h */
};

static int server_wanted(int node)
{
    return cfg.nodes[node].url[0] && cfg.secret[0];
}

/* The handler of every path the node server does not own. */
static int server_handle(void *ctx, const struct node_request *req, struct node_response *resp)
{
    struct server *sv = ctx;

    if (replication_route(sv->rep, req, resp) == 0)
        return 0;
    return kv_api_handle(sv->api, req, resp);
}

/* Start the server if this node has a url and the cluster a secret (else
 * leave sv empty), with replication when the cluster has replicas: the
 * map and the primaries' wrappers first (the server routes by the map),
 * the replica-sync thread last. fs (may be NULL) says which inodes the
 * mount has open. Returns 0 or -1 with a reason in err. */
/* ns_node_alive_fn over the shard map: with etcd, a node whose lease ended
 * has nothing open any more (the open registry, namespace.h). */
static int node_alive(void *ctx, const char *name)
{
    int i = config_node_index(&cfg, name);

    return i < 0 ? 0 : shard_map_node_alive(ctx, i);
}

/* ns_leads_fn over the shard map: the reaper looks after the shards this
 * node is the primary of now. */
static int node_leads(void *ctx, unsigned shard)
{
    return shard_map_is_primary(ctx, shard);
}

static int server_start(struct ns *ns, int node, struct fs *fs, struct server *sv, char *err,
                        size_t errlen)
{
    struct shard *local[CONFIG_MAX_SHARDS];

    memset(sv, 0, sizeof(*sv));
    if (!server_wanted(node)) {
        if (!replication_wanted(&cfg))
            return 0;
        snprintf(err, errlen, "node %.64s: replicas need a [cluster] secret and a url",
                 cfg.nodes[node].name);
        return -1;
    }
    if (replication_wanted(&cfg) &&
        replication_open(&cfg, node, ns, &sv->rep, err, errlen) != 0)
        return -1;
    for (unsigned i = 0; i < cfg.shard_count; i++)
        local[i] = ns_shard_is_local(ns, i) ? ns_shard(ns, i) : NULL;
    sv->api = kv_api_new(ns, cfg.cache_timeout, fs ? fs_is_open : NULL, fs);
    if (!sv->api) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (node_server_start_repl(&cfg, node, local, replication_server(sv->rep), server_handle, sv,
                               &sv->srv, err, errlen) != 0)
        return -1;
    if (replication_server(sv->rep) && replication_server(sv->rep)->map) {
        ns_set_node_alive(ns, node_alive, replication_server(sv->rep)->map);
        ns_set_leads(ns, node_leads, replication_server(sv->rep)->map);
    }
    return sv->rep && replication_sync_start(sv->rep, err, errlen) != 0 ? -1 : 0;
}

/* Everything but the replication's map, which the shards' wrappers use
 * until ns_close(): replication_close(sv->rep) after that. The last writes
 * (ns_reaper_stop's among them) first: the replicas pull them from sv. */
#define SERVER_DRAIN_MS 2000
static void server_stop(struct server *sv)
{
    replication_drain(sv->rep, SERVER_DRAIN_MS);
    replication_sync_stop(sv->rep); /* nothing more is pulled into the replicas */
    node_server_stop(sv->srv);      /* waits for requests in progress */
    kv_api_free(sv->api);
    sv->srv = NULL;
    sv->api = NULL;
}

/* Open, mount, serve until unmounted. ready_fd < 0 in the foreground. */
static int serve_mount(int node, const struct cli *c, int ready_fd)
{
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    struct fuse_session *se = NULL;
    struct ns *ns = NULL;
    struct fs *fs = NULL;
    struct server sv = {0};
    struct control *ctl = NULL;
    char err[ERR_MAX] = "";
    int rc = 1, mounted = 0, handlers = 0;
    struct store_lock_opts lock = lock_opts(c, "mount", mount_abs[0] ? mount_abs : NULL);

    if (map_layout_load(err, sizeof(err)) != 0 ||
        ns_open(&cfg, node, 0, &lock, &ns, err, sizeof(err)) != 0)
        goto out;
    fsck_after_unclean_stop(ns, stderr); /* a failure is said, and served as is */
    /* Other writers exist when other nodes do, or the key API. */
    fs = fs_new(ns, cfg.cache_timeout, cfg.node_count > 1 || server_wanted(node));
    if (!fs || build_fuse_args(&args, c->fuse_opts) != 0) {
        snprintf(err, sizeof(err), "out of memory");
        goto out;
    }
    if (server_start(ns, node, fs, &sv, err, sizeof(err)) != 0)
        goto out;
    se = fuse_session_new(&args, &fs_fuse_ops, sizeof(fs_fuse_ops), fs);
    if (!se) {
        snprintf(err, sizeof(err), "bad FUSE options '%s'", c->fuse_opts ? c->fuse_opts : "");
        goto out;
    }
    if (fs_start(fs, se) != 0 || ns_reaper_start(ns, fs_is_open, fs) != 0) {
        snprintf(err, sizeof(err), "cannot start a thread");
        goto out;
    }
    if (fuse_set_signal_handlers(se) != 0) {
        snprintf(err, sizeof(err), "cannot set signal handlers");
        goto out;
    }
    handlers = 1;
    if (fuse_session_mount(se, c->arg) != 0) {
        snprintf(err, sizeof(err), "cannot mount on %s", c->arg);
        goto out;
    }
    mounted = 1;
    /* `shardfs reshard` of a mounted store asks this daemon (control.h). */
    if ((store_layout_static(&cfg) || replication_failover(sv.rep)) &&
        control_start(ns, sv.srv, replication_failover(sv.rep), &cfg, node, &ctl) != 0)
        fprintf(stderr, "shardfs: %s/CONTROL: cannot listen: online resharding is off\n",
                cfg.nodes[node].data_dir);
    report_ready(ready_fd, "");
    ready_fd = -1;
    if (!c->foreground) {
        detach_stdio();
        if (chdir("/") != 0) {
            /* harmless: we use no relative paths from here on */
        }
    }
    struct fuse_loop_config *lc = fuse_loop_cfg_create();
    if (lc) {
        fuse_loop_cfg_set_max_threads(lc, 16);
        fuse_loop_cfg_set_idle_threads(lc, 8);
    }
    /* Multi-threaded: measured faster than a single thread here even on 2
     * cores (ls -lR 0.56 s vs 1.2 s), and a commit's disk sync on one shard
     * must not stall requests for the others. */
    int lrc = fuse_session_loop_mt(se, lc);
    /* SIGTERM/SIGINT end the loop with the signal as its result: that is an
     * orderly stop, and everything is committed below. So is -ECONNABORTED:
     * an unmount with requests still queued (the releases of files closed
     * just before it) ends them, and a worker reading one at that moment
     * gets ECONNABORTED instead of the ENODEV libfuse takes for an unmount
     * (it says "fuse: reading device: Software caused connection abort"). */
    int orderly = lrc == 0 || lrc == SIGTERM || lrc == SIGINT || lrc == SIGHUP;
    rc = orderly || lrc == -ECONNABORTED ? 0 : 1;
    fuse_loop_cfg_destroy(lc);
out:
    if (mounted)
        fuse_session_unmount(se);
    control_stop(ctl); /* cancels a copy in flight: operations have stopped */
    if (handlers)
        fuse_remove_signal_handlers(se);
    fs_stop(fs); /* answers what it holds: before the session goes */
    if (se)
        fuse_session_destroy(se);
    fuse_opt_free_args(&args);
    ns_reaper_stop(ns); /* nothing replaces files now; it asks fs: before fs_free */
    server_stop(&sv);
    fs_free(fs);
    ns_close(ns); /* commits and syncs every shard */
    replication_close(sv.rep);
    if (ready_fd >= 0)
        report_ready(ready_fd, err[0] ? err : "mount failed");
    else if (err[0])
        fprintf(stderr, "shardfs: %s\n", err);
    return rc;
}

/* The parent's side: wait for the child's report. */
static int wait_ready(int fd)
{
    char msg[ERR_MAX];
    size_t got = 0;
    ssize_t n;

    while (got < sizeof(msg) - 1 && (n = read(fd, msg + got, sizeof(msg) - 1 - got)) > 0) {
        got += (size_t)n;
        if (memchr(msg, 0, got))
            break;
    }
    close(fd);
    msg[got] = 0;
    if (got == 0) {
        fprintf(stderr, "shardfs: the mount process died before the mount was ready\n");
        return 1;
    }
    if (msg[0]) {
        fprintf(stderr, "shardfs: %s\n", msg);
        return 1;
    }
    return 0;
}

/* Run body(node, c, ready_fd) in the foreground (-f, ready_fd -1) or in a
 * forked child in its own session; the parent returns once the child says it
 * is ready, or prints why it is not. */
typedef int (*daemon_body_fn)(int node, const struct cli *c, int ready_fd);

static int run_daemon(daemon_body_fn body, int node, const struct cli *c)
{
    int fds[2];
    pid_t pid;

    if (c->foreground)
        return body(node, c, -1);
    if (pipe2(fds, O_CLOEXEC) != 0) {
        perror("shardfs: pipe");
        return 1;
    }
    pid = fork();
    if (pid < 0) {
        perror("shardfs: fork");
        return 1;
    }
    if (pid > 0) {
        close(fds[1]);
        return wait_ready(fds[0]);
    }
    close(fds[0]);
    setsid();
    return body(node, c, fds[1]);
}

static int cmd_mount(int argc, char **argv)
{
    struct cli c;
    struct stat st;
    int node;

    int r = parse_cli(argc, argv, "+c:n:fw:o:h", usage_mount, &c);
    if (r)
        return r > 0 ? 0 : 2;
    if (!c.arg) {
        fputs(usage_mount, stderr);
        return 2;
    }
    node = load_store_config(&c);
    if (node < 0)
        return 1;
    if (stat(c.arg, &st) != 0) {
        fprintf(stderr, "shardfs: %s: %s\n", c.arg, strerror(errno));
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "shardfs: %s: not a directory\n", c.arg);
        return 1;
    }
    if (!realpath(c.arg, mount_abs))
        mount_abs[0] = 0; /* the lock then names no mountpoint */
    return run_daemon(serve_mount, node, &c);
}

/* ---- serve ---- */

static int serve_node(int node, const struct cli *c, int ready_fd)
{
    struct ns *ns = NULL;
    struct server sv = {0};
    char err[ERR_MAX] = "";
    struct store_lock_opts lock = lock_opts(c, "serve", NULL);
    sigset_t stop;
    int sig = 0;

    /* Block the stop signals before any thread starts, then wait for one. */
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    if (map_layout_load(err, sizeof(err)) != 0 ||
        ns_open(&cfg, node, 0, &lock, &ns, err, sizeof(err)) != 0)
        goto out;
    fsck_after_unclean_stop(ns, stderr); /* a failure is said, and served as is */
    if (!server_wanted(node)) {
        snprintf(err, sizeof(err), "serve needs a [cluster] secret and a url for node %.64s",
                 cfg.nodes[node].name);
        goto out;
    }
    if (server_start(ns, node, NULL, &sv, err, sizeof(err)) != 0)
        goto out;
    if (ns_reaper_start(ns, NULL, NULL) != 0) {
        snprintf(err, sizeof(err), "cannot start a thread");
        goto out;
    }
    report_ready(ready_fd, "");
    if (ready_fd >= 0) {
        detach_stdio(); /* in the background from here on */
        if (chdir("/") != 0) {
            /* harmless: paths are absolute by now */
        }
    }
    ready_fd = -1;
    if (sigwait(&stop, &sig) != 0)
        sig = 0;
out:
    ns_reaper_stop(ns);
    server_stop(&sv);
    ns_close(ns);
    replication_close(sv.rep);
    if (ready_fd >= 0)
        report_ready(ready_fd, err[0] ? err : "serve failed");
    else if (err[0])
        fprintf(stderr, "shardfs: %s\n", err);
    return err[0] ? 1 : 0;
}

static int cmd_serve(int argc, char **argv)
{
    struct cli c;
    int node;

    int r = parse_cli(argc, argv, "+c:n:fw:h", usage_serve, &c);
    if (r)
        return r > 0 ? 0 : 2;
    if (c.arg) {
        fputs(usage_serve, stderr);
        return 2;
    }
    node = load_store_config(&c);
    if (node < 0)
        return 1;
    return run_daemon(serve_node, node, &c);
}

/* ---- offline commands ---- */

/* Load CONF and open the store without recovery, for fsck and where (which
 * must see crash leftovers as they are); what names the command. Like a
 * mount, they wait for a process that is finishing with the store (a daemon
 * just unmounted), so a script may unmount and check at once. Returns 0, or
 * the exit code. */
static int open_offline(const struct cli *c, const char *what, struct ns **ns)
{
    char err[ERR_MAX];
    struct store_lock_opts lock = lock_opts(c, what, NULL);
    int node = load_store_config(c);

    if (node < 0)
        return 2;
    /* with etcd, the layout splits and merges made (the map's), when it
     * can be read: a check of one node's data needs none */
    if (map_layout_load(err, sizeof(err)) != 0)
        fprintf(stderr, "shardfs: %s; using the layout of %s (%u shards)\n", err, cfg.path,
                cfg.shard_count);
    if (ns_open(&cfg, node, NS_OPEN_NO_RECOVER, &lock, ns, err, sizeof(err)) != 0) {
        fprintf(stderr, "shardfs: %s\n", err);
        return 2;
    }
    return 0;
}

/* ---- fsck ---- */

static int cmd_fsck(int argc, char **argv)
{
    struct cli c;
    struct ns *ns = NULL;
    int found;

    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--replicas")) /* the running copies, not one store */
            return cmd_fsck_replicas(argc, argv);
    int r = parse_cli(argc, argv, "+c:n:w:h", usage_fsck, &c);
    if (r)
        return r > 0 ? 0 : 2;
    if (c.arg) {
        fputs(usage_fsck, stderr);
        return 2;
    }
    r = open_offline(&c, "fsck", &ns);
    if (r)
        return r;
    found = fsck_run(ns, c.repair, stdout);
    if (found > 0 && c.repair) {
        /* Everything found was repaired if a second pass is clean. */
        found = fsck_run(ns, 0, stdout);
    }
    ns_close(ns);
    if (found < 0) {
        fprintf(stderr, "shardfs: fsck: %s\n", strerror(-found));
        return 2;
    }
    return found ? 1 : 0;
}

/* ---- where ---- */

static void print_id(const char *what, const struct ino_id *id)
{
    printf("%s ", what);
    for (int i = 0; i < RECORD_ID_LEN; i++)
        printf("%02x", id->b[i]);
}

static int cmd_where(int argc, char **argv)
{
    struct cli c;
    struct ns *ns = NULL;
    struct ino_id dir = record_root_id;
    struct inode ino;
    char *path, *save = NULL, *name, *last = NULL;
    int rc = 0;

    int r = parse_cli(argc, argv, "+c:n:w:h", usage_where, &c);
    if (r)
        return r > 0 ? 0 : 2;
    if (!c.arg) {
        fputs(usage_where, stderr);
        return 2;
    }
    r = open_offline(&c, "where", &ns);
    if (r)
        return r;
    path = strdup(c.arg);
    rc = path ? ns_getattr(ns, &dir, &ino) : -ENOMEM;
    for (name = path ? strtok_r(path, "/", &save) : NULL; rc == 0 && name;
         name = strtok_r(NULL, "/", &save)) {
        dir = ino.id;
        last = name;
        rc = ns_lookup(ns, &dir, name, strlen(name), &ino);
    }
    if (rc) {
        fprintf(stderr, "shardfs: where %s: %s\n", c.arg, strerror(-rc));
        goto out;
    }
    printf("path %s\n", c.arg);
    if (last) {
        printf("entry shard %u ", ns_entry_shard(ns, &dir, last, strlen(last)));
        print_id("dir", &dir);
        printf(" name %s\n", last);
    } else {
        printf("entry none (the root has no entry)\n");
    }
    printf("inode shard %u ", ns_inode_shard(ns, &ino.id));
    print_id("id", &ino.id);
    printf(" ino %llu\n", (unsigned long long)record_id_ino(&ino.id));
    if (S_ISREG(ino.mode) && ino.size > RECORD_INLINE_MAX)
        printf("data shard %u chunks %llu of %u bytes\n", ns_inode_shard(ns, &ino.id),
               (unsigned long long)((ino.size + RECORD_CHUNK - 1) / RECORD_CHUNK), RECORD_CHUNK);
    else
        printf("data shard %u inline %llu bytes\n", ns_inode_shard(ns, &ino.id),
               (unsigned long long)ino.size);
out:
    free(path);
    ns_close(ns);
    return rc ? 1 : 0;
}

/* ---- reshard ---- */

static void reshard_progress(void *ctx, const struct reshard_stats *st)
{
    static char last_phase[16];
    int tty = *(int *)ctx;
    double mb = (double)st->bytes / 1e6, rate = st->seconds > 0 ? mb / st->seconds : 0;

    if (!tty && !strcmp(st->phase, last_phase))
        return; /* a log gets a line a phase */
    snprintf(last_phase, sizeof(last_phase), "%s", st->phase);
    if (!strcmp(st->phase, "copy") && st->estimate && rate > 0) {
        double left = ((double)st->estimate / 1e6 - mb) / rate;
        fprintf(stderr, "%scopy: %llu records, %.1f MB, %.1f MB/s, about %.0f s left%s",
                tty ? "\r" : "", (unsigned long long)st->records, mb, rate, left > 0 ? left : 0,
                tty ? "   " : "\n");
    } else {
        fprintf(stderr, "%s%s: %llu records copied (%.1f MB), %llu purged, %.1f s%s",
                tty ? "\r" : "", st->phase, (unsigned long long)st->records, mb,
                (unsigned long long)st->purged, st->seconds, tty ? "   " : "\n");
    }
    if (tty && !strcmp(st->phase, "done"))
        fputc('\n', stderr);
}

static void print_layout(void)
{
    for (unsigned i = 0; i < cfg.shard_count; i++)
        if (placement_is_shard(cfg.depth, i))
            printf("shard %u depth %u\n", i, cfg.depth[i]);
}

static void print_done(const char *what, const struct reshard_opts *o)
{
    const struct reshard_stats *st = &o->done;

    printf("%s: shards %u and %u at depth %u: %llu records (%llu bytes) copied, %llu "
           "purged, in %.2f s\n",
           what, o->shard_a, o->shard_b, o->depth, (unsigned long long)st->records,
           (unsigned long long)st->bytes, (unsigned long long)st->purged, st->seconds);
}

/* Parse a shard number; -1 if it is not one. */
static long parse_shard(const char *s)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    return errno || end == s || *end || v < 0 || v >= CONFIG_MAX_SHARDS ? -1 : v;
}

/* 1 if shard i (of the layout) is node's: in a cluster each node changes
 * its own shards, and a split keeps the new one beside the old. */
static int own_shard(int node, unsigned i)
{
    return config_shard_owner(&cfg, i) == node;
}

/* The shards the map makes node the primary of, in *list. 0 or -errno. */
static int map_led_shards(int node, unsigned *list, unsigned *n, char *err, size_t errlen)
{
    struct shard_map *m = NULL;
    int rc = shard_map_open(&cfg, -1, &m, err, errlen);

    *n = 0;
    for (unsigned i = 0; rc == 0 && i < CONFIG_MAX_SHARDS; i++) {
        struct shard_copies c;

        if (shard_map_get(m, i, &c) == 0 && !c.building && c.primary == node)
            list[(*n)++] = i;
    }
    shard_map_close(m);
    return rc;
}

/* The change of cmd_reshard through the daemon of the mounted store; prints
 * the same as offline (and the pause). 0 or -errno, the message in err. */
static int reshard_mounted(int node, const char *sub, int all, unsigned shard,
                           struct reshard_opts *o, char *err, size_t errlen)
{
    unsigned list[CONFIG_MAX_SHARDS], n = 0;
    char line[64];
    int r = 0;

    if (all && cfg.etcd[0]) {
        r = map_led_shards(node, list, &n, err, errlen);
        if (r)
            return r;
    } else if (all) {
        for (unsigned i = 0; i < cfg.shard_count; i++)
            if (placement_is_shard(cfg.depth, i) && own_shard(node, i))
                list[n++] = i;
    } else {
        list[n++] = shard;
    }
    for (unsigned k = 0; k < n && r == 0; k++) {
        if (!strcmp(sub, "resume"))
            snprintf(line, sizeof(line), "resume");
        else
            snprintf(line, sizeof(line), "%s %u", sub, list[k]);
        r = control_request(&cfg, node, line, o, err, errlen);
        if (r == 0) {
            print_done(strcmp(sub, "resume") ? sub : "resumed", o);
            printf("%s: %llu writes passed on during the copy; operations waited %.1f ms at "
                   "the cut-over\n",
                   sub, (unsigned long long)o->mirrored, o->pause_ms);
        }
        if (r == 0) { /* the layout, as the daemon made it */
            char e2[ERR_MAX];
            if ((cfg.etcd[0] ? map_layout_load(e2, sizeof(e2))
                             : store_layout_apply(&cfg, node, e2, sizeof(e2))) != 0)
                fprintf(stderr, "shardfs: %s\n", e2);
        }
    }
    if (r == 0)
        print_layout();
    return r;
}

/* --to NODE of a split with etcd: NODE becomes shard t's primary, the
 * number of its copies unchanged (shardfs replica add, promote, replica
 * drop of the old primary). 0 or -errno. */
static int move_to(unsigned t, const char *to, char *err, size_t errlen)
{
    struct shard_map *m = NULL;
    struct shard_copies c;
    char shard[16];
    int node = config_node_index(&cfg, to), holds = 0, rc;

    if (node < 0) {
        snprintf(err, errlen, "--to %.64s: %.512s names no such node", to, cfg.path);
        return -EINVAL;
    }
    rc = shard_map_open(&cfg, -1, &m, err, errlen);
    if (rc == 0)
        rc = shard_map_get(m, t, &c);
    shard_map_close(m);
    if (rc) {
        if (!err[0])
            snprintf(err, errlen, "shard %u: %s", t, strerror(-rc));
        return rc;
    }
    if (c.primary == node)
        return 0;
    for (unsigned k = 0; k < c.nreplicas; k++)
        holds |= c.replicas[k] == node;
    snprintf(shard, sizeof(shard), "%u", t);
    fflush(stdout);
    if (!holds) {
        char *add[] = {"replica", "add", "-c", (char *)cfg.path, shard, (char *)to, NULL};

        optind = 0; /* getopt anew (glibc) */
        if (cmd_replica(6, add) != 0)
            goto failed;
    }
    {
        char *promote[] = {"promote", "-c", (char *)cfg.path, shard, (char *)to, NULL};

        optind = 0;
        if (cmd_promote(5, promote) != 0)
            goto failed;
    }
    if (!holds) {
        char *drop[] = {"replica", "drop", "-c", (char *)cfg.path, shard,
                        (char *)cfg.nodes[c.primary].name, NULL};

        optind = 0;
        if (cmd_replica(6, drop) != 0)
            goto failed;
    }
    return 0;
failed:
    snprintf(err, errlen, "shard %u was split, but moving it to %.64s failed (above); it stays "
             "where it is: finish with shardfs replica add/drop and promote", t, to);
    return -EIO;
}

static int cmd_reshard(int argc, char **argv)
{
    char err[ERR_MAX];
    struct cli c;
    int tty = isatty(STDERR_FILENO), all = 0, node, r;
    struct reshard_opts o = {.progress = reshard_progress, .ctx = &tty};
    const char *sub = argc > 1 ? argv[1] : "";
    const char *to = NULL;
    long shard = -1;

    if (!strcmp(sub, "-h") || !strcmp(sub, "--help")) {
        fputs(usage_reshard, stdout);
        return 0;
    }
    if (strcmp(sub, "split") && strcmp(sub, "merge") && strcmp(sub, "resume")) {
        fputs(usage_reshard, stderr);
        return 2;
    }
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "--all") && !strcmp(sub, "split")) {
            all = 1;
            memmove(argv + i, argv + i + 1, (size_t)(argc - i - 1) * sizeof(*argv));
            argc--;
            break;
        }
    for (int i = 2; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--to") && !strcmp(sub, "split")) {
            to = argv[i + 1];
            memmove(argv + i, argv + i + 2, (size_t)(argc - i - 2) * sizeof(*argv));
            argc -= 2;
            break;
        }
    r = parse_cli(argc - 1, argv + 1, "+c:n:w:h", usage_reshard, &c);
    if (r)
        return r > 0 ? 0 : 2;
    if (!strcmp(sub, "resume") ? c.arg != NULL : (all ? c.arg != NULL : c.arg == NULL)) {
        fputs(usage_reshard, stderr);
        return 2;
    }
    if (c.arg && (shard = parse_shard(c.arg)) < 0) {
        fprintf(stderr, "shardfs: reshard: '%s' is not a shard number\n", c.arg);
        return 2;
    }
    node = load_config(&c);
    if (node < 0)
        return 2;
    o.wait_ms = c.wait_ms;
    if (to && !cfg.etcd[0]) {
        fprintf(stderr, "shardfs: reshard: --to NODE needs the shard map in etcd (shards.conf "
                "has no etcd directive)\n");
        return 2;
    }
    if (cfg.etcd[0]) {
        /* The map holds the layout and the change: the node's daemon
         * makes it (reshard.h), and only a running node can. */
        if (map_layout_load(err, sizeof(err)) != 0) {
            r = -EIO;
            goto fail;
        }
        err[0] = 0;
        if (to && all) {
            fprintf(stderr, "shardfs: reshard: --to moves one new shard: name the shard\n");
            return 2;
        }
        r = reshard_mounted(node, sub, all, (unsigned)shard, &o, err, sizeof(err));
        if (r == 0 && to)
            r = move_to(o.shard_b, to, err, sizeof(err));
        if ((r == -ENOENT || r == -ECONNREFUSED) && !err[0])
            snprintf(err, sizeof(err),
                     "node %s is not mounted: with etcd, a running node changes the layout "
                     "of the shards it leads (mount it, then ask again)",
                     cfg.nodes[node].name);
        if (r == 0)
            return 0;
        if (r == -ENOENT && !strcmp(sub, "resume"))
            r = -EINVAL; /* nothing to resume: exit 1 */
        goto fail;
    }
    /* Every command finishes a change a kill interrupted first. */
    r = reshard_resume(&cfg, node, &o, err, sizeof(err));
    if (r == -EAGAIN && strcmp(sub, "resume")) {
        /* The store is in use: a mount does the change itself. */
        r = reshard_mounted(node, sub, all, (unsigned)shard, &o, err, sizeof(err));
        if (r == -ENOENT || r == -ECONNREFUSED) /* no control socket: the lock's message */
            r = reshard_resume(&cfg, node, &o, err, sizeof(err));
        if (r == 0)
            return 0;
    }
    if (r < 0)
        goto fail;
    if (r == 1) {
        /* The same command again after a kill finishes the change and
         * stops: it must not make it twice. */
        print_done("resumed", &o);
        if (strcmp(sub, "resume"))
            fprintf(stderr, "shardfs: reshard: finished the change that was interrupted; "
                            "%s was not started (run it again if it is still wanted)\n",
                    sub);
        print_layout();
        return 0;
    }
    if (!strcmp(sub, "split") && all) {
        uint8_t depth[CONFIG_MAX_SHARDS];
        unsigned slots = cfg.shard_count;
        memcpy(depth, cfg.depth, slots);
        for (unsigned i = 0; i < slots && r >= 0; i++)
            if (placement_is_shard(depth, i) && own_shard(node, i)) {
                r = reshard_split(&cfg, node, i, &o, err, sizeof(err));
                if (r == 0)
                    print_done("split", &o);
            }
    } else if (!strcmp(sub, "split")) {
        r = reshard_split(&cfg, node, (unsigned)shard, &o, err, sizeof(err));
        if (r == 0)
            print_done("split", &o);
    } else if (!strcmp(sub, "merge")) {
        r = reshard_merge(&cfg, node, (unsigned)shard, &o, err, sizeof(err));
        if (r == 0)
            print_done("merge", &o);
    }
    if (r < 0)
        goto fail;
    print_layout();
    return 0;
fail:
    fprintf(stderr, "shardfs: reshard: %s\n", err[0] ? err : strerror(-r));
    return r == -EINVAL || r == -EBUSY || r == -ERANGE || r == -EOPNOTSUPP ? 1 : 2;
}

int main(int argc, char **argv)
{
    /* Write batches are up to a few MiB; keep glibc from mmap()ing (and
     * page-faulting) a fresh buffer for each of them, but bound what freed
     * memory it keeps: few arenas (not one per FUSE thread), a modest trim
     * threshold. Measured: 16 arenas x 128 MiB retention took RssAnon past
     * 256 MiB in the benchmark. */
    mallopt(M_ARENA_MAX, 2);
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 32 << 20);
    /* The node server checks every key a request names against its layout
     * (wire.h, "Layouts"): only this layer knows how keys are placed. */
    placement_set_key_hash(record_placement);
    if (argc < 2) {
        fputs(usage_main, stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(usage_main, stdout);
        return 0;
    }
    if (!strcmp(argv[1], "mount"))
        return cmd_mount(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve"))
        return cmd_serve(argc - 1, argv + 1);
    if (!strcmp(argv[1], "fsck"))
        return cmd_fsck(argc - 1, argv + 1);
    if (!strcmp(argv[1], "where"))
        return cmd_where(argc - 1, argv + 1);
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } clients[] = {{"get", cmd_get},         {"put", cmd_put},     {"rm", cmd_rm},
                   {"ls", cmd_ls},           {"status", cmd_status}, {"bench", cmd_bench},
                   {"promote", cmd_promote}, {"replica", cmd_replica},
                   {"reshard", cmd_reshard}};
    for (size_t i = 0; i < sizeof(clients) / sizeof(clients[0]); i++)
        if (!strcmp(argv[1], clients[i].name))
            return clients[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "shardfs: unknown command '%s'\n\n%s", argv[1], usage_main);
    return 2;
}
