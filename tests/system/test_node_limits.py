"""A node's HTTP server under connection abuse (issue 9, finding 2), on the
3-node cluster of test_cluster.py.

A hostile client holds 2000 TCP connections to node b and trickles a byte
to some of them every few seconds; it connects from 127.0.0.2 (another
address of the loopback: another machine, as the per-address limit sees
it). While it does, a signed request, a key API GET with curl and the
mount of a freshly restarted node a (new connections to b) must all work
promptly. Before the event loop, b served 256 connections at most, one
thread each, with an idle timeout that any byte reset: the 2000 held every
slot and everyone else waited in the kernel's accept queue.

A slowloris connection sending its headers a byte a second must be closed
once the header deadline (10 s after its first byte, DESIGN.md) has passed;
a keep-alive connection idle between requests must not be.
"""

import errno
import os
import re
import socket
import threading
import time

import pytest

from conftest import SHARDFS_BIN, read_file, run, wait_for, write_file
from test_cluster import cluster  # noqa: F401
from test_cluster_api import BEARER, curl, sign_headers, signed, url

ATTACK_CONNECTIONS = 2000
ATTACKER_ADDR = "127.0.0.2"
HEADER_DEADLINE_S = 10.0
PROMPT_S = 5.0           # "promptly": a normal request under attack, hang guard included


class Attacker:
    """Keeps up to n connections from ATTACKER_ADDR to port open, sends one
    byte of a request line to a rotating tenth of them every 2 s, and opens
    a new connection for every one the server closed (at most 200 a pass,
    as a determined client would). Counts what it holds."""

    def __init__(self, port, n):
        self.port, self.n = port, n
        self.socks = []
        self.stop = threading.Event()
        self.opened = 0
        self.closed_by_server = 0
        self.alive = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self):
        s = socket.socket()
        s.setblocking(False)
        s.bind((ATTACKER_ADDR, 0))
        err = s.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            return None
        self.opened += 1
        return s

    @staticmethod
    def _is_open(s):
        try:
            return s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def start(self):
        for _ in range(self.n):
            s = self._connect()
            if s:
                self.socks.append(s)
        self.thread.start()

    def _run(self):
        turn = 0
        while not self.stop.wait(2.0):
            alive, dead = [], 0
            for s in self.socks:
                if self._is_open(s):
                    alive.append(s)
                else:
                    s.close()
                    dead += 1
            self.closed_by_server += dead
            self.alive = len(alive)
            for s in alive[turn % 10::10]:
                try:
                    s.send(b"G")
                except OSError:
                    pass
            turn += 1
            for _ in range(min(200, self.n - len(alive))):
                s = self._connect()
                if s:
                    alive.append(s)
            self.socks = alive

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)
        for s in self.socks:
            s.close()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"(?m)^VmRSS:\s+(\d+) kB", f.read()).group(1))


def timed(fn, limit=PROMPT_S):
    t0 = time.monotonic()
    v = fn()
    took = time.monotonic() - t0
    assert took <= limit, "%r took %.1f s (more than %.0f s)" % (fn, took, limit)
    return v, took


@pytest.mark.timeout_s(240)
def test_idle_connections_do_not_lock_others_out(cluster):
    data = {"f%02d" % i: os.urandom(3000 + 97 * i) for i in range(24)}
    for name, d in data.items():
        write_file(cluster.p("c", name), d)
    st, _ = curl("-X", "PUT", "-H", BEARER, "--data-binary", "@-", url(cluster, "c", "/api/x"),
                 input=b"via the api\n")
    assert st == 201

    rss_idle = rss_kib(cluster.proc["b"].pid)
    att = Attacker(cluster.ports["b"], ATTACK_CONNECTIONS)
    att.start()
    try:
        time.sleep(3)   # it holds what it can, and has trickled a byte to some
        held = att.alive
        rss = rss_kib(cluster.proc["b"].pid)
        print("attacker: %d open after 3 s (%d closed by b); b's RSS %d -> %d KiB"
              % (held, att.closed_by_server, rss_idle, rss))
        # Bounded by memory: a connection costs a socket and a small buffer.
        assert rss - rss_idle < 64 * 1024, (rss_idle, rss)

        # A signed request from another client.
        (st, _, body), took = timed(lambda: signed(cluster, "b", "GET", "/v1/config"))
        assert st == 200 and b'"node":"b"' in body, (st, body)
        print("signed GET /v1/config: %.3f s" % took)
        # The key API, with curl.
        (res, took) = timed(lambda: curl("-m", "10", "-H", BEARER, url(cluster, "b", "/api/x")))
        assert res == (200, b"via the api\n"), res
        print("curl GET /v1/kv/api/x: %.3f s" % took)
        # The CLI (signed like a node, a new process, new connections).
        r, took = timed(lambda: run([SHARDFS_BIN, "get", "-c", cluster.conf, "--node", "b",
                                     "/f00"], binary=True, timeout=30, check=False))
        assert r.returncode == 0 and r.stdout == data["f00"], r.stderr
        # A mount whose node has no connection to b yet: restart a, read
        # every file through it (about 3 in 8 are on b's shards).
        cluster._stop("a")
        cluster.start("a")
        t0 = time.monotonic()
        for name, d in data.items():
            got, _ = timed(lambda: read_file(cluster.p("a", name)))
            assert got == d, name
        assert sorted(os.listdir(cluster.p("a"))) == sorted(list(data) + ["api"])
        print("restarted a, read %d files through it: %.2f s"
              % (len(data), time.monotonic() - t0))
        # The attack was real: it held more than the old limit of 256 all along.
        assert held > 256 and att.alive > 256, (held, att.alive)
    finally:
        att.close()
    # The filesystem and b are fine afterwards.
    write_file(cluster.p("b", "after"), b"ok\n")
    assert read_file(cluster.p("a", "after")) == b"ok\n"


def closed_within(sock, seconds, trickle=None):
    """Seconds until the server closes sock (EOF or reset), sending one byte
    of `trickle` a second meanwhile; None if it is still open after
    `seconds`."""
    t0 = time.monotonic()
    sock.settimeout(1.0)
    i = 0
    while time.monotonic() - t0 < seconds:
        if trickle is not None:
            try:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
            except OSError:
                return time.monotonic() - t0
            i += 1
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            pass
        except OSError:
            return time.monotonic() - t0
    return None


def config_request(cluster, node, keep):
    """A signed GET /v1/config on the open socket keep (to node); returns the
    status."""
    h = sign_headers(cluster, node, "GET", "/v1/config")
    keep.sendall(("GET /v1/config HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n"
                  % (cluster.ports[node], "".join("%s: %s\r\n" % kv for kv in h.items())))
                 .encode())
    keep.settimeout(10)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = keep.recv(4096)
        assert chunk, "closed before the reply"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length:")][0])
    while len(rest) < length:
        rest += keep.recv(4096)
    return int(head.split(b" ")[1])


@pytest.mark.timeout_s(120)
def test_header_deadline_is_not_extended_by_a_trickle(cluster):
    port = cluster.ports["b"]
    results = {}

    def slowloris():
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /v1/config HTTP/1.1\r\nHost: x\r\n")
        results["slowloris"] = closed_within(s, HEADER_DEADLINE_S + 8, trickle=b"X-Slow: aaaa\r\n")
        s.close()

    def keepalive_then_trickle():
        s = socket.create_connection(("127.0.0.1", port))
        assert config_request(cluster, "b", s) == 200
        # Idle between requests: no deadline.
        results["idle for 4 s"] = closed_within(s, 4)
        # Then a second request a byte a second: its deadline runs from its first byte.
        results["second request trickled"] = closed_within(
            s, HEADER_DEADLINE_S + 8, trickle=b"GET /v1/config HTTP/1.1\r\nX-Slow: a\r\n")
        s.close()

    def keepalive_idle():
        s = socket.create_connection(("127.0.0.1", port))
        assert config_request(cluster, "b", s) == 200
        results["idle for 14 s"] = closed_within(s, HEADER_DEADLINE_S + 4)
        # ... and still serves its next request.
        results["next request after idling"] = config_request(cluster, "b", s)
        s.close()

    threads = [threading.Thread(target=f, daemon=True)
               for f in (slowloris, keepalive_then_trickle, keepalive_idle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    print(results)
    assert not any(t.is_alive() for t in threads), results
    # One header byte a second is closed at the deadline (plus the reaper's
    # quarter second and a second of scheduling), not before 8 s.
    assert results.get("slowloris") is not None, results
    assert 8.0 <= results["slowloris"] <= HEADER_DEADLINE_S + 3, results
    assert results.get("idle for 4 s") is None, results
    assert results.get("second request trickled") is not None, results
    assert results["second request trickled"] <= HEADER_DEADLINE_S + 3, results
    assert results.get("idle for 14 s") is None, results
    assert results.get("next request after idling") == 200, results


@pytest.mark.timeout_s(180)
def test_api_load_on_every_node_at_once(cluster):
    """Key API requests wait for other nodes' shards; those shard requests
    must never queue behind key API requests on the other node, or two nodes
    full of PUTs wait for each other until the timeout (a pool of workers
    shared by both kinds did: PUTs failed with ETIMEDOUT after timeout_ms)."""
    import http.client
    from test_cluster import SECRET

    per_node = 48
    errors, lock = [], threading.Lock()
    go = threading.Barrier(per_node * 3)

    def putter(node, i):
        body = ("%s-%d " % (node, i)).encode() * 50
        go.wait()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", cluster.ports[node], timeout=60)
            for j in range(4):
                path = "/v1/kv/load/%s-%d-%d" % (node, i, j)
                conn.request("PUT", path, body=body, headers={"Authorization": "Bearer " + SECRET})
                r = conn.getresponse()
                r.read()
                if r.status != 201:
                    with lock:
                        errors.append((path, r.status))
            conn.close()
        except OSError as e:
            with lock:
                errors.append((node, i, repr(e)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=putter, args=(n, i), daemon=True)
               for n in ("a", "b", "c") for i in range(per_node)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    took = time.monotonic() - t0
    print("%d PUTs from %d clients on 3 nodes at once: %.1f s, %d errors"
          % (len(threads) * 4, len(threads), took, len(errors)))
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:10]
    names = os.listdir(cluster.p("b", "load"))
    assert len(names) == len(threads) * 4
    assert read_file(cluster.p("c", "load", "a-7-3")) == b"a-7 " * 50
