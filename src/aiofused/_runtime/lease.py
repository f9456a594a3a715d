"""The high-level API: ``async with ring.fused(...) as lease`` (SPEC §5).

Theory of operation
-------------------
Entering the scope submits a primary whose completions go to futures instead of
the CQ, and waits until the driver lends its buffer (or completes without lending).
``lease.read``/``write``/``send``/``recv`` start secondaries on the open primary;
each awaits its own completion.  A secondary whose awaiting task is cancelled is
asked to cancel, but the ring keeps owning it (and its view) until its final
completion.  Leaving the scope seals the primary (cancelling what is in flight if
the scope failed or was cancelled), then waits, immune to further cancellation, for
the primary's completion: by then every secondary has completed, the views were
released and the driver ran its completion.  Only then does the scope exit, and a
cancellation that arrived meanwhile is re-raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiofused._abi import EINVAL, BufDir, Op
from aiofused._core.opdef import OPDEFS
from aiofused._core.records import DriverFile, Req
from aiofused._errors import DriverError, check_res, res_to_error

if TYPE_CHECKING:
    from aiofused._runtime.ring import Ring

__all__ = ["FusedScope", "Lease"]


class Lease:
    """The lent buffer of an open fused primary, and the secondaries that use it."""

    def __init__(self, scope: FusedScope, buffer: memoryview) -> None:
        self._scope = scope
        #: The lent memory (read-only for ``BufDir.SRC``); released when the scope ends.
        self.buffer = buffer
        #: The primary's result, set when the scope ends (or at once if nothing was lent).
        self.result: int | None = None

    @property
    def buf_dir(self) -> BufDir:
        """Direction the secondaries use the buffer in."""
        return self._scope.buf_dir

    @property
    def lent(self) -> bool:
        """False if the driver completed without lending a buffer."""
        return self._scope.primary is not None and self._scope.lent

    async def read(self, fd: Any, offset: int = 0, at: int = 0, nbytes: int | None = None) -> int:
        """READ from ``fd`` at ``offset`` into the buffer at ``at``; return the byte count."""
        return await self._scope.secondary(Op.READ, fd, at, nbytes, offset, 0)

    async def write(self, fd: Any, offset: int = 0, at: int = 0, nbytes: int | None = None) -> int:
        """WRITE the buffer from ``at`` to ``fd`` at ``offset``; return the byte count."""
        return await self._scope.secondary(Op.WRITE, fd, at, nbytes, offset, 0)

    async def send(self, sock: Any, at: int = 0, nbytes: int | None = None, flags: int = 0) -> int:
        """SEND the buffer from ``at`` on ``sock``; return the byte count."""
        return await self._scope.secondary(Op.SEND, sock, at, nbytes, 0, flags)

    async def recv(self, sock: Any, at: int = 0, nbytes: int | None = None, flags: int = 0) -> int:
        """RECV from ``sock`` into the buffer at ``at``; return the byte count."""
        return await self._scope.secondary(Op.RECV, sock, at, nbytes, 0, flags)


class FusedScope:
    """Async context manager returned by :meth:`Ring.fused`."""

    def __init__(
        self, ring: Ring, driver_file: DriverFile | int, cmd_op: int, cmd: bytes, buf_dir: BufDir
    ) -> None:
        self.ring = ring
        self.driver_file = driver_file
        self.cmd_op = cmd_op
        self.cmd = bytes(cmd)
        self.buf_dir = buf_dir if type(buf_dir) is BufDir else BufDir(buf_dir)
        self.primary: Req | None = None
        self.lent = False
        self.lease: Lease | None = None
        self._res: int | None = None  # the primary's res, once its completion came
        self._wake: asyncio.Future[None] | None = None

    # The primary's events set plain state and wake the waiting task directly: no
    # done-callback or shield hop on the path.

    def _signal(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _on_primary_cqe(self, res: int, flags: int) -> None:
        self._res = res
        self._signal()

    def _on_lent(self, p: Req, nbytes: int) -> None:
        self.lent = True
        self._signal()

    async def _wait_done(self, on_cancel: Callable[[], None] | None = None) -> bool:
        """Wait for the primary's completion through any number of cancellations;
        return True if one arrived (the caller re-raises it)."""
        cancelled = False
        while self._res is None:
            self._wake = self.ring.loop.create_future()
            try:
                await self._wake
            except asyncio.CancelledError:
                cancelled = True
                if on_cancel is not None:
                    on_cancel()
        self._wake = None
        return cancelled

    async def __aenter__(self) -> Lease:
        ring = self.ring
        p = ring.private_primary(
            self.driver_file, self.cmd_op, self.cmd, self.buf_dir, self._on_primary_cqe
        )
        self.primary = p
        p.on_lent = self._on_lent
        ring.start_private(p)
        if not self.lent and self._res is None:
            self._wake = ring.loop.create_future()
            try:
                await self._wake
            except asyncio.CancelledError:
                ring.cancel_req(p, _ignore)
                ring.seal(p)
                await self._wait_done()
                raise
            self._wake = None
        if not self.lent:
            res = self._res
            assert res is not None
            if res < 0:
                raise res_to_error(res)
            lease = Lease(self, memoryview(b""))
            lease.result = res
            self.lease = lease
            return lease
        self.lease = Lease(self, ring.lease_view(p))
        return self.lease

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        prim = self.primary
        ring = self.ring
        assert prim is not None and self.lease is not None
        if exc_type is not None:
            ring.cancel_secondaries(prim)
        ring.seal(prim)
        cancelled = await self._wait_done(lambda: ring.cancel_secondaries(prim))
        self.lease.result = self._res
        self.lease = None  # the lease keeps its scope; this side of the cycle goes
        if cancelled and exc_type is None:
            raise asyncio.CancelledError
        return False

    async def secondary(
        self, op: Op, fd: Any, at: int, nbytes: int | None, offset: int, flags: int
    ) -> int:
        """Run one secondary on the lent buffer and return its byte count."""
        prim = self.primary
        opdef = OPDEFS[op]
        if prim is not None and prim.sealed:
            raise DriverError("the lease's scope has ended: no secondary can start")
        if prim is None or not self.lent or opdef.buf_dir is not self.buf_dir:
            raise res_to_error(EINVAL)
        if nbytes is None:
            nbytes = (len(self.lease.buffer) if self.lease is not None else 0) - at
        ring = self.ring
        fut: asyncio.Future[int] = ring.loop.create_future()
        s = ring.private_secondary(op, fd, at, nbytes, offset, flags, _future_setter(fut))
        ring.add_secondary(prim, s)
        try:
            res = await fut
        except asyncio.CancelledError:
            ring.cancel_req(s, _ignore)
            raise
        return check_res(res)


def _future_setter(fut: asyncio.Future[int]) -> Callable[[int, int], None]:
    def on_cqe(res: int, flags: int) -> None:
        if not fut.done():
            fut.set_result(res)

    return on_cqe


def _ignore(res: int) -> None:
    pass
