"""A recording :class:`~aiofused._core.port.Port` for pure core tests (no event loop).

The port records every effect the core asks for and carries none of them out on its
own: the test completes I/O (``port.complete``), answers cancellations
(``port.answer_cancel``), runs task work (``port.run_work``) and fires timers
(``port.fire``) by hand, so every interleaving is chosen by the test.

This module imports nothing but the pure core and the standard library's
``collections``/``typing``: ``test_purity.py`` imports it with ``asyncio``, ``os`` and
``ctypes`` poisoned.

The port drains the CQ as CQEs are posted (it sets ``core.waiting`` so that the core
calls :meth:`RecordingPort.wake` after each one), which gives one exact timeline of
``start``/``done``/``cqe`` events.  The port never keeps a reference to a finished
request: its logs hold ints only, so record recycling stays observable.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

from aiofused._abi import ECANCELED, EIO, EIOCBQUEUED, ENOENT, CqeFlag, Op, SetupFlag, SqeFlag
from aiofused._core.records import Req
from aiofused._core.ring import RingCore
from aiofused._core.sqe import Cqe, Sqe

__all__ = [
    "DRAIN",
    "FUSED",
    "HARD",
    "LINK",
    "SKIP",
    "LendingDriver",
    "RecordingPort",
    "Timer",
    "make_core",
    "op_name",
    "sqe",
]

LINK = int(SqeFlag.IO_LINK)
HARD = int(SqeFlag.IO_HARDLINK)
SKIP = int(SqeFlag.CQE_SKIP_SUCCESS)
DRAIN = int(SqeFlag.IO_DRAIN)
FUSED = int(SetupFlag.FUSED_REQ)
_MORE = int(CqeFlag.MORE)
_NOTIF = int(CqeFlag.NOTIF)

#: Descriptors a recording port reports as open by default (tests use them as fds).
OPEN_FDS = frozenset(range(3, 64))


class Timer:
    """A timer armed through the port; fired by hand with :meth:`RecordingPort.fire`."""

    __slots__ = ("armed", "fn", "req", "seconds", "user_data")

    def __init__(self, seconds: float, fn: Callable[[Req], None], req: Req) -> None:
        self.seconds = seconds
        self.fn = fn
        self.req = req
        self.user_data = req.user_data
        self.armed = True

    def __repr__(self) -> str:
        return f"<Timer ud={self.user_data} {self.seconds}s armed={self.armed}>"


class RecordingPort:
    """Implements the Port protocol by recording; the test plays the world."""

    def __init__(self, open_fds: Iterable[int] = OPEN_FDS, drain_cq: bool = True) -> None:
        self.core: RingCore | None = None
        self.open_fds = set(open_fds)
        self.drain_cq = drain_cq
        #: Leaf I/O started and not finally completed, in start order.
        self.pending: list[Req] = []
        #: Cancellation requests not answered yet: (request, on_result).
        self.cancels: list[tuple[Req, Callable[[int], None]]] = []
        #: Task work not run yet.
        self.work: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        #: Timers armed and neither fired nor disarmed.
        self.timers: list[Timer] = []
        #: Every CQE the core posted, in order (drained from the CQ as it is posted).
        self.cqes: list[Cqe] = []
        #: One timeline: ("start", ud, opcode), ("done", ud, res), ("cancel", ud),
        #: ("cqe", ud, res, flags), ("idle",), ("disarm", ud), ("driver", ud, cmd_op).
        self.events: list[tuple[Any, ...]] = []
        self.errors: list[tuple[str, dict[str, Any]]] = []
        self.idle_count = 0
        self.started = 0
        #: Called with each request as it starts (invariant checks at the exact moment).
        self.on_start: Callable[[Req], None] | None = None
        #: Called with each CQE right after it was posted.
        self.on_cqe: Callable[[Cqe], None] | None = None

    def attach(self, core: RingCore) -> None:
        self.core = core
        if self.drain_cq:
            core.waiting = True  # the core then calls wake() after every CQE

    # ---- the Port protocol -------------------------------------------------------------

    def start_io(self, req: Req) -> None:
        # As the runtime does: the record knows its backend and handle (the core only
        # asks for a cancellation of a request that has both).
        self.started += 1
        req.backend = self
        req.handle = ("handle", self.started)
        self.pending.append(req)
        self.events.append(("start", req.user_data, int(req.opcode)))
        if self.on_start is not None:
            self.on_start(req)

    def start_direct(self, sqe: Sqe) -> bool:
        return False  # every op goes through a record here, so tests can complete it

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        return 0

    def cancel_io(self, req: Req, on_result: Callable[[int], None]) -> None:
        self.cancels.append((req, on_result))
        self.events.append(("cancel", req.user_data))

    def call_driver(self, req: Req, issue_flags: int) -> int:
        self.events.append(("driver", req.user_data, req.cmd_op))
        try:
            ret = req.driver.uring_cmd(req, issue_flags)
        except Exception as exc:
            self.log_error("driver_raised", error=repr(exc))
            return EIO
        if isinstance(ret, bool) or not isinstance(ret, int):
            return EIO
        return int(ret)

    def task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        self.work.append((fn, arg))

    def arm_timer(self, seconds: float, fn: Callable[[Req], None], req: Req) -> object:
        t = Timer(seconds, fn, req)
        self.timers.append(t)
        return t

    def disarm_timer(self, handle: object) -> None:
        assert isinstance(handle, Timer), handle
        if handle.armed:
            handle.armed = False
            self.timers.remove(handle)
            handle.req = None  # type: ignore[assignment]
        self.events.append(("disarm", handle.user_data))

    def wake(self) -> None:
        if not self.drain_cq:
            return
        core = self.core
        assert core is not None
        while (c := core.peek_cqe()) is not None:
            core.cqe_seen(c)
            self.cqes.append(c)
            self.events.append(("cqe", c.user_data, c.res, c.flags))
            if self.on_cqe is not None:
                self.on_cqe(c)

    def idle(self) -> None:
        self.idle_count += 1
        self.events.append(("idle",))

    def fd_is_open(self, fd: int) -> bool:
        return fd in self.open_fds

    def log_error(self, event: str, exc: bool = False, **fields: Any) -> None:
        self.errors.append((event, fields))

    # ---- the world, played by the test ----------------------------------------------------

    def find(self, user_data: int) -> Req:
        """The one pending leaf request with ``user_data``."""
        found = [r for r in self.pending if r.user_data == user_data]
        assert len(found) == 1, f"pending with ud={user_data}: {found} (all: {self.pending})"
        return found[0]

    def _resolve(self, which: Req | int) -> Req:
        return self.find(which) if isinstance(which, int) else which

    def complete(self, which: Req | int, res: int, flags: int = 0) -> None:
        """The backend's completion of a pending op: ``core.io_done(req, res, flags)``.

        ``flags=CqeFlag.MORE`` (SEND_ZC's result) keeps the op pending for its NOTIF.
        """
        req = self._resolve(which)
        assert req in self.pending, f"{req!r} is not pending"
        if not flags & _MORE:
            self.pending.remove(req)
        self.events.append(("done", req.user_data, res))
        core = self.core
        assert core is not None
        core.io_done(req, res, flags)

    def complete_zc(self, which: Req | int, res: int) -> None:
        """SEND_ZC: the result (MORE) now; the NOTIF comes with :meth:`notif`."""
        self.complete(which, res, _MORE)

    def notif(self, which: Req | int) -> None:
        self.complete(which, 0, _NOTIF)

    def answer_cancel(
        self, which: Req | int | None = None, res: int = 0, complete_with: int | None = ECANCELED
    ) -> None:
        """Answer a cancellation request (the oldest, or the one for ``which``).

        ``res`` 0 (accepted) completes the op with ``complete_with`` first, as the
        asyncio backend does for a parked op; -EALREADY leaves it pending.  A request
        for an op that finished meanwhile is answered -ENOENT whatever ``res`` says.
        """
        if which is None:
            req, on_result = self.cancels.pop(0)
        else:
            target = self._resolve(which)
            (i,) = [k for k, (r, _) in enumerate(self.cancels) if r is target]
            req, on_result = self.cancels.pop(i)
        if req not in self.pending:
            res = ENOENT  # finished meanwhile, as a backend answers for a done op
        elif res == 0 and complete_with is not None:
            self.complete(req, complete_with)
        on_result(res)

    def answer_all_cancels(self, res: int = 0) -> int:
        n = 0
        while self.cancels:
            self.answer_cancel(None, res)
            n += 1
        return n

    def run_work(self, limit: int | None = None) -> int:
        """Run queued task work in FIFO order (also what it queues); return how much."""
        n = 0
        while self.work and (limit is None or n < limit):
            fn, arg = self.work.popleft()
            fn(arg)
            n += 1
        return n

    def timer(self, user_data: int) -> Timer:
        (t,) = [t for t in self.timers if t.user_data == user_data]
        return t

    def fire(self, which: Timer | int) -> None:
        """Fire an armed timer (by handle or by its request's user_data)."""
        t = self.timer(which) if isinstance(which, int) else which
        assert t.armed, f"{t!r} is not armed"
        t.armed = False
        self.timers.remove(t)
        req, t.req = t.req, None  # type: ignore[assignment]
        t.fn(req)

    def pairs(self) -> list[tuple[int, int]]:
        """``(user_data, res)`` of every CQE so far."""
        return [(c.user_data, c.res) for c in self.cqes]

    def take(self) -> list[tuple[int, int]]:
        """``pairs()`` and forget them."""
        out = self.pairs()
        self.cqes.clear()
        return out

    def assert_quiet(self) -> None:
        """Nothing in flight, lent, viewed, pending, queued or armed."""
        core = self.core
        assert core is not None
        assert core.in_flight() == 0, f"in_flight={core.in_flight()}"
        assert core.views == 0, f"views={core.views}"
        assert core.lent == 0, f"lent={core.lent}"
        assert not self.pending, f"pending={self.pending}"
        assert not self.cancels, f"cancels={self.cancels}"
        assert not self.work, f"work={list(self.work)}"
        assert not self.timers, f"timers={self.timers}"
        assert not self.errors, f"errors={self.errors}"


def make_core(
    entries: int = 16, flags: int = FUSED, open_fds: Iterable[int] = OPEN_FDS
) -> tuple[RingCore, RecordingPort]:
    """A RingCore over a fresh RecordingPort."""
    port = RecordingPort(open_fds)
    core = RingCore(entries, flags, port)
    port.attach(core)
    return core, port


def sqe(core: RingCore, ud: int, prep: str, *args: Any, flags: int = 0, **kw: Any) -> Sqe:
    """Get an SQE, ``prep_<prep>(*args)``, set ``user_data`` and OR ``flags``."""
    s = core.get_sqe()
    assert s is not None, "SQ full"
    getattr(s, f"prep_{prep}")(*args, **kw)
    s.user_data = ud
    s.flags |= flags
    return s


class LendingDriver:
    """A tiny driver for core tests.  ``cmd_op`` picks what it does:

    * 0: lend ``buf``; the callback completes with ``result`` (-ECANCELED if cancelled);
    * 1: complete inline with ``result`` (no lend);
    * 2: queue and do nothing (the test calls ``cmd.done`` or lends itself);
    * 3: lend; the callback completes with the sum of the secondaries' results.

    It keeps no reference to a command unless ``keep`` (then in ``kept``).
    """

    name = "lending"

    def __init__(
        self, size: int = 4096, result: int = 0, can_fused: bool = True, keep: bool = False
    ) -> None:
        self.buf = bytearray(size)
        self.result = result
        self.can_fused = can_fused
        self.keep = keep
        self.kept: list[Req] = []
        #: (cmd_op, is_fused, buf_dir, issue_flags) per call.
        self.calls: list[tuple[int, bool, Any, int]] = []
        #: What the callback saw: (secondary_results, cancelled, views, lent, cqes so far).
        self.callbacks: list[tuple[list[int], bool, int, int, int]] = []
        self.port: RecordingPort | None = None

    def uring_cmd(self, cmd: Req, issue_flags: int) -> int:
        self.calls.append((cmd.cmd_op, cmd.is_fused, cmd.buf_dir, issue_flags))
        if self.keep:
            self.kept.append(cmd)
        op = cmd.cmd_op
        if op == 1:
            return self.result
        if op == 2:
            return EIOCBQUEUED
        if not cmd.is_fused:
            return self.result
        cmd.provide_buf_and_start(self.buf, self._returned)
        return EIOCBQUEUED

    def _returned(self, cmd: Req) -> None:
        core = cmd.ring
        ncqes = len(self.port.cqes) if self.port is not None else -1
        self.callbacks.append(
            (list(cmd.secondary_results), cmd.cancelled, core.views, core.lent, ncqes)
        )
        if cmd.cancelled:
            cmd.done(ECANCELED)
        elif cmd.cmd_op == 3:
            cmd.done(sum(cmd.secondary_results))
        else:
            cmd.done(self.result)


def op_name(opcode: int) -> str:
    try:
        return Op(opcode).name
    except ValueError:
        return str(opcode)
