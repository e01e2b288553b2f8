/* stream_bench.c -- what a shard's writes cost (issue 10: the change stream).
 *
 *   stream_bench DIR large   1 GiB as 16384 batches of one 64 KiB chunk put
 *                            (the fs's chunk key shape), then sync and close
 *   stream_bench DIR small   100000 batches of two small puts (an inode-like
 *                            150-byte value and a directory entry), then
 *                            sync and close
 *
 * One fresh shard in DIR (which must not exist; put it on the ordinary
 * disk, not tmpfs), default options (200 ms commits, 32 MiB commit bytes,
 * the stream's default retention). Prints "MODE SECONDS MiB/s batches/s
 * CPU_SECONDS" (user + system of all the process's threads: on a busy
 * machine the wall clock moves with the neighbours, the CPU time less).
 * Uses only shard.h / shard_lmdb.h calls that exist before the stream too,
 * so the same file builds against main for the comparison (see
 * tests/bench/stream_bench.sh).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "batch.h"
#include "shard.h"
#include "shard_lmdb.h"

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    struct shard *s = NULL;
    struct batch b;
    char err[512];
    uint8_t key[64], *val;
    size_t vlen;
    unsigned n;
    int large, rc;

    if (argc != 3 || (strcmp(argv[2], "large") && strcmp(argv[2], "small"))) {
        fprintf(stderr, "usage: stream_bench DIR large|small\n");
        return 2;
    }
    large = strcmp(argv[2], "large") == 0;
    n = large ? 16384 : 100000;
    vlen = large ? 65536 : 150;
    val = malloc(65536);
    if (!val)
        return 2;
    for (size_t i = 0; i < 65536; i++)
        val[i] = (uint8_t)(i * 2654435761u >> 13);
    rc = shard_lmdb_open(argv[1], 0, NULL, &s, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "stream_bench: %s\n", err);
        return 1;
    }
    batch_init(&b);
    double t0 = now_s();
    for (unsigned i = 0; i < n && rc == 0; i++) {
        batch_reset(&b);
        memset(key, 0, sizeof(key));
        if (large) {
            key[0] = 'C';
            memcpy(key + 1, "0123456789abcdef", 16);
            for (int k = 0; k < 8; k++)
                key[17 + k] = (uint8_t)((uint64_t)i >> (56 - 8 * k));
            val[0] = (uint8_t)i;
            batch_put(&b, key, 25, val, vlen);
        } else {
            key[0] = 'I';
            for (int k = 0; k < 8; k++)
                key[1 + k] = (uint8_t)((uint64_t)i * 0x9e3779b97f4a7c15ull >> (8 * k));
            batch_put(&b, key, 17, val, vlen);
            key[0] = 'E';
            int nl = snprintf((char *)key + 17, 40, "file-%u.h", i);
            batch_put(&b, key, 17 + (size_t)nl, key + 1, 17);
        }
        rc = shard_apply(s, &b);
    }
    if (rc == 0)
        rc = shard_sync(s);
    shard_close(s);
    double t = now_s() - t0;
    batch_free(&b);
    free(val);
    if (rc) {
        fprintf(stderr, "stream_bench: %s\n", strerror(-rc));
        return 1;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("%s %.3f %.1f %.0f %.3f\n", argv[2], t, large ? (double)n * vlen / (1 << 20) / t : 0.0,
           n / t, cpu);
    return 0;
}
