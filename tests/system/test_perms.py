"""Permission checks for a non-root user (uid/gid 65534 via setpriv) on an
allow_other mount."""

import os
import stat

import pytest

from conftest import run, write_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")

PROBE = r"""
import errno, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        fd = os.open(path, os.O_RDONLY); os.read(fd, 10); os.close(fd)
    elif op == "write":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND); os.write(fd, b"x"); os.close(fd)
    elif op == "create":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif op == "mkdir":
        os.mkdir(path)
    elif op == "list":
        os.listdir(path)
    elif op == "stat":
        os.stat(path)
    elif op == "unlink":
        os.unlink(path)
    elif op == "rename":
        os.rename(path, path + ".renamed")
    elif op == "chmod":
        os.chmod(path, 0o666)
    elif op == "chown_root":
        os.chown(path, 0, 0)
    elif op == "utime_now":
        os.utime(path)
    elif op == "utime_set":
        os.utime(path, (1, 1))
    elif op == "setxattr":
        os.setxattr(path, "user.n", b"v")
    else:
        raise SystemExit("bad op " + op)
    print("OK")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def nobody(op, path):
    """Do op on path as uid 65534; returns "OK" or the errno name."""
    return run(["/usr/bin/python3", "-c", PROBE, op, path], user="nobody").stdout.strip()


@pytest.fixture
def pfs(fs):
    os.chmod(fs.mnt, 0o755)
    return fs


def test_nobody_reads_but_cannot_write_0644_root_file(pfs):
    f = pfs.path("f")
    write_file(f, "root's data\n")
    os.chmod(f, 0o644)
    assert nobody("read", f) == "OK"
    assert run(["cat", f], user="nobody").stdout == "root's data\n"
    assert nobody("write", f) == "EACCES"
    r = run(["sh", "-c", "echo evil >> '%s'" % f], user="nobody", check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert nobody("chmod", f) == "EPERM"
    assert nobody("utime_set", f) == "EPERM"
    assert nobody("setxattr", f) in ("EACCES", "EPERM")
    with open(f) as fh:
        assert fh.read() == "root's data\n"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644


def test_nobody_cannot_create_in_0755_root_dir(pfs):
    d = pfs.path("d755")
    os.mkdir(d)
    os.chmod(d, 0o755)
    write_file(os.path.join(d, "rootfile"), "r")
    assert nobody("create", os.path.join(d, "new")) == "EACCES"
    assert nobody("mkdir", os.path.join(d, "newdir")) == "EACCES"
    assert nobody("unlink", os.path.join(d, "rootfile")) == "EACCES"
    assert nobody("rename", os.path.join(d, "rootfile")) == "EACCES"
    r = run(["touch", os.path.join(d, "t")], user="nobody", check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert sorted(os.listdir(d)) == ["rootfile"]
    assert nobody("list", d) == "OK"


def test_nobody_creates_in_0777_dir_and_owns_it(pfs):
    d = pfs.path("d777")
    os.mkdir(d)
    os.chmod(d, 0o777)
    f = os.path.join(d, "mine")
    assert nobody("create", f) == "OK"
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (65534, 65534), \
        "new file owned by %d:%d" % (st.st_uid, st.st_gid)
    assert nobody("mkdir", os.path.join(d, "mydir")) == "OK"
    st = os.stat(os.path.join(d, "mydir"))
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    run(["sh", "-c", "echo by nobody > '%s'" % f], user="nobody")
    with open(f) as fh:
        assert fh.read() == "by nobody\n"
    assert nobody("chmod", f) == "OK"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o666
    assert nobody("utime_set", f) == "OK"
    assert os.stat(f).st_mtime == 1
    assert nobody("chown_root", f) == "EPERM"
    assert nobody("unlink", f) == "OK"
    assert not os.path.exists(f)


def test_chmod_0600_locks_nobody_out(pfs):
    f = pfs.path("secret")
    write_file(f, "secret\n")
    os.chmod(f, 0o644)
    assert nobody("read", f) == "OK"
    os.chmod(f, 0o600)
    assert nobody("read", f) == "EACCES"
    r = run(["cat", f], user="nobody", check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    d = pfs.path("private")
    os.mkdir(d)
    write_file(os.path.join(d, "inner"), "i")
    os.chmod(d, 0o700)
    assert nobody("list", d) == "EACCES"
    assert nobody("stat", os.path.join(d, "inner")) == "EACCES"
    os.chmod(d, 0o711)                                   # search but not list
    assert nobody("list", d) == "EACCES"
    assert nobody("stat", os.path.join(d, "inner")) == "OK"


def test_sticky_dir_protects_other_users_files(pfs):
    d = pfs.path("tmp")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    write_file(os.path.join(d, "roots"), "r")
    assert nobody("unlink", os.path.join(d, "roots")) == "EPERM"
    assert nobody("create", os.path.join(d, "mine")) == "OK"
    assert nobody("unlink", os.path.join(d, "mine")) == "OK"
    assert os.listdir(d) == ["roots"]
