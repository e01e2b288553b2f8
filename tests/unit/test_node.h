/* test_node.h -- node "a" of a two-node store, for the node server's tests
 * (tests/unit/test_node_server.c) and its fuzz target (tests/fuzz). Test-only.
 *
 *   test_node_a_open(dir, conf_text, cfg)  writes conf_text as
 *       DIR/shards.conf, loads it into *cfg and opens DIR/a/shard-0 (node
 *       a's shard 0) with a 60 s commit interval; returns the shard. Exits(2)
 *       on any failure, with the reason on stderr.
 */
#ifndef SHARDFS_TESTS_UNIT_TEST_NODE_H
#define SHARDFS_TESTS_UNIT_TEST_NODE_H

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "config.h"
#include "shard.h"
#include "shard_lmdb.h"

static inline struct shard *test_node_a_open(const char *dir, const char *conf_text,
                                             struct config *cfg)
{
    struct shard_lmdb_options opt = {.commit_interval_ms = 60000};
    struct shard *sh = NULL;
    char path[PATH_MAX + 32], err[1024];
    FILE *f;

    snprintf(path, sizeof(path), "%s/shards.conf", dir);
    f = fopen(path, "w");
    if (!f || fputs(conf_text, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
    if (config_load(path, cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "config_load: %s\n", err);
        exit(2);
    }
    snprintf(path, sizeof(path), "%s/a", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof(path), "%s/a/shard-0", dir);
    if (shard_lmdb_open(path, 0, &opt, &sh, err, sizeof(err)) != 0) {
        fprintf(stderr, "shard_lmdb_open: %s\n", err);
        exit(2);
    }
    return sh;
}

#endif
