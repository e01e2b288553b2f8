/* crashsim.h -- what the two crash simulator workloads share (workload.c,
 * nsworkload.c): the seeded mixer, the marks put into the shim's trace, and
 * the loop that answers the driver's checks, one forked child a state so a
 * state that crashes its reader is reported, not fatal. Header-only: each
 * workload is one executable. */
#ifndef SHARDFS_CRASHSIM_H
#define SHARDFS_CRASHSIM_H

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static inline uint64_t crashsim_mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Put "WHAT N" into the trace, in order with the I/O (the shim's
 * crashsim_mark(); nothing when the shim is not preloaded). */
static inline void crashsim_mark(const char *what, uint64_t n)
{
    static void (*fn)(const char *);
    static int looked;
    char text[64];

    if (!looked) {
        fn = (void (*)(const char *))dlsym(RTLD_DEFAULT, "crashsim_mark");
        looked = 1;
    }
    if (!fn)
        return;
    snprintf(text, sizeof(text), "%s %llu", what, (unsigned long long)n);
    fn(text);
}

/* Check the state in dir: 0 and *j (what it holds), or -errno and why.
 * lsn: the highest stream lsn the run had written to a redo log before the
 * crash point (or the applied count; crashsim.py). */
typedef int (*crashsim_check_fn)(const char *dir, uint64_t seed, uint64_t lo, uint64_t hi,
                                 uint64_t lsn, uint64_t *j, char *why, size_t whylen);

/* Answer "DIR LO HI LSN" lines on stdin with "ok J" or "bad REASON". */
static inline int crashsim_serve_checks(uint64_t seed, crashsim_check_fn check)
{
    char line[8192], dir[4096];
    unsigned long long lo, hi, lsn;

    while (fgets(line, sizeof(line), stdin)) {
        int pipefd[2], status = -1;
        char answer[500] = "";
        if (sscanf(line, "%4095s %llu %llu %llu", dir, &lo, &hi, &lsn) != 4 || pipe(pipefd) != 0) {
            printf("bad malformed request\n");
            fflush(stdout);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            char why[400] = "";
            uint64_t j = 0;
            close(pipefd[0]);
            int rc = check(dir, seed, lo, hi, lsn, &j, why, sizeof(why));
            int n = rc ? snprintf(answer, sizeof(answer), "bad %s", why)
                       : snprintf(answer, sizeof(answer), "ok %llu", (unsigned long long)j);
            _exit(write(pipefd[1], answer, (size_t)n) == n ? 0 : 2);
        }
        close(pipefd[1]);
        ssize_t got = pid > 0 ? read(pipefd[0], answer, sizeof(answer) - 1) : -1;
        close(pipefd[0]);
        if (pid > 0)
            waitpid(pid, &status, 0);
        if (got <= 0)
            snprintf(answer, sizeof(answer), "bad the checker died (status %d)", status);
        else
            answer[got] = 0;
        printf("%s\n", answer);
        fflush(stdout);
    }
    return 0;
}

/* The command line both workloads share:
 *   NAME run DIR SEED N | recover DIR | check SEED */
static inline int crashsim_main(int argc, char **argv, const char *name,
                                int (*run)(const char *dir, uint64_t seed, uint64_t n),
                                int (*recover)(const char *dir), crashsim_check_fn check)
{
    if (argc == 5 && strcmp(argv[1], "run") == 0)
        return run(argv[2], strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10));
    if (argc == 3 && strcmp(argv[1], "recover") == 0)
        return recover(argv[2]);
    if (argc == 3 && strcmp(argv[1], "check") == 0)
        return crashsim_serve_checks(strtoull(argv[2], NULL, 10), check);
    fprintf(stderr, "usage: %s run DIR SEED N | recover DIR | check SEED\n", name);
    return 2;
}

#endif
