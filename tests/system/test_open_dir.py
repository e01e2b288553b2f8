"""A directory that a process holds open while its last name goes away.

rmdir(2) of an empty directory, or rename(2) of another directory over it,
while some process has it open (opendir(3), open(O_DIRECTORY)): as on ext4
and tmpfs, the descriptor still works. fstat gives the directory with nlink
0, readdir gives no entries and no error, fchdir works, nothing can be
created in it; and at the last close the inode is gone from the store (fsck
would report it), after a kill -9 at the next mount's recovery.
"""

import errno
import os
import stat

import pytest

from conftest import assert_errno, fsck_says_clean, write_file

# Several names, so that entries and inodes land on different shards and both
# the same-shard and the cross-shard rename paths run.
PAIRS = 8


def check_dead_dir(fd, ino, what):
    """What POSIX and Linux filesystems give for an open, removed directory."""
    st = os.fstat(fd)
    assert stat.S_ISDIR(st.st_mode), what
    assert st.st_ino == ino, what
    assert st.st_nlink == 0, "%s: nlink %d" % (what, st.st_nlink)
    assert os.listdir(fd) == [], what
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchdir(fd)
        assert os.stat(".").st_ino == ino, what
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    assert_errno(errno.ENOENT, os.mkdir, "sub", dir_fd=fd)
    assert_errno(errno.ENOENT, os.open, "file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)


def open_dir(path, how):
    if how == "opendir":
        # What opendir(3) does; keep the fd (os.scandir hides it).
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize("how", ["O_DIRECTORY", "opendir"])
def test_rename_over_open_empty_dir(fs, how):
    os.mkdir(fs.path("x"))
    held = []
    try:
        for i in range(PAIRS):
            src, dst = fs.path("src%d" % i), fs.path("x", "dst%d" % i)
            os.mkdir(src)
            write_file(os.path.join(src, "inside"), "moved with src %d" % i)
            os.mkdir(dst)
            fd = open_dir(dst, how)
            held.append((fd, os.fstat(fd).st_ino))
            os.rename(src, dst)
            check_dead_dir(fd, held[-1][1], "dst%d after rename over it" % i)
            assert os.listdir(dst) == ["inside"]
        assert sorted(os.listdir(fs.path("x"))) == ["dst%d" % i for i in range(PAIRS)]
        assert os.stat(fs.path("x")).st_nlink == 2 + PAIRS
    finally:
        for fd, _ in held:
            os.close(fd)
    fs.unmount()
    fs.assert_fsck_clean()  # the replaced directories are gone from the store
    fs.start()
    for i in range(PAIRS):
        assert os.listdir(fs.path("x", "dst%d" % i)) == ["inside"]


def test_rmdir_of_open_dir(fs):
    held = []
    try:
        for i in range(PAIRS):
            d = fs.path("d%d" % i)
            os.mkdir(d)
            fd = open_dir(d, "O_DIRECTORY")
            held.append((fd, os.fstat(fd).st_ino))
            os.rmdir(d)
            assert not os.path.lexists(d)
            check_dead_dir(fd, held[-1][1], "d%d after rmdir" % i)
            os.mkdir(d)  # the name is free: a new directory
            assert os.stat(d).st_ino != held[-1][1]
            assert os.listdir(d) == []
        # Two descriptors of one directory: the last close deletes it.
        os.mkdir(fs.path("twice"))
        fd1 = open_dir(fs.path("twice"), "O_DIRECTORY")
        fd2 = open_dir(fs.path("twice"), "opendir")
        ino = os.fstat(fd1).st_ino
        os.rmdir(fs.path("twice"))
        os.close(fd1)
        check_dead_dir(fd2, ino, "twice, after one of two closes")
        os.close(fd2)
        # A directory with entries is still refused while open.
        os.mkdir(fs.path("full"))
        write_file(fs.path("full", "f"), "x")
        fd = open_dir(fs.path("full"), "O_DIRECTORY")
        held.append((fd, os.fstat(fd).st_ino))
        assert_errno(errno.ENOTEMPTY, os.rmdir, fs.path("full"))
        assert os.fstat(fd).st_nlink == 2
    finally:
        for fd, _ in held:
            os.close(fd)
    assert os.stat(fs.mnt).st_nlink == 2 + PAIRS + 1
    fs.unmount()
    fs.assert_fsck_clean()


def test_open_removed_dir_after_kill9(fs):
    """The daemon dies while removed directories are open: their marks are in
    the store (fsck sees them), and the next mount's recovery deletes them."""
    fds = []
    for i in range(4):
        os.mkdir(fs.path("r%d" % i))
        fds.append(open_dir(fs.path("r%d" % i), "O_DIRECTORY"))
        os.rmdir(fs.path("r%d" % i))
        os.mkdir(fs.path("s%d" % i))
        os.mkdir(fs.path("t%d" % i))
        fds.append(open_dir(fs.path("t%d" % i), "opendir"))
        os.rename(fs.path("s%d" % i), fs.path("t%d" % i))
    fs.kill9()
    for fd in fds:
        os.close(fd)  # on a dead mount: no release reaches anyone
    fs.lazy_unmount()
    r = fs.fsck()
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("unlinked while open") == 8, r.stdout
    fs.start()  # recovery deletes them
    assert sorted(os.listdir(fs.mnt)) == ["t%d" % i for i in range(4)]
    fs.unmount()
    r = fs.fsck()
    assert r.returncode == 0 and fsck_says_clean(r), r.stdout + r.stderr
