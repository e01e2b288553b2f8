"""`shardfs fsck --replicas` (issue 10): every replica of every shard
compared with its primary at one position, on the running cluster of
test_replication.py (three nodes, every shard on two, static map, map in
etcd, ack = primary).

The primary holds the shard's writes for one hash pass of its copy at its
position P and stops its replicas' streams at P; each replica hashes its
copy there (backend/replica_sync.c, step 6). So the check must say ok under
a running writer (no false mismatch), MISMATCH for a copy whose data was
changed behind its back (one record written into its data.mdb with the
node stopped: same position, other data), unreachable for a dead node, and
ok again once a replica that was down while much was written has caught up.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from conftest import SHARDFS_BIN, read_file, run, wait_for, write_file
from test_cluster import NODES
from test_replication import (SHARDS, assert_copies_identical,  # noqa: F401
                              etcd_server, etcd_url, names_on, rcluster, replica_view, signed,
                              wait_level)


def fsck_replicas(c, *args):
    """Run `shardfs fsck --replicas`: (exit code, {shard: {node: state}}, text)."""
    r = subprocess.run([SHARDFS_BIN, "fsck", "--replicas", "-c", c.conf] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, text=True)
    states = {}
    for line in r.stdout.splitlines():
        # "shard 3: b          ok (...)", "shard 3: primary b: unreachable (...)"
        if not line.startswith("shard ") or ": position " in line:
            continue
        head, rest = line.split(":", 1)
        words = rest.split()
        if words[0] == "primary":
            states.setdefault(int(head.split()[1]), {})[words[1].rstrip(":")] = \
                "primary " + words[2]
        else:
            states.setdefault(int(head.split()[1]), {})[words[0]] = words[1].rstrip(":")
    return r.returncode, states, r.stdout + r.stderr


def all_ok(states):
    """Every shard listed, its one replica ok (wherever a failover put it)."""
    return sorted(states) == list(range(SHARDS)) and all(
        len(states[s]) == 1 and list(states[s].values()) == ["ok"] for s in range(SHARDS))


def assert_all_ok(c, *args):
    rc, states, text = fsck_replicas(c, *args)
    assert rc == 0 and "MISMATCH" not in text and all_ok(states), text
    return text


def wait_all_ok(c, deadline):
    """Poll the check itself until every copy is ok (a replica catching up
    is "behind" until then); its text."""
    last = [""]

    def ok():
        rc, states, last[0] = fsck_replicas(c)
        assert "MISMATCH" not in last[0], last[0]
        return rc == 0 and all_ok(states)
    try:
        wait_for(ok, deadline, "fsck --replicas ok", interval=0.5)
    except BaseException:
        print(last[0])
        raise
    return last[0]


class Writer:
    """Files rewritten through two mounts, each write checked, until stop."""

    def __init__(self, c, nodes=("a", "c"), files=24, size=(1, 200000)):
        self.c, self.nodes, self.files, self.size = c, nodes, files, size
        self.stop = threading.Event()
        self.errors, self.count = [], 0
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True)
                        for n in nodes]

    def run(self, node):
        i = 0
        while not self.stop.is_set():
            name = "w-%s-%d" % (node, i % self.files)
            data = os.urandom(self.size[0] + (i * 7919) % self.size[1])
            try:
                write_file(self.c.p(node, name), data)
                assert read_file(self.c.p(node, name)) == data
            except (OSError, AssertionError) as e:
                self.errors.append((node, name, repr(e)))
                return
            self.count += 1
            i += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors


def damage_copy(data_dir, shard, key=b"Zfsck-damage", value=b"not the primary's"):
    """One record put into the committed state of a stopped node's copy of
    shard with LMDB's own tool: same position, other data."""
    path = os.path.join(data_dir, "shard-%d" % shard, "data.mdb")
    r = subprocess.run(["mdb_load", "-n", "-T", path], input=key + b"\n" + value + b"\n",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    if os.path.exists(path + "-lock"):
        os.unlink(path + "-lock")


@pytest.mark.timeout_s(600)
def test_fsck_replicas_ok_under_load_and_finds_a_changed_record(rcluster):
    c = rcluster
    run(["rsync", "-a", "/usr/include/net/", c.p("a", "net") + "/"], timeout=300)
    run(["rsync", "-a", "/usr/include/netinet/", c.p("b", "netinet") + "/"], timeout=300)
    wait_level(c)
    text = assert_all_ok(c)
    print(text)
    # Under two running writers: every copy ok, never a false mismatch.
    with Writer(c) as w:
        time.sleep(0.5)
        for _ in range(3):
            text = assert_all_ok(c)
        held = [int(l.rsplit("writes held ", 1)[1].split()[0])
                for l in text.splitlines() if "writes held" in l]
    print(text)
    print("%d writes during the checks; writes held %s ms" % (w.count, held))
    assert w.count > 0
    # One record more in b's copy of shard 0, written with b stopped (b
    # alone: a stays the primary of shard 0, and b's copy a replica at a
    # position of a's history; with etcd, c takes over b's shards 3-5).
    c._stop("b")
    damage_copy(c.data["b"], 0)
    c.start("b")
    rc, states, text = fsck_replicas(c)
    print(text)
    assert rc == 1, text
    assert states[0] == {"b": "MISMATCH"}, text
    assert all(len(states[s]) == 1 and list(states[s].values()) == ["ok"]
               for s in range(1, SHARDS)), text
    assert text.count("MISMATCH") == 1, text
    # Under load too.
    with Writer(c):
        rc, states, text = fsck_replicas(c)
    assert rc == 1 and states[0] == {"b": "MISMATCH"}, text
    # The damaged copy wiped: b copies shard 0 again (a snapshot); ok.
    c._stop("b")
    shutil.rmtree(os.path.join(c.data["b"], "shard-0"))
    c.start("b")
    wait_all_ok(c, 120)
    # A dead replica: unreachable, and the check fails (a holds the
    # replicas of shards 6-7).
    c.kill9("a")
    rc, states, text = fsck_replicas(c)
    print(text)
    assert rc == 1, text
    for s in (6, 7):
        assert states[s] == {"a": "unreachable"}, text
    c.start("a")


@pytest.mark.timeout_s(900)
def test_replica_down_while_written_catches_up_and_checks_ok(rcluster):
    """b, which holds the replicas of shards 0-2, is down (kill -9) while
    96 MiB go in through a (72 MiB onto shard 0 alone, more than its
    stream's 64 MiB), then back: it catches up (from the stream's tail,
    which the primary keeps for a node silent less than 10 minutes, or by a
    snapshot), and `fsck --replicas` then says every copy ok, also with a
    writer running; after a clean stop the copies are byte-identical."""
    c = rcluster
    names0 = names_on(c, {0}, 72, "s0")
    names12 = names_on(c, {1, 2}, 24, "s12")
    wait_level(c)
    assert_all_ok(c)
    c.kill9("b")
    rc, states, text = fsck_replicas(c)
    assert rc == 1 and states[0] == {"b": "unreachable"}, text
    t0 = time.monotonic()
    for name in names0 + names12:
        write_file(c.p("a", name), os.urandom(1 << 20))
    print("96 MiB written with b down in %.1f s" % (time.monotonic() - t0))
    t0 = time.monotonic()
    c.start("b")
    text = wait_all_ok(c, 300)
    took = time.monotonic() - t0
    view = replica_view(c, "b")
    print("b checked ok %.1f s after its start; snapshots: %s" % (
        took, {s: view[s]["snapshots"] for s in (0, 1, 2) if s in view}))
    print(text)
    with Writer(c, nodes=("c",)):
        assert_all_ok(c)
    c.unmount_all()
    assert_copies_identical(c, min_records=96)


@pytest.mark.parametrize("rcluster", ["static"], indirect=True)
def test_warm_reads_a_copy_and_a_replica_short_of_the_position_is_behind(rcluster):
    """The route under `fsck --replicas` (fs/replication.h): "warm" reads a
    node's copy of a shard into memory and says how much it read, or
    ENOENT on a node with no copy; a replica asked for its hash at a
    position it does not reach within wait_ms answers ETIMEDOUT, "behind",
    with where its copy is (the CLI prints "behind")."""
    c = rcluster
    for name in names_on(c, {0}, 4, "w"):  # 4 MiB on shard 0: a primary, b replica
        write_file(c.p("a", name), os.urandom(1 << 20))
    wait_level(c)
    path = os.path.join(c.data["b"], "shard-0", "data.mdb")
    # b's copy takes what it applied into its file within a second or so
    wait_for(lambda: os.path.getsize(path) >= 4 << 20, 20, "b's copy in its data file")

    def ask(node, body):
        st, _, raw = signed(c, node, "POST", "/v1/checksum", json.dumps(body).encode())
        assert st == 200, (node, st, raw[:300])
        return json.loads(raw)

    got = ask("b", {"shard": 0, "warm": True})
    # the whole file as it was (it only grows: a's registration drops, 0.1 s
    # after each close, are writes to shard 0 too)
    assert got["done"] is True and 4 << 20 <= got["bytes"] <= os.path.getsize(path), got
    got = ask("c", {"shard": 0, "warm": True})    # c holds no copy of shard 0
    assert got["done"] is False and got["errno"] == "ENOENT", got

    pos = replica_view(c, "b")[0]
    far = {"shard": 0, "epoch": 1, "lsn": pos["lsn"] + 1000000, "check": "1", "wait_ms": 300}
    t0 = time.monotonic()
    got = ask("b", far)
    took = time.monotonic() - t0
    assert got["done"] is False and got["errno"] == "ETIMEDOUT", got
    # where b's copy is: not before what it had, never at the position asked
    assert got["error"].startswith("behind: at lsn %d (epoch " % got["lsn"]), got
    assert pos["lsn"] <= got["lsn"] < far["lsn"] and 0.3 <= took < 5, (got, took)
    # And the check itself, with the copies level, still says ok.
    assert_all_ok(c)
