"""The scheduler with synthetic completions: submit (R2, R4), links and hardlinks (L1-L3),
CQE_SKIP_SUCCESS (L4), drain (L5), LINK_TIMEOUT fired by hand and ASYNC_CANCEL (L6),
TIMEOUT (R7), SEND_ZC (R8), and ring close.  No event loop: the recording port starts
nothing, the test completes each op, answers each cancellation and fires each timer.
"""

from __future__ import annotations

import pytest
from recording_port import DRAIN, HARD, LINK, SKIP, make_core, sqe

from aiofused._abi import (
    EALREADY,
    EBADF,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    ENOENT,
    EOPNOTSUPP,
    ETIME,
    IORING_ASYNC_CANCEL_ALL,
    CqeFlag,
    Op,
)
from aiofused._errors import RingClosedError

WAITALL = 0x100  # MSG_WAITALL


def read(core, ud: int, n: int = 8, flags: int = 0, fd: int = 5):  # type: ignore[no-untyped-def]
    return sqe(core, ud, "read", fd, bytearray(n), n, 0, flags=flags)


def started(port) -> list[int]:  # type: ignore[no-untyped-def]
    return [e[1] for e in port.events if e[0] == "start"]


# ---- R2, R4 -------------------------------------------------------------------------


def test_r2_nop_completes_in_submit_and_standalone_ops_start_together() -> None:
    core, port = make_core()
    sqe(core, 1, "nop")
    read(core, 2)
    read(core, 3)
    assert core.submit() == 3
    assert port.pairs() == [(1, 0)]
    assert started(port) == [2, 3]  # concurrently: both started at once
    assert core.in_flight() == 2
    port.complete(3, 8)
    port.complete(2, 8)
    assert port.pairs() == [(1, 0), (3, 8), (2, 8)]
    port.assert_quiet()


def test_r4_standalone_init_error_stops_submit() -> None:
    core, port = make_core()
    sqe(core, 1, "nop")
    bad = sqe(core, 2, "nop")
    bad.opcode = 255
    sqe(core, 3, "nop")
    assert core.submit() == 2
    assert core.sq_ready() == 1
    assert port.pairs() == [(1, 0), (2, EINVAL)]
    assert core.submit() == 1
    assert port.pairs()[-1] == (3, 0)
    port.assert_quiet()


def test_submit_drops_the_slot_references() -> None:
    """The SQ slot keeps no reference to the caller's buffer or file after submit."""
    core, port = make_core()
    buf = bytearray(8)
    s = sqe(core, 1, "read", 5, buf)
    core.submit()
    assert s.addr == 0 and s.fd == -1
    port.complete(1, 8)
    port.assert_quiet()


# ---- L1 -----------------------------------------------------------------------------


def test_l1_chain_runs_serially_in_order() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=LINK)
    read(core, 2, flags=LINK)
    read(core, 3, flags=LINK)
    sqe(core, 4, "nop")
    core.submit()
    assert port.pairs() == [(1, 0)]
    assert started(port) == [2]  # 3 waits for 2
    port.complete(2, 8)
    assert started(port) == [2, 3]
    assert port.pairs() == [(1, 0), (2, 8)]
    port.complete(3, 8)
    assert port.pairs() == [(1, 0), (2, 8), (3, 8), (4, 0)]
    port.assert_quiet()


def test_l1_the_last_sqe_ends_the_chain() -> None:
    """IO_LINK on the last SQE of a submit: the next submit starts a new unit."""
    core, port = make_core()
    read(core, 1, flags=LINK)
    core.submit()
    sqe(core, 2, "nop")
    core.submit()
    assert port.pairs() == [(2, 0)]  # not held behind 1
    port.complete(1, 8)
    assert port.pairs() == [(2, 0), (1, 8)]
    port.assert_quiet()


def test_l1_two_chains_run_concurrently() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    read(core, 2)
    read(core, 3, flags=LINK)
    read(core, 4)
    core.submit()
    assert started(port) == [1, 3]
    port.complete(3, 8)
    port.complete(4, 8)
    port.complete(1, 8)
    port.complete(2, 8)
    assert port.pairs() == [(3, 8), (4, 8), (1, 8), (2, 8)]
    port.assert_quiet()


# ---- L2 -----------------------------------------------------------------------------


def test_l2_failed_link_cancels_the_rest_in_order() -> None:
    for res in (EIO, 3, 0):  # an error, a short read, EOF
        _failed_link(res)


def _failed_link(res: int) -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    read(core, 2, flags=LINK)
    sqe(core, 3, "nop", flags=LINK)
    read(core, 4)
    core.submit()
    port.complete(1, res)
    assert port.pairs() == [(1, res), (2, ECANCELED), (3, ECANCELED), (4, ECANCELED)]
    assert started(port) == [1]  # nothing behind the failure ever started
    port.assert_quiet()


def test_l2_hardlink_does_not_sever() -> None:
    for res in (EIO, 3):
        _hardlink(res)


def _hardlink(res: int) -> None:
    core, port = make_core()
    read(core, 1, flags=HARD)
    read(core, 2)
    core.submit()
    port.complete(1, res)
    assert started(port) == [1, 2]
    port.complete(2, 8)
    assert port.pairs() == [(1, res), (2, 8)]
    port.assert_quiet()


def test_l2_short_recv_with_waitall_severs() -> None:
    core, port = make_core()
    s = sqe(core, 1, "recv", 5, bytearray(8), flags=LINK)
    s.rw_flags = WAITALL
    sqe(core, 2, "nop")
    core.submit()
    port.complete(1, 4)
    assert port.pairs() == [(1, 4), (2, ECANCELED)]
    port.assert_quiet()


def test_l2_issue_error_severs_like_a_failed_result() -> None:
    """An fd the port reports closed is -EBADF at issue, and fails the link."""
    core, port = make_core()
    read(core, 1, flags=LINK, fd=99)
    sqe(core, 2, "nop")
    read(core, 3, flags=HARD, fd=99)
    sqe(core, 4, "nop")
    core.submit()
    # fd 99 is not in the recording port's open set, but a plain READ does not ask the
    # port: -EBADF comes from the backend (here: the test) like any result.
    port.complete(1, EBADF)
    port.complete(3, EBADF)
    assert port.pairs() == [(1, EBADF), (2, ECANCELED), (3, EBADF), (4, 0)]
    port.assert_quiet()


# ---- L3 -----------------------------------------------------------------------------


def test_l3_init_error_in_a_chain_fails_the_whole_chain_and_goes_on() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    bad = sqe(core, 2, "nop", flags=LINK)
    bad.opcode = 255
    read(core, 3)
    sqe(core, 4, "nop")  # after the chain: consumed, runs
    assert core.submit() == 4
    assert port.pairs() == [(1, ECANCELED), (2, EINVAL), (3, ECANCELED), (4, 0)]
    assert started(port) == []
    port.assert_quiet()


def test_l3_init_error_that_ends_a_chain_stops_submit() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=LINK)
    bad = sqe(core, 2, "nop")
    bad.opcode = 255
    sqe(core, 3, "nop")
    assert core.submit() == 2
    assert port.pairs() == [(1, ECANCELED), (2, EINVAL)]
    assert core.submit() == 1
    assert port.pairs()[-1] == (3, 0)
    port.assert_quiet()


def test_l3_init_error_severs_even_a_hardlink() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=HARD)
    bad = sqe(core, 2, "nop", flags=HARD)
    bad.flags |= 1 << 7  # unknown flag bit
    sqe(core, 3, "nop")
    core.submit()
    assert port.pairs() == [(1, ECANCELED), (2, EINVAL), (3, ECANCELED)]
    port.assert_quiet()


# ---- L4 -----------------------------------------------------------------------------


def test_l4_skip_hides_successes_only() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=SKIP)
    read(core, 2, flags=SKIP)
    read(core, 3, flags=SKIP)
    read(core, 4, flags=SKIP)
    core.submit()
    port.complete(2, 8)
    port.complete(3, 5)  # short: a failure for READ, so it is posted
    port.complete(4, EIO)
    assert port.pairs() == [(3, 5), (4, EIO)]
    port.assert_quiet()


def test_l4_failed_skip_request_hides_the_cancelled_rest_of_its_chain() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    read(core, 2, flags=LINK | SKIP)
    read(core, 3, flags=LINK)
    sqe(core, 4, "nop")
    core.submit()
    port.complete(1, 8)
    port.complete(2, EIO)
    assert port.pairs() == [(1, 8), (2, EIO)]  # 3 and 4 are -ECANCELED, not posted
    port.assert_quiet()


def test_l4_failed_skip_hardlink_goes_on() -> None:
    core, port = make_core()
    read(core, 1, flags=HARD | SKIP)
    read(core, 2, flags=SKIP)
    core.submit()
    port.complete(1, EIO)
    port.complete(2, 8)
    assert port.pairs() == [(1, EIO)]
    port.assert_quiet()


def test_l4_cancelled_skip_members_are_posted_behind_a_plain_failure() -> None:
    """Members with SKIP cancelled by a non-SKIP failure post their -ECANCELED."""
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "nop", flags=LINK | SKIP)
    sqe(core, 3, "nop", flags=SKIP)
    core.submit()
    port.complete(1, EIO)
    assert port.pairs() == [(1, EIO), (2, ECANCELED), (3, ECANCELED)]
    port.assert_quiet()


def test_r3_drain_after_skip_is_eopnotsupp() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=DRAIN)
    sqe(core, 2, "nop", flags=SKIP)
    sqe(core, 3, "nop", flags=DRAIN)
    assert core.submit() == 3
    # The drained NOP runs after the submission (the kernel's io-wq), the init error of
    # the third is posted at once: the kernel's order too (issue 12, classes 2-4).
    assert port.pairs() == [(3, EOPNOTSUPP), (1, 0)]
    port.assert_quiet()


# ---- L5 -----------------------------------------------------------------------------


def test_l5_drain_waits_for_everything_before_and_holds_everything_after() -> None:
    core, port = make_core()
    read(core, 1)
    read(core, 2, flags=LINK)
    read(core, 3)
    sqe(core, 4, "nop", flags=DRAIN)
    read(core, 5)
    sqe(core, 6, "nop")
    core.submit()
    assert started(port) == [1, 2]
    assert port.pairs() == []
    port.complete(2, 8)
    port.complete(1, 8)
    assert port.pairs() == [(2, 8), (1, 8)]
    assert started(port) == [1, 2, 3]  # still behind 3
    sqe(core, 7, "nop")  # a later submit waits too
    core.submit()
    assert port.pairs() == [(2, 8), (1, 8)]
    port.complete(3, 8)
    assert port.pairs() == [(2, 8), (1, 8), (3, 8), (4, 0), (6, 0), (7, 0)]
    assert started(port) == [1, 2, 3, 5]
    assert core.in_flight() == 1
    port.complete(5, 8)
    port.assert_quiet()


def test_l5_drained_chain_and_drained_read() -> None:
    """DRAIN on a chain member drains the whole chain; a drained READ holds the rest."""
    core, port = make_core()
    read(core, 1)
    read(core, 2, flags=LINK)
    sqe(core, 3, "nop", flags=DRAIN)
    read(core, 4, flags=DRAIN)
    sqe(core, 5, "nop")
    core.submit()
    assert started(port) == [1]
    port.complete(1, 8)
    assert started(port) == [1, 2]
    port.complete(2, 8)
    assert port.pairs() == [(1, 8), (2, 8), (3, 0)]
    assert started(port) == [1, 2, 4]
    port.complete(4, 8)
    assert port.pairs()[-2:] == [(4, 8), (5, 0)]
    port.assert_quiet()


def test_in_flight_counts_deferred_units() -> None:
    core, port = make_core()
    read(core, 1)
    sqe(core, 2, "nop", flags=DRAIN)
    sqe(core, 3, "nop", flags=LINK)
    sqe(core, 4, "nop")
    core.submit()
    assert core.in_flight() == 4
    port.complete(1, 8)
    assert core.in_flight() == 0
    assert port.idle_count >= 1
    port.assert_quiet()


# ---- L6: LINK_TIMEOUT ---------------------------------------------------------------


def test_l6_link_timeout_fired_by_hand_cancels_its_op() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 0.5, flags=LINK)
    sqe(core, 3, "nop")
    core.submit()
    assert [t.seconds for t in port.timers] == [0.5]
    port.fire(2)
    assert [(r.user_data, r.opcode) for r, _ in port.cancels] == [(1, Op.READ)]
    port.answer_cancel(1)  # accepted: the READ completes -ECANCELED, then the answer
    assert port.pairs() == [(1, ECANCELED), (3, ECANCELED), (2, ETIME)]
    port.assert_quiet()


def test_l6_op_finishing_first_cancels_the_link_timeout() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 5.0, flags=LINK)
    sqe(core, 3, "nop")
    core.submit()
    t = port.timer(2)
    port.complete(1, 8)
    assert port.pairs() == [(1, 8), (2, ECANCELED), (3, 0)]
    assert not t.armed and ("disarm", 2) in port.events
    port.assert_quiet()


def test_l6_link_timeout_on_an_op_that_cannot_be_stopped() -> None:
    """The target answers -EALREADY: it completes normally later; the timeout's CQE
    carries the cancel's answer (the kernel's ``ret ?: -ETIME``)."""
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 0.5)
    core.submit()
    port.fire(2)
    port.answer_cancel(1, EALREADY)
    assert port.pairs() == [(2, EALREADY)]
    port.complete(1, 8)
    assert port.pairs() == [(2, EALREADY), (1, 8)]
    port.assert_quiet()


def test_l6_link_timeout_misplaced_is_einval() -> None:
    """A LINK_TIMEOUT not linked after a request is -EINVAL; as a chain head it fails
    the chain behind it (L3)."""
    core, port = make_core()
    sqe(core, 1, "link_timeout", 1.0)
    assert core.submit() == 1
    sqe(core, 2, "link_timeout", 1.0, flags=LINK)
    sqe(core, 3, "nop")
    assert core.submit() == 2
    assert port.pairs() == [(1, EINVAL), (2, EINVAL), (3, ECANCELED)]
    port.assert_quiet()


def test_l6_two_link_timeouts_in_a_row_fail_the_chain() -> None:
    """The kernel's io_link_timeout_prep: a LINK_TIMEOUT after a LINK_TIMEOUT is -EINVAL;
    io_submit_fail_init then fails the chain in order: head and the first timeout
    -ECANCELED, the second its -EINVAL."""
    core, port = make_core()
    sqe(core, 2, "nop", flags=LINK)
    sqe(core, 3, "link_timeout", 1.0, flags=LINK)
    sqe(core, 4, "link_timeout", 1.0)
    assert core.submit() == 3
    assert port.pairs() == [(2, ECANCELED), (3, ECANCELED), (4, EINVAL)]
    port.assert_quiet()


def test_l6_link_timeouts_on_two_members_of_one_chain() -> None:
    core, port = make_core()
    read(core, 2, flags=LINK)
    sqe(core, 3, "link_timeout", 1.0, flags=LINK)
    read(core, 4, flags=LINK)
    sqe(core, 5, "link_timeout", 2.0)
    core.submit()
    assert [t.user_data for t in port.timers] == [3]
    port.complete(2, 8)
    assert [t.user_data for t in port.timers] == [5]
    port.fire(5)
    port.answer_cancel(4)
    assert port.pairs() == [(2, 8), (3, ECANCELED), (4, ECANCELED), (5, ETIME)]
    port.assert_quiet()


def test_l6_link_timeout_behind_a_failed_chain_is_cancelled() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    read(core, 2, flags=LINK)
    sqe(core, 3, "link_timeout", 1.0)
    core.submit()
    assert port.timers == []  # armed only when its op starts
    port.complete(1, EIO)
    assert port.pairs() == [(1, EIO), (2, ECANCELED), (3, ECANCELED)]
    port.assert_quiet()


# ---- L6: ASYNC_CANCEL ---------------------------------------------------------------


def test_l6_async_cancel_found_not_found_and_already() -> None:
    core, port = make_core()
    read(core, 1)
    read(core, 2)
    core.submit()
    sqe(core, 10, "cancel", 1)
    sqe(core, 11, "cancel", 999)
    sqe(core, 12, "cancel", 2)
    core.submit()
    assert port.pairs() == [(11, ENOENT)]
    port.answer_cancel(1, 0)
    port.answer_cancel(2, EALREADY)
    assert port.pairs() == [(11, ENOENT), (1, ECANCELED), (10, 0), (12, EALREADY)]
    port.complete(2, 8)
    assert port.pairs()[-1] == (2, 8)
    port.assert_quiet()


def test_l6_async_cancel_all_matches() -> None:
    core, port = make_core()
    read(core, 7)
    read(core, 7)
    read(core, 8)
    core.submit()
    sqe(core, 20, "cancel", 7).rw_flags = IORING_ASYNC_CANCEL_ALL
    core.submit()
    assert len(port.cancels) == 2
    port.answer_all_cancels()
    assert port.pairs() == [(7, ECANCELED), (7, ECANCELED), (20, 2)]
    port.complete(8, 8)
    port.assert_quiet()


def test_r7_timeout_fired_counted_and_cancelled() -> None:
    core, port = make_core()
    sqe(core, 1, "timeout", 1.0)
    sqe(core, 2, "timeout", 9.0, count=2)
    sqe(core, 3, "timeout", 9.0)
    core.submit()
    port.fire(1)
    assert port.pairs() == [(1, ETIME)]  # a TIMEOUT's CQE does not count for others
    sqe(core, 4, "nop")
    sqe(core, 5, "nop")
    core.submit()
    assert port.pairs() == [(1, ETIME), (4, 0), (5, 0), (2, 0)]
    sqe(core, 6, "cancel", 3)
    core.submit()
    assert port.pairs()[-2:] == [(3, ECANCELED), (6, 0)]
    port.assert_quiet()


# ---- R5, R8 -------------------------------------------------------------------------


def test_r5_buffer_rules() -> None:
    core, port = make_core()
    sqe(core, 1, "read", 5, b"immutable")
    sqe(core, 2, "read", 5, 0, 16)
    sqe(core, 3, "read", 5, bytearray(4), 8)
    sqe(core, 4, "write", 5, b"ok")
    core.submit()
    assert port.pairs() == [(1, EFAULT), (2, EFAULT), (3, EFAULT)]
    assert started(port) == [4]
    port.complete(4, 2)
    port.assert_quiet()


def test_r5_buffer_held_until_the_final_completion() -> None:
    core, port = make_core()
    buf = bytearray(8)
    sqe(core, 1, "read", 5, buf)
    core.submit()
    with pytest.raises(BufferError):
        buf.extend(b"x")
    port.complete(1, 8)
    buf.extend(b"x")
    port.assert_quiet()


def test_r8_send_zc_result_then_notif_buffer_held_until_notif() -> None:
    core, port = make_core()
    buf = bytearray(b"zero-copy")
    sqe(core, 1, "send_zc", 5, buf, flags=LINK)
    sqe(core, 2, "nop")
    core.submit()
    port.complete_zc(1, 9)
    assert [(c.user_data, c.res, c.flags) for c in port.cqes] == [(1, 9, CqeFlag.MORE), (2, 0, 0)]
    with pytest.raises(BufferError):
        buf.extend(b"x")
    assert core.in_flight() == 1
    port.notif(1)
    assert [(c.user_data, c.res, c.flags) for c in port.cqes][-1] == (1, 0, CqeFlag.NOTIF)
    buf.extend(b"x")
    port.assert_quiet()


# ---- close ----------------------------------------------------------------------------


def test_cancel_all_fails_waiting_units_and_cancels_what_runs() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "nop")
    sqe(core, 3, "nop", flags=DRAIN)
    sqe(core, 4, "timeout", 30.0)
    core.submit()
    sqe(core, 5, "nop")  # never submitted: dropped
    core.cancel_all()
    assert port.pairs() == [(3, ECANCELED), (4, ECANCELED)]
    assert core.sq_ready() == 0
    with pytest.raises(RingClosedError):
        core.get_sqe()
    with pytest.raises(RingClosedError):
        core.submit()
    assert core.in_flight() == 2  # the READ chain: waiting for the backend
    port.answer_all_cancels()
    assert port.pairs()[2:] == [(1, ECANCELED), (2, ECANCELED)]
    assert port.idle_count >= 1
    port.assert_quiet()


def test_r1_overflowed_cqes_are_kept_in_order() -> None:
    from recording_port import RecordingPort

    from aiofused._core.ring import RingCore

    port = RecordingPort(drain_cq=False)
    core = RingCore(2, 0, port)
    port.attach(core)
    assert (core.sq_entries, core.cq_entries) == (2, 4)
    for i in range(0, 10, 2):
        sqe(core, i, "nop")
        sqe(core, i + 1, "nop")
        assert core.submit() == 2
    assert [c.user_data for c in core.pending_cqes()] == list(range(10))
    assert core.cq_overflow == 6
    with pytest.raises(ValueError):
        RingCore(0, 0, port)
    with pytest.raises(ValueError):
        RingCore(32769, 0, port)
    assert RingCore(5, 0, port).sq_entries == 8


def test_r7_count_timeout_counts_posted_cqes_only() -> None:
    core, port = make_core()
    sqe(core, 1, "timeout", 9.0, count=1)
    core.submit()
    sqe(core, 2, "nop", flags=SKIP)  # hidden: not counted
    core.submit()
    assert port.pairs() == []
    sqe(core, 3, "nop")
    core.submit()
    assert port.pairs() == [(3, 0), (1, 0)]
    port.assert_quiet()


def test_close_waits_for_a_send_zc_notif() -> None:
    core, port = make_core()
    sqe(core, 1, "send_zc", 5, b"abc")
    core.submit()
    port.complete_zc(1, 3)
    core.cancel_all()
    assert not port.cancels and core.in_flight() == 1  # only the NOTIF is due
    port.notif(1)
    assert core.in_flight() == 0 and port.idle_count >= 1
    port.assert_quiet()
