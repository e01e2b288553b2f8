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
 * Every request carries:
 *   X-Shardfs-Epoch: the sender's config epoch
 *   X-Shardfs-Date:  unix seconds (requests more than WIRE_MAX_SKEW away are 401)
 *   X-Shardfs-Auth:  hex HMAC-SHA256(secret, METHOD "\n" PATH?QUERY "\n" DATE
 *                    "\n" hex SHA-256(body)); without a valid one: 401, nothing done
 *
 * Routing: a node answers a request for a shard it does not own, or one whose
 * epoch is older than its own, with 307 and Location: the owner's URL with the
 * same path and query, plus its own X-Shardfs-Epoch; the client follows it,
 * remembers the new owner for that shard, adopts the higher epoch (else a
 * node redirecting an old epoch to itself would loop), and re-signs for the
 * new URL. X-Shardfs-Epoch is required on /v1/shard routes (else 400).
 *
 * Status <-> errno (wire_errno_of_status / wire_status_of_errno) is the only
 * place the two are translated: 400 EINVAL, 401 EACCES, 403 EPERM, 404
 * ENOENT (or ESTALE), 409 per X-Shardfs-Errno (EEXIST, EAGAIN, ENOTEMPTY,
 * ENOTDIR, EISDIR, EMLINK), 413 EFBIG, 414 ENAMETOOLONG, 502 EHOSTUNREACH
 * and 504 ETIMEDOUT (a node could not reach another), 507 ENOSPC, other 4xx
 * and 5xx (503 included: EAGAIN is reserved for a failed ASSERT_VALUE) EIO;
 * transport failures map separately in shard_remote.c.
 *
 * Pure functions; thread-safe; callers own all buffers.
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
#define WIRE_HDR_VLEN "X-Shardfs-Vlen"
#define WIRE_HDR_MORE "X-Shardfs-More"
#define WIRE_HDR_ERRNO "X-Shardfs-Errno"

#define WIRE_BODY_MAX (BATCH_MAX + 4096u)   /* largest request body accepted */
#define WIRE_GET_MAX (16u << 20)            /* largest get reply */
#define WIRE_SCAN_REPLY_MAX (4u << 20)      /* a scan reply is cut near this size */
#define WIRE_SCAN_LIMIT_MAX 65536u          /* records per scan reply */
#define WIRE_PATH_MAX 512u
#define WIRE_MAX_SKEW 300                   /* seconds */
#define WIRE_AUTH_LEN 64                    /* hex characters */
#define WIRE_NONCE_BYTES 16
#define WIRE_NONCE_LEN (2 * WIRE_NONCE_BYTES) /* hex characters */
#define WIRE_DIGEST_LEN 64                  /* hex characters of a SHA-256 */
#define WIRE_GETV_READ_HDR 12u              /* klen, link, buflen: u32le each */
#define WIRE_GETV_REQUEST_MAX (SHARD_READS_MAX * (WIRE_GETV_READ_HDR + BATCH_KEY_MAX))

enum wire_op {
    WIRE_OP_GET,
    WIRE_OP_SCAN,
    WIRE_OP_APPLY,
    WIRE_OP_SYNC,
    WIRE_OP_STAT,
    WIRE_OP_GETV,
};

/* "/v1/shard/N/op" -> shard and op. Returns 0, or -EINVAL (malformed) or
 * -ENOENT (not a shard path). No query string in path. */
int wire_parse_shard_path(const char *path, unsigned *shard, enum wire_op *op);
/* Writes "/v1/shard/N/op" (no query); returns its length or -ENAMETOOLONG. */
int wire_shard_path(char *out, size_t len, unsigned shard, enum wire_op op);
const char *wire_op_name(enum wire_op op);

/* The X-Shardfs-Auth value for a request. path_query is the path plus "?"
 * and query if there is one, exactly as sent. out gets 64 hex chars + NUL. */
void wire_sign(const char *secret, const char *method, const char *path_query, int64_t date,
               const void *body, size_t len, char out[WIRE_AUTH_LEN + 1]);
/* 0 if auth is right and date within WIRE_MAX_SKEW of now, else -EACCES.
 * Compares in constant time. */
int wire_verify(const char *secret, const char *method, const char *path_query, int64_t date,
                int64_t now, const void *body, size_t len, const char *auth);

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
