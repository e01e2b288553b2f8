/* test_util.h -- small helpers shared by the unit tests (test-only).
 *
 *   xmalloc, xrealloc   allocation that exits(2) on failure (size 0 is fine)
 *   xmemdup(p, n)       a copy of n bytes in a buffer of exactly n bytes, so
 *                       ASan reports any read past its end
 *   now_s()             monotonic seconds, for timing bounds
 *   rm_rf(dir)          remove a test's temp directory (a warning if it fails)
 *
 * All static inline: a test that uses none of them gets no unused-function
 * warning.
 */
#ifndef SHARDFS_TESTS_UNIT_TEST_UTIL_H
#define SHARDFS_TESTS_UNIT_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        perror("malloc");
        exit(2);
    }
    return p;
}

static inline void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p) {
        perror("realloc");
        exit(2);
    }
    return p;
}

static inline uint8_t *xmemdup(const void *p, size_t n)
{
    uint8_t *d = xmalloc(n);
    if (n)
        memcpy(d, p, n);
    return d;
}

static inline double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static inline void rm_rf(const char *dir)
{
    char cmd[4200];
    if (snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir) >= (int)sizeof(cmd) || system(cmd) != 0)
        fprintf(stderr, "warning: could not remove %s\n", dir);
}

#endif
