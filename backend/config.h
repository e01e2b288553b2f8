/* config.h -- shards.conf, the one file every node reads.
 *
 * The file is INI (parsed with inih). Sections and directives, all documented in
 * the top-level shards.conf:
 *
 *   [cluster]   shards = N (power of two), epoch = E (>= 1),
 *               commit_interval_ms, cache_timeout (seconds),
 *               secret (the cluster secret, >= 16 characters; required
 *               with more than one node), timeout_ms (remote requests),
 *               tls_ca = FILE (PEM CA certificates every https:// node's
 *               certificate is checked against; required with one),
 *               ack = primary | replica (default replica), etcd =
 *               URL[,URL...] (http(s)://HOST:PORT each, at most
 *               CONFIG_ETCD_MAX_ENDPOINTS; optional: without it the shard
 *               map is this file), lease_ttl_ms (1000-60000, default 5000),
 *               replica_lag_ms (100-60000, below timeout_ms; default 2000,
 *               or timeout_ms / 2 when that is less), replica_push = yes |
 *               no (default yes: with ack = replica, writers push their
 *               batches to the replicas; no: the replicas' pulls alone)
 *   [node NAME] url = http://HOST:PORT or https://HOST:PORT (HOST a name,
 *               an IPv4 address or [IPv6]; PORT 1-65535; nothing after but
 *               one "/"; no two nodes at the same HOST:PORT), data_dir = DIR
 *               (relative to the conf file's directory), shards = LIST
 *               ("0-3", "0,2,5-7" or "all"), tls_cert = FILE and
 *               tls_key = FILE (PEM; required with, and only with, an
 *               https:// url; read by the node's server at start),
 *               replicas = LIST (the shards this node holds a replica of:
 *               the syntax of shards, or "none", the default)
 *
 * FILE and DIR values are relative to the conf file's directory; tls_ca
 * must be readable at load, the others are read by whoever uses them.
 *
 * Every shard must be owned by exactly one node and may have up to
 * CONFIG_REPLICAS_MAX replicas, none on its owner; a node lists a shard at
 * most once. An unknown section or key, a
 * bad value or a missing directive is an error naming file, line and reason.
 *
 * config_load() fills a caller-owned struct config; nothing to free. Not
 * thread-safe while loading; read-only afterwards.
 */
#ifndef SHARDFS_CONFIG_H
#define SHARDFS_CONFIG_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#define CONFIG_MAX_NODES 64
#define CONFIG_MAX_SHARDS 1024
#define CONFIG_NAME_MAX 63
#define CONFIG_URL_MAX 255
#define CONFIG_REPLICAS_MAX 3
#define CONFIG_ETCD_MAX_ENDPOINTS 16 /* etcd.h's ETCD_MAX_ENDPOINTS */

/* ack: when a write is acknowledged. PRIMARY: once the primary holds it (a
 * failover may lose the last moments); REPLICA: once every in-sync replica
 * holds it as durably as the primary. */
enum { CONFIG_ACK_PRIMARY = 0, CONFIG_ACK_REPLICA = 1 };

struct config_node {
    char name[CONFIG_NAME_MAX + 1];
    char url[CONFIG_URL_MAX + 1];   /* "" when not given */
    char data_dir[PATH_MAX];        /* absolute after config_load() */
    int line;                       /* line of the [node] header */
    int data_dir_line;              /* line of its data_dir, for later errors */
    char tls_cert[PATH_MAX];        /* absolute; "" unless the url is https:// */
    char tls_key[PATH_MAX];
    int tls_cert_line, tls_key_line;
};

struct config {
    char path[PATH_MAX];            /* the file as given */
    unsigned shard_count;           /* power of two */
    int shards_line;                /* line of "shards =", for later errors */
    unsigned shard_bits;            /* log2(shard_count) */
    unsigned file_shards;           /* "shards =" as written: the count the store was made with */
    /* The layout (placement.h): the depth of the shard that owns each of the
     * shard_count slots. config_load() makes it uniform (every depth
     * shard_bits); a single-node store split or merged since has its own in
     * DATA_DIR/STORE, and store_layout_apply() (fs/store_layout.h) puts it
     * here, with shard_count its number of slots. */
    uint8_t depth[CONFIG_MAX_SHARDS];
    uint64_t epoch;
    unsigned commit_interval_ms;    /* batch commit period of a shard, default 200 */
    double cache_timeout;           /* kernel entry/attr timeout in seconds, default 3600 */
    char secret[256];               /* "" when not set */
    unsigned timeout_ms;            /* remote request bound, default 5000 */
    char tls_ca[PATH_MAX];          /* absolute; "" when not given */
    int tls_ca_line;
    unsigned node_count;
    struct config_node nodes[CONFIG_MAX_NODES];
    int owner[CONFIG_MAX_SHARDS];   /* index into nodes[] of each shard's owner */
    unsigned nreplicas[CONFIG_MAX_SHARDS]; /* replicas of each shard, 0-CONFIG_REPLICAS_MAX */
    int replicas[CONFIG_MAX_SHARDS][CONFIG_REPLICAS_MAX]; /* node indexes, config order */
    int ack;                        /* CONFIG_ACK_*, default CONFIG_ACK_REPLICA */
    char etcd[1024];                /* endpoints joined by ",", no spaces; "" when not set */
    unsigned lease_ttl_ms;          /* a node's etcd lease, default 5000 */
    unsigned replica_lag_ms;        /* ack wait before a replica leaves the in-sync set */
    int replica_push;               /* writers push to the replicas (default 1) */
};

/* A node url split: host (an IPv6 address without its brackets), port and
 * whether the scheme is https. */
struct config_url {
    char host[CONFIG_URL_MAX + 1];
    unsigned port;                  /* 1-65535 */
    int tls;                        /* https:// */
};

/* Check url as the config file's url (see above) and split it into *out.
 * 0, or -EINVAL with the reason (without the url) in why. */
int config_url_parse(const char *url, struct config_url *out, char *why, size_t whylen);

/* Parse and validate path into *cfg. On error returns -1 and writes
 * "FILE:LINE: reason" (or "FILE: reason") into err; returns 0 on success. */
int config_load(const char *path, struct config *cfg, char *err, size_t errlen);

/* The node that owns shard (or slot) i of cfg's store: a shard split off
 * another stays beside it (fs/reshard.h), on the owner of its base shard,
 * i modulo the "shards =" count. */
static inline int config_shard_owner(const struct config *cfg, unsigned i)
{
    unsigned base = cfg->file_shards ? cfg->file_shards : cfg->shard_count;

    return cfg->owner[i & (base - 1)];
}

/* Check that node's data_dir can be used: a directory this process may
 * read, write and search, or missing with a writable parent. config_load()
 * does not look at directories (a client needs none). Returns 0, or -1 with
 * "FILE:LINE: data_dir DIR: reason" in err. */
int config_check_data_dir(const struct config *cfg, int node, char *err, size_t errlen);

/* Index of the node called name, or -1. */
int config_node_index(const struct config *cfg, const char *name);

/* The node this process is: the named one, or the only node when name is NULL
 * and there is exactly one. Returns -1 with a message in err otherwise. */
int config_pick_node(const struct config *cfg, const char *name, char *err, size_t errlen);

#endif
