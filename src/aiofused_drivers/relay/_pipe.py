"""One direction of a proxied connection: the chunk loop of fused commands.

Compiled with the core (the twin: ``aiofused._twin.SOURCES``), since every chunk of every
proxied connection runs through it.  What it is given (the server, the connection, its
mirrors, the ring) is typed by the protocols below, so tests drive it with recording
fakes; :mod:`aiofused_drivers.relay.proxy` has the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from aiofused import BufDir, Op, RingClosedError

from . import RELAY_RECV

__all__ = [
    "Pipe",
    "PipeChannel",
    "PipeConnection",
    "PipeMirror",
    "PipeRing",
    "PipeServer",
]

_MSG_WAITALL: Final = int(socket.MSG_WAITALL)  # plain ints: an IntFlag costs an int() per send
_MSG_DONTWAIT: Final = int(socket.MSG_DONTWAIT)
#: Loop iterations the mirrors' sends get after the main SEND of a chunk is done.
_MIRROR_GRACE_ITERATIONS: Final = 3
_OP_SEND: Final = Op.SEND
_SRC: Final = BufDir.SRC
_EAGAIN: Final = -errno.EAGAIN
_ECANCELED: Final = -errno.ECANCELED
#: A mirror's send of the current chunk: none, MSG_DONTWAIT, waiting (the grace), ended,
#: failed.
_M_IDLE: Final = 0
_M_NOWAIT: Final = 1
_M_WAIT: Final = 2
_M_DONE: Final = 3
_M_FAILED: Final = 4


class PipeRing(Protocol):
    """What a pipe asks of the ring (:class:`aiofused.Ring`)."""

    def open_fused(
        self,
        driver_file: Any,
        cmd_op: int,
        *,
        cmd: bytes = b"",
        buf_dir: BufDir = BufDir.DEST,
        on_lent: Callable[[Any, int], None],
        on_complete: Callable[[int, int], None],
    ) -> Any: ...

    def fused_secondary(
        self,
        primary: Any,
        op: Op,
        fd: Any,
        *,
        at: int = 0,
        nbytes: int,
        offset: int = 0,
        flags: int = 0,
        on_complete: Callable[[int, int], None],
    ) -> None: ...

    def seal(self, p: Any) -> None: ...

    def cancel_secondaries(self, p: Any) -> None: ...

    def cancel_req(self, req: Any, on_result: Callable[[int], None]) -> None: ...


class MirrorCounters(Protocol):
    """A mirror's counters the pipe bumps."""

    sends: int


class PipeMirror(Protocol):
    """A mirror of the connection (``proxy._Mirror``)."""

    busy: bool

    @property
    def live(self) -> bool: ...

    @property
    def sock(self) -> socket.socket | None: ...

    @property
    def failed(self) -> bool: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...

    @property
    def mstats(self) -> MirrorCounters: ...

    def count(self, sent: int, dropped: int) -> None: ...

    def fail(self, reason: str, exc: BaseException | None = None) -> None: ...

    def close(self, abort: bool = False) -> None: ...

    def shutdown_write(self) -> None: ...


class PipeConnection(Protocol):
    """The connection a pipe belongs to (``proxy._Connection``)."""

    chunks: int

    @property
    def mirrors(self) -> Sequence[PipeMirror]: ...


class PipeStats(Protocol):
    """The server's counters the pipe bumps."""

    chunks: int
    bytes_upstream: int
    bytes_downstream: int


class PipeConfig(Protocol):
    """The one setting a pipe reads."""

    @property
    def mirror_grace(self) -> float: ...


class PipeChannel(Protocol):
    """One side of the connection (:class:`~aiofused_drivers.relay.RelayChannel`)."""

    @property
    def cmd(self) -> bytes: ...

    @property
    def sock(self) -> socket.socket: ...


class PipeServer(Protocol):
    """The proxy server (``proxy.ProxyServer``)."""

    @property
    def _ring(self) -> PipeRing | None: ...

    @property
    def _relay_file(self) -> Any: ...

    @property
    def config(self) -> PipeConfig: ...

    @property
    def stats(self) -> PipeStats: ...

    def _cut_unconnected(self, conn: Any) -> None: ...

    def _settle_first(self, pipe: Pipe, cmd: Any, n: int) -> asyncio.Task[None]:
        """Wait (a task) for the mirrors still connecting, then ``pipe.settled(cmd, n)``."""
        ...


class Pipe:
    """One direction of a connection, driven by completion callbacks.

    Per chunk one RELAY_RECV fused command (:meth:`Ring.open_fused`): the relay lends
    what it received, a SEND secondary takes it to ``dst`` (``MSG_WAITALL``; the rest of
    a short send in another), and client→upstream one ``MSG_DONTWAIT`` SEND per live
    mirror reads the same memory (with ``mirror_grace``, a waiting SEND for what did not
    fit).  Once the main SEND is done, the mirrors get a few loop iterations (plus the
    grace) before their sends are cancelled and a mirror that missed bytes is cut; then
    the command is sealed, and its completion starts the next one.  No coroutine, task
    or future per chunk: :meth:`run` waits once for the end of the stream.

    Its owner waits for the end of the stream (``ProxyServer._pump``); cancelled, it
    calls :meth:`abort` and waits until the command in flight has completed (its
    buffer is back with the relay).  Only synchronous code is compiled here: mypyc's
    coroutines have had exception-state bugs around ``await`` (mypyc issues 1114, 1177),
    and a cancelled pipe must never lose track of its in-flight command.
    """

    #: What :meth:`run` deletes when it returns (mypyc's native classes need the list).
    __deletable__ = ("_on_lent", "_on_complete", "_on_sent")
    __slots__ = (
        "_aborting",
        "_cmd",
        "_completed",
        "_done",
        "_dst",
        "_error",
        "_first",
        "_grace",
        "_graced",
        "_lent",
        "_main_done",
        "_mirror_cbs",
        "_msent",
        "_mstate",
        "_mwait",
        "_n",
        "_on_complete",
        "_on_lent",
        "_on_sent",
        "_relay",
        "_ring",
        "_sent",
        "_server",
        "_settle_left",
        "_settling",
        "_src_cmd",
        "_stopped",
        "conn",
        "mirrors",
        "upstream_dir",
    )

    def __init__(
        self,
        server: PipeServer,
        conn: PipeConnection,
        src: PipeChannel,
        dst: PipeChannel,
        upstream_dir: bool,
    ) -> None:
        assert server._ring is not None and server._relay_file is not None
        self._server = server
        self._ring = server._ring
        self._relay = server._relay_file
        self.conn = conn
        self.upstream_dir = upstream_dir
        self._src_cmd = src.cmd
        self._dst = dst.sock
        self.mirrors: Sequence[PipeMirror] = conn.mirrors if upstream_dir else ()
        self._grace = server.config.mirror_grace
        self._cmd: Any = None  # the command in flight
        self._completed = 0
        self._lent = False
        self._n = 0
        self._sent = 0
        self._main_done = False
        self._error: OSError | None = None
        self._aborting = False
        self._first = True
        self._settling: asyncio.Task[None] | None = None
        self._settle_left = 0
        self._graced = False
        #: Per mirror: bytes of this chunk it took, its state (_M_*), and its callback.
        self._msent = [0] * len(self.mirrors)
        self._mstate = [_M_IDLE] * len(self.mirrors)
        self._mwait = 0
        self._done: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        # Bound once: a chunk allocates no callback.
        self._on_lent = self._lent_cb
        self._on_complete = self._complete_cb
        self._on_sent = self._sent_cb
        self._mirror_cbs = [functools.partial(self._mirror_cb, i) for i in range(len(self.mirrors))]

    def start(self, done: asyncio.Future[None]) -> None:
        """Open the first command; ``done`` gets its result at the end of the stream (or
        of the error).  The waiting is the caller's (``ProxyServer._pump``): no coroutine
        is compiled here."""
        self._done = done
        self._next()

    @property
    def in_flight(self) -> bool:
        """A command is in flight (its buffer is not back with the relay yet)."""
        return self._cmd is not None

    def wait_stopped(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` when the command in flight has completed."""
        self._stopped = fut

    def close(self) -> None:
        """Nothing is in flight any more: drop the bound callbacks, each a reference back
        to this pipe (else every pipe and its connection is a cycle for the GC)."""
        del self._on_lent, self._on_complete, self._on_sent
        self._mirror_cbs.clear()

    def raise_error(self) -> None:
        """Raise the error that ended the stream, if one did."""
        err, self._error = self._error, None
        if err is not None:
            try:
                raise err
            finally:
                del err  # this frame is in its traceback: no cycle through a local

    # ---- the chunk loop ----------------------------------------------------------------

    def _next(self) -> None:
        before = self._completed
        cmd = self._ring.open_fused(
            self._relay,
            RELAY_RECV,
            cmd=self._src_cmd,
            buf_dir=_SRC,
            on_lent=self._on_lent,
            on_complete=self._on_complete,
        )
        if self._completed == before:  # still in flight (it may have completed at once)
            self._cmd = cmd

    def _lent_cb(self, cmd: Any, n: int) -> None:
        self._cmd = cmd
        self._lent = True
        self._n = n
        self._sent = 0
        self._main_done = False
        if self._first and self.mirrors:
            self._first = False
            connecting = [m for m in self.mirrors if m.task is not None and not m.task.done()]
            if connecting:
                self._settling = self._server._settle_first(self, cmd, n)
                return
            self._server._cut_unconnected(self.conn)
        self._start_sends(cmd, n)

    def settled(self, cmd: Any, n: int) -> None:
        """The mirrors still connecting at the first byte have had their wait."""
        self._settling = None
        if not self._aborting:
            self._start_sends(cmd, n)

    def _start_sends(self, cmd: Any, n: int) -> None:
        ring = self._ring
        ring.fused_secondary(
            cmd, _OP_SEND, self._dst, nbytes=n, flags=_MSG_WAITALL, on_complete=self._on_sent
        )
        for i, m in enumerate(self.mirrors):
            if m.live and m.sock is not None:
                m.busy = True
                self._msent[i] = 0
                self._mstate[i] = _M_NOWAIT
                self._mwait += 1
                ring.fused_secondary(
                    cmd,
                    _OP_SEND,
                    m.sock,
                    nbytes=n,
                    flags=_MSG_DONTWAIT,
                    on_complete=self._mirror_cbs[i],
                )
            else:
                self._mstate[i] = _M_IDLE
                m.count(0, n)

    def _sent_cb(self, res: int, flags: int) -> None:
        if res > 0:
            self._sent += res
            # The rest of a short send (MSG_WAITALL makes it rare), unless the command was
            # sealed under us (an abort, the ring closing).
            if self._sent < self._n and not self._aborting and not self._cmd.sealed:
                self._ring.fused_secondary(
                    self._cmd,
                    _OP_SEND,
                    self._dst,
                    at=self._sent,
                    nbytes=self._n - self._sent,
                    flags=_MSG_WAITALL,
                    on_complete=self._on_sent,
                )
                return
        elif self._error is None:
            code = -res if res < 0 else errno.EPIPE
            self._error = OSError(code, os.strerror(code))
        self._main_done = True
        if self._mwait:
            self._settle_left = _MIRROR_GRACE_ITERATIONS
            self._graced = False
            asyncio.get_running_loop().call_soon(self._settle, self._completed)
        else:
            self._ring.seal(self._cmd)

    def _mirror_cb(self, i: int, res: int, flags: int) -> None:
        m = self.mirrors[i]
        n = self._n
        if res > 0:
            self._msent[i] += res
        left = n - self._msent[i]
        if (
            left
            and res > 0
            and self._mstate[i] == _M_NOWAIT
            and m.sock is not None
            and not self._aborting
            and not self._cmd.sealed
        ):
            self._mirror_send(i, m, left, _MSG_DONTWAIT)  # what it takes now
            return
        if (
            left
            and res in (0, _EAGAIN)
            and self._grace > 0
            and self._mstate[i] == _M_NOWAIT
            and m.sock is not None
            and not self._aborting
            and not self._cmd.sealed
        ):
            self._mstate[i] = _M_WAIT  # waits for socket space until the grace ends
            self._mirror_send(i, m, left, _MSG_WAITALL)
            return
        self._mstate[i] = _M_FAILED if res < 0 and res not in (_EAGAIN, _ECANCELED) else _M_DONE
        self._mwait -= 1
        if not self._mwait and self._main_done:
            self._ring.seal(self._cmd)

    def _mirror_send(self, i: int, m: PipeMirror, left: int, flags: int) -> None:
        assert m.sock is not None
        self._ring.fused_secondary(
            self._cmd,
            _OP_SEND,
            m.sock,
            at=self._n - left,
            nbytes=left,
            flags=flags,
            on_complete=self._mirror_cbs[i],
        )

    def _settle(self, chunk: int) -> None:
        """The main SEND of ``chunk`` is done: give the mirrors' sends a few iterations
        (and the grace), then cancel the ones still pending (never a later chunk's)."""
        if chunk != self._completed or not self._mwait or not self._main_done:
            return
        if self._settle_left > 0:
            self._settle_left -= 1
            asyncio.get_running_loop().call_soon(self._settle, chunk)
        elif self._grace > 0 and not self._graced:
            self._graced = True
            asyncio.get_running_loop().call_later(self._grace, self._settle, chunk)
        else:
            self._ring.cancel_secondaries(self._cmd)

    def _complete_cb(self, res: int, flags: int) -> None:
        """The chunk's command completed (every secondary has)."""
        self._completed += 1
        self._cmd = None
        lent, self._lent = self._lent, False
        if lent and self.mirrors:
            self._account_mirrors()
        if res > 0 and self._error is None:
            conn, stats = self.conn, self._server.stats
            conn.chunks += 1
            stats.chunks += 1
            if self.upstream_dir:
                stats.bytes_upstream += res
            else:
                stats.bytes_downstream += res
            if not self._aborting:
                try:
                    self._next()
                    return
                except RingClosedError:
                    self._error = OSError(errno.ECANCELED, "ring closed")
        elif res == 0 and not self._aborting:
            # End of stream: propagate the half-close.
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
            for m in self.mirrors:
                m.shutdown_write()
        elif res < 0 and self._error is None and not self._aborting:
            self._error = OSError(-res, os.strerror(-res))
        self._finish()

    def _account_mirrors(self) -> None:
        n = self._n
        for i, m in enumerate(self.mirrors):
            state = self._mstate[i]
            if state == _M_IDLE:
                continue
            self._mstate[i] = _M_IDLE
            m.busy = False
            sent = self._msent[i]
            m.mstats.sends += 1
            m.count(sent, n - sent)
            if sent < n and not m.failed:
                m.fail("send_failed" if state == _M_FAILED else "lagging")
            if m.failed:
                m.close(abort=True)

    def _finish(self) -> None:
        for fut in (self._done, self._stopped):
            if fut is not None and not fut.done():
                fut.set_result(None)

    # ---- cancellation ------------------------------------------------------------------

    def abort(self) -> None:
        """Cancel what is in flight (the caller waits for :attr:`in_flight` to clear)."""
        self._aborting = True
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        cmd = self._cmd
        if cmd is None:
            return
        if self._lent:
            self._ring.cancel_secondaries(cmd)
            self._ring.seal(cmd)
        else:
            self._ring.cancel_req(cmd, _ignore_result)  # parked: the relay completes it


def _ignore_result(res: int) -> None:
    pass
