"""System tests for shardfs: real mounts, plain syscalls, real tools.

Every test gets a fresh store: a temp dir holding shards.conf (4 shards,
data_dir inside the temp dir, short commit interval, kernel cache timeouts 0)
and a mountpoint. The daemon runs in the foreground (`shardfs mount -f`) under
subprocess.Popen so we know its PID; we poll /proc/self/mountinfo for the
mount with a deadline, never a bare sleep.

Teardown always unmounts (`fusermount3 -u`, then `-uz` if busy), waits for
the PID, fails the test on suspicious daemon stderr ("ERROR",
"AddressSanitizer", "runtime error", "Assertion") or a non-zero exit after a
clean unmount, and then runs `shardfs fsck`, which must report clean.

Nothing here may hang: every subprocess has a timeout (its whole process
group is killed when it expires) and a per-test watchdog SIGKILLs the daemons
the test started, so a syscall stuck on a wedged mount returns ENOTCONN and
the test fails instead of blocking the suite. Processes are only ever killed
by the PID (or process group) we started, never by name.

Helpers (run, sh, tree_snapshot, make_tree, ...) live here too; test files
import them with `from conftest import ...`.

Environment:
  SHARDFS_BIN       the binary under test (default build/shardfs, relative
                    to the repo top)
  SHARDFS_TEST_TMP  where temp dirs go (default /tmp); must be reachable by
                    uid 65534 for the permission tests
  SHARDFS_KEEP_TMP  1 = keep temp dirs of passing tests too
"""

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO_TOP = Path(__file__).resolve().parents[2]


def _shardfs_bin():
    p = Path(os.environ.get("SHARDFS_BIN", "build/shardfs"))
    if not p.is_absolute():
        p = REPO_TOP / p
    return str(p)


SHARDFS_BIN = _shardfs_bin()
TEST_TMP = os.environ.get("SHARDFS_TEST_TMP", "/tmp")

MOUNT_DEADLINE = 10.0          # seconds for a mount to appear
EXIT_DEADLINE = 20.0           # seconds for the -f daemon to exit after unmount
DEFAULT_TEST_TIMEOUT = 300.0   # per-test watchdog, override with @pytest.mark.timeout_s(N)
COMMIT_INTERVAL_MS = 20
# SHARDFS_TEST_LAYOUT=split: every 4-shard store the tests make is split
# before its first real mount (shard 1 at depth 3, shard 5 at depth 4:
# shards 0, 1, 2, 3, 5, 13 of depths 2, 3, 2, 2, 4, 4), so the suite runs on
# a layout that is not uniform (tests/run runs part of it that way).
# Tests that count shards mark themselves uniform_layout and are skipped.
SPLIT_LAYOUT = os.environ.get("SHARDFS_TEST_LAYOUT") == "split"
SPLIT_STEPS = (("split", "1"), ("split", "5"))

BAD_STDERR = ("ERROR", "AddressSanitizer", "LeakSanitizer", "runtime error", "Assertion")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

# Any child process group currently running under run(); the watchdog kills them.
_live_pgids = set()
_live_lock = threading.Lock()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "timeout_s(seconds): per-test watchdog limit (default %d)" % DEFAULT_TEST_TIMEOUT)
    config.addinivalue_line(
        "markers",
        "uniform_layout: the test counts shards or places records itself (skipped with "
        "SHARDFS_TEST_LAYOUT=split)")


def pytest_runtest_setup(item):
    if SPLIT_LAYOUT and item.get_closest_marker("uniform_layout"):
        pytest.skip("assumes the uniform layout (SHARDFS_TEST_LAYOUT=split)")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# --------------------------------------------------------------------------
# Running commands


def run(args, *, timeout=60, check=True, input=None, cwd=None, env=None,
        user=None, binary=False):
    """Run args (a list) and return a CompletedProcess with stdout/stderr.

    Never hangs: on timeout the whole process group is SIGKILLed and the test
    fails. user="nobody" runs it as uid/gid 65534 via setpriv. check=True fails
    the test on a non-zero exit, showing both streams.
    """
    args = [str(a) for a in args]
    if user == "nobody":
        args = NOBODY + args
    elif user is not None:
        raise ValueError(user)
    if input is not None and not binary and isinstance(input, bytes):
        binary = True
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
        start_new_session=True, text=not binary, errors=None if binary else "replace")
    with _live_lock:
        _live_pgids.add(proc.pid)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail("timeout after %ss: %s\nstdout:\n%s\nstderr:\n%s"
                    % (timeout, " ".join(args), _tail(out), _tail(err)))
    finally:
        with _live_lock:
            _live_pgids.discard(proc.pid)
    cp = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and cp.returncode != 0:
        pytest.fail("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                    % (" ".join(args), cp.returncode, _tail(out), _tail(err)))
    return cp


def sh(script, **kw):
    """Run a /bin/sh script (string) with run()."""
    return run(["sh", "-c", script], **kw)


def _tail(s, n=4000):
    if s is None:
        return ""
    if isinstance(s, bytes):
        s = s.decode(errors="replace")
    return s if len(s) <= n else "...\n" + s[-n:]


def kill_group(pgid):
    """SIGKILL the process group pgid (one we started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for(cond, timeout, what, interval=0.02):
    """Poll cond() until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def errno_of(fn, *args, **kw):
    """Call fn; return the errno of the OSError it raises, or 0 if it did not."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def assert_errno(expected, fn, *args, **kw):
    got = errno_of(fn, *args, **kw)
    exp = expected if isinstance(expected, (tuple, list, set)) else (expected,)
    assert got in exp, "%s%r: expected %s, got %s" % (
        getattr(fn, "__name__", fn), args, "/".join(errno.errorcode[e] for e in exp),
        errno.errorcode.get(got, got) if got else "success")


# --------------------------------------------------------------------------
# Mounts


def _unescape_mountinfo(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_entry(path):
    """The /proc/self/mountinfo fstype of the topmost mount at path, or None.

    Reads mountinfo instead of stat()ing the path, so it cannot hang on a
    wedged FUSE mount.
    """
    path = os.path.normpath(str(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == path:
                found = right.split()[0]
    return found


def is_mounted(path):
    return mount_entry(path) is not None


def mounts_under(path):
    prefix = os.path.normpath(str(path)) + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            mp = _unescape_mountinfo(fields[4])
            if mp.startswith(prefix):
                out.append(mp)
    return out


def fuse_unmount(mnt, timeout=15.0):
    """fusermount3 -u, retrying while busy; fall back to -uz. Returns how."""
    deadline = time.monotonic() + timeout
    last = None
    while is_mounted(mnt):
        r = run(["fusermount3", "-u", mnt], check=False, timeout=30)
        if r.returncode == 0:
            return "u"
        last = r.stderr
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if is_mounted(mnt):
        run(["fusermount3", "-uz", mnt], check=False, timeout=30)
        return "uz: " + (last or "").strip()
    return "u"


def write_conf(path, *, shards=4, data_dir="./data", commit_interval_ms=COMMIT_INTERVAL_MS,
               cache_timeout=0, port=None, epoch=1):
    if port is None:
        port = free_port()
    text = ("[cluster]\n"
            "shards = %d\n"
            "epoch = %d\n"
            "commit_interval_ms = %d\n"
            "cache_timeout = %s\n"
            "\n"
            "[node local]\n"
            "url = http://127.0.0.1:%d\n"
            "data_dir = %s\n"
            "shards = all\n") % (shards, epoch, commit_interval_ms, cache_timeout, port, data_dir)
    Path(path).write_text(text)
    return text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardFS:
    """One store (conf + data dir) and its mountpoint; at most one daemon at a time.

    Attributes: top (temp dir), conf, data, mnt (str paths), proc (Popen of the
    running -f daemon or None), starts (count).
    """

    def __init__(self, top, *, shards=4, data_dir="./data", mkdata=True, start=True,
                 watchdog=None):
        self.top = str(top)
        self.conf = os.path.join(self.top, "shards.conf")
        self.mnt = os.path.join(self.top, "mnt")
        self.data = os.path.normpath(os.path.join(self.top, data_dir))
        self.proc = None
        self.starts = 0
        self.killed = False            # the last daemon was SIGKILLed on purpose
        self.allowed_stderr = []       # regexes of stderr lines that are not failures
        self.fsck_at_end = True
        self.problems = []             # collected failures, raised at teardown
        self._watchdog = watchdog
        os.makedirs(self.mnt, exist_ok=True)
        if mkdata:
            os.makedirs(self.data, exist_ok=True)
        write_conf(self.conf, shards=shards, data_dir=data_dir)
        self._split_first = SPLIT_LAYOUT and shards == 4 and mkdata
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------

    def start(self, extra_args=()):
        if self._split_first:
            self._split_first = False
            self.start()  # makes the store
            self.unmount()
            for what, shard in SPLIT_STEPS:
                r = subprocess.run([SHARDFS_BIN, "reshard", what, "-c", self.conf, "-w", "5",
                                    shard], capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, "reshard %s %s: %s" % (what, shard, r.stderr)
        assert self.proc is None, "daemon already running"
        assert not is_mounted(self.mnt), "%s is still mounted" % self.mnt
        self.starts += 1
        self.stderr_path = os.path.join(self.top, "daemon.%d.stderr" % self.starts)
        self.stdout_path = os.path.join(self.top, "daemon.%d.stdout" % self.starts)
        args = [SHARDFS_BIN, "mount", "-c", self.conf, "-f", "-o", "allow_other",
                *extra_args, self.mnt]
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        self.killed = False
        if self._watchdog:
            self._watchdog.daemons.add(self.proc)
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                pytest.fail("shardfs mount exited %s before mounting:\n%s"
                            % (rc, _tail(self.read_stderr(self.starts))))
            if time.monotonic() > deadline:
                self._kill_daemon()
                pytest.fail("no mount at %s after %.0fs:\n%s"
                            % (self.mnt, MOUNT_DEADLINE, _tail(self.read_stderr(self.starts))))
            time.sleep(0.02)
        return self

    def unmount(self):
        """Clean unmount: fusermount3 -u; the -f daemon must then exit 0."""
        if self.proc is None:
            if is_mounted(self.mnt):
                fuse_unmount(self.mnt)
            return
        how = fuse_unmount(self.mnt)
        proc, self.proc = self.proc, None
        try:
            rc = proc.wait(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait(timeout=10)
            self._fail("daemon pid %d did not exit %.0fs after unmount (killed it)"
                       % (proc.pid, EXIT_DEADLINE))
            rc = None
        if how != "u":
            self._fail("mount was busy, needed lazy unmount (%s)" % how)
        if rc is not None and rc != 0 and not self.killed:
            self._fail("daemon exited %s after unmount" % rc)
        self._check_stderr(self.starts)

    def kill9(self):
        """SIGKILL the daemon (no unmount); the mount is left dead."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        self.killed = True
        self._check_stderr(self.starts)

    def lazy_unmount(self):
        run(["fusermount3", "-uz", self.mnt], timeout=30)
        wait_for(lambda: not is_mounted(self.mnt), 10, "lazy unmount of " + self.mnt)

    def remount(self):
        if self.proc is not None:
            self.unmount()
        elif is_mounted(self.mnt):
            self.lazy_unmount()
        return self.start()

    def _kill_daemon(self):
        if self.proc is not None:
            kill_group(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None
            self.killed = True

    def teardown(self):
        """Always called: unmount, wait, check stderr, fsck."""
        clean = True
        try:
            if self.proc is not None and self.proc.poll() is not None:
                self._fail("daemon died during the test (exit %s)" % self.proc.returncode)
                self.proc = None
                clean = False
                self._check_stderr(self.starts)    # a sanitizer's report says why
            if self.proc is not None:
                self.unmount()
            elif is_mounted(self.mnt):
                fuse_unmount(self.mnt)
                clean = False
        finally:
            self._kill_daemon()
            if is_mounted(self.mnt):
                run(["fusermount3", "-uz", self.mnt], check=False, timeout=30)
        if clean and not self.problems and self.fsck_at_end and os.path.isdir(self.data):
            r = self.fsck(check=False)
            if r.returncode != 0 or not fsck_says_clean(r):
                self._fail("fsck at teardown not clean (exit %d):\n%s\n%s"
                           % (r.returncode, _tail(r.stdout), _tail(r.stderr)))

    # -- daemon stderr -----------------------------------------------------

    def allow_stderr(self, regex):
        self.allowed_stderr.append(re.compile(regex))

    def read_stderr(self, n=None):
        p = os.path.join(self.top, "daemon.%d.stderr" % (n or self.starts))
        try:
            return Path(p).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_stderr(self, n):
        text = self.read_stderr(n)
        bad = [l for l in text.splitlines()
               if any(w in l for w in BAD_STDERR)
               and not any(r.search(l) for r in self.allowed_stderr)]
        if bad:
            self._fail("suspicious daemon stderr (start %d):\n%s" % (n, _tail(text)))

    def _fail(self, msg):
        self.problems.append(msg)

    # -- offline commands --------------------------------------------------

    def cmd(self, *args, timeout=120, check=False, **kw):
        """Run `shardfs ARGS...` (add -c yourself)."""
        return run([SHARDFS_BIN, *args], timeout=timeout, check=check, **kw)

    def fsck(self, repair=False, check=False, timeout=300):
        assert not is_mounted(self.mnt), "fsck needs the store unmounted"
        args = ["fsck", "-c", self.conf] + (["--repair"] if repair else [])
        return self.cmd(*args, timeout=timeout, check=check)

    def assert_fsck_clean(self):
        r = self.fsck()
        assert r.returncode == 0 and fsck_says_clean(r), \
            "fsck not clean (exit %d):\n%s\n%s" % (r.returncode, _tail(r.stdout), _tail(r.stderr))
        return r

    def fsck_clean_or_repair(self):
        """After a crash: fsck; if not clean, fsck --repair must succeed and a
        second fsck must be clean. Returns True if a repair was needed."""
        r = self.fsck()
        if r.returncode == 0 and fsck_says_clean(r):
            return False
        rr = self.fsck(repair=True)
        assert rr.returncode == 0, "fsck --repair failed (exit %d):\n%s\n%s" % (
            rr.returncode, _tail(rr.stdout), _tail(rr.stderr))
        self.assert_fsck_clean()
        return True

    def path(self, *parts):
        return os.path.join(self.mnt, *parts)


def fsck_says_clean(cp):
    for line in (cp.stdout + "\n" + cp.stderr).lower().splitlines():
        if re.search(r"\bclean\b", line) and not re.search(r"\b(not|un)\s*clean", line):
            return True
    return False


class Watchdog:
    """SIGKILLs this test's daemons and subprocesses when the test overruns."""

    def __init__(self, seconds, name):
        self.daemons = set()
        self.fired = False
        self.name = name
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.seconds = seconds
        self.timer.start()

    def _fire(self):
        self.fired = True
        for p in list(self.daemons):
            if p.poll() is None:
                kill_group(p.pid)
        with _live_lock:
            for pgid in list(_live_pgids):
                kill_group(pgid)

    def cancel(self):
        self.timer.cancel()


def make_tmp_top():
    """A fresh temp dir, mode 0755 so uid 65534 can reach the mountpoint."""
    top = tempfile.mkdtemp(prefix="shardfs-test-", dir=TEST_TMP)
    os.chmod(top, 0o755)
    return top


@pytest.fixture
def watchdog(request):
    m = request.node.get_closest_marker("timeout_s")
    seconds = m.args[0] if m else DEFAULT_TEST_TIMEOUT
    wd = Watchdog(seconds, request.node.nodeid)
    yield wd
    wd.cancel()
    if wd.fired:
        pytest.fail("watchdog: test ran longer than %ss; daemons were SIGKILLed" % seconds)


@pytest.fixture
def tmp_top(request):
    """A temp dir for one test; removed afterwards if the test passed and
    nothing is mounted under it."""
    top = make_tmp_top()
    yield top
    rep = getattr(request.node, "rep_call", None)
    passed = rep is not None and rep.passed
    if mounts_under(top):
        print("not removing %s: still has mounts %s" % (top, mounts_under(top)))
    elif passed and os.environ.get("SHARDFS_KEEP_TMP") != "1":
        shutil.rmtree(top, ignore_errors=True)
    else:
        print("kept %s" % top)


@pytest.fixture
def shardfs_factory(tmp_top, watchdog):
    """make(**kw) -> ShardFS; every store made is torn down (unmount, stderr
    check, fsck) when the test ends. Each store gets its own subdir of
    tmp_top unless sub="" is given."""
    made = []

    def make(sub=None, **kw):
        top = tmp_top if sub == "" else os.path.join(tmp_top, sub or "fs%d" % len(made))
        os.makedirs(top, exist_ok=True)
        os.chmod(top, 0o755)
        start = kw.pop("start", True)
        fs = ShardFS(top, watchdog=watchdog, start=False, **kw)
        made.append(fs)
        if start:
            fs.start()
        return fs

    yield make
    problems = []
    if watchdog.fired:
        problems.append("watchdog: test ran longer than %ss; its daemons were SIGKILLed"
                        % watchdog.seconds)
    for fs in made:
        try:
            fs.teardown()
        except BaseException as e:  # keep tearing down the others
            problems.append("teardown raised %r" % e)
        problems += fs.problems
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def fs(shardfs_factory):
    """A mounted 4-shard store."""
    return shardfs_factory(sub="")


# --------------------------------------------------------------------------
# Trees


def sha256_file(path, dir_fd=None):
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def tree_snapshot(root, *, mtimes=True, dir_mtimes=True, xattrs=False, owners=True):
    """rel path -> tuple describing the entry; hard links appear as groups.

    Files: type, mode, size, sha256, mtime_ns; dirs: mode, mtime_ns; symlinks:
    target; devices: rdev. Returned as {"entries": {...}, "links": set of
    frozensets of rel paths that share an inode}.
    """
    root = str(root)
    entries = {}
    by_ino = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            e = {"mode": stat.S_IMODE(st.st_mode), "type": stat.S_IFMT(st.st_mode)}
            if owners:
                e["owner"] = (st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                e["sha256"] = sha256_file(full)
                if mtimes:
                    e["mtime_ns"] = st.st_mtime_ns
                if st.st_nlink > 1:
                    by_ino.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISDIR(st.st_mode):
                if dir_mtimes:
                    e["mtime_ns"] = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(full)
                del e["mode"]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            if xattrs and not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = {n: os.getxattr(full, n) for n in sorted(os.listxattr(full))
                               if n.startswith("user.")}
            entries[rel] = e
    links = {frozenset(v) for v in by_ino.values() if len(v) > 1}
    return {"entries": entries, "links": links}


def assert_same_tree(a, b):
    ea, eb = a["entries"], b["entries"]
    missing = sorted(set(ea) - set(eb))
    extra = sorted(set(eb) - set(ea))
    diff = sorted(k for k in set(ea) & set(eb) if ea[k] != eb[k])
    msg = []
    if missing:
        msg.append("missing: %s" % missing[:20])
    if extra:
        msg.append("extra: %s" % extra[:20])
    for k in diff[:20]:
        msg.append("%s: %r != %r" % (k, ea[k], eb[k]))
    if a["links"] != b["links"]:
        msg.append("hard link groups differ: %r != %r" % (a["links"], b["links"]))
    assert not msg, "trees differ:\n" + "\n".join(msg)


FILE_SIZES = [0, 1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20, (3 << 20) + 5]


def make_tree(root, seed=1, xattrs=False):
    """A deterministic, varied tree: nested dirs, files of awkward sizes with
    random bytes, modes, nanosecond mtimes, symlinks (relative, absolute,
    dangling), a hard link pair, optionally user xattrs. Returns the list of
    regular file rel paths."""
    rnd = random.Random(seed)
    root = str(root)
    os.makedirs(root, exist_ok=True)
    files = []
    dirs = ["", "a", "a/b", "a/b/c", "empty", "sp ace", "many"]
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i, size in enumerate(FILE_SIZES):
        rel = os.path.join(dirs[i % 4], "f%02d_%d.bin" % (i, size))
        with open(os.path.join(root, rel), "wb") as f:
            f.write(rnd.randbytes(size))
        files.append(rel)
    for i in range(40):
        rel = "many/n%03d.txt" % i
        Path(root, rel).write_text("file %d %s\n" % (i, "x" * rnd.randrange(300)))
        files.append(rel)
    Path(root, "sp ace", "ünïcødé név.txt").write_text("unicode\n")
    files.append("sp ace/ünïcødé név.txt")
    os.symlink("f00_0.bin", os.path.join(root, "rel_link"))
    os.symlink("../a/b", os.path.join(root, "a", "dirlink"))
    os.symlink("/nonexistent/target/x", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "a", "f01_1.bin"), os.path.join(root, "a", "b", "hardlink"))
    files.append("a/b/hardlink")
    os.chmod(os.path.join(root, "f00_0.bin"), 0o600)
    os.chmod(os.path.join(root, "a/b/c"), 0o700)
    os.chmod(os.path.join(root, "many/n000.txt"), 0o755)
    os.chmod(os.path.join(root, "many/n001.txt"), 0o444)
    if xattrs:
        os.setxattr(os.path.join(root, "f00_0.bin"), "user.empty", b"")
        os.setxattr(os.path.join(root, "a"), "user.dir", b"on a dir")
        os.setxattr(os.path.join(root, "many/n002.txt"), "user.bin", bytes(range(256)))
    # timestamps last, deepest first so directory mtimes stick
    t = 1_500_000_000_123_456_789
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda x: -x[0].count("/")):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                t += 1_000_000_007
                os.utime(p, ns=(t, t))
        t += 3
        os.utime(dirpath, ns=(t, t))
    return files


# --------------------------------------------------------------------------
# renameat2


AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags):
    """renameat2(2) via ctypes; raises OSError like os.rename."""
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        rc = fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    else:
        sysc = _libc.syscall
        sysc.restype = ctypes.c_long
        rc = sysc(ctypes.c_long(316), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(old)),
                  ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(new)), ctypes.c_uint(flags))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data, mode="wb"):
    if isinstance(data, str):
        data = data.encode()
    with open(path, mode) as f:
        f.write(data)
