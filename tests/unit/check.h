/* check.h -- the little check framework of the unit tests (test-only).
 *
 * Every tests/unit/test_*.c includes it once; it is all static, so each test
 * executable gets its own counters.
 *
 *   CHECK(cond)               count a check; if cond is false, print
 *                             "FILE:LINE: check failed: cond" on stderr
 *   CHECKF(cond, fmt, ...)    the same, with " -- " and a printf-style message
 *   CHECK_RC(call, want)      an int-returning call that must give exactly
 *                             want; a mismatch shows both and strerror() of a
 *                             negative errno result
 *   check(ok, file, line, expr, fmt, ...)
 *                             what the macros call, for helpers that report
 *                             at their caller's FILE:LINE (fmt may be NULL)
 *   check_summary("NAME")     at the end of main: prints
 *                             "test_NAME: all N checks passed" (stdout) or
 *                             "test_NAME: K of N checks failed" (stderr) and
 *                             returns the exit code, 0 or 1
 *
 * `checks` and `failures` are the running counts (a test may read failures,
 * e.g. to say which part failed).
 */
#ifndef SHARDFS_TESTS_UNIT_CHECK_H
#define SHARDFS_TESTS_UNIT_CHECK_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int checks;   /* checks made */
static int failures; /* checks failed */

#define CHECK(cond) check((cond), __FILE__, __LINE__, #cond, NULL)
#define CHECKF(cond, ...) check((cond), __FILE__, __LINE__, #cond, __VA_ARGS__)
#define CHECK_RC(call, want)                                                                       \
    do {                                                                                           \
        long rc_ = (long)(call);                                                                   \
        long want_ = (long)(want);                                                                 \
        check(rc_ == want_, __FILE__, __LINE__, #call " == " #want, "got %ld (%s), want %ld", rc_, \
              rc_ < 0 ? strerror((int)-rc_) : "ok", want_);                                        \
    } while (0)

__attribute__((format(printf, 5, 6))) static void check(int ok, const char *file, int line,
                                                        const char *expr, const char *fmt, ...)
{
    checks++;
    if (ok)
        return;
    failures++;
    fprintf(stderr, "%s:%d: check failed: %s", file, line, expr);
    if (fmt) {
        va_list ap;
        fputs(" -- ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stderr);
}

/* The last line of a test: the totals, and main's exit code. */
static int check_summary(const char *name)
{
    if (failures) {
        fprintf(stderr, "test_%s: %d of %d checks failed\n", name, failures, checks);
        return 1;
    }
    printf("test_%s: all %d checks passed\n", name, checks);
    return 0;
}

#endif
