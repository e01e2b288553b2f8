/* fuzz_request.c -- a libFuzzer target for what a node does with a peer's bytes.
 *
 * Built only with meson -Dfuzz=true (clang, -fsanitize=fuzzer,address,
 * undefined); tests/run runs it for SHARDFS_FUZZ_SECONDS on tests/fuzz/corpus.
 * The first byte of an input picks the target:
 *
 *   0  batch_validate/batch_next (batch.c): a valid batch re-encodes with
 *      batch_add() to exactly the input, and the counts agree
 *   1  wire_scan_request_decode: a valid body re-encodes to the input
 *   2  wire_scan_reply_next: every record re-encodes to the bytes it took
 *   3  wire_parse_shard_path: a parsed path prints back as the input
 *   4  wire_getv_request_decode: a valid body re-encodes to the input
 *   5  wire_getv_reply_decode, for three reads of up to 64 bytes each: a
 *      reply it takes re-encodes to the input
 *   any other value (the seeds use 0xff): a run of requests to a node_server made with
 *      node_server_new() (no socket) over a real LMDB shard in a temp dir,
 *      through node_server_precheck() and node_server_handle(), the code the
 *      libmicrohttpd callbacks run. Paths under /v1/kv and /v1/nodes reach
 *      the real key API (fs/kv_api.c) over a real one-node namespace of its
 *      own in the temp dir (4 local shards); other paths a stand-in handler
 *
 * A request is: flags:u8, headlen:u16le, head, bodylen:u16le, body (lengths
 * are cut to what is left). head is text: "METHOD URI" on the first line,
 * then "Name: value" lines. flags:
 *
 *   bit 0  sign it: X-Shardfs-Date, a new X-Shardfs-Nonce, the body's
 *          X-Shardfs-Digest, its Content-Length (when not empty) and a
 *          valid X-Shardfs-Auth for node a's URL, the method, uri, epoch
 *          (the first X-Shardfs-Epoch, as sent) and those, are put before
 *          the head's own headers (the first header of a name wins), so
 *          handlers behind auth are reached
 *   bit 1  also put X-Shardfs-Epoch: 3 (the server's epoch) first
 *   bit 2  with bit 0: sign with the nonce of the last signed request of
 *          this input instead (a replay: 401 if that one got past precheck)
 *   bit 3  with bit 0: X-Shardfs-Digest of another body (signed, so the
 *          headers pass; the body then does not: 401)
 *   bits 4-7  pick the signed date's distance from now (SKEWS[]), some past
 *          WIRE_MAX_SKEW
 *
 * The shard is emptied before each input, and the clock moves 1000 s on
 * (so the nonces of earlier inputs are out of the window: forgotten), so an
 * input's outcome depends on that input alone. The key API's namespace is
 * not (emptying it would take a remount): it keeps what earlier inputs
 * made, and is thrown away and made anew every KV_RESET_EVERY inputs so it
 * stays small; a reproducer may need the inputs run before it.
 *
 * Checks beyond the sanitizers: an unsigned, replayed or wrongly digested
 * request gets only 401 or 413 (unless it carries the key API's bearer
 * secret); every status is 200-599; a 3xx has a Location; header strings
 * are NUL-terminated without control characters (a redirect repeats the
 * request target); a scan reply decodes and is in key order within [start,
 * end); a get reply carries X-Shardfs-Vlen; a getv reply decodes for the
 * reads asked; the key API never answers 500 (its store is local, so EIO is
 * a bug), and a file it accepted with PUT (201/204) reads back with GET as
 * exactly the body sent; a streamed reply is read to its end. A failed
 * check abort()s, which libFuzzer reports with the reproducer's path.
 *
 * SHARDFS_FUZZ_VERBOSE=1 prints each request and its status (for reading a
 * reproducer: fuzz_request FILE).
 *
 * Shard 0 is node a's (here), shard 1 node b's (redirected), as in
 * tests/unit/test_node_server.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "batch.h"
#include "config.h"
#include "kv_api.h"
#include "namespace.h"
#include "node_server.h"
#include "shard.h"
#include "shard_lmdb.h"
#include "wire.h"
#include "test_node.h"

#define SECRET "fuzz-secret-0123456789"
#define EPOCH 3
#define NOW INT64_C(1700000000) /* the clock of the first input; 1000 s later each */
#define INPUT_SECONDS 1000       /* > 2 x WIRE_MAX_SKEW: every nonce forgotten */
#define MAX_REQUESTS 8
#define MAX_HEADERS 32
#define KV_RESET_EVERY 2000 /* inputs between two fresh key API namespaces */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const int64_t SKEWS[16] = {0,    1,   -1,   60,   -60,   299,       -299, 300,
                                  -300, 301, -301, 1000, -1000, INT32_MAX, -NOW, 0};

static char tmpdir[PATH_MAX];
static int verbose; /* SHARDFS_FUZZ_VERBOSE set: one line per request on stderr */
static struct config cfg;
static struct shard *shard0;
static struct node_server *server;
static int64_t now;          /* this input's clock */
static uint64_t nonce_count; /* nonces handed out, never the same twice */
static char last_nonce[WIRE_NONCE_LEN + 1]; /* of the input's last signed request */
static int last_recorded;    /* ... which got past precheck */
static struct config kv_cfg; /* the key API's one-node store, in tmpdir/kv */
static struct ns *kv_ns;
static struct kv_api *kv_api;
static unsigned long inputs;

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "fuzz_request: check failed: " __VA_ARGS__);                               \
        fputc('\n', stderr);                                                                       \
        abort();                                                                                   \
    } while (0)

/* ---- setup, once per process ---- */

static void kv_close(void)
{
    kv_api_free(kv_api);
    kv_api = NULL;
    if (kv_ns)
        ns_close(kv_ns);
    kv_ns = NULL;
}

static void cleanup(void)
{
    char cmd[PATH_MAX + 16];

    node_server_stop(server);
    kv_close();
    if (shard0)
        shard_close(shard0);
    if (tmpdir[0] && snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir) < (int)sizeof(cmd))
        (void)system(cmd);
}

/* A fresh one-node store for the key API in tmpdir/kv: a new config file and
 * data directory each time, so nothing of the old one is reused. */
static void kv_open(void)
{
    static unsigned generation;
    char path[PATH_MAX + 64], cmd[PATH_MAX + 80], err[1024];
    FILE *f;

    kv_close();
    snprintf(cmd, sizeof(cmd), "rm -rf '%s/kv'", tmpdir);
    if (system(cmd) != 0)
        FAIL("%s failed", cmd);
    snprintf(path, sizeof(path), "%s/kv", tmpdir);
    if (mkdir(path, 0755) != 0)
        FAIL("mkdir %s: %s", path, strerror(errno));
    snprintf(path, sizeof(path), "%s/kv/shards.conf", tmpdir);
    f = fopen(path, "w");
    if (!f || fprintf(f,
                      "[cluster]\nshards = 4\nepoch = %u\nsecret = " SECRET "\n"
                      "commit_interval_ms = 60000\n"
                      "[node k]\nurl = http://127.0.0.1:1\ndata_dir = ./data\nshards = 0-3\n",
                      ++generation) < 0 ||
        fclose(f) != 0)
        FAIL("cannot write %s", path);
    if (config_load(path, &kv_cfg, err, sizeof(err)) != 0 ||
        ns_open(&kv_cfg, 0, 0, NULL, &kv_ns, err, sizeof(err)) != 0)
        FAIL("key API store: %s", err);
    kv_api = kv_api_new(kv_ns, 0, NULL, NULL);
    if (!kv_api)
        FAIL("kv_api_new: out of memory");
}

static int is_kv_path(const struct node_request *req)
{
    size_t plen = strlen(NODE_KV_PREFIX);

    if (strcmp(req->path, "/v1/nodes") == 0)
        return 1;
    return req->path_len >= plen && memcmp(req->path, NODE_KV_PREFIX, plen) == 0 &&
           (req->path_len == plen || req->path[plen] == '/');
}

static const char *no_header(void *ctx, const char *name)
{
    (void)ctx;
    (void)name;
    return NULL;
}

/* Free what a reply holds: its body, or its stream's context. */
static void reply_done(struct node_response *r)
{
    free(r->body);
    r->body = NULL;
    if (r->stream.free)
        r->stream.free(r->stream.ctx);
    r->stream = (struct node_stream){0};
}

/* A reply's body, streamed or not, as one malloc()ed buffer (*len bytes);
 * frees the stream. NULL (only) if a stream read fails before its end. */
static uint8_t *reply_bytes(struct node_response *r, size_t *len)
{
    uint64_t pos = 0, want = r->stream.len;
    uint8_t *buf;
    ssize_t n = 1;

    if (!r->stream.read) {
        *len = r->len;
        buf = r->body ? r->body : malloc(1);
        if (!buf)
            abort();
        r->body = NULL;
        return buf;
    }
    buf = malloc(want + 1);
    if (!buf)
        abort();
    while (pos < want && (n = r->stream.read(r->stream.ctx, pos, buf + pos, want - pos)) > 0)
        pos += (uint64_t)n;
    reply_done(r);
    *len = (size_t)pos;
    if (pos < want) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* After a PUT the key API accepted, GET must give back exactly its body. */
static void check_kv_put(const struct node_request *put)
{
    struct node_input in = {.method = "GET", .uri = put->path, .path = put->path,
                            .header = no_header};
    struct node_request get = {.method = "GET", .path = put->path, .path_len = put->path_len,
                               .in = &in};
    struct node_response r = {0};
    uint8_t *got;
    size_t len;

    if (kv_api_handle(kv_api, &get, &r) != 0 || r.status != 200)
        FAIL("PUT %s succeeded but GET gives %d", put->path, r.status);
    got = reply_bytes(&r, &len);
    if (!got)
        FAIL("GET %s: a stream read failed", put->path);
    if (len != put->body_len || (len && memcmp(got, put->body, len) != 0))
        FAIL("PUT %s of %zu bytes reads back %zu different bytes", put->path, put->body_len, len);
    free(got);
}

/* The key API, with what it promises checked. */
static int kv(const struct node_request *req, struct node_response *resp)
{
    int rc = kv_api_handle(kv_api, req, resp);

    if (rc == 0 && resp->status == 500)
        FAIL("500 from the key API over a local store: %s %s", req->method, req->path);
    if (rc == 0 && strcmp(req->method, "PUT") == 0 && (resp->status == 201 || resp->status == 204) &&
        req->path_len && req->path[req->path_len - 1] != '/')
        check_kv_put(req);
    return rc;
}

/* The handler for other paths: the key API for its paths; otherwise echoes
 * what it got, or fails as asked by the path ("/err" -errno, "/status/N" a
 * raw status), so route_other's checks run. */
static int other(void *ctx, const struct node_request *req, struct node_response *resp)
{
    const char *hdr = node_request_header(req, "X-Test");
    const char *q = node_request_query(req, "q");
    int n;

    (void)ctx;
    if (is_kv_path(req))
        return kv(req, resp);
    if (strcmp(req->path, "/err") == 0)
        return -ENOSPC;
    if (strncmp(req->path, "/status/", 8) == 0) {
        resp->status = (int)(strtoul(req->path + 8, NULL, 10) % 1000);
        return 0;
    }
    resp->status = 200;
    resp->body = malloc(req->body_len + 256);
    if (!resp->body)
        return -ENOMEM;
    n = snprintf((char *)resp->body, 256, "%s %s %s %s ", req->method, req->path, hdr ? hdr : "-",
                 q ? q : "-");
    if (n < 0 || n > 255)
        n = 255;
    if (req->body_len)
        memcpy(resp->body + n, req->body, req->body_len);
    resp->len = (size_t)n + req->body_len;
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *tmp = getenv("TMPDIR");
    struct shard *shards[2];
    char err[1024], text[1024];

    (void)argc;
    (void)argv;
    verbose = getenv("SHARDFS_FUZZ_VERBOSE") != NULL;
    snprintf(tmpdir, sizeof(tmpdir), "%s/shardfs-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror(tmpdir);
        exit(2);
    }
    atexit(cleanup);
    snprintf(text, sizeof(text),
             "[cluster]\nshards = 2\nepoch = %d\nsecret = " SECRET "\n"
             "[node a]\nurl = http://127.0.0.1:1/\ndata_dir = ./a\nshards = 0\n"
             "[node b]\nurl = http://127.0.0.1:2\ndata_dir = ./b\nshards = 1\n",
             EPOCH);
    shard0 = test_node_a_open(tmpdir, text, &cfg);
    shards[0] = shard0;
    shards[1] = NULL;
    if (node_server_new(&cfg, 0, shards, other, NULL, &server, err, sizeof(err)) != 0) {
        fprintf(stderr, "node_server_new: %s\n", err);
        exit(2);
    }
    kv_open();
    return 0;
}

/* Empty shard 0: every key lies in ["\0", 511 x "\xff"] . */
static void shard_empty(void)
{
    static uint8_t lo[1], hi[BATCH_KEY_MAX];
    struct batch b;

    memset(hi, 0xff, sizeof(hi));
    batch_init(&b);
    batch_add(&b, BATCH_DEL_RANGE, lo, sizeof(lo), hi, sizeof(hi));
    batch_del(&b, hi, sizeof(hi));
    if (b.error || shard_apply(shard0, &b) < 0)
        FAIL("cannot empty the shard");
    batch_free(&b);
}

/* ---- the decoders ---- */

static void fuzz_batch(const uint8_t *data, size_t size)
{
    struct batch_item it;
    struct batch b;
    size_t pos = 0;
    int n = batch_validate(data, size), rc, count = 0;

    batch_init(&b);
    while ((rc = batch_next(data, size, &pos, &it)) == 1) {
        if (pos > size || it.klen == 0 || it.klen > BATCH_KEY_MAX || it.vlen > BATCH_VALUE_MAX)
            FAIL("batch_next gave an item out of bounds");
        batch_add(&b, it.op, it.key, it.klen, it.val, it.vlen);
        count++;
    }
    if ((rc < 0) != (n < 0))
        FAIL("batch_validate %d but batch_next %d", n, rc);
    if (n >= 0 && (n != count || b.error || b.len != size || (size && memcmp(b.buf, data, size))))
        FAIL("a valid batch of %d ops does not re-encode to itself", n);
    batch_free(&b);
}

static void fuzz_scan_request(const uint8_t *data, size_t size)
{
    const uint8_t *start, *end;
    size_t slen, elen;
    uint8_t *out;

    if (wire_scan_request_decode(data, size, &start, &slen, &end, &elen) < 0)
        return;
    if (wire_scan_request_size(slen, end ? elen : 0) != size)
        FAIL("a decoded scan request has the wrong size");
    out = malloc(size);
    if (!out)
        abort();
    wire_scan_request_encode(out, start, slen, end, elen);
    if (memcmp(out, data, size) != 0)
        FAIL("a scan request does not re-encode to itself");
    free(out);
}

static void fuzz_scan_reply(const uint8_t *data, size_t size)
{
    const uint8_t *key, *val;
    size_t pos = 0, last, klen, vlen;
    uint8_t *out;

    for (;;) {
        last = pos;
        if (wire_scan_reply_next(data, size, &pos, &key, &klen, &val, &vlen) != 1)
            return;
        if (pos <= last || pos > size || wire_scan_record_size(klen, vlen) != pos - last)
            FAIL("a scan reply record has the wrong size");
        out = malloc(pos - last);
        if (!out)
            abort();
        wire_scan_record_encode(out, key, klen, val, vlen);
        if (memcmp(out, data + last, pos - last) != 0)
            FAIL("a scan reply record does not re-encode to itself");
        free(out);
    }
}

static void fuzz_shard_path(const uint8_t *data, size_t size)
{
    char path[WIRE_PATH_MAX], again[WIRE_PATH_MAX];
    enum wire_op op;
    unsigned n;

    if (size >= sizeof(path))
        size = sizeof(path) - 1;
    memcpy(path, data, size);
    path[size] = '\0';
    if (wire_parse_shard_path(path, &n, &op) < 0)
        return;
    if (wire_shard_path(again, sizeof(again), n, op) < 0 || strcmp(again, path) != 0)
        FAIL("shard path '%s' prints back as '%s'", path, again);
}

static void fuzz_getv_request(const uint8_t *data, size_t size)
{
    struct shard_read r[SHARD_READS_MAX];
    unsigned n;
    uint8_t *out;

    if (wire_getv_request_decode(data, size, r, &n) < 0)
        return;
    if (n == 0 || n > SHARD_READS_MAX || wire_getv_request_size(r, n) != size)
        FAIL("a decoded getv request of %u reads has the wrong size", n);
    out = malloc(size);
    if (!out)
        abort();
    wire_getv_request_encode(out, r, n);
    if (memcmp(out, data, size) != 0)
        FAIL("a getv request does not re-encode to itself");
    free(out);
}

static void fuzz_getv_reply(const uint8_t *data, size_t size)
{
    struct shard_read r[3];
    uint8_t bufs[3][64], *out;

    memset(r, 0, sizeof(r));
    for (unsigned i = 0; i < 3; i++) {
        r[i].buf = bufs[i];
        r[i].buflen = sizeof(bufs[i]);
    }
    if (wire_getv_reply_decode(data, size, r, 3) < 0)
        return;
    for (unsigned i = 0; i < 3; i++)
        if (r[i].len > r[i].buflen || r[i].len > r[i].vlen || (r[i].rc && r[i].len))
            FAIL("getv reply read %u: len %zu vlen %zu rc %d", i, r[i].len, r[i].vlen, r[i].rc);
    if (wire_getv_reply_size(r, 3) != size)
        FAIL("a decoded getv reply has the wrong size");
    out = malloc(size ? size : 1);
    if (!out)
        abort();
    wire_getv_reply_encode(out, r, 3);
    if (memcmp(out, data, size) != 0)
        FAIL("a getv reply does not re-encode to itself");
    free(out);
}

/* ---- requests ---- */

struct header {
    const char *name, *value;
};

struct fuzz_request {
    char *head; /* the head, NUL-terminated and cut into pieces */
    const char *method, *uri;
    char path[WIRE_PATH_MAX + 1];
    struct header headers[MAX_HEADERS];
    unsigned nheaders;
    char date[24], auth[WIRE_AUTH_LEN + 1], nonce[WIRE_NONCE_LEN + 1];
    char digest[WIRE_DIGEST_LEN + 1], length[24];
};

static const char *lookup_header(void *ctx, const char *name)
{
    const struct fuzz_request *fr = ctx;

    for (unsigned i = 0; i < fr->nheaders; i++)
        if (strcasecmp(fr->headers[i].name, name) == 0)
            return fr->headers[i].value;
    return NULL;
}

/* The key API's bearer rule, written out again: "Authorization: Bearer
 * SECRET" on a target under /v1/kv passes without a signature. */
static int bearer_given(const struct fuzz_request *fr)
{
    const char *h = lookup_header((void *)fr, "Authorization");
    size_t plen = strlen(NODE_KV_PREFIX);

    return h && strncmp(fr->uri, NODE_KV_PREFIX, plen) == 0 &&
           (fr->uri[plen] == '\0' || fr->uri[plen] == '/' || fr->uri[plen] == '?') &&
           strncasecmp(h, "Bearer ", 7) == 0 && strcmp(h + 7, SECRET) == 0;
}

static void add_header(struct fuzz_request *fr, const char *name, const char *value)
{
    if (fr->nheaders < MAX_HEADERS)
        fr->headers[fr->nheaders++] = (struct header){name, value};
}

/* Cut the head's first line, "METHOD URI[ VERSION]", into fr->method and
 * fr->uri; returns the header lines after it, or NULL. */
static char *parse_request_line(struct fuzz_request *fr)
{
    char *next = strchr(fr->head, '\n'), *sp;

    if (next)
        *next++ = '\0';
    fr->method = fr->head;
    fr->uri = "";
    sp = strchr(fr->head, ' ');
    if (sp) {
        *sp = '\0';
        fr->uri = sp + 1;
        sp = strchr(sp + 1, ' ');
        if (sp)
            *sp = '\0';
    }
    return next;
}

/* "Name: value" lines; one without a colon is skipped (libmicrohttpd would
 * refuse the request). */
static void parse_header_lines(struct fuzz_request *fr, char *line)
{
    char *next, *colon;

    for (; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon++ = '\0';
        while (*colon == ' ')
            colon++;
        add_header(fr, line, colon);
    }
}

/* A reply header field without its NUL or with a control character (CR/LF
 * would inject headers; the others make a Location a peer cannot follow). */
static int bad_header_text(const char *s, size_t cap)
{
    if (!memchr(s, '\0', cap))
        return 1;
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

/* The scan request in body, as the server will read it, or -1. */
static int scan_bounds(const uint8_t *body, size_t len, const uint8_t **start, size_t *slen,
                       const uint8_t **end, size_t *elen)
{
    return wire_scan_request_decode(body, len, start, slen, end, elen) < 0 ? -1 : 0;
}

static int key_cmp(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);

    return c ? c : (alen > blen) - (alen < blen);
}

/* A 200 getv reply decodes against the request's own reads. */
static void check_getv_reply(const struct node_input *in, const struct node_response *r)
{
    struct shard_read rd[SHARD_READS_MAX];
    unsigned n;
    size_t cap = 0;
    uint8_t *bufs;

    if (wire_getv_request_decode(in->body, in->body_len, rd, &n) < 0)
        FAIL("200 for a malformed getv request");
    for (unsigned i = 0; i < n; i++)
        cap += rd[i].buflen;
    bufs = malloc(cap ? cap : 1);
    if (!bufs)
        abort();
    cap = 0;
    for (unsigned i = 0; i < n; i++) {
        rd[i].buf = bufs + cap;
        cap += rd[i].buflen;
    }
    if (wire_getv_reply_decode(r->body, r->len, rd, n) < 0)
        FAIL("a getv reply that does not decode");
    free(bufs);
}

/* What every reply must look like, and what a scan or get reply promises. */
static void check_reply(const struct fuzz_request *fr, const struct node_input *in, int signed_ok,
                        const struct node_response *r)
{
    unsigned n;
    enum wire_op op;

    if (verbose)
        fprintf(stderr, "fuzz_request: %s %s (%zu bytes)%s -> %d %s %s%s%s\n", fr->method, fr->uri,
                in->body_len, signed_ok ? " signed" : "", r->status, r->errno_name,
                r->extra[0].name, r->extra[0].name[0] ? ": " : "", r->extra[0].value);
    if (r->status < 200 || r->status > 599)
        FAIL("status %d for %s %s", r->status, fr->method, fr->uri);
    if (r->len && !r->body)
        FAIL("a %zu-byte reply without a body", r->len);
    int bad = bad_header_text(r->location, sizeof(r->location)) ||
              bad_header_text(r->errno_name, sizeof(r->errno_name));
    for (unsigned i = 0; i < NODE_EXTRA_MAX; i++)
        bad |= bad_header_text(r->extra[i].name, sizeof(r->extra[i].name)) ||
               bad_header_text(r->extra[i].value, sizeof(r->extra[i].value));
    if (bad)
        FAIL("a reply header is unterminated or has CR/LF (%s %s)", fr->method, fr->uri);
    if (r->status >= 300 && r->status < 400 && !r->location[0])
        FAIL("status %d without a Location", r->status);
    if (!signed_ok && r->status != 401 && r->status != 413)
        FAIL("status %d for an unsigned %s %s", r->status, fr->method, fr->uri);
    if (r->status != 200 || wire_parse_shard_path(fr->path, &n, &op) < 0)
        return;
    if (op == WIRE_OP_SCAN) {
        const uint8_t *start, *end, *key, *val, *prev = NULL;
        size_t slen, elen, klen, vlen, prevlen = 0, pos = 0, count = 0;
        int rc;

        if (scan_bounds(in->body, in->body_len, &start, &slen, &end, &elen) < 0)
            FAIL("200 for a malformed scan request");
        while ((rc = wire_scan_reply_next(r->body, r->len, &pos, &key, &klen, &val, &vlen)) == 1) {
            if (key_cmp(key, klen, start, slen) < 0 || (end && key_cmp(key, klen, end, elen) >= 0))
                FAIL("a scan reply key outside [start, end)");
            if (prev && key_cmp(prev, prevlen, key, klen) >= 0)
                FAIL("scan reply keys out of order");
            prev = key;
            prevlen = klen;
            count++;
        }
        if (rc < 0)
            FAIL("a scan reply that does not decode");
        if (count > WIRE_SCAN_LIMIT_MAX)
            FAIL("%zu records in one scan reply", count);
    } else if (op == WIRE_OP_GET) {
        if (r->len > WIRE_GET_MAX || strcmp(r->extra[0].name, WIRE_HDR_VLEN) != 0)
            FAIL("a get reply of %zu bytes, extra header '%s'", r->len, r->extra[0].name);
    } else if (op == WIRE_OP_GETV) {
        check_getv_reply(in, r);
    }
}

static void run_request(uint8_t flags, const uint8_t *head, size_t hlen, const uint8_t *body,
                        size_t blen)
{
    struct fuzz_request fr = {0};
    struct node_response r;
    struct node_input in;
    int signed_ok = 0, replay = 0, passed;
    char epoch[24], *lines;
    struct wire_signed ws;

    fr.head = malloc(hlen + 1);
    if (!fr.head)
        abort();
    memcpy(fr.head, head, hlen);
    fr.head[hlen] = '\0';
    lines = parse_request_line(&fr);
    snprintf(fr.path, sizeof(fr.path), "%.*s", (int)strcspn(fr.uri, "?"), fr.uri);

    /* Generated headers go first: the first of a name wins. */
    if (flags & 2) {
        snprintf(epoch, sizeof(epoch), "%d", EPOCH);
        add_header(&fr, WIRE_HDR_EPOCH, epoch);
    }
    if (flags & 1) {
        ws = (struct wire_signed){.method = fr.method,
                                  .node_url = cfg.nodes[0].url,
                                  .path_query = fr.uri,
                                  .date = now + SKEWS[flags >> 4],
                                  .nonce = fr.nonce,
                                  .digest = fr.digest,
                                  .body_len = blen};
        replay = (flags & 4) && last_nonce[0];
        if (replay)
            memcpy(fr.nonce, last_nonce, sizeof(fr.nonce));
        else
            snprintf(fr.nonce, sizeof(fr.nonce), "%032" PRIx64, ++nonce_count);
        if (flags & 8) { /* another body: the first byte changed, or one more */
            uint8_t *other = malloc(blen + 1);
            if (!other)
                abort();
            other[0] = 0;
            if (blen) {
                memcpy(other, body, blen);
                other[0] ^= 1;
            }
            wire_body_mac(SECRET, fr.nonce, other, blen ? blen : 1, fr.digest);
            free(other);
        } else {
            wire_body_mac(SECRET, fr.nonce, body, blen, fr.digest);
        }
        snprintf(fr.date, sizeof(fr.date), "%" PRId64, ws.date);
        snprintf(fr.length, sizeof(fr.length), "%zu", blen);
        add_header(&fr, WIRE_HDR_DATE, fr.date);
        add_header(&fr, WIRE_HDR_NONCE, fr.nonce);
        add_header(&fr, WIRE_HDR_DIGEST, fr.digest);
        if (blen)
            add_header(&fr, "Content-Length", fr.length);
    }
    parse_header_lines(&fr, lines);
    if (flags & 1) {
        /* The epoch is signed as the server will see it: the first one. */
        ws.epoch = lookup_header(&fr, WIRE_HDR_EPOCH);
        if (!ws.epoch)
            ws.epoch = "";
        if (wire_sign(SECRET, &ws, fr.auth) < 0)
            FAIL("wire_sign");
        /* The first header of a name wins, so the auth goes in front. */
        memmove(&fr.headers[1], &fr.headers[0],
                (fr.nheaders < MAX_HEADERS ? fr.nheaders : MAX_HEADERS - 1) *
                    sizeof(fr.headers[0]));
        fr.headers[0] = (struct header){WIRE_HDR_AUTH, fr.auth};
        if (fr.nheaders < MAX_HEADERS)
            fr.nheaders++;
        signed_ok = ws.date >= now - WIRE_MAX_SKEW && ws.date <= now + WIRE_MAX_SKEW &&
                    !(replay && last_recorded) && !(flags & 8);
    }

    in = (struct node_input){
        .method = fr.method,
        .uri = fr.uri,
        .path = fr.path,
        .body = blen ? body : NULL,
        .body_len = blen,
        .now = now,
        .header = lookup_header,
        .query = NULL,
        .ctx = &fr,
    };
    passed = !node_server_precheck(server, &in, &r);
    if (flags & 1) {
        last_recorded = replay ? last_recorded || passed : passed;
        memcpy(last_nonce, fr.nonce, sizeof(last_nonce));
    }
    if (!passed) {
        check_reply(&fr, &in, 0, &r);
        free(r.body);
        free(fr.head);
        return;
    }
    if (r.status || r.body)
        FAIL("precheck passed a request but left a reply");
    node_server_handle(server, &in, &r);
    check_reply(&fr, &in, signed_ok || bearer_given(&fr), &r);
    if (r.stream.read && strcmp(fr.method, "HEAD") != 0) {
        size_t len;
        uint8_t *all = reply_bytes(&r, &len);

        if (!all)
            FAIL("a streamed reply to %s %s fails before its end", fr.method, fr.uri);
        free(all);
    }
    reply_done(&r);
    free(fr.head);
}

static size_t take_u16(const uint8_t **p, size_t *left)
{
    size_t n;

    if (*left < 2) {
        *left = 0;
        return 0;
    }
    n = (size_t)(*p)[0] | (size_t)(*p)[1] << 8;
    *p += 2;
    *left -= 2;
    return n < *left ? n : *left;
}

/* A u16le length and that many bytes (fewer if the input ends first). */
static const uint8_t *take_field(const uint8_t **p, size_t *left, size_t *len)
{
    const uint8_t *field;

    *len = take_u16(p, left);
    field = *p;
    *p += *len;
    *left -= *len;
    return field;
}

static void fuzz_requests(const uint8_t *p, size_t left)
{
    if (++inputs % KV_RESET_EVERY == 0)
        kv_open();
    shard_empty();
    now = NOW + INPUT_SECONDS * (int64_t)inputs;
    last_nonce[0] = '\0';
    last_recorded = 0;
    for (int i = 0; i < MAX_REQUESTS && left; i++) {
        const uint8_t *head, *body;
        size_t hlen, blen;
        uint8_t flags = *p++;

        left--;
        head = take_field(&p, &left, &hlen);
        body = take_field(&p, &left, &blen);
        run_request(flags, head, hlen, body, blen);
    }
}

/* The decoders, by the input's first byte; any other value is requests. */
static void (*const decoders[])(const uint8_t *, size_t) = {
    fuzz_batch,
    fuzz_scan_request,
    fuzz_scan_reply,
    fuzz_shard_path,
    fuzz_getv_request,
    fuzz_getv_reply,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] < sizeof(decoders) / sizeof(decoders[0]))
        decoders[data[0]](data + 1, size - 1);
    else
        fuzz_requests(data + 1, size - 1);
    return 0;
}
