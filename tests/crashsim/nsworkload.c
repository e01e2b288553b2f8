/* nsworkload.c -- the namespace workload of the crash simulator: files over
 * a whole single-node store (4 shards), checked with fsck.
 *
 *   nsworkload run DIR SEED N    a store with data_dir DIR: 3 directories,
 *                                then N seeded operations on 32 file names
 *                                (operation 1 makes the directories and
 *                                syncs; 2..N+1 follow)
 *   nsworkload recover DIR       boot the state, open the store as a mount
 *                                does (recovery, repair) and close it
 *   nsworkload check SEED        lines "DIR K MAX" on stdin; answers "ok K"
 *                                or "bad REASON" per line
 *
 * Operations: create and write a file (0 B to 70 KiB, inline or chunked),
 * overwrite it (write + truncate), append, truncate, rename over another
 * name (also across directories, so across shards: the intent protocol),
 * unlink, and sync (ns_sync of every shard, what fsyncdir does). Marks in
 * the trace: "A n" when operation n returned, "S n" when the sync that is
 * operation n returned.
 *
 * check boots the state (the RUNNING mark names an earlier boot), opens the
 * store as a mount does (recovery, and the check and repair that follows a
 * machine crash, fsck_after_unclean_stop()), closes it, opens it without
 * recovery; every file name
 * no operation after K touched (up to MAX + 1, the one that may have been
 * in flight) must be as it was after operation K: present with the same
 * bytes, or absent; and fsck must find nothing. The driver passes K = the last acknowledged sync for a
 * power cut, or the last operation that returned for a state where
 * everything that reached the kernel reached the disk (a kill -9).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "crashsim.h"
#include "fsck.h"
#include "namespace.h"
#include "record.h"

#define NDIRS 4             /* the root and d1..d3 */
#define NFILES 8            /* names per directory */
#define NSLOTS (NDIRS * NFILES)
#define FILE_MAX (70u << 10)

/* The model: what each name holds. */
struct slot {
    int present;
    size_t len;
    uint8_t *data;          /* FILE_MAX bytes */
};

struct model {
    struct slot s[NSLOTS];
};

enum op_kind { OP_WRITE, OP_APPEND, OP_TRUNCATE, OP_RENAME, OP_UNLINK, OP_SYNC };

struct op {
    enum op_kind kind;
    int slot, to;
    size_t len;             /* new length (write, truncate) or bytes appended */
    uint64_t fill;          /* seed of the bytes written */
};

static void fill_bytes(uint64_t fill, uint8_t *out, size_t len)
{
    uint64_t x = fill;
    for (size_t o = 0; o < len; o += 8) {
        x = crashsim_mix64(x);
        size_t n = len - o < 8 ? len - o : 8;
        memcpy(out + o, &x, n);
    }
}

static size_t pick_len(uint64_t x)
{
    switch (x % 4) {
    case 0:
        return x / 4 % 100;
    case 1:
        return 1000 + x / 4 % 1500; /* inline: at most 2048 */
    default:
        return 3000 + x / 4 % (FILE_MAX - 3000);
    }
}

/* Operation n, given the model as the operations before it left it. */
static struct op op_next(uint64_t seed, uint64_t n, const struct model *m)
{
    uint64_t x = crashsim_mix64(seed ^ crashsim_mix64(n + 1));
    struct op op = {.slot = (int)(x % NSLOTS), .fill = crashsim_mix64(x)};
    const struct slot *s = &m->s[op.slot];
    unsigned r = (unsigned)(x >> 8) % 100;

    x = crashsim_mix64(x);
    if (r >= 92) {
        op.kind = OP_SYNC;
    } else if (!s->present || r < 30) {
        op.kind = OP_WRITE;
        op.len = pick_len(x);
    } else if (r < 50) {
        op.kind = OP_APPEND;
        op.len = 1 + x % 5000;
        if (s->len + op.len > FILE_MAX)
            op.len = FILE_MAX - s->len;
    } else if (r < 60) {
        op.kind = OP_TRUNCATE;
        op.len = x % (s->len + 3000);
        if (op.len > FILE_MAX)
            op.len = FILE_MAX;
    } else if (r < 82) {
        op.kind = OP_RENAME;
        op.to = (int)((op.slot + 1 + x % (NSLOTS - 1)) % NSLOTS);
    } else {
        op.kind = OP_UNLINK;
    }
    return op;
}

static void model_apply(struct model *m, const struct op *op)
{
    struct slot *s = &m->s[op->slot];

    switch (op->kind) {
    case OP_WRITE:
        fill_bytes(op->fill, s->data, op->len);
        s->len = op->len;
        s->present = 1;
        break;
    case OP_APPEND:
        fill_bytes(op->fill, s->data + s->len, op->len);
        s->len += op->len;
        break;
    case OP_TRUNCATE:
        if (op->len > s->len)
            memset(s->data + s->len, 0, op->len - s->len);
        s->len = op->len;
        break;
    case OP_RENAME: {
        struct slot *t = &m->s[op->to];
        uint8_t *d = t->data;
        *t = *s;
        s->data = d;
        s->present = 0;
        s->len = 0;
        break;
    }
    case OP_UNLINK:
        s->present = 0;
        s->len = 0;
        break;
    case OP_SYNC:
        break;
    }
}

static int model_init(struct model *m)
{
    memset(m, 0, sizeof(*m));
    for (int i = 0; i < NSLOTS; i++)
        if (!(m->s[i].data = malloc(FILE_MAX)))
            return -ENOMEM;
    return 0;
}

/* ---- the store ---- */

static struct config cfg; /* big: not on the stack */
static struct ino_id dirs[NDIRS];

static int store_open(const char *dir, unsigned flags, struct ns **ns)
{
    char conf[4200], err[600];
    FILE *f;

    snprintf(conf, sizeof(conf), "%s.conf", dir);
    f = fopen(conf, "w");
    if (!f)
        return -errno;
    /* Timed commits at 50 ms: they happen while the workload runs. */
    fprintf(f, "[cluster]\nshards = 4\ncommit_interval_ms = 50\n[node local]\ndata_dir = %s\n"
               "shards = all\n", dir);
    fclose(f);
    if (config_load(conf, &cfg, err, sizeof(err)) != 0 ||
        ns_open(&cfg, 0, flags, NULL, ns, err, sizeof(err)) != 0) {
        fprintf(stderr, "nsworkload: %s: %s\n", dir, err);
        return -EIO;
    }
    return 0;
}

static void slot_name(int slot, char name[8])
{
    snprintf(name, 8, "f%d", slot % NFILES);
}

static const struct ino_id *slot_dir(int slot)
{
    return &dirs[slot / NFILES];
}

/* Find the directories d1..d3 (dirs[]), making them first when make is set
 * (then synced: operation 1). */
static int dirs_open(struct ns *ns, int make)
{
    struct inode ino;
    int rc;

    dirs[0] = record_root_id;
    for (int i = 1; i < NDIRS; i++) {
        char name[8];
        snprintf(name, sizeof(name), "d%d", i);
        rc = make ? ns_mknode(ns, &record_root_id, name, strlen(name), S_IFDIR | 0755, 0, 0, 0,
                              NULL, &ino)
                  : -EEXIST;
        if (rc == -EEXIST)
            rc = ns_lookup(ns, &record_root_id, name, strlen(name), &ino);
        if (rc)
            return rc;
        dirs[i] = ino.id;
    }
    return make ? ns_sync(ns, NULL) : 0;
}

static int set_size(struct ns *ns, const struct ino_id *id, uint64_t size)
{
    struct ns_setattr sa = {.mask = NS_SET_SIZE, .size = size};
    struct inode out;
    return ns_setattr(ns, id, &sa, &out);
}

static int do_op(struct ns *ns, const struct op *op, const struct model *m, uint8_t *buf)
{
    char name[8], to[8];
    struct inode ino;
    int rc = 0;

    slot_name(op->slot, name);
    if (op->kind == OP_SYNC)
        return ns_sync(ns, NULL);
    if (op->kind == OP_RENAME) {
        slot_name(op->to, to);
        return ns_rename(ns, slot_dir(op->slot), name, strlen(name), slot_dir(op->to), to,
                         strlen(to), 0, NULL, NULL);
    }
    if (op->kind == OP_UNLINK)
        return ns_unlink(ns, slot_dir(op->slot), name, strlen(name), NULL, NULL);
    if (op->kind == OP_WRITE && !m->s[op->slot].present)
        rc = ns_mknode(ns, slot_dir(op->slot), name, strlen(name), S_IFREG | 0644, 0, 0, 0, NULL,
                       &ino);
    else
        rc = ns_lookup(ns, slot_dir(op->slot), name, strlen(name), &ino);
    if (rc)
        return rc;
    switch (op->kind) {
    case OP_WRITE:
        fill_bytes(op->fill, buf, op->len);
        if (op->len && ns_write(ns, &ino.id, 0, buf, op->len, 0, 0, NULL) != (ssize_t)op->len)
            return -EIO;
        return set_size(ns, &ino.id, op->len);
    case OP_APPEND:
        fill_bytes(op->fill, buf, op->len);
        if (op->len && ns_write(ns, &ino.id, 0, buf, op->len, 1, 0, NULL) != (ssize_t)op->len)
            return -EIO;
        return 0;
    case OP_TRUNCATE:
        return set_size(ns, &ino.id, op->len);
    default:
        return -EINVAL;
    }
}

static int cmd_run(const char *dir, uint64_t seed, uint64_t n)
{
    static struct model m;
    uint8_t *buf = malloc(FILE_MAX);
    struct ns *ns;
    int rc;

    if (!buf || model_init(&m) || store_open(dir, 0, &ns))
        return 1;
    rc = dirs_open(ns, 1);
    if (rc) {
        fprintf(stderr, "nsworkload: directories: %s\n", strerror(-rc));
        return 1;
    }
    crashsim_mark("A", 1);
    crashsim_mark("S", 1);
    for (uint64_t i = 2; i <= n + 1; i++) {
        struct op op = op_next(seed, i, &m);
        rc = do_op(ns, &op, &m, buf);
        if (rc) {
            fprintf(stderr, "nsworkload: operation %llu (kind %d): %s\n", (unsigned long long)i,
                    op.kind, strerror(-rc));
            return 1;
        }
        model_apply(&m, &op);
        crashsim_mark(op.kind == OP_SYNC ? "S" : "A", i);
        if (op.kind == OP_SYNC)
            crashsim_mark("A", i);
    }
    ns_close(ns);
    crashsim_mark("S", n + 1);
    free(buf);
    return 0;
}

static int reboot(const char *dir);

/* A mount after the power cut: recovery, and the repair of a machine crash
 * (so a crash during the repair is simulated too). */
static int cmd_recover(const char *dir)
{
    struct ns *ns;
    int rc;

    if (reboot(dir) || store_open(dir, 0, &ns))
        return 1;
    rc = fsck_after_unclean_stop(ns, stderr);
    ns_close(ns);
    return rc ? 1 : 0;
}

/* ---- checking ---- */

static int check_slots(struct ns *ns, const struct model *m, const int *touched, char *why,
                       size_t whylen)
{
    uint8_t *buf = malloc(FILE_MAX + 1);
    int rc = 0;

    if (!buf)
        return -ENOMEM;
    for (int i = 0; i < NSLOTS && rc == 0; i++) {
        char name[8];
        struct inode ino;
        if (touched[i])
            continue;
        slot_name(i, name);
        int lrc = ns_lookup(ns, slot_dir(i), name, strlen(name), &ino);
        if (!m->s[i].present) {
            if (lrc != -ENOENT) {
                snprintf(why, whylen, "d%d/%s: should be absent (lookup %d)", i / NFILES, name,
                         lrc);
                rc = -EIO;
            }
            continue;
        }
        if (lrc) {
            snprintf(why, whylen, "d%d/%s: lost (%s)", i / NFILES, name, strerror(-lrc));
            rc = -EIO;
            continue;
        }
        ssize_t got = ns_read(ns, &ino.id, 0, FILE_MAX + 1, buf);
        if (ino.size != m->s[i].len || got != (ssize_t)m->s[i].len ||
            memcmp(buf, m->s[i].data, m->s[i].len) != 0) {
            snprintf(why, whylen, "d%d/%s: wrong content (size %llu, read %zd, want %zu)",
                     i / NFILES, name, (unsigned long long)ino.size, got, m->s[i].len);
            rc = -EIO;
        }
    }
    free(buf);
    return rc;
}

/* The state is what the disk holds after a power cut: the machine boots
 * again, so the RUNNING mark names another boot than this one. */
static int reboot(const char *dir)
{
    char path[4200];
    FILE *f;

    snprintf(path, sizeof(path), "%s/RUNNING", dir);
    if (access(path, F_OK) != 0)
        return 0;
    f = fopen(path, "w");
    if (!f)
        return -errno;
    fputs("shardfs-running\nboot crashsim-the-boot-before\npid 1\n", f);
    return fclose(f) == 0 ? 0 : -EIO;
}

static int check_state(const char *dir, uint64_t seed, uint64_t k, uint64_t max,
                       uint64_t lsn, uint64_t *j, char *why, size_t whylen)
{
    (void)lsn; /* the shard workload checks the stream */
    static struct model m, snap;
    int touched[NSLOTS] = {0};
    struct ns *ns = NULL;
    char *out = NULL;
    size_t outlen = 0;
    FILE *report;
    int rc = 0;

    *j = k; /* the state holds operations 1..k, at least */
    if (model_init(&m) || model_init(&snap))
        return -ENOMEM;
    for (uint64_t i = 2; i <= max + 1; i++) {
        struct op op = op_next(seed, i, &m);
        if (i > k) {
            touched[op.slot] = 1;
            if (op.kind == OP_RENAME)
                touched[op.to] = 1;
        }
        model_apply(&m, &op);
        if (i == k)
            for (int s = 0; s < NSLOTS; s++) {
                snap.s[s].present = m.s[s].present;
                snap.s[s].len = m.s[s].len;
                memcpy(snap.s[s].data, m.s[s].data, m.s[s].len);
            }
    }
    rc = reboot(dir);
    if (rc == 0)
        rc = store_open(dir, 0, &ns);
    if (rc) {
        snprintf(why, whylen, "the store does not open");
        return -EIO;
    }
    /* What a mount does first: after a machine crash, check and repair. */
    report = open_memstream(&out, &outlen);
    rc = report ? fsck_after_unclean_stop(ns, report) : -ENOMEM;
    if (report)
        fclose(report);
    free(out);
    out = NULL;
    ns_close(ns);
    if (rc) {
        snprintf(why, whylen, "the repair after the machine crash failed: %s", strerror(-rc));
        return -EIO;
    }
    if (store_open(dir, NS_OPEN_NO_RECOVER, &ns)) {
        snprintf(why, whylen, "the store does not reopen");
        return -EIO;
    }
    if (k >= 1 && dirs_open(ns, 0) != 0) {
        snprintf(why, whylen, "a directory made and synced before everything is missing");
        rc = -EIO;
    } else if (k >= 1) {
        rc = check_slots(ns, &snap, touched, why, whylen);
    }
    if (rc == 0) {
        report = open_memstream(&out, &outlen);
        rc = report ? fsck_run(ns, 0, report) : -ENOMEM;
        if (report)
            fclose(report);
        if (rc != 0) {
            char *nl = out ? strchr(out, '\n') : NULL;
            if (nl)
                *nl = 0;
            snprintf(why, whylen, "fsck: %d problems (%s)", rc, out ? out : "");
            rc = -EIO;
        }
    }
    free(out);
    ns_close(ns);
    return rc;
}

int main(int argc, char **argv)
{
    return crashsim_main(argc, argv, "nsworkload", cmd_run, cmd_recover, check_state);
}
