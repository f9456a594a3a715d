"""Standalone flagless READ/WRITE/SEND/RECV on the uring backend run as is (no record).

The ring hands such an SQE straight to the kernel (``Backend.start_direct``); these tests
check that the ring's contract still holds for it: results, cancellation by user_data,
close, drain, CQE counting by a TIMEOUT, and the buffer pinned until the CQE.  Every
test also checks that the op really took that path (the backend's ``direct_ops``), and
that what it must not take goes the general way.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aiofused import Cqe, Ring, SqeFlag
from aiofused._abi import IORING_ASYNC_CANCEL_ALL
from aiofused._abi import uring as abi
from aiofused.backends._uring import UringBackend

WAIT = 10.0


@pytest.fixture
async def ring() -> AsyncIterator[Ring]:
    probe = UringBackend.probe()
    if not probe.available:
        pytest.skip(probe.reason)
    async with Ring(64, backend="uring") as r:
        yield r


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def direct(ring: Ring) -> int:
    backend = ring._backend
    assert isinstance(backend, UringBackend)
    return backend.direct_ops


async def cqes(ring: Ring, n: int) -> dict[int, Cqe]:
    out: dict[int, Cqe] = {}
    while len(out) < n:
        cqe = await asyncio.wait_for(ring.wait_cqe(), WAIT)
        ring.cqe_seen(cqe)
        out[cqe.user_data] = cqe
    return out


async def test_file_and_socket_ops_run_direct(
    ring: Ring, tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8192))
    fd = os.open(path, os.O_RDWR)
    try:
        before = direct(ring)
        buf = bytearray(4096)
        ring.get_sqe().prep_read(fd, buf, 4096, 4096)  # type: ignore[union-attr]
        src = bytearray(b"x" * 100)
        ring.get_sqe().prep_write(fd, memoryview(src), 100, 8192)  # type: ignore[union-attr]
        ring.get_sqe().prep_send(pair[0].fileno(), bytearray(b"hello"))  # type: ignore[union-attr]
        rbuf = bytearray(16)
        ring.get_sqe().prep_recv(pair[1].fileno(), rbuf)  # type: ignore[union-attr]
        for i, sqe in enumerate(ring._sq):
            sqe.user_data = i + 1
        assert ring.submit() == 4
        assert direct(ring) == before + 4
        got = await cqes(ring, 4)
        assert (got[1].res, got[2].res, got[3].res, got[4].res) == (4096, 100, 5, 5)
        assert bytes(buf) == path.read_bytes()[4096:8192]
        assert path.read_bytes()[8192:] == b"x" * 100
        assert bytes(rbuf[:5]) == b"hello"
        src.extend(b"!")  # unpinned once the CQE is reaped
    finally:
        os.close(fd)
    assert ring.statistics()["in_flight"] == 0


async def test_what_it_must_not_take_goes_the_general_way(ring: Ring, tmp_path: Path) -> None:
    """Flags, a too-short buffer, a bad fd, bytes and a chain: the ring's own checks."""
    path = tmp_path / "f"
    path.write_bytes(b"a" * 64)
    fd = os.open(path, os.O_RDWR)
    try:
        before = direct(ring)
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, bytearray(8), 16, 0)  # longer than the buffer
        s.user_data = 1
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(-1, bytearray(8), 8, 0)
        s.user_data = 2
        s = ring.get_sqe()
        assert s is not None
        s.prep_write(fd, b"read-only", 9, 0)
        s.user_data = 3
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, bytearray(8), 8, 0)
        s.flags |= SqeFlag.IO_LINK
        s.user_data = 4
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, bytearray(8), 8, 0)
        s.user_data = 5
        assert ring.submit() == 5
        got = await cqes(ring, 5)
        assert got[1].res == -errno.EFAULT
        assert got[2].res == -errno.EBADF
        assert (got[3].res, got[4].res, got[5].res) == (9, 8, 8)
        assert direct(ring) == before  # none of them ran as is
    finally:
        os.close(fd)


async def test_cancel_by_user_data_finds_direct_ops(
    ring: Ring, pair: tuple[socket.socket, socket.socket]
) -> None:
    bufs = [bytearray(8) for _ in range(3)]
    before = direct(ring)
    for i, ud in enumerate((7, 7, 8)):
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(pair[1].fileno(), bufs[i])
        s.user_data = ud
    ring.submit()
    assert direct(ring) == before + 3
    s = ring.get_sqe()
    assert s is not None
    s.prep_cancel(7, IORING_ASYNC_CANCEL_ALL)
    s.user_data = 100
    s = ring.get_sqe()
    assert s is not None
    s.prep_cancel(8)
    s.user_data = 101
    s = ring.get_sqe()
    assert s is not None
    s.prep_cancel(9)  # nothing has it
    s.user_data = 102
    ring.submit()
    seen: list[Cqe] = []
    while len(seen) < 6:
        cqe = await asyncio.wait_for(ring.wait_cqe(), WAIT)
        ring.cqe_seen(cqe)
        seen.append(cqe)
    by = {(c.user_data, c.res) for c in seen}
    assert (100, 2) in by  # both RECVs with user_data 7
    assert (101, 0) in by
    assert (102, -errno.ENOENT) in by
    assert sorted(c.res for c in seen if c.user_data in (7, 8)) == [-errno.ECANCELED] * 3
    for b in bufs:
        b.extend(b"!")  # every buffer unpinned
    assert ring.statistics()["in_flight"] == 0


async def test_close_cancels_direct_ops_and_unpins(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    probe = UringBackend.probe()
    if not probe.available:
        pytest.skip(probe.reason)
    buf = bytearray(8)
    async with Ring(8, backend="uring") as ring:
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(pair[1].fileno(), buf)
        s.user_data = 5
        before = direct(ring)
        ring.submit()
        assert direct(ring) == before + 1
        with pytest.raises(BufferError):
            buf.extend(b"!")  # the kernel may write it: pinned
        assert ring.statistics()["in_flight"] == 1
    buf.extend(b"!")
    assert ring.statistics()["in_flight"] == 0


async def test_drain_waits_for_a_direct_op(
    ring: Ring, pair: tuple[socket.socket, socket.socket]
) -> None:
    buf = bytearray(8)
    s = ring.get_sqe()
    assert s is not None
    s.prep_recv(pair[1].fileno(), buf)
    s.user_data = 1
    s = ring.get_sqe()
    assert s is not None
    s.prep_nop()
    s.flags |= SqeFlag.IO_DRAIN
    s.user_data = 2
    before = direct(ring)
    ring.submit()
    assert direct(ring) == before + 1
    for _ in range(5):
        await asyncio.sleep(0)
    assert ring.peek_cqe() is None  # the drained NOP waits for the RECV
    pair[0].send(b"abc")
    got = await cqes(ring, 2)
    assert (got[1].res, got[2].res) == (3, 0)


async def test_a_counting_timeout_counts_direct_cqes(ring: Ring, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"z" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = ring.get_sqe()
        assert s is not None
        s.prep_timeout(WAIT, count=1)
        s.user_data = 1
        ring.submit()
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, bytearray(4096), 4096, 0)
        s.user_data = 2
        before = direct(ring)
        ring.submit()
        assert direct(ring) == before + 1
        got = await cqes(ring, 2)
        assert (got[1].res, got[2].res) == (0, 4096)  # the count was met, not -ETIME
    finally:
        os.close(fd)


async def test_a_hard_enter_error_fails_direct_ops(
    ring: Ring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQEs the kernel never consumed are taken back and fail with its errno, unpinned."""
    path = tmp_path / "f"
    path.write_bytes(b"q" * 64)
    fd = os.open(path, os.O_RDONLY)
    try:
        real = abi.io_uring_enter_raw
        monkeypatch.setattr(abi, "io_uring_enter_raw", lambda *a: -errno.EFAULT)
        buf = bytearray(32)
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, buf, 32, 0)
        s.user_data = 9
        before = direct(ring)
        ring.submit()
        assert direct(ring) == before + 1
        got = await cqes(ring, 1)
        assert got[9].res == -errno.EFAULT
        buf.extend(b"unpinned")
        assert ring.statistics()["in_flight"] == 0
        monkeypatch.setattr(abi, "io_uring_enter_raw", real)
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, buf, 32, 0)
        s.user_data = 10
        ring.submit()
        assert (await cqes(ring, 1))[10].res == 32
    finally:
        os.close(fd)


async def test_a_drain_on_a_chain_member_drains_the_next_standalone_op(
    ring: Ring, pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    """An IO_DRAIN on a chain's member drains the unit after the chain too (the kernel's
    drain_next): that READ waits for the blocked RECV, so it cannot run as is."""
    path = tmp_path / "f"
    path.write_bytes(b"r" * 64)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(pair[1].fileno(), bytearray(8))  # blocks until the peer sends
        s.user_data = 1
        s = ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.flags |= SqeFlag.IO_LINK
        s.user_data = 2
        s = ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.flags |= SqeFlag.IO_DRAIN
        s.user_data = 3
        s = ring.get_sqe()
        assert s is not None
        s.prep_read(fd, bytearray(64), 64, 0)
        s.user_data = 4
        before = direct(ring)
        ring.submit()
        for _ in range(5):
            await asyncio.sleep(0)
        seen = []
        while (c := ring.peek_cqe()) is not None:
            ring.cqe_seen(c)
            seen.append(c.user_data)
        assert 4 not in seen  # drained behind the RECV
        assert direct(ring) == before + 1  # the RECV only
        pair[0].send(b"go")
        got = await cqes(ring, 4 - len(seen))
        assert got[4].res == 64
    finally:
        os.close(fd)


async def test_a_pending_drain_next_is_taken_by_the_next_op_not_skipped(ring: Ring) -> None:
    """A chain member's IO_DRAIN drains the next unit, even one submitted later, when the
    chain has long completed: a flagless RECV that comes next takes that drain (it must
    not run as is), so a RECV after it waits for it even with its data there."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        s = ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.flags |= SqeFlag.IO_LINK
        s.user_data = 1
        s = ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.flags |= SqeFlag.IO_DRAIN
        s.user_data = 2
        ring.submit()
        assert set((await cqes(ring, 2)).keys()) == {1, 2}
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(a1.fileno(), bytearray(1), 1)  # no data yet
        s.user_data = 3
        ring.submit()
        b2.send(b"z")
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(a2.fileno(), bytearray(1), 1)  # its data is there
        s.user_data = 4
        ring.submit()
        for _ in range(10):
            await asyncio.sleep(0.005)
        assert ring.peek_cqe() is None  # 4 waits behind the drained 3
        b1.send(b"y")
        got = await cqes(ring, 2)
        assert (got[3].res, got[4].res) == (1, 1)
    finally:
        for s_ in (a1, b1, a2, b2):
            s_.close()
