"""The public Ring over the deterministic FakeBackend: orderings without sleeps.

Each test here has a twin in ``tests/e2e/test_conformance.py`` that needs
``asyncio.sleep`` to let an op park or data arrive; over the fake an op completes only
when the test calls ``fake.complete``, so the order is the test's and every CQE list is
exact.  Plain ops take ints as fds: the fake never touches a descriptor.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import EALREADY, ECANCELED, ENOENT, ETIME, add, pairs

from aiofused import EIOCBQUEUED, CqeFlag, Op, Ring, SetupFlag, SqeFlag, UringCmd
from aiofused.testing.fake import FakeBackend
from aiofused_drivers.null import NULL_LEND

LINK = SqeFlag.IO_LINK
DRAIN = SqeFlag.IO_DRAIN
FUSED = SetupFlag.FUSED_REQ


class Recorder:
    """Lends ``buf``; records what its callback saw."""

    name = "recorder"
    can_fused = True

    def __init__(self, ring: Ring, size: int = 4096) -> None:
        self.ring = ring
        self.buf = bytearray(size)
        self.results: list[int] | None = None
        self.cqes_at_callback = -1
        self.in_call = False
        self.callback_in_call: bool | None = None

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.in_call = True
        cmd.provide_buf_and_start(self.buf, self._returned)
        self.in_call = False
        return EIOCBQUEUED

    def _returned(self, cmd: UringCmd) -> None:
        self.callback_in_call = self.in_call
        self.results = list(cmd.secondary_results)
        self.cqes_at_callback = self.ring.cq_ready()
        cmd.done(-125 if cmd.cancelled else 0)


def drained(ring: Ring) -> list[tuple[int, int]]:
    """Consume and return every CQE ready now."""
    out = []
    while (c := ring.peek_cqe()) is not None:
        ring.cqe_seen(c)
        out.append((c.user_data, c.res))
    return out


# ---- §2 -----------------------------------------------------------------------------


async def test_r5_buffer_pinned_until_the_final_cqe() -> None:
    """SPEC R5 (twin: test_r5_buffer_rules_and_pinning): the ring holds the buffer from
    submit until the op's final CQE."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        buf = bytearray(8)
        add(ring, 4, "recv", 5, buf)
        assert ring.submit() == 1
        op = fake.find(user_data=4)  # started inside submit()
        assert op.opcode is Op.RECV and op.nbytes == 8
        with pytest.raises(BufferError):
            buf.extend(b"x")
        assert ring.cq_ready() == 0
        fake.complete(op, data=b"12345678")
        assert pairs(await ring.wait_cqes(1)) == [(4, 8)]
        buf.extend(b"x")  # released with the CQE
        assert bytes(buf) == b"12345678x"
        assert op.buffer is None  # the fake keeps nothing either


async def test_r8_send_zc_buffer_held_until_the_notif() -> None:
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        buf = bytearray(b"zero-copy")
        add(ring, 1, "send_zc", 5, buf)
        ring.submit()
        fake.complete(fake.pending[0], notif=False)
        (c,) = await ring.wait_cqes(1)
        assert (c.user_data, c.res, c.flags) == (1, 9, CqeFlag.MORE)
        with pytest.raises(BufferError):
            buf.extend(b"x")
        fake.notif(fake.pending[0])
        (c,) = await ring.wait_cqes(1)
        assert (c.user_data, c.res, c.flags) == (1, 0, CqeFlag.NOTIF)
        buf.extend(b"x")


# ---- §3 -----------------------------------------------------------------------------


async def test_l5_drain_waits_for_everything_before() -> None:
    """SPEC L5 (twin: test_l5_drain_waits_for_everything_before): nothing of the drain
    or after it runs while the RECV is pending; a drained READ is not even started."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        add(ring, 1, "recv", 5, bytearray(4))
        add(ring, 2, "nop", flags=DRAIN)
        add(ring, 3, "nop")
        add(ring, 4, "read", 6, bytearray(4), flags=DRAIN)
        assert ring.submit() == 4
        assert ring.cq_ready() == 0
        assert [op.user_data for op in fake.ops] == [1]
        fake.complete(0, 1, data=b"x")
        assert pairs(await ring.wait_cqes(3)) == [(1, 1), (2, 0), (3, 0)]
        assert [op.user_data for op in fake.ops] == [1, 4]  # now, after 3
        fake.complete(fake.find(user_data=4))
        assert pairs(await ring.wait_cqes(1)) == [(4, 4)]


async def test_l6_async_cancel_found_and_not_found() -> None:
    """SPEC L6 (twin: test_l6_async_cancel_found_and_not_found).  -ENOENT is posted in
    submit(); the backend answers later: the target's -ECANCELED, then the cancel's 0."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        add(ring, 1, "recv", 5, bytearray(4))
        ring.submit()
        add(ring, 2, "cancel", 1)
        add(ring, 3, "cancel", 999)
        ring.submit()
        assert drained(ring) == [(3, ENOENT)]  # the answer for 1 is not synchronous
        assert fake.cancel_count == 1
        assert pairs(await ring.wait_cqes(2)) == [(1, ECANCELED), (2, 0)]


async def test_l6_async_cancel_running_is_ealready() -> None:
    """SPEC L6: -EALREADY for an op the backend cannot stop; the target completes
    normally afterwards."""
    fake = FakeBackend(cancel_mode="already")
    async with Ring(8, backend=fake) as ring:
        buf = bytearray(4)
        add(ring, 1, "read", 5, buf, 4, -1)
        ring.submit()
        add(ring, 2, "cancel", 1)
        ring.submit()
        assert pairs(await ring.wait_cqes(1)) == [(2, EALREADY)]
        fake.complete(0, data=b"done")
        assert pairs(await ring.wait_cqes(1)) == [(1, 4)]
        assert buf == b"done"


async def test_l6_link_timeout_fires_on_a_parked_op() -> None:
    """SPEC L6 (twin: test_l6_link_timeout): the op never completes by itself, so a
    0-second LINK_TIMEOUT always wins: the op -ECANCELED (and the chain behind it), the
    timeout -ETIME; an op finishing first cancels its timeout."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        add(ring, 1, "recv", 5, bytearray(4), flags=LINK)
        add(ring, 2, "link_timeout", 0, flags=LINK)
        add(ring, 3, "nop")  # behind the cancelled op: severed
        ring.submit()
        assert pairs(await ring.wait_cqes(3)) == [(1, ECANCELED), (3, ECANCELED), (2, ETIME)]
        assert fake.cancel_count == 1
        add(ring, 4, "recv", 5, bytearray(4), flags=LINK)
        add(ring, 5, "link_timeout", 30)
        ring.submit()
        fake.complete(0, 2)
        assert drained(ring) == [(4, 2), (5, ECANCELED)]


# ---- §4 -----------------------------------------------------------------------------


async def test_f9_secondaries_run_concurrently_callback_is_task_work() -> None:
    """SPEC F9 (twin: test_f9_secondaries_concurrent_and_callback_is_task_work): all
    four are started at once; completed in reverse order, their CQEs come in that
    order; the callback runs as task work after the last one, with every result; P last."""
    fake = FakeBackend()
    async with Ring(16, flags=FUSED, backend=fake) as ring:
        drv = Recorder(ring)
        df = ring.register_driver(drv)
        add(ring, 100, "fused_cmd", df, 0, nr_secondary=4)
        for i in range(4):
            add(ring, i, "recv", 10 + i, i * 16, 16)
        ring.submit()
        assert sorted(op.user_data for op in fake.pending) == [0, 1, 2, 3]
        for i in reversed(range(4)):
            fake.complete(fake.find(user_data=i), i + 1, data=bytes([65 + i]) * (i + 1))
        assert ring.cq_ready() == 4  # P's completion waits for the task work
        got = pairs(await ring.wait_cqes(5))
        assert got == [(3, 4), (2, 3), (1, 2), (0, 1), (100, 0)]
        assert drv.results == [1, 2, 3, 4]
        assert drv.cqes_at_callback == 4 and drv.callback_in_call is False
        assert bytes(drv.buf[48:52]) == b"DDDD"
        drv.buf.extend(b"!")  # nothing is lent any more


async def test_f12_cancel_a_secondary_then_the_primary_completes() -> None:
    """SPEC F12 (twin: test_f12_cancel_secondary_then_primary_completes)."""
    fake = FakeBackend()
    async with Ring(16, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        add(ring, 1, "fused_cmd", df, NULL_LEND)
        add(ring, 2, "recv", 5, 0, 16)
        ring.submit()
        add(ring, 20, "cancel", 2)
        ring.submit()
        assert pairs(await ring.wait_cqes(3)) == [(2, ECANCELED), (20, 0), (1, 0)]


async def test_f12_cancel_the_primary_cancels_its_secondaries() -> None:
    """SPEC F12 (twin: test_f12_cancel_primary_cancels_secondaries): the cancel's CQE 0,
    every secondary -ECANCELED, then P."""
    fake = FakeBackend()
    async with Ring(16, flags=FUSED, backend=fake) as ring:
        df = ring.open_driver("null")
        add(ring, 1, "fused_cmd", df, NULL_LEND, nr_secondary=2)
        add(ring, 2, "recv", 5, 0, 16)
        add(ring, 3, "recv", 6, 16, 16)
        ring.submit()
        add(ring, 20, "cancel", 1)
        ring.submit()
        got = pairs(await ring.wait_cqes(4))
        assert got[0] == (20, 0) and got[-1] == (1, ECANCELED)
        assert sorted(got[1:3]) == [(2, ECANCELED), (3, ECANCELED)]


async def test_f12_close_cancels_what_is_in_flight() -> None:
    """SPEC F12 (twin: test_f12_ring_close_with_work_in_flight): every request posts
    its CQE, secondaries before their primary."""
    fake = FakeBackend()
    ring = Ring(16, flags=FUSED, backend=fake)
    df = ring.open_driver("null")
    add(ring, 1, "fused_cmd", df, NULL_LEND)
    add(ring, 2, "recv", 5, 0, 16)
    add(ring, 3, "recv", 6, bytearray(8), flags=LINK)
    add(ring, 4, "nop")
    add(ring, 5, "timeout", 30)
    ring.submit()
    await ring.close()
    got = drained(ring)
    assert got.index((2, ECANCELED)) < got.index((1, ECANCELED))
    assert got.index((3, ECANCELED)) < got.index((4, ECANCELED))
    assert sorted(got) == [(u, ECANCELED) for u in range(1, 6)]
    assert ring.in_flight() == 0 and fake.pending_at_close == 0 and fake.closed


async def test_close_waits_until_the_backend_completes_everything() -> None:
    """close() with ops the backend cannot cancel: it waits, and only returns once the
    last one came back (the data still lands; the lent buffer stays pinned)."""
    fake = FakeBackend(cancel_mode="manual")
    ring = Ring(16, flags=FUSED, backend=fake)
    shared = bytearray(64)
    from aiofused_drivers.null import NullDriver

    df = ring.register_driver(NullDriver(buffer=shared))
    add(ring, 1, "fused_cmd", df, NULL_LEND)
    add(ring, 2, "recv", 5, 0, 16)
    buf = bytearray(8)
    add(ring, 3, "recv", 6, buf, flags=LINK)
    add(ring, 4, "nop")
    ring.submit()
    closing = asyncio.create_task(ring.close())
    await fake.wait_cancels(2)
    assert not closing.done()
    assert ring.in_flight() == 4
    fake.complete(fake.find(user_data=3), 8, data=b"12345678")
    assert not closing.done() and ring.statistics()["lent"] == 1
    with pytest.raises(BufferError):
        shared.extend(b"x")
    fake.complete(fake.find(user_data=2), 5, data=b"late!")
    await closing
    assert ring.closed and fake.pending_at_close == 0
    got = drained(ring)
    assert got.index((2, 5)) < got.index((1, ECANCELED))
    assert sorted(got) == [(1, ECANCELED), (2, 5), (3, 8), (4, ECANCELED)]  # 4 never started
    assert shared[:5] == b"late!" and buf == b"12345678"
    shared.extend(b"x")
    buf.extend(b"x")


async def test_fake_contract_completions_never_inside_start_or_cancel() -> None:
    """The fake keeps the backend contract: start() completes nothing, cancel() answers
    later (never inside the call), a finished op is answered -ENOENT."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        add(ring, 1, "read", 5, bytearray(4))
        ring.submit()
        assert ring.cq_ready() == 0 and ring.statistics()["backend_in_flight"] == 1
        op = fake.pending[0]
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[int] = loop.create_future()
        fake.cancel(op, answer.set_result)
        assert not answer.done() and not op.done  # nothing inside cancel()
        assert await answer == 0
        assert op.done and op.result == ECANCELED  # completed before the answer
        assert pairs(await ring.wait_cqes(1)) == [(1, ECANCELED)]
        again: asyncio.Future[int] = loop.create_future()
        fake.cancel(op, again.set_result)
        assert not again.done()
        assert await again == ENOENT
        with pytest.raises(RuntimeError):
            fake.complete(op, 1)
        add(ring, 2, "read", 5, bytearray(4))
        ring.submit()
        with pytest.raises(ValueError):
            fake.complete(0, data=b"too long")
        with pytest.raises(LookupError):
            fake.find(user_data=99)
        fake.complete(0)
        assert pairs(await ring.wait_cqes(1)) == [(2, 4)]
        assert ring.statistics()["backend_in_flight"] == 0


class _Resubmitter:
    """Completes inline, and while it is being called (inside ``submit()``) its owner
    queues and submits one more NOP, as a server flushing from a completion would."""

    name = "resubmitter"
    can_fused = False

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.calls = 0
        self.inner: list[int] = []

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.calls += 1
        s = self.ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.user_data = 99
        self.inner.append(self.ring.submit())
        return 0


async def test_a_submit_from_inside_submit_is_consumed_once_by_the_outer_one() -> None:
    """Re-entry: the inner ``submit()`` consumes nothing itself (0); the running one
    consumes those SQEs after its own, once each (it used to read its own SQEs again)."""
    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        drv = _Resubmitter(ring)
        df = ring.register_driver(drv)
        s = ring.get_sqe()
        assert s is not None
        s.prep_uring_cmd(df, 0)
        s.user_data = 1
        s = ring.get_sqe()
        assert s is not None
        s.prep_nop()
        s.user_data = 2
        assert ring.submit() == 3
        got = []
        while (c := ring.peek_cqe()) is not None:
            ring.cqe_seen(c)
            got.append((c.user_data, c.res))
        assert got == [(1, 0), (2, 0), (99, 0)]
        assert drv.calls == 1 and drv.inner == [0]
