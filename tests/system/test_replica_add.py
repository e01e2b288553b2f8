"""`shardfs replica add/drop SHARD NODE`: where a shard's copies live,
changed online (issue 10; fs/failover.c DESIGN: placement, shard_map.h) on
the three-node cluster of test_failover.py (etcd, ack = replica, lease TTL
2 s, every shard on two nodes):

    shard   0-2   3-5   6-7
    primary  a     b     c
    replica  b     c     a

 - under a strict writer (every write() count and close() checked before
   a file is logged) through b's mount: a copy of shard 0 is added on c
   (the CLI waits until c is in the in-sync set), the old replica b is
   dropped (b lets go and deletes its files), then the primary a is killed
   with -9: c's new copy is promoted, and every logged file reads back
   byte-identical through the live mounts and, after a is back, through
   all three. No write fails before the kill (an add and a drop are no
   failover).
 - the CLI's errors, each with its exit status and message, none of which
   changes the map: unknown shard or node, the primary or a replica added
   again, the primary dropped, a node that holds no copy dropped, the only
   in-sync replica dropped, no etcd directive, etcd unreachable.
 - a copy added to a shard that holds more than its stream keeps (90 MiB
   written, 64 MiB kept) catches up by a snapshot (its status says so), and
   promoted (shardfs promote) it serves every byte through every mount.
 - restarts after add/drop follow the map in etcd, not shards.conf: a node
   given a copy (not in its file) opens it again and stays level; a node
   whose copy was dropped (still in its file) does not open it.

The teardown fsck's every node with the map reset to shards.conf's
(test_replication.etcd_reset): the copies shards.conf names are level
after the clean stop, except the dropped ones, which are replicas out of
sync there and are not what fsck checks.
"""

import os
import re
import subprocess
import time

import pytest

from conftest import SHARDFS_BIN, read_file, wait_for, write_file
from test_cluster import NODES
from test_failover import (StrictWriter, check_logged, failover_time, fcluster,  # noqa: F401
                           get_json, probes, wait_settled)
from test_replication import entry_shard, etcd_server, etcd_url  # noqa: F401 (fixtures)
from test_replication import status_text


def replica(c, *args, conf=None, timeout=180):
    return subprocess.run([SHARDFS_BIN, "replica"] + [args[0], "-c", conf or c.conf]
                          + list(args[1:]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          text=True)


def copies_on(c, node):
    """{shard: entry} of node's own replica copies (GET /v1/replicas)."""
    return {e["shard"]: e for e in get_json(c, node, "/v1/replicas")["replicas"]}


def shard_dir(c, node, shard):
    return os.path.join(c.data[node], "shard-%d" % shard)


def add_ok(c, shard, node):
    r = replica(c, "add", "-w", "90", str(shard), node)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"shard %d: %s added as a replica" % (shard, node), r.stdout), r.stdout
    assert re.search(r"shard %d: %s is in sync" % (shard, node), r.stdout), r.stdout
    e = c.shard_map()[shard]
    assert node in e["replicas"] and node in e["in_sync"], e
    return r


def drop_ok(c, shard, node):
    epoch = c.shard_map()[shard]["epoch"]
    r = replica(c, "drop", str(shard), node)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"shard %d: %s dropped" % (shard, node), r.stdout), r.stdout
    assert re.search(r"%s let go of its copy and removed its files" % node, r.stdout), r.stdout
    e = c.shard_map()[shard]
    assert node not in e["replicas"] and node not in e["in_sync"], e
    assert e["epoch"] == epoch, e  # no role moved
    assert shard not in copies_on(c, node)
    assert not os.path.exists(shard_dir(c, node, shard))
    return r


@pytest.mark.timeout_s(900)
def test_add_drop_then_kill_the_primary_under_load(fcluster):
    c = fcluster
    wait_settled(c)
    probe = probes(c, "b")
    m0 = c.shard_map()
    assert m0[0]["primary"] == "a" and m0[0]["replicas"] == ["b"], m0[0]
    with StrictWriter(c, "w", via="b") as w:
        time.sleep(1.0)
        t0 = time.monotonic()
        r = add_ok(c, 0, "c")
        took_add = time.monotonic() - t0
        assert os.path.isdir(shard_dir(c, "c", 0))
        v = copies_on(c, "c")[0]
        # from the empty position: the whole stream if a still holds it, else a
        # snapshot (a young cluster: the stream)
        assert v["primary"] == "a" and v["lsn"] > 0, v
        # status shows the new copy of shard 0 on c
        rc, text = status_text(c)
        assert re.search(r"^0\s+c\s+replica\s", text, re.M), text
        time.sleep(0.5)
        drop_ok(c, 0, "b")
        e = c.shard_map()[0]
        assert e["replicas"] == ["c"] and e["in_sync"] == ["c"], e
        rc, text = status_text(c)
        assert not re.search(r"^0\s+b\s+replica\s", text, re.M), text
        time.sleep(1.0)
        failed_before_kill = list(w.failed)
        n_before_kill = len(w.logged)
        # kill -9 of the primary: the new copy takes over
        t_kill = time.monotonic()
        c.kill9("a")
        took = failover_time(c, "a", [0], "b", probe, t_kill)
        wait_for(lambda: all(c.shard_map()[s]["primary"] != "a" for s in (0, 1, 2)), 10,
                 "a's shards promoted", interval=0.05)
        m = c.shard_map()
        assert m[0]["primary"] == "c" == m[0]["leader"] and \
            m[0]["epoch"] == m0[0]["epoch"] + 1, m[0]
        time.sleep(0.5)
        check_logged(c, dict(w.logged), ("b", "c"))
        c.start("a")
        wait_settled(c, writers=(w,))
        m = c.shard_map()
        assert m[0]["primary"] == "c" and m[0]["replicas"] == ["a"] and \
            m[0]["in_sync"] == ["a"], m[0]
        time.sleep(0.5)
    on_0 = sum(1 for n in sorted(w.logged)[:200] if entry_shard(c, "b", n) == 0)
    print("add of c to shard 0 under load took %.1f s; %s; first write on shard 0 after the "
          "kill: %.2f s; %d files logged (%d before the kill; %d of the first 200 on shard "
          "0), failed before the kill: %s, after: %s" % (
              took_add, r.stdout.strip().splitlines()[-1], took, len(w.logged), n_before_kill,
              on_0, failed_before_kill, w.failed[len(failed_before_kill):]))
    assert not failed_before_kill, failed_before_kill
    assert on_0 >= 5 and len(w.logged) > 50
    check_logged(c, w.logged, NODES)


def test_replica_cli_errors(fcluster, tmp_path):
    c = fcluster
    wait_settled(c)
    m0 = c.shard_map()

    def refused(args, status, pattern, conf=None):
        r = replica(c, *args, conf=conf, timeout=60)
        assert r.returncode == status and re.search(pattern, r.stderr), (
            args, r.returncode, r.stdout, r.stderr)
        assert not r.stdout, r.stdout

    refused(["add", "8", "c"], 2, r"no shard '8' \(the store has shards 0-7\b")
    refused(["drop", "x", "c"], 2, r"no shard 'x'")
    refused(["add", "0", "zz"], 2, r"unknown node 'zz'")
    refused(["add", "0"], 2, r"usage: shardfs replica add")
    refused(["add", "-w", "soon", "0", "c"], 2, r"-w wants seconds")
    r = subprocess.run([SHARDFS_BIN, "replica", "move", "0", "c"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60, text=True)
    assert r.returncode == 2 and "usage: shardfs replica add" in r.stderr, r
    refused(["add", "0", "a"], 1, r"a is the primary of shard 0; it holds a copy already")
    refused(["add", "0", "b"], 1, r"b already holds a replica of shard 0")
    refused(["drop", "0", "a"], 1, r"a is the primary of shard 0; promote another node first")
    refused(["drop", "0", "c"], 1, r"c holds no replica of shard 0")
    refused(["drop", "0", "b"], 1, r"b holds the only in-sync replica of shard 0")
    assert c.shard_map() == m0

    # without etcd the map is the file
    static = str(tmp_path / "static.conf")
    open(static, "w").write("".join(l for l in open(c.conf) if not l.startswith("etcd")))
    refused(["add", "0", "c"], 2, r"no etcd directive.*Edit the 'replicas =' line of \[node c\]",
            conf=static)
    # etcd unreachable: a port nobody listens on
    dead = str(tmp_path / "dead.conf")
    open(dead, "w").write("".join("etcd = http://127.0.0.1:9\n" if l.startswith("etcd") else l
                                  for l in open(c.conf)))
    refused(["add", "0", "c"], 1, r"replica add: the shard map in etcd: ", conf=dead)
    assert c.shard_map() == m0

    # -w 0: the change is made, the CLI does not wait; then an add and a
    # drop of a copy not yet in sync (cancelling an add) are fine
    r = replica(c, "add", "-w", "0", "3", "a")
    assert r.returncode == 0 and "shard 3: a added as a replica" in r.stdout, r
    assert "in sync" not in r.stdout.replace("* in sync", ""), r.stdout
    refused(["add", "3", "a"], 1, r"a already holds a replica of shard 3")
    r = replica(c, "drop", "3", "a")
    assert r.returncode == 0 and "shard 3: a dropped" in r.stdout, r
    wait_for(lambda: 3 not in copies_on(c, "a") and not os.path.exists(shard_dir(c, "a", 3)),
             10, "a let go of its copy of shard 3")
    assert c.shard_map()[3]["replicas"] == ["c"]


@pytest.mark.timeout_s(600)
def test_restart_follows_the_map(fcluster):
    c = fcluster
    wait_settled(c)
    # shard 3: primary b, replica c (shards.conf); a gets a copy, c loses its
    add_ok(c, 3, "a")
    drop_ok(c, 3, "c")
    names = []
    for i in range(400):
        name = "r-%d" % i
        write_file(c.p("b", name), b"x" * (i + 1))
        names.append(name)
        if sum(1 for n in names if entry_shard(c, "b", n) == 3) >= 5:
            break
    wait_settled(c)
    # c restarts: its file says it holds a replica of shard 3, the map does not
    c._stop("c")
    c.start("c")
    assert 3 not in copies_on(c, "c")
    assert not os.path.exists(shard_dir(c, "c", 3)), "c made a copy the map does not give it"
    # a restarts: its file says nothing of shard 3, the map gives it a copy
    c._stop("a")
    write_file(c.p("b", names[0]), b"written while a was down\n")
    c.start("a")
    wait_for(lambda: copies_on(c, "a").get(3, {}).get("primary") == "b", 10,
             "a pulling its copy of shard 3 from b")
    wait_settled(c)
    e = c.shard_map()[3]
    assert e["replicas"] == ["a"] and e["in_sync"] == ["a"], e
    for n in names[1:]:
        assert read_file(c.p("a", n)) == b"x" * (names.index(n) + 1)
    assert read_file(c.p("c", names[0])) == b"written while a was down\n"
    # and a's copy is one that can take over: b killed, a promoted
    probe = probes(c, "c")
    epoch = e["epoch"]
    t_kill = time.monotonic()
    c.kill9("b")
    failover_time(c, "b", [3], "c", probe, t_kill)
    wait_for(lambda: c.shard_map()[3]["primary"] == "a", 10, "a promoted for shard 3")
    assert c.shard_map()[3]["epoch"] == epoch + 1
    for n in names[1:]:
        assert read_file(c.p("c", n)) == b"x" * (names.index(n) + 1)
    c.start("b")
    wait_settled(c)


@pytest.mark.timeout_s(600)
def test_add_catches_up_by_snapshot_then_promote(fcluster):
    """A copy added to a shard whose primary no longer holds the start of
    its stream (more than the 64 MiB it keeps was written) catches up by a
    snapshot; promoted, it serves every byte."""
    c = fcluster
    wait_settled(c)
    names, i = [], 0
    blob = os.urandom(1 << 20)
    while len(names) < 9:
        name = "big-%d" % i
        i += 1
        write_file(c.p("a", name), b"")
        if entry_shard(c, "a", name) != 0:
            os.unlink(c.p("a", name))
            continue
        with open(c.p("a", name), "wb") as f:
            for k in range(10):
                f.write(blob[k:] + blob[:k])
        names.append(name)
        assert i < 400
    add_ok(c, 0, "c")
    v = copies_on(c, "c")[0]
    assert v["snapshots"] >= 1 and v["snap_records"] > 0 and v["snap_bytes"] >= 80 << 20, v
    print("snapshot catch-up of shard 0 on c: %.1f MiB, %d records, %.1f MiB/s" % (
        v["snap_bytes"] / 1048576.0, v["snap_records"], v["snap_rate"] / 1048576.0))
    r = subprocess.run([SHARDFS_BIN, "promote", "-c", c.conf, "0", "c"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60, text=True)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert c.shard_map()[0]["primary"] == "c"
    for node in NODES:
        for n in names:
            with open(c.p(node, n), "rb") as f:
                got = f.read()
            assert got == b"".join(blob[k:] + blob[:k] for k in range(10)), (node, n)
    wait_settled(c)
