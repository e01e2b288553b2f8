"""TLS between nodes: https:// node urls with a CA file and a certificate per
node in shards.conf. The test makes its own CA with the openssl command.

- a 3-node cluster on https:// mounts, copies a tree through one mount and
  reads it back through the others (every cross-node request is TLS), and
  the key API answers curl over https with the CA, and refuses to talk to
  plain HTTP or to a curl that does not trust the CA;
- a node whose certificate another CA signed gets no traffic from its
  peers: their reads fail with an error, never plain text or a hang;
- config mistakes (https without tls_ca, a missing certificate, a key that
  is not the certificate's, TLS files on an http:// node) are refused with
  FILE:LINE.
"""

import os
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHARDFS_BIN, read_file, run, write_file
from test_cluster import NODES, SECRET, Cluster, _port_answers

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command (mount-scripts/deps.sh)")

BEARER = "Authorization: Bearer " + SECRET


def openssl(*args, cwd):
    run(["openssl"] + list(args), cwd=cwd, timeout=60)


def make_ca(d, name="ca"):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", name + ".key", "-out", name + ".pem", "-days", "2",
            "-subj", "/CN=shardfs test " + name, cwd=d)
    return os.path.join(d, name + ".pem")


def make_cert(d, node, ca="ca", san="IP:127.0.0.1"):
    """node.pem and node.key, signed by ca, valid for san."""
    Path(d, node + ".ext").write_text("subjectAltName=%s\n" % san)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", node + ".key", "-out", node + ".csr", "-subj", "/CN=" + node, cwd=d)
    openssl("x509", "-req", "-in", node + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
            "-CAcreateserial", "-out", node + ".pem", "-days", "2", "-extfile", node + ".ext",
            cwd=d)
    return os.path.join(d, node + ".pem"), os.path.join(d, node + ".key")


class TlsCluster(Cluster):
    """The cluster of test_cluster.py with https:// urls."""

    def __init__(self, top, watchdog, certs=None):
        super().__init__(top, watchdog)
        self.pki = os.path.join(top, "pki")
        os.makedirs(self.pki, exist_ok=True)
        self.ca = make_ca(self.pki)
        certs = certs or {}
        text = Path(self.conf).read_text().replace("http://", "https://")
        text = text.replace("[cluster]\n", "[cluster]\ntls_ca = pki/ca.pem\n", 1)
        for n in NODES:
            cert, key = make_cert(self.pki, n, ca=certs.get(n, "ca"))
            text = text.replace("[node %s]\n" % n, "[node %s]\ntls_cert = %s\ntls_key = %s\n"
                                % (n, os.path.relpath(cert, top), os.path.relpath(key, top)))
        Path(self.conf).write_text(text)
        self.ssl = ssl.create_default_context(cafile=self.ca)

    def answers(self, node):
        return _port_answers(self.ports[node], "https", self.ssl)

    def url(self, node, path=""):
        return "https://127.0.0.1:%d/v1/kv%s" % (self.ports[node], path)


def start_cluster(c):
    try:
        for n in NODES:
            c.start(n)
    except BaseException:
        stop_cluster(c)
        raise


def stop_cluster(c):
    c.unmount_all()
    if not c.problems:
        c.fsck_all()
    c.check_stderr()
    if c.problems:
        pytest.fail("\n\n".join(c.problems))


def curl(*args):
    r = subprocess.run(["curl", "-s", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"]
                       + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    body, _, code = r.stdout.rpartition(b"\n")
    return r.returncode, int(code or 0), body


@pytest.mark.timeout_s(180)
def test_https_cluster_copies_and_reads_across_nodes(tmp_top, watchdog):
    c = TlsCluster(tmp_top, watchdog)
    start_cluster(c)
    try:
        src = os.path.join(tmp_top, "src")
        shutil.copytree("/usr/include/net", src)
        run(["rsync", "-a", src + "/", c.p("a", "tree") + "/"], timeout=60)
        for n in ("b", "c"):
            run(["diff", "-r", src, c.p(n, "tree")], timeout=60)
        write_file(c.p("b", "tree", "new"), b"over tls\n")
        assert read_file(c.p("c", "tree", "new")) == b"over tls\n"

        # The key API over https, trusting the cluster's CA.
        rc, st, body = curl("--cacert", c.ca, "-H", BEARER, c.url("c", "/tree/new"))
        assert (rc, st, body) == (0, 200, b"over tls\n")
        rc, st, _ = curl("--cacert", c.ca, "-H", BEARER, "-X", "PUT", "--data-binary", "v2",
                         c.url("a", "/tree/new"))
        assert (rc, st) == (0, 204)
        assert read_file(c.p("b", "tree", "new")) == b"v2"
        # The CLI signs and checks certificates like a node does.
        r = run([SHARDFS_BIN, "get", "-c", c.conf, "--node", "b", "/tree/new"], timeout=30)
        assert r.stdout == "v2"
        # A client that does not trust the CA stops at the handshake
        # (curl 60: peer certificate cannot be authenticated).
        rc, st, _ = curl("-H", BEARER, c.url("c", "/tree/new"))
        assert rc == 60 and st == 0, (rc, st)
        # Plain HTTP to a TLS port gets no HTTP answer.
        rc, st, _ = curl("-H", BEARER, "http://127.0.0.1:%d/v1/kv/tree/new" % c.ports["c"])
        assert st == 0 and rc != 0, (rc, st)
        # The PUT replaced a file c had just read: c's registration of it
        # goes 100 ms after the release, and then the reaper frees the kept
        # inode; a cluster stopped before that leaves it kept until c's next
        # start, which fsck at teardown calls a problem.
        time.sleep(0.5)
    finally:
        stop_cluster(c)


@pytest.mark.timeout_s(180)
def test_node_with_a_foreign_certificate_gets_no_traffic(tmp_top, watchdog):
    d = os.path.join(tmp_top, "pki")
    os.makedirs(d)
    make_ca(d, "evil")
    c = TlsCluster(tmp_top, watchdog, certs={"b": "evil"})
    # b serves a certificate its peers do not trust; a and c still mount.
    for n in ("a", "c"):
        c.start(n)
    p = subprocess.Popen([SHARDFS_BIN, "serve", "-f", "-c", c.conf, "-n", "b"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    watchdog.daemons.add(p)
    try:
        ctx = ssl.create_default_context(cafile=os.path.join(d, "evil.pem"))
        deadline = time.monotonic() + 10
        while not _port_answers(c.ports["b"], "https", ctx):
            assert p.poll() is None and time.monotonic() < deadline, "b did not come up"
            time.sleep(0.05)
        # Files on every shard: those whose entry lies on b fail with an
        # error, none hangs, the rest work.
        t0 = time.monotonic()
        ok = failed = 0
        for i in range(40):
            try:
                write_file(c.p("a", "f%d" % i), b"x")
                ok += 1
            except OSError as e:
                assert e.errno in (5, 113), e  # EIO or EHOSTUNREACH
                failed += 1
        assert failed > 0 and ok > 0, (ok, failed)
        assert time.monotonic() - t0 < 30
    finally:
        p.terminate()
        p.wait(timeout=20)
        c.unmount_all()
        c.check_stderr()
    err = Path(c.top, "mount.a.1.stderr").read_text(errors="replace")
    assert re.search(r"certificate|SSL", err), err[-2000:]


def mount_fails(conf, mnt, node="a"):
    os.makedirs(mnt, exist_ok=True)
    r = run([SHARDFS_BIN, "mount", "-f", "-c", conf, "-n", node, mnt], check=False, timeout=30)
    assert r.returncode != 0
    return r.stderr


def test_tls_config_mistakes_name_file_and_line(tmp_top):
    d = os.path.join(tmp_top, "pki")
    os.makedirs(d)
    make_ca(d)
    make_cert(d, "a")
    make_cert(d, "b")
    conf = os.path.join(tmp_top, "shards.conf")
    mnt = os.path.join(tmp_top, "mnt")
    base = ("[cluster]\nshards = 2\nsecret = %s\n%s"
            "[node a]\nurl = %s://127.0.0.1:1\ndata_dir = da\nshards = 0\n%s"
            "[node b]\nurl = http://127.0.0.1:2\ndata_dir = db\nshards = 1\n")

    def check(ca, scheme, node_a, want):
        Path(conf).write_text(base % (SECRET, ca, scheme, node_a))
        err = mount_fails(conf, mnt)
        assert re.search(want, err), err

    cert = "tls_cert = pki/a.pem\ntls_key = pki/a.key\n"
    # https without a CA to check it by.
    check("", "https", cert, r"shards\.conf:5: url https://127\.0\.0\.1:1: https:// needs tls_ca")
    # A CA file that is not there.
    check("tls_ca = pki/nope.pem\n", "https", cert, r"shards\.conf:4: tls_ca .*nope\.pem: No such")
    # https without a certificate.
    check("tls_ca = pki/ca.pem\n", "https", "tls_key = pki/a.key\n",
          r"shards\.conf:5: \[node a\] has an https:// url but no tls_cert")
    # TLS files on an http:// node would be silently unused.
    check("tls_ca = pki/ca.pem\n", "http", cert, r"shards\.conf:9: \[node a\] tls_cert needs an https")
    # The server reads its files at start: a missing one, a key that is not
    # the certificate's, a certificate that is not PEM.
    check("tls_ca = pki/ca.pem\n", "https", "tls_cert = pki/gone.pem\ntls_key = pki/a.key\n",
          r"shards\.conf:9: tls_cert .*gone\.pem: No such file")
    check("tls_ca = pki/ca.pem\n", "https", "tls_cert = pki/a.pem\ntls_key = pki/b.key\n",
          r"shards\.conf:10: tls_key .*b\.key: the key does not match the certificate")
    check("tls_ca = pki/ca.pem\n", "https", "tls_cert = pki/a.ext\ntls_key = pki/a.key\n",
          r"shards\.conf:9: tls_cert .*a\.ext: not a PEM certificate")
