/* control.c -- a mount's control socket (control.h). */
#include "control.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "namespace.h"

#define LINE_MAX_LEN 128
#define READ_TIMEOUT_S 5

struct control {
    struct ns *ns;
    struct node_server *srv;
    struct failover *fo;    /* with etcd: the node's (reshard.h) */
    const struct config *cfg;
    int node;
    int fd;                 /* listening */
    int stop[2];            /* a pipe: written by control_stop */
    volatile int cancel;
    pthread_t th;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    /* The change in progress, on its own thread (job_main), so that the
     * control thread still answers `status` meanwhile. */
    pthread_mutex_t lock;
    int busy;               /* protected by lock: a change runs */
    int op;                 /* protected by lock: what it is (enum reshard_op) */
    unsigned shard;
    struct reshard_stats last; /* protected by lock: its last progress */
    pthread_t job;
    int job_made;           /* control thread only: job to be joined */
};

static int socket_path(const struct config *cfg, int node, char *out, size_t len)
{
    int n = snprintf(out, len, "%s/CONTROL", cfg->nodes[node].data_dir);

    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/* ---- the server ---- */

struct conn {
    int fd;
    int gone;               /* the client went away: stop writing */
};

static void say(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct conn *c, const char *fmt, ...)
{
    char line[1200];
    va_list ap;
    int n;

    if (c->gone)
        return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line))
        n = sizeof(line) - 1;
    if (send(c->fd, line, (size_t)n, MSG_NOSIGNAL) != n)
        c->gone = 1;
}

static void progress_line(void *ctx, const struct reshard_stats *st)
{
    say(ctx, "progress %s %llu %llu %llu %llu %.3f\n", st->phase, (unsigned long long)st->records,
        (unsigned long long)st->bytes, (unsigned long long)st->estimate,
        (unsigned long long)st->purged, st->seconds);
}

/* Read one line (without its newline) into line; 0 or -1. */
static int read_line(int fd, char *line, size_t len)
{
    size_t got = 0;

    while (got < len - 1) {
        ssize_t n = read(fd, line + got, 1);
        if (n <= 0)
            return -1;
        if (line[got] == '\n') {
            line[got] = 0;
            return 0;
        }
        got++;
    }
    return -1;
}

/* 1 if the peer is root or this process's user. */
static int peer_allowed(int fd)
{
    struct ucred cr;
    socklen_t l = sizeof(cr);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) != 0)
        return 0;
    return cr.uid == 0 || cr.uid == geteuid();
}

struct job {
    struct control *ctl;
    struct conn c;          /* the client that asked for the change */
};

static void job_progress(void *ctx, const struct reshard_stats *st)
{
    struct job *j = ctx;

    pthread_mutex_lock(&j->ctl->lock);
    j->ctl->last = *st; /* phase names are static strings */
    pthread_mutex_unlock(&j->ctl->lock);
    progress_line(&j->c, st);
}

/* The change asked for, with its progress and end told to its client. */
static void *job_main(void *arg)
{
    struct job *j = arg;
    struct control *ctl = j->ctl;
    struct reshard_opts o = {.progress = job_progress, .ctx = j};
    char err[1024] = "";
    int rc;

    rc = reshard_online(ctl->ns, ctl->srv, ctl->fo, ctl->cfg, ctl->node, ctl->op, ctl->shard,
                        &ctl->cancel, &o, err, sizeof(err));
    /* Over before its client hears so: it may ask for the next at once. */
    pthread_mutex_lock(&ctl->lock);
    ctl->busy = 0;
    pthread_mutex_unlock(&ctl->lock);
    if (rc)
        say(&j->c, "error %d %s\n", -rc, err[0] ? err : strerror(-rc));
    else
        say(&j->c, "done %u %u %u %llu %llu %llu %.3f %.3f %llu\n", o.shard_a, o.shard_b,
            o.depth, (unsigned long long)o.done.records, (unsigned long long)o.done.bytes,
            (unsigned long long)o.done.purged, o.done.seconds, o.pause_ms,
            (unsigned long long)o.mirrored);
    close(j->c.fd);
    free(j);
    return NULL;
}

/* Start the change on its thread, which then owns fd. 0, or -errno (a
 * change already runs: -EBUSY) with fd still the caller's. */
static int job_start(struct control *ctl, int fd, int op, unsigned shard)
{
    struct job *j;
    sigset_t all, old;
    int rc;

    pthread_mutex_lock(&ctl->lock);
    rc = ctl->busy ? -EBUSY : 0;
    if (rc == 0) {
        ctl->busy = 1;
        ctl->op = op;
        ctl->shard = shard;
        ctl->last = (struct reshard_stats){.phase = "starting"};
    }
    pthread_mutex_unlock(&ctl->lock);
    if (rc)
        return rc;
    if (ctl->job_made) /* the last one is over (busy was 0): reap it */
        pthread_join(ctl->job, NULL);
    ctl->job_made = 0;
    j = calloc(1, sizeof(*j));
    if (j) {
        j->ctl = ctl;
        j->c.fd = fd;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old); /* signals belong to the main thread */
        rc = -pthread_create(&ctl->job, NULL, job_main, j);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (!j || rc) {
        free(j);
        pthread_mutex_lock(&ctl->lock);
        ctl->busy = 0;
        pthread_mutex_unlock(&ctl->lock);
        return j ? rc : -ENOMEM;
    }
    pthread_setname_np(ctl->job, "shardfs-reshard");
    ctl->job_made = 1;
    return 0;
}

static void say_status(struct control *ctl, struct conn *c)
{
    struct reshard_stats st;
    static const char *const names[] = {"split", "merge", "resume"};
    int busy, op;
    unsigned shard;

    pthread_mutex_lock(&ctl->lock);
    busy = ctl->busy;
    op = ctl->op;
    shard = ctl->shard;
    st = ctl->last;
    pthread_mutex_unlock(&ctl->lock);
    if (!busy) {
        say(c, "idle\n");
        return;
    }
    say(c, "change %s %u %s %llu %llu %llu %llu %.3f\n", names[op], shard,
        st.phase, (unsigned long long)st.records, (unsigned long long)st.bytes,
        (unsigned long long)st.estimate, (unsigned long long)st.purged, st.seconds);
}

/* Answer one connection; 1 when a change's thread took it over. */
static int serve_one(struct control *ctl, int fd)
{
    struct timeval tv = {.tv_sec = READ_TIMEOUT_S};
    struct conn c = {.fd = fd};
    char line[LINE_MAX_LEN], what[16];
    unsigned s;
    int rc;

    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    /* A client that stops reading (suspended, say) must not stall the
     * change that reports to it: a send that times out drops it (say). */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (!peer_allowed(fd)) {
        say(&c, "error %d only root or the daemon's user may ask\n", EPERM);
        return 0;
    }
    if (read_line(fd, line, sizeof(line)) != 0) {
        say(&c, "error %d expected a command line\n", EINVAL);
        return 0;
    }
    if (strcmp(line, "status") == 0) {
        say_status(ctl, &c);
        return 0;
    }
    if (strcmp(line, "resume") == 0) {
        strcpy(what, "resume");
        s = 0;
    } else if (sscanf(line, "%15s %u", what, &s) != 2 ||
               (strcmp(what, "split") && strcmp(what, "merge"))) {
        say(&c, "error %d expected \"split S\", \"merge S\", \"resume\" or \"status\"\n",
            EINVAL);
        return 0;
    }
    rc = job_start(ctl, fd,
                   !strcmp(what, "merge")    ? RESHARD_MERGE
                   : !strcmp(what, "resume") ? RESHARD_RESUME
                                             : RESHARD_SPLIT,
                   s);
    if (rc == -EBUSY)
        say(&c, "error %d another change of the layout is in progress (shardfs status)\n", EBUSY);
    else if (rc)
        say(&c, "error %d %s\n", -rc, strerror(-rc));
    return rc == 0;
}

static void *control_main(void *arg)
{
    struct control *ctl = arg;
    struct pollfd p[2] = {{.fd = ctl->fd, .events = POLLIN}, {.fd = ctl->stop[0], .events = POLLIN}};

    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents)
            break;
        if (p[0].revents & POLLIN) {
            int fd = accept4(ctl->fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0 && !serve_one(ctl, fd))
                close(fd);
        }
    }
    return NULL;
}

int control_start(struct ns *ns, struct node_server *srv, struct failover *fo,
                  const struct config *cfg, int node, struct control **out)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    struct control *ctl;
    sigset_t all, old;
    mode_t mask;
    int rc;

    *out = NULL;
    if (socket_path(cfg, node, a.sun_path, sizeof(a.sun_path)))
        return 0; /* too long a path: no online commands */
    ctl = calloc(1, sizeof(*ctl));
    if (!ctl)
        return -ENOMEM;
    ctl->ns = ns;
    ctl->srv = srv;
    ctl->fo = fo;
    ctl->cfg = cfg;
    ctl->node = node;
    ctl->stop[0] = ctl->stop[1] = -1;
    pthread_mutex_init(&ctl->lock, NULL);
    memcpy(ctl->path, a.sun_path, sizeof(ctl->path));
    ctl->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ctl->fd < 0 || pipe2(ctl->stop, O_CLOEXEC) != 0)
        goto fail;
    unlink(a.sun_path); /* a socket a killed daemon left; the store's lock is ours */
    mask = umask(077);
    rc = bind(ctl->fd, (struct sockaddr *)&a, sizeof(a));
    umask(mask);
    if (rc != 0 || listen(ctl->fd, 4) != 0)
        goto fail;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals belong to the main thread */
    rc = pthread_create(&ctl->th, NULL, control_main, ctl);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        errno = rc;
        goto fail;
    }
    pthread_setname_np(ctl->th, "shardfs-control");
    *out = ctl;
    return 0;
fail:
    rc = -errno;
    if (ctl->fd >= 0) {
        close(ctl->fd);
        unlink(ctl->path);
    }
    if (ctl->stop[0] >= 0) {
        close(ctl->stop[0]);
        close(ctl->stop[1]);
    }
    pthread_mutex_destroy(&ctl->lock);
    free(ctl);
    return rc ? rc : -EIO;
}

void control_stop(struct control *ctl)
{
    if (!ctl)
        return;
    ctl->cancel = 1;
    if (write(ctl->stop[1], "x", 1) < 0) {
        /* a pipe with room: cannot fail */
    }
    pthread_join(ctl->th, NULL);
    if (ctl->job_made) /* cancelled: a copy is undone, a purge finishes */
        pthread_join(ctl->job, NULL);
    pthread_mutex_destroy(&ctl->lock);
    close(ctl->fd);
    unlink(ctl->path);
    close(ctl->stop[0]);
    close(ctl->stop[1]);
    free(ctl);
}

/* ---- the client ---- */

static int parse_reply(const char *line, struct reshard_opts *o, char *err, size_t errlen)
{
    static char phase[16];
    struct reshard_stats st = {0};
    unsigned long long rec, bytes, est, purged, mirrored;
    int e, off = 0;

    if (sscanf(line, "progress %15s %llu %llu %llu %llu %lf", phase, &rec, &bytes, &est, &purged,
               &st.seconds) == 6) {
        st.phase = phase;
        st.records = rec;
        st.bytes = bytes;
        st.estimate = est;
        st.purged = purged;
        if (o->progress)
            o->progress(o->ctx, &st);
        return 1;
    }
    if (sscanf(line, "done %u %u %u %llu %llu %llu %lf %lf %llu", &o->shard_a, &o->shard_b,
               &o->depth, &rec, &bytes, &purged, &o->done.seconds, &o->pause_ms, &mirrored) == 9) {
        o->mirrored = mirrored;
        o->done.phase = "done";
        o->done.records = rec;
        o->done.bytes = bytes;
        o->done.purged = purged;
        return 0;
    }
    if (sscanf(line, "error %d %n", &e, &off) == 1 && e > 0) {
        snprintf(err, errlen, "%s", line + off);
        return -e;
    }
    snprintf(err, errlen, "the daemon said: %.200s", line);
    return -EPROTO;
}

/* Connect to the daemon of node's store and send line; a stream for the
 * reply, or NULL with *rc. */
static FILE *ask(const struct config *cfg, int node, const char *line, int *rc)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    FILE *f;
    int fd;

    *rc = -ENOENT;
    if (socket_path(cfg, node, a.sun_path, sizeof(a.sun_path)))
        return NULL;
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        send(fd, line, strlen(line), MSG_NOSIGNAL) != (ssize_t)strlen(line) ||
        send(fd, "\n", 1, MSG_NOSIGNAL) != 1) {
        *rc = -errno;
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    f = fdopen(fd, "r");
    if (!f) {
        *rc = -ENOMEM;
        close(fd);
    }
    return f;
}

int control_status(const struct config *cfg, int node, struct control_change *out, char *err,
                   size_t errlen)
{
    unsigned long long rec, bytes, est, purged;
    char buf[1200], op[8];
    int rc, e, off = 0;
    FILE *f = ask(cfg, node, "status", &rc);

    memset(out, 0, sizeof(*out));
    if (!f) {
        snprintf(err, errlen, "no daemon answers on its control socket: %s", strerror(-rc));
        return rc;
    }
    rc = -EPROTO;
    snprintf(err, errlen, "the daemon closed the connection before it answered");
    if (fgets(buf, sizeof(buf), f)) {
        buf[strcspn(buf, "\n")] = 0;
        if (strcmp(buf, "idle") == 0) {
            rc = 0;
        } else if (sscanf(buf, "change %7s %u %15s %llu %llu %llu %llu %lf", op, &out->shard,
                          out->phase, &rec, &bytes, &est, &purged, &out->st.seconds) == 8) {
            out->running = 1;
            out->merge = strcmp(op, "merge") == 0;
            out->st = (struct reshard_stats){.phase = out->phase, .records = rec, .bytes = bytes,
                                             .estimate = est, .purged = purged,
                                             .seconds = out->st.seconds};
            rc = 0;
        } else if (sscanf(buf, "error %d %n", &e, &off) == 1 && e > 0) {
            snprintf(err, errlen, "%s", buf + off);
            rc = -e;
        } else {
            snprintf(err, errlen, "the daemon said: %.200s", buf);
        }
    }
    fclose(f);
    return rc;
}

int control_request(const struct config *cfg, int node, const char *line, struct reshard_opts *o,
                    char *err, size_t errlen)
{
    char buf[1200];
    int rc;
    FILE *f = ask(cfg, node, line, &rc);

    if (!f)
        return rc;
    rc = -EPROTO;
    snprintf(err, errlen, "the daemon closed the connection before it answered");
    while (fgets(buf, sizeof(buf), f)) {
        buf[strcspn(buf, "\n")] = 0;
        rc = parse_reply(buf, o, err, errlen);
        if (rc <= 0)
            break;
        rc = -EPROTO;
    }
    fclose(f);
    return rc;
}
