"""NBD front end: plays the block layer for ublk devices, fed by real NBD clients.

Each connection does the handshake (:class:`._nbdproto.Handshake`) with awaited socket
calls, then switches to a readiness-driven transmission loop on the raw non-blocking
socket (``loop.add_reader``/``add_writer``, which uvloop and the default loop both
provide):

* request headers are parsed out of a receive buffer; a WRITE payload goes straight
  into the request's buffer (bytes already read with the header are copied once,
  the rest is ``recv_into`` the request buffer itself);
* each READ/WRITE/FLUSH/TRIM/WRITE_ZEROES becomes a :class:`BlockRequest` queued on
  the export's :class:`UblkDriver`; requests are pipelined and answered in completion
  order (out of order), matched by cookie;
* replies are gathered per loop iteration and written with one ``sendmsg``; a READ
  reply's data is the request buffer itself, released only once the kernel took it.

Bad input: out-of-range, misaligned (when block sizes were agreed) or unknown
requests get an NBD error; bad magic, oversized (> 32 MiB) payload requests and a
malformed handshake close that connection only.  A connection that goes away
mid-request drops its partial payload buffer and lets in-flight requests finish
without a reply: nothing stays lent.

Bounds (what one client can make the server hold): a connection stops reading, at a
request boundary, while it has ``max_inflight`` requests queued, ``max_connection_bytes``
of request buffers and unsent replies, or :data:`MAX_QUEUED_REPLIES` replies not yet
sent; it reads on once half of that is gone (replies sent, requests done).  A client
that does not read its replies therefore stops being read, and costs a bounded amount.
Request buffers themselves come from :class:`RequestBuffers` (bounded, no mapping per
request); a connection that finds them spent waits for a release the same way.  A
failure inside one connection (even MemoryError) closes that connection only; the
accept loop logs and goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiofused.driver import get_logger

from . import _nbdproto as P
from ._device import UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP, BlockRequest, IoOp, UblkDriver
from ._dispatch import recv_connections, report_ended
from ._reqbuf import ReqBuf, RequestBuffers
from ._targets import Target

__all__ = ["DEFAULT_CONNECTION_BYTES", "MAX_QUEUED_REPLIES", "Export", "ExportStats", "NbdServer"]

log: Final = get_logger(__name__)

_RBUF_SIZE: Final = 256 * 1024
_HDR: Final = P.REQUEST_HEADER
_HDR_SIZE: Final = _HDR.size
_KNOWN_FLAGS: Final = int(
    P.CmdFlag.FUA | P.CmdFlag.NO_HOLE | P.CmdFlag.DF | P.CmdFlag.REQ_ONE | P.CmdFlag.FAST_ZERO
)
#: iovecs per sendmsg: a unix socket buffer takes ~200 KiB at a time anyway.
_IOV_MAX: Final = 64
#: Replies queued on one connection and not yet sent, at most (reading pauses there).
MAX_QUEUED_REPLIES: Final = 4096
#: Bytes of request buffers and unsent replies one connection may hold, by default.
DEFAULT_CONNECTION_BYTES: Final = 64 << 20
_EINVAL: Final = errno.EINVAL
_ENOSPC: Final = errno.ENOSPC
_EPERM: Final = errno.EPERM
_FUA: Final = int(P.CmdFlag.FUA)
_NO_HOLE: Final = int(P.CmdFlag.NO_HOLE)
_FAST_ZERO: Final = int(P.CmdFlag.FAST_ZERO)
_REQ_ONE: Final = int(P.CmdFlag.REQ_ONE)
_READ: Final = int(P.Cmd.READ)
_WRITE: Final = int(P.Cmd.WRITE)
_IO_READ: Final = int(IoOp.READ)
_IO_WRITE: Final = int(IoOp.WRITE)
#: Request counts by command number, in :attr:`NbdServer.stats` as ``cmdN`` (the known
#: commands count in a list slot each; any other number in the last slot, as ``cmd?``).
_NCMDS: Final = max(P.Cmd) + 1
#: A successful simple reply: ``_simple_ok(_SIMPLE_MAGIC, 0, cookie)`` (P.simple_reply).
_simple_ok: Final = struct.Struct(">IIQ").pack
_SIMPLE_MAGIC: Final = P.SIMPLE_REPLY_MAGIC
#: The header of a one-chunk structured READ reply (P.read_reply_header).
_read_chunk: Final = struct.Struct(">IHHQIQ").pack
_CHUNK_MAGIC: Final = P.STRUCTURED_REPLY_MAGIC
_CHUNK_DONE: Final = int(P.REPLY_FLAG_DONE)
_CHUNK_DATA: Final = int(P.ChunkType.OFFSET_DATA)


class ExportStats:
    """Counters of one export (all its connections in this process), for ``--metrics``."""

    __slots__ = ("errors", "read_bytes", "requests", "write_bytes")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.read_bytes = 0
        self.write_bytes = 0


class Export:
    """A named export: a ublk device and the target serving it."""

    def __init__(
        self,
        name: str,
        driver: UblkDriver,
        target: Target,
        read_only: bool = False,
        description: str = "",
    ) -> None:
        self.name = name
        self.driver = driver
        self.target = target
        self.read_only = read_only or target.read_only
        self.description = description or target.describe()
        self.stats = ExportStats()
        flags = P.TxFlag.HAS_FLAGS | P.TxFlag.SEND_FLUSH | P.TxFlag.SEND_FUA
        if target.multi_conn:  # see Target.multi_conn: which targets keep its promise
            flags |= P.TxFlag.CAN_MULTI_CONN
        if self.read_only:
            flags |= P.TxFlag.READ_ONLY
        else:
            flags |= P.TxFlag.SEND_TRIM | P.TxFlag.SEND_WRITE_ZEROES
        self.info = P.ExportInfo(
            name=name,
            size=driver.size,
            flags=flags,
            description=self.description,
            min_block=driver.logical_block_size,
        )


class NbdServer:
    """Serves :class:`Export` objects to NBD clients on unix or TCP sockets."""

    def __init__(
        self,
        exports: Sequence[Export],
        buffers: RequestBuffers | None = None,
        *,
        handshake_timeout: float = 30.0,
        max_inflight: int = 256,
        socket_buffer: int = 0,
        max_connection_bytes: int = DEFAULT_CONNECTION_BYTES,
    ) -> None:
        if not exports:
            raise ValueError("at least one export")
        if max_inflight < 1 or max_connection_bytes < 1:
            raise ValueError("max_inflight and max_connection_bytes must be positive")
        self.exports = {e.name: e for e in exports}
        #: The export a client gets when it asks for the empty name.
        self.default_export = exports[0]
        self.buffers = buffers or RequestBuffers()
        self.handshake_timeout = handshake_timeout
        self.max_inflight = max_inflight
        #: Request buffers plus unsent replies a connection may hold before it stops
        #: reading (a single request larger than this is still served, alone).
        self.max_connection_bytes = max_connection_bytes
        #: SO_SNDBUF/SO_RCVBUF of each connection (0: the kernel's default; the kernel
        #: caps it at net.core.wmem_max/rmem_max).  A READ reply is sent straight from
        #: its request buffer: room for whole replies saves partial sends and wakeups.
        self.socket_buffer = socket_buffer
        self.connections: set[Connection] = set()
        #: What serves each accepted socket: ``connection_class(server, sock, id, peer)``.
        self.connection_class: Callable[[NbdServer, socket.socket, int, Any], Connection] = (
            Connection
        )
        self._listeners: list[socket.socket] = []
        self._accept_tasks: set[asyncio.Task[None]] = set()
        self._channel: socket.socket | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closing = False
        #: Requests by command (the last slot: unknown commands), and errors replied.
        self.cmd_counts = [0] * (_NCMDS + 1)
        self.errors = 0
        #: Connections waiting for request buffers (the shared budget was spent).
        self._buffer_waiters: dict[Connection, None] = {}
        self.buffers.on_release.append(self._buffers_released)

    # ---- export lookup ----------------------------------------------------------------

    @property
    def stats(self) -> collections.Counter[str]:
        """Requests by command (``cmd0`` ..., ``cmd?`` for unknown ones) and ``errors``."""
        out: collections.Counter[str] = collections.Counter()
        for typ, n in enumerate(self.cmd_counts):
            if n:
                out[f"cmd{typ}" if typ < _NCMDS else "cmd?"] = n
        if self.errors:
            out["errors"] = self.errors
        return out

    def lookup(self, name: str) -> P.ExportInfo | None:
        exp = self.exports.get(name) if name else self.default_export
        return None if exp is None else exp.info

    def names(self) -> list[str]:
        return list(self.exports)

    # ---- listening --------------------------------------------------------------------

    @staticmethod
    def bind_unix(path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(128)
        return sock

    @staticmethod
    def bind_tcp(host: str, port: int) -> socket.socket:
        """A listening TCP socket (no SO_REUSEPORT: with ``--workers`` the parent accepts
        and hands connections over, and no other instance can join the address)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    def serve(self, listener: socket.socket) -> None:
        """Start accepting on a bound, listening socket (the server closes it)."""
        listener.setblocking(False)
        self._listeners.append(listener)
        task = asyncio.create_task(self._accept_loop(listener), name="nbd-accept")
        self._accept_tasks.add(task)
        task.add_done_callback(self._accept_tasks.discard)

    def serve_channel(self, channel: socket.socket) -> None:
        """Serve the connections a dispatching parent passes over ``channel``
        (``nbd serve --workers N``, see :mod:`._dispatch`); report each one's end."""
        channel.setblocking(False)
        self._channel = channel
        asyncio.get_running_loop().add_reader(channel.fileno(), self._on_channel)

    def _on_channel(self) -> None:
        channel = self._channel
        assert channel is not None
        while True:
            socks = recv_connections(channel)
            if socks is None:  # the parent is gone: no more connections come
                asyncio.get_running_loop().remove_reader(channel.fileno())
                return
            if not socks:
                return
            for sock in socks:
                if self._closing:
                    sock.close()
                    report_ended(channel)
                    continue
                try:
                    peer = sock.getpeername()
                except OSError:
                    peer = None
                self._start_connection(sock, peer)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                sock, peer = await loop.sock_accept(listener)
            except Exception as e:  # EMFILE, ENOMEM, MemoryError...: never end accepting
                if self._closing:
                    return
                log.warning("nbd.accept_failed", error=str(e) or type(e).__name__)
            else:
                self._start_connection(sock, peer)
                continue
            # The back-off waits outside the handler: this module is compiled, and mypyc's
            # coroutines have mishandled the exception state across an await in one.
            await asyncio.sleep(0.05)

    def _start_connection(self, sock: socket.socket, peer: Any) -> None:
        """Start serving ``sock``; a failure here drops that connection only."""
        try:
            conn = self.connection_class(self, sock, next(self._ids), peer)
            task = asyncio.create_task(conn.run(), name=f"nbd-conn-{conn.id}")
        except Exception as e:
            log.error("nbd.connection_failed", error=str(e) or type(e).__name__)
            with contextlib.suppress(OSError):
                sock.close()
            self._connection_ended()
            return
        conn.task = task
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def _wait_for_buffers(self, conn: Connection) -> None:
        self._buffer_waiters[conn] = None

    def _buffers_released(self) -> None:
        if self._buffer_waiters:
            waiters = list(self._buffer_waiters)
            self._buffer_waiters.clear()
            for conn in waiters:
                conn.maybe_resume()

    def _connection_ended(self) -> None:
        if self._channel is not None:
            report_ended(self._channel)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), disconnect."""
        self._closing = True
        if self._channel is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
        for t in list(self._accept_tasks):
            t.cancel()
        for sock in self._listeners:
            if sock.family == socket.AF_UNIX:
                name = sock.getsockname()
                if isinstance(name, str) and name:
                    with contextlib.suppress(OSError):
                        os.unlink(name)
            sock.close()
        self._listeners.clear()
        for conn in list(self.connections):
            conn.shutdown()
        if self._conn_tasks:
            _, pending = await asyncio.wait(set(self._conn_tasks), timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
        if self._accept_tasks:
            await asyncio.wait(set(self._accept_tasks), timeout=1)


class Connection:
    """One client connection."""

    def __init__(self, server: NbdServer, sock: socket.socket, conn_id: int, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.id = conn_id
        self.peer = peer if peer else "unix"
        self.log = log.bind(conn=conn_id)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        if server.socket_buffer > 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server.socket_buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server.socket_buffer)
            except OSError as e:
                log.debug("nbd.socket_buffer_refused", error=str(e))
        self.export: Export | None = None
        self._structured = False
        self._meta = False
        self._align = 1
        self._size = 0
        self._ro = False
        self._driver: UblkDriver | None = None
        self._target: Target | None = None
        self._xstats = ExportStats()  # the export's, once chosen
        self._q_id = conn_id
        # receive state
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._wpos = 0
        self._payload: ReqBuf | None = None
        self._payload_req: BlockRequest | None = None
        self._payload_got = 0
        self._discard = 0
        self._reading = False
        self._paused = False
        self._resume_scheduled = False
        self._disc = False
        #: Bytes this connection holds: request buffers, and replies not yet sent.
        self.held = 0
        # send state
        self._out: collections.deque[tuple[Any, ReqBuf | None]] = collections.deque()
        self._flush_scheduled = False
        self._writing = False
        self.inflight = 0
        self.closed = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        self.close_reason = ""
        self.task: asyncio.Task[None] | None = None
        self._shutting_down = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        srv = self.server
        srv.connections.add(self)
        try:
            ok = await self._handshake()
            if ok:
                self._start_transmission()
                await self._done
        except Exception:
            self.log.exception("nbd.connection_error")
            self._close("internal error")
        finally:
            srv.connections.discard(self)
            if not self.closed:
                self._close(self.close_reason or "done")
            srv._connection_ended()

    async def _handshake(self) -> bool:
        srv = self.server
        loop = self._loop
        sock = self.sock
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hs = P.Handshake(srv.lookup, srv.names)
        try:
            async with asyncio.timeout(srv.handshake_timeout):
                await loop.sock_sendall(sock, hs.data_to_send())
                while hs.state in (P.HandshakeState.CLIENT_FLAGS, P.HandshakeState.OPTIONS):
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        self.close_reason = "client closed during handshake"
                        self.log.info("nbd.handshake_eof", options=hs.options_seen)
                        return False
                    hs.receive_data(data)
                    out = hs.data_to_send()
                    if out:
                        await loop.sock_sendall(sock, out)
        except TimeoutError:
            self.close_reason = "handshake timeout"
            self.log.warning("nbd.handshake_timeout")
            return False
        except OSError as e:
            self.close_reason = f"handshake: {e}"
            self.log.info("nbd.handshake_failed", error=str(e))
            return False
        if hs.state is not P.HandshakeState.TRANSMISSION or hs.export is None:
            self.close_reason = hs.close_reason
            level = "info" if "ABORT" in hs.close_reason else "warning"
            getattr(self.log, level)("nbd.handshake_closed", reason=hs.close_reason)
            return False
        exp = srv.exports.get(hs.export.name, srv.default_export)
        self.export = exp
        self._structured = hs.structured
        self._meta = hs.meta_context
        self._align = exp.info.min_block if hs.block_size_agreed else 1
        self._size = exp.info.size
        self._ro = exp.read_only
        self._driver = exp.driver
        self._target = exp.target
        self._xstats = exp.stats
        self._q_id = self.id % exp.driver.nr_queues
        self.log = self.log.bind(export=exp.name)
        self.log.info(
            "nbd.connected",
            peer=str(self.peer),
            worker=os.getpid(),
            structured=hs.structured,
            meta_context=hs.meta_context,
            block_size=hs.block_size_agreed,
        )
        if hs.leftover:
            n = len(hs.leftover)
            self._rbuf[:n] = hs.leftover
            self._wpos = n
        return True

    def _start_transmission(self) -> None:
        self._process()
        if not self.closed and not self._disc and not self._paused:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def shutdown(self, grace: float = 2.0) -> None:
        """Server shutdown (NBD soft disconnect): requests already received complete,
        new ones get ESHUTDOWN; the connection closes when the client disconnects, or
        after ``grace`` seconds once nothing is in flight."""
        if self.closed:
            return
        if self.export is None:
            # Still in the handshake: nothing in flight, just drop it.
            if self.task is not None:
                self.task.cancel()
            return
        self._shutting_down = True
        self._loop.call_later(grace, self._grace_over)

    def _grace_over(self) -> None:
        if self.closed:
            return
        self._disc = True
        self.close_reason = self.close_reason or "server shutdown"
        self._stop_reading()
        self._maybe_finish()

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._stop_reading()
        self.server._buffer_waiters.pop(self, None)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._payload is not None:
            self._release(self._payload)
            self._payload = None
            self._payload_req = None
        out = self._out
        while out:
            rb = out.popleft()[1]
            if rb is not None:
                self._release(rb)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.log.info("nbd.disconnected", reason=reason, inflight=self.inflight)
        if not self._done.done():
            self._done.set_result(None)

    def _maybe_finish(self) -> None:
        if self._disc and self.inflight == 0 and not self._out and not self.closed:
            self._close(self.close_reason or "disconnect")

    # ---- receive ------------------------------------------------------------------------

    def _release(self, rb: ReqBuf) -> None:
        self.held -= rb.nbytes
        self.server.buffers.release(rb)

    def _failed(self, where: str) -> None:
        """An unexpected exception (MemoryError included) in a loop callback: this
        connection closes, the server goes on."""
        self.log.exception("nbd.connection_error", where=where)
        self._close("internal error")

    def _on_readable(self) -> None:
        try:
            self._receive()
        except Exception:
            self._failed("receive")

    def _receive(self) -> None:
        try:
            if self._payload is not None:
                view = self._payload.view
                n = self.sock.recv_into(view[self._payload_got :])
                if n:
                    self._payload_got += n
                    if self._payload_got == len(view):
                        self._payload_complete()
            else:
                if self._wpos == _RBUF_SIZE:
                    self._compact()
                n = self.sock.recv_into(self._rview[self._wpos :])
                self._wpos += n
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(f"receive error: {e}")
            return
        if n == 0:
            self._eof()
            return
        self._process()

    def _eof(self) -> None:
        partial = self._payload is not None or self._wpos > self._rpos
        self._stop_reading()
        if partial:
            self.log.warning("nbd.truncated_request", reason="client closed mid-request")
            self._close("client closed mid-request")
            return
        self._disc = True
        self.close_reason = "client closed"
        self._maybe_finish()

    def _compact(self) -> None:
        r, w = self._rpos, self._wpos
        if r:
            self._rbuf[: w - r] = self._rbuf[r:w]
            self._rpos, self._wpos = 0, w - r

    def _process(self) -> None:
        rbuf = self._rbuf
        while not self.closed:
            avail = self._wpos - self._rpos
            if self._payload is not None:
                if not avail:
                    break
                view = self._payload.view
                n = min(avail, len(view) - self._payload_got)
                r = self._rpos
                view[self._payload_got : self._payload_got + n] = self._rview[r : r + n]
                self._rpos += n
                self._payload_got += n
                if self._payload_got == len(view):
                    self._payload_complete()
                continue
            if self._discard:
                n = min(avail, self._discard)
                self._rpos += n
                self._discard -= n
                if self._discard:
                    break
                continue
            if self._disc or self._paused:
                break
            if avail < _HDR_SIZE:
                break
            if self._over_limit():
                self._pause()
                break
            magic, flags, typ, cookie, offset, length = _HDR.unpack_from(rbuf, self._rpos)
            if magic != P.REQUEST_MAGIC:
                self.log.warning("nbd.bad_request_magic", magic=hex(magic))
                self._close("bad request magic")
                return
            if not self._request(flags, typ, cookie, offset, length):
                self._pause()  # no room for its buffer yet: the header stays unread
                break
            self._rpos += _HDR_SIZE
            self.server.cmd_counts[typ if typ < _NCMDS else _NCMDS] += 1
            self._xstats.requests += 1
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
        elif self._wpos > _RBUF_SIZE - _HDR_SIZE:
            self._compact()

    def _over_limit(self) -> bool:
        srv = self.server
        return (
            self.inflight >= srv.max_inflight
            or len(self._out) >= MAX_QUEUED_REPLIES
            or self.held >= srv.max_connection_bytes
        )

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._stop_reading()

    def maybe_resume(self) -> None:
        """Read on (soon) if paused and half of what paused it is gone."""
        if not self._paused or self._resume_scheduled or self.closed:
            return
        srv = self.server
        if (
            self.inflight <= srv.max_inflight // 2
            and len(self._out) <= MAX_QUEUED_REPLIES // 2
            and self.held <= srv.max_connection_bytes // 2
        ):
            self._resume_scheduled = True
            self._loop.call_soon(self._resume)

    def _request(self, flags: int, typ: int, cookie: int, offset: int, length: int) -> bool:
        """Act on one request header; False if its buffer cannot be had yet (nothing
        consumed: it is parsed again on resume)."""
        driver = self._driver
        assert driver is not None
        size = self._size
        align = self._align - 1
        if flags & ~_KNOWN_FLAGS:
            self._error(cookie, _EINVAL, discard=length if typ == _WRITE else 0)
            return True
        if self._shutting_down and typ != P.Cmd.DISC:
            self._error(cookie, errno.ESHUTDOWN, discard=length if typ == _WRITE else 0)
            return True
        fua = UBLK_IO_F_FUA if flags & _FUA else 0
        if typ in (_READ, _WRITE):
            write = typ == _WRITE
            if length > P.MAX_PAYLOAD:
                self.log.warning("nbd.oversized_request", cmd=typ, length=length)
                self._close("oversized request")
                return True
            err = 0
            if length == 0 or (offset | length) & align:
                err = _EINVAL
            elif offset + length > size:
                err = _ENOSPC if write else _EINVAL
            elif write and self._ro:
                err = _EPERM
            if err:
                self._error(cookie, err, discard=length if write else 0)
                return True
            held = self.held
            if held and held + length > self.server.max_connection_bytes:
                return False
            rb = self.server.buffers.acquire(length)
            if rb is None:  # every request buffer is in use: wait for a release
                self.server._wait_for_buffers(self)
                return False
            self.held = held + length
            req = BlockRequest(
                IoOp.WRITE if write else IoOp.READ,
                offset,
                length,
                fua,
                rb.view,
                self._on_done,
                (cookie, rb),
                rb.lend,
            )
            if write:
                self._payload = rb
                self._payload_req = req
                self._payload_got = 0
                return True
            self.inflight += 1
            driver.queue_rq(req, self._q_id)
        elif typ == P.Cmd.FLUSH:
            self.inflight += 1
            driver.queue_rq(
                BlockRequest(IoOp.FLUSH, 0, 0, 0, None, self._on_done, (cookie, None)),
                self._q_id,
            )
        elif typ == P.Cmd.TRIM or typ == P.Cmd.WRITE_ZEROES:
            zero = typ == P.Cmd.WRITE_ZEROES
            if self._ro:
                self._error(cookie, _EPERM)
            elif length == 0 or (offset | length) & align:
                self._error(cookie, _EINVAL)
            elif offset + length > size:
                self._error(cookie, _ENOSPC if zero else _EINVAL)
            elif zero and flags & _FAST_ZERO:
                self._error(cookie, errno.ENOTSUP)
            else:
                op = IoOp.WRITE_ZEROES if zero else IoOp.DISCARD
                if zero and flags & _NO_HOLE:
                    fua |= UBLK_IO_F_NOUNMAP
                self.inflight += 1
                driver.queue_rq(
                    BlockRequest(op, offset, length, fua, None, self._on_done, (cookie, None)),
                    self._q_id,
                )
        elif typ == P.Cmd.BLOCK_STATUS:
            self._block_status(cookie, flags, offset, length)
        elif typ == P.Cmd.DISC:
            self._disc = True
            self.close_reason = "NBD_CMD_DISC"
            self._stop_reading()
            self._maybe_finish()
        else:
            self.log.info("nbd.unknown_command", cmd=typ)
            self._error(cookie, _EINVAL)
        return True

    def _payload_complete(self) -> None:
        req = self._payload_req
        assert req is not None and self._driver is not None
        self._payload = None
        self._payload_req = None
        self.inflight += 1
        self._driver.queue_rq(req, self._q_id)

    def _block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        if not (self._structured and self._meta):
            self._error(cookie, _EINVAL)
            return
        if length == 0 or offset + length > self._size:
            self._error(cookie, _EINVAL)
            return
        assert self._target is not None
        try:
            extents = self._target.extents(offset, length, bool(flags & _REQ_ONE))
        except OSError as e:
            self._error(cookie, P.nbd_error(e.errno or errno.EIO))
            return
        self._queue_out(P.block_status_reply(cookie, extents), None)

    def _error(self, cookie: int, err: int, discard: int = 0) -> None:
        self.server.errors += 1
        self._xstats.errors += 1
        if discard:
            if discard > P.MAX_PAYLOAD:
                self._close("oversized request")
                return
            self._discard = discard
        if self._structured:
            self._queue_out(P.structured_error_reply(cookie, err), None)
        else:
            self._queue_out(P.simple_reply(cookie, err), None)

    # ---- completion and send ---------------------------------------------------------------

    def _on_done(self, req: BlockRequest, res: int) -> None:
        self.inflight -= 1
        cookie, rb = req.ctx
        if self.closed:
            if rb is not None:
                self._release(rb)
            return
        is_read = req.op == _IO_READ
        xstats = self._xstats
        if is_read and res == req.length and res > 0:  # the common case, inline
            xstats.read_bytes += res
            if self._structured:  # P.read_reply_header, in one pack
                hdr = _read_chunk(
                    _CHUNK_MAGIC, _CHUNK_DONE, _CHUNK_DATA, cookie, 8 + res, req.offset
                )
            else:
                hdr = _simple_ok(_SIMPLE_MAGIC, 0, cookie)
            self.held += len(hdr)
            out = self._out
            out.append((hdr, None))
            out.append((rb.view, rb))
            if not self._flush_scheduled and not self._writing:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        elif res < 0 or is_read:
            xstats.errors += 1
            err = P.nbd_error(res if res < 0 else -errno.EIO)
            if rb is not None:
                self._release(rb)
            if self._structured and is_read:
                self._queue_out(P.structured_error_reply(cookie, err), None)
            else:
                self._queue_out(P.simple_reply(cookie, err), None)
        else:
            if req.op == _IO_WRITE:
                xstats.write_bytes += req.length
            if rb is not None:
                self._release(rb)
            hdr = _simple_ok(_SIMPLE_MAGIC, 0, cookie)
            self.held += len(hdr)
            self._out.append((hdr, None))
            if not self._flush_scheduled and not self._writing:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        if self._paused:
            self.maybe_resume()

    def _resume(self) -> None:
        self._resume_scheduled = False
        if self.closed or not self._paused:
            return
        self._paused = False
        try:
            self._process()
        except Exception:
            self._failed("resume")
            return
        if not self.closed and not self._disc and not self._paused and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _queue_out(self, data: Any, rb: ReqBuf | None) -> None:
        if rb is None:
            self.held += len(data)
        self._out.append((data, rb))
        if not self._flush_scheduled and not self._writing:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            return
        try:
            self._send()
        except Exception:
            self._failed("send")

    def _send(self) -> None:
        out = self._out
        while out:
            iov = [item[0] for item in itertools.islice(out, _IOV_MAX)]
            want = sum(map(len, iov))
            try:
                sent = self.sock.sendmsg(iov)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._close(f"send error: {e}")
                return
            total = sent
            while sent and out:
                data, rb = out[0]
                n = len(data)
                if sent >= n:
                    sent -= n
                    out.popleft()
                    if rb is not None:
                        self._release(rb)
                    else:
                        self.held -= n
                else:
                    out[0] = (memoryview(data)[sent:], rb)
                    if rb is None:
                        self.held -= sent
                    sent = 0
            if total:
                self.maybe_resume()
            if out and total < want:
                if not self._writing:
                    self._loop.add_writer(self._fd, self._flush)
                    self._writing = True
                return
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._maybe_finish()


def export_from_spec(
    name: str,
    target: Target,
    *,
    read_only: bool = False,
    nr_queues: int = 1,
    queue_depth: int = 128,
    block_size: int = 512,
    batch_io: bool = True,
) -> Export:
    """An :class:`Export` with a fresh :class:`UblkDriver` sized for ``target`` (with
    batched fetch and commit, ``batch_io``, unless told otherwise)."""
    driver = UblkDriver(
        size=target.size,
        nr_queues=nr_queues,
        queue_depth=queue_depth,
        logical_block_size=block_size,
        batch_io=batch_io,
    )
    return Export(name, driver, target, read_only=read_only)


OnDone: Final = Callable[[BlockRequest, int], None]
