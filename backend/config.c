/* config.c -- load and validate shards.conf (see config.h).
 *
 * inih does the key = value parsing; our own line reader feeds it one line per
 * call, counts lines and tracks [section] headers itself, because inih
 * truncates section names to 49 bytes and never reports an empty section.
 * The reader also strips leading whitespace, so indented keys are ordinary
 * keys and inih's multi-line continuation never applies.
 *
 * The first error stops the parse. Everything is built in a private copy and
 * written to the caller's struct only on success.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "placement.h"

#define LINE_MAX_BYTES (PATH_MAX + 256) /* our line buffer; inih's limit is usually lower */
#define SHARD_WORDS (CONFIG_MAX_SHARDS / 64)

enum section_kind { SECT_NONE, SECT_CLUSTER, SECT_NODE };

enum cluster_key {
    CK_SHARDS,
    CK_EPOCH,
    CK_COMMIT,
    CK_CACHE,
    CK_SECRET,
    CK_TIMEOUT,
    CK_TLS_CA,
    CK_ACK,
    CK_ETCD,
    CK_LEASE_TTL,
    CK_REPLICA_LAG,
    CK_REPLICA_PUSH,
    CK_COUNT
};
static const char *const cluster_keys[CK_COUNT] = {
    "shards",     "epoch", "commit_interval_ms", "cache_timeout",  "secret",
    "timeout_ms", "tls_ca", "ack",               "etcd",           "lease_ttl_ms",
    "replica_lag_ms", "replica_push"};

enum node_key { NK_URL, NK_DATA_DIR, NK_SHARDS, NK_TLS_CERT, NK_TLS_KEY, NK_REPLICAS, NK_COUNT };
static const char *const node_keys[NK_COUNT] = {"url",     "data_dir", "shards",
                                                "tls_cert", "tls_key", "replicas"};

struct node_state {
    int key_line[NK_COUNT];      /* 0 = not given yet */
    int all;                     /* shards = all */
    int assigned;                /* shards written into owner[] */
    uint64_t bits[SHARD_WORDS];  /* listed shards unless all */
    int rall;                    /* replicas = all */
    uint64_t rbits[SHARD_WORDS]; /* shards listed by replicas = unless rall */
};

struct load_ctx {
    struct config cfg;
    const char *path;
    FILE *fp;
    char *err;
    size_t errlen;
    int failed;
    int err_line;            /* line of our error, 0 for a whole-file one */
    int lineno;              /* lines handed to inih so far */
    char conf_dir[PATH_MAX]; /* absolute directory of the config file */
    enum section_kind sect;
    int cur_node;
    int cluster_line; /* line of [cluster], 0 if none yet */
    int cluster_key_line[CK_COUNT];
    struct node_state nodes[CONFIG_MAX_NODES];
    char line[LINE_MAX_BYTES];
};

__attribute__((format(printf, 3, 4))) static void fail_at(struct load_ctx *ctx, int line,
                                                          const char *fmt, ...)
{
    char msg[PATH_MAX + 256];
    va_list ap;

    if (ctx->failed)
        return;
    ctx->failed = 1;
    ctx->err_line = line;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!ctx->err || ctx->errlen == 0)
        return;
    if (line > 0)
        snprintf(ctx->err, ctx->errlen, "%s:%d: %s", ctx->path, line, msg);
    else
        snprintf(ctx->err, ctx->errlen, "%s: %s", ctx->path, msg);
}

/* ---- values ---- */

/* Decimal unsigned integer in [min, max]; no sign, no spaces, no junk. */
static int parse_uint(const char *s, unsigned long long min, unsigned long long max,
                      unsigned long long *out)
{
    char *end;
    unsigned long long v;

    if (!isdigit((unsigned char)s[0]))
        return -1;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Non-negative decimal number such as "3600", "0.5" or "1e3"; no inf, nan or
 * hex. Uses strtod, so the C locale's decimal point. */
static int parse_seconds(const char *s, double min, double max, double *out)
{
    char *end;
    double v;

    if (!isdigit((unsigned char)s[0]) && s[0] != '.')
        return -1;
    if (s[strspn(s, "0123456789.eE+-")] != '\0')
        return -1;
    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !isfinite(v) || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static int valid_node_name(const char *s, size_t len)
{
    if (len < 1 || len > CONFIG_NAME_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '-')
            return 0;
    return 1;
}

/* Parse the shard list s of directive key ("all", "0-3", "0,2,5-7", and
 * for replicas "none") into *all and bits. Indices must be below limit. On
 * error writes a reason into why and returns -1. */
static int parse_shard_list(const char *key, const char *s, unsigned limit, int *all,
                            uint64_t bits[SHARD_WORDS], char *why, size_t whylen)
{
    const char *p = s;

    *all = 0;
    memset(bits, 0, SHARD_WORDS * sizeof(bits[0]));
    if (strcmp(s, "all") == 0) {
        *all = 1;
        return 0;
    }
    if (strcmp(key, "replicas") == 0 && strcmp(s, "none") == 0)
        return 0;
    for (;;) {
        unsigned long lo, hi;
        char *end;

        while (*p == ' ' || *p == '\t')
            p++;
        if (!isdigit((unsigned char)*p))
            goto bad;
        errno = 0;
        lo = strtoul(p, &end, 10);
        if (errno != 0)
            goto bad;
        hi = lo;
        p = end;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '-') {
            p++;
            while (*p == ' ' || *p == '\t')
                p++;
            if (!isdigit((unsigned char)*p))
                goto bad;
            errno = 0;
            hi = strtoul(p, &end, 10);
            if (errno != 0)
                goto bad;
            p = end;
            while (*p == ' ' || *p == '\t')
                p++;
            if (hi < lo) {
                snprintf(why, whylen, "%s = %s: range %lu-%lu is backwards", key, s, lo, hi);
                return -1;
            }
        }
        if (hi >= limit) {
            snprintf(why, whylen, "%sshard %lu is out of range 0-%u",
                     strcmp(key, "shards") ? "replicas: " : "", lo >= limit ? lo : hi,
                     limit - 1);
            return -1;
        }
        for (unsigned long i = lo; i <= hi; i++) {
            uint64_t bit = UINT64_C(1) << (i % 64);
            if (bits[i / 64] & bit) {
                snprintf(why, whylen, "%s = %s lists shard %lu twice", key, s, i);
                return -1;
            }
            bits[i / 64] |= bit;
        }
        if (*p == '\0')
            return 0;
        if (*p != ',')
            goto bad;
        p++;
    }
bad:
    if (strcmp(key, "shards") == 0)
        snprintf(why, whylen, "bad shard list '%s' (want \"all\" or a list like \"0,2,5-7\")", s);
    else
        snprintf(why, whylen,
                 "bad %s list '%s' (want \"none\", \"all\" or a list like \"0,2,5-7\")", key,
                 s);
    return -1;
}

/* Write node idx's shards into owner[]; needs cfg.shard_count. */
static int assign_shards(struct load_ctx *ctx, int idx)
{
    struct config *cfg = &ctx->cfg;
    struct node_state *st = &ctx->nodes[idx];
    int line = st->key_line[NK_SHARDS];

    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
        int listed = st->all ? i < cfg->shard_count : !!(st->bits[i / 64] >> (i % 64) & 1);
        if (!listed)
            continue;
        if (i >= cfg->shard_count) {
            fail_at(ctx, line, "shard %u is out of range 0-%u", i, cfg->shard_count - 1);
            return -1;
        }
        if (cfg->owner[i] >= 0) {
            const struct config_node *o = &cfg->nodes[cfg->owner[i]];
            fail_at(ctx, line, "shard %u is owned by two nodes: '%s' (line %d) and '%s'", i,
                    o->name, ctx->nodes[cfg->owner[i]].key_line[NK_SHARDS], cfg->nodes[idx].name);
            return -1;
        }
        cfg->owner[i] = idx;
    }
    st->assigned = 1;
    return 0;
}

/* Join a data_dir value to the config directory and drop "." components,
 * empty components and trailing slashes (".." is kept: symlinks). */
static int absolute_dir(const char *base, const char *value, char *out, size_t outlen)
{
    char joined[2 * PATH_MAX];
    size_t n = 0;
    const char *p;
    int w;

    if (value[0] == '/')
        w = snprintf(joined, sizeof(joined), "%s", value);
    else
        w = snprintf(joined, sizeof(joined), "%s/%s", base, value);
    if (w < 0 || (size_t)w >= sizeof(joined))
        return -1;
    p = joined;
    while (*p) {
        size_t len;

        while (*p == '/')
            p++;
        len = strcspn(p, "/");
        if (len == 0 || (len == 1 && p[0] == '.')) {
            p += len;
            continue;
        }
        if (n + 1 + len + 1 > outlen)
            return -1;
        out[n++] = '/';
        memcpy(out + n, p, len);
        n += len;
        p += len;
    }
    if (n == 0) {
        if (outlen < 2)
            return -1;
        out[n++] = '/';
    }
    out[n] = '\0';
    return 0;
}

/* 0 if dir is usable, else an errno: dir must be a directory we may read,
 * write and search, or be missing with a writable parent directory. Only the
 * node a process is needs its own (config_check_data_dir): a client of the
 * key API, or a node, runs where the other nodes' directories do not exist. */
static int check_data_dir(const char *dir)
{
    char parent[PATH_MAX];
    struct stat st;
    const char *slash;

    if (stat(dir, &st) == 0) {
        if (!S_ISDIR(st.st_mode))
            return ENOTDIR;
        return access(dir, R_OK | W_OK | X_OK) == 0 ? 0 : errno;
    }
    if (errno != ENOENT)
        return errno;
    if (lstat(dir, &st) == 0) /* a dangling symlink: mkdir would fail */
        return ENOENT;
    slash = strrchr(dir, '/');
    if (!slash || (size_t)(slash - dir) >= sizeof(parent))
        return EINVAL;
    if (slash == dir)
        snprintf(parent, sizeof(parent), "/");
    else
        snprintf(parent, sizeof(parent), "%.*s", (int)(slash - dir), dir);
    if (stat(parent, &st) != 0)
        return errno;
    if (!S_ISDIR(st.st_mode))
        return ENOTDIR;
    return access(parent, W_OK | X_OK) == 0 ? 0 : errno;
}

/* ---- sections (seen by the reader) ---- */

static void open_section(struct load_ctx *ctx, const char *text, size_t len)
{
    struct config *cfg = &ctx->cfg;
    const char *name;
    size_t name_len;

    while (len > 0 && isspace((unsigned char)text[0]))
        text++, len--;
    while (len > 0 && isspace((unsigned char)text[len - 1]))
        len--;

    if (len == 7 && memcmp(text, "cluster", 7) == 0) {
        if (ctx->cluster_line) {
            fail_at(ctx, ctx->lineno, "duplicate section [cluster] (first at line %d)",
                    ctx->cluster_line);
            return;
        }
        ctx->cluster_line = ctx->lineno;
        ctx->sect = SECT_CLUSTER;
        return;
    }
    if (len < 4 || memcmp(text, "node", 4) != 0 || (len > 4 && text[4] != ' ' && text[4] != '\t')) {
        fail_at(ctx, ctx->lineno, "unknown section [%.*s]", (int)(len > 64 ? 64 : len), text);
        return;
    }
    name = text + 4;
    name_len = len - 4;
    while (name_len > 0 && (*name == ' ' || *name == '\t'))
        name++, name_len--;
    if (name_len == 0) {
        fail_at(ctx, ctx->lineno, "[node] needs a name: [node NAME]");
        return;
    }
    if (!valid_node_name(name, name_len)) {
        fail_at(ctx, ctx->lineno, "bad node name '%.*s' (1-%d characters of A-Z a-z 0-9 _ -)",
                (int)(name_len > 64 ? 64 : name_len), name, CONFIG_NAME_MAX);
        return;
    }
    for (unsigned i = 0; i < cfg->node_count; i++) {
        if (strlen(cfg->nodes[i].name) == name_len &&
            memcmp(cfg->nodes[i].name, name, name_len) == 0) {
            fail_at(ctx, ctx->lineno, "duplicate node '%.*s' (first at line %d)", (int)name_len,
                    name, cfg->nodes[i].line);
            return;
        }
    }
    if (cfg->node_count >= CONFIG_MAX_NODES) {
        fail_at(ctx, ctx->lineno, "too many nodes (at most %d)", CONFIG_MAX_NODES);
        return;
    }
    ctx->cur_node = (int)cfg->node_count++;
    snprintf(cfg->nodes[ctx->cur_node].name, sizeof(cfg->nodes[0].name), "%.*s", (int)name_len,
             name);
    cfg->nodes[ctx->cur_node].line = ctx->lineno;
    ctx->sect = SECT_NODE;
}

/* If line (already left-trimmed) is a section header as inih sees it, handle
 * it. inih's rule: '[' then the first ']' before an inline ";" comment. */
static void maybe_section(struct load_ctx *ctx, const char *s)
{
    const char *p, *rest;
    int was_space = 0;

    if (s[0] != '[')
        return;
    for (p = s + 1; *p && *p != ']'; p++) {
        if (was_space && *p == ';')
            return; /* inih: no ']' -- a syntax error it reports */
        was_space = isspace((unsigned char)*p);
    }
    if (*p != ']')
        return;
    rest = p + 1;
    while (isspace((unsigned char)*rest))
        rest++;
    if (*rest != '\0' && *rest != ';' && *rest != '#') {
        fail_at(ctx, ctx->lineno, "unexpected text after ']'");
        return;
    }
    open_section(ctx, s + 1, (size_t)(p - s - 1));
}

/* ---- inih callbacks ---- */

/* fgets-style: one whole line per call, so inih's line count is ours. Returns
 * NULL (end of input) once an error has been recorded. */
static char *read_line(char *str, int num, void *stream)
{
    struct load_ctx *ctx = stream;
    size_t len = 0, skip = 0, max;
    int c = EOF;

    if (ctx->failed || num < 2)
        return NULL;
    while (len + 1 < sizeof(ctx->line) && (c = getc(ctx->fp)) != EOF) {
        if (c == '\0') {
            fail_at(ctx, ctx->lineno + 1, "NUL byte in line");
            return NULL;
        }
        ctx->line[len++] = (char)c;
        if (c == '\n')
            break;
    }
    ctx->line[len] = '\0';
    if (len == 0) {
        if (ferror(ctx->fp))
            fail_at(ctx, 0, "read error: %s", strerror(errno));
        return NULL;
    }
    ctx->lineno++;
    max = (size_t)num - 2 < sizeof(ctx->line) - 2 ? (size_t)num - 2 : sizeof(ctx->line) - 2;
    if (c != '\n' && c != EOF) {
        fail_at(ctx, ctx->lineno, "line too long (at most %zu characters)", max);
        return NULL;
    }
    if (ctx->lineno == 1 && memcmp(ctx->line, "\xEF\xBB\xBF", 3) == 0)
        skip = 3;
    while (ctx->line[skip] == ' ' || ctx->line[skip] == '\t')
        skip++;
    if (len - skip > (size_t)num - 1) {
        fail_at(ctx, ctx->lineno, "line too long (at most %zu characters)", max);
        return NULL;
    }
    memcpy(str, ctx->line + skip, len - skip + 1);
    maybe_section(ctx, str);
    return ctx->failed ? NULL : str;
}

static int find_key(const char *const *keys, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(keys[i], name) == 0)
            return i;
    return -1;
}

/* A file name value (relative to the conf file's directory) into out. Its
 * contents are read by whoever needs them: the node server its own
 * certificate and key, every client the CA. 0 or -1 (failed). */
static int file_value(struct load_ctx *ctx, int line, const char *name, const char *value,
                      char *out, size_t outlen)
{
    if (value[0] == '\0') {
        fail_at(ctx, line, "%s is empty", name);
        return -1;
    }
    if (absolute_dir(ctx->conf_dir, value, out, outlen) < 0) {
        fail_at(ctx, line, "%s is too long", name);
        return -1;
    }
    return 0;
}

/* etcd = URL[,URL...]: each an http:// or https:// HOST:PORT as a node url
 * (spaces around the commas allowed), at most CONFIG_ETCD_MAX_ENDPOINTS.
 * Stored without the spaces, as etcd_new() wants it. 0 or -1 (failed). */
static int parse_etcd_list(struct load_ctx *ctx, int line, const char *value)
{
    struct config *cfg = &ctx->cfg;
    const char *p = value;
    size_t used = 0;
    unsigned count = 0;

    for (;;) {
        char one[CONFIG_URL_MAX + 1], why[128];
        struct config_url u;
        size_t len;

        while (*p == ' ' || *p == '\t')
            p++;
        len = strcspn(p, ",");
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len == 0) {
            fail_at(ctx, line, "etcd = %s: an empty url in the list", value);
            return -1;
        }
        if (len > CONFIG_URL_MAX) {
            fail_at(ctx, line, "etcd: a url is too long (at most %d characters)", CONFIG_URL_MAX);
            return -1;
        }
        snprintf(one, sizeof(one), "%.*s", (int)len, p);
        if (config_url_parse(one, &u, why, sizeof(why)) < 0) {
            fail_at(ctx, line, "etcd: bad url '%s' (%s)", one, why);
            return -1;
        }
        if (++count > CONFIG_ETCD_MAX_ENDPOINTS) {
            fail_at(ctx, line, "etcd: more than %d urls", CONFIG_ETCD_MAX_ENDPOINTS);
            return -1;
        }
        if (used + (used ? 1 : 0) + len >= sizeof(cfg->etcd)) {
            fail_at(ctx, line, "etcd is too long (at most %zu characters)", sizeof(cfg->etcd) - 1);
            return -1;
        }
        used += (size_t)snprintf(cfg->etcd + used, sizeof(cfg->etcd) - used, "%s%s",
                                 used ? "," : "", one);
        p += strcspn(p, ",");
        if (*p == '\0')
            return 0;
        p++;
    }
}

static int cluster_key(struct load_ctx *ctx, const char *name, const char *value)
{
    struct config *cfg = &ctx->cfg;
    int line = ctx->lineno;
    int k = find_key(cluster_keys, CK_COUNT, name);
    unsigned long long n;

    if (k < 0) {
        fail_at(ctx, line, "unknown key '%s' in [cluster]", name);
        return 0;
    }
    if (ctx->cluster_key_line[k]) {
        fail_at(ctx, line, "duplicate key '%s' (first at line %d)", name, ctx->cluster_key_line[k]);
        return 0;
    }
    ctx->cluster_key_line[k] = line;
    switch ((enum cluster_key)k) {
    case CK_SHARDS:
        if (parse_uint(value, 0, ULLONG_MAX, &n) < 0) {
            fail_at(ctx, line, "shards = %s is not a number", value);
            return 0;
        }
        if (n < 1 || n > CONFIG_MAX_SHARDS) {
            fail_at(ctx, line, "shards = %s is out of range 1-%d", value, CONFIG_MAX_SHARDS);
            return 0;
        }
        if (!placement_valid_count((unsigned long)n)) {
            fail_at(ctx, line, "shards = %s is not a power of two", value);
            return 0;
        }
        cfg->shard_count = (unsigned)n;
        cfg->shards_line = line;
        /* nodes listed before [cluster] get their shards now */
        for (unsigned i = 0; i < cfg->node_count; i++)
            if (ctx->nodes[i].key_line[NK_SHARDS] && !ctx->nodes[i].assigned &&
                assign_shards(ctx, (int)i) < 0)
                return 0;
        break;
    case CK_EPOCH:
        if (parse_uint(value, 1, UINT64_MAX, &n) < 0) {
            fail_at(ctx, line, "bad epoch '%s' (want an integer >= 1)", value);
            return 0;
        }
        cfg->epoch = n;
        break;
    case CK_COMMIT:
        if (parse_uint(value, 1, 60000, &n) < 0) {
            fail_at(ctx, line, "bad commit_interval_ms '%s' (want an integer 1-60000)", value);
            return 0;
        }
        cfg->commit_interval_ms = (unsigned)n;
        break;
    case CK_CACHE:
        if (parse_seconds(value, 0, 86400, &cfg->cache_timeout) < 0) {
            fail_at(ctx, line, "bad cache_timeout '%s' (want seconds 0-86400)", value);
            return 0;
        }
        break;
    case CK_SECRET:
        if (strlen(value) < 16 || strlen(value) >= sizeof(cfg->secret)) {
            fail_at(ctx, line, "secret must be 16-%zu characters", sizeof(cfg->secret) - 1);
            return 0;
        }
        snprintf(cfg->secret, sizeof(cfg->secret), "%s", value);
        break;
    case CK_TIMEOUT:
        if (parse_uint(value, 100, 600000, &n) < 0) {
            fail_at(ctx, line, "bad timeout_ms '%s' (want an integer 100-600000)", value);
            return 0;
        }
        cfg->timeout_ms = (unsigned)n;
        break;
    case CK_TLS_CA:
        if (file_value(ctx, line, name, value, cfg->tls_ca, sizeof(cfg->tls_ca)) < 0)
            return 0;
        /* Every process that talks to a node needs the CA, clients too:
         * an unreadable one is a config error, not a failed request later. */
        if (access(cfg->tls_ca, R_OK) != 0) {
            fail_at(ctx, line, "tls_ca %s: %s", cfg->tls_ca, strerror(errno));
            return 0;
        }
        cfg->tls_ca_line = line;
        break;
    case CK_ACK:
        if (strcmp(value, "primary") == 0) {
            cfg->ack = CONFIG_ACK_PRIMARY;
        } else if (strcmp(value, "replica") == 0) {
            cfg->ack = CONFIG_ACK_REPLICA;
        } else {
            fail_at(ctx, line, "bad ack '%s' (want primary or replica)", value);
            return 0;
        }
        break;
    case CK_ETCD:
        if (parse_etcd_list(ctx, line, value) < 0)
            return 0;
        break;
    case CK_LEASE_TTL:
        if (parse_uint(value, 1000, 60000, &n) < 0) {
            fail_at(ctx, line, "bad lease_ttl_ms '%s' (want an integer 1000-60000)", value);
            return 0;
        }
        cfg->lease_ttl_ms = (unsigned)n;
        break;
    case CK_REPLICA_LAG:
        if (parse_uint(value, 100, 60000, &n) < 0) {
            fail_at(ctx, line, "bad replica_lag_ms '%s' (want an integer 100-60000)", value);
            return 0;
        }
        cfg->replica_lag_ms = (unsigned)n;
        break;
    case CK_REPLICA_PUSH:
        if (strcmp(value, "yes") == 0 || strcmp(value, "no") == 0) {
            cfg->replica_push = value[0] == 'y';
        } else {
            fail_at(ctx, line, "bad replica_push '%s' (want yes or no)", value);
            return 0;
        }
        break;
    case CK_COUNT:
        break;
    }
    return 1;
}

/* Bytes that may not appear in a url's host: the rest of a url's syntax
 * (userinfo, path, query, fragment), spaces and controls. */
static int bad_host_byte(unsigned char c)
{
    return c <= ' ' || c >= 0x7f || strchr("@/?#[]%\\", c) != NULL;
}

int config_url_parse(const char *url, struct config_url *out, char *why, size_t whylen)
{
    const char *h, *hend, *p;
    unsigned long port = 0;
    size_t digits;

    memset(out, 0, sizeof(*out));
    if (strncmp(url, "http://", 7) == 0) {
        h = url + 7;
    } else if (strncmp(url, "https://", 8) == 0) {
        h = url + 8;
        out->tls = 1;
    } else {
        snprintf(why, whylen, "want http://HOST:PORT or https://HOST:PORT");
        return -EINVAL;
    }
    if (*h == '[') { /* [IPv6]: the colons inside are not the port's */
        hend = strchr(h, ']');
        if (!hend || hend == h + 1 ||
            strspn(h + 1, "0123456789abcdefABCDEF:.") != (size_t)(hend - h - 1)) {
            snprintf(why, whylen, "want [IPV6-ADDRESS] as a bracketed host");
            return -EINVAL;
        }
        p = hend + 1;
        h++;
    } else {
        hend = h;
        while (*hend && *hend != ':' && !bad_host_byte((unsigned char)*hend))
            hend++;
        p = hend;
    }
    if (hend == h) {
        snprintf(why, whylen, "no host");
        return -EINVAL;
    }
    if (*p != ':') {
        snprintf(why, whylen, *p ? "a '%c' in the host" : "no :PORT", *p);
        return -EINVAL;
    }
    p++;
    digits = strspn(p, "0123456789");
    for (size_t i = 0; i < digits && port <= 65535; i++)
        port = port * 10 + (unsigned long)(p[i] - '0');
    if (digits == 0 || port == 0 || port > 65535) {
        snprintf(why, whylen, "the port is not a number from 1 to 65535");
        return -EINVAL;
    }
    if (p[digits] && strcmp(p + digits, "/") != 0) {
        snprintf(why, whylen, "nothing may follow HOST:PORT but one '/'");
        return -EINVAL;
    }
    snprintf(out->host, sizeof(out->host), "%.*s", (int)(hend - h), h);
    out->port = (unsigned)port;
    return 0;
}

static int node_key(struct load_ctx *ctx, const char *name, const char *value)
{
    struct config *cfg = &ctx->cfg;
    struct config_node *node = &cfg->nodes[ctx->cur_node];
    struct node_state *st = &ctx->nodes[ctx->cur_node];
    int line = ctx->lineno;
    int k = find_key(node_keys, NK_COUNT, name);
    char why[256];

    if (k < 0) {
        fail_at(ctx, line, "unknown key '%s' in [node %s]", name, node->name);
        return 0;
    }
    if (st->key_line[k]) {
        fail_at(ctx, line, "duplicate key '%s' (first at line %d)", name, st->key_line[k]);
        return 0;
    }
    st->key_line[k] = line;
    switch ((enum node_key)k) {
    case NK_URL: {
        struct config_url u;

        if (strlen(value) > CONFIG_URL_MAX) {
            fail_at(ctx, line, "url is too long (at most %d characters)", CONFIG_URL_MAX);
            return 0;
        }
        if (config_url_parse(value, &u, why, sizeof(why)) < 0) {
            fail_at(ctx, line, "bad url '%s' (%s)", value, why);
            return 0;
        }
        snprintf(node->url, sizeof(node->url), "%s", value);
        break;
    }
    case NK_DATA_DIR:
        if (value[0] == '\0') {
            fail_at(ctx, line, "data_dir is empty");
            return 0;
        }
        if (absolute_dir(ctx->conf_dir, value, node->data_dir, sizeof(node->data_dir)) < 0) {
            fail_at(ctx, line, "data_dir is too long");
            return 0;
        }
        break;
    case NK_SHARDS:
        if (parse_shard_list(name, value, cfg->shard_count ? cfg->shard_count : CONFIG_MAX_SHARDS,
                             &st->all, st->bits, why, sizeof(why)) < 0) {
            fail_at(ctx, line, "%s", why);
            return 0;
        }
        if (cfg->shard_count && assign_shards(ctx, ctx->cur_node) < 0)
            return 0;
        break;
    case NK_TLS_CERT:
        if (file_value(ctx, line, name, value, node->tls_cert, sizeof(node->tls_cert)) < 0)
            return 0;
        node->tls_cert_line = line;
        break;
    case NK_TLS_KEY:
        if (file_value(ctx, line, name, value, node->tls_key, sizeof(node->tls_key)) < 0)
            return 0;
        node->tls_key_line = line;
        break;
    case NK_REPLICAS:
        /* Assigned in validate(): the owners of every shard must be known. */
        if (parse_shard_list(name, value, cfg->shard_count ? cfg->shard_count : CONFIG_MAX_SHARDS,
                             &st->rall, st->rbits, why, sizeof(why)) < 0) {
            fail_at(ctx, line, "%s", why);
            return 0;
        }
        break;
    case NK_COUNT:
        break;
    }
    return 1;
}

static int handle_key(void *user, const char *section, const char *name, const char *value)
{
    struct load_ctx *ctx = user;

    (void)section; /* inih truncates it; the reader tracks the real one */
    if (ctx->failed)
        return 0;
    if (!name)
        return 1; /* a section-start call, if inih was built to make them */
    if (!value) {
        fail_at(ctx, ctx->lineno, "key '%s' has no value", name);
        return 0;
    }
    switch (ctx->sect) {
    case SECT_CLUSTER:
        return cluster_key(ctx, name, value);
    case SECT_NODE:
        return node_key(ctx, name, value);
    case SECT_NONE:
        break;
    }
    fail_at(ctx, ctx->lineno, "key '%s' outside any section", name);
    return 0;
}

/* ---- whole file ---- */

static int set_conf_dir(struct load_ctx *ctx)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(ctx->path, '/');

    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == ctx->path)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - ctx->path), ctx->path);
    if (!realpath(dir, ctx->conf_dir)) {
        fail_at(ctx, 0, "cannot resolve directory %s: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

/* Two nodes at one HOST:PORT would be one server answering for both, and
 * every request for the shards of one of them would go to the other. The
 * hosts are compared as written (case aside): "localhost" and "127.0.0.1"
 * are not found to be the same. The urls were checked by node_key(). */
static int check_url_duplicates(struct load_ctx *ctx)
{
    const struct config *cfg = &ctx->cfg;
    struct config_url *u = calloc(cfg->node_count, sizeof(*u));
    char why[128];
    int rc = 0;

    if (!u) {
        fail_at(ctx, 0, "%s", strerror(ENOMEM));
        return -1;
    }
    for (unsigned i = 0; i < cfg->node_count && rc == 0; i++) {
        if (!cfg->nodes[i].url[0] || config_url_parse(cfg->nodes[i].url, &u[i], why, sizeof(why)))
            continue;
        for (unsigned j = 0; j < i; j++) {
            if (u[j].port == u[i].port && strcasecmp(u[j].host, u[i].host) == 0) {
                fail_at(ctx, ctx->nodes[i].key_line[NK_URL],
                        "url %s: nodes %s and %s cannot have the same host and port",
                        cfg->nodes[i].url, cfg->nodes[j].name, cfg->nodes[i].name);
                rc = -1;
                break;
            }
        }
    }
    free(u);
    return rc;
}

/* https:// urls need the CA (every client checks the node's certificate
 * against it) and, for the node itself, a certificate and key; TLS files
 * next to an http:// url would be silently unused, so they are an error. */
static int check_tls(struct load_ctx *ctx)
{
    const struct config *cfg = &ctx->cfg;

    for (unsigned i = 0; i < cfg->node_count; i++) {
        const struct config_node *n = &cfg->nodes[i];
        int tls = strncmp(n->url, "https://", 8) == 0;

        if (tls && !cfg->tls_ca[0]) {
            fail_at(ctx, ctx->nodes[i].key_line[NK_URL],
                    "url %s: https:// needs tls_ca in [cluster]", n->url);
            return -1;
        }
        if (tls && (!n->tls_cert[0] || !n->tls_key[0])) {
            fail_at(ctx, n->line, "[node %s] has an https:// url but no %s", n->name,
                    n->tls_cert[0] ? "tls_key" : "tls_cert");
            return -1;
        }
        if (!tls && (n->tls_cert[0] || n->tls_key[0])) {
            fail_at(ctx, n->tls_cert[0] ? n->tls_cert_line : n->tls_key_line,
                    "[node %s] %s needs an https:// url", n->name,
                    n->tls_cert[0] ? "tls_cert" : "tls_key");
            return -1;
        }
    }
    return 0;
}

/* Every node's replicas = list into nreplicas[]/replicas[], in config
 * order; needs every owner. A copy on the owner would be no copy at all, and
 * more than CONFIG_REPLICAS_MAX would overflow the map's copy set. */
static int assign_replicas(struct load_ctx *ctx)
{
    struct config *cfg = &ctx->cfg;

    for (unsigned idx = 0; idx < cfg->node_count; idx++) {
        const struct node_state *st = &ctx->nodes[idx];
        int line = st->key_line[NK_REPLICAS];

        if (!line)
            continue;
        for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++) {
            int listed = st->rall ? i < cfg->shard_count : !!(st->rbits[i / 64] >> (i % 64) & 1);
            if (!listed)
                continue;
            if (i >= cfg->shard_count) {
                fail_at(ctx, line, "replicas: shard %u is out of range 0-%u", i,
                        cfg->shard_count - 1);
                return -1;
            }
            if (cfg->owner[i] == (int)idx) {
                fail_at(ctx, line,
                        "replicas: shard %u is owned by node '%s' itself (a replica must be on "
                        "another node)",
                        i, cfg->nodes[idx].name);
                return -1;
            }
            if (cfg->nreplicas[i] >= CONFIG_REPLICAS_MAX) {
                fail_at(ctx, line, "replicas: shard %u would have more than %d replicas", i,
                        CONFIG_REPLICAS_MAX);
                return -1;
            }
            cfg->replicas[i][cfg->nreplicas[i]++] = (int)idx;
        }
    }
    return 0;
}

/* A primary waits replica_lag_ms for a replica's ack before it drops the
 * replica from the in-sync set; that must end before the writer's own remote
 * request (timeout_ms) gives up on the primary. Given explicitly it must be
 * below timeout_ms; by default it is 2000 or timeout_ms / 2 if that is less. */
static int check_replica_lag(struct load_ctx *ctx)
{
    struct config *cfg = &ctx->cfg;
    int line = ctx->cluster_key_line[CK_REPLICA_LAG];

    if (!line) {
        cfg->replica_lag_ms = cfg->timeout_ms / 2 < 2000 ? cfg->timeout_ms / 2 : 2000;
        return 0;
    }
    if (cfg->replica_lag_ms >= cfg->timeout_ms) {
        fail_at(ctx, line, "replica_lag_ms = %u must be less than timeout_ms = %u",
                cfg->replica_lag_ms, cfg->timeout_ms);
        return -1;
    }
    return 0;
}

static int validate(struct load_ctx *ctx)
{
    struct config *cfg = &ctx->cfg;

    if (!cfg->shard_count) {
        fail_at(ctx, 0, "[cluster] shards is missing");
        return -1;
    }
    if (cfg->node_count == 0) {
        fail_at(ctx, 0, "no [node] section");
        return -1;
    }
    for (unsigned i = 0; i < cfg->node_count; i++) {
        const struct node_state *st = &ctx->nodes[i];
        const struct config_node *node = &cfg->nodes[i];
        if (!st->key_line[NK_DATA_DIR]) {
            fail_at(ctx, node->line, "[node %s] data_dir is missing", node->name);
            return -1;
        }
        if (!st->key_line[NK_SHARDS]) {
            fail_at(ctx, node->line, "[node %s] shards is missing", node->name);
            return -1;
        }
    }
    for (unsigned i = 0; i < cfg->shard_count; i++) {
        if (cfg->owner[i] < 0) {
            fail_at(ctx, cfg->shards_line, "shard %u has no owner", i);
            return -1;
        }
    }
    if (assign_replicas(ctx) < 0 || check_replica_lag(ctx) < 0)
        return -1;
    if (cfg->node_count > 1) {
        /* Nodes talk to each other: every request is signed, every node
         * must be reachable. */
        if (!cfg->secret[0]) {
            fail_at(ctx, 0, "[cluster] secret is required with more than one node");
            return -1;
        }
        for (unsigned i = 0; i < cfg->node_count; i++) {
            if (!cfg->nodes[i].url[0]) {
                fail_at(ctx, cfg->nodes[i].line, "[node %s] url is missing", cfg->nodes[i].name);
                return -1;
            }
        }
    }
    if (check_url_duplicates(ctx) < 0 || check_tls(ctx) < 0)
        return -1;
    for (unsigned i = 0; i < cfg->node_count; i++)
        cfg->nodes[i].data_dir_line = ctx->nodes[i].key_line[NK_DATA_DIR];
    cfg->shard_bits = 0;
    while ((1u << cfg->shard_bits) < cfg->shard_count)
        cfg->shard_bits++;
    cfg->file_shards = cfg->shard_count;
    memset(cfg->depth, (int)cfg->shard_bits, sizeof(cfg->depth));
    return 0;
}

int config_load(const char *path, struct config *cfg, char *err, size_t errlen)
{
    struct load_ctx *ctx;
    int rc = -1, r;

    if (err && errlen)
        err[0] = '\0';
    ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        if (err && errlen)
            snprintf(err, errlen, "%s: %s", path, strerror(ENOMEM));
        return -1;
    }
    ctx->path = path;
    ctx->err = err;
    ctx->errlen = errlen;
    ctx->cur_node = -1;
    ctx->cfg.epoch = 1;
    ctx->cfg.commit_interval_ms = 200;
    ctx->cfg.cache_timeout = 3600;
    ctx->cfg.timeout_ms = 5000;
    ctx->cfg.ack = CONFIG_ACK_REPLICA;
    ctx->cfg.replica_push = 1;
    ctx->cfg.lease_ttl_ms = 5000;
    for (unsigned i = 0; i < CONFIG_MAX_SHARDS; i++)
        ctx->cfg.owner[i] = -1;
    if (strlen(path) >= sizeof(ctx->cfg.path)) {
        fail_at(ctx, 0, "%s", strerror(ENAMETOOLONG));
        goto out;
    }
    snprintf(ctx->cfg.path, sizeof(ctx->cfg.path), "%s", path);

    ctx->fp = fopen(path, "r");
    if (!ctx->fp) {
        fail_at(ctx, 0, "%s", strerror(errno));
        goto out;
    }
    if (set_conf_dir(ctx) < 0)
        goto out;

    r = ini_parse_stream(read_line, ctx, handle_key, ctx);
    if (r > 0 && (!ctx->failed || (ctx->err_line > 0 && r < ctx->err_line))) {
        /* inih's own complaint comes first in the file */
        ctx->failed = 0;
        fail_at(ctx, r, "syntax error");
        goto out;
    }
    if (r < 0 && !ctx->failed)
        fail_at(ctx, 0, "cannot parse (inih error %d)", r);
    if (ctx->failed)
        goto out;
    if (validate(ctx) < 0)
        goto out;

    *cfg = ctx->cfg;
    rc = 0;
out:
    if (ctx->fp)
        fclose(ctx->fp);
    free(ctx);
    return rc;
}

int config_node_index(const struct config *cfg, const char *name)
{
    if (!name)
        return -1;
    for (unsigned i = 0; i < cfg->node_count; i++)
        if (strcmp(cfg->nodes[i].name, name) == 0)
            return (int)i;
    return -1;
}

int config_pick_node(const struct config *cfg, const char *name, char *err, size_t errlen)
{
    int idx;

    if (!name) {
        if (cfg->node_count == 1)
            return 0;
        if (err && errlen)
            snprintf(err, errlen, "%s: %s", cfg->path,
                     cfg->node_count ? "several nodes; choose one with -n NODE"
                                     : "no [node] section");
        return -1;
    }
    idx = config_node_index(cfg, name);
    if (idx < 0 && err && errlen)
        snprintf(err, errlen, "%s: no node called '%s'", cfg->path, name);
    return idx;
}

int config_check_data_dir(const struct config *cfg, int node, char *err, size_t errlen)
{
    const struct config_node *n = &cfg->nodes[node];
    int e = check_data_dir(n->data_dir);

    if (!e)
        return 0;
    if (err && errlen)
        snprintf(err, errlen, "%s:%d: data_dir %s: %s", cfg->path, n->data_dir_line, n->data_dir,
                 strerror(e));
    return -1;
}
