"""After an unclean stop (kill -9 of the daemon, or the machine stopping under
it) the next mount checks and repairs the store before it serves it, and says
why; after a clean unmount it does not. DATA_DIR/RUNNING is the mark."""

import os
import re
import time

from conftest import COMMIT_INTERVAL_MS, make_tree, tree_snapshot, assert_same_tree, write_file

KILLED = "the last shardfs daemon was killed while the store was open: checking and repairing"
MACHINE = "the machine stopped while the store was open: checking and repairing"


def _mark(fs):
    return os.path.join(fs.data, "RUNNING")


def test_running_mark_follows_the_mount(fs):
    write_file(fs.path("a"), b"x")
    text = open(_mark(fs)).read()
    assert text.startswith("shardfs-running\n")
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert "boot %s\n" % f.read().strip() in text
    assert "pid %d\n" % fs.proc.pid in text
    fs.unmount()
    assert not os.path.exists(_mark(fs)), "a clean unmount leaves no mark"
    fs.start()
    assert KILLED not in fs.read_stderr() and MACHINE not in fs.read_stderr()


def test_remount_after_kill9_checks_the_store(fs):
    make_tree(fs.path("t"), seed=11)
    os.mkdir(fs.path("t/sub"))
    write_file(fs.path("t/sub/late"), os.urandom(70000))
    snap = tree_snapshot(fs.mnt)
    time.sleep(5 * COMMIT_INTERVAL_MS / 1000)
    fs.kill9()
    fs.lazy_unmount()
    assert os.path.exists(_mark(fs)), "the killed daemon's mark stays"
    fs.start()
    err = fs.read_stderr()
    assert KILLED in err, err
    assert re.search(r"fsck: clean", err, re.I), err
    assert_same_tree(snap, tree_snapshot(fs.mnt))
    # And a clean stop after it: no check at the next mount.
    fs.unmount()
    fs.start()
    assert KILLED not in fs.read_stderr()
    assert_same_tree(snap, tree_snapshot(fs.mnt))


def test_remount_after_machine_stop_checks_the_store(fs):
    """A mark naming another boot is what a power cut leaves behind."""
    make_tree(fs.path("t"), seed=12)
    snap = tree_snapshot(fs.mnt)
    time.sleep(5 * COMMIT_INTERVAL_MS / 1000)
    fs.kill9()
    fs.lazy_unmount()
    text = open(_mark(fs)).read()
    with open(_mark(fs), "w") as f:
        f.write(re.sub(r"boot .*", "boot 00000000-0000-0000-0000-000000000000", text))
    fs.start()
    err = fs.read_stderr()
    assert MACHINE in err, err
    assert re.search(r"fsck: clean", err, re.I), err
    assert_same_tree(snap, tree_snapshot(fs.mnt))


def test_fsck_repair_clears_the_mark_fsck_alone_does_not(fs):
    make_tree(fs.path("t"), seed=13)
    snap = tree_snapshot(fs.mnt)
    fs.kill9()
    fs.lazy_unmount()
    fs.fsck()                      # a check changes nothing, the mark included
    assert os.path.exists(_mark(fs))
    r = fs.fsck(repair=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(_mark(fs)), "a full repair leaves nothing for the mount to do"
    fs.start()
    assert KILLED not in fs.read_stderr()
    assert_same_tree(snap, tree_snapshot(fs.mnt))
