/* wire.c -- the node-to-node HTTP protocol of wire.h, as pure functions.
 *
 * Everything here is a parser, an encoder or a table; nothing does I/O, so
 * the client (shard_remote.c) and the server (node_server.c) share one
 * definition of every path, signature, body layout and status code, and it
 * is tested alone (tests/unit/test_wire.c).
 *
 * Parsers take a length and check every length field against what is left
 * of the buffer before touching the bytes it covers; they never read past
 * len and never trust a peer's number. The HMAC key is the cluster secret;
 * the signed text is
 *
 *     METHOD "\n" PATH?QUERY "\n" DATE "\n" lowercase-hex(SHA-256(body))
 *
 * with DATE in decimal, fed to the MAC piece by piece (no copy of the body or
 * the path). OpenSSL's EVP_MAC "HMAC" is fetched once per process and shared
 * (an EVP_MAC is immutable and thread-safe; each call has its own context).
 */
#include "wire.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "endian.h"

#define SHARD_PREFIX "/v1/shard/"
#define NO_END 0xffffffffu

static const char *const op_names[] = {
    [WIRE_OP_GET] = "get",   [WIRE_OP_SCAN] = "scan", [WIRE_OP_APPLY] = "apply",
    [WIRE_OP_SYNC] = "sync", [WIRE_OP_STAT] = "stat", [WIRE_OP_GETV] = "getv",
};
#define OP_COUNT (sizeof(op_names) / sizeof(op_names[0]))

/* ---- paths ---- */

const char *wire_op_name(enum wire_op op)
{
    return (unsigned)op < OP_COUNT ? op_names[op] : NULL;
}

int wire_parse_shard_path(const char *path, unsigned *shard, enum wire_op *op)
{
    size_t plen = strlen(SHARD_PREFIX);
    const char *p;
    uint64_t n = 0;

    if (!path || strncmp(path, SHARD_PREFIX, plen) != 0)
        return -ENOENT;
    p = path + plen;
    /* The shard number: decimal, no sign, no leading zero, fits unsigned. */
    if (*p < '0' || *p > '9')
        return -EINVAL;
    if (*p == '0' && p[1] >= '0' && p[1] <= '9')
        return -EINVAL;
    for (; *p >= '0' && *p <= '9'; p++) {
        n = n * 10 + (uint64_t)(*p - '0');
        if (n > UINT_MAX)
            return -EINVAL;
    }
    if (*p++ != '/')
        return -EINVAL;
    for (unsigned i = 0; i < OP_COUNT; i++) {
        if (strcmp(p, op_names[i]) == 0) {
            *shard = (unsigned)n;
            *op = (enum wire_op)i;
            return 0;
        }
    }
    return -EINVAL;
}

int wire_shard_path(char *out, size_t len, unsigned shard, enum wire_op op)
{
    const char *name = wire_op_name(op);
    int n;

    if (!name)
        return -EINVAL;
    n = snprintf(out, len, SHARD_PREFIX "%u/%s", shard, name);
    if (n < 0 || (size_t)n >= len)
        return -ENAMETOOLONG;
    return n;
}

/* ---- request signatures ---- */

static EVP_MAC *hmac_alg;
static pthread_once_t hmac_once = PTHREAD_ONCE_INIT;

static void hmac_fetch(void)
{
    hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL);
}

static void hex_encode(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The MAC into out (64 hex + NUL); 0 or -EIO (OpenSSL failed, out is ""). */
static int sign(const char *secret, const char *method, const char *path_query, int64_t date,
                const void *body, size_t len, char out[WIRE_AUTH_LEN + 1])
{
    unsigned char digest[EVP_MAX_MD_SIZE], mac[EVP_MAX_MD_SIZE];
    char body_hex[2 * 32 + 1], date_text[24];
    unsigned dlen = 0;
    size_t mlen = 0;
    EVP_MAC_CTX *ctx = NULL;
    OSSL_PARAM params[2];
    int rc = -EIO;

    memset(out, 0, WIRE_AUTH_LEN + 1);
    if (!secret || !method || !path_query || (!body && len))
        return -EIO;
    if (pthread_once(&hmac_once, hmac_fetch) != 0 || !hmac_alg)
        return -EIO;
    if (!EVP_Digest(len ? body : "", len, digest, &dlen, EVP_sha256(), NULL) || dlen != 32)
        return -EIO;
    hex_encode(digest, dlen, body_hex);
    snprintf(date_text, sizeof(date_text), "%" PRId64, date);

    ctx = EVP_MAC_CTX_new(hmac_alg);
    if (!ctx)
        return -EIO;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    /* An empty key is legal HMAC; OpenSSL wants a non-NULL pointer for it. */
    if (!EVP_MAC_init(ctx, (const unsigned char *)secret, strlen(secret), params))
        goto out;
    if (!EVP_MAC_update(ctx, (const unsigned char *)method, strlen(method)) ||
        !EVP_MAC_update(ctx, (const unsigned char *)"\n", 1) ||
        !EVP_MAC_update(ctx, (const unsigned char *)path_query, strlen(path_query)) ||
        !EVP_MAC_update(ctx, (const unsigned char *)"\n", 1) ||
        !EVP_MAC_update(ctx, (const unsigned char *)date_text, strlen(date_text)) ||
        !EVP_MAC_update(ctx, (const unsigned char *)"\n", 1) ||
        !EVP_MAC_update(ctx, (const unsigned char *)body_hex, 64))
        goto out;
    if (!EVP_MAC_final(ctx, mac, &mlen, sizeof(mac)) || mlen != 32)
        goto out;
    hex_encode(mac, mlen, out);
    rc = 0;
out:
    EVP_MAC_CTX_free(ctx);
    return rc;
}

void wire_sign(const char *secret, const char *method, const char *path_query, int64_t date,
               const void *body, size_t len, char out[WIRE_AUTH_LEN + 1])
{
    /* On failure out is "", which no request can carry as a valid auth. */
    (void)sign(secret, method, path_query, date, body, len, out);
}

int wire_verify(const char *secret, const char *method, const char *path_query, int64_t date,
                int64_t now, const void *body, size_t len, const char *auth)
{
    char want[WIRE_AUTH_LEN + 1];
    uint64_t skew;

    /* No secret, no trust: an unset secret must never verify anything. */
    if (!secret || !secret[0] || !auth || strlen(auth) != WIRE_AUTH_LEN)
        return -EACCES;
    /* |now - date| without overflow: the distance of two int64 fits a uint64. */
    skew = date > now ? (uint64_t)date - (uint64_t)now : (uint64_t)now - (uint64_t)date;
    if (skew > WIRE_MAX_SKEW)
        return -EACCES;
    if (sign(secret, method, path_query, date, body, len, want) != 0)
        return -EACCES;
    return CRYPTO_memcmp(want, auth, WIRE_AUTH_LEN) == 0 ? 0 : -EACCES;
}

/* ---- scan bodies ---- */

/* elen is 0 for a request without an end key. */
size_t wire_scan_request_size(size_t slen, size_t elen)
{
    return 4 + slen + 4 + elen;
}

/* Both scan encodings are runs of "u32le length, bytes": write one, return
 * what follows it. */
static uint8_t *put_lv(uint8_t *out, const void *p, size_t n)
{
    endian_put_le(out, n, 4);
    if (n)
        memcpy(out + 4, p, n);
    return out + 4 + n;
}

/* end NULL writes "no end" (0xffffffff) and ignores elen. */
void wire_scan_request_encode(uint8_t *out, const void *start, size_t slen, const void *end,
                              size_t elen)
{
    out = put_lv(out, start, slen);
    if (end)
        put_lv(out, end, elen);
    else
        endian_put_le(out, NO_END, 4);
}

/* ---- getv ---- */

_Static_assert(WIRE_GETV_REQUEST_MAX <= WIRE_BODY_MAX, "a getv request fits a request body");

size_t wire_getv_request_size(const struct shard_read *r, unsigned n)
{
    size_t len = 0;

    for (unsigned i = 0; i < n; i++)
        len += WIRE_GETV_READ_HDR + r[i].klen;
    return len;
}

void wire_getv_request_encode(uint8_t *out, const struct shard_read *r, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        endian_put_le(out, r[i].klen, 4);
        memcpy(out + 4, r[i].key, r[i].klen);
        out += 4 + r[i].klen;
        endian_put_le(out, r[i].link, 4);
        endian_put_le(out + 4, r[i].buflen, 4);
        out += 8;
    }
}

int wire_getv_request_decode(const uint8_t *buf, size_t len, struct shard_read *r, unsigned *n)
{
    size_t p = 0;
    unsigned i = 0;

    if (!buf)
        return -EINVAL;
    while (p < len) {
        size_t klen;

        if (i == SHARD_READS_MAX || len - p < 4)
            return -EINVAL;
        klen = (size_t)endian_get_le(buf + p, 4);
        p += 4;
        if (klen > BATCH_KEY_MAX || len - p < klen + 8)
            return -EINVAL;
        memset(&r[i], 0, sizeof(r[i]));
        r[i].key = buf + p;
        r[i].klen = klen;
        p += klen;
        r[i].link = (size_t)endian_get_le(buf + p, 4);
        r[i].buflen = (size_t)endian_get_le(buf + p + 4, 4);
        p += 8;
        i++;
    }
    *n = i;
    return i ? 0 : -EINVAL; /* the rest is shard_reads_check()'s */
}

size_t wire_getv_reply_size(const struct shard_read *r, unsigned n)
{
    size_t len = 0;

    for (unsigned i = 0; i < n; i++)
        len += 12 + (r[i].rc ? 0 : r[i].len);
    return len;
}

void wire_getv_reply_encode(uint8_t *out, const struct shard_read *r, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        size_t len = r[i].rc ? 0 : r[i].len;

        endian_put_le(out, (uint32_t)-r[i].rc, 4);
        endian_put_le(out + 4, r[i].rc ? 0 : r[i].vlen, 4);
        endian_put_le(out + 8, len, 4);
        if (len)
            memcpy(out + 12, r[i].buf, len);
        out += 12 + len;
    }
}

int wire_getv_reply_decode(const uint8_t *buf, size_t len, struct shard_read *r, unsigned n)
{
    size_t p = 0;

    for (unsigned i = 0; i < n; i++) {
        uint32_t err, vlen, got;

        if (!buf || len - p < 12)
            return -EINVAL;
        err = (uint32_t)endian_get_le(buf + p, 4);
        vlen = (uint32_t)endian_get_le(buf + p + 4, 4);
        got = (uint32_t)endian_get_le(buf + p + 8, 4);
        p += 12;
        if (err != 0 && err != ENOENT && err != EINVAL)
            return -EINVAL;
        if (got > r[i].buflen || got > vlen || len - p < got || (err && (got || vlen)))
            return -EINVAL;
        /* A short copy only when the value is longer than the buffer. */
        if (got < r[i].buflen && got != vlen)
            return -EINVAL;
        r[i].rc = -(int)err;
        r[i].vlen = vlen;
        r[i].len = got;
        if (got)
            memcpy(r[i].buf, buf + p, got);
        p += got;
    }
    return p == len ? 0 : -EINVAL;
}

int wire_scan_request_decode(const uint8_t *buf, size_t len, const uint8_t **start, size_t *slen,
                             const uint8_t **end, size_t *elen)
{
    size_t p = 0;
    uint32_t n;

    if (!buf || len < 4)
        return -EINVAL;
    n = (uint32_t)endian_get_le(buf, 4);
    p = 4;
    if (n > len - p)
        return -EINVAL;
    *start = buf + p;
    *slen = n;
    p += n;
    if (len - p < 4)
        return -EINVAL;
    n = (uint32_t)endian_get_le(buf + p, 4);
    p += 4;
    if (n == NO_END) {
        if (p != len)
            return -EINVAL;
        *end = NULL;
        *elen = 0;
        return 0;
    }
    /* The end key runs exactly to the end of the body: no trailing bytes. */
    if (n != len - p)
        return -EINVAL;
    *end = buf + p;
    *elen = n;
    return 0;
}

int wire_scan_reply_next(const uint8_t *buf, size_t len, size_t *pos, const uint8_t **key,
                         size_t *klen, const uint8_t **val, size_t *vlen)
{
    size_t p = *pos;
    uint32_t kl, vl;

    if (p == len)
        return 0;
    if (!buf || p > len || len - p < 4)
        return -EINVAL;
    kl = (uint32_t)endian_get_le(buf + p, 4);
    p += 4;
    if (kl == 0 || kl > BATCH_KEY_MAX || kl > len - p)
        return -EINVAL;
    *key = buf + p;
    p += kl;
    if (len - p < 4)
        return -EINVAL;
    vl = (uint32_t)endian_get_le(buf + p, 4);
    p += 4;
    if (vl > BATCH_VALUE_MAX || vl > len - p)
        return -EINVAL;
    *val = buf + p;
    p += vl;
    *klen = kl;
    *vlen = vl;
    *pos = p;
    return 1;
}

size_t wire_scan_record_size(size_t klen, size_t vlen)
{
    return 4 + klen + 4 + vlen;
}

void wire_scan_record_encode(uint8_t *out, const void *key, size_t klen, const void *val,
                             size_t vlen)
{
    put_lv(put_lv(out, key, klen), val, vlen);
}

/* ---- status <-> errno: the one table ---- */

static const struct {
    int err;          /* positive errno */
    const char *name; /* X-Shardfs-Errno */
    int status;       /* what the server sends for it */
} errno_table[] = {
    {EEXIST, "EEXIST", 409},         {EAGAIN, "EAGAIN", 409},
    {ENOTEMPTY, "ENOTEMPTY", 409},   {ENOTDIR, "ENOTDIR", 409},
    {EISDIR, "EISDIR", 409},         {EMLINK, "EMLINK", 409},
    {ENOSPC, "ENOSPC", 507},         {EIO, "EIO", 500},
    {ENOENT, "ENOENT", 404},         {ESTALE, "ESTALE", 404},
    {EINVAL, "EINVAL", 400},         {EFBIG, "EFBIG", 413},
    {ENAMETOOLONG, "ENAMETOOLONG", 414},
    {EHOSTUNREACH, "EHOSTUNREACH", 502}, {ETIMEDOUT, "ETIMEDOUT", 504},
    {EACCES, "EACCES", 401},         {EPERM, "EPERM", 403},
};
#define ERRNO_COUNT (sizeof(errno_table) / sizeof(errno_table[0]))

int wire_errno_of_status(long status, const char *errno_hdr)
{
    if (status >= 200 && status <= 299)
        return 0;
    /* The header refines a status only to an errno the server would send
     * with that very status (so a 500 never turns into EEXIST). */
    for (unsigned i = 0; errno_hdr && i < ERRNO_COUNT; i++)
        if (errno_table[i].status == status && strcmp(errno_table[i].name, errno_hdr) == 0)
            return -errno_table[i].err;
    switch (status) {
    case 400:
        return -EINVAL;
    case 401:
        return -EACCES;
    case 404:
        return -ENOENT;
    case 413:
        return -EFBIG;
    case 414:
        return -ENAMETOOLONG;
    case 503:
        /* Not -EAGAIN: the shard interface reserves that for a failed
         * ASSERT_VALUE ("re-read and retry"); a busy node is an I/O error
         * once the client's retries are spent. */
        return -EIO;
    case 507:
        return -ENOSPC;
    default:
        /* 409 without a known header, other 4xx and 5xx, and anything a
         * peer should never send (1xx, 3xx). */
        return -EIO;
    }
}

/* 0 gives 200; either sign of an errno is accepted. */
int wire_status_of_errno(int neg_errno)
{
    int e = neg_errno < 0 ? -neg_errno : neg_errno;

    if (e == 0)
        return 200;
    for (unsigned i = 0; i < ERRNO_COUNT; i++)
        if (errno_table[i].err == e)
            return errno_table[i].status;
    return 500;
}

const char *wire_errno_name(int err)
{
    int e = err < 0 ? -err : err;

    for (unsigned i = 0; i < ERRNO_COUNT; i++)
        if (errno_table[i].err == e)
            return errno_table[i].name;
    return NULL;
}
