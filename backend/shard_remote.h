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
 * hang; HTTP statuses map through wire_errno_of_status(). A node that could
 * not be connected to (refused, unreachable, connect timeout) is remembered
 * as down: its requests then give -EHOSTUNREACH at once, without retries,
 * until one of them (every request after a refusal, one each 500 ms after a
 * connect timeout; remote_ping always) gets an HTTP answer. Idempotent reads
 * (get, scan, stat) are retried with capped exponential backoff within the
 * timeout; apply and sync are never retried (a lost reply cannot be told
 * from a lost request).
 *
 * Threads: every function may be called from any thread.
 */
#ifndef SHARDFS_SHARD_REMOTE_H
#define SHARDFS_SHARD_REMOTE_H

#include <curl/curl.h>
#include <time.h>

#include "config.h"
#include "shard.h"

struct remote;

/* Set up for node `self` of cfg (self may be -1 for a client that is no
 * node, e.g. the CLI). cfg must outlive the remote. -errno + reason. */
int remote_new(const struct config *cfg, int self, struct remote **out, char *err,
               size_t errlen);
/* Every shard opened from r must be closed first. NULL-safe. */
void remote_free(struct remote *r);

/* A shard interface for shard `index` (< CONFIG_MAX_SHARDS), reached at its
 * current owner; a shard past the config's, split off one of them, starts
 * at its base shard's owner (a split makes the new shard beside the old). */
int shard_remote_open(struct remote *r, unsigned index, struct shard **out);

/* Scan [start, end) (shard.h's scan) on several shards, for fan-outs such as
 * a directory listing, which spans every shard. Remote shards get their
 * first page requested all at once (libcurl's multi interface), so the wait
 * is one round trip, not one per shard; a shard whose parallel request
 * failed in any way (a redirect, a timeout, a 503) is scanned again the
 * ordinary way, which follows redirects and retries. Other shards (LMDB)
 * are scanned directly; a failover switch (shard.h, remote_now) that routes
 * to a remote shard now counts as that remote shard. fn runs on the calling thread, shard after shard in
 * the order given, never while a request of this call is in flight. Returns
 * 0 (also when fn stopped it with 1) or the first -errno. */
int shard_scan_many(struct shard *const *shards, unsigned n, const void *start, size_t slen,
                    const void *end, size_t elen, shard_scan_fn fn, void *ctx);
/* The same with a join (shard.h, shard_scan_join): each remote shard's first
 * page, records and joined values, in one round trip, all at once. */
int shard_scan_many_join(struct shard *const *shards, unsigned n, const void *start, size_t slen,
                         const void *end, size_t elen, const struct shard_join *j,
                         shard_join_fn fn, void *ctx);

/* One shard's reads of shard_get_many_fan(): rc is shard_get_many()'s. */
struct shard_reads {
    struct shard *s;
    struct shard_read *r;
    unsigned n;
    int rc; /* out */
};
/* shard_get_many() on several shards, the remote ones all at once (one
 * round trip in all, as shard_scan_many); one whose parallel request failed
 * in any way but a dead node is done again the ordinary way. Each g[i].rc
 * is set; returns 0, or -EWOULDBLOCK in no-waiting mode. */
int shard_get_many_fan(struct shard_reads *g, unsigned n);

/* Our local depth of shard index from now on (a split or merge changed the
 * layout): the data ops send it, and a node whose layout disagrees refuses
 * them with -EBADSLT, nothing done (wire.h, "Layouts"; the caller learns the
 * layout anew and routes again). Starts as cfg's. Any thread. */
void remote_depth_set(struct remote *r, unsigned index, unsigned depth);
/* The depth of shard index that its node gave with the last -EBADSLT (its
 * layout's), or -1: none since remote_depth_set(index). */
int remote_told_depth(struct remote *r, unsigned index);

/* The URL currently believed to own shard index (after redirects); valid
 * until remote_free(). */
const char *remote_owner_url(struct remote *r, unsigned index);

/* The shard map names shard index's owner (failover.h): node, or -1 while
 * the shard has no primary. From the first call on, r follows the map:
 * a request for a shard without an owner, or whose owner is down, waits
 * for the map to name another (up to timeout_ms in all; then
 * -EHOSTUNREACH) instead of failing at once, and a 503 (the node did
 * nothing) is tried again also for apply. Any thread. */
void remote_owner_set(struct remote *r, unsigned index, int node);

/* Push entries of shard's stream to node's replica (wire.h, POST
 * /v1/shard/N/push), as its primary at shard epoch `epoch`: body holds the
 * entries after `after` (stream.h encoding). ctx is a struct remote of
 * this node (self >= 0). One attempt, no redirect, within limit_ms (0:
 * timeout_ms). 0 and the replica's position and synced lsn, or -errno:
 * -EAGAIN (the copy takes no pushes now), -ESTALE (not its history), a
 * transport failure. Matches shard_repl_push_fn (shard_repl.h). */
struct stream_pos;
int remote_push(void *ctx, unsigned shard, int node, uint64_t epoch, const struct stream_pos *after,
                const void *body, size_t len, unsigned limit_ms, struct stream_pos *pos,
                uint64_t *synced);

/* One signed request to node `node` outside the shard routes: the key API
 * (fs/kv_api.h), for the CLI. method is GET, HEAD, PUT or DELETE; body is
 * sent with PUT. A 2xx reply body goes to sink (dropped if sink is NULL;
 * a negative return from sink aborts with that errno). No redirects, no
 * retries; the time bound is timeout_ms to connect and timeout_ms without
 * progress, not the whole transfer (files can be large). Returns 0 for a
 * 2xx, else -errno (the status table of wire.h, or a transport failure);
 * *status gets the HTTP status (0 if none came). */
typedef int (*remote_sink_fn)(void *ctx, const void *data, size_t len);
int remote_api_call(struct remote *r, unsigned node, const char *method, const char *path_query,
                    const void *body, size_t len, remote_sink_fn sink, void *ctx, long *status);

/* Many such calls from one thread, up to `parallel` (1..REMOTE_LOOP_MAX) in
 * flight on one curl multi handle, for a load generator: next(ctx) hands out
 * the next call (NULL: no more), done(ctx, call) gets each one back with rc
 * and status filled, before next is asked again. Each call is one attempt,
 * as remote_api_call makes. The call structs are the caller's and must stay
 * put until done. Returns 0, or -ENOMEM (calls in flight are done with it). */
#define REMOTE_LOOP_MAX 256u
/* The key API's answer to "which shard holds this name's entry" (kv_api.h). */
#define REMOTE_HDR_SHARD "X-Shardfs-Shard"
struct remote_api_req {
    unsigned node;
    const char *method;         /* GET, HEAD, PUT, DELETE */
    const char *path_query;
    const void *body;           /* PUT */
    size_t len;
    remote_sink_fn sink;        /* 2xx body, or NULL to drop it */
    void *sink_ctx;
    int rc;                     /* out: as remote_api_call returns */
    long status;                /* out */
    long shard;                 /* out: the reply's REMOTE_HDR_SHARD, -1 if none */
};
int remote_api_loop(struct remote *r, unsigned parallel,
                    struct remote_api_req *(*next)(void *ctx),
                    void (*done)(void *ctx, struct remote_api_req *call), void *ctx);

/* Whether this process has node `node` marked down (the Errors paragraph
 * above): 1 and the wall-clock time it was marked in *since, 0 if not (up,
 * or never failed), -EINVAL for no such node. A mark stays until a request
 * for the node gets an answer: it says "down when last asked". */
int remote_node_down(struct remote *r, unsigned node, time_t *since);

/* One authenticated round trip to node `node` (GET /v1/config): 0 and the
 * time in *rtt_ms, or -errno (e.g. -ETIMEDOUT for a dead node). */
int remote_ping(struct remote *r, unsigned node, double *rtt_ms);

/* For a module that runs transfers of its own, several at once on a curl
 * multi handle (replica_sync.c): remote_curl_defaults() gives an easy handle
 * what every handle of this module gets (curl_defaults.h, and the cluster's
 * CA for https); remote_sign() makes the headers of one signed request
 * (wire.h) to the node at base (a url of shards.conf, as the request will
 * be sent to it) for method, path_query and the body's bytes, with this
 * process's epoch, the date now and a new nonce, so each attempt needs a
 * call of its own. *out is the caller's (curl_slist_free_all, after the
 * transfer). 0 or -ENOMEM. No redirects, retries or node health: the
 * caller's. */
void remote_curl_defaults(struct remote *r, CURL *h);
/* One header line as curl's CURLOPT_HEADERFUNCTION hands it over: 1 for a
 * status line ("HTTP/..."; a new response begins, *status its code or 0),
 * 2 for "Name: value" (name and value point into p, the value without
 * surrounding blanks or the CRLF), 0 for anything else. */
int remote_header_line(const char *p, size_t len, long *status, const char **name,
                       size_t *nlen, const char **value, size_t *vlen);
int remote_sign(struct remote *r, const char *base, const char *method, const char *path_query,
                const void *body, size_t len, struct curl_slist **out);

#endif
