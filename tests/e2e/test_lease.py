"""SPEC §5: the high-level ``ring.fused(...)`` scope, with asyncio and anyio, and
cancellation at every await point (enter, secondaries in flight, exit, and after a
CQE but before its waiter wakes)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

import anyio
import pytest
from conftest import ECANCELED

from aiofused import EIOCBQUEUED, BufDir, DriverError, Ring, UringCmd, res_to_error
from aiofused_drivers.null import NULL_INLINE, NULL_LEND, NullDriver


class SlowLender:
    """Lends its buffer ``delay`` seconds after the command arrives (like a driver that
    first receives data), completing with 0 or -ECANCELED; honours a cancel hook."""

    name = "slow"
    can_fused = True

    def __init__(self, delay: float, hook: bool = True) -> None:
        self.delay = delay
        self.hook = hook
        self.buf = bytearray(4096)
        self.cancelled = 0

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.delay, self._lend, cmd)
        if self.hook:

            def on_cancel(c: UringCmd) -> None:
                self.cancelled += 1
                handle.cancel()
                c.done(-errno.ECANCELED)

            cmd.cancel_hook = on_cancel
        return EIOCBQUEUED

    def _lend(self, cmd: UringCmd) -> None:
        if not cmd.finished:
            cmd.provide_buf_and_start(self.buf, lambda c: c.done(-125 if c.cancelled else 0))


async def test_lease_read_write_gather(ring: Ring, data_file: Any, tmp_path: Any) -> None:
    """SPEC §5: secondaries run concurrently on the lent buffer; result is P's res."""
    fd, content = data_file
    df = ring.open_driver("null", size=8192)
    async with ring.fused(df, NULL_LEND, buf_dir=BufDir.DEST) as lease:
        assert lease.lent and not lease.buffer.readonly
        n = await asyncio.gather(*(lease.read(fd, i * 1024, i * 1024, 1024) for i in range(8)))
        assert n == [1024] * 8
        assert bytes(lease.buffer) == content[:8192]
    assert lease.result == 0
    out = os.open(tmp_path / "out", os.O_CREAT | os.O_RDWR)
    try:
        shared = bytearray(content[:4096])
        src = ring.register_driver(NullDriver(buffer=shared))
        async with ring.fused(src, NULL_LEND, buf_dir=BufDir.SRC) as lease:
            assert lease.buffer.readonly
            assert await lease.write(out, 0) == 4096
            assert await lease.write(out, 4096, at=100, nbytes=10) == 10
        assert os.pread(out, 5000, 0) == content[:4096] + content[100:110]
    finally:
        os.close(out)


async def test_lease_wrong_direction_raises_einval(ring: Ring, sockpair: Any) -> None:
    """SPEC §5: a secondary of the other direction raises OSError(EINVAL)."""
    df = ring.open_driver("null")
    async with ring.fused(df, NULL_LEND, buf_dir=BufDir.DEST) as lease:
        with pytest.raises(OSError) as info:
            await lease.send(sockpair[0], 0, 10)
        assert info.value.errno == errno.EINVAL


async def test_lease_errors_are_oserror_subclasses(ring: Ring) -> None:
    """Errors map in one place: -ECONNRESET -> ConnectionResetError; a secondary on a
    closed fd raises OSError(EBADF); inline driver errors raise at enter."""
    assert isinstance(res_to_error(-errno.ECONNRESET), ConnectionResetError)
    assert isinstance(res_to_error(-errno.ETIMEDOUT), TimeoutError)
    df = ring.open_driver("null")
    async with ring.fused(df, NULL_LEND) as lease:
        with pytest.raises(OSError) as info:
            await lease.read(10_000, 0, 0, 16)
        assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        async with ring.fused(
            df, NULL_INLINE, cmd=(-errno.EPERM).to_bytes(4, "little", signed=True)
        ):
            pass
    assert info.value.errno == errno.EPERM
    async with ring.fused(df, NULL_INLINE, cmd=(3).to_bytes(4, "little")) as lease:
        assert not lease.lent
        assert lease.result == 3


async def test_lease_under_anyio_task_group(ring: Ring, data_file: Any) -> None:
    """SPEC §5: secondaries started from an anyio task group."""
    fd, content = data_file
    df = ring.open_driver("null", size=4096)
    results: list[int] = []
    async with ring.fused(df, NULL_LEND) as lease:
        async with anyio.create_task_group() as tg:
            for i in range(4):

                async def one(i: int = i) -> None:
                    results.append(await lease.read(fd, i * 1024, i * 1024, 1024))

                tg.start_soon(one)
        assert bytes(lease.buffer) == content[:4096]
    assert results == [1024] * 4 and lease.result == 0


async def test_anyio_cancel_scope_waits_for_secondaries(ring: Ring, sockpairs: Any) -> None:
    """SPEC §5: cancelling an anyio scope cancels parked secondaries and waits for their
    final completion before the buffer is released."""
    df = ring.open_driver("null")
    seen: dict[str, Any] = {}
    with anyio.move_on_after(0.05) as scope:
        async with ring.fused(df, NULL_LEND) as lease:
            seen["lease"] = lease
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(lease.recv, sockpairs[i][0], i * 16, 16)
    assert scope.cancelled_caught
    assert seen["lease"].result == ECANCELED
    assert ring.statistics()["lent"] == 0 and ring.in_flight() == 0
    with pytest.raises(ValueError):
        bytes(seen["lease"].buffer)


async def test_cancel_during_enter(ring: Ring) -> None:
    """Cancellation while waiting for the driver to lend: the primary is cancelled
    (through the driver's cancel hook) and completed before CancelledError propagates."""
    drv = SlowLender(delay=5)
    df = ring.register_driver(drv)

    async def use() -> None:
        async with ring.fused(df, 0):
            raise AssertionError("never lent")

    task = asyncio.create_task(use())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drv.cancelled == 1
    assert ring.in_flight() == 0


async def test_cancel_during_enter_without_hook(ring: Ring) -> None:
    """Without a cancel hook the ring completes the primary itself; the driver's later
    attempt to lend is refused (nothing is issued after P's completion)."""
    drv = SlowLender(delay=0.05, hook=False)
    df = ring.register_driver(drv)
    task = asyncio.create_task(ring.fused(df, 0).__aenter__())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the driver's timer fires; cmd.finished makes it stand down
    assert ring.in_flight() == 0 and ring.statistics()["lent"] == 0


async def test_cancel_with_secondaries_in_flight(ring: Ring, sockpair: Any) -> None:
    """Task cancelled while a secondary is parked: the secondary is cancelled, the
    scope waits for it, releases the view, then CancelledError propagates."""
    df = ring.open_driver("null")
    box: dict[str, Any] = {}

    async def use() -> None:
        async with ring.fused(df, NULL_LEND) as lease:
            box["lease"] = lease
            await lease.recv(sockpair[0], 0, 16)

    task = asyncio.create_task(use())
    await asyncio.sleep(0.02)
    assert ring.statistics()["lent"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert box["lease"].result == ECANCELED
    assert ring.statistics()["lent"] == 0


async def test_cancel_during_exit_keeps_waiting(ring: Ring, sockpair: Any) -> None:
    """Cancellation while the exit waits for a running secondary: the exit keeps
    waiting (the data still lands in the buffer), then re-raises CancelledError."""
    a, _b = sockpair
    df = ring.open_driver("null")
    box: dict[str, Any] = {}

    async def use() -> None:
        async with ring.fused(df, NULL_LEND) as lease:
            box["lease"] = lease
            box["t"] = asyncio.ensure_future(lease.recv(a, 0, 4))
            await asyncio.sleep(0)

    task = asyncio.create_task(use())
    await asyncio.sleep(0.02)
    assert not task.done()  # exit is waiting for the RECV
    task.cancel()
    await asyncio.sleep(0.02)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert box["lease"].result == ECANCELED
    with pytest.raises(OSError):
        await box["t"]
    assert ring.statistics()["lent"] == 0


async def test_cancel_after_cqe_before_waiter_wakes(ring: Ring, sockpair: Any) -> None:
    """The secondary's CQE arrived but its waiter was cancelled before resuming: no
    double completion, nothing leaked, P completes normally."""
    a, b = sockpair
    df = ring.open_driver("null")
    async with ring.fused(df, NULL_LEND) as lease:
        t = asyncio.ensure_future(lease.recv(a, 0, 4))
        await asyncio.sleep(0.01)
        b.send(b"data")
        while ring.in_flight() > 1:  # the RECV's completion was delivered
            await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    assert lease.result == 0


async def test_exception_in_scope_cancels_and_propagates(ring: Ring, sockpair: Any) -> None:
    """An exception leaving the scope cancels secondaries, waits, then propagates."""
    df = ring.open_driver("null")
    with pytest.raises(KeyError):
        async with ring.fused(df, NULL_LEND) as lease:
            t = asyncio.ensure_future(lease.recv(sockpair[0], 0, 4))
            await asyncio.sleep(0.01)
            raise KeyError("boom")
    assert lease.result == ECANCELED
    with pytest.raises(OSError) as info:
        await t
    assert info.value.errno == errno.ECANCELED


async def test_lease_send_recv_zero_copy_same_memory(ring: Ring) -> None:
    """The SEND secondaries send exactly the bytes of the driver's buffer (no copy)."""
    payload = bytearray(os.urandom(65536))
    df = ring.register_driver(NullDriver(buffer=payload))
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        for s in (a1, a2, b1, b2):
            s.setblocking(False)

        async def drain(sock: socket.socket) -> bytes:
            loop = asyncio.get_running_loop()
            chunks = []
            total = 0
            while total < len(payload):
                chunk = await loop.sock_recv(sock, 65536)
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)

        readers = [asyncio.ensure_future(drain(b1)), asyncio.ensure_future(drain(b2))]
        async with ring.fused(df, NULL_LEND, buf_dir=BufDir.SRC) as lease:
            sent = await asyncio.gather(
                lease.send(a1, flags=socket.MSG_WAITALL), lease.send(a2, flags=socket.MSG_WAITALL)
            )
        assert sent == [65536, 65536]
        assert await asyncio.gather(*readers) == [bytes(payload)] * 2
    finally:
        for s in (a1, a2, b1, b2):
            s.close()


async def test_lease_use_after_scope_is_refused(ring: Ring, data_file: Any) -> None:
    """SPEC F11: no secondary starts after the primary completed; the view is gone."""
    fd, _ = data_file
    df = ring.open_driver("null")
    async with ring.fused(df, NULL_LEND) as lease:
        pass
    with pytest.raises(DriverError):
        await lease.read(fd, 0, 0, 16)
    with pytest.raises(ValueError):
        lease.buffer[0]
