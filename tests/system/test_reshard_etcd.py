"""Resharding a replicated cluster with the shard map in etcd (issue 11;
fs/reshard.h, DESIGN.md "Resharding in a cluster") on three real nodes, each
mounted, every shard on two of them (test_replication's layout):

    shard   0-2   3-5   6-7
    primary  a     b     c
    replica  b     c     a

The primary of a shard splits it (the new shard on the same copies: its
primary here, its replicas build their copies from its change stream) and
merges it back, while strict writers and rsync write through every mount.
The map in etcd is read where the nodes read it; after each change every
mount shows every byte, `fsck --replicas` finds every copy equal, and the
map holds the new depth, the target led by the same node, its replica in
sync. kill -9 of the primary in the copy leaves the target building;
running the split again on the restarted node finishes it.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (SHARDFS_BIN, assert_same_tree, fsck_says_clean, make_tree, run,
                      tree_snapshot, wait_for)
from test_cluster import NODES, serve_cluster
from test_failover import FailoverCluster
from test_replcheck import fsck_replicas
from test_replication import etcd_server, etcd_url  # noqa: F401
from test_reshard import DONE, PASSED, StrictWriter

pytestmark = pytest.mark.uniform_layout


class ReshardCluster(FailoverCluster):
    def shard_map(self):
        """{shard: entry} of every shard the map holds (splits add some)."""
        every = self._range(self.prefix, self.prefix[:-1] + "0")
        out = {}
        for k, v in every.items():
            if k.startswith(self.prefix + "shard/"):
                out[int(k.rsplit("/", 1)[1])] = json.loads(v)
        for s, e in out.items():
            lk = self.prefix + "leader/%04d" % s
            e["leader"] = every[lk].decode() if lk in every else None
        return out


@pytest.fixture
def ecluster(tmp_top, watchdog, etcd_url):  # noqa: F811
    yield from serve_cluster(ReshardCluster(tmp_top, watchdog, etcd_url), watchdog)


def reshard(c, node, *args, check=True, timeout=300):
    r = run([SHARDFS_BIN, "reshard", args[0], "-c", c.conf, "-n", node, *args[1:]],
            check=False, timeout=timeout)
    if check:
        assert r.returncode == 0, "reshard %s on %s exited %d:\n%s\n%s" % (
            " ".join(args), node, r.returncode, r.stdout, r.stderr)
    return r


def same_tree(snap, path):
    assert_same_tree(snap, tree_snapshot(path, mtimes=False, dir_mtimes=False, owners=False))


def depths(c):
    return {s: e.get("depth", 3) for s, e in c.shard_map().items() if not e.get("building")}


def replicas_ok(c):
    last = []

    def ok():
        rc, states, text = fsck_replicas(c)
        last[:] = [text]
        return rc == 0
    try:
        wait_for(ok, 60, "fsck --replicas: every copy ok", interval=0.5)
    except BaseException:
        print(last[0] if last else "")
        raise
    return last[0]


@pytest.mark.timeout_s(900)
def test_primary_splits_and_merges_while_every_mount_writes(ecluster):
    c = ecluster
    src = os.path.join(c.top, "src")
    make_tree(src, seed=31)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    run(["rsync", "-aH", src + "/", c.p("b", "t") + "/"], timeout=300)
    # Shard 1 is a's (replica on b): split it, its new half 9 split again
    # (depth 3 -> 5 for those keys alone), then merged back.
    for step, args, shards, want in [
            (0, ("split", "1"), ("1", "9", "4"), {1: 4, 9: 4}),
            (1, ("split", "9"), ("9", "25", "5"), {1: 4, 9: 5, 25: 5}),
            (2, ("merge", "25"), ("9", "9", "4"), {1: 4, 9: 4}),
            (3, ("merge", "9"), ("1", "1", "3"), {1: 3})]:
        writers = [StrictWriter(c.p(n, "w%d-%s" % (step, n))) for n in NODES]
        rs = subprocess.Popen(["rsync", "-aH", src + "/", c.p("c", "r%d" % step) + "/"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.05)
        r = reshard(c, "a", *args)
        m = DONE.search(r.stdout)
        assert m and m.group(2, 3, 4) == shards, r.stdout
        waits = PASSED.findall(r.stdout)
        assert waits and all(float(ms) < 1000 for _, ms in waits), r.stdout
        out, err = rs.communicate(timeout=300)
        assert rs.returncode == 0, err
        for w in writers:
            w.finish()
            assert w.count > 0
        m = c.shard_map()
        got = depths(c)
        for s, d in want.items():
            assert got[s] == d, (step, got)
            assert m[s]["primary"] == "a" and m[s]["leader"] == "a", (s, m[s])
            assert m[s]["replicas"] == ["b"] and m[s]["in_sync"] == ["b"], (s, m[s])
        assert not any(e.get("building") for e in m.values()), m
        assert sum(1 << (5 - d) for d in got.values()) == 32, got  # a whole layout
        for n in NODES:
            same_tree(snap, c.p(n, "t"))
            same_tree(snap, c.p(n, "r%d" % step))
        for w in writers:
            w.verify()
        replicas_ok(c)
    # the copies of the merged-away shards are gone from their nodes
    for n in ("a", "b"):
        assert not os.path.exists(os.path.join(c.data[n], "shard-9")), n
        assert not os.path.exists(os.path.join(c.data[n], "shard-25")), n
    assert depths(c) == {i: 3 for i in range(8)}


def test_only_the_primary_changes_a_shard(ecluster):
    c = ecluster
    r = reshard(c, "b", "split", "1", check=False)  # a leads shard 1
    assert r.returncode != 0 and "not its primary" in r.stderr, r.stderr
    r = reshard(c, "a", "merge", "0", check=False)
    assert r.returncode == 1 and "no lower than the 8 shards" in r.stderr, r.stderr
    r = reshard(c, "a", "resume", check=False)
    assert r.returncode == 1 and "no split in flight" in r.stderr, r.stderr
    assert depths(c) == {i: 3 for i in range(8)}
    # --all: every shard the node leads (c: 6 and 7)
    r = reshard(c, "c", "split", "--all")
    assert [m.group(2, 3) for m in DONE.finditer(r.stdout)] == [("6", "14"), ("7", "15")], \
        r.stdout
    assert depths(c) == {**{i: 3 for i in range(6)}, 6: 4, 7: 4, 14: 4, 15: 4}
    with open(c.p("a", "x"), "wb") as f:
        f.write(b"x" * 5000)
    for s in ("14", "15"):
        reshard(c, "c", "merge", s)
    assert depths(c) == {i: 3 for i in range(8)}
    for n in NODES:
        assert open(c.p(n, "x"), "rb").read() == b"x" * 5000


def shard_records(c, shard):
    """{shard: records} as `fsck --replicas` counts them at each primary."""
    rc, states, text = fsck_replicas(c)
    assert rc == 0, text
    return {int(m.group(1)): int(m.group(2)) for m in re.finditer(
        r"^shard (\d+): position .* primary: (\d+) records", text, re.M)}


def copy_in_many(c, via, seed, count):
    """make_tree plus count small files (enough records that a split moves
    many), rsync'd to t through node via; the tree's snapshot."""
    src = os.path.join(c.top, "src")
    make_tree(src, seed=seed)
    os.makedirs(os.path.join(src, "more"))
    for i in range(count):
        with open(os.path.join(src, "more", "f%03d" % i), "wb") as f:
            f.write(b"%d\n" % i)
    run(["rsync", "-aH", src + "/", c.p(via, "t") + "/"], timeout=300)
    return tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)


def leader_of(c, shard):
    return c.shard_map()[shard]["leader"]


def settle(c, shards):
    """Every shard of shards led by its map primary, every replica in sync."""
    def ok():
        m = c.shard_map()
        return all(m[s]["leader"] == m[s]["primary"] and
                   m[s]["in_sync"] == m[s]["replicas"] for s in shards if s in m)
    wait_for(ok, 60, "shards %s led and in sync" % (shards,), interval=0.2)


def promote(c, shard, node):
    if leader_of(c, shard) == node:
        return
    r = run([SHARDFS_BIN, "promote", "-c", c.conf, str(shard), node], check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout_s(900)
def test_kill9_of_the_primary_at_each_phase_then_resume(ecluster, monkeypatch):
    """a splits shard 1 and kills itself (SHARDFS_TEST_KILL_AT) in the copy,
    right after the cut-over's txn, and in the purge. b, the in-sync replica,
    takes shard 1 over (and 9 once it was cut over: its replica was in sync
    before the txn); `reshard resume` on the new primary finishes: the split
    begun by a is taken back and made again, or the purge is done. Then the
    tree is whole through every mount, the copies are equal, and the records
    of shards 1 and 9 add up to shard 1's before the split (nothing left
    twice)."""
    c = ecluster
    snap = copy_in_many(c, "b", seed=37, count=300)
    settle(c, range(8))
    before = shard_records(c, 1)[1]
    for phase in ("copy", "cut-over", "purge"):
        c._stop("a")
        monkeypatch.setenv("SHARDFS_TEST_KILL_AT", phase)
        c.start("a")
        monkeypatch.delenv("SHARDFS_TEST_KILL_AT")
        settle(c, range(8))
        promote(c, 1, "a")
        r = reshard(c, "a", "split", "1", check=False)
        assert r.returncode == 2 and "closed the connection" in r.stderr, (r.returncode, r.stderr)
        c.proc["a"].wait(timeout=30)
        c.proc["a"] = None
        run(["fusermount3", "-uz", c.mnt["a"]], check=False, timeout=30)
        wait_for(lambda: leader_of(c, 1) == "b", 30, "b leading shard 1")
        st = run([SHARDFS_BIN, "status", "-c", c.conf], check=False, timeout=60).stdout
        if phase == "copy":  # the target waits for a resume, not placed
            assert re.search(r"^9 +a .*\(building: being split off shard 1, depth 4\)", st,
                             re.M), st
        else:
            assert re.search(r"^layout \(the shard map\):.* 1:4 .* 9:4 ", st, re.M), st
        c.start("a")
        r = reshard(c, "b", "resume")
        assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
        assert depths(c)[1] == 4 and depths(c)[9] == 4, (phase, depths(c))
        settle(c, (1, 9))
        for n in NODES:
            same_tree(snap, c.p(n, "t"))
        replicas_ok(c)
        counts = shard_records(c, 1)
        assert counts[1] + counts[9] - before in (0, 1, 2), (phase, before, counts)
        assert counts[9] > 30, counts
        # back to the start: b leads both buddies now
        r = reshard(c, "b", "merge", "9")
        assert DONE.search(r.stdout).group(2, 3, 4) == ("1", "1", "3"), r.stdout
        assert depths(c) == {i: 3 for i in range(8)}
        for n in NODES:
            same_tree(snap, c.p(n, "t"))


def test_a_restarted_node_takes_the_layout_from_the_map(ecluster):
    """The map holds the layout: a node that starts after a split (its own
    config says 8 shards) opens the split store, serves its part and shows
    every byte; its old copies of merged shards are gone."""
    c = ecluster
    src = os.path.join(c.top, "src")
    make_tree(src, seed=41)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    run(["rsync", "-aH", src + "/", c.p("c", "t") + "/"], timeout=300)
    reshard(c, "b", "split", "4")  # b leads 3-5, c holds the replicas
    c._stop("c")
    with open(c.p("a", "t", "late"), "wb") as f:
        f.write(b"written while c was down\n")
    # an offline check of c takes the split layout from the map too
    r = run([SHARDFS_BIN, "fsck", "-c", c.conf, "-n", "c"], check=False, timeout=120)
    assert r.returncode == 0 and fsck_says_clean(r), r.stdout + r.stderr
    c.start("c")
    settle(c, range(8))
    for n in NODES:
        assert open(c.p(n, "t", "late"), "rb").read() == b"written while c was down\n"
    c._stop("b")  # c takes 3-5 and 12 over
    wait_for(lambda: leader_of(c, 12) == "c" and leader_of(c, 4) == "c", 30, "c leading 4, 12")
    os.unlink(c.p("a", "t", "late"))
    for n in ("a", "c"):
        same_tree(snap, c.p(n, "t"))
    c.start("b")
    settle(c, range(8))
    r = reshard(c, "c", "merge", "12")
    assert DONE.search(r.stdout).group(2, 3, 4) == ("4", "4", "3"), r.stdout
    for n in NODES:
        same_tree(snap, c.p(n, "t"))
    replicas_ok(c)


def test_split_to_another_node_then_back(ecluster):
    """split 1 --to c: shard 9 is made beside shard 1 on a (and its replica
    b), then c gets a copy, takes the primary role and a's copy goes, so
    the new shard's data crossed to c. To merge back one node must lead
    both buddies: a gets a copy of 9 again and its role, then merges."""
    c = ecluster
    src = os.path.join(c.top, "src")
    make_tree(src, seed=43)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    run(["rsync", "-aH", src + "/", c.p("a", "t") + "/"], timeout=300)
    w = StrictWriter(c.p("b", "w"))
    r = reshard(c, "a", "split", "1", "--to", "c")
    w.finish()
    assert DONE.search(r.stdout).group(2, 3, 4) == ("1", "9", "4"), r.stdout
    m = c.shard_map()
    assert m[9]["primary"] == "c" and m[9]["leader"] == "c", m[9]
    assert sorted(m[9]["replicas"]) == ["b"] and m[9]["in_sync"] == ["b"], m[9]
    assert m[1]["primary"] == "a" and m[1]["depth"] == 4, m[1]
    wait_for(lambda: not os.path.exists(os.path.join(c.data["a"], "shard-9")), 30,
             "a's copy of shard 9 removed")
    assert os.path.exists(os.path.join(c.data["c"], "shard-9", "data.mdb"))
    for n in NODES:
        same_tree(snap, c.p(n, "t"))
    w.verify()
    replicas_ok(c)
    r = reshard(c, "a", "merge", "9", check=False)
    assert r.returncode != 0 and "not its primary" in r.stderr, r.stderr
    for args in (["replica", "add", "-c", c.conf, "9", "a"], ["promote", "-c", c.conf, "9", "a"]):
        p = run([SHARDFS_BIN] + args, check=False, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    r = reshard(c, "a", "merge", "9")
    assert DONE.search(r.stdout).group(2, 3, 4) == ("1", "1", "3"), r.stdout
    assert depths(c) == {i: 3 for i in range(8)}
    for n in NODES:
        same_tree(snap, c.p(n, "t"))
    replicas_ok(c)


def test_a_node_that_missed_the_split_is_refused_and_follows(ecluster):
    """c is stopped (SIGSTOP) while a splits shard 1, so its map and
    layout are the old ones when it goes on with writes queued in its
    FUSE device: a write it sends to shard 1 for a key that moved is
    refused (421) before it does anything, c takes the map's layout and
    sends it to shard 9. Every file is then read back through every mount,
    and the copies are equal."""
    c = ecluster
    names = ["s%03d" % i for i in range(120)]
    os.makedirs(c.p("c", "d"))
    pid = c.proc["c"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        r = reshard(c, "a", "split", "1")
        assert DONE.search(r.stdout).group(2, 3) == ("1", "9"), r.stdout
        errors = []

        def write(name):
            try:
                with open(c.p("c", "d", name), "wb") as f:
                    f.write(name.encode() * 10)
            except OSError as e:
                errors.append((name, e))
        threads = [threading.Thread(target=write, args=(n,)) for n in names]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the writes wait in c's FUSE queue
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    for n in NODES:
        got = sorted(os.listdir(c.p(n, "d")))
        assert got == names, (n, len(got))
        for name in names:
            assert open(c.p(n, "d", name), "rb").read() == name.encode() * 10, (n, name)
    settle(c, range(8))
    replicas_ok(c)
    reshard(c, "a", "merge", "9")
    for n in NODES:
        assert sorted(os.listdir(c.p(n, "d"))) == names, n


@pytest.mark.timeout_s(600)
def test_kill9_of_the_targets_replica_during_the_copy(ecluster, monkeypatch):
    """b holds the replica of shard 1, so of the new shard 9 too. a's copy
    is held for 3 s (SHARDFS_TEST_HOLD_AT) and b is killed -9 meanwhile and
    started again: the cut-over waits until b's copy of 9 has caught up and
    is in sync, then the split is made; nothing is lost or left twice."""
    c = ecluster
    snap = copy_in_many(c, "c", seed=47, count=200)
    c._stop("a")
    monkeypatch.setenv("SHARDFS_TEST_HOLD_AT", "copy:3000")
    c.start("a")
    monkeypatch.delenv("SHARDFS_TEST_HOLD_AT")
    settle(c, range(8))
    promote(c, 1, "a")
    before = shard_records(c, 1)[1]
    p = subprocess.Popen([SHARDFS_BIN, "reshard", "split", "-c", c.conf, "-n", "a", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert p.poll() is None, p.communicate()
    c.kill9("b")
    c.start("b")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    assert DONE.search(out).group(2, 3) == ("1", "9"), out
    m = c.shard_map()
    assert m[9]["replicas"] == ["b"] and m[9]["in_sync"] == ["b"], m[9]
    settle(c, range(8))
    for n in NODES:
        same_tree(snap, c.p(n, "t"))
    replicas_ok(c)
    counts = shard_records(c, 1)
    assert counts[1] + counts[9] - before in (0, 1, 2), (before, counts)
    reshard(c, "a", "merge", "9")
    for n in NODES:
        same_tree(snap, c.p(n, "t"))
