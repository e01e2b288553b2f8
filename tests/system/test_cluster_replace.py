"""Atomic replace (write a temporary file, `mv` it over the name) from several
nodes at once (DESIGN.md, "Multi-shard operations" and "Caching with several
nodes").

Two mounts of a 3-node cluster replace one file 1000 times each, with
temporary names of their own, while the third mount reads it in a loop. POSIX
rename-over is atomic: the name exists the whole time, so every open of it
must succeed and read one whole version (old or new), and every `mv` must
succeed (the other node renaming over the same name in between changes what
the name holds, not whether it exists). At the end every node reads the same
last version, only the name is left, and the teardown fsck of every node
finds no leftover (a replaced inode freed exactly once).

The `cluster` fixture (three nodes, eight shards, fsck at teardown) is the
one of test_cluster.py.
"""

import collections
import errno
import hashlib
import os
import re
import threading
import time

from test_cluster import cluster, NODES  # noqa: F401
from conftest import SHARDFS_BIN, read_file, run, wait_for, write_file

import pytest

ROUNDS = 1000
NAME = "cfg"
INLINE_MAX = 2048          # a file up to this size lives in its inode record
KEEP_S = 10                # a replaced file is kept this long (namespace.c)


def version(node, i):
    """A version that says who wrote it, which one it is and how long it is,
    and ends with the SHA-256 of what comes before: a torn read, a mix of two
    versions or a short read cannot pass check(). Sizes run from 700 bytes
    (kept in the inode record) to 9 KiB (in a chunk), so both ways a file's
    bytes are stored are replaced."""
    size = 700 + (i * 977 + (0 if node == "a" else 4111)) % 8500
    head = ("%s %05d %05d\n" % (node, i, size)).encode()
    body = (head * (size // len(head) + 1))[:size - len(head) - 65]
    data = head + body
    return data + hashlib.sha256(data).hexdigest().encode() + b"\n"


def store_records(cluster):
    """Records in all shards of the cluster, by `shardfs status`."""
    out = run([SHARDFS_BIN, "status", "-c", cluster.conf]).stdout
    shards = re.findall(r"(?m)^\d+\s+[abc]\s+(\d+)\s+\d+\s+\d+$", out)
    assert len(shards) == 8, out
    return sum(int(r) for r in shards)


def settled_records(cluster):
    """store_records once a's open registration of the file it just wrote is
    dropped (0.1 s after the last close, by a's registry thread; DESIGN.md,
    "Files open on other nodes"): the least count seen over 1.5 s, as
    nothing else changes the store meanwhile."""
    least = store_records(cluster)
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        time.sleep(0.25)
        least = min(least, store_records(cluster))
    return least


def check(data):
    """(node, i) of a whole version, or raise AssertionError."""
    head, _, _ = data.partition(b"\n")
    parts = head.split()
    assert len(parts) == 3, "no header: %r" % data[:80]
    node, i, size = parts[0].decode(), int(parts[1]), int(parts[2])
    assert len(data) == size, "%s %d: %d bytes, %d expected" % (node, i, len(data), size)
    assert data[-65:-1] == hashlib.sha256(data[:-65]).hexdigest().encode(), \
        "%s %d: checksum" % (node, i)
    return node, i


@pytest.mark.timeout_s(300)
def test_replace_from_two_nodes_while_a_third_reads(cluster):
    paths = {n: cluster.p(n, NAME) for n in NODES}
    write_file(paths["a"], version("a", 0))
    assert len(version("a", 0)) <= INLINE_MAX
    before = settled_records(cluster)    # cfg is its entry and its inode
    stop = threading.Event()
    errors = []                # (who, what): every one fails the test
    mv_failed = {"a": 0, "b": 0}
    reads = {"ok": 0, "by": {"a": 0, "b": 0}}

    def writer(node):
        tmp = cluster.p(node, "%s.tmp.%s" % (NAME, node))
        try:
            for i in range(1, ROUNDS + 1):
                write_file(tmp, version(node, i))
                r = run(["mv", tmp, paths[node]], check=False)
                if r.returncode != 0:
                    errors.append((node, "mv %d: %s" % (i, r.stderr.strip()[:200])))
                    mv_failed[node] += 1
                    if mv_failed[node] > 100:
                        return
        except OSError as e:
            errors.append((node, "write: %r" % e))

    def reader():
        last = {}
        while not stop.is_set():
            try:
                fd = os.open(paths["c"], os.O_RDONLY)
            except OSError as e:
                errors.append(("c", "open: %s" % errno.errorcode.get(e.errno, e.errno)))
                continue
            try:
                st = os.fstat(fd)
                with os.fdopen(fd, "rb", buffering=0, closefd=False) as raw:
                    data = raw.readall()   # read(2) up to end of file
                node, i = check(data)
                assert st.st_size == len(data), "fstat says %d, read %d" % (st.st_size,
                                                                            len(data))
                reads["ok"] += 1
                reads["by"][node] += 1
                last[node] = i
            except OSError as e:
                errors.append(("c", "read: %s" % errno.errorcode.get(e.errno, e.errno)))
            except AssertionError as e:
                errors.append(("c", "content: %s" % str(e)[:100]))
            finally:
                os.close(fd)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in ("a", "b")]
    rt = threading.Thread(target=reader, daemon=True)
    t0 = time.monotonic()
    rt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    stop.set()
    rt.join(30)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads + [rt]), "a worker hung"
    print("%d replaces in %.1f s; %d whole reads on c (%d of a's, %d of b's)"
          % (2 * ROUNDS, elapsed, reads["ok"], reads["by"]["a"], reads["by"]["b"]))
    kinds = collections.Counter("%s %s" % (who, re.sub(r"\d+", "N", what)[:40])
                                for who, what in errors)
    assert not errors, "%d failures %r, first ones: %r" % (len(errors), dict(kinds), errors[:8])
    assert reads["ok"] > 100, "too few reads to test anything: %d" % reads["ok"]
    assert reads["by"]["a"] and reads["by"]["b"], reads

    # The last rename wins, and every node sees it once its cached name and
    # attributes expire (cache_timeout = 1 s).
    final = read_file(paths["a"])
    assert check(final) in (("a", ROUNDS), ("b", ROUNDS))
    for n in NODES:
        wait_for(lambda n=n: read_file(paths[n]) == final, 3.0, "the last version on " + n)
    for n in NODES:
        assert sorted(os.listdir(cluster.mnt[n])) == [NAME], n

    # Every replaced file is deleted, once, after it was kept for readers
    # elsewhere: the store holds cfg alone again (and its chunk, if it has
    # one). fsck at teardown checks link counts and orphans.
    want = before + (1 if len(final) > INLINE_MAX else 0)
    kept = store_records(cluster) - want
    wait_for(lambda: store_records(cluster) == want, KEEP_S + 10,
             "the replaced files to be deleted", interval=0.5)
    print("%d records of replaced files kept after the last mv, none %d s later"
          % (kept, KEEP_S))


@pytest.mark.timeout_s(120)
def test_open_descriptor_and_cached_name_across_a_replace(cluster):
    """What a reader on another node sees when a replaces files it has open
    or has looked up (DESIGN.md, "A file replaced on another node"):
    a descriptor opened on c before the replace reads the old file whole
    (fstat: nlink 0) for as long as it is open, past REPLACED_KEEP_MS too
    (c's open registration keeps it: "Files open on other nodes"), and the
    file goes after the last close; a write through a name
    c cached before the replace (O_TRUNC) goes to the new file, not to the
    kept old one."""
    names = ["keep%d" % i for i in range(8)]     # old files on several shards
    old = {nm: version("a", i) for i, nm in enumerate(names)}
    for nm in names:
        write_file(cluster.p("a", nm), old[nm])
    fds = {nm: os.open(cluster.p("c", nm), os.O_RDONLY) for nm in names}
    try:
        for i, nm in enumerate(names):
            write_file(cluster.p("a", nm + ".tmp"), version("b", i))
            run(["mv", cluster.p("a", nm + ".tmp"), cluster.p("a", nm)])
        t_replaced = time.monotonic()
        for nm in names:
            assert os.pread(fds[nm], 65536, 0) == old[nm], nm

        # c cached the name of keep0 (it opened it); a write through it
        # must reach the file the name holds now.
        with open(cluster.p("c", names[0]), "wb") as f:
            f.write(b"written on c\n")
        for n in NODES:
            assert read_file(cluster.p(n, names[0])) == b"written on c\n", n
        assert os.pread(fds[names[0]], 65536, 0) == old[names[0]]

        # fstat asks the daemon once c's cached attributes (from the open)
        # expire, after cache_timeout (1 s): the old file, with no name left,
        # and still whole after the time a replaced file is kept for others.
        before_close = store_records(cluster)
        while time.monotonic() - t_replaced < KEEP_S + 2.5:
            for nm in names:
                assert os.fstat(fds[nm]).st_nlink == 0 or \
                    time.monotonic() - t_replaced < 1.5, nm
            time.sleep(0.5)
        for nm in names:
            assert os.pread(fds[nm], 65536, 0) == old[nm], nm
            assert os.fstat(fds[nm]).st_nlink == 0, nm
    finally:
        for fd in fds.values():
            os.close(fd)
    # Closed: the old files go, each its inode, its chunk (past INLINE_MAX),
    # its mark and c's registration -- all of them, so that a clean stop
    # finds none (nothing but c's registration of the new keep0, if not
    # dropped yet, can go besides: not enough to hide one old file).
    gone = sum(3 + (len(old[nm]) > INLINE_MAX) for nm in names)
    wait_for(lambda: store_records(cluster) <= before_close - gone, KEEP_S,
             "the kept files to go after their last close", interval=0.2)
