"""Split and merge the shards of a single-node store (`shardfs reshard`).

Shard s at depth d splits into s and s + 2^d at depth d + 1: only the
records of s whose hash has bit d set move. These tests check that the
tree reads back byte for byte through a mount after every change, that fsck
(which checks every record against the layout) is clean, that `where`
moves a path only from s to s + 2^d, that the copy and the purge agree,
and that a kill at each phase is finished by `reshard resume` (and that a
mount refuses the store until then). A mounted store is split and merged
by its daemon (through DATA_DIR/CONTROL) while a strict writer appends
(every write's count and every close checked before the record counts as
acknowledged) and rsync copies a tree in; then every acknowledged record
is there and the tree is the same. kill -9 of the daemon at each phase of
an online split, then `reshard resume`: the same end state.
"""

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (assert_same_tree, fuse_unmount, is_mounted, make_tree, run,
                      tree_snapshot, write_file)

# They make their own layouts.
pytestmark = pytest.mark.uniform_layout

DONE = re.compile(r"^(split|merge|resumed): shards (\d+) and (\d+) at depth (\d+): "
                  r"(\d+) records \(\d+ bytes\) copied, (\d+) purged", re.M)


def reshard(fs, *args, env=None, check=True):
    r = run([fs_bin(), "reshard", *args[:1], "-c", fs.conf, "-w", "0", *args[1:]],
            check=False, timeout=300, env=env)
    if check:
        assert r.returncode == 0, "reshard %s exited %d:\n%s\n%s" % (
            " ".join(args), r.returncode, r.stdout, r.stderr)
    return r


def fs_bin():
    from conftest import SHARDFS_BIN
    return SHARDFS_BIN


def layout(fs):
    """{shard: depth} from DATA/STORE."""
    text = open(os.path.join(fs.data, "STORE")).read()
    if text.startswith("shardfs-store 1"):
        n = int(re.search(r"^shards (\d+)", text, re.M).group(1))
        return {i: n.bit_length() - 1 for i in range(n)}
    return {int(s): int(d) for s, d in re.findall(r"^shard (\d+) (\d+)$", text, re.M)}


def where(fs, paths):
    """{path: (entry shard, inode shard)} by `shardfs where` (store unmounted)."""
    out = {}
    for p in paths:
        r = fs.cmd("where", "-c", fs.conf, p, check=True)
        e = re.search(r"^entry shard (\d+)", r.stdout, re.M)
        i = re.search(r"^inode shard (\d+)", r.stdout, re.M)
        out[p] = (int(e.group(1)) if e else None, int(i.group(1)))
    return out


def fill(fs, seed=3):
    """A tree with small and large files through the mount; its snapshot."""
    src = os.path.join(fs.top, "src")
    make_tree(src, seed=seed)
    big = os.urandom(3 * 65536 + 123)
    write_file(os.path.join(src, "big.bin"), big)
    run(["cp", "-a", src, fs.path("t")])
    return src


def check_tree(fs, src):
    fs.start()
    assert_same_tree(tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False),
                     tree_snapshot(fs.path("t"), mtimes=False, dir_mtimes=False, owners=False))
    fs.unmount()
    fs.assert_fsck_clean()


def all_paths(src):
    """Every path of the tree (about 75): each entry and inode moves with
    chance 1/8, so that some of them moves is all but certain (with the 40
    first, one CI run in a few hundred saw none move)."""
    paths = []
    for root, dirs, files in os.walk(src):
        for name in sorted(dirs + files):
            paths.append("/t/" + os.path.relpath(os.path.join(root, name), src))
    return sorted(paths)


def test_split_moves_only_the_new_bit_and_merge_restores(shardfs_factory):
    fs = shardfs_factory(sub="")
    src = fill(fs)
    fs.unmount()
    paths = all_paths(src)
    before = where(fs, paths)

    r = reshard(fs, "split", "1")
    m = DONE.search(r.stdout)
    assert m and m.group(1) == "split" and m.group(2, 3, 4) == ("1", "5", "3"), r.stdout
    moved, purged = int(m.group(5)), int(m.group(6))
    assert moved > 0 and moved == purged, r.stdout
    assert layout(fs) == {0: 2, 1: 3, 2: 2, 3: 2, 5: 3}
    assert "shard 5 depth 3" in r.stdout
    after = where(fs, paths)
    went = 0
    for p in paths:
        for b, a in zip(before[p], after[p]):
            if b is None:
                continue
            assert a == b or (b == 1 and a == 5), "%s: shard %s -> %s" % (p, b, a)
            went += a != b
    assert went > 0, "no entry or inode of %d paths moved from shard 1 to 5" % len(paths)
    check_tree(fs, src)

    # One shard twice (depth 2 -> 4) while its neighbours keep theirs.
    reshard(fs, "split", "5")
    reshard(fs, "split", "1")
    assert layout(fs) == {0: 2, 1: 4, 2: 2, 3: 2, 5: 4, 9: 4, 13: 4}
    check_tree(fs, src)

    # The store is usable in between: write, then everything merges back.
    fs.start()
    write_file(fs.path("t", "new.txt"), b"after the splits\n")
    with open(fs.path("t", "new.txt"), "ab") as f:
        f.write(b"appended\n")
    os.rename(fs.path("t", "new.txt"), fs.path("t", "renamed.txt"))
    fs.unmount()
    write_file(os.path.join(src, "renamed.txt"), b"after the splits\nappended\n")

    r = reshard(fs, "merge", "13", check=False)
    assert r.returncode == 0, r.stderr
    r = reshard(fs, "merge", "5", check=False)  # depth 3; its buddy 1 is at depth 4
    assert r.returncode == 1 and "split further" in r.stderr, (r.stdout, r.stderr)
    reshard(fs, "merge", "9")
    reshard(fs, "merge", "5")
    assert layout(fs) == {0: 2, 1: 2, 2: 2, 3: 2}
    text = open(os.path.join(fs.data, "STORE")).read()
    assert text.startswith("shardfs-store 1\n"), text  # the made-with layout: format 1
    assert sorted(n for n in os.listdir(fs.data) if n.startswith("shard-")) == [
        "shard-0", "shard-1", "shard-2", "shard-3"]
    assert where(fs, paths) == before
    check_tree(fs, src)


def test_split_all_doubles_every_shard(shardfs_factory):
    fs = shardfs_factory(sub="")
    src = fill(fs, seed=5)
    fs.unmount()
    r = reshard(fs, "split", "--all")
    assert len(DONE.findall(r.stdout)) == 4, r.stdout
    assert layout(fs) == {i: 3 for i in range(8)}
    check_tree(fs, src)
    for s in (4, 5, 6, 7):
        reshard(fs, "merge", str(s))
    assert layout(fs) == {i: 2 for i in range(4)}
    check_tree(fs, src)


def test_kill_at_every_phase_then_resume(shardfs_factory):
    fs = shardfs_factory(sub="")
    src = fill(fs, seed=7)
    fs.unmount()
    env = dict(os.environ)
    steps = [("split", "2", {0: 2, 1: 2, 2: 3, 3: 2, 6: 3}),
             ("merge", "6", {0: 2, 1: 2, 2: 2, 3: 2})]
    for op, shard, want in steps:
        for phase in ("copy", "cut-over", "purge"):
            env["SHARDFS_TEST_KILL_AT"] = phase
            r = reshard(fs, op, shard, env=env, check=False)
            assert r.returncode == -signal.SIGKILL, (phase, r.returncode, r.stdout, r.stderr)
            assert os.path.exists(os.path.join(fs.data, "RESHARD"))
            # Nothing opens a store with a change in flight.
            m = run([fs_bin(), "mount", "-c", fs.conf, "-f", fs.mnt], check=False, timeout=60)
            assert m.returncode != 0 and "reshard resume" in m.stderr, m.stderr
            f = fs.fsck()
            assert f.returncode != 0 and "reshard resume" in f.stderr, f.stderr
            # resume, or the same command again: it finishes the change, once.
            r = reshard(fs, "resume") if phase != "purge" else reshard(fs, op, shard)
            assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
            assert len(DONE.findall(r.stdout)) == 1, r.stdout
            assert not os.path.exists(os.path.join(fs.data, "RESHARD"))
            assert layout(fs) == want, (op, phase, layout(fs))
            check_tree(fs, src)
            # Undo, to kill the same change at the next phase.
            if op == "split":
                reshard(fs, "merge", "6")
            else:
                reshard(fs, "split", "2")
        if op == "split":
            reshard(fs, "split", "2")


def test_resumed_merge_drops_what_an_earlier_try_copied(shardfs_factory):
    """A merge's copy only adds records to the lower buddy. If the upper one
    lost records after an earlier try copied them (a try that failed while
    mounted, the mount going on; here: a try killed, its state put aside
    while files are deleted), the resumed merge must not bring them back."""
    fs = shardfs_factory(sub="", shards=1)
    fs.unmount()
    reshard(fs, "split", "0")
    fs.start()
    os.mkdir(fs.path("d"))
    names = ["e%03d" % i for i in range(300)]
    for n in names:
        write_file(fs.path("d/" + n), b"")
    fs.unmount()
    env = dict(os.environ, SHARDFS_TEST_KILL_AT="copy")
    r = reshard(fs, "merge", "1", env=env, check=False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    state = os.path.join(fs.data, "RESHARD")
    os.rename(state, state + ".aside")
    fs.start()
    for n in names[:200]:
        os.unlink(fs.path("d/" + n))
    fs.unmount()
    os.rename(state + ".aside", state)
    r = reshard(fs, "resume")
    assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
    assert layout(fs) == {0: 0}
    fs.start()
    assert sorted(os.listdir(fs.path("d"))) == names[200:]
    fs.unmount()
    fs.assert_fsck_clean()


def test_refusals(shardfs_factory):
    fs = shardfs_factory(sub="")
    write_file(fs.path("f"), b"x")
    # Mounted: resume is the offline command; the lock says who has the store.
    r = reshard(fs, "resume", check=False)
    assert r.returncode == 2 and "mount" in r.stderr, (r.returncode, r.stderr)
    # The daemon refuses what the offline command refuses, with the same reason.
    r = reshard(fs, "split", "4", check=False)
    assert r.returncode == 1 and "no such shard" in r.stderr, (r.returncode, r.stderr)
    r = reshard(fs, "merge", "0", check=False)
    assert r.returncode == 0 and "operations waited" in r.stdout, r.stderr
    r = reshard(fs, "merge", "0", check=False)  # depth 1 now; buddy 1 at depth 2
    assert r.returncode == 1 and "split further" in r.stderr, (r.returncode, r.stderr)
    reshard(fs, "split", "0")
    assert layout(fs) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert open(fs.path("f"), "rb").read() == b"x"
    fs.unmount()
    for args, code, msg in [(("split", "4"), 1, "no such shard"),
                            (("split", "x"), 2, "not a shard number"),
                            (("split",), 2, "usage"),
                            (("resume", "3"), 2, "usage"),
                            (("bogus",), 2, "usage")]:
        r = reshard(fs, *args, check=False)
        assert r.returncode == code and msg in r.stderr, (args, r.returncode, r.stderr)
    # merge 0 at depth 2 folds its buddy 2 in; a split makes it again.
    reshard(fs, "merge", "0")
    assert layout(fs) == {0: 1, 1: 2, 3: 2}
    r = reshard(fs, "merge", "0", check=False)  # depth 1: its buddy 1 is at depth 2
    assert r.returncode == 1 and "split further" in r.stderr, r.stderr
    reshard(fs, "split", "0")
    assert layout(fs) == {0: 2, 1: 2, 2: 2, 3: 2}
    # A cluster with replicas is refused with a reason, before anything is
    # touched (one without: test_reshard_cluster.py).
    conf = os.path.join(fs.top, "cluster.conf")
    with open(conf, "w") as f:
        f.write("[cluster]\nshards = 4\nsecret = 0123456789abcdef0123\n"
                "[node a]\nurl = http://127.0.0.1:1\ndata_dir = ./ca\nshards = 0-1\n"
                "replicas = 2-3\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = ./cb\nshards = 2-3\n"
                "replicas = 0-1\n")
    r = run([fs_bin(), "reshard", "split", "-c", conf, "-n", "a", "0"], check=False)
    assert r.returncode == 1 and "without replicas or etcd" in r.stderr, r.stderr
    fs.start()
    assert open(fs.path("f"), "rb").read() == b"x"


# ---- a mounted store -------------------------------------------------------

class StrictWriter:
    """Appends numbered records to FILES files under DIR until stopped; a
    record is acknowledged once its write returned its full length and the
    close succeeded."""

    FILES = 40

    def __init__(self, d):
        self.dir = d
        self.acked = {i: [] for i in range(self.FILES)}
        self.error = None
        self.stop = threading.Event()
        self.count = 0
        os.makedirs(d, exist_ok=True)
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self):
        try:
            n = 0
            while not self.stop.is_set():
                i = n % self.FILES
                rec = b"%09d\n" % n
                fd = os.open(os.path.join(self.dir, "f%02d" % i),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    w = os.write(fd, rec)
                finally:
                    os.close(fd)
                assert w == len(rec), "short write %d" % w
                self.acked[i].append(rec)
                n += 1
                self.count = n
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self):
        self.stop.set()
        self.t.join(timeout=60)
        assert not self.t.is_alive(), "the writer hangs"
        assert self.error is None, "writer failed: %r" % (self.error,)

    def verify(self):
        for i, recs in self.acked.items():
            p = os.path.join(self.dir, "f%02d" % i)
            got = open(p, "rb").read() if recs or os.path.exists(p) else b""
            assert got == b"".join(recs), "f%02d: %d bytes, %d acknowledged" % (
                i, len(got), len(b"".join(recs)))


def ballast(fs, mib=24):
    os.makedirs(fs.path("ballast"), exist_ok=True)
    for i in range(mib // 4):
        write_file(fs.path("ballast", "b%d" % i), os.urandom(4 << 20))


PASSED = re.compile(r"(\d+) writes passed on during the copy; operations waited ([\d.]+) ms")


def test_online_split_and_merge_under_a_strict_writer_and_rsync(shardfs_factory, monkeypatch):
    # The daemon copies 64 KiB chunks 20 ms apart, so the writes meet the copy.
    monkeypatch.setenv("SHARDFS_TEST_SLOW_COPY", "1")
    fs = shardfs_factory(sub="")
    monkeypatch.delenv("SHARDFS_TEST_SLOW_COPY")
    src = os.path.join(fs.top, "src")
    make_tree(src, seed=11)
    ballast(fs)
    snap = tree_snapshot(src, mtimes=False, dir_mtimes=False, owners=False)
    passed = 0
    for step, args, want in [(0, ("split", "--all"), {i: 3 for i in range(8)}),
                             (1, ("merge", "4"), None), (2, ("merge", "5"), None),
                             (3, ("merge", "6"), None),
                             (4, ("merge", "7"), {i: 2 for i in range(4)})]:
        w = StrictWriter(fs.path("w%d" % step))
        rs = subprocess.Popen(["rsync", "-aH", src + "/", fs.path("r%d" % step) + "/"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.05)
        r = reshard(fs, *args)
        waits = PASSED.findall(r.stdout)
        assert waits, r.stdout
        passed += sum(int(n) for n, _ in waits)
        assert all(float(ms) < 1000 for _, ms in waits), r.stdout
        out, err = rs.communicate(timeout=300)
        w.finish()
        assert rs.returncode == 0, err
        assert w.count > 0
        w.verify()
        assert_same_tree(snap, tree_snapshot(fs.path("r%d" % step), mtimes=False,
                                             dir_mtimes=False, owners=False))
        if want:
            assert layout(fs) == want
    assert passed > 0, "no write met a copy: the mirror was not tested"
    fs.remount()
    assert len(os.listdir(fs.path("ballast"))) == 6
    fs.unmount()
    fs.assert_fsck_clean()


def daemon_died(fs):
    """The daemon killed itself (SHARDFS_TEST_KILL_AT): reap it, drop the mount."""
    fs.proc.wait(timeout=30)
    fs.proc = None
    fs.killed = True
    if is_mounted(fs.mnt):
        run(["fusermount3", "-uz", fs.mnt], check=False, timeout=30)


def test_online_split_kill9_at_every_phase_then_resume(shardfs_factory, monkeypatch):
    fs = shardfs_factory(sub="", start=False)
    fs.start()
    src = fill(fs, seed=13)
    fs.unmount()
    for phase in ("copy", "cut-over", "purge"):
        monkeypatch.setenv("SHARDFS_TEST_KILL_AT", phase)
        fs.start()
        monkeypatch.delenv("SHARDFS_TEST_KILL_AT")
        w = StrictWriter(fs.path("w-" + phase))
        time.sleep(0.05)
        r = reshard(fs, "split", "3", check=False)
        assert r.returncode == 2 and "closed the connection" in r.stderr, (r.returncode, r.stderr)
        w.stop.set()
        w.t.join(timeout=60)
        daemon_died(fs)
        st = run([fs_bin(), "status", "-c", fs.conf], check=False, timeout=60)
        assert st.returncode == 1 and "interrupted: split 3 2" in st.stdout, (st.returncode,
                                                                              st.stdout, st.stderr)
        m = run([fs_bin(), "mount", "-c", fs.conf, "-f", fs.mnt], check=False, timeout=60)
        assert m.returncode != 0 and "reshard resume" in m.stderr, m.stderr
        r = reshard(fs, "resume")
        assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
        assert layout(fs) == {0: 2, 1: 2, 2: 2, 3: 3, 7: 3}, (phase, layout(fs))
        check_tree(fs, src)
        # Every record the writer had acknowledged before the kill is there
        # (its last one may have been cut by the kill: not acknowledged).
        fs.start()
        for i, recs in w.acked.items():
            p = fs.path("w-" + phase, "f%02d" % i)
            got = open(p, "rb").read() if os.path.exists(p) else b""
            assert got.startswith(b"".join(recs)), (phase, i)
        fs.unmount()
        reshard(fs, "merge", "7")
        assert layout(fs) == {i: 2 for i in range(4)}


def test_status_shows_the_change_in_flight_and_a_second_waits_its_turn(shardfs_factory,
                                                                        monkeypatch):
    monkeypatch.setenv("SHARDFS_TEST_SLOW_COPY", "1")  # 64 KiB every 20 ms: seconds
    fs = shardfs_factory(sub="", shards=2)
    src = fill(fs, seed=19)
    ballast(fs, mib=32)  # a copy of ~16 MiB at 64 KiB / 20 ms: 5 s, and more under ASan
    st = run([fs_bin(), "status", "-c", fs.conf], timeout=60).stdout
    assert re.search(r"^0 +1$", st, re.M) and "no change of the layout in flight (mounted)" in st, st
    cli = subprocess.Popen([fs_bin(), "reshard", "split", "-c", fs.conf, "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(fs.data, "RESHARD")):
        assert time.monotonic() < deadline and cli.poll() is None, cli.communicate()
        time.sleep(0.01)
    st = run([fs_bin(), "status", "-c", fs.conf], timeout=60).stdout
    m = re.search(r"^in flight: split of shard 1: (\S+), (\d+) records", st, re.M)
    assert m and m.group(1) in ("starting", "copy"), st
    # Another change while this one runs is refused, and changes nothing.
    r = reshard(fs, "split", "0", check=False)
    assert r.returncode != 0 and "another change" in r.stderr, (r.returncode, r.stderr)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, (out, err)
    assert DONE.search(out).group(2, 3) == ("1", "3"), out
    st = run([fs_bin(), "status", "-c", fs.conf], timeout=60).stdout
    assert "no change of the layout in flight (mounted)" in st, st
    assert re.findall(r"^(\d+) +(\d+)$", st, re.M) == [("0", "1"), ("1", "2"), ("3", "2")], st
    fs.unmount()
    assert layout(fs) == {0: 1, 1: 2, 3: 2}
    check_tree(fs, src)


def test_listings_in_the_window_of_a_change_show_each_name_once(shardfs_factory, monkeypatch):
    """From a split's cut-over to the end of its purge the source shard
    still holds the moved half, and during a merge's copy the lower buddy
    holds copies of the upper one's records: a listing must show every
    name once (not the stale copy beside the live one), and an rmdir of a
    directory emptied through the new layout must not find it full. The
    daemon holds 3 s in each phase (SHARDFS_TEST_HOLD_AT) while we look."""
    monkeypatch.setenv("SHARDFS_TEST_HOLD_AT", "copy:3000,purge:3000")
    fs = shardfs_factory(sub="", shards=1)
    d = fs.path("d")
    os.mkdir(d)
    names = {"f%04d" % i for i in range(600)}
    for n in names:
        write_file(os.path.join(d, n), n.encode())
    for k in range(2):
        os.makedirs(fs.path("sub%d" % k))
        for i in range(40):
            write_file(fs.path("sub%d/g%02d" % (k, i)), b"x" * i)

    def look(phase, cli, sub):
        deadline = time.monotonic() + 60
        while True:
            st = run([fs_bin(), "status", "-c", fs.conf], timeout=60).stdout
            m = re.search(r"^in flight: \w+ of shard \d+: (\S+),", st, re.M)
            if m and m.group(1) == phase:
                break
            assert time.monotonic() < deadline and cli.poll() is None, (st, cli.communicate())
            time.sleep(0.05)
        got = os.listdir(d)
        assert len(got) == len(set(got)), "listed twice: %s" % sorted(
            n for n in set(got) if got.count(n) > 1)[:5]
        assert set(got) == names
        with os.scandir(d) as it:  # readdirplus, with the attributes
            plus = [e.name for e in it]
        assert sorted(plus) == sorted(names)
        for i in range(40):
            os.unlink(fs.path("%s/g%02d" % (sub, i)))
        os.rmdir(fs.path(sub))  # not ENOTEMPTY from a stale copy

    for args, phase, sub in [(("split", "0"), "purge", "sub0"), (("merge", "1"), "copy", "sub1")]:
        cli = subprocess.Popen([fs_bin(), "reshard", args[0], "-c", fs.conf, args[1]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        look(phase, cli, sub)
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, (out, err)
        got = os.listdir(d)
        assert len(got) == len(set(got)) and set(got) == names
    assert sorted(os.listdir(fs.path(""))) == ["d"]
    fs.unmount()
    assert layout(fs) == {0: 0}
    fs.assert_fsck_clean()


def test_unmount_during_an_online_copy_takes_the_change_back(shardfs_factory, monkeypatch):
    monkeypatch.setenv("SHARDFS_TEST_SLOW_COPY", "1")  # 64 KiB every 20 ms: seconds
    fs = shardfs_factory(sub="", shards=1)
    src = fill(fs, seed=17)
    ballast(fs, mib=16)
    fs.unmount()
    for args, want, before in [(("split", "0"), {0: 0}, None),
                               (("merge", "1"), {0: 1, 1: 1}, ("split", "0"))]:
        if before:
            reshard(fs, *before)  # unmounted
        fs.start()
        cli = subprocess.Popen([fs_bin(), "reshard", args[0], "-c", fs.conf, args[1]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Wait for the copy to be under way, then unmount: the daemon cancels it.
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(fs.data, "RESHARD")):
            assert time.monotonic() < deadline and cli.poll() is None, cli.communicate()
            time.sleep(0.01)
        time.sleep(0.3)
        fs.unmount()
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 2 and "canceled" in err, (cli.returncode, out, err)
        assert not os.path.exists(os.path.join(fs.data, "RESHARD"))
        assert layout(fs) == want, (args, layout(fs))
        assert os.path.exists(os.path.join(fs.data, "shard-1")) == (args[0] == "merge")
        check_tree(fs, src)  # also fsck: no copy left where it does not belong


def test_full_disk_split_is_taken_back(shardfs_factory, tmp_top):
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root to mount a tmpfs")
    tfs = os.path.join(tmp_top, "tfs")
    os.mkdir(tfs)
    run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs", tfs])
    try:
        os.mkdir(os.path.join(tfs, "data"))
        fs = shardfs_factory(sub="", data_dir="./tfs/data", shards=1)  # all on shard 0
        fs.allow_stderr(r"(?i)no space|ENOSPC|MAP_FULL|full")
        os.mkdir(fs.path("t"))
        files = {}
        # A file's chunks move together (placed by its inode): 40 files of
        # 256 KiB, so that the half that moves surely passes the 2 MiB left
        # (12 files of 1 MiB moved one file in about 1 run of 300).
        for i in range(40):
            files["f%d" % i] = os.urandom(256 << 10)
            write_file(fs.path("t", "f%d" % i), files["f%d" % i])
        fs.unmount()
        # Fill the disk but for a little: the split's copy cannot fit.
        filler = os.path.join(tfs, "filler")
        st = os.statvfs(tfs)
        free = st.f_bavail * st.f_frsize
        with open(filler, "wb") as f:
            f.truncate(0)
            left = free - (2 << 20)
            while left > 0:
                n = min(left, 1 << 20)
                f.write(b"\0" * n)
                left -= n
        before = open(os.path.join(fs.data, "STORE")).read()
        r = reshard(fs, "split", "0", check=False)
        assert r.returncode == 2 and "space" in r.stderr.lower(), (r.returncode, r.stderr)
        assert not os.path.exists(os.path.join(fs.data, "RESHARD"))
        assert open(os.path.join(fs.data, "STORE")).read() == before
        assert not os.path.exists(os.path.join(fs.data, "shard-1"))
        os.unlink(filler)
        fs.assert_fsck_clean()
        fs.start()
        for name, data in files.items():
            assert open(fs.path("t", name), "rb").read() == data, name
        fs.unmount()
        reshard(fs, "split", "0")
        fs.assert_fsck_clean()
        fs.fsck_at_end = False  # the tmpfs goes away next
    finally:
        if is_mounted(fs.mnt):
            fuse_unmount(fs.mnt)
        run(["umount", tfs], check=False)
