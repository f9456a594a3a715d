"""The asyncio backend's regular-file path: inline ``RWF_NOWAIT`` first, the pool after.

Real files in ``tmp_path``.  Page-cache state is set with ``posix_fadvise`` and checked
with ``mincore`` (which, unlike a probing read, starts no readahead); where the
filesystem does not evict or refuses ``RWF_NOWAIT`` (tmpfs), the tests that need it
skip, or check the data only, as each one says.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aiofused import Ring
from aiofused._abi import Op
from aiofused.backends._asyncio import AsyncioBackend
from aiofused.backends._base import IoOp
from tests.conftest import ENOENT, add, pairs

pytestmark = pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"),
    reason="needs Linux preadv2 RWF_NOWAIT and posix_fadvise",
)

PAGE = mmap.PAGESIZE
SIZE = 256 << 10
EALREADY = -errno.EALREADY
EAGAIN = -errno.EAGAIN

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(fd: int, offset: int, length: int) -> list[bool]:
    """Which pages of ``[offset, offset + length)`` are in the page cache (mincore)."""
    start = offset // PAGE * PAGE
    size = offset + length - start
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(b & 1) for b in vec.raw]
    finally:
        _libc.munmap(addr, size)


def evict(fd: int, offset: int, length: int) -> bool:
    """Drop ``[offset, offset + length)`` from the page cache; True if verified gone."""
    os.fsync(fd)  # DONTNEED only drops clean pages
    # No readahead on this file from now on: a read still in flight from an earlier
    # access (the pool's, the fixture's) could bring the pages back after the check.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    return not any(resident(fd, offset, length))


def refills(fd: int, offset: int, length: int) -> bool:
    """Whether this machine's page cache brings an evicted range back by itself (seen under
    load: the reads then find the pages cached again however often they are evicted).

    A diagnostic for after a test could not observe an uncached read: evict the range and
    probe it at once with ``RWF_NOWAIT``; if even that finds it cached, the environment,
    not the backend, kept the read inline (the probe itself may start readahead)."""
    if not evict(fd, offset, length):
        return True
    try:
        os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


def cached_up_to(fd: int, at: int, size: int) -> bool:
    """Leave ``[0, at)`` cached and ``[at, size)`` not; True if verified.

    Evict everything, read the head back, evict the tail: the pages a write left may
    sit in one large folio, which DONTNEED only drops whole.
    """
    evict(fd, 0, size)
    os.pread(fd, at, 0)
    return evict(fd, at, size - at) and all(resident(fd, 0, at))


def nowait_reads(directory: Path) -> bool:
    """Whether files in ``directory`` serve cached reads with ``RWF_NOWAIT``.

    Probed on a file of its own: a probing read of an uncached page starts readahead.
    """
    probe = directory / "nowait-probe.bin"
    probe.write_bytes(b"x" * PAGE)
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.pread(fd, PAGE, 0)
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True  # evicted meanwhile: still supported
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)
        probe.unlink()
    return True


@pytest.fixture
def cached_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An O_RDWR fd on a 256 KiB file whose every page is cached, and its content."""
    content = os.urandom(SIZE)
    path = tmp_path / "nowait.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, SIZE, 0) == content
        yield fd, content
    finally:
        os.close(fd)


def result_to(fut: asyncio.Future[int]) -> Callable[[int, int], None]:
    """A backend ``complete`` callback that resolves ``fut`` with ``res``."""

    def complete(res: int, flags: int) -> None:
        fut.set_result(res)

    return complete


def backend_of(ring: Ring) -> AsyncioBackend:
    """The ring's asyncio backend."""
    be = ring._backend
    assert isinstance(be, AsyncioBackend)
    return be


async def read_once(ring: Ring, fd: int, n: int, offset: int, flags: int = 0) -> tuple[int, bytes]:
    """One READ through the ring; ``(res, the bytes read)``."""
    buf = bytearray(n)
    sqe = add(ring, 1, "read", fd, buf, n, offset)
    sqe.rw_flags = flags
    ring.submit()
    (cqe,) = await asyncio.wait_for(ring.wait_cqes(1), 10)
    res = cqe.res
    return res, bytes(buf[: max(res, 0)])


async def test_cached_read_is_inline(cached_file: tuple[int, bytes], tmp_path: Path) -> None:
    fd, content = cached_file
    if not nowait_reads(tmp_path):
        pytest.skip("this filesystem refuses RWF_NOWAIT reads")
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        for off in (0, 4096, 100_000, SIZE - 65536):
            res, data = await read_once(ring, fd, 65536, off)
            assert (res, data) == (65536, content[off : off + 65536])
        assert be.inline_ops == 4
        assert be.pool_ops == be.partial_ops == 0
        assert be._pool is None  # the thread pool was never created


# A NOWAIT read of an uncached page starts readahead; on a fast disk that I/O may end
# before the read looks again, and the read is then served inline: a valid kernel
# outcome.  The tests that want the pool path retry the setup a few times for it.
TRIES = 8


async def test_uncached_read_goes_to_pool(cached_file: tuple[int, bytes], tmp_path: Path) -> None:
    fd, content = cached_file
    checked = not nowait_reads(tmp_path)
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        for _ in range(TRIES):
            verified = evict(fd, 0, SIZE)
            pool_before = be.pool_ops
            res, data = await read_once(ring, fd, 65536, 8192)
            assert (res, data) == (65536, content[8192 : 8192 + 65536])
            if not verified:
                break  # no eviction here (e.g. tmpfs): the data is what counts
            if be.pool_ops == pool_before + 1:
                checked = True
                break
        if not checked and verified and refills(fd, 8192, 65536):
            pytest.skip("the page cache refills the evicted range here")
        assert checked or not verified, "never went to the pool"
        assert be.partial_ops == 0


async def _half_cached_read(
    tmp_path: Path, fd: int, content: bytes, off: int, n: int, cached: int
) -> None:
    """Read ``n`` at ``off`` with the file cached up to ``cached`` only, until it is split."""
    supported = nowait_reads(tmp_path)
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        inline = 0  # tries served wholly inline: readahead won the race (see TRIES)
        for _ in range(TRIES):
            verified = cached_up_to(fd, cached, len(content))
            partial_before, inline_before, pool_before = be.partial_ops, be.inline_ops, be.pool_ops
            res, data = await read_once(ring, fd, n, off)
            want = content[off : off + n]
            assert (res, data) == (len(want), want)
            if not (verified and supported):
                return  # cannot half-evict here: correctness is what is checked
            if be.partial_ops == partial_before + 1:
                assert be._pool is not None
                return
            if be.inline_ops == inline_before + 1 and be.pool_ops == pool_before:
                inline += 1
        if inline == TRIES or refills(fd, cached, len(content) - cached):
            pytest.skip("the page cache refills the evicted range here")
        raise AssertionError("never split between inline and pool")


async def test_short_inline_read_continues_in_pool(
    cached_file: tuple[int, bytes], tmp_path: Path
) -> None:
    fd, content = cached_file
    off, n = SIZE // 2 - 32768, 65536
    await _half_cached_read(tmp_path, fd, content, off, n, off + n // 2)


async def test_short_inline_read_across_eof_continues(tmp_path: Path) -> None:
    """Half cached, half not, and EOF inside the uncached half: the pool stops at EOF."""
    content = os.urandom(SIZE + 123)
    path = tmp_path / "tail.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        await _half_cached_read(tmp_path, fd, content, SIZE // 2 - 32768, SIZE, SIZE // 2)
    finally:
        os.close(fd)


async def test_caller_nowait_on_uncached_is_eagain(
    cached_file: tuple[int, bytes], tmp_path: Path
) -> None:
    fd, content = cached_file
    if not nowait_reads(tmp_path):
        pytest.skip("no RWF_NOWAIT here")
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        for _ in range(TRIES):
            if not evict(fd, 0, SIZE):
                pytest.skip("cannot evict here")
            res, data = await read_once(ring, fd, 4096, 128 << 10, flags=os.RWF_NOWAIT)
            assert be.pool_ops == 0  # the caller's RWF_NOWAIT: never punted, as io_uring
            if res == EAGAIN:
                break
            assert (res, data) == (4096, content[128 << 10 : (128 << 10) + 4096])
        else:
            if refills(fd, 128 << 10, 4096):
                pytest.skip("the page cache refills the evicted range here")
            raise AssertionError("never got -EAGAIN")


@pytest.mark.parametrize(
    ("size", "offset", "n", "want"),
    [
        (10_000, 8192, 8192, 10_000 - 8192),  # across EOF: short
        (10_000, 10_000, 4096, 0),  # at EOF
        (10_000, 50_000, 4096, 0),  # past EOF
        (10_000, 0, 0, 0),  # zero length
    ],
)
async def test_read_at_eof(tmp_path: Path, size: int, offset: int, n: int, want: int) -> None:
    content = os.urandom(size)
    path = tmp_path / "eof.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, 0)
        async with Ring(8, backend="asyncio") as ring:
            be = backend_of(ring)
            res, data = await read_once(ring, fd, n, offset)
            assert (res, data) == (want, content[offset : offset + want])
            if nowait_reads(tmp_path) and all(resident(fd, 0, size)):
                assert be.pool_ops == 0  # EOF is found inline, no trip to the pool
    finally:
        os.close(fd)


async def test_write_extends_file(cached_file: tuple[int, bytes]) -> None:
    fd, content = cached_file
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        payload = os.urandom(10_000)
        at = SIZE + 5000  # leaves a hole
        add(ring, 1, "write", fd, payload, len(payload), at)
        add(ring, 2, "write", fd, b"abc", 3, 10)
        ring.submit()
        got = sorted(pairs(await asyncio.wait_for(ring.wait_cqes(2), 10)))
        assert got == [(1, len(payload)), (2, 3)]
        assert os.fstat(fd).st_size == at + len(payload)
        want = content[:10] + b"abc" + content[13:] + bytes(5000) + payload
        assert os.pread(fd, len(want) + 10, 0) == want
        try:
            os.pwritev(fd, [b"x"], 0, os.RWF_NOWAIT)
            refused = False
        except OSError as exc:
            refused = exc.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        key = (os.fstat(fd).st_dev, True)
        assert (key in be._no_nowait) == refused  # a refusal is remembered (ext4 writes)
        if refused:
            assert be.pool_ops == 2 and be.inline_ops == 0
        else:
            assert be.inline_ops == 2 and be.pool_ops == 0


async def test_completion_never_synchronous(cached_file: tuple[int, bytes]) -> None:
    fd, content = cached_file
    async with Ring(8, backend="asyncio") as ring:
        buf = bytearray(4096)
        add(ring, 7, "read", fd, buf, 4096, 4096)
        assert ring.submit() == 1
        assert ring.peek_cqe() is None  # even an inline read posts on a later loop turn
        assert ring.in_flight() == 1
        (cqe,) = await asyncio.wait_for(ring.wait_cqes(1), 10)
        assert (cqe.user_data, cqe.res) == (7, 4096)
        assert bytes(buf) == content[4096:8192]


async def test_backend_contract_inline(cached_file: tuple[int, bytes], tmp_path: Path) -> None:
    """Directly on the backend: no call inside start/cancel, ENOENT once done inline."""
    fd, content = cached_file
    be = AsyncioBackend(asyncio.get_running_loop())
    try:
        buf = bytearray(8192)
        calls: list[tuple[int, int]] = []
        answers: list[int] = []
        h = be.start(IoOp(Op.READ, fd, memoryview(buf), 8192, 0), lambda r, f: calls.append((r, f)))
        assert calls == [] and be.in_flight() == 1
        be.cancel(h, answers.append)
        assert answers == []  # the answer comes later too
        for _ in range(3):
            await asyncio.sleep(0)
        assert calls == [(8192, 0)] and be.in_flight() == 0
        assert bytes(buf) == content[:8192]
        if nowait_reads(tmp_path):
            assert answers == [ENOENT] and be._pool is None
    finally:
        await be.aclose()


async def test_cancel_after_inline_completion(
    cached_file: tuple[int, bytes], tmp_path: Path
) -> None:
    fd, content = cached_file
    async with Ring(8, backend="asyncio") as ring:
        buf = bytearray(4096)
        add(ring, 1, "read", fd, buf, 4096, 0)
        add(ring, 2, "cancel", 1)
        ring.submit()
        got = dict(pairs(await asyncio.wait_for(ring.wait_cqes(2), 10)))
        if nowait_reads(tmp_path):
            # done inline during submit, as the kernel does for a cached read
            assert got == {1: 4096, 2: ENOENT}
        else:
            assert got[1] in (4096, -errno.ECANCELED)
            assert got[2] in (0, EALREADY, ENOENT)
        if got[1] == 4096:
            assert bytes(buf) == content[:4096]


async def test_cancel_partial_is_ealready(cached_file: tuple[int, bytes], tmp_path: Path) -> None:
    """Bytes already moved inline: cancel cannot stop it, the op completes in full."""
    fd, content = cached_file
    off, n = SIZE // 2 - 32768, 65536
    if not nowait_reads(tmp_path):
        pytest.skip("no RWF_NOWAIT here")
    loop = asyncio.get_running_loop()
    be = AsyncioBackend(loop)
    try:
        for _ in range(TRIES):
            if not cached_up_to(fd, off + n // 2, SIZE):
                pytest.skip("cannot half-evict the range here")
            buf = bytearray(n)
            done: asyncio.Future[int] = loop.create_future()
            answer: asyncio.Future[int] = loop.create_future()
            partial_before = be.partial_ops
            h = be.start(IoOp(Op.READ, fd, memoryview(buf), n, off), result_to(done))
            be.cancel(h, answer.set_result)
            split = be.partial_ops == partial_before + 1
            res = await asyncio.wait_for(answer, 10)
            assert await asyncio.wait_for(done, 10) == n
            assert bytes(buf) == content[off : off + n]
            if split:
                assert res == EALREADY
                break
        else:
            if refills(fd, off + n // 2, SIZE - off - n // 2):
                pytest.skip("the page cache refills the evicted range here")
            raise AssertionError("never split between inline and pool")
    finally:
        await be.aclose()


async def test_direct_and_position_reads_use_pool(tmp_path: Path) -> None:
    """O_DIRECT (it would wait for the device) and offset -1 never run inline."""
    path = tmp_path / "direct.bin"
    content = os.urandom(16 * PAGE)
    path.write_bytes(content)
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        dfd = -1  # no O_DIRECT on this filesystem (tmpfs)
    pfd = os.open(path, os.O_RDONLY)
    try:
        async with Ring(8, backend="asyncio") as ring:
            be = backend_of(ring)
            if dfd >= 0:
                with mmap.mmap(-1, 4 * PAGE) as m:  # page-aligned, as O_DIRECT wants
                    add(ring, 1, "read", dfd, m, 4 * PAGE, 4 * PAGE)
                    ring.submit()
                    (cqe,) = await asyncio.wait_for(ring.wait_cqes(1), 10)
                    assert cqe.res == 4 * PAGE
                    assert m[:] == content[4 * PAGE : 8 * PAGE]
                assert (be.inline_ops, be.pool_ops) == (0, 1)
            res, data = await read_once(ring, pfd, 100, -1)
            assert (res, data) == (100, content[:100])
            assert be.inline_ops == 0
    finally:
        os.close(pfd)
        if dfd >= 0:
            os.close(dfd)


async def test_disabled_flag_keeps_old_path(
    cached_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, content = cached_file
    monkeypatch.setattr(AsyncioBackend, "_NOWAIT_DEFAULT", False)
    async with Ring(8, backend="asyncio") as ring:
        be = backend_of(ring)
        res, data = await read_once(ring, fd, 4096, 0)
        assert (res, data) == (4096, content[:4096])
        assert (be.inline_ops, be.pool_ops) == (0, 1)
