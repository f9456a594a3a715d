"""A deterministic backend for tests: an op completes only when the test says so.

Put it under a ring with ``Ring(..., backend=FakeBackend())`` (``Ring`` takes a
:class:`~aiofused.backend.Backend` instance and runs every leaf op on it).  Each op the
ring starts becomes a :class:`FakeOp` in :attr:`FakeBackend.pending`; nothing happens to
it until the test calls :meth:`FakeBackend.complete`, so orderings that otherwise need
``asyncio.sleep`` are chosen by the test::

    fake = FakeBackend()
    async with Ring(8, backend=fake) as ring:
        sqe = ring.get_sqe(); sqe.prep_read(fd, buf); ring.submit()
        op = await fake.wait_started()        # or fake.pending[0]
        fake.complete(op, 4, data=b"abcd")    # the CQE is posted now, synchronously
        cqe = await ring.wait_cqe()

The backend contract (``aiofused.backends._base``) holds: ``complete`` never runs inside
``start``/``cancel`` (it runs when the test calls :meth:`FakeBackend.complete`, from the
test's own frame), cancellation answers come later through ``loop.call_soon``, and
SEND_ZC completes twice (its result with ``CqeFlag.MORE``, then the ``NOTIF``).

Cancellation answers are set per backend (:attr:`FakeBackend.cancel_mode`) or per op
(:attr:`FakeOp.cancel_mode`):

* ``"accept"``: answer 0 and complete the op with -ECANCELED (a parked op);
* ``"already"``: answer -EALREADY; the op stays pending until the test completes it
  (a running kernel op, SPEC F13);
* ``"manual"``: record the request in :attr:`FakeBackend.cancels`; the test answers it
  with :meth:`FakeBackend.answer_cancel`.

A finished :class:`FakeOp` keeps a snapshot of its fields but no reference to the
ring's request or its buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar, Literal

from aiofused._abi import EALREADY, ECANCELED, ENOENT, CqeFlag, Op
from aiofused._core.opdef import OPDEFS, UringEnc
from aiofused.backends._base import Backend, BackendOp, Completion, IoOp, ProbeResult

__all__ = ["CancelMode", "FakeBackend", "FakeOp"]

CancelMode = Literal["accept", "already", "manual"]
_MODES = ("accept", "already", "manual")
_MORE = int(CqeFlag.MORE)
_NOTIF = int(CqeFlag.NOTIF)
_LEAF_OPS = frozenset(d.op for d in OPDEFS.values() if d.backend)
_ZC_OPS = frozenset(d.op for d in OPDEFS.values() if d.uring & UringEnc.ZC)


class FakeOp(BackendOp):
    """One op the ring started on a :class:`FakeBackend` (the backend's handle)."""

    __slots__ = (
        "cancel_mode",
        "cancel_requests",
        "complete_fn",
        "fd",
        "index",
        "io",
        "nbytes",
        "offset",
        "opcode",
        "result",
        "rw_flags",
        "state",
        "user_data",
    )

    def __init__(self, index: int, io: IoOp, complete: Completion) -> None:
        #: Start order on its backend (0 for the first op ever started).
        self.index = index
        self.io: IoOp | None = io
        self.complete_fn: Completion | None = complete
        self.opcode = Op(io.opcode)
        self.fd = io.fd
        self.nbytes = io.nbytes
        self.offset = io.offset
        self.rw_flags = io.rw_flags
        #: The request's ``user_data`` where the op carries one (0 for lease secondaries).
        self.user_data: int | None = getattr(io, "user_data", None)
        #: ``"pending"``, ``"notif"`` (SEND_ZC: result posted, NOTIF due) or ``"done"``.
        self.state = "pending"
        #: None: the backend's :attr:`FakeBackend.cancel_mode`.
        self.cancel_mode: CancelMode | None = None
        #: How many times the ring asked to cancel this op.
        self.cancel_requests = 0
        #: The res the op completed with (None while pending).
        self.result: int | None = None

    @property
    def buffer(self) -> memoryview | None:
        """The ring's view of the op's buffer while it is pending (what the kernel would
        read or write); None once the op finished."""
        return self.io.buf if self.io is not None else None

    @property
    def done(self) -> bool:
        return self.state == "done"

    def __repr__(self) -> str:
        return (
            f"<FakeOp #{self.index} {self.opcode.name} ud={self.user_data} fd={self.fd} "
            f"n={self.nbytes} {self.state}>"
        )


class FakeBackend(Backend):
    """Runs nothing: the test completes every op (see the module docstring)."""

    name: ClassVar[str] = "fake"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        cancel_mode: CancelMode = "accept",
        register_buffers: bool = False,
    ) -> None:
        super().__init__(loop if loop is not None else asyncio.get_running_loop())
        if cancel_mode not in _MODES:
            raise ValueError(f"cancel_mode must be one of {_MODES}, got {cancel_mode!r}")
        self.cancel_mode: CancelMode = cancel_mode
        self._register_ok = register_buffers
        #: Every op ever started, in start order.
        self.ops: list[FakeOp] = []
        #: Cancellation requests waiting for :meth:`answer_cancel` (``"manual"`` mode).
        self.cancels: list[tuple[FakeOp, Callable[[int], None]]] = []
        #: How many cancellation requests arrived, in any mode.
        self.cancel_count = 0
        #: Buffers given to :meth:`register_buffers`.
        self.registered: list[memoryview] = []
        self.closed = False
        #: Ops still pending when :meth:`aclose` ran (the ring must drain first: 0).
        self.pending_at_close = 0
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # ---- the Backend interface -------------------------------------------------------

    @classmethod
    def probe(cls) -> ProbeResult:
        """Always available; runs every leaf op of the op table."""
        return ProbeResult(cls.name, True, "", _LEAF_OPS)

    @property
    def supported_ops(self) -> frozenset[Op]:
        return _LEAF_OPS

    def start(self, op: IoOp, complete: Completion) -> BackendOp:
        if self.closed:
            raise RuntimeError("FakeBackend: start() after aclose()")
        h = FakeOp(len(self.ops), op, complete)
        self.ops.append(h)
        self._check_waiters()
        return h

    def cancel(self, handle: BackendOp, on_result: Callable[[int], None]) -> None:
        assert isinstance(handle, FakeOp), handle
        h = handle
        h.cancel_requests += 1
        self.cancel_count += 1
        if h.state != "pending":
            self.loop.call_soon(on_result, ENOENT)
        else:
            mode = h.cancel_mode or self.cancel_mode
            if mode == "accept":
                self.loop.call_soon(self._accept_cancel, h, on_result)
            elif mode == "already":
                self.loop.call_soon(on_result, EALREADY)
            else:
                self.cancels.append((h, on_result))
        self._check_waiters()

    def register_buffers(self, buffers: list[memoryview]) -> bool:
        self.registered = list(buffers)
        return self._register_ok

    def in_flight(self) -> int:
        return sum(1 for h in self.ops if h.state != "done")

    async def aclose(self) -> None:
        self.pending_at_close = self.in_flight()
        self.closed = True

    # ---- the test's side ----------------------------------------------------------------

    @property
    def pending(self) -> list[FakeOp]:
        """Ops started and not finally completed, in start order."""
        return [h for h in self.ops if h.state != "done"]

    def find(
        self, *, user_data: int | None = None, opcode: Op | None = None, fd: int | None = None
    ) -> FakeOp:
        """The one pending op matching every given field."""
        found = [
            h
            for h in self.pending
            if (user_data is None or h.user_data == user_data)
            and (opcode is None or h.opcode == opcode)
            and (fd is None or h.fd == fd)
        ]
        if len(found) != 1:
            raise LookupError(f"{len(found)} pending ops match; pending: {self.pending}")
        return found[0]

    def _resolve(self, which: FakeOp | int) -> FakeOp:
        if isinstance(which, FakeOp):
            return which
        return self.pending[which]

    def complete(
        self,
        which: FakeOp | int,
        res: int | None = None,
        *,
        data: bytes | None = None,
        notif: bool = True,
    ) -> FakeOp:
        """Complete ``which`` (a :class:`FakeOp`, or an index into :attr:`pending`) now.

        ``res`` defaults to the op's full length (``nbytes``); ``data`` is first copied
        into the op's buffer, as the kernel would write it (it must fit).  A SEND_ZC
        posts its result with ``CqeFlag.MORE`` and, unless ``notif`` is False, its
        ``NOTIF`` right after (else call :meth:`notif` later).
        """
        h = self._resolve(which)
        if h.state != "pending":
            raise RuntimeError(f"{h!r} is not pending")
        if res is None:
            res = h.nbytes
        if data is not None:
            buf = h.buffer
            if buf is None or len(data) > len(buf):
                raise ValueError(f"{len(data)} bytes do not fit the buffer of {h!r}")
            buf[: len(data)] = data  # ValueError if the ring released the view early
        if h.opcode in _ZC_OPS:
            h.state = "notif"
            h.result = res
            fn = h.complete_fn
            assert fn is not None
            fn(res, _MORE)
            if notif:
                self.notif(h)
            return h
        self._final(h, res, 0)
        return h

    def complete_batch(self, *which: FakeOp | int) -> list[FakeOp]:
        """Complete several plain ops in one hand-over (:attr:`Backend.deliver`), as the
        uring backend passes on every CQE of one wake-up; each takes its full length."""
        ops = [self._resolve(w) for w in which]
        batch = []
        for h in ops:
            if h.state != "pending" or h.opcode in _ZC_OPS:
                raise RuntimeError(f"{h!r} is not a pending plain op")
            fn = h.complete_fn
            assert fn is not None
            h.state = "done"
            h.result = h.nbytes
            h.io = None
            h.complete_fn = None
            batch.append((fn, h.nbytes, 0))
        self.deliver(batch)
        return ops

    def notif(self, which: FakeOp | int) -> FakeOp:
        """SEND_ZC's notification (after :meth:`complete` with ``notif=False``)."""
        h = which if isinstance(which, FakeOp) else self.pending[which]
        if h.state != "notif":
            raise RuntimeError(f"{h!r} has no NOTIF due")
        self._final(h, h.result if h.result is not None else 0, _NOTIF)
        return h

    def fail(self, which: FakeOp | int, res: int) -> FakeOp:
        """Complete ``which`` with the error ``res`` (negative errno)."""
        if res >= 0:
            raise ValueError("fail() takes a negative errno")
        return self.complete(which, res)

    def answer_cancel(
        self, which: FakeOp | int | None = None, res: int = 0, complete_with: int | None = None
    ) -> None:
        """Answer a ``"manual"`` cancellation (the oldest, or the one of ``which``).

        ``res`` is the answer (0, -EALREADY, -ENOENT).  With ``res`` 0 the op completes
        first with ``complete_with`` (default -ECANCELED); otherwise it stays pending.
        """
        if not self.cancels:
            raise LookupError("no cancellation request is waiting")
        if which is None:
            h, on_result = self.cancels.pop(0)
        else:
            target = self._resolve(which)
            idx = [k for k, (c, _) in enumerate(self.cancels) if c is target]
            if not idx:
                raise LookupError(f"no cancellation request for {target!r}")
            h, on_result = self.cancels.pop(idx[0])
        if res == 0 and h.state == "pending":
            self.complete(h, ECANCELED if complete_with is None else complete_with)
        on_result(res)

    async def wait_started(self, count: int = 1) -> FakeOp:
        """Wait until ``count`` ops were started in all; return the ``count``-th."""
        await self.wait_for(lambda: len(self.ops) >= count)
        return self.ops[count - 1]

    async def wait_cancels(self, count: int = 1) -> None:
        """Wait until ``count`` cancellation requests arrived in all."""
        await self.wait_for(lambda: self.cancel_count >= count)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked when an op starts or a
        cancellation request arrives (and once now)."""
        if predicate():
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append((predicate, fut))
        try:
            await fut
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not fut]

    # ---- internals ---------------------------------------------------------------------

    def _final(self, h: FakeOp, res: int, flags: int) -> None:
        fn = h.complete_fn
        assert fn is not None
        h.state = "done"
        if not flags & _NOTIF:
            h.result = res
        h.io = None
        h.complete_fn = None
        fn(res, flags)

    def _accept_cancel(self, h: FakeOp, on_result: Callable[[int], None]) -> None:
        if h.state == "pending":
            self.complete(h, ECANCELED)
            on_result(0)
        else:
            on_result(ENOENT)

    def _check_waiters(self) -> None:
        for predicate, fut in self._waiters:
            if not fut.done() and predicate():
                fut.set_result(None)

    def __repr__(self) -> str:
        return f"<FakeBackend pending={len(self.pending)} ops={len(self.ops)}>"
