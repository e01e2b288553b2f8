#!/usr/bin/python3
"""The strict writer of test_kill_torture.py, run as its own process.

    kill_torture_writer.py STATE.json LOG

works in the directory STATE names (on a shardfs mount) until a system call
fails, which it does once the test SIGKILLs the daemon. Every operation is
logged in LOG (a file outside the mount, which survives the daemon):

    B <json>     before the operation starts: its kind and every parameter
    D <id>       after it succeeded: every write() returned its full count,
                 every close() returned, the rename/unlink/... returned 0
    E <id> <errno> <time> <text>   the operation that failed, when
                 (CLOCK_MONOTONIC) and why; then exit 3

An operation with a D line is acknowledged: the daemon promised it. The one
B without a D (at most one: operations run one at a time) was in flight at
the kill. The bytes of every operation come from data() below, seeded by
the operation's id, so the test recomputes the expected files from the log.

Kinds (paths relative to the root; "file" is a regular file, "stream" a file
only ever appended to, made of records with a checksum each):
  new        create path (O_EXCL), write len bytes in pieces, close
  over       create tmp (O_EXCL), write, close, rename(tmp, path) over an
             existing file
  append     open stream O_APPEND (O_CREAT for the first), write records
             of 3000-5000 bytes (so they cross 4 KiB pages), close
  trunc      open, ftruncate(size) (shrink or grow), close
  pwrite     open, pwrite len bytes at off (maybe past the end), close
  otrunc     open O_TRUNC, write len bytes, close
  unlink, move (rename to a new name), mkdir, rmdir (of an empty dir)
"""

import json
import os
import random
import sys
import time
import zlib

RECORD_MIN, RECORD_MAX = 3000, 5000
STREAM_ROLL = 384 << 10     # a stream this long is left as a file; a new one starts
BYTES_CAP = 6 << 20         # above this, the writer removes more than it adds


def data(seed, op_id, n, part=0):
    """The n bytes an operation writes: deterministic, so the test recomputes them."""
    return random.Random("%d:%d:%d" % (seed, op_id, part)).randbytes(n)


def record(seed, op_id, j, seq, length):
    """Record j of append operation op_id: b"R<seq>:<len>:" + payload +
    b":<crc32 hex>\\n", length bytes in all."""
    head = b"R%08d:%05d:" % (seq, length)
    payload = data(seed, op_id, length - len(head) - 10, part=j + 1)
    body = head + payload
    return body + b":%08x\n" % zlib.crc32(body)


def parse_records(buf):
    """Split a stream into records. Returns (records as (seq, bytes), the
    offset where parsing stopped, why it stopped or None at a clean end)."""
    out, off = [], 0
    while off < len(buf):
        head = buf[off:off + 16]
        if len(head) < 16 or head[:1] != b"R" or head[9:10] != b":" or head[15:16] != b":":
            return out, off, "bad record header at offset %d" % off
        try:
            seq, length = int(head[1:9]), int(head[10:15])
        except ValueError:
            return out, off, "bad record header at offset %d" % off
        rec = buf[off:off + length]
        if len(rec) < length:
            return out, off, "short record (%d of %d bytes) at offset %d" % (len(rec), length, off)
        body, tail = rec[:-10], rec[-10:]
        if tail != b":%08x\n" % zlib.crc32(body):
            return out, off, "checksum mismatch in record seq %d at offset %d" % (seq, off)
        out.append((seq, rec))
        off += length
    return out, off, None


def append_records(seed, op):
    """The records of an append operation (a dict from the log), as bytes."""
    return b"".join(record(seed, op["i"], j, op["seq"] + j, n) for j, n in enumerate(op["lens"]))


def pieces(rnd, n):
    """Split n into write() sizes: one write, or several of odd sizes."""
    if n == 0 or rnd.random() < 0.5:
        return [n]
    out = []
    while n:
        k = min(n, rnd.choice((1, 511, 4095, 4097, 9000, 65536, 70001, 131072)))
        out.append(k)
        n -= k
    return out


def file_size(rnd):
    r = rnd.random()
    if r < 0.10:
        return rnd.choice((0, 1, 2047, 2048, 2049, 4095, 4096, 4097, 65535, 65536, 65537))
    if r < 0.45:
        return rnd.randrange(1, 2200)               # inline in the inode record
    if r < 0.85:
        return rnd.randrange(2200, 70000)           # one or two chunks
    return rnd.randrange(70000, 300000)


class Model:
    """What the directory holds: files (rel -> bytearray, streams included),
    streams (rel -> next record seq), dirs (rel, the base dirs included).
    The writer keeps one to choose its operations; the test keeps one built
    from the log and compares it with the mount."""

    def __init__(self, seed, files=None, streams=None, dirs=(), base_dirs=()):
        self.seed = seed
        self.files = {k: bytearray(v) for k, v in (files or {}).items()}
        self.streams = dict(streams or {})
        self.dirs = set(dirs) | set(base_dirs)
        self.base_dirs = set(base_dirs)

    def plain_files(self):
        return sorted(k for k in self.files if k not in self.streams)

    def size(self, p):
        return len(self.files[p])

    def total(self):
        return sum(self.size(p) for p in self.files)

    def empty_dirs(self):
        used = {os.path.dirname(q) for q in list(self.files) + list(self.dirs)}
        return sorted(d for d in self.dirs if d not in used and d not in self.base_dirs)

    def apply(self, op):
        """Apply an acknowledged operation (a dict as logged)."""
        k, p = op["k"], op["p"]
        if k in ("new", "over", "otrunc"):
            self.files[p] = bytearray(data(self.seed, op["i"], op["n"]))
        elif k == "append":
            self.files.setdefault(p, bytearray()).extend(append_records(self.seed, op))
            self.streams[p] = op["seq"] + len(op["lens"])
            if self.size(p) > STREAM_ROLL:       # from now on an ordinary file
                del self.streams[p]
        elif k == "trunc":
            f = self.files[p]
            if op["size"] < len(f):
                del f[op["size"]:]
            else:
                f.extend(bytes(op["size"] - len(f)))
        elif k == "pwrite":
            pwrite_into(self.files[p], op["off"], data(self.seed, op["i"], op["n"]))
        elif k == "unlink":
            del self.files[p]
            self.streams.pop(p, None)
        elif k == "move":
            self.files[op["to"]] = self.files.pop(p)
        elif k == "mkdir":
            self.dirs.add(p)
        elif k == "rmdir":
            self.dirs.remove(p)
        else:
            raise ValueError(k)

    def state(self, root, next_id, limit_s):
        """The writer's input: the model, without the bytes of the files."""
        return {"root": root, "seed": self.seed, "next_id": next_id, "limit_s": limit_s,
                "sizes": {k: len(v) for k, v in self.files.items()},
                "streams": self.streams, "dirs": sorted(self.dirs),
                "base_dirs": sorted(self.base_dirs)}


def pwrite_into(f, off, buf):
    if off > len(f):
        f.extend(bytes(off - len(f)))
    f[off:off + len(buf)] = buf


class SizeModel(Model):
    """The writer's model: sizes instead of bytes (it needs no bytes to choose)."""

    def __init__(self, state):
        super().__init__(state["seed"], streams=state["streams"], dirs=state["dirs"],
                         base_dirs=state["base_dirs"])
        self.files = dict(state["sizes"])

    def size(self, p):
        return self.files[p]

    def apply(self, op):
        k, p = op["k"], op["p"]
        if k in ("new", "over", "otrunc"):
            self.files[p] = op["n"]
        elif k == "append":
            self.files[p] = self.files.get(p, 0) + sum(op["lens"])
            self.streams[p] = op["seq"] + len(op["lens"])
            if self.files[p] > STREAM_ROLL:
                del self.streams[p]
        elif k == "trunc":
            self.files[p] = op["size"]
        elif k == "pwrite":
            self.files[p] = max(self.files[p], op["off"] + op["n"])
        else:
            super().apply(op)


class Writer:
    def __init__(self, state, log_path):
        self.root = state["root"]
        self.seed = state["seed"]
        self.next_id = state["next_id"]
        self.m = SizeModel(state)
        self.step = None
        self.rnd = random.Random("%d:writer:%d" % (self.seed, self.next_id))
        self.log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(self, line):
        b = (line + "\n").encode()
        if os.write(self.log, b) != len(b):
            raise SystemExit("short write to the log")

    def sc(self, name, fn, *args):
        """fn(*args), remembering which call this is for the E line."""
        self.step = name
        return fn(*args)

    def p(self, rel):
        return os.path.join(self.root, rel)

    def write_all(self, fd, buf, split):
        """Write buf, in pieces of odd sizes if split; every write() must
        return its full count (a short one fails the operation)."""
        off = 0
        for n in pieces(self.rnd, len(buf)) if split else [len(buf)]:
            got = self.sc("write", os.write, fd, buf[off:off + n])
            if got != n:
                raise OSError(0, "short write: %d of %d bytes" % (got, n))
            off += n

    # -- choosing --------------------------------------------------------

    def new_name(self, prefix, i):
        return os.path.join(self.rnd.choice(sorted(self.m.dirs)), "%s%d" % (prefix, i))

    def choose(self, i):
        big = self.m.total() > BYTES_CAP
        kinds = [("new", 3 if big else 14), ("over", 10), ("append", 25), ("trunc", 12),
                 ("pwrite", 9), ("otrunc", 6), ("unlink", 25 if big else 6), ("move", 4),
                 ("mkdir", 3), ("rmdir", 3)]
        while True:
            kind = self.rnd.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
            op = self.plan(kind, i, big)
            if op:
                return op

    def plan(self, kind, i, big):
        rnd, m = self.rnd, self.m
        files = m.plain_files()
        op = {"i": i, "k": kind}
        if kind in ("over", "trunc", "pwrite", "otrunc", "move"):
            if not files:
                return None
            op["p"] = target = rnd.choice(files)
            old = m.size(target)
        if kind == "new":
            op.update(p=self.new_name("f", i), n=file_size(rnd))
        elif kind == "over":
            op.update(tmp=self.new_name("t", i), n=file_size(rnd))
        elif kind == "append":
            live = sorted(m.streams)
            if not live or (len(live) < 3 and rnd.random() < 0.05):
                op.update(p=self.new_name("s", i), seq=0)
            else:
                op["p"] = rnd.choice(live)
                op["seq"] = m.streams[op["p"]]
            op["lens"] = [rnd.randrange(RECORD_MIN, RECORD_MAX + 1)
                          for _ in range(rnd.choice((1, 1, 1, 2, 3)))]
        elif kind == "trunc":
            if big or rnd.random() < 0.5:
                size = rnd.randrange(0, old + 1)
            else:
                size = old + rnd.choice((1, 100, 2048, 4096, 5000, 65536, 70000))
            op.update(size=size, how=rnd.choice(("ftruncate", "truncate")))
        elif kind == "pwrite":
            off = rnd.randrange(0, old + 1) if rnd.random() < 0.8 else old + rnd.randrange(1, 70000)
            op.update(off=off, n=rnd.choice((1, 100, 3000, 4097, 20000, 66000)))
        elif kind == "otrunc":
            op.update(n=file_size(rnd))
        elif kind == "unlink":
            cands = files + [s for s in sorted(m.streams) if rnd.random() < 0.2]
            if not cands:
                return None
            op["p"] = rnd.choice(cands)
        elif kind == "move":
            op["to"] = self.new_name("m", i)
        elif kind == "mkdir":
            op["p"] = self.new_name("d", i)
        elif kind == "rmdir":
            cands = m.empty_dirs()
            if not cands:
                return None
            op["p"] = rnd.choice(cands)
        return op

    # -- doing -----------------------------------------------------------

    def do(self, op):
        k, p = op["k"], self.p(op["p"])
        if k in ("new", "over", "otrunc"):
            buf = data(self.seed, op["i"], op["n"])
            excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            if k == "new":
                fd = self.sc("open", os.open, p, excl, 0o644)
            elif k == "over":
                fd = self.sc("open", os.open, self.p(op["tmp"]), excl, 0o644)
            else:
                fd = self.sc("open", os.open, p, os.O_WRONLY | os.O_TRUNC)
            self.write_all(fd, buf, True)
            self.sc("close", os.close, fd)      # raises if close() returned -1
            if k == "over":
                self.sc("rename", os.rename, self.p(op["tmp"]), p)
        elif k == "append":
            flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if op["seq"] == 0 else 0)
            fd = self.sc("open", os.open, p, flags, 0o644)
            for j, n in enumerate(op["lens"]):
                self.write_all(fd, record(self.seed, op["i"], j, op["seq"] + j, n), False)
            self.sc("close", os.close, fd)
        elif k == "trunc":
            if op["how"] == "ftruncate":
                fd = self.sc("open", os.open, p, os.O_WRONLY)
                self.sc("ftruncate", os.ftruncate, fd, op["size"])
                self.sc("close", os.close, fd)
            else:
                self.sc("truncate", os.truncate, p, op["size"])
        elif k == "pwrite":
            buf = data(self.seed, op["i"], op["n"])
            fd = self.sc("open", os.open, p, os.O_WRONLY)
            got = self.sc("pwrite", os.pwrite, fd, buf, op["off"])
            if got != len(buf):
                raise OSError(0, "short pwrite: %d of %d bytes" % (got, len(buf)))
            self.sc("close", os.close, fd)
        elif k == "unlink":
            self.sc("unlink", os.unlink, p)
        elif k == "move":
            self.sc("rename", os.rename, p, self.p(op["to"]))
        elif k == "mkdir":
            self.sc("mkdir", os.mkdir, p, 0o755)
        elif k == "rmdir":
            self.sc("rmdir", os.rmdir, p)
        self.m.apply(op)

    def run(self, limit_s):
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            i = self.next_id
            self.next_id += 1
            op = self.choose(i)
            self.note("B " + json.dumps(op, sort_keys=True))
            try:
                self.do(op)
            except OSError as e:
                self.note("E %d %d %.6f %s: %s" % (i, e.errno or 0, time.monotonic(), self.step,
                                                    str(e).replace("\n", " ")))
                return 3
            self.note("D %d" % i)
        return 0


def main():
    with open(sys.argv[1]) as f:
        state = json.load(f)
    sys.exit(Writer(state, sys.argv[2]).run(float(state.get("limit_s", 60))))


if __name__ == "__main__":
    main()
