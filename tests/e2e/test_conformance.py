"""Conformance: every rule of SPEC §2 (R), §3 (L) and §4 (F), on every loop and backend.

Each test names the rule it checks; the CQE orders are the exact ones the rule fixes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from typing import Any

import pytest
from conftest import (
    EBADF,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    ENOENT,
    EOPNOTSUPP,
    ETIME,
    add,
    reap,
)

from aiofused import (
    EIOCBQUEUED,
    BufDir,
    CqeFlag,
    Feature,
    IssueFlag,
    Op,
    Ring,
    SetupFlag,
    SqeFlag,
    UringCmd,
)
from aiofused_drivers.null import NULL_INLINE, NULL_LEND, NULL_QUEUED, NULL_RESULTS, NullDriver

LINK = SqeFlag.IO_LINK
HARD = SqeFlag.IO_HARDLINK
SKIP = SqeFlag.CQE_SKIP_SUCCESS
DRAIN = SqeFlag.IO_DRAIN


class Recorder:
    """A driver that records what it sees and lends ``buf`` (or fails as told)."""

    name = "recorder"

    def __init__(self, mode: str = "lend", size: int = 8192, can_fused: bool = True) -> None:
        self.mode = mode
        self.can_fused = can_fused
        self.buf = bytearray(size)
        self.calls: list[tuple[int, bool, BufDir | None, int]] = []
        self.results: list[int] | None = None
        self.cqes_at_callback = -1
        self.ring: Ring | None = None
        self.callback_sync = False

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.calls.append((cmd.cmd_op, cmd.is_fused, cmd.buf_dir, issue_flags))
        if self.mode == "raise":
            raise RuntimeError("driver bug")
        if self.mode == "inline":
            return -5
        if self.mode == "queued-no-lend":
            cmd.complete_in_task(lambda c: c.done(7))
            return EIOCBQUEUED
        in_call = True

        def cb(c: UringCmd) -> None:
            self.callback_sync = in_call
            self.results = list(c.secondary_results)
            if self.ring is not None:
                self.cqes_at_callback = self.ring.cq_ready()
            c.done(-5 if self.mode == "lend-fail" else 0)

        cmd.provide_buf_and_start(self.buf, cb)
        in_call = False
        return EIOCBQUEUED


def fused(ring: Ring, ud: int, df: Any, n: int = 1, flags: int = 0, cmd_op: int = NULL_LEND) -> Any:
    return add(ring, ud, "fused_cmd", df, cmd_op, nr_secondary=n, flags=flags)


# ---- §2 ring and plain ops -------------------------------------------------------


async def test_r1_entries_rounding_and_limits(ring_backend: str) -> None:
    """SPEC R1: power-of-two rounding, 0 and > 32768 rejected, CQ = 2 x SQ."""
    async with Ring(5, backend=ring_backend) as r:
        assert r.sq_entries == 8
        assert r.cq_entries == 16
    for bad in (0, 32769, -1):
        with pytest.raises(ValueError):
            Ring(bad, backend=ring_backend)


async def test_r1_cq_overflow_keeps_every_cqe_in_order(ring_backend: str) -> None:
    """SPEC R1: overflowed CQEs are kept, never dropped, delivered in order."""
    async with Ring(2, backend=ring_backend) as r:
        for batch in range(10):
            for k in range(2):
                add(r, batch * 2 + k, "nop")
            assert r.submit() == 2
        assert r.cq_overflow > 0
        got = await reap(r, 20)
        assert got == [(i, 0) for i in range(20)]


async def test_r2_submit_counts_and_ops_run_concurrently(ring: Ring, sockpair: Any) -> None:
    """SPEC R2: submit returns the count; a parked RECV does not hold back a NOP."""
    a, b = sockpair
    buf = bytearray(16)
    add(ring, 1, "recv", a, buf)
    add(ring, 2, "nop")
    assert ring.submit() == 2
    assert await reap(ring, 1) == [(2, 0)]
    b.send(b"hello")
    assert await reap(ring, 1) == [(1, 5)]
    assert bytes(buf[:5]) == b"hello"


async def test_r3_init_errors(ring: Ring, tmp_path: Any) -> None:
    """SPEC R3: unknown opcode/flag, ioprio, empty fixed slot, closed fd, DRAIN after SKIP."""
    s = add(ring, 1, "nop")
    s.opcode = 255
    assert ring.submit() == 1
    s = add(ring, 2, "nop")
    s.flags = 1 << 7
    assert ring.submit() == 1
    s = add(ring, 3, "nop")
    s.ioprio = 1
    assert ring.submit() == 1
    s = add(ring, 4, "uring_cmd", 42, 0, flags=SqeFlag.FIXED_FILE)
    assert ring.submit() == 1
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    os.close(fd)
    add(ring, 5, "read", fd, bytearray(8))
    assert ring.submit() == 1
    assert await reap(ring, 5) == [(1, EINVAL), (2, EINVAL), (3, EINVAL), (4, EBADF), (5, EBADF)]
    add(ring, 6, "nop", flags=SKIP)
    add(ring, 7, "nop", flags=DRAIN)
    assert ring.submit() == 2
    assert await reap(ring, 1) == [(7, EOPNOTSUPP)]


async def test_r4_standalone_init_error_stops_submit(ring: Ring) -> None:
    """SPEC R4 / L-T4: [A, B(bad), C]: submit returns 2, C stays for the next submit."""
    add(ring, 1, "nop")
    add(ring, 2, "nop").opcode = 255
    add(ring, 3, "nop")
    assert ring.submit() == 2
    assert ring.sq_ready() == 1
    assert await reap(ring, 2) == [(1, 0), (2, EINVAL)]
    assert ring.submit() == 1
    assert await reap(ring, 1) == [(3, 0)]


async def test_r5_buffer_rules_and_pinning(ring: Ring, sockpair: Any, data_file: Any) -> None:
    """SPEC R5: READ into bytes -> -EFAULT; int addr outside a fused command -> -EFAULT;
    the buffer is held (a bytearray cannot be resized) until the final CQE."""
    fd, _ = data_file
    add(ring, 1, "read", fd, b"immutable")
    add(ring, 2, "read", fd, 0, 16)
    add(ring, 3, "read", fd, bytearray(4), 8)  # nbytes larger than the buffer
    ring.submit()
    assert await reap(ring, 3) == [(1, EFAULT), (2, EFAULT), (3, EFAULT)]
    a, b = sockpair
    buf = bytearray(8)
    add(ring, 4, "recv", a, buf)
    ring.submit()
    await asyncio.sleep(0.01)
    with pytest.raises(BufferError):
        buf.extend(b"x")
    b.send(b"12345678")
    assert await reap(ring, 1) == [(4, 8)]
    buf.extend(b"x")  # released with the CQE
    assert bytes(buf) == b"12345678x"


async def test_r6_short_read_and_eof(ring: Ring, data_file: Any, sockpair: Any) -> None:
    """SPEC R6: a short read is a success with the count; EOF is res 0."""
    fd, content = data_file
    buf = bytearray(100)
    add(ring, 1, "read", fd, buf, 100, len(content) - 10)
    add(ring, 2, "read", fd, bytearray(10), 10, len(content))
    ring.submit()
    assert sorted(await reap(ring, 2)) == [(1, 10), (2, 0)]  # independent: any order
    assert bytes(buf[:10]) == content[-10:]
    a, b = sockpair
    b.shutdown(socket.SHUT_WR)
    add(ring, 3, "recv", a, bytearray(10))
    ring.submit()
    assert await reap(ring, 1) == [(3, 0)]


async def test_r7_timeout_expiry_count_and_cancel(ring: Ring) -> None:
    """SPEC R7: -ETIME on expiry; res 0 after ``count`` CQEs; ASYNC_CANCEL -> -ECANCELED."""
    add(ring, 1, "timeout", 0.01)
    ring.submit()
    assert await reap(ring, 1) == [(1, ETIME)]
    add(ring, 2, "timeout", 10, count=2)
    ring.submit()
    add(ring, 3, "nop")
    add(ring, 4, "nop")
    ring.submit()
    assert await reap(ring, 3) == [(3, 0), (4, 0), (2, 0)]
    add(ring, 5, "timeout", 10)
    ring.submit()
    add(ring, 6, "cancel", 5)
    ring.submit()
    got = await reap(ring, 2)
    assert sorted(got) == [(5, ECANCELED), (6, 0)]


async def test_r8_send_zc_posts_result_then_notif(ring: Ring, sockpair: Any) -> None:
    """SPEC R8: SEND_ZC: (res, MORE) then (0, NOTIF), same user_data."""
    a, b = sockpair
    add(ring, 1, "send_zc", a, b"zero-copy")
    ring.submit()
    cqes = await asyncio.wait_for(ring.wait_cqes(2), 5)
    assert [(c.user_data, c.res, c.flags) for c in cqes] == [
        (1, 9, CqeFlag.MORE),
        (1, 0, CqeFlag.NOTIF),
    ]
    assert b.recv(100) == b"zero-copy"


# ---- §3 links, skip, drain -------------------------------------------------------


async def test_l1_chain_is_serial_and_ends_at_submit_boundary(ring: Ring, sockpair: Any) -> None:
    """SPEC L1: members run one after another; the last SQE ends the chain (L-T9)."""
    a, b = sockpair
    add(ring, 1, "recv", a, bytearray(4), flags=LINK)
    add(ring, 2, "nop", flags=LINK)
    assert ring.submit() == 2
    add(ring, 3, "nop")
    ring.submit()
    assert await reap(ring, 1) == [(3, 0)]  # not part of the earlier chain
    b.send(b"abcd")
    assert await reap(ring, 2) == [(1, 4), (2, 0)]


async def test_l2_failure_severs_hardlink_does_not(ring: Ring, data_file: Any) -> None:
    """SPEC L2 (L-T1, L-T2): a failed or short link cancels the rest; HARDLINK goes on."""
    fd, content = data_file
    add(ring, 1, "read", fd, bytearray(64), 64, len(content) - 8, flags=LINK)  # short
    add(ring, 2, "nop", flags=LINK)
    add(ring, 3, "nop")
    ring.submit()
    assert await reap(ring, 3) == [(1, 8), (2, ECANCELED), (3, ECANCELED)]
    add(ring, 4, "read", -1, bytearray(8), flags=HARD)
    add(ring, 5, "nop", flags=LINK)
    add(ring, 6, "nop")
    ring.submit()
    assert await reap(ring, 3) == [(4, EBADF), (5, 0), (6, 0)]


async def test_l3_init_error_in_chain(ring: Ring) -> None:
    """SPEC L3 (L-T3): [A(LINK), B(LINK, bad), C]: (A,-125) (B,-22) (C,-125), all consumed."""
    add(ring, 1, "nop", flags=LINK)
    add(ring, 2, "nop", flags=LINK).opcode = 255
    add(ring, 3, "nop")
    add(ring, 4, "nop")
    assert ring.submit() == 4  # the failing SQE did not end its chain: submit goes on
    assert await reap(ring, 4) == [(1, ECANCELED), (2, EINVAL), (3, ECANCELED), (4, 0)]
    add(ring, 5, "nop", flags=HARD)
    add(ring, 6, "nop").opcode = 255  # ends the chain: submit stops after it
    add(ring, 7, "nop")
    assert ring.submit() == 2
    assert await reap(ring, 2) == [(5, ECANCELED), (6, EINVAL)]
    assert ring.submit() == 1
    assert await reap(ring, 1) == [(7, 0)]


async def test_l4_skip_success(ring: Ring, data_file: Any) -> None:
    """SPEC L4 (L-T5, L-T6, L-T7): SKIP hides successes; a failed SKIP hides the cancels."""
    for i in range(5):
        add(ring, i, "nop", flags=SKIP | LINK)
    add(ring, 5, "nop")
    ring.submit()
    assert await reap(ring, 1) == [(5, 0)]
    _fd, _ = data_file
    for i in range(10, 16):
        if i == 13:
            add(ring, i, "read", -1, bytearray(4), flags=SKIP | LINK)
        else:
            add(ring, i, "nop", flags=(SKIP | LINK) if i < 15 else 0)
    ring.submit()
    assert await reap(ring, 1) == [(13, EBADF)]
    add(ring, 20, "read", -1, bytearray(4), flags=LINK)
    add(ring, 21, "nop", flags=SKIP)
    ring.submit()
    assert await reap(ring, 2) == [(20, EBADF), (21, ECANCELED)]


async def test_l5_drain_waits_for_everything_before(ring: Ring, sockpair: Any) -> None:
    """SPEC L5: DRAIN starts after all earlier SQEs completed; later SQEs wait for it."""
    a, b = sockpair
    add(ring, 1, "recv", a, bytearray(4))
    add(ring, 2, "nop", flags=DRAIN)
    add(ring, 3, "nop")
    ring.submit()
    await asyncio.sleep(0.05)
    assert ring.cq_ready() == 0
    b.send(b"x")
    assert await reap(ring, 3) == [(1, 1), (2, 0), (3, 0)]


async def test_l6_link_timeout(ring: Ring, sockpair: Any) -> None:
    """SPEC L6: a firing LINK_TIMEOUT cancels its op (-ECANCELED) and posts -ETIME;
    if the op finishes first, the timeout posts -ECANCELED."""
    a, _b = sockpair
    add(ring, 1, "recv", a, bytearray(4), flags=LINK)
    add(ring, 2, "link_timeout", 0.02)
    ring.submit()
    got = await reap(ring, 2)
    assert sorted(got) == [(1, ECANCELED), (2, ETIME)]
    add(ring, 3, "nop", flags=LINK)
    add(ring, 4, "link_timeout", 5)
    ring.submit()
    assert await reap(ring, 2) == [(3, 0), (4, ECANCELED)]
    add(ring, 5, "link_timeout", 1)  # not linked to anything
    ring.submit()
    assert await reap(ring, 1) == [(5, EINVAL)]


async def test_l6_async_cancel_found_and_not_found(ring: Ring, sockpair: Any) -> None:
    """SPEC L6: ASYNC_CANCEL: 0 and the target -ECANCELED; -ENOENT when there is none."""
    a, _ = sockpair
    add(ring, 1, "recv", a, bytearray(4))
    ring.submit()
    await asyncio.sleep(0.01)
    add(ring, 2, "cancel", 1)
    add(ring, 3, "cancel", 999)
    ring.submit()
    got = await reap(ring, 3)
    assert sorted(got) == [(1, ECANCELED), (2, 0), (3, ENOENT)]


async def test_l6_async_cancel_stops_a_read_of_a_blocking_pipe() -> None:
    """SPEC L6: a READ of a blocking pipe is polled, as io_uring polls it whatever its
    O_NONBLOCK (issue 12, class 20: it used to run in the asyncio backend's pool, where a
    cancel could only answer -EALREADY): the cancel finds it, it completes -ECANCELED."""
    r_fd, w_fd = os.pipe()
    try:
        async with Ring(8, backend="asyncio") as ring:
            buf = bytearray(4)
            add(ring, 1, "read", r_fd, buf, 4, -1)
            ring.submit()
            await asyncio.sleep(0.05)
            add(ring, 2, "cancel", 1)
            ring.submit()
            assert sorted(await reap(ring, 2)) == [(1, ECANCELED), (2, 0)]
            add(ring, 3, "read", r_fd, buf, 4, -1)
            ring.submit()
            os.write(w_fd, b"done")
            assert await reap(ring, 1) == [(3, 4)]
    finally:
        os.close(r_fd)
        os.close(w_fd)


# ---- §4 fused commands -------------------------------------------------------------


async def test_t1_t2_fused_read_then_write(ring: Ring, data_file: Any, tmp_path: Any) -> None:
    """SPEC F8/F9 (T1, T2): secondaries' CQEs, then the primary's."""
    fd, content = data_file
    shared = bytearray(8192)
    df = ring.register_driver(NullDriver(buffer=shared))
    fused(ring, 1, df)
    add(ring, 2, "read", fd, 0, 4096, 0)
    ring.submit()
    assert await reap(ring, 2) == [(2, 4096), (1, 0)]
    assert bytes(shared[:4096]) == content[:4096]
    out = os.open(tmp_path / "out", os.O_CREAT | os.O_RDWR)
    try:
        fused(ring, 3, df)
        add(ring, 4, "write", out, 0, 4096, 0)
        ring.submit()
        assert await reap(ring, 2) == [(4, 4096), (3, 0)]
        assert os.pread(out, 4096, 0) == content[:4096]
    finally:
        os.close(out)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda p, s: setattr(p, "pad1", 1), id="F2-pad1"),
        pytest.param(lambda p, s: setattr(p, "uring_cmd_flags", 0), id="F2-no-fused-buf"),
        pytest.param(lambda p, s: setattr(p, "uring_cmd_flags", 3), id="F2-extra-bits"),
        pytest.param(lambda p, s: p.__setattr__("flags", SqeFlag.BUFFER_SELECT), id="F2-bufsel"),
        pytest.param(lambda p, s: setattr(s, "opcode", int(Op.FSYNC)), id="F4-fsync"),
        pytest.param(lambda p, s: setattr(s, "opcode", int(Op.FUSED_CMD)), id="F4-nested"),
        pytest.param(lambda p, s: setattr(s, "opcode", 255), id="F4-unknown-op"),
        pytest.param(lambda p, s: s.__setattr__("flags", LINK), id="F4-link"),
        pytest.param(lambda p, s: s.__setattr__("flags", HARD), id="F4-hardlink"),
        pytest.param(lambda p, s: s.__setattr__("flags", DRAIN), id="F4-drain"),
        pytest.param(lambda p, s: s.__setattr__("flags", SqeFlag.BUFFER_SELECT), id="F4-bufsel"),
        pytest.param(lambda p, s: s.__setattr__("flags", 1 << 7), id="F4-unknown-flag"),
        pytest.param(lambda p, s: setattr(p, "nr_secondary", 65), id="F3-too-many"),
        pytest.param(lambda p, s: setattr(p, "cmd", b"x" * 81), id="cmd-too-long"),
    ],
)
async def test_f2_f4_invalid_primary_consumes_and_cancels(
    ring: Ring, data_file: Any, mutate: Any
) -> None:
    """SPEC F2-F4: P fails -EINVAL; its secondary is consumed and posts -ECANCELED first."""
    fd, _ = data_file
    df = ring.open_driver("null")
    p = fused(ring, 1, df)
    s = add(ring, 2, "read", fd, 0, 512, 0)
    mutate(p, s)
    n = ring.submit()
    assert n == 2
    assert await reap(ring, 2) == [(2, ECANCELED), (1, EINVAL)]


async def test_f1_ring_without_fused_req(ring_backend: str, data_file: Any) -> None:
    """SPEC F1 (T10): on a ring without FUSED_REQ opcode 128 is unknown, as to the kernel:
    P fails -EINVAL at init and stops submit; the next SQE is no secondary."""
    fd, _ = data_file
    async with Ring(8, backend=ring_backend) as r:
        assert not r.features & Feature.FUSED_REQ
        df = r.open_driver("null")
        fused(r, 1, df)
        add(r, 2, "read", fd, bytearray(512), 512, 0)
        assert r.submit() == 1
        assert await reap(r, 1) == [(1, EINVAL)]
        assert r.submit() == 1
        assert await reap(r, 1) == [(2, 512)]


async def test_f3_nr_secondary_bounds(ring: Ring, data_file: Any) -> None:
    """SPEC F3 (T9, T18): 0 secondaries, P last, fewer than declared follow."""
    fd, _ = data_file
    df = ring.open_driver("null")
    fused(ring, 1, df, n=0)
    add(ring, 2, "nop")
    assert ring.submit() == 1  # P fails at init and stops submit; the NOP is not its secondary
    assert await reap(ring, 1) == [(1, EINVAL)]
    assert ring.submit() == 1
    assert await reap(ring, 1) == [(2, 0)]
    fused(ring, 3, df)
    assert ring.submit() == 1  # P is the last SQE
    assert await reap(ring, 1) == [(3, EINVAL)]
    fused(ring, 4, df, n=3)
    add(ring, 5, "read", fd, 0, 16, 0)
    assert ring.submit() == 2  # only what exists is consumed
    assert await reap(ring, 2) == [(5, ECANCELED), (4, EINVAL)]


async def test_f3_sixty_four_secondaries(ring_backend: str, data_file: Any) -> None:
    """SPEC F3: up to 64 secondaries on one primary, each with its own CQE, P last."""
    fd, _content = data_file
    async with Ring(128, flags=SetupFlag.FUSED_REQ, backend=ring_backend) as r:
        drv = NullDriver(size=64 * 256)
        df = r.register_driver(drv)
        fused(r, 1000, df, n=64, cmd_op=NULL_RESULTS)
        for i in range(64):
            add(r, i, "read", fd, i * 256, 256, i * 256)
        assert r.submit() == 65
        got = await reap(r, 65)
        assert got[-1] == (1000, 64 * 256)
        assert sorted(got[:-1]) == [(i, 256) for i in range(64)]


async def test_f5_mixed_directions(ring: Ring, data_file: Any, sockpair: Any) -> None:
    """SPEC F5: READ (DEST) and SEND (SRC) under one P -> -EINVAL, both cancelled."""
    fd, _ = data_file
    df = ring.open_driver("null")
    fused(ring, 1, df, n=2)
    add(ring, 2, "read", fd, 0, 16, 0)
    add(ring, 3, "send", sockpair[0], 0, 16)
    ring.submit()
    assert await reap(ring, 3) == [(2, ECANCELED), (3, ECANCELED), (1, EINVAL)]


async def test_f6_bad_fd_file_and_incapable_driver(ring: Ring, data_file: Any) -> None:
    """SPEC F6 (T19, T20): closed fd -EBADF; plain file -EOPNOTSUPP; can_fused false
    -EOPNOTSUPP and the handler is never called."""
    fd, _ = data_file
    closed = os.dup(fd)
    os.close(closed)
    fused(ring, 1, closed)
    add(ring, 2, "read", fd, 0, 16, 0)
    fused(ring, 3, fd)
    add(ring, 4, "read", fd, 0, 16, 0)
    drv = Recorder(can_fused=False)
    df = ring.register_driver(drv)
    fused(ring, 5, df)
    add(ring, 6, "read", fd, 0, 16, 0)
    ring.submit()
    assert await reap(ring, 6) == [
        (2, ECANCELED),
        (1, EBADF),
        (4, ECANCELED),
        (3, EOPNOTSUPP),
        (6, ECANCELED),
        (5, EOPNOTSUPP),
    ]
    assert drv.calls == []


async def test_f7_driver_sees_direction_and_inline_result(ring: Ring, data_file: Any) -> None:
    """SPEC F7: is_fused/buf_dir set; an inline result completes P, secondaries cancelled."""
    fd, _ = data_file
    drv = Recorder(mode="inline")
    df = ring.register_driver(drv)
    fused(ring, 1, df, cmd_op=9)
    add(ring, 2, "read", fd, 0, 16, 0)
    ring.submit()
    assert await reap(ring, 2) == [(2, ECANCELED), (1, -5)]
    assert drv.calls == [(9, True, BufDir.DEST, int(IssueFlag.FUSED_BUF_DEST))]
    null = ring.open_driver("null")
    fused(ring, 3, null, cmd_op=NULL_INLINE).cmd = struct.pack("<i", EINVAL)
    add(ring, 4, "read", fd, 0, 16, 0)
    ring.submit()
    assert await reap(ring, 2) == [(4, ECANCELED), (3, EINVAL)]


@pytest.mark.parametrize(
    ("mode", "p_res"),
    [
        pytest.param("raise", EIO, id="driver-raises"),
        pytest.param("queued-no-lend", 7, id="queued-without-lending"),
    ],
)
async def test_f7_primary_completes_without_lending(
    ring: Ring, data_file: Any, mode: str, p_res: int
) -> None:
    """SPEC F7: a driver that raises completes P with -EIO; one that completes later
    without lending gives its own result.  Either way the secondaries are cancelled first."""
    fd, _ = data_file
    df = ring.register_driver(Recorder(mode=mode))
    fused(ring, 1, df)
    add(ring, 2, "read", fd, 0, 16, 0)
    ring.submit()
    assert await reap(ring, 2) == [(2, ECANCELED), (1, p_res)]


async def test_f8_secondary_bounds(ring: Ring, data_file: Any) -> None:
    """SPEC F8 (T5-T7): out-of-range offset/length -> -EFAULT for that secondary, P goes on;
    addr == len with len 0 is allowed."""
    fd, _ = data_file
    df = ring.register_driver(NullDriver(size=8192))
    fused(ring, 1, df, n=3)
    add(ring, 2, "read", fd, 4096, 8192, 0)
    add(ring, 3, "read", fd, 8193, 0, 0)
    add(ring, 4, "read", fd, 8192, 0, 0)
    ring.submit()
    got = await reap(ring, 4)
    assert got[-1] == (1, 0)
    assert sorted(got[:-1]) == [(2, EFAULT), (3, EFAULT), (4, 0)]


async def test_f9_secondaries_concurrent_and_callback_is_task_work(
    ring: Ring, sockpairs: Any
) -> None:
    """SPEC F9: all secondaries issued at once (complete in the order their data comes),
    the callback runs as task work after the last CQE, with every result, P last."""
    drv = Recorder()
    drv.ring = ring
    df = ring.register_driver(drv)
    fused(ring, 100, df, n=4)
    for i in range(4):
        add(ring, i, "recv", sockpairs[i][0], i * 16, 16)
    ring.submit()
    await asyncio.sleep(0.02)
    for i in reversed(range(4)):
        sockpairs[i][1].send(bytes([65 + i]) * (i + 1))
        await asyncio.sleep(0.01)
    got = await reap(ring, 5)
    assert got == [(3, 4), (2, 3), (1, 2), (0, 1), (100, 0)]
    assert drv.results == [1, 2, 3, 4]
    assert drv.cqes_at_callback == 4  # every secondary CQE was posted before the callback
    assert drv.callback_sync is False
    assert bytes(drv.buf[48:52]) == b"DDDD"


async def test_f9_skip_on_secondary_and_primary(ring: Ring, data_file: Any) -> None:
    """SPEC F9 with L4 (T23-T25): SKIP on S hides its success; on P hides P's success."""
    fd, _ = data_file
    df = ring.open_driver("null")
    fused(ring, 1, df)
    add(ring, 2, "read", fd, 0, 16, 0, flags=SKIP)
    fused(ring, 3, df)
    add(ring, 4, "read", -1, 0, 16, 0, flags=SKIP)
    fused(ring, 5, df, flags=SKIP)
    add(ring, 6, "read", fd, 0, 16, 0)
    ring.submit()
    got = await reap(ring, 4)
    assert got.index((4, EBADF)) < got.index((3, 0))
    assert sorted(got) == [(1, 0), (3, 0), (4, EBADF), (6, 16)]


async def test_f9_send_zc_secondary_notif_before_primary(ring: Ring, sockpair: Any) -> None:
    """SPEC F9 / R8 (T33): (S, n, MORE) (S, 0, NOTIF) then (P, 0)."""
    a, b = sockpair
    df = ring.register_driver(NullDriver(size=64))
    fused(ring, 1, df)
    add(ring, 2, "send_zc", a, 0, 64)
    ring.submit()
    cqes = await asyncio.wait_for(ring.wait_cqes(3), 5)
    assert [(c.user_data, c.res, c.flags) for c in cqes] == [
        (2, 64, CqeFlag.MORE),
        (2, 0, CqeFlag.NOTIF),
        (1, 0, 0),
    ]
    assert b.recv(100) == bytes(64)


async def test_f10_primary_in_link_chains(ring: Ring, data_file: Any) -> None:
    """SPEC F10 (T28, T30): P is an ordinary chain member; a failing P severs."""
    fd, content = data_file
    df = ring.open_driver("null")
    add(ring, 9, "nop", flags=LINK)
    fused(ring, 1, df, flags=LINK)
    add(ring, 2, "read", fd, 0, 4096, 0)
    add(ring, 10, "nop")
    ring.submit()
    assert await reap(ring, 4) == [(9, 0), (2, 4096), (1, 0), (10, 0)]
    failing = ring.register_driver(Recorder(mode="lend-fail"))
    fused(ring, 3, failing, flags=LINK)
    add(ring, 4, "read", fd, 0, 16, 0)
    add(ring, 5, "nop")
    ring.submit()
    assert await reap(ring, 3) == [(4, 16), (3, -5), (5, ECANCELED)]
    add(ring, 6, "read", fd, bytearray(64), 64, len(content) - 8, flags=LINK)
    fused(ring, 7, df)
    add(ring, 8, "read", fd, 0, 16, 0)
    ring.submit()
    assert await reap(ring, 3) == [(6, 8), (8, ECANCELED), (7, ECANCELED)]


async def test_f11_views_released_before_primary_cqe(ring: Ring, data_file: Any) -> None:
    """SPEC F11: the lent buffer is pinned while lent and free right after P's CQE."""
    fd, _ = data_file
    shared = bytearray(4096)
    df = ring.register_driver(NullDriver(buffer=shared))
    fused(ring, 1, df)
    add(ring, 2, "read", fd, 0, 4096, 0)
    ring.submit()
    cqes = await asyncio.wait_for(ring.wait_cqes(2), 5)
    assert [c.user_data for c in cqes] == [2, 1]
    shared.extend(b"!")  # no view of it is left once P's CQE is posted
    async with ring.fused(df, NULL_LEND) as lease:
        view = lease.buffer
        assert await lease.read(fd, 0, 0, 16) == 16
    with pytest.raises(ValueError):
        bytes(view)


async def test_f12_cancel_secondary_then_primary_completes(ring: Ring, sockpair: Any) -> None:
    """SPEC F12 (T35): cancelling a parked secondary: {(cancel,0), (S,-125)} then (P,0)."""
    df = ring.open_driver("null")
    fused(ring, 1, df)
    add(ring, 2, "recv", sockpair[0], 0, 16)
    ring.submit()
    await asyncio.sleep(0.02)
    add(ring, 20, "cancel", 2)
    ring.submit()
    got = await reap(ring, 3)
    assert sorted(got[:2]) == [(2, ECANCELED), (20, 0)]
    assert got[2] == (1, 0)


async def test_f12_cancel_primary_cancels_secondaries(ring: Ring, sockpairs: Any) -> None:
    """SPEC F12: ASYNC_CANCEL on P cancels its secondaries, waits for them, then P."""
    df = ring.open_driver("null")
    fused(ring, 1, df, n=2)
    add(ring, 2, "recv", sockpairs[0][0], 0, 16)
    add(ring, 3, "recv", sockpairs[1][0], 16, 16)
    ring.submit()
    await asyncio.sleep(0.02)
    add(ring, 20, "cancel", 1)
    ring.submit()
    got = await reap(ring, 4)
    assert got[-1] == (1, ECANCELED)
    assert sorted(got[:-1]) == [(2, ECANCELED), (3, ECANCELED), (20, 0)]


async def test_f12_ring_close_with_work_in_flight(ring_backend: str, sockpair: Any) -> None:
    """SPEC F12: closing the ring cancels what is in flight and waits for it: every
    request still posts its CQE, secondaries before their primary."""
    r = Ring(16, flags=SetupFlag.FUSED_REQ, backend=ring_backend)
    df = r.open_driver("null")
    fused(r, 1, df)
    add(r, 2, "recv", sockpair[0], 0, 16)
    add(r, 3, "recv", sockpair[1], bytearray(8), flags=LINK)
    add(r, 4, "nop")
    add(r, 5, "timeout", 30)
    r.submit()
    await asyncio.sleep(0.02)
    await asyncio.wait_for(r.close(), 5)
    got = [(c.user_data, c.res) for c in [r.peek_cqe()] if c]
    cqes = []
    while (c := r.peek_cqe()) is not None:
        r.cqe_seen(c)
        cqes.append((c.user_data, c.res))
    assert got
    assert cqes.index((2, ECANCELED)) < cqes.index((1, ECANCELED))
    assert sorted(cqes) == [
        (1, ECANCELED),
        (2, ECANCELED),
        (3, ECANCELED),
        (4, ECANCELED),
        (5, ECANCELED),
    ]
    assert r.in_flight() == 0


async def test_t26_two_primaries_same_buffer(ring: Ring, data_file: Any) -> None:
    """T26: two fused pairs on one driver buffer: each S before its P, pairs interleave."""
    fd, content = data_file
    shared = bytearray(8192)
    df = ring.register_driver(NullDriver(buffer=shared))
    fused(ring, 1, df)
    add(ring, 2, "read", fd, 0, 4096, 0)
    fused(ring, 3, df)
    add(ring, 4, "read", fd, 4096, 4096, 4096)
    ring.submit()
    got = await reap(ring, 4)
    assert got.index((2, 4096)) < got.index((1, 0))
    assert got.index((4, 4096)) < got.index((3, 0))
    assert bytes(shared) == content[:8192]


async def test_plain_uring_cmd(ring: Ring) -> None:
    """URING_CMD: inline and queued results reach the CQE; unknown cmd_op -EINVAL."""
    df = ring.open_driver("null")
    add(ring, 1, "uring_cmd", df, NULL_INLINE, struct.pack("<i", 42))
    add(ring, 2, "uring_cmd", df, NULL_QUEUED, struct.pack("<i", 7))
    add(ring, 3, "uring_cmd", df, 99)
    ring.submit()
    got = await reap(ring, 3)
    assert sorted(got) == [(1, 42), (2, 7), (3, EINVAL)]


async def test_driver_without_lending_api_misuse_is_typed(ring: Ring) -> None:
    """A plain URING_CMD cannot lend: provide_buf_and_start raises DriverError (-EIO)."""

    class Lender:
        name = "lender"
        can_fused = True

        def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
            cmd.provide_buf_and_start(bytearray(8), lambda c: c.done(0))
            return EIOCBQUEUED

    df = ring.register_driver(Lender())
    add(ring, 1, "uring_cmd", df, 0)
    ring.submit()
    assert await reap(ring, 1) == [(1, EIO)]


async def test_read_offset_ignored_on_a_pipe(ring: Ring) -> None:
    """Both backends ignore the offset on a stream (the kernel's FMODE_STREAM rule)."""
    r_fd, w_fd = os.pipe()
    try:
        os.write(w_fd, b"pipe data")
        buf = bytearray(9)
        add(ring, 1, "read", r_fd, buf, 9, 0)
        ring.submit()
        assert await reap(ring, 1) == [(1, 9)]
        assert bytes(buf) == b"pipe data"
    finally:
        os.close(r_fd)
        os.close(w_fd)


async def test_send_msg_dontwait_does_not_wait(ring: Ring) -> None:
    """MSG_DONTWAIT on SEND: a full socket answers -EAGAIN (or a short count) at once,
    as the kernel's REQ_F_NOWAIT does, instead of waiting for space."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        add(ring, 1, "send", a, b"y" * 65536, 65536, socket.MSG_DONTWAIT)
        ring.submit()
        ((ud, res),) = await reap(ring, 1)
        assert ud == 1 and (res == -errno.EAGAIN or 0 < res < 65536)
    finally:
        a.close()
        b.close()
