"""O_DIRECT writes next to buffered reads of the same file, same mount.

The kernel drops cached pages around a direct write, but not after an
asynchronous one (io_submit): a buffered read that fetched the old bytes
while the write was in flight left them in the page cache, and with
keep_cache (single node, cache_timeout > 0) every later read returned them.
Each completed direct write must be seen by every read that follows.
"""

import ctypes
import mmap
import os

import pytest

from conftest import read_file, write_conf

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
NR_IO_SETUP, NR_IO_DESTROY, NR_IO_GETEVENTS, NR_IO_SUBMIT = 206, 207, 208, 209  # x86_64
IOCB_CMD_PWRITE = 1


class _Iocb(ctypes.Structure):
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


class Aio:
    """Linux native AIO (what libaio and fio's libaio engine use), by syscall."""

    def __init__(self, depth):
        assert ctypes.sizeof(_Iocb) == 64 and ctypes.sizeof(_IoEvent) == 32
        self.ctx = ctypes.c_ulong(0)
        _check(_syscall(ctypes.c_long(NR_IO_SETUP), ctypes.c_uint(depth), ctypes.byref(self.ctx)))
        self.live = {}

    def pwrite(self, fd, buf, off, tag):
        """Submit a write of the whole mmap buf at off; returns at once."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        cb = _Iocb(aio_data=tag, aio_lio_opcode=IOCB_CMD_PWRITE, aio_fildes=fd, aio_buf=addr,
                   aio_nbytes=len(buf), aio_offset=off)
        self.live[tag] = cb  # the kernel reads it until the write completes
        arr = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))
        assert _check(_syscall(ctypes.c_long(NR_IO_SUBMIT), self.ctx, ctypes.c_long(1), arr)) == 1

    def wait_one(self):
        """Wait for a completion: (tag, result)."""
        ev = (_IoEvent * 1)()
        while _check(_syscall(ctypes.c_long(NR_IO_GETEVENTS), self.ctx, ctypes.c_long(1),
                              ctypes.c_long(1), ev, None)) != 1:
            pass
        self.live.pop(ev[0].data)
        return ev[0].data, ev[0].res

    def close(self):
        _syscall(ctypes.c_long(NR_IO_DESTROY), self.ctx)


@pytest.fixture
def cached_fs(shardfs_factory):
    """A store with the kernel caches on, as shards.conf has them by default
    (the page cache is what is under test)."""
    fs = shardfs_factory(sub="", start=False)
    write_conf(fs.conf, cache_timeout=3600)
    return fs.start()


SIZE = 1 << 20
ROUNDS = 400


def _pattern(i):
    return (b"%08d" % i) * (SIZE // 8)


def test_buffered_reads_see_async_direct_writes(cached_fs):
    fs = cached_fs
    p = fs.path("f")
    with open(p, "wb") as f:
        f.write(_pattern(0))
    wfd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    rfd = os.open(p, os.O_RDONLY)
    aio = Aio(1)
    buf = mmap.mmap(-1, SIZE)  # page-aligned, as O_DIRECT wants
    stale = []
    raced = 0
    try:
        assert os.pread(rfd, SIZE, 0) == _pattern(0)  # in the page cache now
        for i in range(1, ROUNDS + 1):
            buf[:] = _pattern(i)
            aio.pwrite(wfd, buf, 0, i)
            # A buffered read while the write is in flight: old or new bytes
            # are both right here, but what it caches must not outlive the write.
            raced += os.pread(rfd, SIZE, 0) != _pattern(i)
            tag, res = aio.wait_one()
            assert (tag, res) == (i, SIZE)
            if os.pread(rfd, SIZE, 0) != _pattern(i):
                stale.append(i)
            fd2 = os.open(p, os.O_RDONLY)
            try:
                if os.pread(fd2, SIZE, 0) != _pattern(i) and (not stale or stale[-1] != i):
                    stale.append(i)
            finally:
                os.close(fd2)
    finally:
        aio.close()
        os.close(wfd)
        os.close(rfd)
    print("%d of %d reads in flight saw the old bytes" % (raced, ROUNDS))
    assert not stale, "%d of %d completed direct writes were not seen by a buffered read " \
        "(rounds %s...)" % (len(stale), ROUNDS, stale[:10])
    fs.remount()
    assert read_file(p) == _pattern(ROUNDS)


def test_direct_writes_land_where_buffered_io_expects(cached_fs):
    """Direct writes at several offsets (synchronous ones: the kernel's own
    invalidation; and past the end) interleaved with buffered writes and reads:
    the file reads back as a model of it says, through the cache and after a
    remount."""
    fs = cached_fs
    p = fs.path("g")
    model = bytearray(os.urandom(3 * SIZE))
    with open(p, "wb") as f:
        f.write(model)
    wfd = os.open(p, os.O_RDWR | os.O_DIRECT)
    bfd = os.open(p, os.O_RDWR)
    buf = mmap.mmap(-1, 64 << 10)
    try:
        for i in range(60):
            off = (i * 7 % 50) * (64 << 10)
            data = os.urandom(len(buf))
            if i % 3:
                buf[:] = data
                assert os.pwritev(wfd, [buf], off) == len(buf)
            else:
                assert os.pwrite(bfd, data, off) == len(data)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
            assert os.pread(bfd, len(model) + 1, 0) == bytes(model), "round %d" % i
    finally:
        os.close(wfd)
        os.close(bfd)
    fs.remount()
    assert read_file(p) == bytes(model)
