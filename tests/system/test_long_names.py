"""Names at their limits in every operation that takes one (issue 8).

A name is 1..255 bytes (256 is ENAMETOOLONG), a symlink target up to 4095
(4096 is ENAMETOOLONG), an xattr name up to 255 bytes in all ("user." + 250;
the kernel answers ERANGE above) and its value up to 64 KiB (E2BIG above).
A cross-shard rename writes an intent record holding both names, so the
rename tests pick names whose entries land on different shards (`shardfs
where`, offline) and use 255 bytes on both sides: the intent is then at its
largest. It once overflowed a 512-byte buffer and killed the daemon
(test_issue8_mv_two_long_names_across_shards is the issue's reproducer).

After each step the bytes and the names are checked, and that the daemon is
still there; the fixture's teardown fscks the store and fails on sanitizer
reports in the daemon's stderr.
"""

import errno
import json
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request

from conftest import RENAME_EXCHANGE, RENAME_NOREPLACE, assert_errno, read_file, renameat2, \
    run, write_file

NAME_MAX = 255
TARGET_MAX = 4095        # PATH_MAX - 1
XATTR_NAME_MAX = 255     # the whole "user.xxx" name
XATTR_SIZE_MAX = 65536


def long_name(fill, tail="", n=NAME_MAX):
    """n bytes: fill repeated, ending in tail."""
    return fill * (n - len(tail)) + tail


def alive(fs):
    assert fs.proc is not None and fs.proc.poll() is None, \
        "the daemon died:\n" + fs.read_stderr()[-4000:]
    os.stat(fs.mnt)                     # and the mount answers


WHERE_ENTRY = re.compile(r"^entry shard (\d+)\b", re.M)


def entry_shards(fs, rels):
    """{rel: shard of rel's directory entry}, asked of `shardfs where` with
    the store unmounted; the mount is back when this returns."""
    fs.unmount()
    out = {}
    for rel in rels:
        r = fs.cmd("where", "-c", fs.conf, "/" + rel, check=True, timeout=60)
        m = WHERE_ENTRY.search(r.stdout)
        assert m, "where /%s printed:\n%s" % (rel, r.stdout)
        out[rel] = int(m.group(1))
    fs.start()
    return out


def pairs_apart(shards, srcs, dsts, count):
    """count (src, dst) pairs, no name used twice, each on two shards."""
    got, used = [], set()
    for s in srcs:
        for d in dsts:
            if s in used or d in used or shards[s] == shards[d]:
                continue
            got.append((s, d))
            used |= {s, d}
            break
    assert len(got) >= count, "only %d of %d pairs on different shards: %r" % (
        len(got), count, shards)
    return got[:count]


def test_issue8_mv_two_long_names_across_shards(fs):
    """The issue's reproducer: mv d1/<250 x 'a'> d2/<250 x 'b'>, with d1/a and
    d2/b on different shards (eight tries/k/{d1,d2} pairs, every one moved;
    `where` says which cross)."""
    a, b = "a" * 250, "b" * 250
    for k in range(8):
        top = fs.path("tries", str(k))
        os.makedirs(os.path.join(top, "d1"))
        os.mkdir(os.path.join(top, "d2"))
        write_file(os.path.join(top, "d1", a), b"moved %d\n" % k)
        write_file(os.path.join(top, "d2", b), b"")          # only to ask where it goes
    rels = ["tries/%d/d%d/%s" % (k, i, n) for k in range(8) for i, n in ((1, a), (2, b))]
    shards = entry_shards(fs, rels)
    crossing = [k for k in range(8)
                if shards["tries/%d/d1/%s" % (k, a)] != shards["tries/%d/d2/%s" % (k, b)]]
    assert crossing, "no pair on different shards: %r" % shards
    for k in range(8):
        top = fs.path("tries", str(k))
        os.unlink(os.path.join(top, "d2", b))
        run(["mv", "d1/" + a, "d2/" + b], cwd=top, timeout=60)
        alive(fs)
        assert os.listdir(os.path.join(top, "d1")) == []
        assert os.listdir(os.path.join(top, "d2")) == [b]
        assert read_file(os.path.join(top, "d2", b)) == b"moved %d\n" % k
    fs.remount()
    for k in crossing:
        assert read_file(fs.path("tries", str(k), "d2", b)) == b"moved %d\n" % k


def test_create_mkdir_mknod_at_255_and_256(fs):
    kinds = {"f": "file", "d": "dir", "p": "fifo"}
    if os.geteuid() == 0:
        kinds["c"] = "chardev"
    made = {}
    for ch, kind in kinds.items():
        name, over = long_name(ch), long_name(ch, n=NAME_MAX + 1)
        p, q = fs.path(name), fs.path(over)
        if kind == "file":
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, b"255 bytes of name\n")
            os.close(fd)
            assert_errno(errno.ENAMETOOLONG, os.open, q, os.O_CREAT | os.O_WRONLY, 0o644)
        elif kind == "dir":
            os.mkdir(p)
            assert_errno(errno.ENAMETOOLONG, os.mkdir, q)
        elif kind == "fifo":
            os.mkfifo(p)
            assert_errno(errno.ENAMETOOLONG, os.mkfifo, q)
        else:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
            assert_errno(errno.ENAMETOOLONG, os.mknod, q, stat.S_IFCHR | 0o600,
                         os.makedev(1, 3))
        assert_errno(errno.ENAMETOOLONG, os.lstat, q)
        made[name] = kind
        alive(fs)

    # Inside a long-named directory too: a 511-byte path.
    inner = os.path.join(fs.path(long_name("d")), long_name("i"))
    write_file(inner, b"inner\n")

    def check():
        assert sorted(os.listdir(fs.mnt)) == sorted(made)
        with os.scandir(fs.mnt) as it:
            for e in it:
                st = os.lstat(e.path)
                want = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "fifo": stat.S_ISFIFO,
                        "chardev": stat.S_ISCHR}[made[e.name]]
                assert want(st.st_mode), (len(e.name), made[e.name], oct(st.st_mode))
                assert len(os.fsencode(e.name)) == NAME_MAX
        assert read_file(fs.path(long_name("f"))) == b"255 bytes of name\n"
        assert os.listdir(fs.path(long_name("d"))) == [long_name("i")]
        assert read_file(inner) == b"inner\n"
        if "chardev" in made.values():
            assert os.lstat(fs.path(long_name("c"))).st_rdev == os.makedev(1, 3)

    check()
    fs.remount()
    check()

    # And away again: unlink, rmdir; the 256-byte names were never there.
    os.unlink(inner)
    for name, kind in made.items():
        (os.rmdir if kind == "dir" else os.unlink)(fs.path(name))
    assert_errno(errno.ENAMETOOLONG, os.unlink, fs.path(long_name("f", n=NAME_MAX + 1)))
    assert_errno(errno.ENAMETOOLONG, os.rmdir, fs.path(long_name("d", n=NAME_MAX + 1)))
    assert os.listdir(fs.mnt) == []
    alive(fs)


def test_symlink_long_name_and_target(fs):
    # 16 components of 255 bytes and 15 slashes: 4095 bytes, the most there is.
    target = "/".join([long_name("t")] * 16)
    assert len(target) == TARGET_MAX
    name = long_name("s")
    os.symlink(target, fs.path(name))
    assert os.readlink(fs.path(name)) == target
    assert os.lstat(fs.path(name)).st_size == TARGET_MAX
    assert_errno(errno.ENAMETOOLONG, os.symlink, target + "x", fs.path("over"))
    assert_errno(errno.ENAMETOOLONG, os.symlink, "t", fs.path(long_name("s", n=NAME_MAX + 1)))
    assert_errno(errno.ENOENT, os.lstat, fs.path("over"))
    alive(fs)

    # A long name pointing at a long name, followed.
    write_file(fs.path(long_name("f")), b"through the link\n")
    os.symlink(long_name("f"), fs.path(long_name("l")))
    assert read_file(fs.path(long_name("l"))) == b"through the link\n"
    assert sorted(os.listdir(fs.mnt)) == sorted([name, long_name("f"), long_name("l")])

    fs.remount()
    assert os.readlink(fs.path(name)) == target
    assert read_file(fs.path(long_name("l"))) == b"through the link\n"
    os.unlink(fs.path(name))
    os.unlink(fs.path(long_name("l")))
    assert os.listdir(fs.mnt) == [long_name("f")]
    alive(fs)


def test_link_long_names(fs):
    os.mkdir(fs.path("d1"))
    os.mkdir(fs.path("d2"))
    src = fs.path("d1", long_name("a"))
    write_file(src, b"linked bytes\n")
    ino = os.stat(src).st_ino
    # Eight links: their entries spread over the shards, some away from the inode.
    links = [fs.path("d2", long_name("b", "%d" % i)) for i in range(8)]
    for i, p in enumerate(links):
        os.link(src, p)
        assert os.stat(src).st_nlink == i + 2
    assert_errno(errno.ENAMETOOLONG, os.link, src, fs.path("d2", long_name("b", n=NAME_MAX + 1)))
    assert_errno(errno.ENAMETOOLONG, os.link, fs.path("d1", long_name("a", n=NAME_MAX + 1)),
                 fs.path("d2", "x"))
    alive(fs)
    assert sorted(os.listdir(fs.path("d2"))) == sorted(os.path.basename(p) for p in links)
    for p in links:
        st = os.stat(p)
        assert st.st_ino == ino and st.st_nlink == 9
        assert read_file(p) == b"linked bytes\n"
    write_file(links[3], b"changed through a link\n")
    assert read_file(src) == b"changed through a link\n"

    fs.remount()
    os.unlink(src)
    for i, p in enumerate(links[:-1]):
        os.unlink(p)
        assert os.stat(links[-1]).st_nlink == 8 - i - 1
    assert read_file(links[-1]) == b"changed through a link\n"
    assert os.listdir(fs.path("d1")) == []
    assert os.listdir(fs.path("d2")) == [os.path.basename(links[-1])]
    alive(fs)


def test_rename_long_names_within_across_and_over(fs):
    """Every rename with 255-byte names on both sides: within a directory,
    across directories, across shards (to a new name, over an existing one,
    RENAME_EXCHANGE, a directory with contents), and 256 bytes refused."""
    os.mkdir(fs.path("d1"))
    os.mkdir(fs.path("d2"))
    srcs = [long_name("s", "%d" % i) for i in range(8)]
    dsts = [long_name("t", "%d" % i) for i in range(8)]
    for i, n in enumerate(srcs):
        write_file(fs.path("d1", n), b"source %d\n" % i)
    for i, n in enumerate(dsts):
        write_file(fs.path("d2", n), b"target %d\n" % i)
    shards = entry_shards(fs, ["d1/" + n for n in srcs] + ["d2/" + n for n in dsts])
    shard_of = {n: shards[("d1/" if n in srcs else "d2/") + n] for n in srcs + dsts}
    (new_s, new_d), (over_s, over_d), (ex_s, ex_d), (dir_s, dir_d) = \
        pairs_apart(shard_of, srcs, dsts, 4)
    d1, d2 = fs.path("d1"), fs.path("d2")
    content = {("d1", n): b"source %d\n" % i for i, n in enumerate(srcs)}
    content.update({("d2", n): b"target %d\n" % i for i, n in enumerate(dsts)})

    def check():
        alive(fs)
        for d in ("d1", "d2"):
            want = sorted(n for (dd, n) in content if dd == d)
            assert sorted(os.listdir(fs.path(d))) == want, d
        for (d, n), data in content.items():
            p = fs.path(d, n)
            if data is None:
                assert os.path.isdir(p)
            else:
                assert read_file(p) == data, (d, n[-3:])

    # Across shards, to a new name (the issue's case).
    os.unlink(os.path.join(d2, new_d))
    del content[("d2", new_d)]
    ino = os.stat(os.path.join(d1, new_s)).st_ino
    os.rename(os.path.join(d1, new_s), os.path.join(d2, new_d))
    content[("d2", new_d)] = content.pop(("d1", new_s))
    assert os.stat(os.path.join(d2, new_d)).st_ino == ino
    check()

    # Across shards, over an existing long name: the old file stays readable
    # through an open descriptor, with no name left.
    fd = os.open(os.path.join(d2, over_d), os.O_RDONLY)
    try:
        os.rename(os.path.join(d1, over_s), os.path.join(d2, over_d))
        assert os.pread(fd, 100, 0) == content[("d2", over_d)]
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    content[("d2", over_d)] = content.pop(("d1", over_s))
    check()

    # Across shards, exchanged.
    renameat2(os.path.join(d1, ex_s), os.path.join(d2, ex_d), RENAME_EXCHANGE)
    content[("d1", ex_s)], content[("d2", ex_d)] = content[("d2", ex_d)], content[("d1", ex_s)]
    check()

    # Across shards, a directory with a long-named file in it.
    os.unlink(os.path.join(d1, dir_s))
    os.unlink(os.path.join(d2, dir_d))
    del content[("d1", dir_s)], content[("d2", dir_d)]
    os.mkdir(os.path.join(d1, dir_s))           # same name, so the same shard as asked
    write_file(os.path.join(d1, dir_s, long_name("i")), b"inside\n")
    os.rename(os.path.join(d1, dir_s), os.path.join(d2, dir_d))
    content[("d2", dir_d)] = None
    moved = os.path.join(d2, dir_d)
    assert os.listdir(moved) == [long_name("i")]
    assert read_file(os.path.join(moved, long_name("i"))) == b"inside\n"
    assert os.stat(os.path.join(moved, "..")).st_ino == os.stat(d2).st_ino
    assert os.stat(d1).st_nlink == 2 and os.stat(d2).st_nlink == 3
    check()

    # Within a directory, and across directories whatever the shards.
    rest = [n for n in srcs if ("d1", n) in content]
    a, b = rest[0], rest[1]
    os.rename(os.path.join(d1, a), os.path.join(d1, long_name("w")))
    content[("d1", long_name("w"))] = content.pop(("d1", a))
    os.rename(os.path.join(d1, b), os.path.join(d2, long_name("x")))
    content[("d2", long_name("x"))] = content.pop(("d1", b))
    check()

    # Refused: 256 bytes either side, and NOREPLACE over a long name.
    c = rest[2]
    assert_errno(errno.ENAMETOOLONG, os.rename, os.path.join(d1, c),
                 os.path.join(d2, long_name("y", n=NAME_MAX + 1)))
    assert_errno(errno.ENAMETOOLONG, os.rename, os.path.join(d1, long_name("s", n=NAME_MAX + 1)),
                 os.path.join(d2, "short"))
    assert_errno(errno.EEXIST, renameat2, os.path.join(d1, c), os.path.join(d2, new_d),
                 RENAME_NOREPLACE)
    check()

    fs.remount()
    check()


def test_xattr_names_and_values_at_their_limits(fs):
    f = fs.path(long_name("f"))
    write_file(f, b"data\n")
    os.mkdir(fs.path(long_name("d")))
    names = ["user." + long_name("n", str(i), n=XATTR_NAME_MAX - 5) for i in range(3)]
    assert all(len(n) == XATTR_NAME_MAX for n in names)
    values = [os.urandom(XATTR_SIZE_MAX), bytes(range(256)) * (XATTR_SIZE_MAX // 256), b""]
    for target in (f, fs.path(long_name("d"))):
        for n, v in zip(names, values):
            os.setxattr(target, n, v)
        alive(fs)
    over_name = "user." + "n" * (XATTR_NAME_MAX - 4)
    assert_errno(errno.ERANGE, os.setxattr, f, over_name, b"v")
    assert_errno(errno.ERANGE, os.getxattr, f, over_name)
    assert_errno(errno.E2BIG, os.setxattr, f, "user.big", b"x" * (XATTR_SIZE_MAX + 1))
    assert_errno(errno.ENODATA, os.getxattr, f, "user.big")
    alive(fs)

    def check():
        for target in (f, fs.path(long_name("d"))):
            assert sorted(n for n in os.listxattr(target) if n.startswith("user.")) == \
                sorted(names)
            for n, v in zip(names, values):
                assert os.getxattr(target, n) == v
        assert read_file(f) == b"data\n"

    check()
    fs.remount()
    check()
    os.setxattr(f, names[0], values[1], os.XATTR_REPLACE)     # a full value over a full one
    assert os.getxattr(f, names[0]) == values[1]
    for n in names:
        os.removexattr(f, n)
    assert [n for n in os.listxattr(f) if n.startswith("user.")] == []
    alive(fs)


SECRET = "long-names-test-secret"


def test_key_api_long_names(shardfs_factory):
    """PUT and GET of 247-byte (its temporary name is 255) and 255-byte (no
    room for one: written in place) names; 256 is 414."""
    fs = shardfs_factory(sub="", start=False)
    text = open(fs.conf).read().replace("[cluster]\n", "[cluster]\nsecret = %s\n" % SECRET, 1)
    open(fs.conf, "w").write(text)
    port = int(re.search(r"url = http://127\.0\.0\.1:(\d+)", text).group(1))
    fs.start()
    os.mkdir(fs.path("api"))

    def call(method, name, body=None):
        url = "http://127.0.0.1:%d/v1/kv/api/%s" % (port, urllib.parse.quote(name, safe=""))
        req = urllib.request.Request(url, data=body, method=method,
                                     headers={"Authorization": "Bearer " + SECRET})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    for n in (247, NAME_MAX):
        name = long_name("k", n=n)
        data = os.urandom(3000) + b"%d" % n
        assert call("PUT", name, data)[0] == 201
        assert call("GET", name) == (200, data)
        assert read_file(fs.path("api", name)) == data
        assert call("PUT", name, data[::-1])[0] in (200, 204)    # over itself
        assert read_file(fs.path("api", name)) == data[::-1]
        alive(fs)
    status, body = call("GET", "")
    assert status == 200
    assert sorted(e["name"] for e in json.loads(body)["entries"]) == \
        sorted([long_name("k", n=247), long_name("k")])
    assert call("PUT", long_name("k", n=NAME_MAX + 1), b"x")[0] == 414
    assert call("GET", long_name("k", n=NAME_MAX + 1))[0] == 414
    assert sorted(os.listdir(fs.path("api"))) == sorted([long_name("k", n=247), long_name("k")])
    assert call("DELETE", long_name("k"))[0] in (200, 204)
    assert os.listdir(fs.path("api")) == [long_name("k", n=247)]
    alive(fs)
