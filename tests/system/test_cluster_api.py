"""The key API (/v1/kv), the CLI that wraps it (get/put/rm/ls/status/bench),
malformed and unauthenticated requests, and redirects after an owner change,
all on the 3-node cluster of test_cluster.py (same fixture).

The API is reached three ways: curl with the bearer secret (what a user
types), http.client with a request signed like a node signs (to send exactly
the bytes a test wants), and the shardfs CLI.
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHARDFS_BIN, read_file, run, wait_for, write_file
from test_cluster import NODES, SECRET, cluster, gone_within_name_cache  # noqa: F401

BEARER = "Authorization: Bearer " + SECRET


def url(c, node, path=""):
    return "http://127.0.0.1:%d/v1/kv%s" % (c.ports[node], path)


def curl(*args, check=True, input=None):
    """curl -s; returns (status, body bytes)."""
    r = subprocess.run(["curl", "-s", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"]
                       + list(args), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=90)
    body, _, code = r.stdout.rpartition(b"\n")
    if check:
        assert r.returncode == 0, r.stderr
    return int(code or 0), body


def put(c, node, path, data):
    """PUT data at path through node's API with curl; returns the status."""
    return curl("-X", "PUT", "-H", BEARER, "--data-binary", "@-", url(c, node, path),
                input=data)[0]


def poly1305(key, msg):
    """Poly1305 of msg under the 32-byte one-time key (RFC 8439, 2.5)."""
    r = int.from_bytes(key[:16], "little") & 0x0ffffffc0ffffffc0ffffffc0fffffff
    s, p, acc = int.from_bytes(key[16:32], "little"), (1 << 130) - 5, 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i:i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) % (1 << 128)).to_bytes(16, "little")


def test_poly1305_is_rfc8439s():
    """The helper below signs with this: RFC 8439's own vector (2.5.2)."""
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    assert poly1305(key, b"Cryptographic Forum Research Group").hex() == \
        "a8061dc1305136c6c22b8baf0c0127a9"


def body_tag(body, nonce):
    """X-Shardfs-Digest of body for a request with nonce (wire.h)."""
    key = hmac.new(SECRET.encode(), b"shardfs-v3-body\n" + nonce.encode(), hashlib.sha256)
    return poly1305(key.digest(), body).hex()


def sign_headers(c, node, method, raw_path, body=b"", date=None, nonce=None, epoch="1",
                 for_node=None):
    """The headers of a request signed as shard_remote.c signs it (wire.h):
    for the URL of node for_node (default: node, where it is sent), with a
    fresh random nonce unless one is given. Content-Length is the sender's."""
    date = int(time.time()) if date is None else date
    nonce = os.urandom(16).hex() if nonce is None else nonce
    digest = body_tag(body, nonce)
    node_url = "http://127.0.0.1:%d" % c.ports[for_node or node]
    msg = b"\n".join([b"shardfs-v3", method.encode(), node_url.encode(),
                      raw_path.encode("latin-1"), epoch.encode(), str(date).encode(),
                      nonce.encode(), str(len(body)).encode(), digest.encode()])
    auth = hmac.new(SECRET.encode(), msg, hashlib.sha256).hexdigest()
    return {"X-Shardfs-Date": str(date), "X-Shardfs-Nonce": nonce, "X-Shardfs-Digest": digest,
            "X-Shardfs-Auth": auth, "X-Shardfs-Epoch": epoch}


def send_raw(c, node, method, raw_path, headers, body=b""):
    """Send exactly these headers and body (with its Content-Length) to node;
    raw_path goes on the wire as it is. Returns (status, headers dict, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", c.ports[node], timeout=20)
    try:
        conn.putrequest(method, raw_path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def signed(c, node, method, raw_path, body=b"", headers=None, date=None):
    """One request signed like a node signs it, sent to node. Returns
    (status, headers dict, body)."""
    h = sign_headers(c, node, method, raw_path, body, date=date)
    h.update(headers or {})
    return send_raw(c, node, method, raw_path, h, body)


def cli(c, *args, input=None, check=True):
    r = subprocess.run([SHARDFS_BIN] + [args[0], "-c", c.conf] + list(args[1:]), input=input,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if check:
        assert r.returncode == 0, (args, r.returncode, r.stderr)
    return r


# ---------------------------------------------------------------------------


@pytest.mark.timeout_s(120)
def test_curl_get_matches_cat_on_every_node(cluster):
    run(["rsync", "-a", "/usr/include/net/", cluster.p("a", "inc") + "/"], timeout=60)
    for f in os.listdir("/usr/include/net"):
        want = read_file(cluster.p("a", "inc", f))
        assert want == Path("/usr/include/net", f).read_bytes()
        for n in NODES:
            st, body = curl("-H", BEARER, url(cluster, n, "/inc/" + f))
            assert (st, body) == (200, want), (n, f, st)
    # HEAD: the headers of GET, no body.
    r = subprocess.run(["curl", "-sI", "-H", BEARER, url(cluster, "b", "/inc/if.h")],
                       stdout=subprocess.PIPE, timeout=30, check=True)
    head = r.stdout.decode()
    assert head.startswith("HTTP/1.1 200"), head
    assert re.search(r"(?im)^content-length: %d\r?$" % os.path.getsize("/usr/include/net/if.h"),
                     head), head
    assert re.search(r"(?im)^x-shardfs-type: file\r?$", head), head
    # A directory lists as JSON, sorted by name, with types.
    st, body = curl("-H", BEARER, url(cluster, "c", "/inc"))
    doc = json.loads(body)
    assert st == 200 and doc["path"] == "/inc"
    assert [e["name"] for e in doc["entries"]] == sorted(os.listdir("/usr/include/net"))
    assert all(e["type"] == "file" for e in doc["entries"])
    st, body = curl("-H", BEARER, url(cluster, "b", "/"))
    assert {"name": "inc", "type": "dir"} in json.loads(body)["entries"]


def test_put_delete_and_errors_seen_by_mounts(cluster):
    # PUT on b creates the parents; the file is there through every mount.
    assert put(cluster, "b", "/p/q/one", b"x") == 201
    data = os.urandom(300000) + b"\0\n\xff"
    Path(cluster.top, "blob").write_bytes(data)
    st, _ = curl("-H", BEARER, "-T", os.path.join(cluster.top, "blob"),
                 url(cluster, "b", "/p/q/blob"))
    assert st == 201
    for n in NODES:
        assert read_file(cluster.p(n, "p", "q", "blob")) == data
    # Replacing keeps the mode, answers 204, and readers see the new bytes.
    os.chmod(cluster.p("a", "p", "q", "blob"), 0o600)
    Path(cluster.top, "blob2").write_bytes(b"second version\n")
    st, _ = curl("-H", BEARER, "-T", os.path.join(cluster.top, "blob2"),
                 url(cluster, "c", "/p/q/blob"))
    assert st == 204
    assert read_file(cluster.p("a", "p", "q", "blob")) == b"second version\n"
    # A stat may lag another node's change by cache_timeout (1 s; DESIGN.md).
    wait_for(lambda: os.stat(cluster.p("b", "p", "q", "blob")).st_mode & 0o777 == 0o600, 3.0,
             "b to see the replaced file's mode")
    assert not [n for n in os.listdir(cluster.p("a", "p", "q")) if n.startswith(".")]
    # What a mount writes, the API reads (close-to-open).
    write_file(cluster.p("c", "p", "fromfs"), b"via the mount")
    assert curl("-H", BEARER, url(cluster, "a", "/p/fromfs")) == (200, b"via the mount")
    # A trailing slash makes a directory; again is fine; over a file is not.
    assert curl("-X", "PUT", "-H", BEARER, url(cluster, "a", "/p/d/"))[0] == 201
    assert curl("-X", "PUT", "-H", BEARER, url(cluster, "b", "/p/d/"))[0] == 204
    assert os.path.isdir(cluster.p("c", "p", "d"))
    st, body = curl("-X", "PUT", "-H", BEARER, url(cluster, "a", "/p/fromfs/"))
    assert st == 409, body
    # Errors: a file as a directory, a directory as a file, not empty, missing.
    assert curl("-H", BEARER, url(cluster, "a", "/p/fromfs/x"))[0] == 409   # ENOTDIR
    assert put(cluster, "a", "/p/d", b"") == 409  # EISDIR
    st, body = curl("-X", "DELETE", "-H", BEARER, url(cluster, "b", "/p/q"))
    assert st == 409 and b"not empty" in body.lower(), (st, body)
    assert curl("-H", BEARER, url(cluster, "c", "/p/nope"))[0] == 404
    assert curl("-X", "DELETE", "-H", BEARER, url(cluster, "c", "/p/nope"))[0] == 404
    assert curl("-X", "POST", "-H", BEARER, url(cluster, "c", "/p/fromfs"))[0] == 405
    # DELETE on c: gone through the mounts and the API.
    assert curl("-X", "DELETE", "-H", BEARER, url(cluster, "c", "/p/q/blob"))[0] == 204
    gone_within_name_cache(cluster.p("a", "p", "q", "blob"))
    assert curl("-H", BEARER, url(cluster, "b", "/p/q/blob"))[0] == 404
    assert curl("-X", "DELETE", "-H", BEARER, url(cluster, "a", "/p/d"))[0] == 204
    assert not os.path.exists(cluster.p("b", "p", "d"))


def test_get_follows_a_replaced_directory(cluster):
    """GETs remember the directories they walk through for at most
    cache_timeout (1 s here): after the directory is replaced through a
    mount, a GET finds the new one's file within that bound."""
    assert put(cluster, "a", "/rep/d/f", b"old") == 201
    assert curl("-H", BEARER, url(cluster, "b", "/rep/d/f")) == (200, b"old")
    os.rename(cluster.p("c", "rep", "d"), cluster.p("c", "rep", "d.old"))
    os.mkdir(cluster.p("c", "rep", "d"))
    write_file(cluster.p("c", "rep", "d", "f"), b"new")
    t0 = time.monotonic()
    wait_for(lambda: curl("-H", BEARER, url(cluster, "b", "/rep/d/f")) == (200, b"new"), 3.0,
             "GET to see the new directory")
    assert time.monotonic() - t0 < 2.0
    # A write through the API never goes by a remembered directory.
    assert put(cluster, "b", "/rep/d/g", b"g") == 201
    assert read_file(cluster.p("a", "rep", "d", "g")) == b"g"


def test_any_byte_in_names_and_big_values(cluster):
    name = "sp ace%25 ü\x01\x7f#?&"
    quoted = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "%%%02X" % b
                     for b in name.encode())
    assert put(cluster, "a", "/n/" + quoted, b"odd") == 201
    assert read_file(os.path.join(cluster.p("b", "n"), name)) == b"odd"
    doc = json.loads(curl("-H", BEARER, url(cluster, "c", "/n"))[1])
    assert doc["entries"] == [{"name": name, "type": "file"}]
    # A name that is not UTF-8 is listed in hex.
    raw = b"bad\xff\xfe"
    write_file(os.path.join(os.fsencode(cluster.p("a", "n")), raw), b"")
    doc = json.loads(curl("-H", BEARER, url(cluster, "b", "/n"))[1])
    assert {"name_hex": raw.hex(), "type": "file"} in doc["entries"]
    # A 48 MiB value streams in and out through a node that owns little of it.
    big = os.path.join(cluster.top, "big")
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 48)
    assert curl("-H", BEARER, "-T", big, url(cluster, "c", "/n/big"))[0] == 201
    out = os.path.join(cluster.top, "big.out")
    r = subprocess.run(["curl", "-sf", "-H", BEARER, "-o", out, url(cluster, "b", "/n/big")],
                       timeout=120)
    assert r.returncode == 0
    assert Path(out).read_bytes() == Path(big).read_bytes()
    assert read_file(cluster.p("a", "n", "big")) == Path(big).read_bytes()


def test_cli_get_put_rm_ls(cluster):
    a_url = "http://127.0.0.1:%d" % cluster.ports["a"]
    cli(cluster, "put", "--node", "b", "/cli/x/hello", input=b"hello\n")
    assert read_file(cluster.p("c", "cli", "x", "hello")) == b"hello\n"
    assert cli(cluster, "get", "--node", a_url, "/cli/x/hello").stdout == b"hello\n"
    src = os.path.join(cluster.top, "src.bin")
    Path(src).write_bytes(os.urandom(200000))
    cli(cluster, "put", "--node", "c", "cli/src.bin", src)
    assert cli(cluster, "get", "cli/src.bin").stdout == Path(src).read_bytes()
    cli(cluster, "put", "/cli/empty/")
    assert cli(cluster, "ls", "--node", "c", "/cli").stdout == b"empty/\nsrc.bin\nx/\n"
    r = cli(cluster, "rm", "/cli/x", check=False)
    assert r.returncode == 1 and b"Directory not empty" in r.stderr
    cli(cluster, "rm", "--node", "b", "/cli/x/hello")
    cli(cluster, "rm", "/cli/x")
    r = cli(cluster, "get", "/cli/x/hello", check=False)
    assert r.returncode == 1 and b"No such file or directory" in r.stderr
    r = cli(cluster, "ls", "/cli/src.bin", check=False)
    assert r.returncode == 1 and b"Not a directory" in r.stderr
    r = cli(cluster, "get", "--node", "zz", "/cli", check=False)
    assert r.returncode == 2 and b"unknown node 'zz'" in r.stderr
    r = cli(cluster, "get", "--node", "http://127.0.0.1:1", "/cli", check=False)
    assert r.returncode == 2 and b"unknown node" in r.stderr
    r = cli(cluster, "put", check=False)
    assert r.returncode == 2 and b"usage" in r.stderr
    # A client elsewhere: the nodes' data_dirs do not exist where it runs.
    away = os.path.join(cluster.top, "client-elsewhere.conf")
    Path(away).write_text(re.sub(r"(?m)^data_dir = .*$", "data_dir = /nonexistent/shardfs",
                                 Path(cluster.conf).read_text()))
    r = subprocess.run([SHARDFS_BIN, "get", "-c", away, "--node", "b", "/cli/src.bin"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0 and r.stdout == Path(src).read_bytes(), r.stderr
    # ... while a node started with it is refused, naming the directory.
    r = subprocess.run([SHARDFS_BIN, "serve", "-c", away, "-n", "a"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode != 0 and b"data_dir /nonexistent/shardfs: " in r.stderr, r.stderr


def test_status_and_bench(cluster):
    r = cli(cluster, "status")
    out = r.stdout.decode()
    for n in NODES:
        assert re.search(r"(?m)^%s\s+up\s+http://127.0.0.1:%d\s+[0-9.]+ ms$"
                         % (n, cluster.ports[n]), out), out
    shards = re.findall(r"(?m)^(\d+)\s+([abc])\s+(\d+)\s+(\d+)\s+(\d+)$", out)
    assert [(s, o) for s, o, *_ in shards] == [
        ("0", "a"), ("1", "a"), ("2", "a"), ("3", "b"), ("4", "b"), ("5", "b"), ("6", "c"),
        ("7", "c")], out
    assert int(shards[0][2]) >= 1  # the root lives on shard 0
    for route in ([], ["--any-node"]):
        r = cli(cluster, "bench", "-k", "400", "-s", "1024", "-C", "8", *route)
        out = r.stdout.decode()
        assert ("GETs to any node" in out) == bool(route), out
        for ph in ("PUT", "GET", "DELETE"):
            m = re.search(r"(?m)^%s\s+(\d+) ops .* ops/s p50 .* ms p99 .* ms errors (\d+)$" % ph,
                          out)
            assert m and m.group(1) == "400" and m.group(2) == "0", out
    assert os.listdir(cluster.p("b", "bench")) == []
    # A dead node shows as down (exit 1), its shards without figures.
    cluster.kill9("c")
    r = cli(cluster, "status", check=False)
    out = r.stdout.decode()
    assert r.returncode == 1
    assert re.search(r"(?m)^c\s+down\s", out) and re.search(r"(?m)^a\s+up\s", out), out
    assert re.search(r"(?m)^7\s+c\s+-\s+-\s+-", out), out
    # bench against a cluster with a dead node: the requests to c (and to
    # c's shards) fail, are counted, and the exit status says so
    r = cli(cluster, "bench", "-k", "60", "-s", "100", "-C", "4", check=False)
    out = r.stdout.decode()
    assert r.returncode == 1, out
    m = re.search(r"(?m)^PUT\s+60 ops .* errors (\d+)$", out)
    assert m and int(m.group(1)) >= 20, out  # a third go to c itself
    cluster.start("c")


def test_unauthenticated_and_malformed_requests(cluster):
    # No secret, a wrong one, a signature over something else: 401, no change.
    assert curl("-X", "PUT", "--data-binary", "x", url(cluster, "a", "/auth/x"))[0] == 401
    assert curl("-H", "Authorization: Bearer wrong-secret-wrong-secret",
                url(cluster, "a", "/auth/x"))[0] == 401
    assert curl("-H", "Authorization: Basic " + SECRET, url(cluster, "a", "/"))[0] == 401
    assert not os.path.exists(cluster.p("a", "auth"))
    st, _, _ = signed(cluster, "b", "PUT", "/v1/kv/auth/x", b"x", date=int(time.time()) - 3600)
    assert st == 401
    # The bearer secret opens only the key API, not the shard routes.
    assert curl("-H", BEARER, "http://127.0.0.1:%d/v1/shard/0/stat" % cluster.ports["a"])[0] == 401
    # Malformed, but signed: 400 (or 404/405/414), never a crash.
    for method, path, want in [
            ("GET", "/v1/kv/a/../b", 400),
            ("GET", "/v1/kv/./x", 400),
            ("GET", "/v1/kv/" + "n" * 256, 414),
            ("GET", "/v1/shard/abc/get", 400),
            ("GET", "/v1/shard/99999/stat", 400),
            ("GET", "/v1/shard/0/frobnicate", 400),
            ("POST", "/v1/shard/0/get", 400),           # no key
            ("GET", "/v1/shard/0/get", 405),
            ("POST", "/v1/shard/0/scan", 400),          # empty scan body
            ("DELETE", "/v1/shard/0/stat", 405),
            ("PATCH", "/v1/kv/x", 405),
            ("GET", "/v1/nothing", 404)]:
        st, h, body = signed(cluster, "a", method, path)
        assert st == want, (method, path, st, body)
    st, _, _ = signed(cluster, "b", "POST", "/v1/shard/3/apply", b"\xff" * 1000)
    assert st == 400
    # Everything still works afterwards.
    write_file(cluster.p("a", "after"), b"fine")
    assert curl("-H", BEARER, url(cluster, "c", "/after")) == (200, b"fine")


def test_nul_and_dot_names_after_decoding_are_refused(cluster):
    """A %00 anywhere in a key API path is 400 and creates nothing (it used to
    cut the name short: nul%00tail made "nul", nul2%00/../../x made
    "trav/nul2"); "." and ".." are refused also when percent-encoded; a name
    of 256 bytes after decoding is 414."""
    os.mkdir(cluster.p("a", "trav"))
    for path in ["/trav/nul%00tail", "/trav/nul2%00/../../x", "/trav/%00", "/trav/%00/y",
                 "/%00trav/z", "/trav/d%00/", "/trav/a%00b/c"]:
        for method in ("PUT", "GET", "DELETE"):
            st, body = curl("--path-as-is", "-X", method, "-H", BEARER, "--data-binary", "x",
                            url(cluster, "a", path))
            assert st == 400 and b"NUL" in body, (method, path, st, body)
        st, _, body = signed(cluster, "b", "PUT", "/v1/kv" + path, b"y")
        assert st == 400, (path, st, body)
    for path in ["/trav/%2e%2e/x", "/trav/%2E", "/trav/.%2e/trav/x", "/%2e%2e", "/trav/%2e%2e/"]:
        st, body = curl("--path-as-is", "-X", "PUT", "-H", BEARER, "--data-binary", "x",
                        url(cluster, "a", path))
        assert st == 400 and b"'..'" in body, (path, st, body)
    assert curl("-X", "PUT", "-H", BEARER, "--data-binary", "x",
                url(cluster, "a", "/trav/" + "%6E" * 256))[0] == 414
    assert sorted(os.listdir(cluster.p("b", "trav"))) == []
    assert curl("-H", BEARER, url(cluster, "c", "/trav/nul"))[0] == 404
    assert not os.path.exists(cluster.p("c", "x"))
    # Escapes that decode to allowed bytes still work, with the name whole.
    assert put(cluster, "a", "/trav/%6Eul%20tail", b"ok") == 201
    assert os.listdir(cluster.p("b", "trav")) == ["nul tail"]


@pytest.mark.timeout_s(150)
def test_redirect_after_owner_change(cluster):
    """Shard 7 moves from c to b (its LMDB directory is carried over, as
    resharding will do online later) and b and c restart with an epoch-2
    config; a keeps running with epoch 1, so its requests for shard 7 go to
    c, which redirects them to b. Everything stays readable and writable
    through a, and what a writes, b and c see."""
    files = {"r/f%03d" % i: os.urandom(100 + 5000 * (i % 4)) for i in range(64)}
    os.makedirs(cluster.p("a", "r"))
    for name, data in files.items():
        write_file(cluster.p("a", name), data)
    for n in ("b", "c"):
        cluster._stop(n)
    shutil.move(os.path.join(cluster.data["c"], "shard-7"),
                os.path.join(cluster.data["b"], "shard-7"))
    text = Path(cluster.conf).read_text()
    text = text.replace("epoch = 1", "epoch = 2")
    text = re.sub(r"(\[node b\][^\[]*shards = )3-5", r"\g<1>3-5,7", text)
    text = re.sub(r"(\[node c\][^\[]*shards = )6-7", r"\g<1>6", text)
    conf2 = os.path.join(cluster.top, "shards2.conf")
    Path(conf2).write_text(text)
    conf1, cluster.conf = cluster.conf, conf2
    for n in ("b", "c"):
        cluster.start(n)
    # a (epoch 1) reads every file, shard 7's through c's redirect to b.
    for name, data in files.items():
        assert read_file(cluster.p("a", name)) == data, name
    # c no longer has shard 7: a request for it is redirected with epoch 2.
    st, h, _ = signed(cluster, "c", "GET", "/v1/shard/7/stat")
    assert st == 307, st
    assert h["Location"] == "http://127.0.0.1:%d/v1/shard/7/stat" % cluster.ports["b"], h
    assert h["X-Shardfs-Epoch"] == "2"
    # Writes through a land where b and c read them.
    for i in range(32):
        write_file(cluster.p("a", "r", "new%02d" % i), b"n%d" % i)
    for n in ("b", "c"):
        for i in range(32):
            assert read_file(cluster.p(n, "r", "new%02d" % i)) == b"n%d" % i
    # a restarts with the new config for the fsck at teardown.
    cluster._stop("a")
    cluster.start("a")
    assert sorted(os.listdir(cluster.p("a", "r"))) == sorted(
        [n.split("/")[1] for n in files] + ["new%02d" % i for i in range(32)])
    assert conf1 != cluster.conf


def test_shard_header_names_the_owner(cluster):
    """GET, HEAD and PUT of a name say which shard holds its entry
    (X-Shardfs-Shard); its owner answers a GET of a file made there without
    asking any other node (shardfs bench sends its GETs there)."""
    import http.client
    from test_cluster import OWNERS

    def owner_of(shard):
        for n, rng in OWNERS.items():
            lo, hi = (int(x) for x in rng.split("-"))
            if lo <= shard <= hi:
                return n
        raise AssertionError(shard)

    def request(node, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", cluster.ports[node], timeout=20)
        try:
            conn.request(method, "/v1/kv" + path, body=body,
                         headers={"Authorization": "Bearer " + SECRET})
            r = conn.getresponse()
            return r.status, r.getheader("X-Shardfs-Shard"), r.read()
        finally:
            conn.close()

    owned = {}
    for i in range(40):
        path = "/owned-%d" % i
        st, shard, _ = request("a", "PUT", path, b"owned %d\n" % i)
        assert st == 201 and shard is not None and 0 <= int(shard) < 8, (st, shard)
        for n in NODES:
            for method in ("GET", "HEAD"):
                st2, shard2, body = request(n, method, path)
                assert (st2, shard2) == (200, shard), (n, method, st2, shard2)
        owned.setdefault(owner_of(int(shard)), path)
        if "c" in owned:
            break
    assert "c" in owned, owned
    # A file in the root: its entry and its inode are all a GET reads. With
    # a and b dead, c still serves one it owns.
    cluster.kill9("a")
    cluster.kill9("b")
    st, _, body = request("c", "GET", owned["c"])
    assert (st, body) == (200, b"owned %s\n" % owned["c"].split("-")[1].encode()), (st, body)
    cluster.start("a")
    cluster.start("b")
