/* control.h -- a mount's control socket, DATA_DIR/CONTROL.
 *
 * A mounted store without replicas or etcd (a single node, or a node of
 * such a cluster), or a node of a cluster with etcd, listens on a Unix
 * socket in its data directory (mode
 * 0600; a peer must also be root or the daemon's own user, checked with
 * SO_PEERCRED) for commands that must run inside the daemon
 * because it holds the store: today `shardfs reshard split|merge` of a
 * mounted store (reshard_online()).
 *
 * Protocol: one command line per connection, then lines back until the
 * server closes:
 *   -> "split S\n" | "merge S\n" | "resume\n" (etcd: reshard.h)
 *   <- "progress PHASE RECORDS BYTES ESTIMATE PURGED SECONDS\n" ...
 *   <- "done A B DEPTH RECORDS BYTES PURGED SECONDS PAUSE_MS MIRRORED\n"
 *    | "error ERRNO MESSAGE\n"
 *   -> "status\n"
 *   <- "idle\n"
 *    | "change split|merge|resume S PHASE RECORDS BYTES ESTIMATE PURGED SECONDS\n"
 * A change runs on a thread of its own, one at a time (another split or
 * merge meanwhile: EBUSY); the control thread answers status meanwhile.
 * A client that goes away does not stop a change.
 *
 * Errors: 0 or -errno.
 */
#ifndef SHARDFS_CONTROL_H
#define SHARDFS_CONTROL_H

#include "config.h"
#include "reshard.h"

struct ns;
struct control;

/* Listen on DATA_DIR/CONTROL of node and serve it on a thread (srv: the
 * node's server, or NULL without one; fo: its failover with etcd, else
 * NULL). A data_dir
 * whose socket path does not fit a sockaddr_un (about 100 bytes) gets no
 * socket (0, *out NULL): such a store is resharded unmounted. */
struct node_server;
struct failover;
int control_start(struct ns *ns, struct node_server *srv, struct failover *fo,
                  const struct config *cfg, int node, struct control **out);

/* Stop: a change in its copy is cancelled (and undone), one past its
 * cut-over finishes; then the thread ends and the socket goes. NULL-safe. */
void control_stop(struct control *c);

/* The client: send line to the daemon of node's store and call progress
 * for each progress line. 0 with o->done, o->shard_a/b, o->depth and
 * o->pause_ms filled; -ENOENT or -ECONNREFUSED when no daemon listens; the
 * command's -errno with its message in err. */
int control_request(const struct config *cfg, int node, const char *line, struct reshard_opts *o,
                    char *err, size_t errlen);

/* The change a mounted store's daemon is making (`shardfs status`). 0 with
 * *out (running 0: none), -ENOENT or -ECONNREFUSED when no daemon listens,
 * else -errno with a message in err. */
struct control_change {
    int running;
    int merge;              /* else a split */
    unsigned shard;         /* as asked */
    struct reshard_stats st; /* its last progress; st.phase points to phase */
    char phase[16];
};
int control_status(const struct config *cfg, int node, struct control_change *out, char *err,
                   size_t errlen);

#endif
