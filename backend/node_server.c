/* node_server.c -- a node's HTTP server: this node's shards for its peers.
 *
 * libmicrohttpd runs the sockets in an event loop: IO_THREADS threads, each
 * with its own epoll set, all accepting on the one listening socket
 * (MHD_USE_EPOLL_INTERNAL_THREAD + MHD_OPTION_THREAD_POOL_SIZE). A
 * connection costs a socket and MHD's 32 KiB per-connection buffer, not a
 * thread, so the server is bounded by connections and memory:
 *  - at most conn_limit connections (CONN_LIMIT, 4096, fewer if the process
 *    may not open that many descriptors; the soft RLIMIT_NOFILE is raised
 *    towards its hard limit at start), each buffering at most WIRE_BODY_MAX;
 *  - at most conn_limit / PER_IP_SHARE of them from one address, so one
 *    client cannot take every slot (MHD closes the extra ones at once);
 *  - a request's headers must be complete HEADER_DEADLINE_MS after its first
 *    byte (after the accept for a new connection's first request), however
 *    slowly they trickle in (the reaper, below). MHD's own timeout,
 *    IDLE_TIMEOUT_S, counts from the last byte, so a byte a second would
 *    hold a connection forever; it still closes idle keep-alive connections.
 * Keep-alive is HTTP/1.1's default and stays on unless a request is refused
 * before its body was read (then MHD closes the connection after the reply).
 * Only a request that authenticated from its headers (step 2) gets its
 * body buffered.
 *
 * DESIGN (threads)
 *  The I/O threads must never wait: one waiting thread stalls every
 *  connection it serves. A handler that may wait (a sync, a long scan, an
 *  apply that commits, the key API, which reads from other nodes) runs on a
 *  worker thread instead: the access handler suspends the connection
 *  (MHD_suspend_connection), queues the request, and the worker fills the
 *  reply and resumes the connection; MHD then calls the access handler
 *  again, on an I/O thread, which queues the reply. There are two pools:
 *  SHARD_WORKERS for shard ops, API_WORKERS for the handler (and the reads
 *  of its streams). The key API waits for shard ops of other nodes; were
 *  those queued behind key API requests there, two nodes busy with key API
 *  requests would wait for each other until their timeouts. A shard op
 *  waits for nothing remote, so its pool always drains. What is usually
 *  cheap (a shard get, getv, stat, apply, a scan of at most SCAN_INLINE_MAX
 *  records, and GET/HEAD of the key API) is first tried on the I/O thread in
 *  the shards' no-waiting mode (shard.h): a local shard whose lock is free
 *  answers at once; anything that would wait (the lock held by a commit, an
 *  apply that must commit, another node) refuses having changed nothing,
 *  the reply is thrown away and the request goes to a worker, where it runs
 *  again from the start: the tried key API handlers only read, and a
 *  refused apply changed nothing. A worker costs a request two more thread
 *  wakeups, which on a small VM cost more than the work itself, so a
 *  mount's shard ops run inline nearly always. The
 *  queue needs no bound of its own: a connection has at most one request
 *  in it, and connections are bounded.
 *  A streamed reply (a large file) is read by the workers too, one
 *  STREAM_BLOCK ahead of what MHD sends: MHD's content reader runs on an I/O
 *  thread and copies from the block read ahead; when it finds none ready it
 *  suspends the connection and returns 0, and the worker resumes it when the
 *  block is in (returning 0 without suspending would make MHD spin).
 *  The reaper thread enforces the header deadline: every REAPER_PERIOD_MS
 *  it looks at each connection waiting for a request's headers, starts the
 *  clock when the kernel's count of bytes received (TCP_INFO) moves, and
 *  shuts down (shutdown(2); MHD then closes it) one whose clock passed the
 *  deadline. MHD tells us of each connection (MHD_OPTION_NOTIFY_CONNECTION)
 *  before it closes the socket, and the list is under conn_lock, so the
 *  reaper never touches a descriptor that is already another connection's.
 *
 * DESIGN (long polls; replication, wire.h)
 *  A replica's stream request that finds no entry after its position may
 *  wait for one (wait=MS, at most WIRE_STREAM_WAIT_MAX) without holding any
 *  thread: the handler (op_stream) asks its caller to park it (struct
 *  poll_ask), and dispatch suspends the connection and links the request
 *  into polls[shard] under poll_lock. Every batch applied to a local copy
 *  (shard_lmdb_on_apply) and every sync of a shard_repl that waits for its
 *  replicas (shard_repl_on_sync_wanted) bumps applies[shard] and resumes
 *  that shard's parked requests, which MHD hands to on_request again: the
 *  request is handled anew (poll_woken), with the deadline of its first
 *  parking. The poll timer thread resumes those whose deadline passed (they
 *  answer 204). A wakeup between the handler's read and the parking is not
 *  lost: the handler reads applies[shard] before it reads the stream, and
 *  parking refuses (resumes at once) when it moved. At stop, the listeners
 *  go first, then every parked request is resumed with its deadline
 *  passed, and none parks any more, before the pools and MHD stop (MHD
 *  must not stop with a connection suspended). Stream and position
 *  requests that must wait for the shard's lock have a pool of their own
 *  (STREAM_WORKERS): they are the replicas' acks, which the applies waiting
 *  on the shard workers need.
 *  A replica fed by its primary's pushes (shard_repl_push_fed) parks its
 *  pull as a lingering one until its deadline: applies do not wake it
 *  (they are not urgent while pushes carry the acks), a failed push, a
 *  sync or a checkpoint does.
 *  With a shard map (node_server_start_repl), the map's primary serves a
 *  shard; a node holding a replica, or nothing, redirects to it (307), and
 *  answers 503 while the shard has no primary. The push route (wire.h) is
 *  the exception: it is for this node's replica, wherever the primary is;
 *  it is tried inline and otherwise runs on the stream pool (it waits for
 *  nothing remote, and never behind applies that wait for acks).
 *
 * DESIGN (one request)
 *  1. The URI log callback runs before MHD splits and percent-decodes the
 *     URI. It allocates the request context and keeps the raw "path?query"
 *     exactly as it came on the wire: that is the string the client signed
 *     (wire.h). Rebuilding it from MHD's decoded url and argument list would
 *     be lossy (escaping, argument order, "a&a=" forms), so the signature is
 *     checked over this copy and nothing else, and shard paths and their
 *     query arguments (off, len, limit) are parsed from it too.
 *  2. First call of the access handler (headers only), node_server_precheck:
 *     a Content-Length over WIRE_BODY_MAX gets 413; then the request must
 *     authenticate from its headers alone: the bearer secret on /v1/kv, or
 *     wire_verify() over method, this node's URL, raw path?query, epoch,
 *     date, nonce and the body's declared X-Shardfs-Digest and
 *     Content-Length, and then a nonce never accepted before (the nonce
 *     cache remembers it from here on; 503 when it cannot). A refusal is
 *     401, and no byte of the body is ever buffered for it: with no body,
 *     or a body of at most EARLY_REFUSE_MIN with a Content-Length (curl
 *     sends small ones with the headers), the body is read, dropped, and
 *     the reply sent at its end (see refuse(): a reply before the body keeps
 *     the connection from being reused, and can be lost to a reset); any
 *     other body is refused at once, unread, and MHD closes the connection.
 *  3. Body calls append to the context's buffer, never past WIRE_BODY_MAX,
 *     and feed a signed body's SHA-256 as it comes. Only a chunked upload
 *     (no Content-Length to refuse at step 2) can pass the cap; then the
 *     buffer is freed at once and the rest of the body is read and thrown
 *     away, because libmicrohttpd 0.9.75 cannot queue a response while a
 *     body is still coming (MHD_queue_response fails until the request is
 *     complete). The 413 goes out when the body ends; a body that goes on
 *     for DISCARD_MAX more bytes gets the connection closed instead.
 *  4. Last call (body complete): dispatch (DESIGN threads above) runs
 *     node_server_handle inline, tries it inline, or hands it to a worker
 *     (and so it may run twice for one request: harmless, it takes no
 *     nonce). There the headers are
 *     authenticated again (the same answer, with the clock of step 2; not
 *     the nonce, which step 2 took), and the body must be the one signed,
 *     its digest and length those declared: else 401 and nothing else
 *     happens. Then: /v1/config, /v1/shard/N/op, or the caller's handler
 *     for other paths. Steps 2 and 4 see the request only as a struct
 *     node_input (node_server_precheck, node_server_handle), so they run
 *     without a socket too: tests/fuzz feeds them directly.
 *  5. A shard op checks, in order: N < shard_count (400), X-Shardfs-Epoch
 *     present and numeric (400), the method (405), and whether we serve it:
 *     a shard we do not own, or a request epoch older than ours, gets 307 to
 *     the owner's URL + the same raw path?query, with our epoch. A newer
 *     request epoch is served if the shard is ours (the client has a newer
 *     config than we do; logged once per epoch seen).
 *  6. Every reply is built as a struct node_response and turned into an MHD
 *     response in one place (send_response); errors become statuses through
 *     wire_status_of_errno() and carry X-Shardfs-Errno when wire.h names
 *     the errno.
 *  7. The completion callback frees the context, whatever happened.
 *
 * Threads: the server struct is read-only after start except newest_epoch
 * and busy_logged (atomic), the nonce cache (its own lock), the worker
 * queues (their pool's lock), the connection list (conn_lock) and the log's
 * minute (log_lock). A request context is used by one thread at a time: its
 * I/O thread, or the worker while the connection is suspended. Signals are
 * blocked in every thread MHD or we create (they inherit the mask set
 * around their creation), so they reach the main thread.
 */
#include "node_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <jansson.h>
#include <linux/tcp.h> /* struct tcp_info with tcpi_bytes_received (not in glibc's) */
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "batch.h"
#include "clock.h"
#include "nonce_cache.h"
#include "placement.h"
#include "shard_lmdb.h"
#include "shard_map.h"
#include "shard_repl.h"
#include "stream.h"
#include "wire.h"

#define IO_THREADS_MIN 2u          /* MHD's epoll threads: one a CPU, within these */
#define IO_THREADS_MAX 4u
#define API_WORKERS 16u            /* threads for the handler (the key API), which may wait */
#define SHARD_WORKERS 4u           /* threads for shard ops that may wait (disk, lock) */
#define STREAM_LINGER_MS 10       /* entries nobody waits for are held this long (long polls) */
#define STREAM_WORKERS 2u          /* threads for stream reads that found the shard's lock taken */
#define CONN_LIMIT 4096u           /* connections at once, if descriptors allow */
#define CONN_LIMIT_MIN 64u
#define FD_RESERVE 512u            /* descriptors kept free for everything else (curl, FUSE) */
#define PER_IP_SHARE 4u            /* one address may hold conn_limit / this */
#define IDLE_TIMEOUT_S 60u         /* MHD's: no byte for this long closes a connection */
#define HEADER_DEADLINE_MS 10000   /* a request's headers, from its first byte */
#define REAPER_PERIOD_MS 250
#define INLINE_BODY_MAX (64u << 10) /* a larger apply (LMDB, the redo log) runs on a worker */
#define SCAN_INLINE_MAX 256u       /* scans of at most this many records are tried inline */
#define LOG_BURST 10u              /* libmicrohttpd's messages shown a minute */
#define GET_FIRST_TRY (64u << 10) /* first buffer for a get; grown if the value is longer */
#define BODY_FIRST_ALLOC (64u << 10)
#define STREAM_BLOCK (256u << 10)             /* piece of a streamed reply */
#define EARLY_REFUSE_MIN (1u << 20)           /* a refused body above this is not read */
#define NONCE_MAX (1u << 20)                  /* nonces remembered (32 MiB at most) */
#define NONCE_MIN_KEEP_S 30                   /* ... for at least this long (nonce_cache.h) */
#define BUSY_LOG_S 10                         /* "cannot remember more nonces", at most this often */
#define DISCARD_MAX ((uint64_t)WIRE_BODY_MAX) /* read past the cap before closing */
#define TLS_FILE_MAX (1u << 20)               /* a PEM certificate chain or key */

/* Work for a worker pool: run(job) on one of its threads. */
struct job {
    struct job *next;
    void (*run)(struct job *job);
};

/* Threads running jobs in the order they came. */
struct pool {
    const char *name;              /* of its threads */
    unsigned size;                 /* threads to start */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct job *head, *tail;       /* protected by lock */
    int stopping;                  /* protected by lock */
    pthread_t threads[API_WORKERS > SHARD_WORKERS ? API_WORKERS : SHARD_WORKERS];
    unsigned started;
};

/* A connection, as the reaper sees it (DESIGN threads). */
struct conn_track {
    struct conn_track *prev, *next; /* in node_server.conns */
    int fd;
    _Atomic int busy;      /* a request's headers are in: no deadline */
    _Atomic unsigned done; /* requests completed on this connection */
    /* the reaper's own, under conn_lock: */
    unsigned seen_done;    /* `done` when it last looked */
    uint64_t rx_mark;      /* bytes received when the wait for headers began */
    int64_t clock_ms;      /* when the headers' clock started; 0: not yet */
    int shut;              /* shut down for the deadline */
};

struct node_server {
    struct MHD_Daemon *daemon;
    struct config cfg; /* a private copy */
    int self;
    struct shard **shards; /* CONFIG_MAX_SHARDS entries, borrowed */
    /* The layout requests are checked against (wire.h, "Layouts"):
     * cfg.depth[0..slots), changed only with layout_lock held for writing
     * (node_server_quiesce); a data op holds it for reading from its
     * checks to its reply. */
    pthread_rwlock_t layout_lock;
    unsigned slots;
    node_handler_fn other;
    void *other_ctx;
    struct sockaddr_storage addr;  /* where we listen */
    char host[CONFIG_URL_MAX + 1]; /* for messages */
    char port[8];
    int tls;                       /* https:// url: serve TLS */
    char *tls_cert, *tls_key;      /* their PEM text, for MHD */
    _Atomic uint64_t newest_epoch; /* highest request epoch logged so far */
    struct nonce_cache *nonces;    /* of the signed requests accepted */
    _Atomic int64_t busy_logged;   /* when a full nonce cache was last logged */
    unsigned conn_limit, per_ip_limit;
    int sync_ready;                /* the locks below are initialised */
    pthread_mutex_t log_lock;
    int64_t log_window_ms;         /* the minute of mhd_log(), under log_lock */
    unsigned log_shown, log_dropped;
    /* the worker pools (DESIGN threads) */
    struct pool api_pool, shard_pool, stream_pool;
    /* replication (node_server_repl; NULL map: none) */
    struct shard_map *map;
    struct shard **local;          /* CONFIG_MAX_SHARDS entries (a split adds shards),
                                    * borrowed; changed and
                                    * read by op_position under local_lock */
    int (*push)(void *ctx, unsigned shard, int from, uint64_t epoch,
                const struct stream_pos *after, const uint8_t *body, size_t len,
                struct stream_pos *pos, uint64_t *synced);
    void *push_ctx;
    pthread_mutex_t local_lock;
    /* long polls of the stream route (DESIGN long polls) */
    pthread_mutex_t poll_lock;
    pthread_cond_t poll_wake;      /* the poll timer: a new poll, or stop */
    struct request **polls;        /* per shard, the parked requests; under poll_lock */
    _Atomic uint64_t *applies;     /* per shard, wakeups so far (applies, syncs) */
    _Atomic uint64_t *urgent;      /* per shard, the wakeups for which an ack waits */
    int poll_stop;                 /* under poll_lock */
    int64_t poll_next_ms;          /* when the timer wakes next; under poll_lock */
    int poll_started;
    pthread_t poll_timer;
    /* the reaper */
    pthread_mutex_t conn_lock;
    pthread_cond_t reaper_wake;
    struct conn_track *conns; /* protected by conn_lock */
    int reaper_stop;          /* protected by conn_lock */
    int reaper_started;
    pthread_t reaper;
};

/* One request; see DESIGN steps 1-7. */
struct request {
    struct node_server *srv;
    char *uri;          /* raw "path?query" as received; NULL if out of memory */
    int64_t now;        /* when the headers came: the clock of steps 2 and 4 */
    int started;        /* the header-only first call has been made */
    int replied;        /* a response was queued before the body was complete */
    struct node_response *refusal; /* step 2's, sent once the body is dropped */
    int error;          /* -EFBIG, -ENOMEM or -EIO while reading the body */
    uint64_t discarded; /* body bytes thrown away after that */
    struct wire_digest *digest; /* of a signed body, as it comes */
    char body_digest[WIRE_DIGEST_LEN + 1]; /* ... in hex once complete, or "" */
    uint8_t *body;      /* NULL while empty */
    size_t len, cap;
    /* handed to a worker (step 4): */
    struct job job;
    struct MHD_Connection *conn;
    const char *url, *method; /* MHD's, valid until the request completes */
    int answered;             /* the worker filled resp; the connection is resumed */
    struct node_response resp;
    /* a stream request parked as a long poll (DESIGN long polls): */
    struct request *poll_next, **poll_pprev; /* in srv->polls[shard]; under poll_lock */
    int64_t poll_deadline_ms; /* monotonic; 0 before it first parked */
    int64_t poll_linger_ms;   /* monotonic: it holds entries until then; 0 not yet */
    int poll_woken;           /* resumed by an apply or the timer: handle it again */
};

/* What the stream route asks of its caller when it found nothing to send
 * and may wait: park the request until shard's next apply (or sync) or
 * wait_ms; or, when it found entries nobody waits for, until an urgent
 * wakeup or linger_ms (gathering more). NULL where nothing can wait
 * (node_server_handle). */
struct poll_ask {
    int64_t deadline_ms; /* in: the request's deadline, 0 the first time */
    int64_t linger_ms;   /* in/out: when a lingering request answers, 0 none */
    int want;            /* out: park it */
    unsigned shard;
    uint64_t seq;        /* applies[shard] before the read, or urgent[shard] to linger */
    int64_t wait_ms;
};

/* ---- small helpers ---- */

static void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One line on stderr, written with one call so threads do not interleave. */
static void log_line(const char *prefix, const char *fmt, va_list ap)
{
    char text[512];
    int n = vsnprintf(text, sizeof(text), fmt, ap);

    if (n < 0)
        return;
    n = (int)strlen(text);
    while (n && text[n - 1] == '\n') /* MHD's messages mostly end in one */
        text[--n] = '\0';
    fprintf(stderr, "shardfs: node server: %s%s\n", prefix, text);
}

static void log_msg(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    log_line("", fmt, ap);
    va_end(ap);
}

/* Start a new minute of MHD messages if the last one is over, saying how
 * many of it were not shown; under log_lock. */
static void mhd_log_window(struct node_server *s, int64_t now)
{
    if (now - s->log_window_ms < 60000)
        return;
    if (s->log_dropped)
        log_msg("libmicrohttpd: %u more messages in the last minute not shown", s->log_dropped);
    s->log_window_ms = now;
    s->log_shown = s->log_dropped = 0;
}

/* MHD says something for every connection it refuses or that fails; under
 * attack that is thousands of lines a second. LOG_BURST a minute are shown,
 * the rest counted. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    struct node_server *s = cls;
    int show;

    if (!fmt)
        return;
    pthread_mutex_lock(&s->log_lock);
    mhd_log_window(s, clock_mono_ms());
    show = s->log_shown < LOG_BURST;
    if (show)
        s->log_shown++;
    else
        s->log_dropped++;
    pthread_mutex_unlock(&s->log_lock);
    if (show)
        log_line("libmicrohttpd: ", fmt, ap);
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || !errlen)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Strict unsigned decimal: 1-20 digits, no sign, no spaces, no leading zero
 * (except "0" itself), no overflow. 0 or -EINVAL. */
static int parse_u64(const char *s, uint64_t *out)
{
    uint64_t n = 0;

    if (!s || !*s || (s[0] == '0' && s[1]))
        return -EINVAL;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -EINVAL;
        if (n > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return -EINVAL;
        n = n * 10 + (uint64_t)(*s - '0');
    }
    *out = n;
    return 0;
}

static int parse_date(const char *s, int64_t *out)
{
    uint64_t n;

    if (parse_u64(s, &n) < 0 || n > INT64_MAX)
        return -EINVAL;
    *out = (int64_t)n;
    return 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode the n bytes at s into out (cap bytes, NUL added), a
 * malformed escape kept as it is, and with `plus` '+' as a space: what
 * libmicrohttpd does to query arguments (plus) and to the path (not). The
 * decoded length, or -ENAMETOOLONG if over cap - 1. */
static int percent_decode(const char *s, size_t n, int plus, char *out, size_t cap)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int hi, lo;

        if (c == '+' && plus) {
            c = ' ';
        } else if (c == '%' && n - i > 2 && (hi = hex_digit(s[i + 1])) >= 0 &&
                   (lo = hex_digit(s[i + 2])) >= 0) {
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        if (o + 1 >= cap)
            return -ENAMETOOLONG;
        out[o++] = c;
    }
    out[o] = '\0';
    return (int)o;
}

/* A query argument of the raw uri (the signed "path?query", DESIGN step 1),
 * percent-decoded into out (cap bytes with its NUL); the first argument of
 * that name counts. 1 if found, 0 if absent; an argument without a value
 * ("?len"), with a NUL in it ("len=1%00") or longer than cap - 1 is
 * malformed: -EINVAL. */
static int query_str(const char *uri, const char *name, char *out, size_t cap)
{
    const char *q = strchr(uri, '?');
    char key[32];

    if (!q)
        return 0;
    for (q++; *q; q += *q == '&') {
        size_t arg = strcspn(q, "&"), klen = strcspn(q, "=&");
        const char *v = q + klen;
        int n;

        q += arg;
        n = percent_decode(v - klen, klen, 1, key, sizeof(key));
        if (n < 0 || (size_t)n != strlen(name) || memcmp(key, name, (size_t)n) != 0)
            continue;
        if (*v != '=')
            return -EINVAL;
        n = percent_decode(v + 1, arg - klen - 1, 1, out, cap);
        if (n < 0 || strlen(out) != (size_t)n)
            return -EINVAL;
        return 1;
    }
    return 0;
}

/* A query argument (query_str) as an unsigned number; an absent one leaves
 * *out alone. 1 (found), 0 (absent) or -EINVAL. */
static int query_u64(const char *uri, const char *name, uint64_t *out)
{
    char val[32];
    int rc = query_str(uri, name, val, sizeof(val));

    if (rc <= 0)
        return rc;
    return parse_u64(val, out) < 0 ? -EINVAL : 1;
}

static const char *header(const struct node_input *in, const char *name)
{
    return in->header ? in->header(in->ctx, name) : NULL;
}

/* Whether a body follows the headers: chunked, or a Content-Length but 0. */
static int has_body(const struct node_input *in)
{
    const char *cl = header(in, MHD_HTTP_HEADER_CONTENT_LENGTH);

    return header(in, MHD_HTTP_HEADER_TRANSFER_ENCODING) || (cl && strcmp(cl, "0") != 0);
}

/* A request target holds no control character and no space (RFC 9112).
 * libmicrohttpd passes some through (a tab, \x01, DEL); refusing them keeps
 * them out of a redirect's Location, which repeats the target verbatim. */
static int target_is_clean(const char *uri)
{
    for (; *uri; uri++)
        if ((unsigned char)*uri <= 0x20 || *uri == 0x7f)
            return 0;
    return 1;
}

/* The length of url without its trailing slashes. */
static size_t url_base_len(const char *url)
{
    size_t n = strlen(url);

    while (n && url[n - 1] == '/')
        n--;
    return n;
}

/* ---- responses ---- */

static void resp_reset(struct node_response *r)
{
    free(r->body);
    if (r->stream.free)
        r->stream.free(r->stream.ctx);
    memset(r, 0, sizeof(*r));
}

/* An error reply for -errno rc with a one-line text body (best effort). */
static void resp_verror(struct node_response *r, int rc, const char *fmt, va_list ap)
{
    const char *name = wire_errno_name(rc);
    char text[256];
    int n;

    resp_reset(r);
    r->status = wire_status_of_errno(rc);
    if (name)
        snprintf(r->errno_name, sizeof(r->errno_name), "%s", name);
    n = vsnprintf(text, sizeof(text) - 1, fmt, ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(text) - 2)
        n = (int)sizeof(text) - 2;
    text[n++] = '\n';
    r->body = malloc((size_t)n);
    if (r->body) {
        memcpy(r->body, text, (size_t)n);
        r->len = (size_t)n;
        r->content_type = "text/plain";
    }
}

static void resp_error(struct node_response *r, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void resp_error(struct node_response *r, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    resp_verror(r, rc, fmt, ap);
    va_end(ap);
}

void node_response_error(struct node_response *r, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    resp_verror(r, rc, fmt, ap);
    va_end(ap);
}

static void resp_status(struct node_response *r, int status)
{
    resp_reset(r);
    r->status = status;
}

void node_response_header(struct node_response *r, const char *name, const char *fmt, ...)
{
    va_list ap;

    for (unsigned i = 0; i < NODE_EXTRA_MAX; i++) {
        if (r->extra[i].name[0])
            continue;
        snprintf(r->extra[i].name, sizeof(r->extra[i].name), "%s", name);
        va_start(ap, fmt);
        vsnprintf(r->extra[i].value, sizeof(r->extra[i].value), fmt, ap);
        va_end(ap);
        return;
    }
}

/* A JSON document as the body of a 200 reply; takes the reference to doc. */
void node_response_json(struct node_response *r, json_t *doc)
{
    size_t n = doc ? json_dumpb(doc, NULL, 0, JSON_COMPACT) : 0;

    resp_reset(r);
    if (n == 0 || !(r->body = malloc(n)) ||
        json_dumpb(doc, (char *)r->body, n, JSON_COMPACT) != n) {
        json_decref(doc);
        resp_error(r, -ENOMEM, "out of memory");
        return;
    }
    json_decref(doc);
    r->len = n;
    r->status = 200;
    r->content_type = "application/json";
}

static int add_header(struct MHD_Response *mr, const char *name, const char *value)
{
    return MHD_add_response_header(mr, name, value) == MHD_YES ? 0 : -EINVAL;
}

/* ---- the worker pools (DESIGN threads) ---- */

static void pool_init(struct pool *p, const char *name, unsigned size)
{
    p->name = name;
    p->size = size;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
}

static void pool_destroy(struct pool *p)
{
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
}

/* Queue job. 0, or -ESHUTDOWN once the pool is stopping (the job is not
 * run). */
static int pool_submit(struct pool *p, struct job *job)
{
    int rc = 0;

    job->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->stopping) {
        rc = -ESHUTDOWN;
    } else {
        if (p->tail)
            p->tail->next = job;
        else
            p->head = job;
        p->tail = job;
        pthread_cond_signal(&p->wake);
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* A worker: run jobs until the pool stops and its queue is empty. */
static void *worker_main(void *arg)
{
    struct pool *p = arg;

    pthread_setname_np(pthread_self(), p->name);
    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct job *job = p->head;

        if (!job) {
            if (p->stopping)
                break;
            pthread_cond_wait(&p->wake, &p->lock);
            continue;
        }
        p->head = job->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);
        job->run(job);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Start the pool's threads (signals blocked by the caller). 0 or -errno. */
static int pool_start(struct pool *p)
{
    for (; p->started < p->size; p->started++) {
        int rc = pthread_create(&p->threads[p->started], NULL, worker_main, p);
        if (rc)
            return -rc;
    }
    return 0;
}

/* Let the workers finish what is queued, then join them. */
static void pool_stop(struct pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->started; i++)
        pthread_join(p->threads[i], NULL);
    p->started = 0;
}

/* ---- streamed replies (DESIGN threads) ---- */

/* The handler's node_stream and the block a worker reads ahead. The reader
 * (an I/O thread) touches buf only while no read is pending; the worker
 * only while one is. */
struct stream_box {
    struct node_stream st;
    struct node_server *srv;
    struct MHD_Connection *conn;
    struct job job;
    pthread_mutex_t lock; /* guards everything below */
    uint8_t *buf;         /* STREAM_BLOCK bytes, allocated at the first read */
    uint64_t at;          /* stream position of buf[off] (or of the read pending) */
    size_t off, len;      /* buf[off, off + len) is read and not yet sent */
    int err;              /* -errno of the last read, 0 */
    int pending;          /* a worker is reading into buf */
    int waiting;          /* the connection is suspended until that read is in */
    int orphaned;         /* MHD is done with the reply: the worker frees the box */
};

static void stream_box_free(struct stream_box *b)
{
    if (b->st.free)
        b->st.free(b->st.ctx);
    pthread_mutex_destroy(&b->lock);
    free(b->buf);
    free(b);
}

/* A worker: read the block at b->at. */
static void stream_job(struct job *job)
{
    struct stream_box *b = (struct stream_box *)((char *)job - offsetof(struct stream_box, job));
    uint64_t left = b->st.len - b->at;
    ssize_t n = b->st.read(b->st.ctx, b->at, b->buf, left < STREAM_BLOCK ? (size_t)left : STREAM_BLOCK);
    int waiting;

    pthread_mutex_lock(&b->lock);
    b->pending = 0;
    b->off = 0;
    b->len = n > 0 ? (size_t)n : 0;
    b->err = n > 0 ? 0 : n < 0 ? (int)n : -EIO;
    if (b->orphaned) {
        pthread_mutex_unlock(&b->lock);
        stream_box_free(b);
        return;
    }
    waiting = b->waiting;
    b->waiting = 0;
    pthread_mutex_unlock(&b->lock);
    /* Suspended, the connection (and so b) stays until it is resumed. */
    if (waiting)
        MHD_resume_connection(b->conn);
}

/* Start reading the block at b->at on a worker; under b->lock. 0 or -errno. */
static int stream_fetch(struct stream_box *b)
{
    if (!b->buf && !(b->buf = malloc(STREAM_BLOCK)))
        return -ENOMEM;
    b->pending = 1;
    b->job.run = stream_job;
    if (pool_submit(&b->srv->api_pool, &b->job) < 0) {
        b->pending = 0;
        return -ESHUTDOWN;
    }
    return 0;
}

/* MHD's content reader, on an I/O thread: what a worker read ahead, or
 * suspend until it has. */
static ssize_t stream_read(void *cls, uint64_t pos, char *out, size_t max)
{
    struct stream_box *b = cls;
    ssize_t n = 0;
    int rc;

    if (pos >= b->st.len)
        return MHD_CONTENT_READER_END_OF_STREAM;
    pthread_mutex_lock(&b->lock);
    if (!b->pending && b->len && b->at == pos) {
        n = (ssize_t)(b->len < max ? b->len : max);
        memcpy(out, b->buf + b->off, (size_t)n);
        b->off += (size_t)n;
        b->len -= (size_t)n;
        b->at += (uint64_t)n;
        /* Read the next block while this one goes out. Should that not
         * start, the next call tries again and reports the failure. */
        if (b->len == 0 && b->at < b->st.len)
            (void)stream_fetch(b);
        pthread_mutex_unlock(&b->lock);
        return n;
    }
    if (!b->pending) {
        rc = b->err;
        if (rc == 0 && b->at != pos)
            rc = -EIO; /* cannot happen: MHD reads a response once, in order */
        if (rc == 0)
            rc = stream_fetch(b);
        if (rc < 0) {
            pthread_mutex_unlock(&b->lock);
            log_msg("a streamed reply failed at byte %" PRIu64 ": %s", pos, strerror(-rc));
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
    b->waiting = 1;
    MHD_suspend_connection(b->conn);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

/* MHD is done with the reply (sent, or the connection went away). */
static void stream_free(void *cls)
{
    struct stream_box *b = cls;
    int pending;

    pthread_mutex_lock(&b->lock);
    pending = b->pending;
    b->orphaned = pending;
    pthread_mutex_unlock(&b->lock);
    if (!pending)
        stream_box_free(b);
}

/* A response reading from st on conn; takes st's contents either way. */
static struct MHD_Response *stream_response(struct node_server *s, struct MHD_Connection *conn,
                                            struct node_stream *st)
{
    struct stream_box *b = calloc(1, sizeof(*b));
    struct MHD_Response *mr = NULL;

    if (b) {
        b->st = *st;
        b->srv = s;
        b->conn = conn;
        pthread_mutex_init(&b->lock, NULL);
        mr = MHD_create_response_from_callback(st->len, STREAM_BLOCK, stream_read, b, stream_free);
        if (!mr)
            stream_box_free(b);
    } else if (st->free) {
        st->free(st->ctx);
    }
    memset(st, 0, sizeof(*st));
    return mr;
}

/* Turn r into an MHD response and queue it. Consumes r->body either way.
 * MHD_NO (the connection is dropped) only when MHD itself fails. */
static enum MHD_Result send_response(struct node_server *s, struct MHD_Connection *conn,
                                     struct node_response *r)
{
    struct MHD_Response *mr;
    enum MHD_Result ok;
    int bad = 0;

    if (r->stream.read) {
        free(r->body);
        mr = stream_response(s, conn, &r->stream);
    } else if (r->body && r->len) {
        mr = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
        if (!mr)
            free(r->body);
    } else {
        free(r->body);
        mr = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    }
    r->body = NULL;
    r->len = 0;
    if (!mr) {
        log_msg("cannot create a response (out of memory?)");
        return MHD_NO;
    }
    /* A handler's strings may lack their NUL; MHD also refuses CR/LF in them. */
    r->location[sizeof(r->location) - 1] = '\0';
    r->errno_name[sizeof(r->errno_name) - 1] = '\0';
    for (unsigned i = 0; i < NODE_EXTRA_MAX; i++) {
        r->extra[i].name[sizeof(r->extra[i].name) - 1] = '\0';
        r->extra[i].value[sizeof(r->extra[i].value) - 1] = '\0';
    }
    if (r->content_type)
        bad |= add_header(mr, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
    if (r->location[0])
        bad |= add_header(mr, MHD_HTTP_HEADER_LOCATION, r->location);
    if (r->errno_name[0])
        bad |= add_header(mr, WIRE_HDR_ERRNO, r->errno_name);
    for (unsigned i = 0; i < NODE_EXTRA_MAX && r->extra[i].name[0]; i++)
        bad |= add_header(mr, r->extra[i].name, r->extra[i].value);
    if (bad) {
        /* Only a handler's header can be refused; ours are plain tokens, so
         * this recursion ends with the 500. */
        log_msg("a response header was refused (status %d)", r->status);
        MHD_destroy_response(mr);
        resp_error(r, -EIO, "bad response header");
        return send_response(s, conn, r);
    }
    ok = MHD_queue_response(conn, (unsigned)r->status, mr);
    MHD_destroy_response(mr);
    if (ok != MHD_YES)
        log_msg("cannot queue a %d response", r->status);
    return ok;
}

/* ---- shard ops: each fills r ---- */

static void op_get(struct shard *sh, const char *uri, const uint8_t *key, size_t klen,
                   struct node_response *r)
{
    uint64_t off = 0, len = WIRE_GET_MAX;
    size_t want, need, vlen = 0;
    uint8_t *buf = NULL;
    int rc = 0;

    if (query_u64(uri, "off", &off) < 0 || query_u64(uri, "len", &len) < 0) {
        resp_error(r, -EINVAL, "bad off or len");
        return;
    }
    if (klen == 0 || klen > BATCH_KEY_MAX) {
        resp_error(r, -EINVAL, "key must be 1-%u bytes", BATCH_KEY_MAX);
        return;
    }
    if (len > WIRE_GET_MAX)
        len = WIRE_GET_MAX;
    /* Most values are small: try a modest buffer, and grow it to the size
     * the value turned out to have (again if it changed meanwhile). */
    want = len < GET_FIRST_TRY ? (size_t)len : GET_FIRST_TRY;
    for (int tries = 0;; tries++) {
        buf = malloc(want ? want : 1);
        if (!buf) {
            resp_error(r, -ENOMEM, "out of memory");
            return;
        }
        rc = shard_get(sh, key, klen, (size_t)off, buf, want, &vlen);
        if (rc < 0) {
            free(buf);
            resp_error(r, rc, "get: %s", strerror(-rc));
            return;
        }
        need = off < vlen ? (vlen - off < len ? vlen - (size_t)off : (size_t)len) : 0;
        if ((size_t)rc >= need || tries == 3)
            break;
        free(buf);
        want = need;
    }
    resp_status(r, 200);
    if (rc > 0) {
        r->body = buf;
        r->len = (size_t)rc;
    } else {
        free(buf);
    }
    r->content_type = "application/octet-stream";
    node_response_header(r, WIRE_HDR_VLEN, "%zu", vlen);
}

/* Several reads as of one moment (wire.h, getv): each value into its part of
 * one slab, then the reply encoded from them. */
static void op_getv(struct shard *sh, const uint8_t *body, size_t len, struct node_response *r)
{
    struct shard_read rd[SHARD_READS_MAX];
    uint8_t *slab = NULL, *out = NULL;
    size_t total = 0;
    unsigned n = 0;
    int rc = wire_getv_request_decode(body, len, rd, &n);

    if (rc) {
        resp_error(r, rc, "malformed getv body");
        return;
    }
    for (unsigned i = 0; i < n; i++)
        total += rd[i].buflen > SHARD_READ_VALUE_MAX ? SHARD_READ_VALUE_MAX : rd[i].buflen;
    slab = malloc(total ? total : 1);
    if (!slab) {
        resp_error(r, -ENOMEM, "out of memory");
        return;
    }
    total = 0;
    for (unsigned i = 0; i < n; i++) {
        rd[i].buf = rd[i].buflen ? slab + total : NULL;
        total += rd[i].buflen > SHARD_READ_VALUE_MAX ? SHARD_READ_VALUE_MAX : rd[i].buflen;
    }
    rc = shard_get_many(sh, rd, n);
    if (rc) {
        resp_error(r, rc, "getv: %s", strerror(-rc));
        goto out;
    }
    len = wire_getv_reply_size(rd, n);
    out = malloc(len ? len : 1);
    if (!out) {
        resp_error(r, -ENOMEM, "out of memory");
        goto out;
    }
    wire_getv_reply_encode(out, rd, n);
    resp_status(r, 200);
    r->body = out;
    r->len = len;
    r->content_type = "application/octet-stream";
out:
    free(slab);
}

struct scan_ctx {
    uint8_t *buf;
    size_t len, cap;
    uint64_t count, limit;
    int more;
};

/* Room in sc's reply for one more record of rec bytes: 0, 1 (the reply is
 * full: stop, "more"), or -ENOMEM. */
static int scan_room(struct scan_ctx *sc, size_t rec)
{
    /* Only a record that exists but does not fit sets "more". */
    if (sc->count == sc->limit || (sc->count && sc->len + rec > WIRE_SCAN_REPLY_MAX)) {
        sc->more = 1;
        return 1;
    }
    if (sc->len + rec > sc->cap) {
        size_t cap = sc->cap ? sc->cap : 64u << 10;
        uint8_t *p;

        while (cap < sc->len + rec)
            cap *= 2;
        /* Never reserve past the cap unless one big record needs it. */
        if (cap > WIRE_SCAN_REPLY_MAX && sc->len + rec <= WIRE_SCAN_REPLY_MAX)
            cap = WIRE_SCAN_REPLY_MAX;
        p = realloc(sc->buf, cap);
        if (!p)
            return -ENOMEM;
        sc->buf = p;
        sc->cap = cap;
    }
    return 0;
}

static int scan_add(void *c, const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen)
{
    struct scan_ctx *sc = c;
    size_t rec = wire_scan_record_size(klen, vlen);
    int rc = scan_room(sc, rec);

    if (rc)
        return rc;
    wire_scan_record_encode(sc->buf + sc->len, key, klen, val, vlen);
    sc->len += rec;
    sc->count++;
    return 0;
}

static int scan_join_add(void *c, const uint8_t *key, size_t klen, const uint8_t *val,
                         size_t vlen, const uint8_t *jval, size_t jlen)
{
    struct scan_ctx *sc = c;
    size_t rec = wire_scan_join_record_size(klen, vlen, jlen);
    int rc = scan_room(sc, rec);

    if (rc)
        return rc;
    wire_scan_join_record_encode(sc->buf + sc->len, key, klen, val, vlen, jval, jlen);
    sc->len += rec;
    sc->count++;
    return 0;
}

static void op_scan(struct shard *sh, const char *uri, const uint8_t *body, size_t len,
                    struct node_response *r)
{
    struct scan_ctx sc = {.limit = WIRE_SCAN_LIMIT_MAX};
    const uint8_t *start, *end;
    uint8_t prefix[SHARD_JOIN_PREFIX_MAX];
    char hex[2 * SHARD_JOIN_PREFIX_MAX + 1], link[24];
    struct shard_join j;
    size_t slen, elen;
    int rc, join = query_str(uri, "join", hex, sizeof(hex));

    if (query_u64(uri, "limit", &sc.limit) < 0 || sc.limit == 0) {
        resp_error(r, -EINVAL, "bad limit");
        return;
    }
    if (sc.limit > WIRE_SCAN_LIMIT_MAX)
        sc.limit = WIRE_SCAN_LIMIT_MAX;
    if (join < 0 || (join > 0 && (query_str(uri, "link", link, sizeof(link)) <= 0 ||
                                  wire_join_parse(hex, link, prefix, &j) < 0))) {
        resp_error(r, -EINVAL, "bad join");
        return;
    }
    if (wire_scan_request_decode(body, len, &start, &slen, &end, &elen) < 0) {
        resp_error(r, -EINVAL, "malformed scan request");
        return;
    }
    rc = join ? shard_scan_join(sh, start, slen, end, elen, &j, scan_join_add, &sc)
              : shard_scan(sh, start, slen, end, elen, scan_add, &sc);
    if (rc < 0) {
        free(sc.buf);
        resp_error(r, rc, "scan: %s", strerror(-rc));
        return;
    }
    resp_status(r, 200);
    r->body = sc.buf;
    r->len = sc.len;
    r->content_type = "application/octet-stream";
    if (sc.more)
        node_response_header(r, WIRE_HDR_MORE, "1");
    if (join)
        node_response_header(r, WIRE_HDR_JOIN, "1");
}

static void op_apply(struct shard *sh, const uint8_t *body, size_t len, struct node_response *r)
{
    int n = batch_validate(body, len);
    struct batch b;
    int rc;

    if (n < 0) {
        resp_error(r, -EINVAL, "malformed batch");
        return;
    }
    if (n == 0) {
        resp_status(r, 204); /* nothing to apply, atomically */
        return;
    }
    /* shard_apply() only reads the batch: lending it the body is safe. */
    b = (struct batch){.buf = (uint8_t *)body, .len = len, .cap = len, .count = (unsigned)n};
    rc = shard_apply(sh, &b);
    if (rc < 0) {
        resp_error(r, rc, "apply: %s", strerror(-rc));
        return;
    }
    resp_status(r, 204);
}

static void op_sync(struct shard *sh, size_t len, struct node_response *r)
{
    int rc;

    if (len) {
        resp_error(r, -EINVAL, "sync takes no body");
        return;
    }
    rc = shard_sync(sh);
    if (rc < 0) {
        resp_error(r, rc, "sync: %s", strerror(-rc));
        return;
    }
    resp_status(r, 204);
}

/* JSON numbers here are json_int_t (long long): clamp, never wrap. */
static json_t *json_u64(uint64_t v)
{
    return json_integer(v > (uint64_t)LLONG_MAX ? LLONG_MAX : (json_int_t)v);
}

static void op_stat(struct shard *sh, struct node_response *r)
{
    struct shard_stat st = {0};
    int rc = shard_stat(sh, &st);

    if (rc < 0) {
        resp_error(r, rc, "stat: %s", strerror(-rc));
        return;
    }
    node_response_json(r, json_pack("{s:o,s:o,s:o}", "records", json_u64(st.records), "bytes",
                           json_u64(st.bytes), "pending", json_u64(st.pending)));
}

/* 307 to node `to` (the owner or primary of a shard): its URL + the raw
 * path?query we got. */
static void redirect(struct node_server *s, int to, const char *raw_uri, struct node_response *r)
{
    const char *url = s->cfg.nodes[to].url;
    size_t base = url_base_len(url);
    int len;

    if (base == 0) {
        resp_error(r, -EIO, "node %s has no url", s->cfg.nodes[to].name);
        return;
    }
    resp_status(r, 307);
    len = snprintf(r->location, sizeof(r->location), "%.*s%s", (int)base, url, raw_uri);
    if (len < 0 || (size_t)len >= sizeof(r->location)) {
        resp_error(r, -ENAMETOOLONG, "redirect location too long");
        return;
    }
    node_response_header(r, WIRE_HDR_EPOCH, "%" PRIu64, s->cfg.epoch);
}

/* ---- replication: the stream and position routes (wire.h) ---- */

static void position_header(struct node_response *r, const struct stream_pos *p)
{
    node_response_header(r, WIRE_HDR_POSITION, STREAM_POS_FMT, p->epoch,
                         p->lsn, p->check);
}

/* The stream request's arguments (wire.h). 0 or -EINVAL with why. */
struct stream_args {
    int node;
    struct stream_pos after;
    uint64_t wait, max, synced, hashed;
};

static int stream_args(struct node_server *s, const char *uri, struct stream_args *a,
                       const char **why)
{
    char name[CONFIG_NAME_MAX + 1];
    int rc;

    *a = (struct stream_args){.node = -1};
    *why = "bad or missing node, epoch, lsn, check, wait or max";
    rc = query_str(uri, "node", name, sizeof(name));
    if (rc <= 0 || query_u64(uri, "synced", &a->synced) < 0 ||
        query_u64(uri, "hashed", &a->hashed) < 0)
        return -EINVAL;
    if (query_u64(uri, "epoch", &a->after.epoch) <= 0 || query_u64(uri, "lsn", &a->after.lsn) <= 0)
        return -EINVAL;
    if (query_u64(uri, "check", &a->after.check) <= 0 || query_u64(uri, "wait", &a->wait) <= 0 ||
        query_u64(uri, "max", &a->max) <= 0)
        return -EINVAL;
    a->node = config_node_index(&s->cfg, name);
    if (a->wait > WIRE_STREAM_WAIT_MAX)
        a->wait = WIRE_STREAM_WAIT_MAX;
    if (a->max == 0 || a->max > WIRE_STREAM_MAX)
        a->max = WIRE_STREAM_MAX;
    return 0;
}

/* GET /v1/shard/N/stream (wire.h): the entries after the replica's
 * position, a long poll (pa) when there are none, or 409 when it needs a
 * snapshot. The replica's report goes to the shard_repl wrapper. */
static void op_stream(struct node_server *s, struct shard *sh, unsigned n, const char *uri,
                      struct poll_ask *pa, struct node_response *r)
{
    struct stream_buf e = {0};
    struct stream_args a;
    struct shard_copies c;
    struct stream_pos pos, cp, from, acked;
    uint64_t cp_id = 0;
    struct shard *local;
    const char *why;
    uint64_t seq, useq, want;
    int64_t wait, now;
    int rc, count, member = 0, capped, fed;

    sh = shard_unwrap(sh); /* a resharding's mirror: the replicas read its source */
    if (stream_args(s, uri, &a, &why) < 0) {
        resp_error(r, -EINVAL, "%s", why);
        return;
    }
    if (a.node >= 0 && a.node != s->self && s->map && shard_repl_is(sh) &&
        shard_map_get(s->map, n, &c) == 0)
        for (unsigned i = 0; i < c.nreplicas; i++)
            member |= c.replicas[i] == a.node;
    if (!member) {
        resp_error(r, -EPERM, "the caller is not a replica of shard %u", n);
        return;
    }
    local = shard_repl_inner(sh);
    seq = atomic_load(&s->applies[n]); /* before the read: no wakeup is missed */
    useq = atomic_load(&s->urgent[n]);
    /* Pushes feed it (shard_repl.h): what it acked by them is newer than
     * this pull's position, which is where the entries start. */
    from = a.after;
    fed = shard_repl_push_fed(sh, a.node, &acked);
    if (fed && acked.lsn > from.lsn)
        from = acked;
    /* A content check's checkpoint (shard_repl.h): nothing past it. */
    capped = shard_repl_checkpoint(sh, a.node, &cp, &cp_id) && from.lsn <= cp.lsn;
    e.upto = capped ? cp.lsn : 0;
    count = capped && stream_pos_eq(&from, &cp)
                ? 0 /* there: a position of our history, nothing to send */
                : shard_lmdb_stream_read(local, &from, (size_t)a.max, stream_buf_add, &e);
    if (count > 0 && !capped && shard_repl_checkpoint(sh, a.node, &cp, &cp_id) &&
        from.lsn <= cp.lsn) {
        /* Set while we read (after our look, before entries past it
         * existed): read again, up to it. */
        free(e.buf);
        e = (struct stream_buf){.upto = cp.lsn};
        capped = 1;
        count = stream_pos_eq(&from, &cp)
                    ? 0
                    : shard_lmdb_stream_read(local, &from, (size_t)a.max, stream_buf_add, &e);
    }
    if (count == -ERANGE || count == -ESTALE) {
        /* Not a position we can continue from: a snapshot, whose tail we
         * keep from the position we name. */
        rc = shard_lmdb_position(local, &pos);
        if (rc == 0)
            rc = shard_repl_needs_snapshot(sh, a.node, &pos);
        if (rc < 0) {
            resp_error(r, rc, "stream: %s", strerror(-rc));
            return;
        }
        resp_error(r, count, "stream: %s",
                   count == -ERANGE ? "no longer retained" : "not our history");
        r->status = 409;
        position_header(r, &pos);
        return;
    }
    if (count < 0) {
        free(e.buf);
        resp_error(r, count, "stream: %s", strerror(-count));
        return;
    }
    /* The position is of our history (stream_read checked it): the ack. */
    rc = shard_repl_report(sh, a.node, &a.after, a.synced);
    if (rc == -EWOULDBLOCK || rc == -EINVAL) {
        free(e.buf);
        resp_error(r, rc == -EINVAL ? -EPERM : rc, "stream: report refused");
        return;
    }
    if (rc < 0)
        log_msg("shard %u: %s caught up, but could not rejoin the in-sync set: %s", n,
                s->cfg.nodes[a.node].name, strerror(-rc));
    shard_repl_checkpoint_done(sh, a.node, a.hashed);
    if (capped && !shard_repl_checkpoint(sh, a.node, &cp, &cp_id)) {
        capped = 0; /* the replica hashed at it already: it ended */
        if (stream_pos_eq(&from, &cp) && count == 0) {
            e.upto = 0;
            count = shard_lmdb_stream_read(local, &from, (size_t)a.max, stream_buf_add, &e);
            if (count < 0) {
                free(e.buf);
                resp_error(r, count, "stream: %s", strerror(-count));
                return;
            }
        }
    }
    want = shard_repl_sync_wanted(sh, a.node);
    now = clock_mono_ms();
    wait = pa && pa->deadline_ms ? pa->deadline_ms - now : (int64_t)a.wait;
    if (fed && !want && !capped && pa && wait > 0) {
        /* Fed by pushes: its pull only catches up what they missed, at
         * its deadline, or at once when a push fails or a sync or a
         * checkpoint wants it (urgent wakeups; applies are not, while
         * pushes carry the acks: shard_repl_acks_wanted). */
        int64_t until = pa->deadline_ms ? pa->deadline_ms : now + wait;

        *pa = (struct poll_ask){.deadline_ms = pa->deadline_ms, .linger_ms = until, .want = 1,
                                .shard = n, .seq = useq, .wait_ms = wait};
        resp_reset(r);
        free(e.buf);
        return;
    }
    if (count == 0 && !want && !capped && pa && wait > 0) {
        *pa = (struct poll_ask){.deadline_ms = pa->deadline_ms, .want = 1, .shard = n,
                                .seq = seq, .wait_ms = wait};
        resp_reset(r);
        free(e.buf);
        return; /* status 0: parked by the caller */
    }
    /* Entries, but nobody waits for their ack: gather more for a while
     * (DESIGN long polls, gathering). */
    if (count > 0 && !want && !capped && pa && a.wait > 0 && e.len < a.max / 2 &&
        !shard_repl_acks_wanted(sh)) {
        int64_t until = pa->linger_ms ? pa->linger_ms : now + STREAM_LINGER_MS;

        if (until > now) {
            *pa = (struct poll_ask){.deadline_ms = pa->deadline_ms, .linger_ms = until,
                                    .want = 1, .shard = n, .seq = useq,
                                    .wait_ms = wait > 0 ? wait : 1};
            resp_reset(r);
            free(e.buf);
            return;
        }
    }
    rc = shard_lmdb_position(local, &pos);
    if (rc < 0) {
        free(e.buf);
        resp_error(r, rc, "stream: position: %s", strerror(-rc));
        return;
    }
    resp_status(r, count ? 200 : 204);
    if (count) {
        r->body = e.buf;
        r->len = e.len;
        r->content_type = "application/octet-stream";
    } else {
        free(e.buf);
    }
    position_header(r, &pos);
    if (want)
        node_response_header(r, WIRE_HDR_SYNC, "%" PRIu64, want);
    if (capped) {
        node_response_header(r, WIRE_HDR_CHECKPOINT, STREAM_POS_FMT,
                             cp.epoch, cp.lsn, cp.check);
        node_response_header(r, WIRE_HDR_CHECKPOINT_ID, "%" PRIu64, cp_id);
    }
}

/* POST /v1/shard/N/push (wire.h): the primary's entries for our replica.
 * Served here whatever the map says of N: the replica side decides. */
static void op_push(struct node_server *s, const struct node_input *in, unsigned n,
                    struct node_response *r)
{
    char name[CONFIG_NAME_MAX + 1], after_s[STREAM_POS_TEXT_MAX];
    struct stream_pos after, pos = {0};
    uint64_t epoch, synced = 0;
    int from, rc;

    if (query_str(in->uri, "node", name, sizeof(name)) <= 0 ||
        query_u64(in->uri, "epoch", &epoch) <= 0 ||
        query_str(in->uri, "after", after_s, sizeof(after_s)) <= 0 ||
        stream_pos_parse(after_s, &after) < 0) {
        resp_error(r, -EINVAL, "push: bad or missing node, epoch or after");
        return;
    }
    from = config_node_index(&s->cfg, name);
    if (from < 0 || from == s->self) {
        resp_error(r, -EPERM, "push: %s is not a peer", name);
        return;
    }
    rc = s->push ? s->push(s->push_ctx, n, from, epoch, &after, in->body, in->body_len, &pos,
                           &synced)
                 : -EAGAIN;
    if (rc == -EWOULDBLOCK) {
        resp_error(r, rc, "push: busy"); /* thrown away: done again on a worker */
        return;
    }
    if (rc < 0) {
        resp_error(r, rc, "push: %s",
                   rc == -EAGAIN ? "this copy takes no pushes now" : strerror(-rc));
        if (rc == -EAGAIN || rc == -ESTALE) {
            r->status = 409;
            snprintf(r->errno_name, sizeof(r->errno_name), "%s",
                     rc == -EAGAIN ? "EAGAIN" : "ESTALE");
        }
        return;
    }
    {
        char v[STREAM_POS_TEXT_MAX]; /* a string: JSON numbers lose u64 bits */

        snprintf(v, sizeof(v), STREAM_POS_FMT, pos.epoch, pos.lsn, pos.check);
        node_response_json(r, json_pack("{s:s,s:o}", "position", v, "synced", json_u64(synced)));
    }
}

/* One replica of the position route's reply; NULL when out of memory. */
static json_t *replica_json(struct node_server *s, const struct shard_repl_peer *p)
{
    const char *name = p->node >= 0 && (unsigned)p->node < s->cfg.node_count
                           ? s->cfg.nodes[p->node].name
                           : "?";

    return json_pack("{s:s,s:b,s:b,s:o,s:o,s:o,s:o,s:o,s:I,s:b}", "node", name, "in_sync",
                     p->in_sync, "joining", p->joining, "join_lsn", json_u64(p->join_lsn),
                     "lsn", json_u64(p->applied.lsn), "synced", json_u64(p->synced_lsn),
                     "lag_batches", json_u64(p->lag_batches), "lag_ms", json_u64(p->lag_ms),
                     "last_report_ms", (json_int_t)p->last_report_ms, "snapshot",
                     p->needs_snapshot);
}

/* GET /v1/shard/N/position (wire.h). */
static void op_position(struct node_server *s, unsigned n, struct node_response *r)
{
    struct shard *sh = shard_unwrap(__atomic_load_n(&s->shards[n], __ATOMIC_ACQUIRE));
    struct shard_repl_status st = {0};
    struct stream_pos pos;
    char check[24];
    json_t *reps;
    int rc = -ENOENT;

    /* under the lock: a copy dropped (node_server_set_local) is not closed
     * under us */
    if (s->local) {
        pthread_mutex_lock(&s->local_lock);
        if (s->local[n])
            rc = shard_lmdb_position(s->local[n], &pos);
        pthread_mutex_unlock(&s->local_lock);
    }
    if (rc == -ENOENT) {
        resp_error(r, -ENOENT, "shard %u has no change stream here", n);
        return;
    }
    if (rc == 0 && shard_repl_is(sh))
        rc = shard_repl_status(sh, &st);
    if (rc < 0) {
        resp_error(r, rc, "position: %s", strerror(-rc));
        return;
    }
    reps = json_array();
    for (unsigned i = 0; reps && i < st.nreplicas; i++)
        if (json_array_append_new(reps, replica_json(s, &st.replicas[i])) < 0) {
            json_decref(reps);
            reps = NULL;
        }
    snprintf(check, sizeof(check), "%" PRIu64, pos.check);
    node_response_json(r, reps ? json_pack("{s:o,s:o,s:s,s:o}", "epoch", json_u64(pos.epoch), "lsn",
                                  json_u64(pos.lsn), "check", check, "replicas", reps)
                      : NULL);
    if (r->status == 200)
        position_header(r, &pos);
}

/* The node that serves shard n, or -1 while it has none: the map's
 * primary, or the config's owner without a map. */
static int server_of(struct node_server *s, unsigned n)
{
    struct shard_copies c;

    if (!s->map) /* a shard split off another lives beside it: its owner */
        return config_shard_owner(&s->cfg, n);
    if (shard_map_get(s->map, n, &c) < 0 || c.primary < 0 ||
        (unsigned)c.primary >= s->cfg.node_count)
        return -1;
    return c.primary;
}

/* ---- layouts (wire.h, "Layouts") ---- */

/* 1 if key is a record that this node's layout homes on a shard other than
 * n. Keys that are not placed (a shard's own records) are n's. */
static int key_elsewhere(const struct node_server *s, unsigned n, const uint8_t *k, size_t kl)
{
    uint64_t h;

    if (placement_key_hash(k, kl, &h) < 0)
        return 0;
    return placement_home(h, s->cfg.depth, s->slots) != n;
}

/* The first key of a request for op that is not n's, or NULL: a get's key,
 * a getv's reads, an apply's point operations (a range's bounds need not
 * be records: the depth check covers ranges and scans). A malformed body
 * names none; the op refuses it. */
static const char *foreign_key(const struct node_server *s, unsigned n, enum wire_op op,
                               const uint8_t *body, size_t len)
{
    struct shard_read rd[SHARD_READS_MAX];
    struct batch_item it;
    size_t pos = 0;
    unsigned count = 0;

    switch (op) {
    case WIRE_OP_GET:
        return key_elsewhere(s, n, body, len) ? "get" : NULL;
    case WIRE_OP_GETV:
        if (wire_getv_request_decode(body, len, rd, &count) != 0)
            return NULL;
        for (unsigned i = 0; i < count; i++)
            if (key_elsewhere(s, n, rd[i].key, rd[i].klen))
                return "getv";
        return NULL;
    case WIRE_OP_APPLY:
        while (batch_next(body, len, &pos, &it) == 1)
            if (it.op != BATCH_DEL_RANGE && it.op != BATCH_ASSERT_EMPTY &&
                key_elsewhere(s, n, it.key, it.klen))
                return "apply";
        return NULL;
    default:
        return NULL;
    }
}

/* 1 with 421 EBADSLT in r when a data op must not be served here: the
 * sender's depth of shard n is not ours, or it names a key that is not
 * n's; 0 to serve it. */
static int layout_refuses(struct node_server *s, const struct node_input *in, unsigned n,
                          enum wire_op op, struct node_response *r)
{
    unsigned mine = s->cfg.depth[n];
    uint64_t theirs = 0;
    const char *what;
    int said;

    if (!wire_op_has_layout(op))
        return 0;
    said = query_u64(in->uri, "depth", &theirs); /* a sender from before layouts says none */
    if (said < 0) {
        resp_error(r, -EINVAL, "bad depth");
        return 1;
    }
    if (said && theirs != mine) {
        resp_error(r, -EBADSLT, "shard %u has depth %u here, not %" PRIu64 ": the layout changed",
                   n, mine, theirs);
        node_response_header(r, WIRE_HDR_DEPTH, "%u", mine);
        return 1;
    }
    what = foreign_key(s, n, op, in->body, in->body_len);
    if (what) {
        resp_error(r, -EBADSLT, "%s of a key that is not shard %u's", what, n);
        node_response_header(r, WIRE_HDR_DEPTH, "%u", mine);
        return 1;
    }
    return 0;
}

/* 1 with r filled when n is no shard of the layout: a data op that says
 * its depth (its sender has a layout with shard n) gets 421 EBADSLT with
 * the depth of the shard that holds n's keys here (a merge took n), so the
 * sender merges too; anything else 400. */
static int not_a_shard(struct node_server *s, const struct node_input *in, unsigned n,
                       enum wire_op op, struct node_response *r)
{
    struct shard_copies c;
    char d[8];
    int said = query_str(in->uri, "depth", d, sizeof(d)) > 0;

    if (!wire_op_has_layout(op) ? n < (s->map ? CONFIG_MAX_SHARDS : s->cfg.shard_count)
                       : n < s->slots && placement_is_shard(s->cfg.depth, n))
        return 0;
    /* A shard the map holds but the layout does not place yet (a split's
     * target, building): its replicas copy it by scans that name no depth
     * (replica_sync.c, the snapshot). */
    if (wire_op_has_layout(op) && !said && s->map && n < CONFIG_MAX_SHARDS &&
        shard_map_get(s->map, n, &c) == 0)
        return 0;
    if (wire_op_has_layout(op) && n < CONFIG_MAX_SHARDS && said) {
        unsigned d = s->cfg.depth[n & (s->slots - 1)];

        resp_error(r, -EBADSLT, "no shard %u here: its keys are on a shard of depth %u", n, d);
        node_response_header(r, WIRE_HDR_DEPTH, "%u", d);
        return 1;
    }
    resp_error(r, -EINVAL, "no shard %u (the store has %u)", n, s->cfg.shard_count);
    return 1;
}

static void route_shard_held(struct node_server *s, const struct node_input *in, unsigned n,
                             enum wire_op op, struct poll_ask *pa, struct node_response *r);

static void route_shard(struct node_server *s, const struct node_input *in, unsigned n,
                        enum wire_op op, struct poll_ask *pa, struct node_response *r)
{
    if (!wire_op_has_layout(op)) {
        route_shard_held(s, in, n, op, pa, r);
        return;
    }
    /* An I/O thread must not wait: a cut-over in progress sends the
     * request to a worker (shard.h, no-waiting mode). */
    if (shard_nowait_active()) {
        if (pthread_rwlock_tryrdlock(&s->layout_lock) != 0) {
            shard_nowait_refuse();
            resp_error(r, -EWOULDBLOCK, "the layout is changing");
            return;
        }
    } else {
        pthread_rwlock_rdlock(&s->layout_lock);
    }
    route_shard_held(s, in, n, op, pa, r);
    pthread_rwlock_unlock(&s->layout_lock);
}

static void route_shard_held(struct node_server *s, const struct node_input *in, unsigned n,
                             enum wire_op op, struct poll_ask *pa, struct node_response *r)
{
    struct shard *sh;
    uint64_t epoch, seen;
    int want_get = op == WIRE_OP_STAT || op == WIRE_OP_STREAM || op == WIRE_OP_POSITION;
    int server;

    if (not_a_shard(s, in, n, op, r))
        return;
    if (parse_u64(header(in, WIRE_HDR_EPOCH), &epoch) < 0) {
        resp_error(r, -EINVAL, "missing or bad " WIRE_HDR_EPOCH);
        return;
    }
    if (op == WIRE_OP_PUSH && strcmp(in->method, "POST") == 0) {
        op_push(s, in, n, r); /* to this node's replica, wherever the primary is */
        return;
    }
    if (strcmp(in->method, want_get ? "GET" : "POST") != 0) {
        resp_error(r, -EINVAL, "%s wants %s", wire_op_name(op), want_get ? "GET" : "POST");
        r->status = 405;
        r->errno_name[0] = '\0';
        node_response_header(r, MHD_HTTP_HEADER_ALLOW, "%s", want_get ? "GET" : "POST");
        return;
    }
    server = server_of(s, n);
    if (server < 0) {
        resp_error(r, -EIO, "shard %u has no primary at the moment", n);
        r->status = 503; /* try again */
        r->errno_name[0] = '\0';
        return;
    }
    sh = server == s->self ? __atomic_load_n(&s->shards[n], __ATOMIC_ACQUIRE) : NULL;
    if (!sh && server == s->self) {
        /* The map names us, and the failover thread is about to take the
         * role (a promotion or handover just made): try again. */
        resp_error(r, -EIO, "shard %u is ours but not open yet", n);
        r->status = 503;
        r->errno_name[0] = '\0';
        return;
    }
    if (!sh || epoch < s->cfg.epoch) {
        redirect(s, server, in->uri, r);
        return;
    }
    if (epoch > s->cfg.epoch) {
        seen = atomic_load(&s->newest_epoch);
        while (epoch > seen && !atomic_compare_exchange_weak(&s->newest_epoch, &seen, epoch))
            ;
        if (epoch > seen)
            log_msg("a peer uses config epoch %" PRIu64 ", ours is %" PRIu64
                    "; serving shard %u anyway",
                    epoch, s->cfg.epoch, n);
    }
    if (layout_refuses(s, in, n, op, r))
        return;
    switch (op) {
    case WIRE_OP_GET:
        op_get(sh, in->uri, in->body, in->body_len, r);
        return;
    case WIRE_OP_SCAN:
        op_scan(sh, in->uri, in->body, in->body_len, r);
        return;
    case WIRE_OP_APPLY:
        op_apply(sh, in->body, in->body_len, r);
        return;
    case WIRE_OP_SYNC:
        op_sync(sh, in->body_len, r);
        return;
    case WIRE_OP_STAT:
        op_stat(sh, r);
        return;
    case WIRE_OP_GETV:
        op_getv(sh, in->body, in->body_len, r);
        return;
    case WIRE_OP_STREAM:
        op_stream(s, sh, n, in->uri, pa, r);
        return;
    case WIRE_OP_POSITION:
        op_position(s, n, r);
        return;
    case WIRE_OP_PUSH:
        break; /* above */
    }
    resp_error(r, -EINVAL, "unknown op");
}

static void route_config(struct node_server *s, const char *method, struct node_response *r)
{
    json_t *shards, *doc;

    if (strcmp(method, "GET") != 0) {
        resp_status(r, 405);
        node_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET");
        return;
    }
    shards = json_array();
    for (unsigned i = 0; shards && i < s->cfg.shard_count; i++) {
        const char *url = s->cfg.nodes[s->cfg.owner[i]].url;
        if (json_array_append_new(shards, json_stringn(url, url_base_len(url))) < 0) {
            json_decref(shards);
            shards = NULL;
        }
    }
    doc = shards ? json_pack("{s:o,s:s,s:o}", "epoch", json_u64(s->cfg.epoch), "node",
                             s->cfg.nodes[s->self].name, "shards", shards)
                 : NULL;
    node_response_json(r, doc);
}

/* The path part of raw (up to '?') percent-decoded into a new string of
 * *len bytes: %XX with two hex digits is the byte XX, anything else is
 * itself, as libmicrohttpd decodes. Decoded here rather than taken from
 * MHD's url because MHD hands the url over as a C string, which a %00
 * silently cuts short. NULL when out of memory. */
static char *decode_path(const char *raw, size_t *len)
{
    size_t n = strcspn(raw, "?");
    char *out = malloc(n + 1);
    int rc = out ? percent_decode(raw, n, 0, out, n + 1) : -ENOMEM;

    if (rc < 0) { /* cannot be -ENAMETOOLONG: decoding never lengthens */
        free(out);
        return NULL;
    }
    *len = (size_t)rc;
    return out;
}

static void route_other(struct node_server *s, const struct node_input *in, struct node_response *r)
{
    struct node_request req = {
        .method = in->method,
        .body = in->body_len ? in->body : NULL,
        .body_len = in->body_len,
        .in = in,
    };
    char *path = NULL;
    int rc;

    if (!s->other) {
        resp_error(r, -ENOENT, "no such path");
        return;
    }
    path = decode_path(in->uri, &req.path_len);
    if (!path) {
        resp_error(r, -ENOMEM, "out of memory");
        return;
    }
    req.path = path;
    resp_reset(r);
    rc = s->other(s->other_ctx, &req, r);
    if (rc < 0) {
        resp_error(r, rc, "%s", strerror(-rc));
        goto out;
    }
    if (rc > 0 || r->status < 200 || r->status > 599) {
        log_msg("the handler for %s %s gave status %d (rc %d)", in->method, path, r->status, rc);
        resp_error(r, -EIO, "internal error");
        goto out;
    }
out:
    free(path);
}

/* The public API's alternative to a signature, for clients that cannot sign
 * (curl): "Authorization: Bearer SECRET" on a /v1/kv path. The comparison
 * takes the same time wherever the first difference is. */
static int bearer_ok(const struct node_server *s, const struct node_input *in)
{
    const char *h = header(in, MHD_HTTP_HEADER_AUTHORIZATION), *uri = in->uri;
    size_t slen = strlen(s->cfg.secret);

    if (!h || strncmp(uri, NODE_KV_PREFIX, strlen(NODE_KV_PREFIX)) != 0 ||
        !strchr("/?", uri[strlen(NODE_KV_PREFIX)]))
        return 0;
    if (strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    return slen > 0 && strlen(h) == slen && CRYPTO_memcmp(h, s->cfg.secret, slen) == 0;
}

/* How a request proved itself. */
enum auth {
    AUTH_REFUSED = -1, /* r holds the refusal */
    AUTH_BEARER,
    AUTH_SIGNED, /* *ws holds what was signed */
};

/* Steps 2 and 4: who sent in, from its headers alone. A signed request must
 * be signed for this node's URL (so one captured on its way to another node
 * fails here) and within the clock window; with record (step 2), its nonce
 * must be new, and is remembered. */
static enum auth authenticate(struct node_server *s, const struct node_input *in, int record,
                              struct wire_signed *ws, struct node_response *r)
{
    const char *cl = header(in, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *epoch = header(in, WIRE_HDR_EPOCH), *auth = header(in, WIRE_HDR_AUTH);
    uint8_t nonce[WIRE_NONCE_BYTES];
    int64_t now = in->now;
    uint64_t len = 0;
    int rc;

    if (bearer_ok(s, in))
        return AUTH_BEARER;
    /* No Content-Length is no body (a chunked one then must be empty). */
    *ws = (struct wire_signed){
        .method = in->method,
        .node_url = s->cfg.nodes[s->self].url,
        .path_query = in->uri,
        .epoch = epoch ? epoch : "",
        .nonce = header(in, WIRE_HDR_NONCE),
        .digest = header(in, WIRE_HDR_DIGEST),
    };
    if (parse_date(header(in, WIRE_HDR_DATE), &ws->date) < 0 || (cl && parse_u64(cl, &len) < 0) ||
        !ws->nonce || !ws->digest)
        goto refused;
    ws->body_len = len;
    if (wire_verify(s->cfg.secret, ws, now, auth) < 0)
        goto refused;
    if (!record)
        return AUTH_SIGNED;
    wire_hex_decode(ws->nonce, WIRE_NONCE_LEN, nonce); /* well-formed: wire_verify */
    rc = nonce_cache_add(s->nonces, nonce, ws->date, now);
    if (rc == 0)
        return AUTH_SIGNED;
    if (rc == -EBUSY) {
        int64_t last = atomic_load(&s->busy_logged);

        if (now - last >= BUSY_LOG_S && atomic_compare_exchange_strong(&s->busy_logged, &last, now))
            log_msg("refusing signed requests (503): %u nonces of the last %d s remembered, "
                    "no room for more",
                    NONCE_MAX, NONCE_MIN_KEEP_S);
        resp_error(r, -EIO, "busy: no room to remember this request's nonce");
        r->status = 503;
        r->errno_name[0] = '\0';
        return AUTH_REFUSED;
    }
    resp_error(r, -EACCES, "not authenticated: %s",
               rc == -EEXIST ? "a replay (this nonce was used before)"
                             : "the date is older than the nonces this node remembers");
    return AUTH_REFUSED;
refused:
    resp_error(r, -EACCES, "not authenticated");
    return AUTH_REFUSED;
}

/* Step 4: the whole request is here. pa: where a stream request may be
 * parked as a long poll (r->status is then 0), or NULL. */
static void handle(struct node_server *s, const struct node_input *in, struct node_response *r,
                   struct poll_ask *pa)
{
    char path[WIRE_PATH_MAX], got[WIRE_DIGEST_LEN + 1];
    struct wire_signed ws;
    size_t plen;
    unsigned n;
    enum wire_op op;
    int rc;

    memset(r, 0, sizeof(*r));
    rc = authenticate(s, in, 0, &ws, r);
    if (rc == AUTH_REFUSED)
        return;
    if (rc == AUTH_SIGNED) {
        if (!in->body_digest)
            wire_body_mac(s->cfg.secret, ws.nonce, in->body, in->body_len, got);
        if (in->body_len != ws.body_len ||
            strcmp(in->body_digest ? in->body_digest : got, ws.digest) != 0) {
            resp_error(r, -EACCES, "not authenticated: the body is not the one signed (%s, %s)",
                       WIRE_HDR_DIGEST, MHD_HTTP_HEADER_CONTENT_LENGTH);
            return;
        }
    }
    if (!target_is_clean(in->uri)) {
        resp_error(r, -EINVAL, "control character or space in the request target");
        return;
    }

    plen = strcspn(in->uri, "?");
    if (plen >= sizeof(path)) {
        if (strncmp(in->uri, "/v1/shard/", 10) == 0) {
            resp_error(r, -ENAMETOOLONG, "path too long");
            return;
        }
        route_other(s, in, r);
        return;
    }
    memcpy(path, in->uri, plen);
    path[plen] = '\0';
    if (strcmp(path, "/v1/config") == 0) {
        route_config(s, in->method, r);
        return;
    }
    rc = wire_parse_shard_path(path, &n, &op);
    if (rc == -ENOENT) {
        route_other(s, in, r);
        return;
    }
    if (rc < 0) {
        resp_error(r, -EINVAL, "malformed shard path");
        return;
    }
    route_shard(s, in, n, op, pa, r);
}

void node_server_handle(struct node_server *s, const struct node_input *in, struct node_response *r)
{
    handle(s, in, r, NULL);
}

/* Step 2: what can be refused from the headers alone. */
int node_server_precheck(struct node_server *s, const struct node_input *in,
                         struct node_response *r)
{
    const char *cl = header(in, MHD_HTTP_HEADER_CONTENT_LENGTH);
    struct wire_signed ws;
    uint64_t n = 0;

    memset(r, 0, sizeof(*r));
    if (cl && parse_u64(cl, &n) == 0 && n > WIRE_BODY_MAX) {
        resp_error(r, -EFBIG, "body over %u bytes", WIRE_BODY_MAX);
        return 1;
    }
    return authenticate(s, in, 1, &ws, r) == AUTH_REFUSED;
}

/* Step 3: one piece of the body. 0, or -EFBIG over the cap, -ENOMEM, -EIO
 * (the digest failed). */
static int body_append(struct request *rq, const char *data, size_t n)
{
    if (n > WIRE_BODY_MAX - rq->len)
        return -EFBIG;
    if (rq->digest && wire_digest_update(rq->digest, data, n) < 0)
        return -EIO;
    if (rq->len + n > rq->cap) {
        size_t cap = rq->cap ? rq->cap : BODY_FIRST_ALLOC;
        uint8_t *p;

        while (cap < rq->len + n)
            cap = cap > WIRE_BODY_MAX / 2 ? WIRE_BODY_MAX : cap * 2;
        p = realloc(rq->body, cap);
        if (!p)
            return -ENOMEM;
        rq->body = p;
        rq->cap = cap;
    }
    memcpy(rq->body + rq->len, data, n);
    rq->len += n;
    return 0;
}

/* Step 3's buffer at its final size, for an authentic request that says
 * how long its body is: growing it by doubling copied a 1 MiB write's body
 * once more on its way in. A failure leaves the doubling to body_append. */
static void body_reserve(struct request *rq, const char *content_length)
{
    uint64_t n;

    if (rq->cap || !content_length || parse_u64(content_length, &n) < 0 ||
        n <= BODY_FIRST_ALLOC || n > WIRE_BODY_MAX)
        return;
    rq->body = malloc(n);
    rq->cap = rq->body ? n : 0;
}

/* ---- MHD callbacks ---- */

static const char *mhd_header(void *conn, const char *name)
{
    return MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
}

static const char *mhd_query(void *conn, const char *name)
{
    return MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, name);
}

/* What the handlers see of a request on conn; the body as buffered so far. */
static struct node_input mhd_input(struct MHD_Connection *conn, const struct request *rq,
                                   const char *url, const char *method)
{
    return (struct node_input){
        .method = method,
        .uri = rq->uri,
        .path = url,
        .body = rq->len ? rq->body : NULL,
        .body_len = rq->len,
        .body_digest = rq->body_digest[0] ? rq->body_digest : NULL,
        .now = rq->now,
        .header = mhd_header,
        .query = mhd_query,
        .ctx = conn,
    };
}

/* Step 1. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    struct request *rq = calloc(1, sizeof(*rq));

    (void)conn;
    if (rq) {
        rq->srv = cls;
        rq->uri = strdup(uri ? uri : "");
        rq->now = (int64_t)time(NULL);
    }
    return rq;
}

/* Step 2 refused the request. A reply queued before the body has been read
 * closes the connection (libmicrohttpd reads no further request on it, even
 * when there was no body), and closing with unread data makes the kernel
 * send a reset that can destroy the reply on its way to the client. So the
 * reply waits for the end of a small body, or of none, which is read and
 * dropped (curl sends a small body with the headers); a body that may be
 * large (over EARLY_REFUSE_MIN, or chunked), or that the client holds back
 * until "100 Continue", is refused at once and never read. */
static enum MHD_Result refuse(struct MHD_Connection *conn, struct request *rq,
                              const struct node_input *in, struct node_response *r)
{
    const char *cl = header(in, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *expect = header(in, MHD_HTTP_HEADER_EXPECT);
    uint64_t n = 0;

    if ((!cl || (parse_u64(cl, &n) == 0 && n <= EARLY_REFUSE_MIN)) &&
        !header(in, MHD_HTTP_HEADER_TRANSFER_ENCODING) && !(expect && expect[0]) &&
        (rq->refusal = malloc(sizeof(*r)))) {
        *rq->refusal = *r;
        return MHD_YES;
    }
    rq->replied = 1;
    return send_response(rq->srv, conn, r);
}

/* The reaper's record of conn (on_connection), or NULL. */
static struct conn_track *track_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

    return ci ? ci->socket_context : NULL;
}

/* Where a request may run (DESIGN threads). */
enum run_where {
    RUN_INLINE, /* on the I/O thread: nothing in it waits */
    RUN_TRY,    /* on the I/O thread in no-waiting mode, else on a worker */
    RUN_WORKER, /* on a worker */
};

static enum run_where run_where(struct node_server *s, const struct node_input *in,
                                struct pool **pool)
{
    size_t plen = strcspn(in->uri, "?");
    char path[WIRE_PATH_MAX];
    uint64_t limit = WIRE_SCAN_LIMIT_MAX;
    enum wire_op op;
    unsigned n;

    *pool = &s->api_pool;
    if (plen < sizeof(path)) {
        memcpy(path, in->uri, plen);
        path[plen] = '\0';
        if (strcmp(path, "/v1/config") == 0)
            return RUN_INLINE;
        switch (wire_parse_shard_path(path, &n, &op)) {
        case 0:
            /* Never behind the handler's requests, which wait for other
             * nodes' shard ops: two nodes would wait for each other. */
            *pool = &s->shard_pool;
            if (op == WIRE_OP_STREAM || op == WIRE_OP_POSITION || op == WIRE_OP_PUSH) {
                /* Replicas' acks: never queued behind applies that wait
                 * for those very acks. */
                *pool = &s->stream_pool;
                return RUN_TRY;
            }
            if (in->body_len > INLINE_BODY_MAX)
                return RUN_WORKER; /* a large batch takes a while to apply */
            if (op == WIRE_OP_SYNC)
                return RUN_WORKER; /* an fsync */
            if (op == WIRE_OP_SCAN && (query_u64(in->uri, "limit", &limit) < 0 ||
                                       limit > SCAN_INLINE_MAX))
                return RUN_WORKER; /* up to WIRE_SCAN_REPLY_MAX of records */
            return RUN_TRY;
        case -ENOENT:
            break; /* the handler's */
        default:
            return RUN_INLINE; /* a malformed shard path: 400 */
        }
    }
    if (in->body_len > INLINE_BODY_MAX)
        return RUN_WORKER;
    /* The handler's GET and HEAD are reads (node_server.h). */
    return strcmp(in->method, "GET") == 0 || strcmp(in->method, "HEAD") == 0 ? RUN_TRY
                                                                             : RUN_WORKER;
}

/* ---- long polls (DESIGN long polls) ---- */

/* Resume the parked requests of list (linked by poll_next), to be handled
 * again; not under poll_lock. A request may be done and freed as soon as
 * its connection is resumed: read what is needed first. */
static void polls_resume(struct request *list)
{
    while (list) {
        struct request *rq = list;

        list = rq->poll_next;
        rq->poll_next = NULL;
        rq->poll_pprev = NULL;
        MHD_resume_connection(rq->conn);
    }
}

/* Unlink rq from its shard's list into *out (poll_next); under poll_lock. */
static void poll_unlink(struct request *rq, struct request **out)
{
    *rq->poll_pprev = rq->poll_next;
    if (rq->poll_next)
        rq->poll_next->poll_pprev = rq->poll_pprev;
    rq->poll_woken = 1;
    rq->poll_next = *out;
    *out = rq;
}

/* A batch was applied to (or a sync waits for the replicas of) shard
 * index: its long polls are answered again; the lingering ones only when
 * urgent (an ack is waited for). Runs on the thread that applied, no
 * shard lock held. */
static void polls_wake_as(struct node_server *s, unsigned index, int urgent)
{
    struct request *woken = NULL, *rq, *following;

    if (index >= CONFIG_MAX_SHARDS)
        return;
    if (urgent)
        atomic_fetch_add(&s->urgent[index], 1);
    atomic_fetch_add(&s->applies[index], 1);
    pthread_mutex_lock(&s->poll_lock);
    for (rq = s->polls[index]; rq; rq = following) {
        following = rq->poll_next;
        if (urgent || !rq->poll_linger_ms)
            poll_unlink(rq, &woken);
    }
    pthread_mutex_unlock(&s->poll_lock);
    polls_resume(woken);
}

/* A wrapper's waits (a sync, an ack barrier) are urgent. */
static void polls_wake(void *ctx, unsigned index)
{
    polls_wake_as(ctx, index, 1);
}

/* An apply is urgent when a writer of the shard waits for its acks. A
 * shard we do not serve as a replicated primary has no lingering polls.
 * Wrappers replaced by a failover stay allocated until the namespace
 * closes (failover.c), after the server stopped: the load is safe. */
static void on_apply(void *ctx, unsigned index, const struct stream_pos *p)
{
    struct node_server *s = ctx;
    struct shard *sh;

    (void)p;
    if (index >= CONFIG_MAX_SHARDS)
        return;
    sh = shard_unwrap(__atomic_load_n(&s->shards[index], __ATOMIC_ACQUIRE));
    polls_wake_as(s, index, !shard_repl_is(sh) || shard_repl_acks_wanted(sh));
}

/* When the timer resumes rq: its deadline, or the end of its lingering. */
static int64_t poll_due_ms(const struct request *rq)
{
    return rq->poll_linger_ms && rq->poll_linger_ms < rq->poll_deadline_ms ? rq->poll_linger_ms
                                                                             : rq->poll_deadline_ms;
}

/* Park rq, whose connection is suspended, until its shard's next wakeup or
 * its deadline (from the first time it parked). Should the shard have been
 * woken since pa's read, or the server be stopping, rq is resumed at once
 * (stopping: with its deadline passed, so it is answered 204). */
static void poll_park(struct node_server *s, struct request *rq, const struct poll_ask *pa)
{
    struct request *now = NULL;

    pthread_mutex_lock(&s->poll_lock);
    if (!rq->poll_deadline_ms)
        rq->poll_deadline_ms = clock_mono_ms() + pa->wait_ms;
    rq->poll_linger_ms = pa->linger_ms;
    if (s->poll_stop)
        rq->poll_deadline_ms = 1;
    if (s->poll_stop ||
        atomic_load(pa->linger_ms ? &s->urgent[pa->shard] : &s->applies[pa->shard]) != pa->seq) {
        rq->poll_woken = 1;
        now = rq;
    } else {
        rq->poll_next = s->polls[pa->shard];
        if (rq->poll_next)
            rq->poll_next->poll_pprev = &rq->poll_next;
        rq->poll_pprev = &s->polls[pa->shard];
        s->polls[pa->shard] = rq;
        if (poll_due_ms(rq) < s->poll_next_ms)
            pthread_cond_signal(&s->poll_wake); /* the earliest deadline now */
    }
    pthread_mutex_unlock(&s->poll_lock);
    polls_resume(now);
}

/* The poll timer: resumes each parked request at its deadline. */
static void *poll_timer_main(void *arg)
{
    struct node_server *s = arg;

    pthread_setname_np(pthread_self(), "node-polls");
    pthread_mutex_lock(&s->poll_lock);
    for (;;) {
        struct request *due = NULL;
        int64_t now = clock_mono_ms(), next = now + 60000;
        struct timespec t;

        for (unsigned n = 0; n < CONFIG_MAX_SHARDS; n++) {
            struct request *rq = s->polls[n];

            while (rq) {
                struct request *following = rq->poll_next;

                if (s->poll_stop || poll_due_ms(rq) <= now) {
                    if (s->poll_stop)
                        rq->poll_deadline_ms = 1;
                    poll_unlink(rq, &due);
                } else if (poll_due_ms(rq) < next) {
                    next = poll_due_ms(rq);
                }
                rq = following;
            }
        }
        if (due) {
            pthread_mutex_unlock(&s->poll_lock);
            polls_resume(due);
            pthread_mutex_lock(&s->poll_lock);
            continue;
        }
        if (s->poll_stop)
            break;
        t.tv_sec = (time_t)(next / 1000);
        t.tv_nsec = (long)(next % 1000) * 1000000L;
        s->poll_next_ms = next;
        pthread_cond_timedwait(&s->poll_wake, &s->poll_lock, &t);
        s->poll_next_ms = 0; /* scanning: a new poll need not signal */
    }
    pthread_mutex_unlock(&s->poll_lock);
    return NULL;
}

/* A worker: answer the request, and give the connection back to MHD, which
 * calls on_request again to send rq->resp (or park it: a long poll). */
static void request_job(struct job *job)
{
    struct request *rq = (struct request *)((char *)job - offsetof(struct request, job));
    struct node_input in = mhd_input(rq->conn, rq, rq->url, rq->method);
    struct poll_ask pa = {.deadline_ms = rq->poll_deadline_ms, .linger_ms = rq->poll_linger_ms};

    handle(rq->srv, &in, &rq->resp, &pa);
    if (pa.want) {
        poll_park(rq->srv, rq, &pa); /* the connection is suspended already */
        return;
    }
    rq->answered = 1;
    MHD_resume_connection(rq->conn);
}

/* Step 4: answer here, or suspend the connection and queue the request (or
 * park it, a long poll). */
static enum MHD_Result dispatch(struct node_server *s, struct MHD_Connection *conn,
                                struct request *rq, const char *url, const char *method)
{
    struct node_input in = mhd_input(conn, rq, url, method);
    struct pool *pool;
    enum run_where where = run_where(s, &in, &pool);
    struct poll_ask pa = {.deadline_ms = rq->poll_deadline_ms, .linger_ms = rq->poll_linger_ms};
    struct node_response r;

    rq->conn = conn;
    rq->url = url;
    rq->method = method;
    if (where != RUN_WORKER) {
        if (where == RUN_TRY)
            shard_nowait_begin();
        handle(s, &in, &r, where == RUN_INLINE ? NULL : &pa);
        if (where == RUN_INLINE || !shard_nowait_end()) {
            if (!pa.want)
                return send_response(s, conn, &r);
            MHD_suspend_connection(conn);
            poll_park(s, rq, &pa);
            return MHD_YES;
        }
        resp_reset(&r); /* it would have waited: again, on a worker */
    }
    rq->job.run = request_job;
    MHD_suspend_connection(conn);
    if (pool_submit(pool, &rq->job) < 0) {
        resp_error(&rq->resp, -EIO, "the node is stopping");
        rq->resp.status = 503; /* try again (elsewhere) */
        rq->resp.errno_name[0] = '\0';
        rq->answered = 1;
        MHD_resume_connection(conn);
    }
    return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct node_server *s = cls;
    struct request *rq = *con_cls;
    struct node_response r = {0};
    struct conn_track *t;
    struct node_input in;
    int rc;

    (void)version;
    if (!rq || !rq->uri)
        return MHD_NO; /* out of memory in on_uri: drop the connection */
    if (rq->answered) {
        /* Back from a worker (dispatch). */
        rq->answered = 0;
        return send_response(s, conn, &rq->resp);
    }
    if (rq->poll_woken) {
        /* A long poll woken by an apply or its deadline: look again. */
        rq->poll_woken = 0;
        return dispatch(s, conn, rq, url, method);
    }
    if (rq->replied) {
        /* Refused early; MHD closes once the reply is out. Read nothing. */
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (!rq->started) {
        rq->started = 1;
        if ((t = track_of(conn)))
            atomic_store(&t->busy, 1); /* the headers are in: no deadline now */
        in = mhd_input(conn, rq, url, method);
        if (node_server_precheck(s, &in, &r))
            return refuse(conn, rq, &in, &r);
        /* Authentic: a signed body is tagged as it comes, checked in step 4,
         * which tags a body in one go when there is no tag here (no body, a
         * bearer request, or no memory for the tagger). */
        if (header(&in, WIRE_HDR_DIGEST) && has_body(&in))
            rq->digest = wire_digest_new(s->cfg.secret, header(&in, WIRE_HDR_NONCE));
        body_reserve(rq, header(&in, MHD_HTTP_HEADER_CONTENT_LENGTH));
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;

        *upload_data_size = 0;
        if (rq->refusal) /* at most EARLY_REFUSE_MIN: the Content-Length said so */
            return MHD_YES;
        if (rq->error) {
            /* Step 3: past the cap; drop it, and give up on endless bodies. */
            rq->discarded += n;
            return rq->discarded > DISCARD_MAX ? MHD_NO : MHD_YES;
        }
        rc = body_append(rq, upload_data, n);
        if (rc < 0) {
            free(rq->body);
            rq->body = NULL;
            rq->len = rq->cap = 0;
            rq->error = rc;
            rq->discarded = n;
        }
        return MHD_YES;
    }
    if (rq->refusal) {
        r = *rq->refusal;
        free(rq->refusal);
        rq->refusal = NULL;
        return send_response(s, conn, &r);
    }
    if (rq->digest) {
        if (rq->error)
            wire_digest_free(rq->digest);
        else if (wire_digest_final(rq->digest, rq->body_digest) < 0)
            rq->error = -EIO;
        rq->digest = NULL;
    }
    if (rq->error == -EFBIG)
        resp_error(&r, rq->error, "body over %u bytes", WIRE_BODY_MAX);
    else if (rq->error)
        resp_error(&r, rq->error, "cannot take the body: %s", strerror(-rq->error));
    else
        return dispatch(s, conn, rq, url, method);
    return send_response(s, conn, &r);
}

/* Step 7. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct request *rq = *con_cls;
    struct conn_track *t = track_of(conn);

    (void)cls;
    (void)toe;
    if (t) {
        /* Waiting for the next request's headers now (the reaper). */
        atomic_fetch_add(&t->done, 1);
        atomic_store(&t->busy, 0);
    }
    if (rq) {
        resp_reset(&rq->resp); /* a worker's reply that was never sent */
        free(rq->uri);
        free(rq->body);
        if (rq->refusal)
            free(rq->refusal->body);
        free(rq->refusal);
        wire_digest_free(rq->digest);
        free(rq);
        *con_cls = NULL;
    }
}

/* ---- connections and the header deadline (DESIGN threads) ---- */

/* MHD tells of every connection it accepts and, before closing its socket,
 * of its end. A connection we could not record (out of memory) only has
 * MHD's idle timeout. */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    struct node_server *s = cls;
    struct conn_track *t = *socket_context;
    const union MHD_ConnectionInfo *ci;

    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (!ci || !(t = calloc(1, sizeof(*t))))
            return;
        t->fd = ci->connect_fd;
        t->clock_ms = clock_mono_ms(); /* the first request's clock runs from the accept */
        pthread_mutex_lock(&s->conn_lock);
        t->next = s->conns;
        if (s->conns)
            s->conns->prev = t;
        s->conns = t;
        pthread_mutex_unlock(&s->conn_lock);
        *socket_context = t;
        return;
    }
    if (!t)
        return;
    pthread_mutex_lock(&s->conn_lock);
    if (t->prev)
        t->prev->next = t->next;
    else
        s->conns = t->next;
    if (t->next)
        t->next->prev = t->prev;
    pthread_mutex_unlock(&s->conn_lock);
    free(t);
    *socket_context = NULL;
}

/* The kernel's count of bytes received on fd: 0 and *n, or -1 if it does
 * not tell (no TCP_INFO, or a kernel before 4.1). */
static int bytes_received(int fd, uint64_t *n)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);

    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 ||
        len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
        return -1;
    *n = ti.tcpi_bytes_received;
    return 0;
}

/* One pass over the connections, under conn_lock; returns how many it shut. */
static unsigned reap(struct node_server *s, int64_t now)
{
    unsigned shut = 0;

    for (struct conn_track *t = s->conns; t; t = t->next) {
        unsigned done;
        uint64_t rx;

        if (t->shut || atomic_load(&t->busy))
            continue;
        done = atomic_load(&t->done);
        if (done != t->seen_done) {
            /* A request completed since the last pass: the next one's
             * clock starts with its first byte. */
            t->seen_done = done;
            t->clock_ms = 0;
            if (bytes_received(t->fd, &t->rx_mark) < 0)
                t->rx_mark = UINT64_MAX; /* cannot tell: MHD's idle timeout only */
            continue;
        }
        if (!t->clock_ms) {
            if (t->rx_mark == UINT64_MAX || bytes_received(t->fd, &rx) < 0 || rx == t->rx_mark)
                continue; /* idle between requests */
            t->clock_ms = now;
        }
        if (now - t->clock_ms >= HEADER_DEADLINE_MS) {
            /* MHD sees the end of the stream and closes the connection. */
            shutdown(t->fd, SHUT_RDWR);
            t->shut = 1;
            shut++;
        }
    }
    return shut;
}

static void *reaper_main(void *arg)
{
    struct node_server *s = arg;
    int64_t said_ms = 0;
    unsigned unsaid = 0;

    pthread_setname_np(pthread_self(), "node-reaper");
    pthread_mutex_lock(&s->conn_lock);
    while (!s->reaper_stop) {
        struct timespec t;
        int64_t now;

        clock_deadline_in(&t, REAPER_PERIOD_MS);
        pthread_cond_timedwait(&s->reaper_wake, &s->conn_lock, &t);
        if (s->reaper_stop)
            break;
        now = clock_mono_ms();
        unsaid += reap(s, now);
        pthread_mutex_lock(&s->log_lock);
        mhd_log_window(s, now);
        pthread_mutex_unlock(&s->log_lock);
        /* One line a minute at most: an attack must not fill the log. */
        if (unsaid && now - said_ms >= 60000) {
            log_msg("closed %u connection(s) that did not send a request's headers within %d s",
                    unsaid, HEADER_DEADLINE_MS / 1000);
            unsaid = 0;
            said_ms = now;
        }
    }
    pthread_mutex_unlock(&s->conn_lock);
    return NULL;
}

/* ---- the node_request accessors ---- */

const char *node_request_query(const struct node_request *req, const char *name)
{
    if (!req || !req->in || !req->in->query || !name)
        return NULL;
    return req->in->query(req->in->ctx, name);
}

const char *node_request_header(const struct node_request *req, const char *name)
{
    if (!req || !req->in || !name)
        return NULL;
    return header(req->in, name);
}

/* ---- start and stop ---- */

/* The url of this node (config_url_parse) into s->host, s->port and
 * s->addr. 0 or -errno with a reason. */
static int parse_listen_url(struct node_server *s, const char *url, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *ai = NULL;
    struct config_url u;
    char why[128];
    int rc;

    if (config_url_parse(url, &u, why, sizeof(why)) < 0) {
        set_err(err, errlen, "%s: bad url (%s)", url[0] ? url : "\"\"", why);
        return -EINVAL;
    }
    s->tls = u.tls;
    snprintf(s->host, sizeof(s->host), "%s", u.host);
    snprintf(s->port, sizeof(s->port), "%u", u.port);

    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    rc = getaddrinfo(s->host, s->port, &hints, &ai);
    if (rc != 0 || !ai) {
        set_err(err, errlen, "%s: cannot resolve '%s': %s", url, s->host, gai_strerror(rc));
        if (ai)
            freeaddrinfo(ai);
        return -EHOSTUNREACH;
    }
    if (ai->ai_addrlen > sizeof(s->addr) ||
        (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)) {
        freeaddrinfo(ai);
        set_err(err, errlen, "%s: unsupported address family", url);
        return -EAFNOSUPPORT;
    }
    memcpy(&s->addr, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    return 0;
}

/* ---- TLS ---- */

/* The whole of a small file as a NUL-terminated string; -errno. */
static int read_text_file(const char *path, char **out)
{
    FILE *f = fopen(path, "re");
    char *buf = NULL;
    size_t n;
    int rc = 0;

    *out = NULL;
    if (!f)
        return -errno;
    buf = malloc(TLS_FILE_MAX + 1);
    if (!buf) {
        rc = -ENOMEM;
        goto out;
    }
    n = fread(buf, 1, TLS_FILE_MAX + 1, f);
    if (ferror(f)) {
        rc = -EIO;
        goto out;
    }
    if (n > TLS_FILE_MAX) {
        rc = -EFBIG;
        goto out;
    }
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Check with libcrypto what MHD (GnuTLS) would only call "failed": the
 * certificate and key are PEM and belong together. 0 or -EINVAL with the
 * reason in why. */
static int check_cert_and_key(const char *cert_pem, const char *key_pem, char *why, size_t whylen,
                              int *bad_key)
{
    BIO *cb = BIO_new_mem_buf(cert_pem, -1), *kb = BIO_new_mem_buf(key_pem, -1);
    X509 *cert = cb ? PEM_read_bio_X509(cb, NULL, NULL, NULL) : NULL;
    EVP_PKEY *key = kb ? PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL) : NULL;
    int rc = -EINVAL;

    *bad_key = 0;
    if (!cert) {
        snprintf(why, whylen, "not a PEM certificate");
    } else if (!key) {
        *bad_key = 1;
        snprintf(why, whylen, "not an unencrypted PEM private key");
    } else if (X509_check_private_key(cert, key) != 1) {
        *bad_key = 1;
        snprintf(why, whylen, "the key does not match the certificate");
    } else {
        rc = 0;
    }
    X509_free(cert);
    EVP_PKEY_free(key);
    BIO_free(cb);
    BIO_free(kb);
    return rc;
}

/* This node's certificate and key from its tls_cert and tls_key, checked;
 * errors name the file and its conf line. */
static int load_tls(struct node_server *s, char *err, size_t errlen)
{
    const struct config_node *n = &s->cfg.nodes[s->self];
    char why[128];
    int rc, bad_key;

    rc = read_text_file(n->tls_cert, &s->tls_cert);
    if (rc < 0) {
        set_err(err, errlen, "%s:%d: tls_cert %s: %s", s->cfg.path, n->tls_cert_line, n->tls_cert,
                strerror(-rc));
        return rc;
    }
    rc = read_text_file(n->tls_key, &s->tls_key);
    if (rc < 0) {
        set_err(err, errlen, "%s:%d: tls_key %s: %s", s->cfg.path, n->tls_key_line, n->tls_key,
                strerror(-rc));
        return rc;
    }
    rc = check_cert_and_key(s->tls_cert, s->tls_key, why, sizeof(why), &bad_key);
    if (rc < 0)
        set_err(err, errlen, "%s:%d: %s %s: %s", s->cfg.path,
                bad_key ? n->tls_key_line : n->tls_cert_line, bad_key ? "tls_key" : "tls_cert",
                bad_key ? n->tls_key : n->tls_cert, why);
    return rc;
}

/* MHD says only "failed"; find out why by trying the bind ourselves. */
static int explain_bind_failure(struct node_server *s, char *err, size_t errlen)
{
    socklen_t alen =
        s->addr.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    int fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1, e = 0;

    if (fd < 0) {
        e = errno;
    } else {
        /* MHD sets SO_REUSEADDR too: only a live listener makes this fail. */
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&s->addr, alen) != 0 || listen(fd, 1) != 0)
            e = errno;
        close(fd);
    }
    if (e == EADDRINUSE) {
        set_err(err, errlen, "cannot listen on %s port %s: the port is already in use", s->host,
                s->port);
        return -EADDRINUSE;
    }
    if (e) {
        set_err(err, errlen, "cannot listen on %s port %s: %s", s->host, s->port, strerror(e));
        return -e;
    }
    set_err(err, errlen, "cannot start the HTTP server on %s port %s", s->host, s->port);
    return -EIO;
}

/* The locks and condition variables of s; the reaper waits on the
 * monotonic clock. With default attributes glibc's inits cannot fail. */
static int sync_init(struct node_server *s)
{
    pthread_condattr_t ca;

    if (pthread_condattr_init(&ca) != 0)
        return -ENOMEM;
    if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0) {
        pthread_condattr_destroy(&ca);
        return -EINVAL;
    }
    pthread_mutex_init(&s->log_lock, NULL);
    pool_init(&s->api_pool, "node-api", API_WORKERS);
    pool_init(&s->shard_pool, "node-shard", SHARD_WORKERS);
    pool_init(&s->stream_pool, "node-stream", STREAM_WORKERS);
    pthread_mutex_init(&s->conn_lock, NULL);
    pthread_cond_init(&s->reaper_wake, &ca);
    pthread_mutex_init(&s->poll_lock, NULL);
    pthread_mutex_init(&s->local_lock, NULL);
    pthread_cond_init(&s->poll_wake, &ca);
    pthread_condattr_destroy(&ca);
    {
        pthread_rwlockattr_t a;

        /* writer-preferring: a stream of requests cannot starve a cut-over */
        pthread_rwlockattr_init(&a);
        pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&s->layout_lock, &a);
        pthread_rwlockattr_destroy(&a);
    }
    s->sync_ready = 1;
    return 0;
}

/* Listen to the local copies' applies and the wrappers' syncs, for the long
 * polls (on = 0: stop listening). */
static void listeners_set(struct node_server *s, int on)
{
    for (unsigned n = 0; s->local && n < CONFIG_MAX_SHARDS; n++) {
        if (s->local[n])
            shard_lmdb_on_apply(s->local[n], on ? on_apply : NULL, s);
        if (shard_repl_is(shard_unwrap(s->shards[n])))
            shard_repl_on_sync_wanted(shard_unwrap(s->shards[n]), on ? polls_wake : NULL, s);
    }
}

int node_server_new_repl(const struct config *cfg, int self, struct shard *const *shards,
                         const struct node_server_repl *repl, node_handler_fn other,
                         void *other_ctx, struct node_server **out, char *err, size_t errlen)
{
    struct node_server *s = NULL;
    size_t count;

    *out = NULL;
    if (!cfg || self < 0 || (unsigned)self >= cfg->node_count || !shards ||
        (repl && (!repl->map || !repl->local))) {
        set_err(err, errlen, "node_server_start: bad arguments");
        return -EINVAL;
    }
    if (!cfg->secret[0]) {
        set_err(err, errlen, "%s: a secret is required to serve ([cluster] secret)", cfg->path);
        return -EINVAL;
    }
    count = CONFIG_MAX_SHARDS; /* a split adds shards */
    s = calloc(1, sizeof(*s));
    if (!s)
        goto nomem;
    s->cfg = *cfg;
    s->self = self;
    s->other = other;
    s->other_ctx = other_ctx;
    atomic_init(&s->newest_epoch, cfg->epoch);
    s->slots = cfg->shard_count;
    s->shards = calloc(CONFIG_MAX_SHARDS, sizeof(*s->shards));
    s->polls = calloc(count, sizeof(*s->polls));
    s->applies = calloc(count, sizeof(*s->applies));
    s->urgent = calloc(count, sizeof(*s->urgent));
    if (!s->shards || !s->polls || !s->applies || !s->urgent || sync_init(s) < 0)
        goto nomem;
    memcpy(s->shards, shards, cfg->shard_count * sizeof(*s->shards));
    if (repl) {
        s->map = repl->map;
        s->local = calloc(count, sizeof(*s->local));
        if (!s->local)
            goto nomem;
        memcpy(s->local, repl->local, cfg->shard_count * sizeof(*s->local));
        s->push = repl->push;
        s->push_ctx = repl->push_ctx;
    }
    if (nonce_cache_new(NONCE_MAX, WIRE_MAX_SKEW, NONCE_MIN_KEEP_S, &s->nonces) < 0)
        goto nomem;
    listeners_set(s, 1);
    if (repl && repl->started)
        repl->started(repl->started_ctx, s);
    *out = s;
    return 0;

nomem:
    node_server_stop(s);
    set_err(err, errlen, "node_server_start: out of memory");
    return -ENOMEM;
}

void node_server_set_shard(struct node_server *s, unsigned n, struct shard *sh)
{
    struct shard *old;

    if (!s || n >= CONFIG_MAX_SHARDS)
        return;
    /* the listener first: a sync waiting for replicas must wake their polls */
    if (s->local && shard_repl_is(shard_unwrap(sh)))
        shard_repl_on_sync_wanted(shard_unwrap(sh), polls_wake, s);
    old = __atomic_exchange_n(&s->shards[n], sh, __ATOMIC_ACQ_REL);
    /* a wrapper of the same shard_repl (a resharding's mirror) keeps it */
    if (old && shard_unwrap(old) != shard_unwrap(sh) && s->local &&
        shard_repl_is(shard_unwrap(old)))
        shard_repl_on_sync_wanted(shard_unwrap(old), NULL, NULL);
}

void node_server_quiesce(struct node_server *s)
{
    pthread_rwlock_wrlock(&s->layout_lock);
}

void node_server_unquiesce(struct node_server *s)
{
    pthread_rwlock_unlock(&s->layout_lock);
}

int node_server_set_layout(struct node_server *s, const uint8_t *depth, unsigned slots)
{
    if (slots == 0 || slots > CONFIG_MAX_SHARDS ||
        placement_layout_check(depth, slots) != 0)
        return -EINVAL;
    memcpy(s->cfg.depth, depth, slots);
    s->slots = slots;
    return 0;
}

void node_server_set_local(struct node_server *s, unsigned n, struct shard *lmdb)
{
    struct shard *old;

    if (!s || !s->local || n >= CONFIG_MAX_SHARDS)
        return;
    if (lmdb)
        shard_lmdb_on_apply(lmdb, on_apply, s);
    pthread_mutex_lock(&s->local_lock);
    old = s->local[n];
    s->local[n] = lmdb;
    pthread_mutex_unlock(&s->local_lock);
    if (old && old != lmdb)
        shard_lmdb_on_apply(old, NULL, NULL);
}

int node_server_new(const struct config *cfg, int self, struct shard *const *shards,
                    node_handler_fn other, void *other_ctx, struct node_server **out, char *err,
                    size_t errlen)
{
    return node_server_new_repl(cfg, self, shards, NULL, other, other_ctx, out, err, errlen);
}

/* Descriptors open now: the shards' files and logs, the FUSE device... */
static unsigned fds_open(void)
{
    DIR *d = opendir("/proc/self/fd");
    unsigned n = 0;

    if (!d)
        return FD_RESERVE;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* How many connections to allow: CONN_LIMIT if the descriptor limit lets
 * us keep FD_RESERVE more than those open now, raising the soft limit
 * (towards the hard one) for it; fewer, said on stderr, if it does not. */
static unsigned conn_limit_of_fds(void)
{
    rlim_t want = (rlim_t)CONN_LIMIT + FD_RESERVE + fds_open(), spare;
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return CONN_LIMIT_MIN;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        struct rlimit raised = {
            .rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want ? rl.rlim_max : want,
            .rlim_max = rl.rlim_max,
        };
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
            rl.rlim_cur = raised.rlim_cur;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want)
        return CONN_LIMIT;
    spare = rl.rlim_cur > want - CONN_LIMIT ? rl.rlim_cur - (want - CONN_LIMIT) : 0;
    if (spare < CONN_LIMIT_MIN)
        spare = CONN_LIMIT_MIN;
    log_msg("at most %u connections: the descriptor limit (ulimit -n) is %llu", (unsigned)spare,
            (unsigned long long)rl.rlim_cur);
    return (unsigned)spare;
}

/* The I/O threads: one a CPU, within IO_THREADS_MIN..IO_THREADS_MAX. */
static unsigned io_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n < (long)IO_THREADS_MIN ? IO_THREADS_MIN
           : n > (long)IO_THREADS_MAX ? IO_THREADS_MAX
                                      : (unsigned)n;
}

/* The workers and the reaper; signals are blocked by the caller. */
static int threads_start(struct node_server *s, char *err, size_t errlen)
{
    int rc = pool_start(&s->api_pool);

    if (rc == 0)
        rc = pool_start(&s->shard_pool);
    if (rc == 0)
        rc = pool_start(&s->stream_pool);
    if (rc < 0) {
        set_err(err, errlen, "cannot start the node server's workers: %s", strerror(-rc));
        return rc;
    }
    rc = pthread_create(&s->poll_timer, NULL, poll_timer_main, s);
    if (rc) {
        set_err(err, errlen, "cannot start the node server's poll timer: %s", strerror(rc));
        return -rc;
    }
    s->poll_started = 1;
    rc = pthread_create(&s->reaper, NULL, reaper_main, s);
    if (rc) {
        set_err(err, errlen, "cannot start the node server's reaper: %s", strerror(rc));
        return -rc;
    }
    s->reaper_started = 1;
    return 0;
}

int node_server_start(const struct config *cfg, int self, struct shard *const *shards,
                      node_handler_fn other, void *other_ctx, struct node_server **out, char *err,
                      size_t errlen)
{
    return node_server_start_repl(cfg, self, shards, NULL, other, other_ctx, out, err, errlen);
}

int node_server_start_repl(const struct config *cfg, int self, struct shard *const *shards,
                           const struct node_server_repl *repl, node_handler_fn other,
                           void *other_ctx, struct node_server **out, char *err, size_t errlen)
{
    struct node_server *s = NULL;
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    struct MHD_OptionItem tls_opts[3] = {{MHD_OPTION_END, 0, NULL}};
    sigset_t all, old;
    uint64_t port = 0;
    int rc;

    *out = NULL;
    rc = node_server_new_repl(cfg, self, shards, repl, other, other_ctx, &s, err, errlen);
    if (rc < 0)
        return rc;
    rc = parse_listen_url(s, cfg->nodes[self].url, err, errlen);
    if (rc < 0)
        goto fail;
    if (s->addr.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    (void)parse_u64(s->port, &port);
    s->conn_limit = conn_limit_of_fds();
    s->per_ip_limit = s->conn_limit / PER_IP_SHARE;
    if (s->tls) {
        rc = load_tls(s, err, errlen);
        if (rc < 0)
            goto fail;
        flags |= MHD_USE_TLS;
        tls_opts[0] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert};
        tls_opts[1] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key};
        tls_opts[2] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    }

    /* Threads inherit the signal mask: ours and MHD's get every signal
     * blocked. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = threads_start(s, err, errlen);
    /* The port argument only names the port in MHD's messages: the socket
     * is bound to s->addr. The logger must be the first option. */
    if (rc == 0)
        s->daemon = MHD_start_daemon(
            flags, (uint16_t)port, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
            s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&s->addr, MHD_OPTION_URI_LOG_CALLBACK,
            on_uri, s, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION,
            on_connection, s, MHD_OPTION_THREAD_POOL_SIZE, io_threads(),
            MHD_OPTION_CONNECTION_LIMIT, s->conn_limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
            s->per_ip_limit, MHD_OPTION_CONNECTION_TIMEOUT, IDLE_TIMEOUT_S, MHD_OPTION_ARRAY,
            tls_opts, MHD_OPTION_END);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0)
        goto fail;
    if (!s->daemon) {
        rc = explain_bind_failure(s, err, errlen);
        goto fail;
    }
    *out = s;
    return 0;

fail:
    node_server_stop(s);
    return rc;
}

void node_server_stop(struct node_server *s)
{
    if (!s)
        return;
    /* No new wakeups; the parked polls are answered (204) and none parks
     * from now on. */
    if (s->shards)
        listeners_set(s, 0);
    if (s->poll_started) {
        pthread_mutex_lock(&s->poll_lock);
        s->poll_stop = 1;
        pthread_cond_signal(&s->poll_wake);
        pthread_mutex_unlock(&s->poll_lock);
        pthread_join(s->poll_timer, NULL);
    } else if (s->sync_ready) {
        pthread_mutex_lock(&s->poll_lock);
        s->poll_stop = 1;
        pthread_mutex_unlock(&s->poll_lock);
    }
    if (s->reaper_started) {
        pthread_mutex_lock(&s->conn_lock);
        s->reaper_stop = 1;
        pthread_cond_signal(&s->reaper_wake);
        pthread_mutex_unlock(&s->conn_lock);
        pthread_join(s->reaper, NULL);
    }
    /* Every queued request and read runs and resumes its connection before
     * MHD stops (MHD must not stop with a connection suspended); from now
     * on a request that would need a worker gets 503 instead. */
    if (s->sync_ready) {
        pool_stop(&s->api_pool);
        pool_stop(&s->shard_pool);
        pool_stop(&s->stream_pool);
    }
    if (s->daemon)
        MHD_stop_daemon(s->daemon);
    nonce_cache_free(s->nonces);
    if (s->sync_ready) {
        pthread_cond_destroy(&s->reaper_wake);
        pthread_mutex_destroy(&s->conn_lock);
        pool_destroy(&s->stream_pool);
        pool_destroy(&s->shard_pool);
        pool_destroy(&s->api_pool);
        pthread_cond_destroy(&s->poll_wake);
        pthread_mutex_destroy(&s->poll_lock);
        pthread_mutex_destroy(&s->local_lock);
        pthread_mutex_destroy(&s->log_lock);
        pthread_rwlock_destroy(&s->layout_lock);
    }
    if (s->tls_key)
        OPENSSL_cleanse(s->tls_key, strlen(s->tls_key));
    free(s->tls_key);
    free(s->tls_cert);
    free(s->local);
    free(s->applies);
    free(s->urgent);
    free(s->polls);
    free(s->shards);
    free(s);
}
