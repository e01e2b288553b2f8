/* nonce_cache.c -- the accepted nonces of nonce_cache.h.
 *
 * DESIGN
 *  - Entries live in one array of `max`, handed out in order (so memory is
 *    touched only as the cache fills) and then from a free list. Entry i is
 *    named i + 1, so 0 is "none" and the zeroed (untouched) arrays start
 *    out empty.
 *  - A hash table of chains (heads[], each entry's hnext) finds a nonce.
 *    Nonces come from authenticated clients, which have no reason to
 *    collide them; XXH3 with a random seed keeps a chance collision from
 *    being anything but chance.
 *  - A ring of seconds (dates modulo ring_mask + 1, more than 2 x window + 1
 *    of them) lists the entries of each date (dnext). Every live date lies
 *    in [floor, now + window], fewer seconds than the ring, so a slot holds
 *    one date at a time, and raising the floor frees the slots it passes,
 *    whole: forgetting is by date, oldest first, never one nonce here and
 *    there.
 */
#include "nonce_cache.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <xxhash.h>

struct entry {
    uint8_t nonce[WIRE_NONCE_BYTES];
    int64_t date;
    uint32_t hnext; /* next in its hash chain, or in the free list */
    uint32_t dnext; /* next of the same date */
};

struct slot {
    int64_t date;   /* the date of the entries listed, when count > 0 */
    uint32_t head;  /* first entry */
    uint32_t count;
};

struct nonce_cache {
    pthread_mutex_t lock;
    /* protected by lock: */
    struct entry *e;  /* max entries */
    uint32_t *heads;  /* hmask + 1 hash chains */
    struct slot *ring; /* ring_mask + 1 seconds */
    uint32_t max, used, fresh, free_head, hmask, ring_mask;
    int64_t floor;    /* INT64_MIN until the first add */
    int64_t window, min_keep;
    uint64_t seed;
};

#define MAX_ENTRIES (1u << 28)

static int64_t sat_add(int64_t a, int64_t b) /* b >= 0 */
{
    return a > INT64_MAX - b ? INT64_MAX : a + b;
}

static int64_t sat_sub(int64_t a, int64_t b) /* b >= 0 */
{
    return a < INT64_MIN + b ? INT64_MIN : a - b;
}

int nonce_cache_new(uint32_t max, int64_t window, int64_t min_keep, struct nonce_cache **out)
{
    struct nonce_cache *c;
    uint64_t h = 1, r = 1;

    *out = NULL;
    if (max == 0 || max > MAX_ENTRIES || window < 0 || window > (1 << 20) || min_keep < 0 ||
        min_keep > window)
        return -EINVAL;
    while (h < max)
        h <<= 1;
    while (r <= 2 * (uint64_t)window + 1)
        r <<= 1;
    c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    /* calloc: large arrays come as untouched zero pages, costing nothing
     * until used. */
    c->e = calloc(max, sizeof(*c->e));
    c->heads = calloc(h, sizeof(*c->heads));
    c->ring = calloc(r, sizeof(*c->ring));
    if (!c->e || !c->heads || !c->ring) {
        nonce_cache_free(c);
        return -ENOMEM;
    }
    pthread_mutex_init(&c->lock, NULL);
    c->max = max;
    c->hmask = (uint32_t)(h - 1);
    c->ring_mask = (uint32_t)(r - 1);
    c->floor = INT64_MIN;
    c->window = window;
    c->min_keep = min_keep;
    if (getrandom(&c->seed, sizeof(c->seed), GRND_NONBLOCK) != sizeof(c->seed))
        c->seed = (uint64_t)(uintptr_t)c; /* chance collisions are all it guards against */
    *out = c;
    return 0;
}

void nonce_cache_free(struct nonce_cache *c)
{
    if (!c)
        return;
    if (c->e && c->heads && c->ring)
        pthread_mutex_destroy(&c->lock);
    free(c->e);
    free(c->heads);
    free(c->ring);
    free(c);
}

static uint32_t *chain_of(struct nonce_cache *c, const uint8_t *nonce)
{
    return &c->heads[XXH3_64bits_withSeed(nonce, WIRE_NONCE_BYTES, c->seed) & c->hmask];
}

static struct slot *slot_of(struct nonce_cache *c, int64_t date)
{
    return &c->ring[(uint64_t)date & c->ring_mask];
}

/* Forget every entry of slot s. */
static void slot_evict(struct nonce_cache *c, struct slot *s)
{
    uint32_t i = s->head;

    while (i) {
        struct entry *e = &c->e[i - 1];
        uint32_t *link = chain_of(c, e->nonce), next = e->dnext;

        while (*link != i) /* i is on this chain: it was put there */
            link = &c->e[*link - 1].hnext;
        *link = e->hnext;
        e->hnext = c->free_head;
        c->free_head = i;
        c->used--;
        i = next;
    }
    s->head = 0;
    s->count = 0;
}

/* Raise the floor to f, forgetting the dates below it. */
static void floor_raise(struct nonce_cache *c, int64_t f)
{
    if (f <= c->floor)
        return;
    if (c->used && (uint64_t)f - (uint64_t)c->floor <= c->ring_mask) {
        for (int64_t d = c->floor; d < f; d++) {
            struct slot *s = slot_of(c, d);
            if (s->count && s->date == d)
                slot_evict(c, s);
        }
    } else if (c->used) {
        for (uint32_t i = 0; i <= c->ring_mask; i++)
            if (c->ring[i].count && c->ring[i].date < f)
                slot_evict(c, &c->ring[i]);
    }
    c->floor = f;
}

/* Full: give up the oldest date, if it is older than now - min_keep. 0 when
 * room was made, -EBUSY when there is none to make. */
static int make_room(struct nonce_cache *c, int64_t now)
{
    int64_t keep = sat_sub(now, c->min_keep);

    for (int64_t d = c->floor; d < keep; d++) {
        struct slot *s = slot_of(c, d);

        if (s->count && s->date == d) {
            floor_raise(c, d + 1);
            return 0;
        }
        if ((uint64_t)d - (uint64_t)c->floor > c->ring_mask)
            break; /* every slot looked at */
    }
    return -EBUSY;
}

static uint32_t entry_take(struct nonce_cache *c)
{
    uint32_t i = c->free_head;

    if (i) {
        c->free_head = c->e[i - 1].hnext;
        return i;
    }
    return c->fresh < c->max ? ++c->fresh : 0;
}

int nonce_cache_add(struct nonce_cache *c, const uint8_t nonce[WIRE_NONCE_BYTES], int64_t date,
                    int64_t now)
{
    uint32_t *chain, i;
    struct slot *s;
    int rc = 0;

    pthread_mutex_lock(&c->lock);
    floor_raise(c, sat_sub(now, c->window));
    if (date < c->floor || date > sat_add(now, c->window) ||
        (uint64_t)date - (uint64_t)c->floor > c->ring_mask) {
        rc = -ESTALE;
        goto out;
    }
    chain = chain_of(c, nonce);
    for (i = *chain; i; i = c->e[i - 1].hnext) {
        if (memcmp(c->e[i - 1].nonce, nonce, WIRE_NONCE_BYTES) == 0) {
            rc = -EEXIST;
            goto out;
        }
    }
    while (c->used == c->max) {
        rc = make_room(c, now);
        if (rc < 0)
            goto out;
        if (date < c->floor) { /* this request is among the oldest given up */
            rc = -ESTALE;
            goto out;
        }
    }
    s = slot_of(c, date);
    if (s->count && s->date != date) {
        /* Cannot happen: live dates span fewer seconds than the ring. */
        rc = -EBUSY;
        goto out;
    }
    i = entry_take(c);
    memcpy(c->e[i - 1].nonce, nonce, WIRE_NONCE_BYTES);
    c->e[i - 1].date = date;
    c->e[i - 1].hnext = *chain;
    *chain = i;
    c->e[i - 1].dnext = s->head;
    s->head = i;
    s->date = date;
    s->count++;
    c->used++;
out:
    pthread_mutex_unlock(&c->lock);
    return rc;
}

void nonce_cache_stats(struct nonce_cache *c, uint32_t *used, int64_t *floor)
{
    pthread_mutex_lock(&c->lock);
    if (used)
        *used = c->used;
    if (floor)
        *floor = c->floor;
    pthread_mutex_unlock(&c->lock);
}
