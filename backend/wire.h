/* wire.h -- the HTTP protocol between nodes, in one place.
 *
 * Every shard operation is one HTTP request to the node that owns the shard.
 * Bodies are binary; nothing is text-encoded, so any byte can appear in keys
 * and values. DESIGN.md ("Wire protocol") is the prose version of this file.
 *
 *   POST /v1/shard/N/get?off=O&len=L   body: key
 *        200 body: value bytes [O, O+L) (L capped at WIRE_GET_MAX), header
 *            X-Shardfs-Vlen: full value length;   404: no such key
 *   POST /v1/shard/N/scan?limit=K      body: wire_scan_request
 *        200 body: records (u32le klen, key, u32le vlen, value)...; header
 *            X-Shardfs-More: 1 when cut short (limit, or once the reply passes
 *            WIRE_SCAN_REPLY_MAX; a reply always holds at least one record, so
 *            it may reach one value's size): the client continues from the
 *            next possible key: the last key + "\0", or for a 511-byte key its
 *            last byte incremented with carry
 *   POST /v1/shard/N/scan?limit=K&join=HEX&link=L   (a scan with a join)
 *        the same, and each record's value names a second key of the shard:
 *        the bytes HEX (1..SHARD_JOIN_PREFIX_MAX, lowercase hex) followed
 *        by the value's first L bytes (shard.h, struct shard_join: a
 *        directory entry names its inode). A node that did the join says
 *        X-Shardfs-Join: 1, and each record of its reply is followed by
 *        u32le jlen and the joined key's value, read as of the same moment
 *        (jlen 0xffffffff: no such key, or a value shorter than L); without
 *        that header (a node that predates joins) the reply is a plain one
 *        and the client reads the joined keys itself
 *   POST /v1/shard/N/getv              body: 1..SHARD_READS_MAX reads, each
 *            u32le klen, key, u32le link, u32le buflen (shard.h's shard_read)
 *        200 body: per read u32le errno (0, ENOENT, EINVAL), u32le vlen,
 *            u32le len, the value's first len bytes; all read as of one moment
 *   POST /v1/shard/N/apply             body: an encoded batch (batch.h)
 *        204, or 409 with X-Shardfs-Errno: EEXIST | EAGAIN (a precondition)
 *   POST /v1/shard/N/sync              204 once everything applied is durable
 *   GET  /v1/shard/N/stat              200 JSON {"records":R,"bytes":B,"pending":P}
 *   GET  /v1/config                    200 JSON {"epoch":E,"node":"NAME","shards":["URL",...]}
 *   A wrong method for an op: 405.
 *
 * Replication (issue 10; the primary's side is shard_repl.h):
 *   GET  /v1/shard/N/stream?node=NAME&epoch=E&lsn=L&check=C&wait=MS&max=BYTES[&synced=S]
 *        Sent by node NAME, a replica of shard N, to N's primary: "my copy is
 *        at position (E,L,C) (stream.h), in my redo log; everything up to lsn
 *        S is synced (fsync) here; send what follows". The query is part of
 *        the signed target, so NAME is authenticated like the rest of the
 *        request (by the cluster secret). Every argument but synced is
 *        required, in any order (the first of a name counts); numbers in
 *        decimal (u64), check included; synced absent is 0. The request is the replica's acknowledgement: the primary
 *        records (E,L,C) and S for NAME (shard_repl_report) and keeps its
 *        stream after L (a hold for NAME, released after 10 minutes without
 *        a request from NAME).
 *        200 body: the entries after (E,L,C), concatenated in the stream.h
 *            encoding (stream_entry_next walks them), at least one, about
 *            max bytes at most (max capped at WIRE_STREAM_MAX; 0 means
 *            WIRE_STREAM_MAX; a single entry may exceed it)
 *        204 no entry after (E,L,C) came within wait ms (capped at
 *            WIRE_STREAM_WAIT_MAX; 0: answer at once): a long poll, woken
 *            by the next batch the primary applies. The connection holds
 *            no thread while it waits.
 *        409 + X-Shardfs-Errno: ERANGE (entries after L are no longer
 *            retained) or ESTALE ((E,L,C) is not a position of the
 *            primary's history: a diverged copy): the replica needs a
 *            snapshot; the primary holds its stream after the position in
 *            X-Shardfs-Position for NAME from now on, so a snapshot based
 *            on that position (taken after this reply) finds its tail.
 *        403 + EPERM: NAME is not a replica of N in the shard map (or not a
 *            node of the config, or this node itself).
 *        307 (as for any shard op) when this node is not N's primary: to the
 *            primary of the shard map.
 *        Every 200, 204 and 409 carries X-Shardfs-Position: "E/L/C" in
 *        decimal, the primary's position when it answered (lag), and a
 *        200 or 204 carries X-Shardfs-Sync: LSN when a sync() on the
 *        primary waits for this replica to have synced up to LSN (so sync
 *        your copy, then ask again with synced >= LSN; such a sync also
 *        wakes the long poll).
 *        200 or 204 carries X-Shardfs-Checkpoint: E/L/C while a content
 *        check (`shardfs fsck --replicas`) stands for this replica at that
 *        position: the reply holds no entry past it (none, if the replica is
 *        there), and a replica at it hashes its copy before it asks again
 *        (shard_repl.h, replica_sync.h). X-Shardfs-Checkpoint-Id names the
 *        checkpoint (a number); the replica's pulls then carry hashed=ID,
 *        the one it last hashed for, which ends it.
 *   GET  /v1/shard/N/position          (the primary of N)
 *        200 JSON {"epoch":E,"lsn":L,"check":"C","replicas":[{"node":"NAME",
 *            "in_sync":true|false,"joining":true|false,"join_lsn":J,
 *            "lsn":L,"synced":S,"lag_batches":B,
 *            "lag_ms":MS,"last_report_ms":MS|-1,"snapshot":true|false},...]}
 *            ("check" a decimal string: JSON numbers lose u64 bits), also
 *            X-Shardfs-Position; replicas only where the shard has them.
 *   POST /v1/shard/N/push?node=NAME&epoch=E&after=PE/PL/PC   (to a replica)
 *        Sent by node NAME, the primary of shard N at shard epoch E, to a
 *        node holding a replica of N: the body is entries of N's stream
 *        (the stream route's 200 encoding) read after position (PE,PL,PC).
 *        The replica applies those after its own position, in order, each
 *        continuing its history (the same rule as for pulled entries; the
 *        ones it holds already are skipped), into its redo log, and answers
 *        200 JSON {"position":"E/L/C","synced":S}: its copy's position
 *        after them, and the last lsn it synced. An after past the copy's
 *        position (a gap) applies nothing and answers the same way, so the
 *        primary pushes again from there. The answer is an ack like a
 *        pull's (shard_repl_report). 409 + EAGAIN: the copy takes no
 *        pushes now (no replica of N here, a snapshot or content check in
 *        progress, or NAME and E are not its primary and epoch in this
 *        node's map); ESTALE: an entry does not continue its history. The
 *        primary then waits for the pulls, which stay the way to catch up.
 *        Served by the node addressed (never redirected).
 *   A shard op (get, getv, scan, apply, sync, stat, stream, position) sent
 *   to a node that holds only a replica of N gets 307 to N's primary, like
 *   one sent to a node holding no copy.
 *
 * Every signed request carries (the HMAC signs the body's declared tag and
 * length, not the body, so a node authenticates it from the headers alone,
 * before it reads a byte of the body):
 *   X-Shardfs-Epoch:  the sender's config epoch (signed as sent, "" when
 *                     absent: only the /v1/shard routes require it, 400)
 *   X-Shardfs-Date:   unix seconds (more than WIRE_MAX_SKEW away: 401)
 *   X-Shardfs-Nonce:  WIRE_NONCE_LEN lowercase hex digits, random (16 bytes
 *                     from getrandom), new for every attempt
 *   X-Shardfs-Digest: the body's tag (of "" without one): lowercase hex
 *                     Poly1305 of the body under the one-time key
 *                     HMAC-SHA256(secret, "shardfs-v3-body\n" NONCE), 16 bytes
 *                     (the nonce is new for every attempt, so is the key)
 *   Content-Length:   the body's length (none: 0)
 *   X-Shardfs-Auth:   lowercase hex HMAC-SHA256(secret, the text below)
 * The signed text is, lines joined by "\n", no "\n" at the end:
 *   "shardfs-v3", METHOD, NODE_URL, PATH?QUERY, EPOCH, DATE, NONCE,
 *   BODY_LENGTH, DIGEST
 * with NODE_URL the url (shards.conf) of the node the request is sent to,
 * without a trailing "/", PATH?QUERY the request target exactly as sent,
 * and the numbers in decimal. Without a valid one: 401, nothing done. A node
 * refuses a nonce it accepted before (401) while its date could still pass
 * (nonce_cache.h), and a request signed for another node's URL (401), so a
 * captured request cannot be replayed, here or elsewhere. A body that is not
 * the one signed (another digest or length) is 401 and changes nothing.
 *
 * Routing: a node answers a request for a shard it does not own, or one whose
 * epoch is older than its own, with 307 and Location: the owner's URL with the
 * same path and query, plus its own X-Shardfs-Epoch; the client follows it,
 * remembers the new owner for that shard, adopts the higher epoch (else a
 * node redirecting an old epoch to itself would loop), and re-signs for the
 * new URL. X-Shardfs-Epoch is required on /v1/shard routes (else 400).
 *
 * Layouts: get, getv, scan, apply, sync and stat carry depth=D in their query, the
 * sender's local depth of shard N (placement.h, layouts; absent: no check).
 * The node serving N refuses, with 421 + X-Shardfs-Errno: EBADSLT and its
 * own depth in X-Shardfs-Depth, before doing anything: a request whose D is
 * not its depth of N (the sender's layout is older or newer: a split or
 * merge moved keys between N and its buddy), and a get, getv or apply
 * naming a key whose placement hash (placement_key_hash) is not homed at N
 * in its layout. A request with depth=D for an N that is no shard of the
 * node's layout (a merge took it) gets 421 with the depth of the shard that
 * holds N's keys now. So a client with an old layout can never write a record
 * into a shard that no longer owns it, nor read half a directory from one;
 * it learns the layout anew (the shard map) and routes again.
 *
 * Status <-> errno (wire_errno_of_status / wire_status_of_errno) is the only
 * place the two are translated: 400 EINVAL, 401 EACCES, 403 EPERM, 404
 * ENOENT (or ESTALE), 409 per X-Shardfs-Errno (EEXIST, EAGAIN, ENOTEMPTY,
 * ENOTDIR, EISDIR, EMLINK; ERANGE and ESTALE from the stream route), 413
 * EFBIG, 414 ENAMETOOLONG, 421 EBADSLT (Layouts, above), 502 EHOSTUNREACH
 * and 504 ETIMEDOUT (a node could not reach another), 503 EREMCHG (a handover gave the shard away before the
 * op did anything: try again where the map points), 507 ENOSPC, other 4xx
 * and 5xx (503 without that header included: EAGAIN is reserved for a
 * failed ASSERT_VALUE) EIO; transport failures map separately in
 * shard_remote.c.
 *
 * Pure functions, but for wire_nonce_new() (getrandom), the wire_digest
 * objects (on the heap) and the HMAC context each thread that signs keeps
 * (freed when the thread ends); thread-safe; callers own all buffers.
 */
#ifndef SHARDFS_WIRE_H
#define SHARDFS_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "batch.h"
#include "shard.h"

#define WIRE_HDR_EPOCH "X-Shardfs-Epoch"
#define WIRE_HDR_DATE "X-Shardfs-Date"
#define WIRE_HDR_AUTH "X-Shardfs-Auth"
#define WIRE_HDR_NONCE "X-Shardfs-Nonce"
#define WIRE_HDR_DIGEST "X-Shardfs-Digest"
#define WIRE_HDR_VLEN "X-Shardfs-Vlen"
#define WIRE_HDR_MORE "X-Shardfs-More"
#define WIRE_HDR_JOIN "X-Shardfs-Join"
#define WIRE_HDR_ERRNO "X-Shardfs-Errno"
#define WIRE_HDR_POSITION "X-Shardfs-Position" /* "E/L/C" */
#define WIRE_HDR_SYNC "X-Shardfs-Sync"
#define WIRE_HDR_CHECKPOINT "X-Shardfs-Checkpoint" /* "E/L/C" */
#define WIRE_HDR_CHECKPOINT_ID "X-Shardfs-Checkpoint-Id"
#define WIRE_HDR_DEPTH "X-Shardfs-Depth" /* a 421's: the node's depth of the shard */

#define WIRE_BODY_MAX (BATCH_MAX + 4096u)   /* largest request body accepted */
#define WIRE_GET_MAX (16u << 20)            /* largest get reply */
#define WIRE_SCAN_REPLY_MAX (4u << 20)      /* a scan reply is cut near this size */
#define WIRE_SCAN_LIMIT_MAX 65536u          /* records per scan reply */
#define WIRE_PATH_MAX 512u
#define WIRE_STREAM_MAX (16u << 20)         /* stream reply, about (max=) */
#define WIRE_STREAM_WAIT_MAX 30000u         /* ms a stream request may wait */
#define WIRE_MAX_SKEW 300                   /* seconds */
#define WIRE_AUTH_LEN 64                    /* hex characters */
#define WIRE_NONCE_BYTES 16
#define WIRE_NONCE_LEN (2 * WIRE_NONCE_BYTES) /* hex characters */
#define WIRE_DIGEST_LEN 32                  /* hex characters of a Poly1305 tag */
#define WIRE_GETV_READ_HDR 12u              /* klen, link, buflen: u32le each */
#define WIRE_GETV_REQUEST_MAX (SHARD_READS_MAX * (WIRE_GETV_READ_HDR + BATCH_KEY_MAX))

enum wire_op {
    WIRE_OP_GET,
    WIRE_OP_SCAN,
    WIRE_OP_APPLY,
    WIRE_OP_SYNC,
    WIRE_OP_STAT,
    WIRE_OP_GETV,
    WIRE_OP_STREAM,
    WIRE_OP_POSITION,
    WIRE_OP_PUSH,
};

/* 1 for the ops on a shard of the layout, which carry the sender's depth
 * of it (Layouts, above): get, getv, scan and apply, which name its keys,
 * and sync and stat. (The replication routes do not: their stores do not
 * reshard yet.) */
static inline int wire_op_has_layout(enum wire_op op)
{
    return op == WIRE_OP_GET || op == WIRE_OP_GETV || op == WIRE_OP_SCAN || op == WIRE_OP_APPLY ||
           op == WIRE_OP_SYNC || op == WIRE_OP_STAT;
}

/* "/v1/shard/N/op" -> shard and op. Returns 0, or -EINVAL (malformed) or
 * -ENOENT (not a shard path). No query string in path. */
int wire_parse_shard_path(const char *path, unsigned *shard, enum wire_op *op);
/* Writes "/v1/shard/N/op" (no query); returns its length or -ENAMETOOLONG. */
int wire_shard_path(char *out, size_t len, unsigned shard, enum wire_op op);
const char *wire_op_name(enum wire_op op);

/* What a request's signature covers (see the top of this file). All strings
 * are borrowed. node_url may end in one "/" (shards.conf allows it); it is
 * signed without. */
struct wire_signed {
    const char *method;
    const char *node_url;   /* the node it is sent to */
    const char *path_query; /* the request target exactly as sent */
    const char *epoch;      /* X-Shardfs-Epoch as sent, "" without one */
    int64_t date;
    const char *nonce;  /* WIRE_NONCE_LEN lowercase hex digits */
    const char *digest; /* WIRE_DIGEST_LEN lowercase hex digits */
    uint64_t body_len;
};

/* The X-Shardfs-Auth value of s into out (64 hex digits + NUL). 0, or -EIO
 * (OpenSSL failed, or a field is NULL; out is then "", which no request can
 * carry as a valid auth). */
int wire_sign(const char *secret, const struct wire_signed *s, char out[WIRE_AUTH_LEN + 1]);
/* 0 if auth is s's signature under secret, s->date is within WIRE_MAX_SKEW
 * of now and the nonce and digest are well-formed (lowercase hex of their
 * length); else -EACCES. An empty secret verifies nothing. Compares in
 * constant time. Does not look at nonces seen before: nonce_cache.h. */
int wire_verify(const char *secret, const struct wire_signed *s, int64_t now, const char *auth);

/* A fresh nonce from getrandom(): WIRE_NONCE_LEN hex digits + NUL. 0 or
 * -errno. */
int wire_nonce_new(char out[WIRE_NONCE_LEN + 1]);
/* Whether s is exactly n lowercase hex digits (then 1, with the bytes in
 * out[n / 2] if out is not NULL). */
int wire_hex_decode(const char *s, size_t n, uint8_t *out);

/* A body's tag as X-Shardfs-Digest wants it, for the request signed with
 * nonce under secret (the top of this file): in one go, or piece by piece as
 * it streams in (wire_digest_new, _update, _final; _free is NULL-safe and
 * may be called instead of _final, which frees). wire_body_mac: 0, or -EIO
 * with out "" (OpenSSL failed, or nonce is not WIRE_NONCE_LEN lowercase hex
 * digits). */
int wire_body_mac(const char *secret, const char *nonce, const void *body, size_t len,
                  char out[WIRE_DIGEST_LEN + 1]);
struct wire_digest;
/* NULL: out of memory, OpenSSL failed, or a malformed nonce. */
struct wire_digest *wire_digest_new(const char *secret, const char *nonce);
int wire_digest_update(struct wire_digest *d, const void *p, size_t n); /* 0 or -EIO */
int wire_digest_final(struct wire_digest *d, char out[WIRE_DIGEST_LEN + 1]); /* 0 or -EIO */
void wire_digest_free(struct wire_digest *d);

/* Scan request body: u32le slen, start, u32le elen (0xffffffff: no end), end. */
size_t wire_scan_request_size(size_t slen, size_t elen);
void wire_scan_request_encode(uint8_t *out, const void *start, size_t slen, const void *end,
                              size_t elen);
/* Parses into pointers inside buf; *end NULL when there is none. -EINVAL. */
int wire_scan_request_decode(const uint8_t *buf, size_t len, const uint8_t **start, size_t *slen,
                             const uint8_t **end, size_t *elen);
/* Scan reply records: walk with *pos from 0; returns 1 and fills, 0 at the
 * end, -EINVAL on a malformed reply (never reads past len). */
int wire_scan_reply_next(const uint8_t *buf, size_t len, size_t *pos, const uint8_t **key,
                         size_t *klen, const uint8_t **val, size_t *vlen);
/* Bytes one record takes in a scan reply. */
size_t wire_scan_record_size(size_t klen, size_t vlen);
void wire_scan_record_encode(uint8_t *out, const void *key, size_t klen, const void *val,
                             size_t vlen);

/* A joined scan's reply records (wire protocol above): the same walk, plus
 * the joined value (*jval NULL and *jlen 0 when absent). */
#define WIRE_JOIN_ABSENT 0xffffffffu
int wire_scan_join_reply_next(const uint8_t *buf, size_t len, size_t *pos, const uint8_t **key,
                              size_t *klen, const uint8_t **val, size_t *vlen,
                              const uint8_t **jval, size_t *jlen);
size_t wire_scan_join_record_size(size_t klen, size_t vlen, size_t jlen);
/* jval NULL: absent. */
void wire_scan_join_record_encode(uint8_t *out, const void *key, size_t klen, const void *val,
                                  size_t vlen, const void *jval, size_t jlen);
/* The query arguments of a join ("join=HEX&link=L") into out: 0, or -EINVAL
 * when j is bad or out too small. */
int wire_join_query(char *out, size_t cap, const struct shard_join *j);
/* A join from its query arguments (hex, and link as a decimal string): 0
 * with j->prefix pointing into prefix, or -EINVAL. */
int wire_join_parse(const char *hex, const char *link, uint8_t prefix[SHARD_JOIN_PREFIX_MAX],
                    struct shard_join *j);

/* getv request body. Each read takes WIRE_GETV_READ_HDR bytes plus its key,
 * so a list that shard_reads_check() accepts encodes into at most
 * WIRE_GETV_REQUEST_MAX bytes. decode points r[i].key into buf and sets klen, link
 * and buflen (buf NULL; the list is checked when it is done:
 * shard_reads_check); -EINVAL for a malformed or empty body. */
size_t wire_getv_request_size(const struct shard_read *r, unsigned n);
void wire_getv_request_encode(uint8_t *out, const struct shard_read *r, unsigned n);
int wire_getv_request_decode(const uint8_t *buf, size_t len, struct shard_read *r, unsigned *n);
/* getv reply body, from reads done. decode fills rc, vlen and len of the n
 * reads asked for and copies each value into its buf; -EINVAL for a reply
 * that does not match what was asked (a value longer than asked, too few
 * or too many reads, a bad errno). */
size_t wire_getv_reply_size(const struct shard_read *r, unsigned n);
void wire_getv_reply_encode(uint8_t *out, const struct shard_read *r, unsigned n);
int wire_getv_reply_decode(const uint8_t *buf, size_t len, struct shard_read *r, unsigned n);

/* The one status <-> errno translation. errno_hdr may be NULL. */
int wire_errno_of_status(long status, const char *errno_hdr);
int wire_status_of_errno(int neg_errno);
/* "EEXIST" for -EEXIST (or EEXIST); NULL if not one we send. */
const char *wire_errno_name(int err);

#endif
