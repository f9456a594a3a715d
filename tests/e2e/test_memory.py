"""Completed requests are freed by reference counting alone.

A request, its primary and its driver command reference each other while in flight;
the ring breaks those links at the final completion.  If it did not, every fused
command would leave a reference cycle for the cyclic GC, whose pauses grow with the
heap (measured: about a fifth of the CPU of the NBD server).  Each test runs requests
with the GC disabled, then asks the GC what it would have to free.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from conftest import add, cyclic_garbage, reap

from aiofused import EIOCBQUEUED, BufDir, DriverError, Ring, SqeFlag, UringCmd
from aiofused._core.records import Req
from aiofused_drivers.null import NULL_LEND, NULL_QUEUED

_RUNTIME_TYPES = (Req,)


def cyclic_runtime_garbage() -> list[str]:
    """Names of the runtime objects only the cyclic GC could free right now."""
    return cyclic_garbage(_RUNTIME_TYPES)


async def test_low_level_chain_leaves_no_cycles(no_gc: None, ring: Ring, data_file: Any) -> None:
    """FUSED_CMD + 2 secondaries -> linked URING_CMD, many times: nothing cyclic remains."""
    fd, _ = data_file
    df = ring.open_driver("null")
    for i in range(20):
        add(ring, 1, "fused_cmd", df, NULL_LEND, nr_secondary=2, flags=SqeFlag.IO_LINK)
        add(ring, 2, "read", fd, 0, 512, 0)
        add(ring, 3, "read", fd, 512, 512, 512)
        add(ring, 4, "uring_cmd", df, NULL_QUEUED, (7 + i).to_bytes(4, "little"))
        assert ring.submit() == 4
        cqes = await reap(ring, 4, settle=0)
        assert sorted(cqes[:2]) == [(2, 512), (3, 512)] and cqes[2:] == [(1, 0), (4, 7 + i)]
    assert ring.in_flight() == 0
    assert cyclic_runtime_garbage() == []


async def test_lease_leaves_no_cycles(no_gc: None, ring: Ring, data_file: Any) -> None:
    """The high-level lease (private requests, CQEs to futures) frees everything too."""
    fd, content = data_file
    df = ring.open_driver("null")
    for _ in range(20):
        async with ring.fused(df, NULL_LEND, buf_dir=BufDir.DEST) as lease:
            assert await lease.read(fd, 0, 0, 1024) == 1024
            assert bytes(lease.buffer[:1024]) == content[:1024]
    assert ring.in_flight() == 0
    assert cyclic_runtime_garbage() == []


class _Keeper:
    """A driver that keeps every command it saw (as a driver with its own queue may)."""

    name = "keeper"
    can_fused = True

    def __init__(self) -> None:
        self.kept: list[UringCmd] = []

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        self.kept.append(cmd)
        if cmd.is_fused:
            cmd.provide_buf_and_start(bytearray(4096), lambda c: c.done(7))
            return EIOCBQUEUED
        return 3


async def test_kept_command_after_completion(no_gc: None, ring: Ring, data_file: Any) -> None:
    """A command a driver keeps is detached from its request at the final CQE: it says
    finished, a late done() posts nothing, a late lend raises; the request is freed."""
    fd, _ = data_file
    drv = _Keeper()
    df = ring.register_driver(drv)
    add(ring, 1, "uring_cmd", df, 0)
    add(ring, 2, "fused_cmd", df, 0, nr_secondary=1)
    add(ring, 3, "read", fd, 0, 512, 0)
    assert ring.submit() == 3
    assert sorted(await reap(ring, 3)) == [(1, 3), (2, 7), (3, 512)]
    for cmd in drv.kept:
        assert cmd.finished
        cmd.done(-5)
        with pytest.raises(DriverError):
            cmd.provide_buf_and_start(bytearray(8), lambda c: None)
    assert ring.peek_cqe() is None and ring.in_flight() == 0
    assert cyclic_runtime_garbage() == []
    # A command is its request's record: the kept ones hold nothing of the ring any more,
    # and every other record of the ring is on its free list (refcounting, not the GC).
    for cmd in drv.kept:
        assert cmd.buf is None and cmd.base is None and cmd.on_cqe is None
        assert cmd.driver is None and cmd.callback is None and cmd.secondaries == []
    reqs = [o for o in gc.get_objects() if type(o).__name__ == "Req" and o.ring is ring]
    kept = {id(c) for c in drv.kept}
    assert all(id(r) in kept or r.state.name == "FREE" for r in reqs)
    # A kept record is never handed out again: the next commands are other records.
    first = list(drv.kept)
    add(ring, 4, "uring_cmd", df, 0)
    assert ring.submit() == 1
    assert await reap(ring, 1) == [(4, 3)]
    assert all(drv.kept[-1] is not c for c in first) and first[0].user_data == 1
