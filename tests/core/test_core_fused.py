"""Fused commands in the pure core, with a tiny in-test driver (SPEC F1-F12).

The recording port holds every secondary until the test completes it, so "secondaries
complete in any order", "the callback is task work", "P's CQE comes last" and "views
are released before P's CQE" are checked at the exact moment they happen.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from recording_port import (
    DRAIN,
    HARD,
    LINK,
    SKIP,
    LendingDriver,
    RecordingPort,
    make_core,
    sqe,
)

from aiofused._abi import (
    EALREADY,
    EBADF,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    EIOCBQUEUED,
    EOPNOTSUPP,
    ETIME,
    BufDir,
    CqeFlag,
    Op,
    SqeFlag,
)
from aiofused._core.records import DriverFile, FusedState
from aiofused._core.ring import RingCore

FLAG_DEST = 1 << 11
FLAG_SRC = 1 << 12


def setup(entries: int = 16, **drv_kw: Any) -> tuple[RingCore, RecordingPort, LendingDriver, Any]:
    core, port = make_core(entries)
    drv = LendingDriver(**drv_kw)
    drv.port = port
    df = DriverFile(drv, core.add_file(drv), core.id)
    return core, port, drv, df


def fused(core: RingCore, ud: int, df: Any, n: int = 1, cmd_op: int = 0, flags: int = 0) -> Any:
    return sqe(core, ud, "fused_cmd", df, cmd_op, nr_secondary=n, flags=flags)


def sec(core: RingCore, ud: int, at: int, n: int = 16, op: str = "read", flags: int = 0) -> Any:
    return sqe(core, ud, op, 5, at, n, 0, flags=flags)


def started(port: RecordingPort) -> list[int]:
    return [e[1] for e in port.events if e[0] == "start"]


# ---- F9, F11: lend, any completion order, P last ------------------------------------


def test_f9_secondaries_complete_in_any_order_primary_last() -> None:
    for order in itertools.permutations([11, 12, 13]):
        _one_order(order)


def _one_order(order: tuple[int, ...]) -> None:
    core, port, drv, df = setup()
    fused(core, 10, df, n=3)
    sec(core, 11, 0)
    sec(core, 12, 16)
    sec(core, 13, 32)
    assert core.submit() == 4
    assert drv.calls == [(0, True, BufDir.DEST, FLAG_DEST)]
    assert sorted(started(port)) == [11, 12, 13]  # all issued at once, on lend
    assert core.lent == 1
    with pytest.raises(BufferError):
        drv.buf.extend(b"x")  # the lent buffer is pinned

    at_p_cqe: list[tuple[int, int]] = []
    port.on_cqe = lambda c: at_p_cqe.append((core.views, core.lent)) if c.user_data == 10 else None
    res = {11: 16, 12: 7, 13: EIO}
    for ud in order:
        port.complete(ud, res[ud])
    assert port.pairs() == [(ud, res[ud]) for ud in order]
    assert len(port.work) == 1  # the callback is task work, not run inline
    port.run_work()
    assert port.pairs()[-1] == (10, 0)
    (results, cancelled, _views, lent, ncqes) = drv.callbacks[0]
    assert results == [16, 7, EIO]  # by secondary index, not completion order
    assert not cancelled and lent == 1 and ncqes == 3
    assert at_p_cqe == [(0, 0)]  # F11: views released before P's CQE
    drv.buf.extend(b"x")
    port.assert_quiet()


def test_f8_secondary_out_of_bounds_is_efault_and_p_goes_on() -> None:
    core, port, _drv, df = setup(size=64)
    fused(core, 1, df, n=3)
    sec(core, 2, 65, 1)  # addr > len(buf)
    sec(core, 3, 60, 8)  # len > len(buf) - addr
    sec(core, 4, 48, 16)  # exactly to the end
    core.submit()
    assert started(port) == [4]
    assert sorted(port.pairs()) == [(2, EFAULT), (3, EFAULT)]
    port.complete(4, 16)
    port.run_work()
    assert port.pairs()[-1] == (1, 0)
    port.assert_quiet()


def test_f8_views_match_the_direction_and_the_range() -> None:
    core, port, drv, df = setup(size=64)
    drv.buf[:] = bytes(range(64))
    fused(core, 1, df, n=2, cmd_op=3)
    sec(core, 2, 8, 4, op="write")
    sec(core, 3, 60, 4, op="send")
    core.submit()
    assert drv.calls[0][2] is BufDir.SRC and drv.calls[0][3] == FLAG_SRC
    w, s = port.find(2), port.find(3)
    assert bytes(w.buf) == bytes(range(8, 12)) and bytes(s.buf) == bytes(range(60, 64))
    port.complete(w, 4)
    port.complete(s, 4)
    port.run_work()
    assert port.pairs()[-1] == (1, 8)  # cmd_op 3: the sum of the secondaries
    port.assert_quiet()


def test_f9_skip_on_a_secondary_and_on_the_primary() -> None:
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2, flags=SKIP)
    sec(core, 2, 0, flags=SKIP)
    sec(core, 3, 16, flags=SKIP)
    core.submit()
    port.complete(2, 16)
    port.complete(3, EIO)
    port.run_work()
    assert port.pairs() == [(3, EIO)]
    port.assert_quiet()


def test_f9_send_zc_notif_comes_before_the_primary() -> None:
    core, port, _drv, df = setup()
    fused(core, 1, df)
    sec(core, 2, 0, 64, op="send_zc")
    core.submit()
    port.complete_zc(2, 64)
    assert not port.work
    assert core.lent == 1  # the buffer is still used until the NOTIF
    port.notif(2)
    port.run_work()
    assert [(c.user_data, c.res, c.flags) for c in port.cqes] == [
        (2, 64, CqeFlag.MORE),
        (2, 0, CqeFlag.NOTIF),
        (1, 0, 0),
    ]
    port.assert_quiet()


# ---- F1-F7: validation ----------------------------------------------------------------


def test_f1_ring_without_fused_req() -> None:
    """Without FUSED_REQ, opcode 128 is an unknown opcode (the kernel's answer, issue 12
    class 18): -EINVAL at init, which stops submit; what follows is no secondary."""
    core, port = make_core(flags=0)
    drv = LendingDriver()
    df = DriverFile(drv, core.add_file(drv), core.id)
    fused(core, 1, df)
    sec(core, 2, 0)
    assert core.submit() == 1
    assert port.pairs() == [(1, EINVAL)]
    assert core.submit() == 1  # the would-be secondary: an ordinary READ with an int addr
    assert port.pairs() == [(1, EINVAL), (2, EFAULT)]
    assert drv.calls == []
    port.assert_quiet()


def test_f2_bad_primary_fields() -> None:
    for field in ["pad1", "uring_cmd_flags", "buffer_select", "cmd_too_long"]:
        _bad_primary_field(field)


def _bad_primary_field(field: str) -> None:
    core, port, drv, df = setup()
    p = fused(core, 1, df)
    if field == "pad1":
        p.pad1 = 1
    elif field == "uring_cmd_flags":
        p.uring_cmd_flags = 0
    elif field == "buffer_select":
        p.flags |= SqeFlag.BUFFER_SELECT
    else:
        p.cmd = bytes(81)
    sec(core, 2, 0)
    sqe(core, 3, "nop")
    assert core.submit() == 2  # a standalone failure stops submit (R4)
    assert port.pairs() == [(2, ECANCELED), (1, EINVAL)]
    assert drv.calls == []
    core.submit()
    port.assert_quiet()


def test_f3_nr_secondary_bounds() -> None:
    core, port, drv, df = setup(entries=128)
    fused(core, 1, df, n=0)
    assert core.submit() == 1
    fused(core, 2, df, n=65)
    assert core.submit() == 1
    assert port.take() == [(1, EINVAL), (2, EINVAL)]
    fused(core, 3, df, n=3)  # only two SQEs follow
    sec(core, 4, 0)
    sec(core, 5, 16)
    assert core.submit() == 3
    assert port.take() == [(4, ECANCELED), (5, ECANCELED), (3, EINVAL)]
    fused(core, 6, df, n=64)
    for i in range(64):
        sec(core, 100 + i, 16 * (i % 256), 16)
    assert core.submit() == 65
    assert len(started(port)) == 64
    for i in reversed(range(64)):
        port.complete(100 + i, 16)
    port.run_work()
    assert port.pairs()[-1] == (6, 0) and len(port.pairs()) == 65
    assert drv.calls == [(0, True, BufDir.DEST, FLAG_DEST)]
    port.assert_quiet()


BAD_SECONDARIES = {
    "fused": lambda c, df: fused(c, 2, df),
    "nop": lambda c, df: sqe(c, 2, "nop"),
    "fsync": lambda c, df: sqe(c, 2, "fsync", 5),
    "link": lambda c, df: sec(c, 2, 0, flags=LINK),
    "hardlink": lambda c, df: sec(c, 2, 0, flags=HARD),
    "drain": lambda c, df: sec(c, 2, 0, flags=DRAIN),
    "bufsel": lambda c, df: sec(c, 2, 0, flags=int(SqeFlag.BUFFER_SELECT)),
    "badflag": lambda c, df: sec(c, 2, 0, flags=1 << 7),
}


def test_f4_bad_secondary() -> None:
    for name, make in BAD_SECONDARIES.items():
        core, port, drv, df = setup()
        fused(core, 1, df)
        make(core, df)
        core.submit()
        assert port.pairs() == [(2, ECANCELED), (1, EINVAL)], name
        assert drv.calls == [], name
        port.assert_quiet()


def test_f5_mixed_directions() -> None:
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2)
    sec(core, 2, 0, op="read")
    sec(core, 3, 0, op="send")
    core.submit()
    assert port.pairs() == [(2, ECANCELED), (3, ECANCELED), (1, EINVAL)]
    port.assert_quiet()


def test_f6_bad_fd_plain_file_and_incapable_driver() -> None:
    core, port = make_core()
    fused(core, 1, 99)  # not open
    sec(core, 2, 0)
    fused(core, 3, 5)  # open, but no uring_cmd
    sec(core, 4, 0)
    drv = LendingDriver(can_fused=False)
    df = DriverFile(drv, core.add_file(drv), core.id)
    fused(core, 5, df)
    sec(core, 6, 0)
    core.submit()
    assert port.pairs() == [
        (2, ECANCELED),
        (1, EBADF),
        (4, ECANCELED),
        (3, EOPNOTSUPP),
        (6, ECANCELED),
        (5, EOPNOTSUPP),
    ]
    assert drv.calls == []  # never called
    port.assert_quiet()


def test_f7_inline_result_cancels_the_secondaries() -> None:
    for result in (7, -5, 0):
        _inline(result)


def _inline(result: int) -> None:
    core, port, _drv, df = setup(result=result)
    fused(core, 1, df, n=2, cmd_op=1)
    sec(core, 2, 0)
    sec(core, 3, 16, flags=SKIP)
    core.submit()
    assert port.pairs() == [(2, ECANCELED), (3, ECANCELED), (1, result)]
    assert started(port) == []
    port.assert_quiet()


def test_f7_driver_that_raises_completes_with_eio() -> None:
    class Raising(LendingDriver):
        def uring_cmd(self, cmd: Any, issue_flags: int) -> int:
            raise RuntimeError("driver bug")

    core, port = make_core()
    drv = Raising()
    df = DriverFile(drv, core.add_file(drv), core.id)
    fused(core, 1, df)
    sec(core, 2, 0)
    core.submit()
    assert port.pairs() == [(2, ECANCELED), (1, EIO)]
    assert [e for e, _ in port.errors] == ["driver_raised"]
    port.errors.clear()
    port.assert_quiet()


def test_f7_queued_without_lending_then_done() -> None:
    core, port, drv, df = setup(keep=True)
    fused(core, 1, df, n=1, cmd_op=2)
    sec(core, 2, 0)
    core.submit()
    assert port.pairs() == []
    (cmd,) = drv.kept
    assert cmd.fstate is FusedState.ISSUED
    cmd.complete_in_task(lambda c: c.done(9))
    port.run_work()
    assert port.pairs() == [(2, ECANCELED), (1, 9)]
    del cmd
    drv.kept.clear()
    port.assert_quiet()


def test_plain_uring_cmd() -> None:
    core, port, drv, df = setup(result=3)
    sqe(core, 1, "uring_cmd", df, 1)
    core.submit()
    assert port.pairs() == [(1, 3)]
    assert drv.calls == [(1, False, None, 0)]
    port.assert_quiet()


# ---- F10: P in chains ---------------------------------------------------------------


def test_f10_primary_is_an_ordinary_chain_member() -> None:
    core, port, _drv, df = setup()
    sqe(core, 9, "nop", flags=LINK)
    fused(core, 1, df, flags=LINK)
    sec(core, 2, 0)
    sqe(core, 10, "nop")
    core.submit()
    assert port.pairs() == [(9, 0)]
    port.complete(2, 16)
    assert port.pairs() == [(9, 0), (2, 16)]
    port.run_work()
    assert port.pairs() == [(9, 0), (2, 16), (1, 0), (10, 0)]
    port.assert_quiet()


def test_f10_failing_primary_severs() -> None:
    core, port, _drv, df = setup(result=-5)
    fused(core, 1, df, flags=LINK)
    sec(core, 2, 0)
    sqe(core, 3, "nop")
    core.submit()
    port.complete(2, 16)
    port.run_work()
    assert port.pairs() == [(2, 16), (1, -5), (3, ECANCELED)]
    port.assert_quiet()


def test_f10_primary_behind_a_failed_link_never_reaches_its_driver() -> None:
    core, port, drv, df = setup()
    sqe(core, 1, "read", 5, bytearray(8), flags=LINK)
    fused(core, 2, df)
    sec(core, 3, 0)
    core.submit()
    port.complete(1, 2)  # short read: fails the link
    assert port.pairs() == [(1, 2), (3, ECANCELED), (2, ECANCELED)]
    assert drv.calls == []
    port.assert_quiet()


# ---- F12: cancellation ---------------------------------------------------------------


def test_f12_cancel_a_secondary_then_p_completes_normally() -> None:
    core, port, drv, df = setup()
    fused(core, 1, df, n=2)
    sec(core, 2, 0)
    sec(core, 3, 16)
    core.submit()
    sqe(core, 20, "cancel", 2)
    core.submit()
    port.answer_cancel(2)
    assert port.pairs() == [(2, ECANCELED), (20, 0)]
    port.complete(3, 16)
    port.run_work()
    assert port.pairs()[-2:] == [(3, 16), (1, 0)]
    assert drv.callbacks[0][0] == [ECANCELED, 16] and not drv.callbacks[0][1]
    port.assert_quiet()


def test_f12_cancel_the_lent_primary_cancels_its_secondaries_and_waits() -> None:
    core, port, drv, df = setup()
    fused(core, 1, df, n=3)
    sec(core, 2, 0)
    sec(core, 3, 16)
    sec(core, 4, 32)
    core.submit()
    port.complete(4, 16)
    sqe(core, 20, "cancel", 1)
    core.submit()
    assert sorted(r.user_data for r, _ in port.cancels) == [2, 3]
    assert port.pairs() == [(4, 16), (20, 0)]
    port.answer_cancel(3)
    assert not port.work  # P waits for the last one
    assert core.lent == 1
    port.answer_cancel(2, EALREADY)  # running: it completes normally later
    port.complete(2, 16)
    port.run_work()
    assert port.pairs() == [(4, 16), (20, 0), (3, ECANCELED), (2, 16), (1, ECANCELED)]
    assert drv.callbacks[0][1] is True  # cmd.cancelled
    port.assert_quiet()


def test_f12_cancel_an_issued_primary_without_a_hook() -> None:
    core, port, drv, df = setup(keep=True)
    fused(core, 1, df, cmd_op=2)
    sec(core, 2, 0)
    core.submit()
    sqe(core, 20, "cancel", 1)
    core.submit()
    assert port.pairs() == [(2, ECANCELED), (1, ECANCELED), (20, 0)]
    (cmd,) = drv.kept
    assert cmd.finished
    from aiofused._errors import DriverError

    with pytest.raises(DriverError):
        cmd.provide_buf_and_start(drv.buf, lambda c: c.done(0))  # never after P's CQE
    assert started(port) == []
    del cmd
    drv.kept.clear()
    port.assert_quiet()


def test_f12_cancel_an_issued_primary_with_a_hook() -> None:
    core, port, drv, df = setup(keep=True)
    fused(core, 1, df, cmd_op=2)
    sec(core, 2, 0)
    core.submit()
    (cmd,) = drv.kept
    hooked: list[Any] = []
    cmd.cancel_hook = hooked.append
    sqe(core, 20, "cancel", 1)
    core.submit()
    assert hooked == [cmd] and cmd.cancelled
    assert port.pairs() == [(20, 0)]
    cmd.done(ECANCELED)
    assert port.pairs() == [(20, 0), (2, ECANCELED), (1, ECANCELED)]
    del cmd, hooked
    drv.kept.clear()
    port.assert_quiet()


def test_f12_close_cancels_a_lent_primary_and_waits() -> None:
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2)
    sec(core, 2, 0)
    sec(core, 3, 16)
    core.submit()
    core.cancel_all()
    # Each secondary is asked at least once (through P, and again as an in-flight
    # request of its own: the second answer is -ENOENT).
    assert {r.user_data for r, _ in port.cancels} == {2, 3}
    assert core.in_flight() == 3
    port.answer_all_cancels()
    assert core.in_flight() == 1  # P: its callback is task work
    port.run_work()
    assert port.pairs() == [(2, ECANCELED), (3, ECANCELED), (1, ECANCELED)]
    port.assert_quiet()


def test_f11_a_secondary_is_never_issued_twice() -> None:
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2)
    sec(core, 2, 0)
    sec(core, 3, 16)
    core.submit()
    port.complete(2, 16)
    port.complete(3, 16)
    port.run_work()
    assert started(port) == [2, 3]
    assert [e for e in port.events if e[0] == "driver"] == [("driver", 1, 0)]
    port.assert_quiet()


# ---- the lease's primitives (the high-level API runs on them) ----------------------------


def test_private_primary_and_secondaries() -> None:
    core, port, _drv, df = setup()
    got: list[tuple[str, int]] = []
    p = core.private_primary(df, 0, b"", BufDir.DEST, lambda r, f: got.append(("P", r)))
    lent: list[bool] = []
    p.on_lent = lambda cmd, n: lent.append(cmd.is_fused and n > 0)
    core.start_private(p)
    assert lent == [True] and core.lent == 1
    view = core.lease_view(p)
    for i in range(2):
        s = core.private_secondary(
            Op.READ, 5, 16 * i, 16, 0, 0, lambda r, f, i=i: got.append((f"S{i}", r))
        )
        core.add_secondary(p, s)
        del s
    assert len(port.pending) == 2
    port.complete(port.pending[1], 16)
    port.complete(port.pending[0], 4)
    core.seal(p)
    port.run_work()
    assert got == [("S1", 16), ("S0", 4), ("P", 0)]
    assert port.cqes == []  # private: nothing in the CQ
    with pytest.raises(ValueError):
        bytes(view)  # released with the others (F11)
    del p
    port.assert_quiet()


def test_eiocbqueued_is_the_kernel_value() -> None:
    assert EIOCBQUEUED == -529


def test_f12_cancel_p_waits_for_a_send_zc_secondary_notif() -> None:
    """F9/F12: a cancelled primary still waits for its SEND_ZC secondary's NOTIF."""
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2)
    sec(core, 2, 0, op="send_zc")
    sec(core, 3, 16, op="send")
    core.submit()
    port.complete_zc(2, 16)
    sqe(core, 20, "cancel", 1)
    core.submit()
    assert [r.user_data for r, _ in port.cancels] == [3]  # 2 is only waiting for its NOTIF
    port.answer_all_cancels()
    assert not port.work and core.lent == 1
    port.notif(2)
    port.run_work()
    assert [(c.user_data, c.res, c.flags) for c in port.cqes] == [
        (2, 16, CqeFlag.MORE),
        (20, 0, 0),
        (3, ECANCELED, 0),
        (2, 0, CqeFlag.NOTIF),
        (1, ECANCELED, 0),
    ]
    port.assert_quiet()


def test_l6_link_timeout_on_a_fused_primary() -> None:
    """SPEC L6 + F12: a LINK_TIMEOUT after P cancels P (its secondaries first) and severs
    the chain; the timeout's CQE is -ETIME."""
    core, port, _drv, df = setup()
    fused(core, 1, df, n=2, flags=LINK)
    sec(core, 2, 0)
    sec(core, 3, 16)
    sqe(core, 4, "link_timeout", 1.0, flags=LINK)
    sqe(core, 5, "nop")
    core.submit()
    port.fire(4)
    port.answer_all_cancels()
    port.run_work()
    got = port.pairs()
    assert sorted(got) == sorted(
        [(4, ETIME), (2, ECANCELED), (3, ECANCELED), (1, ECANCELED), (5, ECANCELED)]
    )
    assert got.index((2, ECANCELED)) < got.index((1, ECANCELED)) < got.index((5, ECANCELED))
    assert got.index((3, ECANCELED)) < got.index((1, ECANCELED))
    port.assert_quiet()
