/* checksum_bench.c -- what one hash pass of a shard costs (`shardfs fsck
 * --replicas` holds the primary's writes for exactly one such pass, and
 * pauses a replica's applying for one).
 *
 *   checksum_bench DIR MIB   fill a new shard in DIR with MIB MiB of 64 KiB
 *                            chunk records plus one small record per chunk
 *                            (an inode-like 150 bytes), sync, then time
 *                            shard_lmdb_checksum() three times with the
 *                            file in the page cache (hot) and once after
 *                            closing the shard and dropping data.mdb's
 *                            cached pages (cold: posix_fadvise DONTNEED,
 *                            so the pass reads the disk), then cold again
 *                            with shard_lmdb_warm() first (warm: its time;
 *                            warmed: the pass after it).
 *
 * Prints one line per pass: "hot|cold MS MS_PER_MIB MIB_PER_S RECORDS".
 * Built by tests/bench/checksum_bench.sh.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "shard.h"
#include "shard_lmdb.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int drop_cache(const char *dir)
{
    char path[4200];
    int fd, rc;

    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    fd = open(path, O_RDONLY);
    if (fd < 0)
        return -errno;
    fdatasync(fd);
    rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return -rc;
}

static void pass(struct shard *s, const char *what, unsigned mib)
{
    struct shard_lmdb_sum sum;
    double t0 = now_s(), t;
    int rc = shard_lmdb_checksum(s, &sum);

    t = now_s() - t0;
    if (rc) {
        fprintf(stderr, "checksum_bench: %s\n", strerror(-rc));
        exit(1);
    }
    printf("%s %.1f %.3f %.0f %llu\n", what, t * 1e3, t * 1e3 / mib, mib / t,
           (unsigned long long)sum.records);
}

int main(int argc, char **argv)
{
    struct shard *s = NULL;
    struct batch b;
    char err[512], *end;
    uint8_t key[64], *val;
    unsigned long mib;
    int rc = 0;

    if (argc != 3 || (mib = strtoul(argv[2], &end, 10)) == 0 || *end) {
        fprintf(stderr, "usage: checksum_bench DIR MIB\n");
        return 2;
    }
    val = malloc(65536);
    if (!val)
        return 2;
    for (size_t i = 0; i < 65536; i++)
        val[i] = (uint8_t)(i * 2654435761u >> 13);
    if (shard_lmdb_open(argv[1], 0, NULL, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "checksum_bench: %s\n", err);
        return 1;
    }
    batch_init(&b);
    for (unsigned long i = 0; i < mib * 16 && rc == 0; i++) {
        batch_reset(&b);
        memset(key, 0, sizeof(key));
        key[0] = 'C';
        memcpy(key + 1, "0123456789abcdef", 16);
        for (int k = 0; k < 8; k++)
            key[17 + k] = (uint8_t)((uint64_t)i >> (56 - 8 * k));
        val[0] = (uint8_t)i;
        batch_put(&b, key, 25, val, 65536);
        key[0] = 'I';
        batch_put(&b, key, 25, val, 150);
        rc = shard_apply(s, &b);
    }
    if (rc == 0)
        rc = shard_sync(s);
    batch_free(&b);
    free(val);
    if (rc) {
        fprintf(stderr, "checksum_bench: %s\n", strerror(-rc));
        return 1;
    }
    for (int i = 0; i < 3; i++)
        pass(s, "hot", (unsigned)mib);
    /* Pages an open shard maps are not dropped: close it first. */
    shard_close(s);
    rc = drop_cache(argv[1]);
    if (rc)
        fprintf(stderr, "checksum_bench: dropping the cache: %s\n", strerror(-rc));
    if (shard_lmdb_open(argv[1], 0, NULL, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "checksum_bench: %s\n", err);
        return 1;
    }
    pass(s, "cold", (unsigned)mib);
    /* Cold again, warmed first, as fsck --replicas does on a primary. */
    shard_close(s);
    drop_cache(argv[1]);
    if (shard_lmdb_open(argv[1], 0, NULL, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "checksum_bench: %s\n", err);
        return 1;
    }
    double t0 = now_s();
    rc = shard_lmdb_warm(s);
    printf("warm %.1f %.3f %.0f -\n", (now_s() - t0) * 1e3, (now_s() - t0) * 1e3 / mib,
           mib / (now_s() - t0));
    pass(s, "warmed", (unsigned)mib);
    shard_close(s);
    return 0;
}
