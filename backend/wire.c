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
 * the signed text (wire.h) is fed to the MAC through a small buffer (a long
 * path directly). OpenSSL's EVP_MAC "HMAC" is fetched once per process and shared
 * (an EVP_MAC is immutable and thread-safe); each thread keeps its own
 * context, keyed once (hmac_begin).
 * The body is not in the MAC: its tag and length are, as the client
 * declared them, so a server can authenticate a request before it reads the
 * body, and check the body against the tag as it streams in. The tag is a
 * Poly1305 MAC under a one-time key, HMAC-SHA256(secret, "shardfs-v3-body"
 * "\n" NONCE): a nonce is never used twice (each attempt draws a new one,
 * and a node refuses one it saw), so no key is used twice, which is what
 * Poly1305 asks. It runs at about 13 GB/s here against SHA-256's 1.8, and a
 * large write crosses it twice a hop (client and node).
 */
#include "wire.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

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
    [WIRE_OP_STREAM] = "stream", [WIRE_OP_POSITION] = "position", [WIRE_OP_PUSH] = "push",
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
static pthread_key_t hmac_key;
static int hmac_key_ok;

/* A thread's HMAC context, keyed with the secret it last used: keying (and
 * the digest lookup behind it) is two thirds of a signature's cost, and a
 * process signs with one secret. Freed when the thread ends. */
struct hmac_tls {
    EVP_MAC_CTX *ctx;
    size_t klen; /* SIZE_MAX: not keyed */
    char key[256];
};

static void hmac_tls_free(void *p)
{
    struct hmac_tls *t = p;

    EVP_MAC_CTX_free(t->ctx);
    OPENSSL_cleanse(t->key, sizeof(t->key));
    free(t);
}

static void hmac_fetch(void)
{
    hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL);
    hmac_key_ok = pthread_key_create(&hmac_key, hmac_tls_free) == 0;
}

/* This thread's context, ready for the updates of a MAC under secret; NULL
 * when OpenSSL fails (or is out of memory). */
static EVP_MAC_CTX *hmac_begin(const char *secret)
{
    struct hmac_tls *t;
    size_t n = strlen(secret);
    OSSL_PARAM params[2];

    if (pthread_once(&hmac_once, hmac_fetch) != 0 || !hmac_alg || !hmac_key_ok)
        return NULL;
    t = pthread_getspecific(hmac_key);
    if (!t) {
        t = calloc(1, sizeof(*t));
        if (!t)
            return NULL;
        t->ctx = EVP_MAC_CTX_new(hmac_alg);
        if (!t->ctx || pthread_setspecific(hmac_key, t) != 0) {
            hmac_tls_free(t);
            return NULL;
        }
        t->klen = SIZE_MAX;
    }
    if (t->klen == n && memcmp(t->key, secret, n) == 0) {
        /* Same key: OpenSSL restarts from the key it kept. */
        if (EVP_MAC_init(t->ctx, NULL, 0, NULL))
            return t->ctx;
    }
    t->klen = SIZE_MAX;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    /* An empty key is legal HMAC; OpenSSL wants a non-NULL pointer for it. */
    if (!EVP_MAC_init(t->ctx, (const unsigned char *)secret, n, params))
        return NULL;
    if (n < sizeof(t->key)) {
        memcpy(t->key, secret, n);
        t->klen = n;
    }
    return t->ctx;
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

/* The text of wire.h is "shardfs-v3" and these fields, "\n" between them. */
#define SIGN_VERSION "shardfs-v3"
/* What the body tag's key is derived from, before "\n" and the nonce. */
#define BODY_KEY_LABEL "shardfs-v3-body"

/* Exactly n lowercase hex digits: 1 (and the bytes into out, if given). */
int wire_hex_decode(const char *s, size_t n, uint8_t *out)
{
    for (size_t i = 0; i < n; i++) {
        char c = s ? s[i] : '\0';
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;

        if (v < 0)
            return 0;
        if (out)
            out[i / 2] = (uint8_t)(i % 2 ? out[i / 2] | v : v << 4);
    }
    return s && s[n] == '\0';
}

int wire_sign(const char *secret, const struct wire_signed *s, char out[WIRE_AUTH_LEN + 1])
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    char date[24], len[24];
    size_t mlen = 0, ulen;
    EVP_MAC_CTX *ctx;

    memset(out, 0, WIRE_AUTH_LEN + 1);
    if (!secret || !s->method || !s->node_url || !s->path_query || !s->epoch || !s->nonce ||
        !s->digest)
        return -EIO;
    snprintf(date, sizeof(date), "%" PRId64, s->date);
    snprintf(len, sizeof(len), "%" PRIu64, s->body_len);
    ulen = strlen(s->node_url);
    if (ulen && s->node_url[ulen - 1] == '/')
        ulen--;
    const struct {
        const char *p;
        size_t n;
    } fields[] = {
        {SIGN_VERSION, strlen(SIGN_VERSION)},
        {s->method, strlen(s->method)},
        {s->node_url, ulen},
        {s->path_query, strlen(s->path_query)},
        {s->epoch, strlen(s->epoch)},
        {date, strlen(date)},
        {s->nonce, strlen(s->nonce)},
        {len, strlen(len)},
        {s->digest, strlen(s->digest)},
    };

    unsigned char text[1024];
    size_t used = 0;

    ctx = hmac_begin(secret);
    if (!ctx)
        return -EIO;
    /* The fields go through a buffer: one MAC update for a usual request
     * (each is a call through OpenSSL's provider layers); a field that does
     * not fit, a long key API path, goes in by itself. */
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        size_t n = fields[i].n + (i > 0);

        if (n > sizeof(text) - used) {
            if (!EVP_MAC_update(ctx, text, used))
                return -EIO;
            used = 0;
        }
        if (i > 0 && n <= sizeof(text))
            text[used++] = '\n';
        else if (i > 0 && !EVP_MAC_update(ctx, (const unsigned char *)"\n", 1))
            return -EIO;
        if (n <= sizeof(text)) {
            memcpy(text + used, fields[i].p, fields[i].n);
            used += fields[i].n;
        } else if (!EVP_MAC_update(ctx, (const unsigned char *)fields[i].p, fields[i].n)) {
            return -EIO;
        }
    }
    if (!EVP_MAC_update(ctx, text, used) || !EVP_MAC_final(ctx, mac, &mlen, sizeof(mac)) ||
        mlen != 32)
        return -EIO;
    hex_encode(mac, mlen, out);
    return 0;
}

int wire_verify(const char *secret, const struct wire_signed *s, int64_t now, const char *auth)
{
    char want[WIRE_AUTH_LEN + 1];
    uint64_t skew;

    /* No secret, no trust: an unset secret must never verify anything. */
    if (!secret || !secret[0] || !auth || strlen(auth) != WIRE_AUTH_LEN)
        return -EACCES;
    /* A nonce or digest in another spelling would be another string under
     * the same meaning: one spelling only, so a nonce is one nonce. */
    if (!wire_hex_decode(s->nonce, WIRE_NONCE_LEN, NULL) ||
        !wire_hex_decode(s->digest, WIRE_DIGEST_LEN, NULL))
        return -EACCES;
    /* |now - date| without overflow: the distance of two int64 fits a uint64. */
    skew = s->date > now ? (uint64_t)s->date - (uint64_t)now : (uint64_t)now - (uint64_t)s->date;
    if (skew > WIRE_MAX_SKEW)
        return -EACCES;
    if (wire_sign(secret, s, want) != 0)
        return -EACCES;
    return CRYPTO_memcmp(want, auth, WIRE_AUTH_LEN) == 0 ? 0 : -EACCES;
}

int wire_nonce_new(char out[WIRE_NONCE_LEN + 1])
{
    unsigned char b[WIRE_NONCE_BYTES];
    size_t got = 0;

    while (got < sizeof(b)) {
        ssize_t n = getrandom(b + got, sizeof(b) - got, 0);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            out[0] = '\0';
            return n < 0 ? -errno : -EIO;
        }
        got += (size_t)n;
    }
    hex_encode(b, sizeof(b), out);
    return 0;
}

/* ---- body tags ---- */

static EVP_MAC *poly_alg;
static pthread_once_t poly_once = PTHREAD_ONCE_INIT;

static void poly_fetch(void)
{
    poly_alg = EVP_MAC_fetch(NULL, "POLY1305", NULL);
}

struct wire_digest {
    EVP_MAC_CTX *ctx;
};

/* The one-time Poly1305 key of a request's body: HMAC-SHA256(secret,
 * BODY_KEY_LABEL "\n" nonce), 32 bytes. 0 or -EIO (OpenSSL failed, or the
 * nonce is not WIRE_NONCE_LEN lowercase hex digits: the key is only as
 * good as the nonce is new). */
static int body_key(const char *secret, const char *nonce, unsigned char key[32])
{
    unsigned char text[sizeof(BODY_KEY_LABEL) + WIRE_NONCE_LEN];
    size_t n = 0;
    EVP_MAC_CTX *ctx;

    if (!secret || !wire_hex_decode(nonce, WIRE_NONCE_LEN, NULL))
        return -EIO;
    ctx = hmac_begin(secret);
    if (!ctx)
        return -EIO;
    memcpy(text, BODY_KEY_LABEL "\n", sizeof(BODY_KEY_LABEL));
    memcpy(text + sizeof(BODY_KEY_LABEL), nonce, WIRE_NONCE_LEN);
    if (!EVP_MAC_update(ctx, text, sizeof(text)) || !EVP_MAC_final(ctx, key, &n, 32) || n != 32)
        return -EIO;
    return 0;
}

struct wire_digest *wire_digest_new(const char *secret, const char *nonce)
{
    unsigned char key[32];
    struct wire_digest *d;

    if (pthread_once(&poly_once, poly_fetch) != 0 || !poly_alg ||
        body_key(secret, nonce, key) < 0)
        return NULL;
    d = malloc(sizeof(*d));
    if (!d)
        goto out;
    d->ctx = EVP_MAC_CTX_new(poly_alg);
    if (!d->ctx || !EVP_MAC_init(d->ctx, key, sizeof(key), NULL)) {
        wire_digest_free(d);
        d = NULL;
    }
out:
    OPENSSL_cleanse(key, sizeof(key));
    return d;
}

int wire_digest_update(struct wire_digest *d, const void *p, size_t n)
{
    return n == 0 || EVP_MAC_update(d->ctx, p, n) ? 0 : -EIO;
}

int wire_digest_final(struct wire_digest *d, char out[WIRE_DIGEST_LEN + 1])
{
    unsigned char tag[16];
    size_t n = 0;
    int rc = EVP_MAC_final(d->ctx, tag, &n, sizeof(tag)) && n == sizeof(tag) ? 0 : -EIO;

    _Static_assert(2 * sizeof(tag) == WIRE_DIGEST_LEN, "a Poly1305 tag in hex");
    if (rc == 0)
        hex_encode(tag, n, out);
    else
        out[0] = '\0';
    wire_digest_free(d);
    return rc;
}

void wire_digest_free(struct wire_digest *d)
{
    if (!d)
        return;
    EVP_MAC_CTX_free(d->ctx);
    free(d);
}

int wire_body_mac(const char *secret, const char *nonce, const void *body, size_t len,
                  char out[WIRE_DIGEST_LEN + 1])
{
    struct wire_digest *d = wire_digest_new(secret, nonce);

    /* On failure out is "", which no request can carry as a valid tag. */
    out[0] = '\0';
    if (!d)
        return -EIO;
    if (wire_digest_update(d, len ? body : "", len) < 0) {
        wire_digest_free(d);
        return -EIO;
    }
    return wire_digest_final(d, out);
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

/* ---- joined scans ---- */

int wire_scan_join_reply_next(const uint8_t *buf, size_t len, size_t *pos, const uint8_t **key,
                              size_t *klen, const uint8_t **val, size_t *vlen,
                              const uint8_t **jval, size_t *jlen)
{
    size_t p = *pos;
    uint32_t jl;
    int rc = wire_scan_reply_next(buf, len, &p, key, klen, val, vlen);

    if (rc <= 0)
        return rc;
    if (len - p < 4)
        return -EINVAL;
    jl = (uint32_t)endian_get_le(buf + p, 4);
    p += 4;
    if (jl == WIRE_JOIN_ABSENT) {
        *jval = NULL;
        *jlen = 0;
    } else {
        if (jl > BATCH_VALUE_MAX || jl > len - p)
            return -EINVAL;
        *jval = buf + p;
        *jlen = jl;
        p += jl;
    }
    *pos = p;
    return 1;
}

size_t wire_scan_join_record_size(size_t klen, size_t vlen, size_t jlen)
{
    return wire_scan_record_size(klen, vlen) + 4 + jlen;
}

void wire_scan_join_record_encode(uint8_t *out, const void *key, size_t klen, const void *val,
                                  size_t vlen, const void *jval, size_t jlen)
{
    out = put_lv(put_lv(out, key, klen), val, vlen);
    if (jval)
        put_lv(out, jval, jlen);
    else
        endian_put_le(out, WIRE_JOIN_ABSENT, 4);
}

int wire_join_query(char *out, size_t cap, const struct shard_join *j)
{
    static const char hexd[] = "0123456789abcdef";
    char hex[2 * SHARD_JOIN_PREFIX_MAX + 1];
    int n;

    if (shard_join_check(j) != 0)
        return -EINVAL;
    for (size_t i = 0; i < j->plen; i++) {
        hex[2 * i] = hexd[j->prefix[i] >> 4];
        hex[2 * i + 1] = hexd[j->prefix[i] & 15];
    }
    hex[2 * j->plen] = 0;
    n = snprintf(out, cap, "join=%s&link=%zu", hex, j->link);
    return n < 0 || (size_t)n >= cap ? -EINVAL : 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int wire_join_parse(const char *hex, const char *link, uint8_t prefix[SHARD_JOIN_PREFIX_MAX],
                    struct shard_join *j)
{
    size_t n = strlen(hex);
    char *endp;
    unsigned long long l;

    if (n == 0 || n % 2 || n > 2 * SHARD_JOIN_PREFIX_MAX)
        return -EINVAL;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -EINVAL;
        prefix[i] = (uint8_t)(hi << 4 | lo);
    }
    if (link[0] < '0' || link[0] > '9')
        return -EINVAL;
    errno = 0;
    l = strtoull(link, &endp, 10);
    if (errno || *endp || l > BATCH_KEY_MAX)
        return -EINVAL;
    *j = (struct shard_join){.prefix = prefix, .plen = n / 2, .link = (size_t)l};
    return shard_join_check(j);
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
    /* The stream route's "needs a snapshot" (wire.h); ESTALE is sent with
     * 404 elsewhere, so this second row only decodes a 409. */
    {ERANGE, "ERANGE", 409},         {ESTALE, "ESTALE", 409},
    /* A handover gave the shard away before the op did anything (the
     * primary's wrapper, shard_repl.h): "try again", where the map points. */
    {EREMCHG, "EREMCHG", 503},
    /* A key or a layout the shard's node does not agree with (wire.h,
     * "Layouts"): nothing was done; route again with the current layout. */
    {EBADSLT, "EBADSLT", 421},
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
