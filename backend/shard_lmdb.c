/* shard_lmdb.c -- a shard in one LMDB environment (see shard_lmdb.h DESIGN).
 *
 * Layout of a shard directory:
 *   data.mdb   the LMDB environment (one unnamed database; MDB_NOLOCK)
 *   redo.log   the two redo logs, used in turns (see shard_lmdb.h): batches
 *   redo2.log  applied since the last commit that is surely on disk, one
 *              record each:
 *              magic:u32le len:u32le seq:u64le check:u64le payload[len]
 *              check = XXH3_64(payload, seed = seq)
 *   reserve    a small preallocated file given up when a commit runs short
 *   The key "Mseq" inside LMDB holds the last log sequence number that the
 *   committed state contains.
 *
 * Everything below runs under struct shard_lmdb.lock: LMDB write transactions
 * allow one user at a time, and the long-lived transaction is what readers
 * read. A per-shard flusher thread commits every commit_interval_ms.
 */
#include "shard_lmdb.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <lmdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "durable.h"
#include "endian.h"

#define LOG_MAGIC 0x474f4c53u /* "SLOG" */
#define LOG_HDR 24u
#define MAP_INITIAL (1ull << 30)
#define DEFAULT_INTERVAL_MS 200u
#define DEFAULT_COMMIT_BYTES (32u << 20)
#define RESERVE_BYTES (1u << 20)
#define SPACE_MARGIN (1u << 20)
#define SPACE_PLENTY (256ull << 20)
#define SPACE_LOW (1ull << 30)      /* below this, give freed space back at once */

static const char seq_key[] = "Mseq";
static const char *const log_names[2] = {"redo.log", "redo2.log"};

/* One of the two redo log files. */
struct redo_log {
    int fd;
    off_t len;                  /* append position */
    uint64_t max_seq;           /* newest record written since it was rewound */
};

struct shard_lmdb {
    struct shard base;
    char dir[4096];
    pthread_mutex_t lock;
    pthread_cond_t wake;        /* flusher sleeps on it; signalled at close */
    pthread_t flusher;
    int flusher_started;
    int closing;                /* protected by lock */

    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;               /* the open write transaction, or NULL */
    int need_rebuild;           /* a commit failed: rebuild txn from the log */
    size_t mapsize;

    struct redo_log logs[2];
    int active;                 /* the log appended to */
    uint64_t seq;               /* last sequence number written to a log */
    uint64_t committed_seq;     /* last one inside the committed LMDB state */
    uint64_t durable_seq;       /* last one inside a commit whose meta page is
                                 * surely on disk */

    size_t pending_bytes;
    struct timespec pending_since;
    uint64_t space_hint;        /* free disk bytes last seen, minus what was
                                 * applied since */
    uint64_t punched_txn;       /* free-list records up to this txn are punched */
    unsigned interval_ms;
    size_t commit_bytes;
};

static const struct shard_ops shard_lmdb_ops;

int shard_lmdb_errno(int rc)
{
    switch (rc) {
    case MDB_SUCCESS:
        return 0;
    case MDB_NOTFOUND:
        return -ENOENT;
    case MDB_KEYEXIST:
        return -EEXIST;
    case MDB_MAP_FULL:
    case MDB_TXN_FULL:
        return -ENOSPC;
    case MDB_BAD_VALSIZE:
        return -EINVAL;
    case MDB_READERS_FULL:
    case MDB_MAP_RESIZED:
        return -EAGAIN;
    default:
        /* LMDB passes system errors through as positive errno values. */
        if (rc > 0 && rc < 4096)
            return -rc;
        return -EIO;
    }
}

static struct shard_lmdb *to_lmdb(struct shard *s)
{
    return (struct shard_lmdb *)s;
}

/* ---- applying batches to a transaction ---- */

static int del_range(MDB_txn *txn, MDB_dbi dbi, const struct batch_item *it)
{
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = it->klen, .mv_data = (void *)it->key}, v;
    int rc = mdb_cursor_open(txn, dbi, &cur);

    if (rc)
        goto out;
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0) {
        size_t n = k.mv_size < it->vlen ? k.mv_size : it->vlen;
        int cmp = memcmp(k.mv_data, it->val, n);
        if (cmp > 0 || (cmp == 0 && k.mv_size >= it->vlen))
            break;
        rc = mdb_cursor_del(cur, 0);
        if (rc)
            goto out;
        /* Re-seek from the start: everything before the deleted key in the
         * range is gone, and after deleting a shard's last key LMDB leaves
         * the cursor unpositioned (MDB_GET_CURRENT would fail). */
        k.mv_size = it->klen;
        k.mv_data = (void *)it->key;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    }
    if (rc == MDB_NOTFOUND)
        rc = 0;
out:
    mdb_cursor_close(cur);
    return rc ? shard_lmdb_errno(rc) : 0;
}

static int check_assert(MDB_txn *txn, MDB_dbi dbi, const struct batch_item *it)
{
    MDB_val k = {.mv_size = it->klen, .mv_data = (void *)it->key}, v;
    int rc = mdb_get(txn, dbi, &k, &v);

    if (rc && rc != MDB_NOTFOUND)
        return shard_lmdb_errno(rc);
    if (it->op == BATCH_ASSERT_ABSENT)
        return rc == 0 ? -EEXIST : 0;
    if (rc == MDB_NOTFOUND || v.mv_size != it->vlen || memcmp(v.mv_data, it->val, it->vlen))
        return -EAGAIN;
    return 0;
}

/* Apply every item of an encoded batch to txn. With check_asserts == 0 (log
 * replay) preconditions are skipped: they held when the batch was logged. */
static int apply_items(MDB_txn *txn, MDB_dbi dbi, const uint8_t *buf, size_t len,
                       int check_asserts)
{
    struct batch_item it;
    size_t pos = 0;
    int rc;

    while ((rc = batch_next(buf, len, &pos, &it)) == 1) {
        MDB_val k = {.mv_size = it.klen, .mv_data = (void *)it.key};
        MDB_val v = {.mv_size = it.vlen, .mv_data = (void *)it.val};
        switch (it.op) {
        case BATCH_PUT:
            rc = shard_lmdb_errno(mdb_put(txn, dbi, &k, &v, 0));
            break;
        case BATCH_DEL:
            rc = mdb_del(txn, dbi, &k, NULL);
            rc = rc == MDB_NOTFOUND ? 0 : shard_lmdb_errno(rc);
            break;
        case BATCH_DEL_RANGE:
            rc = del_range(txn, dbi, &it);
            break;
        case BATCH_ASSERT_ABSENT:
        case BATCH_ASSERT_VALUE:
            rc = check_asserts ? check_assert(txn, dbi, &it) : 0;
            break;
        }
        if (rc)
            return rc;
    }
    return rc;
}

/* ---- the redo log ---- */

static int log_append(struct shard_lmdb *sl, uint64_t seq, const struct batch *b)
{
    uint8_t hdr[LOG_HDR];
    struct iovec iov[2] = {{hdr, LOG_HDR}, {b->buf, b->len}};
    size_t want = LOG_HDR + b->len;
    ssize_t n;

    endian_put_le(hdr, LOG_MAGIC, 4);
    endian_put_le(hdr + 4, (uint32_t)b->len, 4);
    endian_put_le(hdr + 8, seq, 8);
    endian_put_le(hdr + 16, XXH3_64bits_withSeed(b->buf, b->len, seq), 8);
    struct redo_log *log = &sl->logs[sl->active];

    n = pwritev(log->fd, iov, 2, log->len);
    if (n == (ssize_t)want) {
        log->len += n;
        log->max_seq = seq;
        return 0;
    }
    /* A short write leaves a torn record at len; replay stops there, and the
     * next append overwrites it. */
    return n < 0 ? -errno : -ENOSPC;
}

/* Where one pass over a log got to: the end of the last record it applied
 * (0: none) and that record's sequence number. */
struct replay_pass {
    off_t end;
    uint64_t last;
};

/* Apply, from the start of one log, the records that continue the chain at
 * *expect, in order. Records older than *expect are leftovers of earlier
 * turns (a log is rewound, not truncated, so its pages stay cached) and are
 * skipped; a torn or corrupt record, or one beyond a gap, ends the pass. */
static int log_replay_one(struct shard_lmdb *sl, MDB_txn *txn, int fd, uint64_t *expect,
                          struct replay_pass *pass)
{
    uint8_t hdr[LOG_HDR];
    uint8_t *payload = NULL;
    off_t off = 0;
    int rc = 0;

    for (;;) {
        if (pread(fd, hdr, LOG_HDR, off) != LOG_HDR)
            break;
        uint32_t len = (uint32_t)endian_get_le(hdr + 4, 4);
        uint64_t seq = endian_get_le(hdr + 8, 8), check = endian_get_le(hdr + 16, 8);
        if (endian_get_le(hdr, 4) != LOG_MAGIC || len > BATCH_MAX)
            break;
        uint8_t *p = realloc(payload, len ? len : 1);
        if (!p) {
            rc = -ENOMEM;
            goto out;
        }
        payload = p;
        if (pread(fd, payload, len, off + LOG_HDR) != (ssize_t)len ||
            XXH3_64bits_withSeed(payload, len, seq) != check || batch_validate(payload, len) < 0)
            break;
        off += LOG_HDR + len;
        if (seq < *expect)
            continue;
        if (seq != *expect)
            break;
        rc = apply_items(txn, sl->dbi, payload, len, 0);
        if (rc)
            goto out;
        sl->pending_bytes += len;
        pass->end = off;
        pass->last = seq;
        (*expect)++;
    }
out:
    free(payload);
    return rc;
}

/* Replay the records newer than committed_seq from both logs into txn, in
 * sequence order. The chain runs through the older log's records and then
 * the newer one's, so passes over the two alternate until one round adds
 * nothing. Sets sl->seq to the last record applied; each log's append
 * position and max_seq to just after its last applied record (the start and
 * 0 if it had none), and the active log to the one holding the newest. */
static int log_replay(struct shard_lmdb *sl, MDB_txn *txn)
{
    struct replay_pass pass[2] = {{0, 0}, {0, 0}};
    uint64_t expect = sl->committed_seq + 1;
    int rc = 0;

    for (uint64_t before = 0; before != expect;) {
        before = expect;
        for (int i = 0; i < 2 && rc == 0; i++)
            rc = log_replay_one(sl, txn, sl->logs[i].fd, &expect, &pass[i]);
        if (rc)
            return rc;
    }
    sl->seq = expect - 1;
    for (int i = 0; i < 2; i++) {
        sl->logs[i].len = pass[i].end;
        sl->logs[i].max_seq = pass[i].last;
    }
    sl->active = pass[1].last > pass[0].last;
    return 0;
}

/* After a commit: the log that is not active holds records up to some
 * max_seq. Once every one of them is inside a commit that is surely on disk,
 * that log is not needed by any state a power cut can leave: rewind it (cut
 * it on a disk running low) and append there from now on. Otherwise keep
 * appending to the active one. */
static void log_switch(struct shard_lmdb *sl, int low_disk)
{
    struct redo_log *other = &sl->logs[!sl->active];

    if (other->max_seq > sl->durable_seq)
        return;
    if (low_disk && ftruncate(other->fd, 0) != 0) {
        /* keep going: the log is only bigger than it needs to be */
    }
    other->len = 0;
    other->max_seq = 0;
    sl->active = !sl->active;
}

/* ---- disk space ----
 *
 * Every acknowledged batch must be committable later, so a batch is admitted
 * only if the disk (plus the free pages inside data.mdb, which LMDB reuses)
 * can take everything pending: otherwise the writer gets ENOSPC at once and
 * the shard stays committable, so deleting files frees space again. A small
 * reserve file is given up if a commit still runs short (another shard on the
 * same disk may have taken the space), so a commit that frees space can
 * always run. */

static void reserve_path(const struct shard_lmdb *sl, char *out, size_t len)
{
    snprintf(out, len, "%s/reserve", sl->dir);
}

static void reserve_make(struct shard_lmdb *sl)
{
    char path[4200];
    int fd;

    reserve_path(sl, path, sizeof(path));
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        return; /* exists, or no room: try again after a later commit */
    if (posix_fallocate(fd, 0, RESERVE_BYTES) != 0) {
        close(fd);
        unlink(path);
        return;
    }
    close(fd);
}

/* 1 if the reserve was there and is now given up. */
static int reserve_release(struct shard_lmdb *sl)
{
    char path[4200];

    reserve_path(sl, path, sizeof(path));
    return unlink(path) == 0;
}

static uint64_t disk_free(const struct shard_lmdb *sl)
{
    struct statvfs st;

    if (statvfs(sl->dir, &st) != 0)
        return SPACE_PLENTY; /* cannot tell: let the write find out */
    return (uint64_t)st.f_bavail * st.f_frsize;
}

/* Punch holes over the pages LMDB lists as free, giving their blocks back to
 * the filesystem so other shards and files can use them. LMDB never reads a
 * free page and rewrites it whole when it reuses it, so a hole is as good as
 * any content -- but only once no state a power cut can leave still uses
 * the page. The free-list record of transaction T lists the pages T
 * replaced: they belong to T - 1's tree. The last commit's meta page may not
 * be on disk (MDB_NOMETASYNC), so the state after a power cut may be the
 * commit before it; its pages are the ones the last commit freed. Punch only
 * the records of older transactions, the rule LMDB itself follows before it
 * reuses a page (mdb_find_oldest: the current transaction's id - 1, so a
 * page freed by T is rewritten from T + 2 on). Records newer than the last
 * punch only. Caller holds the lock and has no transaction open. */
static void free_pages_punch(struct shard_lmdb *sl)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    MDB_stat st;
    MDB_envinfo info;
    int fd, rc;

    if (mdb_env_get_fd(sl->env, &fd) || mdb_env_stat(sl->env, &st) ||
        mdb_env_info(sl->env, &info) || mdb_txn_begin(sl->env, NULL, MDB_RDONLY, &txn))
        return;
    if (mdb_cursor_open(txn, 0 /* FREE_DBI */, &cur) == 0) {
        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
            size_t txnid, n;
            if (k.mv_size != sizeof(size_t) || v.mv_size < sizeof(size_t))
                continue;
            memcpy(&txnid, k.mv_data, sizeof(txnid));
            if (txnid >= info.me_last_txnid)
                break; /* freed by the last commit: the previous state's pages */
            if (txnid <= sl->punched_txn)
                continue;
            sl->punched_txn = txnid;
            /* An ID list: a count, then page numbers (sorted). */
            const size_t *ids = v.mv_data;
            memcpy(&n, ids, sizeof(n));
            if ((n + 1) * sizeof(size_t) > v.mv_size)
                continue;
            for (size_t i = 1; i <= n; i++) {
                size_t lo = ids[i], hi = ids[i];
                while (i < n && (ids[i + 1] + 1 == lo || ids[i + 1] == hi + 1)) {
                    if (ids[i + 1] < lo)
                        lo = ids[i + 1];
                    else
                        hi = ids[i + 1];
                    i++;
                }
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          (off_t)lo * st.ms_psize, (off_t)(hi - lo + 1) * st.ms_psize);
            }
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
}

static void space_refresh(struct shard_lmdb *sl)
{
    sl->space_hint = disk_free(sl);
}

/* After a commit: switch logs if the other one is no longer needed; on a
 * disk running low, give freed pages and the unneeded log's blocks back to
 * the filesystem; keep the reserve file. Plenty of space: free pages and
 * rewound log pages stay for reuse, which is faster than allocating new
 * blocks. */
static void space_after_commit(struct shard_lmdb *sl)
{
    space_refresh(sl);
    if (sl->space_hint < SPACE_LOW) {
        free_pages_punch(sl);
        log_switch(sl, 1);
        space_refresh(sl);
    } else {
        log_switch(sl, 0);
    }
    if (sl->space_hint > 4ull * RESERVE_BYTES)
        reserve_make(sl);
}

static int txn_commit(struct shard_lmdb *sl, int grow);

/* Admit a batch of len bytes, or return -ENOSPC. */
static int space_admit(struct shard_lmdb *sl, size_t len)
{
    /* The log copy, the committed copy, copy-on-write overhead and a margin. */
    uint64_t need = sl->pending_bytes + sl->pending_bytes / 4 + 2 * (uint64_t)len + SPACE_MARGIN;

    if (sl->space_hint >= need + SPACE_PLENTY)
        goto ok;
    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* asking the disk, perhaps committing: not here */
    space_refresh(sl);
    if (sl->space_hint >= need)
        goto ok;
    if (sl->pending_bytes && txn_commit(sl, 0) == 0) {
        space_refresh(sl);
        need = 2 * (uint64_t)len + SPACE_MARGIN;
        if (sl->space_hint >= need)
            goto ok;
    }
    return -ENOSPC;
ok:
    sl->space_hint -= 2 * (uint64_t)len < sl->space_hint ? 2 * (uint64_t)len : sl->space_hint;
    return 0;
}

/* ---- the long-lived transaction ---- */

static int txn_begin(struct shard_lmdb *sl)
{
    int rc = mdb_txn_begin(sl->env, NULL, 0, &sl->txn);
    if (rc) {
        sl->txn = NULL;
        return shard_lmdb_errno(rc);
    }
    clock_gettime(CLOCK_MONOTONIC, &sl->pending_since);
    return 0;
}

/* Make sure sl->txn is open and holds every logged batch. */
static int txn_ensure(struct shard_lmdb *sl)
{
    int rc;

    if (sl->txn && !sl->need_rebuild)
        return 0;
    if (sl->txn)
        mdb_txn_abort(sl->txn);
    sl->txn = NULL;
    rc = txn_begin(sl);
    if (rc)
        return rc;
    if (sl->need_rebuild) {
        sl->pending_bytes = 0;
        rc = log_replay(sl, sl->txn);
        if (rc) {
            mdb_txn_abort(sl->txn);
            sl->txn = NULL;
            return rc;
        }
        sl->need_rebuild = 0;
    }
    return 0;
}

static void map_maybe_grow(struct shard_lmdb *sl, int force)
{
    MDB_envinfo info;
    MDB_stat st;

    if (mdb_env_info(sl->env, &info) || mdb_env_stat(sl->env, &st))
        return;
    size_t used = (info.me_last_pgno + 1) * (size_t)st.ms_psize;
    if (!force && used < sl->mapsize / 2)
        return;
    while (used >= sl->mapsize / 2 || force) {
        sl->mapsize *= 2;
        force = 0;
    }
    if (mdb_env_set_mapsize(sl->env, sl->mapsize) == 0)
        return;
    /* Keep the old size if the bigger one cannot be had. */
    mdb_env_info(sl->env, &info);
    sl->mapsize = info.me_mapsize;
}

/* Commit the open transaction with a full sync and start over. On failure the
 * transaction is gone, so it is rebuilt from the log on next use. */
static int txn_commit(struct shard_lmdb *sl, int grow)
{
    MDB_val k = {.mv_size = sizeof(seq_key) - 1, .mv_data = (void *)seq_key};
    uint8_t seqbuf[8];
    MDB_val v = {.mv_size = 8, .mv_data = seqbuf};
    int rc;

    if (sl->need_rebuild) {
        rc = txn_ensure(sl);
        if (rc)
            return rc;
    }
    if (!sl->txn)
        return 0;
    if (sl->seq == sl->committed_seq) {
        /* Nothing logged since the last commit: nothing to make durable. */
        if (!grow)
            return 0;
        mdb_txn_abort(sl->txn);
        sl->txn = NULL;
        map_maybe_grow(sl, 1);
        return 0;
    }
    endian_put_le(seqbuf, sl->seq, 8);
    rc = mdb_put(sl->txn, sl->dbi, &k, &v, 0);
    if (rc) {
        mdb_txn_abort(sl->txn);
        goto failed;
    }
    rc = mdb_txn_commit(sl->txn);
    if (rc && reserve_release(sl)) {
        /* Short of space: give up the reserve, rebuild from the log, retry. */
        sl->txn = NULL;
        sl->need_rebuild = 1;
        if (txn_ensure(sl) == 0 && mdb_put(sl->txn, sl->dbi, &k, &v, 0) == 0)
            rc = mdb_txn_commit(sl->txn);
        else if (sl->txn)
            mdb_txn_abort(sl->txn);
    }
    if (rc)
        goto failed;
    sl->txn = NULL;
    /* This commit synced its data pages before writing its meta page, and
     * with them the previous commit's meta page: that one is on disk now. */
    if (sl->committed_seq > sl->durable_seq)
        sl->durable_seq = sl->committed_seq;
    sl->committed_seq = sl->seq;
    sl->pending_bytes = 0;
    map_maybe_grow(sl, grow);
    space_after_commit(sl);
    return 0;
failed:
    sl->txn = NULL;
    sl->need_rebuild = 1;
    /* LMDB reports a short write (the disk filled up mid-commit) as EIO. */
    if ((rc == EIO || rc == ENOSPC) && disk_free(sl) < SPACE_MARGIN * 4ull)
        return -ENOSPC;
    return shard_lmdb_errno(rc);
}

/* ---- the interface ---- */

/* Take the shard's lock. In no-waiting mode (shard.h) only a free lock is
 * taken, and a transaction that must first be rebuilt from the log (disk
 * reads) is left to a thread that may wait: -EWOULDBLOCK. */
static int lock_or_refuse(struct shard_lmdb *sl)
{
    if (!shard_nowait_active()) {
        pthread_mutex_lock(&sl->lock);
        return 0;
    }
    if (pthread_mutex_trylock(&sl->lock) != 0) {
        shard_nowait_refuse();
        return -EWOULDBLOCK;
    }
    if (sl->need_rebuild) {
        pthread_mutex_unlock(&sl->lock);
        shard_nowait_refuse();
        return -EWOULDBLOCK;
    }
    return 0;
}

static int lmdb_get(struct shard *s, const void *key, size_t klen, size_t off, void *buf,
                    size_t buflen, size_t *vlen)
{
    struct shard_lmdb *sl = to_lmdb(s);
    MDB_val k = {.mv_size = klen, .mv_data = (void *)key}, v;
    int rc = lock_or_refuse(sl);

    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc)
        goto out;
    rc = mdb_get(sl->txn, sl->dbi, &k, &v);
    if (rc) {
        rc = shard_lmdb_errno(rc);
        goto out;
    }
    if (vlen)
        *vlen = v.mv_size;
    if (off >= v.mv_size) {
        rc = 0;
        goto out;
    }
    size_t n = v.mv_size - off < buflen ? v.mv_size - off : buflen;
    if (n)
        memcpy(buf, (const uint8_t *)v.mv_data + off, n);
    rc = (int)n;
out:
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

/* All reads in the one transaction, under the one lock: as of one moment. */
static int lmdb_get_many(struct shard *s, struct shard_read *r, unsigned n)
{
    struct shard_lmdb *sl = to_lmdb(s);
    int rc = lock_or_refuse(sl);

    if (rc)
        return rc;
    rc = txn_ensure(sl);
    for (unsigned i = 0; rc == 0 && i < n; i++) {
        uint8_t key[BATCH_KEY_MAX];
        MDB_val k = {.mv_data = key}, v;

        r[i].len = r[i].vlen = 0;
        r[i].rc = shard_read_key(r, i, key, &k.mv_size);
        if (r[i].rc)
            continue;
        rc = mdb_get(sl->txn, sl->dbi, &k, &v);
        if (rc == MDB_NOTFOUND) {
            r[i].rc = -ENOENT;
            rc = 0;
            continue;
        }
        if (rc) {
            rc = shard_lmdb_errno(rc);
            break;
        }
        r[i].vlen = v.mv_size;
        r[i].len = v.mv_size < r[i].buflen ? v.mv_size : r[i].buflen;
        if (r[i].len)
            memcpy(r[i].buf, v.mv_data, r[i].len);
    }
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

static int lmdb_scan(struct shard *s, const void *start, size_t slen, const void *end,
                     size_t elen, shard_scan_fn fn, void *ctx)
{
    struct shard_lmdb *sl = to_lmdb(s);
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = slen, .mv_data = (void *)start}, v;
    int rc;

    rc = lock_or_refuse(sl); /* in no-waiting mode the caller bounds the scan */
    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc)
        goto out;
    rc = mdb_cursor_open(sl->txn, sl->dbi, &cur);
    if (rc) {
        rc = shard_lmdb_errno(rc);
        goto out;
    }
    rc = slen ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE) : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (rc == 0) {
        if (end) {
            size_t n = k.mv_size < elen ? k.mv_size : elen;
            int cmp = memcmp(k.mv_data, end, n);
            if (cmp > 0 || (cmp == 0 && k.mv_size >= elen))
                break;
        }
        rc = fn(ctx, k.mv_data, k.mv_size, v.mv_data, v.mv_size);
        if (rc)
            goto out;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    rc = rc == MDB_NOTFOUND ? 0 : shard_lmdb_errno(rc);
out:
    mdb_cursor_close(cur);
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

/* One attempt: nested transaction, log append, merge into the parent. */
static int apply_once(struct shard_lmdb *sl, const struct batch *b)
{
    MDB_txn *child = NULL;
    int rc = txn_ensure(sl);

    if (rc)
        return rc;
    rc = mdb_txn_begin(sl->env, sl->txn, 0, &child);
    if (rc)
        return shard_lmdb_errno(rc);
    rc = apply_items(child, sl->dbi, b->buf, b->len, 1);
    if (rc)
        goto abort;
    rc = log_append(sl, sl->seq + 1, b);
    if (rc)
        goto abort;
    sl->seq++;
    rc = mdb_txn_commit(child);
    if (rc) {
        /* The log has the batch but the transaction does not: rebuild it. */
        sl->need_rebuild = 1;
        return txn_ensure(sl);
    }
    return 0;
abort:
    mdb_txn_abort(child);
    return rc;
}

static int lmdb_apply(struct shard *s, const struct batch *b)
{
    struct shard_lmdb *sl = to_lmdb(s);
    int rc;

    if (b->count == 0)
        return 0;
    rc = lock_or_refuse(sl);
    if (rc)
        return rc;
    /* Without waiting: a batch that needs no commit (the log write goes to
     * the page cache). */
    if (sl->pending_bytes + b->len >= sl->commit_bytes && shard_nowait_refuse()) {
        rc = -EWOULDBLOCK;
        goto out;
    }
    rc = space_admit(sl, b->len);
    if (rc)
        goto out;
    rc = apply_once(sl, b);
    if (rc == -ENOSPC && !sl->need_rebuild && shard_nowait_refuse()) {
        rc = -EWOULDBLOCK; /* the nested transaction was aborted: nothing changed */
        goto out;
    }
    if (rc == -ENOSPC && !sl->need_rebuild) {
        /* Map or dirty list full: commit what we have, grow, try once more.
         * A real full disk fails the commit or the retry with ENOSPC. */
        int crc = txn_commit(sl, 1);
        rc = crc ? crc : apply_once(sl, b);
    }
    if (rc == 0) {
        if (sl->pending_bytes == 0)
            clock_gettime(CLOCK_MONOTONIC, &sl->pending_since);
        sl->pending_bytes += b->len;
        if (sl->pending_bytes >= sl->commit_bytes)
            txn_commit(sl, 0); /* a failure keeps the log; retried later */
    }
out:
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

static int lmdb_sync(struct shard *s)
{
    struct shard_lmdb *sl = to_lmdb(s);
    int rc;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    pthread_mutex_lock(&sl->lock);
    rc = txn_commit(sl, 0);
    if (rc == 0)
        rc = shard_lmdb_errno(mdb_env_sync(sl->env, 1)); /* the meta page too */
    if (rc == 0) {
        sl->durable_seq = sl->committed_seq;
        log_switch(sl, sl->space_hint < SPACE_LOW);
    }
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

static int lmdb_stat(struct shard *s, struct shard_stat *st)
{
    struct shard_lmdb *sl = to_lmdb(s);
    MDB_stat ms;
    MDB_envinfo info;
    int rc = lock_or_refuse(sl);

    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc)
        goto out;
    rc = shard_lmdb_errno(mdb_stat(sl->txn, sl->dbi, &ms));
    if (rc)
        goto out;
    mdb_env_info(sl->env, &info);
    st->records = ms.ms_entries;
    st->bytes = (info.me_last_pgno + 1) * (uint64_t)ms.ms_psize;
    st->pending = sl->seq - sl->committed_seq;
out:
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

int shard_lmdb_flush(struct shard *s, int force)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct timespec now;
    int rc = 0;

    pthread_mutex_lock(&sl->lock);
    clock_gettime(CLOCK_MONOTONIC, &now);
    long ms = (now.tv_sec - sl->pending_since.tv_sec) * 1000 +
              (now.tv_nsec - sl->pending_since.tv_nsec) / 1000000;
    if ((sl->seq != sl->committed_seq || sl->need_rebuild) && (force || ms >= (long)sl->interval_ms))
        rc = txn_commit(sl, 0);
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

static void *flusher_main(void *arg)
{
    struct shard_lmdb *sl = arg;
    char name[16];

    snprintf(name, sizeof(name), "flush-%u", sl->base.index);
    pthread_setname_np(pthread_self(), name);
    pthread_mutex_lock(&sl->lock);
    while (!sl->closing) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_nsec += (long)(sl->interval_ms % 1000) * 1000000;
        t.tv_sec += sl->interval_ms / 1000 + t.tv_nsec / 1000000000;
        t.tv_nsec %= 1000000000;
        pthread_cond_timedwait(&sl->wake, &sl->lock, &t);
        if (sl->closing)
            break;
        pthread_mutex_unlock(&sl->lock);
        shard_lmdb_flush(&sl->base, 0);
        pthread_mutex_lock(&sl->lock);
    }
    pthread_mutex_unlock(&sl->lock);
    return NULL;
}

static void lmdb_close(struct shard *s)
{
    struct shard_lmdb *sl = to_lmdb(s);

    if (sl->flusher_started) {
        pthread_mutex_lock(&sl->lock);
        sl->closing = 1;
        pthread_cond_signal(&sl->wake);
        pthread_mutex_unlock(&sl->lock);
        pthread_join(sl->flusher, NULL);
    }
    if (sl->env) {
        if (txn_commit(sl, 0) == 0)
            mdb_env_sync(sl->env, 1);
        if (sl->txn)
            mdb_txn_abort(sl->txn);
        mdb_env_close(sl->env);
    }
    for (int i = 0; i < 2; i++)
        if (sl->logs[i].fd >= 0)
            close(sl->logs[i].fd);
    pthread_cond_destroy(&sl->wake);
    pthread_mutex_destroy(&sl->lock);
    free(sl);
}

static int read_committed_seq(struct shard_lmdb *sl)
{
    MDB_val k = {.mv_size = sizeof(seq_key) - 1, .mv_data = (void *)seq_key}, v;
    int rc = mdb_get(sl->txn, sl->dbi, &k, &v);

    sl->committed_seq = 0;
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc)
        return shard_lmdb_errno(rc);
    if (v.mv_size != 8)
        return -EIO;
    sl->committed_seq = endian_get_le(v.mv_data, 8);
    return 0;
}

/* Make a new, empty data.mdb as one step a power cut cannot split: LMDB
 * writes a new file's two meta pages without syncing them, and a file with
 * a torn meta page does not open (MDB_INVALID). So the environment is made
 * under another name, synced, renamed into place and the directory synced.
 * A leftover data.mdb.new of an earlier attempt is overwritten. */
static int env_create(struct shard_lmdb *sl, const char *path, char *err, size_t errlen)
{
    char tmp[4300];
    MDB_env *env = NULL;
    int rc;

    snprintf(tmp, sizeof(tmp), "%s.new", path);
    if (unlink(tmp) != 0 && errno != ENOENT) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        return rc;
    }
    rc = mdb_env_create(&env);
    if (rc == 0)
        rc = mdb_env_open(env, tmp, MDB_NOSUBDIR | MDB_NOLOCK, 0644);
    if (rc == 0)
        rc = mdb_env_sync(env, 1);
    mdb_env_close(env);
    if (rc) {
        snprintf(err, errlen, "%s: cannot create LMDB environment: %s", tmp, mdb_strerror(rc));
        return shard_lmdb_errno(rc);
    }
    if (rename(tmp, path) != 0 || (rc = durable_sync_dir(sl->dir)) != 0) {
        rc = rc ? rc : -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(-rc));
        return rc;
    }
    return 0;
}

static int open_env(struct shard_lmdb *sl, char *err, size_t errlen)
{
    struct stat st;
    char path[4200];
    int rc;

    snprintf(path, sizeof(path), "%s/data.mdb", sl->dir);
    sl->mapsize = MAP_INITIAL;
    if (stat(path, &st) == 0) {
        while (sl->mapsize < (size_t)st.st_size * 2)
            sl->mapsize *= 2;
    } else if (errno != ENOENT) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return rc;
    } else if ((rc = env_create(sl, path, err, errlen)) != 0) {
        return rc;
    }
    rc = mdb_env_create(&sl->env);
    if (rc == 0)
        rc = mdb_env_set_mapsize(sl->env, sl->mapsize);
    if (rc == 0)
        /* NOMETASYNC: a commit syncs its data pages before writing the meta
         * page but does not sync the meta page: a machine crash may undo
         * the last commit, never corrupt the file. sync() syncs it. */
        rc = mdb_env_open(sl->env, sl->dir, MDB_NOLOCK | MDB_NORDAHEAD | MDB_NOMETASYNC, 0644);
    if (rc) {
        snprintf(err, errlen, "%s: cannot open LMDB environment: %s", sl->dir, mdb_strerror(rc));
        return shard_lmdb_errno(rc);
    }
    rc = mdb_txn_begin(sl->env, NULL, 0, &sl->txn);
    if (rc == 0)
        rc = mdb_dbi_open(sl->txn, NULL, 0, &sl->dbi);
    if (rc) {
        snprintf(err, errlen, "%s: %s", sl->dir, mdb_strerror(rc));
        return shard_lmdb_errno(rc);
    }
    return 0;
}

/* Open (creating) both redo logs; a new name is made durable at once. */
static int logs_open(struct shard_lmdb *sl, char *err, size_t errlen)
{
    char path[4200];
    int created = 0;

    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof(path), "%s/%s", sl->dir, log_names[i]);
        sl->logs[i].fd = open(path, O_RDWR | O_CLOEXEC);
        if (sl->logs[i].fd < 0 && errno == ENOENT) {
            sl->logs[i].fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
            created = 1;
        }
        if (sl->logs[i].fd < 0) {
            int rc = -errno;
            snprintf(err, errlen, "%s: %s", path, strerror(errno));
            return rc;
        }
    }
    if (created) {
        int rc = durable_sync_dir(sl->dir);
        if (rc) {
            snprintf(err, errlen, "%s: %s", sl->dir, strerror(-rc));
            return rc;
        }
    }
    return 0;
}

/* The end of recovery at open: commit what was replayed and make the
 * opened state durable (a killed process may have left its last commit's
 * meta page in the page cache only), then empty both logs, with the cut on
 * disk before anything is appended: a record beyond a gap, left behind,
 * could otherwise be replayed later, once the sequence numbers have caught
 * up with it. A replayed log that cannot be committed yet (a full disk)
 * stays in the transaction and in the logs, which are cut after the
 * replayed records instead; the flusher retries the commit. */
static int recover_commit(struct shard_lmdb *sl)
{
    int rc = 0, committed;

    if (sl->seq != sl->committed_seq) {
        rc = txn_commit(sl, 0);
        if (rc == -ENOSPC)
            rc = txn_ensure(sl);
        if (rc)
            return rc;
    }
    committed = sl->seq == sl->committed_seq;
    if (committed && sl->txn) {
        /* Nothing replayed: the transaction open since open_env() is empty. */
        mdb_txn_abort(sl->txn);
        sl->txn = NULL;
    }
    rc = shard_lmdb_errno(mdb_env_sync(sl->env, 1));
    if (rc)
        return rc;
    sl->durable_seq = sl->committed_seq;
    for (int i = 0; i < 2; i++) {
        struct redo_log *log = &sl->logs[i];
        if (committed) {
            log->len = 0;
            log->max_seq = 0;
        }
        if (ftruncate(log->fd, log->len) != 0 || fsync(log->fd) != 0)
            return -errno;
    }
    if (committed) {
        space_after_commit(sl);
        sl->active = 0; /* both are empty: start with the first */
    } else {
        space_refresh(sl);
    }
    return 0;
}

int shard_lmdb_open(const char *dir, unsigned index, const struct shard_lmdb_options *opt,
                    struct shard **out, char *err, size_t errlen)
{
    struct shard_lmdb *sl = calloc(1, sizeof(*sl));
    int rc;

    if (!sl) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    sl->base.ops = &shard_lmdb_ops;
    sl->base.index = index;
    sl->logs[0].fd = sl->logs[1].fd = -1;
    pthread_mutex_init(&sl->lock, NULL);
    pthread_cond_init(&sl->wake, NULL);
    sl->interval_ms = opt && opt->commit_interval_ms ? opt->commit_interval_ms : DEFAULT_INTERVAL_MS;
    sl->commit_bytes = opt && opt->commit_bytes ? opt->commit_bytes : DEFAULT_COMMIT_BYTES;
    if (snprintf(sl->dir, sizeof(sl->dir), "%s", dir) >= (int)sizeof(sl->dir)) {
        snprintf(err, errlen, "%s: path too long", dir);
        rc = -ENAMETOOLONG;
        goto fail;
    }
    if (mkdir(dir, 0755) == 0) {
        rc = durable_sync_parent(dir);
        if (rc) {
            snprintf(err, errlen, "%s: %s", dir, strerror(-rc));
            goto fail;
        }
    } else if (errno != EEXIST) {
        rc = -errno;
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        goto fail;
    }
    rc = open_env(sl, err, errlen);
    if (rc == 0)
        rc = logs_open(sl, err, errlen);
    if (rc)
        goto fail;
    rc = read_committed_seq(sl);
    if (rc == 0)
        rc = log_replay(sl, sl->txn);
    if (rc == 0)
        rc = recover_commit(sl);
    if (rc) {
        snprintf(err, errlen, "%s: recovering the redo log: %s", dir, strerror(-rc));
        goto fail;
    }
    /* The flusher takes no signals: SIGTERM and SIGINT must reach the thread
     * that runs the FUSE loop, or the daemon would not notice them. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int prc = pthread_create(&sl->flusher, NULL, flusher_main, sl);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (prc != 0) {
        rc = -EAGAIN;
        snprintf(err, errlen, "cannot start flusher thread");
        goto fail;
    }
    sl->flusher_started = 1;
    *out = &sl->base;
    return 0;
fail:
    lmdb_close(&sl->base);
    return rc;
}

static const struct shard_ops shard_lmdb_ops = {
    .get = lmdb_get,
    .get_many = lmdb_get_many,
    .scan = lmdb_scan,
    .apply = lmdb_apply,
    .sync = lmdb_sync,
    .stat = lmdb_stat,
    .close = lmdb_close,
};

/* ---- the change stream: not implemented yet (header first) ---- */

int shard_lmdb_position(struct shard *s, struct stream_pos *out)
{
    (void)s;
    memset(out, 0, sizeof(*out));
    return -ENOSYS;
}

void shard_lmdb_set_epoch(struct shard *s, uint64_t epoch)
{
    (void)s;
    (void)epoch;
}

int shard_lmdb_apply_pos(struct shard *s, const struct batch *b, struct stream_pos *out)
{
    if (out)
        memset(out, 0, sizeof(*out));
    return lmdb_apply(s, b);
}

int shard_lmdb_apply_at(struct shard *s, const struct stream_pos *pos, const struct batch *b)
{
    (void)s;
    (void)pos;
    (void)b;
    return -ENOSYS;
}

int shard_lmdb_stream_read(struct shard *s, const struct stream_pos *after, size_t max_bytes,
                           stream_entry_fn fn, void *ctx)
{
    (void)s;
    (void)after;
    (void)max_bytes;
    (void)fn;
    (void)ctx;
    return -ENOSYS;
}

void shard_lmdb_stream_hold(struct shard *s, unsigned slot, uint64_t lsn)
{
    (void)s;
    (void)slot;
    (void)lsn;
}

void shard_lmdb_on_apply(struct shard *s,
                         void (*fn)(void *ctx, unsigned index, const struct stream_pos *p),
                         void *ctx)
{
    (void)s;
    (void)fn;
    (void)ctx;
}

int shard_lmdb_snapshot_begin(struct shard *s)
{
    (void)s;
    return -ENOSYS;
}

int shard_lmdb_load(struct shard *s, const struct batch *b)
{
    (void)s;
    (void)b;
    return -ENOSYS;
}

int shard_lmdb_snapshot_done(struct shard *s, const struct stream_pos *base)
{
    (void)s;
    (void)base;
    return -ENOSYS;
}
