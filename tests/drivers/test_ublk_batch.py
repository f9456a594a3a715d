"""Batched fetch and commit (``UblkDriver(batch_io=True)``, the kernel's UBLK_F_BATCH_IO):
FETCH_IO_CMDS hands over every tag that landed, COMMIT_IO_CMDS ends many requests at
once; the fused submit on a request's own buffer is the same as on a per-tag device.
And the batch server: one fetch and one commit serve a burst of requests, and a lent
buffer outlives nothing in flight, even when the ring is closed mid-request."""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from aiofused import Cqe, DriverFile, Ring, SetupFlag, UringCmd
from aiofused_drivers.ublk import (
    UBLK_IO_COMMIT_AND_FETCH_REQ,
    UBLK_IO_COMMIT_IO_CMDS,
    UBLK_IO_FETCH_IO_CMDS,
    UBLK_IO_FETCH_REQ,
    UBLK_IO_FUSED_SUBMIT_IO,
    UBLK_IO_RES_ABORT,
    BlockRequest,
    Ctx,
    IoOp,
    LoopTarget,
    Piece,
    RingHost,
    Target,
    UblkDriver,
    UblkServer,
    pack_batch_cmd,
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
        self.results: list[tuple[int, int]] = []

    def __call__(self, req: BlockRequest, res: int) -> None:
        self.results.append((req.offset, res))


async def one(ring: Ring) -> Cqe:
    cqe = await ring.wait_cqe()
    ring.cqe_seen(cqe)
    return cqe


def cmd(ring: Ring, df: DriverFile, op: int, data: bytes, user_data: int) -> None:
    sqe = ring.get_sqe()
    assert sqe is not None
    sqe.prep_uring_cmd(df, op, data)
    sqe.user_data = user_data


def fetch(ring: Ring, df: DriverFile, user_data: int = 7) -> None:
    cmd(ring, df, UBLK_IO_FETCH_IO_CMDS, pack_batch_cmd(0), user_data)


def commit(ring: Ring, drv: UblkDriver, df: DriverFile, pairs: list[tuple[int, int]]) -> None:
    elems = [x for pair in pairs for x in pair]
    addr = drv.commit_buffer(0, elems)
    cmd(ring, df, UBLK_IO_COMMIT_IO_CMDS, pack_batch_cmd(0, len(pairs), addr), 9)


def fused_read(ring: Ring, df: DriverFile, tag: int, fd: int, n: int, off: int) -> None:
    sqe = ring.get_sqe()
    assert sqe is not None
    sqe.prep_fused_cmd(df, UBLK_IO_FUSED_SUBMIT_IO, 1, pack_io_cmd(0, tag, n))
    sqe.user_data = 1
    s = ring.get_sqe()
    assert s is not None
    s.prep_read(fd, 0, n, off)
    s.user_data = 2


async def test_one_fetch_hands_over_every_request_and_one_commit_ends_them(
    ring: Ring, data_fd: int
) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=4, batch_io=True)
    df = ring.register_driver(drv)
    fetch(ring, df)
    assert ring.submit() == 1
    assert ring.cq_ready() == 0  # armed, nothing landed yet
    done = Done()
    bufs = [memoryview(bytearray(512)) for _ in range(3)]
    for i, b in enumerate(bufs):
        drv.queue_rq(BlockRequest(IoOp.READ, 512 * i, 512, 0, b, done))
    cqe = await one(ring)
    assert cqe.user_data == 7 and cqe.res >= 1
    tags = drv.take_fetched(0)
    assert sorted(tags) == [0, 1, 2]  # every request that landed, one completion
    assert ring.cq_ready() == 0
    assert drv.take_fetched(0) == []
    for tag in tags:
        iod = drv.iod(0, tag)
        assert (iod.op, iod.nr_bytes) == (IoOp.READ, 512)
        fused_read(ring, df, tag, data_fd, 512, iod.start)
        ring.submit()
        assert [(c.user_data, c.res) for c in await ring.wait_cqes(2)] == [(2, 512), (1, 512)]
    assert bytes(bufs[1][:4]) == bytes(range(4))  # offset 512 of the file: 0,1,2,3...
    assert drv.lent == 0
    commit(ring, drv, df, [(t, 512) for t in tags])
    ring.submit()
    assert (await one(ring)).res == 3
    assert sorted(done.results) == [(0, 512), (512, 512), (1024, 512)]
    assert drv.inflight == 0

    # Requests waiting when the fetch is issued: it completes inline.
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 0, 0, 0, None, done))
    fetch(ring, df)
    ring.submit()
    assert (await one(ring)).res == 1
    (tag,) = drv.take_fetched(0)
    assert drv.iod(0, tag).op == IoOp.FLUSH
    commit(ring, drv, df, [(tag, 0)])
    ring.submit()
    assert (await one(ring)).res == 1
    drv.stop()


async def test_more_requests_than_tags_wait_for_a_commit(ring: Ring) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=2, batch_io=True)
    df = ring.register_driver(drv)
    done = Done()
    for i in range(3):
        drv.queue_rq(BlockRequest(IoOp.FLUSH, i, 0, 0, None, done))
    fetch(ring, df)
    ring.submit()
    assert (await one(ring)).res == 2
    tags = drv.take_fetched(0)
    assert sorted(tags) == [0, 1]
    fetch(ring, df)
    ring.submit()
    assert ring.cq_ready() == 0  # the third request has no tag yet
    commit(ring, drv, df, [(tags[0], 0)])
    ring.submit()
    cqes = await ring.wait_cqes(2)
    # The commit freed a tag, the waiting request took it and completed the fetch.
    assert sorted((c.user_data, c.res) for c in cqes) == [(7, 1), (9, 1)]
    assert drv.take_fetched(0) == [tags[0]]
    assert drv.iod(0, tags[0]).start == 2
    drv.stop()
    assert drv.inflight == 2  # fetched, not committed: they end with their commit
    commit(ring, drv, df, [(tags[0], 0), (tags[1], 0)])
    ring.submit()
    assert (await one(ring)).res == 2
    assert drv.inflight == 0 and len(done.results) == 3


async def test_batch_command_errors(ring: Ring) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=2, batch_io=True)
    df = ring.register_driver(drv)
    fetch(ring, df, 10)
    fetch(ring, df, 11)  # one fetch per queue
    cmd(ring, df, UBLK_IO_FETCH_IO_CMDS, pack_batch_cmd(3), 12)  # no such queue
    cmd(ring, df, UBLK_IO_FETCH_REQ, pack_io_cmd(0, 0), 13)  # per-tag: not on a batch device
    cmd(ring, df, UBLK_IO_COMMIT_AND_FETCH_REQ, pack_io_cmd(0, 0), 14)
    cmd(ring, df, UBLK_IO_COMMIT_IO_CMDS, pack_batch_cmd(0, 1, 12345), 15)  # no such buffer
    ring.submit()
    cqes = await ring.wait_cqes(5)
    assert [(c.user_data, c.res) for c in cqes] == [
        (11, -errno.EBUSY),
        (12, -errno.EINVAL),
        (13, -errno.EINVAL),
        (14, -errno.EINVAL),
        (15, -errno.EINVAL),
    ]
    # An element naming a tag without a request: -EINVAL, the others still commit.
    done = Done()
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 0, 0, 0, None, done))
    assert (await one(ring)).res == 1
    (tag,) = drv.take_fetched(0)
    commit(ring, drv, df, [(1 - tag, 0), (tag, 0), (99, 0)])
    ring.submit()
    assert (await one(ring)).res == -errno.EINVAL
    assert done.results == [(0, 0)] and drv.inflight == 0
    # The batch commands on a per-tag device.
    plain = UblkDriver(size=1 << 20, queue_depth=2)
    pdf = ring.register_driver(plain)
    cmd(ring, pdf, UBLK_IO_FETCH_IO_CMDS, pack_batch_cmd(0), 16)
    cmd(ring, pdf, UBLK_IO_COMMIT_IO_CMDS, pack_batch_cmd(0, 0, 0), 17)
    ring.submit()
    assert [c.res for c in await ring.wait_cqes(2)] == [-errno.EINVAL] * 2
    plain.stop()
    drv.stop()


async def test_stop_aborts_the_fetch_and_ends_unfetched_requests(ring: Ring) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=1, batch_io=True)
    df = ring.register_driver(drv)
    done = Done()
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 0, 0, 0, None, done))  # lands, never fetched
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 1, 0, 0, None, done))  # waits for a tag
    drv.stop()
    assert sorted(done.results) == [(0, -errno.ESHUTDOWN), (1, -errno.ESHUTDOWN)]
    assert drv.inflight == 0
    fetch(ring, df)
    ring.submit()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT

    drv = UblkDriver(size=1 << 20, queue_depth=1, batch_io=True)
    df = ring.register_driver(drv)
    fetch(ring, df)
    ring.submit()
    drv.stop()
    assert (await one(ring)).res == UBLK_IO_RES_ABORT


async def test_cancelled_fetch(ring: Ring) -> None:
    drv = UblkDriver(size=1 << 20, queue_depth=1, batch_io=True)
    df = ring.register_driver(drv)
    fetch(ring, df, 7)
    ring.submit()
    sqe = ring.get_sqe()
    assert sqe is not None
    sqe.prep_cancel(7)
    sqe.user_data = 8
    ring.submit()
    got = {c.user_data: c.res for c in await ring.wait_cqes(2)}
    assert got == {7: -errno.ECANCELED, 8: 0}
    # A request arriving now waits for the next fetch.
    done = Done()
    drv.queue_rq(BlockRequest(IoOp.FLUSH, 0, 0, 0, None, done))
    fetch(ring, df, 7)
    ring.submit()
    assert (await one(ring)).res == 1
    drv.stop()


async def test_commit_of_a_lent_request_waits_for_the_lend(ring: Ring) -> None:
    """COMMIT_IO_CMDS ends a request whose buffer is still lent only after the lend
    (seed F37, as COMMIT_AND_FETCH)."""
    drv = UblkDriver(size=1 << 20, queue_depth=1, batch_io=True)
    df = ring.register_driver(drv)
    done = Done()
    r, w = os.pipe()
    try:
        buf = memoryview(bytearray(16))
        drv.queue_rq(BlockRequest(IoOp.READ, 0, 16, 0, buf, done))
        fetch(ring, df)
        ring.submit()
        await one(ring)
        (tag,) = drv.take_fetched(0)
        fused_read(ring, df, tag, r, 16, -1)  # waits for the pipe
        commit(ring, drv, df, [(tag, 16)])
        ring.submit()
        assert (await one(ring)).res == 1
        assert drv.lent == 1 and done.results == []
        os.write(w, b"x" * 16)
        cqes = await ring.wait_cqes(2)
        assert [c.user_data for c in cqes] == [2, 1]
        assert done.results == [(0, 16)] and drv.lent == 0
        assert bytes(buf) == b"x" * 16
    finally:
        os.close(r)
        os.close(w)
    drv.stop()


# ---- the batch server ---------------------------------------------------------------


class Counting(UblkDriver):
    """Counts the commands the device is given."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: dict[int, int] = {}

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.calls[cmd.cmd_op] = self.calls.get(cmd.cmd_op, 0) + 1
        return super().uring_cmd(cmd, issue_flags)


@pytest.mark.timeout(60)
async def test_batch_server_serves_a_burst_with_one_fetch_and_one_commit(
    ring_backend: str,
) -> None:
    with tempfile.NamedTemporaryFile() as f:
        data = os.urandom(64 * 4096)
        f.write(data)
        f.flush()
        target = LoopTarget(f.name)
        async with Ring(64, flags=SetupFlag.FUSED_REQ, backend=ring_backend) as ring:
            host = RingHost(ring, ring.sq_entries)
            host.start()
            drv = Counting(size=target.size, queue_depth=32, batch_io=True)
            server = UblkServer(host, drv, target, 1)
            server.start()
            done = Done()
            bufs = [memoryview(bytearray(4096)) for _ in range(32)]
            # Block 63 - i into request i, all queued at once (one burst).
            for i, b in enumerate(bufs):
                drv.queue_rq(BlockRequest(IoOp.READ, (63 - i) * 4096, 4096, 0, b, done))
            for _ in range(200):
                if len(done.results) == 32:
                    break
                await asyncio.sleep(0.01)
            assert sorted(res for _, res in done.results) == [4096] * 32
            for i, b in enumerate(bufs):
                assert bytes(b) == data[(63 - i) * 4096 : (64 - i) * 4096]
            assert drv.calls[UBLK_IO_FUSED_SUBMIT_IO] == 32  # every request is fused
            assert drv.calls[UBLK_IO_FETCH_IO_CMDS] <= 3  # the arming one, the burst's
            assert drv.calls[UBLK_IO_COMMIT_IO_CMDS] <= 2
            assert UBLK_IO_FETCH_REQ not in drv.calls
            assert UBLK_IO_COMMIT_AND_FETCH_REQ not in drv.calls
            assert drv.inflight == drv.lent == 0
            await server.stop()
            await host.close()
        host.close_files()
        target.close()


class PipeTarget(Target):
    """Reads come from a pipe (they wait until written); writes are not served."""

    kind = "pipe"

    def __init__(self, fd: int) -> None:
        super().__init__(1 << 20)
        self.fd = fd

    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        return [Piece(self.fd, -1, 0, ctx.iod.nr_bytes)]


@pytest.mark.timeout(60)
async def test_ring_close_mid_request_returns_the_buffer_before_the_request_ends(
    ring_backend: str,
) -> None:
    """The READ secondary is still on the lent buffer when the ring closes: it is
    cancelled, and only once it came back is the buffer given back; the request never
    ends while a secondary may touch its buffer."""
    r, w = os.pipe()
    try:
        async with Ring(64, flags=SetupFlag.FUSED_REQ, backend=ring_backend) as ring:
            host = RingHost(ring, ring.sq_entries)
            host.start()
            drv = UblkDriver(size=1 << 20, queue_depth=4, batch_io=True)
            server = UblkServer(host, drv, PipeTarget(r), 1)
            server.start()
            seen: list[tuple[int, int]] = []

            def on_done(req: BlockRequest, res: int) -> None:
                seen.append((res, drv.lent))

            buf = memoryview(bytearray(4096))
            drv.queue_rq(BlockRequest(IoOp.READ, 0, 4096, 0, buf, on_done))
            for _ in range(200):
                if drv.lent:
                    break
                await asyncio.sleep(0.01)
            assert drv.lent == 1 and seen == []
            await host.close()
        # The ring closed: the secondary was cancelled and came back, the lend is over.
        assert drv.lent == 0
        assert all(lent == 0 for _, lent in seen)
        drv.stop()
        assert all(lent == 0 for _, lent in seen) and drv.inflight <= 1
        host.close_files()
    finally:
        os.close(r)
        os.close(w)
