/* clock.h -- the monotonic clock in milliseconds, and deadlines on it.
 *
 * Contract: clock_mono_ms() is CLOCK_MONOTONIC in ms: it never goes back
 * and does not follow changes of the wall clock, so timeouts and ages
 * measured with it hold across an ntp step. clock_deadline_at() and
 * clock_deadline_in() fill a timespec on the same clock, for
 * pthread_cond_timedwait() on a condition variable created with
 * pthread_condattr_setclock(CLOCK_MONOTONIC). Header only; no state.
 */
#ifndef SHARDFS_CLOCK_H
#define SHARDFS_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t clock_mono_ms(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The instant mono_ms (a clock_mono_ms() value) as a timespec. */
static inline void clock_deadline_at(struct timespec *ts, int64_t mono_ms)
{
    ts->tv_sec = (time_t)(mono_ms / 1000);
    ts->tv_nsec = (long)(mono_ms % 1000) * 1000000L;
}

/* ms from now (at least 0), finer than clock_deadline_at(): the
 * nanoseconds of now are kept. */
static inline void clock_deadline_in(struct timespec *ts, int64_t ms)
{
    if (ms < 0)
        ms = 0;
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

#endif
