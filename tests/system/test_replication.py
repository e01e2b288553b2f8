"""Replication (issue 10, part C) on three real nodes, each mounted: every
shard on two nodes (a primary and one replica), ack = replica.

    shard   0-2   3-5   6-7
    primary  a     b     c
    replica  b     c     a

Each node's replica-sync thread pulls its replica shards' change streams
from their primaries (backend/replica_sync.c). The checks look at both
sides: the positions the primaries and the replicas report (the position
route, wire.h, and GET /v1/replicas, fs/replication.h) must meet, and after
a clean stop every replica's LMDB file must hold exactly its primary's
records (mdb_dump of both data.mdb files, the shards' own 'M' records and
the stream's 'L' entries left out: those describe each copy, not the data).

The cluster of test_cluster.py is reused with this layout (its teardown
unmounts, fails on bad daemon stderr and fsck's every node); each test runs
with the static shard map (shards.conf) and with the map in an etcd of its
own (where the in-sync set starts empty and a replica joins once its
primary saw it level), and with ack = primary.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (SHARDFS_BIN, free_port, kill_group, read_file, run, wait_for,
                      write_file)
from test_cluster import NODES, SECRET, TIMEOUT_MS, Cluster, serve_cluster
from test_cluster_api import signed

OWNERS = {"a": "0-2", "b": "3-5", "c": "6-7"}
REPLICAS = {"a": "6-7", "b": "0-2", "c": "3-5"}
PRIMARY_OF = {s: n for n, r in (("a", range(0, 3)), ("b", range(3, 6)), ("c", range(6, 8)))
              for s in r}
REPLICA_OF = {s: n for n, r in (("b", range(0, 3)), ("c", range(3, 6)), ("a", range(6, 8)))
              for s in r}
SHARDS = 8
LAG_MS = 500
LEVEL_DEADLINE = 60.0
ETCD_BIN = "/usr/bin/etcd"


class ReplCluster(Cluster):
    """test_cluster's Cluster with replicas and the ack mode in shards.conf,
    and the shard map in etcd when etcd_url is given."""

    def __init__(self, top, watchdog, ack="replica", etcd_url=None):
        super().__init__(top, watchdog)
        text = Path(self.conf).read_text()
        text = text.replace("timeout_ms = %d\n" % TIMEOUT_MS,
                            "timeout_ms = %d\nack = %s\nreplica_lag_ms = %d\n%s"
                            % (TIMEOUT_MS, ack, LAG_MS,
                               "etcd = %s\n" % etcd_url if etcd_url else ""))
        for n in NODES:
            text = text.replace("shards = %s\n" % OWNERS[n],
                                "shards = %s\nreplicas = %s\n" % (OWNERS[n], REPLICAS[n]))
        assert text.count("replicas = ") == 3
        Path(self.conf).write_text(text)
        self.etcd_url = etcd_url

    def before_fsck(self):
        if self.etcd_url:
            etcd_reset(self.etcd_url)

    def unmount_all(self):
        # A mount drops its open registrations 0.1 s after the last close
        # (DESIGN.md, "Files open on other nodes"): a write to the files'
        # shards. Stopping the nodes one by one before that, a drop could
        # reach a primary whose replica has stopped, and the copies would
        # differ by it (assert_copies_identical).
        time.sleep(0.5)
        super().unmount_all()


class EtcdServer:
    """An etcd of its own on two free loopback ports, its data in the test's
    directory, stopped by its PID; stop() and start() again (same ports,
    same data) restart it, as an operator would."""

    def __init__(self, top, watchdog):
        self.top, self.watchdog = top, watchdog
        self.url = "http://127.0.0.1:%d" % free_port()
        self.peer = "http://127.0.0.1:%d" % free_port()
        self.p = None
        self.log = open(os.path.join(top, "etcd.log"), "ab")

    def start(self):
        assert self.p is None
        self.p = subprocess.Popen(
            [ETCD_BIN, "--name", "t", "--data-dir", os.path.join(self.top, "etcd"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
             "--initial-cluster", "t=" + self.peer, "--enable-grpc-gateway=true"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        self.watchdog.daemons.add(self.p)
        wait_for(self.up, 20, "etcd", interval=0.1)

    def up(self):
        assert self.p.poll() is None, "etcd exited %s" % self.p.returncode
        try:
            urllib.request.urlopen(urllib.request.Request(
                self.url + "/v3/kv/range", data=b'{"key":"AA=="}', method="POST"), timeout=1)
            return True
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM):
        """Stop it (SIGKILL: as a crash would)."""
        if self.p is None:
            return
        self.p.send_signal(sig)
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_group(self.p.pid)
            self.p.wait(timeout=10)
        self.watchdog.daemons.discard(self.p)
        self.p = None


@pytest.fixture
def etcd_server(tmp_top, watchdog):
    if not os.path.exists(ETCD_BIN):
        pytest.skip("no %s (Debian's etcd-server)" % ETCD_BIN)
    e = EtcdServer(tmp_top, watchdog)
    try:
        e.start()
        yield e
    finally:
        e.stop()
        e.log.close()


@pytest.fixture
def etcd_url(etcd_server):
    """The url of the test's etcd (etcd_server)."""
    return etcd_server.url


def etcd_reset(url):
    """Delete every shardfs key of the etcd at url. A clean stop of the
    nodes one by one lets the running ones take over the stopped ones'
    shards (fs/failover.h), so the map ends with primaries that fsck_all
    (each node checked while only the other two run) cannot always reach.
    The copies are level after a clean stop, so each fsck round may start
    from the map of shards.conf again (Cluster.before_fsck)."""
    import base64
    body = json.dumps({"key": base64.b64encode(b"/shardfs/").decode(),
                       "range_end": base64.b64encode(b"/shardfs0").decode()}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "/v3/kv/deleterange", data=body,
                                                  method="POST"), timeout=10).read()


@pytest.fixture(params=["static", "etcd", "ack-primary"])
def rcluster(request, tmp_top, watchdog):
    url = request.getfixturevalue("etcd_url") if request.param == "etcd" else None
    c = ReplCluster(tmp_top, watchdog, etcd_url=url,
                    ack="primary" if request.param == "ack-primary" else "replica")
    c.ack = "primary" if request.param == "ack-primary" else "replica"
    yield from serve_cluster(c, watchdog)


# ---------------------------------------------------------------------------
# What the nodes say


def get_json(c, node, path):
    st, _, body = signed(c, node, "GET", path)
    assert st == 200, (node, path, st, body[:300])
    return json.loads(body)


def primary_position(c, shard):
    """The primary's view of shard (GET /v1/shard/N/position)."""
    return get_json(c, PRIMARY_OF[shard], "/v1/shard/%d/position" % shard)


def replica_view(c, node):
    """{shard: entry} of node's replica copies (GET /v1/replicas)."""
    return {e["shard"]: e for e in get_json(c, node, "/v1/replicas")["replicas"]}


def unlevel(c):
    """The copies whose position is not their primary's: [] when every
    replica holds exactly its primary's history (same lsn and check)."""
    views = {n: replica_view(c, n) for n in NODES if c.proc[n] is not None}
    out = []
    for s in range(SHARDS):
        p = primary_position(c, s)
        r = views.get(REPLICA_OF[s], {}).get(s)
        if r is None:
            out.append((s, "no replica entry"))
        elif (r["lsn"], str(r["check"])) != (p["lsn"], str(p["check"])):
            out.append((s, "replica %s at %s/%s, primary %s at %s/%s, %s" % (
                REPLICA_OF[s], r["lsn"], r["check"], PRIMARY_OF[s], p["lsn"], p["check"],
                r["phase"])))
    return out


def wait_level(c, deadline=LEVEL_DEADLINE):
    last = []

    def level():
        last[:] = unlevel(c)
        return not last
    try:
        wait_for(level, deadline, "every replica level with its primary", interval=0.1)
    except BaseException:
        print("not level:", last)
        raise


def in_sync(c, shard, node):
    for r in primary_position(c, shard).get("replicas", []):
        if r["node"] == node:
            return r["in_sync"]
    pytest.fail("shard %d: the primary does not list replica %s" % (shard, node))


def entry_shard(c, node, name):
    """The shard of /name's directory entry (the key API says so in
    X-Shardfs-Shard; unless renamed, the file's inode and data are there)."""
    req = urllib.request.Request("http://127.0.0.1:%d/v1/kv/%s" % (c.ports[node], name),
                                 method="HEAD",
                                 headers={"Authorization": "Bearer " + SECRET})
    with urllib.request.urlopen(req, timeout=20) as r:
        return int(r.headers["X-Shardfs-Shard"])


def names_on(c, shards, count, prefix):
    """count new files /PREFIX-i made through a whose entries (and inodes)
    are on one of shards."""
    out = []
    i = 0
    while len(out) < count:
        name = "%s-%d" % (prefix, i)
        i += 1
        write_file(c.p("a", name), b"")
        if entry_shard(c, "a", name) in shards:
            out.append(name)
        else:
            os.unlink(c.p("a", name))
        assert i < count * 20, "no names land on shards %s" % (shards,)
    return out


# ---------------------------------------------------------------------------
# What the stores hold


def dump_records(data_dir, shard, tmp):
    """{key: value} (hex text, as mdb_dump prints them) of one shard's
    data.mdb, without its 'M' (shard-local) and 'L' (stream) records."""
    src = os.path.join(data_dir, "shard-%d" % shard, "data.mdb")
    copy = os.path.join(tmp, "dump-%d.mdb" % shard)
    shutil.copyfile(src, copy)
    try:
        out = run(["mdb_dump", "-n", copy], timeout=120).stdout.splitlines()
    finally:
        for f in (copy, copy + "-lock"):
            if os.path.exists(f):
                os.unlink(f)
    body = out[out.index("HEADER=END") + 1:out.index("DATA=END")]
    assert len(body) % 2 == 0
    recs = {}
    for k, v in zip(body[0::2], body[1::2]):
        k = k.strip()
        if k[:2] in ("4d", "4c"):  # 'M', 'L'
            continue
        recs[k] = v.strip()
    return recs


def assert_copies_identical(c, min_records=1):
    """Every node stopped: each replica's records are its primary's."""
    for n in NODES:
        assert c.proc[n] is None, "stop the cluster first"
    tmp = os.path.join(c.top, "dumps")
    os.makedirs(tmp, exist_ok=True)
    total = 0
    for s in range(SHARDS):
        p = dump_records(c.data[PRIMARY_OF[s]], s, tmp)
        r = dump_records(c.data[REPLICA_OF[s]], s, tmp)
        total += len(p)
        if p != r:
            missing = [k for k in p if k not in r]
            extra = [k for k in r if k not in p]
            differ = [k for k in p if k in r and p[k] != r[k]]
            pytest.fail("shard %d: replica on %s differs from primary on %s: %d missing, "
                        "%d extra, %d different (e.g. %s)" % (
                            s, REPLICA_OF[s], PRIMARY_OF[s], len(missing), len(extra),
                            len(differ), (missing + extra + differ)[:3]))
    assert total >= min_records, "too little data to compare (%d records)" % total


def status_text(c):
    r = subprocess.run([SHARDFS_BIN, "status", "-c", c.conf], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60, text=True)
    return r.returncode, r.stdout


# ---------------------------------------------------------------------------


@pytest.mark.timeout_s(600)
def test_every_replica_holds_its_primarys_records(rcluster):
    c = rcluster
    run(["rsync", "-a", "/usr/include/net/", c.p("a", "net") + "/"], timeout=300)
    run(["rsync", "-a", "/usr/include/linux/netfilter/", c.p("c", "nf") + "/"], timeout=300)
    run(["rsync", "-a", "/usr/include/netinet/", c.p("b", "netinet") + "/"], timeout=300)
    big = os.urandom(3 << 20)
    write_file(c.p("c", "big.bin"), big)
    run(["sh", "-c", "echo hello from b > '%s'; cat '%s' > '%s'"
         % (c.p("b", "hello"), c.p("b", "hello"), c.p("c", "hello.copy"))])
    os.rename(c.p("a", "net", "if.h"), c.p("a", "if.h.moved"))
    os.unlink(c.p("b", "netinet", "tcp.h"))
    wait_level(c)
    for s in range(SHARDS):
        wait_for(lambda s=s: in_sync(c, s, REPLICA_OF[s]), 10, "shard %d's replica in sync" % s)
    # Through a's mount, the tree c wrote.
    run(["diff", "-r", "/usr/include/linux/netfilter", c.p("a", "nf")])
    rc, text = status_text(c)
    assert rc == 0, text
    rows = [l.split() for l in text.splitlines() if " replica " in l]
    assert len(rows) == SHARDS, text
    for row in rows:
        assert row[1] == REPLICA_OF[int(row[0])] and row[7] == "yes" and row[8] == "streaming", \
            text
    # With ack = replica the waiting writers pushed their batches to the
    # replicas (replica_push, on by default); with ack = primary nobody waits,
    # and the pulls alone carry the stream.
    views = {n: replica_view(c, n) for n in NODES}
    for s in range(SHARDS):
        pushes = views[REPLICA_OF[s]][s]["pushes"]
        if c.ack == "replica":
            assert pushes > 0, (s, views[REPLICA_OF[s]][s])
        else:
            assert pushes == 0, (s, views[REPLICA_OF[s]][s])
    # Through the mounts, after all that: the files are there, on every node.
    assert read_file(c.p("a", "big.bin")) == big
    assert read_file(c.p("a", "hello.copy")) == b"hello from b\n"
    c.unmount_all()
    assert_copies_identical(c, min_records=200)


@pytest.mark.timeout_s(600)
def test_killed_replica_catches_up_from_the_tail(rcluster):
    """b holds the replicas of a's shards 0-2. Files on those shards are
    rewritten through a while b is killed (kill -9) and restarted: no
    write waits much longer than replica_lag_ms (b leaves the in-sync set),
    b comes back level from the stream's tail (no snapshot), rejoins the
    in-sync set, and its copies end identical to a's."""
    c = rcluster
    if c.ack != "replica":
        pytest.skip("with ack = primary no write waits and nobody leaves the in-sync set")
    names = names_on(c, {0, 1, 2}, 12, "tail")
    stop = threading.Event()
    slowest = [0.0]
    written = {}
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            name = names[i % len(names)]
            data = (b"%s round %d\n" % (name.encode(), i)) * (1 + i % 300)
            t0 = time.monotonic()
            try:
                write_file(c.p("a", name), data)
            except OSError as e:
                errors.append((name, e))
                return
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            written[name] = data
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        c.kill9("b")
        slowest[0] = 0.0
        time.sleep(3.0)
        assert not errors, errors
        print("slowest write with b dead: %.3f s, %d files" % (slowest[0], len(written)))
        assert slowest[0] < LAG_MS / 1000.0 + 1.0, \
            "a write waited %.2f s with its replica dead (replica_lag_ms %d)" % (
                slowest[0], LAG_MS)
        for s in (0, 1, 2):
            assert not in_sync(c, s, "b"), "shard %d: dead replica still in sync" % s
        c.start("b")
        time.sleep(2.0)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    wait_level(c)
    view = replica_view(c, "b")
    for s in (0, 1, 2):
        assert view[s]["snapshots"] == 0, (s, view[s])
        wait_for(lambda s=s: in_sync(c, s, "b"), 10, "b back in shard %d's in-sync set" % s)
    for name, data in written.items():
        assert read_file(c.p("c", name)) == data, name
    c.unmount_all()
    assert_copies_identical(c, min_records=20)


@pytest.mark.timeout_s(900)
def test_wiped_replica_catches_up_by_snapshot(rcluster):
    """Shard 0 gets more than the stream keeps (64 MiB), so its stream no
    longer starts at the empty position. b's data directory is then wiped
    and b restarted: its copy of shard 0 is empty, which the primary can no
    longer stream from (409 ERANGE), so b copies a's records (snapshot) and
    then the stream; kill -9 in the middle of that snapshot, and the next
    start begins again. It ends identical to a's copy."""
    c = rcluster
    names = names_on(c, {0}, 80, "bulk")
    for i, name in enumerate(names):
        write_file(c.p("a", name), os.urandom(1 << 20))
    wait_level(c)
    c.unmount_all()  # b cleanly; the others restart below
    # The stops moved primaries (failover); the copies are level: the
    # layout of shards.conf again, so b's wiped copies are replicas.
    c.before_fsck()
    for s in (0, 1, 2):
        shutil.rmtree(os.path.join(c.data["b"], "shard-%d" % s))
    for n in ("a", "c"):
        c.start(n)
    c.start("b")
    wait_for(lambda: replica_view(c, "b")[0]["snapshots"] >= 1, 30, "a snapshot of shard 0 on b")
    # The middle of it, if it is not over already: kill -9, start again.
    if replica_view(c, "b")[0]["phase"] == "snapshot":
        c.kill9("b")
        c.start("b")
    write_file(c.p("a", names[0]), b"written after the snapshot began\n")
    wait_level(c, deadline=300)
    v = replica_view(c, "b")[0]
    print("snapshot of shard 0: %d records, %.1f MiB, %.1f MiB/s" % (
        v["snap_records"], v["snap_bytes"] / 1048576.0, v["snap_rate"] / 1048576.0))
    assert v["snapshots"] >= 1
    rc, text = status_text(c)
    assert rc == 0, text
    c.unmount_all()
    assert_copies_identical(c, min_records=80)
