"""Writes through a node that does not hold the file: answered before they
land, pipelined, and every failure reported by close() at the latest
(fs/write_behind.h, DESIGN.md "Writes through another node").

The cluster is test_cluster's (8 shards; a: 0-2, b: 3-5, c: 6-7). A file
directly under the root has its entry, inode and chunks on the shard its
name hashes to: /f1 is on shard 4 (node b), as tests/bench/seqwrite says, and
the tests check that node b holds it (b killed, its reads fail)."""
import errno
import os
import random

import pytest

from conftest import wait_for
from test_cluster import NODES, TIMEOUT_MS, call_bounded, cluster  # noqa: F401

MIB = 1 << 20
DEAD = (errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EIO, errno.ECONNREFUSED)


def block(seed, i, size=MIB):
    """Block i of a file of seeded random blocks: each block differs, so a
    block landing at another's offset shows."""
    return random.Random(seed * 1000003 + i).randbytes(size)


def write_blocks(path, seed, count):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(count):
            b = block(seed, i)
            assert os.write(fd, b) == len(b)
    finally:
        os.close(fd)


def check_blocks(path, seed, count):
    assert os.stat(path).st_size == count * MIB, path
    with open(path, "rb", buffering=0) as f:
        for i in range(count):
            got = f.read(MIB)
            assert got == block(seed, i), "%s: block %d differs" % (path, i)
        assert f.read(1) == b""


# A 4 GiB file (SHARDFS_TEST_BIG_MIB to change it): written through node a
# into node b's shard, read back through b and c. Hang guard, not a speed
# limit: about 40 s on the plain build, several minutes sanitized.
@pytest.mark.timeout_s(1800)
def test_large_file_through_a_reads_back_on_b_and_c(cluster):
    count = int(os.environ.get("SHARDFS_TEST_BIG_MIB", "4096"))
    write_blocks(cluster.p("a", "f1"), 7, count)
    for n in ("b", "c"):
        check_blocks(cluster.p(n, "f1"), 7, count)


class Model:
    """fsx-style: random operations on one file through one descriptor,
    each checked against a bytearray."""

    def __init__(self, path, seed, max_size):
        self.path, self.rng, self.max = path, random.Random(seed), max_size
        self.data = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.log = []

    def note(self, what):
        self.log.append(what)
        del self.log[:-20]

    def fail(self, msg):
        pytest.fail("%s\nlast operations: %s" % (msg, "; ".join(self.log)))

    def pwrite(self, off, n):
        buf = self.rng.randbytes(n)
        self.note("pwrite %d+%d" % (off, n))
        if os.pwrite(self.fd, buf, off) != n:
            self.fail("short write")
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off:off + n] = buf

    def append_run(self):
        """Whole chunk-aligned 1 MiB blocks at the end: the pipelined path."""
        off = (len(self.data) + MIB - 1) // MIB * MIB
        for _ in range(self.rng.randint(2, 6)):
            if off + MIB > self.max:
                break
            self.pwrite(off, MIB)
            off += MIB

    def truncate(self, size):
        self.note("truncate %d" % size)
        os.ftruncate(self.fd, size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def read_check(self, off, n):
        self.note("read %d+%d" % (off, n))
        if self.rng.random() < 0.5:
            # Let the kernel drop its cached pages: the read goes to the
            # daemon, which must answer with the writes still behind.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = os.pread(self.fd, n, off)
        want = bytes(self.data[off:off + n])
        if got != want:
            at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                      min(len(got), len(want)))
            self.fail("read %d+%d: %d bytes, want %d; first difference at %d"
                      % (off, n, len(got), len(want), off + at))

    def stat_check(self):
        self.note("fstat")
        st = os.fstat(self.fd)
        if st.st_size != len(self.data):
            self.fail("fstat size %d, model %d" % (st.st_size, len(self.data)))

    def reopen(self):
        self.note("close+open")
        os.close(self.fd)  # a failure of a write behind would raise here
        self.fd = os.open(self.path, os.O_RDWR)

    def step(self):
        r = self.rng.random()
        size = len(self.data)
        if r < 0.35:
            self.pwrite(self.rng.randint(0, min(size + 4096, self.max - 8192)),
                        self.rng.randint(1, 8192))
        elif r < 0.50:
            n = self.rng.randint(32 << 10, 512 << 10)
            self.pwrite(self.rng.randint(0, max(0, min(size + MIB, self.max - n))), n)
        elif r < 0.55:
            self.append_run()
        elif r < 0.80:
            self.read_check(self.rng.randint(0, size + 100), self.rng.randint(1, 600 << 10))
        elif r < 0.85:
            self.truncate(self.rng.randint(0, min(self.max, size + MIB)))
        elif r < 0.95:
            self.stat_check()
        elif r < 0.98:
            self.note("fsync")
            os.fsync(self.fd)
        else:
            self.reopen()


# 100k operations (SHARDFS_TEST_FSX_OPS to change it); hang guard only.
@pytest.mark.timeout_s(1800)
def test_random_writes_with_a_model_through_a_non_owner(cluster):
    ops = int(os.environ.get("SHARDFS_TEST_FSX_OPS", "100000"))
    m = Model(cluster.p("a", "f1"), 12345, 24 * MIB)
    for _ in range(ops):
        m.step()
    m.stat_check()
    m.read_check(0, len(m.data) + 1)
    os.close(m.fd)
    want = bytes(m.data)
    for n in NODES:
        with open(cluster.p(n, "f1"), "rb") as f:
            assert f.read() == want, "f1 through %s differs from the model" % n


@pytest.mark.timeout_s(300)
def test_owner_killed_mid_file_fails_by_close_and_keeps_a_prefix(cluster):
    path = cluster.p("a", "f1")
    count = 256
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    failed_at = None
    err = None
    try:
        for i in range(count):
            if i == 24:
                cluster.kill9("b")
            try:
                os.write(fd, block(3, i))
            except OSError as e:
                failed_at, err = i, e
                break
        # Nothing after a failure is taken: every later write fails too.
        if failed_at is not None:
            with pytest.raises(OSError):
                os.write(fd, block(3, failed_at))
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or e
    assert err is not None, "b died mid-file, and neither write() nor close() failed"
    assert err.errno in DEAD, err
    # f1 is b's: with b dead, it cannot be read
    (kind, val), _ = call_bounded(lambda: open(cluster.p("c", "f1"), "rb").read(1),
                                  4 * TIMEOUT_MS / 1000.0)
    assert kind == "err" and val.errno in DEAD, (kind, val)

    cluster.start("b")
    with open(cluster.p("c", "f1"), "rb") as f:
        got = f.read()
    # What landed is the file as written up to some block: the batches land
    # in order, and none after a failed one.
    assert len(got) % MIB == 0 and len(got) <= 24 * MIB, len(got)
    for i in range(len(got) // MIB):
        assert got[i * MIB:(i + 1) * MIB] == block(3, i), "block %d differs" % i


@pytest.mark.timeout_s(120)
def test_this_mount_sees_its_writes_behind_at_once(cluster):
    """stat, a lookup through another path, a read with the page cache
    dropped and a truncate all come after the writes before them."""
    path = cluster.p("a", "f1")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(8):
            os.write(fd, block(5, i))
            assert os.fstat(fd).st_size == (i + 1) * MIB
            assert os.stat(path).st_size == (i + 1) * MIB
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, MIB, 7 * MIB) == block(5, 7)
        os.write(fd, block(5, 8))
        os.ftruncate(fd, 3 * MIB + 5)  # after the write, not before it
        assert os.fstat(fd).st_size == 3 * MIB + 5
    finally:
        os.close(fd)
    for n in NODES:
        wait_for(lambda: os.stat(cluster.p(n, "f1")).st_size == 3 * MIB + 5, 3,
                 "the size on %s" % n)
        with open(cluster.p(n, "f1"), "rb") as f:
            assert f.read() == block(5, 0) + block(5, 1) + block(5, 2) + block(5, 3)[:5]
