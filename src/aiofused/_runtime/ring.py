"""The public :class:`Ring`: the runtime that carries out the pure core's effects.

The core (:mod:`aiofused._core.ring`) owns what is in flight; this module owns time
and tasks: the running loop, timers, the backends, the drivers, and the tasks waiting
for CQEs.  ``Ring`` is the core's port: each effect the core asks for is one method
here (``start_io`` hands a record to its backend, ``task_work`` is ``loop.call_soon``,
``arm_timer`` is ``loop.call_later``, ``wake`` resolves the waiters' futures).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiofused._abi import EBUSY, EINVAL, EIO, EIOCBQUEUED, ENXIO, BufDir, Op, SetupFlag
from aiofused._buffers import BufferPool
from aiofused._core.opdef import OPDEFS
from aiofused._core.records import DriverFile, FusedState, Req
from aiofused._core.ring import RingCore
from aiofused._core.sqe import Cqe, new_cqe
from aiofused._driver import Driver, load_driver
from aiofused._errors import DriverError, RingClosedError, res_to_error
from aiofused._log import get_logger
from aiofused._runtime.lease import FusedScope
from aiofused._runtime.live import register
from aiofused._twin import c_twin
from aiofused.backends._base import Backend, select_backend

__all__ = ["CQE_TWIN", "Ring"]

log: Final = get_logger("aiofused.ring")
_LENT: Final = FusedState.LENT
#: How the Ring's CQEs are made: ``(impl, why, new_cqe)``, the C twin where it was
#: built (``aiofused info`` prints the first two).
CQE_TWIN: Final = c_twin("aiofused._abi._cqe", "new_cqe", new_cqe)


class Ring(RingCore):
    """An io_uring-faithful ring on the running asyncio loop (SPEC §1-§4).

    ``entries`` is rounded up to a power of two; ``flags`` are :class:`SetupFlag`
    bits (``FUSED_REQ`` enables fused commands); ``backend`` is ``"auto"``,
    ``"uring"``, ``"asyncio"`` or a :class:`~aiofused.backend.Backend` instance on the
    running loop (tests: ``aiofused.testing.fake``).  Use it as ``async with Ring(...)``.
    """

    def __init__(
        self,
        entries: int = 64,
        flags: int = SetupFlag.NONE,
        backend: str | Backend = "auto",
        *,
        cq_entries: int | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        super().__init__(entries, flags, self, cq_entries=cq_entries)
        self.new_cqe = CQE_TWIN[2]
        if isinstance(backend, Backend):
            self._backend = backend
        else:
            self._backend = select_backend(backend, self.loop)
        if self._backend.name == "asyncio" or isinstance(backend, Backend):
            self._fallback = self._backend
        else:
            from aiofused.backends._asyncio import AsyncioBackend

            self._fallback = AsyncioBackend(self.loop)
        self._backend.deliver = self._fallback.deliver = self.io_batch
        self.start_direct = self._backend.start_direct
        kernel_ops = self._backend.supported_ops
        #: opcode -> the backend that runs it (the op table says which ops are leaf I/O).
        self._io_backend: list[Backend | None] = [None] * 256
        for op, d in OPDEFS.items():
            if d.backend:
                self._io_backend[op] = self._backend if op in kernel_ops else self._fallback
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._owned_drivers: list[Driver] = []
        self._closed = False
        self._live_token = register(self)  # the pytest plugin's leak check finds it

    # ---- public surface ----------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"uring"`` or ``"asyncio"``: what plain I/O ops actually run on."""
        return self._backend.name

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has finished."""
        return self._closed

    async def __aenter__(self) -> Ring:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_cqe(self) -> Cqe:
        """Wait for the first CQE and return it without consuming it."""
        while self.cq_head >= len(self.cq):  # inline, not a helper coroutine: one frame less
            await self._park(1)
        return self.cq[self.cq_head]

    async def wait_cqes(self, n: int) -> list[Cqe]:
        """Wait until ``n`` CQEs are ready; consume and return them in order."""
        if n <= 0:
            raise ValueError("n must be positive")
        while self.cq_ready() < n:
            await self._park(n)
        return self.take_cqes(n)

    def statistics(self) -> dict[str, int | str]:
        """What the ring holds now: requests in flight, buffers lent, views alive, SQEs
        pending, CQEs ready (and overflowed), and the backend's own ops in flight."""
        return {
            "backend": self._backend.name,
            "in_flight": self.in_flight(),
            "lent": self.lent,
            "views": self.views,
            "sq_pending": len(self._sq),
            "cq_ready": self.cq_ready(),
            "cq_overflow": self.cq_overflow,
            "backend_in_flight": self._backend.in_flight()
            + (self._fallback.in_flight() if self._fallback is not self._backend else 0),
        }

    def register_driver(self, driver: Driver) -> DriverFile:
        """Put ``driver`` in the fixed-file table; use the result as an SQE's ``fd``."""
        if self.closing:
            raise RingClosedError("ring is closed")
        if not isinstance(driver, Driver):
            raise TypeError(f"{driver!r} does not implement the Driver protocol")
        return DriverFile(driver, self.add_file(driver), self.id)

    def unregister_driver(self, df: DriverFile) -> None:
        """Empty ``df``'s slot: later SQEs naming it fail with -EBADF."""
        if df.ring_id == self.id:
            self.remove_file(df.index)

    def open_driver(self, name: str, **options: Any) -> DriverFile:
        """Load the plugin ``name`` (entry-point group ``aiofused.drivers``) and register it."""
        driver = load_driver(name, **options)
        self._owned_drivers.append(driver)
        return self.register_driver(driver)

    def register_buffers(self, buffers: BufferPool | Sequence[Any]) -> None:
        """Register fixed buffers (``IORING_REGISTER_BUFFERS``): slot ``i`` is ``buf_index`` i.

        READ_FIXED/WRITE_FIXED name them by index; a primary lending a buffer of a
        registered :class:`BufferPool` runs its READ/WRITE secondaries as fixed ops on the
        kernel backend.  The buffers stay pinned until :meth:`unregister_buffers` or close.
        """
        if self.closing:
            raise RingClosedError("ring is closed")
        if self.reg_views:
            raise res_to_error(EBUSY)
        if isinstance(buffers, BufferPool):
            views = buffers.views()
            self.reg_pool = buffers
        else:
            views = []
            for b in buffers:
                mv = memoryview(b)
                views.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
        if not views or any(v.readonly for v in views):
            self.reg_pool = None
            raise res_to_error(EINVAL)
        self.reg_views = views
        if Op.READ_FIXED in self._backend.supported_ops:
            self.reg_kernel = self._backend.register_buffers(views)

    def unregister_buffers(self) -> None:
        """Forget the fixed buffers (requests already consumed keep their views)."""
        if not self.reg_views:
            raise res_to_error(ENXIO)
        self.reg_views = []
        self.reg_pool = None
        self.reg_kernel = False

    def fused(
        self,
        driver_file: DriverFile | int,
        cmd_op: int,
        cmd: bytes = b"",
        buf_dir: BufDir = BufDir.DEST,
    ) -> FusedScope:
        """High-level fused primary as an async context manager (SPEC §5)."""
        return FusedScope(self, driver_file, cmd_op, cmd, buf_dir)

    # ---- fused commands driven by callbacks ------------------------------------------

    def open_fused(
        self,
        driver_file: DriverFile | int,
        cmd_op: int,
        *,
        cmd: bytes = b"",
        buf_dir: BufDir = BufDir.DEST,
        on_lent: Callable[[Req, int], None],
        on_complete: Callable[[int, int], None],
    ) -> Req:
        """Submit a fused primary that stays open for secondaries, driven by callbacks:
        the low-level twin of :meth:`fused`, with no task, future or object per command.
        A ``driver_file`` that names no driver (a plain fd) completes with what the
        kernel answers for it (-EBADF, -EOPNOTSUPP).

        ``on_lent(cmd, nbytes)`` runs when the driver lends its buffer (``cmd`` is what
        this returns); secondaries then start with :meth:`fused_secondary`, and
        :meth:`seal` says there will be no more.
        ``on_complete(res, flags)`` gets the primary's completion, after every secondary's
        (also when nothing was lent: end of stream, an error).  Either may run before this
        returns (a driver that lends or completes at once).  Keep the returned command
        only to pass it to :meth:`fused_secondary`, :meth:`seal` and
        :meth:`cancel_secondaries`; it means nothing after ``on_complete``.
        """
        if type(cmd) is not bytes:
            cmd = bytes(cmd)
        if type(buf_dir) is not BufDir:
            buf_dir = BufDir(buf_dir)
        p = self.private_primary(driver_file, cmd_op, cmd, buf_dir, on_complete)
        p.on_lent = on_lent
        self.start_private(p)
        return p

    def fused_secondary(
        self,
        primary: Req,
        op: Op,
        fd: Any,
        *,
        at: int = 0,
        nbytes: int,
        offset: int = 0,
        flags: int = 0,
        on_complete: Callable[[int, int], None],
    ) -> None:
        """Start secondary ``op`` (READ/WRITE/SEND/RECV...) on ``nbytes`` of the lent
        buffer from ``at`` of an open primary; ``on_complete(res, flags)`` gets its result.
        :class:`DriverError` if the primary is sealed or not lent, ``ValueError`` for an
        op that cannot use the buffer in its direction."""
        if primary.fstate is not _LENT or primary.sealed:  # as add_secondary
            raise DriverError(f"no secondary can start in state {primary.fstate.name.lower()}")
        opdef = OPDEFS.get(op)
        if opdef is None or not opdef.fused_secondary or opdef.buf_dir is not primary.buf_dir:
            raise ValueError(f"{op!r} is not a secondary for a {primary.buf_dir!r} buffer")
        s = self.private_secondary(op, fd, at, nbytes, offset, flags, on_complete)
        self.add_secondary(primary, s)

    async def close(self) -> None:
        """Cancel everything in flight, wait for every final completion, release all."""
        if self._closed:
            return
        if not self.closing:
            self.cancel_all()
        while self.live:
            fut = self.loop.create_future()
            self._idle_waiters.append(fut)
            await fut
        for drv in self._owned_drivers:
            closer = getattr(drv, "close", None)
            if closer is not None:
                try:
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("driver_close_failed", driver=drv.name)
        self._owned_drivers.clear()
        self._files.clear()
        if self._fallback is not self._backend:
            await self._fallback.aclose()
        await self._backend.aclose()
        self._closed = True
        self.waiting = False
        self.drop_free_records()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RingClosedError("ring closed while waiting for CQEs"))
        self._waiters.clear()

    # ---- waiting -------------------------------------------------------------------------

    def _park(self, n: int) -> asyncio.Future[None]:
        """A future that completes once ``n`` CQEs are in the CQ (the caller re-checks)."""
        if self._closed:
            raise RingClosedError("ring is closed")
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append((n, fut))
        self.waiting = True
        return fut

    # ---- the port: effects of the core -----------------------------------------------

    def wake(self) -> None:
        """Resolve the waiters whose CQE count is reached."""
        waiters = self._waiters
        have = len(self.cq) - self.cq_head
        if len(waiters) == 1:  # the common case: one reaper
            n, fut = waiters[0]
            if fut.done():
                waiters.clear()
            elif have >= n:
                fut.set_result(None)
                waiters.clear()
        else:
            keep = []
            for n, fut in waiters:
                if fut.done():
                    continue
                if have >= n:
                    fut.set_result(None)
                else:
                    keep.append((n, fut))
            self._waiters = waiters = keep
        self.waiting = bool(waiters)

    def idle(self) -> None:
        """Nothing in flight: wake :meth:`close`."""
        if self._idle_waiters:
            for fut in self._idle_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle_waiters.clear()

    def start_io(self, req: Req) -> None:
        """Hand leaf op ``req`` to the backend that runs its opcode."""
        backend = self._io_backend[req.opcode]
        assert backend is not None  # the op table sends only leaf I/O here
        req.backend = backend
        req.handle = backend.start(req, req)

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        """Cancel ops the backend runs as is (:meth:`Backend.cancel_direct`)."""
        return self._backend.cancel_direct(user_data, every, on_result)

    def cancel_io(self, req: Req, on_result: Callable[[int], None]) -> None:
        """Ask ``req``'s backend to cancel it."""
        req.backend.cancel(req.handle, on_result)

    def call_driver(self, req: Req, issue_flags: int) -> int:
        """``uring_cmd`` of ``req``'s driver; -EIO (logged) if it raises or returns junk."""
        driver = req.driver
        try:
            ret: Any = driver.uring_cmd(req, issue_flags)
        except Exception:
            log.exception("driver_raised", driver=driver.name, cmd_op=req.cmd_op)
            return EIO
        if type(ret) is int:
            return ret
        if ret == EIOCBQUEUED and not isinstance(ret, bool):
            return EIOCBQUEUED
        if not isinstance(ret, int) or isinstance(ret, bool):
            log.error("driver_bad_result", driver=driver.name, result=repr(ret))
            return EIO
        return int(ret)

    def task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        """``loop.call_soon(fn, arg)``."""
        self.loop.call_soon(fn, arg)

    def arm_timer(self, seconds: float, fn: Callable[[Req], None], req: Req) -> object:
        """``loop.call_later(seconds, fn, req)``."""
        return self.loop.call_later(seconds, fn, req)

    def disarm_timer(self, handle: object) -> None:
        """Cancel a timer from :meth:`arm_timer`."""
        handle.cancel()  # type: ignore[attr-defined]

    def fd_is_open(self, fd: int) -> bool:
        """``fstat`` succeeds on ``fd``."""
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    def log_error(self, event: str, exc: bool = False, **fields: Any) -> None:
        """Log ``event`` at error level (with the traceback if ``exc``)."""
        if exc:
            log.exception(event, **fields)
        else:
            log.error(event, **fields)
