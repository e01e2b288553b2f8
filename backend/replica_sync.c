/* replica_sync.c -- the replica-sync thread (replica_sync.h).
 *
 * DESIGN
 * One thread, one curl multi handle, one easy handle per replica shard (so
 * each shard keeps its own keep-alive connection to its primary). Each
 * shard runs the steps below on its own; the thread starts a shard's next
 * request when the last one is done and its backoff has passed, and waits
 * in curl_multi_poll() for whichever transfer moves first.
 *
 * 1. Streaming. GET /v1/shard/N/stream?epoch=E&lsn=L&check=C&wait=W&max=M
 *    &synced=S to the primary: (E,L,C) is the position this copy holds
 *    (every entry up to it is in its redo log: kill -9 safe) and S the last
 *    lsn it synced. The primary answers with the entries after it (200), or
 *    204 after W ms without any; either way the reply's X-Shardfs-Position is
 *    the primary's own position, for the lag. The entries are applied in
 *    order with shard_lmdb_apply_at(), which checks that each continues this
 *    copy's history (lsn and rolling check), and the next pull goes out at
 *    once: it is the ack the primary's writers wait for (ack = replica).
 * 2. Syncing. A reply whose X-Shardfs-Sync names an lsn past S (a sync()
 *    on the primary waits for this copy; it also wakes our long poll) makes
 *    the copy sync (shard_sync) before the next pull, which then carries the
 *    new S. Otherwise a copy that applied something is synced every
 *    RS_SYNC_MS, so S stays near the position; the pull in flight is left
 *    alone (dropping it to report the new S costs a new connection each
 *    time; with a 50 ms period and drops, rsync of /usr/include/linux into
 *    the 3-node cluster took 6.5 and 7.2 s, with this 4.8 and 7.0 s: a
 *    shared, noisy machine).
 * 3. Catching up. A 409 with X-Shardfs-Errno ERANGE (the primary no longer
 *    retains the entries after our position) or ESTALE (our position is not
 *    in its history), or an entry that does not continue our history,
 *    starts a fuzzy snapshot: P0 is the position in the 409's (or the
 *    reply's) X-Shardfs-Position, taken before the copy begins.
 *    shard_lmdb_snapshot_begin() empties the copy and marks it durably as
 *    not usable; GET stat gives the record count (for the ETA); the records
 *    come with the scan route, page by page, each page loaded with
 *    shard_lmdb_load() in batches of about RS_LOAD_BYTES and then dropped;
 *    the next page is asked for before a page is loaded, so the primary
 *    reads and sends it meanwhile, and memory holds two pages, never the
 *    shard (shard_lmdb_load() skips
 *    the primary's own 'M' records, its redo log sequence and stream
 *    position). Then shard_lmdb_snapshot_done(P0) and streaming from P0:
 *    replaying (P0, now] over the fuzzy copy gives the exact state (blind
 *    puts and deletes, the last one wins).
 * 4. A copy found marked (a snapshot interrupted by a stop or a crash:
 *    shard_lmdb_position() says -EAGAIN) has no position to ask from. It
 *    is emptied and given the empty position {0,0,0}: the primary then
 *    sends its whole history if it still has it, and otherwise answers
 *    ERANGE with its position, which is step 3.
 * 5. Where to send: the primary's url from primary_of (the shard map);
 *    a 307 (the node is no longer the primary) is followed to its Location
 *    for this shard until the map changes or a request fails (at most
 *    RS_REDIRECTS_MAX in a row). replica_sync_kick() makes the thread ask
 *    primary_of again; a new primary drops the request in flight. A failed
 *    request (no connection, a timeout, a 5xx) is retried after a backoff
 *    doubling from RS_BACKOFF_FIRST_MS to RS_BACKOFF_MAX_MS, which a success
 *    resets: a dead primary costs a connect attempt every 2 s, no spinning.
 * 6. A content check (fsck --replicas). A reply naming a checkpoint
 *    (X-Shardfs-Checkpoint: the primary's position when it hashed its own
 *    copy; it sends nothing past it meanwhile) that the copy has reached
 *    pauses the shard: a helper thread hashes the copy
 *    (shard_lmdb_checksum) while the sync thread sends no pull of it and so
 *    applies nothing to it; then the result waits for
 *    replica_sync_checksum() and the pulls go on, saying hashed=ID (the
 *    checkpoint's X-Shardfs-Checkpoint-Id), which ends it on the primary.
 *    The pause costs the
 *    primary's writers (ack = replica) one hash pass of the shard.
 *
 * 7. The set of copies changes at runtime (replica_sync_add/remove, a
 *    `shardfs replica add/drop` reaching this node through the map): the
 *    callers only post a request under rs->lock and wait; the thread makes
 *    the change between two rounds, so no transfer of a copy is in flight
 *    while it is added or removed, and a removed copy is never touched
 *    again (its pull is dropped, what it applied is synced).
 *
 * 8. Pushes. With ack = replica, a primary's writer that waits for this
 *    copy's ack sends the entries itself (POST /v1/shard/N/push, wire.h;
 *    shard_repl.c): the node server hands them to replica_sync_push(),
 *    on its own thread, which applies them to the copy and answers with
 *    the copy's position, the ack, in one round trip instead of a pull's
 *    reply and the next pull. Pushes and the thread's pulls apply to one
 *    copy under the copy's gate (h->gate), in order, each skipping the
 *    entries the copy has already. The gate is open only while the copy
 *    is streaming from a known primary (gate_refresh): the thread closes
 *    it before it changes the copy in any other way (a snapshot, a hash,
 *    a new primary, starting over, a remove), so a push never lands in a
 *    snapshot, a checkpoint's pause or a promoted copy; replica_sync_
 *    kick_wait's promise covers pushes too. While open, gate_pos is the
 *    copy's position, which the thread takes over (h->pos) before each
 *    pull.
 *
 * Threads: the sync thread owns every struct rshard field but `kicked`
 * (atomic), `st` (under rs->lock, read by replica_sync_status()) and the
 * gate_* fields (under h->gate, step 8), and is
 * the only writer of rs->sh[] (under rs->lock, which the other threads take
 * to read it).
 */
#include "replica_sync.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "batch.h"
#include "clock.h"
#include "shard_lmdb.h"
#include "shard_remote.h"
#include "wire.h"

#define RS_WAIT_MS 2000u             /* a pull's long-poll */
#define RS_PULL_MAX (4u << 20)       /* max= of a pull */
#define RS_SCAN_LIMIT 16384u         /* records asked for per snapshot page */
#define RS_LOAD_BYTES (1u << 20)     /* records loaded per shard_lmdb_load() */
#define RS_BACKOFF_FIRST_MS 100
#define RS_BACKOFF_MAX_MS 2000
#define RS_SYNC_MS 1000
#define RS_REDIRECTS_MAX 3
#define RS_ERROR_BODY_MAX (64u << 10)
/* A pull's reply holds at most max bytes of entries, but at least one
 * entry, which may be a whole batch; a scan page is cut near
 * WIRE_SCAN_REPLY_MAX but holds at least one record. */
#define RS_STREAM_REPLY_MAX (RS_PULL_MAX + STREAM_ENTRY_HDR + WIRE_BODY_MAX)
#define RS_SCAN_REPLY_MAX (WIRE_SCAN_REPLY_MAX + 8u + BATCH_KEY_MAX + BATCH_VALUE_MAX + 4096u)
#define RS_BUF_KEEP (8u << 20) /* a reply buffer larger than this is freed after use */
#define RS_POLL_MAX_MS 1000
#define RS_LOCATION_MAX (CONFIG_URL_MAX + 256u)
/* A copy that has not moved for this long while its primary said it was
 * ahead is started over (stuck_restart). */
#define RS_STUCK_MS 10000

enum rs_req { REQ_NONE = 0, REQ_STREAM, REQ_STAT, REQ_SCAN };

/* A response header we keep. */
struct rs_hdr {
    int set;
    char v[96];
};

struct rshard {
    unsigned index;
    struct shard *local;
    atomic_int kicked;

    /* where requests go */
    int primary;                      /* node, -1: none */
    uint64_t epoch;                   /* the shard's, from primary_of */
    char base[CONFIG_URL_MAX + 1];    /* the primary's url, or a redirect's */
    unsigned redirects;
    int64_t next_at;                  /* monotonic ms: not before */
    int64_t backoff_ms;

    /* the request in flight */
    CURL *curl;
    struct curl_slist *hdrs;
    enum rs_req kind;                 /* REQ_NONE: none in flight */
    enum rs_req next;                 /* what to send next */
    uint64_t sent_synced;             /* synced= of the pull in flight */
    uint8_t *body;                    /* a scan's request body */
    long cur_status;
    uint8_t *buf;                     /* the reply body */
    size_t len, cap, max;
    uint8_t *spare;                   /* a snapshot page being loaded */
    size_t spare_cap;
    int overflow, nomem;
    struct rs_hdr errno_name, position, more, sync, checkpoint, checkpoint_id;
    char location[RS_LOCATION_MAX];
    int location_set;

    /* the copy */
    int pos_ok;                       /* pos read from the shard */
    struct stream_pos pos;
    uint64_t synced;
    int dirty;                        /* applied since the last sync */
    int64_t synced_at;
    struct stream_pos primary_pos;
    int64_t level_at;                 /* when pos last equalled primary_pos */
    int64_t reply_at;                 /* when the last reply came, 0: none; under rs->lock */
    uint64_t moved_lsn;               /* pos.lsn when moved_at was set */
    int64_t moved_at;                 /* when pos last moved, or was level, or snapshotting */
    int fresh;                        /* the next request opens a new connection */

    /* the snapshot (step 3) */
    int snapping;
    struct stream_pos p0;
    uint8_t from[BATCH_KEY_MAX];
    size_t flen;
    int64_t snap_start;

    /* a content check (step 6) */
    struct replica_sync *rs;
    atomic_int hashing;               /* the helper thread runs */
    int hasher_live;                  /* ... and is not joined yet */
    pthread_t hasher;
    struct stream_pos hash_at;        /* where it hashes */
    uint64_t hash_id;                 /* for which checkpoint */
    uint64_t hashed;                  /* the checkpoint of the last hash: hashed= of the pulls */
    int sum_set, sum_rc;              /* the last result; protected by replica_sync.lock */
    struct stream_pos sum_at;
    struct shard_lmdb_sum sum;

    /* pushes (step 8): the gate, and what it guards */
    pthread_mutex_t gate;             /* applies to the copy; after rs->lock when both */
    int gate_open;                    /* the copy takes pushes */
    int gate_primary;                 /* ... from this node */
    uint64_t gate_epoch;              /* ... at this shard epoch */
    struct stream_pos gate_pos;       /* the copy's position while open */
    uint64_t gate_synced;             /* h->synced, for the pushes' answers */
    int gate_dirty;                   /* a push applied since the thread looked */
    uint64_t pushes;                  /* pushes that applied something */
    uint64_t error_pushes;            /* the thread's: pushes at its last failed step */

    struct replica_status st;         /* protected by replica_sync.lock */
    uint64_t kick_req, kick_done;     /* protected by replica_sync.lock: kick_wait */
    uint64_t id;                      /* unique in rs: kick_wait tells a new copy from h */
};

struct replica_sync {
    const struct config *cfg;
    int self;
    struct remote *remote;            /* signing and TLS settings only */
    replica_sync_primary_fn primary_of;
    void *ctx;
    CURLM *multi;
    pthread_t thread;
    int started;
    atomic_int stop;
    pthread_mutex_t lock;
    pthread_cond_t kicked_cond;       /* a kick_wait's refresh, or an add/remove, is done */
    pthread_cond_t sum_cond;          /* a content check's hash is done (CLOCK_MONOTONIC) */
    struct rshard *sh[CONFIG_MAX_SHARDS]; /* the copies; written by the thread under lock */
    /* under lock: the changes asked for (step 7) */
    struct shard *add_req[CONFIG_MAX_SHARDS];
    unsigned char remove_req[CONFIG_MAX_SHARDS];
    uint64_t change_req, change_done;
    uint64_t next_id;
};

const char *replica_phase_name(enum replica_phase p)
{
    switch (p) {
    case REPLICA_STREAMING:
        return "streaming";
    case REPLICA_SNAPSHOT:
        return "snapshot";
    case REPLICA_WAITING:
    default:
        return "waiting";
    }
}

static void gate_close(struct rshard *h);

/* ---- status ---- */

/* Copy what the thread knows of h into h->st for replica_sync_status(). */
static void publish(struct replica_sync *rs, struct rshard *h, int rc)
{
    int64_t now = clock_mono_ms();
    struct replica_status *st = &h->st;
    uint64_t pushes;

    pthread_mutex_lock(&h->gate);
    pushes = h->pushes;
    pthread_mutex_unlock(&h->gate);
    pthread_mutex_lock(&rs->lock);
    st->pushes = pushes;
    st->primary = h->primary;
    st->epoch = h->epoch;
    st->pos = h->pos;
    st->synced = h->synced;
    st->primary_pos = h->primary_pos;
    st->in_flight = h->kind != REQ_NONE;
    snprintf(st->at, sizeof(st->at), "%s", h->base);
    if (h->pos.lsn >= h->primary_pos.lsn)
        h->level_at = now;
    if (h->pos.lsn != h->moved_lsn || h->pos.lsn >= h->primary_pos.lsn || h->snapping ||
        !h->moved_at) {
        h->moved_lsn = h->pos.lsn;
        h->moved_at = now;
    }
    st->lag_ms = (uint64_t)(now - h->level_at);
    if (rc != 1)
        st->last_error = rc;
    if (rc < 0)
        h->error_pushes = pushes;
    /* A push applied since the last failed step streams as well as a pull
     * would: a push-fed replica's pull parks until its deadline, and until
     * it came back such a copy stayed "waiting" after a failed first pull
     * (its primary not yet listening). */
    if (h->snapping) {
        st->phase = REPLICA_SNAPSHOT;
    } else if (h->primary < 0 || h->primary == rs->self || rc < 0 || !h->pos_ok) {
        st->phase = REPLICA_WAITING;
    } else if (rc == 0 || pushes > h->error_pushes) {
        st->phase = REPLICA_STREAMING;
    }
    if (h->snapping) {
        int64_t el = now - h->snap_start;
        st->snap_rate = el > 0 ? (double)st->snap_bytes * 1000.0 / (double)el : 0.0;
        st->snap_eta_ms = -1;
        if (st->snap_total_records && st->snap_records && el > 0) {
            double frac = (double)st->snap_records / (double)st->snap_total_records;
            st->snap_eta_ms = frac >= 1.0 ? 0 : (int64_t)((double)el * (1.0 - frac) / frac);
        }
    }
    pthread_mutex_unlock(&rs->lock);
}

int replica_sync_status(struct replica_sync *rs, unsigned shard, struct replica_status *out)
{
    const struct rshard *h;

    if (!rs || shard >= CONFIG_MAX_SHARDS)
        return -ENOENT;
    pthread_mutex_lock(&rs->lock);
    h = rs->sh[shard];
    if (h) {
        *out = h->st;
        out->last_reply_ago_ms = h->reply_at ? clock_mono_ms() - h->reply_at : -1;
    }
    pthread_mutex_unlock(&rs->lock);
    return h ? 0 : -ENOENT;
}

/* ---- one transfer ---- */

static void hdr_store(struct rs_hdr *h, const char *v, size_t len)
{
    h->set = 1;
    if (len >= sizeof(h->v))
        len = sizeof(h->v) - 1; /* a header this long is malformed for us anyway */
    memcpy(h->v, v, len);
    h->v[len] = '\0';
}

static int hdr_is(const char *name, size_t nlen, const char *want)
{
    return nlen == strlen(want) && strncasecmp(name, want, nlen) == 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct rshard *h = ud;
    size_t len = size * n, nlen, vlen;
    const char *name, *v;
    long st;

    switch (remote_header_line(p, len, &st, &name, &nlen, &v, &vlen)) {
    case 1:
        /* A new response (after a 1xx, or the first): forget the last. */
        h->cur_status = st;
        h->len = 0;
        memset(&h->errno_name, 0, sizeof(h->errno_name));
        memset(&h->position, 0, sizeof(h->position));
        memset(&h->more, 0, sizeof(h->more));
        memset(&h->sync, 0, sizeof(h->sync));
        memset(&h->checkpoint, 0, sizeof(h->checkpoint));
        memset(&h->checkpoint_id, 0, sizeof(h->checkpoint_id));
        h->location_set = 0;
        return len;
    case 0:
        return len;
    }
    if (hdr_is(name, nlen, WIRE_HDR_ERRNO))
        hdr_store(&h->errno_name, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_POSITION))
        hdr_store(&h->position, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_MORE))
        hdr_store(&h->more, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_SYNC))
        hdr_store(&h->sync, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_CHECKPOINT))
        hdr_store(&h->checkpoint, v, vlen);
    else if (hdr_is(name, nlen, WIRE_HDR_CHECKPOINT_ID))
        hdr_store(&h->checkpoint_id, v, vlen);
    else if (hdr_is(name, nlen, "Location") && vlen < sizeof(h->location)) {
        memcpy(h->location, v, vlen);
        h->location[vlen] = '\0';
        h->location_set = 1;
    }
    return len;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct rshard *h = ud;
    size_t len = size * n;
    size_t max = h->cur_status >= 200 && h->cur_status <= 299 ? h->max : RS_ERROR_BODY_MAX;

    if (len > max - h->len) {
        h->overflow = 1;
        return 0;
    }
    if (h->len + len > h->cap) {
        size_t cap = h->cap ? h->cap : 64u << 10;
        while (cap < h->len + len)
            cap = cap > max / 2 ? max : cap * 2;
        uint8_t *nb = realloc(h->buf, cap);
        if (!nb) {
            h->nomem = 1;
            return 0;
        }
        h->buf = nb;
        h->cap = cap;
    }
    memcpy(h->buf + h->len, p, len);
    h->len += len;
    return len;
}

/* The base URL in a 307's Location for our path_query: it must end with
 * the path we asked for (any query). 0 or -EIO. */
static int location_base(const struct rshard *h, const char *path, char *out, size_t outlen)
{
    const char *at;
    size_t blen;

    if (!h->location_set || (strncmp(h->location, "http://", 7) != 0 &&
                             strncmp(h->location, "https://", 8) != 0))
        return -EIO;
    at = strstr(h->location + 8, path);
    if (!at)
        return -EIO;
    blen = (size_t)(at - h->location);
    if (blen >= outlen || blen > CONFIG_URL_MAX)
        return -EIO;
    for (size_t i = 0; i < blen; i++)
        if ((unsigned char)h->location[i] <= ' ' || (unsigned char)h->location[i] >= 0x7f)
            return -EIO;
    memcpy(out, h->location, blen);
    out[blen] = '\0';
    return 0;
}

/* Take the transfer in flight off the multi handle, if any: one that ended,
 * or one dropped (then its connection goes with it). */
static void transfer_drop(struct replica_sync *rs, struct rshard *h)
{
    if (h->kind == REQ_NONE)
        return;
    curl_multi_remove_handle(rs->multi, h->curl);
    curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(h->hdrs);
    h->hdrs = NULL;
    free(h->body);
    h->body = NULL;
    h->kind = REQ_NONE;
}

/* Start h's next request (h->next) at h->base. 0 or -errno. */
static int transfer_start(struct replica_sync *rs, struct rshard *h)
{
    char pq[320], url[CONFIG_URL_MAX + sizeof(pq) + 1];
    const char *method = "GET";
    size_t blen = strlen(h->base), body_len = 0;
    long timeout = (long)(rs->cfg->timeout_ms ? rs->cfg->timeout_ms : 5000u);
    int n;

    switch (h->next) {
    case REQ_STREAM:
        n = snprintf(pq, sizeof(pq),
                     "/v1/shard/%u/stream?node=%s&epoch=%" PRIu64 "&lsn=%" PRIu64
                     "&check=%" PRIu64 "&wait=%u&max=%u&synced=%" PRIu64 "&hashed=%" PRIu64,
                     h->index, rs->cfg->nodes[rs->self].name, h->pos.epoch, h->pos.lsn, h->pos.check, RS_WAIT_MS, RS_PULL_MAX,
                     h->synced, h->hashed);
        h->max = RS_STREAM_REPLY_MAX;
        h->sent_synced = h->synced;
        timeout += RS_WAIT_MS;
        break;
    case REQ_STAT:
        n = snprintf(pq, sizeof(pq), "/v1/shard/%u/stat", h->index);
        h->max = RS_ERROR_BODY_MAX;
        break;
    case REQ_SCAN:
        n = snprintf(pq, sizeof(pq), "/v1/shard/%u/scan?limit=%u", h->index, RS_SCAN_LIMIT);
        method = "POST";
        body_len = wire_scan_request_size(h->flen, 0);
        h->body = malloc(body_len);
        if (!h->body)
            return -ENOMEM;
        wire_scan_request_encode(h->body, h->from, h->flen, NULL, 0);
        h->max = RS_SCAN_REPLY_MAX;
        /* A page may take the primary a while to read: more time than a
         * small request. */
        timeout *= 4;
        break;
    case REQ_NONE:
    default:
        return -EINVAL;
    }
    if (n < 0 || (size_t)n >= sizeof(pq))
        return -ENAMETOOLONG;
    while (blen > 0 && h->base[blen - 1] == '/')
        blen--;
    snprintf(url, sizeof(url), "%.*s%s", (int)blen, h->base, pq);
    if (remote_sign(rs->remote, h->base, method, pq, h->body, body_len, &h->hdrs) != 0) {
        free(h->body);
        h->body = NULL;
        return -ENOMEM;
    }
    h->len = 0;
    h->cur_status = 0;
    h->overflow = h->nomem = 0;
    curl_easy_setopt(h->curl, CURLOPT_URL, url);
    if (body_len) {
        curl_easy_setopt(h->curl, CURLOPT_POST, 1L);
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
        curl_easy_setopt(h->curl, CURLOPT_POSTFIELDS, (const char *)h->body);
    } else {
        curl_easy_setopt(h->curl, CURLOPT_HTTPGET, 1L);
    }
    curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, h->hdrs);
    curl_easy_setopt(h->curl, CURLOPT_FRESH_CONNECT, h->fresh ? 1L : 0L);
    h->fresh = 0;
    curl_easy_setopt(h->curl, CURLOPT_TIMEOUT_MS, timeout);
    curl_easy_setopt(h->curl, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)(rs->cfg->timeout_ms ? rs->cfg->timeout_ms : 5000u));
    if (curl_multi_add_handle(rs->multi, h->curl) != CURLM_OK) {
        curl_easy_setopt(h->curl, CURLOPT_HTTPHEADER, NULL);
        curl_slist_free_all(h->hdrs);
        h->hdrs = NULL;
        free(h->body);
        h->body = NULL;
        return -ENOMEM;
    }
    h->kind = h->next;
    return 0;
}

/* ---- the copy ---- */

/* A position header ("E/L/C", stream.h's STREAM_POS_FMT). 0 or -EIO. */
static int parse_pos(const struct rs_hdr *hd, struct stream_pos *out)
{
    return hd->set && stream_pos_parse(hd->v, out) == 0 ? 0 : -EIO;
}

/* A failed step: back off (step 5); the next attempt starts from the
 * primary's configured url again. */
static void step_failed(struct replica_sync *rs, struct rshard *h, int rc)
{
    int64_t now = clock_mono_ms();

    h->next_at = now + h->backoff_ms;
    h->backoff_ms = h->backoff_ms * 2 > RS_BACKOFF_MAX_MS ? RS_BACKOFF_MAX_MS : h->backoff_ms * 2;
    h->redirects = 0;
    if (h->primary >= 0)
        snprintf(h->base, sizeof(h->base), "%s", rs->cfg->nodes[h->primary].url);
    publish(rs, h, rc < 0 ? rc : -EIO);
}

static void step_ok(struct replica_sync *rs, struct rshard *h)
{
    h->backoff_ms = RS_BACKOFF_FIRST_MS;
    h->next_at = clock_mono_ms();
    publish(rs, h, 0);
}

/* Step 3's start: empty the copy and mark it; P0 is p0. */
static int snapshot_start(struct replica_sync *rs, struct rshard *h, const struct stream_pos *p0)
{
    int rc;

    gate_close(h);
    rc = shard_lmdb_snapshot_begin(h->local);

    if (rc)
        return rc;
    h->snapping = 1;
    h->p0 = *p0;
    h->flen = 0;
    h->snap_start = clock_mono_ms();
    h->dirty = 1;
    pthread_mutex_lock(&rs->lock);
    h->st.snapshots++;
    h->st.snap_bytes = h->st.snap_records = h->st.snap_total_records = 0;
    h->st.snap_rate = 0;
    h->st.snap_eta_ms = -1;
    pthread_mutex_unlock(&rs->lock);
    h->next = REQ_STAT;
    return 0;
}

/* Step 4: a copy with no usable position is emptied and starts from the
 * empty one. Also the first thing done for each shard. 0 or -errno. */
static int position_read(struct rshard *h)
{
    int rc = shard_lmdb_position(h->local, &h->pos);

    if (rc == -EAGAIN) {
        static const struct stream_pos empty = {0, 0, 0};

        rc = shard_lmdb_snapshot_begin(h->local);
        if (rc == 0)
            rc = shard_lmdb_snapshot_done(h->local, &empty);
        h->pos = empty;
    }
    /* What the copy holds may not be synced yet (a kill -9 left it in the
     * redo log): sync once, so synced= can start at the position. */
    if (rc == 0)
        rc = shard_sync(h->local);
    if (rc == 0)
        h->synced = h->pos.lsn;
    h->pos_ok = rc == 0;
    h->next = REQ_STREAM;
    return rc;
}

/* ---- the gate (step 8) ---- */

/* Under h->gate: take over what pushes applied. */
static void gate_merge(struct rshard *h)
{
    if (!h->gate_open)
        return;
    if (h->gate_pos.lsn > h->pos.lsn)
        h->pos = h->gate_pos;
    if (h->gate_dirty)
        h->dirty = 1;
    h->gate_dirty = 0;
}

/* Before the thread changes the copy other than by a pull's entries: no
 * push applies from here on, until gate_refresh() opens the gate again. */
static void gate_close(struct rshard *h)
{
    pthread_mutex_lock(&h->gate);
    gate_merge(h);
    h->gate_open = 0;
    pthread_mutex_unlock(&h->gate);
}

/* Take over what pushes applied, and open the gate when the copy is
 * streaming from a known primary (or close it when not). */
static void gate_refresh(struct replica_sync *rs, struct rshard *h)
{
    int want = h->pos_ok && !h->snapping && !h->hasher_live && h->primary >= 0 &&
               h->primary != rs->self;

    pthread_mutex_lock(&h->gate);
    gate_merge(h);
    if (!want) {
        h->gate_open = 0;
    } else if (!h->gate_open || h->gate_primary != h->primary || h->gate_epoch != h->epoch) {
        h->gate_open = 1;
        h->gate_primary = h->primary;
        h->gate_epoch = h->epoch;
        h->gate_pos = h->pos;
    }
    h->gate_synced = h->synced;
    pthread_mutex_unlock(&h->gate);
}

/* Apply the entries of buf after *at (the copy's position, moved along),
 * in order, skipping those at or below it (a push or a pull brought them
 * already); under h->gate. 0; 1 when one does not continue our history;
 * -errno (-EWOULDBLOCK in no-waiting mode: what was applied stays). */
static int entries_apply(struct rshard *h, struct stream_pos *at, const uint8_t *buf, size_t len,
                         int *applied)
{
    size_t off = 0;
    struct stream_pos p;
    uint64_t time_ms;
    const uint8_t *b;
    size_t blen;
    int n, rc = 0;

    while ((n = stream_entry_next(buf, len, &off, &p, &time_ms, &b, &blen)) == 1) {
        int count = batch_validate(b, blen);
        struct batch bt;

        if (count < 0)
            return -EIO;
        if (p.lsn <= at->lsn)
            continue;
        bt = (struct batch){.buf = (uint8_t *)b, .len = blen, .cap = blen, .count = (unsigned)count};
        rc = shard_lmdb_apply_at(h->local, &p, &bt);
        if (rc == -ESTALE)
            return 1;
        if (rc)
            return rc;
        *at = p;
        (*applied)++;
    }
    return n < 0 ? -EIO : 0;
}

/* Apply a pull's entries in order. 0; 1 when one does not continue our
 * history (a snapshot is needed); -errno. */
static int stream_apply(struct replica_sync *rs, struct rshard *h)
{
    int rc, applied = 0;

    (void)rs;
    pthread_mutex_lock(&h->gate);
    gate_merge(h);
    rc = entries_apply(h, &h->pos, h->buf, h->len, &applied);
    if (h->gate_open)
        h->gate_pos = h->pos;
    pthread_mutex_unlock(&h->gate);
    if (applied)
        h->dirty = 1;
    return rc;
}

/* Check the scan page in h->buf (in order, from where we asked: anything
 * else could page forever) and move h->from to where the next one starts.
 * 0 and *done (no next page), or -EIO. */
static int scan_page_next(struct rshard *h, int *done)
{
    const uint8_t *key, *val, *last = NULL;
    size_t klen, vlen, lastlen = 0, pos = 0;
    int n;

    *done = 1;
    while ((n = wire_scan_reply_next(h->buf, h->len, &pos, &key, &klen, &val, &vlen)) == 1) {
        if (last ? batch_key_cmp(key, klen, last, lastlen) <= 0
                 : batch_key_cmp(key, klen, h->from, h->flen) < 0)
            return -EIO;
        last = key;
        lastlen = klen;
    }
    if (n < 0)
        return -EIO;
    if (h->more.set && strcmp(h->more.v, "1") == 0) {
        int next = last ? batch_key_after(last, lastlen, h->from) : -1;

        if (next < 0)
            return -EIO; /* "more" without a record: no progress possible */
        h->flen = (size_t)next;
        *done = next == 0;
    }
    return 0;
}

/* Load a checked scan page into the copy, in batches of about
 * RS_LOAD_BYTES. 0 or -errno. */
static int scan_page_load(struct replica_sync *rs, struct rshard *h, const uint8_t *page,
                          size_t len)
{
    const uint8_t *key, *val;
    size_t klen, vlen, pos = 0;
    uint64_t bytes = 0, records = 0;
    struct batch b;
    int rc = 0;

    batch_init(&b);
    while (rc == 0 && wire_scan_reply_next(page, len, &pos, &key, &klen, &val, &vlen) == 1) {
        batch_put(&b, key, klen, val, vlen);
        bytes += klen + vlen;
        records++;
        rc = b.error;
        if (rc == 0 && b.len >= RS_LOAD_BYTES) {
            rc = shard_lmdb_load(h->local, &b);
            batch_reset(&b);
        }
    }
    if (rc == 0 && b.count)
        rc = shard_lmdb_load(h->local, &b);
    batch_free(&b);
    if (rc)
        return rc;
    pthread_mutex_lock(&rs->lock);
    h->st.snap_bytes += bytes;
    h->st.snap_records += records;
    pthread_mutex_unlock(&rs->lock);
    return 0;
}

/* A scan page came (step 3): ask for the next one at once, so the primary
 * reads and sends it while this one is loaded, then load this one; after
 * the last, the stream from P0. 0 or -errno (h->from is then where this
 * page began, and nothing is in flight). */
static int snapshot_page(struct replica_sync *rs, struct rshard *h)
{
    uint8_t began[BATCH_KEY_MAX], *page = h->buf;
    size_t began_len = h->flen, len = h->len, cap = h->cap;
    int done, rc;

    memcpy(began, h->from, h->flen);
    rc = scan_page_next(h, &done);
    if (rc)
        goto undo;
    /* The page moves to the spare buffer; the next reply goes to the other. */
    h->buf = h->spare;
    h->cap = h->spare_cap;
    h->len = 0;
    h->spare = page;
    h->spare_cap = cap;
    if (!done && transfer_start(rs, h) != 0)
        h->kind = REQ_NONE; /* started by the loop instead */
    rc = scan_page_load(rs, h, page, len);
    if (rc == 0 && done)
        rc = shard_lmdb_snapshot_done(h->local, &h->p0);
    if (rc)
        goto undo;
    if (done) {
        h->snapping = 0;
        h->pos = h->p0;
        h->dirty = 1;
        h->next = REQ_STREAM;
    }
    return 0;
undo:
    transfer_drop(rs, h);
    memcpy(h->from, began, began_len);
    h->flen = began_len;
    return rc;
}

/* The record count of a stat reply, or 0. */
static uint64_t stat_records(const struct rshard *h)
{
    json_t *root = json_loadb((const char *)h->buf, h->len, 0, NULL);
    json_t *v = json_object_get(root, "records");
    uint64_t n = json_is_integer(v) && json_integer_value(v) > 0 ? (uint64_t)json_integer_value(v)
                                                                  : 0;

    json_decref(root);
    return n;
}

/* Step 2. */
static void sync_copy(struct replica_sync *rs, struct rshard *h)
{
    uint64_t lsn;
    int rc;

    pthread_mutex_lock(&h->gate);
    gate_merge(h); /* what pushes applied so far is synced too */
    pthread_mutex_unlock(&h->gate);
    lsn = h->pos.lsn;
    rc = shard_sync(h->local);

    h->synced_at = clock_mono_ms();
    if (rc) {
        publish(rs, h, rc);
        return; /* tried again RS_SYNC_MS on */
    }
    h->dirty = 0;
    if (!h->snapping)
        h->synced = lsn;
    pthread_mutex_lock(&h->gate);
    h->gate_synced = h->synced;
    if (h->gate_dirty)
        h->dirty = 1; /* a push applied meanwhile: synced next time */
    pthread_mutex_unlock(&h->gate);
    publish(rs, h, 1);
}

/* A sync() on the primary waits for this copy (X-Shardfs-Sync): sync now,
 * so the next pull carries it. */
static void sync_if_wanted(struct replica_sync *rs, struct rshard *h)
{
    uint64_t want = 0;

    if (!h->sync.set)
        return;
    for (const char *c = h->sync.v; *c >= '0' && *c <= '9'; c++)
        want = want > (UINT64_MAX - 9) / 10 ? UINT64_MAX : want * 10 + (uint64_t)(*c - '0');
    if (want > h->synced && h->dirty)
        sync_copy(rs, h);
}

/* Step 6's helper thread: hash the paused copy, publish the result. */
static void *hasher_main(void *arg)
{
    struct rshard *h = arg;
    struct replica_sync *rs = h->rs;
    struct shard_lmdb_sum sum;
    sigset_t all;
    int rc;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_setname_np(pthread_self(), "replica-sum");
    rc = shard_lmdb_checksum(h->local, &sum);
    pthread_mutex_lock(&rs->lock);
    h->sum = sum;
    h->sum_rc = rc;
    h->sum_at = h->hash_at;
    h->sum_set = 1;
    pthread_cond_broadcast(&rs->sum_cond);
    pthread_mutex_unlock(&rs->lock);
    atomic_store(&h->hashing, 0);
    curl_multi_wakeup(rs->multi);
    return NULL;
}

/* Step 6: the reply names a checkpoint and the copy is at it: pause the
 * shard and hash it. */
static void checkpoint_reached(struct replica_sync *rs, struct rshard *h)
{
    struct stream_pos cp;
    uint64_t id = 0;

    if (parse_pos(&h->checkpoint, &cp) != 0 || !stream_pos_eq(&cp, &h->pos) || h->hasher_live)
        return;
    for (const char *c = h->checkpoint_id.set ? h->checkpoint_id.v : ""; *c >= '0' && *c <= '9';
         c++)
        id = id > (UINT64_MAX - 9) / 10 ? UINT64_MAX : id * 10 + (uint64_t)(*c - '0');
    h->hash_at = cp;
    h->hash_id = id;
    gate_close(h); /* the copy stays at cp while hashed */
    atomic_store(&h->hashing, 1);
    if (pthread_create(&h->hasher, NULL, hasher_main, h) != 0) {
        atomic_store(&h->hashing, 0);
        pthread_mutex_lock(&rs->lock);
        h->sum_rc = -EAGAIN;
        h->sum_at = cp;
        h->sum_set = 1;
        pthread_cond_broadcast(&rs->sum_cond);
        pthread_mutex_unlock(&rs->lock);
        h->hashed = id; /* failed: go on rather than stay stopped */
        return;
    }
    h->hasher_live = 1;
}

/* h's transfer ended with cc: the next step. */
static void transfer_done(struct replica_sync *rs, struct rshard *h, CURLcode cc)
{
    enum rs_req kind = h->kind;
    long status = 0;
    int rc;

    transfer_drop(rs, h); /* it is over; the handle keeps the connection */
    if (cc == CURLE_OK)
        curl_easy_getinfo(h->curl, CURLINFO_RESPONSE_CODE, &status);
    pthread_mutex_lock(&rs->lock);
    h->st.replies++;
    h->st.last_status = status;
    h->reply_at = clock_mono_ms();
    pthread_mutex_unlock(&rs->lock);
    if (cc != CURLE_OK || h->overflow || h->nomem) {
        rc = h->nomem                            ? -ENOMEM
             : h->overflow                       ? -EIO
             : cc == CURLE_OPERATION_TIMEDOUT    ? -ETIMEDOUT
             : cc == CURLE_COULDNT_CONNECT       ? -EHOSTUNREACH
             : cc == CURLE_COULDNT_RESOLVE_HOST ? -EHOSTUNREACH
                                                 : -EIO;
        step_failed(rs, h, rc);
        goto out;
    }
    if (status == 307) {
        char path[64];

        snprintf(path, sizeof(path), "/v1/shard/%u/", h->index);
        if (++h->redirects > RS_REDIRECTS_MAX ||
            location_base(h, path, h->base, sizeof(h->base)) != 0) {
            step_failed(rs, h, -EIO);
            goto out;
        }
        h->next_at = clock_mono_ms();
        goto out;
    }
    h->redirects = 0;
    switch (kind) {
    case REQ_STREAM: {
        struct stream_pos pp;

        if (parse_pos(&h->position, &pp) == 0)
            h->primary_pos = pp;
        if (status == 409 && h->errno_name.set &&
            (strcmp(h->errno_name.v, "ERANGE") == 0 || strcmp(h->errno_name.v, "ESTALE") == 0)) {
            rc = parse_pos(&h->position, &pp);
            if (rc == 0)
                rc = snapshot_start(rs, h, &pp);
            if (rc)
                step_failed(rs, h, rc);
            else
                step_ok(rs, h);
            goto out;
        }
        if (status == 204) {
            sync_if_wanted(rs, h);
            checkpoint_reached(rs, h);
            step_ok(rs, h);
            goto out;
        }
        if (status != 200) {
            step_failed(rs, h, wire_errno_of_status(status, h->errno_name.set ? h->errno_name.v
                                                                              : NULL));
            goto out;
        }
        /* 1: an entry does not continue our history: P0 is the primary's
         * position as of this reply, which it took before the entries. */
        rc = stream_apply(rs, h);
        if (rc == 1 && (rc = parse_pos(&h->position, &pp)) == 0)
            rc = snapshot_start(rs, h, &pp);
        if (rc == 0) {
            sync_if_wanted(rs, h);
            checkpoint_reached(rs, h);
        }
        if (rc)
            step_failed(rs, h, rc);
        else
            step_ok(rs, h);
        goto out;
    }
    case REQ_STAT:
        if (status != 200) {
            step_failed(rs, h, wire_errno_of_status(status, NULL));
            goto out;
        }
        pthread_mutex_lock(&rs->lock);
        h->st.snap_total_records = stat_records(h);
        pthread_mutex_unlock(&rs->lock);
        h->next = REQ_SCAN;
        step_ok(rs, h);
        goto out;
    case REQ_SCAN:
        if (status != 200) {
            step_failed(rs, h, wire_errno_of_status(status, NULL));
            goto out;
        }
        rc = snapshot_page(rs, h);
        if (rc)
            step_failed(rs, h, rc);
        else
            step_ok(rs, h);
        goto out;
    case REQ_NONE:
    default:
        break;
    }
out:
    if (h->cap > RS_BUF_KEEP && h->kind == REQ_NONE) {
        free(h->buf);
        h->buf = NULL;
        h->cap = h->len = 0;
    }
    if (h->spare_cap > RS_BUF_KEEP || !h->snapping) {
        free(h->spare);
        h->spare = NULL;
        h->spare_cap = 0;
    }
}

/* A copy that stopped moving although its primary's replies say it is
 * ahead (a state none of the steps above should reach): say so, with what
 * the thread knows, and start over from the copy's own position on a new
 * connection to the map's primary. Not seen in normal operation; it keeps
 * such a copy from staying behind (and out of the in-sync set) for good. */
static void stuck_restart(struct replica_sync *rs, struct rshard *h, int64_t now)
{
    fprintf(stderr,
            "shardfs: shard %u: this replica stayed at lsn %" PRIu64 " (epoch %" PRIu64
            ") for %lld ms while its primary was at lsn %" PRIu64 " (epoch %" PRIu64
            "); last reply %ld, %s; starting over\n",
            h->index, h->pos.lsn, h->pos.epoch, (long long)(now - h->moved_at),
            h->primary_pos.lsn, h->primary_pos.epoch, h->st.last_status,
            h->kind != REQ_NONE ? "a request in flight" : "none in flight");
    transfer_drop(rs, h);
    gate_close(h);
    h->pos_ok = 0;
    h->fresh = 1;
    h->redirects = 0;
    if (h->primary >= 0)
        snprintf(h->base, sizeof(h->base), "%s", rs->cfg->nodes[h->primary].url);
    h->next = REQ_STREAM;
    h->next_at = now;
    h->moved_at = now;
    pthread_mutex_lock(&rs->lock);
    h->st.restarts++;
    pthread_mutex_unlock(&rs->lock);
}

/* Step 5: ask where the primary is; follow a change. */
static void primary_refresh(struct replica_sync *rs, struct rshard *h)
{
    uint64_t epoch = 0;
    int node = rs->primary_of(rs->ctx, h->index, &epoch);

    if (node < -1 || node >= (int)rs->cfg->node_count)
        node = -1;
    if (node == h->primary && epoch == h->epoch)
        return;
    gate_close(h); /* a promotion (kick_wait) or another primary: no more pushes */
    transfer_drop(rs, h);
    /* This node served the copy as its primary (failover.h): what it holds
     * now is read again, not what the thread last applied. */
    if (h->primary == rs->self)
        h->pos_ok = 0;
    h->primary = node;
    h->epoch = epoch;
    h->base[0] = '\0';
    if (node >= 0)
        snprintf(h->base, sizeof(h->base), "%s", rs->cfg->nodes[node].url);
    h->redirects = 0;
    h->backoff_ms = RS_BACKOFF_FIRST_MS;
    h->next_at = clock_mono_ms();
    publish(rs, h, 1);
}

/* A copy's state for shard i, with its own easy handle. NULL: no memory. */
/* Wait for h's content-check helper thread, if any (step 6): h's copy is
 * not to be touched or closed while it hashes. On the sync thread. */
static void hasher_join(struct rshard *h)
{
    if (h->hasher_live)
        pthread_join(h->hasher, NULL);
    h->hasher_live = 0;
}

static struct rshard *rshard_new(struct replica_sync *rs, unsigned i, struct shard *local)
{
    struct rshard *h = calloc(1, sizeof(*h));

    if (!h)
        return NULL;
    h->index = i;
    h->local = local;
    h->rs = rs;
    pthread_mutex_init(&h->gate, NULL);
    atomic_init(&h->hashing, 0);
    h->primary = -2; /* "not asked yet": the first refresh sees a change */
    h->backoff_ms = RS_BACKOFF_FIRST_MS;
    h->st.primary = -1;
    h->st.snap_eta_ms = -1;
    atomic_init(&h->kicked, 0);
    h->curl = curl_easy_init();
    if (!h->curl) {
        pthread_mutex_destroy(&h->gate);
        free(h);
        return NULL;
    }
    remote_curl_defaults(rs->remote, h->curl);
    curl_easy_setopt(h->curl, CURLOPT_PRIVATE, h);
    curl_easy_setopt(h->curl, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h->curl, CURLOPT_WRITEDATA, h);
    curl_easy_setopt(h->curl, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h->curl, CURLOPT_HEADERDATA, h);
    pthread_mutex_lock(&rs->lock);
    h->id = ++rs->next_id;
    pthread_mutex_unlock(&rs->lock);
    return h;
}

/* Free h (no transfer in flight; out of rs->sh[]). NULL-safe. */
static void rshard_free(struct rshard *h)
{
    if (!h)
        return;
    if (h->curl)
        curl_easy_cleanup(h->curl);
    free(h->buf);
    free(h->spare);
    pthread_mutex_destroy(&h->gate);
    free(h);
}

/* A copy's first round on the thread: where it is, where its primary is. */
static void rshard_begin(struct replica_sync *rs, struct rshard *h)
{
    int rc = position_read(h);

    h->level_at = clock_mono_ms();
    primary_refresh(rs, h);
    publish(rs, h, rc);
}

/* Step 6: the adds and removes asked for since the last round. */
static void changes_make(struct replica_sync *rs)
{
    struct shard *add[CONFIG_MAX_SHARDS];
    unsigned char rm[CONFIG_MAX_SHARDS];
    uint64_t req;

    pthread_mutex_lock(&rs->lock);
    req = rs->change_req;
    if (req == rs->change_done) {
        pthread_mutex_unlock(&rs->lock);
        return;
    }
    memcpy(add, rs->add_req, sizeof(add));
    memcpy(rm, rs->remove_req, sizeof(rm));
    memset(rs->add_req, 0, sizeof(rs->add_req));
    memset(rs->remove_req, 0, sizeof(rs->remove_req));
    pthread_mutex_unlock(&rs->lock);
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
        struct rshard *h = rs->sh[i];

        if (rm[i] && h) {
            transfer_drop(rs, h); /* its connection goes with it */
            hasher_join(h);
            pthread_mutex_lock(&rs->lock);
            rs->sh[i] = NULL;
            pthread_mutex_unlock(&rs->lock);
            gate_close(h); /* a push in progress is over; none can start */
            if (h->dirty)
                shard_sync(h->local); /* what it applied, durable: the caller may keep it */
            rshard_free(h);
            h = NULL;
        }
        if (add[i] && !h) {
            h = rshard_new(rs, i, add[i]);
            if (!h) {
                fprintf(stderr, "shardfs: shard %u: replica sync: out of memory; this copy "
                        "is not kept current\n", i);
                continue;
            }
            pthread_mutex_lock(&rs->lock);
            rs->sh[i] = h;
            pthread_mutex_unlock(&rs->lock);
            rshard_begin(rs, h);
        }
    }
    pthread_mutex_lock(&rs->lock);
    rs->change_done = req;
    pthread_cond_broadcast(&rs->kicked_cond);
    pthread_mutex_unlock(&rs->lock);
}

static void *sync_main(void *arg)
{
    struct replica_sync *rs = arg;
    sigset_t all;

    /* Signals are for the main thread (SIGTERM stops a serve). */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_setname_np(pthread_self(), "replica-sync");
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
        if (rs->sh[i])
            rshard_begin(rs, rs->sh[i]);
    while (!atomic_load(&rs->stop)) {
        int running, left;
        CURLMsg *msg;
        int64_t now, wake;

        curl_multi_perform(rs->multi, &running);
        while ((msg = curl_multi_info_read(rs->multi, &left))) {
            struct rshard *h = NULL;

            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&h);
            if (h)
                transfer_done(rs, h, msg->data.result);
        }
        changes_make(rs);
        now = clock_mono_ms();
        wake = now + RS_POLL_MAX_MS;
        for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
            struct rshard *h = rs->sh[i];

            if (!h)
                continue;
            if (atomic_exchange(&h->kicked, 0)) {
                uint64_t seen;

                pthread_mutex_lock(&rs->lock);
                seen = h->kick_req;
                pthread_mutex_unlock(&rs->lock);
                primary_refresh(rs, h);
                pthread_mutex_lock(&rs->lock);
                h->kick_done = seen;
                pthread_cond_broadcast(&rs->kicked_cond);
                pthread_mutex_unlock(&rs->lock);
            }
            if (h->dirty && now - h->synced_at >= RS_SYNC_MS)
                sync_copy(rs, h);
            if (h->dirty && h->synced_at + RS_SYNC_MS < wake)
                wake = h->synced_at + RS_SYNC_MS;
            if (h->hasher_live && !atomic_load(&h->hashing)) {
                pthread_join(h->hasher, NULL);
                h->hasher_live = 0;
                h->hashed = h->hash_id; /* the next pull ends the checkpoint */
                h->moved_at = now; /* the pause is no sign of being stuck */
            }
            if (h->hasher_live)
                continue; /* step 6: paused while its copy is hashed */
            if (!h->snapping && h->pos_ok && h->st.phase == REPLICA_STREAMING &&
                h->primary >= 0 && h->primary != rs->self &&
                h->pos.lsn < h->primary_pos.lsn && now - h->moved_at > RS_STUCK_MS)
                stuck_restart(rs, h, now);
            gate_refresh(rs, h);
            if (h->kind != REQ_NONE || h->primary < 0 || h->primary == rs->self)
                continue;
            if (h->next_at > now) {
                if (h->next_at < wake)
                    wake = h->next_at;
                continue;
            }
            int rc = h->pos_ok ? 0 : position_read(h);
            if (rc == 0)
                gate_refresh(rs, h); /* opens it once the position is known */
            if (rc == 0)
                rc = transfer_start(rs, h);
            if (rc)
                step_failed(rs, h, rc);
        }
        now = clock_mono_ms();
        curl_multi_poll(rs->multi, NULL, 0, wake > now ? (int)(wake - now) : 0, NULL);
    }
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
        if (rs->sh[i]) {
            transfer_drop(rs, rs->sh[i]);
            hasher_join(rs->sh[i]);
        }
    pthread_mutex_lock(&rs->lock);
    pthread_cond_broadcast(&rs->kicked_cond); /* waiters see stop */
    pthread_mutex_unlock(&rs->lock);
    return NULL;
}

/* ---- the public functions ---- */

int replica_sync_start(const struct config *cfg, int self, struct shard *const *replicas,
                       replica_sync_primary_fn primary_of, void *ctx, struct replica_sync **out,
                       char *err, size_t errlen)
{
    struct replica_sync *rs = NULL;
    unsigned n = 0;
    int rc;

    *out = NULL;
    for (unsigned i = 0; i < cfg->shard_count; i++)
        n += replicas[i] != NULL;
    if (n == 0 && !cfg->etcd[0])
        return 0; /* the static map never gives this node a copy */
    rs = calloc(1, sizeof(*rs));
    if (!rs) {
        snprintf(err, errlen, "replica sync: out of memory");
        return -ENOMEM;
    }
    rs->cfg = cfg;
    rs->self = self;
    rs->primary_of = primary_of;
    rs->ctx = ctx;
    pthread_mutex_init(&rs->lock, NULL);
    pthread_cond_init(&rs->kicked_cond, NULL);
    {
        pthread_condattr_t ca;

        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&rs->sum_cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    atomic_init(&rs->stop, 0);
    rc = remote_new(cfg, self, &rs->remote, err, errlen);
    if (rc)
        goto fail;
    rs->multi = curl_multi_init();
    if (!rs->multi) {
        rc = -ENOMEM;
        snprintf(err, errlen, "replica sync: curl_multi_init failed");
        goto fail;
    }
    for (unsigned i = 0; i < cfg->shard_count; i++) {
        if (!replicas[i])
            continue;
        rs->sh[i] = rshard_new(rs, i, replicas[i]);
        if (!rs->sh[i]) {
            rc = -ENOMEM;
            snprintf(err, errlen, "replica sync: out of memory");
            goto fail;
        }
    }
    rc = -pthread_create(&rs->thread, NULL, sync_main, rs);
    if (rc) {
        snprintf(err, errlen, "replica sync: cannot start its thread: %s", strerror(-rc));
        goto fail;
    }
    rs->started = 1;
    *out = rs;
    return 0;
fail:
    replica_sync_stop(rs);
    return rc;
}

void replica_sync_stop(struct replica_sync *rs)
{
    if (!rs)
        return;
    if (rs->started) {
        atomic_store(&rs->stop, 1);
        curl_multi_wakeup(rs->multi);
        pthread_join(rs->thread, NULL);
    }
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
        struct rshard *h = rs->sh[i];

        if (h)
            gate_close(h);
        if (h && h->local && rs->started)
            shard_sync(h->local); /* what was applied, durable at a clean stop */
        rshard_free(h);
    }
    if (rs->multi)
        curl_multi_cleanup(rs->multi);
    remote_free(rs->remote);
    pthread_mutex_destroy(&rs->lock);
    pthread_cond_destroy(&rs->kicked_cond);
    pthread_cond_destroy(&rs->sum_cond);
    free(rs);
}

/* Post an add (local != NULL) or a remove of shard's copy and wait until
 * the thread made it (step 7). */
static int change_wait(struct replica_sync *rs, unsigned shard, struct shard *local)
{
    uint64_t want;
    int rc = 0;

    if (!rs || !rs->started || shard >= CONFIG_MAX_SHARDS)
        return -EINVAL;
    pthread_mutex_lock(&rs->lock);
    if (local && (rs->sh[shard] || rs->add_req[shard])) {
        rc = -EEXIST;
    } else if (!local && !rs->sh[shard] && !rs->add_req[shard]) {
        rc = -ENOENT;
    } else {
        if (local)
            rs->add_req[shard] = local;
        else if (rs->add_req[shard])
            rs->add_req[shard] = NULL; /* never started: nothing to undo */
        else
            rs->remove_req[shard] = 1;
        want = ++rs->change_req;
        curl_multi_wakeup(rs->multi);
        while (rs->change_done < want && !atomic_load(&rs->stop))
            pthread_cond_wait(&rs->kicked_cond, &rs->lock);
    }
    pthread_mutex_unlock(&rs->lock);
    return rc;
}

int replica_sync_add(struct replica_sync *rs, unsigned shard, struct shard *local)
{
    return local ? change_wait(rs, shard, local) : -EINVAL;
}

int replica_sync_remove(struct replica_sync *rs, unsigned shard)
{
    return change_wait(rs, shard, NULL);
}

void replica_sync_kick(struct replica_sync *rs, unsigned shard)
{
    if (!rs || shard >= CONFIG_MAX_SHARDS)
        return;
    pthread_mutex_lock(&rs->lock);
    if (rs->sh[shard])
        atomic_store(&rs->sh[shard]->kicked, 1);
    pthread_mutex_unlock(&rs->lock);
    curl_multi_wakeup(rs->multi);
}

void replica_sync_kick_wait(struct replica_sync *rs, unsigned shard)
{
    struct rshard *h;
    uint64_t want, id;

    if (!rs || shard >= CONFIG_MAX_SHARDS)
        return;
    pthread_mutex_lock(&rs->lock);
    h = rs->sh[shard];
    if (!h) {
        pthread_mutex_unlock(&rs->lock);
        return;
    }
    id = h->id;
    want = ++h->kick_req;
    atomic_store(&h->kicked, 1);
    curl_multi_wakeup(rs->multi);
    /* h is freed only after the thread took it out of sh[] under the lock */
    while ((h = rs->sh[shard]) && h->id == id && h->kick_done < want && rs->started &&
           !atomic_load(&rs->stop))
        pthread_cond_wait(&rs->kicked_cond, &rs->lock);
    pthread_mutex_unlock(&rs->lock);
}

int replica_sync_checksum(struct replica_sync *rs, unsigned shard, const struct stream_pos *at,
                          unsigned wait_ms, struct shard_lmdb_sum *out, struct stream_pos *now)
{
    int64_t deadline = clock_mono_ms() + wait_ms;
    struct timespec ts;
    struct rshard *h;
    uint64_t id;
    int rc;

    memset(out, 0, sizeof(*out));
    memset(now, 0, sizeof(*now));
    if (!rs || shard >= CONFIG_MAX_SHARDS)
        return -ENOENT;
    clock_deadline_in(&ts, wait_ms);
    pthread_mutex_lock(&rs->lock);
    h = rs->sh[shard];
    id = h ? h->id : 0;
    /* The last hash at `at`: one an earlier check made at the same
     * position is as good (it hashed this copy's data at `at`). The copy
     * may be dropped while we wait (step 7): h is looked up again. */
    for (;;) {
        h = rs->sh[shard];
        if (!h || h->id != id) {
            rc = -ENOENT;
            break;
        }
        if (h->sum_set && stream_pos_eq(&h->sum_at, at)) {
            rc = h->sum_rc;
            if (rc == 0)
                *out = h->sum;
            break;
        }
        if (clock_mono_ms() >= deadline || !rs->started || atomic_load(&rs->stop)) {
            rc = -ETIMEDOUT;
            break;
        }
        pthread_cond_timedwait(&rs->sum_cond, &rs->lock, &ts);
    }
    if (h && h->id == id)
        *now = h->st.pos;
    pthread_mutex_unlock(&rs->lock);
    return rc;
}

/* ---- pushes (step 8) ---- */

/* h->gate is held and open: apply the pushed entries. */
static int push_apply(struct rshard *h, const struct stream_pos *after, const uint8_t *body,
                      size_t len)
{
    int rc, applied = 0;

    if (after->lsn > h->gate_pos.lsn)
        return 0; /* a gap: the primary pushes again from our position */
    if (after->lsn == h->gate_pos.lsn && !stream_pos_eq(after, &h->gate_pos))
        return -ESTALE;
    rc = entries_apply(h, &h->gate_pos, body, len, &applied);
    if (applied) {
        h->gate_dirty = 1;
        h->pushes++;
    }
    if (rc == 1)
        return -ESTALE;
    return rc;
}

int replica_sync_push(struct replica_sync *rs, unsigned shard, int from, uint64_t epoch,
                      const struct stream_pos *after, const uint8_t *body, size_t len,
                      struct stream_pos *pos, uint64_t *synced)
{
    struct rshard *h;
    int rc;

    if (!rs || shard >= CONFIG_MAX_SHARDS)
        return -EAGAIN;
    pthread_mutex_lock(&rs->lock);
    h = rs->sh[shard];
    if (!h) {
        pthread_mutex_unlock(&rs->lock);
        return -EAGAIN;
    }
    /* under rs->lock: the thread frees h only after taking it out of sh[]
     * and then taking its gate (changes_make) */
    if (shard_nowait_active()) {
        if (pthread_mutex_trylock(&h->gate) != 0) {
            pthread_mutex_unlock(&rs->lock);
            shard_nowait_refuse();
            return -EWOULDBLOCK;
        }
    } else {
        pthread_mutex_lock(&h->gate);
    }
    pthread_mutex_unlock(&rs->lock);
    if (!h->gate_open || h->gate_primary != from || h->gate_epoch != epoch)
        rc = -EAGAIN;
    else
        rc = push_apply(h, after, body, len);
    *pos = h->gate_pos;
    *synced = h->gate_synced;
    pthread_mutex_unlock(&h->gate);
    /* Not woken for it: the thread takes the dirty copy over at its next
     * round (at most RS_POLL_MAX_MS), and syncs it RS_SYNC_MS on. */
    return rc;
}
