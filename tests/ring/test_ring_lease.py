"""The lease (``ring.fused(...)``) over the FakeBackend: cancellation at every await
point, and SPEC F13, with no sleeps.

The await points of a lease are: entering (waiting for the driver to lend), each
secondary (waiting for its CQE), and leaving (waiting for the primary's completion).
A task can also be cancelled before it ever ran (nothing submitted yet), and after a
secondary's CQE was delivered but before its waiter resumed.  Twins in
``tests/e2e/test_lease.py`` reach these points with ``asyncio.sleep``; here the fake holds
each secondary until the test completes it, and a driver below lends only when told.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from conftest import ECANCELED

from aiofused import EIOCBQUEUED, DriverError, Ring, SetupFlag, UringCmd
from aiofused.testing.fake import FakeBackend
from aiofused_drivers.null import NULL_LEND, NullDriver

FUSED = SetupFlag.FUSED_REQ


class ManualLender:
    """Queues every command and lends only when the test calls :meth:`lend`; completes
    with 0, or -ECANCELED if cancelled.  With ``hook`` it honours cancellation before
    the lend by completing at once (``cmd.cancel_hook``)."""

    name = "manual"
    can_fused = True

    def __init__(self, hook: bool = True) -> None:
        self.hook = hook
        self.buf = bytearray(4096)
        self.cmds: list[UringCmd] = []
        self.hooked = 0
        self.arrived: asyncio.Future[UringCmd] = asyncio.get_running_loop().create_future()

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.cmds.append(cmd)
        if self.hook:
            cmd.cancel_hook = self._on_cancel
        if not self.arrived.done():
            self.arrived.set_result(cmd)
        return EIOCBQUEUED

    def _on_cancel(self, cmd: UringCmd) -> None:
        self.hooked += 1
        cmd.done(-errno.ECANCELED)

    def lend(self, cmd: UringCmd) -> None:
        cmd.provide_buf_and_start(self.buf, lambda c: c.done(-125 if c.cancelled else 0))


def assert_idle(ring: Ring, fake: FakeBackend) -> None:
    stats = ring.statistics()
    assert stats["in_flight"] == 0 and stats["lent"] == 0 and stats["views"] == 0, stats
    assert not fake.pending


# ---- before submit, and while entering -------------------------------------------------


async def test_cancel_before_the_task_ever_ran() -> None:
    """Nothing is submitted: the driver is never called, the backend never sees an op."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        drv = ManualLender()
        df = ring.register_driver(drv)

        async def use() -> None:
            async with ring.fused(df, 0) as lease:
                await lease.read(5, 0, 0, 16)

        task = asyncio.create_task(use())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert drv.cmds == [] and fake.ops == []
        assert_idle(ring, fake)


async def test_cancel_while_entering_goes_through_the_cancel_hook() -> None:
    """(twin: test_cancel_during_enter) The primary is cancelled through the driver's
    hook and has completed before CancelledError propagates."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        drv = ManualLender(hook=True)
        df = ring.register_driver(drv)

        async def use() -> None:
            async with ring.fused(df, 0):
                raise AssertionError("never lent")

        task = asyncio.create_task(use())
        cmd = await drv.arrived
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert drv.hooked == 1 and cmd.finished
        assert fake.ops == []
        del cmd
        drv.cmds.clear()
        assert_idle(ring, fake)


async def test_cancel_while_entering_without_a_hook() -> None:
    """(twin: test_cancel_during_enter_without_hook) The ring completes the primary
    itself; the driver's later attempt to lend is refused and issues nothing."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        drv = ManualLender(hook=False)
        df = ring.register_driver(drv)
        task = asyncio.create_task(ring.fused(df, 0).__aenter__())
        cmd = await drv.arrived
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cmd.finished
        with pytest.raises(DriverError):
            drv.lend(cmd)
        assert fake.ops == []
        del cmd
        drv.cmds.clear()
        assert_idle(ring, fake)


async def test_lend_later_then_read() -> None:
    """Entering waits for the lend, however late it comes."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        drv = ManualLender()
        df = ring.register_driver(drv)

        async def use() -> int:
            async with ring.fused(df, 0) as lease:
                return await lease.read(5, 0, 8, 4)

        task = asyncio.create_task(use())
        cmd = await drv.arrived
        assert not task.done()
        drv.lend(cmd)
        op = await fake.wait_started()
        fake.complete(op, data=b"abcd")
        assert await task == 4
        assert drv.buf[8:12] == b"abcd"
        del cmd
        drv.cmds.clear()
        assert_idle(ring, fake)


# ---- with secondaries in flight ----------------------------------------------------------


async def test_cancel_with_a_secondary_in_flight() -> None:
    """(twin: test_cancel_with_secondaries_in_flight) The secondary is cancelled, the
    scope waits for its final completion, releases the view, then re-raises."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        box: dict[str, Any] = {}

        async def use() -> None:
            async with ring.fused(df, NULL_LEND) as lease:
                box["lease"] = lease
                await lease.recv(5, 0, 16)

        task = asyncio.create_task(use())
        await fake.wait_started()
        assert ring.statistics()["lent"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert box["lease"].result == ECANCELED
        assert fake.ops[0].result == ECANCELED and fake.cancel_count >= 1
        assert_idle(ring, fake)


async def test_f13_buffer_outlives_the_cancelled_task_until_the_final_completion() -> None:
    """SPEC F13: the backend cannot stop the op (-EALREADY): after the awaiting task
    was cancelled the lent buffer stays pinned and valid, the scope keeps waiting, and
    the data the op writes at its completion still lands in the driver's buffer.  Only
    then is everything released and CancelledError raised."""
    fake = FakeBackend(cancel_mode="already")
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        shared = bytearray(64)
        df = ring.register_driver(NullDriver(buffer=shared))
        box: dict[str, Any] = {}

        async def use() -> None:
            async with ring.fused(df, NULL_LEND) as lease:
                box["lease"] = lease
                await lease.read(5, 0, 8, 16)

        task = asyncio.create_task(use())
        op = await fake.wait_started()
        task.cancel()
        await fake.wait_cancels(1)
        assert not task.done()  # parked in the scope's exit
        stats = ring.statistics()
        assert stats["lent"] == 1 and stats["views"] >= 2 and stats["in_flight"] == 2
        with pytest.raises(BufferError):
            shared.extend(b"x")
        assert op.buffer is not None and not op.buffer.readonly
        fake.complete(op, 4, data=b"late")  # the "kernel" writes now
        with pytest.raises(asyncio.CancelledError):
            await task
        assert shared[8:12] == b"late"
        assert box["lease"].result == ECANCELED  # the driver saw cmd.cancelled
        shared.extend(b"x")
        with pytest.raises(ValueError):
            bytes(box["lease"].buffer)
        assert_idle(ring, fake)


async def test_f13_plain_op_buffer_outlives_a_cancelled_waiter() -> None:
    """SPEC F13 for a plain op: cancelling the task that waits for its CQE does not
    cancel the op nor release its buffer."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        buf = bytearray(8)
        sqe = ring.get_sqe()
        assert sqe is not None
        sqe.prep_read(5, buf)
        sqe.user_data = 1
        ring.submit()
        waiter = asyncio.create_task(ring.wait_cqe())
        await fake.wait_started()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert fake.cancel_count == 0 and len(fake.pending) == 1
        with pytest.raises(BufferError):
            buf.extend(b"x")
        fake.complete(0, data=b"12345678")
        cqe = await ring.wait_cqe()
        ring.cqe_seen(cqe)
        assert (cqe.user_data, cqe.res) == (1, 8) and buf == b"12345678"
        buf.extend(b"x")
        assert_idle(ring, fake)


# ---- leaving --------------------------------------------------------------------------------


async def test_cancel_while_leaving_keeps_waiting() -> None:
    """(twin: test_cancel_during_exit_keeps_waiting) The exit waits for a running
    secondary through a cancellation (the backend holds on to the op), the data still
    lands in the buffer, then CancelledError is re-raised."""
    fake = FakeBackend(cancel_mode="manual")
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        box: dict[str, Any] = {}
        exiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def use() -> None:
            async with ring.fused(df, NULL_LEND) as lease:
                box["lease"] = lease
                box["t"] = asyncio.ensure_future(lease.recv(5, 0, 4))
                await fake.wait_started()
                box["data"] = lease.buffer
                exiting.set_result(None)  # the scope's exit starts right after this

        task = asyncio.create_task(use())
        await exiting
        assert not task.done()  # the exit waits for the RECV
        task.cancel()
        await fake.wait_cancels(1)  # the exit asked to cancel it ...
        assert not task.done()  # ... and keeps waiting
        fake.complete(fake.pending[0], 4, data=b"abcd")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await box["t"] == 4  # it was not cancelled: it completed
        assert box["lease"].result == ECANCELED  # the driver saw cmd.cancelled
        with pytest.raises(ValueError):
            bytes(box["data"])
        for h, on_result in fake.cancels:  # answer the leftover requests: done ops
            assert h.done
            on_result(-errno.ENOENT)
        assert_idle(ring, fake)


async def test_cancel_after_the_cqe_before_the_waiter_wakes() -> None:
    """(twin: test_cancel_after_cqe_before_waiter_wakes) The secondary's CQE was
    delivered but its waiter is cancelled before it resumes: no second completion, no
    cancellation reaching the backend (or another request), P completes normally."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        async with ring.fused(df, NULL_LEND) as lease:
            t = asyncio.ensure_future(lease.recv(5, 0, 4))
            op = await fake.wait_started()
            fake.complete(op, 4, data=b"data")  # the CQE is delivered now ...
            assert ring.in_flight() == 1  # ... only the primary is left
            t.cancel()  # ... and the waiter has not resumed yet
            with pytest.raises(asyncio.CancelledError):
                await t
            assert fake.cancel_count == 0
            assert bytes(lease.buffer[:4]) == b"data"
        assert lease.result == 0
        assert len(fake.ops) == 1 and fake.ops[0].result == 4
        assert_idle(ring, fake)


async def test_exception_in_the_scope_cancels_and_propagates() -> None:
    """(twin: test_exception_in_scope_cancels_and_propagates)"""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        with pytest.raises(KeyError):
            async with ring.fused(df, NULL_LEND) as lease:
                t = asyncio.ensure_future(lease.recv(5, 0, 4))
                await fake.wait_started()
                raise KeyError("boom")
        assert lease.result == ECANCELED
        with pytest.raises(OSError) as info:
            await t
        assert info.value.errno == errno.ECANCELED
        assert_idle(ring, fake)


async def test_secondaries_complete_in_any_order_under_gather() -> None:
    """SPEC §5: concurrent secondaries; results come back to their own awaiters in the
    order the backend finishes them, and the scope ends after the last."""
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null", size=64)
        async with ring.fused(df, NULL_LEND) as lease:
            reads = asyncio.gather(*(lease.read(5, 16 * i, 16 * i, 16) for i in range(4)))
            await fake.wait_started(4)
            for i, k in enumerate((2, 0, 3, 1)):
                op = next(h for h in fake.pending if h.offset == 16 * k)
                fake.complete(op, 10 + i, data=bytes([65 + k]) * 16)
            assert await reads == [11, 13, 10, 12]
            assert bytes(lease.buffer[:64]) == b"A" * 16 + b"B" * 16 + b"C" * 16 + b"D" * 16
        assert lease.result == 0
        assert_idle(ring, fake)
