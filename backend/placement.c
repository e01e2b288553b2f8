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
