"""Reads and writes: offsets, holes, appends, open-unlinked files, special files."""

import concurrent.futures
import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import threading

import pytest

from conftest import kill_group, read_file, run, sh, write_file

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def test_o_trunc(fs):
    p = fs.path("f")
    big = os.urandom((2 << 20) + 17)
    write_file(p, big)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert read_file(p) == b"new"
    os.truncate(p, 1 << 20)                      # no old chunk may resurface
    assert read_file(p) == b"new" + bytes((1 << 20) - 3)
    sh("echo short > f", cwd=fs.mnt)
    assert read_file(p) == b"short\n"
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)      # O_TRUNC on an already-open file
    os.close(fd)
    assert os.stat(p).st_size == 0


APPENDER = r"""
import os, sys
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(n):
    line = ("%s %06d " % (tag, i)).ljust(63, tag[0]) + "\n"
    assert os.write(fd, line.encode()) == 64
os.close(fd)
"""


def test_o_append_two_processes(fs):
    p = fs.path("log")
    procs = [subprocess.Popen([PY, "-c", APPENDER, p, tag, "1000"], start_new_session=True)
             for tag in ("A", "B")]
    try:
        for pr in procs:
            assert pr.wait(timeout=120) == 0
    finally:
        for pr in procs:
            if pr.poll() is None:
                kill_group(pr.pid)
    data = read_file(p)
    assert len(data) == 2000 * 64
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 2000
    for tag in ("A", "B"):
        mine = [l for l in lines if l.startswith(tag.encode() + b" ")]
        expect = [(("%s %06d " % (tag, i)).ljust(63, tag[0])).encode() for i in range(1000)]
        assert mine == expect, "lines of %s lost, torn or reordered" % tag


def test_pread_pwrite_offsets(fs):
    rnd = random.Random(42)
    p = fs.path("f")
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        edges = [0, 1, 4095, 4096, 4097, 65535, 65536, 131071, (1 << 20) - 1, 1 << 20,
                 (3 << 20) + 5]
        ops = [("w", off, rnd.choice([1, 7, 4096, 5000, 70000])) for off in edges]
        for _ in range(300):
            if rnd.random() < 0.5:
                ops.append(("w", rnd.randrange(4 << 20), rnd.randrange(1, 200000)))
            else:
                ops.append(("r", rnd.randrange(5 << 20), rnd.randrange(1, 300000)))
        for kind, off, n in ops:
            if kind == "w":
                data = rnd.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                if len(model) < off + n:
                    model.extend(bytes(off + n - len(model)))
                model[off:off + n] = data
            else:
                got = os.pread(fd, n, off)
                assert got == bytes(model[off:off + n]), "pread(%d, %d) differs" % (n, off)
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert read_file(p) == bytes(model)
    fs.remount()
    assert hashlib.sha256(read_file(p)).digest() == hashlib.sha256(model).digest()


def test_holes_read_as_zeros(fs):
    p = fs.path("holey")
    off = 10 << 20
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert os.pwrite(fd, b"end", off) == 3
        assert os.fstat(fd).st_size == off + 3
        assert os.pread(fd, 4096, 0) == bytes(4096)
        assert os.pread(fd, 1 << 20, 5 << 20) == bytes(1 << 20)
        assert os.pread(fd, 10, off - 7) == bytes(7) + b"end"
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_size == off + 3
    data = read_file(p)
    assert data[:off] == bytes(off) and data[off:] == b"end"
    assert st.st_blocks * 512 < (1 << 20), "a 10 MiB hole uses %d blocks" % st.st_blocks
    assert run(["cmp", "-n", str(off), p, "/dev/zero"]).returncode == 0


def test_blocks_count_what_is_stored_after_truncate_and_rewrite(fs):
    """st_blocks is the bytes the chunks hold (64 KiB each): a write of
    whole chunks past the end of the file adds them whole (no chunk lies
    there: a truncate drops them), an overwrite of a whole chunk adds
    nothing."""
    chunk = 64 << 10
    p = fs.path("rewritten")
    first = os.urandom(1 << 20)
    late = os.urandom(4 * chunk)
    again = os.urandom(chunk)
    write_file(p, first)
    assert os.stat(p).st_blocks * 512 == 1 << 20
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 100 << 10)              # chunk 1 keeps 36 KiB, 2-15 go
        assert os.pwrite(fd, late, 4 * chunk) == len(late)   # chunks 4-7, past the end
        stored = chunk + (100 << 10) - chunk + 4 * chunk
        os.fsync(fd)                             # the kernel's cached pages written
        assert os.fstat(fd).st_blocks * 512 == stored
        assert os.pwrite(fd, again, 4 * chunk) == chunk      # chunk 4 again, whole
        os.fsync(fd)
        assert os.fstat(fd).st_blocks * 512 == stored
    finally:
        os.close(fd)
    model = first[:100 << 10] + bytes(4 * chunk - (100 << 10)) + again + late[chunk:]
    assert read_file(p) == model
    fs.remount()
    assert read_file(p) == model
    assert os.stat(p).st_blocks * 512 == stored


@pytest.mark.timeout_s(180)
def test_sparse_64g_file(fs):
    p = fs.path("sparse")
    size = 64 << 30
    run(["truncate", "-s", "64G", p])
    assert os.stat(p).st_size == size
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"TAIL", size - 4) == 4
        assert os.pwrite(fd, b"middle", 33 << 30) == 6
        assert os.pwrite(fd, b"head", 0) == 4
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 8, size - 8) == bytes(4) + b"TAIL"
        assert os.pread(fd, 100, size) == b""
        assert os.pread(fd, 16, (33 << 30) - 5) == bytes(5) + b"middle" + bytes(5)
        assert os.pread(fd, 1 << 20, 20 << 30) == bytes(1 << 20)
        assert os.pread(fd, 8, 0) == b"head" + bytes(4)
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_size == size
    assert st.st_blocks * 512 < (16 << 20), "sparse file uses %d blocks" % st.st_blocks
    assert run(["tail", "-c", "4", p]).stdout == "TAIL"
    fs.remount()
    assert os.stat(p).st_size == size
    with open(p, "rb") as f:
        f.seek(33 << 30)
        assert f.read(6) == b"middle"
    os.unlink(p)
    assert os.listdir(fs.mnt) == []


def test_unlink_while_open(fs):
    p = fs.path("f")
    write_file(p, "hello")
    fd = os.open(p, os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        os.unlink(p)
        assert "f" not in os.listdir(fs.mnt)
        assert not os.path.lexists(p)
        assert os.pread(fd, 100, 0) == b"hello"
        assert os.pwrite(fd, b", world" + os.urandom(1 << 20), 5) == 7 + (1 << 20)
        assert os.pread(fd, 12, 0) == b"hello, world"
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 12 + (1 << 20)
        write_file(p, "a new file")                     # same name, new inode
        assert os.stat(p).st_ino != ino
        assert os.pread(fd, 5, 0) == b"hello"
        assert read_file(p) == b"a new file"
        os.fsync(fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(fs.mnt)) == ["f"]
    assert read_file(p) == b"a new file"
    fs.unmount()
    fs.assert_fsck_clean()                              # no orphan left behind
    fs.start()
    assert read_file(p) == b"a new file"


def test_fsync_and_fdatasync(fs):
    p = fs.path("f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 100000)
        assert os.fsync(fd) is None
        os.write(fd, b"y")
        assert os.fdatasync(fd) is None
    finally:
        os.close(fd)
    dfd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fsync(dfd) is None
    finally:
        os.close(dfd)
    run(["sync", "-f", fs.mnt])
    run(["sync", p])
    assert os.stat(p).st_size == 100001


def test_statvfs_sane(fs):
    for _ in range(2):
        st = os.statvfs(fs.mnt)
        assert st.f_bsize > 0 and st.f_frsize > 0
        assert st.f_blocks > 0
        assert 0 <= st.f_bavail <= st.f_bfree <= st.f_blocks
        assert st.f_namemax == 255
        # room for what we are about to write, and it was writable
        assert st.f_bavail * st.f_frsize > (16 << 20)
        write_file(fs.path("big"), os.urandom(16 << 20))


def test_fifo_socket_and_device_nodes(fs):
    fifo = fs.path("fifo")
    os.mkfifo(fifo, 0o640)
    st = os.lstat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    got = []
    t = threading.Thread(target=lambda: got.append(read_file(fifo)), daemon=True)
    t.start()
    write_file(fifo, "through the pipe")
    t.join(timeout=10)
    assert got == [b"through the pipe"]

    sp = fs.path("sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(sp)
        srv.listen(1)
        assert stat.S_ISSOCK(os.lstat(sp).st_mode)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.settimeout(10)
        cli.connect(sp)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli.close()
    finally:
        srv.close()

    os.mknod(fs.path("null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(fs.path("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(fs.path("reg"), 0o600 | stat.S_IFREG)
    assert stat.S_ISREG(os.lstat(fs.path("reg")).st_mode)

    ls = run(["ls", "-l"], cwd=fs.mnt).stdout
    assert any(l.startswith("p") and l.endswith(" fifo") for l in ls.splitlines())
    assert any(l.startswith("s") and l.endswith(" sock") for l in ls.splitlines())
    assert any(l.startswith("c") and l.endswith(" null") for l in ls.splitlines())
    fs.remount()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISSOCK(os.lstat(sp).st_mode)
    assert os.lstat(fs.path("null")).st_rdev == os.makedev(1, 3)


def test_concurrent_writers(fs):
    def work(i):
        data = os.urandom(4 << 20)
        p = fs.path("w%d" % i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, len(data), 128 << 10):
                os.write(fd, data[off:off + (128 << 10)])
        finally:
            os.close(fd)
        return p, hashlib.sha256(data).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(work, range(8), timeout=180))
    for p, digest in results:
        assert hashlib.sha256(read_file(p)).hexdigest() == digest, p
    with concurrent.futures.ThreadPoolExecutor(8) as ex:     # concurrent readers too
        again = list(ex.map(lambda r: hashlib.sha256(read_file(r[0])).hexdigest(), results,
                            timeout=180))
    assert again == [d for _, d in results]
    fs.remount()
    for p, digest in results:
        assert hashlib.sha256(read_file(p)).hexdigest() == digest, p


def test_handles_closed_just_before_unmount_are_freed(fs):
    """The kernel may drop the RELEASE of a file or directory closed just
    before an unmount; the daemon frees such handles itself at exit. Under
    the sanitized daemon of tests/run, LeakSanitizer fails the teardown when
    it does not (an opendir's handle leaked in most runs before)."""
    write_file(fs.path("f"), b"x")
    os.mkdir(fs.path("d"))
    for _ in range(30):
        with open(fs.path("f"), "ab") as f:         # O_APPEND rides in the handle
            f.write(b"+")
        assert os.listdir(fs.path("d")) == []       # its close races the unmount
        fs.remount()
    assert read_file(fs.path("f")) == b"x" + b"+" * 30
