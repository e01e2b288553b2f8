"""Cross-node compare-and-swap on a file's inode (DESIGN.md, "Across nodes").

Three nodes change one file at the same moment through their own mounts.
Every change of an inode record (a write's size and tail, chmod, utime,
xattrs, a hard link's count) is a read-modify-write; the per-process locks
order one node only, so without the assertion on the bytes read a node puts
back a record another node has changed meanwhile and that change is lost: an
append overwrites another node's append, a chmod shrinks the file back to the
size it read, a link count misses a link. The `cluster` fixture (three nodes,
eight shards, fsck of every node at teardown) is the one of test_cluster.py.
"""

import errno
import os
import stat
import threading

from test_cluster import cluster, NODES  # noqa: F401
from conftest import read_file, write_file

import pytest


def run_together(workers, limit=60):
    """Start one thread per (name, fn) at the same moment (a barrier), join
    them with a deadline and fail with every exception a worker raised."""
    errors = []
    start = threading.Barrier(len(workers))

    def body(name, fn):
        try:
            start.wait(timeout=30)
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append("%s: %r" % (name, e))

    threads = [threading.Thread(target=body, args=w, daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), "workers hung"
    assert not errors, errors


def appender(path, tag, count):
    """Append count numbered lines of 64 bytes to path with O_APPEND, one
    write(2) each."""
    def go():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(count):
                line = ("%s %05d " % (tag, i)).encode().ljust(63, b".") + b"\n"
                assert os.write(fd, line) == len(line)
        finally:
            os.close(fd)
    return go


def check_lines(data, tags, count):
    """Every line of every tag is there exactly once, in its writer's order,
    and nothing else is."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "file does not end with a whole line"
    lines = lines[:-1]
    assert all(len(x) == 63 for x in lines), "torn or overwritten lines"
    for tag in tags:
        mine = [int(x.split()[1]) for x in lines if x.startswith(tag.encode() + b" ")]
        assert mine == list(range(count)), "%s: %d of %d lines, in order: %s" % (
            tag, len(set(mine)), count, mine == sorted(mine))
    assert len(lines) == len(tags) * count


@pytest.mark.timeout_s(90)
def test_concurrent_appends_from_three_nodes_lose_nothing(cluster):
    """O_APPEND writes from three nodes: each takes the end of file it reads
    from the inode; a stale read would overwrite another node's line. The
    file grows from inline (2 KiB) into its second 64 KiB chunk."""
    per_node = 400
    path = {n: cluster.p(n, "log.txt") for n in NODES}
    write_file(path["a"], b"")
    run_together([(n, appender(path[n], n, per_node)) for n in NODES])
    for n in NODES:
        data = read_file(path[n])
        assert os.stat(path[n]).st_size == len(data) == 3 * per_node * 64, n
        check_lines(data, NODES, per_node)


@pytest.mark.timeout_s(90)
def test_chmod_utime_xattr_from_other_nodes_while_one_appends(cluster):
    """a appends; b changes the mode and times; c adds and removes xattrs.
    Each of them puts back the whole inode record (size, inline data, mode,
    times), so a stale record from b or c would cut a's lines off."""
    per_node = 400
    p = {n: cluster.p(n, "busy.txt") for n in NODES}
    write_file(p["a"], b"")
    modes = [0o600, 0o640, 0o644, 0o664]

    def chmodder():
        for i in range(300):
            os.chmod(p["b"], modes[i % len(modes)])
            os.utime(p["b"], (1_000_000 + i, 2_000_000 + i))

    def xattrs():
        for i in range(300):
            os.setxattr(p["c"], "user.k%03d" % i, b"v%d" % i, os.XATTR_CREATE)
            if i % 3 == 0:
                os.setxattr(p["c"], "user.k%03d" % i, b"w%d" % i, os.XATTR_REPLACE)
            if i % 2 == 1:
                os.removexattr(p["c"], "user.k%03d" % i)

    run_together([("a", appender(p["a"], "a", per_node)), ("b", chmodder), ("c", xattrs)])
    want_x = sorted("user.k%03d" % i for i in range(300) if i % 2 == 0)
    for n in NODES:
        data = read_file(p[n])
        check_lines(data, ["a"], per_node)
        st = os.stat(p[n])
        assert st.st_size == per_node * 64, n
        assert stat.S_IMODE(st.st_mode) == modes[299 % len(modes)], n
        assert sorted(os.listxattr(p[n])) == want_x, n
        assert os.getxattr(p[n], "user.k000") == b"w0"
        assert os.getxattr(p[n], "user.k002") == b"v2"
    # b's last utime; a's appends ended before it or after it, so mtime is
    # b's value or later, never an older one put back by a stale record.
    assert os.stat(p["a"]).st_mtime >= 2_000_299


@pytest.mark.timeout_s(90)
def test_xattr_create_replace_remove_race_across_nodes(cluster):
    """Round by round (a barrier starts both), b removes user.x and c replaces
    it, on one fresh file per round. Replace needs the attribute present, so
    whatever the order, user.x is gone after both: replace-then-remove removes
    it, remove-then-replace fails with ENODATA. Then both create user.y with
    XATTR_CREATE: exactly one of them wins."""
    rounds = 300
    for i in range(rounds):
        write_file(cluster.p("a", "x%03d" % i), b"")
        os.setxattr(cluster.p("a", "x%03d" % i), "user.x", b"old")
    created = {"b": 0, "c": 0}
    replaced = []
    step = threading.Barrier(2)

    def create_y(node, f):
        try:
            os.setxattr(f, "user.y", node.encode(), os.XATTR_CREATE)
            created[node] += 1
        except OSError as e:
            assert e.errno == errno.EEXIST

    def remover():
        for i in range(rounds):
            f = cluster.p("b", "x%03d" % i)
            step.wait(timeout=30)
            os.removexattr(f, "user.x")
            create_y("b", f)

    def replacer():
        for i in range(rounds):
            f = cluster.p("c", "x%03d" % i)
            step.wait(timeout=30)
            try:
                os.setxattr(f, "user.x", b"new", os.XATTR_REPLACE)
                replaced.append(i)
            except OSError as e:
                assert e.errno == errno.ENODATA
            create_y("c", f)

    run_together([("b", remover), ("c", replacer)])
    assert created["b"] + created["c"] == rounds
    bad = [i for i in range(rounds) if os.listxattr(cluster.p("a", "x%03d" % i)) != ["user.y"]]
    assert not bad, "user.x survived a remove in rounds %s (replaced: %s)" % (
        bad, sorted(set(bad) & set(replaced)))


@pytest.mark.timeout_s(90)
def test_concurrent_links_unlinks_and_renames_over_keep_nlink(cluster):
    """Three nodes add and remove hard links to one file at once (link,
    unlink, and rename of another file over one of its names); its link count
    must equal its names afterwards, on every node (fsck recounts too)."""
    rounds = 60
    os.mkdir(cluster.p("a", "d"))
    target = cluster.p("a", "d", "target")
    write_file(target, b"shared inode\n")

    def linker(node):
        def go():
            for i in range(rounds):
                name = cluster.p(node, "d", "%s%03d" % (node, i))
                os.link(cluster.p(node, "d", "target"), name)
                if i % 3 == 1:
                    os.unlink(name)
                elif i % 3 == 2:
                    other = cluster.p(node, "d", "new%s%03d" % (node, i))
                    write_file(other, b"replacement\n")
                    os.rename(other, name)
        return go

    run_together([(n, linker(n)) for n in NODES])
    ino = os.stat(target).st_ino
    for n in NODES:
        d = cluster.p(n, "d")
        names = [x for x in os.listdir(d) if os.stat(os.path.join(d, x)).st_ino == ino]
        assert len(names) == 1 + len(NODES) * (rounds // 3), n
        assert os.stat(cluster.p(n, "d", "target")).st_nlink == len(names), n
        assert read_file(cluster.p(n, "d", names[-1])) == b"shared inode\n"
