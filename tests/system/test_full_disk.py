"""A full backing filesystem: writers get ENOSPC, the daemon survives, and
space comes back after a delete."""

import errno
import hashlib
import os

import pytest

from conftest import is_mounted, read_file, run, wait_for, write_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


@pytest.mark.timeout_s(300)
def test_enospc_and_recovery(shardfs_factory, tmp_top):
    tfs = os.path.join(tmp_top, "tfs")
    os.mkdir(tfs)
    run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", tfs])
    fs = None
    try:
        os.mkdir(os.path.join(tfs, "data"))
        fs = shardfs_factory(sub="", data_dir="./tfs/data")
        # An out-of-space condition may be logged, but it is not an internal error.
        fs.allow_stderr(r"(?i)no space|ENOSPC|MAP_FULL|full")

        keep = {}
        for i in range(5):
            data = os.urandom(20000 + i)
            write_file(fs.path("keep%d" % i), data)
            keep["keep%d" % i] = hashlib.sha256(data).hexdigest()

        r = run(["dd", "if=/dev/urandom", "of=" + fs.path("big"), "bs=1M", "count=256",
                 "conv=fsync"], check=False, timeout=180)
        assert r.returncode != 0, "wrote 256 MiB into a 64 MiB store?\n" + r.stderr
        assert "No space left on device" in r.stderr, r.stderr

        assert fs.proc.poll() is None, "daemon died when the disk filled"
        assert is_mounted(fs.mnt)
        for name, digest in keep.items():
            assert hashlib.sha256(read_file(fs.path(name))).hexdigest() == digest, name
        assert sorted(os.listdir(fs.mnt)) == ["big"] + sorted(keep)
        os.statvfs(fs.mnt)
        # small metadata-only operations may or may not fit; they must not crash
        try:
            os.mkdir(fs.path("maybe"))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e

        os.unlink(fs.path("big"))

        def write_again():
            try:
                write_file(fs.path("after"), payload)
                return True
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return False
        payload = os.urandom(8 << 20)
        wait_for(write_again, 10, "space to come back after deleting the big file", 0.2)
        assert read_file(fs.path("after")) == payload
        for name, digest in keep.items():
            assert hashlib.sha256(read_file(fs.path(name))).hexdigest() == digest, name

        fs.unmount()
        fs.assert_fsck_clean()
        fs.start()
        assert read_file(fs.path("after")) == payload
        fs.unmount()
    finally:
        if fs is not None:
            fs.teardown()
            fs.fsck_at_end = False          # done above; the tmpfs goes away next
        r = run(["umount", tfs], check=False, timeout=30)
        if r.returncode != 0:
            run(["umount", "-l", tfs], check=False, timeout=30)
