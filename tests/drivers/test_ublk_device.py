"""The ublk driver's commands on a real ring: FETCH / COMMIT_AND_FETCH / FUSED_SUBMIT_IO
(SPEC F7 via seed F26, F35-F37), with the low-level API and the high-level lease."""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import Iterator

import pytest

from aiofused import BufDir, Cqe, DriverFile, Ring
from aiofused_drivers.ublk import (
    UBLK_IO_COMMIT_AND_FETCH_REQ,
    UBLK_IO_FETCH_REQ,
    UBLK_IO_FUSED_SUBMIT_IO,
    UBLK_IO_RES_ABORT,
    BlockRequest,
    IoOp,
    UblkDriver,
    pack_io_cmd,
)


@pytest.fixture
def data_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(256)) * 64)  # 16 KiB
        f.flush()
        yield f.fileno()


class Done:
    def __init__(self) -> None:
        self.results: list[int] = []

    def __call__(self, req: BlockRequest, res: int) -> None:
        self.results.append(res)


async def one(ring: Ring) -> Cqe:
    cqe = await ring.wait_cqe()
    ring.cqe_seen(cqe)
    return cqe


def fetch(ring: Ring, df: DriverFile, tag: int, op: int = UBLK_IO_FETCH_REQ, res: int = 0) -> None:
    sqe = ring.get_sqe()
    assert sqe is not None
    sqe.prep_uring_cmd(df, op, pack_io_cmd(0, tag, res))
    sqe.user_data = 100 + tag


def fused(
    ring: Ring, df: DriverFile, tag: int, write: bool, fd: int, n: int, op: int, off: int = 0
) -> None:
    sqe = ring.get_sqe()
    assert sqe is not None
    sqe.prep_fused_cmd(df, op, 1, pack_io_cmd(0, tag, n))
    sqe.user_data = 1
    s = ring.get_sqe()
    assert s is not None
    if write:
        s.prep_write(fd, 0, n, off)
    else:
        s.prep_read(fd, 0, n, off)
    s.user_data = 2


async def test_fetch_fused_commit_cycle(ring: Ring, data_fd: int) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=2)
    df = ring.register_driver(drv)
    fetch(ring, df, 0)
    assert ring.submit() == 1
    assert ring.cq_ready() == 0  # armed, waiting for a request

    done = Done()
    buf = memoryview(bytearray(4096))
    drv.queue_rq(BlockRequest(IoOp.READ, 0, 4096, 0, buf, done))
    cqe = await one(ring)
    assert (cqe.user_data, cqe.res) == (100, 0)
    iod = drv.iod(0, 0)
    assert (iod.op, iod.start, iod.nr_bytes) == (IoOp.READ, 0, 4096)

    # Wrong direction for a READ request: P -EINVAL, the secondary -ECANCELED (F7/F26).
    fused(ring, df, 0, True, data_fd, 4096, UBLK_IO_FUSED_SUBMIT_IO)
    ring.submit()
    cqes = await ring.wait_cqes(2)
    assert [(c.user_data, c.res) for c in cqes] == [(2, -errno.ECANCELED), (1, -errno.EINVAL)]

    # Any other fused cmd_op: -EOPNOTSUPP (F35).
    fused(ring, df, 0, False, data_fd, 4096, UBLK_IO_FETCH_REQ)
    ring.submit()
    cqes = await ring.wait_cqes(2)
    assert cqes[1].res == -errno.EOPNOTSUPP

    # The right direction lends the request's own buffer.
    fused(ring, df, 0, False, data_fd, 4096, UBLK_IO_FUSED_SUBMIT_IO)
    ring.submit()
    cqes = await ring.wait_cqes(2)
    assert [(c.user_data, c.res) for c in cqes] == [(2, 4096), (1, 4096)]
    assert bytes(buf[:256]) == bytes(range(256))
    assert drv.lent == 0

    fetch(ring, df, 0, UBLK_IO_COMMIT_AND_FETCH_REQ, 4096)
    ring.submit()
    assert done.results == [4096]
    assert drv.inflight == 0
    # Re-armed: the next request completes the COMMIT_AND_FETCH.
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 0, 0, 0, None, done))
    cqe = await one(ring)
    assert (cqe.user_data, cqe.res) == (100, 0)
    # A request without data cannot be lent.
    fused(ring, df, 0, False, data_fd, 512, UBLK_IO_FUSED_SUBMIT_IO)
    ring.submit()
    cqes = await ring.wait_cqes(2)
    assert cqes[1].res == -errno.EINVAL
    fetch(ring, df, 0, UBLK_IO_COMMIT_AND_FETCH_REQ, 0)
    ring.submit()
    assert done.results == [4096, 0]

    drv.stop()
    cqe = await one(ring)
    assert cqe.res == UBLK_IO_RES_ABORT


async def test_write_request_is_src_only(ring: Ring, data_fd: int) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=1)
    df = ring.register_driver(drv)
    fetch(ring, df, 0)
    ring.submit()
    done = Done()
    payload = memoryview(bytearray(b"w" * 512))
    drv.queue_rq(BlockRequest(IoOp.WRITE, 0, 512, 0, payload, done))
    await one(ring)
    fused(ring, df, 0, False, data_fd, 512, UBLK_IO_FUSED_SUBMIT_IO)  # READ into a WRITE buf
    ring.submit()
    assert (await ring.wait_cqes(2))[1].res == -errno.EINVAL
    fused(ring, df, 0, True, data_fd, 512, UBLK_IO_FUSED_SUBMIT_IO)
    ring.submit()
    assert [c.res for c in await ring.wait_cqes(2)] == [512, 512]
    assert os.pread(data_fd, 512, 0) == b"w" * 512
    fetch(ring, df, 0, UBLK_IO_COMMIT_AND_FETCH_REQ, 512)
    ring.submit()
    assert done.results == [512]
    drv.stop()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT


async def test_command_errors(ring: Ring) -> None:
    drv = UblkDriver(size=4096, queue_depth=2)
    df = ring.register_driver(drv)
    fetch(ring, df, 0)
    fetch(ring, df, 0)  # already armed
    fetch(ring, df, 5)  # no such tag
    fetch(ring, df, 1, UBLK_IO_COMMIT_AND_FETCH_REQ)  # nothing to commit
    fetch(ring, df, 1, UBLK_IO_FUSED_SUBMIT_IO)  # fused op as a plain URING_CMD (F35)
    fetch(ring, df, 1, 0x7F)  # unknown
    ring.submit()
    cqes = await ring.wait_cqes(5)
    assert [c.res for c in cqes] == [-errno.EBUSY] + [-errno.EINVAL] * 4
    drv.stop()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT
    assert drv.stopped


async def test_commit_waits_for_lent_buffer(ring: Ring) -> None:
    """A COMMIT that races a fused submit ends the request only after the lend (F37)."""
    drv = UblkDriver(size=1 << 20, queue_depth=1)
    df = ring.register_driver(drv)
    fetch(ring, df, 0)
    ring.submit()
    done = Done()
    r, w = os.pipe()
    try:
        buf = memoryview(bytearray(16))
        drv.queue_rq(BlockRequest(IoOp.READ, 0, 16, 0, buf, done))
        await one(ring)
        fused(ring, df, 0, False, r, 16, UBLK_IO_FUSED_SUBMIT_IO, -1)  # waits for the pipe
        fetch(ring, df, 0, UBLK_IO_COMMIT_AND_FETCH_REQ, 16)
        ring.submit()
        assert drv.lent == 1
        assert done.results == []  # committed, but the buffer is still lent
        os.write(w, b"x" * 16)
        cqes = await ring.wait_cqes(2)
        assert [c.user_data for c in cqes] == [2, 1]
        assert done.results == [16] and drv.lent == 0
        assert bytes(buf) == b"x" * 16
    finally:
        os.close(r)
        os.close(w)
    drv.stop()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT


async def test_high_level_lease_on_request_buffer(ring: Ring, data_fd: int) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=1)
    df = ring.register_driver(drv)
    fetch(ring, df, 0)
    ring.submit()
    done = Done()
    buf = memoryview(bytearray(8192))
    drv.queue_rq(BlockRequest(IoOp.READ, 0, 8192, 0, buf, done))
    await one(ring)
    cmd = pack_io_cmd(0, 0, 8192)
    async with ring.fused(df, UBLK_IO_FUSED_SUBMIT_IO, cmd=cmd, buf_dir=BufDir.DEST) as lease:
        got = await asyncio.gather(
            lease.read(data_fd, 0, at=0, nbytes=4096),
            lease.read(data_fd, 4096, at=4096, nbytes=4096),
        )
    assert list(got) == [4096, 4096]
    assert lease.result == 8192
    assert bytes(buf[:256]) == bytes(range(256)) and bytes(buf[4096:4352]) == bytes(range(256))
    with pytest.raises(OSError) as ei:
        async with ring.fused(df, UBLK_IO_FUSED_SUBMIT_IO, cmd=cmd, buf_dir=BufDir.SRC) as lease:
            await lease.write(data_fd, 0)
    assert ei.value.errno == errno.EINVAL
    fetch(ring, df, 0, UBLK_IO_COMMIT_AND_FETCH_REQ, 8192)
    ring.submit()
    assert done.results == [8192]
    drv.stop()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT
