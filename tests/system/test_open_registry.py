"""Files open on one node and unlinked (or renamed over) on another
(DESIGN.md, "Files open on other nodes").

A node that has a file open holds an open registration of it on the file's
shard; the unlink or rename on another node that takes the file's last name
then keeps it, with nlink 0 and an orphan mark, and the node that owns the
shard deletes it once no live node has it open: after the last close, or
once the node that had it open is known dead (its etcd lease ended, or, with
no etcd, when it starts again). Before, the file went at once (or 10 s after
a rename) and the reader got ESTALE.

Each test opens files through a's mount whose shards are spread over the
three nodes (so every owner's side is covered), checks the bytes and the
store behind the mount (`shardfs status` record counts), and leaves the
teardown fsck of every node to find nothing left over. The `cluster`
fixture is test_cluster.py's; the etcd one is test_failover.py's.
"""

import os
import re
import time

import pytest

from conftest import SHARDFS_BIN, run, wait_for, write_file
from test_cluster import cluster, NODES  # noqa: F401
from test_failover import fcluster, wait_settled  # noqa: F401
from test_replication import entry_shard, etcd_server, etcd_url  # noqa: F401

KEEP_S = 10           # a replaced file is kept this long for other nodes (namespace.c)
SIZE = 300 * 1024     # in chunks, not in the inode record
RECLAIM_S = 15        # the owner's reaper looks every second


def shard_records(c):
    """{shard: records} for every shard `shardfs status` can reach."""
    out = run([SHARDFS_BIN, "status", "-c", c.conf], check=False).stdout
    return {int(s): int(r) for s, r in re.findall(r"(?m)^(\d+)\s+[abc]\s+(\d+)\s+\d+\s+\d+$", out)}


def content(name, size=SIZE):
    head = ("%s\n" % name).encode()
    return (head * (size // len(head) + 1))[:size]


def files_on_every_owner(c, prefix, owners=("a", "b", "c")):
    """One new file through a (SIZE bytes) whose inode lives on a shard each
    of owners holds: {name: shard}."""
    own = {"a": range(0, 3), "b": range(3, 6), "c": range(6, 8)}
    want = set(owners)
    out = {}
    for i in range(200):
        name = "%s-%d" % (prefix, i)
        write_file(c.p("a", name), content(name))
        shard = entry_shard(c, "a", name)
        owner = next(o for o, r in own.items() if shard in r)
        if owner in want:
            want.discard(owner)
            out[name] = shard
        else:
            os.unlink(c.p("a", name))
        if not want:
            # a's registrations of the files it made go 0.1 s after their
            # close (fuse_ops.c): let them, for the record counts after.
            time.sleep(0.5)
            return out
    pytest.fail("no names on %s" % sorted(want))


def assert_kept(c, base, names, what):
    """Each file's inode and chunks still in its shard: at most its entry
    is gone from base (an orphan mark and open registrations come)."""
    now = shard_records(c)
    for n, s in names.items():
        assert now.get(s, 0) >= base[s] - 1, "%s: %s lost records (shard %d: %s, was %d)" % (
            n, what, s, now.get(s), base[s])


CHUNKS = (SIZE + 65535) // 65536


def freed(base, names):
    """base's counts less each file's entry, inode and chunks."""
    after = dict(base)
    for s in names.values():
        after[s] -= 2 + CHUNKS
    return after


def open_on_a_unlink_on_b(c, names, mode=os.O_RDWR):
    fds = {n: os.open(c.p("a", n), mode) for n in names}
    for n in names:
        os.unlink(c.p("b", n))
    return fds


def close_all(fds):
    """Close each descriptor; one of a killed mount may fail (ENOTCONN)."""
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd, size=SIZE):
    return os.pread(fd, size + 10, 0)


def check_open_files(fds, names):
    """Every descriptor reads its file whole, takes a write and reads it
    back, and fstat says the file has no name left."""
    for name in names:
        fd = fds[name]
        assert read_all(fd) == content(name), "%s: not its bytes" % name
        os.pwrite(fd, b"written after the unlink", 1000)
        want = bytearray(content(name))
        want[1000:1000 + 24] = b"written after the unlink"
        assert read_all(fd) == bytes(want), "%s: the write did not read back" % name
        assert os.fstat(fd).st_nlink == 0
        assert os.fstat(fd).st_size == SIZE


def test_unlink_on_b_of_files_open_on_a(cluster):
    names = files_on_every_owner(cluster, "u")
    base = shard_records(cluster)
    fds = open_on_a_unlink_on_b(cluster, names)
    try:
        for n in names:
            assert not os.path.exists(cluster.p("b", n))
        # The owners' reapers look every second: a second look must find
        # the files still there.
        time.sleep(2.5)
        check_open_files(fds, names)
        assert_kept(cluster, base, names, "an unlinked open file")
    finally:
        close_all(fds)
    # Closed: the entries are gone, and so are the inodes and their chunks.
    wait_for(lambda: shard_records(cluster) == freed(base, names), RECLAIM_S,
             "the unlinked files freed after their last close")


def test_rename_over_on_b_of_files_open_on_a(cluster):
    """A rename over a file keeps it 10 s for other nodes' readers; open on
    a, it stays as long as it is open, and goes after its last close."""
    names = files_on_every_owner(cluster, "r")
    before = sum(shard_records(cluster).values())
    fds = {n: os.open(cluster.p("a", n), os.O_RDWR) for n in names}
    try:
        for n in names:
            write_file(cluster.p("b", n + ".new"), b"the new one")
            os.rename(cluster.p("b", n + ".new"), cluster.p("b", n))
        base = shard_records(cluster)
        time.sleep(KEEP_S + 2.5)
        check_open_files(fds, names)
        assert_kept(cluster, base, names, "a replaced open file")
        for n in names:
            with open(cluster.p("b", n), "rb") as f:
                assert f.read() == b"the new one"
    finally:
        close_all(fds)
    # Each name now holds a small new file in its inode record, made on the
    # shard of NAME.new: the old files' chunks are what goes in all.
    after = before - len(names) * CHUNKS
    wait_for(lambda: sum(shard_records(cluster).values()) == after, RECLAIM_S,
             "the replaced files freed after their last close")


def test_kill9_of_a_holding_unlinked_files_frees_them_at_its_restart(cluster):
    """No etcd: a node that died with files open is known dead when it
    starts again; its registrations go then, and so do the files."""
    names = files_on_every_owner(cluster, "k")
    base = shard_records(cluster)
    fds = open_on_a_unlink_on_b(cluster, names, os.O_RDONLY)
    cluster.kill9("a")
    close_all(fds)
    time.sleep(2.5)
    # Without etcd nothing says a is dead: the files on b's and c's shards
    # stay (a's own shards are gone with it).
    assert_kept(cluster, base, {n: s for n, s in names.items() if s >= 3}, "a file a held")
    cluster.start("a")
    wait_for(lambda: shard_records(cluster) == freed(base, names), RECLAIM_S,
             "the files a held open freed after its restart")


@pytest.mark.timeout_s(240)
def test_kill9_of_a_holding_unlinked_files_frees_them_when_its_lease_ends(fcluster):
    """With etcd: a node whose lease ended has nothing open; the owners of
    the files' shards (b and c, alive) delete them without a's restart."""
    c = fcluster
    names = files_on_every_owner(c, "e", owners=("b", "c"))
    base = shard_records(c)
    fds = open_on_a_unlink_on_b(c, names, os.O_RDONLY)
    time.sleep(2.5)
    for n in names:
        assert read_all(fds[n]) == content(n)
    assert_kept(c, base, names, "an unlinked open file")
    c.kill9("a")
    close_all(fds)
    want = freed(base, names)
    wait_for(lambda: all(shard_records(c).get(s) == want[s] for s in names.values()), 30,
             "the files a held open freed once its lease ended")
    c.start("a")


@pytest.mark.timeout_s(240)
def test_file_on_a_failed_over_shard_is_freed_by_its_new_primary(fcluster):
    """With etcd: a file on one of b's shards, open on a, unlinked on c;
    then b is killed and c, the shard's replica, promoted. Once a closes
    the file, c frees it, b still dead: the reaper looks after the shards
    its node leads now, not those the config gives it (DESIGN.md, "Files
    open on other nodes")."""
    c = fcluster
    names = files_on_every_owner(c, "p", owners=("b",))
    (name, shard), = names.items()
    base = shard_records(c)
    fds = {name: os.open(c.p("a", name), os.O_RDONLY)}
    os.unlink(c.p("c", name))
    time.sleep(2.5)
    assert read_all(fds[name]) == content(name)
    assert_kept(c, base, names, "an unlinked open file")
    c.kill9("b")
    wait_for(lambda: c.shard_map()[shard]["primary"] == "c", 30,
             "c promoted for shard %d" % shard, interval=0.2)
    assert read_all(fds[name]) == content(name), "not its bytes through the new primary"
    close_all(fds)
    want = freed(base, names)
    wait_for(lambda: shard_records(c).get(shard) == want[shard], RECLAIM_S,
             "the file freed by the shard's new primary, its old one dead", interval=0.2)
    c.start("b")
    wait_settled(c)
