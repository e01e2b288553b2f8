"""Bad shards.conf files: `shardfs mount` must refuse before mounting and say
FILE:LINE: reason on stderr (FILE as given on the command line)."""

import os
import re

import pytest

from conftest import (SHARDFS_BIN, free_port, fuse_unmount, is_mounted, read_file,
                      run, write_conf, write_file)

GOOD = """\
[cluster]
shards = 4
epoch = 1
commit_interval_ms = 20
cache_timeout = 0

[node local]
url = http://127.0.0.1:{port}
data_dir = {data_dir}
shards = all
"""
# line numbers in GOOD:   2 = cluster shards, 3 = epoch, 8 = url, 9 = data_dir


def _conf(top, text):
    conf = os.path.join(top, "shards.conf")
    with open(conf, "w") as f:
        f.write(text)
    os.makedirs(os.path.join(top, "mnt"), exist_ok=True)
    os.makedirs(os.path.join(top, "data"), exist_ok=True)
    return conf


def _replace_line(text, lineno, new):
    lines = text.splitlines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


def _insert_line(text, lineno, new):
    lines = text.splitlines()
    lines.insert(lineno - 1, new)
    return "\n".join(lines) + "\n"


def _mount_must_fail(conf, mnt, *, foreground=False, cwd=None, user=None):
    """Run `shardfs mount`; it must exit non-zero without mounting. Returns stderr."""
    args = [SHARDFS_BIN, "mount", "-c", conf] + (["-f"] if foreground else []) + \
        ["-o", "allow_other", mnt]
    try:
        r = run(args, check=False, timeout=30, cwd=cwd, user=user)
    finally:
        mounted = is_mounted(os.path.join(cwd or "", mnt))
        if mounted:
            fuse_unmount(os.path.join(cwd or "", mnt))
    assert not mounted, "a bad config got mounted"
    assert r.returncode != 0, "mount with a bad config exited 0"
    assert r.stderr.strip(), "no message on stderr"
    return r.stderr


def _assert_located(stderr, conf, lines, reason):
    """stderr names conf and one of lines (None = any/no line) and matches reason."""
    if lines is None:
        pat = re.escape(conf) + r":(\d+:)?"
    else:
        pat = re.escape(conf) + r":(%s):" % "|".join(str(l) for l in lines)
    m = re.search(r"(^|\s)" + pat + r"\s*(.*)", stderr, re.M)
    assert m, "expected %s:%s: in stderr:\n%s" % (conf, lines or "LINE", stderr)
    assert re.search(reason, stderr, re.I), "reason /%s/ not in stderr:\n%s" % (reason, stderr)


# (id, edit(text) -> text, expected line numbers or None, reason regex)
CASES = [
    ("shards_not_power_of_two",
     lambda t: _replace_line(t, 2, "shards = 6"), [2], r"power of (two|2)|\b6\b"),
    ("shards_zero",
     lambda t: _replace_line(t, 2, "shards = 0"), [2], r"shards|\b0\b"),
    ("shards_not_a_number",
     lambda t: _replace_line(t, 2, "shards = four"), [2], r"shards|four|number|integer"),
    ("unknown_key_in_cluster",
     lambda t: _insert_line(t, 4, "colour = blue"), [4], r"colour"),
    ("unknown_key_in_node",
     lambda t: _insert_line(t, 10, "colour = blue"), [10], r"colour"),
    # inih reports keys, so the error may name the section line or its first key
    ("unknown_section",
     lambda t: t + "\n[weird]\nkey = 1\n", [12, 13], r"weird"),
    ("epoch_zero",
     lambda t: _replace_line(t, 3, "epoch = 0"), [3], r"epoch"),
    ("data_dir_is_a_file",
     lambda t: _replace_line(t, 9, "data_dir = ./afile"), None, r"director|afile"),
    ("data_dir_under_a_file",
     lambda t: _replace_line(t, 9, "data_dir = ./afile/sub"), None, r"director|afile"),
    # this node's own url: checked at load, so the message has the line
    ("own_url_port_too_big",
     lambda t: _replace_line(t, 8, "url = http://127.0.0.1:99999999"), [8],
     r"bad url.*port is not a number from 1 to 65535"),
    ("own_url_port_not_a_number",
     lambda t: _replace_line(t, 8, "url = http://127.0.0.1:notaport"), [8],
     r"bad url.*port is not a number"),
    ("own_url_with_a_path",
     lambda t: _replace_line(t, 8, "url = http://127.0.0.1:7070/x"), [8],
     r"bad url.*nothing may follow"),
    # replication (issue 10)
    ("ack_neither_primary_nor_replica",
     lambda t: _insert_line(t, 4, "ack = all"), [4], r"bad ack 'all'"),
    ("etcd_url_without_scheme",
     lambda t: _insert_line(t, 4, "etcd = 127.0.0.1:2379"), [4], r"etcd: bad url"),
    ("etcd_list_with_an_empty_url",
     lambda t: _insert_line(t, 4, "etcd = http://127.0.0.1:2379,,http://127.0.0.1:2380"), [4],
     r"etcd.*empty url"),
    ("replica_lag_not_below_timeout",
     lambda t: _insert_line(t, 4, "replica_lag_ms = 5000"), [4],
     r"replica_lag_ms = 5000 must be less than timeout_ms = 5000"),
    ("lease_ttl_too_short",
     lambda t: _insert_line(t, 4, "lease_ttl_ms = 500"), [4], r"bad lease_ttl_ms"),
    ("replica_on_the_owner",
     lambda t: _insert_line(t, 11, "replicas = 1"), [11], r"shard 1 is owned by node 'local' itself"),
    ("replica_out_of_range",
     lambda t: _insert_line(t, 11, "replicas = 7"), [11], r"replicas: shard 7 is out of range 0-3"),
]

# Two nodes; this mount is node a, so node b's url is only ever called.
TWO_NODES = """\
[cluster]
shards = 4
secret = 0123456789abcdef0123
cache_timeout = 0

[node a]
url = http://127.0.0.1:{port}
data_dir = ./data
shards = 0-1

[node b]
url = {url_b}
data_dir = ./data-b
shards = 2-3
"""
# line numbers in TWO_NODES: 7 = a's url, 12 = b's url


@pytest.mark.parametrize("url_b,reason", [
    ("http://127.0.0.1:99999999", r"bad url.*port is not a number from 1 to 65535"),
    ("http://127.0.0.1:notaport", r"bad url.*port is not a number"),
    ("http://127.0.0.1:0", r"bad url.*port is not a number"),
    ("http://127.0.0.1", r"bad url.*no :PORT"),
    ("http://user@127.0.0.1:7071", r"bad url.*'@' in the host"),
    ("gopher://127.0.0.1:7071", r"bad url.*want http://HOST:PORT"),
    ("http://127.0.0.1:{port}/", r"nodes a and b cannot have the same host and port"),
], ids=["port_too_big", "port_not_a_number", "port_zero", "no_port", "userinfo", "scheme",
        "same_as_node_a"])
def test_bad_url_of_another_node_refused(url_b, reason, tmp_top):
    port = free_port()
    conf = _conf(tmp_top, TWO_NODES.format(port=port, url_b=url_b.format(port=port)))
    mnt = os.path.join(tmp_top, "mnt")
    args = [SHARDFS_BIN, "mount", "-c", conf, "--node", "a", "-o", "allow_other", mnt]
    try:
        r = run(args, check=False, timeout=30)
    finally:
        mounted = is_mounted(mnt)
        if mounted:
            fuse_unmount(mnt)
    assert not mounted, "a bad config got mounted"
    assert r.returncode != 0
    _assert_located(r.stderr, conf, [12], reason)
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_refused(case, tmp_top):
    _, edit, lines, reason = case
    text = edit(GOOD.format(port=free_port(), data_dir="./data"))
    conf = _conf(tmp_top, text)
    write_file(os.path.join(tmp_top, "afile"), "not a directory\n")
    mnt = os.path.join(tmp_top, "mnt")
    stderr = _mount_must_fail(conf, mnt)
    _assert_located(stderr, conf, lines, reason)
    assert os.listdir(mnt) == []


def test_bad_config_refused_in_foreground_too(tmp_top):
    conf = _conf(tmp_top, _replace_line(GOOD.format(port=free_port(), data_dir="./data"),
                                        2, "shards = 6"))
    stderr = _mount_must_fail(conf, os.path.join(tmp_top, "mnt"), foreground=True)
    _assert_located(stderr, conf, [2], r"power of (two|2)|\b6\b")


def test_config_error_names_the_path_as_given(tmp_top):
    _conf(tmp_top, _insert_line(GOOD.format(port=free_port(), data_dir="./data"),
                                5, "bogus_key = 1"))
    stderr = _mount_must_fail("shards.conf", "mnt", cwd=tmp_top)
    assert re.search(r"(^|\s)shards\.conf:5:", stderr, re.M), stderr
    assert "bogus_key" in stderr


def test_missing_config_file_refused(tmp_top):
    os.makedirs(os.path.join(tmp_top, "mnt"))
    conf = os.path.join(tmp_top, "nope.conf")
    stderr = _mount_must_fail(conf, os.path.join(tmp_top, "mnt"))
    assert conf in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as uid 65534")
def test_unreadable_data_dir_refused(tmp_top):
    # As uid 65534: a data_dir it cannot enter. The conf itself is readable.
    conf = _conf(tmp_top, GOOD.format(port=free_port(), data_dir="./data"))
    os.chmod(conf, 0o644)
    os.chmod(os.path.join(tmp_top, "data"), 0o700)
    stderr = _mount_must_fail(conf, os.path.join(tmp_top, "mnt"), user="nobody")
    _assert_located(stderr, conf, None, r"permission|access|readable|writable")


def test_shard_count_change_refused(fs):
    write_file(fs.path("f"), "written with 4 shards\n")
    fs.unmount()
    write_conf(fs.conf, shards=8)
    stderr = _mount_must_fail(fs.conf, fs.mnt)
    _assert_located(stderr, fs.conf, None, r"shard")
    assert re.search(r"\b4\b", stderr) and re.search(r"\b8\b", stderr), \
        "message should give both shard counts:\n" + stderr
    r = fs.fsck()                                      # fsck refuses the mismatch too
    assert r.returncode != 0, "fsck accepted a conf whose shard count differs from the data"
    write_conf(fs.conf, shards=4)                      # back to 4: nothing was damaged
    fs.start()
    assert read_file(fs.path("f")) == b"written with 4 shards\n"
