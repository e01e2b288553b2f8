/* node_server.h -- a node's HTTP server (libmicrohttpd).
 *
 * Serves this node's shards to the other nodes (the /v1/shard routes of
 * wire.h, including 307 redirects for shards it does not own and for older
 * epochs, and 421 EBADSLT for a request of another layout or a key that is
 * not the shard's: wire.h, "Layouts") and /v1/config; every other path goes to the handler the caller
 * registers (the public /v1/kv API lives in fs/, which backend/ must not
 * know). Every request must be signed for this node (wire.h: X-Shardfs-Auth
 * over the method, this node's URL, the target, epoch, date, a nonce and the
 * body's declared digest and length) or gets 401 and changes nothing; the
 * signature is checked from the headers, before any of the body is read, and
 * a nonce accepted once is refused after (nonce_cache.h); the body must then
 * be the one signed (401). Paths under /v1/kv (the public API, for curl
 * users who cannot sign) may instead carry "Authorization: Bearer SECRET",
 * which is not protected from replay. Bodies over WIRE_BODY_MAX get 413;
 * malformed requests 400. The server binds only to the host and port of
 * this node's URL.
 *
 * Everything after the socket is reachable without one: node_server_new()
 * makes a server that does not listen, and node_server_precheck() and
 * node_server_handle() answer a struct node_input, which is all the handlers
 * ever see of a request (the libmicrohttpd callbacks only fill one in and
 * send what comes back). tests/fuzz drives them that way.
 *
 * Threads: libmicrohttpd's event loop on a few I/O threads, which never
 * wait, and a pool of worker threads for what may (node_server.c, DESIGN
 * threads). The handler, its streams and the shards are called from several
 * threads at once (the shard interface allows it). start/stop from one
 * thread.
 *
 * Limits (node_server_start): at most 4096 connections (fewer if the
 * descriptor limit does not allow it; the soft RLIMIT_NOFILE of the process
 * is raised towards its hard limit for them), a quarter of them from one
 * address, 10 s from a request's first byte to its last header, 60 s of
 * silence on a connection.
 */
#ifndef SHARDFS_NODE_SERVER_H
#define SHARDFS_NODE_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "config.h"
#include "shard.h"

struct node_server;

/* Paths under this prefix are the public key API (fs/kv_api.h). */
#define NODE_KV_PREFIX "/v1/kv"

/* One request with its whole body, as node_server_handle() takes it.
 * Everything is borrowed for the call. */
struct node_input {
    const char *method;
    const char *uri;            /* raw "path?query" as received: what was signed */
    const char *path;           /* percent-decoded path, without the query */
    const uint8_t *body;        /* NULL when empty */
    size_t body_len;
    /* The hex SHA-256 of the body if the caller hashed it as it came (or
     * NULL: node_server_handle hashes body itself). */
    const char *body_digest;
    int64_t now;                /* unix seconds, for the X-Shardfs-Date check:
                                 * when the headers came, for both steps */
    /* Header name (case-insensitive), or NULL. */
    const char *(*header)(void *ctx, const char *name);
    /* Query argument name, percent-decoded, or NULL; only for the handler of
     * other paths (node_request_query). May be NULL. The shard routes parse
     * their arguments from uri themselves. */
    const char *(*query)(void *ctx, const char *name);
    void *ctx;
};

struct node_request {
    const char *method;         /* "GET", "PUT", "DELETE", "HEAD", "POST" */
    /* Percent-decoded from the raw uri (what was signed), without the query;
     * path_len bytes, then a '\0'. A %00 decodes to a NUL inside the path,
     * so a handler MUST use path_len, not strlen, to see every byte. */
    const char *path;
    size_t path_len;
    const uint8_t *body;        /* NULL when empty; borrowed for the call */
    size_t body_len;
    const struct node_input *in; /* opaque: for node_request_query/header */
};

#define NODE_EXTRA_MAX 4

/* A reply body produced piece by piece (a large file): read(ctx, pos, buf,
 * max) returns 1..max bytes at pos, or -errno (the connection is then cut,
 * as the status line has gone out); it runs on a worker thread and may wait.
 * free(ctx) runs once when the reply is done or abandoned; the server calls
 * it even if the reply is never sent. */
struct node_stream {
    ssize_t (*read)(void *ctx, uint64_t pos, void *buf, size_t max);
    void (*free)(void *ctx);
    void *ctx;
    uint64_t len;               /* Content-Length */
};

struct node_response {
    int status;                 /* HTTP status */
    const char *content_type;   /* static string or NULL */
    uint8_t *body;              /* malloc()ed; the server frees it */
    size_t len;
    struct node_stream stream;  /* instead of body when stream.read is set */
    char location[1024];        /* for 3xx, "" otherwise */
    char errno_name[16];        /* X-Shardfs-Errno, "" for none */
    struct {                    /* more headers, e.g. X-Shardfs-Vlen; "" ends */
        char name[32];
        char value[64];
    } extra[NODE_EXTRA_MAX];
};

/* Add a header to resp (silently dropped past NODE_EXTRA_MAX). */
void node_response_header(struct node_response *resp, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Make resp an error reply for -errno rc (its status by wire.h) with a
 * one-line text body: the reason a handler gives its client. */
void node_response_error(struct node_response *resp, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Make resp a 200 reply with doc as compact JSON; takes doc (may be NULL:
 * out of memory, which becomes the reply). */
struct json_t;
void node_response_json(struct node_response *resp, struct json_t *doc);

/* Handle a request for a path the server does not own. Fill resp; return 0.
 * MUST NOT keep req or its body after returning. A GET or HEAD is first
 * called on an I/O thread in the shards' no-waiting mode (shard.h): it MUST
 * then wait for nothing but shard slots (which refuse instead) and must not
 * change anything; if a slot refused, its reply is thrown away and it is
 * called again on a worker thread, where it may wait. Other methods are
 * called on a worker thread only. */
typedef int (*node_handler_fn)(void *ctx, const struct node_request *req,
                               struct node_response *resp);

/* A query argument or request header of req, or NULL. Borrowed. */
const char *node_request_query(const struct node_request *req, const char *name);
const char *node_request_header(const struct node_request *req, const char *name);

/* Start serving node `self` of cfg. shards[i] is this node's shard i, or
 * NULL where another node owns it (requests for it are redirected). other
 * may be NULL (404 for every other path). Returns 0 or -errno with a reason
 * in err (e.g. the port is taken). */
int node_server_start(const struct config *cfg, int self, struct shard *const *shards,
                      node_handler_fn other, void *other_ctx, struct node_server **out,
                      char *err, size_t errlen);
/* Replication (issue 10): the stream and position routes of wire.h and
 * routing by the live shard map. */
struct shard_map;
struct stream_pos;
struct node_server_repl {
    /* The live map (shard_map.h), borrowed; it must outlive the server.
     * With it, a shard op is served only when the map names this node the
     * shard's primary; otherwise it gets 307 to the map's primary (also
     * when this node holds a replica of it), or 503 while it has none. */
    struct shard_map *map;
    /* cfg.shard_count entries, borrowed: the local LMDB shard (shard_lmdb)
     * of every shard this node holds a copy of, primary or replica, else
     * NULL. The server owns their on_apply listener (shard_lmdb_on_apply):
     * set at start, removed at stop. For a primary with replicas, shards[n]
     * (above) is its shard_repl wrapper and local[n] its inner shard. */
    struct shard *const *local;
    /* Pushes to this node's replicas (POST /v1/shard/N/push, wire.h): the
     * handler (replica_sync_push's contract, replica_sync.h; from is the
     * sender's node index, authenticated). NULL: every push gets 409
     * EAGAIN, and the primaries wait for the pulls. */
    int (*push)(void *ctx, unsigned shard, int from, uint64_t epoch,
                const struct stream_pos *after, const uint8_t *body, size_t len,
                struct stream_pos *pos, uint64_t *synced);
    void *push_ctx;
    /* Called (may be NULL) at the end of node_server_new_repl(), before
     * anything is served: a failover (fs/failover.h) keeps the server to
     * change its shards with node_server_set_shard(). */
    void (*started)(void *ctx, struct node_server *s);
    void *started_ctx;
};

/* Serve sh as shard n from now on (a promotion made this node the shard's
 * primary: its new shard_repl wrapper), or nothing (NULL: a demotion; the
 * map names another primary, to which requests are redirected). sh is
 * borrowed and must stay valid until the server stops: a request in
 * flight may still use the shard it replaced. Any thread. */
void node_server_set_shard(struct node_server *s, unsigned n, struct shard *sh);

/* A change of the layout (a split or merge of this node's shards, wire.h
 * "Layouts"): node_server_quiesce() waits for the data ops in flight (get,
 * getv, scan, apply) and holds new ones until node_server_unquiesce(); in
 * between, node_server_set_layout() (the depth of each of slots, a layout
 * of placement.h: -EINVAL otherwise) and
 * node_server_set_shard() make the change one step for every request. A
 * shard split off another is served where the other is (without a shard
 * map: the owner of its base shard). Any thread but a request's. */
void node_server_quiesce(struct node_server *s);
void node_server_unquiesce(struct node_server *s);
int node_server_set_layout(struct node_server *s, const uint8_t *depth, unsigned slots);

/* This node's LMDB copy of shard n is lmdb from now on (`shardfs replica
 * add` gave it one at runtime), or none (NULL: `replica drop`; the caller
 * closes the old copy once this returned: no position request uses it
 * any more). Moves the on_apply listener. Any thread. */
void node_server_set_local(struct node_server *s, unsigned n, struct shard *lmdb);

/* node_server_start() with replication: repl as above (NULL: as
 * node_server_start). A stream request is answered from local[n] when
 * shards[n] is a shard_repl (shard_repl.h), whose replicas report through
 * it; a long poll holds no thread while it waits. */
int node_server_start_repl(const struct config *cfg, int self, struct shard *const *shards,
                           const struct node_server_repl *repl, node_handler_fn other,
                           void *other_ctx, struct node_server **out, char *err, size_t errlen);
/* node_server_new() with replication (no socket: a stream request that
 * finds nothing answers 204 at once, it cannot wait). */
int node_server_new_repl(const struct config *cfg, int self, struct shard *const *shards,
                         const struct node_server_repl *repl, node_handler_fn other,
                         void *other_ctx, struct node_server **out, char *err, size_t errlen);

/* Stop and free; waits for requests in progress. NULL-safe; also frees a
 * server from node_server_new(). */
void node_server_stop(struct node_server *s);

/* The server of node_server_start() without the socket: nothing listens,
 * requests come only through node_server_precheck/handle. Same arguments
 * and errors, except that the url is not looked at. */
int node_server_new(const struct config *cfg, int self, struct shard *const *shards,
                    node_handler_fn other, void *other_ctx, struct node_server **out,
                    char *err, size_t errlen);
/* Step one of a request, from its headers alone (the body unread; in->body
 * is ignored): returns 1 with the refusal in *r (413 for a Content-Length
 * over WIRE_BODY_MAX; 401 for a request that is neither signed for this
 * node, within the clock window and with a nonce never seen, nor a key API
 * request with the bearer secret; 503 when this node cannot remember more
 * nonces), or 0 with *r cleared: then the request's nonce is remembered,
 * and the body may be read. */
int node_server_precheck(struct node_server *s, const struct node_input *in,
                         struct node_response *r);
/* Answer a request whose body is complete, after node_server_precheck()
 * returned 0 for it (that is where a replay is caught; call this alone and
 * nothing is): authentication again (not the nonce), the body against the
 * signed digest and length (401 if it is another), then routing, epochs and
 * the shard op or the handler. Fills *r from scratch (whatever it held is
 * overwritten, not freed); the caller frees r->body. Never fails: every
 * error is a status in *r. Thread-safe like the handler and the shards.
 * The server calls it for reads and small applies first in the shards'
 * no-waiting mode (shard.h); if a slot refused, the reply is dropped and it
 * is called again, on a worker: so it may run twice for one request, which
 * is why it takes no nonce. */
void node_server_handle(struct node_server *s, const struct node_input *in,
                        struct node_response *r);

#endif
