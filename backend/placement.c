/* placement.c -- key -> 64-bit placement hash -> shard number.
 *
 * The hash input of an entry is its 16-byte directory id followed by the name
 * (with rsync's temporary-name rule applied), hashed with XXH3_64 and seed 0.
 * XXH3's output is frozen since xxHash 0.8.0, so every node and every version
 * agrees on where a record lives.
 */
#include "placement.h"

#include <string.h>
#include <xxhash.h>

static placement_key_fn key_hash_fn;

void placement_set_key_hash(placement_key_fn fn)
{
    __atomic_store_n(&key_hash_fn, fn, __ATOMIC_RELEASE);
}

int placement_key_hash(const uint8_t *key, size_t klen, uint64_t *hash)
{
    placement_key_fn fn = __atomic_load_n(&key_hash_fn, __ATOMIC_ACQUIRE);

    return fn ? fn(key, klen, hash) : -ENOSYS;
}

static int is_alnum_ascii(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

int placement_rsync_base(const char *name, size_t name_len, const char **base, size_t *base_len)
{
    /* ".NAME.XXXXXX": leading dot, at least one byte of NAME, dot, 6 alnums. */
    if (name_len < 1 + 1 + 1 + 6 || name[0] != '.' || name[name_len - 7] != '.')
        return 0;
    for (size_t i = name_len - 6; i < name_len; i++)
        if (!is_alnum_ascii(name[i]))
            return 0;
    *base = name + 1;
    *base_len = name_len - 1 - 7;
    return 1;
}

uint64_t placement_entry_hash(const uint8_t dir_id[16], const char *name, size_t name_len)
{
    uint8_t buf[16 + 256];
    const char *base = name;
    size_t base_len = name_len;

    placement_rsync_base(name, name_len, &base, &base_len);
    if (base_len > sizeof(buf) - 16)
        base_len = sizeof(buf) - 16; /* names are <= 255 bytes; never reached */
    memcpy(buf, dir_id, 16);
    memcpy(buf + 16, base, base_len);
    return XXH3_64bits(buf, 16 + base_len);
}

int placement_valid_count(unsigned long n)
{
    return n >= 1 && n <= PLACEMENT_MAX_SHARDS && (n & (n - 1)) == 0;
}

int placement_layout_check(const uint8_t *depth, unsigned slots)
{
    if (!placement_valid_count(slots))
        return -EINVAL;
    for (unsigned i = 0; i < slots; i++) {
        unsigned d = depth[i];
        if (d > 16 || (1u << d) > slots)
            return -EINVAL;
        if (depth[i & ((1u << d) - 1)] != d) /* its shard has its depth */
            return -EINVAL;
    }
    for (unsigned i = 0; i < slots; i++) /* and every slot of a shard has it */
        for (unsigned j = i; placement_is_shard(depth, i) && j < slots; j += 1u << depth[i])
            if (depth[j] != depth[i])
                return -EINVAL;
    return 0;
}

int placement_split(uint8_t *depth, unsigned *slots, unsigned max, unsigned s)
{
    unsigned d, n = *slots;

    if (s >= n || !placement_is_shard(depth, s) || (1u << depth[s]) > n)
        return -EINVAL;
    d = depth[s];
    if ((2u << d) > max)
        return -ENOSPC;
    if ((1u << d) == n) { /* the deepest shard: the slots double */
        memcpy(depth + n, depth, n);
        n *= 2;
        *slots = n;
    }
    for (unsigned i = s; i < n; i += 1u << d)
        depth[i] = (uint8_t)(d + 1);
    return 0;
}

int placement_merge(uint8_t *depth, unsigned *slots, unsigned s, unsigned *into)
{
    unsigned d, low, n = *slots, deepest = 0;

    if (s >= n || !placement_is_shard(depth, s) || depth[s] == 0 || (1u << depth[s]) > n)
        return -EINVAL;
    d = depth[s];
    low = s & ((1u << (d - 1)) - 1);
    if (depth[low] != d || depth[low + (1u << (d - 1))] != d)
        return -EBUSY;
    for (unsigned i = low; i < n; i += 1u << (d - 1))
        depth[i] = (uint8_t)(d - 1);
    for (unsigned i = 0; i < n; i++)
        deepest = depth[i] > deepest ? depth[i] : deepest;
    while (n > 1 && (1u << deepest) < n)
        n /= 2; /* the upper half repeats the lower one */
    *slots = n;
    *into = low;
    return 0;
}
