/* endian.h -- fixed byte order for everything stored or sent.
 *
 * Values inside records and log headers are little-endian; integers inside
 * keys are big-endian so that byte order is numeric order. Pure inline
 * functions; p must hold n bytes.
 */
#ifndef SHARDFS_ENDIAN_H
#define SHARDFS_ENDIAN_H

#include <stdint.h>

static inline void endian_put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static inline uint64_t endian_get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static inline void endian_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static inline uint64_t endian_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

#endif
