"""rsync of a real tree (/usr/include: ~9000 entries, ~130 MB) into the mount."""

import re

import pytest

from conftest import assert_same_tree, run, tree_snapshot

SRC = "/usr/include"
# -H: keep hard links; --modify-window=-1: compare mtimes to the nanosecond,
# so "nothing to transfer" also proves nanosecond mtimes were stored.
RSYNC = ["rsync", "-aH", "--modify-window=-1"]
ITEMIZED = re.compile(r"^[<>ch.*][fdLDS]\S{9,10} ")


def itemized_lines(out):
    return [l for l in out.splitlines() if ITEMIZED.match(l)]


@pytest.mark.timeout_s(900)
def test_rsync_usr_include(fs):
    dst = fs.path("inc")
    run(RSYNC + [SRC + "/", dst + "/"], timeout=600)
    run(["diff", "-r", "--no-dereference", SRC, dst], timeout=600)
    src_snap = tree_snapshot(SRC)
    assert_same_tree(src_snap, tree_snapshot(dst))

    r = run(RSYNC + ["--itemize-changes", "--stats", SRC + "/", dst + "/"], timeout=600)
    assert "Number of regular files transferred: 0" in r.stdout, r.stdout[-3000:]
    assert itemized_lines(r.stdout) == [], "second rsync found differences:\n" + r.stdout[-3000:]

    fs.remount()
    run(["diff", "-r", "--no-dereference", SRC, dst], timeout=600)
    assert_same_tree(src_snap, tree_snapshot(dst))
    fs.unmount()
    fs.assert_fsck_clean()


def test_rsync_aH_keeps_hard_links(fs, tmp_top):
    """rsync -aH of a tree with hard links (across directories too): the
    copy has the same link structure, and a second rsync changes nothing."""
    import os
    src = os.path.join(tmp_top, "hsrc")
    os.makedirs(os.path.join(src, "a", "b"))
    for i in range(20):
        with open(os.path.join(src, "a", "f%d" % i), "wb") as f:
            f.write(os.urandom(100 + i * 3000))
        os.link(os.path.join(src, "a", "f%d" % i), os.path.join(src, "a", "b", "g%d" % i))
        if i % 2:
            os.link(os.path.join(src, "a", "f%d" % i), os.path.join(src, "h%d" % i))
    dst = fs.path("hdst")
    run(RSYNC + [src + "/", dst + "/"], timeout=120)
    run(["diff", "-r", src, dst], timeout=60)
    for i in range(20):
        f = os.stat(os.path.join(dst, "a", "f%d" % i))
        g = os.stat(os.path.join(dst, "a", "b", "g%d" % i))
        assert f.st_ino == g.st_ino
        assert f.st_nlink == (3 if i % 2 else 2)
        if i % 2:
            assert os.stat(os.path.join(dst, "h%d" % i)).st_ino == f.st_ino
    r = run(RSYNC + ["--itemize-changes", src + "/", dst + "/"], timeout=120)
    assert itemized_lines(r.stdout) == [], r.stdout
    fs.remount()
    f = os.stat(os.path.join(dst, "a", "f1"))
    assert f.st_nlink == 3 and f.st_ino == os.stat(os.path.join(dst, "h1")).st_ino
    fs.unmount()
    fs.assert_fsck_clean()
