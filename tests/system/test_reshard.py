"""Split and merge the shards of a single-node store (`shardfs reshard`).

Shard s at depth d splits into s and s + 2^d at depth d + 1: only the
records of s whose hash has bit d set move. These tests check that the
tree reads back byte for byte through a mount after every change, that fsck
(which checks every record against the layout) is clean, that `where`
moves a path only from s to s + 2^d, that the copy and the purge agree,
and that a kill at each phase is finished by `reshard resume` (and that a
mount refuses the store until then).
"""

import os
import re
import signal

from conftest import (assert_same_tree, fsck_says_clean, make_tree, run, tree_snapshot,
                      write_file)

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


def some_paths(src, n=40):
    paths = []
    for root, dirs, files in os.walk(src):
        for name in sorted(dirs + files):
            paths.append("/t/" + os.path.relpath(os.path.join(root, name), src))
    return sorted(paths)[:n]


def test_split_moves_only_the_new_bit_and_merge_restores(shardfs_factory):
    fs = shardfs_factory(sub="")
    src = fill(fs)
    fs.unmount()
    paths = some_paths(src)
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
            r = reshard(fs, "resume")
            assert DONE.search(r.stdout).group(1) == "resumed", r.stdout
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


def test_refusals(shardfs_factory):
    fs = shardfs_factory(sub="")
    write_file(fs.path("f"), b"x")
    # Mounted: the store's lock says who has it.
    r = reshard(fs, "split", "0", check=False)
    assert r.returncode == 2 and "mount" in r.stderr, (r.returncode, r.stderr)
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
    # A cluster is refused with a reason, before anything is touched.
    conf = os.path.join(fs.top, "cluster.conf")
    with open(conf, "w") as f:
        f.write("[cluster]\nshards = 4\nsecret = 0123456789abcdef0123\n"
                "[node a]\nurl = http://127.0.0.1:1\ndata_dir = ./ca\nshards = 0-1\n"
                "[node b]\nurl = http://127.0.0.1:2\ndata_dir = ./cb\nshards = 2-3\n")
    r = run([fs_bin(), "reshard", "split", "-c", conf, "-n", "a", "0"], check=False)
    assert r.returncode == 1 and "single-node" in r.stderr, r.stderr
    fs.start()
    assert open(fs.path("f"), "rb").read() == b"x"
