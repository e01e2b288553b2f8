/* test_config.c -- unit tests for backend/config.c.
 *
 * Writes small config files into a fresh directory under /tmp and checks what
 * config_load() makes of them: the parsed values of valid files, and for each
 * kind of error that the message names the file, the right line and a
 * recognisable reason. If the repository's shards.conf can be found (argv[1],
 * $SHARDFS_CONF, or ../../../shards.conf from a build directory at the top of
 * the tree) it must load too. Exits non-zero on any failed check.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "check.h"

static char tmpdir[256];  /* as created */
static char realtmp[256]; /* realpath of it */

/* Write text to tmpdir/name; returns the path in a static rotating buffer. */
static const char *write_conf(const char *name, const char *text)
{
    static char paths[4][PATH_MAX];
    static int next;
    char *path = paths[next++ % 4];
    FILE *f;

    snprintf(path, PATH_MAX, "%s/%s", tmpdir, name);
    f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    if (fclose(f) != 0) {
        perror(path);
        exit(2);
    }
    return path;
}

/* Load text (as file "t.conf") expecting success. */
static int load_ok(const char *text, struct config *cfg, const char *file, int line)
{
    char err[1024] = "";
    const char *path = write_conf("t.conf", text);
    int rc = config_load(path, cfg, err, sizeof(err));

    check(rc == 0, file, line, "config_load() == 0", "got %d: %s", rc, err);
    return rc;
}
#define LOAD_OK(text, cfg) load_ok((text), (cfg), __FILE__, __LINE__)

/* Load text expecting failure with "PATH:LINE: ..." (or "PATH: ..." when
 * want_line is 0) and a message containing reason. */
static void load_err(const char *text, int want_line, const char *reason, const char *file,
                     int line)
{
    struct config *cfg = malloc(sizeof(*cfg));
    char err[1024] = "";
    char prefix[PATH_MAX + 32];
    const char *path = write_conf("t.conf", text);
    int rc;

    if (!cfg) {
        perror("malloc");
        exit(2);
    }
    memset(cfg, 0x5a, sizeof(*cfg));
    cfg->node_count = 12345;
    rc = config_load(path, cfg, err, sizeof(err));
    if (want_line > 0)
        snprintf(prefix, sizeof(prefix), "%s:%d: ", path, want_line);
    else
        snprintf(prefix, sizeof(prefix), "%s: ", path);
    check(rc == -1, file, line, "config_load() == -1", "got %d", rc);
    check(strncmp(err, prefix, strlen(prefix)) == 0, file, line, "message prefix",
          "want \"%s...\", got \"%s\"", prefix, err);
    check(strstr(err, reason) != NULL, file, line, "message reason", "want \"%s\" in \"%s\"",
          reason, err);
    check(cfg->node_count == 12345, file, line, "cfg untouched on error", NULL);
    free(cfg);
}
#define LOAD_ERR(text, want_line, reason)                                                          \
    load_err((text), (want_line), (reason), __FILE__, __LINE__)

/* Load text (which must load) and expect config_check_data_dir() of its
 * first node to fail with "PATH:LINE: ..." and reason in the message. */
static void dir_err(const char *text, int want_line, const char *reason, const char *file,
                    int line)
{
    static struct config cfg;
    char err[1024] = "", prefix[PATH_MAX + 32];
    const char *path = write_conf("t.conf", text);

    if (config_load(path, &cfg, err, sizeof(err)) != 0) {
        check(0, file, line, "config_load() == 0", "%s", err);
        return;
    }
    snprintf(prefix, sizeof(prefix), "%s:%d: ", path, want_line);
    check(config_check_data_dir(&cfg, 0, err, sizeof(err)) == -1, file, line,
          "config_check_data_dir() == -1", NULL);
    check(strncmp(err, prefix, strlen(prefix)) == 0, file, line, "message prefix",
          "want \"%s...\", got \"%s\"", prefix, err);
    check(strstr(err, reason) != NULL, file, line, "message reason", "want \"%s\" in \"%s\"",
          reason, err);
}
#define DIR_ERR(text, want_line, reason) dir_err((text), (want_line), (reason), __FILE__, __LINE__)

static void test_default(void)
{
    static struct config cfg;
    char want[PATH_MAX + 16];

    if (LOAD_OK("; the default store\n"
                "[cluster]\n"
                "shards = 4\n"
                "epoch = 1\n"
                "commit_interval_ms = 200\n"
                "cache_timeout = 3600\n"
                "\n"
                "[node local]\n"
                "url = http://127.0.0.1:7070\n"
                "data_dir = ./data\n"
                "shards = all\n",
                &cfg) != 0)
        return;
    CHECK(cfg.shard_count == 4);
    CHECK(cfg.shard_bits == 2);
    CHECK(cfg.shards_line == 3);
    CHECK(cfg.epoch == 1);
    CHECK(cfg.commit_interval_ms == 200);
    CHECK(cfg.cache_timeout == 3600.0);
    CHECK(cfg.node_count == 1);
    CHECK(strcmp(cfg.nodes[0].name, "local") == 0);
    CHECK(strcmp(cfg.nodes[0].url, "http://127.0.0.1:7070") == 0);
    CHECK(cfg.nodes[0].line == 8);
    snprintf(want, sizeof(want), "%s/data", realtmp);
    CHECKF(strcmp(cfg.nodes[0].data_dir, want) == 0, "got %s want %s", cfg.nodes[0].data_dir, want);
    for (int i = 0; i < 4; i++)
        CHECK(cfg.owner[i] == 0);
    CHECK(strstr(cfg.path, "t.conf") != NULL);
    CHECK(config_pick_node(&cfg, NULL, NULL, 0) == 0);
    CHECK(config_pick_node(&cfg, "local", NULL, 0) == 0);
    CHECK(config_node_index(&cfg, "local") == 0);
    CHECK(config_node_index(&cfg, "other") == -1);
    CHECK(config_node_index(&cfg, NULL) == -1);

    /* defaults, and a relative path to the file itself */
    if (LOAD_OK("[cluster]\nshards = 1\n[node a]\ndata_dir = d\nshards = 0\n", &cfg) != 0)
        return;
    CHECK(cfg.shard_count == 1 && cfg.shard_bits == 0);
    CHECK(cfg.epoch == 1 && cfg.commit_interval_ms == 200 && cfg.cache_timeout == 3600.0);
    CHECK(cfg.nodes[0].url[0] == '\0');
    {
        char cwd[PATH_MAX], err[512] = "";
        static struct config cfg2;
        if (getcwd(cwd, sizeof(cwd)) && chdir(tmpdir) == 0) {
            CHECKF(config_load("t.conf", &cfg2, err, sizeof(err)) == 0, "%s", err);
            snprintf(want, sizeof(want), "%s/d", realtmp);
            CHECKF(strcmp(cfg2.nodes[0].data_dir, want) == 0, "got %s", cfg2.nodes[0].data_dir);
            CHECK(strcmp(cfg2.path, "t.conf") == 0);
            CHECK(chdir(cwd) == 0);
        }
    }
}

static void test_three_nodes(void)
{
    static struct config cfg;
    char err[256] = "";
    static const int want_owner[16] = {0, 0, 0, 0, 1, 1, 2, 1, 1, 1, 2, 2, 2, 2, 0, 1};
    char sub[300];

    /* ".." is kept as written, so sub must exist for sub/../gamma to work */
    snprintf(sub, sizeof(sub), "%s/sub", tmpdir);
    CHECK(mkdir(sub, 0700) == 0);

    if (LOAD_OK("# nodes may come before [cluster]\n"
                "[node alpha]\n"
                "url = http://alpha.example:7070/\n"
                "data_dir = /tmp/../tmp//./x/ ; absolute, cleaned\n"
                "shards = 0-3, 14\n"
                "[cluster]\r\n"
                "  shards = 16\r\n"
                "\tepoch = 18446744073709551615\n"
                "commit_interval_ms = 60000\n"
                "cache_timeout = 0.25\n"
                "secret = sixteen-chars-at-least\n"
                "[node beta-2]\n"
                "shards = 4,5 ,7-9,15\n"
                "data_dir = beta\n"
                "url = http://127.0.0.2:7071\n"
                "[node Gamma_3] ; comment\n"
                "data_dir = sub/../gamma/\n"
                "shards = 6,10-13\n"
                "url = http://127.0.0.3:7072\n",
                &cfg) != 0)
        return;
    CHECK(cfg.shard_count == 16);
    CHECK(cfg.shard_bits == 4);
    CHECK(cfg.shards_line == 7);
    CHECK(cfg.epoch == UINT64_MAX);
    CHECK(cfg.commit_interval_ms == 60000);
    CHECK(cfg.cache_timeout == 0.25);
    CHECK(cfg.node_count == 3);
    CHECK(strcmp(cfg.nodes[0].name, "alpha") == 0 && cfg.nodes[0].line == 2);
    CHECK(strcmp(cfg.nodes[1].name, "beta-2") == 0 && cfg.nodes[1].line == 12);
    CHECK(strcmp(cfg.nodes[2].name, "Gamma_3") == 0 && cfg.nodes[2].line == 16);
    CHECK(strcmp(cfg.secret, "sixteen-chars-at-least") == 0);
    CHECK(cfg.timeout_ms == 5000);
    CHECK(strcmp(cfg.nodes[0].url, "http://alpha.example:7070/") == 0);
    CHECK(strcmp(cfg.nodes[1].url, "http://127.0.0.2:7071") == 0);
    CHECKF(strcmp(cfg.nodes[0].data_dir, "/tmp/../tmp/x") == 0, "got %s", cfg.nodes[0].data_dir);
    CHECK(cfg.nodes[1].data_dir[0] == '/' && strstr(cfg.nodes[1].data_dir, "/beta") != NULL);
    CHECK(strncmp(cfg.nodes[2].data_dir, realtmp, strlen(realtmp)) == 0);
    CHECKF(strstr(cfg.nodes[2].data_dir, "/sub/../gamma") != NULL, "got %s", cfg.nodes[2].data_dir);
    for (int i = 0; i < 16; i++)
        CHECKF(cfg.owner[i] == want_owner[i], "owner[%d] = %d, want %d", i, cfg.owner[i],
               want_owner[i]);

    CHECK(config_node_index(&cfg, "beta-2") == 1);
    CHECK(config_node_index(&cfg, "gamma_3") == -1);
    CHECK(config_pick_node(&cfg, "Gamma_3", err, sizeof(err)) == 2);
    CHECK(config_pick_node(&cfg, NULL, err, sizeof(err)) == -1);
    CHECKF(strstr(err, "several nodes; choose one with -n NODE") != NULL &&
               strncmp(err, cfg.path, strlen(cfg.path)) == 0,
           "got %s", err);
    CHECK(config_pick_node(&cfg, "x", err, sizeof(err)) == -1);
    CHECKF(strstr(err, ": no node called 'x'") != NULL, "got %s", err);

    /* the largest store */
    if (LOAD_OK("[cluster]\nshards = 1024\nsecret = 0123456789abcdef\n"
                "[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0-511\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 512-1023\n",
                &cfg) == 0) {
        CHECK(cfg.shard_bits == 10);
        CHECK(cfg.owner[511] == 0 && cfg.owner[512] == 1 && cfg.owner[1023] == 1);
    }
}

static void test_syntax_errors(void)
{
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = all\nthis is not a key\n", 6,
             "syntax error");
    LOAD_ERR("[cluster\nshards = 4\n", 1, "syntax error");
    /* several nodes: a secret and every node's url are required */
    LOAD_ERR("[cluster]\nshards = 2\n[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0\n"
             "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 1\n",
             0, "secret is required");
    LOAD_ERR("[cluster]\nshards = 2\nsecret = 0123456789abcdef\n[node a]\ndata_dir = a\n"
             "shards = 0\n[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 1\n",
             4, "url is missing");
    LOAD_ERR("[cluster]\nshards = 2\nsecret = short\n", 3, "secret must be");
    LOAD_ERR("[cluster]\nshards = 2\ntimeout_ms = 5\n", 3, "bad timeout_ms");
    /* a syntax error before a semantic one is reported first */
    LOAD_ERR("[cluster]\noops\nbogus = 1\n", 2, "syntax error");
    /* indented lines are keys, not continuations of the line before */
    LOAD_ERR("[cluster]\nshards = 4\n    nonsense\n", 3, "syntax error");
    LOAD_ERR("shards = 4\n", 1, "outside any section");
    {
        char text[600];
        snprintf(text, sizeof(text), "[cluster]\nshards = 4\n[node a]\ndata_dir = %0400d\n", 0);
        LOAD_ERR(text, 4, "line too long");
    }
    LOAD_ERR("[cluster] junk\nshards = 4\n", 1, "after ']'");
}

static void test_section_errors(void)
{
    LOAD_ERR("[cluster]\nshards = 4\n\n[clutser]\nx = 1\n", 4, "unknown section [clutser]");
    LOAD_ERR("[cluster]\nshards = 4\n[empty]\n", 3, "unknown section [empty]");
    LOAD_ERR("[cluster]\nshards = 4\n[node]\n", 3, "needs a name");
    LOAD_ERR("[cluster]\nshards = 4\n[node a.b]\n", 3, "bad node name 'a.b'");
    LOAD_ERR("[cluster]\nshards = 4\n[node "
             "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcd]\n",
             3, "bad node name");
    LOAD_ERR("[cluster]\nshards = 2\n[node a]\ndata_dir = a\nshards = 0\n[node a]\n"
             "data_dir = b\nshards = 1\n",
             6, "duplicate node 'a' (first at line 3)");
    /* names longer than inih's 49-byte section buffer stay distinct */
    LOAD_ERR("[cluster]\nshards = 2\n"
             "[node n123456789012345678901234567890123456789012345678901234567890a]\n"
             "data_dir = a\nshards = 0\n"
             "[node n123456789012345678901234567890123456789012345678901234567890b]\n"
             "data_dir = b\nshards = 0\n",
             8, "owned by two nodes");
    LOAD_ERR("[cluster]\nshards = 4\n[cluster]\n", 3, "duplicate section [cluster]");
}

static void test_key_errors(void)
{
    LOAD_ERR("[cluster]\nshards = 4\nshard = 4\n", 3, "unknown key 'shard'");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nport = 1\n", 5, "unknown key 'port'");
    LOAD_ERR("[cluster]\nshards = 4\nepoch = 2\nepoch = 3\n", 4,
             "duplicate key 'epoch' (first at line 3)");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\ndata_dir = b\n", 5,
             "duplicate key 'data_dir'");
}

static void test_number_errors(void)
{
    LOAD_ERR("[cluster]\nshards = 6\n", 2, "shards = 6 is not a power of two");
    LOAD_ERR("[cluster]\nshards = 0\n", 2, "out of range");
    LOAD_ERR("[cluster]\nshards = 2048\n", 2, "out of range");
    LOAD_ERR("[cluster]\nshards = four\n", 2, "not a number");
    LOAD_ERR("[cluster]\nshards = 4x\n", 2, "not a number");
    LOAD_ERR("[cluster]\nshards = -4\n", 2, "not a number");
    LOAD_ERR("[cluster]\nshards =\n", 2, "not a number");
    LOAD_ERR("[cluster]\nshards = 99999999999999999999999\n", 2, "not a number");
    LOAD_ERR("[cluster]\nshards = 4\nepoch = 0\n", 3, "bad epoch '0'");
    LOAD_ERR("[cluster]\nshards = 4\nepoch = 18446744073709551616\n", 3, "bad epoch");
    LOAD_ERR("[cluster]\nshards = 4\nepoch = +1\n", 3, "bad epoch");
    LOAD_ERR("[cluster]\nshards = 4\ncommit_interval_ms = 0\n", 3, "bad commit_interval_ms");
    LOAD_ERR("[cluster]\nshards = 4\ncommit_interval_ms = 60001\n", 3, "bad commit_interval_ms");
    LOAD_ERR("[cluster]\nshards = 4\ncommit_interval_ms = 1.5\n", 3, "bad commit_interval_ms");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = 86400.5\n", 3, "bad cache_timeout");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = -1\n", 3, "bad cache_timeout");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = nan\n", 3, "bad cache_timeout");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = 0x10\n", 3, "bad cache_timeout");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = 1e999\n", 3, "bad cache_timeout");
    LOAD_ERR("[cluster]\nshards = 4\ncache_timeout = 10s\n", 3, "bad cache_timeout");
}

static void test_node_value_errors(void)
{
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\nurl = ftp://x\n", 4, "bad url");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\nurl = http://\n", 4, "bad url");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir =\n", 4, "data_dir is empty");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 0-4\n", 5,
             "shard 4 is out of range 0-3");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 9\n", 5,
             "shard 9 is out of range 0-3");
    /* node before [cluster]: checked once the count is known, at the node's line */
    LOAD_ERR("[node a]\ndata_dir = a\nshards = 0-7\n[cluster]\nshards = 4\n", 3,
             "shard 4 is out of range 0-3");
    LOAD_ERR("[node a]\ndata_dir = a\nshards = 5000\n", 3, "out of range 0-1023");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 3-1\n", 5, "backwards");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 0,,1\n", 5, "bad shard list");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 0-\n", 5, "bad shard list");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = -1\n", 5, "bad shard list");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = ALL\n", 5, "bad shard list");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 0-2,1\n", 5, "twice");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = 0-2\n"
             "[node b]\ndata_dir = b\nshards = 2-3\n",
             8, "shard 2 is owned by two nodes: 'a' (line 5) and 'b'");
    LOAD_ERR("[node a]\ndata_dir = a\nshards = all\n[node b]\ndata_dir = b\nshards = 1\n"
             "[cluster]\nshards = 2\n",
             6, "shard 1 is owned by two nodes");
}

/* Every node's url is checked at load, the url of a node this process will
 * only call as much as its own, at the url's line. */
static void test_bad_urls(void)
{
    static const struct {
        const char *url, *reason;
    } bad[] = {
        {"ftp://x:1", "want http://HOST:PORT"},
        {"http//127.0.0.1:1", "want http://HOST:PORT"},
        {"http://", "no host"},
        {"http://:7070", "no host"},
        {"http://127.0.0.1", "no :PORT"},
        {"http://127.0.0.1:", "not a number from 1 to 65535"},
        {"http://127.0.0.1:0", "not a number from 1 to 65535"},
        {"http://127.0.0.1:65536", "not a number from 1 to 65535"},
        {"http://127.0.0.1:99999999", "not a number from 1 to 65535"},
        {"http://127.0.0.1:18446744073709551617", "not a number from 1 to 65535"},
        {"http://127.0.0.1:notaport", "not a number from 1 to 65535"},
        {"http://127.0.0.1:-1", "not a number from 1 to 65535"},
        {"http://127.0.0.1:+80", "not a number from 1 to 65535"},
        {"http://127.0.0.1:80x", "nothing may follow"},
        {"http://127.0.0.1:80/path", "nothing may follow"},
        {"http://127.0.0.1:80//", "nothing may follow"},
        {"http://127.0.0.1:80?q", "nothing may follow"},
        {"http://user@127.0.0.1:80", "a '@' in the host"},
        {"http://h/x:80", "a '/' in the host"},
        {"http://h%41:80", "a '%' in the host"},
        {"http://[::1:80", "bracketed host"},
        {"http://[]:80", "bracketed host"},
        {"http://[::1]x:80", "a 'x' in the host"},
        {"http://[::1]", "no :PORT"},
        {"http://a\tb:80", "a '\t' in the host"},
    };
    char text[512], want[160];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        /* the url of node b, which a mount of node a only calls */
        snprintf(text, sizeof(text),
                 "[cluster]\nshards = 2\nsecret = 0123456789abcdef\n"
                 "[node a]\nurl = http://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
                 "[node b]\nurl = %s\ndata_dir = b\nshards = 1\n",
                 bad[i].url);
        snprintf(want, sizeof(want), "bad url '%s' (", bad[i].url);
        LOAD_ERR(text, 9, want);
        LOAD_ERR(text, 9, bad[i].reason);
    }
    /* two nodes at one HOST:PORT: at the second url's line */
    LOAD_ERR("[cluster]\nshards = 2\nsecret = 0123456789abcdef\n"
             "[node a]\nurl = http://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
             "[node b]\nurl = http://127.0.0.1:7070/\ndata_dir = b\nshards = 1\n",
             9, "nodes a and b cannot have the same host and port");
    LOAD_ERR("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n"
             "[node a]\nurl = http://Alpha:7070\ndata_dir = a\nshards = 0\n"
             "[node b]\nurl = http://beta:7070\ndata_dir = b\nshards = 1\n"
             "[node c]\nurl = https://alpha:7070\ndata_dir = c\nshards = 2-3\n",
             13, "nodes a and c cannot have the same host and port");
}

/* https:// urls: the CA for everyone, a certificate and key for the node;
 * file names relative to the conf file; mistakes at their line. */
static void test_tls(void)
{
    static struct config cfg;
    char want[PATH_MAX + 32];

    write_conf("ca.pem", "not read by config_load\n");
    if (LOAD_OK("[cluster]\nshards = 2\nsecret = 0123456789abcdef\ntls_ca = ca.pem\n"
                "[node a]\nurl = https://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
                "tls_cert = pki/a.pem\ntls_key = /etc/a.key\n"
                "[node b]\nurl = http://127.0.0.1:7071\ndata_dir = b\nshards = 1\n",
                &cfg) == 0) {
        snprintf(want, sizeof(want), "%s/ca.pem", realtmp);
        CHECKF(strcmp(cfg.tls_ca, want) == 0 && cfg.tls_ca_line == 4, "got %s:%d", cfg.tls_ca,
               cfg.tls_ca_line);
        snprintf(want, sizeof(want), "%s/pki/a.pem", realtmp);
        CHECKF(strcmp(cfg.nodes[0].tls_cert, want) == 0 && cfg.nodes[0].tls_cert_line == 9,
               "got %s:%d", cfg.nodes[0].tls_cert, cfg.nodes[0].tls_cert_line);
        CHECK(strcmp(cfg.nodes[0].tls_key, "/etc/a.key") == 0 && cfg.nodes[0].tls_key_line == 10);
        CHECK(cfg.nodes[1].tls_cert[0] == '\0' && cfg.nodes[1].tls_key[0] == '\0');
    }
    LOAD_ERR("[cluster]\nshards = 1\n"
             "[node a]\nurl = https://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
             "tls_cert = a.pem\ntls_key = a.key\n",
             4, "https:// needs tls_ca in [cluster]");
    LOAD_ERR("[cluster]\nshards = 1\ntls_ca = missing.pem\n"
             "[node a]\nurl = https://127.0.0.1:7070\ndata_dir = a\nshards = 0\n",
             3, "tls_ca");
    LOAD_ERR("[cluster]\nshards = 1\ntls_ca = ca.pem\n"
             "[node a]\nurl = https://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
             "tls_cert = a.pem\n",
             4, "[node a] has an https:// url but no tls_key");
    LOAD_ERR("[cluster]\nshards = 1\ntls_ca = ca.pem\n"
             "[node a]\nurl = http://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
             "tls_key = a.key\n",
             8, "[node a] tls_key needs an https:// url");
    LOAD_ERR("[cluster]\nshards = 1\ntls_ca =\n[node a]\ndata_dir = a\nshards = 0\n", 3,
             "tls_ca is empty");
    LOAD_ERR("[cluster]\nshards = 1\n[node a]\ndata_dir = a\nshards = 0\n"
             "tls_cert = x\ntls_cert = y\n",
             7, "duplicate key 'tls_cert'");
}

/* The urls that load, split as a node connects to them. */
static void test_good_urls(void)
{
    static const struct {
        const char *url, *host;
        unsigned port;
        int tls;
    } good[] = {
        {"http://127.0.0.1:1", "127.0.0.1", 1, 0},
        {"http://127.0.0.1:65535/", "127.0.0.1", 65535, 0},
        {"https://node-1.example.org:443", "node-1.example.org", 443, 1},
        {"http://[::1]:7070", "::1", 7070, 0},
        {"http://[fe80::1:2]:007070", "fe80::1:2", 7070, 0},
    };
    struct config_url u;
    char why[128];

    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        int rc = config_url_parse(good[i].url, &u, why, sizeof(why));

        CHECKF(rc == 0 && strcmp(u.host, good[i].host) == 0 && u.port == good[i].port &&
                   u.tls == good[i].tls,
               "%s: %d %s %u %d: %s", good[i].url, rc, u.host, u.port, u.tls, rc ? why : "");
    }
    /* different ports on one host, the same port on different hosts */
    struct config cfg;
    LOAD_OK("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n"
            "[node a]\nurl = http://127.0.0.1:7070\ndata_dir = a\nshards = 0\n"
            "[node b]\nurl = http://127.0.0.1:7071\ndata_dir = b\nshards = 1\n"
            "[node c]\nurl = http://127.0.0.2:7070\ndata_dir = c\nshards = 2-3\n",
            &cfg);
}

static void test_url_too_long(void)
{
    /* inih's line limit (usually 200) is below CONFIG_URL_MAX, so an over-long
     * url is refused as a long line; either way it must not load. */
    char text[600], url[300];

    memset(url, 'h', sizeof(url) - 1);
    url[sizeof(url) - 1] = '\0';
    snprintf(text, sizeof(text), "[cluster]\nshards = 4\n[node a]\nurl = http://%s\n", url);
    LOAD_ERR(text, 4, "too long");
}

static void test_whole_file_errors(void)
{
    char path[PATH_MAX + 16], text[PATH_MAX + 256];

    LOAD_ERR("[cluster]\nepoch = 2\n[node a]\ndata_dir = a\nshards = all\n", 0,
             "[cluster] shards is missing");
    LOAD_ERR("; empty\n", 0, "[cluster] shards is missing");
    LOAD_ERR("[cluster]\nshards = 4\n", 0, "no [node] section");
    LOAD_ERR("[cluster]\n\nshards = 4\n[node a]\ndata_dir = a\nshards = 0-2\n", 3,
             "shard 3 has no owner");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\nshards = all\n", 3, "data_dir is missing");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\n", 3, "[node a] shards is missing");

    /* data_dir is a file */
    write_conf("plainfile", "x\n");
    snprintf(text, sizeof(text),
             "[cluster]\nshards = 1\n[node a]\nurl = http://h:1\n"
             "data_dir = plainfile\nshards = all\n");
    snprintf(path, sizeof(path), "data_dir %s/plainfile: %s", realtmp, strerror(ENOTDIR));
    DIR_ERR(text, 5, path);
    /* data_dir's parent does not exist */
    snprintf(path, sizeof(path), "data_dir %s/no/such: %s", realtmp, strerror(ENOENT));
    DIR_ERR("[cluster]\nshards = 1\n[node a]\ndata_dir = no/such\nshards = all\n", 4, path);
    /* data_dir's parent is a file */
    DIR_ERR("[cluster]\nshards = 1\n[node a]\ndata_dir = plainfile/x\nshards = all\n", 4,
             strerror(ENOTDIR));
    /* missing data_dir with an existing parent is fine; an existing one too */
    {
        static struct config cfg;
        char err[256];
        LOAD_OK("[cluster]\nshards = 1\n[node a]\ndata_dir = fresh\nshards = all\n", &cfg);
        CHECK_RC(config_check_data_dir(&cfg, 0, err, sizeof(err)), 0);
        snprintf(path, sizeof(path), "%s/exists", tmpdir);
        CHECK(mkdir(path, 0700) == 0);
        LOAD_OK("[cluster]\nshards = 1\n[node a]\ndata_dir = exists\nshards = all\n", &cfg);
        CHECK_RC(config_check_data_dir(&cfg, 0, err, sizeof(err)), 0);
    }
    /* only the node that is checked needs a usable directory: a client of
     * the key API loads a config whose directories live on other machines */
    {
        static struct config cfg;
        char err[256];
        LOAD_OK("[cluster]\nshards = 2\nsecret = 0123456789abcdef\n"
                "[node a]\nurl = http://127.0.0.1:1\ndata_dir = exists\nshards = 0\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = /no/such/dir/b\nshards = 1\n",
                &cfg);
        CHECK_RC(config_check_data_dir(&cfg, 0, err, sizeof(err)), 0);
        CHECK_RC(config_check_data_dir(&cfg, 1, err, sizeof(err)), -1);
        CHECKF(strstr(err, ":10: data_dir /no/such/dir/b: ") != NULL, "got %s", err);
    }
    /* permissions: root passes every access() check, so only as a user */
    if (geteuid() != 0) {
        snprintf(path, sizeof(path), "%s/ro", tmpdir);
        CHECK(mkdir(path, 0500) == 0);
        snprintf(path, sizeof(path), "data_dir %s/ro: %s", realtmp, strerror(EACCES));
        DIR_ERR("[cluster]\nshards = 1\n[node a]\ndata_dir = ro\nshards = all\n", 4, path);
        DIR_ERR("[cluster]\nshards = 1\n[node a]\ndata_dir = ro/new\nshards = all\n", 4,
                 strerror(EACCES));
    }

    /* the file itself cannot be opened */
    {
        static struct config cfg;
        char err[PATH_MAX + 64], want[PATH_MAX + 64];
        snprintf(path, sizeof(path), "%s/missing.conf", tmpdir);
        snprintf(want, sizeof(want), "%s: %s", path, strerror(ENOENT));
        CHECK(config_load(path, &cfg, err, sizeof(err)) == -1);
        CHECKF(strcmp(err, want) == 0, "got \"%s\" want \"%s\"", err, want);
        /* no error buffer: must not crash */
        CHECK(config_load(path, &cfg, NULL, 0) == -1);
    }
}

/* replicas, ack, etcd, lease_ttl_ms, replica_lag_ms (issue 10) */
#define NODES_ABC                                                                                  \
    "[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0-1\n"                             \
    "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 2\n"                               \
    "[node c]\nurl = http://127.0.0.1:3\ndata_dir = c\nshards = 3\n"
static void test_replication(void)
{
    static struct config cfg;

    /* defaults: no replicas, ack = replica, no etcd */
    if (LOAD_OK("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n" NODES_ABC, &cfg) == 0) {
        for (int i = 0; i < 4; i++)
            CHECK(cfg.nreplicas[i] == 0);
        CHECK(cfg.ack == CONFIG_ACK_REPLICA);
        CHECK(cfg.etcd[0] == '\0');
        CHECK(cfg.lease_ttl_ms == 5000);
        CHECK(cfg.replica_lag_ms == 2000);
        CHECK(cfg.replica_push == 1);
    }
    /* every directive; nodes before [cluster]; replicas in config order */
    if (LOAD_OK("[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0-1\n"
                "replicas = 2,3\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 2\n"
                "replicas = 0-1, 3\n"
                "[node c]\nurl = http://127.0.0.1:3\ndata_dir = c\nshards = 3\n"
                "replicas = 0,2\n"
                "[node d]\nurl = http://127.0.0.1:4\ndata_dir = d\nshards = 4-7\n"
                "replicas = 0\n"
                "[cluster]\nshards = 8\nsecret = 0123456789abcdef\nack = primary\n"
                "etcd = http://127.0.0.1:2391 , http://[::1]:2379/,https://etcd.example:443\n"
                "lease_ttl_ms = 1000\nreplica_lag_ms = 4999\nreplica_push = no\n",
                &cfg) == 0) {
        CHECK(cfg.replica_push == 0);
        CHECK(cfg.nreplicas[0] == 3 && cfg.replicas[0][0] == 1 && cfg.replicas[0][1] == 2 &&
              cfg.replicas[0][2] == 3);
        CHECK(cfg.nreplicas[1] == 1 && cfg.replicas[1][0] == 1);
        CHECK(cfg.nreplicas[2] == 2 && cfg.replicas[2][0] == 0 && cfg.replicas[2][1] == 2);
        CHECK(cfg.nreplicas[3] == 2 && cfg.replicas[3][0] == 0 && cfg.replicas[3][1] == 1);
        for (int i = 4; i < 8; i++)
            CHECK(cfg.nreplicas[i] == 0);
        CHECK(cfg.ack == CONFIG_ACK_PRIMARY);
        CHECKF(strcmp(cfg.etcd,
                      "http://127.0.0.1:2391,http://[::1]:2379/,https://etcd.example:443") == 0,
               "got %s", cfg.etcd);
        CHECK(cfg.lease_ttl_ms == 1000);
        CHECK(cfg.replica_lag_ms == 4999 && cfg.timeout_ms == 5000);
    }
    /* the default lag stays below a short timeout_ms */
    if (LOAD_OK("[cluster]\nshards = 4\nsecret = 0123456789abcdef\ntimeout_ms = 1500\n"
                "ack = replica\n" NODES_ABC,
                &cfg) == 0) {
        CHECK(cfg.replica_lag_ms == 750);
        CHECK(cfg.ack == CONFIG_ACK_REPLICA);
    }
}

static void test_replication_errors(void)
{
    /* a shard listed as replica by its owner */
    LOAD_ERR("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n" NODES_ABC "replicas = 1,3\n", 16,
             "replicas: shard 3 is owned by node 'c' itself");
    /* the owner comes later in the file: found at the end, on the replicas line */
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nreplicas = 1\nshards = 0-3\n", 5,
             "replicas: shard 1 is owned by node 'a' itself");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = all\nreplicas = all\n", 6,
             "shard 0 is owned by node 'a' itself");
    /* a node listing a shard twice */
    LOAD_ERR("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n" NODES_ABC "replicas = 0,1,0-1\n",
             16, "replicas = 0,1,0-1 lists shard 0 twice");
    /* more than 3 replicas of a shard */
    LOAD_ERR("[cluster]\nshards = 8\nsecret = 0123456789abcdef\n"
             "[node a]\nurl = http://127.0.0.1:1\ndata_dir = a\nshards = 0-3\n"
             "[node b]\nurl = http://127.0.0.1:2\ndata_dir = b\nshards = 4\nreplicas = 0\n"
             "[node c]\nurl = http://127.0.0.1:3\ndata_dir = c\nshards = 5\nreplicas = 0\n"
             "[node d]\nurl = http://127.0.0.1:4\ndata_dir = d\nshards = 6\nreplicas = 0\n"
             "[node e]\nurl = http://127.0.0.1:5\ndata_dir = e\nshards = 7\nreplicas = 0-1\n",
             27, "replicas: shard 0 would have more than 3 replicas");
    /* replicas naming shards out of range: known count, then count given later */
    LOAD_ERR("[cluster]\nshards = 4\nsecret = 0123456789abcdef\n" NODES_ABC "replicas = 0,4\n", 16,
             "replicas: shard 4 is out of range 0-3");
    LOAD_ERR("[node a]\ndata_dir = a\nshards = 0-3\n[node b]\ndata_dir = b\nshards = 4-7\n"
             "replicas = 0-3,9\n[cluster]\nshards = 8\n",
             7, "replicas: shard 9 is out of range 0-7");
    /* "none" is for replicas only */
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = none\n", 5,
             "bad shard list 'none'");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = all\nreplicas = 1,,2\n", 6,
             "bad replicas list '1,,2'");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = all\nreplicas = 2-1\n", 6,
             "replicas = 2-1: range 2-1 is backwards");
    LOAD_ERR("[cluster]\nshards = 4\n[node a]\ndata_dir = a\nshards = all\nreplicas = none\n"
             "replicas = none\n",
             7, "duplicate key 'replicas'");
    /* replica_lag_ms >= timeout_ms, and out of range */
    LOAD_ERR("[cluster]\nshards = 1\ntimeout_ms = 1000\nreplica_lag_ms = 1000\n"
             "[node a]\ndata_dir = a\nshards = all\n",
             4, "replica_lag_ms = 1000 must be less than timeout_ms = 1000");
    LOAD_ERR("[cluster]\nshards = 1\nreplica_lag_ms = 5000\n[node a]\ndata_dir = a\nshards = all\n",
             3, "must be less than timeout_ms = 5000");
    LOAD_ERR("[cluster]\nshards = 1\nreplica_lag_ms = 99\n", 3, "bad replica_lag_ms '99'");
    LOAD_ERR("[cluster]\nshards = 1\nreplica_lag_ms = 60001\n", 3, "bad replica_lag_ms");
    LOAD_ERR("[cluster]\nshards = 1\nlease_ttl_ms = 999\n", 3, "bad lease_ttl_ms '999'");
    LOAD_ERR("[cluster]\nshards = 1\nlease_ttl_ms = 60001\n", 3, "bad lease_ttl_ms");
    LOAD_ERR("[cluster]\nshards = 1\nlease_ttl_ms = 5s\n", 3, "bad lease_ttl_ms");
    /* ack other than primary/replica */
    LOAD_ERR("[cluster]\nshards = 1\nack = all\n", 3, "bad ack 'all' (want primary or replica)");
    LOAD_ERR("[cluster]\nshards = 1\nack = Primary\n", 3, "bad ack 'Primary'");
    LOAD_ERR("[cluster]\nshards = 1\nreplica_push = 1\n", 3,
             "bad replica_push '1' (want yes or no)");
    LOAD_ERR("[cluster]\nshards = 1\nack =\n", 3, "bad ack ''");
    /* bad etcd url lists */
    LOAD_ERR("[cluster]\nshards = 1\netcd = 127.0.0.1:2379\n", 3,
             "etcd: bad url '127.0.0.1:2379' (want http://HOST:PORT");
    LOAD_ERR("[cluster]\nshards = 1\netcd = http://127.0.0.1:2379,\n", 3, "an empty url");
    LOAD_ERR("[cluster]\nshards = 1\netcd = http://a:1,,http://b:2\n", 3, "an empty url");
    LOAD_ERR("[cluster]\nshards = 1\netcd =\n", 3, "an empty url");
    LOAD_ERR("[cluster]\nshards = 1\netcd = http://a:1/v3\n", 3,
             "nothing may follow HOST:PORT but one '/'");
    LOAD_ERR("[cluster]\nshards = 1\netcd = http://a:0\n", 3, "etcd: bad url 'http://a:0'");
    LOAD_ERR("[cluster]\nshards = 1\netcd = ftp://a:1\n", 3, "etcd: bad url 'ftp://a:1'");
    {
        char text[1024];
        int n = snprintf(text, sizeof(text), "[cluster]\nshards = 1\netcd = http://a:1");
        for (int i = 2; i <= 17; i++)
            n += snprintf(text + n, sizeof(text) - (size_t)n, ",http://a:%d", i % 9 + 1);
        snprintf(text + n, sizeof(text) - (size_t)n, "\n");
        LOAD_ERR(text, 3, "etcd: more than 16 urls");
    }
}

static void test_pick_node(void)
{
    static struct config cfg;
    char err[PATH_MAX + 64];

    memset(&cfg, 0, sizeof(cfg));
    snprintf(cfg.path, sizeof(cfg.path), "/etc/shards.conf");
    cfg.node_count = 2;
    snprintf(cfg.nodes[0].name, sizeof(cfg.nodes[0].name), "a");
    snprintf(cfg.nodes[1].name, sizeof(cfg.nodes[1].name), "b");
    CHECK(config_pick_node(&cfg, NULL, err, sizeof(err)) == -1);
    CHECKF(strcmp(err, "/etc/shards.conf: several nodes; choose one with -n NODE") == 0, "got %s",
           err);
    CHECK(config_pick_node(&cfg, "b", err, sizeof(err)) == 1);
    CHECK(config_pick_node(&cfg, "c", err, sizeof(err)) == -1);
    CHECKF(strcmp(err, "/etc/shards.conf: no node called 'c'") == 0, "got %s", err);
}

/* The repository's own shards.conf, when we can find it. */
static void test_repo_conf(const char *arg)
{
    static struct config cfg;
    char err[PATH_MAX + 256] = "";
    const char *path = arg ? arg : getenv("SHARDFS_CONF");

    if (!path)
        path = "../../../shards.conf";
    if (access(path, R_OK) != 0) {
        printf("test_config: %s not found, skipping the repository config\n", path);
        return;
    }
    CHECKF(config_load(path, &cfg, err, sizeof(err)) == 0, "%s", err);
    CHECK(cfg.shard_count == 4 && cfg.epoch == 1 && cfg.commit_interval_ms == 200);
    CHECK(cfg.cache_timeout == 3600.0);
    CHECK(cfg.node_count == 1 && strcmp(cfg.nodes[0].name, "local") == 0);
    CHECK(strcmp(cfg.nodes[0].url, "http://127.0.0.1:7070") == 0);
    CHECK(cfg.nodes[0].data_dir[0] == '/');
    CHECK(cfg.owner[0] == 0 && cfg.owner[3] == 0);
}

/* mount-scripts/cluster.conf (next to the repository's shards.conf): two
 * copies of every shard, never both on one node, acknowledged by the
 * replica, and the etcd cluster-up starts. */
static void test_cluster_conf(void)
{
    static struct config cfg;
    char err[PATH_MAX + 256] = "";
    const char *path = "../../../mount-scripts/cluster.conf";

    if (access(path, R_OK) != 0) {
        printf("test_config: %s not found, skipping it\n", path);
        return;
    }
    CHECKF(config_load(path, &cfg, err, sizeof(err)) == 0, "%s", err);
    CHECK(cfg.node_count == 3 && cfg.shard_count == 8);
    for (unsigned i = 0; i < cfg.shard_count; i++)
        CHECKF(cfg.nreplicas[i] == 1 && cfg.replicas[i][0] != cfg.owner[i], "shard %u", i);
    CHECK(cfg.ack == CONFIG_ACK_REPLICA);
    CHECKF(strcmp(cfg.etcd, "http://127.0.0.1:2391") == 0, "etcd %s", cfg.etcd);
    CHECK(cfg.replica_lag_ms < cfg.timeout_ms);
}

static void remove_tree(void)
{
    static const char *const names[] = {"t.conf", "plainfile", "exists", "ro", "sub"};
    char path[PATH_MAX + 16];

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", tmpdir, names[i]);
        if (unlink(path) != 0)
            rmdir(path);
    }
    rmdir(tmpdir);
}

int main(int argc, char **argv)
{
    char real[PATH_MAX];

    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_config.XXXXXX");
    if (!mkdtemp(tmpdir) || !realpath(tmpdir, real) || strlen(real) >= sizeof(realtmp)) {
        perror("mkdtemp");
        return 2;
    }
    memcpy(realtmp, real, strlen(real) + 1);
    test_default();
    test_three_nodes();
    test_syntax_errors();
    test_section_errors();
    test_key_errors();
    test_number_errors();
    test_node_value_errors();
    test_bad_urls();
    test_good_urls();
    test_tls();
    test_url_too_long();
    test_whole_file_errors();
    test_replication();
    test_replication_errors();
    test_pick_node();
    test_repo_conf(argc > 1 ? argv[1] : NULL);
    test_cluster_conf();
    remove_tree();
    return check_summary("config");
}
