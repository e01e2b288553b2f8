"""rename(2) and renameat2(2) semantics."""

import errno
import os
import stat
import threading

from conftest import (RENAME_EXCHANGE, RENAME_NOREPLACE, assert_errno, read_file, renameat2,
                      write_file)


def _version(i):
    # every version has a different length so a torn read cannot look valid
    return ("version %06d\n" % i).encode() * (1 + i % 7)


def test_rename_over_existing_is_atomic(fs):
    target = fs.path("target")
    write_file(target, _version(0))
    valid = {_version(i) for i in range(501)}
    stop = threading.Event()
    seen = {"reads": 0, "enoent": 0, "bad": [], "errors": []}

    def reader():
        while not stop.is_set():
            try:
                fd = os.open(target, os.O_RDONLY)
            except FileNotFoundError:
                seen["enoent"] += 1
                continue
            except OSError as e:
                seen["errors"].append("open: %r" % e)
                continue
            try:
                data = b""
                while True:
                    b = os.read(fd, 65536)
                    if not b:
                        break
                    data += b
            except OSError as e:
                # an open file stays readable whatever happens to its name
                # (the rename must see the open, or the open the rename)
                seen["errors"].append("read: %r" % e)
                continue
            finally:
                os.close(fd)
            seen["reads"] += 1
            if data not in valid and len(seen["bad"]) < 5:
                seen["bad"].append(data[:80])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for i in range(1, 501):
            tmp = fs.path("tmp.%d" % i)
            write_file(tmp, _version(i))
            os.rename(tmp, target)
    finally:
        stop.set()
        t.join(timeout=60)
    assert not t.is_alive(), "reader thread stuck"
    assert seen["enoent"] == 0, "target missing %d times during rename-over" % seen["enoent"]
    assert not seen["errors"], seen["errors"][:5]
    assert not seen["bad"], "torn or stale-mixed reads: %r" % seen["bad"]
    assert seen["reads"] > 0
    assert read_file(target) == _version(500)
    assert sorted(os.listdir(fs.mnt)) == ["target"]


def test_rename_replaces_and_frees_the_old_target(fs):
    write_file(fs.path("a"), "A")
    write_file(fs.path("b"), "B")
    ino_a = os.stat(fs.path("a")).st_ino
    fd = os.open(fs.path("b"), os.O_RDONLY)        # the replaced file stays readable
    try:
        os.rename(fs.path("a"), fs.path("b"))
        assert os.pread(fd, 10, 0) == b"B"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.stat(fs.path("b")).st_ino == ino_a
    assert read_file(fs.path("b")) == b"A"
    assert os.listdir(fs.mnt) == ["b"]
    os.rename(fs.path("b"), fs.path("b"))          # onto itself: no-op
    assert read_file(fs.path("b")) == b"A"


def test_renameat2_noreplace(fs):
    write_file(fs.path("a"), "A")
    write_file(fs.path("b"), "B")
    assert_errno(errno.EEXIST, renameat2, fs.path("a"), fs.path("b"), RENAME_NOREPLACE)
    assert read_file(fs.path("a")) == b"A" and read_file(fs.path("b")) == b"B"
    os.mkdir(fs.path("d"))
    assert_errno(errno.EEXIST, renameat2, fs.path("a"), fs.path("d"), RENAME_NOREPLACE)
    renameat2(fs.path("a"), fs.path("d/c"), RENAME_NOREPLACE)
    assert read_file(fs.path("d/c")) == b"A"
    assert sorted(os.listdir(fs.mnt)) == ["b", "d"]


def test_renameat2_exchange(fs):
    write_file(fs.path("a"), "AAAA")
    os.mkdir(fs.path("sub"))
    write_file(fs.path("sub/b"), "BB")
    ino_a, ino_b = os.stat(fs.path("a")).st_ino, os.stat(fs.path("sub/b")).st_ino
    renameat2(fs.path("a"), fs.path("sub/b"), RENAME_EXCHANGE)      # across directories
    assert read_file(fs.path("a")) == b"BB" and read_file(fs.path("sub/b")) == b"AAAA"
    assert os.stat(fs.path("a")).st_ino == ino_b and os.stat(fs.path("sub/b")).st_ino == ino_a

    os.mkdir(fs.path("dir"))                                         # file <-> directory
    write_file(fs.path("dir/inside"), "in")
    renameat2(fs.path("a"), fs.path("dir"), RENAME_EXCHANGE)
    assert stat.S_ISREG(os.stat(fs.path("dir")).st_mode)
    assert read_file(fs.path("dir")) == b"BB"
    assert read_file(fs.path("a/inside")) == b"in"

    os.mkdir(fs.path("sub/deeper"))                                 # dir <-> dir, different parents
    renameat2(fs.path("a"), fs.path("sub/deeper"), RENAME_EXCHANGE)
    assert read_file(fs.path("sub/deeper/inside")) == b"in"
    assert os.listdir(fs.path("a")) == []
    assert os.stat(fs.path("sub")).st_nlink >= 2

    assert_errno(errno.ENOENT, renameat2, fs.path("a"), fs.path("missing"), RENAME_EXCHANGE)
    assert_errno(errno.EINVAL, renameat2, fs.path("a"), fs.path("dir"),
                 RENAME_EXCHANGE | RENAME_NOREPLACE)


def test_rename_dir_over_empty_dir(fs):
    os.mkdir(fs.path("a"))
    write_file(fs.path("a/f"), "f")
    os.mkdir(fs.path("b"))
    ino = os.stat(fs.path("a")).st_ino
    os.rename(fs.path("a"), fs.path("b"))
    assert not os.path.exists(fs.path("a"))
    assert os.stat(fs.path("b")).st_ino == ino
    assert read_file(fs.path("b/f")) == b"f"
    assert os.listdir(fs.mnt) == ["b"]


def test_rename_dir_over_nonempty_dir_enotempty(fs):
    os.mkdir(fs.path("a"))
    os.mkdir(fs.path("c"))
    write_file(fs.path("c/keep"), "keep")
    assert_errno(errno.ENOTEMPTY, os.rename, fs.path("a"), fs.path("c"))
    assert read_file(fs.path("c/keep")) == b"keep"
    assert os.path.isdir(fs.path("a"))


def test_rename_file_over_dir_eisdir(fs):
    write_file(fs.path("f"), "f")
    os.mkdir(fs.path("d"))
    assert_errno(errno.EISDIR, os.rename, fs.path("f"), fs.path("d"))
    assert os.path.isdir(fs.path("d")) and read_file(fs.path("f")) == b"f"


def test_rename_dir_over_file_enotdir(fs):
    write_file(fs.path("f"), "f")
    os.mkdir(fs.path("d"))
    assert_errno(errno.ENOTDIR, os.rename, fs.path("d"), fs.path("f"))
    assert os.path.isdir(fs.path("d")) and read_file(fs.path("f")) == b"f"


def test_rename_dir_into_own_subdir_einval(fs):
    os.makedirs(fs.path("a/b/c"))
    assert_errno(errno.EINVAL, os.rename, fs.path("a"), fs.path("a/b/c/a"))
    assert_errno(errno.EINVAL, os.rename, fs.path("a"), fs.path("a/b/x"))
    assert os.path.isdir(fs.path("a/b/c"))
    assert os.listdir(fs.mnt) == ["a"]


def test_rename_missing_source_enoent(fs):
    assert_errno(errno.ENOENT, os.rename, fs.path("nope"), fs.path("x"))
    write_file(fs.path("f"), "f")
    assert_errno(errno.ENOENT, os.rename, fs.path("f"), fs.path("nodir/f"))
    assert read_file(fs.path("f")) == b"f"
