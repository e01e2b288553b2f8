/* etcd_server.h -- a real etcd for the unit tests (test-only).
 *
 *   ETCD_BIN                 /usr/bin/etcd unless defined before
 *   free_port()              a loopback port free right now
 *   start_etcd(dir, client, peer, extra)
 *                            fork /usr/bin/etcd on 127.0.0.1:client (peer
 *                            port peer), data in dir/data, log in
 *                            dir/etcd.log; extra: more arguments (NULL
 *                            ended, may be NULL). The child gets SIGTERM when
 *                            the test dies. Returns its pid; stop it by pid.
 *   etcd_wait_up(e, err, errlen)
 *                            1 once a put through e succeeds (deadline 30 s:
 *                            the machine may be loaded), else 0
 *   etcd_compact(port, rev)  compact the history of the etcd on 127.0.0.1:port
 *                            up to rev (the client has no call for it:
 *                            shardfs never compacts; etcd's own
 *                            auto-compaction does). 0 or -EIO
 *
 * A test that needs it exits 77 (skipped) when ETCD_BIN is missing.
 */
#ifndef SHARDFS_TESTS_UNIT_ETCD_SERVER_H
#define SHARDFS_TESTS_UNIT_ETCD_SERVER_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>

#include "etcd.h"
#include "test_util.h"

#ifndef ETCD_BIN
#define ETCD_BIN "/usr/bin/etcd"
#endif

/* A loopback port free right now (bound to port 0, read back, closed). */
static inline int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        perror("free_port");
        exit(2);
    }
    close(fd);
    return ntohs(a.sin_port);
}

static inline pid_t start_etcd(const char *dir, int client, int peer, const char *const *extra)
{
    char data[4200], log[4200], curl[64], purl[64], cluster[96];
    const char *argv[64];
    int n = 0;

    snprintf(data, sizeof(data), "%s/data", dir);
    snprintf(log, sizeof(log), "%s/etcd.log", dir);
    snprintf(curl, sizeof(curl), "http://127.0.0.1:%d", client);
    snprintf(purl, sizeof(purl), "http://127.0.0.1:%d", peer);
    snprintf(cluster, sizeof(cluster), "t=%s", purl);
    const char *base[] = {ETCD_BIN, "--name", "t", "--data-dir", data, "--listen-client-urls", curl,
                          "--advertise-client-urls", curl, "--listen-peer-urls", purl,
                          "--initial-advertise-peer-urls", purl, "--initial-cluster", cluster};
    for (size_t i = 0; i < sizeof(base) / sizeof(base[0]); i++)
        argv[n++] = base[i];
    for (; extra && *extra && n < 63; extra++)
        argv[n++] = *extra;
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        /* etcd goes when the test goes, also when it crashes or is killed. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(ETCD_BIN, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static inline int etcd_wait_up(struct etcd *e, char *err, size_t errlen)
{
    double end = now_s() + 30;
    while (now_s() < end) {
        if (etcd_put(e, ETCD_S("hello"), ETCD_S("1"), 0, NULL, err, errlen) == 0)
            return 1;
        usleep(100000);
    }
    return 0;
}

static inline int etcd_compact(int port, int64_t rev)
{
    char url[96], body[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/v3/kv/compaction", port);
    snprintf(body, sizeof(body), "{\"revision\":\"%" PRId64 "\",\"physical\":true}", rev);
    CURL *h = curl_easy_init();
    FILE *devnull = fopen("/dev/null", "w");
    long status = 0;
    if (!h || !devnull)
        exit(2);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, devnull);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
    CURLcode cc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    fclose(devnull);
    return cc == CURLE_OK && status == 200 ? 0 : -EIO;
}

#endif
