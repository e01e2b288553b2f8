/* store_layout.c -- DATA_DIR/STORE: read, check, write (store_layout.h). */
#include "store_layout.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "durable.h"
#include "placement.h"

#define FORMAT_UNIFORM 1
#define FORMAT_LAYOUT 2

static int store_path(const struct config *cfg, int node, char *out, size_t len)
{
    return snprintf(out, len, "%s/STORE", cfg->nodes[node].data_dir) >= (int)len ? -1 : 0;
}

static void uniform(struct store_layout *l, unsigned count)
{
    unsigned bits = 0;

    while ((1u << bits) < count)
        bits++;
    l->base = count;
    l->slots = count;
    memset(l->depth, (int)bits, sizeof(l->depth));
}

int store_layout_is_base(const struct store_layout *l)
{
    struct store_layout u;

    uniform(&u, l->base);
    return l->slots == u.slots && memcmp(l->depth, u.depth, l->slots) == 0;
}

/* Put shard s of depth d into l (slots already set). 0, or -1 when it is
 * not a shard of the layout or overlaps one put before. */
static int put_shard(struct store_layout *l, uint8_t *seen, unsigned long s, unsigned long d)
{
    if (d > 10 || (1ul << d) > l->slots || s >= (1ul << d))
        return -1;
    for (unsigned long j = s; j < l->slots; j += 1ul << d) {
        if (seen[j])
            return -1;
        seen[j] = 1;
        l->depth[j] = (uint8_t)d;
    }
    return 0;
}

/* The "shard S D" lines of a format 2 file, kept in s[] and d[]. */
struct lines {
    unsigned n;
    unsigned long s[CONFIG_MAX_SHARDS], d[CONFIG_MAX_SHARDS];
};

static int build(struct store_layout *l, const struct lines *ln)
{
    uint8_t seen[CONFIG_MAX_SHARDS] = {0};
    unsigned long deepest = 0;

    for (unsigned i = 0; i < ln->n; i++)
        deepest = ln->d[i] > deepest ? ln->d[i] : deepest;
    if (ln->n == 0 || deepest > 10)
        return -1;
    l->slots = 1u << deepest;
    for (unsigned i = 0; i < ln->n; i++)
        if (put_shard(l, seen, ln->s[i], ln->d[i]))
            return -1;
    for (unsigned i = 0; i < l->slots; i++)
        if (!seen[i])
            return -1; /* a hash no shard owns */
    return placement_layout_check(l->depth, l->slots) ? -1 : 0;
}

int store_layout_read(const struct config *cfg, int node, struct store_layout *l, char *err,
                      size_t errlen)
{
    struct lines *ln = NULL;
    char path[PATH_MAX + 16], line[128];
    unsigned long fmt = 0, count = 0, s, d;
    int bad = 0, rc;
    FILE *f;

    uniform(l, cfg->file_shards);
    if (store_path(cfg, node, path, sizeof(path))) {
        snprintf(err, errlen, "%s: data_dir path too long", cfg->path);
        return -1;
    }
    f = fopen(path, "re");
    if (!f) {
        if (errno == ENOENT)
            return 1;
        snprintf(err, errlen, "%s:%d: %s: %s", cfg->path, cfg->nodes[node].line, path,
                 strerror(errno));
        return -1;
    }
    ln = calloc(1, sizeof(*ln));
    if (!ln) {
        fclose(f);
        snprintf(err, errlen, "%s: %s", path, strerror(ENOMEM));
        return -1;
    }
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "shardfs-store %lu", &fmt) == 1 || sscanf(line, "shards %lu", &count) == 1)
            continue;
        if (sscanf(line, "shard %lu %lu", &s, &d) == 2 && ln->n < CONFIG_MAX_SHARDS) {
            ln->s[ln->n] = s;
            ln->d[ln->n++] = d;
        } else if (line[0] != '\n') {
            bad = 1;
        }
    }
    fclose(f);
    if ((fmt != FORMAT_UNIFORM && fmt != FORMAT_LAYOUT) || !placement_valid_count(count) ||
        count > CONFIG_MAX_SHARDS || bad || (fmt == FORMAT_UNIFORM) != (ln->n == 0)) {
        free(ln);
        snprintf(err, errlen, "%s: %s is not a shardfs store of format %d or %d", cfg->path, path,
                 FORMAT_UNIFORM, FORMAT_LAYOUT);
        return -1;
    }
    uniform(l, (unsigned)count);
    rc = fmt == FORMAT_LAYOUT ? build(l, ln) : 0;
    free(ln);
    if (rc) {
        snprintf(err, errlen, "%s: %s: its shards do not make a layout (each hash on one shard)",
                 cfg->path, path);
        return -1;
    }
    return 0;
}

/* The text of l; its length, or -1 if it does not fit. */
static int layout_text(const struct store_layout *l, char *out, size_t len)
{
    size_t n;
    int k;

    if (l->slots == l->base && store_layout_is_base(l)) {
        k = snprintf(out, len, "shardfs-store %d\nshards %u\n", FORMAT_UNIFORM, l->base);
        return k < 0 || (size_t)k >= len ? -1 : k;
    }
    k = snprintf(out, len, "shardfs-store %d\nshards %u\n", FORMAT_LAYOUT, l->base);
    if (k < 0 || (size_t)k >= len)
        return -1;
    n = (size_t)k;
    for (unsigned i = 0; i < l->slots; i++) {
        if (!placement_is_shard(l->depth, i))
            continue;
        k = snprintf(out + n, len - n, "shard %u %u\n", i, l->depth[i]);
        if (k < 0 || (size_t)k >= len - n)
            return -1;
        n += (size_t)k;
    }
    return (int)n;
}

int store_layout_write(const struct config *cfg, int node, const struct store_layout *l)
{
    const size_t cap = CONFIG_MAX_SHARDS * 16 + 64;
    char path[PATH_MAX + 16], *text;
    int rc, n;

    if (store_path(cfg, node, path, sizeof(path)))
        return -ENAMETOOLONG;
    text = malloc(cap);
    if (!text)
        return -ENOMEM;
    n = layout_text(l, text, cap);
    rc = n < 0 ? -EINVAL : durable_replace_file(path, text, (size_t)n);
    free(text);
    return rc;
}

int store_layout_create(const struct config *cfg, int node)
{
    struct store_layout l;
    char path[PATH_MAX + 16];

    if (store_path(cfg, node, path, sizeof(path)))
        return -ENAMETOOLONG;
    if (access(path, F_OK) == 0)
        return 0;
    uniform(&l, cfg->file_shards);
    return store_layout_write(cfg, node, &l);
}

int store_layout_single_node(const struct config *cfg, int node)
{
    if (cfg->node_count != 1 || cfg->etcd[0])
        return 0;
    for (unsigned i = 0; i < cfg->file_shards; i++)
        if (cfg->owner[i] != node || cfg->nreplicas[i])
            return 0;
    return 1;
}

int store_layout_static(const struct config *cfg)
{
    if (cfg->etcd[0])
        return 0;
    for (unsigned i = 0; i < cfg->file_shards; i++)
        if (cfg->nreplicas[i])
            return 0;
    return 1;
}

int store_layout_apply(struct config *cfg, int node, char *err, size_t errlen)
{
    struct store_layout l;
    int rc = store_layout_read(cfg, node, &l, err, errlen);

    if (rc < 0)
        return -1;
    if (l.base != cfg->file_shards) {
        snprintf(err, errlen,
                 "%s:%d: shards = %u, but the store in %s was made with %u shards "
                 "(change the layout with `shardfs reshard`, not here)",
                 cfg->path, cfg->shards_line, cfg->file_shards, cfg->nodes[node].data_dir, l.base);
        return -1;
    }
    if (store_layout_is_base(&l)) {
        /* again after a merge back to it: cfg may hold an older layout */
        cfg->shard_count = l.slots;
        memcpy(cfg->depth, l.depth, l.slots);
        for (cfg->shard_bits = 0; (1u << cfg->shard_bits) < l.slots; cfg->shard_bits++)
            ;
        return 0;
    }
    if (!store_layout_static(cfg)) {
        snprintf(err, errlen,
                 "%s: the store in %s was split or merged, which only a store without "
                 "replicas or etcd may be, for now",
                 cfg->path, cfg->nodes[node].data_dir);
        return -1;
    }
    cfg->shard_count = l.slots;
    for (cfg->shard_bits = 0; (1u << cfg->shard_bits) < l.slots; cfg->shard_bits++)
        ;
    memcpy(cfg->depth, l.depth, l.slots);
    /* A shard split off another lives beside it: the owner of its base. */
    for (unsigned i = cfg->file_shards; i < l.slots; i++) {
        cfg->owner[i] = config_shard_owner(cfg, i);
        cfg->nreplicas[i] = 0;
    }
    return 0;
}

int store_layout_check(const struct config *cfg, int node, char *err, size_t errlen)
{
    struct store_layout l;
    int rc = store_layout_read(cfg, node, &l, err, errlen);

    if (rc < 0)
        return -1;
    /* With etcd the map holds the layout (main.c loads it), STORE only
     * the count the store was made with. */
    if (l.base != cfg->file_shards ||
        (rc == 0 && !cfg->etcd[0] &&
         (l.slots != cfg->shard_count || memcmp(l.depth, cfg->depth, l.slots)))) {
        snprintf(err, errlen,
                 "%s: the store in %s has another shard layout than this process loaded "
                 "(split or merged since?)",
                 cfg->path, cfg->nodes[node].data_dir);
        return -1;
    }
    return 0;
}
