"""Rules the kernel showed the core (issue 12), with the recording port.

Each test names the mismatch class of issue 12 it pins down; the kernel's answers come
from ``tests/kdiff`` (the differential test) and are quoted with the kernel's source.
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
    ENOBUFS,
    ENOENT,
    EOPNOTSUPP,
    ETIME,
    IO_FAILED,
    IORING_ASYNC_CANCEL_ALL,
    IORING_NOP_FILE,
    IORING_NOP_FIXED_BUFFER,
    IORING_NOP_INJECT_RESULT,
    IORING_NOP_TW,
    IORING_TIMEOUT_ABS,
    IORING_TIMEOUT_BOOTTIME,
    IORING_TIMEOUT_ETIME_SUCCESS,
    IORING_TIMEOUT_REALTIME,
    Op,
    SetupFlag,
    SqeFlag,
)

WAITALL = 0x100


def read(core, ud: int, n: int = 8, flags: int = 0, fd: int = 5):  # type: ignore[no-untyped-def]
    return sqe(core, ud, "read", fd, bytearray(n), n, 0, flags=flags)


# ---- class 7: a LINK_TIMEOUT's -ECANCELED/-ETIME are no failure ------------------------


def test_c7_disarmed_link_timeout_is_hidden_by_its_skip() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 1.0, flags=SKIP)
    assert core.submit() == 2
    port.complete(1, 8)
    assert port.pairs() == [(1, 8)]  # the timeout's -ECANCELED is not posted
    port.assert_quiet()


def test_c7_fired_link_timeout_is_hidden_by_its_skip_the_target_is_not() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 0.001, flags=SKIP)
    core.submit()
    port.fire(2)
    port.answer_cancel(1)
    assert port.pairs() == [(1, ECANCELED)]
    port.assert_quiet()


def test_c7_unarmed_link_timeout_of_a_failed_head_shows_unless_its_own_skip() -> None:
    """The head fails at init (a later member's error): the timeout that was never armed
    completes -ECANCELED through the head's disarm, a success to CQE_SKIP_SUCCESS."""
    for lt_flags, want in ((0, [(1, ECANCELED), (3, EINVAL), (2, ECANCELED)]), (SKIP, None)):
        core, port = make_core()
        read(core, 1, flags=LINK)
        sqe(core, 2, "link_timeout", 1.0, flags=LINK | lt_flags)
        bad = sqe(core, 3, "nop")
        bad.ioprio = 1
        assert core.submit() == 3
        got = sorted(port.pairs())
        if want is None:
            assert got == [(1, ECANCELED), (3, EINVAL)]
        else:
            assert got == sorted(want)
        port.assert_quiet()


# ---- class 8: a LINK_TIMEOUT that fails init keeps its errno ---------------------------


def test_c8_link_timeout_init_error_is_its_own_result() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    lt = sqe(core, 2, "link_timeout", 1.0)
    lt.off = 1  # io_link_timeout_prep: an offset is -EINVAL
    assert core.submit() == 2
    assert sorted(port.pairs()) == [(1, ECANCELED), (2, EINVAL)]
    port.assert_quiet()


def test_c8_second_link_timeout_in_a_row_fails_and_nothing_hangs() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    sqe(core, 2, "link_timeout", 1.0, flags=LINK)
    sqe(core, 3, "link_timeout", 1.0)
    assert core.submit() == 3
    assert sorted(port.pairs()) == [(1, ECANCELED), (2, ECANCELED), (3, EINVAL)]
    port.assert_quiet()


# ---- class 9: FSYNC/FALLOCATE results never fail them ----------------------------------


@pytest.mark.parametrize("op", ["fsync", "fallocate"])
def test_c9_failed_sync_op_does_not_sever_nor_show_under_skip(op: str) -> None:
    core, port = make_core()
    args = (5,) if op == "fsync" else (5, 0, 0, 4096)
    sqe(core, 1, op, *args, flags=LINK | SKIP)
    sqe(core, 2, "nop")
    assert core.submit() == 2
    port.complete(1, EINVAL)  # what fsync(2)/fallocate(2) said: a result, not a failure
    assert port.pairs() == [(2, 0)]
    port.assert_quiet()


def test_c9_sync_op_on_a_closed_fd_fails_and_severs() -> None:
    core, port = make_core(open_fds=[5])
    sqe(core, 1, "fsync", 9, flags=LINK | SKIP)  # not open: the kernel gets no file
    sqe(core, 2, "nop")
    assert core.submit() == 2
    assert port.pairs() == [(1, EBADF)]  # the rest is hidden with it (SPEC L4)
    assert not port.pending
    port.assert_quiet()


# ---- class 11: ASYNC_CANCEL with CANCEL_ALL counts ---------------------------------------


def test_c11_cancel_all_without_a_match_is_zero() -> None:
    core, port = make_core()
    sqe(core, 1, "cancel", 77, IORING_ASYNC_CANCEL_ALL)
    sqe(core, 2, "cancel", 77)
    assert core.submit() == 2
    assert port.pairs() == [(1, 0), (2, ENOENT)]
    port.assert_quiet()


def test_c11_cancel_all_counts_what_it_found() -> None:
    core, port = make_core()
    for _ in range(3):
        sqe(core, 9, "timeout", 10.0)
    sqe(core, 4, "cancel", 9, IORING_ASYNC_CANCEL_ALL)
    assert core.submit() == 4
    assert sorted(port.pairs()) == [(4, 3), (9, ECANCELED), (9, ECANCELED), (9, ECANCELED)]
    port.assert_quiet()


# ---- class 13: ioprio is checked at prep ----------------------------------------------------


@pytest.mark.parametrize(
    ("op", "ioprio", "res"),
    [
        ("read", (2 << 13) | 4, 8),  # best effort, level 4
        ("read", 1 << 3, 8),  # a hint without a class
        ("read", 1, EINVAL),  # class none with a level
        ("read", 4 << 13, EINVAL),  # no such class
        ("read", 7 << 13, EINVAL),
        ("recv", 1, 8),  # IORING_RECVSEND_POLL_FIRST
        ("recv", 1 << 7, EINVAL),
        ("send", 1 << 1, EINVAL),  # MULTISHOT means nothing without provided buffers
    ],
)
def test_c13_ioprio(op: str, ioprio: int, res: int) -> None:
    core, port = make_core()
    s = sqe(core, 1, op, 5, bytearray(8), 8)
    s.ioprio = ioprio
    sqe(core, 2, "nop")
    # An init error of a standalone SQE stops submit (SPEC R4).
    assert core.submit() == (2 if res >= 0 else 1)
    if res >= 0:
        port.complete(1, 8)
    assert port.pairs()[-1 if res >= 0 else 0] == (1, res)
    core.submit()  # the NOP left behind
    port.assert_quiet()


# ---- class 14: timeout_flags ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tflags", "ok"),
    [
        (IORING_TIMEOUT_BOOTTIME, True),
        (IORING_TIMEOUT_REALTIME, True),
        (IORING_TIMEOUT_BOOTTIME | IORING_TIMEOUT_REALTIME, False),
        (1 << 1, False),  # TIMEOUT_UPDATE belongs to TIMEOUT_REMOVE
        (1 << 7, False),
        (IORING_TIMEOUT_ABS, False),  # taken by the kernel; no absolute timers here
    ],
)
def test_c14_timeout_flags_are_checked(tflags: int, ok: bool) -> None:
    core, port = make_core()
    t = sqe(core, 1, "timeout", 0.001)
    t.rw_flags = tflags
    core.submit()
    if ok:
        port.fire(1)
    assert port.pairs() == [(1, ETIME if ok else EINVAL)]
    port.assert_quiet()


def test_c14_link_timeout_flags_are_checked() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    lt = sqe(core, 2, "link_timeout", 1.0)
    lt.rw_flags = 1 << 7
    core.submit()
    assert sorted(port.pairs()) == [(1, ECANCELED), (2, EINVAL)]
    port.assert_quiet()


def test_c14_etime_success_does_not_sever_nor_show_under_skip() -> None:
    core, port = make_core()
    t = sqe(core, 1, "timeout", 0.001, flags=LINK | SKIP)
    t.rw_flags = IORING_TIMEOUT_ETIME_SUCCESS
    sqe(core, 2, "nop")
    core.submit()
    port.fire(1)
    assert port.pairs() == [(2, 0)]
    port.assert_quiet()


def test_c14_etime_success_timeout_still_fails_when_cancelled() -> None:
    core, port = make_core()
    t = sqe(core, 1, "timeout", 10.0, flags=LINK)
    t.rw_flags = IORING_TIMEOUT_ETIME_SUCCESS
    sqe(core, 2, "nop")
    sqe(core, 3, "cancel", 1)
    core.submit()
    assert port.pairs() == [(1, ECANCELED), (2, ECANCELED), (3, 0)]
    port.assert_quiet()


# ---- class 15: nop_flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nop_flags", "length", "fd", "res"),
    [
        (IORING_NOP_INJECT_RESULT, 7, -1, 7),
        (IORING_NOP_INJECT_RESULT, (1 << 32) - 22, -1, EINVAL),  # len is read as an s32
        (IORING_NOP_TW, 7, -1, 0),
        (IORING_NOP_FILE, 0, 9, EBADF),
        (IORING_NOP_FILE, 0, 5, 0),
        (IORING_NOP_FILE | IORING_NOP_INJECT_RESULT, 3, 5, 3),
        (IORING_NOP_FIXED_BUFFER | IORING_NOP_INJECT_RESULT, 3, -1, EFAULT),
        (1 << 5, 0, -1, EINVAL),  # unknown: an init error
        (1 << 30, 0, -1, EINVAL),
    ],
)
def test_c15_nop_flags(nop_flags: int, length: int, fd: int, res: int) -> None:
    core, port = make_core(open_fds=[5])
    s = sqe(core, 1, "nop")
    s.rw_flags = nop_flags
    s.len = length
    s.fd = fd
    assert core.submit() == 1
    assert port.pairs() == [(1, res)]
    port.assert_quiet()


def test_c15_injected_error_fails_the_link() -> None:
    core, port = make_core()
    s = sqe(core, 1, "nop", flags=LINK | SKIP)
    s.rw_flags = IORING_NOP_INJECT_RESULT
    s.len = (1 << 32) - 5
    sqe(core, 2, "nop")
    core.submit()
    assert port.pairs() == [(1, -5)]  # shown despite SKIP; the NOP after it is hidden too
    port.assert_quiet()


def test_c15_a_recycled_record_does_not_keep_nop_flags() -> None:
    core, port = make_core()
    r = read(core, 1)
    r.rw_flags = 0  # a READ leaves rw_flags in its record ...
    sqe(core, 2, "recv", 5, bytearray(8), 8, WAITALL)
    core.submit()
    port.complete(1, 8)
    port.complete(2, 8)
    sqe(core, 3, "nop", flags=LINK)  # ... which a NOP must not take for nop_flags
    sqe(core, 4, "nop", flags=LINK)
    sqe(core, 5, "nop")
    core.submit()
    assert port.pairs()[-3:] == [(3, 0), (4, 0), (5, 0)]
    port.assert_quiet()


# ---- class 6: SUBMIT_ALL ------------------------------------------------------------------


def test_c6_submit_all_goes_on_after_an_init_error() -> None:
    core, port = make_core(flags=int(SetupFlag.SUBMIT_ALL))
    bad = sqe(core, 1, "nop")
    bad.ioprio = 1
    sqe(core, 2, "nop")
    sqe(core, 3, "nop", flags=LINK)
    bad2 = sqe(core, 4, "nop")
    bad2.opcode = 255
    sqe(core, 5, "nop")
    assert core.submit() == 5
    assert port.pairs() == [(1, EINVAL), (2, 0), (3, ECANCELED), (4, EINVAL), (5, 0)]
    port.assert_quiet()


def test_c6_without_submit_all_an_init_error_stops() -> None:
    core, port = make_core()
    bad = sqe(core, 1, "nop")
    bad.ioprio = 1
    sqe(core, 2, "nop")
    assert core.submit() == 1
    assert core.submit() == 1
    assert port.pairs() == [(1, EINVAL), (2, 0)]


# ---- drain and hardlink around the new rules -----------------------------------------------


def test_failed_fsync_in_a_hardlink_and_a_drain_behind_it() -> None:
    core, port = make_core()
    sqe(core, 1, "fsync", 5, flags=HARD)
    sqe(core, 2, "nop")
    sqe(core, 3, "nop", flags=DRAIN)
    core.submit()
    port.complete(1, EINVAL)
    assert port.pairs() == [(1, EINVAL), (2, 0), (3, 0)]
    port.assert_quiet()


def test_opcode_names_are_kernel_numbers() -> None:
    assert int(Op.NOP) == 0 and int(Op.LINK_TIMEOUT) == 15


# ---- class 1: IO_DRAIN on a chain member drains the next unit too ---------------------------


def test_c1_drain_on_a_member_drains_the_chain_and_the_next_unit() -> None:
    core, port = make_core()
    read(core, 1, flags=LINK)
    read(core, 2, flags=DRAIN)  # a member: the whole chain is drained ...
    read(core, 3)  # ... and so is the unit after it (drain_next)
    read(core, 4)  # which later units wait for (SPEC L5)
    core.submit()
    assert [e[1] for e in port.events if e[0] == "start"] == [1]
    port.complete(1, 8)
    port.complete(2, 8)
    assert [e[1] for e in port.events if e[0] == "start"] == [1, 2, 3]
    port.complete(3, 8)
    assert [e[1] for e in port.events if e[0] == "start"] == [1, 2, 3, 4]
    port.complete(4, 8)
    port.assert_quiet()


def test_c1_drain_next_crosses_submit_calls() -> None:
    core, port = make_core()
    read(core, 9)  # in flight: what a drained unit waits for
    read(core, 1, flags=LINK)
    read(core, 2, flags=DRAIN)
    core.submit()
    port.complete(9, 8)
    port.complete(1, 8)
    port.complete(2, 8)
    read(core, 5)
    read(core, 3)
    core.submit()
    # 5 is drained: it waits for nothing now, but 3 waits for it.
    assert [e[1] for e in port.events if e[0] == "start"] == [9, 1, 2, 5]
    port.complete(5, 8)
    port.complete(3, 8)
    port.assert_quiet()


def test_c1_drain_on_the_head_drains_only_its_chain() -> None:
    core, port = make_core()
    read(core, 9)
    read(core, 1, flags=LINK | DRAIN)
    read(core, 2)
    read(core, 3)
    core.submit()
    assert [e[1] for e in port.events if e[0] == "start"] == [9]
    port.complete(9, 8)
    assert [e[1] for e in port.events if e[0] == "start"] == [9, 1]
    port.complete(1, 8)
    port.complete(2, 8)
    assert [e[1] for e in port.events if e[0] == "start"] == [9, 1, 2, 3]
    port.complete(3, 8)
    port.assert_quiet()


# ---- class 5: what a counting TIMEOUT counts -------------------------------------------------


def test_c5_cqes_posted_earlier_in_the_same_submit_count() -> None:
    core, port = make_core()
    sqe(core, 1, "nop")
    sqe(core, 2, "nop")
    sqe(core, 3, "timeout", 10.0, 2)
    core.submit()
    assert port.pairs() == [(1, 0), (2, 0), (3, 0)]
    port.assert_quiet()


def test_c5_a_drained_count_timeout_is_armed_after_them() -> None:
    core, port = make_core()
    read(core, 1)
    sqe(core, 2, "nop")
    sqe(core, 3, "timeout", 10.0, 1, flags=DRAIN)
    core.submit()
    port.complete(1, 8)  # the TIMEOUT is armed now: the NOP and the READ came before
    assert port.pairs() == [(2, 0), (1, 8)]  # ... and do not count
    port.fire(3)
    assert port.pairs()[-1] == (3, ETIME)
    port.assert_quiet()


def test_c5_cancelled_timeout_counts_expired_one_does_not() -> None:
    core, port = make_core()
    sqe(core, 1, "timeout", 10.0, 2)
    sqe(core, 2, "timeout", 10.0)
    sqe(core, 3, "timeout", 0.001)
    core.submit()
    port.fire(3)  # expired: does not count
    assert port.pairs() == [(3, ETIME)]
    sqe(core, 4, "cancel", 2)
    core.submit()
    # The cancel's CQE and the cancelled TIMEOUT's: two.
    assert sorted(port.pairs()) == sorted([(3, ETIME), (2, ECANCELED), (4, 0), (1, 0)])
    port.assert_quiet()


# ---- classes 16, 17: the file before the buffer; BUFFER_SELECT taken, failing at issue ----


def test_c17_buffer_select_is_taken_and_fails_at_issue() -> None:
    core, port = make_core(open_fds=[5])
    read(core, 1, flags=int(SqeFlag.BUFFER_SELECT))
    sqe(core, 2, "recv", 5, bytearray(8), 8, flags=int(SqeFlag.BUFFER_SELECT))
    sqe(core, 3, "send", 5, b"12345678", 8, flags=int(SqeFlag.BUFFER_SELECT))
    read(core, 4, fd=9, flags=int(SqeFlag.BUFFER_SELECT))
    assert core.submit() == 4
    assert port.pairs() == [(1, ENOBUFS), (2, ENOBUFS), (3, ENOENT), (4, EBADF)]
    sqe(core, 5, "write", 5, b"x", 1, flags=int(SqeFlag.BUFFER_SELECT))
    assert core.submit() == 1
    assert port.pairs()[-1] == (5, EOPNOTSUPP)
    port.assert_quiet()


def test_c16_a_closed_fd_is_ebadf_before_a_bad_buffer() -> None:
    core, port = make_core(open_fds=[5])
    sqe(core, 1, "read", 9, b"readonly", 8)
    sqe(core, 2, "read", 5, b"readonly", 8)
    core.submit()
    assert port.pairs() == [(1, EBADF), (2, EFAULT)]
    port.assert_quiet()


# ---- classes 2 and 3: what starts after the submission -----------------------------------


def test_c3_a_follower_starts_after_the_whole_submission() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=LINK)
    sqe(core, 2, "nop")
    sqe(core, 3, "nop")
    core.submit()
    assert port.pairs() == [(1, 0), (3, 0), (2, 0)]  # the kernel's order
    port.assert_quiet()


def test_c3_a_cancel_in_the_same_submission_does_not_find_a_follower() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=LINK)
    sqe(core, 2, "timeout", 10.0)
    sqe(core, 3, "cancel", 2)
    core.submit()
    assert port.pairs() == [(1, 0), (3, ENOENT)]
    port.fire(2)
    port.assert_quiet()


def test_c2_an_async_request_starts_after_the_submission() -> None:
    core, port = make_core()
    sqe(core, 1, "cancel", 2, flags=int(SqeFlag.ASYNC))
    sqe(core, 2, "timeout", 10.0)
    sqe(core, 3, "cancel", 3, flags=int(SqeFlag.ASYNC))  # finds itself running
    core.submit()
    assert sorted(port.pairs()) == [(1, 0), (2, ECANCELED), (3, EALREADY)]
    port.assert_quiet()


def test_c2_an_open_chain_at_the_end_runs_as_async() -> None:
    core, port = make_core()
    sqe(core, 1, "cancel", 1, flags=LINK)  # the last SQE has IO_LINK: io-wq
    core.submit()
    assert port.pairs() == [(1, EALREADY)]
    port.assert_quiet()


def test_c2_a_cancel_finds_an_async_request_still_queued() -> None:
    core, port = make_core()
    sqe(core, 1, "nop", flags=int(SqeFlag.ASYNC))  # queued for io-wq
    sqe(core, 2, "cancel", 1, flags=LINK)
    sqe(core, 3, "nop")
    core.submit()
    assert port.pairs() == [(1, ECANCELED), (2, 0), (3, 0)]
    port.assert_quiet()


def test_c5_a_counting_timeout_heading_a_chain_counts_earlier_cqes() -> None:
    core, port = make_core()
    sqe(core, 1, "nop")
    sqe(core, 2, "timeout", 10.0, 1, flags=LINK)
    sqe(core, 3, "nop")
    core.submit()
    assert port.pairs() == [(1, 0), (2, 0), (3, 0)]
    port.assert_quiet()


# ---- class 10: a whole result the kernel still fails -------------------------------------


def test_c10_a_backend_marks_a_truncated_waitall_record_failed() -> None:
    core, port = make_core()
    sqe(core, 1, "recv", 5, bytearray(16), 16, WAITALL, flags=LINK | SKIP)
    sqe(core, 2, "nop")
    core.submit()
    port.complete(1, 16, IO_FAILED)  # what the backends report for MSG_TRUNC
    assert port.pairs() == [(1, 16)]  # shown despite SKIP, the NOP hidden with the rest
    port.assert_quiet()
