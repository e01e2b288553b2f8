#!/usr/bin/python3
"""Write the seed corpus of tests/fuzz/fuzz_request.c into tests/fuzz/corpus/.

One file per seed, named for what it is; the input format is described at the
top of fuzz_request.c. Run it again after changing that format.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")

SIGN = 1    # flags: signed (date, nonce, digest, length and auth)
EPOCH = 2   # flags: X-Shardfs-Epoch: 3
REPLAY = 4  # flags: with SIGN, the nonce of the last signed request
BADSUM = 8  # flags: with SIGN, the digest of another body
PUT, DEL, DEL_RANGE, ASSERT_ABSENT, ASSERT_VALUE = 1, 2, 3, 4, 5


def lv(b):
    return struct.pack("<I", len(b)) + b


def batch(*ops):
    out = b""
    for op, key, *val in ops:
        out += bytes([op]) + lv(key)
        if op in (PUT, DEL_RANGE, ASSERT_VALUE):
            out += lv(val[0])
    return out


def scan_req(start, end=None):
    return lv(start) + (lv(end) if end is not None else b"\xff\xff\xff\xff")


def request(flags, head, body=b""):
    head = head.encode()
    return bytes([flags]) + struct.pack("<H", len(head)) + head + struct.pack("<H", len(body)) + body


def requests(*reqs):
    return b"\xff" + b"".join(reqs)


def getv_req(*reads):
    """reads: (key, link, buflen)"""
    return b"".join(lv(k) + struct.pack("<II", link, buflen) for k, link, buflen in reads)


def getv_reply(*reads):
    """reads: (errno, vlen, value)"""
    return b"".join(struct.pack("<III", e, vlen, len(v)) + v for e, vlen, v in reads)


B = batch((PUT, b"k1", b"v1"), (PUT, b"k\x00\xff", b"\x00" * 8), (ASSERT_ABSENT, b"new"),
          (ASSERT_VALUE, b"k1", b"v1"), (DEL, b"gone"), (DEL_RANGE, b"a", b"b"))
SEEDS = {
    "batch": b"\x00" + B,
    "scan-request": b"\x01" + scan_req(b"a", b"z"),
    "scan-request-open": b"\x01" + scan_req(b""),
    "scan-reply": b"\x02" + lv(b"k1") + lv(b"v1") + lv(b"k2") + lv(b""),
    "shard-path": b"\x03/v1/shard/0/scan",
    "getv-request": b"\x04" + getv_req((b"E\x00dir", 0, 64), (b"I", 4, 64), (b"k1", 0, 0)),
    "getv-reply": b"\x05" + getv_reply((0, 6, b"I\x01\x02\x03\x04x"), (2, 0, b""), (0, 2, b"ab")),
    "getv": requests(
        request(SIGN | EPOCH, "POST /v1/shard/0/apply", batch((PUT, b"E1", b"ptr1"),
                                                              (PUT, b"Iptr1", b"target"))),
        request(SIGN | EPOCH, "POST /v1/shard/0/getv",
                getv_req((b"E1", 0, 64), (b"I", 4, 64), (b"nothing", 0, 8), (b"X", 2, 8))),
        request(SIGN | EPOCH, "POST /v1/shard/0/getv", getv_req((b"I", 4, 64))),
        request(SIGN | EPOCH, "POST /v1/shard/0/getv", b"\x01\x00")),
    "put-get-scan": requests(
        request(SIGN | EPOCH, "POST /v1/shard/0/apply", B),
        request(SIGN | EPOCH, "POST /v1/shard/0/get?off=1&len=4", b"k1"),
        request(SIGN | EPOCH, "POST /v1/shard/0/scan?limit=2", scan_req(b"", b"zz")),
        request(SIGN | EPOCH, "POST /v1/shard/0/apply", batch((ASSERT_ABSENT, b"k1"))),
        request(SIGN | EPOCH, "POST /v1/shard/0/apply", batch((ASSERT_VALUE, b"k1", b"no")))),
    "stat-sync-config": requests(
        request(SIGN | EPOCH, "GET /v1/shard/0/stat"),
        request(SIGN | EPOCH, "POST /v1/shard/0/sync"),
        request(SIGN, "GET /v1/config"),
        request(SIGN, "POST /v1/config")),
    "redirects": requests(
        request(SIGN | EPOCH, "POST /v1/shard/1/get", b"k"),
        request(SIGN, "POST /v1/shard/0/get\nX-Shardfs-Epoch: 2", b"k"),
        request(SIGN, "POST /v1/shard/0/get\nX-Shardfs-Epoch: 4", b"k"),
        request(SIGN | EPOCH, "GET /v1/shard/0/get", b"k"),
        request(SIGN | EPOCH, "POST /v1/shard/7/get", b"k")),
    "other-paths": requests(
        request(SIGN, "PUT /v1/kv/a?q=1\nX-Test: yes", b"body"),
        request(SIGN, "GET /err"),
        request(SIGN, "GET /status/42"),
        request(SIGN, "PUT /v1/kv/nul%00tail", b"x"),
        request(SIGN, "GET /v1/kv/trav/nul2%00/../../x"),
        request(SIGN, "DELETE /v1/kv/%2e%2e/a%2Fb%zz%4")),
    "kv": requests(
        request(SIGN, "PUT /v1/kv/dir/a", b"hello"),
        request(SIGN, "PUT /v1/kv/dir/sub/"),
        request(SIGN, "PUT /v1/kv/dir/%C3%A9t%C3%A9%20x", b"\x00\xff"),
        request(SIGN, "GET /v1/kv/dir"),
        request(SIGN, "HEAD /v1/kv/dir/a"),
        request(SIGN, "GET /v1/kv/dir/a"),
        request(SIGN, "DELETE /v1/kv/dir"),
        request(SIGN, "GET /v1/nodes")),
    "kv-replace": requests(
        request(SIGN, "PUT /v1/kv/f", b"one"),
        request(SIGN, "PUT /v1/kv/f", b""),
        request(SIGN, "PUT /v1/kv/f/", b""),
        request(SIGN, "DELETE /v1/kv/f"),
        request(SIGN, "PUT /v1/kv/f/g", b"two"),
        request(SIGN, "GET /v1/kv/"),
        request(SIGN, "POST /v1/kv/f"),
        request(0, "PUT /v1/kv/x\nAuthorization: Bearer " + "fuzz-secret-0123456789", b"b")),
    "unsigned": requests(
        request(EPOCH, "POST /v1/shard/0/apply", B),
        request(EPOCH, "POST /v1/shard/0/get\nX-Shardfs-Date: 1700000000\n"
                "X-Shardfs-Nonce: 000102030405060708090a0b0c0d0e0f\n"
                "X-Shardfs-Digest: " + "0" * 32 + "\nContent-Length: 2\n"
                "X-Shardfs-Auth: 0000000000000000000000000000000000000000000000000000000000000000",
                b"k1"),
        request(EPOCH | 0x90 | SIGN, "POST /v1/shard/0/get", b"k1")),
    "replay": requests(
        request(SIGN | EPOCH, "POST /v1/shard/0/apply", B),
        request(SIGN | EPOCH | REPLAY, "POST /v1/shard/0/apply", B),
        request(SIGN | EPOCH | REPLAY, "POST /v1/shard/0/get", b"k1"),
        request(SIGN | EPOCH | BADSUM, "POST /v1/shard/0/apply", B),
        request(SIGN | BADSUM, "GET /v1/config"),
        request(SIGN | REPLAY, "PUT /v1/kv/a", b"x")),
    "precheck": requests(
        request(SIGN | EPOCH, "POST /v1/shard/0/apply\nContent-Length: 67112961"),
        request(SIGN | EPOCH, "POST /v1/shard/0/apply\nTransfer-Encoding: chunked", B),
        request(EPOCH, "POST /v1/shard/0/apply\nContent-Length: 2000000")),
}

os.makedirs(OUT, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
