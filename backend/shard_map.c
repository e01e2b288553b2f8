/* shard_map.c -- the live shard map, static or kept in etcd (see shard_map.h).
 *
 * DESIGN (etcd map; DESIGN.md "Shard map" is the short version)
 *
 * Keys, under P = /shardfs/CLUSTER-ID/ (CLUSTER-ID: 16 hex digits of
 * SHA-256("shardfs cluster id\0" SECRET), so two stores sharing an etcd do
 * not meet, and the secret is not written anywhere):
 *   P shards        "8": the shard count the map was made for.
 *   P shard/NNNN    {"epoch":"E","primary":"a","replicas":["b"],"in_sync":["b"],
 *                   "depth":D} (node names; epoch a decimal string: it is a
 *                   uint64; "building":true on a split's target before its
 *                   cut-over; no depth: log2 of P shards). NNNN below P
 *                   shards always exists; above it, splits make them.
 *   P leader/NNNN   "a", attached to node a's lease: a may act as the
 *                   shard's primary. Gone when the lease ends.
 *   P node/NAME     the node's url, attached to its lease: it is alive.
 *
 * 1. Open: grant a lease (TTL lease_ttl_ms rounded up to seconds), put the
 *    node key. Seed: a txn creates P shards if absent, else reads it (another
 *    count is an error); then the shard keys, 32 to a txn that creates them
 *    only if all are absent, else one txn per key (create if absent). Read the
 *    whole prefix at revision R; take our leader keys (step 3); watch from
 *    R + 1.
 * 2. Every change of a shard key is a txn comparing its mod revision with
 *    the one this map holds, so changes by two nodes cannot interleave: the
 *    loser re-reads (the failure branch reads the shard and leader keys) and
 *    tries again, or finds the change no longer applies (-ESTALE, -EPERM).
 *    isr_remove/isr_add also compare the leader key's lease with ours (only
 *    the live primary changes its in-sync set). promote compares that the
 *    leader key does not exist (create revision 0), then puts the shard key
 *    (epoch + 1) and the leader key with the promoter's lease in one txn.
 * 3. A primary without its leader key (at start, after its lease ran out
 *    and it got a new one) takes it: if absent, by a txn on "absent and the
 *    shard key unchanged", racing fairly with any promotion (one wins; a
 *    promotion bumps the epoch and the loser sees it); if held by an older
 *    lease of this same node (the previous run, killed), by a txn on "held
 *    by that lease", which hands it over without a gap.
 * 4. Lease rule: lease_until = time the last successful grant/keep-alive
 *    request was sent + min(lease_ttl_ms, TTL etcd granted) - TTL/10. etcd
 *    counts its TTL from when it received the request, later than we sent
 *    it, so our deadline comes first. The keep-alive thread renews every
 *    TTL/3 (TTL/10 after a failure). An -ENOENT renewal (the lease is gone)
 *    makes lease_ok 0 at once and gets a new lease.
 * 5. The watch applies every event newer than what the map holds (by mod
 *    revision: our own txns' results are applied when they return, so their
 *    events are skipped), and after a compaction (-ERANGE) reads the prefix
 *    again. Connection errors: retry with a backoff, from the last revision
 *    seen + 1, keeping the map as it is.
 * 6. Resharding (shard_map.h): txns on two shards' keys (shards_txn) in the
 *    same compare-and-swap rounds; DESIGN.md "Shard map" has them.
 */
#include "shard_map.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "etcd.h"

#define KEY_MAX 128
#define VALUE_MAX 1024     /* a shard value: 4 names of 63 bytes and the rest */
#define SEED_CHUNK 32      /* shard keys a seeding txn creates (etcd allows 128 ops) */
#define CHANGE_TRIES 16    /* compare-and-swap rounds before giving up (-EAGAIN) */
#define SLOTS CONFIG_MAX_SHARDS /* shard indexes a split can make */
#define DEPTH_MAX 10            /* 2^DEPTH_MAX slots */
_Static_assert(1u << DEPTH_MAX == SLOTS, "DEPTH_MAX is log2(CONFIG_MAX_SHARDS)");

struct shard_map {
    unsigned shard_count; /* the count the map was made with (P shards) */
    unsigned base_depth;  /* log2(shard_count): the depth of an entry that names none */
    unsigned node_count;
    char names[CONFIG_MAX_NODES][CONFIG_NAME_MAX + 1];
    char self_url[CONFIG_URL_MAX + 1];
    int self;
    unsigned ttl_ms;

    pthread_mutex_t lock;
    struct shard_copies *copies; /* protected by lock; SLOTS of each array */
    unsigned char *present;      /* protected by lock: 1 if shard key i exists */
    int64_t *mod_rev;            /* protected by lock: shard key's mod revision applied */
    int *leader;                 /* protected by lock: leader key's node, -1 none, -2 unknown */
    int64_t *leader_lease;       /* protected by lock: its lease (0: none) */
    int64_t *leader_rev;         /* protected by lock: revision of its last put/delete seen */

    /* Held while the listener runs, so on_change can wait for a running
     * call; recursive, so a listener may call back into the map. */
    pthread_mutex_t listener_lock;
    void (*listener)(void *ctx, unsigned shard); /* protected by listener_lock */
    void *listener_ctx;

    /* etcd mode only */
    struct etcd *etcd;
    struct etcd *etcd_lease; /* the keep-alive's: calls bounded by TTL/3, not timeout_ms */
    char prefix[48];
    size_t plen;
    atomic_llong lease;         /* our lease id, 0: none */
    atomic_llong lease_until;   /* CLOCK_MONOTONIC ms; lease_ok while now < it */
    atomic_int leaders_missing; /* shards we are primary of without our leader key */
    atomic_int stop;
    pthread_mutex_t sleep_lock;
    pthread_cond_t sleep_cond; /* signalled by close */
    pthread_t watch_th, keep_th;
    int watch_started, keep_started;
    int64_t watch_from; /* watch thread only (set before it starts) */
};

/* Sleep up to ms, or until close. */
static void nap(struct shard_map *m, unsigned ms)
{
    struct timespec until;

    clock_deadline_in(&until, ms);
    pthread_mutex_lock(&m->sleep_lock);
    while (!atomic_load(&m->stop) &&
           pthread_cond_timedwait(&m->sleep_cond, &m->sleep_lock, &until) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&m->sleep_lock);
}

static void notify(struct shard_map *m, unsigned shard)
{
    pthread_mutex_lock(&m->listener_lock);
    if (m->listener)
        m->listener(m->listener_ctx, shard);
    pthread_mutex_unlock(&m->listener_lock);
}

static int node_of_name(const struct shard_map *m, const char *name)
{
    for (unsigned i = 0; i < m->node_count; i++)
        if (strcmp(m->names[i], name) == 0)
            return (int)i;
    return -1;
}

/* ---- the pure rules, shared by both kinds of map ---- */

static int replica_slot(const struct shard_copies *c, int node)
{
    for (unsigned i = 0; i < c->nreplicas; i++)
        if (c->replicas[i] == node)
            return (int)i;
    return -1;
}

/* c after taking node out of (add: into) the in-sync set, by node self.
 * 0: changed; 1: nothing to change; -errno. */
static int isr_next(const struct shard_map *m, struct shard_copies *c, int node, uint64_t epoch,
                    int add)
{
    int slot;

    if (node < 0 || (unsigned)node >= m->node_count)
        return -EINVAL;
    if (c->epoch != epoch)
        return -ESTALE;
    if (m->self < 0 || c->primary != m->self)
        return -EPERM;
    slot = replica_slot(c, node);
    if (slot < 0)
        return -ENOENT;
    if (!!(c->in_sync >> slot & 1) == !!add)
        return 1;
    if (add)
        c->in_sync |= UINT32_C(1) << slot;
    else
        c->in_sync &= ~(UINT32_C(1) << slot);
    return 0;
}

/* c after promoting node (an in-sync replica): epoch + 1, the old primary
 * becomes the last replica, out of the in-sync set. 0, 1 (already primary)
 * or -errno. */
static int promote_next(struct shard_copies *c, int node, uint64_t epoch)
{
    struct shard_copies n;
    int slot;

    if (c->epoch != epoch)
        return -ESTALE;
    if (c->primary == node)
        return 1;
    slot = replica_slot(c, node);
    if (slot < 0 || !(c->in_sync >> slot & 1))
        return -EPERM;
    memset(&n, 0, sizeof(n));
    n.epoch = c->epoch + 1;
    n.depth = c->depth;
    n.building = c->building;
    n.primary = node;
    for (unsigned i = 0; i < c->nreplicas; i++) {
        if ((int)i == slot)
            continue;
        if (c->in_sync >> i & 1)
            n.in_sync |= UINT32_C(1) << n.nreplicas;
        n.replicas[n.nreplicas++] = c->replicas[i];
    }
    if (c->primary >= 0)
        n.replicas[n.nreplicas++] = c->primary; /* fits: node's slot was freed */
    *c = n;
    return 0;
}

/* c after handing the primary role to node (an in-sync replica) by its
 * primary self: epoch + 1, and self takes node's slot, in the in-sync set
 * (it was level when it stopped acknowledging: failover.h). 0, 1 (already
 * primary) or -errno. */
static int handover_next(struct shard_copies *c, int self, int node, uint64_t epoch)
{
    int slot;

    if (c->epoch != epoch)
        return -ESTALE;
    if (c->primary == node)
        return 1;
    if (self < 0 || c->primary != self)
        return -EPERM;
    slot = replica_slot(c, node);
    if (slot < 0)
        return -ENOENT;
    if (!(c->in_sync >> slot & 1))
        return -EPERM;
    c->epoch++;
    c->primary = node;
    c->replicas[slot] = self; /* its in-sync bit stays set */
    return 0;
}

int shard_copies_add_replica(struct shard_copies *c, int node)
{
    if (node < 0)
        return -EINVAL;
    if (c->primary == node || replica_slot(c, node) >= 0)
        return -EEXIST;
    if (c->nreplicas >= SHARD_MAP_COPIES_MAX - 1)
        return -ENOSPC;
    c->replicas[c->nreplicas++] = node; /* its in-sync bit is clear */
    return 0;
}

int shard_copies_drop_replica(struct shard_copies *c, int node)
{
    uint32_t bit;
    int slot;

    if (node >= 0 && c->primary == node)
        return -EPERM;
    slot = node < 0 ? -1 : replica_slot(c, node);
    if (slot < 0)
        return -ENOENT;
    bit = UINT32_C(1) << slot;
    if ((c->in_sync & bit) && c->in_sync == bit)
        return -EBUSY;
    /* the slots above move down one, their bits with them */
    for (unsigned i = (unsigned)slot; i + 1 < c->nreplicas; i++)
        c->replicas[i] = c->replicas[i + 1];
    c->nreplicas--;
    c->replicas[c->nreplicas] = 0;
    c->in_sync = (c->in_sync & (bit - 1)) | ((c->in_sync >> 1) & ~(bit - 1));
    return 0;
}

/* ---- values in etcd ---- */

/* Encode c as the shard key's value into buf. 0, or -EINVAL when c names a
 * node this config lacks (it cannot be written back by name). */
static int encode_copies(const struct shard_map *m, const struct shard_copies *c, char *buf,
                         size_t len)
{
    json_t *o = json_object(), *reps = json_array(), *sync = json_array();
    char epoch[24];
    char *s = NULL;
    int rc = -ENOMEM;

    if (!o || !reps || !sync)
        goto out;
    rc = -EINVAL;
    if (c->primary < 0)
        goto out;
    snprintf(epoch, sizeof(epoch), "%" PRIu64, c->epoch);
    json_object_set_new(o, "epoch", json_string(epoch));
    json_object_set_new(o, "primary", json_string(m->names[c->primary]));
    for (unsigned i = 0; i < c->nreplicas; i++) {
        if (c->replicas[i] < 0)
            goto out;
        json_array_append_new(reps, json_string(m->names[c->replicas[i]]));
        if (c->in_sync >> i & 1)
            json_array_append_new(sync, json_string(m->names[c->replicas[i]]));
    }
    json_object_set(o, "replicas", reps);
    json_object_set(o, "in_sync", sync);
    json_object_set_new(o, "depth", json_integer(c->depth));
    if (c->building)
        json_object_set_new(o, "building", json_true());
    s = json_dumps(o, JSON_COMPACT);
    rc = -ENOMEM;
    if (!s)
        goto out;
    rc = -EINVAL;
    if (strlen(s) >= len)
        goto out;
    snprintf(buf, len, "%s", s);
    rc = 0;
out:
    free(s);
    json_decref(reps);
    json_decref(sync);
    json_decref(o);
    return rc;
}

/* Decode a shard key's value. Names the config lacks become -1. -EIO when
 * it is not a value this code writes. */
static int decode_copies(const struct shard_map *m, const void *v, size_t vlen,
                         struct shard_copies *c)
{
    json_t *o = json_loadb(v, vlen, 0, NULL), *reps, *sync, *x;
    const char *s;
    char *end;
    size_t i;
    int rc = -EIO;

    memset(c, 0, sizeof(*c));
    if (!o || !json_is_object(o))
        goto out;
    x = json_object_get(o, "epoch");
    if (!json_is_string(x))
        goto out;
    s = json_string_value(x);
    errno = 0;
    c->epoch = strtoull(s, &end, 10);
    if (errno || end == s || *end)
        goto out;
    x = json_object_get(o, "primary");
    if (!json_is_string(x))
        goto out;
    c->primary = node_of_name(m, json_string_value(x));
    reps = json_object_get(o, "replicas");
    sync = json_object_get(o, "in_sync");
    if (!json_is_array(reps) || !json_is_array(sync) ||
        json_array_size(reps) > SHARD_MAP_COPIES_MAX - 1)
        goto out;
    json_array_foreach(reps, i, x)
    {
        if (!json_is_string(x))
            goto out;
        c->replicas[c->nreplicas++] = node_of_name(m, json_string_value(x));
    }
    json_array_foreach(sync, i, x)
    {
        unsigned j;

        if (!json_is_string(x))
            goto out;
        for (j = 0; j < json_array_size(reps); j++)
            if (strcmp(json_string_value(json_array_get(reps, j)), json_string_value(x)) == 0)
                break;
        if (j == json_array_size(reps))
            goto out; /* in sync but no replica: not ours */
        c->in_sync |= UINT32_C(1) << j;
    }
    /* A map made before layouts names no depth: its shards have the base one. */
    x = json_object_get(o, "depth");
    c->depth = m->base_depth;
    if (x && (!json_is_integer(x) || json_integer_value(x) < 0 ||
              json_integer_value(x) > DEPTH_MAX))
        goto out;
    if (x)
        c->depth = (unsigned)json_integer_value(x);
    x = json_object_get(o, "building");
    if (x && !json_is_boolean(x))
        goto out;
    c->building = x && json_is_true(x);
    rc = 0;
out:
    json_decref(o);
    return rc;
}

static void key_shards(const struct shard_map *m, char *buf)
{
    snprintf(buf, KEY_MAX, "%sshards", m->prefix);
}
static void key_shard(const struct shard_map *m, unsigned shard, char *buf)
{
    snprintf(buf, KEY_MAX, "%sshard/%04u", m->prefix, shard);
}
static void key_leader(const struct shard_map *m, unsigned shard, char *buf)
{
    snprintf(buf, KEY_MAX, "%sleader/%04u", m->prefix, shard);
}

/* Which key of ours is k: 1 shard key, 2 leader key, 0 another (with
 * *shard set for 1 and 2). */
static int parse_key(const struct shard_map *m, const void *k, size_t klen, unsigned *shard)
{
    char buf[KEY_MAX];
    const char *rest;
    unsigned long n;
    char *end;
    int kind;

    if (klen <= m->plen || klen >= sizeof(buf) || memcmp(k, m->prefix, m->plen) != 0)
        return 0;
    memcpy(buf, k, klen);
    buf[klen] = '\0';
    rest = buf + m->plen;
    if (strncmp(rest, "shard/", 6) == 0)
        kind = 1, rest += 6;
    else if (strncmp(rest, "leader/", 7) == 0)
        kind = 2, rest += 7;
    else
        return 0;
    errno = 0;
    n = strtoul(rest, &end, 10);
    if (errno || end == rest || *end || n >= SLOTS)
        return 0;
    *shard = (unsigned)n;
    return kind;
}

/* ---- applying what etcd holds (lock held) ---- */

static void count_missing_locked(struct shard_map *m)
{
    int64_t lease = atomic_load(&m->lease);
    int missing = 0;

    for (unsigned i = 0; i < SLOTS; i++)
        if (m->self >= 0 && m->present[i] && m->copies[i].primary == m->self &&
            (lease == 0 || m->leader_lease[i] != lease))
            missing++;
    atomic_store(&m->leaders_missing, missing);
}

/* Apply a put (value != NULL) or delete of one of our keys at revision rev.
 * Returns the shard changed, or -1. */
static int apply_kv_locked(struct shard_map *m, const void *k, size_t klen, const void *v,
                           size_t vlen, int64_t rev, int64_t lease)
{
    unsigned shard;
    int kind = parse_key(m, k, klen, &shard);

    if (kind == 1 && v && rev > m->mod_rev[shard]) {
        struct shard_copies c;

        if (decode_copies(m, v, vlen, &c) < 0) {
            fprintf(stderr, "shardfs: shard map: etcd key %.*s holds no shard entry; ignored\n",
                    (int)klen, (const char *)k);
            return -1;
        }
        m->copies[shard] = c;
        m->present[shard] = 1;
        m->mod_rev[shard] = rev;
        count_missing_locked(m);
        return (int)shard;
    }
    if (kind == 1 && !v && rev > m->mod_rev[shard]) {
        /* a merge or an abandoned split took it */
        memset(&m->copies[shard], 0, sizeof(m->copies[shard]));
        m->copies[shard].primary = -1;
        m->present[shard] = 0;
        m->mod_rev[shard] = rev;
        count_missing_locked(m);
        return (int)shard;
    }
    if (kind == 2 && rev > m->leader_rev[shard]) {
        char name[CONFIG_NAME_MAX + 1];

        m->leader_rev[shard] = rev;
        if (v) {
            snprintf(name, sizeof(name), "%.*s", (int)(vlen < sizeof(name) ? vlen : 0),
                     (const char *)v);
            m->leader[shard] = node_of_name(m, name);
            if (m->leader[shard] < 0)
                m->leader[shard] = -2;
            m->leader_lease[shard] = lease;
        } else {
            m->leader[shard] = -1;
            m->leader_lease[shard] = 0;
        }
        count_missing_locked(m);
        return (int)shard;
    }
    return -1;
}

/* A whole listing of the prefix (open, and after a compaction). */
struct listing {
    struct shard_map *m;
    unsigned char *seen_shard, *seen_leader;
    unsigned char *changed;
};

static int on_listed(void *ctx, const struct etcd_kv *kv)
{
    struct listing *l = ctx;
    struct shard_map *m = l->m;
    unsigned shard;
    int kind = parse_key(m, kv->key, kv->klen, &shard), ch;

    if (kind == 1)
        l->seen_shard[shard] = 1;
    if (kind == 2)
        l->seen_leader[shard] = 1;
    pthread_mutex_lock(&m->lock);
    ch = apply_kv_locked(m, kv->key, kv->klen, kv->value, kv->vlen, kv->mod_revision, kv->lease);
    pthread_mutex_unlock(&m->lock);
    if (ch >= 0)
        l->changed[ch] = 1;
    return 0;
}

/* Read the whole prefix; keys not listed were deleted by *rev (a shard
 * key: a merge's; only those of the shard count the map was made with
 * must exist). notify: call the listener for every shard that changed. */
static int load_all(struct shard_map *m, int64_t *rev, int notify_changes, char *err,
                    size_t errlen)
{
    struct listing l = {m, calloc(SLOTS, 1), calloc(SLOTS, 1), calloc(SLOTS, 1)};
    int rc = -ENOMEM;

    if (!l.seen_shard || !l.seen_leader || !l.changed)
        goto out;
    rc = etcd_get_prefix(m->etcd, m->prefix, m->plen, on_listed, &l, rev, err, errlen);
    if (rc < 0)
        goto out;
    for (unsigned i = 0; i < SLOTS; i++) {
        char k[KEY_MAX];

        if (!l.seen_shard[i] && i < m->shard_count) {
            rc = -EIO;
            snprintf(err, errlen, "shard map: etcd has no key for shard %u under %s", i,
                     m->prefix);
            goto out;
        }
        pthread_mutex_lock(&m->lock);
        if (!l.seen_shard[i] && m->present[i]) {
            key_shard(m, i, k);
            if (apply_kv_locked(m, k, strlen(k), NULL, 0, *rev, 0) >= 0)
                l.changed[i] = 1;
        }
        if (!l.seen_leader[i] && m->leader[i] != -1) {
            key_leader(m, i, k);
            if (apply_kv_locked(m, k, strlen(k), NULL, 0, *rev, 0) >= 0)
                l.changed[i] = 1;
        }
        pthread_mutex_unlock(&m->lock);
    }
    if (notify_changes)
        for (unsigned i = 0; i < SLOTS; i++)
            if (l.changed[i])
                notify(m, i);
    rc = 0;
out:
    free(l.seen_shard);
    free(l.seen_leader);
    free(l.changed);
    return rc;
}

/* ---- transactions ---- */

struct refresh {
    struct shard_map *m;
    unsigned char seen[4]; /* failure branch: which of the keys read exist */
    int changed[2];        /* a shard changed by what the failure branch read */
};

static int on_refresh(void *ctx, unsigned op, const struct etcd_kv *kv)
{
    struct refresh *r = ctx;
    int ch;

    if (op < 4)
        r->seen[op] = 1;
    pthread_mutex_lock(&r->m->lock);
    ch = apply_kv_locked(r->m, kv->key, kv->klen, kv->value, kv->vlen, kv->mod_revision,
                         kv->lease);
    pthread_mutex_unlock(&r->m->lock);
    if (ch >= 0)
        r->changed[op / 2] = 1;
    return 0;
}

/* Run a txn about one or two shards (shards[0..n-1]): cmps, then ops, which
 * put or delete their shard and leader keys. If a compare fails, read those
 * keys into the map (a key not there was deleted). On success apply what the
 * ops wrote at the txn's revision. Returns 0 (done), 1 (a compare failed;
 * the map was refreshed) or -errno. The listener hears of every change. */
static int shards_txn(struct shard_map *m, const unsigned *shards, unsigned n,
                      const struct etcd_cmp *cmp, unsigned ncmp, const struct etcd_op *ops,
                      unsigned nops)
{
    char keys[4][KEY_MAX];
    struct refresh r = {m, {0}, {0}};
    struct etcd_op reads[4];
    struct etcd_txn t = {.cmp = cmp, .ncmp = ncmp, .success = ops, .nsuccess = nops,
                         .failure = reads, .nfailure = 2 * n, .on_kv = on_refresh, .ctx = &r};
    char err[256];
    int rc, changed[2] = {0, 0};

    for (unsigned i = 0; i < n; i++) {
        key_shard(m, shards[i], keys[2 * i]);
        key_leader(m, shards[i], keys[2 * i + 1]);
        reads[2 * i] = etcd_op_range(ETCD_S(keys[2 * i]), 0);
        reads[2 * i + 1] = etcd_op_range(ETCD_S(keys[2 * i + 1]), 0);
    }
    rc = etcd_txn(m->etcd, &t, err, sizeof(err));
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&m->lock);
    if (!t.succeeded) {
        for (unsigned k = 0; k < 2 * n; k++)
            if (!r.seen[k] &&
                apply_kv_locked(m, keys[k], strlen(keys[k]), NULL, 0, t.revision, 0) >= 0)
                r.changed[k / 2] = 1;
        changed[0] = r.changed[0], changed[1] = r.changed[1];
    } else {
        for (unsigned k = 0; k < nops; k++) {
            const struct etcd_op *o = &ops[k];
            int ch = apply_kv_locked(m, o->key, o->klen,
                                     o->type == ETCD_OP_PUT ? o->value : NULL, o->vlen,
                                     t.revision, o->lease);
            for (unsigned i = 0; i < n; i++)
                if (ch >= 0 && (unsigned)ch == shards[i])
                    changed[i] = 1;
        }
    }
    pthread_mutex_unlock(&m->lock);
    for (unsigned i = 0; i < n; i++)
        if (changed[i])
            notify(m, shards[i]);
    return t.succeeded ? 0 : 1;
}

static int shard_txn(struct shard_map *m, unsigned shard, const struct etcd_cmp *cmp,
                     unsigned ncmp, const struct etcd_op *ops, unsigned nops)
{
    return shards_txn(m, &shard, 1, cmp, ncmp, ops, nops);
}

/* Take the leader key of every shard whose primary we are and whose key we
 * do not hold with our current lease (DESIGN step 3). */
static void take_leaders(struct shard_map *m)
{
    int64_t lease = atomic_load(&m->lease);

    if (m->self < 0 || lease == 0 || atomic_load(&m->leaders_missing) == 0)
        return;
    for (unsigned i = 0; i < SLOTS; i++) {
        char ks[KEY_MAX], kl[KEY_MAX];
        struct etcd_cmp cmp[2];
        struct etcd_op op[1];
        int64_t mod, old;
        int holder, mine;

        pthread_mutex_lock(&m->lock);
        mine = m->present[i] && m->copies[i].primary == m->self && m->leader_lease[i] != lease;
        holder = m->leader[i];
        old = m->leader_lease[i];
        mod = m->mod_rev[i];
        pthread_mutex_unlock(&m->lock);
        if (!mine || (holder != -1 && holder != m->self))
            continue;
        key_shard(m, i, ks);
        key_leader(m, i, kl);
        cmp[0] = etcd_cmp_mod(ETCD_S(ks), ETCD_EQUAL, mod);
        /* absent, or held by our previous lease */
        cmp[1] = holder == -1 ? etcd_cmp_create(ETCD_S(kl), ETCD_EQUAL, 0)
                              : etcd_cmp_lease(ETCD_S(kl), ETCD_EQUAL, old);
        op[0] = etcd_op_put(ETCD_S(kl), ETCD_S(m->names[m->self]), lease);
        if (shard_txn(m, i, cmp, 2, op, 1) < 0)
            return; /* etcd unreachable or the lease gone: next round */
    }
}

/* ---- lease ---- */

static void lease_extend(struct shard_map *m, int64_t sent_ms, int64_t ttl_s)
{
    int64_t ttl = (int64_t)m->ttl_ms < ttl_s * 1000 ? (int64_t)m->ttl_ms : ttl_s * 1000;

    atomic_store(&m->lease_until, sent_ms + ttl - ttl / 10);
}

/* A new lease and the node key on it. */
static int lease_start(struct shard_map *m, char *err, size_t errlen)
{
    char k[KEY_MAX];
    int64_t id = 0, t0 = clock_mono_ms();
    int rc;

    rc = etcd_lease_grant(m->etcd, (m->ttl_ms + 999) / 1000, &id, err, errlen);
    if (rc < 0)
        return rc;
    snprintf(k, sizeof(k), "%snode/%s", m->prefix, m->names[m->self]);
    rc = etcd_put(m->etcd, ETCD_S(k), ETCD_S(m->self_url), id, NULL, err, errlen);
    if (rc < 0) {
        etcd_lease_revoke(m->etcd, id, NULL, 0);
        return rc;
    }
    pthread_mutex_lock(&m->lock);
    atomic_store(&m->lease, id);
    count_missing_locked(m);
    pthread_mutex_unlock(&m->lock);
    /* counted from before the grant: the put's time is inside the TTL */
    lease_extend(m, t0, (m->ttl_ms + 999) / 1000);
    return 0;
}

static void *keepalive_main(void *arg)
{
    struct shard_map *m = arg;

    pthread_setname_np(pthread_self(), "map-lease");
    while (!atomic_load(&m->stop)) {
        int64_t ttl = 0, t0 = clock_mono_ms(), id = atomic_load(&m->lease);
        int rc;

        if (id == 0) {
            rc = lease_start(m, NULL, 0);
        } else {
            rc = etcd_lease_keepalive(m->etcd_lease, id, &ttl, NULL, 0);
            if (rc == 0) {
                lease_extend(m, t0, ttl);
            } else if (rc == -ENOENT) {
                /* gone in etcd, and our leader keys with it */
                atomic_store(&m->lease_until, 0);
                pthread_mutex_lock(&m->lock);
                atomic_store(&m->lease, 0);
                count_missing_locked(m);
                pthread_mutex_unlock(&m->lock);
                continue;
            }
        }
        if (rc == 0)
            take_leaders(m);
        nap(m, rc == 0 && atomic_load(&m->leaders_missing) == 0 ? m->ttl_ms / 3 : m->ttl_ms / 10);
    }
    return NULL;
}

/* ---- watch ---- */

static int on_event(void *ctx, const struct etcd_event *ev)
{
    struct shard_map *m = ctx;
    int ch;

    pthread_mutex_lock(&m->lock);
    ch = apply_kv_locked(m, ev->kv.key, ev->kv.klen,
                         ev->type == ETCD_EVENT_PUT ? ev->kv.value : NULL, ev->kv.vlen,
                         ev->kv.mod_revision, ev->kv.lease);
    pthread_mutex_unlock(&m->lock);
    if (ev->kv.mod_revision >= m->watch_from)
        m->watch_from = ev->kv.mod_revision + 1;
    if (ch >= 0)
        notify(m, (unsigned)ch);
    return 0;
}

static void *watch_main(void *arg)
{
    struct shard_map *m = arg;
    unsigned backoff = 100;

    pthread_setname_np(pthread_self(), "map-watch");
    while (!atomic_load(&m->stop)) {
        struct etcd_watch_req req = {m->prefix, m->plen, 1, m->watch_from, &m->stop};
        int64_t rev = 0;
        int rc = etcd_watch(m->etcd, &req, on_event, m, NULL, 0);

        if (atomic_load(&m->stop))
            break;
        if (rc == -ERANGE && load_all(m, &rev, 1, NULL, 0) == 0) {
            m->watch_from = rev + 1;
            backoff = 100;
            continue;
        }
        nap(m, backoff);
        backoff = backoff * 2 > 2000 ? 2000 : backoff * 2;
    }
    return NULL;
}

/* ---- open, seed ---- */

static int cluster_prefix(struct shard_map *m, const char *secret)
{
    static const char tag[] = "shardfs cluster id";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    EVP_MD_CTX *x = EVP_MD_CTX_new();
    int ok = x && EVP_DigestInit_ex(x, EVP_sha256(), NULL) &&
             EVP_DigestUpdate(x, tag, sizeof(tag)) && /* with its NUL: a separator */
             EVP_DigestUpdate(x, secret, strlen(secret)) && EVP_DigestFinal_ex(x, md, &mdlen);

    EVP_MD_CTX_free(x);
    if (!ok || mdlen < 8)
        return -EIO;
    m->plen = (size_t)snprintf(m->prefix, sizeof(m->prefix), "/shardfs/");
    for (int i = 0; i < 8; i++)
        m->plen += (size_t)snprintf(m->prefix + m->plen, sizeof(m->prefix) - m->plen, "%02x", md[i]);
    m->plen += (size_t)snprintf(m->prefix + m->plen, sizeof(m->prefix) - m->plen, "/");
    return 0;
}

/* The config's entry of shard i; with etcd the in-sync set starts empty. */
static void config_copies(const struct config *cfg, unsigned i, int all_in_sync,
                          struct shard_copies *c)
{
    memset(c, 0, sizeof(*c));
    c->epoch = cfg->epoch;
    c->depth = cfg->depth[i];
    c->primary = cfg->owner[i];
    c->nreplicas = cfg->nreplicas[i];
    for (unsigned j = 0; j < c->nreplicas; j++)
        c->replicas[j] = cfg->replicas[i][j];
    if (all_in_sync)
        c->in_sync = (UINT32_C(1) << c->nreplicas) - 1;
}

struct count_read {
    char value[32];
    int seen;
};

static int on_count(void *ctx, unsigned op, const struct etcd_kv *kv)
{
    struct count_read *c = ctx;

    (void)op;
    snprintf(c->value, sizeof(c->value), "%.*s", (int)(kv->vlen < 31 ? kv->vlen : 31),
             (const char *)kv->value);
    c->seen = 1;
    return 0;
}

/* DESIGN step 1: create what is absent. */
static int seed(struct shard_map *m, const struct config *cfg, char *err, size_t errlen)
{
    char k[KEY_MAX], count[16];
    struct count_read got = {"", 0};
    struct etcd_cmp cmp[SEED_CHUNK];
    struct etcd_op ops[SEED_CHUNK], read[1];
    static char keys[SEED_CHUNK][KEY_MAX]; /* big: not on a thread's stack */
    static char values[SEED_CHUNK][VALUE_MAX];
    static pthread_mutex_t seed_lock = PTHREAD_MUTEX_INITIALIZER;
    int rc;

    key_shards(m, k);
    snprintf(count, sizeof(count), "%u", m->shard_count);
    cmp[0] = etcd_cmp_create(ETCD_S(k), ETCD_EQUAL, 0);
    ops[0] = etcd_op_put(ETCD_S(k), ETCD_S(count), 0);
    read[0] = etcd_op_range(ETCD_S(k), 0);
    struct etcd_txn t = {.cmp = cmp, .ncmp = 1, .success = ops, .nsuccess = 1, .failure = read,
                         .nfailure = 1, .on_kv = on_count, .ctx = &got};
    rc = etcd_txn(m->etcd, &t, err, errlen);
    if (rc < 0)
        return rc;
    if (!t.succeeded && strcmp(got.value, count) != 0) {
        snprintf(err, errlen,
                 "%s: etcd holds the shard map of a store of %s shards under %s; this file has "
                 "%u",
                 cfg->path, got.value, m->prefix, m->shard_count);
        return -EINVAL;
    }
    pthread_mutex_lock(&seed_lock);
    for (unsigned base = 0; base < m->shard_count && rc == 0; base += SEED_CHUNK) {
        unsigned n = m->shard_count - base < SEED_CHUNK ? m->shard_count - base : SEED_CHUNK;

        for (unsigned j = 0; j < n; j++) {
            struct shard_copies c;

            config_copies(cfg, base + j, 0, &c);
            c.depth = m->base_depth;
            key_shard(m, base + j, keys[j]);
            rc = encode_copies(m, &c, values[j], VALUE_MAX);
            if (rc < 0)
                break;
            cmp[j] = etcd_cmp_create(ETCD_S(keys[j]), ETCD_EQUAL, 0);
            ops[j] = etcd_op_put(ETCD_S(keys[j]), ETCD_S(values[j]), 0);
        }
        struct etcd_txn all = {.cmp = cmp, .ncmp = n, .success = ops, .nsuccess = n};
        if (rc == 0)
            rc = etcd_txn(m->etcd, &all, err, errlen);
        for (unsigned j = 0; rc == 0 && !all.succeeded && j < n; j++) {
            /* some exist (another node seeds too, or a seed was cut short) */
            struct etcd_txn one = {.cmp = &cmp[j], .ncmp = 1, .success = &ops[j], .nsuccess = 1};
            rc = etcd_txn(m->etcd, &one, err, errlen);
        }
    }
    pthread_mutex_unlock(&seed_lock);
    return rc;
}

static int open_etcd(struct shard_map *m, const struct config *cfg, char *err, size_t errlen)
{
    sigset_t all, old;
    int64_t rev = 0;
    int rc;

    rc = cluster_prefix(m, cfg->secret);
    if (rc == 0)
        rc = etcd_new(cfg->etcd, cfg->timeout_ms, &m->etcd, err, errlen);
    /* A renewal that hangs must not outlast the next one's turn: the lease
     * would run out while a retry could have reached another endpoint. */
    if (rc == 0)
        rc = etcd_new(cfg->etcd, m->ttl_ms / 3 < cfg->timeout_ms ? m->ttl_ms / 3 : cfg->timeout_ms,
                      &m->etcd_lease, err, errlen);
    if (rc < 0)
        return rc;
    if (m->self >= 0 && (rc = lease_start(m, err, errlen)) < 0)
        return rc;
    if ((rc = seed(m, cfg, err, errlen)) < 0 || (rc = load_all(m, &rev, 0, err, errlen)) < 0)
        return rc;
    take_leaders(m);
    m->watch_from = rev + 1;
    /* The map's threads take no signals: they belong to the FUSE loop's. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&m->watch_th, NULL, watch_main, m);
    m->watch_started = rc == 0;
    if (rc == 0 && m->self >= 0) {
        rc = pthread_create(&m->keep_th, NULL, keepalive_main, m);
        m->keep_started = rc == 0;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "shard map: cannot start a thread");
        return -EAGAIN;
    }
    return 0;
}

int shard_map_open(const struct config *cfg, int self, struct shard_map **out, char *err,
                   size_t errlen)
{
    struct shard_map *m;
    pthread_mutexattr_t rec;
    int rc = -ENOMEM;

    *out = NULL;
    if (err && errlen)
        err[0] = '\0';
    if (self >= (int)cfg->node_count || self < -1) {
        snprintf(err, errlen, "shard map: no node %d", self);
        return -EINVAL;
    }
    m = calloc(1, sizeof(*m));
    if (!m)
        goto fail;
    m->shard_count = cfg->file_shards ? cfg->file_shards : cfg->shard_count;
    while (1u << m->base_depth < m->shard_count)
        m->base_depth++;
    m->node_count = cfg->node_count;
    m->self = self;
    m->ttl_ms = cfg->lease_ttl_ms;
    for (unsigned i = 0; i < cfg->node_count; i++)
        snprintf(m->names[i], sizeof(m->names[i]), "%s", cfg->nodes[i].name);
    if (self >= 0)
        snprintf(m->self_url, sizeof(m->self_url), "%s", cfg->nodes[self].url);
    pthread_mutex_init(&m->lock, NULL);
    pthread_mutexattr_init(&rec);
    pthread_mutexattr_settype(&rec, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&m->listener_lock, &rec);
    pthread_mutexattr_destroy(&rec);
    pthread_mutex_init(&m->sleep_lock, NULL);
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&m->sleep_cond, &ca);
        pthread_condattr_destroy(&ca);
    }
    m->copies = calloc(SLOTS, sizeof(*m->copies));
    m->present = calloc(SLOTS, 1);
    m->mod_rev = calloc(SLOTS, sizeof(*m->mod_rev));
    m->leader = calloc(SLOTS, sizeof(*m->leader));
    m->leader_lease = calloc(SLOTS, sizeof(*m->leader_lease));
    m->leader_rev = calloc(SLOTS, sizeof(*m->leader_rev));
    if (!m->copies || !m->present || !m->mod_rev || !m->leader || !m->leader_lease ||
        !m->leader_rev)
        goto fail;
    for (unsigned i = 0; i < SLOTS; i++) {
        /* the static map: every shard of cfg's layout (a slot whose shard
         * is itself); with etcd no entry is trusted before etcd's is read */
        m->present[i] = !cfg->etcd[0] && i < cfg->shard_count &&
                        (i & ((1u << cfg->depth[i]) - 1)) == i;
        if (m->present[i])
            config_copies(cfg, i, 1, &m->copies[i]);
        else
            m->copies[i].primary = -1;
        m->leader[i] = m->copies[i].primary;
    }
    if (cfg->etcd[0]) {
        rc = open_etcd(m, cfg, err, errlen);
        if (rc < 0)
            goto fail;
    }
    *out = m;
    return 0;
fail:
    if (rc == -ENOMEM && err && errlen && !err[0])
        snprintf(err, errlen, "shard map: %s", strerror(ENOMEM));
    shard_map_close(m);
    return rc;
}

void shard_map_close(struct shard_map *m)
{
    int64_t lease;

    if (!m)
        return;
    pthread_mutex_lock(&m->sleep_lock);
    atomic_store(&m->stop, 1);
    pthread_cond_broadcast(&m->sleep_cond);
    pthread_mutex_unlock(&m->sleep_lock);
    if (m->keep_started)
        pthread_join(m->keep_th, NULL);
    if (m->watch_started)
        pthread_join(m->watch_th, NULL);
    lease = atomic_load(&m->lease);
    if (m->etcd && lease)
        etcd_lease_revoke(m->etcd, lease, NULL, 0); /* best effort: else it runs out */
    etcd_free(m->etcd);
    etcd_free(m->etcd_lease);
    free(m->copies);
    free(m->present);
    free(m->mod_rev);
    free(m->leader);
    free(m->leader_lease);
    free(m->leader_rev);
    pthread_mutex_destroy(&m->lock);
    pthread_mutex_destroy(&m->listener_lock);
    pthread_mutex_destroy(&m->sleep_lock);
    pthread_cond_destroy(&m->sleep_cond);
    free(m);
}

/* ---- queries ---- */

int shard_map_get(struct shard_map *m, unsigned shard, struct shard_copies *out)
{
    int rc;

    if (shard >= SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&m->lock);
    *out = m->copies[shard];
    rc = m->present[shard] ? 0 : -ENOENT;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int shard_map_layout(struct shard_map *m, uint8_t depth[CONFIG_MAX_SHARDS], unsigned *slots)
{
    unsigned g = 0, n;
    int rc = 0;

    pthread_mutex_lock(&m->lock);
    for (unsigned i = 0; i < SLOTS; i++)
        if (m->present[i] && !m->copies[i].building && m->copies[i].depth > g)
            g = m->copies[i].depth;
    n = 1u << g;
    /* each slot's shard: the one of its low bits whose depth covers it;
     * exactly one must */
    for (unsigned i = 0; i < n && rc == 0; i++) {
        unsigned claims = 0;

        for (unsigned d = 0; d <= g; d++) {
            unsigned at = i & ((1u << d) - 1);

            if (m->present[at] && !m->copies[at].building && m->copies[at].depth == d) {
                claims++;
                depth[i] = (uint8_t)d;
            }
        }
        if (claims != 1)
            rc = -EIO;
    }
    pthread_mutex_unlock(&m->lock);
    *slots = n;
    return rc;
}

int shard_map_is_primary(struct shard_map *m, unsigned shard)
{
    int is;

    if (shard >= SLOTS || m->self < 0)
        return 0;
    pthread_mutex_lock(&m->lock);
    is = m->present[shard] && m->copies[shard].primary == m->self;
    pthread_mutex_unlock(&m->lock);
    return is;
}

int shard_map_leader(struct shard_map *m, unsigned shard)
{
    int node;

    if (shard >= SLOTS)
        return -EINVAL;
    pthread_mutex_lock(&m->lock);
    node = !m->present[shard] ? -1 : m->etcd ? m->leader[shard] : m->copies[shard].primary;
    pthread_mutex_unlock(&m->lock);
    return node < 0 ? -1 : node;
}

void shard_map_on_change(struct shard_map *m, void (*fn)(void *ctx, unsigned shard), void *ctx)
{
    pthread_mutex_lock(&m->listener_lock);
    m->listener = fn;
    m->listener_ctx = ctx;
    pthread_mutex_unlock(&m->listener_lock);
}

int shard_map_lease_ok(struct shard_map *m)
{
    if (!m->etcd)
        return 1;
    if (m->self < 0 || atomic_load(&m->leaders_missing) != 0)
        return 0;
    return clock_mono_ms() < atomic_load(&m->lease_until);
}

/* ---- changes ---- */

/* The static map: the rule applied under the lock. */
static int change_static(struct shard_map *m, unsigned shard, int node, uint64_t epoch,
                         int promote, int add)
{
    struct shard_copies c;
    int rc;

    pthread_mutex_lock(&m->lock);
    c = m->copies[shard];
    rc = !m->present[shard] ? -ENOENT
         : promote          ? promote_next(&c, node, epoch)
                            : isr_next(m, &c, node, epoch, add);
    if (rc == 0) {
        m->copies[shard] = c;
        m->leader[shard] = c.primary;
    }
    pthread_mutex_unlock(&m->lock);
    if (rc == 0)
        notify(m, shard);
    return rc < 0 ? rc : 0;
}

/* What this map holds of shard: its entry, the shard key's mod revision
 * and the leader key's lease (0: none). 0, or -ENOENT: no such shard now
 * (*c, *mod and *held are still set: mod is the deletion's revision). */
static int seen(struct shard_map *m, unsigned shard, struct shard_copies *c, int64_t *mod,
                int64_t *held)
{
    int rc;

    pthread_mutex_lock(&m->lock);
    *c = m->copies[shard];
    *mod = m->mod_rev[shard];
    *held = m->leader_lease[shard];
    rc = m->present[shard] ? 0 : -ENOENT;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* DESIGN step 2, compare-and-swap rounds. */
static int change_etcd(struct shard_map *m, unsigned shard, int node, uint64_t epoch, int promote,
                       int add)
{
    if (promote && node != m->self)
        return -EPERM;
    for (int tries = 0; tries < CHANGE_TRIES; tries++) {
        char ks[KEY_MAX], kl[KEY_MAX], value[VALUE_MAX];
        struct shard_copies c;
        struct etcd_cmp cmp[2];
        struct etcd_op ops[2];
        int64_t lease = atomic_load(&m->lease), mod, held;
        int rc;

        rc = seen(m, shard, &c, &mod, &held);
        if (rc == 0)
            rc = promote ? promote_next(&c, node, epoch) : isr_next(m, &c, node, epoch, add);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        if (lease == 0)
            return -EAGAIN;
        /* The first round asks etcd whatever this map believes: the
         * compares are the guard. After a failed one the map is fresh. */
        if (tries > 0 && !promote && held != lease)
            return -EPERM; /* we are the map's primary, but not the live one */
        if (tries > 0 && promote && held != 0)
            return -EBUSY;
        rc = encode_copies(m, &c, value, sizeof(value));
        if (rc < 0)
            return rc;
        key_shard(m, shard, ks);
        key_leader(m, shard, kl);
        cmp[0] = etcd_cmp_mod(ETCD_S(ks), ETCD_EQUAL, mod);
        cmp[1] = promote ? etcd_cmp_create(ETCD_S(kl), ETCD_EQUAL, 0)
                         : etcd_cmp_lease(ETCD_S(kl), ETCD_EQUAL, lease);
        ops[0] = etcd_op_put(ETCD_S(ks), ETCD_S(value), 0);
        ops[1] = etcd_op_put(ETCD_S(kl), ETCD_S(m->names[node]), lease);
        rc = shard_txn(m, shard, cmp, 2, ops, promote ? 2 : 1);
        if (rc <= 0)
            return rc;
        /* a compare failed: the map is fresh now; judge again */
    }
    return -EAGAIN;
}

static int change(struct shard_map *m, unsigned shard, int node, uint64_t epoch, int promote,
                  int add)
{
    if (shard >= SLOTS || node < 0 || (unsigned)node >= m->node_count)
        return -EINVAL;
    return m->etcd ? change_etcd(m, shard, node, epoch, promote, add)
                   : change_static(m, shard, node, epoch, promote, add);
}

int shard_map_isr_remove(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    return change(m, shard, node, epoch, 0, 0);
}

int shard_map_isr_add(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    return change(m, shard, node, epoch, 0, 1);
}

int shard_map_promote(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    return change(m, shard, node, epoch, 1, 0);
}

/* replica add/drop: compare-and-swap rounds on the shard key alone (no
 * lease: the CLI makes them, and neither the role nor a leader key moves). */
static int placement_change(struct shard_map *m, unsigned shard, int node, int add)
{
    if (shard >= SLOTS || node < 0 || (unsigned)node >= m->node_count)
        return -EINVAL;
    if (!m->etcd)
        return -EOPNOTSUPP;
    for (int tries = 0; tries < CHANGE_TRIES; tries++) {
        char ks[KEY_MAX], value[VALUE_MAX];
        struct shard_copies c;
        struct etcd_cmp cmp[1];
        struct etcd_op ops[1];
        int64_t mod, held;
        int rc;

        rc = seen(m, shard, &c, &mod, &held);
        if (rc == 0)
            rc = add ? shard_copies_add_replica(&c, node) : shard_copies_drop_replica(&c, node);
        if (rc < 0)
            return rc;
        rc = encode_copies(m, &c, value, sizeof(value));
        if (rc < 0)
            return rc;
        key_shard(m, shard, ks);
        cmp[0] = etcd_cmp_mod(ETCD_S(ks), ETCD_EQUAL, mod);
        ops[0] = etcd_op_put(ETCD_S(ks), ETCD_S(value), 0);
        rc = shard_txn(m, shard, cmp, 1, ops, 1);
        if (rc <= 0)
            return rc;
        /* a compare failed: the map is fresh now; judge again */
    }
    return -EAGAIN;
}

int shard_map_replica_add(struct shard_map *m, unsigned shard, int node)
{
    return placement_change(m, shard, node, 1);
}

int shard_map_replica_drop(struct shard_map *m, unsigned shard, int node)
{
    return placement_change(m, shard, node, 0);
}

/* The lease node's key (node/NAME) is attached to: the lease the new
 * primary's leader key goes on. 0 and *lease, -ENOENT (the node is not
 * alive in etcd) or etcd's error. */
static int node_lease(struct shard_map *m, int node, int64_t *lease)
{
    char k[KEY_MAX];
    struct etcd_kv meta;
    void *v = NULL;
    size_t vlen;
    int rc;

    snprintf(k, sizeof(k), "%snode/%s", m->prefix, m->names[node]);
    rc = etcd_get(m->etcd, ETCD_S(k), &v, &vlen, &meta, NULL, 0);
    free(v);
    if (rc < 0)
        return rc;
    if (meta.lease == 0)
        return -ENOENT;
    *lease = meta.lease;
    return 0;
}

int shard_map_node_alive(struct shard_map *m, int node)
{
    int64_t lease;
    int rc;

    if (node < 0 || (unsigned)node >= m->node_count)
        return -EINVAL;
    if (!m->etcd)
        return -EOPNOTSUPP;
    rc = node_lease(m, node, &lease);
    return rc == 0 ? 1 : rc == -ENOENT ? 0 : rc;
}

int shard_map_handover(struct shard_map *m, unsigned shard, int node, uint64_t epoch)
{
    if (shard >= SLOTS || node < 0 || (unsigned)node >= m->node_count)
        return -EINVAL;
    if (!m->etcd)
        return -EOPNOTSUPP;
    for (int tries = 0; tries < CHANGE_TRIES; tries++) {
        char ks[KEY_MAX], kl[KEY_MAX], kn[KEY_MAX], value[VALUE_MAX];
        struct shard_copies c;
        struct etcd_cmp cmp[3];
        struct etcd_op ops[2];
        int64_t lease = atomic_load(&m->lease), mod, held, theirs = 0;
        int rc;

        rc = seen(m, shard, &c, &mod, &held);
        if (rc == 0)
            rc = handover_next(&c, m->self, node, epoch);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        if (lease == 0)
            return -EAGAIN;
        if (tries > 0 && held != lease)
            return -EPERM; /* the map's primary, but not the live one */
        rc = node_lease(m, node, &theirs);
        if (rc < 0)
            return rc == -ENOENT ? -EHOSTUNREACH : rc;
        rc = encode_copies(m, &c, value, sizeof(value));
        if (rc < 0)
            return rc;
        key_shard(m, shard, ks);
        key_leader(m, shard, kl);
        snprintf(kn, sizeof(kn), "%snode/%s", m->prefix, m->names[node]);
        /* The shard key as we saw it, the leader key ours, and the new
         * primary's lease the one it is alive on: then the role and the
         * key move together, and no moment is without a leader (another
         * in-sync replica would promote itself in it). */
        cmp[0] = etcd_cmp_mod(ETCD_S(ks), ETCD_EQUAL, mod);
        cmp[1] = etcd_cmp_lease(ETCD_S(kl), ETCD_EQUAL, lease);
        cmp[2] = etcd_cmp_lease(ETCD_S(kn), ETCD_EQUAL, theirs);
        /* The leader key first: the watch delivers a txn's events in the
         * order of its ops, one by one, and node must not see itself named
         * primary without its key even for a moment (leaders_missing would
         * make its lease_ok 0, and its writes on every shard fail). */
        ops[0] = etcd_op_put(ETCD_S(kl), ETCD_S(m->names[node]), theirs);
        ops[1] = etcd_op_put(ETCD_S(ks), ETCD_S(value), 0);
        rc = shard_txn(m, shard, cmp, 3, ops, 2);
        if (rc <= 0)
            return rc;
    }
    return -EAGAIN;
}

/* ---- resharding (shard_map.h) ---- */

enum reshard_op { RS_BEGIN, RS_COMMIT, RS_ABANDON, RS_MERGE };

/* The other shard of a change of s at depth d: split's target t = s + 2^d,
 * merge's upper buddy u = s + 2^(d-1). 0, or -EINVAL / -ENOSPC. */
static int reshard_other(enum reshard_op op, unsigned s, unsigned d, unsigned *other)
{
    if (s >= SLOTS || d > DEPTH_MAX)
        return -EINVAL;
    if (op == RS_MERGE) {
        if (d == 0 || s >= 1u << (d - 1))
            return -EINVAL; /* no lower buddy at depth d */
        *other = s + (1u << (d - 1));
        return 0;
    }
    if (s >= 1u << d)
        return -EINVAL; /* no shard of depth d has that index */
    if (d == DEPTH_MAX)
        return -ENOSPC;
    *other = s + (1u << d);
    return 0;
}

/* The rule of op on s (at depth d) and the other shard t, by self: the new
 * entries in *s and *t (*t_here: whether t exists after). 0: changed; 1:
 * nothing to change (done already); -errno. */
static int reshard_next(const struct shard_map *m, enum reshard_op op, unsigned d,
                        struct shard_copies *s, int s_here, struct shard_copies *t, int *t_here)
{
    int mine = m->self >= 0 && s->primary == m->self;

    if (!s_here)
        return -ENOENT;
    switch (op) {
    case RS_BEGIN:
        if (s->depth != d)
            return -ESTALE;
        if (s->building)
            return -EBUSY;
        if (!mine)
            return -EPERM;
        if (*t_here)
            return t->building && t->depth == d + 1 && t->primary == m->self ? 1 : -EEXIST;
        memset(t, 0, sizeof(*t));
        t->epoch = s->epoch;
        t->depth = d + 1;
        t->building = 1;
        t->primary = m->self;
        t->nreplicas = s->nreplicas;
        memcpy(t->replicas, s->replicas, sizeof(t->replicas));
        *t_here = 1;
        return 0;
    case RS_COMMIT:
        if (!*t_here)
            return -ENOENT;
        if (s->depth == d + 1 && !t->building && t->depth == d + 1)
            return 1;
        if (s->depth != d)
            return -ESTALE;
        if (!t->building || t->depth != d + 1)
            return -ENOENT; /* not the target of this split */
        if (!mine || t->primary != m->self)
            return -EPERM;
        s->depth = d + 1;
        t->building = 0;
        return 0;
    case RS_ABANDON:
        if (!*t_here)
            return 1;
        if (!t->building || t->depth != d + 1)
            return -EBUSY;
        *t_here = 0;
        return 0;
    case RS_MERGE:
        if (s->depth == d - 1 && !*t_here)
            return 1;
        if (s->depth != d)
            return -ESTALE;
        if (d - 1 < m->base_depth || !*t_here || t->building || t->depth != d)
            return -EINVAL;
        if (!mine || t->primary != m->self)
            return -EPERM;
        s->depth = d - 1;
        *t_here = 0;
        return 0;
    }
    return -EINVAL;
}

static int reshard_static(struct shard_map *m, enum reshard_op op, unsigned s, unsigned t,
                          unsigned d)
{
    struct shard_copies cs, ct;
    int t_here, rc;

    pthread_mutex_lock(&m->lock);
    cs = m->copies[s];
    ct = m->copies[t];
    t_here = m->present[t];
    rc = reshard_next(m, op, d, &cs, m->present[s], &ct, &t_here);
    if (rc == 0) {
        m->copies[s] = cs;
        m->copies[t] = ct;
        m->present[t] = (unsigned char)t_here;
        if (!t_here)
            m->copies[t].primary = -1;
        m->leader[t] = m->copies[t].primary;
    }
    pthread_mutex_unlock(&m->lock);
    if (rc == 0) {
        notify(m, s);
        notify(m, t);
    }
    return rc < 0 ? rc : 0;
}

/* Compare-and-swap rounds, as change_etcd's, on both shards' keys. */
static int reshard_etcd(struct shard_map *m, enum reshard_op op, unsigned s, unsigned t,
                        unsigned d)
{
    for (int tries = 0; tries < CHANGE_TRIES; tries++) {
        char ks[KEY_MAX], kl[KEY_MAX], kt[KEY_MAX], klt[KEY_MAX];
        char vs[VALUE_MAX], vt[VALUE_MAX];
        struct shard_copies cs, ct;
        struct etcd_cmp cmp[4];
        struct etcd_op ops[3];
        int64_t lease = atomic_load(&m->lease), mod_s, mod_t, held_s, held_t;
        unsigned ncmp = 0, nops = 0;
        int s_here, t_here, rc;

        s_here = seen(m, s, &cs, &mod_s, &held_s) == 0;
        t_here = seen(m, t, &ct, &mod_t, &held_t) == 0;
        key_shard(m, s, ks);
        key_leader(m, s, kl);
        key_shard(m, t, kt);
        key_leader(m, t, klt);
        cmp[0] = s_here ? etcd_cmp_mod(ETCD_S(ks), ETCD_EQUAL, mod_s)
                        : etcd_cmp_create(ETCD_S(ks), ETCD_EQUAL, 0);
        cmp[1] = t_here ? etcd_cmp_mod(ETCD_S(kt), ETCD_EQUAL, mod_t)
                        : etcd_cmp_create(ETCD_S(kt), ETCD_EQUAL, 0);
        rc = reshard_next(m, op, d, &cs, s_here, &ct, &t_here);
        if (rc != 0) {
            /* Judged on what this map holds, which may be behind (a CLI's
             * map, just opened: "no t" may mean "not seen yet"). The
             * answer stands once etcd says both keys are as seen. */
            int fresh = shards_txn(m, (const unsigned[]){s, t}, 2, cmp, 2, NULL, 0);
            if (fresh < 0)
                return fresh;
            if (fresh == 0)
                return rc < 0 ? rc : 0;
            continue;
        }
        if (op != RS_ABANDON && lease == 0)
            return -EAGAIN;
        /* After a failed round the map is fresh: the primary, but not the
         * live one (another lease holds the key). */
        if (tries > 0 && op != RS_ABANDON &&
            (held_s != lease || ((op == RS_COMMIT || op == RS_MERGE) && held_t != lease)))
            return -EPERM;
        if ((rc = encode_copies(m, &cs, vs, sizeof(vs))) < 0 ||
            (t_here && (rc = encode_copies(m, &ct, vt, sizeof(vt))) < 0))
            return rc;
        ncmp = 2; /* both shard keys as seen */
        if (op != RS_ABANDON)
            cmp[ncmp++] = etcd_cmp_lease(ETCD_S(kl), ETCD_EQUAL, lease);
        if (op == RS_BEGIN) {
            /* the leader key first, as handover's: never named without it */
            ops[nops++] = etcd_op_put(ETCD_S(klt), ETCD_S(m->names[m->self]), lease);
            ops[nops++] = etcd_op_put(ETCD_S(kt), ETCD_S(vt), 0);
        } else {
            if (op != RS_ABANDON)
                cmp[ncmp++] = etcd_cmp_lease(ETCD_S(klt), ETCD_EQUAL, lease);
            if (op != RS_ABANDON)
                ops[nops++] = etcd_op_put(ETCD_S(ks), ETCD_S(vs), 0);
            if (t_here) {
                ops[nops++] = etcd_op_put(ETCD_S(kt), ETCD_S(vt), 0);
            } else {
                ops[nops++] = etcd_op_delete(ETCD_S(kt), 0);
                ops[nops++] = etcd_op_delete(ETCD_S(klt), 0);
            }
        }
        rc = shards_txn(m, (const unsigned[]){s, t}, 2, cmp, ncmp, ops, nops);
        if (rc <= 0)
            return rc;
        /* a compare failed: the map is fresh now; judge again */
    }
    return -EAGAIN;
}

static int reshard_change(struct shard_map *m, enum reshard_op op, unsigned shard, unsigned depth)
{
    unsigned other;
    int rc = reshard_other(op, shard, depth, &other);

    if (rc < 0)
        return rc;
    return m->etcd ? reshard_etcd(m, op, shard, other, depth)
                   : reshard_static(m, op, shard, other, depth);
}

int shard_map_split_begin(struct shard_map *m, unsigned shard, unsigned depth)
{
    return reshard_change(m, RS_BEGIN, shard, depth);
}

int shard_map_split_commit(struct shard_map *m, unsigned shard, unsigned depth)
{
    return reshard_change(m, RS_COMMIT, shard, depth);
}

int shard_map_split_abandon(struct shard_map *m, unsigned shard, unsigned depth)
{
    return reshard_change(m, RS_ABANDON, shard, depth);
}

int shard_map_merge(struct shard_map *m, unsigned shard, unsigned depth)
{
    return reshard_change(m, RS_MERGE, shard, depth);
}
