"""kill -9 torture with a strict writer: nothing acknowledged is ever lost.

Each cycle: a writer process (kill_torture_writer.py) runs new files,
rename-over, O_APPEND records across 4 KiB pages, ftruncate/truncate, pwrite,
O_TRUNC rewrites, unlink, moves, mkdir and rmdir on the mount, and logs an
operation outside the mount only after every write() returned its full count
and close() returned 0. After a random number of acknowledged operations the
daemon is SIGKILLed mid-work; the dead mount is lazily unmounted, the store
mounted again (the daemon replays its redo log and finishes interrupted
multi-shard operations), and the whole tree is compared with the model the
log gives:

* every acknowledged operation's effect is there, byte for byte, and nothing
  else changed: no file, directory or byte more or less than the model;
* the one operation in flight at the kill (begun, not acknowledged) either
  happened or did not, or stopped part way the way a write can stop: a file
  created holds a prefix of its bytes, an append stream holds its acknowledged
  records and then a prefix of the unacknowledged ones, a pwrite put a prefix
  of its bytes, a rename-over's temporary file holds a prefix and the target
  is the old file. A truncate, rename, unlink, mkdir or rmdir is all or
  nothing. Whatever it left becomes the model for the next cycle;
* every append stream parses into records with valid checksums, numbered
  0, 1, 2, ... (an independent check of the same bytes);
* the remount finds the killed daemon's mark (DATA_DIR/RUNNING) and says so
  on stderr ("the last shardfs daemon was killed ... checking and repairing
  it"), then runs fsck --repair before it serves (DESIGN.md, "After an unclean
  stop"). Every problem that repair reports must be a leftover of the
  operation in flight, of the kinds DESIGN.md ("Multi-shard operations")
  names, on that operation's paths: a parent's link count one off (mkdir,
  rmdir done), the inode of the file an unlink or rename-over removed with no
  name (rmdir: the directory's), a directory whose rmdir did not happen still
  marked dying. Each line must say "fixed";
* /lost+found may appear, holding exactly what that repair linked there: the
  file the interrupted unlink or rename-over removed, byte for byte, as
  /lost+found/#ID. Anything else there, or at the top of the mount, fails.
  The test removes it once checked, so the model never holds it;
* the store is then unmounted cleanly and `shardfs fsck` must be clean, every
  cycle; the next mount must not repair (a clean unmount leaves no mark);
* on odd cycles `shardfs fsck` also runs right after the kill, before the
  remount, as a report of what the kill left (it may show that operation's
  leftovers; the test only requires that it ran and left the mark).

Environment: SHARDFS_TORTURE_CYCLES (default 50), SHARDFS_TORTURE_SEED
(default random, printed; rerun a failure with it), SHARDFS_TORTURE_KEEP=1
(copy the data directory as each kill left it to TMP/crashed).
"""

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import _tail, fsck_says_clean, kill_group

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kill_torture_writer import Model, append_records, data, parse_records  # noqa: E402

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_torture_writer.py")
CYCLES = int(os.environ.get("SHARDFS_TORTURE_CYCLES", "50"))
BASE_DIRS = ("d0", "d1", "d2", "d3")
# What a system call on a mount whose daemon died returns.
DEAD_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
# What a mount says when it finds the mark of a killed daemon, before fsck's
# lines (fsck_after_unclean_stop() in fs/fsck.c).
KILLED = ("shardfs: the last shardfs daemon was killed while the store was open: "
          "checking and repairing it")


def _read_log(path, off):
    """The complete lines of the writer's log from byte off: (lines, new off)."""
    with open(path, "rb") as f:
        f.seek(off)
        buf = f.read()
    end = buf.rfind(b"\n") + 1
    return buf[:end].decode().splitlines(), off + end


def _parse_cycle(lines):
    """The acknowledged operations of one writer run, the one in flight at the
    kill (or None) and the error that ended the run (or None)."""
    acked, begun, err = [], None, None
    for ln in lines:
        tag, _, rest = ln.partition(" ")
        if tag == "B":
            assert begun is None, "log: operation %s begun before %s ended" % (rest, begun)
            begun = json.loads(rest)
        elif tag == "D":
            assert begun is not None and begun["i"] == int(rest), "log: stray %r" % ln
            acked.append(begun)
            begun = None
        elif tag == "E":
            i, e, when, text = rest.split(" ", 3)
            assert begun is not None and begun["i"] == int(i), "log: stray %r" % ln
            err = (int(e), float(when), text)
        else:
            raise AssertionError("log: bad line %r" % ln)
    return acked, begun, err


def _snapshot(root):
    """The tree under root as it is on the mount: ({rel: bytes}, {rel dirs})."""
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        for d in dirnames:
            dirs.add(os.path.relpath(os.path.join(dirpath, d), root))
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            assert os.path.isfile(full) and not os.path.islink(full), "%s is not a file" % rel
            with open(full, "rb") as f:
                files[rel] = f.read()
    return files, dirs


def _raise(e):
    raise e


def _prefix_of(have, full):
    return have is not None and len(have) <= len(full) and full.startswith(have)


def _inflight_outcome(m, op, files, dirs):
    """How the operation in flight at the kill ended, judged on the paths it
    touches: "done", "not" or "partial" (a legal stop part way), or None
    when what the mount shows is none of these."""
    k, p = op["k"], op["p"]
    old = bytes(m.files[p]) if p in m.files else None
    obs = files.get(p)
    if k in ("new", "otrunc"):
        new = data(m.seed, op["i"], op["n"])
        if obs == new:
            return "done"
        if obs == old:
            return "not"
        return "partial" if _prefix_of(obs, new) else None
    if k == "over":
        new, tmp = data(m.seed, op["i"], op["n"]), files.get(op["tmp"])
        if obs == new and tmp is None:
            return "done"
        if obs == old and tmp is None:
            return "not"
        return "partial" if obs == old and _prefix_of(tmp, new) else None
    if k == "append":
        base, recs = old or b"", append_records(m.seed, op)
        if obs == old:
            return "not"
        if obs == base + recs:
            return "done"
        ok = obs is not None and obs.startswith(base) and _prefix_of(obs[len(base):], recs)
        return "partial" if ok else None
    if k == "trunc":
        new = old[:op["size"]] + bytes(max(0, op["size"] - len(old)))
        return "done" if obs == new else "not" if obs == old else None
    if k == "pwrite":
        buf, off = data(m.seed, op["i"], op["n"]), op["off"]
        if obs == old:
            return "not"
        # The longest prefix of buf found at off; any shorter one that fits
        # would have left the same bytes.
        n = 0
        if obs is not None:
            have = obs[off:off + len(buf)]
            while n < len(have) and have[n] == buf[n]:
                n += 1
        f = bytearray(old)
        if off > len(f):
            f.extend(bytes(off - len(f)))
        f[off:off + n] = buf[:n]
        if obs != bytes(f):
            return None
        return "done" if n == len(buf) else "partial"
    if k == "unlink":
        return "done" if obs is None else "not" if obs == old else None
    if k == "move":
        to = files.get(op["to"])
        if obs is None and to == old:
            return "done"
        return "not" if obs == old and to is None else None
    if k in ("mkdir", "rmdir"):
        return ("done" if (p in dirs) == (k == "mkdir") else "not")
    raise ValueError(k)


def _touched(op):
    return {op["p"]} | {op[x] for x in ("tmp", "to") if x in op}


def _diff(m, files, dirs, skip):
    """Differences between the model and the mount, on paths not in skip."""
    out = []
    for rel in sorted((set(m.files) | set(files)) - skip):
        want, have = m.files.get(rel), files.get(rel)
        if want is None:
            out.append("%s: on the mount (%d bytes), not in the model" % (rel, len(have)))
        elif have is None:
            out.append("%s: LOST (%d bytes in the model)" % (rel, len(want)))
        elif bytes(want) != have:
            at = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b),
                      min(len(want), len(have)))
            out.append("%s: %d bytes, model %d, first difference at offset %d"
                       % (rel, len(have), len(want), at))
    for rel in sorted((m.dirs ^ dirs) - skip):
        out.append("directory %s: %s" % (rel, "LOST" if rel in m.dirs else "not in the model"))
    return out


def _check_streams(m, files, inflight):
    """Every append stream is records 0, 1, ... with valid checksums; the
    stream the operation in flight appended to may end in part of a record,
    and one it removed (an unlink that took effect before the kill: its
    outcome is judged by _inflight_outcome) is gone."""
    out = []
    gone_ok = _touched(inflight) if inflight else set()
    for rel, nseq in sorted(m.streams.items()):
        if rel not in files and rel in gone_ok:
            continue
        recs, stop, why = parse_records(files.get(rel, b""))
        seqs = [s for s, _ in recs]
        if seqs[:nseq] != list(range(nseq)):
            out.append("stream %s: records %s..., expected 0..%d" % (rel, seqs[:5], nseq - 1))
        if why and not (inflight and inflight["p"] == rel and len(recs) >= nseq):
            out.append("stream %s: %s (after %d records)" % (rel, why, len(recs)))
    return out


def _fsck_problems(r):
    """fsck's problem lines (not its summary)."""
    return [ln for ln in (r.stdout + r.stderr).splitlines()
            if ln.strip() and not ln.startswith("fsck: ")]


def _mount_repair(err):
    """The repair a mount ran after a kill, from its stderr: the problems
    fsck --repair printed (each without its ": fixed"), or a list of what
    is wrong with the stderr instead. fsck_run prints one line per problem,
    "PROBLEM: fixed" (or ": not fixed", ": repair failed: ..."), then
    "fsck: clean" or "fsck: N problems found, M fixed"."""
    lines = err.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.startswith(KILLED)), None)
    if at is None:
        return None, ["no %r line" % KILLED]
    body = lines[at + 1:]
    end = next((i for i, ln in enumerate(body) if ln.startswith("fsck: ")), None)
    if end is None:
        return None, ["no fsck summary after the %r line" % KILLED]
    found, summary = body[:end], body[end]
    wrong = ["not fixed: " + ln for ln in found if not ln.endswith(": fixed")]
    n = len(found)
    want = "fsck: clean" if n == 0 else "fsck: %d problem%s found, %d fixed" % (
        n, "" if n == 1 else "s", n)
    if summary != want:
        wrong.append("summary %r after %d problem lines" % (summary, n))
    return [ln[:-len(": fixed")] for ln in found], wrong


def _lost_found_links(lines):
    """The inode ids a repair linked into /lost+found, from its problem lines."""
    return {m.group(1) for m in (re.search(r": link it as /lost\+found/#([0-9a-f]{32})$", ln)
                                 for ln in lines) if m}


def _stop(proc):
    """SIGKILL proc's process group if it is still running, and reap it."""
    if proc.poll() is None:
        kill_group(proc.pid)
    proc.wait(timeout=10)


def _wait_acked(log, off, want, writer, deadline_s=60):
    """Wait until the writer acknowledged `want` operations after byte off
    of its log (or died)."""
    deadline = time.monotonic() + deadline_s
    pos, seen = off, 0
    while seen < want:
        if writer.poll() is not None:
            return
        if time.monotonic() > deadline:
            pytest.fail("writer acknowledged only %d of %d operations in %ds"
                        % (seen, want, deadline_s))
        with open(log, "rb") as f:
            f.seek(pos)
            buf = f.read()
        cut = buf.rfind(b"\n") + 1
        seen += buf[:cut].count(b"\nD ") + buf[:cut].startswith(b"D ")
        pos += cut
        time.sleep(0.002)


def _where_id(fs, rel):
    """The inode id (hex) of /t/rel in the unmounted store (`shardfs where`)."""
    r = fs.cmd("where", "-c", fs.conf, "/t/" + rel, check=True)
    ids = re.findall(r"^inode shard \d+ id ([0-9a-f]{32})", r.stdout, re.M)
    assert len(ids) == 1, r.stdout
    return ids[0]


def _leftover(fs, line, op, outcome, old):
    """Is a problem the remount's repair fixed (fsck's line without its
    ": fixed") a leftover DESIGN.md allows a kill to leave, and of the
    operation in flight at the kill (the only one that can have one)? Call
    with the store unmounted (`shardfs where`). Returns None if not, else
    (ID, bytes) when the repair linked the inode as /lost+found/#ID, which must
    hold these bytes, or () when there is nothing to check there."""
    k = op["k"] if op else None
    m = re.match(r"(?:empty )?orphan inode ([0-9a-f]{32}) \((file|dir), (\d+) bytes", line)
    if m:
        # unlink, the file a rename-over replaced, or rmdir: the entry went,
        # the inode's link drop did not happen (DESIGN: unlink, rename).
        if m.group(2) == "dir":
            return () if k == "rmdir" and outcome == "done" else None
        ok = k in ("unlink", "over") and outcome == "done" and int(m.group(3)) == len(old)
        return ((m.group(1), old) if old else ()) if ok else None
    m = re.match(r"wrong link count: dir ([0-9a-f]{32}) has nlink (\d+), should be (\d+)$", line)
    if m:
        # mkdir or rmdir whose parent's link count was not changed yet.
        delta = {"mkdir": -1, "rmdir": 1}.get(k)
        ok = (delta is not None and outcome == "done" and
              int(m.group(2)) - int(m.group(3)) == delta and
              m.group(1) == _where_id(fs, os.path.dirname(op["p"])))
        return () if ok else None
    m = re.match(r"directory ([0-9a-f]{32}) is still marked dying", line)
    if m:
        # rmdir that marked the directory and did not remove it.
        ok = k == "rmdir" and outcome == "not" and m.group(1) == _where_id(fs, op["p"])
        return () if ok else None
    return None


@pytest.mark.timeout_s(900)
def test_kill9_torture_strict_writer(fs, tmp_top):
    seed = int(os.environ.get("SHARDFS_TORTURE_SEED") or random.randrange(1 << 30))
    print("SHARDFS_TORTURE_SEED=%d" % seed)
    rnd = random.Random(seed)
    root = fs.path("t")
    os.mkdir(root)
    for d in BASE_DIRS:
        os.mkdir(os.path.join(root, d))
    m = Model(seed, base_dirs=BASE_DIRS)
    log = os.path.join(tmp_top, "writer.log")
    open(log, "wb").close()
    state_path = os.path.join(tmp_top, "writer.state")
    log_off, next_id = 0, 0
    stats = {"acked": 0, "done": 0, "not": 0, "partial": 0, "none": 0,
             "crash_fsck_cycles": 0, "crash_fsck": [], "kinds": {}, "errors": {},
             "repairs": []}
    t0 = time.monotonic()

    for cycle in range(CYCLES):
        where = "cycle %d (SHARDFS_TORTURE_SEED=%d)" % (cycle, seed)
        with open(state_path, "w") as f:
            json.dump(m.state(root, next_id, limit_s=120), f)
        with open(os.path.join(tmp_top, "writer.%d.err" % cycle), "wb") as err:
            writer = subprocess.Popen([sys.executable, WRITER, state_path, log],
                                      stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                      start_new_session=True)
        try:
            # Kill after 1 to ~400 acknowledged operations, at a random moment
            # within the next one.
            want = rnd.randrange(1, 20) if rnd.random() < 0.3 else rnd.randrange(20, 400)
            _wait_acked(log, log_off, want, writer)
            time.sleep(rnd.random() * 0.003)
            assert writer.poll() is None, "%s: the writer stopped before the kill: %s" % (
                where, _tail(open(os.path.join(tmp_top, "writer.%d.err" % cycle)).read()))
            assert fs.proc.poll() is None, "%s: the daemon died on its own (exit %s):\n%s" % (
                where, fs.proc.returncode, _tail(fs.read_stderr()))
            t_kill = time.monotonic()
            fs.kill9()
            writer.wait(timeout=30)       # its next call fails on the dead mount
        finally:
            _stop(writer)
        fs.lazy_unmount()
        if os.environ.get("SHARDFS_TORTURE_KEEP") == "1":        # the store as the kill left it
            shutil.rmtree(os.path.join(tmp_top, "crashed"), ignore_errors=True)
            shutil.copytree(fs.data, os.path.join(tmp_top, "crashed"))

        lines, log_off = _read_log(log, log_off)
        acked, inflight, err = _parse_cycle(lines)
        if err:
            # A call may fail only because of the kill: after it, with what
            # the kernel answers for a dead daemon, or a write cut short.
            assert err[1] >= t_kill, "%s: operation %s failed %.3fs before the kill: %s" % (
                where, inflight, t_kill - err[1], err)
            assert err[0] in DEAD_MOUNT or (err[0] == 0 and "short" in err[2]), \
                "%s: operation %s failed after the kill with an unexpected error: %s" % (
                    where, inflight, err)
            how = "%s in %s" % (errno.errorcode.get(err[0], "short"), err[2].split(":")[0])
            stats["errors"][how] = stats["errors"].get(how, 0) + 1
        next_id = (inflight or acked[-1])["i"] + 1
        for op in acked:
            m.apply(op)
            stats["kinds"][op["k"]] = stats["kinds"].get(op["k"], 0) + 1
        stats["acked"] += len(acked)

        if cycle % 2:
            # What the kill left, before any recovery, for the report only: it
            # may show the leftovers of the operation in flight, which the
            # remount repairs. fsck opens the store without recovery and
            # leaves the mark, so the remount still sees the kill.
            r = fs.fsck()
            assert r.returncode in (0, 1) and re.search(r"^fsck: ", r.stdout, re.M), \
                "%s: fsck right after the kill did not run (exit %d):\n%s\n%s" % (
                    where, r.returncode, _tail(r.stdout), _tail(r.stderr))
            stats["crash_fsck"].extend(_fsck_problems(r))
            stats["crash_fsck_cycles"] += bool(_fsck_problems(r))

        fs.start()
        assert not fs.problems, "%s: %s" % (where, fs.problems)
        repaired, wrong = _mount_repair(fs.read_stderr())
        assert not wrong, "%s: the remount after the kill did not check the store:\n%s\n" \
            "its stderr:\n%s" % (where, "\n".join(wrong), _tail(fs.read_stderr()))
        files, dirs = _snapshot(root)
        touched = _touched(inflight) if inflight else set()
        problems = _diff(m, files, dirs, touched)
        outcome = None
        if inflight:
            outcome = _inflight_outcome(m, inflight, files, dirs)
            if outcome is None:
                problems.append("operation in flight %s left an impossible state: %s" % (
                    inflight, {p: (len(files[p]) if p in files else None) for p in touched}))
        problems += _check_streams(m, files, inflight)
        assert not problems, "%s: %d acknowledged operations this cycle, then:\n%s" % (
            where, len(acked), "\n".join(problems[:30]))
        # Besides /t, only what the repair linked into /lost+found may be there.
        top = sorted(os.listdir(fs.mnt))
        assert set(top) <= {"t", "lost+found"}, "%s: at the top of the mount: %s" % (where, top)
        lost_found = {}
        if "lost+found" in top:
            for name in os.listdir(fs.path("lost+found")):
                full = fs.path("lost+found", name)
                assert os.path.isfile(full) and not os.path.islink(full), \
                    "%s: /lost+found/%s is not a file" % (where, name)
                with open(full, "rb") as f:
                    lost_found[name] = f.read()

        # The operation in flight becomes part of the model as it ended.
        old_target = bytes(m.files.get(inflight["p"], b"")) if inflight else b""
        stats[outcome or "none"] += 1
        if outcome == "done":
            m.apply(inflight)
        elif outcome == "partial":
            for rel in touched:
                if rel in files:
                    m.files[rel] = bytearray(files[rel])
            m.streams.pop(inflight["p"], None)     # a torn stream is a plain file now

        fs.unmount()
        assert not fs.problems, "%s: %s" % (where, fs.problems)
        r = fs.fsck()
        state = "in flight at the kill: %s (%s, %s); the last acknowledged: %s" % (
            inflight, outcome, err, acked[-3:])
        assert r.returncode == 0 and fsck_says_clean(r), \
            "%s: fsck after the remount's repair and a clean unmount is not clean:\n%s\n%s\n" \
            "the remount repaired:\n%s\n%s" % (where, _tail(r.stdout), _tail(r.stderr),
                                                "\n".join(repaired) or "nothing", state)
        # Everything the remount repaired is a leftover of the operation in
        # flight (where needs the store unmounted), and /lost+found holds
        # exactly the file it removed: no data lost, none kept twice.
        why = [_leftover(fs, ln, inflight, outcome, old_target) for ln in repaired]
        assert None not in why, "%s: the remount repaired what the operation in flight " \
            "cannot have left:\n%s\n%s" % (
                where, "\n".join(ln for ln, w in zip(repaired, why) if w is None), state)
        want = {"#" + w[0]: w[1] for w in why if w}
        assert set(want) == {"#" + i for i in _lost_found_links(repaired)}, \
            "%s: linked into /lost+found: %s, attributed: %s\n%s" % (
                where, sorted(_lost_found_links(repaired)), sorted(want), state)
        assert sorted(lost_found) == sorted(want), "%s: /lost+found holds %s, the repair " \
            "linked %s\n%s" % (where, sorted(lost_found), sorted(want), state)
        for name, content in want.items():
            assert lost_found[name] == content, \
                "%s: /lost+found/%s (%d bytes) is not the removed file (%d bytes)\n%s" % (
                    where, name, len(lost_found[name]), len(content), state)
        if repaired:
            stats["repairs"].append("cycle %d, %s in flight (%s): %s" % (
                cycle, inflight["k"], outcome, "; ".join(
                    re.sub(r"[0-9a-f]{32}", "ID", ln) for ln in repaired)))
        fs.start()
        assert "checking and repairing" not in fs.read_stderr(), \
            "%s: the mount after a clean unmount checked the store:\n%s" % (
                where, _tail(fs.read_stderr()))
        for name in lost_found:
            os.unlink(fs.path("lost+found", name))

    # The model and the mount agree at the end too; /lost+found was emptied.
    files, dirs = _snapshot(root)
    problems = _diff(m, files, dirs, set()) + _check_streams(m, files, None)
    assert not problems, "after the last cycle:\n" + "\n".join(problems[:30])
    assert set(os.listdir(fs.mnt)) <= {"t", "lost+found"}, os.listdir(fs.mnt)
    assert not os.path.isdir(fs.path("lost+found")) or not os.listdir(fs.path("lost+found"))
    took = time.monotonic() - t0
    print("kill -9 torture: %d cycles in %.1fs, %d acknowledged operations verified "
          "(0 lost, fsck clean after every remount); in flight at the kill: %d happened, "
          "%d did not, %d part way, %d kills between operations; errors after the kill: %s; "
          "by kind: %s; final model %d files, %d bytes"
          % (CYCLES, took, stats["acked"], stats["done"], stats["not"], stats["partial"],
             stats["none"], json.dumps(stats["errors"], sort_keys=True),
             json.dumps(stats["kinds"], sort_keys=True), len(m.files), m.total()))
    print("fsck right after the kill (odd cycles, before the remount): %d of %d showed "
          "leftovers" % (stats["crash_fsck_cycles"], CYCLES // 2))
    for ln in sorted(set(re.sub(r"[0-9a-f]{32}", "ID", x) for x in stats["crash_fsck"]))[:20]:
        print("  " + ln)
    print("remounts that repaired something: %d of %d" % (len(stats["repairs"]), CYCLES))
    for ln in stats["repairs"]:
        print("  " + ln)
    assert stats["acked"] >= CYCLES, "too few operations to mean anything"
