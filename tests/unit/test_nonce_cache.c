/* test_nonce_cache.c -- unit tests for backend/nonce_cache.c.
 *
 *  - arguments: a zero or huge max, a negative window, min_keep over the
 *    window: -EINVAL;
 *  - a nonce once: 0, again: -EEXIST, also with another date and clock; a
 *    date outside [now - window, now + window]: -ESTALE;
 *  - the floor: a nonce is remembered until its date leaves the window, and
 *    its request is refused (-ESTALE) from then on; the entries of passed
 *    dates are freed; a clock stepped back does not lower the floor, and a
 *    jump of more than the ring frees everything;
 *  - full: the oldest date is given up (its requests -ESTALE from then on,
 *    newer nonces still -EEXIST), but never one within min_keep of now:
 *    then -EBUSY, and nothing already held is forgotten;
 *  - a model check: 200,000 adds over 2,000 simulated seconds, fresh nonces
 *    and replays of earlier ones with dates around the clock, against a
 *    plain list of what was accepted: every answer and the count held.
 * Exits non-zero on any failed check.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nonce_cache.h"
#include "check.h"
#include "test_util.h"

#define W 300

static void nonce_of(uint64_t n, uint8_t out[WIRE_NONCE_BYTES])
{
    memset(out, 0, WIRE_NONCE_BYTES);
    memcpy(out, &n, sizeof(n));
    out[15] = 0xa5;
}

static int add(struct nonce_cache *c, uint64_t n, int64_t date, int64_t now)
{
    uint8_t nonce[WIRE_NONCE_BYTES];

    nonce_of(n, nonce);
    return nonce_cache_add(c, nonce, date, now);
}

static uint32_t used(struct nonce_cache *c)
{
    uint32_t u = 0;
    nonce_cache_stats(c, &u, NULL);
    return u;
}

static void test_args(void)
{
    struct nonce_cache *c = (void *)1;

    CHECK_RC(nonce_cache_new(0, W, 30, &c), -EINVAL);
    CHECK(c == NULL);
    CHECK_RC(nonce_cache_new((1u << 28) + 1, W, 30, &c), -EINVAL);
    CHECK_RC(nonce_cache_new(10, -1, 0, &c), -EINVAL);
    CHECK_RC(nonce_cache_new(10, W, W + 1, &c), -EINVAL);
    CHECK_RC(nonce_cache_new(10, W, -1, &c), -EINVAL);
    CHECK_RC(nonce_cache_new(10, W, W, &c), 0);
    nonce_cache_free(c);
    nonce_cache_free(NULL);
}

static void test_basics(void)
{
    const int64_t t = 1700000000;
    struct nonce_cache *c;
    int64_t floor;

    CHECK_RC(nonce_cache_new(1000, W, 30, &c), 0);
    CHECK_RC(add(c, 1, t, t), 0);
    CHECK_RC(add(c, 1, t, t), -EEXIST);
    CHECK_RC(add(c, 1, t + 5, t), -EEXIST); /* the nonce, whatever the rest */
    CHECK_RC(add(c, 2, t, t), 0);
    CHECK_RC(add(c, 3, t - W, t), 0);
    CHECK_RC(add(c, 4, t + W, t), 0);
    CHECK_RC(add(c, 5, t - W - 1, t), -ESTALE);
    CHECK_RC(add(c, 6, t + W + 1, t), -ESTALE);
    CHECK(used(c) == 4);

    /* Nonce 3 (dated t - W) is remembered while the clock is t, then its
     * date is out of the window and so is every request carrying it. */
    CHECK_RC(add(c, 3, t - W, t), -EEXIST);
    CHECK_RC(add(c, 3, t - W, t + 1), -ESTALE);
    CHECK(used(c) == 3);
    nonce_cache_stats(c, NULL, &floor);
    CHECK(floor == t + 1 - W);
    /* Nonces 1 and 2 (dated t) until t + W; then gone, entries freed. */
    CHECK_RC(add(c, 1, t, t + W), -EEXIST);
    CHECK_RC(add(c, 2, t, t + W + 1), -ESTALE);
    CHECK(used(c) == 1); /* nonce 4, dated t + W */
    CHECK_RC(add(c, 4, t + W, t + 2 * W), -EEXIST);
    /* A clock stepped back keeps the floor: dates below it stay refused. */
    CHECK_RC(add(c, 7, t + W - 1, t + W - 1), -ESTALE);
    CHECK_RC(add(c, 8, t + W + 2, t + W + 2), 0);
    /* A jump over more than the ring's seconds frees everything at once. */
    CHECK_RC(add(c, 9, t + 100000, t + 100000), 0);
    CHECK(used(c) == 1);
    CHECK_RC(add(c, 4, t + W, t + 100000), -ESTALE);
    nonce_cache_free(c);
}

static void test_full(void)
{
    const int64_t t = 1700000000;
    struct nonce_cache *c;
    int64_t floor;

    /* Four entries: two dated t - 100, one t - 50, one t. */
    CHECK_RC(nonce_cache_new(4, W, 30, &c), 0);
    CHECK_RC(add(c, 1, t - 100, t), 0);
    CHECK_RC(add(c, 2, t - 100, t), 0);
    CHECK_RC(add(c, 3, t - 50, t), 0);
    CHECK_RC(add(c, 4, t, t), 0);
    /* A fifth: the oldest date (t - 100, both its nonces) is given up. */
    CHECK_RC(add(c, 5, t, t), 0);
    nonce_cache_stats(c, NULL, &floor);
    CHECK(floor == t - 99);
    CHECK(used(c) == 3);
    CHECK_RC(add(c, 1, t - 100, t), -ESTALE); /* its replay is refused all the same */
    CHECK_RC(add(c, 6, t - 100, t), -ESTALE);
    CHECK_RC(add(c, 3, t - 50, t), -EEXIST);
    CHECK_RC(add(c, 4, t, t), -EEXIST);
    CHECK_RC(add(c, 5, t, t), -EEXIST);
    /* One more fits; then t - 50 goes (older than t - 30)... */
    CHECK_RC(add(c, 7, t - 10, t), 0);
    CHECK_RC(add(c, 8, t - 5, t), 0);
    CHECK_RC(add(c, 3, t - 50, t), -ESTALE);
    CHECK(used(c) == 4);
    /* ... but now everything is within min_keep (30 s) of now: busy, and
     * every nonce still there. A request older than the oldest date held
     * is refused as stale rather than pushing it out. */
    CHECK_RC(add(c, 9, t, t), -EBUSY);
    CHECK_RC(add(c, 9, t, t), -EBUSY);
    for (uint64_t n = 4; n <= 8; n++)
        if (n != 6)
            CHECKF(add(c, n, n == 7 ? t - 10 : n == 8 ? t - 5 : t, t) == -EEXIST, "nonce %d",
                   (int)n);
    /* Time passes: t - 10 is older than now - 30 at t + 21. */
    CHECK_RC(add(c, 9, t + 21, t + 21), 0);
    CHECK_RC(add(c, 7, t - 10, t + 21), -ESTALE);
    CHECK_RC(add(c, 8, t - 5, t + 21), -EEXIST);
    nonce_cache_free(c);

    /* min_keep 0 and a window of 0: the cache of one second. */
    CHECK_RC(nonce_cache_new(1, 0, 0, &c), 0);
    CHECK_RC(add(c, 1, t, t), 0);
    CHECK_RC(add(c, 2, t, t), -EBUSY);
    CHECK_RC(add(c, 1, t, t), -EEXIST);
    CHECK_RC(add(c, 2, t + 1, t + 1), 0);
    CHECK_RC(add(c, 1, t, t + 1), -ESTALE);
    nonce_cache_free(c);
}

/* ---- a model check ---- */

struct seen {
    uint64_t n;
    int64_t date;
};

static uint64_t rng = 88172645463325252ull;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_model(void)
{
    const int64_t t0 = 1700000000;
    struct nonce_cache *c;
    struct seen *acc = xmalloc(200000 * sizeof(*acc));
    size_t nacc = 0;
    uint64_t next = 1;
    int64_t floor = INT64_MIN;
    int bad = 0;

    CHECK_RC(nonce_cache_new(1u << 17, W, 30, &c), 0);
    for (int64_t now = t0; now < t0 + 2000; now++) {
        if (now - W > floor)
            floor = now - W;
        for (int k = 0; k < 100; k++) {
            uint64_t r = next_rand();
            int replay = nacc && r % 4 == 0;
            struct seen q;
            int want, got;

            if (replay) {
                q = acc[(r >> 8) % nacc];
            } else {
                /* mostly near now; some at the edges and beyond */
                int64_t off = (int64_t)((r >> 8) % 21) - 10;
                if (r % 50 == 1)
                    off = (int64_t)((r >> 16) % (2 * W + 41)) - W - 20;
                q = (struct seen){next++, now + off};
            }
            if (q.date < floor || q.date > now + W)
                want = -ESTALE;
            else
                want = replay ? -EEXIST : 0;
            got = add(c, q.n, q.date, now);
            if (got != want && bad++ < 10)
                CHECKF(got == want, "t+%lld: nonce %llu date t+%lld: got %d, want %d",
                       (long long)(now - t0), (unsigned long long)q.n,
                       (long long)(q.date - t0), got, want);
            if (got == 0 && !replay)
                acc[nacc++] = q;
        }
        if (now % 97 == 0) {
            uint32_t live = 0;
            for (size_t i = 0; i < nacc; i++)
                live += acc[i].date >= floor;
            CHECKF(used(c) == live, "t+%lld: %u held, %u live", (long long)(now - t0), used(c),
                   live);
        }
    }
    CHECK(bad == 0);
    CHECK(nacc > 100000);
    nonce_cache_free(c);
    free(acc);
}

int main(void)
{
    test_args();
    test_basics();
    test_full();
    test_model();
    return check_summary("nonce_cache");
}
