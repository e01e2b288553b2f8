/* kv_api.c -- GET/HEAD/PUT/DELETE of paths over the namespace (kv_api.h).
 *
 * A request path is split into components once (struct kv_path) and walked
 * from the root with ns_lookup, as the kernel walks a path for the mount.
 * Nothing here caches: every request sees the store as it is, which is what
 * keeps the API and the mounts of all nodes close-to-open consistent.
 */
#include "kv_api.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "record.h"
#include "shard_remote.h"

#define KV_PATH_MAX 4096          /* bytes of a decoded path, as PATH_MAX */
#define KV_MAX_DEPTH 256          /* components in one path */
#define KV_STREAM_MIN (1u << 20)  /* files from this size on are streamed */
#define KV_WRITE_PIECE (1u << 20) /* one ns_write of a PUT */
#define KV_TEMP_TRIES 8

#define KV_DIR_SLOTS 4096  /* remembered directory entries */
#define KV_DIR_TTL_MAX 1.0 /* seconds a directory entry is remembered, at most */

/* A directory's entry as a GET walked through it, until `expires`. */
struct dir_slot {
    struct ino_id parent, id;
    double expires; /* CLOCK_MONOTONIC seconds; 0: empty */
    size_t nlen;
    char name[RECORD_NAME_MAX];
};

struct kv_api {
    struct ns *ns;
    ns_is_open_fn is_open;
    void *is_open_ctx;
    double dir_ttl;           /* cache_timeout; 0: remember nothing */
    pthread_mutex_t dir_lock; /* guards dirs */
    struct dir_slot *dirs;    /* KV_DIR_SLOTS, direct-mapped */
};

/* A path split into components; the strings point into buf. */
struct kv_path {
    char buf[KV_PATH_MAX];
    const char *comp[KV_MAX_DEPTH];
    size_t len[KV_MAX_DEPTH];
    unsigned n;
    int trailing_slash;
};

struct kv_api *kv_api_new(struct ns *ns, double cache_timeout, ns_is_open_fn is_open,
                          void *is_open_ctx)
{
    struct kv_api *api = calloc(1, sizeof(*api));

    if (!api)
        return NULL;
    api->dirs = calloc(KV_DIR_SLOTS, sizeof(*api->dirs));
    if (!api->dirs) {
        free(api);
        return NULL;
    }
    api->ns = ns;
    api->is_open = is_open;
    api->is_open_ctx = is_open_ctx;
    /* At most KV_DIR_TTL_MAX even on a single node, whose cache_timeout
     * is long: the mount changes directories without telling us. */
    api->dir_ttl = cache_timeout < 0                ? 0
                   : cache_timeout > KV_DIR_TTL_MAX ? KV_DIR_TTL_MAX
                                                    : cache_timeout;
    pthread_mutex_init(&api->dir_lock, NULL);
    return api;
}

void kv_api_free(struct kv_api *api)
{
    if (!api)
        return;
    pthread_mutex_destroy(&api->dir_lock);
    free(api->dirs);
    free(api);
}

/* ---- directories a GET walked through ----
 *
 * A GET of a/b/c reads the entries of a and b before c's entry and inode;
 * remembering directory entries for cache_timeout (at most a second), as a
 * mount's kernel remembers names, halves the reads of a typical GET. Writes (PUT, DELETE)
 * never use what is remembered, and a DELETE of a directory forgets it.
 */

static double mono_now(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static struct dir_slot *dir_slot_of(struct kv_api *api, const struct ino_id *parent,
                                    const char *name, size_t nlen)
{
    uint64_t h = XXH3_64bits_withSeed(name, nlen, XXH3_64bits(parent, sizeof(*parent)));

    return &api->dirs[h % KV_DIR_SLOTS];
}

static int dir_slot_is(const struct dir_slot *d, const struct ino_id *parent, const char *name,
                       size_t nlen)
{
    return d->nlen == nlen && memcmp(&d->parent, parent, sizeof(*parent)) == 0 &&
           memcmp(d->name, name, nlen) == 0;
}

/* The id of directory name in parent: remembered, or read (and remembered
 * if it is a directory). -ENOTDIR if it is something else. */
static int dir_lookup(struct kv_api *api, const struct ino_id *parent, const char *name,
                      size_t nlen, struct ino_id *id)
{
    struct dir_slot *d = dir_slot_of(api, parent, name, nlen);
    double now = mono_now();
    uint8_t dtype;
    int rc, hit;

    pthread_mutex_lock(&api->dir_lock);
    hit = d->expires > now && dir_slot_is(d, parent, name, nlen);
    if (hit)
        *id = d->id;
    pthread_mutex_unlock(&api->dir_lock);
    if (hit)
        return 0;
    rc = ns_lookup_id(api->ns, parent, name, nlen, id, &dtype);
    if (rc == 0 && dtype != DT_DIR)
        return -ENOTDIR;
    if (rc == 0 && api->dir_ttl > 0) {
        pthread_mutex_lock(&api->dir_lock);
        d->parent = *parent;
        d->id = *id;
        d->nlen = nlen;
        memcpy(d->name, name, nlen);
        d->expires = now + api->dir_ttl;
        pthread_mutex_unlock(&api->dir_lock);
    }
    return rc;
}

static void dir_forget(struct kv_api *api, const struct ino_id *parent, const char *name,
                       size_t nlen)
{
    struct dir_slot *d = dir_slot_of(api, parent, name, nlen);

    pthread_mutex_lock(&api->dir_lock);
    if (dir_slot_is(d, parent, name, nlen))
        d->expires = 0;
    pthread_mutex_unlock(&api->dir_lock);
}

/* ---- paths ---- */

/* "/v1/kv/a/b/", len bytes, into components. -ENOENT for a path outside
 * /v1/kv; a name the namespace would refuse gets its reason in r: -EINVAL
 * for a NUL byte (a %00: the path is decoded with its length, so the NUL
 * is seen rather than cutting the name short), "." or ".." (also as
 * %2e%2e), -ENAMETOOLONG for a long name or path. */
static int path_parse(const char *path, size_t len, struct kv_path *p, struct node_response *r)
{
    size_t plen = strlen(NODE_KV_PREFIX), i = 0;

    if (len < plen || memcmp(path, NODE_KV_PREFIX, plen) != 0 || (len > plen && path[plen] != '/'))
        return -ENOENT;
    path += plen;
    len -= plen;
    if (memchr(path, '\0', len)) {
        node_response_error(r, -EINVAL, "a NUL byte (%%00) in the path: no name holds one");
        return 0;
    }
    if (len >= sizeof(p->buf)) {
        node_response_error(r, -ENAMETOOLONG, "path over %d bytes", KV_PATH_MAX - 1);
        return 0;
    }
    memcpy(p->buf, path, len);
    p->buf[len] = '\0';
    p->n = 0;
    p->trailing_slash = len > 0 && path[len - 1] == '/';
    while (i < len) {
        char *c = p->buf + i;
        size_t clen = strcspn(c, "/");

        c[clen] = '\0'; /* each component a string, as for a listing's path */
        i += clen + 1;
        if (clen == 0)
            continue; /* "a//b" is "a/b", as for the kernel */
        if ((clen == 1 && c[0] == '.') || (clen == 2 && c[0] == '.' && c[1] == '.')) {
            node_response_error(r, -EINVAL, "'.' and '..' are not names here");
            return 0;
        }
        if (clen > RECORD_NAME_MAX) {
            node_response_error(r, -ENAMETOOLONG, "a name over %d bytes", RECORD_NAME_MAX);
            return 0;
        }
        if (p->n == KV_MAX_DEPTH) {
            node_response_error(r, -ENAMETOOLONG, "over %d names in the path", KV_MAX_DEPTH);
            return 0;
        }
        p->comp[p->n] = c;
        p->len[p->n++] = clen;
    }
    return 0;
}

/* Walk the first `depth` components from the root; the last inode in *out
 * and, if parent is not NULL, the directory it was found in in *parent (the
 * root's own for depth 0). -ENOTDIR when a component before the last is no
 * directory. Directories on the way are passed by their entries alone (an
 * entry names the type), and with `remembered` from what earlier GETs read
 * (dir_lookup). */
static int path_walk(struct kv_api *api, const struct kv_path *p, unsigned depth, int remembered,
                     struct inode *out, struct ino_id *parent)
{
    struct ino_id dir = record_root_id, id;
    uint8_t dtype;
    int rc;

    if (parent)
        *parent = dir;
    if (depth == 0)
        return ns_getattr(api->ns, &dir, out);
    for (unsigned i = 0; i + 1 < depth; i++, dir = id) {
        if (remembered) {
            rc = dir_lookup(api, &dir, p->comp[i], p->len[i], &id);
        } else {
            rc = ns_lookup_id(api->ns, &dir, p->comp[i], p->len[i], &id, &dtype);
            if (rc == 0 && dtype != DT_DIR)
                rc = -ENOTDIR;
        }
        if (rc)
            return rc;
    }
    if (parent)
        *parent = dir;
    return ns_lookup(api->ns, &dir, p->comp[depth - 1], p->len[depth - 1], out);
}

/* ---- replies ---- */

static const char *dtype_name(uint8_t dtype)
{
    return record_type_name((uint32_t)DTTOIF(dtype));
}

static void reply_inode_headers(struct node_response *r, const struct inode *ino)
{
    struct tm tm;
    char date[64];
    time_t t = ino->mtime.tv_sec;

    node_response_header(r, "X-Shardfs-Type", "%s", record_type_name(ino->mode));
    node_response_header(r, "X-Shardfs-Mode", "%04o", ino->mode & 07777);
    if (gmtime_r(&t, &tm) && strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm))
        node_response_header(r, "Last-Modified", "%s", date);
}

/* The shard of the entry of component i (in directory dir): where a lookup
 * of the name goes first, and, unless the file was renamed since it was
 * made, where its inode and data live. A client that sends its next request
 * for the name to that shard's owner is served without a second hop
 * (shardfs bench does). */
static void reply_shard_header(struct kv_api *api, struct node_response *r,
                               const struct ino_id *dir, unsigned i, const struct kv_path *p)
{
    node_response_header(r, REMOTE_HDR_SHARD, "%u",
                         ns_entry_shard(api->ns, dir, p->comp[i], p->len[i]));
}

/* ---- GET and HEAD ---- */

struct file_stream {
    struct ns *ns;
    struct ino_id id;
};

static ssize_t file_stream_read(void *ctx, uint64_t pos, void *buf, size_t max)
{
    struct file_stream *fs = ctx;
    ssize_t n = ns_read(fs->ns, &fs->id, pos, max, buf);

    return n == 0 ? -EIO : n; /* shorter than its Content-Length: it shrank */
}

static ssize_t no_body_read(void *ctx, uint64_t pos, void *buf, size_t max)
{
    (void)ctx, (void)pos, (void)buf, (void)max;
    return -EIO; /* never called: MHD reads no body for HEAD */
}

/* The reply to HEAD: the Content-Length GET would have, and no body. */
static void reply_head(struct node_response *r, uint64_t len)
{
    r->stream = (struct node_stream){.read = no_body_read, .len = len};
}

static int get_file(struct kv_api *api, const struct inode *ino, int head, struct node_response *r)
{
    r->content_type = "application/octet-stream";
    if (head || ino->size == 0) {
        reply_head(r, ino->size);
        return 0;
    }
    if (ino->size >= KV_STREAM_MIN) {
        struct file_stream *fs = malloc(sizeof(*fs));

        if (!fs)
            return -ENOMEM;
        fs->ns = api->ns;
        fs->id = ino->id;
        r->stream = (struct node_stream){
            .read = file_stream_read, .free = free, .ctx = fs, .len = ino->size};
        return 0;
    }
    r->body = malloc(ino->size);
    if (!r->body)
        return -ENOMEM;
    /* A file held in its inode record comes with the lookup (one read
     * between nodes); a larger one is read anew and may have shrunk. */
    ssize_t n = ino->size <= RECORD_INLINE_MAX ? ns_read_at(api->ns, ino, 0, ino->size, r->body)
                                               : ns_read(api->ns, &ino->id, 0, ino->size, r->body);
    if (n < 0)
        return (int)n;
    r->len = (size_t)n;
    return 0;
}

struct listing {
    json_t *entries;
    int nomem;
};

static int list_one(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                    uint8_t dtype)
{
    struct listing *l = ctx;
    json_t *e, *jname;
    const char *key = "name";

    (void)id;
    if (!name) /* the listing starts again */
        return json_array_clear(l->entries) < 0;
    jname = json_stringn(name, nlen);
    if (!jname) {
        /* Not UTF-8, which JSON strings must be: send the bytes in hex. */
        char hex[2 * RECORD_NAME_MAX + 1];
        for (size_t i = 0; i < nlen; i++)
            snprintf(hex + 2 * i, 3, "%02x", (unsigned char)name[i]);
        jname = json_stringn(hex, 2 * nlen);
        key = "name_hex";
    }
    e = jname ? json_pack("{s:o,s:s}", key, jname, "type", dtype_name(dtype)) : NULL;
    if (!e || json_array_append_new(l->entries, e) < 0) {
        l->nomem = 1;
        return 1; /* stop */
    }
    return 0;
}

static int entry_cmp(const void *a, const void *b)
{
    json_t *ea = *(json_t *const *)a, *eb = *(json_t *const *)b;
    json_t *na = json_object_get(ea, "name"), *nb = json_object_get(eb, "name");

    if (!na)
        na = json_object_get(ea, "name_hex");
    if (!nb)
        nb = json_object_get(eb, "name_hex");
    return strcmp(json_string_value(na), json_string_value(nb));
}

/* Sort a JSON array in place (jansson has no sort). */
static int sort_entries(json_t *arr)
{
    size_t n = json_array_size(arr);
    json_t **v = malloc((n ? n : 1) * sizeof(*v));

    if (!v)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        v[i] = json_incref(json_array_get(arr, i));
    qsort(v, n, sizeof(*v), entry_cmp);
    json_array_clear(arr);
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, v[i]); /* cannot fail: the array had room */
    free(v);
    return 0;
}

static int get_dir(struct kv_api *api, const struct kv_path *p, const struct inode *ino, int head,
                   struct node_response *r)
{
    struct listing l = {json_array(), 0};
    json_t *doc = NULL;
    char path[KV_PATH_MAX + 1] = "/";
    size_t used = 1;
    int rc;

    if (!l.entries)
        return -ENOMEM;
    rc = ns_readdir(api->ns, &ino->id, list_one, &l);
    if (rc == 0 && l.nomem)
        rc = -ENOMEM;
    if (rc == 0)
        rc = sort_entries(l.entries);
    /* At most 1 + the request's path: fits; used < sizeof(path) keeps a
     * cut-short snprintf from sending the next one past the end. */
    for (unsigned i = 0; rc == 0 && i < p->n && used < sizeof(path); i++)
        used +=
            (size_t)snprintf(path + used, sizeof(path) - used, "%s%s", i ? "/" : "", p->comp[i]);
    if (rc == 0) {
        json_t *jp = json_string(path);
        doc = json_pack("{s:o,s:O}", "path", jp ? jp : json_null(), "entries", l.entries);
        rc = doc ? 0 : -ENOMEM;
    }
    if (rc == 0) {
        size_t n = json_dumpb(doc, NULL, 0, JSON_COMPACT);
        r->content_type = "application/json";
        if (head) {
            reply_head(r, n + 1);
        } else if (!(r->body = malloc(n + 1)) ||
                   json_dumpb(doc, (char *)r->body, n, JSON_COMPACT) != n) {
            rc = -ENOMEM;
        } else {
            r->body[n] = '\n';
            r->len = n + 1;
        }
    }
    json_decref(doc);
    json_decref(l.entries);
    return rc;
}

static int handle_get(struct kv_api *api, const struct kv_path *p, int head,
                      struct node_response *r)
{
    struct inode ino;
    struct ino_id parent;
    int rc = path_walk(api, p, p->n, 1, &ino, &parent);

    if (rc)
        return rc;
    if (p->trailing_slash && !S_ISDIR(ino.mode))
        return -ENOTDIR;
    reply_inode_headers(r, &ino);
    if (p->n)
        reply_shard_header(api, r, &parent, p->n - 1, p);
    r->status = 200;
    if (S_ISDIR(ino.mode))
        return get_dir(api, p, &ino, head, r);
    if (S_ISREG(ino.mode))
        return get_file(api, &ino, head, r);
    r->content_type = "application/octet-stream";
    if (S_ISLNK(ino.mode) && ino.tail_len) {
        if (head) {
            reply_head(r, ino.tail_len);
        } else {
            r->body = malloc(ino.tail_len);
            if (!r->body)
                return -ENOMEM;
            memcpy(r->body, ino.tail, ino.tail_len);
            r->len = ino.tail_len;
        }
    }
    return 0;
}

/* ---- PUT ---- */

/* Make sure the first `depth` components are directories (creating missing
 * ones, as mkdir -p); the id of the last in *dir. */
static int make_parents(struct ns *ns, const struct kv_path *p, unsigned depth, struct ino_id *dir)
{
    struct inode made;
    uint8_t dtype;
    int rc = 0;

    *dir = record_root_id;
    for (unsigned i = 0; rc == 0 && i < depth; i++) {
        struct ino_id parent = *dir;

        rc = ns_lookup_id(ns, &parent, p->comp[i], p->len[i], dir, &dtype);
        if (rc == -ENOENT) {
            rc =
                ns_mknode(ns, &parent, p->comp[i], p->len[i], S_IFDIR | 0755, 0, 0, 0, NULL, &made);
            if (rc == 0)
                *dir = made.id, dtype = DT_DIR;
            else if (rc == -EEXIST) /* made by someone else meanwhile: fine */
                rc = ns_lookup_id(ns, &parent, p->comp[i], p->len[i], dir, &dtype);
        }
        if (rc == 0 && dtype != DT_DIR)
            rc = -ENOTDIR;
    }
    return rc;
}

static int write_all(struct ns *ns, const struct ino_id *id, const uint8_t *data, size_t len)
{
    size_t done = 0;

    while (done < len) {
        size_t n = len - done < KV_WRITE_PIECE ? len - done : KV_WRITE_PIECE;
        ssize_t w = ns_write(ns, id, done, data + done, n, 0, 0, NULL);

        if (w < 0)
            return (int)w;
        done += (size_t)w;
    }
    return 0;
}

/* ".NAME.XXXXXX": placed on NAME's shard (placement.h), so the final rename
 * stays inside one shard. 0, or -ENAMETOOLONG when NAME is too long for it. */
static int temp_name(char *out, size_t cap, const char *name, size_t nlen, size_t *olen)
{
    static const char set[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    uint64_t r = (uint64_t)random() << 31 ^ (uint64_t)random() ^ (uint64_t)getpid() << 40;

    if (nlen + 8 > RECORD_NAME_MAX || nlen + 9 > cap)
        return -ENAMETOOLONG;
    out[0] = '.';
    memcpy(out + 1, name, nlen);
    out[nlen + 1] = '.';
    for (int i = 0; i < 6; i++, r /= 62)
        out[nlen + 2 + i] = set[r % 62];
    out[nlen + 8] = '\0';
    *olen = nlen + 8;
    return 0;
}

/* Create or truncate name in dir and write body into it: for names too long
 * to have a temporary name beside them. */
static int put_in_place(struct kv_api *api, const struct ino_id *dir, const char *name, size_t nlen,
                        const struct node_request *req, uint32_t mode)
{
    struct ns_setattr sa = {.mask = NS_SET_SIZE, .size = 0};
    struct inode ino;
    int rc = ns_mknode(api->ns, dir, name, nlen, mode, 0, 0, 0, NULL, &ino);

    if (rc == -EEXIST) {
        rc = ns_lookup(api->ns, dir, name, nlen, &ino);
        if (rc == 0 && !S_ISREG(ino.mode))
            rc = S_ISDIR(ino.mode) ? -EISDIR : -EEXIST;
        if (rc == 0)
            rc = ns_setattr(api->ns, &ino.id, &sa, &ino);
    }
    return rc ? rc : write_all(api->ns, &ino.id, req->body, req->body_len);
}

/* Write body as a new file named name in dir and rename it over name. */
static int put_file(struct kv_api *api, const struct ino_id *dir, const char *name, size_t nlen,
                    const struct node_request *req, int *created)
{
    struct ns *ns = api->ns;
    struct inode old, tmp;
    char tname[RECORD_NAME_MAX + 1];
    size_t tlen = 0;
    uint32_t mode = S_IFREG | 0644, uid = 0, gid = 0;
    int rc = ns_lookup(ns, dir, name, nlen, &old);

    if (rc == 0) {
        if (S_ISDIR(old.mode))
            return -EISDIR;
        if (S_ISREG(old.mode)) {
            mode = old.mode;
            uid = old.uid;
            gid = old.gid;
        }
    } else if (rc != -ENOENT) {
        return rc;
    }
    *created = rc == -ENOENT;
    rc = -EEXIST;
    for (int i = 0; rc == -EEXIST && i < KV_TEMP_TRIES; i++) {
        rc = temp_name(tname, sizeof(tname), name, nlen, &tlen);
        if (rc == 0)
            rc = ns_mknode(ns, dir, tname, tlen, mode, 0, uid, gid, NULL, &tmp);
    }
    if (rc == -ENAMETOOLONG) {
        /* No room for a temporary name: write in place (not atomic). */
        return put_in_place(api, dir, name, nlen, req, mode);
    }
    if (rc)
        return rc;
    rc = write_all(ns, &tmp.id, req->body, req->body_len);
    if (rc == 0)
        rc = ns_rename(ns, dir, tname, tlen, dir, name, nlen, 0, api->is_open, api->is_open_ctx);
    if (rc)
        ns_unlink(ns, dir, tname, tlen, api->is_open, api->is_open_ctx);
    return rc;
}

static int handle_put(struct kv_api *api, const struct kv_path *p, const struct node_request *req,
                      struct node_response *r)
{
    struct ino_id dir;
    struct inode ino;
    int rc, created = 0;

    if (p->n == 0) {
        if (!p->trailing_slash)
            return -EISDIR; /* "PUT /v1/kv" would store bytes as the root */
        r->status = 204;    /* "PUT /v1/kv/": the root is a directory already */
        return 0;
    }
    rc = make_parents(api->ns, p, p->n - 1, &dir);
    if (rc)
        return rc;
    const char *name = p->comp[p->n - 1];
    size_t nlen = p->len[p->n - 1];
    if (p->trailing_slash) {
        if (req->body_len)
            return -EINVAL; /* a directory has no bytes */
        rc = ns_mknode(api->ns, &dir, name, nlen, S_IFDIR | 0755, 0, 0, 0, NULL, &ino);
        created = rc == 0;
        if (rc == -EEXIST) {
            rc = ns_lookup(api->ns, &dir, name, nlen, &ino);
            if (rc == 0 && !S_ISDIR(ino.mode))
                rc = -EEXIST;
        }
    } else {
        rc = put_file(api, &dir, name, nlen, req, &created);
    }
    if (rc == 0) {
        r->status = created ? 201 : 204;
        reply_shard_header(api, r, &dir, p->n - 1, p);
    }
    return rc;
}

/* ---- DELETE ---- */

static int handle_delete(struct kv_api *api, const struct kv_path *p, struct node_response *r)
{
    struct inode dir, ino;
    int rc;

    if (p->n == 0)
        return -EPERM; /* the root cannot go */
    rc = path_walk(api, p, p->n - 1, 0, &dir, NULL);
    if (rc == 0 && !S_ISDIR(dir.mode))
        rc = -ENOTDIR;
    const char *name = p->comp[p->n - 1];
    size_t nlen = p->len[p->n - 1];
    if (rc == 0)
        rc = ns_lookup(api->ns, &dir.id, name, nlen, &ino);
    if (rc == 0 && p->trailing_slash && !S_ISDIR(ino.mode))
        rc = -ENOTDIR;
    if (rc == 0 && S_ISDIR(ino.mode)) {
        dir_forget(api, &dir.id, name, nlen);
        rc = ns_rmdir(api->ns, &dir.id, name, nlen, api->is_open, api->is_open_ctx);
    } else if (rc == 0) {
        rc = ns_unlink(api->ns, &dir.id, name, nlen, api->is_open, api->is_open_ctx);
    }
    if (rc == 0)
        r->status = 204;
    return rc;
}

static void nodes_down_add(void *ctx, const char *node, time_t since)
{
    json_object_set_new(ctx, node, json_integer((json_int_t)since));
}

/* GET /v1/nodes: {"down": {NAME: UNIX_SECONDS, ...}}, the nodes this node
 * has marked down and since when (for `shardfs status`). */
static int handle_nodes(struct kv_api *api, const struct node_request *req,
                        struct node_response *r)
{
    json_t *down = json_object(), *doc = down ? json_pack("{s:o}", "down", down) : NULL;
    char *text = NULL;

    if (strcmp(req->method, "GET") != 0) {
        json_decref(doc);
        r->status = 405;
        node_response_header(r, "Allow", "GET");
        return 0;
    }
    if (doc)
        ns_nodes_down(api->ns, nodes_down_add, down);
    text = doc ? json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(doc);
    if (!text)
        return -ENOMEM;
    r->status = 200;
    r->content_type = "application/json";
    r->body = (uint8_t *)text;
    r->len = strlen(text);
    return 0;
}

int kv_api_handle(void *ctx, const struct node_request *req, struct node_response *r)
{
    struct kv_api *api = ctx;
    struct kv_path *p;
    int rc;

    if (strcmp(req->path, "/v1/nodes") == 0)
        return handle_nodes(api, req, r);
    p = malloc(sizeof(*p)); /* 6 KiB: off the server thread's stack */
    if (!p)
        return -ENOMEM;
    rc = path_parse(req->path, req->path_len, p, r);
    if (rc || r->status)
        goto out;
    if (!strcmp(req->method, "GET") || !strcmp(req->method, "HEAD"))
        rc = handle_get(api, p, req->method[0] == 'H', r);
    else if (!strcmp(req->method, "PUT"))
        rc = handle_put(api, p, req, r);
    else if (!strcmp(req->method, "DELETE"))
        rc = handle_delete(api, p, r);
    else {
        r->status = 405;
        node_response_header(r, "Allow", "GET, HEAD, PUT, DELETE");
    }
out:
    free(p);
    return rc;
}
