"""Unmount and mount again at once, as scripts and test harnesses do.

`fusermount3 -u` returns as soon as the kernel has detached the mount; the
daemon may still be committing and closing its shards (and holding the
store's lock) for a moment after that. A new mount, fsck or where must wait
for it (bounded, saying why), never fail with "in use"; while the store is
really mounted they must fail at once, naming the mount.
"""

import os
import random
import resource
import subprocess
import time

import pytest

from conftest import EXIT_DEADLINE, SHARDFS_BIN, fsck_says_clean, run, write_file

CYCLES = 50


def mount_holders(mnt):
    """Who holds something in mnt now (fds, cwd, root, mappings), and which
    processes are inside a FUSE request: what makes umount answer EBUSY, for
    the message if it does."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        d = "/proc/" + pid
        try:
            names = ["cwd", "root"] + ["fd/" + f for f in os.listdir(d + "/fd")]
            refs = [n for n in names if os.path.realpath(d + "/" + n).startswith(mnt)]
            with open(d + "/maps") as f:
                refs += ["map " + l.split()[-1] for l in f if mnt in l]
            with open(d + "/stack") as f:
                stack = f.read()
            with open(d + "/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        waiting = "request_wait_answer" in stack  # in a FUSE request (of any mount)
        if refs or waiting:
            found.append("pid %s %s: %s%s" % (pid, comm, refs, " in a FUSE request" * waiting))
    return found


def unmount_leaving_daemon(fs):
    """fusermount3 -u, and nothing else: the old daemon may still be closing
    the store. Returns (its Popen, its start number) for reap_daemon()."""
    r = run(["fusermount3", "-u", fs.mnt], check=False, timeout=30)
    assert r.returncode == 0, "fusermount3 -u failed: %s\nholders: %s" % (
        r.stderr, mount_holders(fs.mnt))
    old, fs.proc = fs.proc, None
    return old, fs.starts


def reap_daemon(fs, old):
    """The old daemon must exit 0 and have said nothing suspicious."""
    proc, start = old
    assert proc.wait(timeout=EXIT_DEADLINE) == 0, fs.read_stderr(start)
    fs._check_stderr(start)


def waited(fs, start):
    return "waiting for the shardfs process" in fs.read_stderr(start)


@pytest.mark.timeout_s(600)
def test_unmount_then_mount_at_once(fs):
    """50 cycles of: write files, fusermount3 -u, mount again at once, and
    read back every file written so far."""
    rnd = random.Random(8)
    files = {}
    waits = 0
    for cycle in range(CYCLES):
        for j in range(3):
            # Several shards, inline and chunked files, some rewritten.
            name = "c%02d_%d" % (cycle, j) if j or cycle % 5 else "rewritten"
            data = rnd.randbytes(rnd.choice([0, 1, 3000, 70000, 300000]))
            write_file(fs.path(name), data)
            files[name] = data
        old = unmount_leaving_daemon(fs)
        fs.start()  # fails if the new daemon refuses: "the store is in use"
        reap_daemon(fs, old)
        waits += waited(fs, fs.starts)
        for name, data in files.items():
            with open(fs.path(name), "rb") as f:
                assert f.read() == data, "cycle %d: %s differs after the remount" % (cycle, name)
    print("%d of %d mounts waited for the previous daemon" % (waits, CYCLES))


def test_unmount_right_after_last_closes(fs):
    """Files and directories unlinked while open, closed just before the
    unmount: the kernel drops the releases it has not yet sent when the mount
    goes, and the daemon must still delete them (fsck finds them otherwise,
    with their orphan marks, until the next mount's recovery)."""
    files, dirs = 1000, 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < files + dirs + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, files + dirs + 100), hard))
    try:
        for cycle in range(2):
            fds = []
            for i in range(files):
                p = fs.path("f%d" % i)
                fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
                fds.append(fd)
                os.write(fd, b"%d" % i * 700)
                os.unlink(p)
            for i in range(dirs):
                d = fs.path("d%d" % i)
                os.mkdir(d)
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
                os.rmdir(d)
            for fd in fds:
                os.close(fd)
            fs.unmount()  # at once; waits for the daemon to exit
            fs.assert_fsck_clean()
            fs.start()
            assert os.listdir(fs.mnt) == []
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fsck_right_after_unmount(fs):
    """A script's `fusermount3 -u; shardfs fsck` must not find the store in use."""
    for cycle in range(10):
        for j in range(20):
            write_file(fs.path("f%d_%d" % (cycle, j)), os.urandom(5000 * j))
        old = unmount_leaving_daemon(fs)
        r = fs.fsck()
        assert r.returncode == 0 and fsck_says_clean(r), r.stdout + r.stderr
        reap_daemon(fs, old)
        fs.start()


def test_mounted_store_fails_at_once(fs, tmp_top):
    """A second mount, fsck or where of a store that is mounted fails at once,
    naming the mount and the daemon's pid (no waiting for a daemon that is
    not finishing)."""
    other = os.path.join(tmp_top, "other")
    os.mkdir(other)
    for args in (["mount", "-c", fs.conf, other], ["mount", "-c", fs.conf, "-f", other],
                 ["fsck", "-c", fs.conf], ["where", "-c", fs.conf, "/"]):
        t0 = time.monotonic()
        r = run([SHARDFS_BIN, *args], check=False, timeout=30)
        took = time.monotonic() - t0
        assert r.returncode != 0, args
        assert "mounted at %s" % os.path.realpath(fs.mnt) in r.stderr, (args, r.stderr)
        assert "pid %d" % fs.proc.pid in r.stderr, (args, r.stderr)
        assert took < 5, "%s took %.1f s to fail" % (args, took)
    assert not os.path.ismount(other)


def test_lock_wait_is_bounded(fs):
    """A process that holds the store without a mount (here: a fake holder)
    is waited for up to -w seconds, with one line saying why; then the
    message of old: the store is in use, by whom."""
    fs.unmount()
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.pwrite(fd, b'%d\\nfsck\\n' % os.getpid(), 0)\n"
         "os.ftruncate(fd, len(b'%d\\nfsck\\n' % os.getpid()))\n"
         "print('locked', flush=True)\n"
         "time.sleep(float(sys.argv[2]))\n",
         os.path.join(fs.data, "LOCK"), "3"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = fs.cmd("fsck", "-c", fs.conf, "-w", "1")
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stdout + r.stderr
        assert 0.9 < took < 2.5, took
        lines = r.stderr.splitlines()
        assert len(lines) == 2, r.stderr
        assert "waiting for" in lines[0] and "pid %d, fsck" % holder.pid in lines[0], lines
        assert "in use" in lines[1] and "pid %d" % holder.pid in lines[1], lines
        # Without -w the wait is 10 s: the holder lets go after 3 s.
        r = fs.cmd("fsck", "-c", fs.conf)
        assert r.returncode == 0 and fsck_says_clean(r), r.stdout + r.stderr
        assert "waiting for" in r.stderr, r.stderr
        assert holder.wait(timeout=10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    fs.start()
