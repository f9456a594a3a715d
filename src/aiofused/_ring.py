"""The ring: SQ and CQ, init errors, and the link/drain/skip scheduler.

Theory of operation
-------------------
``submit()`` reads SQEs in order, copies each into a :class:`Req` (the in-flight
record, which *is* the :class:`~aiofused.backends.IoOp` a backend executes), runs the
generic init checks and the op's ``prep`` (SPEC R3), and assembles link chains exactly
as ``io_submit_sqe``/``io_submit_fail_init`` do (SPEC L1-L5): an init error inside a
chain fails the whole chain once it ends; an init error that ends a chain, or a
standalone one, stops consumption.  A FUSED_CMD consumes its secondaries right after
itself (SPEC F3-F5); they live in the primary's :class:`~aiofused._fused.Primary`,
never in a chain.

A *unit* is one chain (or a standalone request).  Units are released in order
through the drain queue (SPEC L5); ``_live`` counts the requests of released units
that have not finally completed.  Issuing goes through a work list (``_ready``) so
that requests completing at once (NOP, errors) never recurse.

Every request ends in exactly one ``_complete`` (or ``_finish`` + ``_release`` for
SEND_ZC, whose buffer is held until its NOTIF): the CQE is posted (or hidden by
CQE_SKIP_SUCCESS, or by a failed SKIP request ahead in its chain, SPEC L4), the chain
advances or is failed (SPEC L2), and the buffer view is released.  Nothing a request
holds is dropped before that point, whatever happens to the Python task that
submitted it (SPEC F13).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiofused._buffers import BufferPool
from aiofused._driver import Driver, DriverFile, load_driver
from aiofused._errors import RingClosedError, res_to_error
from aiofused._fused import Primary
from aiofused._log import get_logger
from aiofused._opdef import ASYNC_CANCEL_ALL, OPDEFS, OpDef, resolve_fd
from aiofused._sqe import Cqe, Sqe
from aiofused._uapi import (
    EALREADY,
    EBADF,
    EBUSY,
    ECANCELED,
    EINVAL,
    EIO,
    ENOENT,
    ENXIO,
    EOPNOTSUPP,
    ETIME,
    MAX_SECONDARY,
    SQE_VALID_FLAGS,
    BufDir,
    CqeFlag,
    Feature,
    Op,
    SetupFlag,
    SqeFlag,
)
from aiofused._views import view_release
from aiofused.backends._base import Backend, IoOp, select_backend

if TYPE_CHECKING:
    from aiofused._lease import FusedScope

__all__ = ["Req", "Ring"]

log = get_logger("aiofused.ring")

MAX_ENTRIES = 32768

# Plain ints for the hot path (IntFlag arithmetic allocates enum members).
_F_DRAIN = int(SqeFlag.IO_DRAIN)
_F_HARDLINK = int(SqeFlag.IO_HARDLINK)
_F_SKIP = int(SqeFlag.CQE_SKIP_SUCCESS)
_F_BUFSEL = int(SqeFlag.BUFFER_SELECT)
_CQE_MORE = int(CqeFlag.MORE)
_CQE_NOTIF = int(CqeFlag.NOTIF)
_INIT_SLOW_FLAGS = ~int(SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK | SqeFlag.ASYNC | SqeFlag.FIXED_FILE)
_FAST_EXCLUDED = int(SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK | SqeFlag.IO_DRAIN)
_tuple_new = tuple.__new__
_OP_NOP = int(Op.NOP)
_OP_FUSED_CMD = int(Op.FUSED_CMD)
_OP_LINK_TIMEOUT = int(Op.LINK_TIMEOUT)
_OP_SEND_ZC = int(Op.SEND_ZC)
_OP_TIMEOUT = int(Op.TIMEOUT)
_OP_READ_FIXED = int(Op.READ_FIXED)
_OP_WRITE_FIXED = int(Op.WRITE_FIXED)
_LINK_FLAGS = int(SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK)
_SECONDARY_FORBIDDEN = int(
    SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK | SqeFlag.IO_DRAIN | SqeFlag.BUFFER_SELECT
)

# Request states.
PENDING, INFLIGHT, FINISHED, RELEASED = range(4)

_nop_opdef = OPDEFS[Op.NOP]


def _ignore(res: int) -> None:
    pass


class Req(IoOp):
    """One consumed SQE, from submit to its final completion."""

    __slots__ = (
        "backend",
        "cqe_flags",
        "driver",
        "err",
        "fired",
        "flags",
        "fused",
        "handle",
        "issue_err",
        "link",
        "lt",
        "lt_target",
        "on_cqe",
        "opdef",
        "primary",
        "res",
        "ring",
        "sec_index",
        "sec_off",
        "seconds",
        "state",
        "target",
        "timer",
        "user_data",
    )

    def __init__(self, ring: Ring, user_data: int, opcode: int, flags: int) -> None:
        # IoOp's fields, set directly (cheaper than IoOp.__init__ on the hot path).
        self.fd = -1
        self.buf = None
        self.nbytes = 0
        self.offset = 0
        self.rw_flags = 0
        self.buf_index = -1
        self.file = None
        self.ring = ring
        self.user_data = user_data
        self.opcode = opcode  # type: ignore[assignment]
        self.flags = flags
        self.opdef: OpDef = _nop_opdef
        self.err = 0  # init error
        self.issue_err = 0  # error reported when issued (as the kernel's import does)
        self.state = PENDING
        self.res = 0
        self.cqe_flags = 0
        self.link: Req | None = None
        self.lt: Req | None = None
        self.lt_target: Req | None = None
        self.driver: Driver | None = None
        self.fused: Primary | None = None
        self.primary: Primary | None = None
        self.sec_index = -1
        self.sec_off = 0
        self.seconds = 0.0
        self.target = 0
        self.timer: asyncio.TimerHandle | None = None
        self.on_cqe: Callable[[int, int], None] | None = None
        self.handle: object = None
        self.backend: Backend | None = None
        self.fired = False

    __hash__ = object.__hash__
    __eq__ = object.__eq__

    def __call__(self, res: int, flags: int) -> None:
        """Backend completion entry point (``complete(res, flags)``)."""
        self.ring._on_io(self, res, flags)

    def __repr__(self) -> str:
        try:
            name = Op(self.opcode).name
        except ValueError:
            name = str(self.opcode)
        return f"<Req {name} ud={self.user_data} state={self.state}>"

    @property
    def failed_res(self) -> bool:
        """Whether ``res`` counts as a failure for links (SPEC L2)."""
        res = self.res
        if res < 0:
            return True
        if self.opdef.short_fails:
            return res != self.nbytes
        if self.opdef.backend and self.rw_flags & _MSG_WAITALL:
            return res < self.nbytes
        return False


_MSG_WAITALL = 0x100


class Ring:
    """An io_uring-faithful ring on the running asyncio loop (SPEC §1-§4).

    ``entries`` is rounded up to a power of two; ``flags`` are :class:`SetupFlag`
    bits (``FUSED_REQ`` enables fused commands); ``backend`` is ``"auto"``,
    ``"uring"`` or ``"asyncio"``.  Use it as ``async with Ring(...) as ring``.
    """

    #: Every ring alive, for leak checks.
    _instances: weakref.WeakSet[Ring] = weakref.WeakSet()

    def __init__(
        self,
        entries: int = 64,
        flags: int = SetupFlag.NONE,
        backend: str = "auto",
        *,
        cq_entries: int | None = None,
    ) -> None:
        if entries <= 0 or entries > MAX_ENTRIES:
            raise ValueError(f"entries must be in 1..{MAX_ENTRIES}, got {entries}")
        self.loop = asyncio.get_running_loop()
        self.sq_entries = 1 << (entries - 1).bit_length()
        cq = cq_entries if cq_entries is not None else 2 * self.sq_entries
        if cq < self.sq_entries:
            raise ValueError("cq_entries must be at least the SQ size")
        self.cq_entries = 1 << (cq - 1).bit_length()
        self.flags = SetupFlag(flags)
        self.features = Feature.NODROP | Feature.SUBMIT_STABLE | Feature.CQE_SKIP
        self._fused_ok = bool(self.flags & SetupFlag.FUSED_REQ)
        if self._fused_ok:
            self.features |= Feature.FUSED_REQ
        self._backend = select_backend(backend, self.loop)
        if self._backend.name == "asyncio":
            self._fallback = self._backend
        else:
            from aiofused.backends._asyncio import AsyncioBackend

            self._fallback = AsyncioBackend(self.loop)
        self._backend_ops = self._backend.supported_ops
        self.id = id(self)
        self._sq: list[Sqe] = []
        self._cq: collections.deque[Cqe] = collections.deque()
        self.cq_overflow = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._files: list[Driver | None] = []
        self._owned_drivers: list[Driver] = []
        self._inflight: dict[Req, None] = {}
        self._ready: collections.deque[Req] = collections.deque()
        self._issuing = False
        self._live = 0
        self._deferred: collections.deque[tuple[list[Req], int, bool]] = collections.deque()
        self._barrier = False
        self._skip_seen = False
        self._cqe_seq = 0
        self._count_timeouts: list[tuple[int, int, Req]] = []
        self._tseq = itertools.count()
        self._idle: list[asyncio.Future[None]] = []
        self._closed = False
        self._closing = False
        self._reg_views: list[memoryview] = []
        self._reg_pool: BufferPool | None = None
        self._reg_kernel = False
        Ring._instances.add(self)

    # ---- public surface --------------------------------------------------------

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

    def get_sqe(self) -> Sqe | None:
        """Return a fresh SQE in the SQ, or None when the SQ is full."""
        if self._closing:
            raise RingClosedError("ring is closed")
        if len(self._sq) >= self.sq_entries:
            return None
        sqe = Sqe()
        self._sq.append(sqe)
        return sqe

    def sq_ready(self) -> int:
        """Number of SQEs waiting for :meth:`submit`."""
        return len(self._sq)

    def submit(self) -> int:
        """Consume the SQ in order; return how many SQEs were consumed (SPEC R2, R4)."""
        if self._closing:
            raise RingClosedError("ring is closed")
        sq = self._sq
        n = len(sq)
        i = 0
        chain: list[Req] | None = None
        chain_failed = False
        stop = False
        while i < n and not stop:
            sqe = sq[i]
            if (
                sqe.opcode == _OP_NOP
                and chain is None
                and type(sqe.flags) is int
                and not sqe.flags
                and not sqe.ioprio
                and not (self._deferred or self._barrier or self._issuing)
            ):
                # A plain standalone NOP: nothing to check or track, its CQE at once.
                i += 1
                self._post_cqe(sqe.user_data, 0, 0)
                continue
            req = self._init_req(sqe)
            i += 1
            if (
                req.opdef.backend
                and chain is None
                and not req.err
                and not req.flags & _FAST_EXCLUDED
                and not (self._deferred or self._barrier or self._issuing)
            ):
                # Fast path: a standalone leaf I/O op goes straight to its backend.
                self._live += 1
                req.state = INFLIGHT
                self._inflight[req] = None
                try:
                    self._issue_io(req)
                except Exception:
                    log.exception("issue_failed", op=req.opcode, user_data=req.user_data)
                    if req.state == INFLIGHT:
                        self._complete(req, EIO)
                continue
            if req.opcode == _OP_FUSED_CMD:
                i = self._take_secondaries(req, sq, i, n)
            linked = bool(req.flags & _LINK_FLAGS)
            if chain is None:
                if req.opcode == _OP_LINK_TIMEOUT and not req.err:
                    req.err = EINVAL  # a LINK_TIMEOUT must follow a linked request
                if linked:
                    chain, chain_failed = [req], bool(req.err)
                    continue
                if req.err:
                    self._fail_unit([req])
                    stop = True  # SPEC R4
                else:
                    self._start_unit([req])
                continue
            if (
                req.opcode == _OP_LINK_TIMEOUT
                and not req.err
                and chain[-1].opcode == _OP_LINK_TIMEOUT
            ):
                req.err = EINVAL
            chain.append(req)
            chain_failed = chain_failed or bool(req.err)
            if linked:
                continue
            if chain_failed:
                self._fail_unit(chain)
                stop = bool(req.err)  # kernel: stop only if the failing SQE ends the chain
            else:
                self._start_unit(chain)
            chain = None
        if chain is not None:  # SPEC L1: the last SQE ends the chain
            if chain_failed:
                self._fail_unit(chain)
            else:
                self._start_unit(chain)
        del sq[:i]
        return i

    async def wait_cqe(self) -> Cqe:
        """Wait for the first CQE and return it without consuming it."""
        cq = self._cq
        while not cq:  # inline, not a helper coroutine: one frame less per wait
            await self._park(1)
        return cq[0]

    def peek_cqe(self) -> Cqe | None:
        """Return the first CQE without consuming it, or None."""
        return self._cq[0] if self._cq else None

    def cqe_seen(self, cqe: Cqe) -> None:
        """Consume ``cqe`` (normally the one :meth:`wait_cqe` returned)."""
        if self._cq and self._cq[0] is cqe:
            self._cq.popleft()
            return
        try:
            self._cq.remove(cqe)
        except ValueError:
            raise ValueError("CQE is not in the completion queue") from None

    async def wait_cqes(self, n: int) -> list[Cqe]:
        """Wait until ``n`` CQEs are ready; consume and return them in order."""
        if n <= 0:
            raise ValueError("n must be positive")
        cq = self._cq
        while len(cq) < n:
            await self._park(n)
        if n == 1:
            return [cq.popleft()]
        return [cq.popleft() for _ in range(n)]

    def cq_ready(self) -> int:
        """Number of CQEs waiting to be consumed."""
        return len(self._cq)

    def register_driver(self, driver: Driver) -> DriverFile:
        """Put ``driver`` in the fixed-file table; use the result as an SQE's ``fd``."""
        if self._closing:
            raise RingClosedError("ring is closed")
        if not isinstance(driver, Driver):
            raise TypeError(f"{driver!r} does not implement the Driver protocol")
        self._files.append(driver)
        return DriverFile(driver, len(self._files) - 1, self.id)

    def unregister_driver(self, df: DriverFile) -> None:
        """Empty ``df``'s slot: later SQEs naming it fail with -EBADF."""
        if df.ring_id == self.id and 0 <= df.index < len(self._files):
            self._files[df.index] = None

    def register_buffers(self, buffers: BufferPool | Sequence[Any]) -> None:
        """Register fixed buffers (``IORING_REGISTER_BUFFERS``): slot ``i`` is ``buf_index`` i.

        READ_FIXED/WRITE_FIXED name them by index; a primary lending a buffer of a
        registered :class:`BufferPool` runs its READ/WRITE secondaries as fixed ops on the
        kernel backend.  The buffers stay pinned until :meth:`unregister_buffers` or close.
        """
        if self._closing:
            raise RingClosedError("ring is closed")
        if self._reg_views:
            raise res_to_error(EBUSY)
        if isinstance(buffers, BufferPool):
            views = buffers.views()
            self._reg_pool = buffers
        else:
            views = []
            for b in buffers:
                mv = memoryview(b)
                views.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
        if not views or any(v.readonly for v in views):
            raise res_to_error(EINVAL)
        self._reg_views = views
        if Op.READ_FIXED in self._backend_ops:
            self._reg_kernel = self._backend.register_buffers(views)

    def unregister_buffers(self) -> None:
        """Forget the fixed buffers (requests already consumed keep their views)."""
        if not self._reg_views:
            raise res_to_error(ENXIO)
        self._reg_views = []
        self._reg_pool = None
        self._reg_kernel = False

    def open_driver(self, name: str, **options: Any) -> DriverFile:
        """Load the plugin ``name`` (entry-point group ``aiofused.drivers``) and register it."""
        driver = load_driver(name, **options)
        self._owned_drivers.append(driver)
        return self.register_driver(driver)

    def fused(
        self, driver_file: DriverFile, cmd_op: int, cmd: bytes = b"", buf_dir: BufDir = BufDir.DEST
    ) -> FusedScope:
        """High-level fused primary as an async context manager (SPEC §5)."""
        return (_scope_cls or _fused_scope_class())(self, driver_file, cmd_op, cmd, buf_dir)

    def in_flight(self) -> int:
        """Requests consumed and not yet finally completed."""
        return self._live + sum(n for _, n, _ in self._deferred)

    async def close(self) -> None:
        """Cancel everything in flight, wait for every final completion, release all."""
        if self._closed:
            return
        if not self._closing:
            self._closing = True
            self._sq.clear()
            while self._deferred:
                reqs, count, _ = self._deferred.popleft()
                self._live += count
                self._fail_chain_not_issued(reqs[0], ECANCELED)
            for req in list(self._inflight):
                if req.state == INFLIGHT and req.opcode not in (Op.ASYNC_CANCEL, Op.LINK_TIMEOUT):
                    self._cancel_req(req, _ignore)
        while self._live:
            fut = self.loop.create_future()
            self._idle.append(fut)
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
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RingClosedError("ring closed while waiting for CQEs"))
        self._waiters.clear()

    # ---- private requests (the high-level API) ----------------------------------

    def _private_primary(
        self,
        driver_file: DriverFile,
        cmd_op: int,
        cmd: bytes,
        buf_dir: BufDir,
        on_cqe: Callable[[int, int], None],
    ) -> Req:
        """A FUSED_CMD primary whose CQE goes to ``on_cqe``, open for more secondaries."""
        if self._closing:
            raise RingClosedError("ring is closed")
        req = Req(self, 0, Op.FUSED_CMD, 0)
        req.opdef = OPDEFS[Op.FUSED_CMD]
        req.on_cqe = on_cqe
        if not self._fused_ok or len(cmd) > 80:
            req.err = EINVAL
        resolve_fd(self, req, driver_file, 0)
        prim = Primary(self, req, cmd_op, cmd, True)
        prim.sealed = False
        prim.cmd.buf_dir = buf_dir
        req.fused = prim
        return req

    def _start_private(self, req: Req) -> None:
        if req.err:
            self._fail_unit([req])
        else:
            self._start_unit([req])

    def _private_secondary(
        self,
        op: Op,
        fd: Any,
        at: int,
        nbytes: int,
        offset: int,
        flags: int,
        fut: asyncio.Future[int],
    ) -> Req:
        """A secondary for an open primary; its CQE goes to ``fut``."""
        s = Req(self, 0, op, 0)
        s.opdef = OPDEFS[op]
        s.on_cqe = _future_setter(fut)
        err = resolve_fd(self, s, fd, 0)
        if err or s.driver is not None:
            s.issue_err = err or EINVAL
        elif nbytes < 0 or at < 0:
            s.issue_err = EINVAL
        s.sec_off = at
        s.nbytes = nbytes
        s.offset = offset
        s.rw_flags = flags if type(flags) is int else int(flags)  # socket.MSG_* are IntFlags
        return s

    # ---- init ------------------------------------------------------------------

    def _generic_init(self, req: Req, sqe: Sqe) -> int:
        opdef = OPDEFS.get(sqe.opcode)
        if opdef is None:
            return EINVAL
        req.opdef = opdef
        flags = req.flags
        if flags & ~SQE_VALID_FLAGS:
            return EINVAL
        if flags & _F_SKIP:
            self._skip_seen = True
        if flags & _F_DRAIN and self._skip_seen:
            return EOPNOTSUPP
        if sqe.ioprio and not opdef.ioprio:
            return EINVAL
        if flags & _F_BUFSEL:
            return opdef.buffer_select_err
        return 0

    def _init_req(self, sqe: Sqe) -> Req:
        flags = sqe.flags
        if type(flags) is not int:  # user code may have made it an IntFlag: keep enum math out
            flags = int(flags)
        req = Req(self, sqe.user_data, sqe.opcode, flags)
        opdef = OPDEFS.get(sqe.opcode)
        if opdef is not None and not flags & _INIT_SLOW_FLAGS and not sqe.ioprio:
            # the common case: known opcode, no flag that needs a check
            req.opdef = opdef
            req.opcode = opdef.op
            req.err = opdef.prep(self, req, sqe)
            return req
        err = self._generic_init(req, sqe)
        if not err:
            req.opcode = req.opdef.op
            err = req.opdef.prep(self, req, sqe)
        req.err = err
        return req

    def _prep_primary(self, req: Req, sqe: Sqe, fused: bool) -> int:
        req.fused = Primary(self, req, int(sqe.cmd_op), bytes(sqe.cmd), fused)
        return 0

    def _take_secondaries(self, p: Req, sq: list[Sqe], i: int, n: int) -> int:
        """Consume P's declared secondaries (SPEC F3-F5); return the new SQ index."""
        want = int(getattr(sq[i - 1], "nr_secondary", 0))
        if p.fused is None:  # P failed before its command could be built
            p.fused = Primary(self, p, 0, b"", True)
        prim = p.fused
        take = min(max(want, 0), n - i)
        err = 0 if 1 <= want <= MAX_SECONDARY and take == want else EINVAL
        direction: BufDir | None = None
        for k in range(take):
            sqe = sq[i + k]
            s = Req(self, int(sqe.user_data), int(sqe.opcode), int(sqe.flags))
            s.primary = prim
            s.sec_index = k
            prim.secondaries.append(s)
            if err or p.err:
                continue
            e = self._generic_init(s, sqe)
            opdef = s.opdef
            if e or not opdef.fused_secondary or s.flags & _SECONDARY_FORBIDDEN:
                err = EINVAL
                continue
            s.opcode = opdef.op
            if opdef.prep(self, s, sqe):
                err = EINVAL
                continue
            if direction is None:
                direction = opdef.buf_dir
            elif direction != opdef.buf_dir:
                err = EINVAL
        if not p.err:
            p.err = err
        prim.cmd.buf_dir = direction
        return i + take

    def _fixed_driver(self, index: int) -> Driver | None:
        if 0 <= index < len(self._files):
            return self._files[index]
        return None

    # ---- units, drain ----------------------------------------------------------

    @staticmethod
    def _link_unit(reqs: list[Req]) -> int:
        """Wire ``link``/``lt`` pointers; return the number of requests (with secondaries)."""
        prev: Req | None = None
        count = 0
        for r in reqs:
            count += 1
            if r.fused is not None:
                count += len(r.fused.secondaries)
            if r.opcode == _OP_LINK_TIMEOUT and prev is not None and r.lt_target is None:
                prev.lt = r
                r.lt_target = prev
                continue
            if prev is not None:
                prev.link = r
            prev = r
        return count

    def _start_unit(self, reqs: list[Req]) -> None:
        if len(reqs) == 1:  # fast path: a standalone request
            r = reqs[0]
            count = 1 if r.fused is None else 1 + len(r.fused.secondaries)
            drain = bool(r.flags & _F_DRAIN)
        else:
            count = self._link_unit(reqs)
            drain = any(r.flags & _F_DRAIN for r in reqs)
        if self._deferred or self._barrier or (drain and self._live):
            self._deferred.append((reqs, count, drain))
            return
        self._release_unit(reqs, count, drain)

    def _release_unit(self, reqs: list[Req], count: int, drain: bool) -> None:
        self._live += count
        if drain:
            self._barrier = True
        self._issue(reqs[0])

    def _release_deferred(self) -> None:
        while self._deferred and not self._barrier:
            reqs, count, drain = self._deferred[0]
            if drain and self._live:
                return
            self._deferred.popleft()
            self._release_unit(reqs, count, drain)

    def _fail_unit(self, reqs: list[Req]) -> None:
        """A chain (or standalone request) with an init error (SPEC L3, F-rules)."""
        self._live += self._link_unit(reqs)
        self._fail_chain_not_issued(reqs[0], ECANCELED)

    def _fail_chain_not_issued(self, head: Req, head_res: int) -> None:
        """Complete a chain that never started: its head, then (through the links) the
        rest.  A submission failure severs even an IO_HARDLINK (io_queue_sqe_fallback)."""
        head.err = head.err or head_res
        if head.fused is not None:
            head.fused.fail_unissued(head.err)
        else:
            self._complete(head, head.err)

    # ---- issue -----------------------------------------------------------------

    def _issue(self, req: Req) -> None:
        self._ready.append(req)
        if not self._issuing:
            self._run_ready()

    def _run_ready(self) -> None:
        self._issuing = True
        ready = self._ready
        try:
            while ready:
                req = ready.popleft()
                if req.state != PENDING:
                    continue
                req.state = INFLIGHT
                self._inflight[req] = None
                if self._closing and req.primary is None:
                    req.err = ECANCELED
                    if req.fused is not None:
                        req.fused.fail_unissued(ECANCELED)
                    else:
                        self._complete(req, ECANCELED)
                    continue
                lt = req.lt
                if lt is not None:
                    lt.state = INFLIGHT
                    self._inflight[lt] = None
                    lt.timer = self.loop.call_later(lt.seconds, self._link_timeout_fired, lt)
                try:
                    req.opdef.issue(self, req)
                except Exception:
                    log.exception("issue_failed", op=req.opcode, user_data=req.user_data)
                    if req.state == INFLIGHT:
                        self._complete(req, EIO)
        finally:
            self._issuing = False

    def _issue_io(self, req: Req) -> None:
        if req.issue_err:
            self._complete(req, req.issue_err)
            return
        if req.fd < 0:
            self._complete(req, EBADF)
            return
        op = req.opcode
        if (op in (_OP_READ_FIXED, _OP_WRITE_FIXED)) and not self._reg_kernel:
            req.opcode = Op.READ if op == _OP_READ_FIXED else Op.WRITE  # same bytes, no table
        backend = self._backend if req.opcode in self._backend_ops else self._fallback
        req.backend = backend
        req.handle = backend.start(req, req)

    def _on_io(self, req: Req, res: int, flags: int) -> None:
        state = req.state
        if (
            state == INFLIGHT
            and req.link is None
            and req.lt is None
            and req.on_cqe is None
            and not flags
        ):
            # Fast path: a plain op or a fused secondary with nothing linked, whose CQE
            # goes to the CQ (_finish + _release for exactly this case).
            req.state = RELEASED
            req.res = res
            del self._inflight[req]
            if not (req.flags & _F_SKIP) or req.failed_res:
                self._post_cqe(req.user_data, res, 0)
            buf = req.buf
            if buf is not None:
                req.buf = None
                view_release(buf)
            req.file = req.handle = req.backend = None
            self._live -= 1
            prim = req.primary
            if prim is not None:
                req.primary = None
                prim.secondary_released(req)
            if self._live == 0 or self._deferred:
                self._after_release()
            return
        if state >= RELEASED:
            log.error("late_completion", op=req.opcode, user_data=req.user_data)
            return
        if req.opcode == _OP_SEND_ZC:
            if flags & _CQE_NOTIF:
                self._post(req, 0, _CQE_NOTIF)
                self._release(req)
            else:
                self._finish(req, res, _CQE_MORE)
            return
        self._complete(req, res)

    # ---- timeouts and cancellation -------------------------------------------------

    def _arm_timeout(self, req: Req) -> None:
        req.timer = self.loop.call_later(req.seconds, self._timeout_fired, req)
        if req.offset:
            target = self._cqe_seq + req.offset
            heapq.heappush(self._count_timeouts, (target, next(self._tseq), req))

    def _timeout_fired(self, req: Req) -> None:
        req.timer = None
        if req.state == INFLIGHT:
            self._complete(req, ETIME)

    def _link_timeout_fired(self, lt: Req) -> None:
        lt.timer = None
        target = lt.lt_target
        if lt.state != INFLIGHT or target is None:
            return
        if target.state != INFLIGHT:
            return
        lt.fired = True  # the cancel's answer completes it, not the target's completion

        def cancelled(res: int) -> None:
            if lt.state == INFLIGHT:
                self._complete(lt, res or ETIME)

        self._cancel_req(target, cancelled)

    def _disarm_link_timeout(self, req: Req) -> None:
        lt = req.lt
        if lt is None or lt.state >= FINISHED or lt.fired:
            return
        if lt.timer is not None:
            lt.timer.cancel()
            lt.timer = None
        self._complete(lt, ECANCELED)

    def _async_cancel(self, req: Req) -> None:
        targets = [
            r
            for r in self._inflight
            if r.user_data == req.target
            and r is not req
            and r.state == INFLIGHT
            and r.on_cqe is None
            and r.opcode not in (Op.ASYNC_CANCEL, Op.LINK_TIMEOUT)
        ]
        if not targets:
            self._complete(req, ENOENT)
            return
        if not req.rw_flags & ASYNC_CANCEL_ALL:
            targets = targets[:1]
        pending = len(targets)
        results: list[int] = []

        def one(res: int) -> None:
            nonlocal pending
            results.append(res)
            pending -= 1
            if pending == 0 and req.state == INFLIGHT:
                if req.rw_flags & ASYNC_CANCEL_ALL:
                    ok = sum(1 for r in results if r == 0)
                    self._complete(req, ok if ok else results[0])
                else:
                    self._complete(req, results[0])

        for t in targets:
            self._cancel_req(t, one)

    def _cancel_req(self, req: Req, on_result: Callable[[int], None]) -> None:
        """Request cancellation of an issued request; ``on_result`` gets 0/-EALREADY/-ENOENT."""
        if req.state != INFLIGHT:
            on_result(ENOENT)
            return
        if req.fused is not None:
            req.fused.cancel(on_result)
        elif req.opcode == _OP_TIMEOUT:
            if req.timer is not None:
                req.timer.cancel()
                req.timer = None
            self._complete(req, ECANCELED)
            on_result(0)
        elif req.backend is not None and req.handle is not None:
            req.backend.cancel(req.handle, on_result)  # type: ignore[arg-type]
        else:
            on_result(EALREADY)

    # ---- completion ------------------------------------------------------------

    def _post(self, req: Req, res: int, flags: int) -> None:
        on_cqe = req.on_cqe
        if on_cqe is not None:
            on_cqe(res, flags)
            return
        if req.opcode != _OP_TIMEOUT:
            self._post_cqe(req.user_data, res, flags)
            return
        cq = self._cq  # a TIMEOUT's own CQE does not count for other timeouts
        cq.append(Cqe(req.user_data, res, flags))
        if len(cq) > self.cq_entries:
            self.cq_overflow += 1
        if self._waiters:
            self._wake()

    def _post_cqe(self, user_data: int, res: int, flags: int) -> None:
        """Append a CQE of a non-TIMEOUT request to the CQ."""
        cq = self._cq
        cq.append(_tuple_new(Cqe, (user_data, res, flags)))  # Cqe(...) without its __new__
        if len(cq) > self.cq_entries:
            self.cq_overflow += 1
        self._cqe_seq += 1
        if self._count_timeouts:
            self._flush_count_timeouts()
        if self._waiters:
            self._wake()

    def _flush_count_timeouts(self) -> None:
        heap = self._count_timeouts
        while heap and heap[0][0] <= self._cqe_seq:
            _, _, t = heapq.heappop(heap)
            if t.state == INFLIGHT:
                if t.timer is not None:
                    t.timer.cancel()
                    t.timer = None
                self._complete(t, 0)

    def _wake(self) -> None:
        waiters = self._waiters
        have = len(self._cq)
        if len(waiters) == 1:  # the common case: one reaper
            n, fut = waiters[0]
            if fut.done():
                waiters.clear()
            elif have >= n:
                fut.set_result(None)
                waiters.clear()
            return
        keep = []
        for n, fut in waiters:
            if fut.done():
                continue
            if have >= n:
                fut.set_result(None)
            else:
                keep.append((n, fut))
        self._waiters = keep

    def _park(self, n: int) -> asyncio.Future[None]:
        """A future that completes once ``n`` CQEs are in the CQ (the caller re-checks)."""
        if self._closed:
            raise RingClosedError("ring is closed")
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append((n, fut))
        return fut

    def _complete(self, req: Req, res: int) -> None:
        """Final completion: CQE, links, release."""
        self._finish(req, res, 0)
        self._release(req)

    def _finish(self, req: Req, res: int, flags: int) -> None:
        """Post the request's CQE and advance (or fail) its chain."""
        if req.state >= FINISHED:
            return
        req.state = FINISHED
        req.res = res
        self._inflight.pop(req, None)
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        failed = req.failed_res
        skip = bool(req.flags & _F_SKIP)
        if not (skip and not failed):
            self._post(req, res, flags)
        if req.lt is not None:
            self._disarm_link_timeout(req)
        nxt = req.link
        if nxt is None:
            return
        req.link = None
        if failed and not (req.flags & _F_HARDLINK and not req.err):
            self._fail_links(nxt, skip_cqes=skip)
        else:
            self._issue(nxt)

    def _fail_links(self, first: Req | None, skip_cqes: bool) -> None:
        """Complete the unstarted rest of a chain with -ECANCELED (SPEC L2, L4)."""
        m = first
        while m is not None:
            nxt = m.link
            m.link = None
            if skip_cqes:
                m.on_cqe = _drop_cqe
            self._fail_one(m, m.err or ECANCELED, skip_cqes)
            if m.lt is not None:
                lt = m.lt
                if skip_cqes:
                    lt.on_cqe = _drop_cqe
                self._fail_one(lt, lt.err or ECANCELED, skip_cqes)
            m = nxt

    def _fail_one(self, m: Req, res: int, skip_cqes: bool) -> None:
        if m.state >= FINISHED:
            return
        if m.fused is not None:
            m.fused.fail_unissued(res, drop_cqes=skip_cqes)
            return
        m.state = FINISHED
        m.res = res
        self._post(m, res, 0)
        self._release(m)

    def _release(self, req: Req) -> None:
        """Drop what the request holds; it no longer counts as in flight."""
        if req.state >= RELEASED:
            return
        req.state = RELEASED
        self._inflight.pop(req, None)
        buf = req.buf
        if buf is not None:
            req.buf = None
            view_release(buf)
        if req.backend is not None:
            req.file = None
            req.handle = None
            req.backend = None
        self._live -= 1
        # Break the request's reference cycles now, so that refcounting frees it (the
        # cyclic GC never has to): primary <-> secondaries, primary <-> command,
        # request <-> the callback owner.
        req.on_cqe = None
        fused = req.fused
        if fused is not None:
            req.fused = None
            fused.cmd._owner = None
            fused.on_lent = None
        prim = req.primary
        if prim is not None:
            req.primary = None
            prim.secondary_released(req)
        self._after_release()

    def _after_release(self) -> None:
        if self._live == 0:
            self._barrier = False
            if self._idle:
                for fut in self._idle:
                    if not fut.done():
                        fut.set_result(None)
                self._idle.clear()
        if self._deferred and not self._barrier:
            self._release_deferred()


def _fused_scope_class() -> type[FusedScope]:
    """``FusedScope`` (its module imports this one: bound on first use, then cached)."""
    global _scope_cls
    if _scope_cls is None:
        from aiofused._lease import FusedScope

        _scope_cls = FusedScope
    return _scope_cls


_scope_cls: type[FusedScope] | None = None


def _future_setter(fut: asyncio.Future[int]) -> Callable[[int, int], None]:
    def on_cqe(res: int, flags: int) -> None:
        if not fut.done():
            fut.set_result(res)

    return on_cqe


def _drop_cqe(res: int, flags: int) -> None:
    """``on_cqe`` of a request whose CQE is hidden (a failed SKIP request ahead, SPEC L4)."""
