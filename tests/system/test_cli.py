"""The command line: --help, unknown commands, `where`, daemon mode."""

import os
import re
import time

import pytest

from conftest import (SHARDFS_BIN, fsck_says_clean, fuse_unmount, is_mounted, read_file, run,
                      write_conf, write_file)


def _out(r):
    return r.stdout + r.stderr


def test_help():
    r = run([SHARDFS_BIN, "--help"], timeout=10)
    text = _out(r)
    assert re.search(r"usage", text, re.I), text
    for cmd in ("mount", "fsck", "where"):
        assert cmd in text, "--help does not list %s:\n%s" % (cmd, text)


@pytest.mark.parametrize("cmd,must_mention", [
    ("mount", ["-c", "-f", "-o"]),
    ("fsck", ["-c", "--repair"]),
    ("where", ["-c"]),
])
def test_subcommand_help(cmd, must_mention):
    r = run([SHARDFS_BIN, cmd, "--help"], timeout=10)
    text = _out(r)
    assert re.search(r"usage", text, re.I) and cmd in text, text
    for opt in must_mention:
        assert opt in text, "%s --help does not mention %s:\n%s" % (cmd, opt, text)


def test_unknown_subcommand_fails():
    r = run([SHARDFS_BIN, "frobnicate"], check=False, timeout=10)
    assert r.returncode != 0
    assert r.stderr.strip(), "no message for an unknown subcommand"
    r = run([SHARDFS_BIN, "mount", "--no-such-option", "/nonexistent"], check=False, timeout=10)
    assert r.returncode != 0


def test_mount_without_mountpoint_fails(tmp_top):
    conf = os.path.join(tmp_top, "shards.conf")
    os.mkdir(os.path.join(tmp_top, "data"))
    write_conf(conf)
    r = run([SHARDFS_BIN, "mount", "-c", conf], check=False, timeout=30)
    assert r.returncode != 0 and r.stderr.strip()
    r = run([SHARDFS_BIN, "mount", "-c", conf, os.path.join(tmp_top, "no-such-dir")],
            check=False, timeout=30)
    assert r.returncode != 0 and r.stderr.strip()
    assert not is_mounted(os.path.join(tmp_top, "no-such-dir"))


WHERE_LINE = re.compile(r"^(entry|inode|data) shard (\d+)\b", re.M)


def _where(fs, path):
    r = fs.cmd("where", "-c", fs.conf, path, check=True, timeout=30)
    return [(k, int(n)) for k, n in WHERE_LINE.findall(r.stdout)], r.stdout


@pytest.mark.uniform_layout  # counts 4 shards
def test_where_prints_shards_in_range(fs):
    os.makedirs(fs.path("a"))
    write_file(fs.path("a/b"), os.urandom(300000))
    for i in range(64):
        write_file(fs.path("a/n%02d" % i), "x%d" % i)
    fs.unmount()

    found, out = _where(fs, "/a/b")
    kinds = {k for k, _ in found}
    assert kinds == {"entry", "inode", "data"}, "where /a/b printed:\n" + out
    assert all(0 <= n < 4 for _, n in found), out
    assert _where(fs, "/a/b") == (found, out), "where is not deterministic"

    entry_shards = set()
    for i in range(64):
        f, out = _where(fs, "/a/n%02d" % i)
        e = [n for k, n in f if k == "entry"]
        assert len(e) == 1 and 0 <= e[0] < 4, out
        entry_shards.add(e[0])
    assert len(entry_shards) > 1, "64 names all placed on shard %s" % entry_shards

    fs.start()                                     # `where` did not change the store
    assert len(read_file(fs.path("a/b"))) == 300000


def _pids_with_arg(arg):
    """PIDs whose command line contains arg (our unique conf path)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            pids.append(int(d))
    return pids


def test_mount_daemonizes_without_f(tmp_top):
    conf = os.path.join(tmp_top, "shards.conf")
    mnt = os.path.join(tmp_top, "mnt")
    os.mkdir(os.path.join(tmp_top, "data"))
    os.mkdir(mnt)
    write_conf(conf)
    r = run([SHARDFS_BIN, "mount", "-c", conf, "-o", "allow_other", mnt], check=False, timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt), "mount returned before the mount was ready"
        write_file(os.path.join(mnt, "f"), "daemon mode\n")
        assert read_file(os.path.join(mnt, "f")) == b"daemon mode\n"
        assert _pids_with_arg(conf), "no daemon process left running"
    finally:
        if is_mounted(mnt):
            fuse_unmount(mnt)
    # after unmount the daemon exits by itself
    deadline = time.monotonic() + 20
    while _pids_with_arg(conf) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _pids_with_arg(conf)
    for pid in left:                               # only our own daemon, by PID
        os.kill(pid, 9)
    assert not left, "daemon %s still running 20 s after unmount" % left
    r = run([SHARDFS_BIN, "fsck", "-c", conf], check=False, timeout=120)
    assert r.returncode == 0 and fsck_says_clean(r), r.stdout + r.stderr
