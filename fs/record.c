/* record.c -- key and value encoding of filesystem records (see record.h).
 *
 * Inode value layout (little-endian; RECORD_INODE_HDR = 100 bytes, then tail):
 *    0 version:u8 (1)   1..3 zero       4 flags:u32     8 mode:u32    12 uid:u32
 *   16 gid:u32         20 nlink:u32    24 rdev:u32     28 tail_len:u32
 *   32 size:u64        40 atime:i64    48 mtime:i64    56 ctime:i64  (seconds)
 *   64 atime_ns:u32    68 mtime_ns:u32 72 ctime_ns:u32
 *   76 parent id[16]   92 alloc:u64 (bytes stored)   100 tail[tail_len]
 */
#include "record.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "batch.h"
#include "endian.h"
#include "placement.h"

const struct ino_id record_root_id = {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}};

#define HDR_FIXED 76u /* header bytes before the parent id */
_Static_assert(HDR_FIXED + RECORD_ID_LEN + 8 == RECORD_INODE_HDR, "inode header size");
/* Every record fits a batch item, so a batch of them fails cleanly at most
 * (batch_add's sticky -ENAMETOOLONG or -EFBIG), never half-written. */
_Static_assert(RECORD_CHUNK_KEY_LEN <= RECORD_KEY_MAX, "RECORD_KEY_MAX holds any record key");
_Static_assert(RECORD_KEY_MAX <= BATCH_KEY_MAX, "a record key fits a batch key");
_Static_assert(RECORD_INODE_MAX <= BATCH_VALUE_MAX, "an inode record fits a batch value");
_Static_assert(RECORD_INTENT_MAX <= BATCH_VALUE_MAX, "an intent record fits a batch value");
/* Name lengths travel in one byte (intents, readdir entries). */
_Static_assert(RECORD_NAME_MAX <= UINT8_MAX, "a name length fits a byte");

void record_root_init(struct inode *root)
{
    memset(root, 0, sizeof(*root));
    root->id = record_root_id;
    root->parent = record_root_id;
    root->mode = S_IFDIR | 0755;
    root->nlink = 2;
    root->uid = getuid();
    root->gid = getgid();
    clock_gettime(CLOCK_REALTIME, &root->ctime);
    root->atime = root->mtime = root->ctime;
}

uint64_t record_id_hash(const struct ino_id *id)
{
    return endian_get_be64(id->b);
}

void record_id_make(struct ino_id *id, uint64_t hash, uint64_t unique)
{
    endian_put_be64(id->b, hash);
    endian_put_be64(id->b + 8, unique);
}

int record_id_is_root(const struct ino_id *id)
{
    return memcmp(id, &record_root_id, sizeof(*id)) == 0;
}

uint64_t record_id_ino(const struct ino_id *id)
{
    uint64_t h;

    if (record_id_is_root(id))
        return 1;
    h = XXH3_64bits(id->b, RECORD_ID_LEN);
    return h <= 1 ? h + 2 : h;
}

static size_t id_key(uint8_t out[RECORD_ID_KEY_LEN], enum record_type t, const struct ino_id *id)
{
    out[0] = (uint8_t)t;
    memcpy(out + 1, id->b, RECORD_ID_LEN);
    return 1 + RECORD_ID_LEN;
}

size_t record_id_prefix(uint8_t out[RECORD_ID_KEY_LEN], enum record_type type,
                        const struct ino_id *id)
{
    return id_key(out, type, id);
}

/* id_key plus a name: 0 for a name too long for RECORD_KEY_MAX. */
static size_t named_key(uint8_t out[RECORD_KEY_MAX], enum record_type t, const struct ino_id *id,
                        const char *name, size_t nlen)
{
    size_t n;

    if (nlen > RECORD_NAME_MAX)
        return 0;
    n = id_key(out, t, id);
    memcpy(out + n, name, nlen);
    return n + nlen;
}

size_t record_entry_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *dir, const char *name,
                        size_t nlen)
{
    return named_key(out, REC_ENTRY, dir, name, nlen);
}

size_t record_inode_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id)
{
    return id_key(out, REC_INODE, id);
}

size_t record_chunk_key(uint8_t out[RECORD_CHUNK_KEY_LEN], const struct ino_id *id, uint64_t index)
{
    size_t n = id_key(out, REC_CHUNK, id);
    endian_put_be64(out + n, index);
    return n + 8;
}

size_t record_xattr_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *id, const char *name,
                        size_t nlen)
{
    return named_key(out, REC_XATTR, id, name, nlen);
}

size_t record_orphan_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id)
{
    return id_key(out, REC_ORPHAN, id);
}

size_t record_intent_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id)
{
    return id_key(out, REC_INTENT, id);
}

size_t record_open_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *id, const char *node,
                       size_t nlen)
{
    return nlen ? named_key(out, REC_OPEN, id, node, nlen) : 0;
}

size_t record_prefix_end(uint8_t *out, const uint8_t *prefix, size_t plen)
{
    memcpy(out, prefix, plen);
    while (plen > 0) {
        if (out[plen - 1] != 0xff) {
            out[plen - 1]++;
            return plen;
        }
        plen--;
    }
    return 0;
}

int record_placement(const uint8_t *key, size_t klen, uint64_t *hash)
{
    if (klen < 1 + RECORD_ID_LEN)
        return -EINVAL;
    switch (key[0]) {
    case REC_ENTRY:
        if (klen == 1 + RECORD_ID_LEN || klen > RECORD_KEY_MAX)
            return -EINVAL;
        *hash = placement_entry_hash(key + 1, (const char *)key + 1 + RECORD_ID_LEN,
                                     klen - 1 - RECORD_ID_LEN);
        return 0;
    case REC_INODE:
    case REC_CHUNK:
    case REC_XATTR:
    case REC_ORPHAN:
    case REC_INTENT:
    case REC_OPEN:
        *hash = endian_get_be64(key + 1);
        return 0;
    default:
        return -EINVAL;
    }
}

void record_entry_encode(uint8_t out[RECORD_ENTRY_LEN], const struct ino_id *id, uint8_t dtype)
{
    memcpy(out, id->b, RECORD_ID_LEN);
    out[RECORD_ID_LEN] = dtype;
}

int record_entry_decode(const uint8_t *val, size_t vlen, struct ino_id *id, uint8_t *dtype)
{
    if (vlen != RECORD_ENTRY_LEN)
        return -EIO;
    memcpy(id->b, val, RECORD_ID_LEN);
    *dtype = val[RECORD_ID_LEN];
    return 0;
}

size_t record_inode_encode(uint8_t out[RECORD_INODE_MAX], const struct inode *ino)
{
    uint32_t tail = ino->tail_len > RECORD_TAIL_MAX ? RECORD_TAIL_MAX : ino->tail_len;

    memset(out, 0, HDR_FIXED);
    out[0] = 1;
    endian_put_le(out + 4, ino->flags, 4);
    endian_put_le(out + 8, ino->mode, 4);
    endian_put_le(out + 12, ino->uid, 4);
    endian_put_le(out + 16, ino->gid, 4);
    endian_put_le(out + 20, ino->nlink, 4);
    endian_put_le(out + 24, ino->rdev, 4);
    endian_put_le(out + 28, tail, 4);
    endian_put_le(out + 32, ino->size, 8);
    endian_put_le(out + 40, (uint64_t)ino->atime.tv_sec, 8);
    endian_put_le(out + 48, (uint64_t)ino->mtime.tv_sec, 8);
    endian_put_le(out + 56, (uint64_t)ino->ctime.tv_sec, 8);
    endian_put_le(out + 64, (uint64_t)ino->atime.tv_nsec, 4);
    endian_put_le(out + 68, (uint64_t)ino->mtime.tv_nsec, 4);
    endian_put_le(out + 72, (uint64_t)ino->ctime.tv_nsec, 4);
    memcpy(out + HDR_FIXED, ino->parent.b, RECORD_ID_LEN);
    endian_put_le(out + HDR_FIXED + RECORD_ID_LEN, ino->alloc, 8);
    memcpy(out + RECORD_INODE_HDR, ino->tail, tail);
    return RECORD_INODE_HDR + tail;
}

int record_inode_decode(const uint8_t *val, size_t vlen, const struct ino_id *id,
                        struct inode *ino)
{
    uint32_t tail;

    if (vlen < RECORD_INODE_HDR || val[0] != 1)
        return -EIO;
    tail = (uint32_t)endian_get_le(val + 28, 4);
    if (tail > RECORD_TAIL_MAX || vlen != RECORD_INODE_HDR + tail)
        return -EIO;
    ino->id = *id;
    ino->flags = (uint32_t)endian_get_le(val + 4, 4);
    ino->mode = (uint32_t)endian_get_le(val + 8, 4);
    ino->uid = (uint32_t)endian_get_le(val + 12, 4);
    ino->gid = (uint32_t)endian_get_le(val + 16, 4);
    ino->nlink = (uint32_t)endian_get_le(val + 20, 4);
    ino->rdev = (uint32_t)endian_get_le(val + 24, 4);
    ino->size = endian_get_le(val + 32, 8);
    ino->atime.tv_sec = (time_t)endian_get_le(val + 40, 8);
    ino->mtime.tv_sec = (time_t)endian_get_le(val + 48, 8);
    ino->ctime.tv_sec = (time_t)endian_get_le(val + 56, 8);
    ino->atime.tv_nsec = (long)endian_get_le(val + 64, 4);
    ino->mtime.tv_nsec = (long)endian_get_le(val + 68, 4);
    ino->ctime.tv_nsec = (long)endian_get_le(val + 72, 4);
    memcpy(ino->parent.b, val + HDR_FIXED, RECORD_ID_LEN);
    ino->alloc = endian_get_le(val + HDR_FIXED + RECORD_ID_LEN, 8);
    ino->tail_len = tail;
    memcpy(ino->tail, val + RECORD_INODE_HDR, tail);
    return 0;
}

const char *record_type_name(uint32_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG:
        return "file";
    case S_IFDIR:
        return "dir";
    case S_IFLNK:
        return "symlink";
    case S_IFIFO:
        return "fifo";
    case S_IFSOCK:
        return "socket";
    case S_IFCHR:
        return "chardev";
    case S_IFBLK:
        return "blockdev";
    default:
        return "unknown";
    }
}
