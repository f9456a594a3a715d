"""Socket relay driver: receive into a pooled buffer, lend it to N SEND secondaries.

Theory of operation
-------------------
A *channel* is the receiving side of one socket.  :meth:`RelayDriver.attach` takes
ownership of the socket and gives back a :class:`RelayChannel` whose ``cmd`` bytes
name it in a fused command::

    async with ring.fused(relay_file, RELAY_RECV, cmd=chan.cmd, buf_dir=BufDir.SRC) as lease:
        await lease.send(upstream, 0, len(lease.buffer))

The primary (``cmd_op`` :data:`RELAY_RECV`) completes with the number of bytes it
lent, 0 at end of stream (nothing is lent and the secondaries are cancelled), or
``-errno`` if the peer reset the connection.

Receiving.  On every backend the socket is read by a reader that *stays
registered*: an :class:`asyncio.BufferedProtocol` whose ``get_buffer`` hands the
transport the free tail of the channel's pooled *filling* buffer, so the kernel
copies straight into pool memory and Python never touches the payload.  (Receiving
with ``loop.sock_recv_into`` per chunk re-registers the fd on every wait and costs
half the request/response rate.)  The transport owns the socket; sends go through
the ring on a ``dup`` of it (:attr:`RelayChannel.sock`), so the loop's "fd used by a
transport" guard never trips and reads and writes are registered independently.

Lending.  A channel holds at most two pool buffers: one *filling* and one *lent*.
When a RELAY_RECV command arrives and bytes are waiting, the filling buffer's
received prefix is lent at once and a fresh buffer becomes the filling one; if no
bytes are waiting, the command is parked and lent from ``buffer_updated``.  Bytes
that arrive while a lend is in flight accumulate (coalesce) in the filling buffer;
when it is full the transport is paused, so a slow destination slows the source
instead of growing memory.  When the pool is empty a channel waits in a FIFO for
the next returned buffer, with reading paused.  A lent buffer goes back to the pool
(or to the first waiting channel) after the command's completion is posted (F11).

Cancellation.  A parked command sets ``cmd.cancel_hook``; ASYNC_CANCEL or ring close
completes it with -ECANCELED.  Closing a channel completes a parked command with
-ECANCELED and returns its filling buffer; a lent buffer returns when its
secondaries have finished, as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import socket
import struct
from collections import deque
from typing import Final

from aiofused.driver import EIOCBQUEUED, BufDir, BufferPool, PoolBuffer, UringCmd, get_logger

__all__ = ["RELAY_RECV", "RelayChannel", "RelayDriver", "RelayPool"]

log: Final = get_logger("aiofused_drivers.relay")

#: ``cmd_op``: receive into a pooled buffer and lend it to the secondaries.
RELAY_RECV: Final = 1

_CMD: Final = struct.Struct("<Q")
_SRC: Final = BufDir.SRC
_ECANCELED: Final = -errno.ECANCELED
_EINVAL: Final = -errno.EINVAL
_EBADF: Final = -errno.EBADF
_EBUSY: Final = -errno.EBUSY
_ECONNRESET: Final = -errno.ECONNRESET


class RelayPool:
    """The relay's bounded pool: :class:`aiofused.BufferPool` slots handed out as views.

    Page-aligned buffers from one ``MAP_NORESERVE`` mapping, reused last-in-first-out,
    so only peak concurrency stays resident.
    """

    def __init__(self, buffer_size: int = 64 * 1024, count: int = 256) -> None:
        if buffer_size <= 0 or count <= 0:
            raise ValueError("buffer_size and count must be positive")
        self.buffer_size = buffer_size
        self.size = count
        self._pool = BufferPool(count, buffer_size)
        self._held: dict[int, PoolBuffer] = {}

    @property
    def available(self) -> int:
        """Buffers currently in the pool."""
        return self._pool.available

    def acquire(self) -> memoryview | None:
        """Take a buffer, or ``None`` if the pool is empty."""
        slot = self._pool.try_acquire()
        if slot is None:
            return None
        self._held[id(slot.view)] = slot
        return slot.view

    def release(self, buf: memoryview) -> None:
        """Give ``buf`` back."""
        self._pool.release(self._held.pop(id(buf)))

    def close(self) -> None:
        """Unmap the pool; every buffer must be back."""
        if self._held:
            raise RuntimeError(f"{len(self._held)} relay buffers still in use")
        self._pool.close()


class _ChannelProtocol(asyncio.BufferedProtocol):
    """The persistent reader: the transport fills the channel's pooled buffer."""

    __slots__ = ("_chan",)

    def __init__(self, chan: RelayChannel) -> None:
        self._chan = chan

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._chan._connection_made(transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._chan._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._chan._received(nbytes)

    def eof_received(self) -> bool:
        self._chan._eof_received()
        return True  # keep the transport: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan._connection_lost(exc)


class RelayChannel:
    """The receiving side of one socket attached to a :class:`RelayDriver`.

    ``cmd`` names the channel in a RELAY_RECV command; ``sock`` is a non-blocking
    ``dup`` of the socket for sends, ``shutdown`` and socket options.
    """

    __slots__ = (
        "_driver",
        "_eof",
        "_error",
        "_fill",
        "_fill_pos",
        "_lent",
        "_lent_len",
        "_paused",
        "_pending",
        "_transport",
        "_waiting",
        "bytes_received",
        "closed",
        "cmd",
        "id",
        "sock",
    )

    def __init__(self, driver: RelayDriver, chan_id: int, sock: socket.socket) -> None:
        self._driver = driver
        self.id = chan_id
        self.cmd = _CMD.pack(chan_id)
        self.sock = sock
        self._transport: asyncio.ReadTransport | None = None
        self._fill: memoryview | None = None
        self._fill_pos = 0
        self._lent: memoryview | None = None
        self._lent_len = 0
        self._pending: UringCmd | None = None
        self._eof = False
        self._error = 0
        self._paused = False
        self._waiting = False
        self.closed = False
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<RelayChannel {self.id} fd={self.sock.fileno()}>"

    # ---- transport callbacks -------------------------------------------------------

    def _connection_made(self, transport: asyncio.ReadTransport) -> None:
        if self.closed:  # closed while attaching (cancelled): take no buffer
            transport.close()
            return
        self._transport = transport
        self._fill = self._driver._take_buffer(self)
        if self._fill is None:
            self._pause()

    def _get_buffer(self) -> memoryview:
        fill = self._fill
        assert fill is not None, "reading while no buffer is filling"
        pos = self._fill_pos
        return fill[pos:] if pos else fill

    def _received(self, nbytes: int) -> None:
        self._fill_pos += nbytes
        self.bytes_received += nbytes
        cmd = self._pending
        if cmd is not None:
            self._pending = None
            cmd.cancel_hook = None
            self._lend(cmd)
        elif self._fill is not None and self._fill_pos == len(self._fill):
            self._pause()

    def _eof_received(self) -> None:
        self._eof = True
        self._finish_pending()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self._error:
            code = getattr(exc, "errno", None)
            self._error = -code if isinstance(code, int) and code > 0 else _ECONNRESET
            log.debug("relay_channel_error", chan=self.id, error=repr(exc))
        elif not self._eof and not self._error:
            self._eof = True
        self._transport = None
        self._finish_pending()

    # ---- driver side -------------------------------------------------------------------

    def _request(self, cmd: UringCmd) -> int:
        if self._pending is not None:
            return _EBUSY
        if self._fill_pos:
            self._lend(cmd)
            return EIOCBQUEUED
        if self._error:
            return self._error
        if self._eof or self.closed:
            return 0 if not self.closed else _ECANCELED
        self._pending = cmd
        cmd.cancel_hook = self._cancel
        if self._paused and self._fill is not None:
            self._resume()
        return EIOCBQUEUED

    def _lend(self, cmd: UringCmd) -> None:
        buf = self._fill
        assert buf is not None
        n = self._fill_pos
        self._lent = buf
        self._lent_len = n
        self._fill = None
        self._fill_pos = 0
        if not self.closed:
            self._fill = self._driver._take_buffer(self)
            if self._fill is None:
                self._pause()
            elif self._paused:
                self._resume()
        cmd.provide_buf_and_start(buf[:n] if n != len(buf) else buf, self._returned)

    def _returned(self, cmd: UringCmd) -> None:
        buf = self._lent
        n = self._lent_len
        self._lent = None
        self._lent_len = 0
        cmd.done(n)
        if buf is not None:
            self._driver._give_back(buf)

    def _finish_pending(self) -> None:
        cmd = self._pending
        if cmd is None or self._fill_pos:
            return
        self._pending = None
        cmd.cancel_hook = None
        if self._error:
            cmd.done(self._error)
        elif self.closed:
            cmd.done(_ECANCELED)
        else:
            cmd.done(0)

    def _cancel(self, cmd: UringCmd) -> None:
        if self._pending is cmd:
            self._pending = None
            cmd.cancel_hook = None
            cmd.done(_ECANCELED)

    def _given(self, buf: memoryview) -> None:
        """The pool had a buffer for this waiting channel."""
        self._waiting = False
        self._fill = buf
        self._fill_pos = 0
        self._resume()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._eof:
            self._paused = False
            self._transport.resume_reading()

    # ---- public ------------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """True once the peer's end of stream has been received."""
        return self._eof

    @property
    def lending(self) -> bool:
        """True while a received buffer is lent (its secondaries have not all finished)."""
        return self._lent is not None

    def close(self, *, abort: bool = False) -> None:
        """Close the socket (both fds); ``abort`` resets the connection (SO_LINGER 0).

        A parked command completes with -ECANCELED; a lent buffer goes back to the pool
        when its secondaries are done.
        """
        if self.closed:
            return
        self.closed = True
        if abort:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport = self._transport
        if transport is not None:
            if abort:
                transport.abort()  # type: ignore[attr-defined]
            else:
                transport.close()
        self.sock.close()
        self._finish_pending()
        fill, self._fill, self._fill_pos = self._fill, None, 0
        if fill is not None:
            self._driver._give_back(fill)
        self._driver._detach(self)


class RelayDriver:
    """The ``relay`` driver (entry point ``aiofused_drivers.relay:RelayDriver``).

    Options: ``buffer_size`` and ``pool_size`` size the bounded pool every channel
    receives into (or pass ``pool``).  Attach sockets with :meth:`attach`.
    """

    name = "relay"
    can_fused = True

    def __init__(
        self,
        buffer_size: int = 64 * 1024,
        pool_size: int = 256,
        pool: RelayPool | None = None,
    ) -> None:
        self.pool = pool if pool is not None else RelayPool(buffer_size, pool_size)
        self._own_pool = pool is None
        self._channels: dict[int, RelayChannel] = {}
        self._ids = itertools.count(1)
        self._waiters: deque[RelayChannel] = deque()
        #: Bytes of payload copied by Python on the relay path: there is no such copy.
        self.copied_bytes = 0

    # ---- Driver protocol ---------------------------------------------------------------

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        """Handle RELAY_RECV: lend the next received bytes as the secondaries' source."""
        if cmd.cmd_op != RELAY_RECV or not cmd.is_fused or cmd.buf_dir is not _SRC:
            return _EINVAL
        if len(cmd.cmd) < _CMD.size:
            return _EINVAL
        chan = self._channels.get(_CMD.unpack_from(cmd.cmd)[0])
        if chan is None:
            return _EBADF
        return chan._request(cmd)

    def close(self) -> None:
        """Called when the ring closes: close every channel still attached."""
        for chan in list(self._channels.values()):
            chan.close(abort=True)

    # ---- channels ----------------------------------------------------------------------

    async def attach(self, sock: socket.socket) -> RelayChannel:
        """Take ownership of connected stream socket ``sock`` and start receiving from it."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        send_sock = sock.dup()
        send_sock.setblocking(False)
        chan = RelayChannel(self, next(self._ids), send_sock)
        self._channels[chan.id] = chan
        try:
            await loop.connect_accepted_socket(lambda: _ChannelProtocol(chan), sock)
        except BaseException:
            chan.close(abort=True)
            sock.close()
            raise
        return chan

    @property
    def channels(self) -> int:
        """Channels currently attached."""
        return len(self._channels)

    def _detach(self, chan: RelayChannel) -> None:
        self._channels.pop(chan.id, None)
        if chan._waiting:
            chan._waiting = False
            with contextlib.suppress(ValueError):
                self._waiters.remove(chan)

    # ---- pool --------------------------------------------------------------------------

    def _take_buffer(self, chan: RelayChannel) -> memoryview | None:
        buf = self.pool.acquire() if not self._waiters else None
        if buf is None and not chan._waiting:
            chan._waiting = True
            self._waiters.append(chan)
        return buf

    def _give_back(self, buf: memoryview) -> None:
        while self._waiters:
            chan = self._waiters.popleft()
            if not chan.closed and chan._waiting:
                chan._given(buf)
                return
        self.pool.release(buf)

    def close_pool(self) -> None:
        """Unmap the pool if this driver created it (every buffer must be back)."""
        if self._own_pool:
            self.pool.close()
