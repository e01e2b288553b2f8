/* shard_remote.h -- shards on other nodes, over HTTP with libcurl.
 *
 * The same shard interface as shard_lmdb.h, implemented by requests to the
 * node that owns the shard (wire.h). One struct remote per process holds
 * what all remote shards share: the config (secret, epoch, timeout), the
 * current owner URL of every shard (updated when a node redirects us), and a
 * pool of keep-alive curl handles (CURLOPT_NOSIGNAL, one in use per thread at
 * a time).
 *
 * Errors: transport failures map to errno in one function: a timeout or a
 * dead node gives -ETIMEDOUT or -EHOSTUNREACH within cfg->timeout_ms, never a
 * hang; HTTP statuses map through wire_errno_of_status(). Idempotent reads
 * (get, scan, stat) are retried with capped exponential backoff within the
 * timeout; apply and sync are never retried (a lost reply cannot be told
 * from a lost request).
 *
 * Threads: every function may be called from any thread.
 */
#ifndef SHARDFS_SHARD_REMOTE_H
#define SHARDFS_SHARD_REMOTE_H

#include "config.h"
#include "shard.h"

struct remote;

/* Set up for node `self` of cfg (self may be -1 for a client that is no
 * node, e.g. the CLI). cfg must outlive the remote. -errno + reason. */
int remote_new(const struct config *cfg, int self, struct remote **out, char *err,
               size_t errlen);
/* Every shard opened from r must be closed first. NULL-safe. */
void remote_free(struct remote *r);

/* A shard interface for shard `index`, reached at its current owner. */
int shard_remote_open(struct remote *r, unsigned index, struct shard **out);

/* The URL currently believed to own shard index (after redirects); valid
 * until remote_free(). */
const char *remote_owner_url(struct remote *r, unsigned index);

/* One authenticated round trip to node `node` (GET /v1/config): 0 and the
 * time in *rtt_ms, or -errno (e.g. -ETIMEDOUT for a dead node). */
int remote_ping(struct remote *r, unsigned node, double *rtt_ms);

#endif
