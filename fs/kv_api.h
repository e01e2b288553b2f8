/* kv_api.h -- the public key API: /v1/kv/PATH on every node.
 *
 * A path under /v1/kv names a file or directory of the one namespace, so any
 * node answers for any key (it reaches the shards it does not own over HTTP
 * like the mount does). Served through node_server's handler for other
 * paths, so requests are authenticated there (signed, or a bearer secret).
 *
 *   GET    a file: its bytes (large files stream); a directory: a JSON
 *          listing {"path": P, "entries": [{"name": N, "type": T}, ...]},
 *          sorted by name (a name that is not UTF-8 comes as "name_hex");
 *          a symlink: its target.
 *   HEAD   the headers of GET: Content-Length, X-Shardfs-Type (file, dir,
 *          symlink, fifo, socket, chardev, blockdev), X-Shardfs-Mode
 *          (octal), Last-Modified, and X-Shardfs-Shard: the shard of the
 *          name's directory entry (PUT's reply has it too), where a lookup
 *          of the name goes; a GET sent to that shard's owner needs no
 *          second hop when the file was not renamed since it was made.
 *   PUT    PATH: the body becomes the file PATH, atomically: it is written
 *          under a temporary name in the same directory (".NAME.XXXXXX", the
 *          rsync rule keeps it on NAME's shard) and renamed over NAME, so a
 *          reader sees the old bytes or the new ones. Missing parent
 *          directories are created (0755). A replaced file keeps its mode
 *          and owner. 201 when created, 204 when replaced.
 *          PATH/ (trailing slash): create the directory; 201, or 204 if it
 *          already is one.
 *   DELETE a file or symlink is unlinked, a directory removed (409
 *          ENOTEMPTY if it is not empty); 204.
 *
 * Also GET /v1/nodes: {"down": {NAME: UNIX_SECONDS, ...}}, the nodes this
 * node's process has marked down and since when (ns_nodes_down), which
 * `shardfs status` shows.
 *
 * Errors come back as node_server maps -errno: 404 ENOENT, 409 EEXIST /
 * ENOTDIR / EISDIR / ENOTEMPTY, 400 for "." or ".." in a path, 414 for a
 * name over 255 bytes, 413 for a body over the server's cap, 405 for other
 * methods, 507 ENOSPC.
 *
 * Threads: kv_api_handle may run on many server threads at once (the
 * namespace allows it).
 */
#ifndef SHARDFS_KV_API_H
#define SHARDFS_KV_API_H

#include "namespace.h"
#include "node_server.h"

struct kv_api;

/* ns and is_open (ns_unlink's "is this inode still open here", NULL for
 * "never") stay the caller's and must outlive the api. GET and HEAD pass
 * through directories they walked within the last cache_timeout seconds (at
 * most one) without reading their entries again (0: always read). NULL on ENOMEM. */
struct kv_api *kv_api_new(struct ns *ns, double cache_timeout, ns_is_open_fn is_open,
                          void *is_open_ctx);
void kv_api_free(struct kv_api *api);

/* A node_handler_fn; ctx is the struct kv_api. */
int kv_api_handle(void *ctx, const struct node_request *req, struct node_response *resp);

#endif
