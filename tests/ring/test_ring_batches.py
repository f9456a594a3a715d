"""Completions in batches: one hand-over per wake-up, waiters woken once, after the task
work the batch queued (the kernel runs task work before it returns to userspace)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import add, pairs

from aiofused import EIOCBQUEUED, BufferPool, Cqe, Ring, SetupFlag, UringCmd
from aiofused.testing.fake import FakeBackend
from aiofused_drivers.null import NULL_LEND


async def _parked(ring: Ring) -> None:
    """Let the reaper task run until it waits in the ring (a few loop turns at most)."""
    for _ in range(10):
        if ring.waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError("the reaper never parked")


async def test_a_fused_command_wakes_its_waiter_once_with_both_cqes() -> None:
    """The secondary's CQE and the primary's (posted by the lend callback, task work) reach
    a task parked in wait_cqe in one wake-up: it sees both when it resumes."""
    fake = FakeBackend()
    async with Ring(8, flags=SetupFlag.FUSED_REQ, backend=fake) as ring:
        null = ring.open_driver("null", size=4096)
        add(ring, 1, "fused_cmd", null, NULL_LEND, nr_secondary=1)
        add(ring, 2, "read", 5, 0, 4096, 0)
        assert ring.submit() == 2
        op = await fake.wait_started()
        seen: list[int] = []

        async def reaper() -> None:
            await ring.wait_cqe()
            seen.append(ring.cq_ready())  # what the task found when it resumed

        task = asyncio.get_running_loop().create_task(reaper())
        await _parked(ring)
        fake.complete_batch(op)
        await task
        assert seen == [2]
        assert pairs(await ring.wait_cqes(2)) == [(2, 4096), (1, 0)]


async def test_a_batch_of_plain_ops_wakes_the_waiter_once() -> None:
    """Eight READs completed in one hand-over: the waiter wakes once with all eight CQEs,
    in completion order."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        for ud in range(8):
            add(ring, ud, "read", 5, bytearray(64), 64, 0)
        assert ring.submit() == 8
        await fake.wait_started(8)
        wakes: list[int] = []

        async def reaper() -> None:
            await ring.wait_cqe()
            wakes.append(ring.cq_ready())

        task = asyncio.get_running_loop().create_task(reaper())
        await _parked(ring)
        fake.complete_batch(*reversed(fake.pending))
        await task
        assert wakes == [8]
        assert [c.user_data for c in await ring.wait_cqes(8)] == list(range(7, -1, -1))


async def test_statistics_say_what_the_ring_holds() -> None:
    """Ring.statistics(): a lent fused command in flight holds 2 requests, 1 lent buffer and
    2 views (the lent buffer and the secondary's slice of its first half); nothing once it
    completed."""
    fake = FakeBackend()
    async with Ring(8, flags=SetupFlag.FUSED_REQ, backend=fake) as ring:
        null = ring.open_driver("null", size=8192)
        add(ring, 1, "fused_cmd", null, NULL_LEND, nr_secondary=1)
        add(ring, 2, "read", 5, 0, 4096, 0)
        assert ring.statistics()["sq_pending"] == 2
        ring.submit()
        op = await fake.wait_started()
        stats = ring.statistics()
        assert (stats["in_flight"], stats["lent"], stats["views"]) == (2, 1, 2)
        assert (stats["sq_pending"], stats["backend_in_flight"]) == (0, 1)
        fake.complete(op)
        assert pairs(await ring.wait_cqes(2)) == [(2, 4096), (1, 0)]
        stats = ring.statistics()
        assert (stats["in_flight"], stats["lent"], stats["views"], stats["cq_ready"]) == (
            0,
            0,
            0,
            0,
        )


async def test_a_whole_buffer_secondary_uses_the_lent_view() -> None:
    """A secondary that covers the whole lent buffer uses the lend's own view (no slice):
    1 view while in flight; the buffer stays exported until the primary completed, and
    nothing holds it after."""
    fake = FakeBackend()
    buf = bytearray(4096)
    async with Ring(8, flags=SetupFlag.FUSED_REQ, backend=fake) as ring:
        null = ring.open_driver("null", size=4096, buffer=buf)
        add(ring, 1, "fused_cmd", null, NULL_LEND, nr_secondary=1)
        add(ring, 2, "read", 5, 0, 4096, 0)
        ring.submit()
        op = await fake.wait_started()
        stats = ring.statistics()
        assert (stats["in_flight"], stats["lent"], stats["views"]) == (2, 1, 1)
        view = op.io.buf
        assert view is not None and view.obj is buf and view.nbytes == 4096
        del view
        with pytest.raises(BufferError):
            buf.extend(b"x")  # exported while lent
        fake.complete(op)
        assert pairs(await ring.wait_cqes(2)) == [(2, 4096), (1, 0)]
        stats = ring.statistics()
        assert (stats["in_flight"], stats["lent"], stats["views"]) == (0, 0, 0)
        buf.extend(b"x")  # nothing exports it any more
        assert len(buf) == 4097


async def test_cqe_seen_takes_any_pending_cqe_or_an_equal_one() -> None:
    """cqe_seen consumes the CQE given wherever it is in the CQ, an equal CQE standing
    for it; one that is not pending raises ValueError and consumes nothing."""
    async with Ring(8) as ring:
        for ud in (1, 2, 3, 4):
            add(ring, ud, "nop")
        ring.submit()
        assert [c.user_data for c in ring.pending_cqes()] == [1, 2, 3, 4]
        ring.cqe_seen(Cqe(3, 0, 0))  # equal, not the object in the CQ
        first = ring.peek_cqe()
        assert first is not None
        ring.cqe_seen(first)
        with pytest.raises(ValueError):
            ring.cqe_seen(Cqe(9, 0, 0))
        assert [c.user_data for c in ring.pending_cqes()] == [2, 4]
        assert ring.cq_ready() == 2
        assert [c.user_data for c in await ring.wait_cqes(2)] == [2, 4]
        assert ring.cq_ready() == 0 and ring.peek_cqe() is None


class _PoolLender:
    """Lends one buffer of a registered pool, gives it back on completion."""

    name = "pool-lender"
    can_fused = True

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        buf = self.pool.try_acquire()
        assert buf is not None

        def returned(c: UringCmd) -> None:
            c.done(sum(c.secondary_results))
            self.pool.release(buf)

        cmd.provide_buf_and_start(buf, returned)
        return EIOCBQUEUED


@pytest.mark.parametrize("nbytes", [4096, 2048])
async def test_a_registered_lent_buffer_makes_whole_and_partial_secondaries_fixed(
    nbytes: int,
) -> None:
    """Lending a registered pool buffer makes its READ secondaries fixed ops on that slot
    (buf_index), whether a secondary covers the whole buffer (the lend's own view) or a
    part of it (a slice)."""
    fake = FakeBackend()
    pool = BufferPool(1, 4096)
    try:
        async with Ring(8, flags=SetupFlag.FUSED_REQ, backend=fake) as ring:
            ring.register_buffers(pool)
            df = ring.register_driver(_PoolLender(pool))
            add(ring, 1, "fused_cmd", df, 0, nr_secondary=1)
            add(ring, 2, "read", 5, 0, nbytes, 0)
            ring.submit()
            op = await fake.wait_started()
            assert op.io.buf_index == 0 and op.io.nbytes == nbytes
            view = op.io.buf
            assert view is not None and view.nbytes == nbytes
            del view
            fake.complete(op)
            assert pairs(await ring.wait_cqes(2)) == [(2, nbytes), (1, nbytes)]
            assert ring.statistics()["views"] == 0 and pool.available == 1
    finally:
        pool.close()
