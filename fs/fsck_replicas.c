/* fsck_replicas.c -- `shardfs fsck --replicas`: every replica of every
 * shard compared with its primary at one position (client.h).
 *
 * For each shard with replicas in the map (etcd's, or the file's without
 * etcd): POST /v1/checksum {"shard":N} to its primary, which holds the
 * shard's writes for one hash pass of its copy and answers with its
 * position P and digest (replication.h); then the same route with P to
 * every node holding a replica, which answers with its own copy's digest at
 * exactly P once it got there (the primary stops its stream at P
 * meanwhile), or "behind" after the wait. A copy is ok when its digest,
 * record and byte counts at P are the primary's; MISMATCH when not; behind
 * when it did not reach P in time; unreachable when its node did not
 * answer. Each replica reads its copy into memory first ("warm"), so its
 * hash at P, which the primary's ack = replica writers wait for, reads no
 * disk. Nothing is changed anywhere: the offline `fsck -n NODE` checks a
 * store's records, this compares running copies.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "shard_map.h"

#define CHECK_TRIES 3 /* a primary busy with writes that would not finish */

static const char usage_fsck_replicas[] =
    "usage: shardfs fsck --replicas [-c CONF] [--wait MS]\n"
    "\n"
    "Compare every replica of every shard with its primary, on the running\n"
    "cluster: the primary holds the shard's writes for one hash pass of its\n"
    "copy (XXH3-128 of every data record, in key order) at its position\n"
    "(epoch/lsn/check), and each replica hashes its copy when it has applied\n"
    "exactly that position. Prints, per shard, the position and each copy:\n"
    "ok, MISMATCH (other data at the same position), behind (not at the\n"
    "position within --wait MS; default half of timeout_ms, at most 8/10 of\n"
    "it) or unreachable. Exits 0 when every copy is ok, 1 otherwise, 2 on bad\n"
    "usage or configuration.\n";

struct reply {
    char *p;
    size_t len;
};

static int sink_reply(void *ctx, const void *data, size_t len)
{
    struct reply *b = ctx;
    char *np;

    if (b->len + len > (1u << 20))
        return -EFBIG;
    np = realloc(b->p, b->len + len + 1);
    if (!np)
        return -ENOMEM;
    b->p = np;
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
    return 0;
}

/* POST /v1/checksum with body req to node: the JSON answer, or NULL and
 * *rc (transport or status error, -EIO for a body that is not JSON). */
static json_t *ask(struct client *c, int node, json_t *req, int *rc)
{
    struct reply b = {0};
    char *body = json_dumps(req, JSON_COMPACT);
    json_t *doc = NULL;

    *rc = body ? remote_api_call(c->remote, (unsigned)node, "POST", "/v1/checksum", body,
                                 strlen(body), sink_reply, &b, NULL)
               : -ENOMEM;
    if (*rc == 0 && !(doc = b.p ? json_loadb(b.p, b.len, 0, NULL) : NULL))
        *rc = -EIO;
    free(body);
    free(b.p);
    return doc;
}

static const char *jstr(json_t *doc, const char *key)
{
    const char *s = json_string_value(json_object_get(doc, key));
    return s ? s : "";
}

static long long jll(json_t *doc, const char *key)
{
    return (long long)json_integer_value(json_object_get(doc, key));
}

/* The primary's answer for shard n (retried when it was busy), or NULL
 * after printing why. */
static json_t *primary_sum(struct client *c, unsigned n, int primary, unsigned wait_ms)
{
    json_t *req = json_pack("{s:I,s:I}", "shard", (json_int_t)n, "wait_ms", (json_int_t)wait_ms);
    json_t *doc = NULL;
    int rc = -ENOMEM;

    for (int t = 0; req && t < CHECK_TRIES; t++) {
        json_decref(doc);
        doc = ask(c, primary, req, &rc);
        if (!doc || json_is_true(json_object_get(doc, "done")))
            break;
        /* Busy (writes that would not finish, a handover): again. */
        rc = -EAGAIN;
    }
    json_decref(req);
    if (doc && json_is_true(json_object_get(doc, "done")))
        return doc;
    if (doc)
        printf("shard %u: primary %s: not checked: %s\n", n, c->cfg.nodes[primary].name,
               jstr(doc, "error"));
    else
        printf("shard %u: primary %s: unreachable (%s)\n", n, c->cfg.nodes[primary].name,
               strerror(-rc));
    json_decref(doc);
    return NULL;
}

/* Have node read its copy of shard n into memory before the primary sets
 * the position: the copy's hash there holds the primary's ack = replica
 * writers (replication.h, "warm"). A failure is left to the check itself
 * to report. */
static void warm_replica(struct client *c, unsigned n, int node)
{
    json_t *req = json_pack("{s:I,s:b}", "shard", (json_int_t)n, "warm", 1);
    int rc;

    json_decref(req ? ask(c, node, req, &rc) : NULL);
    json_decref(req);
}

/* Compare node's copy of shard n with the primary's answer p. 1 if ok. */
static int replica_ok(struct client *c, unsigned n, int node, json_t *p, unsigned wait_ms)
{
    const char *name = c->cfg.nodes[node].name;
    json_t *req = json_pack("{s:I,s:O,s:O,s:O,s:I}", "shard", (json_int_t)n, "epoch",
                            json_object_get(p, "epoch"), "lsn", json_object_get(p, "lsn"),
                            "check", json_object_get(p, "check"), "wait_ms",
                            (json_int_t)wait_ms);
    json_t *doc;
    int rc = -ENOMEM, ok = 0;

    doc = req ? ask(c, node, req, &rc) : NULL;
    json_decref(req);
    if (!doc) {
        printf("shard %u: %-10s unreachable (%s)\n", n, name, strerror(-rc));
        return 0;
    }
    if (!json_is_true(json_object_get(doc, "done"))) {
        printf("shard %u: %-10s %s (%s)\n", n, name,
               !strcmp(jstr(doc, "errno"), "ETIMEDOUT") ? "behind" : "not checked",
               jstr(doc, "error"));
    } else if (jll(doc, "epoch") != jll(p, "epoch") || jll(doc, "lsn") != jll(p, "lsn") ||
               strcmp(jstr(doc, "check"), jstr(p, "check")) != 0) {
        /* The route answers only at the position asked: not expected. */
        printf("shard %u: %-10s not checked (answered at another position: lsn %lld)\n", n,
               name, jll(doc, "lsn"));
    } else if (strcmp(jstr(doc, "digest"), jstr(p, "digest")) != 0 ||
               jll(doc, "records") != jll(p, "records") || jll(doc, "bytes") != jll(p, "bytes")) {
        printf("shard %u: %-10s MISMATCH: digest %s, %lld records, %lld bytes (the primary's: "
               "%s, %lld, %lld)\n",
               n, name, jstr(doc, "digest"), jll(doc, "records"), jll(doc, "bytes"),
               jstr(p, "digest"), jll(p, "records"), jll(p, "bytes"));
    } else {
        printf("shard %u: %-10s ok (hashed in %lld ms)\n", n, name, jll(doc, "took_ms"));
        ok = 1;
    }
    json_decref(doc);
    return ok;
}

int cmd_fsck_replicas(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"replicas", no_argument, NULL, 'r'},
        {"conf", required_argument, NULL, 'c'},
        {"wait", required_argument, NULL, 'W'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static struct client c;
    struct shard_map *map = NULL;
    const char *conf = "shards.conf";
    unsigned long wait_arg = 0;
    unsigned wait_ms, checked = 0, bad = 0, max_wait;
    char merr[256], *end;
    int opt;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "+c:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'r':
            break;
        case 'c':
            conf = optarg;
            break;
        case 'W':
            errno = 0;
            wait_arg = strtoul(optarg, &end, 10);
            if (errno || *end || !optarg[0] || optarg[0] == '-' || wait_arg == 0) {
                fputs(usage_fsck_replicas, stderr);
                return 2;
            }
            break;
        case 'h':
            fputs(usage_fsck_replicas, stdout);
            return 0;
        default:
            fputs(usage_fsck_replicas, stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fputs(usage_fsck_replicas, stderr);
        return 2;
    }
    if (client_open(&c, conf, NULL) != 0)
        return 2;
    /* A request may be silent for at most timeout_ms (remote_api_call). */
    max_wait = (c.cfg.timeout_ms ? c.cfg.timeout_ms : 5000u) * 8 / 10;
    wait_ms = wait_arg ? (unsigned)(wait_arg < max_wait ? wait_arg : max_wait) : max_wait * 5 / 8;
    if (c.cfg.etcd[0] && shard_map_open(&c.cfg, -1, &map, merr, sizeof(merr)) != 0) {
        fprintf(stderr, "shardfs: fsck: the shard map in etcd: %s\n", merr);
        client_close(&c);
        return 1;
    }
    /* with etcd, every shard of the map: splits add some (reshard.h) */
    for (unsigned n = 0; n < (map ? CONFIG_MAX_SHARDS : c.cfg.shard_count); n++) {
        struct shard_copies sc = {.primary = c.cfg.owner[n], .nreplicas = c.cfg.nreplicas[n]};
        json_t *p;

        for (unsigned k = 0; k < c.cfg.nreplicas[n]; k++)
            sc.replicas[k] = c.cfg.replicas[n][k];
        if (map && shard_map_get(map, n, &sc) != 0) {
            if (n >= c.cfg.shard_count)
                continue; /* none made here */
            printf("shard %u: not in the shard map\n", n);
            bad++;
            continue;
        }
        if (sc.nreplicas == 0)
            continue; /* one copy: nothing to compare */
        checked++;
        if (sc.primary < 0 || (unsigned)sc.primary >= c.cfg.node_count) {
            printf("shard %u: no primary at the moment (a failover is due)\n", n);
            bad++;
            continue;
        }
        for (unsigned k = 0; k < sc.nreplicas; k++)
            if (sc.replicas[k] >= 0 && (unsigned)sc.replicas[k] < c.cfg.node_count)
                warm_replica(&c, n, sc.replicas[k]);
        p = primary_sum(&c, n, sc.primary, wait_ms);
        if (!p) {
            bad++;
            continue;
        }
        printf("shard %u: position %lld/%lld/%s, %s primary: %lld records, %lld bytes, digest "
               "%s (writes held %lld ms)\n",
               n, jll(p, "epoch"), jll(p, "lsn"), jstr(p, "check"), c.cfg.nodes[sc.primary].name,
               jll(p, "records"), jll(p, "bytes"), jstr(p, "digest"), jll(p, "frozen_ms"));
        for (unsigned k = 0; k < sc.nreplicas; k++) {
            if (sc.replicas[k] < 0 || (unsigned)sc.replicas[k] >= c.cfg.node_count) {
                printf("shard %u: a replica on a node %s does not name: not checked\n", n, conf);
                bad++;
            } else if (!replica_ok(&c, n, sc.replicas[k], p, wait_ms)) {
                bad++;
            }
        }
        json_decref(p);
    }
    shard_map_close(map);
    client_close(&c);
    if (!checked)
        printf("no shard has replicas: nothing to compare\n");
    else
        printf("%u shards with replicas checked: %s\n", checked,
               bad ? "NOT all copies ok" : "every copy ok");
    return bad ? 1 : 0;
}
