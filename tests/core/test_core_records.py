"""Record recycling: a finished request record is reused; one somebody still refers to
(a driver keeping its command, a lease holding its secondary) never is.

Reuse is observed by counting live ``Req`` objects with the cyclic GC off (so nothing
is collected in between): a reused record adds none, a fresh one adds one.  Identity
checks alone could be fooled by the allocator handing a freed address out again.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from recording_port import LendingDriver, make_core, sqe

from aiofused._abi import ENOENT
from aiofused._core.records import DriverFile, FusedState, Req, ReqState


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def live_reqs() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Req)


def test_a_finished_record_is_reused(gc_off: None) -> None:
    core, port = make_core()
    sqe(core, 1, "read", 5, bytearray(8))
    core.submit()
    first = id(port.pending[0])
    port.complete(1, 8)
    before = live_reqs()
    for ud in range(2, 6):  # one record serves every request in turn
        sqe(core, ud, "read", 5, bytearray(8))
        core.submit()
        assert id(port.pending[0]) == first
        assert port.pending[0].user_data == ud
        port.complete(ud, 8)
    assert live_reqs() == before
    assert port.pairs() == [(ud, 8) for ud in range(1, 6)]
    port.assert_quiet()


def test_a_record_still_referenced_is_not_reused(gc_off: None) -> None:
    core, port = make_core()
    sqe(core, 1, "read", 5, bytearray(8))
    core.submit()
    held = port.pending[0]
    port.complete(1, 8)
    assert held.state is ReqState.FREE  # finished and recycled as far as the core goes
    before = live_reqs()
    sqe(core, 2, "read", 5, bytearray(8))
    core.submit()
    fresh = port.pending[0]
    assert fresh is not held
    assert live_reqs() == before + 1
    assert held.user_data == 1 and held.res == 8  # untouched
    port.complete(2, 8)
    del fresh
    port.assert_quiet()


def test_a_command_kept_by_its_driver_stays_finished(gc_off: None) -> None:
    core, port = make_core()
    drv = LendingDriver(keep=True)
    drv.port = port
    df = DriverFile(drv, core.add_file(drv), core.id)
    for ud in (1, 3, 5):
        sqe(core, ud, "fused_cmd", df, 0)
        sqe(core, ud + 1, "read", 5, 0, 16, 0)
        core.submit()
        port.complete(ud + 1, 16)
        port.run_work()
    assert port.pairs() == [(2, 16), (1, 0), (4, 16), (3, 0), (6, 16), (5, 0)]
    kept = drv.kept
    assert len({id(c) for c in kept}) == 3  # three distinct records
    for cmd, ud in zip(kept, (1, 3, 5), strict=True):
        assert cmd.finished and cmd.fstate is FusedState.DONE
        assert cmd.user_data == ud and cmd.res == 0
    del cmd
    kept.clear()
    port.assert_quiet()


def test_unreferenced_commands_and_secondaries_are_reused(gc_off: None) -> None:
    core, port = make_core()
    drv = LendingDriver()
    drv.port = port
    df = DriverFile(drv, core.add_file(drv), core.id)

    def one(ud: int) -> None:
        sqe(core, ud, "fused_cmd", df, 0, nr_secondary=2)
        sqe(core, ud + 1, "read", 5, 0, 16, 0)
        sqe(core, ud + 2, "read", 5, 16, 16, 0)
        core.submit()
        port.complete(ud + 2, 16)
        port.complete(ud + 1, 16)
        port.run_work()

    one(10)
    before = live_reqs()
    one(20)
    one(30)
    assert live_reqs() == before
    assert port.pairs()[-3:] == [(32, 16), (31, 16), (30, 0)]
    port.assert_quiet()


def test_a_private_secondary_held_by_its_awaiter_is_not_reused(gc_off: None) -> None:
    """The lease keeps its secondary record while it awaits; a cancel arriving after
    the completion must not reach whatever request the record would have become."""
    from aiofused._abi import BufDir, Op

    core, port = make_core()
    drv = LendingDriver()
    drv.port = port
    df = DriverFile(drv, core.add_file(drv), core.id)
    p = core.private_primary(df, 0, b"", BufDir.DEST, lambda r, f: None)
    core.start_private(p)
    s = core.private_secondary(Op.READ, 5, 0, 16, 0, 0, lambda r, f: None)
    core.add_secondary(p, s)
    port.complete(port.pending[0], 16)
    other = core.private_secondary(Op.READ, 5, 16, 16, 0, 0, lambda r, f: None)
    assert other is not s
    core.add_secondary(p, other)
    answers: list[int] = []
    core.cancel_req(s, answers.append)  # late: s already finished
    assert answers == [ENOENT]  # and nothing was asked of the port
    assert not port.cancels
    port.complete(port.pending[0], 16)
    core.seal(p)
    port.run_work()
    del p, s, other
    port.assert_quiet()


def test_finished_records_drop_their_references() -> None:
    """A finished record holds no buffer, file, driver or callback (F11, F13)."""
    core, port = make_core()
    drv = LendingDriver(keep=True)
    df = DriverFile(drv, core.add_file(drv), core.id)
    sqe(core, 1, "fused_cmd", df, 0)
    sqe(core, 2, "read", 5, 0, 16, 0)
    core.submit()
    s = port.pending[0]
    port.complete(2, 16)
    port.run_work()
    (cmd,) = drv.kept
    for r in (cmd, s):
        assert r.buf is None and r.file is None and r.driver is None
        assert r.on_cqe is None and r.handle is None and r.backend is None
    assert cmd.base is None and cmd.callback is None and cmd.secondaries == []
    assert s.primary is None
    assert port.pairs() == [(2, 16), (1, 0)]
    del cmd, s
    drv.kept.clear()
    port.assert_quiet()
