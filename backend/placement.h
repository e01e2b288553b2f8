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
 * Pure functions: no state, thread-safe, no allocation.
 */
#ifndef SHARDFS_PLACEMENT_H
#define SHARDFS_PLACEMENT_H

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

#endif
