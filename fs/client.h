/* client.h -- the CLI commands that talk to running nodes over HTTP.
 *
 * get, put, rm and ls wrap the key API (kv_api.h) of one node; status asks
 * every node and every shard how it is; promote asks a shard's primary
 * (POST /v1/promote, replication.h) to hand its role over; replica add/drop
 * changes where a shard's copies live (etcd transactions on the shard map;
 * the nodes follow it, fs/failover.h); bench (bench.c) loads the key API
 * of all nodes. They read the same shards.conf as the nodes (for the URLs
 * and the secret) and sign every request like a node does (wire.h); none of
 * them opens a data directory, so they run beside mounted nodes.
 *
 * Each cmd_* takes argv from the command name on and returns the exit
 * status: 0 done, 1 the operation failed (the reason on stderr), 2 bad usage
 * or configuration.
 */
#ifndef SHARDFS_CLIENT_H
#define SHARDFS_CLIENT_H

#include "config.h"
#include "node_server.h"
#include "shard_remote.h"

int cmd_get(int argc, char **argv);
int cmd_put(int argc, char **argv);
int cmd_rm(int argc, char **argv);
int cmd_ls(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_promote(int argc, char **argv);
/* `shardfs fsck --replicas` (fsck_replicas.c): argv as for fsck. */
int cmd_fsck_replicas(int argc, char **argv);
int cmd_replica(int argc, char **argv);
int cmd_bench(int argc, char **argv);

/* A client's view of the cluster: the config and a remote for node -1. */
struct client {
    struct config cfg;
    struct remote *remote;
    int node; /* the node to talk to (--node), or -1 */
};

/* Load conf, set up the remote and resolve node_arg (a node name or URL of
 * conf; NULL: the first node with a url). Prints why and returns -1 on
 * error. c is large: keep it off small stacks. */
int client_open(struct client *c, const char *conf, const char *node_arg);
void client_close(struct client *c);

/* "/v1/kv" + path, each byte outside [A-Za-z0-9-._~/] percent-encoded, into
 * out. -ENAMETOOLONG if it does not fit (out is then ""); a cap of
 * CLIENT_KV_PATH_SIZE(strlen(path)) always fits. */
#define CLIENT_KV_PATH_SIZE(len) (sizeof(NODE_KV_PREFIX) + 1 + 3 * (size_t)(len))
int client_kv_path(const char *path, char *out, size_t cap);

#endif
