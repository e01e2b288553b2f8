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
