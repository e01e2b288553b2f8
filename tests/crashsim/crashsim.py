#!/usr/bin/python3
"""crashsim.py -- the crash simulator: power cuts at every step.

    crashsim.py [--seeds 1,2] [--batches N] [--free BYTES] [--subsets K]
                [--keep DIR] WORKLOAD SHIM

In the spirit of ALICE and CrashMonkey: run a workload with its file I/O
recorded at the system-call level by an LD_PRELOAD shim
(tests/crashsim/shim.c), then rebuild the disk as a power cut could have
left it at many points of the run, open each such state with the real code
and check it. Two workloads speak the same commands (run, recover, check):
workload.c drives one shard with batches and checks it record by record;
nsworkload.c drives files over a whole store and checks it with fsck after
the repair a mount does after an unclean stop.

The model of the disk (strict POSIX, what an fsync promises and no more):
  * a write, truncate, hole punch or allocation of a file reaches the disk
    only when a later fsync/fdatasync of that file returned, or, before that,
    if the crash happens to have let it through: any subset of the not yet
    synced operations may be on the disk. Writes are cut at 4 KiB
    boundaries, so a multi-page write can land in part;
  * creating, renaming and unlinking a name reaches the disk only with an
    fsync of the directory (or by chance, as above);
  * writes through an O_DSYNC descriptor are synced at once.

A crash point is a place in the trace; the state at it holds everything
synced before it plus a chosen subset of what was not: nothing, everything
(a kill -9 of the process), only the redo logs' operations (the log reached
the disk, nothing else did), only the hole punches, prefixes and random
subsets. Every state must open, hold exactly the state after some batch J
(every record checked), with J at least the last batch acknowledged by a
sync that returned before the crash point (J at least the last applied
batch for a kill -9 state, or when the logs reached the disk), and take a
new batch, a sync and a reopen.

The lsns of the change stream must never be handed out twice: the driver
follows the shard's redo log writes (the 64-byte "SLG2" record header holds
the batch's lsn) and tells the checker the highest lsn written to a log
before the crash point; every batch a reader could have seen was logged
first, so the batch applied after recovery must get a higher one.

Recovery is crashed too: some of those states are opened by the workload's
"recover" command under the shim, and power cuts during that run must
leave exactly the batches the state held.

Exit status 0 if every state checked out; prints counts and the first
failures. --free makes statvfs() report that many free bytes, so the shard
takes its low-disk path (hole punching of freed pages, log truncation).
"""

import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

BLOCK = 4096
LOG_MAGIC2 = b"SLG2"   # a redo log record of backend/shard_lmdb.c
LOG_APPLY = 1          # its kind for a batch with a position


class Op:
    __slots__ = ("kind", "path", "a", "b", "data")

    def __init__(self, kind, path, a, b, data):
        self.kind, self.path, self.a, self.b, self.data = kind, path, a, b, data


def read_trace(path):
    ops = []
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0
    while pos < len(buf):
        kind = chr(buf[pos])
        (plen,) = struct.unpack_from("<H", buf, pos + 1)
        p = buf[pos + 3:pos + 3 + plen].decode()
        pos += 3 + plen
        a, b, dlen = struct.unpack_from("<QQI", buf, pos)
        pos += 20
        data = buf[pos:pos + dlen]
        pos += dlen
        if kind == "W":
            # Cut at block boundaries: each piece may reach the disk alone.
            off = a
            while data:
                n = min(len(data), BLOCK - off % BLOCK)
                ops.append(Op("W", p, off, 0, data[:n]))
                off += n
                data = data[n:]
        else:
            ops.append(Op(kind, p, a, b, data))
    return ops


class Inode:
    __slots__ = ("ident", "is_dir", "durable", "pending")

    def __init__(self, ident, content=b"", is_dir=False):
        self.ident = ident
        self.is_dir = is_dir
        self.durable = bytearray(content)
        self.pending = []          # data ops not yet synced, in order


def apply_data(img, op):
    if op.kind == "W":
        end = op.a + len(op.data)
        if len(img) < end:
            img.extend(b"\0" * (end - len(img)))
        img[op.a:end] = op.data
    elif op.kind == "T":
        if op.a < len(img):
            del img[op.a:]
        else:
            img.extend(b"\0" * (op.a - len(img)))
    elif op.kind == "P":
        end = min(op.a + op.b, len(img))
        if op.a < end:
            img[op.a:end] = b"\0" * (end - op.a)
    elif op.kind == "A":
        end = op.a + op.b
        if len(img) < end:
            img.extend(b"\0" * (end - len(img)))


class Disk:
    """Walks a trace and can produce the crash states at the current point.

    Names are absolute paths under the watched directory. A name's create,
    mkdir, rename or unlink is an operation on its parent directory, made
    durable by an fsync of that directory (renames stay in one directory)."""

    def __init__(self, watch, initial):
        self.watch = watch
        self.next_ident = 0
        self.names = {}            # the live path -> inode
        self.durable_names = {}    # path -> inode as the disk has it for sure
        self.created = {}          # inode ident -> inode, for replaying creates
        for rel, content in initial.items():
            path = os.path.join(watch, rel)
            ino = self.new_inode(content or b"", content is None)
            self.names[path] = ino
            self.durable_names[path] = ino
        self.acked = 0             # last batch a returned sync covers
        self.applied = 0           # last batch whose apply returned
        self.logged_lsn = 0        # highest lsn in a redo log record written
        self.opened = True         # False between the marks "B" and "O": the
                                   # workload's open has not returned, so no
                                   # batch can be in flight
        self.pending = []          # every pending op in trace order: (op, inode or None)

    def new_inode(self, content=b"", is_dir=False):
        self.next_ident += 1
        ino = Inode(self.next_ident, content, is_dir)
        self.created[ino.ident] = ino
        return ino

    def is_dir(self, path):
        return path == self.watch or (path in self.names and self.names[path].is_dir)

    def step(self, op):
        if op.kind == "M":
            what, num = op.data.decode().split()
            if what == "A":
                self.applied = max(self.applied, int(num))
            elif what == "B":
                self.opened = False
            elif what == "O":
                self.opened = True
            elif what == "S":
                self.acked = max(self.acked, int(num))
            return
        if op.kind == "S" and self.is_dir(op.path):
            keep = []
            for o, ino in self.pending:
                if ino is None and os.path.dirname(o.path) == op.path:
                    self.apply_dir(self.durable_names, o)
                else:
                    keep.append((o, ino))
            self.pending = keep
            return
        if op.kind == "S":
            ino = self.names[op.path]
            for o in ino.pending:
                apply_data(ino.durable, o)
            ino.pending = []
            self.pending = [(o, i) for o, i in self.pending if i is not ino]
            return
        if op.kind in "CKUR":
            if op.kind in "CK":
                ino = self.new_inode(b"", op.kind == "K")
                op = Op(op.kind, op.path, ino.ident, 0, b"")
                self.names[op.path] = ino
            elif op.kind == "U":
                del self.names[op.path]
            else:
                to = op.data.decode()
                if os.path.dirname(to) != os.path.dirname(op.path):
                    sys.exit("crashsim: a rename across directories is not modelled: %s -> %s"
                             % (op.path, to))
                self.names[to] = self.names.pop(op.path)
            self.pending.append((op, None))
            return
        ino = self.names[op.path]
        ino.pending.append(op)
        self.pending.append((op, ino))
        if op.kind == "W" and os.path.basename(op.path).startswith("redo") \
                and op.data[:4] == LOG_MAGIC2 and len(op.data) >= 48:
            kind, = struct.unpack_from("<I", op.data, 24)
            lsn, = struct.unpack_from("<Q", op.data, 40)
            if kind == LOG_APPLY:
                self.logged_lsn = max(self.logged_lsn, lsn)

    def apply_dir(self, names, op):
        if op.kind in "CK":
            names[op.path] = self.created[op.a]
        elif op.kind == "U":
            names.pop(op.path, None)
        elif op.kind == "R":
            ino = names.pop(op.path, None)
            if ino is not None:
                names[op.data.decode()] = ino

    def state(self, chosen):
        """The files of the state: durable + the chosen pending ops (a set of
        indexes into self.pending). Returns {path relative to the watched
        directory: bytes, or None for a directory}; a name whose directory
        is not in the state is not either."""
        names = dict(self.durable_names)
        extra = {}
        for k, (op, ino) in enumerate(self.pending):
            if k not in chosen:
                continue
            if ino is None:
                self.apply_dir(names, op)
            else:
                extra.setdefault(ino.ident, []).append(op)
        out = {}
        for path in sorted(names, key=lambda p: p.count("/")):
            parent = os.path.dirname(path)
            rel = os.path.relpath(path, self.watch)
            if parent != self.watch and out.get(os.path.relpath(parent, self.watch), 0) is not None:
                continue        # its directory is not there
            ino = names[path]
            if ino.is_dir:
                out[rel] = None
                continue
            img = bytearray(ino.durable)
            for op in extra.get(ino.ident, ()):
                apply_data(img, op)
            out[rel] = img
        return out


def list_dir(d):
    """{relative path: bytes, or None for a directory} of everything under d."""
    out = {}
    for top, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(top, name), d)] = None
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                out[os.path.relpath(os.path.join(top, name), d)] = f.read()
    return out


def materialize(files, d):
    if os.path.exists(d):
        shutil.rmtree(d)
    os.mkdir(d)
    for rel in sorted(files, key=lambda p: p.count("/")):
        content = files[rel]
        if content is None:
            os.mkdir(os.path.join(d, rel))
            continue
        with open(os.path.join(d, rel), "wb") as f:
            f.write(content)


class Checker:
    def __init__(self, workload, seed):
        self.proc = subprocess.Popen([workload, "check", str(seed)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def check(self, d, lo, hi, lsn):
        self.proc.stdin.write("%s %d %d %d\n" % (d, lo, hi, lsn))
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if not line:
            return False, "the checker stopped", None
        if line.startswith("ok "):
            return True, "", int(line.split()[1])
        return False, line[4:], None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Stats:
    def __init__(self):
        self.states = 0
        self.bad = 0
        self.by_kind = {}
        self.failures = []

    def add(self, kind, ok, why, where):
        self.states += 1
        k = self.by_kind.setdefault(kind, [0, 0])
        k[0] += 1
        if not ok:
            self.bad += 1
            k[1] += 1
            if len(self.failures) < 12:
                self.failures.append("%s at %s: %s" % (kind, where, why))


def variants(disk, rnd, nsubsets):
    """The (kind, chosen set, minimum J) of the crash states at this point."""
    n = len(disk.pending)
    out = [("synced-only", set(), disk.acked), ("everything", set(range(n)), disk.applied)]
    if n == 0:
        return out[:1]
    logk = {k for k, (op, ino) in enumerate(disk.pending)
            if os.path.basename(op.path).startswith("redo") and ino is not None}
    if logk:
        out.append(("logs-only", logk, disk.applied))
    punch = {k for k, (op, _) in enumerate(disk.pending) if op.kind == "P"}
    if punch:
        out.append(("punches-only", punch, disk.acked))
    for k in sorted({n // 4, n // 2, 3 * n // 4, rnd.randrange(n)}):
        if 0 < k < n:
            out.append(("prefix", set(range(k)), disk.acked))
    for _ in range(nsubsets):
        p = rnd.choice((0.2, 0.5, 0.8))
        out.append(("subset", {k for k in range(n) if rnd.random() < p}, disk.acked))
    return out


def crash_points(ops, rnd, extra):
    """Indexes i: the crash happens before ops[i] (len(ops): at the end)."""
    pts = {len(ops)}
    for i, op in enumerate(ops):
        if op.kind in "STPURC":
            pts.add(i)          # just before a sync or a metadata change
            pts.add(i + 1)      # and just after
    pts.update(rnd.randrange(len(ops) + 1) for _ in range(extra))
    return sorted(pts)


def explore(ops, initial, watch, rnd, checker, stats, work, nsubsets, extra,
            exact=None, exact_lsn=0, base_states=None, label=""):
    """Walk the trace, check the crash states at each crash point. With
    exact=J every state must hold exactly J (a recovery run). Collects
    kill -9 states into base_states (for crashing recovery) if given."""
    disk = Disk(watch, initial)
    pts = crash_points(ops, rnd, extra)
    d = os.path.join(work, "state")
    pi = 0
    for i in range(len(ops) + 1):
        while pi < len(pts) and pts[pi] == i:
            pi += 1
            for kind, chosen, lo in variants(disk, rnd, nsubsets):
                hi = disk.applied + (1 if disk.opened else 0)
                lsn = max(disk.applied, disk.logged_lsn)
                if exact is not None:
                    lo = hi = exact
                    lsn = max(exact_lsn, disk.logged_lsn)
                materialize(disk.state(chosen), d)
                ok, why, j = checker.check(d, lo, hi, lsn)
                stats.add(label + kind, ok, why, "op %d/%d" % (i, len(ops)))
                if ok and base_states is not None and kind in ("everything", "logs-only") \
                        and disk.applied > disk.acked:
                    base_states.append((disk.state(chosen), j, lsn))
        if i < len(ops):
            disk.step(ops[i])


def run_traced(args, watch, trace, shim, free):
    env = dict(os.environ, LD_PRELOAD=shim, CRASHSIM_DIR=watch, CRASHSIM_TRACE=trace)
    if free is not None:
        env["CRASHSIM_FREE"] = str(free)
    r = subprocess.run(args, env=env, timeout=600, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("crashsim: %s failed (%d):\n%s%s" % (" ".join(args), r.returncode, r.stdout,
                                                      r.stderr))


def one_seed(a, seed, stats, work):
    rnd = random.Random(seed)
    watch = os.path.join(work, "shard")
    trace = os.path.join(work, "trace")
    os.mkdir(watch)
    run_traced([a.workload, "run", watch, str(seed), str(a.batches)], watch, trace, a.shim,
               a.free)
    ops = read_trace(trace)
    checker = Checker(a.workload, seed)
    bases = []
    t = time.time()
    explore(ops, {}, watch, rnd, checker, stats, work, a.subsets, a.extra, base_states=bases)
    print("seed %d: %d trace operations, %d states so far, %.1f s" %
          (seed, len(ops), stats.states, time.time() - t), flush=True)
    # Crash the recovery of some kill -9 states.
    rnd.shuffle(bases)
    for n, (files, j, lsn) in enumerate(bases[:a.recoveries]):
        rdir = os.path.join(work, "rec")
        materialize(files, rdir)
        rtrace = os.path.join(work, "rtrace")
        if os.path.exists(rtrace):
            os.unlink(rtrace)
        run_traced([a.workload, "recover", rdir], rdir, rtrace, a.shim, a.free)
        rops = read_trace(rtrace)
        explore(rops, files, rdir, rnd, checker, stats, work, a.subsets, 0, exact=j, exact_lsn=lsn,
                label="recovery-")
        shutil.rmtree(rdir)
    checker.close()
    os.unlink(trace)
    shutil.rmtree(watch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload")
    ap.add_argument("shim")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--free", type=int, default=None,
                    help="free bytes statvfs reports (low-disk path below 1 GiB)")
    ap.add_argument("--subsets", type=int, default=3, help="random subsets per crash point")
    ap.add_argument("--extra", type=int, default=40, help="random extra crash points")
    ap.add_argument("--recoveries", type=int, default=6, help="recoveries crashed per seed")
    ap.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    a = ap.parse_args()
    a.workload = os.path.abspath(a.workload)
    a.shim = os.path.abspath(a.shim)
    work = a.keep or tempfile.mkdtemp(prefix="shardfs-crashsim-", dir="/dev/shm"
                                      if os.path.isdir("/dev/shm") else None)
    os.makedirs(work, exist_ok=True)
    stats = Stats()
    t0 = time.time()
    try:
        for seed in (int(s) for s in a.seeds.split(",")):
            sw = os.path.join(work, "seed-%d" % seed)
            os.mkdir(sw)
            one_seed(a, seed, stats, sw)
            shutil.rmtree(sw)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("crash states checked: %d, inconsistent: %d (%.1f s)" %
          (stats.states, stats.bad, time.time() - t0))
    for kind, (n, bad) in sorted(stats.by_kind.items()):
        print("  %-28s %6d states, %d bad" % (kind, n, bad))
    for f in stats.failures:
        print("FAIL " + f)
    return 1 if stats.bad else 0


if __name__ == "__main__":
    sys.exit(main())
