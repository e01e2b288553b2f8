"""Automatic failover with the shard map in etcd (issue 10, fs/failover.h)
on three real nodes, each mounted, every shard on two of them:

    shard   0-2   3-5   6-7
    primary  a     b     c     (as seeded from shards.conf; failovers move them)
    replica  b     c     a

ack = replica and lease_ttl_ms = 2000, so a dead primary's leader key goes
within 2 s and its in-sync replica promotes itself. The tests read the map
where the nodes read it, in etcd, and check real bytes through the mounts:

 - kill -9 of a primary while a strict writer writes through another
   node's mount (every write() count and close() checked before the file
   is logged): after the failover every logged file is there, byte for
   byte, through every live mount; over several kills of different nodes,
   each restarted in between (it rejoins as a replica and catches up).
   The failover time, from the kill to the first write that succeeds on
   one of the dead node's shards through another mount, is printed and
   must be at most the lease TTL + 2 s.
 - the old primary SIGSTOPped past its lease, then SIGCONTed while writes
   through its own mount wait in the kernel: none of them is acknowledged
   by it (every acknowledged write is on the new primary), and it rejoins
   as a replica.
 - rsync of a tree through a, kill -9 of b during it, rsync restarted once
   if it failed: diff -r clean through the live mounts.

The teardown fsck's every node (with the map reset to shards.conf's, see
test_replication.etcd_reset: the copies are level after the clean stop).
"""

import base64
import errno
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import SHARDFS_BIN, read_file, run, wait_for, write_file
from test_cluster import NODES, SECRET, TIMEOUT_MS, serve_cluster
from test_replication import ReplCluster, entry_shard, etcd_server, etcd_url, get_json  # noqa: F401

SHARDS = 8
TTL_MS = 2000
CLIENT_TIMEOUT_MS = 6000  # a request waits this long for a shard's new primary
KILLS = int(os.environ.get("SHARDFS_FAILOVER_KILLS", "10"))
LEVEL_DEADLINE = 60.0


class FailoverCluster(ReplCluster):
    def __init__(self, top, watchdog, etcd_url, ack="replica"):
        super().__init__(top, watchdog, ack=ack, etcd_url=etcd_url)
        self.ack = ack
        text = open(self.conf).read()
        text = text.replace("timeout_ms = %d\n" % TIMEOUT_MS,
                            "timeout_ms = %d\nlease_ttl_ms = %d\n" % (CLIENT_TIMEOUT_MS, TTL_MS))
        open(self.conf, "w").write(text)
        self.etcd = etcd_url
        self.prefix = "/shardfs/%s/" % hashlib.sha256(
            b"shardfs cluster id\0" + SECRET.encode()).hexdigest()[:16]

    def alive(self):
        return [n for n in NODES if self.proc[n] is not None]

    # -- the map, as etcd holds it --------------------------------------

    def _range(self, key, end):
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "range_end": base64.b64encode(end.encode()).decode()}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                self.etcd + "/v3/kv/range", data=body, method="POST"), timeout=10) as r:
            doc = json.loads(r.read())
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in doc.get("kvs", [])}

    def shard_map(self):
        """{shard: {"epoch", "primary", "replicas", "in_sync", "leader"}}."""
        every = self._range(self.prefix, self.prefix[:-1] + "0")  # one revision
        kvs = {k: v for k, v in every.items() if k.startswith(self.prefix + "shard/")}
        leaders = {k: v for k, v in every.items() if k.startswith(self.prefix + "leader/")}
        out = {}
        for k, v in kvs.items():
            s = int(k.rsplit("/", 1)[1])
            out[s] = json.loads(v)
            out[s]["epoch"] = int(out[s]["epoch"])
            lk = self.prefix + "leader/%04d" % s
            out[s]["leader"] = leaders[lk].decode() if lk in leaders else None
        assert len(out) == SHARDS, out
        return out


@pytest.fixture
def fcluster(request, tmp_top, watchdog, etcd_url):  # noqa: F811
    c = FailoverCluster(tmp_top, watchdog, etcd_url, ack=getattr(request, "param", "replica"))
    yield from serve_cluster(c, watchdog)


def unsettled(c):
    """What keeps the cluster from being ready for the next kill: a shard
    without a live leader, a live replica not level with its primary or
    not in the in-sync set. [] when none."""
    m = c.shard_map()
    live = c.alive()
    views = {n: {e["shard"]: e for e in get_json(c, n, "/v1/replicas")["replicas"]}
             for n in live}
    out = []
    for s, e in m.items():
        if e["leader"] != e["primary"] or e["primary"] not in live:
            out.append((s, "leader %s, primary %s" % (e["leader"], e["primary"])))
            continue
        p = get_json(c, e["primary"], "/v1/shard/%d/position" % s)
        for r in e["replicas"]:
            if r not in live:
                continue
            v = views[r].get(s)
            if v is None or (v["lsn"], str(v["check"])) != (p["lsn"], str(p["check"])):
                out.append((s, "replica %s not level: %s; primary %s at %s" % (
                    r, v, e["primary"], {k: p[k] for k in ("epoch", "lsn", "check") if k in p})))
            elif r not in e["in_sync"]:
                out.append((s, "replica %s level but not in sync" % r))
    return out


def wait_settled(c, deadline=LEVEL_DEADLINE, writers=()):
    """Wait until unsettled(c) is []. Level is an exact position, which a
    replica trailing a running writer by the batch in flight misses at
    almost every look (a hot shard, a fast machine): the writers are
    paused meanwhile (no file open) and go on after."""
    last = []

    def ok():
        last[:] = unsettled(c)
        return not last
    for w in writers:
        w.hold.set()
    try:
        for w in writers:
            assert w.idle.wait(30), "a writer hangs"
        wait_for(ok, deadline, "every shard led, every live replica level and in sync",
                 interval=0.2)
    except BaseException:
        print("unsettled:", last)
        raise
    finally:
        for w in writers:
            w.hold.clear()


class StrictWriter:
    """Writes new files through self.via (a node, changed between kills),
    each in three write()s whose counts are checked, then close(); only a
    file all of whose calls succeeded is logged. Failures are counted (a
    write in flight when its primary died may fail), never logged."""

    def __init__(self, c, prefix, via):
        self.c, self.prefix, self.via = c, prefix, via
        self.logged = {}
        self.parts = {}  # name: [(offset, length, time.monotonic() its write() began)]
        self.failed = []  # (name, node, errno, the call, time.monotonic())
        self.error = None
        self.stop = threading.Event()
        self.hold = threading.Event()  # set: start no new file (idle says when none is open)
        self.idle = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            self.write_files()
        except BaseException as e:  # seen by __exit__: a dead writer fails the test
            self.error = e
            raise

    def write_files(self):
        i = 0
        while not self.stop.is_set():
            if self.hold.is_set():
                self.idle.set()
                time.sleep(0.01)
                continue
            self.idle.clear()
            node = self.via
            name = "%s-%d" % (self.prefix, i)
            i += 1
            data = os.urandom(100 + (i * 7919) % 20000)
            parts = (data[:50], data[50:99], data[99:])
            fd, step = -1, "open"
            try:
                fd = os.open(self.c.p(node, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                began, off = [], 0
                for k, part in enumerate(parts):
                    step = "write %d" % k
                    began.append((off, len(part), time.monotonic()))
                    off += len(part)
                    n = os.write(fd, part)
                    if n != len(part):
                        # POSIX: a write that failed part way returns what it
                        # wrote (the kernel splits it at page boundaries, the
                        # primary died between two): not acknowledged
                        raise OSError(errno.EIO, "short write %d of %d" % (n, len(part)))
                f, fd, step = fd, -1, "close"
                os.close(f)
            except OSError as e:
                self.failed.append((name, node, e.errno, step, round(time.monotonic(), 3)))
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                time.sleep(0.05)
                continue
            self.logged[name] = data
            self.parts[name] = began

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.t.join(60)
        assert not self.t.is_alive(), "the writer hangs"
        assert self.error is None, "the writer died: %r" % (self.error,)


def check_logged(c, logged, nodes):
    bad = []
    for node in nodes:
        for name, data in logged.items():
            try:
                got = read_file(c.p(node, name))
            except OSError as e:
                got = e
            if got != data:
                bad.append((node, name, got if isinstance(got, OSError) else len(got)))
                if len(bad) >= 10:
                    break
    assert not bad, "%d acknowledged files missing or different, e.g. %s" % (len(bad), bad[:5])


def check_parts_after(c, writers, t, nodes):
    """Every part of a logged file whose write() began after t is in the
    file, through every node of nodes (its data cannot have reached any
    primary before t). Returns how many parts were checked."""
    bad, count = [], 0
    for node in nodes:
        for w in writers:
            for name, parts in w.parts.items():
                late = [(o, n) for o, n, began in parts if began > t]
                if not late:
                    continue
                try:
                    got = read_file(c.p(node, name))
                except OSError as e:
                    bad.append((node, name, e))
                    continue
                want = w.logged[name]
                for o, n in late:
                    count += 1
                    if got[o:o + n] != want[o:o + n]:
                        bad.append((node, name, "bytes %d-%d" % (o, o + n)))
            if len(bad) >= 10:
                break
    assert not bad, "%d parts written after %.2f missing or different, e.g. %s" % (
        len(bad), t, bad[:5])
    return count


def probes(c, via):
    """{shard: name} of one file per shard (its entry and inode there)."""
    out = {}
    i = 0
    while len(out) < SHARDS:
        name = "probe-%d" % i
        i += 1
        write_file(c.p(via, name), b"probe\n")
        s = entry_shard(c, via, name)
        if s in out:
            os.unlink(c.p(via, name))
        else:
            out[s] = name
        assert i < 400, "no probe file lands on some shard: %s" % sorted(out)
    return out


def failover_time(c, victim, led, via, probe, t_kill):
    """Seconds from t_kill to the first write that succeeds, through via,
    on one of the shards victim led (a probe file of each)."""
    name = probe[led[0]]
    deadline = time.monotonic() + 30
    while True:
        try:
            write_file(c.p(via, name), b"after the death of %s\n" % victim.encode())
            return time.monotonic() - t_kill
        except OSError:
            assert time.monotonic() < deadline, "no write on shard %d for 30 s" % led[0]
            time.sleep(0.01)


# ---------------------------------------------------------------------------


@pytest.mark.timeout_s(900)
def test_kill9_of_primaries_loses_no_acknowledged_write(fcluster):
    c = fcluster
    wait_settled(c)
    probe = probes(c, "a")
    times = []
    checked = {}
    order = [NODES[k % 3] for k in range(KILLS)]
    with StrictWriter(c, "w", via="b") as w:
        for victim in order:
            via = NODES[(NODES.index(victim) + 1) % 3]
            w.via = via
            time.sleep(1.0)  # writes in flight at the kill
            m = c.shard_map()
            epochs = {s: e["epoch"] for s, e in m.items()}
            led = [s for s, e in m.items() if e["primary"] == victim]
            assert led, "%s leads nothing" % victim
            t_kill = time.monotonic()
            c.kill9(victim)
            took = failover_time(c, victim, led, via, probe, t_kill)
            times.append(took)
            # the others of its shards follow (one promotion after another)
            wait_for(lambda: all(c.shard_map()[s]["primary"] != victim for s in led), 10,
                     "every shard of %s promoted" % victim, interval=0.05)
            m = c.shard_map()
            for s in led:
                assert m[s]["leader"] == m[s]["primary"] != victim and \
                    m[s]["epoch"] == epochs[s] + 1, (s, m[s])
            print("kill -9 %s (led shards %s): first write on shard %d through %s after "
                  "%.2f s" % (victim, led, led[0], via, took))
            time.sleep(0.5)
            # the files logged since the last kill (those before were checked
            # then, and all are again at the end), through the live mounts,
            # while the victim is dead
            now = dict(w.logged)
            check_logged(c, {n: d for n, d in now.items() if n not in checked}, c.alive())
            checked.update(now)
            c.start(victim)
            wait_settled(c, writers=(w,))
            m = c.shard_map()
            for s in led:
                assert victim in m[s]["replicas"] and victim in m[s]["in_sync"], (s, m[s])
    print("failover times (s): %s; max %.2f, lease TTL %.1f s; %d files logged, %d writes "
          "failed" % (" ".join("%.2f" % t for t in times), max(times), TTL_MS / 1000.0,
                      len(w.logged), len(w.failed)))
    assert len(w.logged) > 50
    check_logged(c, w.logged, NODES)
    assert max(times) <= TTL_MS / 1000.0 + 2.0, times


@pytest.mark.timeout_s(600)
def test_etcd_restart_keeps_the_cluster_serving(fcluster, etcd_server):
    """etcd killed (-9) for twice the lease TTL while a strict writer writes
    through b, then started again on its data: the nodes keep serving with
    the map they have (with ack = replica each write is fenced by its
    in-sync replica's ack, not the lease: shard_repl.c), nobody is promoted
    (no etcd txn can pass), and with etcd back the primaries, epochs and
    leader keys are those of before; then a kill -9 fails over again."""
    c = fcluster
    wait_settled(c)
    probe = probes(c, "b")
    m0 = c.shard_map()
    with StrictWriter(c, "e", via="b") as w:
        time.sleep(1.0)
        n0, f0 = len(w.logged), len(w.failed)
        etcd_server.stop(signal.SIGKILL)
        time.sleep(2 * TTL_MS / 1000.0 + 1.0)
        n1, f1 = len(w.logged), len(w.failed)
        # read back through every mount while etcd is away
        check_logged(c, dict(w.logged), NODES)
        etcd_server.start()
        time.sleep(2.0)
        n2 = len(w.logged)
        time.sleep(1.0)
        n3 = len(w.logged)
    print("etcd away %.1f s: %d files logged, %d writes failed meanwhile; %d logged in the "
          "second after it was back" % (2 * TTL_MS / 1000.0 + 1.0, n1 - n0, f1 - f0, n3 - n2))
    assert n1 - n0 >= 10 and n3 > n2 and f1 == f0, (n0, n1, n2, n3, f0, f1)
    m1 = c.shard_map()
    for s, e in m0.items():
        assert (m1[s]["primary"], m1[s]["epoch"], m1[s]["leader"]) == \
            (e["primary"], e["epoch"], e["primary"]), (s, e, m1[s])
    check_logged(c, w.logged, NODES)
    # promotion works again
    wait_settled(c)
    led = [s for s, e in m1.items() if e["primary"] == "a"]
    t_kill = time.monotonic()
    c.kill9("a")
    took = failover_time(c, "a", led, "b", probe, t_kill)
    print("kill -9 a after etcd's restart: first write on shard %d through b after %.2f s"
          % (led[0], took))
    assert took <= TTL_MS / 1000.0 + 2.0
    c.start("a")
    wait_settled(c)


@pytest.mark.timeout_s(600)
@pytest.mark.parametrize("fcluster", ["replica", "primary"], indirect=True)
def test_sigstopped_primary_acknowledges_nothing_after_its_lease(fcluster):
    """a leads shards 0-2. It is stopped (SIGSTOP) while writers write
    through its own mount and through c's; b promotes itself; a is
    continued with writes queued in its FUSE device. Every acknowledged
    write() that began after a was stopped is on the new primary (read
    through b and c, and a after it stepped down): one a acknowledged as
    a primary after its lease ran out would have been lost with a's
    diverged tail -- so that count is 0. With ack = replica that holds for
    every acknowledged write; with ack = primary, writes acknowledged just
    before the SIGSTOP may be lost (documented), and the lease is all
    that fences a. a rejoins as a replica of shards 0-2, back in sync."""
    c = fcluster
    wait_settled(c)
    m0 = c.shard_map()
    led = [s for s, e in m0.items() if e["primary"] == "a"]
    assert led
    with StrictWriter(c, "own", via="a") as wa, StrictWriter(c, "other", via="c") as wc:
        time.sleep(1.0)
        os.kill(c.proc["a"].pid, signal.SIGSTOP)
        t_stop = time.monotonic() + 0.05  # every thread of a stopped by then
        try:
            wait_for(lambda: all(c.shard_map()[s]["primary"] != "a" for s in led),
                     TTL_MS / 1000.0 + 10, "a replaced as the primary of %s" % led,
                     interval=0.1)
            time.sleep(1.0)
        finally:
            os.kill(c.proc["a"].pid, signal.SIGCONT)
        wait_for(lambda: "another node is its primary now" in open(
            [p for l, p in c.stderr_files if l.startswith("mount.a.")][-1]).read(),
            20, "a stepping down")
        time.sleep(2.0)
    m = c.shard_map()
    for s in led:
        assert m[s]["primary"] == "b" and m[s]["epoch"] == m0[s]["epoch"] + 1, (s, m[s])
    wait_settled(c)
    m = c.shard_map()
    for s in led:
        assert "a" in m[s]["in_sync"], (s, m[s])
    print("through a: %d acknowledged, %d failed; through c: %d acknowledged, %d failed" % (
        len(wa.logged), len(wa.failed), len(wc.logged), len(wc.failed)))
    # acknowledged by a deposed primary and then lost: 0. A write() that
    # began after the SIGSTOP reached no primary before it: a was frozen
    # until its lease had run out, b promoted itself meanwhile.
    late = check_parts_after(c, (wa, wc), t_stop, NODES)
    print("write()s begun after SIGSTOP and acknowledged: %d (checked on every node)" % (
        late // len(NODES)))
    if c.ack == "replica":
        logged = dict(wa.logged)
        logged.update(wc.logged)
        check_logged(c, logged, NODES)
    assert wc.logged and wa.logged and late


@pytest.mark.timeout_s(900)
def test_rsync_through_a_survives_kill9_of_b(fcluster):
    c = fcluster
    wait_settled(c)
    src = "/usr/include/linux/"
    result = {}

    def rsync():
        result["first"] = run(["rsync", "-a", src, c.p("a", "inc") + "/"], check=False,
                              timeout=600)
    t = threading.Thread(target=rsync)
    t.start()
    time.sleep(2.0)
    c.kill9("b")
    t.join(600)
    first = result["first"]
    print("rsync during the kill: exit %d\n%s" % (first.returncode, first.stderr[-3000:]))
    if first.returncode != 0:
        run(["rsync", "-a", src, c.p("a", "inc") + "/"], timeout=600)
    for n in ("a", "c"):
        run(["diff", "-r", src, c.p(n, "inc")], timeout=300)
    # shardfs status names the map's primaries, not shards.conf's
    m = c.shard_map()
    r = subprocess.run([SHARDFS_BIN, "status", "-c", c.conf], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120, text=True)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)  # b is down
    rows = {int(l.split()[0]): l.split()[1] for l in r.stdout.splitlines()
            if " primary " in l and l.split()[0].isdigit()}
    assert rows == {s: e["primary"] for s, e in m.items()}, (rows, r.stdout)
    assert "b" not in rows.values(), r.stdout
    c.start("b")
    wait_settled(c)
    run(["diff", "-r", src, c.p("b", "inc")], timeout=300)
