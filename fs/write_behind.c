/* write_behind.c -- writes to another node's shard, answered before they land
 * (see write_behind.h for the promise).
 *
 * DESIGN
 * Each file with writes held has a struct wb_file in a small hash table:
 * the batch gathering writes (one contiguous range), the batches in flight
 * (up to WB_DEPTH), the inode as the last batch sent will leave it (base),
 * and the first failure not yet reported.
 *  1. wb_write appends to the gathering batch when the write continues its
 *     range and fits; otherwise it waits until a worker has taken the batch
 *     (and for room under WB_BYTES_MAX), then starts a new one.
 *  2. A worker takes the gathering batch (later writes gather into the
 *     next one) and applies it:
 *     - planned, when it starts at or past base's end in a chunk of its own
 *       (ns_write_plan: it reads nothing, so it can be built before the
 *       batch before it has landed): the batch asserts base, and base moves
 *       to the inode it makes at once, so the next batch can be planned and
 *       sent while this one travels. A batch that lands before the one
 *       before it finds the inode not yet as asserted, changes nothing
 *       (-EAGAIN), waits until every batch before it is done and is done
 *       again with ns_write_ino. So batches land in the order written, each
 *       a compare-and-swap on the inode that the one before has settled.
 *     - otherwise (a write into the file, the first batch) with ns_write_ino,
 *       alone: it waits until nothing else of the file is in flight.
 *     To keep batches plannable, one taken while others fly ends at a chunk
 *     boundary; the rest of the last chunk starts the next batch.
 *  3. A failure is kept in the file, and what it gathered after is dropped
 *     (never applied after a hole); wb_drain reports it once.
 *  4. A file with nothing gathering, in flight, failed or waited for is
 *     freed: the table holds only files being written.
 * One mutex guards it all; copies into a batch are made under it (a
 * write's copy costs less than the round trip it saves, and the kernel
 * sends one write of a file at a time).
 */
#include "write_behind.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"

#define WB_BUCKETS 256u
#define WB_POOL_MAX 4u /* free batch buffers kept for reuse */

struct wb_batch {
    uint64_t off;
    size_t len;
    int kill_suidgid;
    uint8_t *data; /* WB_BATCH_MAX bytes */
    struct wb_batch *next; /* the pool */
};

struct wb_file {
    struct ino_id id;
    struct wb_batch *gathering; /* taking writes; NULL if none */
    uint64_t next_seq;          /* the number of the next batch taken */
    uint64_t flying[WB_DEPTH];  /* the numbers of the batches in flight */
    unsigned nflying;
    int planning;               /* a worker builds a batch from base */
    int base_valid;
    struct inode base;          /* as the last batch sent leaves the inode */
    int ready;                  /* on the ready list */
    int err;                    /* first failure not yet reported, -errno */
    unsigned waiters;           /* threads in wb_drain or wb_write waiting on it */
    unsigned drainers;          /* of those, in wb_drain: send everything */
    struct wb_file *next;       /* hash chain */
    struct wb_file *ready_next;
};

struct wb {
    struct ns *ns;
    pthread_mutex_t lock;
    pthread_cond_t work;              /* the ready list grew, or stop */
    pthread_cond_t landed;            /* a batch landed, or a file was taken */
    struct wb_file *files[WB_BUCKETS]; /* protected by lock */
    struct wb_file *ready_head, **ready_tail; /* protected by lock */
    struct wb_batch *pool;            /* protected by lock */
    unsigned pooled;                  /* protected by lock */
    size_t held;                      /* bytes gathering or in flight; protected by lock */
    atomic_uint nfiles;               /* files in the table; written under lock */
    int stop;                         /* protected by lock */
    int running;
    pthread_t threads[WB_THREADS];
};

static unsigned bucket_of(const struct ino_id *id)
{
    return (unsigned)(record_id_ino(id) & (WB_BUCKETS - 1));
}

static struct wb_file *file_find(struct wb *wb, const struct ino_id *id)
{
    for (struct wb_file *f = wb->files[bucket_of(id)]; f; f = f->next)
        if (memcmp(&f->id, id, sizeof(*id)) == 0)
            return f;
    return NULL;
}

static struct wb_file *file_get(struct wb *wb, const struct ino_id *id)
{
    struct wb_file *f = file_find(wb, id);

    if (f || !(f = calloc(1, sizeof(*f))))
        return f;
    f->id = *id;
    f->next = wb->files[bucket_of(id)];
    wb->files[bucket_of(id)] = f;
    atomic_fetch_add(&wb->nfiles, 1);
    return f;
}

/* Writes of f taken and not landed, or a failure to report. */
static int file_busy(const struct wb_file *f)
{
    return f->gathering || f->nflying || f->planning || f->err;
}

/* Step 4: free f if nothing of it is left; a file's base is kept until
 * wb_forget, so its next write can be planned. */
static void file_maybe_free(struct wb *wb, struct wb_file *f)
{
    if (file_busy(f) || f->ready || f->waiters || f->base_valid)
        return;
    for (struct wb_file **p = &wb->files[bucket_of(&f->id)]; *p; p = &(*p)->next) {
        if (*p == f) {
            *p = f->next;
            break;
        }
    }
    atomic_fetch_sub(&wb->nfiles, 1);
    free(f);
}

static struct wb_batch *batch_take(struct wb *wb)
{
    struct wb_batch *b = wb->pool;

    if (b) {
        wb->pool = b->next;
        wb->pooled--;
        return b;
    }
    if (!(b = calloc(1, sizeof(*b))))
        return NULL;
    if (!(b->data = malloc(WB_BATCH_MAX))) {
        free(b);
        return NULL;
    }
    return b;
}

static void batch_release(struct wb *wb, struct wb_batch *b)
{
    wb->held -= b->len;
    if (wb->pooled < WB_POOL_MAX) {
        b->next = wb->pool;
        wb->pool = b;
        wb->pooled++;
        return;
    }
    free(b->data);
    free(b);
}

/* f's gathering batch may go now (step 2): alone, or planned behind the
 * ones in flight when it holds a whole chunk to end on (or is drained). */
static int sendable(const struct wb_file *f)
{
    const struct wb_batch *b = f->gathering;

    if (!b || f->planning || f->err)
        return 0;
    if (f->nflying == 0)
        return 1;
    return f->nflying < WB_DEPTH && f->base_valid && ns_write_plannable(&f->base, b->off) &&
           (f->drainers || b->len >= RECORD_CHUNK);
}

static void ready_push(struct wb *wb, struct wb_file *f)
{
    if (f->ready || !sendable(f))
        return;
    f->ready = 1;
    f->ready_next = NULL;
    *wb->ready_tail = f;
    wb->ready_tail = &f->ready_next;
    pthread_cond_signal(&wb->work);
}

static struct wb_file *ready_pop(struct wb *wb)
{
    struct wb_file *f = wb->ready_head;

    if (f) {
        wb->ready_head = f->ready_next;
        if (!wb->ready_head)
            wb->ready_tail = &wb->ready_head;
        f->ready = 0;
    }
    return f;
}

/* Take f's gathering batch to send; one taken while others of f fly (or
 * may by the time it lands) ends at a chunk boundary, and the rest of the
 * last chunk starts the next batch (NULL if memory is short: then it all
 * goes). */
static struct wb_batch *take(struct wb *wb, struct wb_file *f)
{
    struct wb_batch *b = f->gathering, *rest;
    uint64_t end = b->off + b->len, cut = end / RECORD_CHUNK * RECORD_CHUNK;

    f->gathering = NULL;
    if (f->drainers || cut <= b->off || cut == end || !(rest = batch_take(wb)))
        return b;
    rest->off = cut;
    rest->len = (size_t)(end - cut);
    rest->kill_suidgid = b->kill_suidgid;
    memcpy(rest->data, b->data + (cut - b->off), rest->len);
    b->len -= rest->len;
    f->gathering = rest; /* wb->held is unchanged: the bytes moved */
    return b;
}

/* No batch of f taken before seq is still in flight. */
static int first_in_flight(const struct wb_file *f, uint64_t seq)
{
    for (unsigned i = 0; i < f->nflying; i++)
        if (f->flying[i] < seq)
            return 0;
    return 1;
}

static void flying_end(struct wb_file *f, uint64_t seq)
{
    for (unsigned i = 0; i < f->nflying; i++) {
        if (f->flying[i] == seq) {
            f->flying[i] = f->flying[--f->nflying];
            return;
        }
    }
}

/* Step 2, the write alone (ns_write_ino) once every batch before seq is
 * done; with the lock held, dropped meanwhile. A failure before it means
 * it is dropped (step 3): 0. */
static ssize_t apply_alone(struct wb *wb, struct wb_file *f, struct wb_batch *b, uint64_t seq)
{
    struct inode after;
    ssize_t n;

    f->base_valid = 0; /* nothing is planned on it meanwhile */
    while (!first_in_flight(f, seq))
        pthread_cond_wait(&wb->landed, &wb->lock);
    if (f->err)
        return 0;
    pthread_mutex_unlock(&wb->lock);
    n = ns_write_ino(wb->ns, &f->id, b->off, b->data, b->len, &after);
    pthread_mutex_lock(&wb->lock);
    if (n >= 0 && f->nflying == 1) {
        f->base = after; /* nothing was planned on the old base since */
        f->base_valid = 1;
    }
    return n;
}

/* Step 2, planned: build the batch on base (others may plan theirs once
 * base moved), send it; done alone if it found the inode otherwise. */
static ssize_t apply_planned(struct wb *wb, struct wb_file *f, struct wb_batch *b, uint64_t seq)
{
    struct inode base = f->base, after;
    struct batch batch;
    int rc;

    f->planning = 1;
    pthread_mutex_unlock(&wb->lock);
    rc = ns_write_plan(wb->ns, &base, b->off, b->data, b->len, f->nflying > 1, &batch, &after);
    pthread_mutex_lock(&wb->lock);
    f->planning = 0;
    if (rc)
        return rc;
    f->base = after;
    ready_push(wb, f); /* the next batch may be planned on it now */
    pthread_mutex_unlock(&wb->lock);
    rc = ns_write_planned(wb->ns, &batch, &after);
    pthread_mutex_lock(&wb->lock);
    if (rc == -EAGAIN || rc == -EBADSLT)
        return apply_alone(wb, f, b, seq);
    return rc;
}

static void apply_one(struct wb *wb, struct wb_file *f)
{
    struct wb_batch *b = take(wb, f);
    uint64_t seq = f->next_seq++;
    int planned = f->base_valid && ns_write_plannable(&f->base, b->off);
    ssize_t n;

    f->flying[f->nflying++] = seq;
    pthread_cond_broadcast(&wb->landed); /* a writer waiting to start a batch */
    n = planned ? apply_planned(wb, f, b, seq) : apply_alone(wb, f, b, seq);
    flying_end(f, seq);
    batch_release(wb, b);
    if (n < 0 && !f->err)
        f->err = (int)n;
    if (f->err) {
        f->base_valid = 0;
        if (f->gathering) { /* step 3: nothing lands after a hole */
            batch_release(wb, f->gathering);
            f->gathering = NULL;
        }
    }
    ready_push(wb, f);
    pthread_cond_broadcast(&wb->landed);
    file_maybe_free(wb, f);
}
static void *worker_main(void *arg)
{
    struct wb *wb = arg;

    pthread_mutex_lock(&wb->lock);
    for (;;) {
        struct wb_file *f = ready_pop(wb);
        if (f) {
            apply_one(wb, f);
            continue;
        }
        if (wb->stop)
            break;
        pthread_cond_wait(&wb->work, &wb->lock);
    }
    pthread_mutex_unlock(&wb->lock);
    return NULL;
}

struct wb *wb_new(struct ns *ns)
{
    struct wb *wb = calloc(1, sizeof(*wb));

    if (!wb)
        return NULL;
    wb->ns = ns;
    pthread_mutex_init(&wb->lock, NULL);
    pthread_cond_init(&wb->work, NULL);
    pthread_cond_init(&wb->landed, NULL);
    wb->ready_tail = &wb->ready_head;
    return wb;
}

int wb_start(struct wb *wb)
{
    sigset_t all, old;
    int rc = 0;
    unsigned i;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals go to the main thread */
    for (i = 0; i < WB_THREADS && rc == 0; i++) {
        rc = pthread_create(&wb->threads[i], NULL, worker_main, wb);
        if (rc == 0)
            pthread_setname_np(wb->threads[i], "shardfs-wbehind");
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        i--; /* the one that failed */
        pthread_mutex_lock(&wb->lock);
        wb->stop = 1;
        pthread_cond_broadcast(&wb->work);
        pthread_mutex_unlock(&wb->lock);
        while (i-- > 0)
            pthread_join(wb->threads[i], NULL);
        wb->stop = 0;
        return -rc;
    }
    wb->running = 1;
    return 0;
}

void wb_stop(struct wb *wb)
{
    if (!wb || !wb->running)
        return;
    wb_drain_all(wb);
    pthread_mutex_lock(&wb->lock);
    wb->stop = 1;
    pthread_cond_broadcast(&wb->work);
    pthread_mutex_unlock(&wb->lock);
    for (unsigned i = 0; i < WB_THREADS; i++)
        pthread_join(wb->threads[i], NULL);
    wb->running = 0;
}

void wb_free(struct wb *wb)
{
    if (!wb)
        return;
    wb_stop(wb);
    for (unsigned b = 0; b < WB_BUCKETS; b++) {
        while (wb->files[b]) {
            struct wb_file *f = wb->files[b];
            wb->files[b] = f->next;
            if (f->gathering) /* never started: nothing was taken */
                batch_release(wb, f->gathering);
            free(f);
        }
    }
    while (wb->pool) {
        struct wb_batch *b = wb->pool;
        wb->pool = b->next;
        free(b->data);
        free(b);
    }
    pthread_mutex_destroy(&wb->lock);
    pthread_cond_destroy(&wb->work);
    pthread_cond_destroy(&wb->landed);
    free(wb);
}

/* f's gathering batch can take [off, off + size). */
static int gathers(const struct wb_file *f, uint64_t off, size_t size, int kill_suidgid)
{
    const struct wb_batch *b = f->gathering;

    return b && b->off + b->len == off && b->len + size <= WB_BATCH_MAX &&
           b->kill_suidgid == kill_suidgid;
}

int wb_write(struct wb *wb, const struct ino_id *id, uint64_t off, const void *data,
             size_t size, int kill_suidgid)
{
    struct wb_file *f;
    int rc = 0, pushing = 0;

    if (size > WB_BATCH_MAX)
        return -EINVAL;
    pthread_mutex_lock(&wb->lock);
    if (!(f = file_get(wb, id))) {
        rc = -ENOMEM;
        goto out;
    }
    f->waiters++;
    /* Step 1. A batch that cannot take this range is let go first, so the
     * file's writes land in their order; room under WB_BYTES_MAX next. */
    while (!f->err && !gathers(f, off, size, kill_suidgid) &&
           (f->gathering || wb->held + size > WB_BYTES_MAX)) {
        /* Another range: all of the gathering batch goes (a full one
         * that this write continues may be cut as usual). */
        if (!pushing && f->gathering && f->gathering->off + f->gathering->len != off) {
            f->drainers++;
            pushing = 1;
        }
        ready_push(wb, f);
        pthread_cond_wait(&wb->landed, &wb->lock);
    }
    f->drainers -= pushing;
    f->waiters--;
    if (f->err) {
        rc = f->err;
        goto out;
    }
    if (!f->gathering) {
        if (!(f->gathering = batch_take(wb))) {
            rc = -ENOMEM;
            goto out;
        }
        f->gathering->off = off;
        f->gathering->len = 0;
        f->gathering->kill_suidgid = kill_suidgid;
    }
    memcpy(f->gathering->data + f->gathering->len, data, size);
    f->gathering->len += size;
    wb->held += size;
    ready_push(wb, f);
out:
    if (f)
        file_maybe_free(wb, f);
    pthread_mutex_unlock(&wb->lock);
    return rc;
}

/* Wait until f has nothing gathering or in flight; with report, take its
 * failure (returned once); with forget, free it. */
static int settle(struct wb *wb, const struct ino_id *id, int report, int forget)
{
    struct wb_file *f;
    int rc = 0;

    if (!wb || atomic_load(&wb->nfiles) == 0)
        return 0;
    pthread_mutex_lock(&wb->lock);
    if ((f = file_find(wb, id)) != NULL) {
        f->waiters++;
        f->drainers++;
        while (f->gathering || f->nflying || f->planning) {
            ready_push(wb, f);
            pthread_cond_wait(&wb->landed, &wb->lock);
        }
        f->drainers--;
        f->waiters--;
        if (forget)
            f->base_valid = 0;
        if (report) {
            rc = f->err;
            f->err = 0;
        }
        file_maybe_free(wb, f);
    }
    pthread_mutex_unlock(&wb->lock);
    return rc;
}

int wb_drain(struct wb *wb, const struct ino_id *id)
{
    return settle(wb, id, 1, 0);
}

void wb_wait(struct wb *wb, const struct ino_id *id)
{
    settle(wb, id, 0, 1);
}

int wb_holds(struct wb *wb, const struct ino_id *id)
{
    int held;

    if (!wb || atomic_load(&wb->nfiles) == 0)
        return 0;
    pthread_mutex_lock(&wb->lock);
    struct wb_file *f = file_find(wb, id);
    held = f && file_busy(f);
    pthread_mutex_unlock(&wb->lock);
    return held;
}

void wb_drain_all(struct wb *wb)
{
    if (!wb || atomic_load(&wb->nfiles) == 0)
        return;
    pthread_mutex_lock(&wb->lock);
    for (;;) {
        int busy = 0;
        for (unsigned b = 0; b < WB_BUCKETS; b++)
            for (struct wb_file *f = wb->files[b]; f; f = f->next)
                busy |= f->gathering || f->nflying || f->planning;
        if (!busy)
            break;
        pthread_cond_wait(&wb->landed, &wb->lock);
    }
    pthread_mutex_unlock(&wb->lock);
}
