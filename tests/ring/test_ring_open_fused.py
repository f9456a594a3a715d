"""``ring.open_fused``: a fused primary driven by callbacks (no task, future or object per
command), over the FakeBackend, with no sleeps: the lend, secondaries started from the
lend callback, sealing, completion order, nothing lent, misuse, cancellation, and close.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from aiofused import BufDir, DriverError, Op, Ring, SetupFlag, UringCmd
from aiofused.testing.fake import FakeBackend
from aiofused_drivers.null import NULL_INLINE, NULL_LEND, NullDriver

FUSED = SetupFlag.FUSED_REQ


class Events:
    """Records every callback in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def lent(self, cmd: UringCmd, nbytes: int) -> None:
        self.log.append(("lent", nbytes))

    def primary(self, res: int, flags: int) -> None:
        self.log.append(("primary", res))

    def secondary(self, res: int, flags: int) -> None:
        self.log.append(("secondary", res))


def assert_idle(ring: Ring, fake: FakeBackend) -> None:
    stats = ring.statistics()
    assert stats["in_flight"] == 0 and stats["lent"] == 0 and stats["views"] == 0, stats
    assert not fake.pending


async def settle(ring: Ring) -> None:
    for _ in range(5):  # task work is one call_soon hop per burst
        await asyncio.sleep(0)


async def test_lend_secondaries_seal_complete() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        drv = NullDriver(size=64)
        df = ring.register_driver(drv)
        ev = Events()
        p = ring.open_fused(df, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)
        assert ev.log == [("lent", 64)]  # the null driver lends at once
        ring.fused_secondary(p, Op.READ, 5, at=0, nbytes=32, on_complete=ev.secondary)
        ring.fused_secondary(p, Op.READ, 5, at=32, nbytes=32, offset=32, on_complete=ev.secondary)
        assert [(h.opcode, h.nbytes, h.offset) for h in fake.pending] == [
            (Op.READ, 32, 0),
            (Op.READ, 32, 32),
        ]
        fake.complete(1, 32, data=b"b" * 32)
        fake.complete(0, 7)
        ring.seal(p)
        await settle(ring)
        assert ev.log == [("lent", 64), ("secondary", 32), ("secondary", 7), ("primary", 0)]
        assert ring.peek_cqe() is None  # a private primary's CQEs go to its callbacks
        del p
        assert_idle(ring, fake)


async def test_the_primary_waits_for_the_seal_and_every_secondary() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver(size=16))
        ev = Events()
        p = ring.open_fused(df, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)
        ring.fused_secondary(p, Op.READ, 5, nbytes=16, on_complete=ev.secondary)
        fake.complete(0)
        await settle(ring)
        assert ("primary", 0) not in ev.log  # not sealed: more may come
        ring.fused_secondary(p, Op.READ, 5, nbytes=8, on_complete=ev.secondary)
        ring.seal(p)
        await settle(ring)
        assert ("primary", 0) not in ev.log  # sealed, one still in flight
        fake.complete(0)
        await settle(ring)
        assert ev.log[-1] == ("primary", 0)
        with pytest.raises(DriverError):  # completed: no more secondaries
            ring.fused_secondary(p, Op.READ, 5, nbytes=8, on_complete=ev.secondary)
        del p
        assert_idle(ring, fake)


async def test_nothing_lent_completes_without_on_lent() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver())
        ev = Events()
        cmd = (-errno.ENODATA).to_bytes(4, "little", signed=True)
        ring.open_fused(df, NULL_INLINE, cmd=cmd, on_lent=ev.lent, on_complete=ev.primary)
        await settle(ring)
        assert ev.log == [("primary", -errno.ENODATA)]
        assert_idle(ring, fake)


async def test_misuse_is_refused() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver(size=16))
        ev = Events()
        p = ring.open_fused(
            df, NULL_LEND, buf_dir=BufDir.SRC, on_lent=ev.lent, on_complete=ev.primary
        )
        with pytest.raises(ValueError, match="READ"):  # writes into a SRC buffer
            ring.fused_secondary(p, Op.READ, 5, nbytes=16, on_complete=ev.secondary)
        with pytest.raises(ValueError, match="NOP"):
            ring.fused_secondary(p, Op.NOP, 5, nbytes=16, on_complete=ev.secondary)
        ring.fused_secondary(p, Op.WRITE, 5, nbytes=32, on_complete=ev.secondary)  # too long
        ring.seal(p)
        await settle(ring)
        assert ev.log == [("lent", 16), ("secondary", -errno.EFAULT), ("primary", 0)]
        with pytest.raises(DriverError):  # completed
            ring.fused_secondary(p, Op.WRITE, 5, nbytes=1, on_complete=ev.secondary)
        del p
        assert_idle(ring, fake)


async def test_a_bad_driver_file_completes_with_its_errno() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        ev = Events()
        bad_fd: object = 2**30
        ring.open_fused(bad_fd, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)  # type: ignore[arg-type]
        await settle(ring)
        assert ev.log == [("primary", -errno.EBADF)]
        assert_idle(ring, fake)


async def test_cancel_secondaries_then_seal() -> None:
    fake = FakeBackend()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver(size=16))
        ev = Events()
        p = ring.open_fused(df, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)
        ring.fused_secondary(p, Op.READ, 5, nbytes=16, on_complete=ev.secondary)
        ring.cancel_secondaries(p)
        ring.seal(p)
        await settle(ring)
        cancelled = [("secondary", -errno.ECANCELED), ("primary", -errno.ECANCELED)]
        assert ev.log == [("lent", 16), *cancelled]
        del p
        assert_idle(ring, fake)


async def test_close_ends_an_open_primary_that_was_never_sealed() -> None:
    """A callback user that never seals must not make close() wait forever: closing
    cancels the secondaries and seals the primary; every callback still runs."""
    fake = FakeBackend()
    ev = Events()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver(size=16))
        p = ring.open_fused(df, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)
        ring.fused_secondary(p, Op.READ, 5, nbytes=16, on_complete=ev.secondary)
        del p
        closing = asyncio.ensure_future(ring.close())
        await asyncio.wait_for(closing, 5)
    cancelled = [("secondary", -errno.ECANCELED), ("primary", -errno.ECANCELED)]
    assert ev.log == [("lent", 16), *cancelled]
    assert_idle(ring, fake)


async def test_a_raising_callback_is_logged_and_the_command_still_completes() -> None:
    """A secondary's completion callback that raises must not leave its record behind:
    the primary completes, nothing stays lent, and close() does not wait forever."""
    fake = FakeBackend()
    ev = Events()
    async with Ring(8, flags=FUSED, backend=fake) as ring:
        df = ring.register_driver(NullDriver(size=16))

        def boom(res: int, flags: int) -> None:
            ev.secondary(res, flags)
            raise RuntimeError("callback bug")

        p = ring.open_fused(df, NULL_LEND, on_lent=ev.lent, on_complete=ev.primary)
        ring.fused_secondary(p, Op.READ, 5, nbytes=16, on_complete=boom)
        ring.seal(p)
        fake.complete(0)
        await settle(ring)
        assert ev.log == [("lent", 16), ("secondary", 16), ("primary", 0)]
        del p
        assert_idle(ring, fake)
