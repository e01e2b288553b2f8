"""Extended attributes in the user.* namespace."""

import errno
import os

from conftest import assert_errno, assert_same_tree, run, tree_snapshot, write_file


def test_xattr_set_get_list_remove(fs):
    f = fs.path("f")
    write_file(f, "data")
    os.mkdir(fs.path("d"))
    assert [n for n in os.listxattr(f) if n.startswith("user.")] == []

    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.binary", bytes(range(256)) * 4)   # NULs and high bytes, 1 KiB
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user." + "n" * 200, b"long name")
    os.setxattr(fs.path("d"), "user.ondir", b"dir value")
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(f, "user.binary") == bytes(range(256)) * 4
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user." + "n" * 200) == b"long name"
    assert os.getxattr(fs.path("d"), "user.ondir") == b"dir value"
    assert sorted(n for n in os.listxattr(f) if n.startswith("user.")) == \
        sorted(["user.a", "user.binary", "user.empty", "user." + "n" * 200])

    os.setxattr(f, "user.a", b"a longer value now")          # overwrite
    assert os.getxattr(f, "user.a") == b"a longer value now"
    os.setxattr(f, "user.a", b"s")                            # and shorter again
    assert os.getxattr(f, "user.a") == b"s"

    os.removexattr(f, "user.a")
    assert_errno(errno.ENODATA, os.getxattr, f, "user.a")
    assert "user.a" not in os.listxattr(f)
    assert_errno(errno.ENODATA, os.removexattr, f, "user.a")
    assert_errno(errno.ENODATA, os.getxattr, f, "user.never")

    # the real tools
    run(["setfattr", "-n", "user.tool", "-v", "hello", f])
    out = run(["getfattr", "-d", "--absolute-names", f]).stdout
    assert 'user.tool="hello"' in out
    assert run(["getfattr", "--only-values", "-n", "user.tool", f]).stdout == "hello"
    assert read_text(f) == "data"                             # content untouched

    fs.remount()
    assert os.getxattr(f, "user.binary") == bytes(range(256)) * 4
    assert os.getxattr(f, "user.tool") == b"hello"
    assert os.getxattr(fs.path("d"), "user.ondir") == b"dir value"
    assert_errno(errno.ENODATA, os.getxattr, f, "user.a")


def read_text(p):
    with open(p) as f:
        return f.read()


def test_xattr_create_replace_flags(fs):
    f = fs.path("f")
    write_file(f, "")
    os.setxattr(f, "user.x", b"first", os.XATTR_CREATE)
    assert_errno(errno.EEXIST, os.setxattr, f, "user.x", b"second", os.XATTR_CREATE)
    assert os.getxattr(f, "user.x") == b"first"
    assert_errno(errno.ENODATA, os.setxattr, f, "user.y", b"v", os.XATTR_REPLACE)
    assert_errno(errno.ENODATA, os.getxattr, f, "user.y")
    os.setxattr(f, "user.x", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.x") == b"replaced"


def test_xattr_follows_hard_links_and_survives_rename(fs):
    f = fs.path("f")
    write_file(f, "x")
    os.setxattr(f, "user.k", b"v")
    os.link(f, fs.path("g"))
    assert os.getxattr(fs.path("g"), "user.k") == b"v"
    os.rename(f, fs.path("h"))
    assert os.getxattr(fs.path("h"), "user.k") == b"v"
    os.unlink(fs.path("h"))
    assert os.getxattr(fs.path("g"), "user.k") == b"v"


def test_rsync_aX_roundtrip_with_xattrs(fs, tmp_top):
    src = os.path.join(tmp_top, "src")
    os.makedirs(os.path.join(src, "sub"))
    files = {"a": b"alpha", "sub/b": os.urandom(100000), "sub/c": b""}
    for rel, data in files.items():
        write_file(os.path.join(src, rel), data)
    os.setxattr(os.path.join(src, "a"), "user.one", b"1")
    os.setxattr(os.path.join(src, "a"), "user.two", b"\x00\x01\x02")
    os.setxattr(os.path.join(src, "sub/b"), "user.big", b"B" * 3000)
    os.setxattr(os.path.join(src, "sub"), "user.dir", b"d")

    run(["rsync", "-aX", "--modify-window=-1", src + "/", fs.path("dst") + "/"], timeout=120)
    snap = tree_snapshot(src, xattrs=True)
    assert_same_tree(snap, tree_snapshot(fs.path("dst"), xattrs=True))
    assert os.getxattr(fs.path("dst/a"), "user.two") == b"\x00\x01\x02"

    r = run(["rsync", "-aX", "--modify-window=-1", "--itemize-changes", src + "/",
             fs.path("dst") + "/"], timeout=120)
    assert r.stdout.strip() == "", "second rsync -aX changed things:\n" + r.stdout

    back = os.path.join(tmp_top, "back")
    run(["rsync", "-aX", "--modify-window=-1", fs.path("dst") + "/", back + "/"], timeout=120)
    assert_same_tree(snap, tree_snapshot(back, xattrs=True))
