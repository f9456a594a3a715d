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
from typing import TYPE_CHECKING, Any

from aiofused._driver import DriverFile
from aiofused._errors import DriverError, check_res, res_to_error
from aiofused._opdef import OPDEFS
from aiofused._uapi import EINVAL, BufDir, Op

if TYPE_CHECKING:
    from aiofused._fused import Primary
    from aiofused._ring import Ring

__all__ = ["FusedScope", "Lease"]


async def _wait_uncancellable(fut: asyncio.Future[int], on_cancel: Any = None) -> bool:
    """Wait for ``fut`` through any number of cancellations; True if one arrived."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                break
            cancelled = True
            if on_cancel is not None:
                on_cancel()
    return cancelled


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
        self, ring: Ring, driver_file: DriverFile, cmd_op: int, cmd: bytes, buf_dir: BufDir
    ) -> None:
        self.ring = ring
        self.driver_file = driver_file
        self.cmd_op = cmd_op
        self.cmd = bytes(cmd)
        self.buf_dir = BufDir(buf_dir)
        self.primary: Primary | None = None
        self.lent = False
        self.lease: Lease | None = None
        self._p_fut: asyncio.Future[int] | None = None

    async def __aenter__(self) -> Lease:
        ring = self.ring
        loop = ring.loop
        p_fut: asyncio.Future[int] = loop.create_future()
        ready: asyncio.Future[None] = loop.create_future()
        self._p_fut = p_fut
        p = ring._private_primary(self.driver_file, self.cmd_op, self.cmd, self.buf_dir, p_fut)
        prim = p.fused
        assert prim is not None
        self.primary = prim

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        def on_lent() -> None:
            self.lent = True
            wake()

        prim.on_lent = on_lent
        p_fut.add_done_callback(lambda _: wake())
        ring._start_private(p)
        try:
            await ready
        except asyncio.CancelledError:
            ring._cancel_req(p, lambda res: None)
            prim.seal()
            await _wait_uncancellable(p_fut)
            raise
        if not self.lent:
            res = p_fut.result()
            if res < 0:
                raise res_to_error(res)
            lease = Lease(self, memoryview(b""))
            lease.result = res
            self.lease = lease
            return lease
        self.lease = Lease(self, prim.lease_view())
        return self.lease

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        prim = self.primary
        p_fut = self._p_fut
        assert prim is not None and p_fut is not None and self.lease is not None
        if exc_type is not None:
            prim.cancel_secondaries()
        prim.seal()
        cancelled = await _wait_uncancellable(p_fut, prim.cancel_secondaries)
        self.lease.result = p_fut.result()
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
        s = ring._private_secondary(op, fd, at, nbytes, offset, flags, fut)
        prim.add_secondary(s)
        try:
            res = await fut
        except asyncio.CancelledError:
            ring._cancel_req(s, lambda res: None)
            raise
        return check_res(res)
