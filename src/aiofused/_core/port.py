"""The port: the effects the pure core asks its runtime to carry out.

The core changes its own state first and then makes one port call per effect (httpcore's
rule: mutate, then do the I/O), passing records and plain ints only, so an effect
allocates nothing.  The runtime (:class:`aiofused.Ring`) is the real port: it is its own
port and overrides the core's effect methods of the same names, so the compiled core
calls it natively; core tests use a recording port (the core's effect methods forward
to it) and feed completions back by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiofused._core.records import Req
from aiofused._core.sqe import Sqe

__all__ = ["Port"]


class Port(Protocol):
    """What the core needs from the world."""

    def start_io(self, req: Req) -> None:
        """Begin leaf op ``req`` on a backend, setting ``req.backend`` and ``req.handle``
        (what :meth:`cancel_io` needs); report with ``core.io_done(req, res, flags)`` or a
        batch through ``core.io_batch`` later, never from inside this call."""

    #: ``start_direct(sqe)``: run standalone flagless ``sqe`` (a
    #: :data:`~aiofused._core.opdef.DIRECT_OPS` op) as is, with no record, if the backend
    #: can; False leaves it to the core.  Its completion comes through ``core.io_batch``
    #: as ``(user_data, res, flags)``, never from inside this call.  (An attribute: the
    #: runtime binds its backend's method, one call less per op.)
    start_direct: Callable[[Sqe], bool]

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        """Cancel the ops started by :meth:`start_direct` with ``user_data`` (all of them
        with None; the first only unless ``every``); return how many cancels were started.
        Each reports 0, -EALREADY or -ENOENT to ``on_result`` later, never at once."""

    def cancel_io(self, req: Req, on_result: Callable[[int], None]) -> None:
        """Ask the backend to cancel ``req``; ``on_result`` gets 0, -EALREADY or -ENOENT."""

    def call_driver(self, req: Req, issue_flags: int) -> int:
        """Run ``req.driver.uring_cmd(req, issue_flags)``; a driver that raises gives -EIO."""

    def task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` soon, outside the current call stack (``loop.call_soon``)."""

    def arm_timer(self, seconds: float, fn: Callable[[Req], None], req: Req) -> object:
        """Call ``fn(req)`` after ``seconds``; return a handle for :meth:`disarm_timer`."""

    def disarm_timer(self, handle: object) -> None:
        """Cancel a timer armed by :meth:`arm_timer` (it may have fired already)."""

    def wake(self) -> None:
        """CQEs were posted while someone waits for them."""

    def idle(self) -> None:
        """Nothing is in flight any more (close() waits for this)."""

    def fd_is_open(self, fd: int) -> bool:
        """Whether ``fd`` is an open descriptor (SPEC F6: -EBADF otherwise)."""

    def log_error(self, event: str, exc: bool = False, **fields: Any) -> None:
        """Log an error (with the current exception's traceback if ``exc``)."""
