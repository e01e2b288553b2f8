/* nonce_cache.h -- the request nonces a node has accepted, so that a replay
 * of a signed request is refused (wire.h).
 *
 * A signed request is valid while its date is within WIRE_MAX_SKEW of the
 * node's clock, so a node must remember the nonce of every request it
 * accepted for as long as that request's date could pass again, and not a
 * second longer. The cache holds (nonce, date) pairs in bounded memory: at
 * most `max` of them, about 32 bytes each plus 4 bytes of hash table, in
 * memory allocated once and touched as it fills.
 *
 * The rule: the cache has a floor, a date. A request dated below the floor
 * is refused; every nonce accepted with a date at or above the floor is
 * remembered. The floor follows the clock (now - window) and never moves
 * back, so a clock stepped back does not bring a forgotten date into the
 * window again. When the cache is full, it raises the floor past its oldest
 * date (forgetting those nonces, and refusing from then on any request that
 * old), but never above now - min_keep: under a load of more than max
 * requests per `window` seconds the accepted past shrinks from `window`
 * seconds to as little as `min_keep`, so a client whose clock is behind the
 * node's by more than that is refused (401) for as long as the load lasts.
 * Beyond max requests per min_keep seconds nothing can be given up, and a
 * new request is refused as busy (-EBUSY, 503; a client retries reads). So
 * no nonce that could be replayed is ever forgotten.
 *
 * Errors: nonce_cache_add() returns 0 (new, remembered), -EEXIST (seen:
 * a replay), -ESTALE (dated below the floor, or more than window ahead of
 * now), -EBUSY (full). Threads: every call may come from any thread (one
 * mutex). The caller checks the signature and the date window first: only
 * an authentic request may take room in the cache.
 */
#ifndef SHARDFS_NONCE_CACHE_H
#define SHARDFS_NONCE_CACHE_H

#include <stdint.h>

#include "wire.h"

struct nonce_cache;

/* max: entries (1 .. 1 << 28); window: seconds a date stays valid either
 * side of now (WIRE_MAX_SKEW); min_keep: the past the floor may not pass
 * when full (0 .. window). 0, -EINVAL or -ENOMEM. */
int nonce_cache_new(uint32_t max, int64_t window, int64_t min_keep, struct nonce_cache **out);
void nonce_cache_free(struct nonce_cache *c); /* NULL-safe */

/* Remember the nonce of a request dated date, the clock being now. */
int nonce_cache_add(struct nonce_cache *c, const uint8_t nonce[WIRE_NONCE_BYTES], int64_t date,
                    int64_t now);

/* Entries held and the current floor (for tests and messages). */
void nonce_cache_stats(struct nonce_cache *c, uint32_t *used, int64_t *floor);

#endif
