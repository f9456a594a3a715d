"""The fused coordinator: one :class:`Primary` per URING_CMD or FUSED_CMD request.

Theory of operation
-------------------
A primary moves through the states of ``TRANSITIONS`` and nothing else (a missing
edge raises :class:`~aiofused.DriverError`)::

    PREPARED --issue--> ISSUED --lend--> LENT --returned--> RETURNING --done--> DONE
        |                 |  \\--done / force_cancel--> DONE
        |                 |                     LENT --done--> CLOSING --returned--> DONE
        \\--fail--> DONE

* PREPARED: consumed, secondaries attached, not yet handed to the driver.
* ISSUED: the driver's ``uring_cmd`` ran and returned ``EIOCBQUEUED``.  Completing
  from here (inline result, driver ``done`` without lending, forced cancel) cancels
  every secondary: each posts -ECANCELED before the primary's CQE (SPEC F7).
* LENT: ``provide_buf_and_start`` issued every secondary at once on views of the
  lent buffer (SPEC F8-F9).  ``outstanding`` counts secondaries not yet released
  (a SEND_ZC secondary is released at its NOTIF).
* RETURNING: the last secondary came back; the driver's callback runs as task work
  (``loop.call_soon``) and calls ``done``.
* DONE: the views were released, then the primary's CQE was posted (SPEC F9, F11).

A driver calling ``done`` while LENT moves to CLOSING: the secondaries in flight are
cancelled, and the primary completes with that result once they all came back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiofused._buffers import PoolBuffer
from aiofused._driver import IssueFlag, UringCmd
from aiofused._errors import DriverError
from aiofused._log import get_logger
from aiofused._opdef import check_driver_fd
from aiofused._uapi import EALREADY, ECANCELED, EFAULT, EIO, EIOCBQUEUED, BufDir, Op
from aiofused._views import lent_changed, view_made, view_release

if TYPE_CHECKING:
    from aiofused._ring import Req, Ring

__all__ = ["TRANSITIONS", "Primary", "State"]

log = get_logger("aiofused.fused")


class State(enum.IntEnum):
    """Lifecycle of a primary (an IntEnum: cheap to hash on the hot path)."""

    PREPARED = 0
    ISSUED = 1
    LENT = 2
    RETURNING = 3
    CLOSING = 4
    DONE = 5


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.PREPARED, "issue"): State.ISSUED,
    (State.PREPARED, "fail"): State.DONE,
    (State.ISSUED, "lend"): State.LENT,
    (State.ISSUED, "done"): State.DONE,
    (State.ISSUED, "force_cancel"): State.DONE,
    (State.LENT, "returned"): State.RETURNING,
    (State.LENT, "done"): State.CLOSING,
    (State.RETURNING, "done"): State.DONE,
    (State.CLOSING, "returned"): State.DONE,
}


# Hot-path aliases: a module global is far cheaper than an enum class attribute.
_PREPARED, _ISSUED, _LENT, _RETURNING, _CLOSING, _DONE = State
_UNLENT_FROM = (_LENT, _RETURNING, _CLOSING)
#: ``TRANSITIONS`` keyed by plain ints (an enum member hashes through Python code).
_EDGES = {(int(a), e): b for (a, e), b in TRANSITIONS.items()}
_DEST = BufDir.DEST
_SRC = BufDir.SRC
_FLAG_DEST = int(IssueFlag.FUSED_BUF_DEST)
_FLAG_SRC = int(IssueFlag.FUSED_BUF_SRC)


class Primary:
    """The coordinator of one URING_CMD / FUSED_CMD request."""

    __slots__ = (
        "_base",
        "_callback",
        "_early_res",
        "_extra_views",
        "_fixed_index",
        "cmd",
        "is_fused",
        "on_lent",
        "outstanding",
        "req",
        "results",
        "ring",
        "sealed",
        "secondaries",
        "state",
    )

    def __init__(self, ring: Ring, req: Req, cmd_op: int, cmd: bytes, is_fused: bool) -> None:
        self.ring = ring
        self.req = req
        self.is_fused = is_fused
        self.cmd = UringCmd(self, cmd_op, cmd, is_fused, None)
        self.secondaries: list[Req] = []
        self.state = _PREPARED
        self.outstanding = 0
        self.sealed = True
        self.results: list[int] = []
        self._base: memoryview | None = None
        self._extra_views: list[memoryview] = []
        self._callback: Callable[[UringCmd], None] | None = None
        self._early_res = 0
        self._fixed_index = -1
        self.on_lent: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<Primary ud={self.req.user_data} {self.state.name.lower()} out={self.outstanding}>"

    # ---- state machine ---------------------------------------------------------

    def _step(self, event: str) -> None:
        try:
            new = _EDGES[(self.state._value_, event)]
        except KeyError:
            raise DriverError(
                f"fused command ud={self.req.user_data}: {event!r} is not allowed "
                f"in state {self.state.name.lower()}"
            ) from None
        if new is _LENT:
            lent_changed(1)
        elif new is _DONE and self.state in _UNLENT_FROM:
            lent_changed(-1)
        self.state = new

    @property
    def finished(self) -> bool:
        """True once the primary's CQE was posted."""
        return self.state is _DONE

    # ---- entry points from the ring --------------------------------------------

    def issue(self) -> None:
        """Run the driver's ``uring_cmd`` (SPEC F6-F7)."""
        req = self.req
        driver, err = check_driver_fd(req, self.is_fused)
        self._step("issue")
        if driver is None:
            self._finish_unlent(err)
            return
        cmd = self.cmd
        cmd.user_data = req.user_data
        flags = 0
        if self.is_fused:
            flags = _FLAG_DEST if cmd.buf_dir is _DEST else _FLAG_SRC
        try:
            ret: Any = driver.uring_cmd(cmd, flags)
        except Exception:
            log.exception("driver_raised", driver=driver.name, cmd_op=cmd.cmd_op)
            ret = EIO
        if ret == EIOCBQUEUED and not isinstance(ret, bool):
            return
        if not isinstance(ret, int) or isinstance(ret, bool):
            log.error("driver_bad_result", driver=driver.name, result=repr(ret))
            ret = EIO
        if self.state is _DONE:
            return
        self.done(int(ret))

    def fail_unissued(self, res: int, drop_cqes: bool = False) -> None:
        """Fail a primary that never reached its driver: secondaries first (SPEC F-rules)."""
        if self.state is not _PREPARED:
            return
        self._step("fail")
        for s in self.secondaries:
            self.ring._fail_one(s, ECANCELED, drop_cqes)
        self.ring._complete(self.req, res)

    def cancel(self, on_result: Callable[[int], None]) -> None:
        """ASYNC_CANCEL or ring close on this primary (SPEC F12)."""
        state = self.state
        cmd = self.cmd
        if state is _ISSUED:
            cmd.cancelled = True
            hook = cmd.cancel_hook
            if hook is not None:
                try:
                    hook(cmd)
                except Exception:
                    log.exception("cancel_hook_raised", cmd_op=cmd.cmd_op)
                    if not self.finished:
                        self.done(EIO)
                on_result(0)
                return
            self._step("force_cancel")
            self._cancel_unissued()
            self.ring._complete(self.req, ECANCELED)
            on_result(0)
        elif state is _LENT:
            cmd.cancelled = True
            self._cancel_inflight()
            on_result(0)
        else:
            on_result(EALREADY)

    def secondary_released(self, s: Req) -> None:
        """A secondary finally completed (for SEND_ZC: its NOTIF came)."""
        if self.state not in (_LENT, _CLOSING) or s.sec_index < 0:
            return
        self.results[s.sec_index] = s.res
        self.outstanding -= 1
        self._maybe_returned()

    # ---- driver API (through UringCmd) ---------------------------------------------

    def lend(self, buf: Any, callback: Callable[[UringCmd], None]) -> None:
        """``provide_buf_and_start``: lend ``buf``, issue every secondary at once."""
        if not self.is_fused:
            raise DriverError("provide_buf_and_start() on a plain URING_CMD")
        if self.state is not _ISSUED:
            raise DriverError(f"cannot lend a buffer in state {self.state.name.lower()}")
        if isinstance(buf, PoolBuffer):
            if buf.pool is self.ring._reg_pool:
                self._fixed_index = buf.index  # secondaries become fixed ops
            buf = buf.view
        mv = memoryview(buf)
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
        if self.cmd.buf_dir is _DEST and mv.readonly:
            mv.release()
            raise DriverError("secondaries write into this buffer (DEST): it must be writable")
        view_made()
        self._base = mv
        self._callback = callback
        self._step("lend")
        self.results = [0] * len(self.secondaries)
        self.outstanding = len(self.secondaries)
        for s in self.secondaries:
            self._launch(s)
        on_lent = self.on_lent
        if on_lent is not None:
            self.on_lent = None
            on_lent()
        self._maybe_returned()

    def done(self, res: int, res2: int = 0) -> None:
        """``io_uring_cmd_done``: post the primary's result (SPEC F9-F10)."""
        state = self.state
        if state is _DONE:
            log.debug("done_after_completion", user_data=self.req.user_data, res=res)
            return
        if state is _ISSUED:
            self._finish_unlent(res)
        elif state is _RETURNING:
            self._step("done")
            self._release_views()
            self.ring._complete(self.req, res)
        elif state is _LENT:
            self._step("done")
            self._early_res = res
            self.sealed = True
            self._cancel_inflight()
            self._maybe_returned()
        else:
            raise DriverError(f"done() is not allowed in state {state.name.lower()}")

    # ---- high-level lease support --------------------------------------------------

    def lease_view(self) -> memoryview:
        """A view of the lent buffer for the high-level lease, released with the others."""
        assert self._base is not None
        view = self._base[:] if self.cmd.buf_dir is _DEST else self._base.toreadonly()
        view_made()
        self._extra_views.append(view)
        return view

    def add_secondary(self, s: Req) -> None:
        """Start one more secondary on an open (high-level) primary."""
        if self.state is not _LENT or self.sealed:
            raise DriverError(f"no secondary can start in state {self.state.name.lower()}")
        s.primary = self
        s.sec_index = len(self.results)
        self.results.append(0)
        self.secondaries.append(s)
        self.ring._live += 1
        self.outstanding += 1
        self._launch(s)

    def seal(self) -> None:
        """No more secondaries: complete once the running ones came back."""
        self.sealed = True
        self._maybe_returned()

    def cancel_secondaries(self) -> None:
        """Cancel every secondary still in flight (scope exit with an exception)."""
        if self.state in (_LENT, _CLOSING):
            self.cmd.cancelled = True
            self._cancel_inflight()

    # ---- internals -----------------------------------------------------------------

    def _launch(self, s: Req) -> None:
        base = self._base
        assert base is not None
        if self.cmd.cancelled:
            s.issue_err = ECANCELED
        elif not s.issue_err:
            off, n = s.sec_off, s.nbytes
            if off < 0 or off > len(base) or n > len(base) - off:
                s.issue_err = EFAULT  # SPEC F8
            else:
                s.buf = base[off : off + n]
                view_made()
                if self._fixed_index >= 0 and s.opcode in _FIXED_FORM:
                    s.buf_index = self._fixed_index
                    s.opcode = _FIXED_FORM[s.opcode]
        self.ring._issue(s)

    def _cancel_inflight(self) -> None:
        ring = self.ring
        for s in self.secondaries:
            if s.state == 1:  # INFLIGHT
                ring._cancel_req(s, _ignore)

    def _cancel_unissued(self) -> None:
        for s in self.secondaries:
            self.ring._fail_one(s, ECANCELED, False)

    def _finish_unlent(self, res: int) -> None:
        self._step("done")
        self._cancel_unissued()
        self.ring._complete(self.req, res)

    def _maybe_returned(self) -> None:
        if self.outstanding or not self.sealed:
            return
        if self.state is _LENT:
            self._step("returned")
            self.ring.loop.call_soon(self._run_callback)
        elif self.state is _CLOSING:
            self._step("returned")
            self._release_views()
            self.ring._complete(self.req, self._early_res)

    def _run_callback(self) -> None:
        cmd = self.cmd
        cmd.secondary_results = list(self.results)
        callback = self._callback
        self._callback = None
        try:
            assert callback is not None
            callback(cmd)
        except Exception:
            log.exception("fused_callback_raised", cmd_op=cmd.cmd_op)
            if self.state is _RETURNING:
                self.done(EIO)

    def _release_views(self) -> None:
        for view in self._extra_views:
            view_release(view)
        self._extra_views.clear()
        if self._base is not None:
            view_release(self._base)
            self._base = None


_FIXED_FORM = {Op.READ: Op.READ_FIXED, Op.WRITE: Op.WRITE_FIXED}


def _ignore(res: int) -> None:
    pass
