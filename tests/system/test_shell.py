"""Everyday shell idioms through the mount, with the real tools."""

import errno
import os
import stat

from conftest import (assert_errno, assert_same_tree, make_tree, read_file, run, sh,
                      tree_snapshot, write_file)


def test_echo_cat(fs):
    sh("echo hello world > f", cwd=fs.mnt)
    assert run(["cat", "f"], cwd=fs.mnt).stdout == "hello world\n"
    assert read_file(fs.path("f")) == b"hello world\n"
    sh("printf 'abc' > f", cwd=fs.mnt)          # > truncates the longer file
    assert read_file(fs.path("f")) == b"abc"
    assert os.stat(fs.path("f")).st_size == 3


def test_append_loop(fs):
    sh('i=1; while [ $i -le 200 ]; do echo "line $i" >> log; i=$((i+1)); done', cwd=fs.mnt)
    expected = "".join("line %d\n" % i for i in range(1, 201))
    assert run(["cat", "log"], cwd=fs.mnt).stdout == expected
    assert os.stat(fs.path("log")).st_size == len(expected)
    assert run(["wc", "-l", "log"], cwd=fs.mnt).stdout.split()[0] == "200"


def test_replace_by_tmp_then_mv_loop(fs):
    # The editor/config-writer idiom: write a temp file, mv it over the real one.
    sh('echo v0 > conf\n'
       'i=1; while [ $i -le 100 ]; do\n'
       '  echo "version $i" > conf.tmp && mv conf.tmp conf || exit 1\n'
       '  [ "$(cat conf)" = "version $i" ] || { echo "bad at $i: $(cat conf)"; exit 1; }\n'
       '  i=$((i+1))\n'
       'done', cwd=fs.mnt)
    assert read_file(fs.path("conf")) == b"version 100\n"
    assert sorted(os.listdir(fs.mnt)) == ["conf"]


def test_mkdir_p_deep(fs):
    parts = ["level%02d" % i for i in range(30)]
    deep = os.path.join(*parts)
    run(["mkdir", "-p", deep], cwd=fs.mnt)
    run(["mkdir", "-p", deep], cwd=fs.mnt)     # idempotent
    write_file(fs.path(deep, "bottom"), "at the bottom\n")
    assert os.path.isdir(fs.path(deep))
    found = run(["find", ".", "-type", "d"], cwd=fs.mnt).stdout.split()
    assert len(found) == 31                    # "." + 30 levels
    assert run(["find", ".", "-type", "f"], cwd=fs.mnt).stdout.split() == ["./" + deep + "/bottom"]
    assert run(["cat", os.path.join(deep, "bottom")], cwd=fs.mnt).stdout == "at the bottom\n"


def test_mv_files_and_dirs(fs):
    m = fs.mnt
    sh("mkdir -p src/sub dst && echo one > src/f1 && echo two > src/sub/f2", cwd=m)
    ino_f1 = os.stat(fs.path("src/f1")).st_ino
    ino_sub = os.stat(fs.path("src/sub")).st_ino

    run(["mv", "src/f1", "src/f1.renamed"], cwd=m)          # same directory
    assert_errno(errno.ENOENT, os.stat, fs.path("src/f1"))
    assert read_file(fs.path("src/f1.renamed")) == b"one\n"
    assert os.stat(fs.path("src/f1.renamed")).st_ino == ino_f1

    run(["mv", "src/f1.renamed", "dst/"], cwd=m)            # across directories
    assert read_file(fs.path("dst/f1.renamed")) == b"one\n"
    assert os.listdir(fs.path("src")) == ["sub"]

    run(["mv", "src/sub", "dst/moved"], cwd=m)              # a directory with contents
    assert_errno(errno.ENOENT, os.stat, fs.path("src/sub"))
    assert os.stat(fs.path("dst/moved")).st_ino == ino_sub
    assert read_file(fs.path("dst/moved/f2")) == b"two\n"
    assert sorted(os.listdir(fs.path("dst"))) == ["f1.renamed", "moved"]
    assert os.listdir(fs.path("src")) == []

    run(["mv", "dst", "src/dst2"], cwd=m)                   # a dir into a sibling
    assert read_file(fs.path("src/dst2/moved/f2")) == b"two\n"
    assert os.listdir(fs.mnt) == ["src"]

    # an open file keeps working across a rename
    fd = os.open(fs.path("src/dst2/f1.renamed"), os.O_RDWR)
    try:
        run(["mv", "src/dst2/f1.renamed", "top"], cwd=m)
        os.pwrite(fd, b"ONE", 0)
    finally:
        os.close(fd)
    assert read_file(fs.path("top")) == b"ONE\n"


def test_dir_nlink_counts_subdirs(fs):
    # Traditional Unix (and ext4): a directory's st_nlink is 2 + subdirectories.
    os.makedirs(fs.path("p/a"))
    os.makedirs(fs.path("p/b"))
    os.mkdir(fs.path("q"))
    write_file(fs.path("p/file"), "x")
    assert os.stat(fs.path("p")).st_nlink == 4
    os.rename(fs.path("p/a"), fs.path("q/a"))
    assert os.stat(fs.path("p")).st_nlink == 3
    assert os.stat(fs.path("q")).st_nlink == 3
    os.rmdir(fs.path("p/b"))
    assert os.stat(fs.path("p")).st_nlink == 2


def test_cp_a_tree_then_diff(fs, tmp_top):
    src = os.path.join(tmp_top, "src")
    make_tree(src, seed=7)
    run(["cp", "-a", src, fs.path("copy")], timeout=120)
    run(["diff", "-r", "--no-dereference", src, fs.path("copy")], timeout=120)
    assert_same_tree(tree_snapshot(src), tree_snapshot(fs.path("copy")))
    # and back out again
    run(["cp", "-a", fs.path("copy"), os.path.join(tmp_top, "back")], timeout=120)
    assert_same_tree(tree_snapshot(src), tree_snapshot(os.path.join(tmp_top, "back")))


def test_symlinks(fs):
    m = fs.mnt
    write_file(fs.path("target"), "through the link\n")
    run(["ln", "-s", "target", "link"], cwd=m)
    run(["ln", "-s", "/nonexistent/dir/file", "dangling"], cwd=m)
    os.mkdir(fs.path("d"))
    run(["ln", "-s", "../target", "d/up"], cwd=m)

    assert os.readlink(fs.path("link")) == "target"
    assert run(["readlink", "link"], cwd=m).stdout == "target\n"
    assert stat.S_ISLNK(os.lstat(fs.path("link")).st_mode)
    assert os.lstat(fs.path("link")).st_size == len("target")
    assert run(["cat", "link"], cwd=m).stdout == "through the link\n"
    assert run(["cat", "d/up"], cwd=m).stdout == "through the link\n"
    assert os.stat(fs.path("link")).st_ino == os.stat(fs.path("target")).st_ino

    assert os.readlink(fs.path("dangling")) == "/nonexistent/dir/file"
    assert_errno(errno.ENOENT, os.stat, fs.path("dangling"))
    assert stat.S_ISLNK(os.lstat(fs.path("dangling")).st_mode)
    ls = run(["ls", "-l", "dangling"], cwd=m).stdout
    assert "dangling -> /nonexistent/dir/file" in ls

    long_target = "/" + "/".join(["x" * 200] * 20)          # 4020 bytes
    os.symlink(long_target, fs.path("long"))
    assert os.readlink(fs.path("long")) == long_target

    os.unlink(fs.path("link"))                              # removes the link only
    assert read_file(fs.path("target")) == b"through the link\n"
    assert_errno(errno.EEXIST, os.symlink, "x", fs.path("target"))


def test_hard_links(fs):
    m = fs.mnt
    write_file(fs.path("f"), "shared\n")
    os.mkdir(fs.path("d"))
    run(["ln", "f", "g"], cwd=m)
    run(["ln", "f", "d/h"], cwd=m)
    sf, sg, sh_ = (os.stat(fs.path(p)) for p in ("f", "g", "d/h"))
    assert sf.st_ino == sg.st_ino == sh_.st_ino
    assert sf.st_nlink == sg.st_nlink == sh_.st_nlink == 3

    with open(fs.path("g"), "ab") as w:                     # write through one name
        w.write(b"more\n")
    assert read_file(fs.path("f")) == b"shared\nmore\n"
    assert read_file(fs.path("d/h")) == b"shared\nmore\n"
    os.chmod(fs.path("d/h"), 0o640)                         # metadata is shared too
    assert stat.S_IMODE(os.stat(fs.path("f")).st_mode) == 0o640

    run(["rm", "f"], cwd=m)
    assert_errno(errno.ENOENT, os.stat, fs.path("f"))
    assert os.stat(fs.path("g")).st_nlink == 2
    assert read_file(fs.path("g")) == b"shared\nmore\n"

    fs.remount()
    sg2, sh2 = os.stat(fs.path("g")), os.stat(fs.path("d/h"))
    assert sg2.st_ino == sh2.st_ino and sg2.st_nlink == 2
    run(["rm", "d/h"], cwd=m)
    assert os.stat(fs.path("g")).st_nlink == 1
    assert read_file(fs.path("g")) == b"shared\nmore\n"
    assert_errno(errno.EPERM, os.link, fs.path("d"), fs.path("dlink"))   # no dir hard links


def test_chmod_and_stat_mode(fs):
    m = fs.mnt
    sh("umask 022 && echo x > f && mkdir d", cwd=m)
    assert stat.S_IMODE(os.stat(fs.path("f")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(fs.path("d")).st_mode) == 0o755
    for mode in ("640", "600", "755", "4755", "2711", "0"):
        run(["chmod", mode, "f"], cwd=m)
        assert stat.S_IMODE(os.stat(fs.path("f")).st_mode) == int(mode, 8)
        assert run(["stat", "-c", "%a", "f"], cwd=m).stdout.strip() == (mode.lstrip("0") or "0")
    run(["chmod", "1777", "d"], cwd=m)
    st = os.stat(fs.path("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1777
    run(["chmod", "u=rw,g=r,o=", "f"], cwd=m)
    assert run(["ls", "-l", "f"], cwd=m).stdout.startswith("-rw-r----- ")
    os.chown(fs.path("f"), 1234, 5678)
    st = os.stat(fs.path("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    fs.remount()
    st = os.stat(fs.path("f"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)


def test_touch_d_keeps_nanoseconds(fs):
    m = fs.mnt
    run(["touch", "-d", "@1000000000.123456789", "f"], cwd=m)
    assert os.stat(fs.path("f")).st_mtime_ns == 1_000_000_000_123_456_789
    run(["touch", "-m", "-d", "2021-06-07 08:09:10.987654321 UTC", "f"], cwd=m)
    assert os.stat(fs.path("f")).st_mtime_ns == 1_623_053_350_987_654_321
    os.mkdir(fs.path("d"))
    times_d = (1_111_111_111_000_000_001, 1_222_222_222_999_999_999)
    times_f = (1_333_333_333_000_000_007, 1_444_444_444_000_000_009)
    os.utime(fs.path("d"), ns=times_d)
    os.utime(fs.path("f"), ns=times_f)
    st = os.stat(fs.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == times_f
    st = os.stat(fs.path("d"))
    assert (st.st_atime_ns, st.st_mtime_ns) == times_d
    # a pre-1970 time; then a write moves mtime forward to "now"
    os.utime(fs.path("d"), ns=(0, -1_000_000_000))
    assert os.stat(fs.path("d")).st_mtime_ns == -1_000_000_000
    fs.remount()
    assert os.stat(fs.path("f")).st_mtime_ns == 1_444_444_444_000_000_009
    assert os.stat(fs.path("d")).st_mtime_ns == -1_000_000_000
    before = os.stat(fs.path("f")).st_mtime_ns
    sh("echo later >> f", cwd=m)
    assert os.stat(fs.path("f")).st_mtime_ns > before


def test_truncate_up_and_down(fs):
    m = fs.mnt
    data = os.urandom(3 << 20)
    write_file(fs.path("f"), data)
    run(["truncate", "-s", str(5 << 20), "f"], cwd=m)           # up: the tail reads zeros
    assert os.stat(fs.path("f")).st_size == 5 << 20
    got = read_file(fs.path("f"))
    assert got[:3 << 20] == data and got[3 << 20:] == bytes(2 << 20)

    cut = (3 << 20) // 2 + 7
    run(["truncate", "-s", str(cut), "f"], cwd=m)               # down, mid-chunk
    assert os.stat(fs.path("f")).st_size == cut
    assert read_file(fs.path("f")) == data[:cut]

    run(["truncate", "-s", str(3 << 20), "f"], cwd=m)           # up again: no stale bytes
    got = read_file(fs.path("f"))
    assert got[:cut] == data[:cut]
    assert got[cut:] == bytes((3 << 20) - cut), "old data came back after truncate down+up"

    run(["truncate", "-s", "0", "f"], cwd=m)
    assert read_file(fs.path("f")) == b""
    run(["truncate", "-s", "100", "f"], cwd=m)
    assert read_file(fs.path("f")) == bytes(100)

    fd = os.open(fs.path("f"), os.O_RDWR)                       # ftruncate on an open fd
    try:
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        os.pwrite(fd, b"abc", 20)
        assert os.pread(fd, 100, 0) == bytes(20) + b"abc"
    finally:
        os.close(fd)


def test_rm_rf(fs, tmp_top):
    make_tree(fs.path("tree"), seed=3)
    os.makedirs(fs.path("tree/deep/er/est"))
    assert int(run(["sh", "-c", "find tree | wc -l"], cwd=fs.mnt).stdout) > 60
    run(["rm", "-rf", "tree"], cwd=fs.mnt)
    assert not os.path.lexists(fs.path("tree"))
    assert os.listdir(fs.mnt) == []
    run(["rm", "-rf", "tree"], cwd=fs.mnt)                    # nothing left: still exit 0
    make_tree(fs.path("tree"), seed=3)                        # the same names again
    assert len(os.listdir(fs.path("tree/many"))) == 40


def test_find_ls_du_df(fs):
    m = fs.mnt
    os.makedirs(fs.path("a/b"))
    os.mkdir(fs.path("c"))
    sizes = {"a/one": 10, "a/b/two": 5000, "c/three": 0, "four": 123457}
    for p, n in sizes.items():
        write_file(fs.path(p), os.urandom(n))
    write_file(fs.path("big"), os.urandom(1 << 20))
    sizes["big"] = 1 << 20

    assert sorted(run(["find", ".", "-type", "f"], cwd=m).stdout.split()) == \
        sorted("./" + p for p in sizes)
    assert sorted(run(["find", ".", "-type", "d"], cwd=m).stdout.split()) == \
        [".", "./a", "./a/b", "./c"]
    assert run(["find", ".", "-name", "two", "-size", "5000c"], cwd=m).stdout == "./a/b/two\n"
    assert run(["find", ".", "-empty", "-type", "f"], cwd=m).stdout == "./c/three\n"

    ls = run(["ls", "-ln", "--time-style=+%s", "."], cwd=m).stdout.splitlines()
    assert ls[0].startswith("total ")
    rows = {l.split()[-1]: l.split() for l in ls[1:]}
    assert set(rows) == {"a", "big", "c", "four"}
    assert rows["four"][0].startswith("-") and rows["four"][4] == "123457"
    assert rows["a"][0].startswith("d")
    assert rows["four"][2] == "0" and rows["four"][3] == "0"   # owner root:root

    for line in run(["du", "-ab", "."], cwd=m).stdout.splitlines():
        n, p = line.split("\t")
        if p[2:] in sizes:
            assert int(n) == sizes[p[2:]], line
    big_kib = int(run(["du", "-k", "big"], cwd=m).stdout.split()[0])
    assert 1000 <= big_kib <= 1100, "du of a 1 MiB file of random data says %d KiB" % big_kib
    assert os.stat(fs.path("big")).st_blocks * 512 >= 1 << 20

    df = run(["df", "-P", "-T", "-B1", m], cwd="/").stdout.splitlines()
    assert len(df) == 2
    fields = df[1].split()
    fstype, mp = fields[1], fields[-1]
    total, used, avail = int(fields[2]), int(fields[3]), int(fields[4])
    assert fstype.startswith("fuse"), df
    assert mp == m
    assert total > 0 and avail > 0 and 0 <= used <= total


def test_tar_roundtrip(fs, tmp_top):
    src = os.path.join(tmp_top, "src")
    make_tree(src, seed=11)
    # pack a local tree into the mount, unpack inside the mount
    run(["tar", "--format=posix", "-C", src, "-cf", fs.path("t.tar"), "."], timeout=120)
    os.mkdir(fs.path("x"))
    run(["tar", "-C", fs.path("x"), "-xpf", fs.path("t.tar")], timeout=120)
    run(["diff", "-r", "--no-dereference", src, fs.path("x")], timeout=120)
    assert_same_tree(tree_snapshot(src), tree_snapshot(fs.path("x")))
    # pack the mounted copy (tar checks files do not change while read), unpack locally
    out = os.path.join(tmp_top, "out")
    os.mkdir(out)
    r = run(["tar", "--format=posix", "-C", fs.path("x"), "-cf", "-", "."], timeout=120,
            binary=True)
    run(["tar", "-C", out, "-xpf", "-"], input=r.stdout, timeout=120)
    assert_same_tree(tree_snapshot(src), tree_snapshot(out))
    listing = run(["tar", "-tvf", fs.path("t.tar")]).stdout
    assert "dangling -> /nonexistent/target/x" in listing
