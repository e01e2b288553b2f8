"""Error returns, compared with what Linux ext4 gives."""

import errno
import os

from conftest import assert_errno, read_file, run, write_file


def test_mkdir_existing_eexist(fs):
    os.mkdir(fs.path("d"))
    assert_errno(errno.EEXIST, os.mkdir, fs.path("d"))
    write_file(fs.path("f"), "f")
    assert_errno(errno.EEXIST, os.mkdir, fs.path("f"))
    os.symlink("nowhere", fs.path("l"))
    assert_errno(errno.EEXIST, os.mkdir, fs.path("l"))
    assert read_file(fs.path("f")) == b"f"
    assert_errno(errno.ENOENT, os.mkdir, fs.path("no/such/parent"))
    assert_errno(errno.ENOTDIR, os.mkdir, fs.path("f/sub"))


def test_rmdir_nonempty_enotempty(fs):
    os.makedirs(fs.path("d/sub"))
    assert_errno(errno.ENOTEMPTY, os.rmdir, fs.path("d"))
    os.rmdir(fs.path("d/sub"))
    write_file(fs.path("d/f"), "")
    assert_errno(errno.ENOTEMPTY, os.rmdir, fs.path("d"))
    os.unlink(fs.path("d/f"))
    os.rmdir(fs.path("d"))
    assert os.listdir(fs.mnt) == []
    write_file(fs.path("f"), "")
    assert_errno(errno.ENOTDIR, os.rmdir, fs.path("f"))
    assert_errno(errno.ENOENT, os.rmdir, fs.path("gone"))


def test_open_creat_excl_existing_eexist(fs):
    write_file(fs.path("f"), "keep")
    assert_errno(errno.EEXIST, os.open, fs.path("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert read_file(fs.path("f")) == b"keep"
    os.symlink("dangling-target", fs.path("l"))        # O_EXCL does not follow symlinks
    assert_errno(errno.EEXIST, os.open, fs.path("l"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert not os.path.lexists(fs.path("dangling-target"))
    fd = os.open(fs.path("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    assert os.path.exists(fs.path("new"))


def test_open_missing_enoent(fs):
    assert_errno(errno.ENOENT, os.open, fs.path("missing"), os.O_RDONLY)
    assert_errno(errno.ENOENT, os.open, fs.path("nodir/f"), os.O_CREAT | os.O_WRONLY, 0o644)
    assert_errno(errno.ENOENT, os.stat, fs.path("missing"))
    assert_errno(errno.ENOENT, os.unlink, fs.path("missing"))
    write_file(fs.path("f"), "")
    assert_errno(errno.ENOTDIR, os.open, fs.path("f/x"), os.O_RDONLY)
    os.mkdir(fs.path("d"))
    assert_errno(errno.EISDIR, os.open, fs.path("d"), os.O_WRONLY)
    r = run(["cat", "missing"], cwd=fs.mnt, check=False)
    assert r.returncode != 0 and "No such file or directory" in r.stderr


def test_name_length_limit(fs):
    ok = "n" * 255
    bad = "n" * 256
    write_file(fs.path(ok), "255 is fine")
    assert read_file(fs.path(ok)) == b"255 is fine"
    assert ok in os.listdir(fs.mnt)
    os.mkdir(fs.path("d" * 255))
    os.symlink("t", fs.path("s" * 255))
    assert_errno(errno.ENAMETOOLONG, os.open, fs.path(bad), os.O_CREAT | os.O_WRONLY, 0o644)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, fs.path(bad))
    assert_errno(errno.ENAMETOOLONG, os.symlink, "t", fs.path(bad))
    assert_errno(errno.ENAMETOOLONG, os.rename, fs.path(ok), fs.path(bad))
    assert_errno(errno.ENAMETOOLONG, os.link, fs.path(ok), fs.path(bad))
    assert_errno(errno.ENAMETOOLONG, os.stat, fs.path(bad))
    assert sorted(os.listdir(fs.mnt)) == sorted([ok, "d" * 255, "s" * 255])
    assert os.statvfs(fs.mnt).f_namemax == 255


def test_unlink_dir_eisdir(fs):
    os.mkdir(fs.path("d"))
    assert_errno(errno.EISDIR, os.unlink, fs.path("d"))
    assert os.path.isdir(fs.path("d"))
    r = run(["rm", "d"], cwd=fs.mnt, check=False)
    assert r.returncode != 0 and os.path.isdir(fs.path("d"))


def test_deep_path_beyond_path_max(fs):
    # 60 levels of 100-char names: about 6 KB, more than PATH_MAX (4096), so
    # walk down with dir_fd like `find`/`rm -r` do.
    names = ["%03d" % i + "d" * 97 for i in range(60)]
    fd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        w = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(w, b"deep down\n")
        os.close(w)
    finally:
        os.close(fd)

    full = os.path.join(fs.mnt, *names, "leaf")
    assert len(full) > 6000
    assert_errno(errno.ENAMETOOLONG, os.open, full, os.O_RDONLY)

    fd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)     # walk again and read it back
    try:
        for name in names:
            assert os.listdir(fd) == [name]
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        r = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(r, 100) == b"deep down\n"
        os.close(r)
    finally:
        os.close(fd)

    found = run(["find", fs.mnt, "-type", "f"], timeout=60).stdout.splitlines()
    assert found == [full]
    run(["rm", "-rf", os.path.join(fs.mnt, names[0])], timeout=60)
    assert os.listdir(fs.mnt) == []
