/* placement.h -- where a record lives.
 *
 * Every record of the store has a 64-bit placement hash that is computable from
 * its key alone; the record lives on shard `hash & (shard_count - 1)`. The shard
 * count is a power of two, so splitting shard s into s and s + N later moves
 * exactly the records whose hash has bit log2(N) set.
 *
 * Directory entries are placed by XXH3_64 over (directory id, name). rsync's
 * temporary names ".NAME.XXXXXX" hash as NAME would, so rsync's final rename
 * stays inside one shard. Inode, chunk and xattr records carry the placement
 * hash of the entry that created the inode in the first 8 bytes of the inode id.
 *
 * Pure functions (but for the one registered key function): thread-safe, no
 * allocation.
 */
#ifndef SHARDFS_PLACEMENT_H
#define SHARDFS_PLACEMENT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define PLACEMENT_MAX_SHARDS 65536u

/* Placement hash of the directory entry (dir_id, name). dir_id is the 16-byte
 * inode id of the directory; name is not NUL-terminated. Applies the rsync
 * temporary-name rule. */
uint64_t placement_entry_hash(const uint8_t dir_id[16], const char *name, size_t name_len);

/* If name looks like an rsync temporary name ".NAME.XXXXXX" (6 characters of
 * [A-Za-z0-9] after the last dot), store the span of NAME in *base and *base_len and
 * return 1; otherwise return 0. */
int placement_rsync_base(const char *name, size_t name_len, const char **base, size_t *base_len);

/* The shard of a placement hash. shard_count MUST be a power of two. */
static inline unsigned placement_shard_of(uint64_t hash, unsigned shard_count)
{
    return (unsigned)(hash & (uint64_t)(shard_count - 1));
}

/* 1 if n is a power of two between 1 and PLACEMENT_MAX_SHARDS. */
int placement_valid_count(unsigned long n);

/* The placement hash of a record from its key alone. Only the layer that
 * encodes keys knows their types (fs/record.h: record_placement()), so it
 * registers its function once at start, before any thread uses it; the
 * node server then checks that every key a request names belongs to the
 * shard it was sent to (wire.h, "Layouts").
 * placement_key_hash(): 0 and *hash; -EINVAL for a key that is not placed
 * (a shard's own records, a key too short to be a record); -ENOSYS when no
 * function is registered (nothing is checked). */
typedef int (*placement_key_fn)(const uint8_t *key, size_t klen, uint64_t *hash);
void placement_set_key_hash(placement_key_fn fn);
int placement_key_hash(const uint8_t *key, size_t klen, uint64_t *hash);

/* ---- layouts: one depth per shard (extendible hashing) ----
 *
 * A store whose shards were split one at a time has shards of different
 * depths. A layout is an array of `slots` (a power of two, 2^G, G the
 * largest depth) bytes: depth[i] is the local depth d of the shard that
 * owns slot i, and that shard's number is i & (2^d - 1). A record with hash
 * h lives on placement_home(h): its slot is h & (slots - 1). Shard s at
 * depth d owns every hash with h & (2^d - 1) == s, so all the slots
 * congruent to s modulo 2^d carry depth d, and slot i is a shard's own
 * (not another slot of a shallower shard) exactly when i < 2^depth[i].
 * A store of N shards that never split is the uniform layout: N slots of
 * depth log2 N.
 *
 * Splitting shard s of depth d makes s and s + 2^d at depth d + 1: only the
 * records of s whose hash has bit d set move. Merging is the reverse. */

/* The shard of hash h under a layout. */
static inline unsigned placement_home(uint64_t h, const uint8_t *depth, unsigned slots)
{
    unsigned slot = (unsigned)(h & (uint64_t)(slots - 1));

    return slot & ((1u << depth[slot]) - 1);
}

/* 1 if slot i is the own slot of a shard (the shard numbered i). */
static inline int placement_is_shard(const uint8_t *depth, unsigned i)
{
    return i < (1u << depth[i]);
}

/* 0 if depth[0..slots) is a layout (above), else -EINVAL. */
int placement_layout_check(const uint8_t *depth, unsigned slots);

/* Split shard s: s and s + 2^d at depth d + 1. depth has room for max
 * slots (a power of two); *slots doubles when d was the largest depth.
 * 0, -EINVAL (s is not a shard), -ENOSPC (the new shard's number would
 * reach max). */
int placement_split(uint8_t *depth, unsigned *slots, unsigned max, unsigned s);

/* Merge shard s (depth d >= 1) with its buddy s ^ 2^(d-1), which must have
 * depth d too, into the lower of the two, at depth d - 1; *slots halves
 * while no shard needs them. 0 and the surviving shard in *into, or
 * -EINVAL (s is not a shard, or has depth 0), -EBUSY (the buddy was split
 * further: merge it first). */
int placement_merge(uint8_t *depth, unsigned *slots, unsigned s, unsigned *into);

#endif
