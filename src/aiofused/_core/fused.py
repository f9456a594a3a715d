"""The fused lifecycle: URING_CMD and FUSED_CMD primaries, their secondaries, the lend.

Theory of operation
-------------------
A primary is an ordinary request record (its driver sees it as ``UringCmd``) whose
``fstate`` moves only along ``FUSED_EDGES`` (:mod:`aiofused._core.records`):

* PREPARED: consumed, secondaries attached, not yet handed to the driver.
* ISSUED: the driver's ``uring_cmd`` ran and returned ``EIOCBQUEUED``.  Completing from
  here (inline result, ``done`` without lending, forced cancel) cancels every secondary:
  each posts -ECANCELED before the primary's CQE (SPEC F7).
* LENT: ``provide_buf_and_start`` issued every secondary at once on views of the lent
  buffer (SPEC F8-F9); ``outstanding`` counts those not yet released (a SEND_ZC
  secondary is released at its NOTIF).
* RETURNING: the last secondary came back; the driver's callback runs as task work and
  calls ``done``.
* CLOSING: the driver called ``done`` while LENT: the secondaries in flight are
  cancelled, and the primary completes with that result once they all came back.
* DONE: the views were released, then the primary's CQE was posted (SPEC F9, F11).

The lease (the high-level API) drives the same lifecycle through ``private_primary``,
``add_secondary``, ``seal`` and ``cancel_secondaries``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiofused._abi import (
    EALREADY,
    EBADF,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    EIOCBQUEUED,
    EOPNOTSUPP,
    MAX_SECONDARY,
    BufDir,
    IssueFlag,
    SqeFlag,
)
from aiofused._core.opdef import FIXED_FORM
from aiofused._core.records import FusedInput, FusedState, Req, ReqInput, ReqState, fused_step
from aiofused._errors import DriverError

if TYPE_CHECKING:
    from aiofused._core.port import Port
    from aiofused._core.sqe import Sqe

__all__ = ["FusedCommands"]

_FS: Final = FusedState
_FI: Final = FusedInput
_PREPARED: Final = _FS.PREPARED
_ISSUED: Final = _FS.ISSUED
_LENT: Final = _FS.LENT
_RETURNING: Final = _FS.RETURNING
_CLOSING: Final = _FS.CLOSING
_DONE: Final = _FS.DONE
_DEST: Final = BufDir.DEST
_FLAG_DEST: Final = int(IssueFlag.FUSED_BUF_DEST)
_FLAG_SRC: Final = int(IssueFlag.FUSED_BUF_SRC)
_SECONDARY_FORBIDDEN: Final = int(
    SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK | SqeFlag.IO_DRAIN | SqeFlag.BUFFER_SELECT
)
_INFLIGHT: Final = ReqState.INFLIGHT
#: Lifecycle inputs (module constants: an enum member read through its class costs a
#: metaclass attribute lookup on every command).
_FI_DONE: Final = _FI.DONE
_FI_FAIL: Final = _FI.FAIL
_FI_FORCE_CANCEL: Final = _FI.FORCE_CANCEL
_FI_ISSUE: Final = _FI.ISSUE
_FI_LEND: Final = _FI.LEND
_FI_RETURNED: Final = _FI.RETURNED
_COMPLETE: Final = ReqInput.COMPLETE
_FAIL: Final = ReqInput.FAIL


#: (A module constant: the builtin's name is looked up on every use when compiled.)
_MEMORYVIEW: Final = memoryview


def _ignore(res: int) -> None:
    pass


class FusedCommands:
    """The fused half of :class:`~aiofused._core.ring.RingCore` (a mixin over the same state)."""

    # What the mixin uses of RingCore: its state, and the methods RingCore defines.
    port: Port
    views: int
    lent: int
    live: int
    reg_pool: object
    closing: bool

    def issue(self, req: Req) -> None:
        raise NotImplementedError

    def finish(
        self, req: Req, res: int, inp: ReqInput, flags: int = 0, drop_cqe: bool = False
    ) -> None:
        raise NotImplementedError

    def fail_one(self, m: Req, res: int, drop_cqe: bool) -> None:
        raise NotImplementedError

    def cancel_req(self, req: Req, on_result: Callable[[int], None]) -> None:
        raise NotImplementedError

    def release_view(self, view: memoryview) -> bool:
        raise NotImplementedError

    def consume(
        self, sqe: Sqe, after: Req | None = None, primary: Req | None = None, index: int = -1
    ) -> Req:
        raise NotImplementedError

    def queue_task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        raise NotImplementedError

    def queue_lend_callback(self, p: Req) -> None:
        raise NotImplementedError

    # ---- effects: one call each, forwarded to the port -------------------------------
    # The core reaches its port only through these.  The runtime (aiofused.Ring) is its
    # own port and overrides every one, so on the compiled twin an effect is a native
    # method call, not a call through the Port protocol; a core built over another port
    # (the core tests' recording one) forwards to it.

    def start_io(self, req: Req) -> None:
        """Begin leaf op ``req`` (:meth:`Port.start_io`)."""
        self.port.start_io(req)

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        """Cancel ops started as is (:meth:`Port.cancel_direct`)."""
        return self.port.cancel_direct(user_data, every, on_result)

    def cancel_io(self, req: Req, on_result: Callable[[int], None]) -> None:
        """Ask the backend to cancel ``req`` (:meth:`Port.cancel_io`)."""
        self.port.cancel_io(req, on_result)

    def call_driver(self, req: Req, issue_flags: int) -> int:
        """Run the driver's ``uring_cmd`` (:meth:`Port.call_driver`)."""
        return self.port.call_driver(req, issue_flags)

    def task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` soon (:meth:`Port.task_work`)."""
        self.port.task_work(fn, arg)

    def arm_timer(self, seconds: float, fn: Callable[[Req], None], req: Req) -> object:
        """Call ``fn(req)`` after ``seconds`` (:meth:`Port.arm_timer`)."""
        return self.port.arm_timer(seconds, fn, req)

    def disarm_timer(self, handle: object) -> None:
        """Cancel a timer (:meth:`Port.disarm_timer`)."""
        self.port.disarm_timer(handle)

    def wake(self) -> None:
        """CQEs were posted while someone waits (:meth:`Port.wake`)."""
        self.port.wake()

    def idle(self) -> None:
        """Nothing is in flight any more (:meth:`Port.idle`)."""
        self.port.idle()

    def fd_is_open(self, fd: int) -> bool:
        """Whether ``fd`` is open (:meth:`Port.fd_is_open`)."""
        return self.port.fd_is_open(fd)

    def log_error(self, event: str, exc: bool = False, **fields: Any) -> None:
        """Log an error (:meth:`Port.log_error`)."""
        self.port.log_error(event, exc, **fields)

    # ---- building a primary ----------------------------------------------------------

    def init_command(self, req: Req, cmd_op: int, cmd: bytes, fused: bool) -> None:
        """Make ``req`` a command (URING_CMD or, with ``fused``, FUSED_CMD)."""
        req.command = True
        req.fstate = _PREPARED
        req.cmd_op = cmd_op
        req.cmd = cmd
        req.is_fused = fused
        req.buf_dir = None
        req.cancelled = False
        req.outstanding = 0
        req.sealed = True
        req.early_res = 0
        req.fixed_index = -1
        if req.secondaries:
            req.secondaries.clear()

    def take_secondaries(self, p: Req, sq: list[Sqe], i: int, n: int, want: int) -> int:
        """Consume P's declared secondaries (SPEC F3-F5); return the new SQ index."""
        take = min(max(want, 0), n - i)
        err = 0 if 1 <= want <= MAX_SECONDARY and take == want else EINVAL
        direction: BufDir | None = None
        secondaries = p.secondaries
        for k in range(take):
            s = self.consume(sq[i + k], None, p, k)
            secondaries.append(s)
            if err or p.err:
                continue
            opdef = s.opdef
            if (
                s.err
                or opdef is None
                or not opdef.fused_secondary
                or s.flags & _SECONDARY_FORBIDDEN
            ):
                err = EINVAL
            elif direction is None:
                direction = opdef.buf_dir
            elif direction != opdef.buf_dir:
                err = EINVAL
        if not p.err:
            p.err = err
        p.buf_dir = direction
        return i + take

    # ---- issue -----------------------------------------------------------------------

    def _driver_check(self, p: Req) -> int:
        """SPEC F6: 0 if ``p.driver`` takes this command, else the errno."""
        driver = p.driver
        if driver is not None:
            return EOPNOTSUPP if p.is_fused and not driver.can_fused else 0
        if p.fd < 0 or not self.fd_is_open(p.fd):
            return EBADF
        return EOPNOTSUPP  # an open fd that is not a driver has no uring_cmd

    def issue_command(self, p: Req) -> None:
        """Run the driver's ``uring_cmd`` (SPEC F6-F7)."""
        err = self._driver_check(p)
        fused_step(p, _FI_ISSUE)
        if err:
            self._finish_unlent(p, err)
            return
        flags = 0
        if p.is_fused:
            flags = _FLAG_DEST if p.buf_dir is _DEST else _FLAG_SRC
        ret = self.call_driver(p, flags)
        if ret == EIOCBQUEUED or p.fstate is _DONE:
            return
        self.cmd_done(p, ret)

    def fail_unissued_command(self, p: Req, res: int, drop_cqes: bool = False) -> None:
        """Fail a primary that never reached its driver: secondaries first (SPEC F-rules)."""
        if p.fstate is not _PREPARED:
            return
        fused_step(p, _FI_FAIL)
        for s in p.secondaries:
            if s is not None:
                self.fail_one(s, ECANCELED, drop_cqes)
        self.finish(p, res, _FAIL, drop_cqe=drop_cqes)

    def cancel_command(self, p: Req, on_result: Callable[[int], None]) -> None:
        """ASYNC_CANCEL or ring close on this primary (SPEC F12)."""
        state = p.fstate
        if state is _ISSUED:
            p.cancelled = True
            hook = p.cancel_hook
            if hook is not None:
                try:
                    hook(p)
                except Exception:
                    self.log_error("cancel_hook_raised", exc=True, cmd_op=p.cmd_op)
                    if p.fstate is not _DONE:
                        self.cmd_done(p, EIO)
                on_result(0)
                return
            fused_step(p, _FI_FORCE_CANCEL)
            self._cancel_unissued(p)
            self.finish(p, ECANCELED, _COMPLETE)
            on_result(0)
        elif state is _LENT:
            p.cancelled = True
            self._cancel_inflight(p)
            if self.closing:
                self.seal(p)  # no more secondaries can come: an open primary ends too
            on_result(0)
        else:
            on_result(EALREADY)

    def secondary_released(self, p: Req, s: Req) -> None:
        """A secondary finally completed (for SEND_ZC: its NOTIF came)."""
        index = s.sec_index
        if index < 0:
            return
        secondaries = p.secondaries
        if index < len(secondaries):
            secondaries[index] = None  # the record may be reused at once
        if p.fstate is not _LENT and p.fstate is not _CLOSING:
            return
        p.secondary_results[index] = s.res
        p.outstanding -= 1
        if not p.outstanding and p.sealed:
            self._returned(p)

    # ---- driver API (UringCmd) -------------------------------------------------------

    def lend(self, p: Req, buf: Any, callback: Callable[[Req], None]) -> None:
        """``provide_buf_and_start``: lend ``buf``, issue every secondary at once."""
        if not p.is_fused:
            raise DriverError("provide_buf_and_start() on a plain URING_CMD")
        if p.fstate is not _ISSUED:
            if p.fstate is _DONE:
                raise DriverError("cannot lend a buffer: the command already completed")
            raise DriverError(f"cannot lend a buffer in state {p.fstate.name.lower()}")
        mv = self._lendable(p, buf)
        self.views += 1
        self.lent += 1
        p.base = mv
        p.callback = callback
        fused_step(p, _FI_LEND)
        secondaries = p.secondaries
        p.secondary_results = [0] * len(secondaries)
        p.outstanding = len(secondaries)
        for s in secondaries:
            if s is not None:
                self._launch(p, s)
        on_lent = p.on_lent
        if on_lent is not None:
            p.on_lent = None
            on_lent(p, len(mv))
        if not p.outstanding and p.sealed:
            self._returned(p)

    def _lendable(self, p: Req, buf: Any) -> memoryview:
        """The core's own flat byte view of ``buf`` for lending (DriverError if unfit)."""
        kind = type(buf)
        # (A bytearray or memoryview is never a pool's buffer: skip the failing lookup.)
        if kind is not bytearray and kind is not _MEMORYVIEW:
            view = getattr(buf, "view", None)
            if type(view) is _MEMORYVIEW and hasattr(buf, "pool"):  # a BufferPool's buffer
                if buf.pool is self.reg_pool:
                    p.fixed_index = buf.index  # registered: the secondaries become fixed ops
                buf = view
        mv = _MEMORYVIEW(buf)
        if kind is bytearray:
            return mv  # flat, contiguous and writable by construction
        if not mv.c_contiguous:
            mv.release()
            raise DriverError("a lent buffer must be C-contiguous")
        if mv.ndim != 1 or mv.format != "B":
            flat = mv.cast("B")
            mv.release()
            mv = flat
        # SRC: every secondary only reads (F5 keeps DEST ops out), so its views may stay
        # writable if the buffer is (the kernel backend then pins them as cheaply as any
        # buffer); what the lease hands to user code is read-only (lease_view).
        if p.buf_dir is _DEST and mv.readonly:
            mv.release()
            raise DriverError("secondaries write into this buffer (DEST): it must be writable")
        return mv

    def cmd_done(self, p: Req, res: Any) -> None:
        """``io_uring_cmd_done``: post the primary's result (SPEC F9-F10)."""
        if type(res) is not int:
            if isinstance(res, bool) or not isinstance(res, int):
                self.log_error("driver_bad_result", result=repr(res))
                res = EIO
            res = int(res)
        state = p.fstate
        if state is _RETURNING:
            fused_step(p, _FI_DONE)
            self._release_views(p)
            self.finish(p, res, _COMPLETE)
        elif state is _ISSUED:
            self._finish_unlent(p, res)
        elif state is _LENT:
            fused_step(p, _FI_DONE)
            p.early_res = res
            p.sealed = True
            self._cancel_inflight(p)
            if not p.outstanding:
                self._returned(p)
        elif state is not _DONE:
            fused_step(p, _FI_DONE)  # raises: no edge (PREPARED, CLOSING)

    def run_callback(self, p: Req) -> None:
        """Task work: the driver's lend callback, once every secondary came back."""
        callback = p.callback
        p.callback = None
        try:
            if callback is not None:
                callback(p)
        except Exception:
            self.log_error("fused_callback_raised", exc=True, cmd_op=p.cmd_op)
            if p.fstate is _RETURNING:
                self.cmd_done(p, EIO)

    # ---- the lease's primitives ------------------------------------------------------

    def lease_view(self, p: Req) -> memoryview:
        """A view of the lent buffer for the lease, released with the others."""
        base = p.base
        if base is None:
            raise DriverError("nothing is lent")
        view = base[:] if p.buf_dir is _DEST else base.toreadonly()
        self.views += 1
        p.extra_views.append(view)
        return view

    def add_secondary(self, p: Req, s: Req) -> None:
        """Start one more secondary on an open (high-level) primary."""
        if p.fstate is not _LENT or p.sealed:
            raise DriverError(f"no secondary can start in state {p.fstate.name.lower()}")
        s.primary = p
        s.sec_index = len(p.secondary_results)
        p.secondary_results.append(0)
        p.secondaries.append(s)
        self.live += 1
        p.outstanding += 1
        self._launch(p, s)

    def seal(self, p: Req) -> None:
        """No more secondaries: complete once the running ones came back."""
        p.sealed = True
        if not p.outstanding:
            self._returned(p)

    def cancel_secondaries(self, p: Req) -> None:
        """Cancel every secondary still in flight (scope exit with an exception)."""
        if p.fstate is _LENT or p.fstate is _CLOSING:
            p.cancelled = True
            self._cancel_inflight(p)

    # ---- internals -------------------------------------------------------------------

    def _launch(self, p: Req, s: Req) -> None:
        if p.cancelled:
            s.issue_err = ECANCELED
        elif not s.issue_err:
            base = p.base
            assert base is not None
            off, n = s.sec_off, s.nbytes
            size = len(base)
            if off < 0 or off > size or n > size - off:
                s.issue_err = EFAULT  # SPEC F8
            else:
                if off == 0 and n == size:
                    s.buf = base  # the whole buffer: the lend's own view (released with it)
                else:
                    s.buf = base[off : off + n]
                    self.views += 1
                if p.fixed_index >= 0 and s.opcode in FIXED_FORM:
                    s.buf_index = p.fixed_index
                    s.opcode = FIXED_FORM[s.opcode]
        self.issue(s)

    def _cancel_inflight(self, p: Req) -> None:
        for s in p.secondaries:
            if s is not None and s.state is _INFLIGHT:
                self.cancel_req(s, _ignore)

    def _cancel_unissued(self, p: Req) -> None:
        for s in p.secondaries:
            if s is not None:
                self.fail_one(s, ECANCELED, False)

    def _finish_unlent(self, p: Req, res: int) -> None:
        fused_step(p, _FI_DONE)
        self._cancel_unissued(p)
        self.finish(p, res, _COMPLETE)

    def _returned(self, p: Req) -> None:
        if p.fstate is _LENT:
            fused_step(p, _FI_RETURNED)
            self.queue_lend_callback(p)
        elif p.fstate is _CLOSING:
            fused_step(p, _FI_RETURNED)
            self._release_views(p)
            self.finish(p, p.early_res, _COMPLETE)

    def _release_views(self, p: Req) -> None:
        extra = p.extra_views
        if extra:
            for view in extra:
                self.release_view(view)
            extra.clear()
        base = p.base
        if base is not None:
            p.base = None
            self.release_view(base)
            self.lent -= 1
