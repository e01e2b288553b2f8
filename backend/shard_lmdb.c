/* shard_lmdb.c -- a shard in one LMDB environment (see shard_lmdb.h DESIGN).
 *
 * Layout of a shard directory:
 *   data.mdb   the LMDB environment (one unnamed database; MDB_NOLOCK)
 *   redo.log   the two redo logs, used in turns (see shard_lmdb.h): batches
 *   redo2.log  applied since the last commit that is surely on disk, one
 *              record each (64-byte header, then the payload):
 *              magic:u32le len:u32le seq:u64le check:u64le kind:u32le
 *              0:u32le epoch:u64le lsn:u64le scheck:u64le time_ms:u64le
 *              payload[len]
 *              check = XXH3_64(payload, seed = XXH3_64(header[24..64),
 *              seed = seq)). kind: a batch at position (epoch, lsn, scheck)
 *              applied at time_ms (the payload is the batch; replay rebuilds
 *              its 'L' entry and "Mpos" from the header, so the batch bytes
 *              are logged once), a snapshot load (a batch, no position), or
 *              a snapshot's end (no payload; the position is the base).
 *              Records of the version before the stream (magic "SLOG",
 *              24-byte header, the batch) are replayed as batches at the
 *              next lsn of the same epoch.
 *   reserve    a small preallocated file given up when a commit runs short
 *   Keys inside LMDB that are this file's own ("local meta", never copied by
 *   a snapshot): "Mseq" the last log sequence number that the committed
 *   state contains; "Mpos" the position (epoch, lsn, check: u64le each);
 *   "Mbase" the position before the oldest retained 'L' entry; "Mlsn" the
 *   lsn reservation (u64le: no lsn at or above it was handed out); "Msnap"
 *   present while a snapshot is in progress. 'L' lsn:u64be -> epoch:u64le
 *   check:u64le time_ms:u64le batch: the stream's entries.
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

#include "clock.h"
#include "durable.h"
#include "endian.h"

#define LOG_MAGIC 0x474f4c53u /* "SLOG": before the stream */
#define LOG_MAGIC2 0x32474c53u /* "SLG2" */
#define LOG_HDR 24u
#define LOG_HDR2 64u
#define ENTRY_VAL_HDR 24u      /* epoch, check, time_ms before an entry's batch */
#define DEFAULT_LSN_STEP (1ull << 20)
#define DEFAULT_STREAM_BYTES (64u << 20)
#define DEFAULT_STREAM_AGE_MS (600u * 1000u)
#define MAP_INITIAL (1ull << 30)
#define DEFAULT_INTERVAL_MS 200u
#define DEFAULT_COMMIT_BYTES (32u << 20)
#define RESERVE_BYTES (1u << 20)
#define SPACE_MARGIN (1u << 20)
#define SPACE_PLENTY (256ull << 20)
#define SPACE_LOW (1ull << 30)      /* below this, give freed space back at once */

static const char seq_key[] = "Mseq";
static const char pos_key[] = "Mpos";
static const char base_key[] = "Mbase";
static const char lsn_key[] = "Mlsn";
static const char snap_key[] = "Msnap";

/* What a redo log record does (its kind). */
enum log_kind {
    LOG_APPLY = 1,          /* a batch at a position */
    LOG_LOAD = 2,           /* a snapshot page: plain puts and deletes */
    LOG_DONE = 3,           /* a snapshot's end: position := base */
    LOG_LEGACY = 100,       /* an "SLOG" record: a batch at the next lsn */
};

/* A record's header fields beyond the payload. */
struct log_rec {
    enum log_kind kind;
    struct stream_pos pos;
    uint64_t time_ms;
};
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
    pthread_cond_t applied;     /* a batch was applied (await_turn); with lock */
    unsigned awaiting;          /* batches in await_turn; protected by lock */
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

    size_t pending_bytes;       /* what the open txn adds: batches and their
                                 * stream entries (rec_bytes) */
    struct timespec pending_since;
    uint64_t space_hint;        /* free disk bytes last seen, minus what was
                                 * applied since */
    uint64_t punched_txn;       /* free-list records up to this txn are punched */
    unsigned interval_ms;
    size_t commit_bytes;

    /* The change stream; all protected by lock. pos, base, snapshotting and
     * stream_bytes describe sl->txn (reloaded from it when it is rebuilt). */
    struct stream_pos pos;      /* the last batch's position */
    struct stream_pos sbase;    /* the position before the oldest entry */
    int snapshotting;           /* "Msnap" is set */
    uint64_t stream_bytes;      /* value bytes of the retained entries */
    uint64_t stream_entries;    /* how many */
    uint64_t epoch;             /* for new batches */
    int epoch_set;
    uint64_t next_lsn;          /* never lowered */
    uint64_t lsn_res_committed; /* "Mlsn" of the last commit */
    uint64_t lsn_res_durable;   /* "Mlsn" of a commit surely on disk */
    int meta_dirty;             /* txn holds unlogged changes: commit it */
    size_t stream_max;
    uint64_t stream_age_ms;
    int no_stream;              /* options.no_stream */
    uint64_t lsn_step;
    uint64_t holds[SHARD_LMDB_HOLDS];

    pthread_rwlock_t listen_lock; /* held (read) while the listener runs */
    void (*on_apply)(void *ctx, unsigned index, const struct stream_pos *p);
    void *on_apply_ctx;         /* both protected by listen_lock */
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

static int key_is_local(const uint8_t *k, size_t klen);

/* Move a cursor at a local key (key_is_local) to the next key, past all of
 * the stream's entries at once when it is at one: they are contiguous. */
static int skip_local(MDB_cursor *cur, MDB_val *k, MDB_val *v)
{
    if (k->mv_size >= 1 && *(const uint8_t *)k->mv_data == 'L') {
        k->mv_size = 1;
        k->mv_data = "M";
        return mdb_cursor_get(cur, k, v, MDB_SET_RANGE);
    }
    return mdb_cursor_get(cur, k, v, MDB_NEXT);
}

static int del_range(MDB_txn *txn, MDB_dbi dbi, const struct batch_item *it)
{
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = it->klen, .mv_data = (void *)it->key}, v;
    int rc = mdb_cursor_open(txn, dbi, &cur);

    if (rc)
        goto out;
    uint8_t last[BATCH_KEY_MAX];

    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0) {
        size_t n = k.mv_size < it->vlen ? k.mv_size : it->vlen;
        int cmp = memcmp(k.mv_data, it->val, n);
        if (cmp > 0 || (cmp == 0 && k.mv_size >= it->vlen))
            break;
        if (key_is_local(k.mv_data, k.mv_size)) {
            /* The stream and the shard's own records are not data. */
            rc = skip_local(cur, &k, &v);
            continue;
        }
        memcpy(last, k.mv_data, k.mv_size);
        k.mv_data = last;
        rc = mdb_cursor_del(cur, 0);
        if (rc)
            goto out;
        /* Re-seek past the deleted key: after deleting a shard's last key
         * LMDB leaves the cursor unpositioned (MDB_GET_CURRENT would fail). */
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

/* BATCH_ASSERT_EMPTY: no key in [key, end). The ranges asserted (a file's
 * open registrations) hold no local keys. */
static int check_empty(MDB_txn *txn, MDB_dbi dbi, const struct batch_item *it)
{
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = it->klen, .mv_data = (void *)it->key}, v;
    int rc = mdb_cursor_open(txn, dbi, &cur);

    if (rc)
        return shard_lmdb_errno(rc);
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    mdb_cursor_close(cur);
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc)
        return shard_lmdb_errno(rc);
    return batch_key_cmp(k.mv_data, k.mv_size, it->val, it->vlen) < 0 ? -ENOTEMPTY : 0;
}

/* How apply_items treats a batch. */
enum items_mode {
    ITEMS_BLIND = 0,        /* log replay, a replica: preconditions skipped
                             * (they held when the batch was first applied) */
    ITEMS_CHECKED = 1,      /* a new batch: preconditions checked */
    ITEMS_LOAD = 2,         /* a snapshot page: puts and deletes only, the
                             * local keys of the copied shard skipped */
};

/* Apply every item of an encoded batch to txn. A put or delete of a local
 * key (key_is_local) would corrupt the stream or the recovery: -EINVAL. */
static int apply_items(MDB_txn *txn, MDB_dbi dbi, const uint8_t *buf, size_t len,
                       enum items_mode mode)
{
    struct batch_item it;
    size_t pos = 0;
    int rc;

    while ((rc = batch_next(buf, len, &pos, &it)) == 1) {
        MDB_val k = {.mv_size = it.klen, .mv_data = (void *)it.key};
        MDB_val v = {.mv_size = it.vlen, .mv_data = (void *)it.val};
        if (mode == ITEMS_LOAD && it.op != BATCH_PUT && it.op != BATCH_DEL)
            return -EINVAL;
        if ((it.op == BATCH_PUT || it.op == BATCH_DEL) && key_is_local(it.key, it.klen)) {
            if (mode == ITEMS_LOAD)
                continue;
            return -EINVAL;
        }
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
        case BATCH_AWAIT_VALUE:
            rc = mode == ITEMS_CHECKED ? check_assert(txn, dbi, &it) : 0;
            break;
        case BATCH_ASSERT_EMPTY:
            rc = mode == ITEMS_CHECKED ? check_empty(txn, dbi, &it) : 0;
            break;
        }
        if (rc)
            return rc;
    }
    return rc;
}

/* ---- the stream's records ---- */

static uint64_t now_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_REALTIME, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static int meta_put(MDB_txn *txn, MDB_dbi dbi, const char *name, const void *val, size_t len)
{
    MDB_val k = {.mv_size = strlen(name), .mv_data = (void *)name};
    MDB_val v = {.mv_size = len, .mv_data = (void *)val};

    return shard_lmdb_errno(mdb_put(txn, dbi, &k, &v, 0));
}

/* 0 and the value, -ENOENT, or another -errno. */
static int meta_get(MDB_txn *txn, MDB_dbi dbi, const char *name, MDB_val *v)
{
    MDB_val k = {.mv_size = strlen(name), .mv_data = (void *)name};

    return shard_lmdb_errno(mdb_get(txn, dbi, &k, v));
}

static int pos_put(MDB_txn *txn, MDB_dbi dbi, const char *name, const struct stream_pos *p)
{
    uint8_t buf[24];

    endian_put_le(buf, p->epoch, 8);
    endian_put_le(buf + 8, p->lsn, 8);
    endian_put_le(buf + 16, p->check, 8);
    return meta_put(txn, dbi, name, buf, sizeof(buf));
}

/* A missing position is {0,0,0}; a malformed one -EIO. */
static int pos_get(MDB_txn *txn, MDB_dbi dbi, const char *name, struct stream_pos *p)
{
    MDB_val v;
    int rc = meta_get(txn, dbi, name, &v);

    memset(p, 0, sizeof(*p));
    if (rc == -ENOENT)
        return 0;
    if (rc)
        return rc;
    if (v.mv_size != 24)
        return -EIO;
    p->epoch = endian_get_le(v.mv_data, 8);
    p->lsn = endian_get_le((const uint8_t *)v.mv_data + 8, 8);
    p->check = endian_get_le((const uint8_t *)v.mv_data + 16, 8);
    return 0;
}

static void entry_key(uint8_t key[9], uint64_t lsn)
{
    key[0] = 'L';
    endian_put_be64(key + 1, lsn);
}

/* 1 for the keys a snapshot neither empties nor copies: the stream's entries
 * and this file's own 'M' records (the position, the reservation...), which
 * describe this copy, not the data. */
static int key_is_local(const uint8_t *k, size_t klen)
{
    static const char *const local[] = {seq_key, pos_key, base_key, lsn_key, snap_key};

    if (klen >= 1 && k[0] == 'L')
        return 1;
    for (size_t i = 0; i < sizeof(local) / sizeof(local[0]); i++)
        if (klen == strlen(local[i]) && memcmp(k, local[i], klen) == 0)
            return 1;
    return 0;
}

/* Do what record r says to txn: the batch's items, then for a batch its
 * entry and the position, in the same transaction. */
static int rec_apply(struct shard_lmdb *sl, MDB_txn *txn, const struct log_rec *r,
                     const uint8_t *buf, size_t len, enum items_mode mode)
{
    uint8_t key[9];
    int rc;

    switch (r->kind) {
    case LOG_LOAD:
        return apply_items(txn, sl->dbi, buf, len, ITEMS_LOAD);
    case LOG_DONE: {
        MDB_val k = {.mv_size = sizeof(snap_key) - 1, .mv_data = (void *)snap_key};
        rc = mdb_del(txn, sl->dbi, &k, NULL);
        rc = rc == MDB_NOTFOUND ? 0 : shard_lmdb_errno(rc);
        if (rc == 0)
            rc = pos_put(txn, sl->dbi, pos_key, &r->pos);
        if (rc == 0)
            rc = pos_put(txn, sl->dbi, base_key, &r->pos);
        return rc;
    }
    case LOG_APPLY:
    case LOG_LEGACY:
        break;
    }
    rc = apply_items(txn, sl->dbi, buf, len, mode);
    if (rc)
        return rc;
    if (sl->no_stream) {
        /* No entry: the stream is empty after this position. */
        rc = pos_put(txn, sl->dbi, base_key, &r->pos);
        return rc ? rc : pos_put(txn, sl->dbi, pos_key, &r->pos);
    }
    entry_key(key, r->pos.lsn);
    MDB_val k = {.mv_size = sizeof(key), .mv_data = key};
    MDB_val v = {.mv_size = ENTRY_VAL_HDR + len};
    rc = mdb_put(txn, sl->dbi, &k, &v, MDB_RESERVE);
    if (rc)
        return shard_lmdb_errno(rc);
    uint8_t *p = v.mv_data;
    endian_put_le(p, r->pos.epoch, 8);
    endian_put_le(p + 8, r->pos.check, 8);
    endian_put_le(p + 16, r->time_ms, 8);
    if (len)
        memcpy(p + ENTRY_VAL_HDR, buf, len);
    return pos_put(txn, sl->dbi, pos_key, &r->pos);
}

/* What a record adds to the transaction: a batch is in it twice, as data
 * and as its entry. Counted into pending_bytes, so a commit (and its
 * latency inside the apply that triggers it) stays about commit_bytes. */
static size_t rec_bytes(const struct shard_lmdb *sl, const struct log_rec *r, size_t len)
{
    return (r->kind == LOG_APPLY || r->kind == LOG_LEGACY) && !sl->no_stream ? 2 * len : len;
}

/* The in-memory side of a record that is now in sl->txn. */
static void rec_note(struct shard_lmdb *sl, const struct log_rec *r, size_t len)
{
    switch (r->kind) {
    case LOG_LOAD:
        return;
    case LOG_DONE:
        sl->snapshotting = 0;
        sl->sbase = r->pos;
        sl->stream_bytes = 0;
        sl->stream_entries = 0;
        break;
    case LOG_APPLY:
    case LOG_LEGACY:
        if (sl->no_stream) {
            sl->sbase = r->pos;
            break;
        }
        sl->stream_bytes += ENTRY_VAL_HDR + len;
        sl->stream_entries++;
        break;
    }
    sl->pos = r->pos;
    if (sl->next_lsn <= r->pos.lsn)
        sl->next_lsn = r->pos.lsn + 1;
}

/* Read the stream's state of txn into memory: at open, and when the
 * transaction is rebuilt from the committed state (before the log replay,
 * whose records then move it on). next_lsn is never lowered. */
static int stream_state_load(struct shard_lmdb *sl, MDB_txn *txn)
{
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = 1, .mv_data = "L"}, v;
    int rc = pos_get(txn, sl->dbi, pos_key, &sl->pos);

    if (rc == 0)
        rc = pos_get(txn, sl->dbi, base_key, &sl->sbase);
    if (rc)
        return rc;
    rc = meta_get(txn, sl->dbi, snap_key, &v);
    if (rc && rc != -ENOENT)
        return rc;
    sl->snapshotting = rc == 0;
    rc = meta_get(txn, sl->dbi, lsn_key, &v);
    if (rc == 0 && v.mv_size == 8)
        sl->lsn_res_committed = endian_get_le(v.mv_data, 8);
    else if (rc == 0)
        return -EIO;
    else if (rc != -ENOENT)
        return rc;
    sl->stream_bytes = 0;
    sl->stream_entries = 0;
    rc = mdb_cursor_open(txn, sl->dbi, &cur);
    if (rc)
        return shard_lmdb_errno(rc);
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && k.mv_size >= 1 && *(const uint8_t *)k.mv_data == 'L') {
        sl->stream_bytes += v.mv_size;
        sl->stream_entries++;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    rc = rc == MDB_NOTFOUND ? 0 : shard_lmdb_errno(rc);
    if (rc == 0 && sl->next_lsn <= sl->pos.lsn)
        sl->next_lsn = sl->pos.lsn + 1;
    return rc;
}

/* ---- the redo log ---- */

/* The check of a record: its payload, seeded with the rest of its header. */
static uint64_t log_check(const uint8_t hdr[LOG_HDR2], uint64_t seq, const uint8_t *payload,
                          size_t len)
{
    return XXH3_64bits_withSeed(payload, len,
                                XXH3_64bits_withSeed(hdr + LOG_HDR, LOG_HDR2 - LOG_HDR, seq));
}

static int log_append(struct shard_lmdb *sl, uint64_t seq, const struct log_rec *r,
                      const uint8_t *buf, size_t len)
{
    uint8_t hdr[LOG_HDR2];
    struct iovec iov[2] = {{hdr, LOG_HDR2}, {(void *)buf, len}};
    size_t want = LOG_HDR2 + len;
    ssize_t n;

    endian_put_le(hdr, LOG_MAGIC2, 4);
    endian_put_le(hdr + 4, (uint32_t)len, 4);
    endian_put_le(hdr + 8, seq, 8);
    endian_put_le(hdr + 24, r->kind, 4);
    endian_put_le(hdr + 28, 0, 4);
    endian_put_le(hdr + 32, r->pos.epoch, 8);
    endian_put_le(hdr + 40, r->pos.lsn, 8);
    endian_put_le(hdr + 48, r->pos.check, 8);
    endian_put_le(hdr + 56, r->time_ms, 8);
    endian_put_le(hdr + 16, log_check(hdr, seq, buf, len), 8);
    struct redo_log *log = &sl->logs[sl->active];

    n = pwritev(log->fd, iov, len ? 2 : 1, log->len);
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
    uint8_t hdr[LOG_HDR2];
    uint8_t *payload = NULL;
    off_t off = 0;
    int rc = 0;

    for (;;) {
        struct log_rec r = {.kind = LOG_LEGACY};
        size_t hlen = LOG_HDR;
        if (pread(fd, hdr, LOG_HDR, off) != LOG_HDR)
            break;
        uint32_t magic = (uint32_t)endian_get_le(hdr, 4), len = (uint32_t)endian_get_le(hdr + 4, 4);
        uint64_t seq = endian_get_le(hdr + 8, 8), check = endian_get_le(hdr + 16, 8);
        if ((magic != LOG_MAGIC && magic != LOG_MAGIC2) || len > BATCH_MAX)
            break;
        if (magic == LOG_MAGIC2) {
            hlen = LOG_HDR2;
            if (pread(fd, hdr + LOG_HDR, LOG_HDR2 - LOG_HDR, off + LOG_HDR) != LOG_HDR2 - LOG_HDR)
                break;
            r.kind = (enum log_kind)endian_get_le(hdr + 24, 4);
            r.pos.epoch = endian_get_le(hdr + 32, 8);
            r.pos.lsn = endian_get_le(hdr + 40, 8);
            r.pos.check = endian_get_le(hdr + 48, 8);
            r.time_ms = endian_get_le(hdr + 56, 8);
            if (r.kind != LOG_APPLY && r.kind != LOG_LOAD && r.kind != LOG_DONE)
                break;
        }
        uint8_t *p = realloc(payload, len ? len : 1);
        if (!p) {
            rc = -ENOMEM;
            goto out;
        }
        payload = p;
        if (pread(fd, payload, len, off + (off_t)hlen) != (ssize_t)len ||
            (magic == LOG_MAGIC2 ? log_check(hdr, seq, payload, len)
                                 : XXH3_64bits_withSeed(payload, len, seq)) != check ||
            batch_validate(payload, len) < 0)
            break;
        off += (off_t)(hlen + len);
        if (seq < *expect)
            continue;
        if (seq != *expect)
            break;
        if (r.kind == LOG_LEGACY) {
            /* Written before positions existed: the next lsn, deterministic
             * from the state it is replayed onto. */
            r.pos.epoch = sl->pos.epoch;
            r.pos.lsn = sl->pos.lsn + 1;
            r.pos.check = stream_check_next(sl->pos.check, r.pos.epoch, r.pos.lsn, payload, len);
        }
        rc = rec_apply(sl, txn, &r, payload, len, ITEMS_BLIND);
        if (rc)
            goto out;
        rec_note(sl, &r, len);
        sl->pending_bytes += rec_bytes(sl, &r, len);
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
    /* The committed copies of what is pending (data and stream entries),
     * copy-on-write overhead, the batch's log copy and its two committed
     * copies, and a margin. */
    uint64_t need = sl->pending_bytes + sl->pending_bytes / 4 + 3 * (uint64_t)len + SPACE_MARGIN;

    if (sl->space_hint >= need + SPACE_PLENTY)
        goto ok;
    if (shard_nowait_refuse())
        return -EWOULDBLOCK; /* asking the disk, perhaps committing: not here */
    space_refresh(sl);
    if (sl->space_hint >= need)
        goto ok;
    if (sl->pending_bytes && txn_commit(sl, 0) == 0) {
        space_refresh(sl);
        need = 3 * (uint64_t)len + SPACE_MARGIN;
        if (sl->space_hint >= need)
            goto ok;
    }
    return -ENOSPC;
ok:
    sl->space_hint -= 3 * (uint64_t)len < sl->space_hint ? 3 * (uint64_t)len : sl->space_hint;
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
        rc = stream_state_load(sl, sl->txn);
        if (rc == 0)
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

/* The lowest lsn a hold keeps the entries after. */
static uint64_t hold_min(const struct shard_lmdb *sl)
{
    uint64_t m = UINT64_MAX;

    for (unsigned i = 0; i < SHARD_LMDB_HOLDS; i++) {
        uint64_t h = __atomic_load_n(&sl->holds[i], __ATOMIC_ACQUIRE);
        if (h < m)
            m = h;
    }
    return m;
}

/* Retention, at commit time: delete the oldest entries while the stream is
 * over its size or they are over its age, but none after a hold. The base
 * moves with them in the same transaction, so every committed state has
 * entries (base, pos] with no hole. Not logged: a state that loses the trim
 * (a power cut, a rebuild) only keeps more entries. */
static int stream_trim(struct shard_lmdb *sl)
{
    uint64_t hold = hold_min(sl), now = now_ms();
    struct stream_pos base = sl->sbase;
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = 1, .mv_data = "L"}, v;
    int rc, trimmed = 0;

    if (sl->snapshotting || sl->stream_bytes == 0)
        return 0;
    rc = mdb_cursor_open(sl->txn, sl->dbi, &cur);
    if (rc)
        return shard_lmdb_errno(rc);
    for (;;) {
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc || k.mv_size != 9 || *(const uint8_t *)k.mv_data != 'L' || v.mv_size < ENTRY_VAL_HDR)
            break;
        uint64_t lsn = endian_get_be64((const uint8_t *)k.mv_data + 1);
        uint64_t t = endian_get_le((const uint8_t *)v.mv_data + 16, 8);
        if (lsn > hold ||
            (sl->stream_bytes <= sl->stream_max && t + sl->stream_age_ms >= now))
            break;
        base.epoch = endian_get_le(v.mv_data, 8);
        base.lsn = lsn;
        base.check = endian_get_le((const uint8_t *)v.mv_data + 8, 8);
        sl->stream_bytes -= v.mv_size < sl->stream_bytes ? v.mv_size : sl->stream_bytes;
        sl->stream_entries -= sl->stream_entries > 0;
        rc = mdb_cursor_del(cur, 0);
        if (rc)
            break;
        trimmed = 1;
        k.mv_size = 1;
        k.mv_data = "L";
    }
    mdb_cursor_close(cur);
    rc = rc == MDB_NOTFOUND ? 0 : shard_lmdb_errno(rc);
    if (rc == 0 && trimmed) {
        /* Without a stream (entries left by an earlier run with one) the
         * base is the position, never older. */
        if (sl->no_stream)
            base = sl->pos;
        rc = pos_put(sl->txn, sl->dbi, base_key, &base);
        if (rc == 0)
            sl->sbase = base;
    }
    return rc;
}

/* What every commit writes besides the batches: the trim, "Mseq", and a
 * raised lsn reservation once next_lsn is within half a step of it. Sets
 * *res to the reservation the commit holds. */
static int commit_prepare(struct shard_lmdb *sl, uint64_t *res)
{
    uint8_t buf[8];
    int rc = stream_trim(sl);

    *res = sl->lsn_res_committed;
    if (rc)
        return rc;
    endian_put_le(buf, sl->seq, 8);
    rc = meta_put(sl->txn, sl->dbi, seq_key, buf, 8);
    if (rc == 0 && sl->next_lsn + sl->lsn_step / 2 >= sl->lsn_res_committed) {
        *res = sl->next_lsn + sl->lsn_step;
        endian_put_le(buf, *res, 8);
        rc = meta_put(sl->txn, sl->dbi, lsn_key, buf, 8);
    }
    return rc;
}

/* Commit the open transaction with a full sync and start over. On failure the
 * transaction is gone, so it is rebuilt from the log on next use. */
static int txn_commit(struct shard_lmdb *sl, int grow)
{
    uint64_t res = 0;
    int rc;

    if (sl->need_rebuild) {
        rc = txn_ensure(sl);
        if (rc)
            return rc;
    }
    if (!sl->txn)
        return 0;
    if (sl->seq == sl->committed_seq && !sl->meta_dirty) {
        /* Nothing logged since the last commit: nothing to make durable. */
        if (!grow)
            return 0;
        mdb_txn_abort(sl->txn);
        sl->txn = NULL;
        map_maybe_grow(sl, 1);
        return 0;
    }
    rc = commit_prepare(sl, &res);
    if (rc) {
        mdb_txn_abort(sl->txn);
        rc = -rc; /* back to LMDB's sign for the failure path */
        goto failed;
    }
    rc = mdb_txn_commit(sl->txn);
    if (rc && reserve_release(sl)) {
        /* Short of space: give up the reserve, rebuild from the log (an
         * unlogged change, a snapshot's start, is lost: its caller gets the
         * error), retry. */
        sl->txn = NULL;
        sl->need_rebuild = 1;
        sl->meta_dirty = 0;
        if (txn_ensure(sl) == 0 && commit_prepare(sl, &res) == 0)
            rc = mdb_txn_commit(sl->txn);
        else if (sl->txn)
            mdb_txn_abort(sl->txn);
    }
    if (rc)
        goto failed;
    sl->txn = NULL;
    sl->meta_dirty = 0;
    /* This commit synced its data pages before writing its meta page, and
     * with them the previous commit's meta page: that one is on disk now. */
    if (sl->committed_seq > sl->durable_seq)
        sl->durable_seq = sl->committed_seq;
    sl->committed_seq = sl->seq;
    if (sl->lsn_res_committed > sl->lsn_res_durable)
        sl->lsn_res_durable = sl->lsn_res_committed;
    sl->lsn_res_committed = res;
    sl->pending_bytes = 0;
    map_maybe_grow(sl, grow);
    space_after_commit(sl);
    return 0;
failed:
    sl->txn = NULL;
    sl->need_rebuild = 1;
    sl->meta_dirty = 0;
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

/* The joined value of a record (shard.h, struct shard_join) in the scan's
 * transaction: 0 and *jv (empty mv_data when absent), or -errno. */
static int join_get(struct shard_lmdb *sl, const struct shard_join *j, const MDB_val *v,
                    MDB_val *jv)
{
    uint8_t key[BATCH_KEY_MAX];
    MDB_val k = {.mv_data = key};
    int rc;

    *jv = (MDB_val){0};
    if (shard_join_key(j, v->mv_data, v->mv_size, key, &k.mv_size) != 0)
        return 0;
    rc = mdb_get(sl->txn, sl->dbi, &k, jv);
    if (rc == MDB_NOTFOUND) {
        *jv = (MDB_val){0};
        return 0;
    }
    return rc ? shard_lmdb_errno(rc) : 0;
}

/* A scan, with its join when j is not NULL (then jfn is called, else fn). */
static int scan_range(struct shard *s, const void *start, size_t slen, const void *end,
                      size_t elen, const struct shard_join *j, shard_scan_fn fn,
                      shard_join_fn jfn, void *ctx)
{
    struct shard_lmdb *sl = to_lmdb(s);
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = slen, .mv_data = (void *)start}, v, jv;
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
        if (key_is_local(k.mv_data, k.mv_size)) {
            /* Hidden: not data (and a snapshot copy must not carry them). */
            rc = skip_local(cur, &k, &v);
            continue;
        }
        if (j) {
            rc = join_get(sl, j, &v, &jv);
            if (rc == 0)
                rc = jfn(ctx, k.mv_data, k.mv_size, v.mv_data, v.mv_size, jv.mv_data,
                         jv.mv_size);
        } else {
            rc = fn(ctx, k.mv_data, k.mv_size, v.mv_data, v.mv_size);
        }
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

static int lmdb_scan(struct shard *s, const void *start, size_t slen, const void *end,
                     size_t elen, shard_scan_fn fn, void *ctx)
{
    return scan_range(s, start, slen, end, elen, NULL, fn, NULL, ctx);
}

static int lmdb_scan_join(struct shard *s, const void *start, size_t slen, const void *end,
                          size_t elen, const struct shard_join *j, shard_join_fn fn, void *ctx)
{
    return scan_range(s, start, slen, end, elen, j, NULL, fn, ctx);
}

/* One attempt: nested transaction, log append, merge into the parent. */
static int apply_once(struct shard_lmdb *sl, const struct log_rec *r, const uint8_t *buf,
                      size_t len, enum items_mode mode)
{
    MDB_txn *child = NULL;
    int rc = txn_ensure(sl);

    if (rc)
        return rc;
    rc = mdb_txn_begin(sl->env, sl->txn, 0, &child);
    if (rc)
        return shard_lmdb_errno(rc);
    rc = rec_apply(sl, child, r, buf, len, mode);
    if (rc)
        goto abort;
    rc = log_append(sl, sl->seq + 1, r, buf, len);
    if (rc)
        goto abort;
    sl->seq++;
    rc = mdb_txn_commit(child);
    if (rc) {
        /* The log has the record but the transaction does not: rebuild it
         * (the replay notes the record's position). */
        sl->need_rebuild = 1;
        return txn_ensure(sl);
    }
    rec_note(sl, r, len);
    return 0;
abort:
    mdb_txn_abort(child);
    return rc;
}

/* Apply one record, admitted by the caller, who holds the lock: the shared
 * tail of every write (apply, apply_at, load, snapshot_done). */
static int record_apply(struct shard_lmdb *sl, const struct log_rec *r, const uint8_t *buf,
                        size_t len, enum items_mode mode)
{
    int rc = apply_once(sl, r, buf, len, mode);

    if (rc == -ENOSPC && !sl->need_rebuild && shard_nowait_refuse())
        return -EWOULDBLOCK; /* the nested transaction was aborted: nothing changed */
    if (rc == -ENOSPC && !sl->need_rebuild) {
        /* Map or dirty list full: commit what we have, grow, try once more.
         * A real full disk fails the commit or the retry with ENOSPC. */
        int crc = txn_commit(sl, 1);
        rc = crc ? crc : apply_once(sl, r, buf, len, mode);
    }
    if (rc == 0) {
        if (sl->pending_bytes == 0)
            clock_gettime(CLOCK_MONOTONIC, &sl->pending_since);
        sl->pending_bytes += rec_bytes(sl, r, len);
        if (sl->pending_bytes >= sl->commit_bytes)
            txn_commit(sl, 0); /* a failure keeps the log; retried later */
    }
    return rc;
}

/* Commit and sync the meta page: everything applied survives power loss. */
static int commit_sync(struct shard_lmdb *sl)
{
    int rc = txn_commit(sl, 0);

    if (rc == 0)
        rc = shard_lmdb_errno(mdb_env_sync(sl->env, 1)); /* the meta page too */
    if (rc == 0) {
        sl->durable_seq = sl->committed_seq;
        sl->lsn_res_durable = sl->lsn_res_committed;
        log_switch(sl, sl->space_hint < SPACE_LOW);
    }
    return rc;
}

/* Make sure next_lsn is below a reservation surely on disk, so no crash can
 * bring back a state that would hand it out again. Normally a commit raised
 * it long ago; right after open or a burst, commit and sync now. */
static int lsn_reserve(struct shard_lmdb *sl)
{
    int rc;

    if (sl->next_lsn < sl->lsn_res_durable)
        return 0;
    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    rc = txn_ensure(sl);
    if (rc)
        return rc;
    sl->meta_dirty = 1;
    rc = commit_sync(sl);
    if (rc == 0 && sl->next_lsn >= sl->lsn_res_durable)
        rc = -EIO; /* cannot happen: the commit raised it */
    return rc;
}

/* Tell the listener, without the shard lock. */
static void notify(struct shard_lmdb *sl, const struct stream_pos *p)
{
    pthread_rwlock_rdlock(&sl->listen_lock);
    if (sl->on_apply)
        sl->on_apply(sl->on_apply_ctx, sl->base.index, p);
    pthread_rwlock_unlock(&sl->listen_lock);
}

/* A batch led by BATCH_AWAIT_VALUE that found its key otherwise: wait, the
 * lock held, for the next batch applied (perhaps the one the sender sent
 * before it) or until deadline_ms. 0 to try again, -EAGAIN if the time is
 * up, -EWOULDBLOCK where no waiting is allowed (the node server's
 * event thread: it redoes the request on a worker). */
static int await_turn(struct shard_lmdb *sl, const struct batch *b, uint64_t *deadline_ms)
{
    struct batch_item it;
    size_t pos = 0;
    uint64_t now = (uint64_t)clock_mono_ms();

    if (batch_next(b->buf, b->len, &pos, &it) != 1 || it.op != BATCH_AWAIT_VALUE)
        return -EAGAIN;
    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    if (!*deadline_ms)
        *deadline_ms = now + SHARD_AWAIT_MS;
    if (now >= *deadline_ms)
        return -EAGAIN;
    struct timespec t;
    clock_deadline_at(&t, (int64_t)*deadline_ms);
    /* Woken by every batch applied: try the whole batch again (its check,
     * its log record) only once its first item holds. */
    sl->awaiting++;
    do {
        if (pthread_cond_timedwait(&sl->applied, &sl->lock, &t) == ETIMEDOUT)
            break;
    } while (txn_ensure(sl) == 0 && check_assert(sl->txn, sl->dbi, &it) == -EAGAIN);
    sl->awaiting--;
    return 0;
}

int shard_lmdb_apply_pos(struct shard *s, const struct batch *b, struct stream_pos *out)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct log_rec r = {.kind = LOG_APPLY};
    int rc;

    if (b->error)
        return b->error;
    if (b->count == 0 && !out)
        return 0;
    rc = lock_or_refuse(sl);
    if (rc)
        return rc;
    if (b->count == 0) {
        if (out)
            *out = sl->pos;
        goto out;
    }
    for (uint64_t deadline = 0;;) {
        if (sl->snapshotting) {
            rc = -EBUSY;
            goto out;
        }
        /* Without waiting: a batch that needs no commit (the log write
         * goes to the page cache). */
        if (sl->pending_bytes + 2 * b->len >= sl->commit_bytes && shard_nowait_refuse()) {
            rc = -EWOULDBLOCK;
            goto out;
        }
        rc = space_admit(sl, b->len);
        if (rc == 0)
            rc = lsn_reserve(sl);
        if (rc)
            goto out;
        r.pos.epoch = sl->epoch;
        r.pos.lsn = sl->next_lsn;
        r.pos.check = stream_check_next(sl->pos.check, r.pos.epoch, r.pos.lsn, b->buf, b->len);
        r.time_ms = now_ms();
        rc = record_apply(sl, &r, b->buf, b->len, ITEMS_CHECKED);
        if (rc != -EAGAIN || (rc = await_turn(sl, b, &deadline)) != 0)
            break;
    }
    if (rc == 0 && sl->awaiting)
        pthread_cond_broadcast(&sl->applied);
    if (rc == 0 && out)
        *out = r.pos;
out:
    pthread_mutex_unlock(&sl->lock);
    if (rc == 0 && b->count)
        notify(sl, &r.pos);
    return rc;
}

static int lmdb_apply(struct shard *s, const struct batch *b)
{
    return shard_lmdb_apply_pos(s, b, NULL);
}

int shard_lmdb_apply_at(struct shard *s, const struct stream_pos *pos, const struct batch *b)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct log_rec r = {.kind = LOG_APPLY, .pos = *pos};
    int rc;

    if (b->error || b->count == 0)
        return -EINVAL;
    rc = lock_or_refuse(sl);
    if (rc)
        return rc;
    if (sl->snapshotting) {
        rc = -EAGAIN;
        goto out;
    }
    if (pos->lsn <= sl->pos.lsn ||
        pos->check != stream_check_next(sl->pos.check, pos->epoch, pos->lsn, b->buf, b->len)) {
        rc = -ESTALE;
        goto out;
    }
    r.time_ms = now_ms();
    rc = record_apply(sl, &r, b->buf, b->len, ITEMS_BLIND);
out:
    pthread_mutex_unlock(&sl->lock);
    if (rc == 0)
        notify(sl, pos);
    return rc;
}

static int lmdb_sync(struct shard *s)
{
    struct shard_lmdb *sl = to_lmdb(s);
    int rc;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    pthread_mutex_lock(&sl->lock);
    rc = commit_sync(sl);
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
    /* Data records only: not the stream's entries nor the local 'M' ones. */
    uint64_t local = sl->stream_entries;
    static const char *const meta[] = {seq_key, pos_key, base_key, lsn_key, snap_key};
    for (size_t i = 0; i < sizeof(meta) / sizeof(meta[0]); i++) {
        MDB_val v;
        local += meta_get(sl->txn, sl->dbi, meta[i], &v) == 0;
    }
    st->records = ms.ms_entries > local ? ms.ms_entries - local : 0;
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
    pthread_cond_destroy(&sl->applied);
    pthread_mutex_destroy(&sl->lock);
    pthread_rwlock_destroy(&sl->listen_lock);
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

    if (sl->seq != sl->committed_seq || sl->meta_dirty) {
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
    sl->lsn_res_durable = sl->lsn_res_committed;
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
    pthread_condattr_t mono;
    pthread_condattr_init(&mono);
    pthread_condattr_setclock(&mono, CLOCK_MONOTONIC);
    pthread_cond_init(&sl->applied, &mono);
    pthread_condattr_destroy(&mono);
    pthread_rwlock_init(&sl->listen_lock, NULL);
    sl->interval_ms = opt && opt->commit_interval_ms ? opt->commit_interval_ms : DEFAULT_INTERVAL_MS;
    sl->commit_bytes = opt && opt->commit_bytes ? opt->commit_bytes : DEFAULT_COMMIT_BYTES;
    sl->stream_max = opt && opt->stream_bytes ? opt->stream_bytes : DEFAULT_STREAM_BYTES;
    sl->stream_age_ms = opt && opt->stream_age_ms ? opt->stream_age_ms : DEFAULT_STREAM_AGE_MS;
    sl->lsn_step = opt && opt->lsn_step ? opt->lsn_step : DEFAULT_LSN_STEP;
    sl->no_stream = opt && opt->no_stream;
    if (sl->no_stream)
        sl->stream_max = sl->stream_age_ms = 0; /* trim what an earlier run left */
    for (unsigned i = 0; i < SHARD_LMDB_HOLDS; i++)
        sl->holds[i] = UINT64_MAX;
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
        rc = stream_state_load(sl, sl->txn);
    if (rc == 0) {
        /* Every lsn handed out is below the reservation: start there. */
        sl->lsn_res_durable = sl->lsn_res_committed;
        if (sl->next_lsn < sl->lsn_res_committed)
            sl->next_lsn = sl->lsn_res_committed;
        rc = log_replay(sl, sl->txn);
    }
    if (rc == 0) {
        if (!sl->epoch_set)
            sl->epoch = sl->pos.epoch;
        sl->meta_dirty = 1; /* commit the raised reservation (below) */
        rc = recover_commit(sl);
    }
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

/* ---- the change stream's interface ---- */

int shard_lmdb_position(struct shard *s, struct stream_pos *out)
{
    struct shard_lmdb *sl = to_lmdb(s);
    int rc = lock_or_refuse(sl);

    if (rc)
        return rc;
    rc = txn_ensure(sl); /* a failed commit: the position of the rebuilt txn */
    if (rc == 0 && sl->snapshotting)
        rc = -EAGAIN;
    *out = sl->pos;
    if (rc)
        memset(out, 0, sizeof(*out));
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

void shard_lmdb_set_epoch(struct shard *s, uint64_t epoch)
{
    struct shard_lmdb *sl = to_lmdb(s);

    pthread_mutex_lock(&sl->lock);
    sl->epoch = epoch;
    sl->epoch_set = 1;
    pthread_mutex_unlock(&sl->lock);
}

void shard_lmdb_stream_hold(struct shard *s, unsigned slot, uint64_t lsn)
{
    struct shard_lmdb *sl = to_lmdb(s);

    if (slot >= SHARD_LMDB_HOLDS)
        return;
    /* Atomic, not under the shard lock: the stream route sets holds on a
     * node server's I/O thread, which must not wait behind a commit. A
     * trim racing with a new hold keeps its own view; the entries it
     * drops were older than the previous hold anyway. */
    __atomic_store_n(&sl->holds[slot], lsn, __ATOMIC_RELEASE);
}

void shard_lmdb_on_apply(struct shard *s,
                         void (*fn)(void *ctx, unsigned index, const struct stream_pos *p),
                         void *ctx)
{
    struct shard_lmdb *sl = to_lmdb(s);

    pthread_rwlock_wrlock(&sl->listen_lock);
    sl->on_apply = fn;
    sl->on_apply_ctx = fn ? ctx : NULL;
    pthread_rwlock_unlock(&sl->listen_lock);
}

/* Where a reader at `after` continues: 0 and *from (the first lsn to hand
 * out; 0 when nothing is newer), or -ERANGE / -ESTALE (the header). */
static int stream_start(struct shard_lmdb *sl, const struct stream_pos *after, uint64_t *from)
{
    uint8_t key[9];
    MDB_val k = {.mv_size = sizeof(key), .mv_data = key}, v;
    int rc;

    *from = 0;
    if (after->lsn >= sl->pos.lsn)
        return stream_pos_eq(after, &sl->pos) ? 0 : -ESTALE;
    if (stream_pos_eq(after, &sl->sbase))
        goto ok;
    if (after->lsn < sl->sbase.lsn)
        return -ERANGE;
    if (after->lsn == sl->sbase.lsn)
        return -ESTALE;
    entry_key(key, after->lsn);
    rc = mdb_get(sl->txn, sl->dbi, &k, &v);
    if (rc == MDB_NOTFOUND)
        return -ESTALE;
    if (rc)
        return shard_lmdb_errno(rc);
    if (v.mv_size < ENTRY_VAL_HDR || endian_get_le(v.mv_data, 8) != after->epoch ||
        endian_get_le((const uint8_t *)v.mv_data + 8, 8) != after->check)
        return -ESTALE;
ok:
    *from = after->lsn + 1;
    return 0;
}

int shard_lmdb_stream_read(struct shard *s, const struct stream_pos *after, size_t max_bytes,
                           stream_entry_fn fn, void *ctx)
{
    struct shard_lmdb *sl = to_lmdb(s);
    MDB_cursor *cur = NULL;
    uint8_t key[9];
    MDB_val k = {.mv_size = sizeof(key), .mv_data = key}, v;
    uint64_t from;
    size_t bytes = 0;
    int rc = lock_or_refuse(sl), count = 0;

    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc == 0 && sl->snapshotting)
        rc = -EAGAIN;
    if (rc == 0)
        rc = stream_start(sl, after, &from);
    if (rc || from == 0)
        goto out;
    rc = mdb_cursor_open(sl->txn, sl->dbi, &cur);
    if (rc) {
        rc = shard_lmdb_errno(rc);
        goto out;
    }
    entry_key(key, from);
    rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && k.mv_size == 9 && *(const uint8_t *)k.mv_data == 'L') {
        const uint8_t *p = v.mv_data;
        struct stream_pos ep;
        if (v.mv_size < ENTRY_VAL_HDR) {
            rc = -EIO;
            goto out;
        }
        ep.epoch = endian_get_le(p, 8);
        ep.lsn = endian_get_be64((const uint8_t *)k.mv_data + 1);
        ep.check = endian_get_le(p + 8, 8);
        size_t blen = v.mv_size - ENTRY_VAL_HDR;
        rc = fn(ctx, &ep, endian_get_le(p + 16, 8), p + ENTRY_VAL_HDR, blen);
        if (rc < 0)
            goto out;
        count++;
        bytes += STREAM_ENTRY_HDR + blen;
        if (rc == 1 || bytes >= max_bytes)
            break;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    rc = rc == MDB_NOTFOUND || rc == 0 || rc == 1 ? 0 : shard_lmdb_errno(rc);
out:
    mdb_cursor_close(cur);
    pthread_mutex_unlock(&sl->lock);
    return rc ? rc : count;
}

int shard_lmdb_snapshot_begin(struct shard *s)
{
    struct shard_lmdb *sl = to_lmdb(s);
    uint8_t buf[8];
    int rc;

    if (shard_nowait_refuse())
        return -EWOULDBLOCK;
    pthread_mutex_lock(&sl->lock);
    rc = txn_ensure(sl);
    if (rc)
        goto out;
    /* Everything goes in one cheap step (the tree's pages are freed, not
     * its records deleted one by one), then the local records come back:
     * "Mseq" is written by the commit, the reservation and the mark here. */
    rc = shard_lmdb_errno(mdb_drop(sl->txn, sl->dbi, 0));
    if (rc == 0 && sl->lsn_res_committed) {
        endian_put_le(buf, sl->lsn_res_committed, 8);
        rc = meta_put(sl->txn, sl->dbi, lsn_key, buf, 8);
    }
    if (rc == 0)
        rc = meta_put(sl->txn, sl->dbi, snap_key, "", 0);
    if (rc) {
        /* Back to the committed state plus the log. */
        mdb_txn_abort(sl->txn);
        sl->txn = NULL;
        sl->need_rebuild = 1;
        goto out;
    }
    memset(&sl->pos, 0, sizeof(sl->pos));
    memset(&sl->sbase, 0, sizeof(sl->sbase));
    sl->stream_bytes = 0;
    sl->stream_entries = 0;
    sl->snapshotting = 1;
    sl->meta_dirty = 1;
    rc = commit_sync(sl); /* the mark is durable before anything is loaded */
out:
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

int shard_lmdb_load(struct shard *s, const struct batch *b)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct log_rec r = {.kind = LOG_LOAD};
    int rc;

    if (b->error)
        return b->error;
    rc = lock_or_refuse(sl);
    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc == 0 && !sl->snapshotting)
        rc = -EINVAL;
    if (rc == 0 && b->count)
        rc = record_apply(sl, &r, b->buf, b->len, ITEMS_LOAD);
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

int shard_lmdb_snapshot_done(struct shard *s, const struct stream_pos *base)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct log_rec r = {.kind = LOG_DONE, .pos = *base};
    int rc = lock_or_refuse(sl);

    if (rc)
        return rc;
    rc = txn_ensure(sl);
    if (rc == 0 && !sl->snapshotting)
        rc = -EINVAL;
    if (rc == 0)
        rc = record_apply(sl, &r, NULL, 0, ITEMS_BLIND);
    pthread_mutex_unlock(&sl->lock);
    if (rc == 0)
        notify(sl, base);
    return rc;
}

/* ---- the content checksum (shard_lmdb.h) ---- */

static void sum_u32(XXH3_state_t *st, size_t v)
{
    uint8_t b[4];

    endian_put_le(b, (uint64_t)v, 4);
    XXH3_128bits_update(st, b, sizeof(b));
}

/* One piece of the pass under the lock: from the key after last (none:
 * the first key) until about SHARD_LMDB_SUM_PIECE bytes were hashed.
 * 0 and *done at the end; -EAGAIN when the position is not `at`. */
static int sum_piece(struct shard_lmdb *sl, XXH3_state_t *st, const struct stream_pos *at,
                     uint8_t *last, size_t *lastlen, int *done, struct shard_lmdb_sum *out)
{
    MDB_cursor *cur = NULL;
    MDB_val k = {.mv_size = *lastlen, .mv_data = last}, v;
    size_t piece = 0;
    int rc;

    pthread_mutex_lock(&sl->lock);
    rc = txn_ensure(sl);
    if (rc == 0 && at && (sl->snapshotting || !stream_pos_eq(&sl->pos, at)))
        rc = -EAGAIN;
    if (rc)
        goto out;
    rc = mdb_cursor_open(sl->txn, sl->dbi, &cur);
    if (rc) {
        rc = shard_lmdb_errno(rc);
        goto out;
    }
    if (*lastlen == 0) {
        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    } else {
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc == 0 && k.mv_size == *lastlen && memcmp(k.mv_data, last, *lastlen) == 0)
            rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    while (rc == 0) {
        if (key_is_local(k.mv_data, k.mv_size)) {
            rc = skip_local(cur, &k, &v);
            continue;
        }
        if (piece >= SHARD_LMDB_SUM_PIECE)
            goto out; /* the next piece starts after *last */
        sum_u32(st, k.mv_size);
        XXH3_128bits_update(st, k.mv_data, k.mv_size);
        sum_u32(st, v.mv_size);
        XXH3_128bits_update(st, v.mv_data, v.mv_size);
        out->records++;
        out->bytes += k.mv_size + v.mv_size;
        piece += k.mv_size + v.mv_size;
        memcpy(last, k.mv_data, k.mv_size); /* LMDB keys: at most BATCH_KEY_MAX */
        *lastlen = k.mv_size;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc == MDB_NOTFOUND) {
        *done = 1;
        rc = 0;
    } else {
        rc = shard_lmdb_errno(rc);
    }
out:
    mdb_cursor_close(cur);
    pthread_mutex_unlock(&sl->lock);
    return rc;
}

/* The pass itself; `moving`: hash whatever the shard holds as it goes
 * (to bring its pages into the cache), not one position. */
static int sum_pass(struct shard_lmdb *sl, int moving, struct shard_lmdb_sum *out)
{
    XXH3_state_t *st = XXH3_createState();
    uint8_t last[BATCH_KEY_MAX];
    size_t lastlen = 0;
    XXH128_canonical_t c;
    int rc, done = 0;

    memset(out, 0, sizeof(*out));
    if (!st)
        return -ENOMEM;
    XXH3_128bits_reset(st);
    pthread_mutex_lock(&sl->lock);
    rc = txn_ensure(sl);
    if (rc == 0 && sl->snapshotting)
        rc = -EAGAIN;
    out->pos = sl->pos;
    pthread_mutex_unlock(&sl->lock);
    while (rc == 0 && !done)
        rc = sum_piece(sl, st, moving ? NULL : &out->pos, last, &lastlen, &done, out);
    if (rc == 0) {
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(st));
        memcpy(out->digest, c.digest, sizeof(out->digest));
    }
    XXH3_freeState(st);
    return rc;
}

int shard_lmdb_checksum(struct shard *s, struct shard_lmdb_sum *out)
{
    return sum_pass(to_lmdb(s), 0, out);
}

int shard_lmdb_warm(struct shard *s)
{
    struct shard_lmdb *sl = to_lmdb(s);
    struct shard_lmdb_sum ignored;
    int fd = -1;

    /* The file first, read ahead in large requests (MDB_NORDAHEAD leaves
     * the walk below one page a read), then the walk. */
    if (mdb_env_get_fd(sl->env, &fd) == 0 && fd >= 0)
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
    return sum_pass(sl, 1, &ignored);
}

static const struct shard_ops shard_lmdb_ops = {
    .get = lmdb_get,
    .get_many = lmdb_get_many,
    .scan = lmdb_scan,
    .scan_join = lmdb_scan_join,
    .apply = lmdb_apply,
    .sync = lmdb_sync,
    .stat = lmdb_stat,
    .close = lmdb_close,
};

