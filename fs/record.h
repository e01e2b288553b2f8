/* record.h -- the records of the filesystem and their key encoding.
 *
 * Every record is one key/value pair in one shard. The first key byte is the
 * record type; integers in keys are big-endian so that LMDB's byte order is
 * numeric order. Inode ids are 16 bytes: the first 8 are the placement hash of
 * the entry that created the inode (so a new file's entry, inode and data land
 * in one shard), the last 8 make it unique.
 *
 *   'E' dir_id[16] name        -> entry: ino[16] dtype:u8      placed by hash(dir_id, name)
 *   'I' ino[16]                -> inode record (below)         placed by ino[0..8]
 *   'C' ino[16] index:u64be    -> file data chunk              placed by ino[0..8]
 *   'X' ino[16] name           -> xattr value                  placed by ino[0..8]
 *   'O' ino[16]                -> "unlinked while open" mark   placed by ino[0..8]
 *   'R' ino[16] node           -> open registration: tag:u64le placed by ino[0..8]
 *   'T' id[16]                 -> intent of a multi-shard op   placed by id[0..8]
 *   'M' name                   -> shard-local metadata (not placed; never moves)
 *   'L' lsn:u64be              -> change stream entry (shard_lmdb.h; hidden from scans)
 *
 * Inode record: a fixed little-endian header (RECORD_INODE_HDR bytes) followed
 * by a tail: the inline data of a small regular file (size <= RECORD_INLINE_MAX)
 * or a symlink's target. Larger files keep data in chunks of RECORD_CHUNK bytes;
 * a missing chunk is a hole.
 *
 * Intent record (written and read by namespace.c's cross-shard rename, read
 * by fsck.c): kind:u8 sdir[16] ddir[16] sid[16] did[16] stype:u8 dtype:u8
 * slen:u8 sname dlen:u8 dname -- at most RECORD_INTENT_MAX bytes.
 *
 * Sizes: every buffer an encoder here writes into is declared with the
 * encoder's maximum (RECORD_KEY_MAX, RECORD_ID_KEY_LEN, ..., RECORD_INODE_MAX), so
 * the compiler flags a caller's smaller buffer; record.c ties each maximum
 * to the batch limits with _Static_assert.
 *
 * Pure functions, thread-safe; callers own every buffer.
 */
#ifndef SHARDFS_RECORD_H
#define SHARDFS_RECORD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define RECORD_ID_LEN 16
#define RECORD_NAME_MAX 255
#define RECORD_KEY_MAX (1 + RECORD_ID_LEN + RECORD_NAME_MAX)
#define RECORD_ID_KEY_LEN (1 + RECORD_ID_LEN) /* 'I', 'O', 'T' keys, id prefixes */
#define RECORD_CHUNK_KEY_LEN (RECORD_ID_KEY_LEN + 8)
#define RECORD_CHUNK (64u * 1024u)
#define RECORD_INLINE_MAX 2048u
#define RECORD_TAIL_MAX 4096u          /* symlink target limit (PATH_MAX) */
#define RECORD_INODE_HDR 100u
#define RECORD_INODE_MAX (RECORD_INODE_HDR + RECORD_TAIL_MAX)
#define RECORD_ENTRY_LEN (RECORD_ID_LEN + 1)
/* An intent value with both names at their longest; slen and dlen are one
 * byte each, so no name can be longer (RECORD_NAME_MAX <= 255). */
#define RECORD_INTENT_MAX (1 + 4 * RECORD_ID_LEN + 2 + 2 * (1 + RECORD_NAME_MAX))

enum record_type {
    REC_ENTRY = 'E',
    REC_INODE = 'I',
    REC_CHUNK = 'C',
    REC_XATTR = 'X',
    REC_ORPHAN = 'O',
    REC_INTENT = 'T',
    REC_OPEN = 'R',     /* a node has the inode open (namespace.c, "open registry") */
    REC_META = 'M',
    REC_STREAM = 'L',   /* a shard's change stream entry (backend/shard_lmdb.c) */
};

/* Inode flags (persistent). */
#define INODE_DYING 0x1u    /* rmdir/rename-over in progress: no new entries */
#define INODE_NO_XATTR 0x2u /* made without xattrs and none set since (a
                             * getxattr need not look); records written
                             * before this flag existed never promise it */

struct ino_id {
    uint8_t b[RECORD_ID_LEN];
};

struct inode {
    struct ino_id id;
    uint32_t mode, uid, gid, nlink, rdev, flags;
    uint64_t size;
    uint64_t alloc;                 /* bytes of data stored: inline + chunks */
    struct timespec atime, mtime, ctime;
    struct ino_id parent;           /* directories: the directory holding it */
    uint32_t tail_len;
    uint8_t tail[RECORD_TAIL_MAX];  /* inline data or symlink target */
};

/* The root directory's id: all zero but the last byte, 1. Shard 0. */
extern const struct ino_id record_root_id;

/* A fresh root directory inode (mode 0755, nlink 2) owned by the calling
 * process's uid and gid, with all times now. */
void record_root_init(struct inode *root);

uint64_t record_id_hash(const struct ino_id *id);       /* first 8 bytes, BE */
void record_id_make(struct ino_id *id, uint64_t hash, uint64_t unique);
int record_id_is_root(const struct ino_id *id);
/* The kind of file of mode in one word: file, dir, symlink, fifo, socket,
 * chardev, blockdev (unknown for anything else). Static strings. */
const char *record_type_name(uint32_t mode);

/* The st_ino the kernel and users see: 1 for root, else a mix of the id. */
uint64_t record_id_ino(const struct ino_id *id);

/* Keys. Each returns the key's length. An entry or xattr name over
 * RECORD_NAME_MAX bytes gives length 0 and writes nothing: an empty key,
 * which every shard operation refuses (-EINVAL), never a longer one. */
size_t record_entry_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *dir, const char *name,
                        size_t nlen);
size_t record_inode_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id);
size_t record_chunk_key(uint8_t out[RECORD_CHUNK_KEY_LEN], const struct ino_id *id, uint64_t index);
size_t record_xattr_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *id, const char *name,
                        size_t nlen);
size_t record_orphan_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id);
size_t record_intent_key(uint8_t out[RECORD_ID_KEY_LEN], const struct ino_id *id);
/* The open registration of id by node name (1..RECORD_NAME_MAX bytes; 0 and
 * nothing written otherwise). Its value is RECORD_OPEN_VAL_LEN bytes: the
 * registering process's run tag, u64le. */
#define RECORD_OPEN_VAL_LEN 8
size_t record_open_key(uint8_t out[RECORD_KEY_MAX], const struct ino_id *id, const char *node,
                       size_t nlen);
/* The prefix 'type' + id: every chunk (or xattr) of id starts with it. */
size_t record_id_prefix(uint8_t out[RECORD_ID_KEY_LEN], enum record_type type,
                        const struct ino_id *id);
/* The smallest key greater than every key starting with prefix. Returns its
 * length, or 0 if there is none (prefix all 0xff). */
size_t record_prefix_end(uint8_t *out, const uint8_t *prefix, size_t plen);

/* Placement hash of any placed record from its key alone. Returns 0 and sets
 * *hash, or -EINVAL for a malformed key or an unplaced ('M') record. */
int record_placement(const uint8_t *key, size_t klen, uint64_t *hash);

/* Entry value: ino + dtype (DT_REG...). */
void record_entry_encode(uint8_t out[RECORD_ENTRY_LEN], const struct ino_id *id, uint8_t dtype);
int record_entry_decode(const uint8_t *val, size_t vlen, struct ino_id *id, uint8_t *dtype);

/* Inode value. encode returns the length written (<= RECORD_INODE_MAX);
 * decode returns 0 or -EIO on a malformed record. */
size_t record_inode_encode(uint8_t out[RECORD_INODE_MAX], const struct inode *ino);
int record_inode_decode(const uint8_t *val, size_t vlen, const struct ino_id *id,
                        struct inode *ino);

#endif
