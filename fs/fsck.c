/* fsck.c -- the store checker and repairer (see fsck.h).
 *
 * DESIGN
 * 1. Crash leftovers of multi-shard operations. With repair, ns_recover() rolls
 *    intents forward or back and deletes inodes marked "unlinked while open"
 *    before anything else is looked at. Without repair it runs as a dry run to
 *    report them, and the checker overlays what it would do: the entries an
 *    intent removes or adds (struct ovl) and the records an orphan mark reaps
 *    (struct reaped). So a check reports what a repair then fixes.
 * 2. The model. Every shard is scanned type by type: inodes into the inode
 *    table (an open-addressing hash map keyed by inode id), then entries
 *    (counted into the table; those naming directories kept in a list, as a
 *    directory must end up with one name), chunks, xattrs, orphan marks,
 *    intents and unknown types. A record found on the wrong shard is set aside
 *    and handled after the pass, once it is known whether its own shard holds
 *    a copy too.
 * 3. Decisions: the one name a directory keeps, directories cut off from the
 *    root in a loop, orphans (to /lost+found, or deleted when empty or marked),
 *    link counts (files: names; directories: 2 + subdirectories, counting
 *    what the repair adds), parent pointers and dying marks. Every problem and
 *    every change becomes a fix; a fix without a message is a silent side
 *    change (e.g. the link count of /lost+found when an orphan goes there).
 * 4. The plan is printed in phase order, and with repair each fix is carried
 *    out just before its line: moves, deletes, the root, /lost+found, links,
 *    inode rewrites, reaps. Inode rewrites re-read the record and set absolute
 *    values, so they compose with ns_mknode() bumping the root's link count.
 */
#include "fsck.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "endian.h"
#include "placement.h"

#define NONE SIZE_MAX
#define ITAB_MIN 1024u
#define ITAB_MAX ((size_t)1 << 34) /* slots: a hard bound on memory */
#define NAME_ESC (RECORD_NAME_MAX * 4 + 1)
#define DESC_MAX (NAME_ESC + 128)
#define ID_HEX (2 * RECORD_ID_LEN + 1)
#define RECOVER_VAL_MAX RECORD_INTENT_MAX /* ns_recover() skips longer values */
#define LF_NAME "lost+found"

#define PRINTF(a, b) __attribute__((format(printf, a, b)))

/* ---- growable arrays ---- */

struct vec {
    char *v;
    size_t n, cap, size;
};

static void vec_init(struct vec *a, size_t size)
{
    memset(a, 0, sizeof(*a));
    a->size = size;
}

static void *vec_at(const struct vec *a, size_t i)
{
    return a->v + i * a->size;
}

/* Append a zeroed element; NULL when out of memory. */
static void *vec_push(struct vec *a)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        char *v;
        if (cap > SIZE_MAX / a->size)
            return NULL;
        v = realloc(a->v, cap * a->size);
        if (!v)
            return NULL;
        a->v = v;
        a->cap = cap;
    }
    memset(vec_at(a, a->n), 0, a->size);
    return vec_at(a, a->n++);
}

static void vec_sort(struct vec *a, int (*cmp)(const void *, const void *))
{
    if (a->n) /* qsort(NULL, 0, ...) is undefined */
        qsort(a->v, a->n, a->size, cmp);
}

static void *dup_bytes(const void *p, size_t n)
{
    void *q = malloc(n ? n : 1);
    if (q && n)
        memcpy(q, p, n);
    return q;
}

/* ---- the inode table ---- */

enum fate { FATE_KEEP, FATE_LINK, FATE_GONE, FATE_STUCK };

struct fino {
    struct ino_id id, parent, holder;
    uint64_t size;
    uint32_t mode, nlink, flags;
    uint32_t names;    /* entries naming it that stay (non-directories) */
    uint32_t subdirs;  /* directories whose kept entry is in it */
    uint32_t children; /* entries in it that stay */
    uint32_t added;    /* links the repair adds (lost+found) */
    size_t kept;       /* directories: the dent that stays, or NONE */
    long o_shard;      /* shard of its orphan mark, -1 if none */
    uint8_t used, has_xattr, walk, detached, fate, virt;
};

struct itab {
    struct fino *slot;
    size_t cap, n;
};

static uint64_t id_mix(const struct ino_id *id)
{
    uint64_t a, b, x;

    memcpy(&a, id->b, 8);
    memcpy(&b, id->b + 8, 8);
    x = a ^ (b * 0x9e3779b97f4a7c15ull);
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static struct fino *itab_slot(struct fino *slot, size_t cap, const struct ino_id *id)
{
    size_t i = (size_t)id_mix(id) & (cap - 1);

    while (slot[i].used && memcmp(&slot[i].id, id, sizeof(*id)) != 0)
        i = (i + 1) & (cap - 1);
    return &slot[i];
}

static struct fino *itab_find(const struct itab *t, const struct ino_id *id)
{
    struct fino *s;

    if (!t->cap)
        return NULL;
    s = itab_slot(t->slot, t->cap, id);
    return s->used ? s : NULL;
}

static int itab_grow(struct itab *t)
{
    size_t cap = t->cap ? t->cap * 2 : ITAB_MIN;
    struct fino *slot;

    if (cap > ITAB_MAX || cap > SIZE_MAX / sizeof(*slot))
        return -ENOMEM;
    slot = calloc(cap, sizeof(*slot));
    if (!slot)
        return -ENOMEM;
    for (size_t i = 0; i < t->cap; i++)
        if (t->slot[i].used)
            *itab_slot(slot, cap, &t->slot[i].id) = t->slot[i];
    free(t->slot);
    t->slot = slot;
    t->cap = cap;
    return 0;
}

/* The slot of id, added blank if new. Pointers die at the next add. */
static int itab_add(struct itab *t, const struct ino_id *id, struct fino **out)
{
    struct fino *s;

    if ((t->n + 1) * 10 > t->cap * 7) {
        int rc = itab_grow(t);
        if (rc)
            return rc;
    }
    s = itab_slot(t->slot, t->cap, id);
    if (!s->used) {
        memset(s, 0, sizeof(*s));
        s->used = 1;
        s->id = *id;
        s->kept = NONE;
        s->o_shard = -1;
        t->n++;
    }
    *out = s;
    return 0;
}

/* ---- the plan ---- */

enum phase { PH_RECOVER, PH_MOVE, PH_DEL, PH_ROOT, PH_MKLF, PH_LINK, PH_INODE, PH_REAP };

enum fix_kind {
    FIX_RECOVERED, /* done by ns_recover() */
    FIX_NOTE,      /* fixed by the fix just before it */
    FIX_NONE,      /* cannot be fixed */
    FIX_MOVE,      /* put key (val, or its value on from, trimmed) on to; delete it on from */
    FIX_DEL,       /* delete key on from */
    FIX_ROOT,      /* write a new root directory */
    FIX_MKLF,      /* create /lost+found */
    FIX_LINK,      /* enter id as /lost+found/#hex */
    FIX_INODE,     /* rewrite fields of id */
    FIX_REAP,      /* delete id and all it owns */
};

#define SET_NLINK 1u
#define SET_PARENT 2u
#define CLEAR_DYING 4u

struct fix {
    enum phase phase;
    enum fix_kind kind;
    size_t seq;
    unsigned from, to;
    uint8_t *key;
    size_t klen;
    uint8_t val[RECORD_ENTRY_LEN];
    int has_val;
    uint64_t trim;
    struct ino_id id, parent;
    uint8_t dtype, id_is_lf, parent_is_lf;
    unsigned mask;
    uint32_t nlink;
    char *msg; /* NULL: a silent change */
};

/* Entries naming directories, decided on after all entries are seen. */
struct dent {
    uint8_t *key;
    size_t klen;
    unsigned found, correct;
    struct ino_id dir, target;
    uint8_t dtype;
};

/* A record met on the wrong shard, handled after its pass. */
struct aside {
    unsigned shard;
    uint8_t *key, *val;
    size_t klen, vlen;
};

/* Check mode: an entry as ns_recover() would leave it. */
struct ovl {
    uint8_t key[RECORD_KEY_MAX];
    size_t klen;
    uint8_t val[RECORD_ENTRY_LEN];
    uint8_t del, seen;
};

/* Check mode: the records of id on shard that an orphan mark would reap. */
struct reaped {
    struct ino_id id;
    unsigned shard;
};

struct fsck {
    struct ns *ns;
    FILE *out;
    int repair;
    unsigned nshards;
    int err; /* first fatal error met inside a callback */
    struct itab it;
    struct vec dents, fixes, aside, ovl, reaped;
    int ovl_sorted;
    struct ino_id lf; /* /lost+found, once it is known */
    int have_lf, lf_planned, lf_blocked;
    size_t lf_dent; /* the dent of root/lost+found, or NONE */
    uint32_t lf_new_subdirs;
};

typedef int (*rec_fn)(struct fsck *f, unsigned found, const uint8_t *k, size_t kl, const uint8_t *v,
                      size_t vl);

/* ---- formatting ---- */

static const char *hexid(const struct ino_id *id, char out[ID_HEX])
{
    static const char digits[] = "0123456789abcdef";

    for (int i = 0; i < RECORD_ID_LEN; i++) {
        out[2 * i] = digits[id->b[i] >> 4];
        out[2 * i + 1] = digits[id->b[i] & 15];
    }
    out[2 * RECORD_ID_LEN] = 0;
    return out;
}

static void escape(const uint8_t *s, size_t n, char out[NAME_ESC])
{
    static const char digits[] = "0123456789abcdef";
    size_t o = 0;

    for (size_t i = 0; i < n && i < RECORD_NAME_MAX; i++) {
        uint8_t c = s[i];
        if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = digits[c >> 4];
            out[o++] = digits[c & 15];
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = 0;
}

static void key_hex(const uint8_t *k, size_t kl, char *out, size_t len)
{
    char h[2 * 40 + 1];
    size_t n = kl < 40 ? kl : 40;
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < n; i++) {
        h[2 * i] = digits[k[i] >> 4];
        h[2 * i + 1] = digits[k[i] & 15];
    }
    h[2 * n] = 0;
    snprintf(out, len, "key %s%s (%zu bytes)", h, kl > n ? "..." : "", kl);
}

/* "dir ID name "NAME"" of a well-formed entry key. */
static void entry_desc_p(const uint8_t *k, size_t kl, const char *prefix, char *out, size_t len)
{
    char h[ID_HEX], n[NAME_ESC];
    struct ino_id dir;

    memcpy(dir.b, k + 1, RECORD_ID_LEN);
    escape(k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN, n);
    snprintf(out, len, "%sdir %s name \"%s\"", prefix, hexid(&dir, h), n);
}

static void entry_desc(const uint8_t *k, size_t kl, char *out, size_t len)
{
    entry_desc_p(k, kl, "", out, len);
}

static int entry_key_ok(size_t kl)
{
    return kl > 1 + RECORD_ID_LEN && kl <= RECORD_KEY_MAX;
}

/* A description of any record from its key. */
static void rec_desc(const uint8_t *k, size_t kl, char *out, size_t len)
{
    char h[ID_HEX], n[NAME_ESC];
    struct ino_id id;

    if (kl < 1 + RECORD_ID_LEN)
        goto raw;
    memcpy(id.b, k + 1, RECORD_ID_LEN);
    hexid(&id, h);
    if (k[0] == REC_ENTRY && entry_key_ok(kl)) {
        entry_desc_p(k, kl, "entry ", out, len);
    } else if (k[0] == REC_INODE && kl == 1 + RECORD_ID_LEN) {
        snprintf(out, len, "inode %s", h);
    } else if (k[0] == REC_CHUNK && kl == 1 + RECORD_ID_LEN + 8) {
        snprintf(out, len, "chunk %" PRIu64 " of inode %s", endian_get_be64(k + 1 + RECORD_ID_LEN), h);
    } else if (k[0] == REC_XATTR && entry_key_ok(kl)) {
        escape(k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN, n);
        snprintf(out, len, "xattr \"%s\" of inode %s", n, h);
    } else if (k[0] == REC_ORPHAN && kl == 1 + RECORD_ID_LEN) {
        snprintf(out, len, "orphan mark of inode %s", h);
    } else if (k[0] == REC_INTENT && kl == 1 + RECORD_ID_LEN) {
        snprintf(out, len, "intent record %s", h);
    } else if (k[0] == REC_OPEN && kl > 1 + RECORD_ID_LEN) {
        escape(k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN, n);
        snprintf(out, len, "open registration of inode %s by node \"%s\"", h, n);
    } else {
        goto raw;
    }
    return;
raw:
    key_hex(k, kl, out, len);
}

/* ---- adding fixes ---- */

static struct fix *fix_new(struct fsck *f, enum phase ph, enum fix_kind kind)
{
    struct fix *x = vec_push(&f->fixes);

    if (!x) {
        f->err = -ENOMEM;
        return NULL;
    }
    x->phase = ph;
    x->kind = kind;
    x->seq = f->fixes.n - 1;
    x->trim = UINT64_MAX;
    return x;
}

static struct fix *vproblem(struct fsck *f, enum phase ph, enum fix_kind kind, const char *fmt,
                            va_list ap)
{
    struct fix *x = fix_new(f, ph, kind);
    va_list aq;
    int n;

    if (!x)
        return NULL;
    va_copy(aq, ap);
    n = vsnprintf(NULL, 0, fmt, aq);
    va_end(aq);
    if (n < 0 || !(x->msg = malloc((size_t)n + 1))) {
        f->err = -ENOMEM;
        return NULL;
    }
    vsnprintf(x->msg, (size_t)n + 1, fmt, ap);
    return x;
}

static struct fix *problem(struct fsck *f, enum phase ph, enum fix_kind kind, const char *fmt, ...)
    PRINTF(4, 5);
static struct fix *problem(struct fsck *f, enum phase ph, enum fix_kind kind, const char *fmt, ...)
{
    struct fix *x;
    va_list ap;

    va_start(ap, fmt);
    x = vproblem(f, ph, kind, fmt, ap);
    va_end(ap);
    return x;
}

static int fix_key(struct fsck *f, struct fix *x, const uint8_t *k, size_t kl)
{
    x->key = dup_bytes(k, kl);
    x->klen = kl;
    if (!x->key)
        f->err = -ENOMEM;
    return x->key ? 0 : f->err;
}

/* Delete record k on shard `from`; fmt NULL: silently. */
static int del_rec(struct fsck *f, unsigned from, const uint8_t *k, size_t kl, const char *fmt, ...)
    PRINTF(5, 6);
static int del_rec(struct fsck *f, unsigned from, const uint8_t *k, size_t kl, const char *fmt, ...)
{
    struct fix *x;
    va_list ap;

    if (fmt) {
        va_start(ap, fmt);
        x = vproblem(f, PH_DEL, FIX_DEL, fmt, ap);
        va_end(ap);
    } else {
        x = fix_new(f, PH_DEL, FIX_DEL);
    }
    if (!x)
        return f->err;
    x->from = from;
    return fix_key(f, x, k, kl);
}

/* Put record k (with value val if not NULL, else its own value cut to trim
 * bytes) on shard `to`, and delete it from `from` if that differs. */
static int move_rec(struct fsck *f, unsigned from, unsigned to, const uint8_t *k, size_t kl,
                    const uint8_t *val, uint64_t trim, const char *fmt, ...) PRINTF(8, 9);
static int move_rec(struct fsck *f, unsigned from, unsigned to, const uint8_t *k, size_t kl,
                    const uint8_t *val, uint64_t trim, const char *fmt, ...)
{
    struct fix *x;
    va_list ap;

    va_start(ap, fmt);
    x = vproblem(f, PH_MOVE, FIX_MOVE, fmt, ap);
    va_end(ap);
    if (!x)
        return f->err;
    x->from = from;
    x->to = to;
    x->trim = trim;
    if (val) {
        memcpy(x->val, val, RECORD_ENTRY_LEN);
        x->has_val = 1;
    }
    return fix_key(f, x, k, kl);
}

static int place(const struct fsck *f, const uint8_t *k, size_t kl, unsigned *shard)
{
    uint64_t h;

    if (record_placement(k, kl, &h))
        return -1;
    *shard = ns_home(f->ns, h);
    return 0;
}

/* A record that stays: move it if it is on the wrong shard. */
static int keep_rec(struct fsck *f, unsigned found, const uint8_t *k, size_t kl)
{
    char d[DESC_MAX];
    unsigned correct;

    if (place(f, k, kl, &correct) || correct == found)
        return 0;
    rec_desc(k, kl, d, sizeof(d));
    return move_rec(f, found, correct, k, kl, NULL, UINT64_MAX,
                    "record on the wrong shard: %s is on shard %u, belongs on shard %u", d, found,
                    correct);
}

/* After a fix that also puts the record on its right shard. */
static int wrong_shard_note(struct fsck *f, enum phase ph, unsigned found, const uint8_t *k,
                            size_t kl)
{
    char d[DESC_MAX];
    unsigned correct;

    if (place(f, k, kl, &correct) || correct == found)
        return 0;
    rec_desc(k, kl, d, sizeof(d));
    return problem(f, ph, FIX_NOTE,
                   "record on the wrong shard: %s is on shard %u, belongs on shard %u", d, found,
                   correct)
               ? 0
               : f->err;
}

static int malformed(struct fsck *f, unsigned found, const uint8_t *k, size_t kl, const char *why,
                     size_t vl)
{
    char d[DESC_MAX];

    rec_desc(k, kl, d, sizeof(d));
    return del_rec(f, found, k, kl, "malformed record on shard %u: %s: %s (value %zu bytes)", found,
                   d, why, vl);
}

/* Delete record k with the message "<description of k><fmt...>". */
static int del_desc(struct fsck *f, unsigned found, const uint8_t *k, size_t kl, const char *fmt,
                    ...) PRINTF(5, 6);
static int del_desc(struct fsck *f, unsigned found, const uint8_t *k, size_t kl, const char *fmt,
                    ...)
{
    char d[DESC_MAX], rest[256];
    va_list ap;

    rec_desc(k, kl, d, sizeof(d));
    va_start(ap, fmt);
    vsnprintf(rest, sizeof(rest), fmt, ap);
    va_end(ap);
    return del_rec(f, found, k, kl, "%s%s", d, rest);
}

/* Delete entry k with the message "<what>: dir D name "N"[ -> inode T<tail>]". */
static int bad_entry(struct fsck *f, unsigned found, const uint8_t *k, size_t kl, const char *what,
                     const struct ino_id *target, const char *tail)
{
    char d[DESC_MAX], h[ID_HEX];

    entry_desc(k, kl, d, sizeof(d));
    if (!target)
        return del_rec(f, found, k, kl, "%s: %s%s", what, d, tail);
    return del_rec(f, found, k, kl, "%s: %s -> inode %s%s", what, d, hexid(target, h), tail);
}

/* ---- the check-mode overlay of ns_recover() ---- */

static int reaped_cmp(const void *a, const void *b)
{
    const struct reaped *x = a, *y = b;
    int c = memcmp(&x->id, &y->id, sizeof(x->id));

    return c ? c : (x->shard > y->shard) - (x->shard < y->shard);
}

/* Would ns_recover() delete this (inode-owned) record? */
static int is_reaped(const struct fsck *f, unsigned shard, const uint8_t *k, size_t kl)
{
    struct reaped key = {.shard = shard};

    if (!f->reaped.n || kl < 1 + RECORD_ID_LEN)
        return 0;
    if (k[0] != REC_INODE && k[0] != REC_CHUNK && k[0] != REC_XATTR && k[0] != REC_ORPHAN)
        return 0;
    memcpy(key.id.b, k + 1, RECORD_ID_LEN);
    return bsearch(&key, f->reaped.v, f->reaped.n, sizeof(key), reaped_cmp) != NULL;
}

static int ovl_cmp(const void *a, const void *b)
{
    const struct ovl *x = a, *y = b;
    int c = memcmp(x->key, y->key, x->klen < y->klen ? x->klen : y->klen);

    return c ? c : (x->klen > y->klen) - (x->klen < y->klen);
}

static struct ovl *ovl_find(const struct fsck *f, const uint8_t *k, size_t kl)
{
    struct ovl key;

    if (!f->ovl.n || kl > RECORD_KEY_MAX)
        return NULL;
    memcpy(key.key, k, kl);
    key.klen = kl;
    if (f->ovl_sorted)
        return bsearch(&key, f->ovl.v, f->ovl.n, sizeof(key), ovl_cmp);
    for (size_t i = 0; i < f->ovl.n; i++)
        if (ovl_cmp(&key, vec_at(&f->ovl, i)) == 0)
            return vec_at(&f->ovl, i);
    return NULL;
}

/* The entry (dir, name) as ns_recover() would see it: 0 and *id, or -errno. */
static int ovl_entry_get(struct fsck *f, const struct ino_id *dir, const uint8_t *name, size_t nlen,
                         struct ino_id *id)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN + 1], dtype;
    size_t kl = record_entry_key(key, dir, (const char *)name, nlen), vl = 0;
    struct ovl *o = ovl_find(f, key, kl);
    struct shard *s = ns_shard(f->ns, ns_entry_shard(f->ns, dir, (const char *)name, nlen));
    int rc;

    if (o)
        return o->del ? -ENOENT : record_entry_decode(o->val, RECORD_ENTRY_LEN, id, &dtype);
    rc = shard_get(s, key, kl, 0, val, sizeof(val), &vl);
    return rc < 0 ? rc : record_entry_decode(val, vl, id, &dtype);
}

static int ovl_set(struct fsck *f, const struct ino_id *dir, const uint8_t *name, size_t nlen,
                   const struct ino_id *id, uint8_t dtype)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t kl = record_entry_key(key, dir, (const char *)name, nlen);
    struct ovl *o = ovl_find(f, key, kl);

    if (!o && !(o = vec_push(&f->ovl)))
        return -ENOMEM;
    memcpy(o->key, key, kl);
    o->klen = kl;
    o->del = !id;
    if (id)
        record_entry_encode(o->val, id, dtype);
    return 0;
}

/* The intent record of namespace.c (struct intent there): kind, sdir, ddir,
 * sid, did, stype, dtype, slen, sname, dlen, dname. */
struct intent {
    uint8_t kind, stype, dtype, slen, dlen;
    struct ino_id sdir, ddir, sid, did;
    const uint8_t *sname, *dname;
};

static int intent_parse(const uint8_t *v, size_t vl, struct intent *in)
{
    const uint8_t *p = v, *e = v + vl;

    if (vl < 1 + 4 * RECORD_ID_LEN + 3)
        return -EIO;
    in->kind = *p++;
    memcpy(in->sdir.b, p, RECORD_ID_LEN), p += RECORD_ID_LEN;
    memcpy(in->ddir.b, p, RECORD_ID_LEN), p += RECORD_ID_LEN;
    memcpy(in->sid.b, p, RECORD_ID_LEN), p += RECORD_ID_LEN;
    memcpy(in->did.b, p, RECORD_ID_LEN), p += RECORD_ID_LEN;
    in->stype = *p++;
    in->dtype = *p++;
    in->slen = *p++;
    if (in->slen == 0 || (size_t)(e - p) < (size_t)in->slen + 1)
        return -EIO;
    in->sname = p;
    p += in->slen;
    in->dlen = *p++;
    if (in->dlen == 0 || (size_t)(e - p) != in->dlen)
        return -EIO;
    in->dname = p;
    return (in->kind == 1 || in->kind == 2) ? 0 : -EIO;
}

/* What ns_recover() does to the entries for one intent (resolve_intent). */
static int simulate_intent(struct fsck *f, const struct intent *in)
{
    struct ino_id cur;

    if (ovl_entry_get(f, &in->ddir, in->dname, in->dlen, &cur) != 0 ||
        memcmp(&cur, &in->sid, sizeof(cur)) != 0)
        return 0; /* rolled back: the entries stay as they are */
    if (in->kind == 2)
        return ovl_set(f, &in->sdir, in->sname, in->slen, &in->did, in->dtype);
    if (ovl_entry_get(f, &in->sdir, in->sname, in->slen, &cur) == 0 &&
        memcmp(&cur, &in->sid, sizeof(cur)) == 0)
        return ovl_set(f, &in->sdir, in->sname, in->slen, NULL, 0);
    return 0;
}

struct collect {
    struct fsck *f;
    unsigned shard;
    struct vec *recs; /* struct aside */
};

static int aside_push(struct vec *a, unsigned shard, const uint8_t *k, size_t kl, const uint8_t *v,
                      size_t vl)
{
    struct aside *r = vec_push(a);

    if (!r)
        return -ENOMEM;
    r->shard = shard;
    r->key = dup_bytes(k, kl);
    r->val = dup_bytes(v, vl);
    r->klen = kl;
    r->vlen = vl;
    return r->key && r->val ? 0 : -ENOMEM;
}

static void aside_clear(struct vec *a)
{
    for (size_t i = 0; i < a->n; i++) {
        struct aside *r = vec_at(a, i);
        free(r->key);
        free(r->val);
    }
    a->n = 0;
}

static int collect_cb(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct collect *c = ctx;

    return aside_push(c->recs, c->shard, k, kl, v, vl);
}

static int scan_type(struct fsck *f, unsigned shard, uint8_t type, struct vec *recs)
{
    uint8_t s = type, e = (uint8_t)(type + 1);
    struct collect c = {f, shard, recs};

    return shard_scan(ns_shard(f->ns, shard), &s, 1, &e, 1, collect_cb, &c);
}

static int overlay_marks(struct fsck *f, const struct vec *recs)
{
    for (size_t i = 0; i < recs->n; i++) {
        struct aside *r = vec_at(recs, i);
        struct reaped *p;
        if (r->klen != 1 + RECORD_ID_LEN || r->vlen > RECOVER_VAL_MAX)
            continue; /* ns_recover() passes over these */
        if (!(p = vec_push(&f->reaped)))
            return -ENOMEM;
        memcpy(p->id.b, r->key + 1, RECORD_ID_LEN);
        p->shard = r->shard;
    }
    return 0;
}

static int overlay_intents(struct fsck *f, const struct vec *recs)
{
    for (size_t i = 0; i < recs->n; i++) {
        struct aside *r = vec_at(recs, i);
        struct intent in;
        int rc;
        if (r->klen > RECORD_KEY_MAX || r->vlen > RECOVER_VAL_MAX ||
            intent_parse(r->val, r->vlen, &in))
            continue;
        rc = simulate_intent(f, &in);
        if (rc)
            return rc;
    }
    return 0;
}

/* In shard order, as ns_recover() goes. */
static int build_overlay(struct fsck *f)
{
    struct vec recs;
    int rc = 0;

    vec_init(&recs, sizeof(struct aside));
    for (unsigned i = 0; i < f->nshards && rc == 0; i++) {
        if (!ns_is_shard(f->ns, i))
            continue;
        rc = scan_type(f, i, REC_INTENT, &recs);
        if (rc == 0)
            rc = overlay_intents(f, &recs);
        aside_clear(&recs);
    }
    for (unsigned i = 0; i < f->nshards && rc == 0; i++) {
        if (!ns_is_shard(f->ns, i))
            continue;
        rc = scan_type(f, i, REC_ORPHAN, &recs);
        if (rc == 0)
            rc = overlay_marks(f, &recs);
        aside_clear(&recs);
    }
    free(recs.v);
    vec_sort(&f->ovl, ovl_cmp);
    f->ovl_sorted = 1;
    vec_sort(&f->reaped, reaped_cmp);
    return rc;
}

static void recover_line(void *ctx, const char *line)
{
    struct fsck *f = ctx;
    const char *pre = strncmp(line, "interrupted", 11) == 0 ? "half-done rename: " : "";

    problem(f, PH_RECOVER, FIX_RECOVERED, "%s%s", pre, line);
}

/* Step 1 of the DESIGN. */
static int recover(struct fsck *f)
{
    int rc = ns_recover(f->ns, !f->repair, recover_line, f);

    if (rc < 0)
        return rc;
    if (f->err)
        return f->err;
    return f->repair ? 0 : build_overlay(f);
}

/* ---- scanning ---- */

struct pass {
    struct fsck *f;
    unsigned shard;
    rec_fn fn;
    int defer;
};

static int scan_cb(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct pass *p = ctx;
    struct fsck *f = p->f;
    unsigned correct;
    int rc;

    if (is_reaped(f, p->shard, k, kl))
        return 0;
    if (p->defer && place(f, k, kl, &correct) == 0 && correct != p->shard)
        rc = aside_push(&f->aside, p->shard, k, kl, v, vl);
    else
        rc = p->fn(f, p->shard, k, kl, v, vl);
    if (rc == 0)
        rc = f->err;
    return rc < 0 ? rc : 0;
}

static int scan_range(struct fsck *f, uint8_t lo, int hi, rec_fn fn, int defer)
{
    uint8_t s = lo, e = (uint8_t)hi;

    for (unsigned i = 0; i < f->nshards; i++) {
        struct pass p = {f, i, fn, defer};
        if (!ns_is_shard(f->ns, i))
            continue;
        int rc = shard_scan(ns_shard(f->ns, i), &s, 1, hi > 0xff ? NULL : &e, hi > 0xff ? 0 : 1,
                            scan_cb, &p);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Does the right shard of a set-aside record hold it too (after recovery)? */
static int has_copy(struct fsck *f, unsigned correct, const uint8_t *k, size_t kl)
{
    struct ino_id id;
    struct ovl *o;
    uint8_t dummy;
    int rc;

    if (k[0] == REC_INODE) {
        memcpy(id.b, k + 1, RECORD_ID_LEN);
        return kl == 1 + RECORD_ID_LEN && itab_find(&f->it, &id);
    }
    if (k[0] == REC_ENTRY && (o = ovl_find(f, k, kl)) != NULL)
        return !o->del;
    if (is_reaped(f, correct, k, kl))
        return 0;
    rc = shard_get(ns_shard(f->ns, correct), k, kl, 0, &dummy, 0, NULL);
    return rc == -ENOENT ? 0 : rc < 0 ? rc : 1;
}

static int settle_aside(struct fsck *f, rec_fn fn)
{
    int rc = 0;

    for (size_t i = 0; i < f->aside.n && rc == 0; i++) {
        struct aside *a = vec_at(&f->aside, i);
        char d[DESC_MAX];
        unsigned correct = 0;
        place(f, a->key, a->klen, &correct);
        rc = has_copy(f, correct, a->key, a->klen);
        if (rc < 0)
            break;
        if (rc == 0) {
            rc = fn(f, a->shard, a->key, a->klen, a->val, a->vlen);
            continue;
        }
        rec_desc(a->key, a->klen, d, sizeof(d));
        rc = del_rec(f, a->shard, a->key, a->klen,
                     "duplicate record on the wrong shard: %s is on shard %u, shard %u has it too",
                     d, a->shard, correct);
    }
    aside_clear(&f->aside);
    return rc ? rc : f->err;
}

static int run_pass(struct fsck *f, uint8_t type, rec_fn fn)
{
    int rc = scan_range(f, type, type + 1, fn, 1);

    return rc ? rc : settle_aside(f, fn);
}

/* ---- inodes ---- */

static int handle_inode(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                        const uint8_t *v, size_t vl)
{
    struct inode ino;
    struct fino *n;
    int rc;

    if (kl != 1 + RECORD_ID_LEN)
        return malformed(f, found, k, kl, "bad key length", vl);
    memcpy(ino.id.b, k + 1, RECORD_ID_LEN);
    if (record_inode_decode(v, vl, &ino.id, &ino))
        return malformed(f, found, k, kl, "undecodable inode", vl);
    rc = itab_add(&f->it, &ino.id, &n);
    if (rc)
        return rc;
    n->mode = ino.mode;
    n->nlink = ino.nlink;
    n->flags = ino.flags;
    n->size = ino.size;
    n->parent = ino.parent;
    return keep_rec(f, found, k, kl);
}

/* The root must be a directory; if not, the model gets the one FIX_ROOT writes. */
static int check_root(struct fsck *f)
{
    struct fino *r = itab_find(&f->it, &record_root_id);
    int rc;

    if (r && S_ISDIR(r->mode))
        return 0;
    if (r)
        problem(f, PH_ROOT, FIX_ROOT, "the root inode is a %s, not a directory: recreate it",
                record_type_name(r->mode));
    else
        problem(f, PH_ROOT, FIX_ROOT, "the root directory is missing: recreate it");
    if (f->err)
        return f->err;
    rc = itab_add(&f->it, &record_root_id, &r);
    if (rc)
        return rc;
    r->mode = S_IFDIR | 0755;
    r->nlink = 2;
    r->flags = 0;
    r->size = 0;
    r->parent = record_root_id;
    r->virt = 1;
    return 0;
}

/* ---- entries ---- */

static int name_ok(const uint8_t *n, size_t len)
{
    if (len == 0 || len > RECORD_NAME_MAX || memchr(n, '/', len) || memchr(n, 0, len))
        return 0;
    return !((len == 1 && n[0] == '.') || (len == 2 && n[0] == '.' && n[1] == '.'));
}

static int is_lf_key(const uint8_t *k, size_t kl)
{
    return kl == 1 + RECORD_ID_LEN + strlen(LF_NAME) &&
           memcmp(k + 1, record_root_id.b, RECORD_ID_LEN) == 0 &&
           memcmp(k + 1 + RECORD_ID_LEN, LF_NAME, strlen(LF_NAME)) == 0;
}

/* A surviving entry: fix its type and its shard if need be. */
static int entry_fix(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                     const struct ino_id *target, uint8_t dtype, uint32_t mode)
{
    char d[DESC_MAX], h[ID_HEX];
    uint8_t val[RECORD_ENTRY_LEN];
    unsigned correct = found;
    uint8_t want = (uint8_t)IFTODT(mode);
    int rc;

    if (dtype == want)
        return keep_rec(f, found, k, kl);
    place(f, k, kl, &correct);
    entry_desc(k, kl, d, sizeof(d));
    record_entry_encode(val, target, want);
    rc = move_rec(f, found, correct, k, kl, val, UINT64_MAX,
                  "entry type mismatch: %s -> inode %s: the entry says type %u, the inode is a %s",
                  d, hexid(target, h), dtype, record_type_name(mode));
    return rc ? rc : wrong_shard_note(f, PH_MOVE, found, k, kl);
}

static int add_dent(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                    const struct ino_id *dir, const struct ino_id *target, uint8_t dtype)
{
    struct dent *d = vec_push(&f->dents);

    if (!d || !(d->key = dup_bytes(k, kl)))
        return f->err = -ENOMEM;
    d->klen = kl;
    d->found = found;
    place(f, k, kl, &d->correct);
    d->dir = *dir;
    d->target = *target;
    d->dtype = dtype;
    if (is_lf_key(k, kl))
        f->lf_dent = f->dents.n - 1;
    return 0;
}

/* Entries in the check-mode overlay read as ns_recover() would leave them.
 * Returns 1 if the entry would be gone. */
static int ovl_apply(struct fsck *f, const uint8_t *k, size_t kl, const uint8_t **v, size_t *vl)
{
    struct ovl *o = ovl_find(f, k, kl);

    if (!o)
        return 0;
    o->seen = 1;
    if (o->del)
        return 1;
    *v = o->val;
    *vl = RECORD_ENTRY_LEN;
    return 0;
}

static int handle_entry(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                        const uint8_t *v, size_t vl)
{
    struct ino_id dir, tid;
    struct fino *t, *dn;
    unsigned correct;
    uint8_t dtype;
    char what[64];

    if (!entry_key_ok(kl))
        return malformed(f, found, k, kl, "bad key length", vl);
    if (!name_ok(k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN))
        return bad_entry(f, found, k, kl, "bad entry name", NULL, "");
    if (place(f, k, kl, &correct) == 0 && correct == found && ovl_apply(f, k, kl, &v, &vl))
        return 0;
    if (record_entry_decode(v, vl, &tid, &dtype)) {
        snprintf(what, sizeof(what), " (value %zu bytes)", vl);
        return bad_entry(f, found, k, kl, "malformed entry", NULL, what);
    }
    memcpy(dir.b, k + 1, RECORD_ID_LEN);
    if (!(t = itab_find(&f->it, &tid)))
        return bad_entry(f, found, k, kl, "dangling entry", &tid, " (missing)");
    if (!(dn = itab_find(&f->it, &dir)))
        return bad_entry(f, found, k, kl, "entry in a missing directory", &tid, "");
    if (!S_ISDIR(dn->mode)) {
        snprintf(what, sizeof(what), "entry in a %s, not a directory", record_type_name(dn->mode));
        return bad_entry(f, found, k, kl, what, &tid, "");
    }
    if (record_id_is_root(&tid))
        return bad_entry(f, found, k, kl, "entry names the root directory", NULL, "");
    if (S_ISDIR(t->mode))
        return add_dent(f, found, k, kl, &dir, &tid, dtype);
    t->names++;
    dn->children++;
    if (is_lf_key(k, kl))
        f->lf_blocked = 1;
    return entry_fix(f, found, k, kl, &tid, dtype, t->mode);
}

/* Entries an intent would add where there was none. */
static int ovl_leftovers(struct fsck *f)
{
    for (size_t i = 0; i < f->ovl.n; i++) {
        struct ovl *o = vec_at(&f->ovl, i);
        unsigned correct;
        int rc;
        if (o->del || o->seen || place(f, o->key, o->klen, &correct))
            continue;
        rc = handle_entry(f, correct, o->key, o->klen, o->val, RECORD_ENTRY_LEN);
        if (rc)
            return rc;
    }
    return f->err;
}

/* ---- directories: one name each, no loops ---- */

static struct dent *dent_at(struct fsck *f, size_t i)
{
    return vec_at(&f->dents, i);
}

static int choose_names(struct fsck *f)
{
    char d[DESC_MAX], h[ID_HEX];

    for (size_t i = 0; i < f->dents.n; i++) {
        struct dent *e = dent_at(f, i);
        struct fino *t = itab_find(&f->it, &e->target);
        if (t->kept == NONE)
            t->kept = i;
        else if (memcmp(&dent_at(f, t->kept)->dir, &t->parent, sizeof(t->parent)) != 0 &&
                 memcmp(&e->dir, &t->parent, sizeof(t->parent)) == 0)
            t->kept = i;
    }
    for (size_t i = 0; i < f->dents.n; i++) {
        struct dent *e = dent_at(f, i);
        struct fino *t = itab_find(&f->it, &e->target);
        if (t->kept == i)
            continue;
        entry_desc(e->key, e->klen, d, sizeof(d));
        if (del_rec(f, e->found, e->key, e->klen, "extra name of directory %s: %s",
                    hexid(&e->target, h), d))
            return f->err;
    }
    return 0;
}

/* The directory holding n's kept entry, or NULL. */
static struct fino *holder_of(struct fsck *f, const struct fino *n)
{
    return n->kept == NONE ? NULL : itab_find(&f->it, &dent_at(f, n->kept)->dir);
}

/* Walk up from n; a walk that meets itself is a loop cut off from the root:
 * the directory where it closes loses its name and goes to /lost+found. */
static int walk_up(struct fsck *f, struct fino *n)
{
    struct fino *x = n;

    while (x && x->walk == 0) {
        x->walk = 1;
        x = holder_of(f, x);
    }
    if (x && x->walk == 1) {
        struct dent *e = dent_at(f, x->kept);
        x->detached = 1;
        if (del_rec(f, e->found, e->key, e->klen, NULL))
            return f->err;
    }
    for (x = n; x && x->walk == 1; x = holder_of(f, x))
        x->walk = 2;
    return 0;
}

static int find_loops(struct fsck *f)
{
    struct fino *root = itab_find(&f->it, &record_root_id);

    root->walk = 2;
    for (size_t i = 0; i < f->it.cap; i++) {
        struct fino *n = &f->it.slot[i];
        if (n->used && S_ISDIR(n->mode) && n->walk == 0 && walk_up(f, n))
            return f->err;
    }
    return 0;
}

static int count_dirs(struct fsck *f)
{
    for (size_t i = 0; i < f->dents.n; i++) {
        struct dent *e = dent_at(f, i);
        struct fino *t = itab_find(&f->it, &e->target), *dn;
        int rc;
        if (t->kept != i || t->detached)
            continue;
        dn = itab_find(&f->it, &e->dir);
        dn->subdirs++;
        dn->children++;
        t->holder = e->dir;
        if (i == f->lf_dent) {
            f->have_lf = 1;
            f->lf = e->target;
        }
        rc = entry_fix(f, e->found, e->key, e->klen, &e->target, e->dtype, t->mode);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- chunks, xattrs, orphan marks, intents, the unknown ---- */

static int handle_chunk(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                        const uint8_t *v, size_t vl)
{
    char d[DESC_MAX];
    struct ino_id id;
    struct fino *n;
    uint64_t idx, count, room;
    unsigned correct;
    int rc;

    (void)v;
    if (kl != 1 + RECORD_ID_LEN + 8)
        return malformed(f, found, k, kl, "bad key length", vl);
    memcpy(id.b, k + 1, RECORD_ID_LEN);
    idx = endian_get_be64(k + 1 + RECORD_ID_LEN);
    if (!(n = itab_find(&f->it, &id)))
        return del_desc(f, found, k, kl, ": the inode is missing");
    if (vl > RECORD_CHUNK)
        return del_desc(f, found, k, kl, " is too long (%zu bytes)", vl);
    if (!S_ISREG(n->mode))
        return del_desc(f, found, k, kl, ": the inode is a %s", record_type_name(n->mode));
    if (n->size <= RECORD_INLINE_MAX)
        return del_desc(f, found, k, kl, ": the file is inline (%" PRIu64 " bytes)", n->size);
    count = n->size / RECORD_CHUNK + (n->size % RECORD_CHUNK != 0);
    if (idx >= count)
        return del_desc(f, found, k, kl, " lies beyond the end of file (%" PRIu64 " bytes)",
                        n->size);
    room = n->size - idx * RECORD_CHUNK;
    if (vl <= room)
        return keep_rec(f, found, k, kl);
    correct = found;
    place(f, k, kl, &correct);
    rec_desc(k, kl, d, sizeof(d));
    rc = move_rec(f, found, correct, k, kl, NULL, room,
                  "%s (%zu bytes) runs past the end of file (%" PRIu64 " bytes): cut it to %" PRIu64
                  " bytes",
                  d, vl, n->size, room);
    return rc ? rc : wrong_shard_note(f, PH_MOVE, found, k, kl);
}

static int handle_xattr(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                        const uint8_t *v, size_t vl)
{
    struct ino_id id;
    struct fino *n;

    (void)v;
    if (!entry_key_ok(kl))
        return malformed(f, found, k, kl, "bad key length", vl);
    memcpy(id.b, k + 1, RECORD_ID_LEN);
    if (!(n = itab_find(&f->it, &id)))
        return del_desc(f, found, k, kl, ": the inode is missing");
    n->has_xattr = 1;
    return keep_rec(f, found, k, kl);
}

/* Marks are decided on with the orphans (plan_orphan). */
static int handle_mark(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                       const uint8_t *v, size_t vl)
{
    char h[ID_HEX];
    struct ino_id id;
    struct fino *n;

    (void)v;
    if (kl != 1 + RECORD_ID_LEN)
        return malformed(f, found, k, kl, "bad key length", vl);
    memcpy(id.b, k + 1, RECORD_ID_LEN);
    hexid(&id, h);
    if (!(n = itab_find(&f->it, &id)))
        return del_rec(f, found, k, kl, "orphan mark of a missing inode %s", h);
    if (n->o_shard >= 0)
        return del_rec(f, found, k, kl, "second orphan mark of inode %s on shard %u", h, found);
    n->o_shard = found;
    return 0;
}

/* Intents ns_recover() has handled (or, in a check, will) are not counted
 * again; what remains is one it cannot remove. */
static int handle_intent(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                         const uint8_t *v, size_t vl)
{
    char d[DESC_MAX];
    struct intent in;

    rec_desc(k, kl, d, sizeof(d));
    if (f->repair)
        return del_rec(f, found, k, kl, "intent record left after recovery: %s on shard %u", d,
                       found);
    if (vl > RECOVER_VAL_MAX || kl > RECORD_KEY_MAX)
        goto left; /* ns_recover() passes over it */
    if (intent_parse(v, vl, &in) != 0)
        return 0; /* ns_recover() deletes it where it is */
    if (ns_entry_shard(f->ns, &in.sdir, (const char *)in.sname, in.slen) == found)
        return 0; /* ns_recover() resolves it and deletes it there */
left:
    return del_rec(f, found, k, kl, "intent record recovery cannot remove: %s on shard %u", d,
                   found);
}

/* An open registration (namespace.h, "open registry"): fsck runs with no
 * node serving, so whatever had the file open has stopped, and a repair
 * drops it, silently: it is no damage. One is left where a node's last
 * close of a file came after the file's shard had stopped (a cluster
 * stopped node by node), or by a kill -9; the node's next start drops it
 * anyway. An orphan it kept is reported (and removed, with its
 * registrations) by ns_recover(). */
static int handle_open(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                       const uint8_t *v, size_t vl)
{
    (void)v, (void)vl;
    return del_rec(f, found, k, kl, NULL);
}

static int handle_unknown(struct fsck *f, unsigned found, const uint8_t *k, size_t kl,
                          const uint8_t *v, size_t vl)
{
    char d[DESC_MAX];

    (void)v;
    key_hex(k, kl, d, sizeof(d));
    return problem(f, PH_DEL, FIX_NONE,
                   "unknown record type 0x%02x on shard %u: %s, value %zu bytes (left alone)", k[0],
                   found, d, vl)
               ? 0
               : f->err;
}

/* Every key outside the known types. */
static int scan_unknown(struct fsck *f)
{
    /* Sorted. REC_STREAM: a local shard hides its stream from scans, but a
     * shard that shows it has nothing wrong with it. */
    static const uint8_t known[] = {REC_CHUNK,  REC_ENTRY, REC_INODE,  REC_STREAM, REC_META,
                                    REC_ORPHAN, REC_OPEN,  REC_INTENT, REC_XATTR};
    int lo = 0, rc = 0;

    for (size_t i = 0; i <= sizeof(known) && rc == 0; i++) {
        int hi = i < sizeof(known) ? known[i] : 0x100;
        if (lo < hi)
            rc = scan_range(f, (uint8_t)lo, hi, handle_unknown, 0);
        lo = hi + 1;
    }
    return rc;
}

/* Step 2 of the DESIGN. */
static int scan_all(struct fsck *f)
{
    int rc = run_pass(f, REC_INODE, handle_inode);

    if (rc == 0)
        rc = check_root(f);
    if (rc == 0)
        rc = run_pass(f, REC_ENTRY, handle_entry);
    if (rc == 0)
        rc = ovl_leftovers(f);
    if (rc == 0)
        rc = choose_names(f);
    if (rc == 0)
        rc = find_loops(f);
    if (rc == 0)
        rc = count_dirs(f);
    if (rc == 0)
        rc = run_pass(f, REC_CHUNK, handle_chunk);
    if (rc == 0)
        rc = run_pass(f, REC_XATTR, handle_xattr);
    if (rc == 0)
        rc = run_pass(f, REC_ORPHAN, handle_mark);
    if (rc == 0)
        rc = scan_range(f, REC_OPEN, REC_OPEN + 1, handle_open, 0);
    if (rc == 0)
        rc = scan_range(f, REC_INTENT, REC_INTENT + 1, handle_intent, 0);
    if (rc == 0)
        rc = scan_unknown(f);
    return rc ? rc : f->err;
}

/* ---- orphans, link counts, parents ---- */

static int is_root(const struct fino *n)
{
    return record_id_is_root(&n->id);
}

static int del_mark(struct fsck *f, const struct fino *n, const char *msg)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t kl = record_orphan_key(key, &n->id);
    char h[ID_HEX];

    if (msg)
        return del_rec(f, (unsigned)n->o_shard, key, kl, "%s %s: remove the mark", msg,
                       hexid(&n->id, h));
    return del_rec(f, (unsigned)n->o_shard, key, kl, NULL);
}

static int plan_link(struct fsck *f, struct fino *n)
{
    char h[ID_HEX], why[DESC_MAX];
    struct fino *lf = f->have_lf ? itab_find(&f->it, &f->lf) : NULL;
    struct fix *x;

    hexid(&n->id, h);
    if (n->detached)
        snprintf(why, sizeof(why), "directory %s is in a loop cut off from the root", h);
    else
        snprintf(why, sizeof(why),
                 "orphan inode %s (%s, %" PRIu64 " bytes, %u entries): no entry names it", h,
                 record_type_name(n->mode), n->size, n->children);
    if (f->lf_blocked) {
        n->fate = FATE_STUCK;
        return problem(f, PH_LINK, FIX_NONE, "%s: cannot link it, /" LF_NAME " is not a directory",
                       why)
                   ? 0
                   : f->err;
    }
    if (!f->have_lf && !f->lf_planned) {
        if (!fix_new(f, PH_MKLF, FIX_MKLF))
            return f->err;
        f->lf_planned = 1;
        itab_find(&f->it, &record_root_id)->added++;
    }
    if (!(x = problem(f, PH_LINK, FIX_LINK, "%s: link it as /" LF_NAME "/#%s", why, h)))
        return f->err;
    x->id = n->id;
    x->dtype = (uint8_t)IFTODT(n->mode);
    n->fate = FATE_LINK;
    if (!S_ISDIR(n->mode))
        n->added = 1;
    else if (lf)
        lf->added++;
    else
        f->lf_new_subdirs++;
    return 0;
}

static int plan_reap(struct fsck *f, struct fino *n, const char *why)
{
    char h[ID_HEX];
    struct fix *x = problem(f, PH_REAP, FIX_REAP, "%s inode %s (%s, %" PRIu64 " bytes): delete it",
                            why, hexid(&n->id, h), record_type_name(n->mode), n->size);

    if (!x)
        return f->err;
    x->id = n->id;
    n->fate = FATE_GONE;
    return 0;
}

static int plan_orphan(struct fsck *f, struct fino *n)
{
    int dir = S_ISDIR(n->mode), rc;
    int named = dir ? n->kept != NONE && !n->detached : n->names > 0;

    if (named || is_root(n))
        return n->o_shard >= 0 ? del_mark(f, n, "orphan mark on a linked inode") : 0;
    if (n->o_shard >= 0 && !(dir && n->children)) {
        rc = plan_reap(f, n, "orphan (unlinked while open)");
        if (rc == 0 && (unsigned)n->o_shard != ns_inode_shard(f->ns, &n->id))
            rc = del_mark(f, n, NULL);
        return rc;
    }
    if (n->o_shard >= 0 && (rc = del_mark(f, n, NULL)) != 0)
        return rc;
    if (!n->size && !n->children && !n->has_xattr && !n->detached)
        return plan_reap(f, n, "empty orphan");
    return plan_link(f, n);
}

/* Adds the first problem about an inode as its FIX_INODE, the others as notes. */
static int inode_problem(struct fsck *f, size_t *owner, const char *fmt, ...) PRINTF(3, 4);
static int inode_problem(struct fsck *f, size_t *owner, const char *fmt, ...)
{
    struct fix *x;
    va_list ap;

    va_start(ap, fmt);
    x = vproblem(f, PH_INODE, *owner == NONE ? FIX_INODE : FIX_NOTE, fmt, ap);
    va_end(ap);
    if (!x)
        return f->err;
    if (*owner == NONE)
        *owner = f->fixes.n - 1;
    return 0;
}

static int inode_fields(struct fsck *f, const struct fino *n, size_t owner, unsigned mask,
                        uint32_t nlink, int parent_is_lf, const struct ino_id *parent)
{
    struct fix *x;

    if (owner == NONE) {
        if (!fix_new(f, PH_INODE, FIX_INODE))
            return f->err;
        owner = f->fixes.n - 1;
    }
    x = vec_at(&f->fixes, owner);
    x->id = n->id;
    x->mask = mask;
    x->nlink = nlink;
    x->parent_is_lf = (uint8_t)parent_is_lf;
    if (parent)
        x->parent = *parent;
    return 0;
}

/* Link count, parent and dying mark of an inode that stays. The count the
 * repair writes includes what it adds (orphans in /lost+found, /lost+found in
 * the root, where ns_mknode() counts it by itself first). */
static int plan_inode(struct fsck *f, const struct fino *n)
{
    int dir = S_ISDIR(n->mode), linked = n->fate == FATE_LINK;
    uint32_t base = dir ? 2 + n->subdirs : n->names, final = base + n->added;
    uint32_t before = n->nlink + (is_root(n) && f->lf_planned);
    const struct ino_id *want = is_root(n) ? &record_root_id : &n->holder;
    int nlink_bad = !linked && !n->virt && n->nlink != base;
    int parent_bad = dir && !linked && memcmp(&n->parent, want, sizeof(*want)) != 0;
    int to_lf = dir && linked && !(f->have_lf && memcmp(&n->parent, &f->lf, sizeof(f->lf)) == 0);
    int dying = dir && (n->flags & INODE_DYING);
    unsigned mask = (before != final || nlink_bad ? SET_NLINK : 0) |
                    (parent_bad || to_lf ? SET_PARENT : 0) | (dying ? CLEAR_DYING : 0);
    size_t owner = NONE;
    char h[ID_HEX], p[ID_HEX], w[ID_HEX];

    if (n->fate == FATE_GONE || n->fate == FATE_STUCK || !mask)
        return 0;
    hexid(&n->id, h);
    if (nlink_bad && inode_problem(f, &owner, "wrong link count: %s %s has nlink %u, should be %u",
                                   record_type_name(n->mode), h, n->nlink, base))
        return f->err;
    if (parent_bad &&
        inode_problem(f, &owner,
                      "wrong parent: directory %s says its parent is %s, its entry is in %s", h,
                      hexid(&n->parent, p), hexid(want, w)))
        return f->err;
    if (dying &&
        inode_problem(
            f, &owner,
            "directory %s is still marked dying (interrupted rmdir or rename): clear the mark", h))
        return f->err;
    return inode_fields(f, n, owner, mask, final, to_lf, parent_bad ? want : NULL);
}

/* Step 3 of the DESIGN. */
static int decide(struct fsck *f)
{
    for (size_t i = 0; i < f->it.cap; i++) {
        struct fino *n = &f->it.slot[i];
        if (n->used && plan_orphan(f, n))
            return f->err;
    }
    for (size_t i = 0; i < f->it.cap; i++) {
        struct fino *n = &f->it.slot[i];
        if (n->used && plan_inode(f, n))
            return f->err;
    }
    if (f->lf_planned && f->lf_new_subdirs) {
        struct fix *x = fix_new(f, PH_INODE, FIX_INODE);
        if (!x)
            return f->err;
        x->id_is_lf = 1;
        x->mask = SET_NLINK;
        x->nlink = 2 + f->lf_new_subdirs;
    }
    return 0;
}

/* ---- carrying out the plan ---- */

static int apply_on(struct fsck *f, unsigned shard, struct batch *b)
{
    int rc = shard_apply(ns_shard(f->ns, shard), b);

    batch_free(b);
    return rc;
}

static int put_inode(struct fsck *f, const struct inode *ino)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    struct batch b;

    batch_init(&b);
    batch_put(&b, key, record_inode_key(key, &ino->id), val, record_inode_encode(val, ino));
    return apply_on(f, ns_inode_shard(f->ns, &ino->id), &b);
}

static int read_value(struct shard *s, const uint8_t *k, size_t kl, uint8_t **out, size_t *vl)
{
    uint8_t probe;
    size_t n = 0;
    int rc = shard_get(s, k, kl, 0, &probe, 0, &n);

    if (rc < 0)
        return rc;
    if (!(*out = malloc(n ? n : 1)))
        return -ENOMEM;
    rc = shard_get(s, k, kl, 0, *out, n, vl);
    if (rc >= 0 && *vl != n)
        rc = -EIO;
    return rc < 0 ? rc : 0;
}

static int exec_move(struct fsck *f, const struct fix *x)
{
    const uint8_t *val = x->val;
    uint8_t *buf = NULL;
    size_t vl = RECORD_ENTRY_LEN;
    struct batch b;
    int rc = 0;

    if (!x->has_val) {
        rc = read_value(ns_shard(f->ns, x->from), x->key, x->klen, &buf, &vl);
        if (rc)
            goto out;
        val = buf;
    }
    if (x->trim < (uint64_t)vl)
        vl = (size_t)x->trim;
    batch_init(&b);
    batch_put(&b, x->key, x->klen, val, vl);
    rc = apply_on(f, x->to, &b);
    if (rc == 0 && x->from != x->to) {
        batch_init(&b);
        batch_del(&b, x->key, x->klen);
        rc = apply_on(f, x->from, &b);
    }
out:
    free(buf);
    return rc == -ENOENT ? 1 : rc;
}

static int exec_del(struct fsck *f, const struct fix *x)
{
    struct batch b;

    batch_init(&b);
    batch_del(&b, x->key, x->klen);
    return apply_on(f, x->from, &b);
}

static int exec_root(struct fsck *f)
{
    struct inode root;

    record_root_init(&root);
    return put_inode(f, &root);
}

/* ns_mknode() refuses a dying or unlinked parent: make the root fit first. */
static int exec_mklf(struct fsck *f)
{
    struct inode root, lf;
    int rc = ns_getattr(f->ns, &record_root_id, &root);

    if (rc)
        return rc;
    if ((root.flags & INODE_DYING) || root.nlink < 2) {
        root.flags &= ~INODE_DYING;
        root.nlink = root.nlink < 2 ? 2 : root.nlink;
        rc = put_inode(f, &root);
        if (rc)
            return rc;
    }
    rc = ns_mknode(f->ns, &record_root_id, LF_NAME, strlen(LF_NAME), S_IFDIR | 0700, 0, root.uid,
                   root.gid, NULL, &lf);
    if (rc)
        return rc == -EEXIST ? 1 : rc;
    f->lf = lf.id;
    f->have_lf = 1;
    return 0;
}

static int exec_link(struct fsck *f, const struct fix *x)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN];
    char name[ID_HEX + 1];
    size_t kl;
    struct batch b;
    int rc;

    if (!f->have_lf)
        return 1;
    name[0] = '#';
    hexid(&x->id, name + 1);
    kl = record_entry_key(key, &f->lf, name, strlen(name));
    record_entry_encode(val, &x->id, x->dtype);
    batch_init(&b);
    batch_add(&b, BATCH_ASSERT_ABSENT, key, kl, NULL, 0);
    batch_put(&b, key, kl, val, sizeof(val));
    rc = apply_on(f, ns_entry_shard(f->ns, &f->lf, name, strlen(name)), &b);
    return rc == -EEXIST ? 1 : rc;
}

static int exec_inode(struct fsck *f, const struct fix *x)
{
    struct inode ino;
    int rc;

    if ((x->id_is_lf || x->parent_is_lf) && !f->have_lf)
        return 1;
    rc = ns_getattr(f->ns, x->id_is_lf ? &f->lf : &x->id, &ino);
    if (rc)
        return rc == -ENOENT ? 1 : rc;
    if (x->mask & SET_NLINK)
        ino.nlink = x->nlink;
    if (x->mask & SET_PARENT)
        ino.parent = x->parent_is_lf ? f->lf : x->parent;
    if (x->mask & CLEAR_DYING)
        ino.flags &= ~INODE_DYING;
    return put_inode(f, &ino);
}

static void batch_del_owned(struct batch *b, enum record_type t, const struct ino_id *id)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, t, id);

    batch_add(b, BATCH_DEL_RANGE, start, sl, end, record_prefix_end(end, start, sl));
}

static int exec_reap(struct fsck *f, const struct fix *x)
{
    uint8_t key[RECORD_KEY_MAX];
    struct batch b;

    batch_init(&b);
    batch_del(&b, key, record_inode_key(key, &x->id));
    batch_del(&b, key, record_orphan_key(key, &x->id));
    batch_del_owned(&b, REC_CHUNK, &x->id);
    batch_del_owned(&b, REC_XATTR, &x->id);
    return apply_on(f, ns_inode_shard(f->ns, &x->id), &b);
}

/* 0 done, 1 not done, -errno failed. */
static int exec_fix(struct fsck *f, const struct fix *x, int prev)
{
    switch (x->kind) {
    case FIX_RECOVERED:
        return 0;
    case FIX_NOTE:
        return prev;
    case FIX_NONE:
        return 1;
    case FIX_MOVE:
        return exec_move(f, x);
    case FIX_DEL:
        return exec_del(f, x);
    case FIX_ROOT:
        return exec_root(f);
    case FIX_MKLF:
        return exec_mklf(f);
    case FIX_LINK:
        return exec_link(f, x);
    case FIX_INODE:
        return exec_inode(f, x);
    case FIX_REAP:
        return exec_reap(f, x);
    }
    return 1;
}

static int fix_cmp(const void *a, const void *b)
{
    const struct fix *x = a, *y = b;

    if (x->phase != y->phase)
        return x->phase < y->phase ? -1 : 1;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

static void print_line(struct fsck *f, const char *msg, int st)
{
    if (!f->out)
        return;
    if (!f->repair)
        fprintf(f->out, "%s\n", msg);
    else if (st == 0)
        fprintf(f->out, "%s: fixed\n", msg);
    else if (st > 0)
        fprintf(f->out, "%s: not fixed\n", msg);
    else
        fprintf(f->out, "%s: repair failed: %s\n", msg, strerror(-st));
}

/* Step 4 of the DESIGN. Counts the problems (and those fixed). */
static int carry_out(struct fsck *f, size_t *found, size_t *fixed)
{
    int prev = 0;

    vec_sort(&f->fixes, fix_cmp);
    for (size_t i = 0; i < f->fixes.n; i++) {
        struct fix *x = vec_at(&f->fixes, i);
        int st = f->repair ? exec_fix(f, x, prev) : 0;
        prev = st;
        if (x->msg) {
            (*found)++;
            *fixed += st == 0;
            print_line(f, x->msg, st);
        }
        if (st < 0)
            return st;
    }
    return 0;
}

static void summary(struct fsck *f, size_t found, size_t fixed)
{
    const char *s = found == 1 ? "" : "s";

    if (!f->out)
        return;
    if (found == 0)
        fprintf(f->out, "fsck: clean\n");
    else if (f->repair)
        fprintf(f->out, "fsck: %zu problem%s found, %zu fixed\n", found, s, fixed);
    else
        fprintf(f->out, "fsck: %zu problem%s found\n", found, s);
}

static void fsck_free(struct fsck *f)
{
    for (size_t i = 0; i < f->fixes.n; i++) {
        struct fix *x = vec_at(&f->fixes, i);
        free(x->key);
        free(x->msg);
    }
    for (size_t i = 0; i < f->dents.n; i++)
        free(dent_at(f, i)->key);
    aside_clear(&f->aside);
    free(f->fixes.v);
    free(f->dents.v);
    free(f->aside.v);
    free(f->ovl.v);
    free(f->reaped.v);
    free(f->it.slot);
}

int fsck_run(struct ns *ns, int repair, FILE *out)
{
    struct fsck f;
    size_t found = 0, fixed = 0;
    int rc;

    memset(&f, 0, sizeof(f));
    f.ns = ns;
    f.out = out;
    f.repair = repair;
    f.nshards = ns_shard_count(ns);
    f.lf_dent = NONE;
    vec_init(&f.dents, sizeof(struct dent));
    vec_init(&f.fixes, sizeof(struct fix));
    vec_init(&f.aside, sizeof(struct aside));
    vec_init(&f.ovl, sizeof(struct ovl));
    vec_init(&f.reaped, sizeof(struct reaped));
    rc = recover(&f);
    if (rc == 0)
        rc = scan_all(&f);
    if (rc == 0)
        rc = decide(&f);
    if (rc == 0)
        rc = carry_out(&f, &found, &fixed);
    if (rc < 0 && out)
        fprintf(out, "fsck: stopped: %s\n", strerror(-rc));
    else
        summary(&f, found, fixed);
    fsck_free(&f);
    if (rc < 0)
        return rc;
    if (repair && fixed == found)
        ns_repaired(ns); /* clean now: an unclean stop's mark can go */
    return found > INT_MAX ? INT_MAX : (int)found;
}

int fsck_after_unclean_stop(struct ns *ns, FILE *out)
{
    int how = ns_unclean_stop(ns), found;
    const char *what = how == 2 ? "the machine stopped" : "the last shardfs daemon was killed";

    if (!how)
        return 0;
    if (!ns_all_local(ns)) {
        /* fsck needs the whole store to itself; other nodes keep serving. */
        fprintf(out, "shardfs: %s while this node served the store; run "
                     "'shardfs fsck --repair' with every node stopped to check the shards "
                     "together\n", what);
        return 0;
    }
    fprintf(out, "shardfs: %s while the store was open: checking and repairing it "
                 "(shardfs fsck --repair)\n", what);
    found = fsck_run(ns, 1, out);
    if (found < 0)
        /* Refusing to serve would also refuse the deletes that a full disk,
         * say, needs; the mark stays, so the next mount tries again. */
        fprintf(out, "shardfs: the check stopped (%s): serving the store as it is; run "
                     "'shardfs fsck --repair' when it is unmounted\n", strerror(-found));
    return found < 0 ? found : 0;
}
