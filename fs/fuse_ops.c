/* fuse_ops.c -- the low-level FUSE adapter (see fuse_ops.h).
 *
 * Each callback is a thin shell: it decodes the request, calls the namespace
 * and replies exactly once. Errors travel as negative errno values and change
 * sign only at fuse_reply_err().
 *
 * Directory listings: opendir takes nothing; the first readdir (offset 0)
 * takes a snapshot of the entries of every shard into the handle, and later
 * calls page through it, so offsets stay stable while the directory changes
 * (entries added after the snapshot may or may not show, as POSIX allows).
 *
 * O_DIRECT writes and the page cache: the kernel drops a file's cached pages
 * around a direct write, but not after an asynchronous one (io_submit), so a
 * buffered read that fetched the old bytes while the write was in flight
 * would leave them cached for good (keep_cache). So each direct write, once
 * applied, has the written range of the kernel's cache invalidated before
 * it is answered. The invalidation waits for pages that a read in flight
 * has locked; done on a worker thread, enough such writes could hold every
 * worker while the reads they wait for find none, so one invalidation thread
 * does it and answers the write (inval_main). A read that fetched the old
 * bytes locked its pages before the write was applied, so the invalidation
 * waits for it and then drops them: after a direct write returns, every
 * read sees it. A file that no read and no buffered write has gone through
 * (node.paged: set before the store is read, tested after it is written) has
 * nothing cached, and its direct writes are answered at once.
 *
 * O_APPEND across nodes: the kernel cuts a buffered write at the end of a
 * page it has not cached and sends the pieces one by one; the store puts each
 * at the end of the file, so with other writers (shared) another node's
 * append could land between the pieces. So, when shared, a write-only
 * O_APPEND open uses direct I/O (fi->direct_io): the kernel sends each
 * write(2) of up to max_write as one request, and ns_write() places it at the
 * end in one compare-and-swap on the inode's shard. A read-write one does too
 * only where the kernel can map a direct-I/O file shared
 * (FUSE_CAP_DIRECT_IO_ALLOW_MMAP, libfuse 3.16); elsewhere mmap(MAP_SHARED)
 * of it would fail with ENODEV, so it keeps the page cache. A write-only
 * descriptor cannot be mapped at all. Its direct writes drop their range
 * from this mount's cache as O_DIRECT writes do (above). Alone (not shared)
 * the kernel holds the inode lock over all the pieces of a write and nobody
 * else writes, so appends keep the page cache there.
 *
 * Files replaced on other nodes: with other nodes, a file a rename replaced
 * is kept for a while for readers elsewhere (namespace.c, "replaced files
 * across nodes"), with nlink 0. A name this node's kernel cached before the
 * rename then leads to an inode that is still there instead of a missing
 * one, so open answers ESTALE for a file with no name left (and getattr,
 * unless this node has it open), and the kernel looks the name up again. Except
 * when the kernel has just looked the name up for this very open (a lookup
 * answered at most OPEN_AFTER_LOOKUP_MS before, and no open since): then the
 * walk raced the rename, and it opens the old file, as on a local
 * filesystem. That is what makes the kernel's one repeated walk after
 * ESTALE enough while renames keep coming (node_reached_by_old_name()).
 */
#include "fuse_ops.h"
#include "write_behind.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>

#define NODE_BUCKETS (1u << 16)
#define MAX_WRITE (1u << 20)
/* An open of a file with no name left that follows the daemon's answer
 * naming its node by at most this long raced the rename: the kernel walked
 * the name just before (the walk it repeats after ESTALE is one of those). */
#define OPEN_AFTER_LOOKUP_MS 250u

struct node {
    struct ino_id id;
    uint64_t nlookup;  /* protected by fs.lock */
    unsigned opens;    /* protected by fs.lock */
    int orphan;        /* unlinked while open; protected by fs.lock */
    int pinned;        /* an orphan kept for the kernel's lookups too (a rename
                        * replaced it): deleted at the last release or forget,
                        * whichever comes later; protected by fs.lock */
    int reaping;       /* its last release is deleting it; protected by fs.lock */
    uint64_t named_ms; /* CLOCK_MONOTONIC of the last lookup answered with this
                        * node; protected by fs.lock */
    int walked;        /* no open since that lookup; protected by fs.lock */
    int reg;           /* REG_*: this node's open registration; protected by fs.lock */
    atomic_int paged;  /* a read or buffered write went through the kernel's cache */
    atomic_uint_fast64_t wgen; /* bumped by every change of its data through this mount */
    struct node *next; /* hash chain */
};

/* A node's open registration on the inode's shard (namespace.h, "open
 * registry"; only with other nodes): made by the first open (in the batch
 * the open makes anyway), dropped after the last release: the release
 * queues it (REG_QUEUED) and the registry thread drops what is queued
 * every REG_FLUSH_MS, in one batch a shard, so an rsync's thousands of
 * closes cost a few batches, and an open of a queued file takes the
 * registration back without a round trip. An open that finds it being
 * dropped (REG_DROPPING) waits for that, so its own registration is never
 * undone by the drop. A drop that failed (the shard's node was down)
 * leaves it REG_STUCK, tried again every REG_RETRY_MS; an open registers
 * anew (the record may still be there). A stop drops nothing (reg_main):
 * the node's next start does. */
enum { REG_NONE = 0, REG_HELD, REG_QUEUED, REG_DROPPING, REG_STUCK };
#define REG_FLUSH_MS 100u
#define REG_RETRY_MS 5000u
#define REG_QUEUE_WAKE 4096u /* a queue this long is dropped at once */

/* A direct write's range to drop from the kernel's cache, and its answer. */
struct inval {
    fuse_req_t req;
    fuse_ino_t ino;
    off_t off;
    size_t size; /* bytes written: the range, and the reply */
    struct inval *next;
};

struct fs {
    struct ns *ns;
    double entry_timeout;    /* positive entries */
    double attr_timeout;     /* files */
    double dir_attr_timeout; /* directories */
    double negative_timeout;
    int keep_cache;          /* keep a file's page cache across opens */
    int direct_append;       /* O_APPEND opens use direct I/O: others write too */
    int direct_io_mmap;      /* the kernel maps direct-I/O files shared; set by op_init */
    int other_nodes;         /* other nodes' mounts may replace files */
    struct wb *wb;           /* writes to other nodes' shards; NULL alone */
    struct fuse_session *se; /* for invalidations; NULL until fs_start() */
    pthread_mutex_t inval_lock;
    pthread_cond_t inval_cond;
    struct inval *inval_head, **inval_tail; /* protected by inval_lock */
    int inval_stop;                         /* protected by inval_lock */
    int inval_running;                      /* set by fs_start(), cleared by fs_stop() */
    pthread_t inval_thread;
    pthread_mutex_t lock;
    pthread_cond_t reg_cond; /* a node's reg left REG_DROPPING; with lock */
    size_t reg_stuck;        /* nodes in REG_STUCK; protected by lock */
    uint64_t reg_tried_ms;   /* the last retry of those; registry thread only */
    struct node **reg_queue; /* released, to drop (some since taken back); */
    size_t reg_nqueue, reg_qcap; /* protected by lock */
    int reg_stop;            /* protected by lock */
    int reg_running;         /* set by fs_start(), cleared by fs_stop() */
    pthread_cond_t reg_wake; /* the registry thread's; with lock */
    pthread_t reg_thread;
    struct opened *opened; /* every open handle; protected by lock */
    struct node root;
    struct node *buckets[NODE_BUCKETS];
};

/* What every open handle starts with: its place in fs.opened, so that the
 * handles whose release never came (the kernel drops the releases still
 * queued when the mount goes) are freed by fs_free(). */
struct opened {
    struct opened *prev, *next; /* protected by fs.lock */
    int is_dir;                 /* a struct dir_handle, else a struct handle */
};

/* An open file. O_APPEND is honoured by the store, not by the offset the
 * kernel sends, so that appends from several writers never overlap; it is
 * taken from each write's flags (fcntl may set or clear it after the open). */
struct handle {
    struct opened o;
    int direct_io; /* opened with fi->direct_io (an O_APPEND open, see the top) */
    /* The inode the open read, when its data is inline: reads soon after
     * the open are answered from it (open_snapshot_read). */
    struct inode *snap;
    uint64_t snap_ms;   /* monotonic ms of the open */
    uint64_t snap_wgen; /* the node's wgen then */
};

struct dir_entry {
    struct ino_id id;
    uint8_t dtype;
    uint8_t nlen;
    uint8_t has_attr;           /* attr came with the listing (readdirplus) */
    char name[RECORD_NAME_MAX + 1];
    struct stat attr;
};

/* How long attributes read with a listing may stand in for a fresh read in
 * the readdirplus replies that follow it (the rest of a long listing reads
 * each inode again, as a lookup would). */
#define DIR_ATTR_FRESH_MS 1000u

struct dir_handle {
    struct opened o;
    struct dir_entry *ents;
    size_t n, cap;
    int loaded;
    uint64_t loaded_ms;         /* monotonic_ms() of the load */
    uint64_t parent_ino; /* st_ino of ".." (0 would hide it from readdir(3)) */
};

/* ---- the node table ---- */

static uint64_t monotonic_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

static struct fs *fs_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

static unsigned bucket_of(const struct ino_id *id)
{
    return (unsigned)(record_id_ino(id) & (NODE_BUCKETS - 1));
}

static struct node *node_of(struct fs *fs, fuse_ino_t ino)
{
    return ino == FUSE_ROOT_ID ? &fs->root : (struct node *)(uintptr_t)ino;
}

static fuse_ino_t nodeid_of(struct fs *fs, struct node *n)
{
    return n == &fs->root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n;
}

/* Caller holds fs->lock. */
static struct node *node_find(struct fs *fs, const struct ino_id *id)
{
    if (record_id_is_root(id))
        return &fs->root;
    for (struct node *n = fs->buckets[bucket_of(id)]; n; n = n->next)
        if (memcmp(&n->id, id, sizeof(*id)) == 0)
            return n;
    return NULL;
}

/* Find or add the node of id and take one lookup reference; named: the
 * answer to a lookup of a name (node_reached_by_old_name). */
static struct node *node_ref(struct fs *fs, const struct ino_id *id, int named)
{
    struct node *n;

    pthread_mutex_lock(&fs->lock);
    n = node_find(fs, id);
    if (!n) {
        n = calloc(1, sizeof(*n));
        if (n) {
            unsigned b = bucket_of(id);
            n->id = *id;
            n->next = fs->buckets[b];
            fs->buckets[b] = n;
        }
    }
    if (n) {
        n->nlookup++;
        if (named) {
            n->named_ms = monotonic_ms();
            n->walked = 1;
        }
    }
    pthread_mutex_unlock(&fs->lock);
    return n;
}

/* Caller holds fs->lock. Frees n when nothing refers to it any more. */
static void node_maybe_free(struct fs *fs, struct node *n)
{
    if (n == &fs->root || n->nlookup || n->opens || n->reaping || n->reg != REG_NONE)
        return;
    struct node **pp = &fs->buckets[bucket_of(&n->id)];
    while (*pp && *pp != n)
        pp = &(*pp)->next;
    if (*pp)
        *pp = n->next;
    free(n);
}

/* Caller holds fs->lock. 1 if n is an orphan nothing refers to any more:
 * the caller then deletes it (node_reap()). */
static int node_reap_due(struct node *n)
{
    if (!n->orphan || n->opens || (n->pinned && n->nlookup))
        return 0;
    n->orphan = 0;
    n->pinned = 0;
    n->reaping = 1; /* no open may start until the inode is gone */
    return 1;
}

/* Caller holds fs->lock: queue n's registration (REG_HELD) for the
 * registry thread. 0, or -ENOMEM (the caller drops it itself). */
static int reg_queue(struct fs *fs, struct node *n)
{
    if (fs->reg_nqueue == fs->reg_qcap) {
        size_t cap = fs->reg_qcap ? fs->reg_qcap * 2 : 256;
        struct node **grown = realloc(fs->reg_queue, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        fs->reg_queue = grown, fs->reg_qcap = cap;
    }
    fs->reg_queue[fs->reg_nqueue++] = n;
    n->reg = REG_QUEUED;
    if (fs->reg_nqueue >= REG_QUEUE_WAKE)
        pthread_cond_signal(&fs->reg_wake);
    return 0;
}

/* The registration drop that moved n to REG_DROPPING is done, with rc. */
static void reg_dropped(struct fs *fs, struct node *n, int rc)
{
    pthread_mutex_lock(&fs->lock);
    n->reg = rc ? REG_STUCK : REG_NONE;
    fs->reg_stuck += rc != 0;
    pthread_cond_broadcast(&fs->reg_cond);
    node_maybe_free(fs, n);
    pthread_mutex_unlock(&fs->lock);
}

/* The registry thread: every REG_FLUSH_MS, drop the queued
 * registrations, and every REG_RETRY_MS the stuck ones, in one batch a
 * shard (ns_unregister_many). */
static void *reg_main(void *arg)
{
    struct fs *fs = arg;
    struct ino_id *ids = NULL;
    int *rcs = NULL;
    size_t cap = 0;
    int stop = 0;

    while (!stop) {
        struct timespec t;
        struct node **todo;
        size_t n = 0, nq;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += REG_FLUSH_MS * 1000000L;
        if (t.tv_nsec >= 1000000000L)
            t.tv_sec++, t.tv_nsec -= 1000000000L;
        pthread_mutex_lock(&fs->lock);
        if (!fs->reg_stop)
            pthread_cond_timedwait(&fs->reg_wake, &fs->lock, &t);
        stop = fs->reg_stop;
        if (stop) {
            /* A stop writes nothing to the shards: a drop now could miss
             * a replica that stops at the same time. What is left goes
             * at this node's next start (namespace.h). */
            pthread_mutex_unlock(&fs->lock);
            break;
        }
        /* The whole queue at once: no pointer stays behind in it. */
        todo = fs->reg_queue, nq = fs->reg_nqueue;
        fs->reg_queue = NULL, fs->reg_nqueue = fs->reg_qcap = 0;
        for (size_t i = 0; i < nq; i++) {
            struct node *nd = todo[i];
            if (nd->reg != REG_QUEUED)
                continue; /* taken back by an open, or queued twice */
            nd->reg = REG_DROPPING;
            todo[n++] = nd;
        }
        if (fs->reg_stuck && monotonic_ms() - fs->reg_tried_ms >= REG_RETRY_MS) {
            fs->reg_tried_ms = monotonic_ms();
            for (unsigned b = 0; b < NODE_BUCKETS; b++)
                for (struct node *nd = fs->buckets[b]; nd; nd = nd->next) {
                    if (nd->reg != REG_STUCK)
                        continue;
                    if (n == nq) {
                        size_t ncap = nq ? nq * 2 : 64;
                        struct node **grown = realloc(todo, ncap * sizeof(*grown));
                        if (!grown)
                            goto taken; /* the next round has the rest */
                        todo = grown, nq = ncap;
                    }
                    nd->reg = REG_DROPPING;
                    fs->reg_stuck--;
                    todo[n++] = nd;
                }
        }
    taken:
        pthread_mutex_unlock(&fs->lock);
        if (n > cap) {
            free(ids);
            free(rcs);
            ids = malloc(n * sizeof(*ids));
            rcs = malloc(n * sizeof(*rcs));
            cap = ids && rcs ? n : 0;
        }
        for (size_t i = 0; i < n && cap; i++)
            ids[i] = todo[i]->id;
        if (n && (!cap || ns_unregister_many(fs->ns, ids, n, rcs) == -ENOMEM))
            for (size_t i = 0; i < n && cap; i++)
                rcs[i] = -ENOMEM;
        for (size_t i = 0; i < n; i++)
            reg_dropped(fs, todo[i], cap ? rcs[i] : -ENOMEM);
        free(todo);
    }
    free(ids);
    free(rcs);
    return NULL;
}

/* Delete an orphan node_reap_due() chose; takes fs->lock. ns_reap() drops
 * this node's registration too: dropping says the caller moved n's to
 * REG_DROPPING for it. */
static void node_reap(struct fs *fs, struct node *n, const struct ino_id *id, int dropping)
{
    ns_reap(fs->ns, id);
    pthread_mutex_lock(&fs->lock);
    n->reaping = 0;
    if (dropping) {
        n->reg = REG_NONE;
        pthread_cond_broadcast(&fs->reg_cond);
    }
    node_maybe_free(fs, n);
    pthread_mutex_unlock(&fs->lock);
}

static void node_unref(struct fs *fs, struct node *n, uint64_t count)
{
    struct ino_id id = n->id;
    int reap;

    pthread_mutex_lock(&fs->lock);
    n->nlookup = n->nlookup > count ? n->nlookup - count : 0;
    reap = n->nlookup == 0 && node_reap_due(n);
    node_maybe_free(fs, n);
    pthread_mutex_unlock(&fs->lock);
    if (reap)
        node_reap(fs, n, &id, 0);
}

int fs_is_open(void *ctx, const struct ino_id *id)
{
    struct fs *fs = ctx;
    struct node *n;
    int open = 0;

    pthread_mutex_lock(&fs->lock);
    n = node_find(fs, id);
    if (n && n->opens) {
        n->orphan = 1;
        open = 1;
    }
    pthread_mutex_unlock(&fs->lock);
    return open;
}

/* For a rename's replaced target: like fs_is_open, and also keep the inode
 * while the kernel holds a lookup of it. An open(2) of the name that raced
 * the rename may have found the old inode and send its OPEN after the
 * rename; the inode must still be there, or the open fails with ESTALE
 * (the kernel walks the path again once, and a second rename over the name
 * in that time makes the error reach the caller) where a local filesystem
 * opens the old file or the new one. The kernel forgets the replaced inode
 * as soon as nothing of its own holds it: it drops the link of the inode
 * its rename replaced. With other nodes that inode may not be the one the
 * daemon replaced (another node renamed over the name between the kernel's
 * lookup of the target and the rename), and then the kernel keeps a lookup
 * of the daemon's one, with its dentry gone but a link count of 1, in its
 * inode cache until memory runs short: pinned so, it stayed in the store
 * (test_cluster_replace.py). There the replaced file is kept for a while
 * anyway (namespace.c, "replaced files across nodes"), which covers the
 * racing open, so only opens hold it. */
static int fs_is_referenced(void *ctx, const struct ino_id *id)
{
    struct fs *fs = ctx;
    struct node *n;
    int held = 0;

    pthread_mutex_lock(&fs->lock);
    n = node_find(fs, id);
    if (n && (n->opens || (n->nlookup && !fs->other_nodes)) && !n->reaping) {
        n->orphan = 1;
        n->pinned = n->nlookup != 0 && !fs->other_nodes;
        held = 1;
    }
    pthread_mutex_unlock(&fs->lock);
    return held;
}

/* ---- replies ---- */

static void attr_fill(struct stat *st, const struct inode *ino)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = record_id_ino(&ino->id);
    st->st_mode = ino->mode;
    st->st_nlink = ino->nlink;
    st->st_uid = ino->uid;
    st->st_gid = ino->gid;
    st->st_rdev = ino->rdev;
    st->st_size = (off_t)ino->size;
    st->st_blksize = RECORD_CHUNK;
    /* Bytes actually stored, in 512-byte units: holes cost nothing. */
    st->st_blocks = (blkcnt_t)((ino->alloc + 511) / 512);
    st->st_atim = ino->atime;
    st->st_mtim = ino->mtime;
    st->st_ctim = ino->ctime;
}

static double attr_timeout_of(const struct fs *fs, uint32_t mode)
{
    return S_ISDIR(mode) ? fs->dir_attr_timeout : fs->attr_timeout;
}

static void entry_fill(struct fs *fs, struct fuse_entry_param *e, struct node *n,
                       const struct inode *ino)
{
    memset(e, 0, sizeof(*e));
    e->ino = nodeid_of(fs, n);
    e->generation = 1;
    attr_fill(&e->attr, ino);
    e->attr_timeout = attr_timeout_of(fs, ino->mode);
    e->entry_timeout = fs->entry_timeout;
}

static void reply_entry(fuse_req_t req, const struct inode *ino)
{
    struct fs *fs = fs_of(req);
    struct fuse_entry_param e;
    struct node *n = node_ref(fs, &ino->id, 1);

    if (!n) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    entry_fill(fs, &e, n, ino);
    if (fuse_reply_entry(req, &e) != 0)
        node_unref(fs, n, 1);
}

static void reply_rc(fuse_req_t req, int rc)
{
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

/* 1 if the kernel may have reached n by a name it cached before another node
 * replaced or unlinked the file: other nodes exist, and no lookup of the
 * last OPEN_AFTER_LOOKUP_MS answered with n that no open has followed yet.
 * An open (for_open) uses that lookup up. A getattr is also answered while
 * this node has n open (fstat of a descriptor); an open is not, or a write
 * through an old name (O_TRUNC) would go to the old file and be lost. A
 * file with no name left then answers ESTALE (top of the file). */
static int node_reached_by_old_name(struct fs *fs, struct node *n, int for_open)
{
    int old;

    if (!fs->other_nodes || n == &fs->root)
        return 0;
    pthread_mutex_lock(&fs->lock);
    old = (for_open || n->opens == 0) &&
          !(n->walked && monotonic_ms() - n->named_ms <= OPEN_AFTER_LOOKUP_MS);
    if (for_open)
        n->walked = 0;
    pthread_mutex_unlock(&fs->lock);
    return old;
}

/* A file with no name left: kept only for those who have it open. */
static int unnamed_file(const struct inode *ino)
{
    return ino->nlink == 0 && !S_ISDIR(ino->mode);
}

/* The kernel named a node whose inode is gone: it looked the name up before a
 * rename or unlink freed it. ESTALE makes the VFS walk the path again
 * (LOOKUP_REVAL) and find what the name means now. */
static int stale_if_gone(int rc)
{
    return rc == -ENOENT ? -ESTALE : rc;
}

/* A zeroed handle of size bytes (a struct handle or dir_handle), linked
 * into fs->opened; NULL if out of memory. handle_free() takes it back. */
static void *handle_alloc(struct fs *fs, size_t size, int is_dir)
{
    struct opened *o = calloc(1, size);

    if (!o)
        return NULL;
    o->is_dir = is_dir;
    pthread_mutex_lock(&fs->lock);
    o->next = fs->opened;
    if (o->next)
        o->next->prev = o;
    fs->opened = o;
    pthread_mutex_unlock(&fs->lock);
    return o;
}

static void opened_destroy(struct opened *o)
{
    if (o->is_dir)
        free(((struct dir_handle *)o)->ents);
    else
        free(((struct handle *)o)->snap);
    free(o);
}

/* Unlink and free a handle of handle_alloc(); accepts NULL. */
static void handle_free(struct fs *fs, void *handle)
{
    struct opened *o = handle;

    if (!o)
        return;
    pthread_mutex_lock(&fs->lock);
    if (o->prev)
        o->prev->next = o->next;
    else
        fs->opened = o->next;
    if (o->next)
        o->next->prev = o->prev;
    pthread_mutex_unlock(&fs->lock);
    opened_destroy(o);
}

static struct handle *handle_new(struct fs *fs, int flags)
{
    struct handle *h = handle_alloc(fs, sizeof(*h), 0);
    /* Whole appends across nodes, where no shared mmap can break on it (see
     * the top of the file). */
    if (h)
        h->direct_io = (flags & O_APPEND) && fs->direct_append &&
                       ((flags & O_ACCMODE) == O_WRONLY || fs->direct_io_mmap);
    return h;
}

/* A read within OPEN_SNAP_FRESH_MS of the open of a file whose data is
 * inline in its inode (small files: reading one after another, as cat,
 * tar and cp do) is answered from the inode the open read: no second round
 * trip to the inode's shard. Close-to-open allows it: the data is as of
 * the open, and a change another node makes after it need not show in
 * this descriptor; a change through this mount does (wgen). */
#define OPEN_SNAP_FRESH_MS 1000u

/* wgen: n's, loaded before ino was read. A change through this mount
 * bumps it after its apply, so either ino has the change, or the bump
 * comes after the load and the snapshot no longer answers. */
static void open_snapshot(struct handle *h, uint64_t wgen, const struct inode *ino)
{
    if (!S_ISREG(ino->mode) || ino->size > RECORD_INLINE_MAX)
        return;
    h->snap = malloc(sizeof(*h->snap));
    if (!h->snap)
        return; /* reads go to the store */
    *h->snap = *ino;
    h->snap_ms = monotonic_ms();
    h->snap_wgen = wgen;
}

/* The bytes of [off, off+size) from h's snapshot into buf: the count, or
 * -1 when the snapshot may not answer (none, too old, a change through
 * this mount since). */
static ssize_t open_snapshot_read(struct fs *fs, struct handle *h, struct node *n, off_t off,
                                  size_t size, void *buf)
{
    if (!h || !h->snap || atomic_load(&n->wgen) != h->snap_wgen ||
        monotonic_ms() - h->snap_ms >= OPEN_SNAP_FRESH_MS)
        return -1;
    return ns_read_at(fs->ns, h->snap, (uint64_t)off, size, buf);
}

static void open_count(struct fs *fs, struct node *n, int delta)
{
    pthread_mutex_lock(&fs->lock);
    n->opens += delta;
    pthread_mutex_unlock(&fs->lock);
}

/* One open of n ends (a release, or an open that failed after counting
 * itself): the last one of an inode whose last name went meanwhile (an
 * orphan, marked by fs_is_open) deletes it. Files and directories alike. */
static void open_end(struct fs *fs, struct node *n)
{
    struct ino_id id = n->id;
    int reap, drop;

    pthread_mutex_lock(&fs->lock);
    n->opens--;
    reap = node_reap_due(n);
    /* The last close here: this node has it open no more. Queued for the
     * registry thread; an orphan's reap drops it at once (ns_reap). */
    drop = n->opens == 0 && n->reg == REG_HELD;
    if (drop && !reap && fs->reg_running && reg_queue(fs, n) == 0)
        drop = 0;
    else if (drop)
        n->reg = REG_DROPPING;
    node_maybe_free(fs, n);
    pthread_mutex_unlock(&fs->lock);
    if (reap)
        node_reap(fs, n, &id, drop);
    else if (drop)
        reg_dropped(fs, n, ns_unregister(fs->ns, &id));
}

/* 1 if an open of n (counted already) must register it: other nodes exist
 * and this node holds no registration of it. Takes back one queued for
 * dropping; waits out a drop in flight. */
static int reg_needed(struct fs *fs, struct node *n)
{
    int need;

    if (!fs->other_nodes || n == &fs->root)
        return 0;
    pthread_mutex_lock(&fs->lock);
    while (n->reg == REG_DROPPING)
        pthread_cond_wait(&fs->reg_cond, &fs->lock);
    if (n->reg == REG_QUEUED)
        n->reg = REG_HELD;
    need = n->reg != REG_HELD;
    pthread_mutex_unlock(&fs->lock);
    return need;
}

/* An open's registration is on the shard, or may be (an error after the
 * batch went out): the last release drops it. */
static void reg_held(struct fs *fs, struct node *n)
{
    pthread_mutex_lock(&fs->lock);
    fs->reg_stuck -= n->reg == REG_STUCK;
    n->reg = REG_HELD;
    pthread_mutex_unlock(&fs->lock);
}

/* Count an open of n, unless its last release is deleting it right now (an
 * open that reached an unlinked file through a name the kernel had not yet
 * let go of): then -ESTALE, and the kernel walks the path again. Counting
 * first and reading the inode after means a rename or unlink sees the open
 * (and keeps the inode), or the open sees the inode gone. */
static int open_begin(struct fs *fs, struct node *n)
{
    int rc = 0;

    pthread_mutex_lock(&fs->lock);
    if (n->reaping)
        rc = -ESTALE;
    else
        n->opens++;
    pthread_mutex_unlock(&fs->lock);
    return rc;
}

static void fill_open(struct fs *fs, struct fuse_file_info *fi, struct handle *h)
{
    fi->fh = (uint64_t)(uintptr_t)h;
    /* Every write to this node's shards is applied and logged before it is
     * answered, so close() needs no FLUSH round trip; one that may write to
     * another node's shard does: close() waits for the writes behind
     * (write_behind.h) and reports their failure. */
    fi->noflush = !fs->wb || (fi->flags & O_ACCMODE) == O_RDONLY;
    fi->keep_cache = fs->keep_cache;
    fi->direct_io = h->direct_io;
}

/* ---- callbacks ---- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    struct fs *fs = userdata;

    conn->max_write = MAX_WRITE;
    conn->max_readahead = MAX_WRITE;
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
        conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    /* Kernel-side writeback caching would let data sit in the page cache past
     * close(); we want close() to mean "in the store". */
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
#ifdef FUSE_CAP_DIRECT_IO_ALLOW_MMAP
    /* Lets a read-write O_APPEND open use direct I/O too (handle_new). */
    if (conn->capable & FUSE_CAP_DIRECT_IO_ALLOW_MMAP) {
        conn->want |= FUSE_CAP_DIRECT_IO_ALLOW_MMAP;
        fs->direct_io_mmap = 1;
    }
#else
    (void)fs;
#endif
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fs *fs = fs_of(req);
    struct inode ino;
    /* The kernel asks again for a rename's target (and an exclusive
     * create's name) whatever its negative entry says; a name found
     * missing within the negative timeout is missing still, as far as the
     * kernel's own cache would have it. */
    int rc = ns_lookup_recent(fs->ns, &node_of(fs, parent)->id, name, strlen(name),
                              (unsigned)(fs->negative_timeout * 1000), &ino);

    if (rc == -ENOENT) {
        /* A negative entry: the kernel remembers the name is free. */
        struct fuse_entry_param e;
        memset(&e, 0, sizeof(e));
        e.entry_timeout = fs->negative_timeout;
        fuse_reply_entry(req, &e);
        return;
    }
    if (rc == 0 && wb_holds(fs->wb, &ino.id)) {
        /* Being written here: the size the writes behind make, not the
         * store's of now (the kernel would cut its cached pages to it). */
        wb_wait(fs->wb, &ino.id);
        rc = ns_getattr(fs->ns, &ino.id, &ino);
    }
    if (rc) {
        reply_rc(req, rc);
        return;
    }
    reply_entry(req, &ino);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    struct fs *fs = fs_of(req);
    node_unref(fs, node_of(fs, ino), nlookup);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    struct fs *fs = fs_of(req);
    for (size_t i = 0; i < count; i++)
        node_unref(fs, node_of(fs, forgets[i].ino), forgets[i].nlookup);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct inode node;
    struct stat st;
    unsigned age_ms;
    /* The kernel asks again after its cache was dropped (a write, an open
     * elsewhere in this mount): what this process read or wrote within the
     * attribute timeout is as good as what the kernel would have kept, and
     * the kernel keeps it only for what is left of that timeout, so nothing
     * is older than the timeout. An open reads afresh (op_open), so
     * close-to-open holds. */
    struct node *n = node_of(fs, ino);
    int rc;

    wb_wait(fs->wb, &n->id); /* its size and times as written here */
    rc = ns_getattr_recent(fs->ns, &n->id, (unsigned)(fs->attr_timeout * 1000), &node, &age_ms);

    (void)fi;
    if (rc == 0 && unnamed_file(&node) && node_reached_by_old_name(fs, n, 0))
        rc = -ESTALE;
    if (rc) {
        reply_rc(req, stale_if_gone(rc));
        return;
    }
    attr_fill(&st, &node);
    double left = attr_timeout_of(fs, node.mode) - age_ms / 1000.0;
    fuse_reply_attr(req, &st, left > 0 ? left : 0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct ns_setattr sa = {0};
    struct inode node;
    struct stat st;
    int rc;

    (void)fi;
    if (to_set & FUSE_SET_ATTR_MODE)
        sa.mask |= NS_SET_MODE, sa.mode = attr->st_mode;
    if (to_set & FUSE_SET_ATTR_UID)
        sa.mask |= NS_SET_UID, sa.uid = attr->st_uid;
    if (to_set & FUSE_SET_ATTR_GID)
        sa.mask |= NS_SET_GID, sa.gid = attr->st_gid;
    if (to_set & FUSE_SET_ATTR_SIZE)
        sa.mask |= NS_SET_SIZE, sa.size = (uint64_t)attr->st_size;
    if (to_set & FUSE_SET_ATTR_ATIME_NOW)
        sa.mask |= NS_SET_ATIME_NOW;
    else if (to_set & FUSE_SET_ATTR_ATIME)
        sa.mask |= NS_SET_ATIME, sa.atime = attr->st_atim;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW)
        sa.mask |= NS_SET_MTIME_NOW;
    else if (to_set & FUSE_SET_ATTR_MTIME)
        sa.mask |= NS_SET_MTIME, sa.mtime = attr->st_mtim;
    if (to_set & FUSE_SET_ATTR_CTIME)
        sa.mask |= NS_SET_CTIME, sa.ctime = attr->st_ctim;
    if (to_set & (FUSE_SET_ATTR_KILL_SUID | FUSE_SET_ATTR_KILL_SGID | FUSE_SET_ATTR_KILL_PRIV))
        sa.mask |= NS_SET_KILL_SUIDGID;
    wb_wait(fs->wb, &node_of(fs, ino)->id); /* a truncate after the writes before it */
    rc = ns_setattr(fs->ns, &node_of(fs, ino)->id, &sa, &node);
    if (sa.mask & NS_SET_SIZE)
        atomic_fetch_add(&node_of(fs, ino)->wgen, 1); /* after the apply: open_snapshot */
    if (rc) {
        reply_rc(req, rc);
        return;
    }
    attr_fill(&st, &node);
    fuse_reply_attr(req, &st, attr_timeout_of(fs, node.mode));
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct fs *fs = fs_of(req);
    struct inode node;
    int rc = ns_getattr(fs->ns, &node_of(fs, ino)->id, &node);

    if (rc == 0 && !S_ISLNK(node.mode))
        rc = -EINVAL;
    if (rc) {
        reply_rc(req, stale_if_gone(rc));
        return;
    }
    node.tail[node.tail_len < RECORD_TAIL_MAX ? node.tail_len : RECORD_TAIL_MAX - 1] = 0;
    fuse_reply_readlink(req, (const char *)node.tail);
}

static void make_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev,
                      const char *target)
{
    struct fs *fs = fs_of(req);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct inode ino;
    int rc = ns_mknode(fs->ns, &node_of(fs, parent)->id, name, strlen(name), mode, (uint32_t)rdev,
                       ctx->uid, ctx->gid, target, &ino);

    if (rc) {
        reply_rc(req, rc);
        return;
    }
    reply_entry(req, &ino);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    make_node(req, parent, name, mode, rdev, NULL);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    make_node(req, parent, name, S_IFDIR | (mode & 07777), 0, NULL);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    make_node(req, parent, name, S_IFLNK | 0777, 0, link);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fs *fs = fs_of(req);
    reply_rc(req, ns_unlink(fs->ns, &node_of(fs, parent)->id, name, strlen(name), fs_is_open, fs));
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fs *fs = fs_of(req);
    reply_rc(req, ns_rmdir(fs->ns, &node_of(fs, parent)->id, name, strlen(name), fs_is_open, fs));
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    struct fs *fs = fs_of(req);
    unsigned f = 0;

    if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (flags & RENAME_NOREPLACE)
        f |= NS_RENAME_NOREPLACE;
    if (flags & RENAME_EXCHANGE)
        f |= NS_RENAME_EXCHANGE;
    reply_rc(req,
             ns_rename(fs->ns, &node_of(fs, parent)->id, name, strlen(name),
                       &node_of(fs, newparent)->id, newname, strlen(newname), f,
                       fs_is_referenced, fs));
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
    struct fs *fs = fs_of(req);
    struct inode node;
    int rc;

    wb_wait(fs->wb, &node_of(fs, ino)->id); /* its entry's attributes */
    rc = ns_link(fs->ns, &node_of(fs, ino)->id, &node_of(fs, newparent)->id, newname,
                 strlen(newname), &node);

    if (rc) {
        reply_rc(req, rc);
        return;
    }
    reply_entry(req, &node);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct node *n = node_of(fs, ino);
    struct handle *h;
    struct inode node;
    int rc;

    rc = open_begin(fs, n);
    if (rc) {
        reply_rc(req, rc);
        return;
    }
    /* A file replaced on another node stays for its readers there; an open
     * through a name the kernel cached before that must not find it, nor
     * truncate it (node_reached_by_old_name). */
    int strict = node_reached_by_old_name(fs, n, 1);
    wb_wait(fs->wb, &n->id); /* an O_TRUNC after them; the size after them */
    uint64_t wgen = atomic_load(&n->wgen);
    /* With other nodes the open is registered on the inode's shard first,
     * in the batch that reads (asserts) or truncates the inode: registered
     * before the inode is seen to exist, so an unlink elsewhere either
     * finds the registration or deleted the inode before (ESTALE). */
    int reg = reg_needed(fs, n);
    if ((fi->flags & O_TRUNC) || reg) {
        struct ns_setattr sa = {.mask = 0};
        if (fi->flags & O_TRUNC)
            sa.mask |= NS_SET_SIZE | NS_SET_KILL_SUIDGID;
        if (strict)
            sa.mask |= NS_SET_LINKED;
        if (reg)
            sa.mask |= NS_SET_REGISTER;
        rc = ns_setattr(fs->ns, &n->id, &sa, &node);
        if ((fi->flags & O_TRUNC) && atomic_fetch_add(&n->wgen, 1) != wgen++)
            wgen = UINT64_MAX; /* another change came too: no snapshot */
        if (reg && rc != -ENOENT)
            reg_held(fs, n);
    } else {
        rc = ns_getattr_ordered(fs->ns, &n->id, &node);
        if (rc == 0 && strict && unnamed_file(&node))
            rc = -ESTALE;
    }
    h = rc ? NULL : handle_new(fs, fi->flags);
    if (!rc && !h)
        rc = -ENOMEM;
    if (h && wgen != UINT64_MAX && (fi->flags & O_ACCMODE) != O_WRONLY)
        open_snapshot(h, wgen, &node);
    if (rc) {
        open_end(fs, n);
        reply_rc(req, stale_if_gone(rc));
        return;
    }
    fill_open(fs, fi, h);
    if (!fs->keep_cache && fs->se) {
        /* Close-to-open: the kernel may hold this file's attributes for
         * cache_timeout; make it ask again, so a read sees the size that
         * another node's close left (DESIGN, "Caching with several nodes"). */
        fuse_lowlevel_notify_inval_inode(fs->se, ino, -1, 0);
    }
    if (fuse_reply_open(req, fi) != 0) {
        handle_free(fs, h);
        open_end(fs, n);
    }
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct fuse_entry_param e;
    struct inode ino;
    struct node *n;
    struct handle *h = handle_new(fs, fi->flags);
    int rc = h ? 0 : -ENOMEM;

    /* With other nodes the new file's open registration goes in the
     * create's batch (namespace.h): it costs nothing. */
    if (rc == 0 && fs->other_nodes)
        rc = ns_create_open(fs->ns, &node_of(fs, parent)->id, name, strlen(name),
                            S_IFREG | (mode & 07777), ctx->uid, ctx->gid, &ino);
    else if (rc == 0)
        rc = ns_mknode(fs->ns, &node_of(fs, parent)->id, name, strlen(name),
                       S_IFREG | (mode & 07777), 0, ctx->uid, ctx->gid, NULL, &ino);
    if (rc) {
        handle_free(fs, h);
        reply_rc(req, rc);
        return;
    }
    n = node_ref(fs, &ino.id, 0);
    if (!n) {
        handle_free(fs, h);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    open_count(fs, n, +1);
    if (fs->other_nodes)
        reg_held(fs, n);
    entry_fill(fs, &e, n, &ino);
    fill_open(fs, fi, h);
    if (fuse_reply_create(req, &e, fi) != 0) {
        handle_free(fs, h);
        open_end(fs, n);
        node_unref(fs, n, 1);
    }
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct node *nd = node_of(fs, ino);
    char *buf;
    ssize_t n;

    /* Any read may fill the page cache, even one of an O_DIRECT descriptor
     * (a page fault of its mmap). Set before the store is read (op_write). */
    atomic_store(&nd->paged, 1);
    if (size > MAX_WRITE * 2)
        size = MAX_WRITE * 2;
    buf = malloc(size ? size : 1);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    wb_wait(fs->wb, &nd->id); /* the bytes written here */
    n = open_snapshot_read(fs, (struct handle *)(uintptr_t)fi->fh, nd, off, size, buf);
    if (n < 0)
        n = ns_read(fs->ns, &nd->id, (uint64_t)off, size, buf);
    if (n < 0)
        reply_rc(req, stale_if_gone((int)n));
    else
        fuse_reply_buf(req, buf, (size_t)n);
    free(buf);
}

/* The invalidation thread: drop each direct write's range from the kernel's
 * cache, then answer the write (see the top of the file). */
static void *inval_main(void *arg)
{
    struct fs *fs = arg;

    pthread_mutex_lock(&fs->inval_lock);
    for (;;) {
        while (!fs->inval_head && !fs->inval_stop)
            pthread_cond_wait(&fs->inval_cond, &fs->inval_lock);
        struct inval *iv = fs->inval_head;
        if (!iv)
            break; /* stopping, and nothing is left to answer */
        fs->inval_head = iv->next;
        if (!fs->inval_head)
            fs->inval_tail = &fs->inval_head;
        pthread_mutex_unlock(&fs->inval_lock);
        /* Fails only when the kernel no longer has the inode (nothing cached)
         * or the connection is gone (nobody to read stale bytes). */
        fuse_lowlevel_notify_inval_inode(fs->se, iv->ino, iv->off, (off_t)iv->size);
        fuse_reply_write(iv->req, iv->size);
        free(iv);
        pthread_mutex_lock(&fs->inval_lock);
    }
    pthread_mutex_unlock(&fs->inval_lock);
    return NULL;
}

/* Hand a direct write's answer to the invalidation thread; -ENOMEM if it
 * cannot, and then the caller invalidates and answers itself. */
static int inval_queue(struct fs *fs, fuse_req_t req, fuse_ino_t ino, off_t off, size_t size)
{
    struct inval *iv = malloc(sizeof(*iv));

    if (!iv)
        return -ENOMEM;
    *iv = (struct inval){.req = req, .ino = ino, .off = off, .size = size};
    pthread_mutex_lock(&fs->inval_lock);
    *fs->inval_tail = iv;
    fs->inval_tail = &iv->next;
    pthread_cond_signal(&fs->inval_cond);
    pthread_mutex_unlock(&fs->inval_lock);
    return 0;
}

/* A write that may go behind (write_behind.h): a buffered write(2) of at
 * least WB_MIN_WRITE bytes, or one that follows such writes, to another
 * node's shard. Appends (placed at the end by the store), direct and
 * synchronous writes and a mapping's pages (writepage) are applied before
 * they are answered, as before. */
#define WB_MIN_WRITE (32u << 10)
static int write_behind_ok(struct fs *fs, const struct fuse_file_info *fi, int placed,
                           struct node *nd, size_t size)
{
    if (!fs->wb || placed || fi->writepage || (fi->flags & (O_DSYNC | O_SYNC)) ||
        size > WB_BATCH_MAX || !ns_inode_is_remote(fs->ns, &nd->id))
        return 0;
    return size >= WB_MIN_WRITE || wb_holds(fs->wb, &nd->id);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct node *nd = node_of(fs, ino);
    struct handle *h = (struct handle *)(uintptr_t)fi->fh;
    /* The kernel sends the descriptor's flags as they are now with each
     * write (F_SETFL may have changed O_APPEND since the open). A write of
     * cached pages (writepage: a shared mmap's dirty pages) goes at its own
     * offset and is the cache's own: O_APPEND is for write(2). */
    int append = (fi->flags & O_APPEND) && !fi->writepage;
    int direct =
        ((fi->flags & O_DIRECT) || (h && h->direct_io)) && !fi->writepage && fs->inval_running;
    uint64_t new_size = 0;
    ssize_t n;

    if (!direct)
        atomic_store(&nd->paged, 1); /* the kernel keeps what it wrote */
    if (write_behind_ok(fs, fi, append || direct, nd, size)) {
        int rc = wb_write(fs->wb, &nd->id, (uint64_t)off, buf, size, 0);
        atomic_fetch_add(&nd->wgen, 1); /* open_snapshot: its data changed */
        if (rc)
            reply_rc(req, rc);
        else
            fuse_reply_write(req, size);
        return;
    }
    /* After the writes behind, and failing as they did (write_behind.h). */
    int wrc = wb_drain(fs->wb, &nd->id);
    if (wrc) {
        reply_rc(req, wrc);
        return;
    }
    wb_wait(fs->wb, &nd->id); /* this write changes the inode they expect */
    n = ns_write(fs->ns, &nd->id, (uint64_t)off, buf, size, append, 0, direct ? &new_size : NULL);
    atomic_fetch_add(&nd->wgen, 1); /* after the apply: open_snapshot */
    if (n < 0) {
        reply_rc(req, (int)n);
        return;
    }
    /* A read that fetched the old bytes set paged before it read the store,
     * and the shard ordered that read before this write, so it shows here. */
    if (direct && n > 0 && atomic_load(&nd->paged)) {
        /* O_APPEND wrote at the end, wherever the kernel said. */
        off_t at = append ? (off_t)(new_size - (uint64_t)n) : off;
        if (inval_queue(fs, req, ino, at, (size_t)n) == 0)
            return;
        fuse_lowlevel_notify_inval_inode(fs->se, ino, at, n);
    }
    fuse_reply_write(req, (size_t)n);
}

/* close(): the writes behind have landed, or it fails with their error. */
static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);

    (void)fi;
    reply_rc(req, wb_drain(fs->wb, &node_of(fs, ino)->id));
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);

    /* Landed before the last close's reap or unregistration; a failure
     * was the FLUSH's to report. */
    wb_wait(fs->wb, &node_of(fs, ino)->id);
    handle_free(fs, (struct handle *)(uintptr_t)fi->fh);
    open_end(fs, node_of(fs, ino));
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    int rc = wb_drain(fs->wb, &node_of(fs, ino)->id);

    (void)datasync, (void)fi;
    reply_rc(req, rc ? rc : ns_sync(fs->ns, &node_of(fs, ino)->id));
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    (void)ino, (void)datasync, (void)fi;
    wb_drain_all(fs->wb); /* syncfs: every write taken so far */
    reply_rc(req, ns_sync(fs->ns, NULL));
}

/* An open directory counts as an open of its node, as a file does (op_open):
 * rmdir or a rename over it then keeps the inode, with nlink 0 and an orphan
 * mark, until the last releasedir, so fstat, fchdir and readdir of the
 * descriptor work as on a local filesystem (the directory is empty and takes
 * no new entries). */
static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct node *n = node_of(fs, ino);
    struct dir_handle *d = NULL;
    struct inode node;
    int rc = open_begin(fs, n);

    if (rc) {
        reply_rc(req, rc);
        return;
    }
    rc = ns_getattr_ordered(fs->ns, &n->id, &node);
    if (rc == 0 && !S_ISDIR(node.mode))
        rc = -ENOTDIR;
    if (rc == 0 && !(d = handle_alloc(fs, sizeof(*d), 1)))
        rc = -ENOMEM;
    if (rc) {
        open_end(fs, n);
        reply_rc(req, stale_if_gone(rc));
        return;
    }
    fi->fh = (uint64_t)(uintptr_t)d;
    fi->keep_cache = 1;
    fi->cache_readdir = 0;
    if (fuse_reply_open(req, fi) != 0) {
        handle_free(fs, d);
        open_end(fs, n);
    }
}

/* The next entry slot of d, or NULL (out of memory). */
static struct dir_entry *dir_slot(struct dir_handle *d)
{
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 64;
        struct dir_entry *e = realloc(d->ents, cap * sizeof(*e));
        if (!e)
            return NULL;
        d->ents = e;
        d->cap = cap;
    }
    return &d->ents[d->n++];
}

static int dir_collect_plus(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                            uint8_t dtype, const struct inode *ino)
{
    struct dir_handle *d = ctx;
    struct dir_entry *e;

    if (!name) { /* the listing starts again */
        d->n = 0;
        return 0;
    }
    if (nlen > RECORD_NAME_MAX)
        return 0;
    if (!(e = dir_slot(d)))
        return -ENOMEM;
    e->id = *id;
    e->dtype = dtype;
    e->nlen = (uint8_t)nlen;
    memcpy(e->name, name, nlen);
    e->name[nlen] = 0;
    e->has_attr = ino != NULL;
    if (ino)
        attr_fill(&e->attr, ino);
    return 0;
}

static int dir_collect(void *ctx, const char *name, size_t nlen, const struct ino_id *id,
                       uint8_t dtype)
{
    return dir_collect_plus(ctx, name, nlen, id, dtype, NULL);
}

struct dir_attrs {
    struct dir_handle *d;
    size_t *at; /* the entry of each id asked for */
};

static void dir_attr_one(void *ctx, unsigned i, const struct inode *ino)
{
    struct dir_attrs *a = ctx;
    struct dir_entry *e = &a->d->ents[a->at[i]];

    attr_fill(&e->attr, ino);
    e->has_attr = 1;
}

/* The attributes of the entries whose inode did not come with the listing
 * (files renamed since they were made: every file rsync copies), read in
 * one round trip per shard for every 128 (ns_getattr_many). What fails here
 * is read again entry by entry (dir_entry_param). */
static void dir_attrs_fetch(struct fs *fs, struct dir_handle *d)
{
    struct ino_id *ids = NULL;
    struct dir_attrs a = {.d = d};
    size_t m = 0;

    for (size_t i = 0; i < d->n; i++)
        m += !d->ents[i].has_attr;
    if (m == 0 || m > UINT_MAX || !(ids = malloc(m * sizeof(*ids))) ||
        !(a.at = malloc(m * sizeof(*a.at))))
        goto out;
    m = 0;
    for (size_t i = 0; i < d->n; i++) {
        if (d->ents[i].has_attr)
            continue;
        ids[m] = d->ents[i].id;
        a.at[m++] = i;
    }
    (void)ns_getattr_many(fs->ns, ids, (unsigned)m, dir_attr_one, &a);
out:
    free(ids);
    free(a.at);
}

/* Snapshot dir's entries into d; with plus, each entry's attributes too
 * where they come along with the listing (ns_readdir_plus). */
static int dir_load(struct fs *fs, struct dir_handle *d, const struct ino_id *dir, int plus)
{
    struct inode self;
    int rc = ns_getattr(fs->ns, dir, &self);

    d->n = 0;
    d->loaded_ms = monotonic_ms();
    if (rc == 0) {
        d->parent_ino = record_id_ino(record_id_is_root(dir) ? dir : &self.parent);
        rc = plus ? ns_readdir_plus(fs->ns, dir, dir_collect_plus, d)
                  : ns_readdir(fs->ns, dir, dir_collect, d);
    }
    if (rc == 0 && plus)
        dir_attrs_fetch(fs, d);
    d->loaded = rc == 0;
    return rc;
}

/* The readdirplus entry of de: its attributes from the listing while they
 * are fresh, else read now. 0, 1 (gone since the snapshot: skip it) or
 * -errno (a node that cannot be reached: the listing stops there with the
 * error rather than leave the entry out). */
static int dir_entry_param(struct fs *fs, struct dir_handle *d, const struct dir_entry *de,
                           struct fuse_entry_param *e)
{
    struct inode child;
    struct node *n;
    int rc;

    if (de->has_attr && monotonic_ms() - d->loaded_ms <= DIR_ATTR_FRESH_MS &&
        !wb_holds(fs->wb, &de->id)) {
        if (!(n = node_ref(fs, &de->id, 0)))
            return -ENOMEM;
        memset(e, 0, sizeof(*e));
        e->ino = nodeid_of(fs, n);
        e->generation = 1;
        e->attr = de->attr;
        e->attr_timeout = attr_timeout_of(fs, de->attr.st_mode);
        e->entry_timeout = fs->entry_timeout;
        return 0;
    }
    wb_wait(fs->wb, &de->id);
    rc = ns_getattr(fs->ns, &de->id, &child);
    if (rc == -ENOENT || rc == -ESTALE)
        return 1;
    if (rc)
        return rc;
    if (!(n = node_ref(fs, &child.id, 0)))
        return -ENOMEM;
    entry_fill(fs, e, n, &child);
    return 0;
}

/* Add "." and ".." (offsets 1 and 2), then the snapshot (offset 3 on). */
static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi, int plus)
{
    struct fs *fs = fs_of(req);
    struct dir_handle *d = (struct dir_handle *)(uintptr_t)fi->fh;
    struct node *dn = node_of(fs, ino);
    char *buf = malloc(size), *p = buf;
    size_t left = size;
    int rc = 0;

    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (off == 0 || !d->loaded) {
        rc = dir_load(fs, d, &dn->id, plus);
        if (rc)
            goto out;
    }
    for (size_t i = (size_t)off; i < d->n + 2; i++) {
        struct stat st = {0};
        const char *name;
        size_t need;
        if (i < 2) {
            name = i == 0 ? "." : "..";
            st.st_ino = i == 0 ? record_id_ino(&dn->id) : d->parent_ino;
            st.st_mode = S_IFDIR;
        } else {
            struct dir_entry *e = &d->ents[i - 2];
            name = e->name;
            st.st_ino = record_id_ino(&e->id);
            st.st_mode = (mode_t)DTTOIF(e->dtype);
        }
        if (!plus || i < 2) {
            if (plus) {
                struct fuse_entry_param e = {.attr = st};
                need = fuse_add_direntry_plus(req, p, left, name, &e, (off_t)i + 1);
            } else {
                need = fuse_add_direntry(req, p, left, name, &st, (off_t)i + 1);
            }
            if (need > left)
                break;
            p += need, left -= need;
            continue;
        }
        /* readdirplus: the kernel takes a lookup reference for each entry. */
        need = fuse_add_direntry_plus(req, NULL, 0, name, NULL, 0);
        if (need > left)
            break;
        struct fuse_entry_param e;
        rc = dir_entry_param(fs, d, &d->ents[i - 2], &e);
        if (rc == 1) {
            rc = 0;
            continue; /* gone since the snapshot */
        }
        if (rc)
            break;
        fuse_add_direntry_plus(req, p, left, name, &e, (off_t)i + 1);
        p += need, left -= need;
    }
out:
    if (rc && p == buf)
        reply_rc(req, rc);
    else
        fuse_reply_buf(req, buf, (size_t)(p - buf));
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, fi, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, fi, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);

    handle_free(fs, (struct dir_handle *)(uintptr_t)fi->fh);
    open_end(fs, node_of(fs, ino));
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct fs *fs = fs_of(req);
    struct statvfs st;
    int rc = ns_statfs(fs->ns, &st);

    (void)ino;
    if (rc)
        reply_rc(req, rc);
    else
        fuse_reply_statfs(req, &st);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                        size_t size, int flags)
{
    struct fs *fs = fs_of(req);
    wb_wait(fs->wb, &node_of(fs, ino)->id); /* a change of the inode */
    reply_rc(req, ns_setxattr(fs->ns, &node_of(fs, ino)->id, name, value, size, flags));
}

/* getxattr and listxattr share their reply: size 0 asks for the length. */
static void reply_xattr(fuse_req_t req, ssize_t n, const char *buf, size_t size)
{
    if (n < 0)
        reply_rc(req, (int)n);
    else if (size == 0)
        fuse_reply_xattr(req, (size_t)n);
    else
        fuse_reply_buf(req, buf, (size_t)n);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    struct fs *fs = fs_of(req);
    char *buf = size ? malloc(size) : NULL;

    if (size && !buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    reply_xattr(req,
                ns_getxattr_recent(fs->ns, &node_of(fs, ino)->id, name, buf, size,
                                   (unsigned)(fs->attr_timeout * 1000)),
                buf, size);
    free(buf);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    struct fs *fs = fs_of(req);
    char *buf = size ? malloc(size) : NULL;

    if (size && !buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    reply_xattr(req, ns_listxattr(fs->ns, &node_of(fs, ino)->id, buf, size), buf, size);
    free(buf);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    struct fs *fs = fs_of(req);
    wb_wait(fs->wb, &node_of(fs, ino)->id); /* a change of the inode */
    reply_rc(req, ns_removexattr(fs->ns, &node_of(fs, ino)->id, name));
}

struct fs *fs_new(struct ns *ns, double cache_timeout, int shared)
{
    struct fs *fs = calloc(1, sizeof(*fs));

    if (!fs)
        return NULL;
    fs->ns = ns;
    fs->other_nodes = !ns_all_local(ns);
    fs->entry_timeout = cache_timeout;
    if (shared) {
        /* Other nodes write too: close-to-open, as NFS does it. Every open
         * drops the file's cached pages and its cached attributes (an
         * invalidation in op_open), so what another node closed is what
         * is read. Otherwise names, missing names and attributes are kept
         * for cache_timeout: a stale name leads to a vanished inode, which
         * answers ESTALE and makes the kernel look the name up again; a
         * name another node creates shows here at most cache_timeout after
         * this node last found it missing (NFS keeps a missing name until
         * the directory's attributes time out, 30 s and more). Asking for
         * attributes on every stat, and for every directory of every path
         * walked (with default_permissions), was most of the round trips
         * of an rsync (measured: 50 gets a file, then 14 with directories
         * cached); a missing name is looked up three times a file by rsync
         * (generator's lstat, receiver's open, rename's target). */
        fs->attr_timeout = cache_timeout;
        fs->dir_attr_timeout = cache_timeout;
        fs->negative_timeout = cache_timeout;
        fs->keep_cache = 0;
        fs->direct_append = 1;
    } else {
        fs->attr_timeout = cache_timeout;
        fs->dir_attr_timeout = cache_timeout;
        fs->negative_timeout = cache_timeout;
        fs->keep_cache = 1;
    }
    pthread_mutex_init(&fs->lock, NULL);
    pthread_cond_init(&fs->reg_cond, NULL);
    pthread_cond_init(&fs->reg_wake, NULL);
    pthread_mutex_init(&fs->inval_lock, NULL);
    pthread_cond_init(&fs->inval_cond, NULL);
    fs->inval_tail = &fs->inval_head;
    fs->root.id = record_root_id;
    fs->root.nlookup = 1;
    if (fs->other_nodes && !(fs->wb = wb_new(ns))) {
        fs_free(fs);
        return NULL;
    }
    return fs;
}

/* Start fn(fs) as a thread named name, signals blocked in it: they go to
 * the main thread (fuse_set_signal_handlers), as with libfuse's own
 * workers. 0 (and *running set) or -errno. */
static int thread_start(pthread_t *th, void *(*fn)(void *), struct fs *fs, const char *name,
                        int *running)
{
    sigset_t all, old;
    int rc;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(th, NULL, fn, fs);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        return -rc;
    pthread_setname_np(*th, name);
    *running = 1;
    return 0;
}

int fs_start(struct fs *fs, struct fuse_session *se)
{
    int rc;

    fs->se = se;
    rc = thread_start(&fs->inval_thread, inval_main, fs, "shardfs-inval", &fs->inval_running);
    if (rc == 0 && fs->other_nodes)
        rc = thread_start(&fs->reg_thread, reg_main, fs, "shardfs-openreg", &fs->reg_running);
    if (rc == 0 && fs->wb)
        rc = wb_start(fs->wb);
    return rc;
}

/* Tell a thread of fs to stop (*stop, under lock, cond signalled) and
 * join it, if *running. */
static void thread_stop(pthread_mutex_t *lock, pthread_cond_t *cond, int *stop, pthread_t th,
                        int *running)
{
    if (!*running)
        return;
    pthread_mutex_lock(lock);
    *stop = 1;
    pthread_cond_signal(cond);
    pthread_mutex_unlock(lock);
    pthread_join(th, NULL);
    *running = 0;
}

/* Stop the registry thread, which drops what is queued first. */
static void reg_thread_stop(struct fs *fs)
{
    thread_stop(&fs->lock, &fs->reg_wake, &fs->reg_stop, fs->reg_thread, &fs->reg_running);
}

/* The kernel ends the connection at unmount, and the RELEASE and
 * RELEASEDIR requests it had queued (they are sent after close() returns)
 * end with it, unseen: an unlinked file closed just before the unmount
 * would stay in the store, with its orphan mark, until the next mount's
 * recovery. Nothing can have it open any more, so it goes now. */
static void reap_orphans(struct fs *fs)
{
    struct ino_id *ids = NULL;
    size_t n = 0, cap = 0;

    /* Collected under the lock (the key API may still ask fs_is_open),
     * deleted outside it (ns_reap takes the inode's lock, which is held
     * around fs_is_open); ns_reap drops this node's registration of each
     * too. Other registrations stay (reg_main). */
    pthread_mutex_lock(&fs->lock);
    for (unsigned b = 0; b < NODE_BUCKETS; b++) {
        for (struct node *nd = fs->buckets[b]; nd; nd = nd->next) {
            if (!nd->orphan)
                continue;
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 64;
                struct ino_id *grown = realloc(ids, ncap * sizeof(*ids));
                if (!grown)
                    goto collected; /* the next mount's recovery has the rest */
                ids = grown, cap = ncap;
            }
            nd->orphan = 0;
            ids[n++] = nd->id;
        }
    }
collected:
    pthread_mutex_unlock(&fs->lock);
    for (size_t i = 0; i < n; i++)
        ns_reap(fs->ns, &ids[i]);
    free(ids);
}

static void inval_thread_stop(struct fs *fs)
{
    thread_stop(&fs->inval_lock, &fs->inval_cond, &fs->inval_stop, fs->inval_thread,
                &fs->inval_running);
}

void fs_stop(struct fs *fs)
{
    if (!fs)
        return;
    wb_stop(fs->wb); /* what write() answered lands before anything stops */
    inval_thread_stop(fs);
    reg_thread_stop(fs);
    reap_orphans(fs);
}

void fs_free(struct fs *fs)
{
    if (!fs)
        return;
    wb_free(fs->wb);
    inval_thread_stop(fs); /* if fs_stop() was not called: nothing is queued */
    reg_thread_stop(fs);
    free(fs->reg_queue);
    while (fs->opened) {
        struct opened *o = fs->opened; /* its release never came */
        fs->opened = o->next;
        opened_destroy(o);
    }
    for (unsigned b = 0; b < NODE_BUCKETS; b++) {
        struct node *n = fs->buckets[b];
        while (n) {
            struct node *next = n->next;
            free(n);
            n = next;
        }
    }
    pthread_mutex_destroy(&fs->lock);
    pthread_cond_destroy(&fs->reg_cond);
    pthread_cond_destroy(&fs->reg_wake);
    pthread_mutex_destroy(&fs->inval_lock);
    pthread_cond_destroy(&fs->inval_cond);
    free(fs);
}

const struct fuse_lowlevel_ops fs_fuse_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readlink = op_readlink,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .symlink = op_symlink,
    .unlink = op_unlink,
    .rmdir = op_rmdir,
    .rename = op_rename,
    .link = op_link,
    .open = op_open,
    .create = op_create,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .fsyncdir = op_fsyncdir,
    .statfs = op_statfs,
    .setxattr = op_setxattr,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .removexattr = op_removexattr,
};
