"""Resharding a cluster without replicas or etcd (issue 11): a node splits and
merges its own shards, mounted, while the mounts of all three nodes read and
write. The new shard stays beside the old one on its node; the other nodes
learn the layout from that node's refusals (421 EBADSLT: wire.h, "Layouts")
and, when they start, by asking it. The fixture fscks every node at the end
(with a shard still split).
"""

import os
import re
import subprocess
import time

import pytest

from conftest import SHARDFS_BIN, assert_same_tree, make_tree, run, tree_snapshot

# They make their own layouts.
pytestmark = pytest.mark.uniform_layout
from test_cluster import Cluster, serve_cluster
from test_reshard import DONE, PASSED, StrictWriter


@pytest.fixture
def cluster(tmp_top, watchdog):
    yield from serve_cluster(Cluster(tmp_top, watchdog), watchdog)


def reshard(c, node, *args, check=True):
    r = run([SHARDFS_BIN, "reshard", args[0], "-c", c.conf, "-n", node, *args[1:]],
            check=False, timeout=300)
    if check:
        assert r.returncode == 0, "reshard %s on %s exited %d:\n%s\n%s" % (
            " ".join(args), node, r.returncode, r.stdout, r.stderr)
    return r


def layout(c, node):
    """{shard: depth} of node's own view, from its DATA/STORE."""
    text = open(os.path.join(c.data[node], "STORE")).read()
    if text.startswith("shardfs-store 1"):
        n = int(re.search(r"^shards (\d+)", text, re.M).group(1))
        return {i: n.bit_length() - 1 for i in range(n)}
    return {int(s): int(d) for s, d in re.findall(r"^shard (\d+) (\d+)$", text, re.M)}


def same_tree(snap, path):
    assert_same_tree(snap, tree_snapshot(path, mtimes=False, dir_mtimes=False, owners=False))


def fsync_tree(top):
    """fsync every file and directory under top (each one's inode shard)."""
    for root, dirs, files in os.walk(top):
        for name in dirs + files + [""]:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def test_a_node_splits_and_merges_its_shard_while_every_mount_writes(cluster):
    c = cluster
    src = os.path.join(c.top, "src")
    make_tree(src, seed=23)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    run(["rsync", "-aH", src + "/", c.p("b", "t") + "/"], timeout=300)
    passed = 0
    # Shard 1 is a's (OWNERS): split it, its new half 9 split again (depth 3 -> 5
    # for those keys alone), then merged back; b and c write all along.
    for step, node, args, shards in [(0, "a", ("split", "1"), ("1", "9", "4")),
                                     (1, "a", ("split", "9"), ("9", "25", "5")),
                                     (2, "a", ("merge", "25"), ("9", "9", "4")),
                                     (3, "a", ("merge", "9"), ("1", "1", "3"))]:
        writers = [StrictWriter(c.p(n, "w%d-%s" % (step, n))) for n in ("b", "c")]
        rs = subprocess.Popen(["rsync", "-aH", src + "/", c.p("c", "r%d" % step) + "/"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.05)
        r = reshard(c, node, *args)
        m = DONE.search(r.stdout)
        assert m and m.group(2, 3, 4) == shards, r.stdout
        waits = PASSED.findall(r.stdout)
        assert waits and all(float(ms) < 1000 for _, ms in waits), r.stdout
        passed += sum(int(n) for n, _ in waits)
        out, err = rs.communicate(timeout=300)
        assert rs.returncode == 0, err
        for w in writers:
            w.finish()
            assert w.count > 0
        # Every mount sees every byte: the moved records too, through the
        # nodes that had the old layout.
        for n in ("a", "b", "c"):
            same_tree(snap, c.p(n, "t"))
            same_tree(snap, c.p(n, "r%d" % step))
        # fsync and statfs reach the new shard too (its node's server knew
        # only the shards it started with: EINVAL)
        for n in ("b", "c"):
            fsync_tree(c.p(n, "r%d" % step))
            os.statvfs(c.p(n, ""))
        for w in writers:
            w.verify()
    assert layout(c, "a") == {i: 3 for i in range(8)}
    # Split again and leave it so: a restarted node learns the layout when it
    # starts, and the fixture's fsck runs on the split store.
    reshard(c, "a", "split", "2")
    assert layout(c, "a")[2] == 4 and layout(c, "a")[10] == 4
    c._stop("b")
    c.start("b")
    same_tree(snap, c.p("b", "t"))
    assert passed >= 0


def test_a_node_refuses_to_change_another_nodes_shard(cluster):
    c = cluster
    r = reshard(c, "a", "split", "3", check=False)  # shard 3 is b's
    assert r.returncode == 1 and "node b's" in r.stderr, (r.returncode, r.stderr)
    r = reshard(c, "a", "merge", "0", check=False)  # its buddy 4 is b's
    assert r.returncode == 1 and "no lower than the 8 shards" in r.stderr, r.stderr
    r = reshard(c, "b", "split", "3")
    assert DONE.search(r.stdout).group(2, 3) == ("3", "11"), r.stdout
    # The other mounts write into the moved half at once.
    for n in ("a", "c"):
        for i in range(60):
            with open(c.p(n, "f-%s-%d" % (n, i)), "wb") as f:
                f.write(b"%s %d\n" % (n.encode(), i))
    for n in ("a", "c"):  # they wrote with the old layout, were refused, and learnt
        with open(os.path.join(c.top, "mount.%s.1.stderr" % n)) as f:
            assert "learnt a new shard layout" in f.read(), n
    for n in ("a", "b", "c"):
        names = sorted(os.listdir(c.mnt[n]))
        assert len([x for x in names if x.startswith("f-")]) == 120, (n, names)
        for i in range(60):
            assert open(c.p(n, "f-a-%d" % i), "rb").read() == b"a %d\n" % i


def reap(c, node):
    """node's daemon killed itself (SHARDFS_TEST_KILL_AT): reap it, drop its mount."""
    c.proc[node].wait(timeout=30)
    c.proc[node] = None
    run(["fusermount3", "-uz", c.mnt[node]], check=False, timeout=30)


def test_kill9_of_the_node_at_each_phase_then_resume(cluster, monkeypatch):
    c = cluster
    src = os.path.join(c.top, "src")
    make_tree(src, seed=29)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    run(["rsync", "-aH", src + "/", c.p("b", "t") + "/"], timeout=300)
    for phase in ("copy", "cut-over", "purge"):
        c._stop("a")
        monkeypatch.setenv("SHARDFS_TEST_KILL_AT", phase)
        c.start("a")
        monkeypatch.delenv("SHARDFS_TEST_KILL_AT")
        r = reshard(c, "a", "split", "0", check=False)
        assert r.returncode == 2 and "closed the connection" in r.stderr, (r.returncode, r.stderr)
        reap(c, "a")
        st = run([SHARDFS_BIN, "status", "-c", c.conf], check=False, timeout=60)
        assert st.returncode == 1 and "node a: interrupted: split 0 3" in st.stdout, st.stdout
        m = run([SHARDFS_BIN, "mount", "-f", "-c", c.conf, "-n", "a", c.mnt["a"]], check=False,
                timeout=60)
        assert m.returncode != 0 and "reshard resume" in m.stderr, m.stderr
        r = reshard(c, "a", "resume")
        assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
        assert layout(c, "a")[0] == 4 and layout(c, "a")[8] == 4, (phase, layout(c, "a"))
        c.start("a")
        for n in ("a", "b", "c"):
            same_tree(snap, c.p(n, "t"))
        reshard(c, "a", "merge", "8")
        assert layout(c, "a") == {i: 3 for i in range(8)}
        for n in ("a", "b", "c"):
            same_tree(snap, c.p(n, "t"))
