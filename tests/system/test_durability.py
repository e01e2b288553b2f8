"""Persistence across remounts, kill -9 of the daemon, and the bytes in the store."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import (COMMIT_INTERVAL_MS, assert_same_tree, kill_group, make_tree, read_file,
                      run, tree_snapshot, wait_for, write_file)

SRC = "/usr/include"
# "A short moment" between the last close() and kill -9: many commit intervals.
# This is the promise under test (closed files are committed within the batch
# commit interval), not a synchronisation guess.
SETTLE = max(1.0, 20 * COMMIT_INTERVAL_MS / 1000.0)
RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")      # rsync's ".name.XXXXXX"


def _mutate(root):
    """Metadata operations on a make_tree() tree, so a crash test covers more
    than file creation."""
    os.rename(os.path.join(root, "a/f05_4097.bin"), os.path.join(root, "renamed.bin"))
    os.rename(os.path.join(root, "many"), os.path.join(root, "a/b/many"))
    os.unlink(os.path.join(root, "f04_4096.bin"))
    os.rmdir(os.path.join(root, "empty"))
    write_file(os.path.join(root, "a/f01_1.bin"), "overwritten via O_TRUNC")
    with open(os.path.join(root, "a/b/many/n003.txt"), "ab") as f:
        f.write(b"appended\n")
    os.truncate(os.path.join(root, "a/b/f10_3145733.bin"), 1 << 20)
    os.chmod(os.path.join(root, "a/b/f02_100.bin"), 0o751)
    os.utime(os.path.join(root, "a/b/f02_100.bin"), ns=(5, 1_234_567_890_123_456_789))
    os.symlink("renamed.bin", os.path.join(root, "newlink"))
    os.mkfifo(os.path.join(root, "fifo"))


def test_persistence_across_remount(fs):
    root = fs.path("t")
    make_tree(root, seed=9, xattrs=True)
    write_file(fs.path("t/big"), os.urandom(8 << 20))
    snap = tree_snapshot(fs.mnt, xattrs=True)
    fs.remount()
    assert_same_tree(snap, tree_snapshot(fs.mnt, xattrs=True))

    _mutate(root)
    snap2 = tree_snapshot(fs.mnt, xattrs=True)
    fs.unmount()
    fs.assert_fsck_clean()
    fs.start()
    assert_same_tree(snap2, tree_snapshot(fs.mnt, xattrs=True))
    fs.remount()                                           # and once more, unchanged
    assert_same_tree(snap2, tree_snapshot(fs.mnt, xattrs=True))


def test_kill9_keeps_closed_files(fs):
    root = fs.path("t")
    make_tree(root, seed=5, xattrs=True)
    _mutate(root)
    for i in range(20):
        write_file(fs.path("t/late%02d" % i), os.urandom(1000 * i + 1))
    snap = tree_snapshot(fs.mnt, xattrs=True)
    time.sleep(SETTLE)
    fs.kill9()
    fs.lazy_unmount()
    repaired = fs.fsck_clean_or_repair()
    fs.start()
    assert_same_tree(snap, tree_snapshot(fs.mnt, xattrs=True))
    fs.unmount()
    fs.assert_fsck_clean()
    print("fsck --repair needed after the crash: %s" % repaired)


@pytest.mark.timeout_s(900)
def test_kill9_mid_rsync(fs, tmp_top):
    dst = fs.path("inc")
    out = open(os.path.join(tmp_top, "rsync.out"), "wb")
    rs = subprocess.Popen(["rsync", "-a", SRC + "/", dst + "/"], stdin=subprocess.DEVNULL,
                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: os.path.isdir(dst) or rs.poll() is not None, 30, "rsync to start")
        time.sleep(1.0)                                   # let it get ~1 s into the copy
        finished_early = rs.poll() is not None
        fs.kill9()
        try:
            rs.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(rs.pid)
            rs.wait(timeout=10)
    finally:
        if rs.poll() is None:
            kill_group(rs.pid)
            rs.wait(timeout=10)
        out.close()
    fs.lazy_unmount()
    repaired = fs.fsck_clean_or_repair()
    fs.start()

    # Everything under its final name must be exactly the source: rsync writes
    # ".name.XXXXXX" and renames only a complete file.
    completed = 0
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, dst)
            if RSYNC_TEMP.match(name) and not os.path.lexists(os.path.join(SRC, rel)):
                continue
            s = os.path.join(SRC, rel)
            assert os.path.lexists(s), "%s appeared from nowhere" % rel
            if os.path.islink(p):
                assert os.readlink(p) == os.readlink(s), rel
            elif os.path.isdir(p):
                assert os.path.isdir(s) and not os.path.islink(s), rel
            else:
                assert os.path.isfile(s) and not os.path.islink(s), rel
                assert read_file(p) == read_file(s), "%s differs from the source after crash" % rel
                completed += 1
    assert completed > 0, "no file completed in ~1 s: the crash tested nothing"
    print("completed before kill: %d files (rsync finished early: %s, repair: %s)"
          % (completed, finished_early, repaired))

    # --delete removes rsync temp files the crash left behind
    run(["rsync", "-a", "--delete", SRC + "/", dst + "/"], timeout=600)
    run(["diff", "-r", "--no-dereference", SRC, dst], timeout=600)
    fs.unmount()
    fs.assert_fsck_clean()


def _data_segments(path, chunk=1 << 20):
    """Yield the non-hole bytes of path (LMDB files can be large and sparse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
                end = os.lseek(fd, off, os.SEEK_HOLE)
            except OSError:
                break
            while off < end:
                b = os.pread(fd, min(chunk, end - off), off)
                if not b:
                    return
                yield off, b
                off += len(b)
    finally:
        os.close(fd)


def _files_containing(root, marker):
    hits = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            tail = b""
            for _, b in _data_segments(p):
                if marker in tail + b:
                    hits.append(p)
                    break
                tail = b[-len(marker):]
    return hits


def _is_lmdb_file(path):
    # An LMDB data file starts with a meta page: 16-byte page header, then
    # mm_magic 0xBEEFC0DE (native byte order).
    with open(path, "rb") as f:
        head = f.read(20)
    return len(head) == 20 and int.from_bytes(head[16:20], sys.byteorder) == 0xBEEFC0DE


def test_data_lives_in_the_store(fs):
    """The other side of the mount: the bytes are in the shard files under
    data_dir, not in a plain file next to them."""
    marker = os.urandom(32).hex().encode()
    write_file(fs.path("marked"), b"head " + marker + b" tail")
    fs.unmount()
    assert not os.path.exists(os.path.join(fs.data, "marked")), "data_dir is a passthrough"
    hits = _files_containing(fs.data, marker)
    assert hits, "the file's bytes are nowhere under %s" % fs.data
    lmdb_hits = [h for h in hits if _is_lmdb_file(h)]
    assert lmdb_hits, "the bytes are under %s but not in an LMDB data file: %s" % (fs.data, hits)
    # and LMDB itself reads them back: dump a copy (mdb_dump would add a lock
    # file to the store) with its main and named databases
    copy = os.path.join(fs.top, "dumped.mdb")
    shutil.copyfile(lmdb_hits[0], copy)
    dump = run(["mdb_dump", "-n", copy], timeout=60).stdout + \
        run(["mdb_dump", "-n", "-a", copy], timeout=60, check=False).stdout
    assert marker.hex() in dump, "mdb_dump of %s lacks the bytes" % lmdb_hits[0]
    fs.assert_fsck_clean()
    fs.start()
    assert read_file(fs.path("marked")) == b"head " + marker + b" tail"
