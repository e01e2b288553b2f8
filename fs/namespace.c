/* namespace.c -- filesystem semantics over shards (see namespace.h).
 *
 * DESIGN (multi-shard operations)
 * A batch is atomic on one shard only. Operations that touch two shards are
 * sequences of single-shard batches, ordered so that a crash between any two
 * steps leaves the old state, the new state, or a leftover that recovery
 * (ns_recover, run at every mount and by fsck --repair) resolves without
 * losing data:
 *
 *  create:  1. entry shard: assert the name is free, put entry + inode.
 *           2. parent's shard: parent mtime (and nlink for a directory).
 *           A crash after 1 leaves a stale parent mtime/nlink (fsck fixes).
 *  unlink:  1. entry shard: delete the entry.  2. inode shard: nlink - 1, and
 *           delete the inode when it reaches 0 (or mark it orphan while open).
 *           A crash after 1 leaves nlink too high: an inode without a name,
 *           which fsck --repair links into /lost+found (nothing is lost).
 *           Same shard: one batch.
 *  link:    1. inode shard: nlink + 1.  2. entry shard: put the new entry.
 *           A crash after 1 leaves nlink too high (fsck recounts).
 *  rename across shards (and RENAME_EXCHANGE):
 *           1. source shard: intent record {src, dst, inodes}, asserting src.
 *           2. target shard: put dst -> moved inode (atomically replacing the
 *              old target, so a reader sees the old or the new file).
 *           3. source shard: delete src (exchange: point src at the old
 *              target) and the intent.
 *           Recovery rolls an intent forward if step 2 happened (dst names the
 *           moved inode) and back otherwise. The replaced target is then
 *           unlinked as above.
 *  rmdir:   mark the directory DYING, check every shard for entries, delete.
 *           create re-checks its parent after putting the entry and backs out
 *           if the parent is dying or gone, so no entry can slip into a
 *           directory that rmdir found empty.
 *
 * DESIGN (replaced files across nodes)
 * A node knows only its own opens. With other nodes, a file whose last name
 * a rename replaced is therefore not deleted at once: it keeps its records,
 * with nlink 0 and a *kept* orphan mark (ORPHAN_KEPT), so that a reader on
 * another node that opened it just before reads it whole. Its ctime is the
 * moment it lost the name (drop_link moves ctime), and REPLACED_KEEP_MS
 * after that the node that owns its shard deletes it (the reaper thread,
 * ns_reaper_start; every record of an inode is on that shard). A file this
 * node has open is marked as any unlinked open file is (an empty mark) and
 * deleted at its last close, or at that moment marked kept if the keep time
 * is not over yet (ns_reap). The owner deletes every kept file at its clean
 * stop (ns_reaper_stop), so a stopped store has none; a crash leaves them to
 * recovery, as other orphans. Readers of a file on a node that holds neither
 * its shard nor an open of the renaming node get ESTALE once it is gone.
 *
 * Inode read-modify-writes are serialised by striped mutexes keyed by inode
 * id within this process (no thread ever holds two of them), and across nodes
 * by a compare-and-swap on the inode record (DESIGN at inode_cas()).
 */
#include "namespace.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "durable.h"
#include "endian.h"
#include "placement.h"
#include "runmark.h"
#include "shard_lmdb.h"
#include "shard_remote.h"
#include "store_layout.h"

#define LOCK_STRIPES 256
#define GUESS_WAYS 8 /* inode guesses a lock stripe (guess_slot) */
#define XATTR_VALUE_MAX 65536
_Static_assert(XATTR_VALUE_MAX <= SHARD_READ_VALUE_MAX, "an xattr is read in one shard_read");
#define FILE_SIZE_MAX (1ull << 50) /* 1 PiB: chunk indexes stay far from overflow */
/* How long a file replaced on a cluster stays readable (DESIGN above). */
#define REPLACED_KEEP_MS 10000
/* How often the reaper looks for kept files that are due. */
#define REAPER_SCAN_MS 1000
/* Every how many looks it tries again to drop the registrations a killed
 * run of this node left on other nodes' shards. */
#define REG_STALE_EVERY 5
/* The value of a kept orphan mark; an empty one marks a file open somewhere. */
static const uint8_t ORPHAN_KEPT[1] = {'K'};

struct ns {
    const struct config *cfg;
    int node;                       /* which node of cfg this process is */
    char data_dir[PATH_MAX];
    int lock_fd;
    int clear_mark;                 /* remove DATA_DIR/RUNNING at close */
    enum runmark_last last_run;     /* how the last daemon of the store stopped */
    unsigned nshards;               /* slots of the layout (placement.h); == shards unless split */
    uint8_t depth[CONFIG_MAX_SHARDS]; /* the layout: each slot's shard's depth */
    struct shard **shards;          /* by slot (room for CONFIG_MAX_SHARDS): the slots of one
                                     * shard hold the same pointer */
    struct shard **uniq;            /* each shard once, by number (== shards when uniform) */
    unsigned nuniq;
    pthread_rwlock_t layout_lock;   /* read: an operation (ns_hold); write: a layout change */
    struct shard **replicas;        /* this node's replica copies, outside the namespace */
    struct remote *remote;          /* NULL when every shard is local */
    _Atomic uint64_t next_unique;
    pthread_mutex_t stripes[LOCK_STRIPES];
    struct inode_guess *guesses;    /* LOCK_STRIPES * GUESS_WAYS; see inode_cas() */
    pthread_mutex_t missing_lock;
    struct missing_name *missing;   /* MISSING_SLOTS of them; see ns_lookup_recent() */
    /* The reaper of kept files (DESIGN above); set up by ns_reaper_start(). */
    int reaper_running;
    int reaper_stop;                /* protected by reaper_lock */
    pthread_t reaper;
    pthread_mutex_t reaper_lock;
    pthread_cond_t reaper_cond;     /* CLOCK_MONOTONIC */
    ns_is_open_fn reaper_is_open;
    void *reaper_ctx;
    /* The open registry (DESIGN above); only with other nodes. */
    char reg_node[CONFIG_NAME_MAX + 1]; /* this node's name: the key's tail */
    size_t reg_nlen;
    uint64_t run_tag;               /* this process's registrations hold it */
    int offline;                    /* fsck: no node runs, every one is stale */
    ns_node_alive_fn node_alive;    /* set before the reaper starts */
    void *node_alive_ctx;
    ns_relayout_fn relayout;        /* learn the layout anew (ns_again); set before use */
    void *relayout_ctx;
    ns_leads_fn leads;              /* the reaper's shards; set before it starts */
    void *leads_ctx;
    uint8_t *reg_stale;             /* per shard: the last run's registrations
                                     * still to drop; reaper thread only */
};

/* A name found missing on a remote shard, and when. */
#define MISSING_SLOTS 256
struct missing_name {
    int valid;
    uint64_t version;   /* bumped by every local create of a name of this slot */
    uint64_t seen_ms;   /* CLOCK_MONOTONIC */
    struct ino_id dir;
    uint8_t nlen;
    char name[RECORD_NAME_MAX];
};

/* The record of a remote inode as this process last read or wrote it. */
struct inode_guess {
    int valid;
    uint64_t seen_ms; /* CLOCK_MONOTONIC: when ino was read or written */
    struct inode ino;
};

/* ---- small helpers ---- */

static struct timespec now_ts(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t;
}

static struct shard *shard_at(struct ns *ns, uint64_t hash)
{
    return ns->shards[placement_shard_of(hash, ns->nshards)];
}

/* ---- the layout lock ----
 * Every operation (the ns_* calls below "the operations") runs with the
 * layout held for reading, so a layout change (a reshard's cut-over) made
 * with it held for writing finds no operation between its routing and its
 * writes. Writers are preferred (a steady stream of operations must not
 * starve a cut-over), so a thread must not take the read side twice: a
 * thread-local count lets an operation call another. */
static _Thread_local const struct ns *held_ns;
static _Thread_local unsigned held_depth;

static void layout_lock_init(struct ns *ns)
{
    pthread_rwlockattr_t a;

    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&ns->layout_lock, &a);
    pthread_rwlockattr_destroy(&a);
}

void ns_hold(struct ns *ns)
{
    if (held_ns == ns) {
        held_depth++;
        return;
    }
    pthread_rwlock_rdlock(&ns->layout_lock);
    if (!held_ns) {
        held_ns = ns;
        held_depth = 1;
    }
}

void ns_unhold(struct ns *ns)
{
    if (held_ns == ns) {
        if (--held_depth)
            return;
        held_ns = NULL;
    }
    pthread_rwlock_unlock(&ns->layout_lock);
}

void ns_quiesce(struct ns *ns)
{
    pthread_rwlock_wrlock(&ns->layout_lock);
}

void ns_unquiesce(struct ns *ns)
{
    pthread_rwlock_unlock(&ns->layout_lock);
}

/* The number of the shard a hash lives on. */
static unsigned home_of(const struct ns *ns, uint64_t hash)
{
    return placement_home(hash, ns->depth, ns->nshards);
}

static struct shard *inode_shard(struct ns *ns, const struct ino_id *id)
{
    return shard_at(ns, record_id_hash(id));
}

static uint64_t entry_hash(const struct ino_id *dir, const char *name, size_t nlen)
{
    return placement_entry_hash(dir->b, name, nlen);
}

static struct shard *entry_shard(struct ns *ns, const struct ino_id *dir, const char *name,
                                 size_t nlen)
{
    return shard_at(ns, entry_hash(dir, name, nlen));
}

int ns_unclean_stop(const struct ns *ns)
{
    return (int)ns->last_run;
}

void ns_repaired(struct ns *ns)
{
    ns->clear_mark = 1;
}

void ns_nodes_down(struct ns *ns, void (*fn)(void *ctx, const char *node, time_t since),
                   void *ctx)
{
    for (unsigned i = 0; ns->remote && i < ns->cfg->node_count; i++) {
        time_t since;
        if (remote_node_down(ns->remote, i, &since) == 1)
            fn(ctx, ns->cfg->nodes[i].name, since);
    }
}

int ns_all_local(const struct ns *ns)
{
    return ns->remote == NULL;
}

unsigned ns_shard_count(const struct ns *ns)
{
    return ns->nshards;
}

int ns_is_shard(const struct ns *ns, unsigned index)
{
    return index < ns->nshards && placement_is_shard(ns->depth, index);
}

unsigned ns_home(const struct ns *ns, uint64_t hash)
{
    return home_of(ns, hash);
}

unsigned ns_shard_depth(const struct ns *ns, unsigned index)
{
    return index < ns->nshards ? ns->depth[index] : 0;
}

int ns_shard_is_local(const struct ns *ns, unsigned index)
{
    return index < ns->nshards && config_shard_owner(ns->cfg, index) == ns->node;
}

struct shard *ns_shard(struct ns *ns, unsigned index)
{
    return index < ns->nshards ? ns->shards[index] : NULL;
}

struct shard *ns_replica(struct ns *ns, unsigned index)
{
    return index < ns->nshards ? ns->replicas[index] : NULL;
}

/* The list of distinct shards, from the slots. */
static void uniq_rebuild(struct ns *ns)
{
    unsigned n = 0;

    for (unsigned i = 0; ns->uniq && i < ns->nshards; i++)
        if (ns_is_shard(ns, i))
            ns->uniq[n++] = ns->shards[i];
    ns->nuniq = n;
}

/* Make s shard index's in every slot of it, and in uniq. */
static void shard_set(struct ns *ns, unsigned index, struct shard *s)
{
    unsigned d = ns->depth[index];

    for (unsigned j = index; j < ns->nshards; j += 1u << d)
        ns->shards[j] = s;
    uniq_rebuild(ns);
}

int ns_layout_split(struct ns *ns, unsigned s, struct shard *to)
{
    unsigned n = ns->nshards, d, t;
    int rc;

    if (!ns_is_shard(ns, s))
        return -EINVAL;
    d = ns->depth[s];
    t = s + (1u << d);
    rc = placement_split(ns->depth, &n, CONFIG_MAX_SHARDS, s);
    if (rc)
        return rc;
    for (unsigned j = ns->nshards; j < n; j++) /* the slots doubled: the upper half repeats */
        ns->shards[j] = ns->shards[j - ns->nshards];
    ns->nshards = n;
    shard_set(ns, t, to);
    return 0;
}

struct shard *ns_layout_merge(struct ns *ns, unsigned low)
{
    unsigned n = ns->nshards, into, d = ns->depth[low];
    struct shard *up;

    if (!ns_is_shard(ns, low) || d == 0 || low >= (1u << (d - 1)))
        return NULL;
    up = ns->shards[low + (1u << (d - 1))];
    if (placement_merge(ns->depth, &n, low, &into) || into != low)
        return NULL;
    ns->nshards = n;
    shard_set(ns, low, ns->shards[low]);
    return up;
}

int ns_shard_wrap(struct ns *ns, unsigned index, struct shard *wrap)
{
    if (!ns_shard_is_local(ns, index) || !ns_is_shard(ns, index) || !wrap)
        return -EINVAL;
    shard_set(ns, index, wrap);
    return 0;
}

struct shard *ns_shard_swap(struct ns *ns, unsigned index, struct shard *s)
{
    struct shard *old;

    if (!ns_is_shard(ns, index) || !s)
        return NULL;
    old = ns->shards[index];
    shard_set(ns, index, s);
    return old;
}

struct remote *ns_remote(struct ns *ns)
{
    return ns->remote;
}

struct shard *ns_replica_take(struct ns *ns, unsigned index)
{
    struct shard *s;

    if (index >= ns->nshards)
        return NULL;
    s = ns->replicas[index];
    ns->replicas[index] = NULL;
    return s;
}

/* DATA_DIR/shard-N (suffix ""), or DATA_DIR/shard-N.dropped. */
static int copy_dir(const struct ns *ns, unsigned index, const char *suffix, char *out,
                    size_t len)
{
    int n = snprintf(out, len, "%s/shard-%u%s", ns->data_dir, index, suffix);

    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int ns_copy_open(struct ns *ns, unsigned index, struct shard **out, char *err, size_t errlen)
{
    /* as ns_open opens a replica: a change stream, the config's interval */
    struct shard_lmdb_options opt = {.commit_interval_ms = ns->cfg->commit_interval_ms};
    char dir[PATH_MAX + 32];
    int rc;

    *out = NULL;
    if (index >= CONFIG_MAX_SHARDS)
        return -EINVAL;
    rc = copy_dir(ns, index, "", dir, sizeof(dir));
    if (rc == 0)
        rc = shard_lmdb_open(dir, index, &opt, out, err, errlen);
    else
        snprintf(err, errlen, "shard %u: data_dir path too long", index);
    return rc;
}

int ns_copy_remove(struct ns *ns, unsigned index)
{
    char dir[PATH_MAX + 32], gone[PATH_MAX + 40];
    int rc;

    if (index >= CONFIG_MAX_SHARDS)
        return -EINVAL;
    rc = copy_dir(ns, index, "", dir, sizeof(dir));
    if (rc == 0)
        rc = copy_dir(ns, index, ".dropped", gone, sizeof(gone));
    return rc ? rc : durable_remove_dir(dir, gone);
}

/* 1 if shards.conf names node a replica holder of shard i. */
static int holds_replica(const struct config *cfg, int node, unsigned i)
{
    for (unsigned k = 0; k < cfg->nreplicas[i]; k++)
        if (cfg->replicas[i][k] == node)
            return 1;
    return 0;
}

unsigned ns_entry_shard(const struct ns *ns, const struct ino_id *dir, const char *name,
                        size_t nlen)
{
    return home_of(ns, entry_hash(dir, name, nlen));
}

unsigned ns_inode_shard(const struct ns *ns, const struct ino_id *id)
{
    return home_of(ns, record_id_hash(id));
}

static unsigned stripe_index(const struct ino_id *id)
{
    return (unsigned)(id->b[15] ^ id->b[7] ^ id->b[11]) % LOCK_STRIPES;
}

static pthread_mutex_t *stripe_of(struct ns *ns, const struct ino_id *id)
{
    return &ns->stripes[stripe_index(id)];
}

static void lock_inode(struct ns *ns, const struct ino_id *id)
{
    pthread_mutex_lock(stripe_of(ns, id));
}

static void unlock_inode(struct ns *ns, const struct ino_id *id)
{
    pthread_mutex_unlock(stripe_of(ns, id));
}

static int check_name(const char *name, size_t nlen)
{
    if (nlen == 0 || memchr(name, '/', nlen) || memchr(name, 0, nlen))
        return -EINVAL;
    if (nlen > RECORD_NAME_MAX)
        return -ENAMETOOLONG;
    if ((nlen == 1 && name[0] == '.') || (nlen == 2 && name[0] == '.' && name[1] == '.'))
        return -EINVAL;
    return 0;
}

static uint8_t dtype_of(uint32_t mode)
{
    return (uint8_t)IFTODT(mode);
}

/* ---- record access ---- */

static int inode_get(struct ns *ns, const struct ino_id *id, struct inode *out)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    size_t klen = record_inode_key(key, id), vlen = 0;
    int rc = shard_get(inode_shard(ns, id), key, klen, 0, val, sizeof(val), &vlen);

    if (rc < 0)
        return rc;
    if (vlen > sizeof(val))
        return -EIO;
    return record_inode_decode(val, vlen, id, out);
}

static void batch_put_inode(struct batch *b, const struct inode *ino)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    size_t klen = record_inode_key(key, &ino->id);
    batch_put(b, key, klen, val, record_inode_encode(val, ino));
}

static int entry_get(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                     struct ino_id *id, uint8_t *dtype)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN + 1];
    size_t klen = record_entry_key(key, dir, name, nlen), vlen = 0;
    int rc = shard_get(entry_shard(ns, dir, name, nlen), key, klen, 0, val, sizeof(val), &vlen);

    if (rc < 0)
        return rc;
    return record_entry_decode(val, vlen, id, dtype);
}

static void batch_entry(struct batch *b, enum batch_op op, const struct ino_id *dir,
                        const char *name, size_t nlen, const struct ino_id *id, uint8_t dtype)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_ENTRY_LEN];
    size_t klen = record_entry_key(key, dir, name, nlen);

    if (id)
        record_entry_encode(val, id, dtype);
    batch_add(b, op, key, klen, id ? val : NULL, id ? RECORD_ENTRY_LEN : 0);
}

/* Delete every record of type t belonging to id. */
static void batch_del_owned(struct batch *b, enum record_type t, const struct ino_id *id)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, t, id);
    size_t el = record_prefix_end(end, start, sl);
    batch_add(b, BATCH_DEL_RANGE, start, sl, end, el);
}

/* Everything an inode owns goes, in one batch on the inode's shard. */
static void batch_reap(struct batch *b, const struct ino_id *id)
{
    uint8_t key[RECORD_KEY_MAX];

    batch_del(b, key, record_inode_key(key, id));
    batch_del(b, key, record_orphan_key(key, id));
    batch_del_owned(b, REC_CHUNK, id);
    batch_del_owned(b, REC_XATTR, id);
    batch_del_owned(b, REC_OPEN, id);
}

/* ---- the open registry (DESIGN, "open registry") ---- */

/* 1 if opens are registered on the inode's shard: other nodes exist. */
static int openreg_on(const struct ns *ns)
{
    return ns->remote != NULL && ns->reg_nlen > 0;
}

/* Put this process's registration of id (its run tag under its node's
 * name) into b. Nothing when there is no registry. */
static void batch_register(struct ns *ns, struct batch *b, const struct ino_id *id)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_OPEN_VAL_LEN];

    if (!openreg_on(ns))
        return;
    endian_put_le(val, ns->run_tag, RECORD_OPEN_VAL_LEN);
    batch_put(b, key, record_open_key(key, id, ns->reg_node, ns->reg_nlen), val, sizeof(val));
}

static void batch_unregister(struct ns *ns, struct batch *b, const struct ino_id *id)
{
    uint8_t key[RECORD_KEY_MAX];

    if (openreg_on(ns))
        batch_del(b, key, record_open_key(key, id, ns->reg_node, ns->reg_nlen));
}

/* Fail b with -ENOTEMPTY if any node has id registered. */
static void batch_assert_unopened(struct batch *b, const struct ino_id *id)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_OPEN, id);

    batch_add(b, BATCH_ASSERT_EMPTY, start, sl, end, record_prefix_end(end, start, sl));
}

static int apply_batch(struct shard *s, struct batch *b)
{
    int rc = shard_apply(s, b);
    batch_free(b);
    return rc;
}

static int step_again(struct ns *ns, int rc, unsigned *tries);

/* Run a step that comes after an operation's commit point (the op has
 * made its change; this finishes it: a link count, a parent pointer, an
 * intent's end) until no shard refuses it for another layout. Running the
 * whole op again would find its change made and fail, or do it twice. */
#define AFTER_COMMIT(ns, rc, call)                                                             \
    do {                                                                                       \
        unsigned tries_ = 0;                                                                   \
        do                                                                                     \
            (rc) = (call);                                                                     \
        while (step_again((ns), (rc), &tries_));                                               \
    } while (0)
/* The same for a step whose failure the op does not report (times, a
 * parent's link count: fsck's to mend, as before layouts). */
#define AFTER_COMMIT_ANY(ns, call)                                                             \
    do {                                                                                       \
        int r_;                                                                                \
        AFTER_COMMIT(ns, r_, call);                                                            \
        (void)r_;                                                                              \
    } while (0)

/* ---- inode compare-and-swap ----
 *
 * DESIGN (one inode changed by several nodes)
 * Every change of an inode record is a read-modify-write, and all of them go
 * through inode_cas():
 *  1. read the record (the striped lock orders this process's threads);
 *  2. a change function turns it into the new record and adds the records
 *     that change with it to the batch: a write's chunks, an xattr, the
 *     entries of a link, unlink or rename whose entry shares the inode's shard;
 *  3. apply that batch on the inode's shard, led by BATCH_ASSERT_VALUE of the
 *     bytes read. Another node's change in between fails the whole batch with
 *     -EAGAIN and changes nothing; go back to 1 with the new record.
 * Re-encoding a decoded record reproduces its stored bytes, so no version
 * field is needed; and every change moves ctime strictly forward
 * (inode_bump_ctime, even if clocks disagree), so while the bytes are the
 * same, so is what the record vouches for (data, xattrs): a chunk merged or an xattr
 * found present after step 1 is still as read at step 3. The common path
 * pays nothing: the record is read anyway, and the shard checks the
 * assertion inside its own transaction.
 * Each failure means another change succeeded, so the store moves on, but
 * one node can be starved: a node whose shard is remote needs two round
 * trips between read and apply, and a local writer that never pauses lands
 * in that window every time. So after a few quick tries a loser backs off
 * (a random part of a window doubling up to 12.8 ms, with the stripe lock
 * released) and keeps trying for INODE_CAS_GIVE_UP_MS: long enough to wait
 * out a burst, short enough that a livelock ends. Then it gives up with
 * -EIO, having changed nothing (EAGAIN would tell a caller of write(2) or
 * chmod(2) a story about non-blocking descriptors).
 */

#define INODE_PUT 0  /* change function: store the changed record */
#define INODE_DONE 1 /* change function: the batch already deletes the record */
#define INODE_KEEP 2 /* change function: the record stays as read (asserted) */
#define INODE_CAS_QUICK_TRIES 4
#define INODE_CAS_GIVE_UP_MS 10000

/* Step 2 above: change *ino (as read) and add to b, which goes to the
 * inode's shard, what changes with it. Returns INODE_PUT, INODE_DONE, or
 * -errno to stop without changing anything. */
typedef int (*inode_change_fn)(struct ns *ns, struct batch *b, struct inode *ino,
                               const void *arg);

/* ctime now, and always later than the ctime read: see DESIGN above. */
static void inode_bump_ctime(struct inode *ino)
{
    struct timespec t = now_ts(), old = ino->ctime;

    if (t.tv_sec < old.tv_sec || (t.tv_sec == old.tv_sec && t.tv_nsec <= old.tv_nsec)) {
        t = old;
        if (++t.tv_nsec == 1000000000L) {
            t.tv_sec++;
            t.tv_nsec = 0;
        }
    }
    ino->ctime = t;
}

static uint64_t monotonic_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

/* First guesses: the record of a remote inode as this process last read or
 * wrote it, one per lock stripe, guarded by the stripe's lock. inode_cas()
 * asserts the guess instead of reading first, which saves a round trip
 * whenever nobody else changed the inode since; when somebody did, the
 * assertion fails, nothing changes, and the step reads and is redone. The
 * ctime rule above makes an old guess fail rather than pass. Local inodes are
 * always read: reading LMDB costs less than a failed apply. */
static int inode_is_remote(const struct ns *ns, const struct ino_id *id)
{
    return !ns_shard_is_local(ns, home_of(ns, record_id_hash(id)));
}

int ns_inode_is_remote(const struct ns *ns, const struct ino_id *id)
{
    return inode_is_remote(ns, id);
}

/* id's guess slot, one of GUESS_WAYS of its lock stripe: guarded by it.
 * An open's registration asserts the guess instead of reading the inode
 * (ns_setattr, NS_SET_REGISTER), so a reader walking a directory (tar,
 * rsync's read side) needs the guesses readdirplus left to last until
 * its opens: with one a stripe, a third of them were gone in a directory
 * of 100 files. */
static struct inode_guess *guess_slot(struct ns *ns, const struct ino_id *id)
{
    unsigned way = (unsigned)(id->b[3] ^ id->b[6] ^ id->b[14]) % GUESS_WAYS;

    return &ns->guesses[stripe_index(id) * GUESS_WAYS + way];
}

/* With the stripe lock held. */
static void guess_set(struct ns *ns, const struct inode *ino)
{
    struct inode_guess *g = guess_slot(ns, &ino->id);

    if (!inode_is_remote(ns, &ino->id))
        return;
    g->ino = *ino;
    g->valid = 1;
    g->seen_ms = monotonic_ms();
}

/* With the stripe lock held: 0 and the guess for id (and its age in ms, if
 * age_ms is not NULL), or -ENOENT. */
static int guess_get(struct ns *ns, const struct ino_id *id, struct inode *out, uint64_t *age_ms)
{
    struct inode_guess *g = guess_slot(ns, id);

    if (!g->valid || memcmp(&g->ino.id, id, sizeof(*id)) != 0)
        return -ENOENT;
    *out = g->ino;
    if (age_ms)
        *age_ms = monotonic_ms() - g->seen_ms;
    return 0;
}

/* Remember what was just read or created (takes the stripe lock). */
static void guess_note(struct ns *ns, const struct inode *ino)
{
    if (!inode_is_remote(ns, &ino->id))
        return;
    lock_inode(ns, &ino->id);
    guess_set(ns, ino);
    unlock_inode(ns, &ino->id);
}

/* guess_note unless the guess is of a later change of the inode (ctime
 * moves strictly forward): pipelined writes of one file land in order,
 * but their answers may come back in any. */
static void guess_advance(struct ns *ns, const struct inode *ino)
{
    struct inode now;

    if (!inode_is_remote(ns, &ino->id))
        return;
    lock_inode(ns, &ino->id);
    if (guess_get(ns, &ino->id, &now, NULL) != 0 || now.ctime.tv_sec < ino->ctime.tv_sec ||
        (now.ctime.tv_sec == ino->ctime.tv_sec && now.ctime.tv_nsec <= ino->ctime.tv_nsec))
        guess_set(ns, ino);
    unlock_inode(ns, &ino->id);
}

/* guess_note for a caller that may hold a shard's lock (a scan's callback):
 * the order elsewhere is stripe, then shard, so the stripe is only tried; a
 * guess is an optimisation and may be left out. */
static void guess_offer(struct ns *ns, const struct inode *ino)
{
    if (!inode_is_remote(ns, &ino->id) || pthread_mutex_trylock(stripe_of(ns, &ino->id)) != 0)
        return;
    guess_set(ns, ino);
    unlock_inode(ns, &ino->id);
}

/* 0 if every assertion in b holds on s now, else the error applying b would
 * give (-EAGAIN, -EEXIST) or a read error. For small values (entries). */
static int batch_assertions_hold(struct shard *s, const struct batch *b)
{
    uint8_t val[RECORD_INODE_MAX];
    struct batch_item it;
    size_t pos = 0, vlen;
    int rc;

    while ((rc = batch_next(b->buf, b->len, &pos, &it)) == 1) {
        if (it.op != BATCH_ASSERT_ABSENT && it.op != BATCH_ASSERT_VALUE)
            continue;
        vlen = 0;
        rc = shard_get(s, it.key, it.klen, 0, val, sizeof(val), &vlen);
        if (it.op == BATCH_ASSERT_ABSENT)
            rc = rc == -ENOENT ? 0 : rc < 0 ? rc : -EEXIST;
        else if (rc >= 0)
            rc = vlen == it.vlen && vlen <= sizeof(val) && !memcmp(val, it.val, vlen) ? 0 : -EAGAIN;
        else if (rc == -ENOENT)
            rc = -EAGAIN;
        if (rc)
            return rc;
    }
    return rc;
}

/* The pause before try tries + 1 of a contended inode_cas(): none for the
 * first few, then a random part of a window that doubles up to 12.8 ms. */
static void inode_cas_backoff(int tries)
{
    int shift = tries - INODE_CAS_QUICK_TRIES;
    long window_ns = 100000L << (shift < 7 ? shift : 7);
    struct timespec t = {0, now_ts().tv_nsec % window_ns};

    nanosleep(&t, NULL);
}

/* Read-modify-write of inode id (DESIGN above). with, if not NULL, holds
 * records of the inode's shard that change in the same batch, with their own
 * assertions (a link's or an unlink's entry); when the batch fails they are
 * read again, and if one of them no longer holds the step ends with its
 * error instead of being redone. Returns 0 and the stored record in *out (if
 * not NULL); -ENOENT if the inode is gone; the change function's error;
 * -EAGAIN (an asserted value in with changed) or -EEXIST (a key asserted
 * absent in with exists); a shard error; -EIO after INODE_CAS_GIVE_UP_MS. */
static int inode_cas(struct ns *ns, const struct ino_id *id, const struct batch *with,
                     inode_change_fn change, const void *arg, struct inode *out)
{
    uint8_t key[RECORD_KEY_MAX], old[RECORD_INODE_MAX];
    size_t klen = record_inode_key(key, id);
    struct shard *s = inode_shard(ns, id);
    struct inode ino;
    struct batch b;
    uint64_t give_up = monotonic_ms() + INODE_CAS_GIVE_UP_MS;
    int rc;

    lock_inode(ns, id);
    for (int tries = 0;; tries++) {
        int put;

        rc = tries == 0 ? guess_get(ns, id, &ino, NULL) : -ENOENT;
        if (rc)
            rc = inode_get(ns, id, &ino);
        if (rc)
            break;
        size_t olen = record_inode_encode(old, &ino);
        batch_init(&b);
        batch_add(&b, BATCH_ASSERT_VALUE, key, klen, old, olen);
        if (with)
            batch_append(&b, with);
        rc = change(ns, &b, &ino, arg);
        put = rc == INODE_PUT;
        int kept = rc == INODE_KEEP; /* the record as read: as fresh as a put */
        if (put)
            batch_put_inode(&b, &ino);
        if (rc >= 0)
            rc = shard_apply(s, &b);
        batch_free(&b);
        if (rc == 0 && (put || kept))
            guess_set(ns, &ino);
        if (rc != -EAGAIN)
            break;
        if (with && (rc = batch_assertions_hold(s, with)) != 0)
            break;
        rc = -EIO;
        if (monotonic_ms() >= give_up)
            break;
        if (tries >= INODE_CAS_QUICK_TRIES) {
            unlock_inode(ns, id);
            inode_cas_backoff(tries);
            lock_inode(ns, id);
        }
    }
    unlock_inode(ns, id);
    if (rc == 0 && out)
        *out = ino;
    return rc;
}

struct touch {
    int nlink_delta, set_mtime;
};

static int touch_mutate(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct touch *t = arg;

    (void)ns, (void)b;
    inode_bump_ctime(ino);
    if (t->set_mtime)
        ino->mtime = ino->ctime;
    if (t->nlink_delta < 0 && ino->nlink < (uint32_t)-t->nlink_delta)
        ino->nlink = 0;
    else
        ino->nlink += t->nlink_delta;
    return 0;
}

/* ctime (and mtime) now, nlink + delta. */
static int inode_touch(struct ns *ns, const struct ino_id *id, int nlink_delta, int set_mtime)
{
    struct touch t = {nlink_delta, set_mtime};
    return inode_cas(ns, id, NULL, touch_mutate, &t, NULL);
}

/* ---- lookup and attributes ---- */

/* The guess for id if it is at most max_age_ms old (takes the stripe lock):
 * 0, its age in *age_ms and the record in *out, or -ENOENT. */
static int guess_recent(struct ns *ns, const struct ino_id *id, unsigned max_age_ms,
                        struct inode *out, unsigned *age_ms)
{
    uint64_t age = 0;
    int rc;

    lock_inode(ns, id);
    rc = guess_get(ns, id, out, &age);
    unlock_inode(ns, id);
    if (rc || age > max_age_ms)
        return -ENOENT;
    *age_ms = (unsigned)age;
    return 0;
}

static int getattr_recent_held(struct ns *ns, const struct ino_id *id, unsigned max_age_ms,
                      struct inode *out, unsigned *age_ms)
{
    if (guess_recent(ns, id, max_age_ms, out, age_ms) == 0)
        return 0;
    *age_ms = 0;
    return ns_getattr(ns, id, out);
}

static int getattr_ordered_held(struct ns *ns, const struct ino_id *id, struct inode *out)
{
    int rc;

    lock_inode(ns, id);
    rc = inode_get(ns, id, out);
    unlock_inode(ns, id);
    if (rc == 0)
        guess_note(ns, out);
    return rc;
}

static int getattr_held(struct ns *ns, const struct ino_id *id, struct inode *out)
{
    int rc = inode_get(ns, id, out);

    if (rc == 0)
        guess_note(ns, out);
    return rc;
}

static int lookup_id_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                 struct ino_id *id, uint8_t *dtype)
{
    if (nlen > RECORD_NAME_MAX)
        return -ENAMETOOLONG;
    return entry_get(ns, dir, name, nlen, id, dtype);
}

/* An entry and, in the same read, the inode it names when that inode lives
 * on the entry's shard (a name's inode is placed by the hash of the name
 * that created it: every file not renamed since). 1 and *out when the inode
 * came along; 0 when it is elsewhere (or was missing: read it again); or
 * -errno for the entry. */
static int entry_and_inode_get(struct ns *ns, const struct ino_id *dir, const char *name,
                               size_t nlen, struct ino_id *id, uint8_t *dtype, struct inode *out)
{
    uint8_t key[RECORD_KEY_MAX], ival[RECORD_INODE_MAX], eval[RECORD_ENTRY_LEN + 1];
    uint8_t ikey = REC_INODE;
    struct shard *s = entry_shard(ns, dir, name, nlen);
    struct shard_read r[2] = {
        {.key = key, .klen = record_entry_key(key, dir, name, nlen), .buf = eval,
         .buflen = sizeof(eval)},
        {.key = &ikey, .klen = 1, .link = RECORD_ID_LEN, .buf = ival, .buflen = sizeof(ival)},
    };
    int rc = shard_get_many(s, r, 2);

    if (rc)
        return rc;
    if (r[0].rc)
        return r[0].rc;
    rc = record_entry_decode(eval, r[0].len, id, dtype);
    if (rc)
        return rc;
    if (inode_shard(ns, id) != s || r[1].rc)
        return 0;
    if (r[1].vlen > sizeof(ival))
        return -EIO;
    rc = record_inode_decode(ival, r[1].len, id, out);
    return rc ? rc : 1;
}

static int lookup_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              struct inode *out)
{
    struct ino_id id, again;
    uint8_t dtype;
    int rc;

    if (nlen > RECORD_NAME_MAX)
        return -ENAMETOOLONG;
    rc = entry_and_inode_get(ns, dir, name, nlen, &id, &dtype, out);
    /* Entry and inode are read in two steps when they live on two shards;
     * a rename replacing this name (here or on another node) may drop the
     * old inode's last link in between: the inode is then missing, or kept
     * with nlink 0 for its readers (DESIGN, "Caching with several nodes").
     * Re-read the entry then: only an entry that still names such an inode
     * is really what the name holds (a dangling entry: fsck). */
    for (int tries = 0; rc >= 0 && tries < 16; tries++) {
        if (rc == 0)
            rc = inode_get(ns, &id, out);
        else
            rc = 0; /* came along with the entry */
        if (rc == 0)
            guess_note(ns, out);
        if (rc == -ENOENT || (rc == 0 && out->nlink == 0)) {
            int gone = rc;
            rc = entry_get(ns, dir, name, nlen, &again, &dtype);
            if (rc == 0 && memcmp(&again, &id, sizeof(id)) == 0)
                return gone;
            id = again;
            continue;
        }
        return rc;
    }
    return rc < 0 ? rc : -ENOENT;
}

/* Missing names: a name a lookup found missing on a remote shard is
 * remembered in one of MISSING_SLOTS slots (by the name's hash), so that a
 * lookup soon after can say so again without asking; the kernel asks again
 * whatever its own cache says before a rename, for the target. Any name this
 * process creates bumps its slot's version first thing after the create, and
 * a lookup stores its "missing" only if the version did not move while it
 * read: a create racing a lookup never leaves a stale "missing" behind. A
 * name another node creates may be reported missing for max_age_ms, as the
 * kernel's own negative entries do. */
static struct missing_name *missing_slot(struct ns *ns, const struct ino_id *dir,
                                         const char *name, size_t nlen)
{
    return &ns->missing[(entry_hash(dir, name, nlen) >> 32) % MISSING_SLOTS];
}

static int missing_is(const struct missing_name *m, const struct ino_id *dir, const char *name,
                      size_t nlen)
{
    return m->valid && m->nlen == nlen && memcmp(&m->dir, dir, sizeof(*dir)) == 0 &&
           memcmp(m->name, name, nlen) == 0;
}

static void missing_forget(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen)
{
    struct missing_name *m = missing_slot(ns, dir, name, nlen);

    pthread_mutex_lock(&ns->missing_lock);
    m->version++;
    m->valid = 0;
    pthread_mutex_unlock(&ns->missing_lock);
}

static int lookup_recent_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                     unsigned max_age_ms, struct inode *out)
{
    struct missing_name *m;
    uint64_t version;
    int rc;

    if (nlen > RECORD_NAME_MAX || ns_shard_is_local(ns, ns_entry_shard(ns, dir, name, nlen)))
        return ns_lookup(ns, dir, name, nlen, out);
    m = missing_slot(ns, dir, name, nlen);
    pthread_mutex_lock(&ns->missing_lock);
    if (missing_is(m, dir, name, nlen) && monotonic_ms() - m->seen_ms <= max_age_ms) {
        pthread_mutex_unlock(&ns->missing_lock);
        return -ENOENT;
    }
    version = m->version;
    pthread_mutex_unlock(&ns->missing_lock);
    rc = ns_lookup(ns, dir, name, nlen, out);
    if (rc != -ENOENT)
        return rc;
    pthread_mutex_lock(&ns->missing_lock);
    if (m->version == version) {
        m->valid = 1;
        m->seen_ms = monotonic_ms();
        m->dir = *dir;
        m->nlen = (uint8_t)nlen;
        memcpy(m->name, name, nlen);
    }
    pthread_mutex_unlock(&ns->missing_lock);
    return rc;
}

/* ---- create ---- */

/* A directory that may receive a new entry. */
static int parent_ok(const struct inode *parent)
{
    if (!S_ISDIR(parent->mode))
        return -ENOTDIR;
    if (parent->flags & INODE_DYING || parent->nlink == 0)
        return -ENOENT;
    return 0;
}

static int parent_check(struct ns *ns, const struct ino_id *dir, struct inode *parent)
{
    int rc = ns_getattr(ns, dir, parent);
    return rc ? rc : parent_ok(parent);
}

/* parent_check() for a create: from the guess if there is one (a remote
 * directory), because the parent's compare-and-swap after the entry is in
 * place checks again for real (parent_created_mutate) and backs the entry
 * out if the directory is no longer fit. */
static int parent_check_for_create(struct ns *ns, const struct ino_id *dir, struct inode *parent)
{
    unsigned age;
    int rc = ns_getattr_recent(ns, dir, UINT_MAX, parent, &age);

    return rc ? rc : parent_ok(parent);
}

/* After a new entry is in place: bump the parent's times (and nlink), or back
 * the entry out if the parent started dying meanwhile (see rmdir). */
static int parent_created_mutate(struct ns *ns, struct batch *b, struct inode *parent,
                                 const void *arg)
{
    int rc = parent_ok(parent);

    (void)ns, (void)b;
    if (rc)
        return rc;
    inode_bump_ctime(parent);
    parent->mtime = parent->ctime;
    if (*(const int *)arg)
        parent->nlink++;
    return 0;
}

static int parent_after_create(struct ns *ns, const struct ino_id *dir, int is_dir)
{
    return inode_cas(ns, dir, NULL, parent_created_mutate, &is_dir, NULL);
}

/* ns_mknode; reg: the new file is open here (ns_create_open). */
/* A create's batch came back -EIO. An apply to another node is sent once,
 * and a lost reply looks like a lost request (shard_remote.h): the node may
 * have applied it, a replica taken it over, and then the primary died
 * before it answered. The entry tells which: it names the new inode's id
 * only if this very batch was applied (the id was made for it). 0 if it
 * was, else -EIO as before (nothing of it is there). Without this, a
 * failover during `mkstemp` left a file that the caller was told was never
 * made (rsync then leaves its temporary name behind). */
static int create_outcome(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                          const struct ino_id *id)
{
    struct ino_id got;
    uint8_t dtype;

    if (entry_get(ns, dir, name, nlen, &got, &dtype) == 0 && !memcmp(&got, id, sizeof(got)))
        return 0;
    return -EIO;
}

static int mknode(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                  uint32_t mode, uint32_t rdev, uint32_t uid, uint32_t gid, const char *target,
                  int reg, struct inode *out)
{
    struct inode parent, *ino = out;
    struct batch b;
    uint64_t h;
    size_t tlen = target ? strlen(target) : 0;
    int rc = check_name(name, nlen);

    if (rc)
        return rc;
    if (target && (tlen == 0 || tlen >= RECORD_TAIL_MAX))
        return tlen ? -ENAMETOOLONG : -ENOENT;
    rc = parent_check_for_create(ns, dir, &parent);
    if (rc)
        return rc;
    memset(ino, 0, sizeof(*ino));
    h = entry_hash(dir, name, nlen);
    record_id_make(&ino->id, h, atomic_fetch_add(&ns->next_unique, 1));
    ino->mode = mode;
    ino->uid = uid;
    ino->gid = gid;
    /* BSD group semantics in a set-group-ID directory, as ext4 does. */
    if (parent.mode & S_ISGID) {
        ino->gid = parent.gid;
        if (S_ISDIR(mode))
            ino->mode |= S_ISGID;
    }
    ino->rdev = rdev;
    ino->nlink = S_ISDIR(mode) ? 2 : 1;
    ino->flags = INODE_NO_XATTR;
    ino->atime = ino->mtime = ino->ctime = now_ts();
    ino->parent = *dir;
    if (target) {
        memcpy(ino->tail, target, tlen);
        ino->tail_len = (uint32_t)tlen;
        ino->size = tlen;
    }
    batch_init(&b);
    batch_entry(&b, BATCH_ASSERT_ABSENT, dir, name, nlen, NULL, 0);
    batch_entry(&b, BATCH_PUT, dir, name, nlen, &ino->id, dtype_of(mode));
    batch_put_inode(&b, ino);
    if (reg)
        batch_register(ns, &b, &ino->id); /* the inode's shard: free */
    rc = apply_batch(shard_at(ns, h), &b);
    if (rc == -EIO)
        rc = create_outcome(ns, dir, name, nlen, &ino->id);
    missing_forget(ns, dir, name, nlen);
    if (rc)
        return rc;
    guess_note(ns, ino);
    rc = parent_after_create(ns, dir, S_ISDIR(mode));
    if (rc) {
        batch_init(&b);
        batch_entry(&b, BATCH_DEL, dir, name, nlen, NULL, 0);
        batch_reap(&b, &ino->id);
        apply_batch(shard_at(ns, h), &b);
    }
    return rc;
}

static int mknode_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              uint32_t mode, uint32_t rdev, uint32_t uid, uint32_t gid, const char *target,
              struct inode *out)
{
    return mknode(ns, dir, name, nlen, mode, rdev, uid, gid, target, 0, out);
}

static int create_open_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                   uint32_t mode, uint32_t uid, uint32_t gid, struct inode *out)
{
    return mknode(ns, dir, name, nlen, mode, 0, uid, gid, NULL, 1, out);
}

/* ---- unlink ---- */

struct drop {
    ns_is_open_fn is_open;
    void *ctx;
    int keep; /* a file left without a name is kept for other nodes' readers */
    int registered; /* another node has it open (its registration was found) */
};

/* Change function dropping one name of an inode (arg: struct drop): nlink - 1,
 * and when none is left delete it or, if still open, mark it orphan (a
 * directory too: one that is open stays, empty and with nlink 0, until its
 * last close, as on a local filesystem), or, with keep, mark it kept. */
static int drop_link(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct drop *d = arg;
    uint8_t key[RECORD_KEY_MAX];

    inode_bump_ctime(ino);
    if (S_ISDIR(ino->mode) || ino->nlink <= 1) {
        ino->nlink = 0;
        if (d->is_open && d->is_open(d->ctx, &ino->id)) {
            batch_put(b, key, record_orphan_key(key, &ino->id), "", 0);
            return INODE_PUT;
        }
        if (d->keep && !S_ISDIR(ino->mode)) {
            batch_put(b, key, record_orphan_key(key, &ino->id), ORPHAN_KEPT, sizeof(ORPHAN_KEPT));
            return INODE_PUT;
        }
        if (openreg_on(ns) && !S_ISDIR(ino->mode)) {
            /* Not open here (is_open): a registration of this node is one
             * its registry has yet to drop (fuse_ops.c), and goes now. */
            batch_unregister(ns, b, &ino->id);
            /* Open on another node: kept with an orphan mark for its
             * shard's owner to delete once no live node has it open. */
            if (d->registered) {
                batch_put(b, key, record_orphan_key(key, &ino->id), "", 0);
                return INODE_PUT;
            }
            batch_assert_unopened(b, &ino->id);
        }
        batch_reap(b, &ino->id);
        return INODE_DONE;
    }
    ino->nlink--;
    return INODE_PUT;
}

/* inode_cas() of drop_link (with: as there). A last link whose delete
 * found the inode open on another node (-ENOTEMPTY: its registration) is
 * dropped again, keeping the inode as an orphan. */
static int drop_link_cas(struct ns *ns, const struct ino_id *id, const struct batch *with,
                         const struct drop *d)
{
    int rc = inode_cas(ns, id, with, drop_link, d, NULL);

    if (rc == -ENOTEMPTY) {
        struct drop opened = *d;
        opened.registered = 1;
        rc = inode_cas(ns, id, with, drop_link, &opened, NULL);
    }
    return rc;
}

/* Apply the entry changes in e, which live on id's shard, and drop one link
 * of id, in one batch; if id is gone (a dangling entry), e alone. */
static int drop_link_with(struct ns *ns, const struct ino_id *id, const struct batch *e,
                          const struct drop *d)
{
    int rc = drop_link_cas(ns, id, e, d);
    return rc == -ENOENT ? shard_apply(inode_shard(ns, id), e) : rc;
}

/* Remove entry (dir, name) -> id and drop the link, in one batch when entry
 * and inode share a shard, else entry first (see DESIGN). */
static int remove_entry(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                        const struct ino_id *id, uint8_t dtype, ns_is_open_fn is_open, void *ctx)
{
    struct shard *se = entry_shard(ns, dir, name, nlen);
    struct drop d = {is_open, ctx, 0, 0};
    struct batch e;
    int rc;

    batch_init(&e);
    batch_entry(&e, BATCH_ASSERT_VALUE, dir, name, nlen, id, dtype);
    batch_entry(&e, BATCH_DEL, dir, name, nlen, NULL, 0);
    if (se == inode_shard(ns, id)) {
        rc = drop_link_with(ns, id, &e, &d);
    } else {
        rc = shard_apply(se, &e);
        if (rc == 0) {
            AFTER_COMMIT(ns, rc, drop_link_cas(ns, id, NULL, &d));
            if (rc == -ENOENT)
                rc = 0; /* a dangling entry, now removed */
        }
    }
    batch_free(&e);
    return rc == -EAGAIN ? -ENOENT : rc;
}

static int unlink_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              ns_is_open_fn is_open, void *ctx)
{
    struct ino_id id;
    uint8_t dtype;
    int rc = check_name(name, nlen);

    if (rc)
        return rc == -EINVAL ? -EISDIR : rc;
    rc = entry_get(ns, dir, name, nlen, &id, &dtype);
    if (rc)
        return rc;
    if (dtype == DT_DIR)
        return -EISDIR;
    rc = remove_entry(ns, dir, name, nlen, &id, dtype, is_open, ctx);
    if (rc == 0)
        AFTER_COMMIT_ANY(ns, inode_touch(ns, dir, 0, 1));
    return rc;
}

/* ---- rmdir ---- */

static int found_entry(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    (void)k, (void)kl, (void)v, (void)vl;
    *(int *)ctx = 1;
    return 1;
}

static int dir_is_empty(struct ns *ns, const struct ino_id *dir)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_ENTRY, dir), el = record_prefix_end(end, start, sl);

    int found = 0, rc = shard_scan_many(ns->uniq, ns->nuniq, start, sl, end, el, found_entry,
                                        &found);

    return rc < 0 ? rc : !found;
}

static int dying_mutate(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    int dying = *(const int *)arg;

    (void)ns, (void)b;
    if (dying && (ino->flags & INODE_DYING))
        return -EBUSY; /* another rmdir/rename is on it */
    ino->flags = dying ? ino->flags | INODE_DYING : ino->flags & ~INODE_DYING;
    return 0;
}

static int set_dying(struct ns *ns, const struct ino_id *id, int dying)
{
    return inode_cas(ns, id, NULL, dying_mutate, &dying, NULL);
}

/* Mark dir dying and make sure it is empty; on failure it is alive again. */
static int claim_empty_dir(struct ns *ns, const struct ino_id *dir)
{
    int rc = set_dying(ns, dir, 1);

    if (rc)
        return rc;
    rc = dir_is_empty(ns, dir);
    if (rc == 1)
        return 0;
    set_dying(ns, dir, 0);
    return rc == 0 ? -ENOTEMPTY : rc;
}

static int rmdir_held(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
             ns_is_open_fn is_open, void *ctx)
{
    struct ino_id id;
    uint8_t dtype;
    int rc = check_name(name, nlen);

    if (rc)
        return (nlen == 1 && name[0] == '.') ? -EINVAL : (rc == -EINVAL ? -ENOTEMPTY : rc);
    rc = entry_get(ns, dir, name, nlen, &id, &dtype);
    if (rc)
        return rc;
    if (dtype != DT_DIR)
        return -ENOTDIR;
    rc = claim_empty_dir(ns, &id);
    if (rc)
        return rc;
    rc = remove_entry(ns, dir, name, nlen, &id, dtype, is_open, ctx);
    if (rc) {
        AFTER_COMMIT_ANY(ns, set_dying(ns, &id, 0));
        return rc;
    }
    AFTER_COMMIT_ANY(ns, inode_touch(ns, dir, -1, 1));
    return 0;
}

/* ---- link ---- */

struct new_name {
    const struct ino_id *dir;
    const char *name;
    size_t nlen;
    int same_shard;         /* the entry goes in the inode's batch */
};

/* Change function adding a name to a file (arg: struct new_name). An entry
 * that exists fails the batch with -EEXIST, which ends inode_cas(). */
static int link_change(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct new_name *n = arg;

    (void)ns;
    if (S_ISDIR(ino->mode))
        return -EPERM;
    if (ino->nlink == 0)
        return -ENOENT;
    ino->nlink++;
    inode_bump_ctime(ino);
    if (n->same_shard) {
        batch_entry(b, BATCH_ASSERT_ABSENT, n->dir, n->name, n->nlen, NULL, 0);
        batch_entry(b, BATCH_PUT, n->dir, n->name, n->nlen, &ino->id, dtype_of(ino->mode));
    }
    return INODE_PUT;
}

static int link_held(struct ns *ns, const struct ino_id *id, const struct ino_id *ndir, const char *name,
            size_t nlen, struct inode *out)
{
    struct shard *se = entry_shard(ns, ndir, name, nlen);
    struct new_name n = {ndir, name, nlen, se == inode_shard(ns, id)};
    struct inode parent;
    struct batch b;
    int rc = check_name(name, nlen);

    if (rc)
        return rc;
    rc = parent_check(ns, ndir, &parent);
    if (rc)
        return rc;
    /* Across shards, count the link first: a crash in between leaves nlink
     * too high, never an entry to a freed inode. */
    rc = inode_cas(ns, id, NULL, link_change, &n, out);
    if (rc == 0 && !n.same_shard) {
        batch_init(&b);
        batch_entry(&b, BATCH_ASSERT_ABSENT, ndir, name, nlen, NULL, 0);
        batch_entry(&b, BATCH_PUT, ndir, name, nlen, id, dtype_of(out->mode));
        rc = apply_batch(se, &b);
        if (rc)
            AFTER_COMMIT_ANY(ns, inode_touch(ns, id, -1, 0)); /* undo: the op may run again */
    }
    missing_forget(ns, ndir, name, nlen);
    if (rc == 0)
        AFTER_COMMIT_ANY(ns, inode_touch(ns, ndir, 0, 1));
    return rc;
}

/* ---- rename ---- */

/* 1 if dir is anc or lies below it. Walks parent pointers up to the root. */
static int is_within(struct ns *ns, const struct ino_id *dir, const struct ino_id *anc)
{
    struct ino_id cur = *dir;
    struct inode ino;

    for (int depth = 0; depth < 65536; depth++) {
        if (memcmp(&cur, anc, sizeof(cur)) == 0)
            return 1;
        if (record_id_is_root(&cur))
            return 0;
        if (inode_get(ns, &cur, &ino))
            return 0;
        cur = ino.parent;
    }
    return 1; /* a loop: refuse */
}

struct intent {
    uint8_t kind;                   /* 1 rename, 2 exchange */
    struct ino_id sdir, ddir, sid, did;
    uint8_t stype, dtype;
    uint8_t slen, dlen;
    char sname[RECORD_NAME_MAX + 1], dname[RECORD_NAME_MAX + 1];
};

/* The longest intent_encode() writes: slen and dlen are one byte each. */
_Static_assert(RECORD_INTENT_MAX == 1 + 4 * RECORD_ID_LEN + 2 + 2 * (1 + UINT8_MAX),
               "RECORD_INTENT_MAX is intent_encode()'s longest output");

static size_t intent_encode(uint8_t out[RECORD_INTENT_MAX], const struct intent *in)
{
    uint8_t *p = out;
    *p++ = in->kind;
    memcpy(p, in->sdir.b, 16), p += 16;
    memcpy(p, in->ddir.b, 16), p += 16;
    memcpy(p, in->sid.b, 16), p += 16;
    memcpy(p, in->did.b, 16), p += 16;
    *p++ = in->stype;
    *p++ = in->dtype;
    *p++ = in->slen;
    memcpy(p, in->sname, in->slen), p += in->slen;
    *p++ = in->dlen;
    memcpy(p, in->dname, in->dlen), p += in->dlen;
    return (size_t)(p - out);
}

static int intent_decode(const uint8_t *v, size_t vl, struct intent *in)
{
    const uint8_t *p = v, *e = v + vl;
    if (vl < 1 + 64 + 3)
        return -EIO;
    in->kind = *p++;
    memcpy(in->sdir.b, p, 16), p += 16;
    memcpy(in->ddir.b, p, 16), p += 16;
    memcpy(in->sid.b, p, 16), p += 16;
    memcpy(in->did.b, p, 16), p += 16;
    in->stype = *p++;
    in->dtype = *p++;
    in->slen = *p++;
    if (in->slen == 0 || e - p < in->slen + 1)
        return -EIO;
    memcpy(in->sname, p, in->slen), p += in->slen;
    in->dlen = *p++;
    if (in->dlen == 0 || e - p != in->dlen)
        return -EIO;
    memcpy(in->dname, p, in->dlen);
    return (in->kind == 1 || in->kind == 2) ? 0 : -EIO;
}

/* rename_across's last step on the source's shard: the intent record goes,
 * and (done) the source entry with it (kind 2: it becomes the replaced
 * target's). The shard is looked up each time: AFTER_COMMIT may have
 * learnt a layout that moved both records. */
static int intent_end(struct ns *ns, const struct intent *in, const uint8_t *key, size_t klen,
                      int done)
{
    struct batch b;

    batch_init(&b);
    if (done && in->kind == 2)
        batch_entry(&b, BATCH_PUT, &in->sdir, in->sname, in->slen, &in->did, in->dtype);
    else if (done)
        batch_entry(&b, BATCH_DEL, &in->sdir, in->sname, in->slen, NULL, 0);
    batch_del(&b, key, klen);
    return apply_batch(entry_shard(ns, &in->sdir, in->sname, in->slen), &b);
}

/* Steps 1-3 of a cross-shard rename or exchange (DESIGN). */
static int rename_across(struct ns *ns, struct intent *in)
{
    struct shard *s1 = entry_shard(ns, &in->sdir, in->sname, in->slen);
    struct shard *s2 = entry_shard(ns, &in->ddir, in->dname, in->dlen);
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INTENT_MAX];
    struct ino_id tid;
    struct batch b;
    int have_dst = in->kind == 2 || in->dtype != DT_UNKNOWN;
    int rc;

    record_id_make(&tid, entry_hash(&in->sdir, in->sname, in->slen),
                   atomic_fetch_add(&ns->next_unique, 1));
    size_t klen = record_intent_key(key, &tid);
    batch_init(&b);
    batch_entry(&b, BATCH_ASSERT_VALUE, &in->sdir, in->sname, in->slen, &in->sid, in->stype);
    batch_put(&b, key, klen, val, intent_encode(val, in));
    rc = apply_batch(s1, &b);
    if (rc)
        return rc; /* -EAGAIN: the source changed; ns_rename reads it again */

    batch_init(&b);
    if (have_dst)
        batch_entry(&b, BATCH_ASSERT_VALUE, &in->ddir, in->dname, in->dlen, &in->did, in->dtype);
    else
        batch_entry(&b, BATCH_ASSERT_ABSENT, &in->ddir, in->dname, in->dlen, NULL, 0);
    batch_entry(&b, BATCH_PUT, &in->ddir, in->dname, in->dlen, &in->sid, in->stype);
    rc = apply_batch(s2, &b);
    if (rc) {
        /* roll back step 1 (the intent's shard anew: a split may have moved it) */
        AFTER_COMMIT_ANY(ns, intent_end(ns, in, key, klen, 0));
        return rc; /* -EAGAIN: the target changed; ns_rename reads it again */
    }
    AFTER_COMMIT(ns, rc, intent_end(ns, in, key, klen, 1));
    return rc;
}

static int reparent_mutate(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    (void)ns, (void)b;
    ino->parent = *(const struct ino_id *)arg;
    inode_bump_ctime(ino);
    return 0;
}

/* After a directory moved from odir to ndir: its ".." and the link counts. */
static void fix_moved_dir(struct ns *ns, const struct ino_id *id, const struct ino_id *odir,
                          const struct ino_id *ndir)
{
    AFTER_COMMIT_ANY(ns, inode_cas(ns, id, NULL, reparent_mutate, ndir, NULL));
    if (memcmp(odir, ndir, sizeof(*odir)) != 0) {
        AFTER_COMMIT_ANY(ns, inode_touch(ns, odir, -1, 1));
        AFTER_COMMIT_ANY(ns, inode_touch(ns, ndir, +1, 1));
    }
}

static int rename_exchange(struct ns *ns, struct intent *in)
{
    struct shard *s1 = entry_shard(ns, &in->sdir, in->sname, in->slen);
    struct shard *s2 = entry_shard(ns, &in->ddir, in->dname, in->dlen);
    struct batch b;
    int rc;

    if (in->stype == DT_DIR && is_within(ns, &in->ddir, &in->sid))
        return -EINVAL;
    if (in->dtype == DT_DIR && is_within(ns, &in->sdir, &in->did))
        return -EINVAL;
    if (s1 == s2) {
        batch_init(&b);
        batch_entry(&b, BATCH_ASSERT_VALUE, &in->sdir, in->sname, in->slen, &in->sid, in->stype);
        batch_entry(&b, BATCH_ASSERT_VALUE, &in->ddir, in->dname, in->dlen, &in->did, in->dtype);
        batch_entry(&b, BATCH_PUT, &in->sdir, in->sname, in->slen, &in->did, in->dtype);
        batch_entry(&b, BATCH_PUT, &in->ddir, in->dname, in->dlen, &in->sid, in->stype);
        rc = apply_batch(s1, &b);
        if (rc)
            return rc; /* -EAGAIN: ns_rename reads the names again */
    } else {
        rc = rename_across(ns, in);
        if (rc)
            return rc;
    }
    if (memcmp(&in->sdir, &in->ddir, sizeof(in->sdir)) != 0) {
        if (in->stype == DT_DIR)
            fix_moved_dir(ns, &in->sid, &in->sdir, &in->ddir);
        if (in->dtype == DT_DIR)
            fix_moved_dir(ns, &in->did, &in->ddir, &in->sdir);
    }
    AFTER_COMMIT_ANY(ns, inode_touch(ns, &in->sid, 0, 0));
    AFTER_COMMIT_ANY(ns, inode_touch(ns, &in->did, 0, 0));
    AFTER_COMMIT_ANY(ns, inode_touch(ns, &in->sdir, 0, 1));
    AFTER_COMMIT_ANY(ns, inode_touch(ns, &in->ddir, 0, 1));
    return 0;
}

/* Checks of rename(2) that depend on what the target is. */
static int rename_target_ok(struct ns *ns, struct intent *in)
{
    if (in->dtype == DT_UNKNOWN)
        return 0;
    if (in->stype == DT_DIR && in->dtype != DT_DIR)
        return -ENOTDIR;
    if (in->stype != DT_DIR && in->dtype == DT_DIR)
        return -EISDIR;
    if (in->dtype == DT_DIR)
        return claim_empty_dir(ns, &in->did);
    return 0;
}

/* The source entry (its errors returned) and the target entry (its result
 * in *dst_rc); in one read when both names live on one shard, as rsync's
 * temporary and final names do. */
static int rename_entries_get(struct ns *ns, struct intent *in, int *dst_rc)
{
    uint8_t skey[RECORD_KEY_MAX], dkey[RECORD_KEY_MAX];
    uint8_t sval[RECORD_ENTRY_LEN + 1], dval[RECORD_ENTRY_LEN + 1];
    struct shard *s1 = entry_shard(ns, &in->sdir, in->sname, in->slen);
    struct shard_read r[2] = {
        {.key = skey, .klen = record_entry_key(skey, &in->sdir, in->sname, in->slen),
         .buf = sval, .buflen = sizeof(sval)},
        {.key = dkey, .klen = record_entry_key(dkey, &in->ddir, in->dname, in->dlen),
         .buf = dval, .buflen = sizeof(dval)},
    };
    int rc;

    if (s1 != entry_shard(ns, &in->ddir, in->dname, in->dlen)) {
        rc = entry_get(ns, &in->sdir, in->sname, in->slen, &in->sid, &in->stype);
        if (rc == 0)
            *dst_rc = entry_get(ns, &in->ddir, in->dname, in->dlen, &in->did, &in->dtype);
        return rc;
    }
    rc = shard_get_many(s1, r, 2);
    if (rc == 0)
        rc = r[0].rc ? r[0].rc : record_entry_decode(sval, r[0].len, &in->sid, &in->stype);
    if (rc)
        return rc;
    *dst_rc = r[1].rc ? r[1].rc : record_entry_decode(dval, r[1].len, &in->did, &in->dtype);
    return 0;
}

/* One attempt at a rename: read both entries, check, apply. -EAGAIN when
 * an entry changed between its read and the batch that asserts it (another
 * node renamed over the target, or moved the source): nothing was changed,
 * and the caller reads the entries again. */
static int rename_try(struct ns *ns, struct intent *in, unsigned flags, const struct drop *d)
{
    const struct ino_id *odir = &in->sdir, *ndir = &in->ddir;
    const char *oname = in->sname, *nname = in->dname;
    size_t olen = in->slen, nlen = in->dlen;
    struct inode parent;
    int dst_rc = 0, rc;

    memset(&in->did, 0, sizeof(in->did));
    in->dtype = DT_UNKNOWN;
    rc = rename_entries_get(ns, in, &dst_rc);
    if (rc)
        return rc;
    /* Within one directory the source entry, there until the rename's own
     * batch, keeps the directory alive (rmdir would find it not empty). */
    if (memcmp(odir, ndir, sizeof(*odir)) != 0) {
        rc = parent_check(ns, ndir, &parent);
        if (rc)
            return rc;
    }
    rc = dst_rc;
    if (rc == -ENOENT) {
        in->dtype = DT_UNKNOWN;
        if (flags & NS_RENAME_EXCHANGE)
            return -ENOENT;
    } else if (rc) {
        return rc;
    } else if (flags & NS_RENAME_NOREPLACE) {
        return -EEXIST;
    }
    if (in->dtype != DT_UNKNOWN && memcmp(&in->sid, &in->did, sizeof(in->sid)) == 0)
        return 0; /* two names of one inode: rename(2) does nothing */
    if (in->kind == 2)
        return rename_exchange(ns, in);
    if (in->stype == DT_DIR && is_within(ns, ndir, &in->sid))
        return -EINVAL;
    rc = rename_target_ok(ns, in);
    if (rc)
        return rc;

    struct shard *s1 = entry_shard(ns, odir, oname, olen);
    struct shard *s2 = entry_shard(ns, ndir, nname, nlen);
    int replaced_done = 0, moved_done = 0;
    if (s1 == s2) {
        struct batch b;
        batch_init(&b);
        batch_entry(&b, BATCH_ASSERT_VALUE, odir, oname, olen, &in->sid, in->stype);
        if (in->dtype == DT_UNKNOWN)
            batch_entry(&b, BATCH_ASSERT_ABSENT, ndir, nname, nlen, NULL, 0);
        else
            batch_entry(&b, BATCH_ASSERT_VALUE, ndir, nname, nlen, &in->did, in->dtype);
        batch_entry(&b, BATCH_DEL, odir, oname, olen, NULL, 0);
        batch_entry(&b, BATCH_PUT, ndir, nname, nlen, &in->sid, in->stype);
        if (in->dtype != DT_UNKNOWN && inode_shard(ns, &in->did) == s1) {
            /* The replaced file goes in the same batch: rsync's common case. */
            rc = drop_link_with(ns, &in->did, &b, d);
            replaced_done = 1;
        } else if (in->stype != DT_DIR && inode_shard(ns, &in->sid) == s1) {
            /* The moved file's ctime goes in the same batch: rsync's new
             * files (a temporary name is placed as its final name). */
            struct touch t = {0, 0};
            rc = inode_cas(ns, &in->sid, &b, touch_mutate, &t, NULL);
            if (rc == -ENOENT && batch_assertions_hold(s1, &b) == -EAGAIN)
                rc = -EAGAIN; /* the source was replaced and freed meanwhile */
            moved_done = 1;
        } else {
            rc = shard_apply(s1, &b);
        }
        batch_free(&b);
    } else {
        rc = rename_across(ns, in);
    }
    if (rc == -EEXIST && in->dtype == DT_UNKNOWN && !(flags & NS_RENAME_NOREPLACE))
        rc = -EAGAIN; /* the target was created meanwhile: replace it */
    if (rc) {
        if (in->dtype == DT_DIR)
            set_dying(ns, &in->did, 0);
        return rc;
    }
    /* Only the rename whose batch replaced the target entry gets here for
     * that target, so the replaced inode loses its link exactly once. */
    if (in->dtype != DT_UNKNOWN && !replaced_done)
        AFTER_COMMIT_ANY(ns, drop_link_cas(ns, &in->did, NULL, d));
    if (in->dtype == DT_DIR)
        AFTER_COMMIT_ANY(ns, inode_touch(ns, ndir, -1, 0)); /* the replaced directory's ".." */
    if (in->stype == DT_DIR)
        fix_moved_dir(ns, &in->sid, odir, ndir);
    else if (!moved_done)
        AFTER_COMMIT_ANY(ns, inode_touch(ns, &in->sid, 0, 0));
    AFTER_COMMIT_ANY(ns, inode_touch(ns, odir, 0, 1));
    if (memcmp(odir, ndir, sizeof(*odir)) != 0)
        AFTER_COMMIT_ANY(ns, inode_touch(ns, ndir, 0, 1));
    return 0;
}

static int rename_held(struct ns *ns, const struct ino_id *odir, const char *oname, size_t olen,
              const struct ino_id *ndir, const char *nname, size_t nlen, unsigned flags,
              ns_is_open_fn is_open, void *ctx)
{
    struct intent in;
    /* With other nodes the replaced file stays a while for their readers
     * (DESIGN, "replaced files across nodes"). */
    struct drop d = {is_open, ctx, ns->remote != NULL, 0};
    uint64_t give_up = monotonic_ms() + INODE_CAS_GIVE_UP_MS;
    int rc = check_name(oname, olen);

    if (rc == 0)
        rc = check_name(nname, nlen);
    if (rc)
        return rc;
    if ((flags & NS_RENAME_EXCHANGE) && (flags & NS_RENAME_NOREPLACE))
        return -EINVAL;
    memset(&in, 0, sizeof(in));
    in.kind = flags & NS_RENAME_EXCHANGE ? 2 : 1;
    in.sdir = *odir;
    in.ddir = *ndir;
    in.slen = (uint8_t)olen;
    in.dlen = (uint8_t)nlen;
    memcpy(in.sname, oname, olen);
    memcpy(in.dname, nname, nlen);
    /* Renames over one name from several nodes: each failed try means
     * another rename (or an unlink, a create) of one of the two names went
     * through, so the names are read again and the rename is redone on
     * what they hold now; the last rename wins, as on a local filesystem.
     * A source that is gone by then answers -ENOENT from the read. The same
     * backoff as inode_cas() keeps a node that loses every race going. */
    for (int tries = 0;; tries++) {
        rc = rename_try(ns, &in, flags, &d);
        /* The target name may exist from now on (whatever rc says: a
         * cross-shard rename may be half done); a lookup that raced the
         * rename stores nothing. */
        missing_forget(ns, ndir, nname, nlen);
        if (rc != -EAGAIN)
            break;
        rc = -EIO;
        if (monotonic_ms() >= give_up)
            break;
        if (tries >= INODE_CAS_QUICK_TRIES)
            inode_cas_backoff(tries);
    }
    return rc;
}

/* ---- file data ---- */

static size_t min_sz(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* Copy chunk index idx (or, for an inline file, its tail) into buf, zero-filled
 * to RECORD_CHUNK. Returns the stored length or -errno. */
static int chunk_load(struct ns *ns, const struct inode *ino, uint64_t idx, uint8_t *buf)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t vlen = 0;
    int rc;

    memset(buf, 0, RECORD_CHUNK);
    if (ino->size <= RECORD_INLINE_MAX) {
        if (idx != 0)
            return 0;
        memcpy(buf, ino->tail, ino->tail_len);
        return (int)ino->tail_len;
    }
    if (idx * RECORD_CHUNK >= ino->size)
        return 0; /* none lies wholly past the end (data_resize, fsck) */
    rc = shard_get(inode_shard(ns, &ino->id), key, record_chunk_key(key, &ino->id, idx), 0, buf,
                   RECORD_CHUNK, &vlen);
    if (rc == -ENOENT)
        return 0;
    return rc < 0 ? rc : (int)min_sz(vlen, RECORD_CHUNK);
}

static int sum_value_bytes(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    (void)k, (void)kl, (void)v;
    *(uint64_t *)ctx += vl;
    return 0;
}

/* Change the data of ino to new_size, adding the record changes to b and
 * keeping the rule "inline iff size <= RECORD_INLINE_MAX". */
static int data_resize(struct ns *ns, struct batch *b, struct inode *ino, uint64_t new_size)
{
    uint64_t old = ino->size;
    uint8_t key[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    uint8_t *buf = NULL;
    int rc = 0;

    if (new_size == old)
        return 0;
    if (new_size > FILE_SIZE_MAX)
        return -EFBIG;
    if (old <= RECORD_INLINE_MAX && new_size <= RECORD_INLINE_MAX) {
        if (new_size > ino->tail_len)
            memset(ino->tail + ino->tail_len, 0, new_size - ino->tail_len);
        ino->tail_len = (uint32_t)new_size;
        ino->alloc = new_size;
        goto out;
    }
    buf = malloc(RECORD_CHUNK);
    if (!buf)
        return -ENOMEM;
    if (old <= RECORD_INLINE_MAX) {
        /* inline -> chunks: the tail becomes chunk 0 */
        if (ino->tail_len)
            batch_put(b, key, record_chunk_key(key, &ino->id, 0), ino->tail, ino->tail_len);
        ino->tail_len = 0;
        goto out;
    }
    if (new_size <= RECORD_INLINE_MAX) {
        /* chunks -> inline */
        rc = chunk_load(ns, ino, 0, buf);
        if (rc < 0)
            goto out;
        rc = 0;
        memcpy(ino->tail, buf, new_size);
        ino->tail_len = (uint32_t)new_size;
        ino->alloc = new_size;
        batch_del_owned(b, REC_CHUNK, &ino->id);
        goto out;
    }
    if (new_size < old) {
        uint64_t last = (new_size - 1) / RECORD_CHUNK;
        size_t keep = (size_t)(new_size - last * RECORD_CHUNK);
        size_t kl = record_chunk_key(key, &ino->id, last + 1);
        size_t el = record_id_prefix(end, REC_CHUNK, &ino->id);
        el = record_prefix_end(end, end, el);
        uint64_t gone = 0;
        rc = shard_scan(inode_shard(ns, &ino->id), key, kl, end, el, sum_value_bytes, &gone);
        if (rc < 0)
            goto out;
        batch_add(b, BATCH_DEL_RANGE, key, kl, end, el);
        rc = chunk_load(ns, ino, last, buf);
        if (rc < 0)
            goto out;
        if ((size_t)rc > keep) {
            batch_put(b, key, record_chunk_key(key, &ino->id, last), buf, keep);
            gone += (size_t)rc - keep;
        }
        ino->alloc = ino->alloc > gone ? ino->alloc - gone : 0;
        rc = 0;
    }
out:
    ino->size = new_size;
    free(buf);
    return rc;
}

struct chunk_copy {
    uint64_t off; /* of buf[0] in the file */
    size_t n;
    uint8_t *buf;
};

static int chunk_copy_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct chunk_copy *c = ctx;
    uint64_t start, from, to;

    if (kl < 8 || vl > RECORD_CHUNK)
        return -EIO;
    start = endian_get_be64(k + kl - 8) * RECORD_CHUNK;
    from = start > c->off ? start : c->off;
    to = start + vl < c->off + c->n ? start + vl : c->off + c->n;
    if (from < to)
        memcpy(c->buf + (from - c->off), v + (from - start), (size_t)(to - from));
    return 0;
}

/* Bytes [off, off + n) of a file on another node, in one scan of its chunks
 * (one round trip for up to a scan page, 4 MiB) instead of a get per chunk.
 * Missing chunks are holes. */
static ssize_t read_chunks_scan(struct ns *ns, const struct ino_id *id, uint64_t off, size_t n,
                                void *buf)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_chunk_key(start, id, off / RECORD_CHUNK);
    size_t el = record_chunk_key(end, id, (off + n - 1) / RECORD_CHUNK + 1);
    struct chunk_copy c = {off, n, buf};
    int rc;

    memset(buf, 0, n);
    rc = shard_scan(inode_shard(ns, id), start, sl, end, el, chunk_copy_one, &c);
    return rc < 0 ? rc : (ssize_t)n;
}

/* Chunks a one-trip read (read_one_trip) takes besides the inode. */
#define TRIP_CHUNKS (SHARD_READS_MAX - 1)

/* A chunk of a one-trip read (read_one_trip), starting at byte cs of the
 * file, read into r->buf (rc and len as read; direct: r->buf is buf's own
 * place for it): its part of [off, off + n) into buf, zeros for a hole or
 * past the end of its value. */
static void trip_chunk_copy(const struct shard_read *r, int direct, uint64_t cs, uint64_t off,
                            size_t n, uint8_t *buf)
{
    uint64_t from = cs > off ? cs : off;
    uint64_t to = cs + RECORD_CHUNK < off + n ? cs + RECORD_CHUNK : off + n;
    uint64_t have = r->rc == 0 ? cs + r->len : cs; /* bytes the value holds end here */

    if (from >= to)
        return;
    if (!direct && from < (have < to ? have : to))
        memcpy(buf + (from - off), (const uint8_t *)r->buf + (from - cs),
               (size_t)((have < to ? have : to) - from));
    if (have < to) {
        uint64_t z = have > from ? have : from;
        memset(buf + (z - off), 0, (size_t)(to - z));
    }
}

/* ns_read of a file on another node in one round trip: its inode and the
 * chunks of [off, off + size) in one getv, as of one moment. A chunk that
 * lies wholly in the range is read straight into buf, the others (at most
 * the first and the last) into a slot. The range spans at most TRIP_CHUNKS
 * chunks (one_trip_fits). */
static ssize_t read_one_trip(struct ns *ns, const struct ino_id *id, uint64_t off, size_t size,
                             uint8_t *buf)
{
    uint64_t first = off / RECORD_CHUNK, last = (off + size - 1) / RECORD_CHUNK;
    unsigned nc = (unsigned)(last - first + 1);
    struct shard_read r[SHARD_READS_MAX];
    uint8_t ikey[RECORD_ID_KEY_LEN], ckey[TRIP_CHUNKS][RECORD_CHUNK_KEY_LEN];
    uint8_t *slots = NULL, ival[RECORD_INODE_MAX];
    unsigned direct = 0; /* bit i: chunk i read straight into buf */
    struct inode ino;
    size_t n;
    int rc;

    for (unsigned i = 0; i < nc; i++) {
        uint64_t cs = (first + i) * RECORD_CHUNK;

        direct |= (unsigned)(cs >= off && cs + RECORD_CHUNK <= off + size) << i;
    }
    /* Slots only for the partial first and last chunks: an aligned read
     * (the kernel's read-ahead) needs none. */
    if ((direct & 1) == 0 || (direct >> (nc - 1) & 1) == 0) {
        if (!(slots = malloc(2 * (size_t)RECORD_CHUNK)))
            return -ENOMEM;
    }
    r[0] = (struct shard_read){.key = ikey, .klen = record_inode_key(ikey, id), .buf = ival,
                               .buflen = sizeof(ival)};
    for (unsigned i = 0; i < nc; i++) {
        uint64_t cs = (first + i) * RECORD_CHUNK;

        r[1 + i] = (struct shard_read){
            .key = ckey[i], .klen = record_chunk_key(ckey[i], id, first + i),
            .buf = direct >> i & 1 ? buf + (cs - off) : slots + (i == 0 ? 0 : RECORD_CHUNK),
            .buflen = RECORD_CHUNK};
    }
    rc = shard_get_many(inode_shard(ns, id), r, 1 + nc);
    if (rc == 0 && r[0].rc)
        rc = r[0].rc;
    if (rc == 0 && r[0].vlen > sizeof(ival))
        rc = -EIO;
    if (rc == 0)
        rc = record_inode_decode(ival, r[0].len, id, &ino);
    if (rc)
        goto out;
    if (S_ISDIR(ino.mode) || off >= ino.size || ino.size <= RECORD_INLINE_MAX) {
        rc = (int)ns_read_at(ns, &ino, off, size, buf); /* no chunk is read */
        goto out;
    }
    n = (size_t)min_sz(size, ino.size - off);
    for (unsigned i = 0; i < nc; i++)
        trip_chunk_copy(&r[1 + i], (int)(direct >> i & 1), (first + i) * RECORD_CHUNK, off, n,
                        buf);
    rc = (int)n;
out:
    free(slots);
    return rc;
}

static ssize_t read_held(struct ns *ns, const struct ino_id *id, uint64_t off, size_t size, void *buf)
{
    struct inode ino;
    int rc;

    /* A file on another node: its inode and data in one round trip (two
     * before: the inode, then the chunks), when one getv can carry them. */
    if (size > 0 && inode_is_remote(ns, id) &&
        (off + size - 1) / RECORD_CHUNK - off / RECORD_CHUNK < TRIP_CHUNKS)
        return read_one_trip(ns, id, off, size, buf);
    rc = inode_get(ns, id, &ino);
    return rc ? rc : ns_read_at(ns, &ino, off, size, buf);
}

static ssize_t read_at_held(struct ns *ns, const struct inode *ino, uint64_t off, size_t size, void *buf)
{
    const struct ino_id *id = &ino->id;
    uint8_t key[RECORD_KEY_MAX];
    size_t done = 0, n;
    int rc;

    if (S_ISDIR(ino->mode))
        return -EISDIR;
    if (off >= ino->size)
        return 0;
    n = (size_t)min_sz(size, ino->size - off);
    if (ino->size <= RECORD_INLINE_MAX) {
        size_t have = off < ino->tail_len ? min_sz(n, ino->tail_len - off) : 0;
        memcpy(buf, ino->tail + off, have);
        memset((uint8_t *)buf + have, 0, n - have);
        return (ssize_t)n;
    }
    if (inode_is_remote(ns, id) && off / RECORD_CHUNK != (off + n - 1) / RECORD_CHUNK)
        return read_chunks_scan(ns, id, off, n, buf);
    while (done < n) {
        uint64_t pos = off + done, idx = pos / RECORD_CHUNK;
        size_t in = (size_t)(pos % RECORD_CHUNK), want = min_sz(n - done, RECORD_CHUNK - in);
        rc = shard_get(inode_shard(ns, id), key, record_chunk_key(key, id, idx), in,
                       (uint8_t *)buf + done, want, NULL);
        if (rc == -ENOENT)
            rc = 0; /* a hole */
        if (rc < 0)
            return done ? (ssize_t)done : rc;
        memset((uint8_t *)buf + done + rc, 0, want - (size_t)rc);
        done += want;
    }
    return (ssize_t)done;
}

/* Add the chunk records of writing [off, off+size) to b; *grown gets the
 * change in stored bytes. */
static int write_chunks(struct ns *ns, struct batch *b, const struct inode *ino, uint64_t off,
                        const uint8_t *data, size_t size, int64_t *grown)
{
    uint8_t key[RECORD_KEY_MAX], *buf = NULL;
    size_t done = 0;
    int rc = 0;

    *grown = 0;
    while (done < size) {
        uint64_t pos = off + done, idx = pos / RECORD_CHUNK;
        size_t in = (size_t)(pos % RECORD_CHUNK), n = min_sz(size - done, RECORD_CHUNK - in);
        size_t klen = record_chunk_key(key, &ino->id, idx);
        if (in == 0 && n == RECORD_CHUNK) {
            size_t had = 0;
            /* No chunk lies wholly past the end of the file (a truncate
             * drops them in its batch; fsck checks it), so a write there,
             * every chunk of a file written from start to end, needs no
             * look at the old one: no round trip to a remote shard. */
            if (ino->size > RECORD_INLINE_MAX && idx * RECORD_CHUNK < ino->size) {
                rc = shard_get(inode_shard(ns, &ino->id), key, klen, 0, NULL, 0, &had);
                if (rc < 0 && rc != -ENOENT)
                    goto out;
                if (rc == -ENOENT)
                    had = 0;
                rc = 0;
            } else if (idx == 0) {
                had = ino->tail_len;
            }
            *grown += (int64_t)n - (int64_t)had;
            batch_put(b, key, klen, data + done, n);
        } else {
            if (!buf && !(buf = malloc(RECORD_CHUNK))) {
                rc = -ENOMEM;
                goto out;
            }
            rc = chunk_load(ns, ino, idx, buf);
            if (rc < 0)
                goto out;
            size_t len = (size_t)rc > in + n ? (size_t)rc : in + n;
            /* bytes past the old end of file within the chunk must be zero */
            uint64_t eof_in = ino->size > idx * RECORD_CHUNK ? ino->size - idx * RECORD_CHUNK : 0;
            if (eof_in < len && eof_in < in)
                memset(buf + eof_in, 0, in - eof_in);
            memcpy(buf + in, data + done, n);
            batch_put(b, key, klen, buf, len);
            *grown += (int64_t)len - rc;
            rc = 0;
        }
        done += n;
    }
out:
    free(buf);
    return rc ? rc : b->error;
}

/* Clear set-user-ID, and set-group-ID when group-executable (without that
 * bit it means mandatory locking), as a write or chown by others does. */
static void drop_suidgid(struct inode *ino)
{
    ino->mode &= ~S_ISUID;
    if (ino->mode & S_IXGRP)
        ino->mode &= ~S_ISGID;
}

struct write_args {
    uint64_t off;
    const uint8_t *data;
    size_t size;
    int append, kill_suidgid;
};

/* Change function of a write (arg: struct write_args): the chunks go in the
 * inode's batch, so a write whose inode changed meanwhile changes nothing and
 * is redone on the new size (an append) and the new chunks. */
static int write_change(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct write_args *w = arg;
    uint64_t off = w->append ? ino->size : w->off, end = off + w->size;
    int rc;

    if (!S_ISREG(ino->mode))
        return S_ISDIR(ino->mode) ? -EISDIR : -EINVAL;
    if (end > FILE_SIZE_MAX || end < off)
        return -EFBIG;
    if (end <= RECORD_INLINE_MAX && ino->size <= RECORD_INLINE_MAX) {
        if (end > ino->size)
            data_resize(ns, b, ino, end);
        memcpy(ino->tail + off, w->data, w->size);
        ino->alloc = ino->tail_len;
    } else {
        /* For an inline file chunk_load() serves the tail as chunk 0, so
         * write_chunks() merges it into chunk 0 when the write touches it. */
        int was_inline = ino->size <= RECORD_INLINE_MAX;
        int64_t grown = 0;
        rc = write_chunks(ns, b, ino, off, w->data, w->size, &grown);
        if (rc)
            return rc;
        ino->alloc = (uint64_t)((int64_t)ino->alloc + grown);
        if (was_inline && off >= RECORD_CHUNK && ino->tail_len) {
            uint8_t key[RECORD_KEY_MAX];
            batch_put(b, key, record_chunk_key(key, &ino->id, 0), ino->tail, ino->tail_len);
        }
        if (was_inline)
            ino->tail_len = 0;
        if (end > ino->size)
            ino->size = end;
    }
    inode_bump_ctime(ino);
    ino->mtime = ino->ctime;
    if (w->kill_suidgid)
        drop_suidgid(ino);
    return INODE_PUT;
}

static ssize_t write_held(struct ns *ns, const struct ino_id *id, uint64_t off, const void *data,
                 size_t size, int append, int kill_suidgid, struct inode *after)
{
    struct write_args w = {off, data, size, append, kill_suidgid};
    struct inode ino;
    int rc = inode_cas(ns, id, NULL, write_change, &w, &ino);

    if (rc)
        return rc;
    if (after)
        *after = ino;
    return (ssize_t)size;
}

/* A planned write reads nothing from the store: it starts in a chunk at
 * or past base's end (no old chunk lies there), of a file not inline. */
int ns_write_plannable(const struct inode *base, uint64_t off)
{
    return S_ISREG(base->mode) && base->size > RECORD_INLINE_MAX &&
           off / RECORD_CHUNK * RECORD_CHUNK >= base->size;
}

/* ---- setattr ---- */

/* Change function of setattr (arg: struct ns_setattr); a truncation's chunk
 * changes go in the inode's batch. */
static int setattr_change(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct ns_setattr *sa = arg;
    struct timespec now;
    int rc;

    if ((sa->mask & NS_SET_LINKED) && ino->nlink == 0 && !S_ISDIR(ino->mode))
        return -ENOENT;
    if (sa->mask & NS_SET_REGISTER) {
        batch_register(ns, b, &ino->id);
        if (!(sa->mask & ~(NS_SET_REGISTER | NS_SET_LINKED)))
            return INODE_KEEP; /* an open's read: the record asserted, not changed */
    }
    inode_bump_ctime(ino);
    now = ino->ctime;
    if (sa->mask & NS_SET_MODE)
        ino->mode = (ino->mode & S_IFMT) | (sa->mode & 07777);
    if (sa->mask & NS_SET_UID)
        ino->uid = sa->uid;
    if (sa->mask & NS_SET_GID)
        ino->gid = sa->gid;
    if ((sa->mask & (NS_SET_UID | NS_SET_GID)) && !(sa->mask & NS_SET_MODE) &&
        !S_ISDIR(ino->mode))
        drop_suidgid(ino); /* as chown does */
    if (sa->mask & NS_SET_SIZE) {
        if (S_ISDIR(ino->mode))
            return -EISDIR;
        if (!S_ISREG(ino->mode))
            return -EINVAL;
        rc = data_resize(ns, b, ino, sa->size);
        if (rc)
            return rc;
        ino->mtime = now;
        if (sa->mask & NS_SET_KILL_SUIDGID)
            drop_suidgid(ino);
    }
    if (sa->mask & NS_SET_ATIME_NOW)
        ino->atime = now;
    else if (sa->mask & NS_SET_ATIME)
        ino->atime = sa->atime;
    if (sa->mask & NS_SET_MTIME_NOW)
        ino->mtime = now;
    else if (sa->mask & NS_SET_MTIME)
        ino->mtime = sa->mtime;
    if (sa->mask & NS_SET_CTIME)
        ino->ctime = sa->ctime;
    return INODE_PUT;
}

static int setattr_held(struct ns *ns, const struct ino_id *id, const struct ns_setattr *sa,
               struct inode *out)
{
    return inode_cas(ns, id, NULL, setattr_change, sa, out);
}

/* ---- readdir ---- */

struct readdir_ctx {
    ns_dirent_fn fn;
    void *ctx;
};

static int readdir_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct readdir_ctx *rc = ctx;
    struct ino_id id;
    uint8_t dtype;

    if (kl <= 1 + RECORD_ID_LEN || kl > RECORD_KEY_MAX || record_entry_decode(v, vl, &id, &dtype))
        return 0; /* malformed: fsck's business (and no name is over RECORD_NAME_MAX) */
    return rc->fn(rc->ctx, (const char *)k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN, &id,
                  dtype);
}

static int readdir_held(struct ns *ns, const struct ino_id *dir, ns_dirent_fn fn, void *ctx)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_ENTRY, dir), el = record_prefix_end(end, start, sl);
    struct readdir_ctx rc = {fn, ctx};

    /* Entries are spread over every shard: ask them all at once. */
    return shard_scan_many(ns->uniq, ns->nuniq, start, sl, end, el, readdir_one, &rc);
}

struct readdir_plus_ctx {
    struct ns *ns;
    ns_direntplus_fn fn;
    void *ctx;
    struct inode ino; /* the joined inode, decoded */
};

/* A record of the joined scan: an entry, and the value of 'I' + its id on
 * the entry's shard. That value is the inode only where the inode is placed
 * on that shard (record.h); anywhere else it would be a stray copy. */
static int readdir_plus_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl,
                            const uint8_t *jv, size_t jl)
{
    struct readdir_plus_ctx *rc = ctx;
    const struct inode *ino = NULL;
    struct ino_id id;
    uint8_t dtype;
    uint64_t hash;

    if (kl <= 1 + RECORD_ID_LEN || kl > RECORD_KEY_MAX || record_entry_decode(v, vl, &id, &dtype))
        return 0; /* malformed: fsck's business (and no name is over RECORD_NAME_MAX) */
    if (jv && record_placement(k, kl, &hash) == 0 &&
        shard_at(rc->ns, hash) == inode_shard(rc->ns, &id) && jl <= RECORD_INODE_MAX &&
        record_inode_decode(jv, jl, &id, &rc->ino) == 0) {
        ino = &rc->ino;
        guess_offer(rc->ns, ino);
    }
    return rc->fn(rc->ctx, (const char *)k + 1 + RECORD_ID_LEN, kl - 1 - RECORD_ID_LEN, &id,
                  dtype, ino);
}

static int readdir_plus_held(struct ns *ns, const struct ino_id *dir, ns_direntplus_fn fn, void *ctx)
{
    static const uint8_t inode_type = REC_INODE;
    const struct shard_join join = {.prefix = &inode_type, .plen = 1, .link = RECORD_ID_LEN};
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_ENTRY, dir), el = record_prefix_end(end, start, sl);
    struct readdir_plus_ctx *rc = malloc(sizeof(*rc));
    int err;

    if (!rc)
        return -ENOMEM;
    *rc = (struct readdir_plus_ctx){.ns = ns, .fn = fn, .ctx = ctx};
    err = shard_scan_many_join(ns->uniq, ns->nuniq, start, sl, end, el, &join,
                               readdir_plus_one, rc);
    free(rc);
    return err;
}

/* ns_getattr_many reads at most this many inodes in one go (one round trip
 * per shard, all at once): its buffers take about 4 KiB a read. */
#define GETATTR_WINDOW 128u

/* One read of a window: an inode's key and where its value lands. */
struct getattr_slot {
    uint8_t key[RECORD_ID_KEY_LEN];
    uint8_t val[RECORD_INODE_MAX];
};

/* ids[at..at+n), n <= GETATTR_WINDOW: group the reads by shard, at most
 * SHARD_READS_MAX a group, then read every group at once. */
static int getattr_window(struct ns *ns, const struct ino_id *all, unsigned at, unsigned n,
                          struct getattr_slot *slot, struct shard_read *r, struct shard_reads *g,
                          unsigned *order, ns_inode_fn fn, void *ctx)
{
    const struct ino_id *ids = all + at;
    unsigned ng = 0, k = 0;
    int rc;

    /* Sort the window's indices by shard (n is small: insertion). */
    for (unsigned i = 0; i < n; i++) {
        unsigned j = i;
        uint64_t si = home_of(ns, record_id_hash(&ids[i]));

        while (j > 0 && home_of(ns, record_id_hash(&ids[order[j - 1]])) > si) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    for (unsigned i = 0; i < n; i++) {
        unsigned x = order[i];
        struct shard *sh = inode_shard(ns, &ids[x]);

        if (ng == 0 || g[ng - 1].s != sh || g[ng - 1].n == SHARD_READS_MAX)
            g[ng++] = (struct shard_reads){.s = sh, .r = &r[k]};
        r[k] = (struct shard_read){.key = slot[k].key,
                                   .klen = record_inode_key(slot[k].key, &ids[x]),
                                   .buf = slot[k].val,
                                   .buflen = sizeof(slot[k].val)};
        g[ng - 1].n++;
        k++;
    }
    rc = shard_get_many_fan(g, ng);
    for (unsigned gi = 0, i = 0; rc == 0 && gi < ng; gi++) {
        for (unsigned j = 0; j < g[gi].n; j++, i++) {
            struct shard_read *q = &g[gi].r[j];
            struct inode ino;

            if (g[gi].rc || q->rc || q->vlen > sizeof(slot[0].val) ||
                record_inode_decode(q->buf, q->len, &ids[order[i]], &ino) != 0)
                continue; /* gone, or unreadable now: the caller reads it again */
            guess_note(ns, &ino);
            fn(ctx, at + order[i], &ino);
        }
    }
    return rc;
}

static int getattr_many_held(struct ns *ns, const struct ino_id *ids, unsigned n, ns_inode_fn fn,
                    void *ctx)
{
    struct getattr_slot *slot = malloc(GETATTR_WINDOW * sizeof(*slot));
    struct shard_read *r = malloc(GETATTR_WINDOW * sizeof(*r));
    struct shard_reads *g = malloc(GETATTR_WINDOW * sizeof(*g));
    unsigned *order = malloc(GETATTR_WINDOW * sizeof(*order));
    int rc = slot && r && g && order ? 0 : -ENOMEM;

    for (unsigned at = 0; rc == 0 && at < n; at += GETATTR_WINDOW) {
        unsigned w = n - at < GETATTR_WINDOW ? n - at : GETATTR_WINDOW;

        rc = getattr_window(ns, ids, at, w, slot, r, g, order, fn, ctx);
    }
    free(slot);
    free(r);
    free(g);
    free(order);
    return rc;
}

/* ---- xattrs ---- */

static int xattr_name_ok(const char *name, size_t *nlen)
{
    *nlen = strlen(name);
    if (*nlen == 0)
        return -EINVAL;
    if (*nlen > RECORD_NAME_MAX) /* XATTR_NAME_MAX, the key's room */
        return -ERANGE;
    if (strncmp(name, "user.", 5) == 0 || strncmp(name, "trusted.", 8) == 0)
        return 0;
    return -EOPNOTSUPP;
}

struct xattr_change_args {
    const uint8_t *key;
    size_t klen;
    const void *value;      /* NULL: remove */
    size_t size;
    int flags;              /* XATTR_CREATE, XATTR_REPLACE */
};

/* Change function of setxattr and removexattr (arg: struct
 * xattr_change_args). The xattr goes in the inode's batch with a new ctime,
 * so its presence, read here, still holds when the batch applies (DESIGN at
 * inode_cas()); a name that must be new is asserted absent. */
static int xattr_change(struct ns *ns, struct batch *b, struct inode *ino, const void *arg)
{
    const struct xattr_change_args *x = arg;

    if (!x->value || (x->flags & XATTR_REPLACE)) {
        uint8_t dummy;
        int rc = shard_get(inode_shard(ns, &ino->id), x->key, x->klen, 0, &dummy, 0, NULL);
        if (rc < 0)
            return rc == -ENOENT ? -ENODATA : rc;
    }
    if (!x->value) {
        batch_del(b, x->key, x->klen);
    } else {
        ino->flags &= ~INODE_NO_XATTR;
        if (x->flags & XATTR_CREATE)
            batch_add(b, BATCH_ASSERT_ABSENT, x->key, x->klen, NULL, 0);
        batch_put(b, x->key, x->klen, x->value, x->size);
    }
    inode_bump_ctime(ino);
    return INODE_PUT;
}

static int setxattr_held(struct ns *ns, const struct ino_id *id, const char *name, const void *value,
                size_t size, int flags)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t nlen;
    int rc = xattr_name_ok(name, &nlen);

    if (rc)
        return rc;
    if (size > XATTR_VALUE_MAX)
        return -E2BIG;
    struct xattr_change_args x = {key, record_xattr_key(key, id, name, nlen), value ? value : "",
                                  size, flags};
    return inode_cas(ns, id, NULL, xattr_change, &x, NULL);
}

static ssize_t getxattr_held(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                    size_t size)
{
    uint8_t xkey[RECORD_KEY_MAX], ikey[RECORD_KEY_MAX];
    size_t nlen;
    int rc = xattr_name_ok(name, &nlen);

    /* Unsupported namespaces answer EOPNOTSUPP, not ENODATA: tools such as
     * ls remember that per filesystem and stop asking for every file. */
    if (rc)
        return rc;
    /* The inode comes along (no bytes of it) to tell a missing attribute
     * (ENODATA) from a missing file (ENOENT) in the same read. */
    struct shard_read r[2] = {
        {.key = xkey, .klen = record_xattr_key(xkey, id, name, nlen), .buf = value,
         .buflen = min_sz(size, SHARD_READ_VALUE_MAX)},
        {.key = ikey, .klen = record_inode_key(ikey, id)},
    };
    rc = shard_get_many(inode_shard(ns, id), r, 2);
    if (rc)
        return rc;
    if (r[0].rc == -ENOENT)
        return r[1].rc ? r[1].rc : -ENODATA;
    if (r[0].rc)
        return r[0].rc;
    if (size && r[0].vlen > size)
        return -ERANGE;
    if (size && r[0].len < r[0].vlen)
        return -EIO; /* no attribute value is over SHARD_READ_VALUE_MAX */
    return (ssize_t)r[0].vlen;
}

static ssize_t getxattr_recent_held(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                           size_t size, unsigned max_age_ms)
{
    struct inode ino;
    unsigned age;

    if (guess_recent(ns, id, max_age_ms, &ino, &age) == 0 && (ino.flags & INODE_NO_XATTR)) {
        size_t nlen;
        int rc = xattr_name_ok(name, &nlen);
        return rc ? rc : -ENODATA;
    }
    return ns_getxattr(ns, id, name, value, size);
}

struct xlist {
    char *buf;
    size_t size, used;
};

static int xattr_list_one(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct xlist *xl = ctx;
    size_t n = kl - 1 - RECORD_ID_LEN;

    (void)v, (void)vl;
    if (xl->size && xl->used + n + 1 <= xl->size) {
        memcpy(xl->buf + xl->used, k + 1 + RECORD_ID_LEN, n);
        xl->buf[xl->used + n] = 0;
    }
    xl->used += n + 1;
    return 0;
}

static ssize_t listxattr_held(struct ns *ns, const struct ino_id *id, char *list, size_t size)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_XATTR, id), el = record_prefix_end(end, start, sl);
    struct xlist xl = {list, size, 0};
    struct inode ino;
    int rc = inode_get(ns, id, &ino);

    if (rc)
        return rc;
    rc = shard_scan(inode_shard(ns, id), start, sl, end, el, xattr_list_one, &xl);
    if (rc < 0)
        return rc;
    if (size && xl.used > size)
        return -ERANGE;
    return (ssize_t)xl.used;
}

static int removexattr_held(struct ns *ns, const struct ino_id *id, const char *name)
{
    uint8_t key[RECORD_KEY_MAX];
    size_t nlen;
    int rc = xattr_name_ok(name, &nlen);

    if (rc)
        return rc;
    struct xattr_change_args x = {key, record_xattr_key(key, id, name, nlen), NULL, 0, 0};
    return inode_cas(ns, id, NULL, xattr_change, &x, NULL);
}

/* ---- reap, statfs, sync ---- */

/* With the inode's lock held: delete inode id (read as *ino, nlink 0) and
 * everything it owns. */
static int orphan_delete(struct ns *ns, const struct ino_id *id)
{
    struct batch b;

    batch_init(&b);
    batch_reap(&b, id);
    return apply_batch(inode_shard(ns, id), &b);
}

/* 1 if ino, a file that lost its last name, is still within the time it is
 * kept for other nodes' readers (DESIGN, "replaced files across nodes"). */
static int orphan_keep_left(const struct ns *ns, const struct inode *ino)
{
    struct timespec now = now_ts();
    int64_t lost_ms = (int64_t)ino->ctime.tv_sec * 1000 + ino->ctime.tv_nsec / 1000000;
    int64_t now_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;

    return ns->remote && !S_ISDIR(ino->mode) && now_ms - lost_ms < REPLACED_KEEP_MS;
}

static int reap_held(struct ns *ns, const struct ino_id *id)
{
    uint8_t key[RECORD_KEY_MAX], val[RECORD_INODE_MAX];
    struct inode ino;
    struct batch b;
    int rc, unregistered = 0;

    lock_inode(ns, id);
    rc = inode_get(ns, id, &ino);
    if (rc == 0 && ino.nlink == 0) {
        int keep = orphan_keep_left(ns, &ino);
        batch_init(&b);
        if (keep || openreg_on(ns))
            batch_add(&b, BATCH_ASSERT_VALUE, key, record_inode_key(key, id), val,
                      record_inode_encode(val, &ino));
        batch_unregister(ns, &b, id);
        if (keep) {
            /* The owner of its shard deletes it when the time is over;
             * asserted, so a mark never outlives its inode. */
            batch_put(&b, key, record_orphan_key(key, id), ORPHAN_KEPT, sizeof(ORPHAN_KEPT));
        } else {
            /* Not while another node has it open: its owner's reaper
             * deletes it once none has (ns_reaper_start). */
            if (openreg_on(ns))
                batch_assert_unopened(&b, id);
            batch_reap(&b, id);
        }
        rc = apply_batch(inode_shard(ns, id), &b);
        unregistered = rc == 0;
        if (rc == -EAGAIN || rc == -ENOTEMPTY)
            rc = 0; /* changed meanwhile, or open elsewhere: others decide */
    }
    if (!unregistered && openreg_on(ns)) {
        int r = ns_unregister(ns, id);
        if (rc == 0 || rc == -ENOENT)
            rc = r;
    }
    unlock_inode(ns, id);
    return rc == -ENOENT ? 0 : rc;
}

static int unregister_held(struct ns *ns, const struct ino_id *id)
{
    struct batch b;

    if (!openreg_on(ns))
        return 0;
    batch_init(&b);
    batch_unregister(ns, &b, id);
    return apply_batch(inode_shard(ns, id), &b);
}

static int unregister_many_held(struct ns *ns, const struct ino_id *ids, size_t n, int *rcs)
{
    struct batch *per = NULL;
    int failed = 0;

    if (!openreg_on(ns) || n == 0) {
        memset(rcs, 0, n * sizeof(*rcs));
        return 0;
    }
    per = calloc(ns->nshards, sizeof(*per));
    if (!per)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        batch_unregister(ns, &per[home_of(ns, record_id_hash(&ids[i]))],
                         &ids[i]);
    int relayout = 0;

    for (unsigned s = 0; s < ns->nshards; s++) {
        int rc = per[s].count ? apply_batch(ns->shards[s], &per[s]) : 0;
        for (size_t i = 0; i < n; i++)
            if (home_of(ns, record_id_hash(&ids[i])) == s)
                rcs[i] = rc;
        failed += rc != 0;
        relayout |= rc == -EBADSLT;
    }
    free(per);
    /* a layout to learn first: the drops are safe to make again */
    return relayout ? -EBADSLT : failed ? -EIO : 0;
}

void ns_set_node_alive(struct ns *ns, ns_node_alive_fn fn, void *ctx)
{
    ns->node_alive = fn;
    ns->node_alive_ctx = ctx;
}

void ns_set_leads(struct ns *ns, ns_leads_fn fn, void *ctx)
{
    ns->leads = fn;
    ns->leads_ctx = ctx;
}

/* 1 if the registration (key, val) on inode id is of a process that still
 * runs: this one; or, on another node, presumed so unless the liveness
 * hook says its node is dead (its etcd lease ended). A restarted node
 * drops its previous run's (openreg_drop_stale). In fsck (offline) no
 * process runs. */
static int registration_live(struct ns *ns, const uint8_t *key, size_t klen, const uint8_t *val,
                             size_t vlen)
{
    const char *node = (const char *)key + RECORD_ID_KEY_LEN;
    size_t nlen = klen - RECORD_ID_KEY_LEN;

    if (ns->offline || klen <= RECORD_ID_KEY_LEN || vlen != RECORD_OPEN_VAL_LEN)
        return 0;
    if (nlen == ns->reg_nlen && memcmp(node, ns->reg_node, nlen) == 0)
        return endian_get_le(val, RECORD_OPEN_VAL_LEN) == ns->run_tag;
    if (!ns->node_alive || nlen > CONFIG_NAME_MAX)
        return 1;
    char name[CONFIG_NAME_MAX + 1];
    memcpy(name, node, nlen);
    name[nlen] = 0;
    return ns->node_alive(ns->node_alive_ctx, name) != 0; /* an error: alive */
}

static int statfs_held(struct ns *ns, struct statvfs *st)
{
    if (statvfs(ns->data_dir, st) != 0)
        return -errno;
    st->f_namemax = RECORD_NAME_MAX;
    return 0;
}

static int sync_held(struct ns *ns, const struct ino_id *id)
{
    int rc = 0;

    if (id)
        return shard_sync(inode_shard(ns, id));
    for (unsigned i = 0; i < ns->nuniq; i++) {
        int r = shard_sync(ns->uniq[i]);
        if (r && !rc)
            rc = r;
    }
    return rc;
}

/* ---- recovery ---- */

struct key_list {
    uint8_t (*keys)[RECORD_KEY_MAX + 1];
    uint8_t (*vals)[RECORD_INTENT_MAX]; /* longer values are no intent: passed over */
    size_t *vlens;
    size_t n, cap;
};

static int collect_key(void *ctx, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct key_list *l = ctx;

    if (kl > RECORD_KEY_MAX || vl > sizeof(*l->vals))
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        void *a = realloc(l->keys, cap * sizeof(*l->keys));
        if (!a)
            return -ENOMEM;
        l->keys = a;
        void *b = realloc(l->vals, cap * sizeof(*l->vals));
        if (!b)
            return -ENOMEM;
        l->vals = b;
        void *c = realloc(l->vlens, cap * sizeof(*l->vlens));
        if (!c)
            return -ENOMEM;
        l->vlens = c;
        l->cap = cap;
    }
    l->keys[l->n][0] = (uint8_t)kl;
    memcpy(l->keys[l->n] + 1, k, kl);
    memcpy(l->vals[l->n], v, vl);
    l->vlens[l->n] = vl;
    l->n++;
    return 0;
}

static void key_list_free(struct key_list *l)
{
    free(l->keys);
    free(l->vals);
    free(l->vlens);
    memset(l, 0, sizeof(*l));
}

/* With the inode's lock held: delete orphan id (nlink 0) and everything it
 * owns, unless a live process has it open (registration_live): then 0 and
 * it stays. Registrations of processes gone are dropped first. */
static int orphan_delete_unopened(struct ns *ns, const struct ino_id *id)
{
    uint8_t start[RECORD_KEY_MAX], end[RECORD_KEY_MAX];
    size_t sl = record_id_prefix(start, REC_OPEN, id);
    size_t el = record_prefix_end(end, start, sl);
    struct shard *s = inode_shard(ns, id);
    struct key_list kl_ = {0}, *l = &kl_;
    struct batch b;
    int rc, live = 0;

    if (!openreg_on(ns))
        return orphan_delete(ns, id);
    rc = shard_scan(s, start, sl, end, el, collect_key, l);
    batch_init(&b);
    for (size_t i = 0; rc >= 0 && i < l->n; i++) {
        const uint8_t *k = l->keys[i] + 1;
        size_t kl = l->keys[i][0];
        if (registration_live(ns, k, kl, l->vals[i], l->vlens[i])) {
            live++;
            continue;
        }
        batch_add(&b, BATCH_ASSERT_VALUE, k, kl, l->vals[i], l->vlens[i]);
        batch_del(&b, k, kl);
    }
    key_list_free(l);
    if (rc < 0) {
        batch_free(&b);
        return rc;
    }
    rc = b.count ? apply_batch(s, &b) : (batch_free(&b), 0);
    if (rc || live)
        return rc == -EAGAIN ? 0 : rc; /* changed meanwhile: the next look decides */
    batch_init(&b);
    batch_assert_unopened(&b, id);
    batch_reap(&b, id);
    rc = apply_batch(s, &b);
    return rc == -ENOTEMPTY ? 0 : rc; /* opened meanwhile */
}

static int scan_type(struct ns *ns, unsigned shard, enum record_type t, struct key_list *l)
{
    uint8_t s = (uint8_t)t, e = (uint8_t)(t + 1);
    return shard_scan(ns->shards[shard], &s, 1, &e, 1, collect_key, l);
}

static void reportf(ns_report_fn report, void *ctx, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reportf(ns_report_fn report, void *ctx, const char *fmt, ...)
{
    char line[1024];
    va_list ap;

    if (!report)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    report(ctx, line);
}

static void id_hex(const struct ino_id *id, char out[33])
{
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", id->b[i]);
}

/* Roll an interrupted rename/exchange forward or back (DESIGN). */
static int resolve_intent(struct ns *ns, struct shard *found, const uint8_t *key, size_t klen,
                          const struct intent *in, int dry_run, ns_report_fn report, void *ctx)
{
    struct shard *s1 = entry_shard(ns, &in->sdir, in->sname, in->slen);
    struct ino_id cur;
    uint8_t dtype;
    struct batch b;
    char hex[33];
    int forward = entry_get(ns, &in->ddir, in->dname, in->dlen, &cur, &dtype) == 0 &&
                  memcmp(&cur, &in->sid, sizeof(cur)) == 0;

    id_hex(&in->sid, hex);
    reportf(report, ctx, "interrupted %s of inode %s (%.*s -> %.*s): %s",
            in->kind == 2 ? "exchange" : "rename", hex, in->slen, in->sname, in->dlen, in->dname,
            forward ? "completing it" : "undoing it");
    if (dry_run)
        return 1;
    batch_init(&b);
    if (forward) {
        if (in->kind == 2)
            batch_entry(&b, BATCH_PUT, &in->sdir, in->sname, in->slen, &in->did, in->dtype);
        else if (entry_get(ns, &in->sdir, in->sname, in->slen, &cur, &dtype) == 0 &&
                 memcmp(&cur, &in->sid, sizeof(cur)) == 0)
            batch_entry(&b, BATCH_DEL, &in->sdir, in->sname, in->slen, NULL, 0);
    }
    int rc = apply_batch(s1, &b);
    if (rc == 0) {
        /* the intent goes where it was found (normally s1 too) */
        batch_init(&b);
        batch_del(&b, key, klen);
        rc = apply_batch(found, &b);
    }
    if (rc == 0 && forward && memcmp(&in->sdir, &in->ddir, sizeof(in->sdir)) != 0) {
        /* Step 3 was the last one written, so the moved directories' ".."
         * and their parents' link counts are still the old ones. */
        if (in->stype == DT_DIR)
            fix_moved_dir(ns, &in->sid, &in->sdir, &in->ddir);
        if (in->kind == 2 && in->dtype == DT_DIR)
            fix_moved_dir(ns, &in->did, &in->ddir, &in->sdir);
    }
    return rc ? rc : 1;
}

static int recover_intents(struct ns *ns, int dry_run, ns_report_fn report, void *ctx)
{
    int fixed = 0;

    for (unsigned i = 0; i < ns->nshards; i++) {
        struct key_list l = {0};
        if (!ns_shard_is_local(ns, i) || !ns_is_shard(ns, i))
            continue; /* each node recovers its own shards */
        int rc = scan_type(ns, i, REC_INTENT, &l);
        for (size_t j = 0; rc >= 0 && j < l.n; j++) {
            struct intent in;
            if (intent_decode(l.vals[j], l.vlens[j], &in)) {
                reportf(report, ctx, "shard %u: malformed intent record: %s", i,
                        dry_run ? "would delete" : "deleting");
                struct batch b;
                batch_init(&b);
                batch_del(&b, l.keys[j] + 1, l.keys[j][0]);
                if (!dry_run)
                    apply_batch(ns->shards[i], &b);
                else
                    batch_free(&b);
                fixed++;
                continue;
            }
            rc = resolve_intent(ns, ns->shards[i], l.keys[j] + 1, l.keys[j][0], &in, dry_run,
                                report, ctx);
            if (rc > 0)
                fixed++;
        }
        key_list_free(&l);
        if (rc < 0)
            return rc;
    }
    return fixed;
}

/* fn for every orphan mark on this node's shards: the shard, the mark's key,
 * the inode's id and the mark's value (empty: unlinked while open;
 * ORPHAN_KEPT: kept for other nodes' readers). Stops at fn's first error. */
typedef int (*orphan_fn)(struct ns *ns, unsigned shard, const uint8_t *key, size_t klen,
                         const struct ino_id *id, const uint8_t *val, size_t vlen, void *arg);

/* Whether this node looks after the orphans and kept files of shard i
 * (ns_set_leads): one node a shard, its primary. */
static int looks_after(const struct ns *ns, unsigned i)
{
    return ns->leads ? ns->leads(ns->leads_ctx, i) == 1 : ns_shard_is_local(ns, i);
}

static int orphans_each(struct ns *ns, orphan_fn fn, void *arg)
{
    for (unsigned i = 0; i < ns->nshards; i++) {
        struct key_list l = {0};
        if (!ns_is_shard(ns, i) || !looks_after(ns, i))
            continue;
        int rc = scan_type(ns, i, REC_ORPHAN, &l);
        for (size_t j = 0; rc >= 0 && j < l.n; j++) {
            struct ino_id id;
            if (l.keys[j][0] != 1 + RECORD_ID_LEN)
                continue;
            memcpy(id.b, l.keys[j] + 2, RECORD_ID_LEN);
            rc = fn(ns, i, l.keys[j] + 1, l.keys[j][0], &id, l.vals[j], l.vlens[j], arg);
        }
        key_list_free(&l);
        if (rc < 0)
            return rc;
    }
    return 0;
}

struct recover_args {
    int dry_run, fixed;
    ns_report_fn report;
    void *ctx;
};

/* An orphan mark found by recovery (orphans_each): nobody has the inode
 * open now, and a kept file's readers are gone with the crash that left it,
 * so it goes -- but only if no name refers to it any more (nlink 0); a
 * stray mark on a linked inode is just dropped. */
static int recover_orphan(struct ns *ns, unsigned shard, const uint8_t *key, size_t klen,
                          const struct ino_id *id, const uint8_t *val, size_t vlen, void *arg)
{
    struct recover_args *r = arg;
    struct inode ino;
    struct batch b;
    char hex[33];
    int rc;

    (void)val;
    id_hex(id, hex);
    int got = inode_get(ns, id, &ino) == 0;
    int linked = got && ino.nlink > 0;
    if (got && !linked && !r->dry_run && openreg_on(ns) && !ns->offline && !S_ISDIR(ino.mode)) {
        /* Another node may still have it open (its registration): then it
         * stays, for the reaper to delete once none has. */
        lock_inode(ns, id);
        rc = inode_get(ns, id, &ino) == 0 && ino.nlink == 0 ? orphan_delete_unopened(ns, id) : 0;
        unlock_inode(ns, id);
        return rc;
    }
    reportf(r->report, r->ctx, "inode %s %s: %s", hex,
            linked ? "has a stale orphan mark"
            : vlen ? "was replaced (kept for readers)" : "was unlinked while open",
            r->dry_run ? "would fix" : linked ? "dropping the mark" : "deleting it");
    r->fixed++;
    if (r->dry_run)
        return 0;
    batch_init(&b);
    batch_del(&b, key, klen);
    rc = apply_batch(ns->shards[shard], &b);
    if (rc == 0 && !linked) {
        lock_inode(ns, id);
        if (inode_get(ns, id, &ino) == 0 && ino.nlink == 0)
            rc = orphan_delete(ns, id);
        unlock_inode(ns, id);
    }
    return rc;
}

/* Inodes unlinked while open, or kept, when the daemon stopped. */
static int recover_orphans(struct ns *ns, int dry_run, ns_report_fn report, void *ctx)
{
    struct recover_args r = {dry_run, 0, report, ctx};
    int rc = orphans_each(ns, recover_orphan, &r);

    return rc < 0 ? rc : r.fixed;
}

int ns_recover(struct ns *ns, int dry_run, ns_report_fn report, void *ctx)
{
    int a = recover_intents(ns, dry_run, report, ctx), b;

    if (a < 0)
        return a;
    b = recover_orphans(ns, dry_run, report, ctx);
    return b < 0 ? b : a + b;
}

/* ---- kept files (DESIGN, "replaced files across nodes") ---- */

/* The kept file id on a local shard: deleted when its time is over (or at
 * once with all), unless this process has it open (is_open, asked under the
 * inode's lock: an open counts itself before it reads the inode under that
 * lock, so it is seen here or finds the inode gone), which then deletes it
 * at its last close (ns_reap). A mark on a linked or missing inode is
 * dropped. 0 or -errno (the next scan tries again). */
static int kept_settle(struct ns *ns, const struct ino_id *id, int all, int kept)
{
    uint8_t key[RECORD_KEY_MAX];
    struct inode ino;
    struct batch b;
    int rc;

    lock_inode(ns, id);
    rc = inode_get(ns, id, &ino);
    if (kept && (rc == -ENOENT || (rc == 0 && ino.nlink > 0))) {
        batch_init(&b); /* a stray mark: never made so, but never left either */
        batch_del(&b, key, record_orphan_key(key, id));
        rc = apply_batch(inode_shard(ns, id), &b);
    } else if (rc == 0 && ino.nlink == 0 && (kept || !S_ISDIR(ino.mode)) &&
               (!kept || all || !orphan_keep_left(ns, &ino))) {
        int open = !all && ns->reaper_is_open && ns->reaper_is_open(ns->reaper_ctx, id);
        if (!open)
            rc = orphan_delete_unopened(ns, id); /* not while a live node has it open */
    }
    unlock_inode(ns, id);
    return rc;
}

/* orphans_each: kept_settle for a kept mark (arg: int all). */
static int kept_settle_one(struct ns *ns, unsigned shard, const uint8_t *key, size_t klen,
                           const struct ino_id *id, const uint8_t *val, size_t vlen, void *arg)
{
    int kept = vlen == sizeof(ORPHAN_KEPT) && memcmp(val, ORPHAN_KEPT, vlen) == 0;

    (void)shard, (void)key, (void)klen;
    /* An unlinked file open on another node (an empty mark, made by an
     * unlink that found its registration) goes too once no live node has
     * it open; its last close on the node that marked it deletes it
     * otherwise (ns_reap). */
    if (kept || (vlen == 0 && openreg_on(ns)))
        kept_settle(ns, id, *(const int *)arg, kept); /* an error: the next scan tries again */
    return 0;
}

/* Settle every kept file on this node's shards (kept_settle). */
static void kept_settle_all(struct ns *ns, int all)
{
    orphans_each(ns, kept_settle_one, &all);
}

/* Drop this node's registrations made by an earlier run of it (killed
 * with files open) from shard i; their files go with the reaper of the
 * shard's owner then. 0 or -errno (try again later). */
static int openreg_drop_stale(struct ns *ns, unsigned i)
{
    uint8_t lo = REC_OPEN, hi = REC_OPEN + 1;
    struct key_list l = {0};
    struct batch b;
    int rc = shard_scan(ns->shards[i], &lo, 1, &hi, 1, collect_key, &l);

    batch_init(&b);
    for (size_t j = 0; rc >= 0 && j < l.n; j++) {
        const uint8_t *k = l.keys[j] + 1;
        size_t kl = l.keys[j][0];
        if (kl != RECORD_ID_KEY_LEN + ns->reg_nlen ||
            memcmp(k + RECORD_ID_KEY_LEN, ns->reg_node, ns->reg_nlen) != 0 ||
            registration_live(ns, k, kl, l.vals[j], l.vlens[j]))
            continue;
        batch_add(&b, BATCH_ASSERT_VALUE, k, kl, l.vals[j], l.vlens[j]);
        batch_del(&b, k, kl);
    }
    key_list_free(&l);
    if (rc < 0) {
        batch_free(&b);
        return rc;
    }
    return b.count ? apply_batch(ns->shards[i], &b) : (batch_free(&b), 0);
}

/* openreg_drop_stale on the other nodes' shards still to do, but not on a
 * node marked down (a try waits up to timeout_ms); between shards, a stop
 * ends it. */
static void openreg_drop_stale_remote(struct ns *ns)
{
    for (unsigned i = 0; ns->reg_stale && i < ns->nshards; i++) {
        time_t since;
        int stop;
        pthread_mutex_lock(&ns->reaper_lock);
        stop = ns->reaper_stop;
        pthread_mutex_unlock(&ns->reaper_lock);
        if (stop)
            return;
        if (!ns->reg_stale[i] || !ns_is_shard(ns, i) || remote_node_down(ns->remote, config_shard_owner(ns->cfg, i), &since) == 1)
            continue;
        if (openreg_drop_stale(ns, i) == 0)
            ns->reg_stale[i] = 0;
    }
}

static void *reaper_main(void *arg)
{
    struct ns *ns = arg;
    unsigned looks = 0;

    pthread_mutex_lock(&ns->reaper_lock);
    while (!ns->reaper_stop) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        t.tv_sec += REAPER_SCAN_MS / 1000;
        t.tv_nsec += (REAPER_SCAN_MS % 1000) * 1000000L;
        if (t.tv_nsec >= 1000000000L)
            t.tv_sec++, t.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&ns->reaper_cond, &ns->reaper_lock, &t);
        if (ns->reaper_stop)
            break;
        pthread_mutex_unlock(&ns->reaper_lock);
        ns_hold(ns);
        if (++looks % REG_STALE_EVERY == 1)
            openreg_drop_stale_remote(ns);
        kept_settle_all(ns, 0);
        ns_unhold(ns);
        pthread_mutex_lock(&ns->reaper_lock);
    }
    pthread_mutex_unlock(&ns->reaper_lock);
    return NULL;
}

int ns_reaper_start(struct ns *ns, ns_is_open_fn is_open, void *ctx)
{
    pthread_condattr_t ca;
    sigset_t all, old;
    int rc;

    if (!ns->remote || ns->reaper_running)
        return 0; /* a single node deletes a replaced file at once */
    ns->reaper_is_open = is_open;
    ns->reaper_ctx = ctx;
    ns->reaper_stop = 0;
    pthread_mutex_init(&ns->reaper_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ns->reaper_cond, &ca);
    pthread_condattr_destroy(&ca);
    /* Signals belong to the main thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&ns->reaper, NULL, reaper_main, ns);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        pthread_cond_destroy(&ns->reaper_cond);
        pthread_mutex_destroy(&ns->reaper_lock);
        return -rc;
    }
    pthread_setname_np(ns->reaper, "shardfs-reaper");
    ns->reaper_running = 1;
    return 0;
}

/* Stop and join the reaper thread, if it runs. */
static void reaper_join(struct ns *ns)
{
    if (!ns->reaper_running)
        return;
    pthread_mutex_lock(&ns->reaper_lock);
    ns->reaper_stop = 1;
    pthread_cond_signal(&ns->reaper_cond);
    pthread_mutex_unlock(&ns->reaper_lock);
    pthread_join(ns->reaper, NULL);
    pthread_cond_destroy(&ns->reaper_cond);
    pthread_mutex_destroy(&ns->reaper_lock);
    ns->reaper_running = 0;
}

void ns_reaper_stop(struct ns *ns)
{
    if (!ns || !ns->reaper_running)
        return;
    reaper_join(ns);
    ns_hold(ns);
    kept_settle_all(ns, 1);
    ns_unhold(ns);
}

/* ---- open and close ---- */

/* Each shard records its index and the store's shard count. */
static int shard_meta_check(struct ns *ns, unsigned i, char *err, size_t errlen)
{
    static const char key[] = "Mshard";
    uint8_t val[8], want[8];
    size_t vlen = 0;
    int rc;

    /* The count of a uniform layout at the shard's depth: a store made
     * before layouts wrote the same. */
    for (int k = 0; k < 4; k++) {
        want[k] = (uint8_t)(i >> (8 * k));
        want[4 + k] = (uint8_t)((1u << ns->depth[i]) >> (8 * k));
    }
    rc = shard_get(ns->shards[i], key, sizeof(key) - 1, 0, val, sizeof(val), &vlen);
    if (rc == -ENOENT) {
        struct batch b;
        batch_init(&b);
        batch_put(&b, key, sizeof(key) - 1, want, sizeof(want));
        rc = apply_batch(ns->shards[i], &b);
    } else if (rc >= 0 && (vlen != 8 || memcmp(val, want, ns->cfg->etcd[0] ? 4 : 8) != 0)) {
        /* with etcd the map holds the depths (a change killed between its
         * txn and the shard's Mshard leaves the count behind): the index */
        snprintf(err, errlen, "shard %u: its data belongs to another shard or shard count", i);
        rc = -EINVAL;
    }
    if (rc < 0 && !err[0])
        snprintf(err, errlen, "shard %u: %s", i, strerror(-rc));
    return rc < 0 ? rc : 0;
}

/* Fill the slots of shallower shards and the list of distinct shards, once
 * every shard is open. */
static int shards_index(struct ns *ns)
{
    for (unsigned i = 0; i < ns->nshards; i++)
        if (!ns_is_shard(ns, i))
            ns->shards[i] = ns->shards[i & ((1u << ns->depth[i]) - 1)];
    ns->uniq = calloc(CONFIG_MAX_SHARDS, sizeof(*ns->uniq));
    if (!ns->uniq)
        return -ENOMEM;
    uniq_rebuild(ns);
    return 0;
}

static int root_ensure(struct ns *ns)
{
    struct inode root;
    struct batch b;
    int rc = inode_get(ns, &record_root_id, &root);

    if (rc != -ENOENT)
        return rc;
    record_root_init(&root);
    batch_init(&b);
    batch_put_inode(&b, &root);
    return apply_batch(inode_shard(ns, &record_root_id), &b);
}

static int learn_layout(void *ctx);
static void probe_layout(struct ns *ns);

int ns_open(const struct config *cfg, int node, unsigned flags, const struct store_lock_opts *lock,
            struct ns **out, char *err, size_t errlen)
{
    static const struct store_lock_opts no_wait = {0};
    struct ns *ns = calloc(1, sizeof(*ns));
    struct shard_lmdb_options opt = {.commit_interval_ms = cfg->commit_interval_ms};
    uint64_t seed;
    int rc;

    err[0] = 0;
    if (!ns)
        return -ENOMEM;
    ns->cfg = cfg;
    ns->node = node;
    ns->lock_fd = -1;
    ns->nshards = cfg->shard_count;
    ns->offline = (flags & NS_OPEN_NO_RECOVER) != 0;
    snprintf(ns->data_dir, sizeof(ns->data_dir), "%s", cfg->nodes[node].data_dir);
    ns->reg_nlen = strnlen(cfg->nodes[node].name, CONFIG_NAME_MAX);
    memcpy(ns->reg_node, cfg->nodes[node].name, ns->reg_nlen);
    for (int i = 0; i < LOCK_STRIPES; i++)
        pthread_mutex_init(&ns->stripes[i], NULL);
    pthread_mutex_init(&ns->missing_lock, NULL);
    layout_lock_init(ns);
    ns->guesses = calloc(LOCK_STRIPES * GUESS_WAYS, sizeof(*ns->guesses));
    ns->missing = calloc(MISSING_SLOTS, sizeof(*ns->missing));
    if (!ns->guesses || !ns->missing) {
        rc = -ENOMEM;
        goto fail;
    }
    if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed))
        seed = (uint64_t)now_ts().tv_nsec * 2654435761u ^ (uint64_t)getpid();
    atomic_init(&ns->next_unique, seed);
    if (getrandom(&ns->run_tag, sizeof(ns->run_tag), 0) != sizeof(ns->run_tag))
        ns->run_tag = seed ^ ((uint64_t)getpid() << 32);
    memcpy(ns->depth, cfg->depth, sizeof(ns->depth));
    ns->shards = calloc(CONFIG_MAX_SHARDS, sizeof(*ns->shards)); /* a split adds slots */
    ns->replicas = calloc(CONFIG_MAX_SHARDS, sizeof(*ns->replicas));
    if (!ns->shards || !ns->replicas) {
        rc = -ENOMEM;
        goto fail;
    }
    if (mkdir(ns->data_dir, 0755) == 0) {
        rc = durable_sync_parent(ns->data_dir);
        if (rc) {
            snprintf(err, errlen, "%s: %s", ns->data_dir, strerror(-rc));
            goto fail;
        }
    } else if (errno != EEXIST) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", ns->data_dir, strerror(errno));
        goto fail;
    }
    rc = store_lock_acquire(ns->data_dir, lock ? lock : &no_wait, &ns->lock_fd, err, errlen);
    if (rc)
        goto fail;
    if (store_layout_check(cfg, node, err, errlen)) {
        rc = -EINVAL;
        goto fail;
    }
    rc = store_layout_create(cfg, node);
    if (rc) {
        snprintf(err, errlen, "%s/STORE: %s", ns->data_dir, strerror(-rc));
        goto fail;
    }
    /* Before any shard changes: a serving open marks the store running. */
    rc = runmark_begin(ns->data_dir, !(flags & NS_OPEN_NO_RECOVER), &ns->last_run);
    if (rc) {
        snprintf(err, errlen, "%s/RUNNING: %s", ns->data_dir, strerror(-rc));
        goto fail;
    }
    /* The mark of an unclean stop stays until a repair (ns_repaired()). */
    ns->clear_mark = !(flags & NS_OPEN_NO_RECOVER) && ns->last_run == RUNMARK_CLEAN;
    for (unsigned i = 0; i < ns->nshards; i++) {
        char dir[PATH_MAX + 32];
        if (!ns_is_shard(ns, i))
            continue; /* a slot of a shallower shard: set below */
        if (!ns_shard_is_local(ns, i)) {
            if (!ns->remote) {
                rc = remote_new(cfg, node, &ns->remote, err, errlen);
                if (rc)
                    goto fail;
            }
            rc = shard_remote_open(ns->remote, i, &ns->shards[i]);
            if (rc) {
                snprintf(err, errlen, "shard %u: %s", i, strerror(-rc));
                goto fail;
            }
            continue;
        }
        snprintf(dir, sizeof(dir), "%s/shard-%u", ns->data_dir, i);
        /* A change stream only where replicas read it: it keeps a second
         * copy of every batch in LMDB (1.7x the time of a large write). */
        opt.no_stream = cfg->nreplicas[i] == 0;
        rc = shard_lmdb_open(dir, i, &opt, &ns->shards[i], err, errlen);
        opt.no_stream = 0;
        if (rc == 0)
            rc = shard_meta_check(ns, i, err, errlen);
        if (rc)
            goto fail;
    }
    /* A replica is a copy of another node's shard, kept by the replica-sync
     * thread (replica_sync.h): opened here, in the directory a primary of
     * it would use (a promotion keeps the data), but never written by the
     * namespace, which reaches the shard at its primary. */
    for (unsigned i = 0; i < ns->nshards; i++) {
        char dir[PATH_MAX + 32];

        if (!ns_is_shard(ns, i) || !holds_replica(cfg, node, i))
            continue;
        snprintf(dir, sizeof(dir), "%s/shard-%u", ns->data_dir, i);
        rc = shard_lmdb_open(dir, i, &opt, &ns->replicas[i], err, errlen);
        if (rc)
            goto fail;
    }
    rc = shards_index(ns);
    if (rc)
        goto fail;
    /* A cluster without a shard map learns the layout of the other nodes'
     * shards from them (above), before recovery reaches them. */
    if (ns->remote && store_layout_static(cfg)) {
        ns->relayout = learn_layout;
        ns->relayout_ctx = ns;
        probe_layout(ns);
    }
    /* The root lives on shard 0; its owner creates it. */
    rc = ns_shard_is_local(ns, 0) ? root_ensure(ns) : 0;
    if (rc == 0 && !(flags & NS_OPEN_NO_RECOVER))
        rc = ns_recover(ns, 0, NULL, NULL);
    if (rc >= 0 && !ns->offline && openreg_on(ns)) {
        /* What this node had open when it was killed is open no more: its
         * own shards now, the others' from the reaper thread (they may be
         * down at this moment). */
        ns->reg_stale = calloc(CONFIG_MAX_SHARDS, 1);
        for (unsigned i = 0; ns->reg_stale && i < ns->nshards; i++)
            ns->reg_stale[i] = ns_is_shard(ns, i) &&
                               (!ns_shard_is_local(ns, i) || openreg_drop_stale(ns, i) != 0);
    }
    if (rc < 0) {
        snprintf(err, errlen, "%s: recovery: %s", ns->data_dir, strerror(-rc));
        goto fail;
    }
    *out = ns;
    return 0;
fail:
    ns_close(ns);
    return rc;
}

void ns_close(struct ns *ns)
{
    if (!ns)
        return;
    reaper_join(ns); /* without ns_reaper_stop(): its is_open may be gone */
    for (unsigned i = 0; ns->shards && i < ns->nshards; i++)
        if (ns_is_shard(ns, i))
            shard_close(ns->shards[i]);
    for (unsigned i = 0; ns->replicas && i < ns->nshards; i++)
        shard_close(ns->replicas[i]);
    free(ns->uniq);
    free(ns->replicas);
    if (ns->clear_mark)
        runmark_end(ns->data_dir); /* every local shard is committed and synced */
    free(ns->shards);
    remote_free(ns->remote);
    if (ns->lock_fd >= 0)
        close(ns->lock_fd);
    for (int i = 0; i < LOCK_STRIPES; i++)
        pthread_mutex_destroy(&ns->stripes[i]);
    pthread_mutex_destroy(&ns->missing_lock);
    pthread_rwlock_destroy(&ns->layout_lock);
    free(ns->guesses);
    free(ns->missing);
    free(ns->reg_stale);
    free(ns);
}

/* ---- the operations, each with the layout held (ns_hold) ----
 *
 * A shard whose node has another layout refuses an op with -EBADSLT before
 * doing anything (wire.h, "Layouts": a split or merge moved keys and this
 * process has not heard yet). The outermost operation of a thread then
 * learns the layout anew (ns_set_relayout) and runs again (a listing tells
 * its callback to start again first: namespace.h); a nested one passes the
 * error up, and nobody outside sees -EBADSLT. */

#define NS_RELAYOUT_TRIES 4

/* After an operation returned *rc: 1 to run it again (the layout was
 * learnt anew, and the op may run twice: restartable). Otherwise 0, and an
 * -EBADSLT left in *rc becomes -EIO, the layout learnt all the same. */
static int ns_again(struct ns *ns, int *rc, unsigned tries, int restartable)
{
    if (*rc != -EBADSLT || held_ns == ns)
        return 0;
    /* Nothing new to learn is no proof: another thread may have learnt it
     * between this op's refusal and now. So again, a few times. */
    if (ns->relayout && restartable && tries < NS_RELAYOUT_TRIES) {
        ns->relayout(ns->relayout_ctx);
        return 1;
    }
    fprintf(stderr, "shardfs: a shard refused an operation %u times for another layout%s\n",
            tries + 1, ns->relayout ? "" : ", and nothing here can learn it");
    *rc = -EIO;
    return 0;
}

/* A step after the commit point (AFTER_COMMIT) that a shard refused for
 * another layout: in the outermost operation, let go of the layout, learn
 * it, take it again, and say 1 (do the step again: it routes anew). The
 * step holds no inode lock between its calls (inode_cas takes and drops
 * its own), so letting go cannot block a cut-over's pause. Nested, or
 * after NS_RELAYOUT_TRIES, 0: the error goes up as it is. */
static int step_again(struct ns *ns, int rc, unsigned *tries)
{
    if (rc != -EBADSLT || held_ns != ns || held_depth != 1 || !ns->relayout ||
        (*tries)++ >= NS_RELAYOUT_TRIES)
        return 0;
    ns_unhold(ns);
    ns->relayout(ns->relayout_ctx);
    ns_hold(ns);
    return 1;
}

/* ---- learning the layout of other nodes' shards (static clusters) ----
 *
 * In a cluster without a shard map, each node is the authority on the
 * layout of its own shards (its DATA_DIR/STORE); a split puts the new shard
 * beside the old one. Other processes learn a change from the refusals of
 * its node (wire.h, "Layouts": the remote layer keeps the depth a 421
 * gave, remote_told_depth) and at open, by probing each remote shard with
 * a read that names no record. */

/* Split (told deeper) or merge (told shallower) remote shard i of the
 * layout once toward what its node told. 1 if the layout changed, 0 if
 * not, -errno. Operations quiesced. */
static int learn_shard(struct ns *ns, unsigned i)
{
    int told = remote_told_depth(ns->remote, i);
    unsigned d = ns->depth[i], t, low, up;
    struct shard *sh, *gone;
    int rc;

    if (told < 0 || (unsigned)told == d)
        return 0;
    if ((unsigned)told > d) {
        t = i + (1u << d);
        if ((2u << d) > CONFIG_MAX_SHARDS)
            return -ERANGE;
        rc = shard_remote_open(ns->remote, t, &sh);
        if (rc)
            return rc;
        rc = ns_layout_split(ns, i, sh);
        if (rc) {
            shard_close(sh);
            return rc;
        }
        remote_depth_set(ns->remote, t, d + 1);
        remote_depth_set(ns->remote, i, d + 1);
        return 1;
    }
    low = i & ~(1u << (d - 1));
    up = low + (1u << (d - 1));
    if (!ns_is_shard(ns, low) || !ns_is_shard(ns, up) || ns->depth[low] != d ||
        ns->depth[up] != d || ns_shard_is_local(ns, low) || ns_shard_is_local(ns, up))
        return 0; /* the buddy is split further: its own refusals come first */
    gone = ns_layout_merge(ns, low);
    if (!gone)
        return 0;
    shard_close(gone);
    remote_depth_set(ns->remote, low, d - 1);
    remote_depth_set(ns->remote, up, d - 1); /* forget what up was told */
    return 1;
}

/* Apply what the remote shards' nodes told, until nothing changes. 0 when
 * the layout changed, -ENOENT when there was nothing to learn. */
static int learn_layout(void *ctx)
{
    struct ns *ns = ctx;
    int changed = 0, rc = 0;

    ns_quiesce(ns);
    for (int again = 1; again && rc >= 0;) {
        again = 0;
        for (unsigned i = 0; i < ns->nshards && rc >= 0; i++) {
            if (!ns_is_shard(ns, i) || ns_shard_is_local(ns, i))
                continue;
            rc = learn_shard(ns, i);
            if (rc > 0)
                again = changed = 1;
        }
    }
    ns_unquiesce(ns);
    if (changed)
        fprintf(stderr, "shardfs: learnt a new shard layout from another node (%u slots)\n",
                ns->nshards);
    return changed ? 0 : rc < 0 ? rc : -ENOENT;
}

/* At open: ask every remote shard, by a read that names no record (a
 * node refuses it only for another depth), then learn. Nodes that are
 * down tell nothing; their shards are learnt when they answer. */
static void probe_layout(struct ns *ns)
{
    uint8_t buf[1];
    size_t vlen;

    for (int round = 0; round < 8; round++) {
        int told = 0;

        for (unsigned i = 0; i < ns->nshards; i++)
            if (ns_is_shard(ns, i) && !ns_shard_is_local(ns, i) &&
                shard_get(ns->shards[i], "M", 1, 0, buf, 0, &vlen) == -EBADSLT)
                told = 1;
        if (!told || learn_layout(ns) != 0)
            return;
    }
}

void ns_set_relayout(struct ns *ns, ns_relayout_fn fn, void *ctx)
{
    ns->relayout = fn;
    ns->relayout_ctx = ctx;
}

int ns_getattr_recent(struct ns *ns, const struct ino_id *id, unsigned max_age_ms,
                      struct inode *out, unsigned *age_ms)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = getattr_recent_held(ns, id, max_age_ms, out, age_ms);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_getattr_ordered(struct ns *ns, const struct ino_id *id, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = getattr_ordered_held(ns, id, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_getattr(struct ns *ns, const struct ino_id *id, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = getattr_held(ns, id, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_lookup_id(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                 struct ino_id *id, uint8_t *dtype)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = lookup_id_held(ns, dir, name, nlen, id, dtype);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_lookup(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = lookup_held(ns, dir, name, nlen, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_lookup_recent(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                     unsigned max_age_ms, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = lookup_recent_held(ns, dir, name, nlen, max_age_ms, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_mknode(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen, uint32_t mode,
              uint32_t rdev, uint32_t uid, uint32_t gid, const char *target, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = mknode_held(ns, dir, name, nlen, mode, rdev, uid, gid, target, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_create_open(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
                   uint32_t mode, uint32_t uid, uint32_t gid, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = create_open_held(ns, dir, name, nlen, mode, uid, gid, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_unlink(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
              ns_is_open_fn is_open, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = unlink_held(ns, dir, name, nlen, is_open, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_rmdir(struct ns *ns, const struct ino_id *dir, const char *name, size_t nlen,
             ns_is_open_fn is_open, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = rmdir_held(ns, dir, name, nlen, is_open, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_link(struct ns *ns, const struct ino_id *id, const struct ino_id *ndir, const char *name,
            size_t nlen, struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = link_held(ns, id, ndir, name, nlen, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_rename(struct ns *ns, const struct ino_id *odir, const char *oname, size_t olen,
              const struct ino_id *ndir, const char *nname, size_t nlen, unsigned flags,
              ns_is_open_fn is_open, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = rename_held(ns, odir, oname, olen, ndir, nname, nlen, flags, is_open, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

ssize_t ns_read(struct ns *ns, const struct ino_id *id, uint64_t off, size_t size, void *buf)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = read_held(ns, id, off, size, buf);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

ssize_t ns_read_at(struct ns *ns, const struct inode *ino, uint64_t off, size_t size, void *buf)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = read_at_held(ns, ino, off, size, buf);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

static ssize_t write_again(struct ns *ns, const struct ino_id *id, uint64_t off, const void *data,
                           size_t size, int append, int kill_suidgid, struct inode *after)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = write_held(ns, id, off, data, size, append, kill_suidgid, after);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

ssize_t ns_write(struct ns *ns, const struct ino_id *id, uint64_t off, const void *data,
                 size_t size, int append, int kill_suidgid, uint64_t *new_size)
{
    struct inode after;
    ssize_t rc = write_again(ns, id, off, data, size, append, kill_suidgid, &after);

    if (rc >= 0 && new_size)
        *new_size = after.size;
    return rc;
}

ssize_t ns_write_ino(struct ns *ns, const struct ino_id *id, uint64_t off, const void *data,
                     size_t size, struct inode *after)
{
    return write_again(ns, id, off, data, size, 0, 0, after);
}

int ns_write_plan(struct ns *ns, const struct inode *base, uint64_t off, const void *data,
                  size_t size, int behind, struct batch *b, struct inode *after)
{
    struct write_args w = {off, data, size, 0, 0};
    uint8_t key[RECORD_KEY_MAX], old[RECORD_INODE_MAX];
    int rc;

    if (!ns_write_plannable(base, off))
        return -EINVAL;
    *after = *base;
    batch_init(b);
    /* Awaited when the batch before it may be in flight still. */
    batch_add(b, behind ? BATCH_AWAIT_VALUE : BATCH_ASSERT_VALUE, key,
              record_inode_key(key, &base->id), old,
              record_inode_encode(old, base));
    rc = write_change(ns, b, after, &w); /* reads nothing: ns_write_plannable */
    if (rc == INODE_PUT) {
        batch_put_inode(b, after);
        rc = b->error;
    } else if (rc >= 0) {
        rc = -EIO; /* a write always puts the inode */
    }
    if (rc)
        batch_free(b);
    return rc;
}

int ns_write_planned(struct ns *ns, struct batch *b, const struct inode *after)
{
    int rc;

    ns_hold(ns);
    rc = shard_apply(inode_shard(ns, &after->id), b);
    ns_unhold(ns);
    batch_free(b);
    if (rc == 0)
        guess_advance(ns, after);
    return rc;
}

int ns_setattr(struct ns *ns, const struct ino_id *id, const struct ns_setattr *sa,
               struct inode *out)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = setattr_held(ns, id, sa, out);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_readdir(struct ns *ns, const struct ino_id *dir, ns_dirent_fn fn, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        if (tries && fn(ctx, NULL, 0, NULL, 0) != 0) /* the listing starts again */
            break;
        ns_hold(ns);
        rc = readdir_held(ns, dir, fn, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_readdir_plus(struct ns *ns, const struct ino_id *dir, ns_direntplus_fn fn, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        if (tries && fn(ctx, NULL, 0, NULL, 0, NULL) != 0) /* the listing starts again */
            break;
        ns_hold(ns);
        rc = readdir_plus_held(ns, dir, fn, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_getattr_many(struct ns *ns, const struct ino_id *ids, unsigned n, ns_inode_fn fn, void *ctx)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = getattr_many_held(ns, ids, n, fn, ctx);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1)); /* fn(ctx, i, ...) again is the same */
    return rc;
}

int ns_setxattr(struct ns *ns, const struct ino_id *id, const char *name, const void *value,
                size_t size, int flags)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = setxattr_held(ns, id, name, value, size, flags);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

ssize_t ns_getxattr(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                    size_t size)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = getxattr_held(ns, id, name, value, size);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

ssize_t ns_getxattr_recent(struct ns *ns, const struct ino_id *id, const char *name, void *value,
                           size_t size, unsigned max_age_ms)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = getxattr_recent_held(ns, id, name, value, size, max_age_ms);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

ssize_t ns_listxattr(struct ns *ns, const struct ino_id *id, char *list, size_t size)
{
    unsigned tries = 0;
    ssize_t rc;
    int e;

    do {
        ns_hold(ns);
        rc = listxattr_held(ns, id, list, size);
        ns_unhold(ns);
        e = rc < 0 ? (int)rc : 0;
    } while (ns_again(ns, &e, tries++, 1));
    return e < 0 ? e : rc;
}

int ns_removexattr(struct ns *ns, const struct ino_id *id, const char *name)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = removexattr_held(ns, id, name);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_reap(struct ns *ns, const struct ino_id *id)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = reap_held(ns, id);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_unregister(struct ns *ns, const struct ino_id *id)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = unregister_held(ns, id);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_unregister_many(struct ns *ns, const struct ino_id *ids, size_t n, int *rcs)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = unregister_many_held(ns, ids, n, rcs);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_statfs(struct ns *ns, struct statvfs *st)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = statfs_held(ns, st);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}

int ns_sync(struct ns *ns, const struct ino_id *id)
{
    unsigned tries = 0;
    int rc;

    do {
        ns_hold(ns);
        rc = sync_held(ns, id);
        ns_unhold(ns);
    } while (ns_again(ns, &rc, tries++, 1));
    return rc;
}
