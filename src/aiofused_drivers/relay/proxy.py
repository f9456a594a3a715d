"""``aiofused proxy``: a mirroring TCP proxy whose data path is fused commands.

Theory of operation
-------------------
Per connection there are two *pumps*, client→upstream and upstream→client.  A pump
is a chain of fused commands on the relay driver (:mod:`aiofused_drivers.relay`),
driven by their completion callbacks (:class:`~aiofused_drivers.relay._pipe.Pipe`, on
:meth:`Ring.open_fused`)::

    RELAY_RECV primary --lent(n)--> SEND secondaries: the destination and, concurrently,
    every live mirror --all done--> seal --completion--> the next RELAY_RECV

The primary receives into a buffer from the driver's bounded pool and lends it; the
SEND secondaries read that same memory; the buffer goes back to the pool when the
primary completes.  Python never copies payload bytes, and a chunk costs no
coroutine, task or future.

Semantics:

* **Half-close.**  End of stream from one side (the primary completes with 0) becomes
  ``shutdown(SHUT_WR)`` on the other side and on the mirrors; the other direction
  keeps flowing.  The connection closes when both directions have ended.
* **Resets and errors.**  A reset on either side, or a failed send on the main path,
  aborts both sides (RST) and is logged.  A refused or unreachable upstream closes
  the client (FIN) and is logged.
* **Backpressure.**  A pump lends one buffer at a time and the driver pauses the
  source when its filling buffer is full, so a slow reader slows the sender; the
  pool bounds memory.
* **Mirrors never slow the main path.**  A mirror's SEND runs beside the main SEND on
  the same lent buffer with ``MSG_DONTWAIT``: its socket send buffer
  (``mirror_lag``) is how far it may fall behind.  If it has not taken the whole
  chunk when the main SEND is done (plus ``mirror_grace`` seconds, 0 by default), it
  is cut (reset), and the bytes it missed and every later byte of the connection are
  counted as dropped and logged.  A mirror that refuses, resets, or is not
  connected shortly after the first byte is cut the same way.  Mirror replies are
  read and discarded.
* **Mirror sampling.**  ``mirror_sample`` percent of the connections are mirrored,
  decided when a connection is accepted by a stable hash of the client's address
  (``host:port``; :func:`mirror_sampled`), so a connection is mirrored whole or not
  at all, the decision is the same in every worker and run, and raising the
  percentage only adds connections.  Per mirror the proxy counts the connections,
  the bytes sent, the bytes dropped (missed after a cut) and the lag: the bytes its
  sockets hold that it has not taken yet (``SIOCOUTQ``), read when the statistics
  are (:meth:`ProxyServer.mirror_statistics`, ``--metrics``, the final log line).
* **Limits.**  ``max_connections`` stops accepting while that many are open;
  ``idle_timeout`` resets (RST on both sides, never a FIN that a peer could take for
  a complete stream) a connection on which no byte moved either way for that long:
  neither received nor sent nor, for a send in flight, taken by the peer.  What moved
  is what the kernel counts on each TCP socket (``tcp_info``: bytes acknowledged by the
  peer and bytes received), checked every quarter of the timeout, so a send stalled on
  a slow upstream that still reads is not idle, and one on an upstream that took no
  byte of it for the whole timeout is.  (On a unix socket, which has no such counter,
  a send in flight always counts as activity.)
  SIGINT/SIGTERM stop accepting, let open connections finish for
  ``shutdown_timeout`` seconds, close the rest, and exit 0.
* **Logging.**  A warning that repeats for every connection (a mirror cut, an
  upstream refusing) is logged at most once per ``warn_interval`` per mirror or
  upstream; the ones held back are counted and logged in one line (``suppressed``)
  when the interval ends.  Reaching ``max_connections`` is a warning
  (``max_connections_reached``: clients now wait in the listen backlog), and the end
  of that state is logged too (``max_connections_left``: the backlog has been
  drained), with how long it lasted.  ``stats_interval`` logs the counters
  (``proxy_stats``, with the per-mirror ones) that often; ``proxy_stopped`` has them
  at exit.
* **Workers.**  ``workers > 1`` forks that many processes, which share one listening
  socket that the parent bound (and closed once they had it).  It is bound without
  ``SO_REUSEPORT`` so that no other socket can bind the address: a second instance
  fails to start with "address in use", where per-worker ``SO_REUSEPORT`` listeners
  would let it join the first's group and silently take part of its traffic (the
  kernel admits any socket of the same user with the option set; a lock file would
  guard only against instances that look in the same place).  The workers take turns
  accepting: a busy worker comes back to ``accept`` later, so the idle ones take more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import math
import multiprocessing
import os
import signal
import socket
import struct
import sys
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiofused import DriverFile, Ring, SetupFlag
from aiofused.backend import get_backend_class
from aiofused.driver import (
    ArgumentParser,
    CommandError,
    configure_logging,
    get_logger,
    host_port_arg,
    int_arg,
    log_level_arg,
    parse_host_port,
    size_arg,
)
from aiofused_drivers.relay import RelayChannel, RelayDriver, RelayPool
from aiofused_drivers.relay._pipe import Pipe

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "Endpoint",
    "MirrorStats",
    "ProxyConfig",
    "ProxyServer",
    "ProxyStats",
    "add_parser",
    "main",
    "mirror_sampled",
    "run_proxy",
]

log = get_logger("aiofused.proxy")

_LINGER_RESET = struct.pack("ii", 1, 0)
#: ``struct tcp_info``: ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` (Linux 4.1, 4.6).
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_BYTES_AT = 120
_TCP_INFO_LEN = _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size
#: The idle timer looks for activity this many times per ``idle_timeout``.
_IDLE_CHECKS = 4


# ---- configuration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP ``host:port`` or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH`` or an absolute ``PATH``."""
        if text.startswith("unix:"):
            if not text[5:]:
                raise ValueError(f"invalid address {text!r}: expected unix:PATH")
            return cls(path=text[5:])
        if text.startswith("/"):
            return cls(path=text)
        try:
            host, port = parse_host_port(text)
        except ValueError as exc:
            msg = str(exc).replace("expected HOST:PORT", "expected HOST:PORT or unix:PATH")
            raise ValueError(msg) from None
        return cls(host=host, port=port)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def family(self) -> socket.AddressFamily:
        if self.path:
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def address(self) -> Any:
        return self.path if self.path else (self.host, self.port)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything ``aiofused proxy`` takes on its command line."""

    listen: Endpoint
    upstream: Endpoint
    mirrors: tuple[Endpoint, ...] = ()
    workers: int = 1
    max_connections: int = 1024
    idle_timeout: float = 300.0
    #: Pool buffer size: the most one fused command lends (bulk transfers coalesce into
    #: full buffers, so bigger means fewer commands per GiB).
    buffer_size: int = 1024 * 1024
    #: Buffers in the pool; 0 means ``4 * max_connections`` (two per direction).
    pool_size: int = 0
    connect_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    #: How far (bytes) a mirror may lag behind the main path: its socket send buffer.
    mirror_lag: int = 8 * 1024 * 1024
    #: How long (seconds) the main path may wait for a lagging mirror per chunk before
    #: cutting it; 0 (the default) means never.
    mirror_grace: float = 0.0
    #: Percent (0-100) of the connections that are mirrored (:func:`mirror_sampled`).
    mirror_sample: float = 100.0
    backend: str = "auto"
    loop: str = "auto"
    backlog: int = 1024
    #: ``(host, port)`` of the Prometheus endpoint (``--metrics``), or None.
    metrics: tuple[str, int] | None = None
    #: A repeated warning is logged at most once per this many seconds (per mirror or
    #: upstream), with the count of those held back.
    warn_interval: float = 10.0
    #: Log the counters (``proxy_stats``, per mirror too) every this many seconds; 0: never.
    stats_interval: float = 0.0

    @property
    def effective_pool_size(self) -> int:
        return self.pool_size or 4 * self.max_connections

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work."""
        for name, ep in [("--listen", self.listen), ("--upstream", self.upstream)] + [
            ("--mirror", m) for m in self.mirrors
        ]:
            if not ep.is_unix and not 0 <= ep.port <= 65535:
                raise ValueError(f"{name} {ep}: port {ep.port} is not in 0-65535")
            if not ep.is_unix and ep.port == 0 and name != "--listen":
                raise ValueError(f"{name} {ep}: port 0 cannot be connected to")
        if self.listen.is_unix:
            parent = os.path.dirname(os.path.abspath(self.listen.path))
            if not os.path.isdir(parent):
                raise ValueError(f"--listen {self.listen}: directory {parent} does not exist")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.max_connections < 1:
            raise ValueError("--max-connections must be at least 1")
        if self.buffer_size < 1024:
            raise ValueError("--buffer-size must be at least 1024")
        if self.effective_pool_size < 2 * self.max_connections:
            raise ValueError(
                "--pool-size must be at least 2 x --max-connections "
                "(every open direction holds one buffer)"
            )
        if self.idle_timeout <= 0:
            raise ValueError("--idle-timeout must be positive")
        if not 0 <= self.mirror_sample <= 100:
            raise ValueError(
                f"--mirror-sample {self.mirror_sample:g}: expected a percentage, 0-100"
            )
        if self.mirror_sample != 100 and not self.mirrors:
            raise ValueError(f"--mirror-sample {self.mirror_sample:g}: there is no --mirror")
        if not self.warn_interval >= 0:
            raise ValueError(f"--warn-interval {self.warn_interval}: expected 0 or more seconds")
        if not self.stats_interval >= 0:
            raise ValueError(f"--stats-interval {self.stats_interval}: expected 0 or more seconds")
        if self.metrics is not None and self.workers > 1:
            raise ValueError(
                f"--metrics with --workers {self.workers}: each worker counts on its own; "
                "use --workers 1"
            )


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy process."""

    connections_total: int = 0
    connections_active: int = 0
    upstream_failures: int = 0
    resets: int = 0
    idle_timeouts: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    chunks: int = 0
    mirror_bytes: int = 0
    mirror_dropped_bytes: int = 0
    mirror_failures: int = 0
    #: Connections mirrored, and not mirrored (``mirror_sample`` below 100).
    connections_mirrored: int = 0
    connections_not_mirrored: int = 0
    #: Times accepting stopped at ``max_connections``.
    max_connections_reached: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class MirrorStats:
    """Counters of one ``--mirror`` (all its connections in this process)."""

    connections: int = 0
    sends: int = 0
    bytes: int = 0
    dropped_bytes: int = 0
    failures: int = 0


# ---- logging -------------------------------------------------------------------------


class _Window:
    __slots__ = ("end", "fields", "handle", "suppressed")

    def __init__(self, end: float) -> None:
        self.end = end
        self.suppressed = 0
        self.fields: dict[str, Any] = {}
        self.handle: asyncio.TimerHandle | None = None


class _Throttle:
    """A repeated warning, at most once per ``interval`` per key.

    The first of a burst is logged at once; the next ones within the interval are
    counted, and when it ends one line says how many were held back (``suppressed``,
    with the fields of the last one) and starts the next interval.  ``interval`` 0
    logs every one.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._windows: dict[tuple[str, str], _Window] = {}

    def warning(self, event: str, key: str, **fields: Any) -> bool:
        """Log ``event`` for ``key`` now, or count it for later; True if logged now."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        window = self._windows.get((event, key))
        if window is None or now >= window.end:
            if self.interval > 0:
                self._windows[(event, key)] = _Window(now + self.interval)
            log.warning(event, **fields)
            return True
        window.suppressed += 1
        window.fields = fields
        if window.handle is None:
            window.handle = loop.call_at(window.end, self._flush, event, key)
        return False

    def _flush(self, event: str, key: str) -> None:
        window = self._windows.pop((event, key), None)
        if window is None or not window.suppressed:
            return
        log.warning(event, **window.fields, suppressed=window.suppressed, interval=self.interval)
        # The summary opens the next interval: a steady stream gives one line per interval.
        self._windows[(event, key)] = _Window(asyncio.get_running_loop().time() + self.interval)

    def close(self) -> None:
        """Log what is still held back (at shutdown)."""
        for (event, key), window in list(self._windows.items()):
            if window.handle is not None:
                window.handle.cancel()
                self._flush(event, key)
        self._windows.clear()


# ---- sockets -------------------------------------------------------------------------


def _abort_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _bytes_moved(sock: socket.socket) -> int | None:
    """Bytes the kernel moved on TCP socket ``sock`` so far (acknowledged by the peer plus
    received), or None where it does not say (a unix socket, an old kernel, closed)."""
    if sock.family == socket.AF_UNIX:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_AT)
    return int(acked + received)


def _unsent(sock: socket.socket | None) -> int:
    """Bytes in ``sock``'s send queue that the peer has not taken (``SIOCOUTQ``)."""
    if sock is None or sock.fileno() < 0:
        return 0
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # SIOCOUTQ on a socket
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)


def mirror_sampled(peer: Any, percent: float, conn_id: int = 0) -> bool:
    """Whether a connection from ``peer`` (the accepted socket's peer address) is
    mirrored when ``percent`` (0-100) of them are.

    A stable hash (BLAKE2b, not Python's salted ``hash``) of ``host:port``: the same
    answer in every process and run, so a connection is mirrored whole or not at all,
    and a connection sampled at one percentage is sampled at every higher one.  A unix
    socket client has no address: its connection number ``conn_id`` is hashed.
    """
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    key = _peer(peer) if isinstance(peer, tuple) else f"unix#{conn_id}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100 < percent * 2**64


def _max_sndbuf() -> int:
    """The largest send buffer SO_SNDBUF can set (the kernel doubles the value given)."""
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            return 2 * int(f.read())
    except (OSError, ValueError):
        return 2 * 212992


async def _close_politely(sock: socket.socket, timeout: float = 1.0) -> None:
    """FIN, then discard what the peer still sends (bounded), so that closing with unread
    bytes does not turn into a reset."""
    loop = asyncio.get_running_loop()
    scratch = bytearray(16 * 1024)
    try:
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(timeout):
            for _ in range(64):
                if not await loop.sock_recv_into(sock, scratch):
                    break
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


async def _connect(ep: Endpoint, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(ep.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if not ep.is_unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, ep.address)
    except BaseException:
        sock.close()
        raise
    return sock


def make_listener(ep: Endpoint, backlog: int = 1024) -> socket.socket:
    """Bind and listen on ``ep`` (non-blocking); unix paths left by a dead run are replaced."""
    sock = socket.socket(ep.family, socket.SOCK_STREAM)
    try:
        if ep.is_unix:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(ep.path) and not os.path.isdir(ep.path):
                    os.unlink(ep.path)
        else:
            # Never SO_REUSEPORT: the address must be this instance's alone.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(ep.address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Discard(asyncio.BufferedProtocol):
    """Reads and drops whatever a mirror sends back; tells the mirror when it is gone."""

    _scratch = memoryview(bytearray(64 * 1024))

    def __init__(self, mirror: _Mirror) -> None:
        self._mirror = mirror

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._mirror.transport = None
        if exc is not None:
            self._mirror.fail("reset", exc)


class _Mirror:
    """One shadow upstream of one connection.

    It keeps the connection's id and the server's counters, not the connection: the
    connection lists its mirrors, and a back-reference would make every mirrored
    connection a reference cycle, left for the cyclic GC.
    """

    __slots__ = (
        "busy",
        "conn_id",
        "dropped",
        "endpoint",
        "failed",
        "mstats",
        "sent",
        "sock",
        "stats",
        "task",
        "throttle",
        "transport",
    )

    def __init__(
        self,
        conn_id: int,
        stats: ProxyStats,
        endpoint: Endpoint,
        mstats: MirrorStats,
        throttle: _Throttle,
    ) -> None:
        self.conn_id = conn_id
        self.stats = stats
        self.mstats = mstats
        self.throttle = throttle
        self.endpoint = endpoint
        self.sock: socket.socket | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.failed = False
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        #: Bytes of this connection sent to the mirror, and missed by it.
        self.sent = 0
        self.dropped = 0

    async def connect(self, timeout: float, lag: int) -> None:
        loop = asyncio.get_running_loop()
        sock = await _connect(self.endpoint, timeout)
        if lag <= _max_sndbuf():
            # A fixed send buffer of ``lag`` bytes.  Beyond net.core.wmem_max the kernel
            # would cap it below what TCP autotuning reaches on its own, so it is left alone.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, lag // 2)
        self.sock = sock.dup()
        self.sock.setblocking(False)
        self.transport, _ = await loop.connect_accepted_socket(lambda: _Discard(self), sock)

    @property
    def live(self) -> bool:
        return not self.failed and self.sock is not None

    @property
    def lag(self) -> int:
        """Bytes given to the mirror's socket that the mirror has not taken yet."""
        return _unsent(self.sock)

    def count(self, sent: int, dropped: int) -> None:
        self.sent += sent
        self.dropped += dropped
        self.mstats.bytes += sent
        self.mstats.dropped_bytes += dropped
        self.stats.mirror_bytes += sent
        self.stats.mirror_dropped_bytes += dropped

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Cut this mirror: later bytes of the connection are dropped and counted."""
        if self.failed:
            return
        self.failed = True
        self.stats.mirror_failures += 1
        self.mstats.failures += 1
        self.throttle.warning(
            "mirror_cut",
            str(self.endpoint),
            conn=self.conn_id,
            mirror=str(self.endpoint),
            reason=reason,
            error=repr(exc) if exc is not None else None,
            bytes_sent=self.sent,
            bytes_dropped=self.dropped,
            lag_bytes=self.lag,
        )
        if not self.busy:  # otherwise closed once its in-flight send has finished
            self.close(abort=True)

    def shutdown_write(self) -> None:
        if self.live and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self, abort: bool = False) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.sock is not None:
            if abort:
                _abort_socket(self.sock)
            else:
                self.sock.close()
            self.sock = None
        tr = self.transport
        self.transport = None
        if tr is not None:
            if abort:
                tr.abort()  # type: ignore[attr-defined]
            else:
                tr.close()


# ---- connections -----------------------------------------------------------------------


class _Connection:
    """One proxied client connection: two pumps, optional mirrors, an idle timer."""

    __slots__ = (
        "activity",
        "chunks",
        "client",
        "id",
        "idle_handle",
        "last_active",
        "mirrors",
        "peer",
        "server",
        "tasks",
        "upstream",
    )

    def __init__(self, server: ProxyServer, conn_id: int, peer: Any) -> None:
        self.server = server
        self.id = conn_id
        self.peer = peer
        self.client: RelayChannel | None = None
        self.upstream: RelayChannel | None = None
        self.mirrors: list[_Mirror] = []
        self.tasks: list[asyncio.Task[None]] = []
        #: Chunks relayed (both directions); with the byte counters, what the idle
        #: timer compares between two looks.
        self.chunks = 0
        self.activity: tuple[int | None, ...] = ()
        #: When the idle timer last saw something move.
        self.last_active = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None

    def activity_mark(self) -> tuple[tuple[int | None, ...], bool]:
        """What has moved so far, and whether a send is in flight whose progress the
        kernel does not report (such a send counts as activity)."""
        mark: list[int | None] = [self.chunks]
        unknown = False
        for chan in (self.client, self.upstream):
            if chan is None:
                continue
            moved = _bytes_moved(chan.sock)
            unknown |= moved is None
            mark += (chan.bytes_received, moved)
        lending = any(c is not None and c.lending for c in (self.client, self.upstream))
        return tuple(mark), unknown and lending


async def _wait_all(tasks: list[asyncio.Task[Any]]) -> bool:
    """Wait until every task is done, through cancellations; True if one arrived."""
    interrupted = False
    while tasks and not all(t.done() for t in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            interrupted = True
    return interrupted


class ProxyServer:
    """The proxy in one process.  ``async with ProxyServer(config) as proxy:`` serves.

    ``address`` is where it listens (useful with port 0); ``stats`` counts; ``pool``
    is the relay driver's buffer pool (full again once every connection is closed).
    """

    def __init__(self, config: ProxyConfig, *, sock: socket.socket | None = None) -> None:
        config.validate()
        self.config = config
        self.stats = ProxyStats()
        #: Per ``--mirror`` (by its address).
        self.mirror_stats = {str(ep): MirrorStats() for ep in config.mirrors}
        self._listen_sock = sock
        self._ring: Ring | None = None
        self._driver: RelayDriver | None = None
        self._relay_file: DriverFile | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: dict[int, _Connection] = {}
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._slots: asyncio.Semaphore | None = None
        self._throttle = _Throttle(config.warn_interval)
        self._stats_handle: asyncio.TimerHandle | None = None
        #: When accepting stopped at ``max_connections`` (None: not at the limit), and the
        #: number accepted since then (clients that had waited in the backlog).
        self._limited_since: float | None = None
        self._limited_accepts = 0
        self._limited_logged = False
        self._closing = False
        self._closed = asyncio.Event()
        #: Pool buffers not returned when :meth:`aclose` finished (a bug if not 0).
        self.buffers_leaked = 0

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def address(self) -> Any:
        assert self._listen_sock is not None
        return self._listen_sock.getsockname()

    @property
    def driver(self) -> RelayDriver:
        """The relay driver (after :meth:`start`)."""
        assert self._driver is not None, "not started"
        return self._driver

    @property
    def pool(self) -> RelayPool:
        """The relay driver's bounded buffer pool."""
        return self.driver.pool

    def ring_statistics(self) -> dict[str, int | str] | None:
        """The ring's :meth:`~aiofused.Ring.statistics` (None before start / after close)."""
        return self._ring.statistics() if self._ring is not None else None

    def mirror_statistics(self) -> dict[str, dict[str, int]]:
        """Per ``--mirror`` (by its address): the :class:`MirrorStats` counters, and now
        ``open`` (its connections open) and ``lag_bytes`` (what they hold that the mirror
        has not taken yet: how far it trails the main path)."""
        out = {
            name: {**dataclasses.asdict(ms), "open": 0, "lag_bytes": 0}
            for name, ms in self.mirror_stats.items()
        }
        for conn in self._conns.values():
            for m in conn.mirrors:
                if m.live:
                    row = out[str(m.endpoint)]
                    row["open"] += 1
                    row["lag_bytes"] += m.lag
        return out

    def metric_families(self) -> list[Metric]:
        """The Prometheus metric families of this process (``--metrics``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from aiofused_drivers._metrics import ring_families

        st, up = self.stats, str(self.config.upstream)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"aiofused_proxy_{name}", doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"aiofused_proxy_{name}", doc, labels=labels)

        conns = counter("connections", "client connections", ["upstream"])
        conns.add_metric([up], st.connections_total)
        active = gauge("connections_in_flight", "connections open now", ["upstream"])
        active.add_metric([up], st.connections_active)
        chunks = counter("requests", "fused commands (one per chunk relayed)", ["upstream"])
        chunks.add_metric([up], st.chunks)
        nbytes = counter("bytes", "bytes relayed", ["upstream", "direction"])
        nbytes.add_metric([up, "up"], st.bytes_upstream)
        nbytes.add_metric([up, "down"], st.bytes_downstream)
        errors = counter("errors", "failures by kind", ["upstream", "kind"])
        errors.add_metric([up, "connect_failed"], st.upstream_failures)
        errors.add_metric([up, "reset"], st.resets)
        errors.add_metric([up, "idle_timeout"], st.idle_timeouts)
        unmirrored = counter(
            "connections_not_mirrored", "connections --mirror-sample left out", ["upstream"]
        )
        unmirrored.add_metric([up], st.connections_not_mirrored)
        limited = counter(
            "max_connections_reached", "times accepting stopped at --max-connections", []
        )
        limited.add_metric([], st.max_connections_reached)
        families: list[Metric] = [conns, active, chunks, nbytes, errors, unmirrored, limited]
        mirrors = self.mirror_statistics()
        m_conns = counter("mirror_connections", "connections mirrored to a mirror", ["mirror"])
        m_lag = gauge(
            "mirror_lag_bytes",
            "bytes a mirror has not taken yet (its open connections)",
            ["mirror"],
        )
        m_sends = counter("mirror_requests", "sends to a mirror", ["mirror"])
        m_bytes = counter("mirror_bytes", "bytes sent to a mirror", ["mirror"])
        m_drop = counter("mirror_dropped_bytes", "bytes a mirror missed", ["mirror"])
        m_err = counter("mirror_errors", "mirror cuts", ["mirror"])
        m_live = gauge("mirror_connections_in_flight", "mirror connections open", ["mirror"])
        for name, ms in self.mirror_stats.items():
            m_sends.add_metric([name], ms.sends)
            m_bytes.add_metric([name], ms.bytes)
            m_drop.add_metric([name], ms.dropped_bytes)
            m_err.add_metric([name], ms.failures)
            m_live.add_metric([name], mirrors[name]["open"])
            m_conns.add_metric([name], ms.connections)
            m_lag.add_metric([name], mirrors[name]["lag_bytes"])
        families += [m_sends, m_bytes, m_drop, m_err, m_live, m_conns, m_lag]
        if self._driver is not None:
            pool = self._driver.pool
            lent = gauge("buffers_lent", "pool buffers lent now", [])
            lent.add_metric([], pool.size - pool.available)
            size = gauge("buffers", "pool buffers in all", [])
            size.add_metric([], pool.size)
            families += [lent, size]
        return families + ring_families("aiofused_proxy", self.ring_statistics())

    @property
    def backend(self) -> str:
        """What the ring's plain I/O runs on: ``"uring"`` or ``"asyncio"``."""
        assert self._ring is not None, "not started"
        return str(self._ring.backend)

    async def start(self) -> None:
        """Open the ring and the relay driver, bind (unless given a socket), accept."""
        cfg = self.config
        self._ring = Ring(1024, flags=SetupFlag.FUSED_REQ, backend=cfg.backend)
        await self._ring.__aenter__()
        self._driver = RelayDriver(buffer_size=cfg.buffer_size, pool_size=cfg.effective_pool_size)
        self._relay_file = self._ring.register_driver(self._driver)
        if self._listen_sock is None:
            self._listen_sock = make_listener(cfg.listen, cfg.backlog)
        self._listen_sock.setblocking(False)
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._accept_task = asyncio.create_task(self._accept_loop(), name="proxy-accept")
        if cfg.stats_interval > 0:
            loop = asyncio.get_running_loop()
            self._stats_handle = loop.call_later(cfg.stats_interval, self._log_stats)

    def _log_stats(self) -> None:
        loop = asyncio.get_running_loop()
        self._stats_handle = loop.call_later(self.config.stats_interval, self._log_stats)
        log.info("proxy_stats", **self.stats.as_dict(), mirrors=self.mirror_statistics())

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(timeout=0)

    async def serve_forever(self) -> None:
        """Wait until :meth:`aclose` (or a signal handler calling it) has finished."""
        await self._closed.wait()

    def stop_accepting(self) -> None:
        """Close the listener; open connections carry on."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listen_sock is not None and self._listen_sock.fileno() >= 0:
            ep = self.config.listen
            self._listen_sock.close()
            if ep.is_unix and self.config.workers == 1:
                with contextlib.suppress(OSError):
                    os.unlink(ep.path)

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop accepting, wait up to ``timeout`` (default ``shutdown_timeout``) for open
        connections to finish, close the rest, close the ring."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if timeout is None:
            timeout = self.config.shutdown_timeout
        self.stop_accepting()
        if self._accept_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None  # its CancelledError's traceback holds ``self``
        pending = set(self._conn_tasks)
        if pending and timeout > 0:
            log.info("proxy_draining", connections=len(pending), timeout=timeout)
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            log.info("proxy_closing_connections", connections=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
        if self._ring is not None:
            if self._relay_file is not None:
                with contextlib.suppress(Exception):
                    self._ring.unregister_driver(self._relay_file)
            await self._ring.close()
        if self._driver is not None:
            pool = self._driver.pool
            self.buffers_leaked = pool.size - pool.available
            if self.buffers_leaked:
                log.error("relay_buffers_leaked", count=self.buffers_leaked)
            else:
                self._driver.close_pool()
        if self._stats_handle is not None:
            self._stats_handle.cancel()
            self._stats_handle = None
        self._throttle.close()
        self._closed.set()

    # ---- accepting ---------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listen_sock is not None and self._slots is not None
        lsock = self._listen_sock
        slots = self._slots
        while True:
            if slots.locked() and self._limited_since is None:
                self._limit_reached()
            await slots.acquire()
            try:
                if self._limited_since is not None:
                    client, peer = await self._accept_at_limit(lsock)
                else:
                    client, peer = await loop.sock_accept(lsock)
            except BaseException:
                slots.release()
                raise
            # The connection is made in ``_spawn``: this frame lives as long as the
            # listener and must not keep the last connection alive until the next accept.
            self._spawn(client, peer)
            del client, peer

    def _limit_reached(self) -> None:
        loop = asyncio.get_running_loop()
        self.stats.max_connections_reached += 1
        self._limited_since = loop.time()
        self._limited_accepts = 0
        self._limited_logged = self._throttle.warning(
            "max_connections_reached",
            "",
            limit=self.config.max_connections,
            active=len(self._conn_tasks),
            times=self.stats.max_connections_reached,
        )

    async def _accept_at_limit(self, lsock: socket.socket) -> tuple[socket.socket, Any]:
        """Accept after the limit freed a slot; an empty backlog ends the limited state."""
        try:
            client, peer = lsock.accept()
        except (BlockingIOError, InterruptedError):
            since, self._limited_since = self._limited_since, None
            assert since is not None
            loop = asyncio.get_running_loop()
            if self._limited_logged:  # else its start was held back too (counted)
                log.info(
                    "max_connections_left",
                    limit=self.config.max_connections,
                    active=len(self._conn_tasks),
                    seconds=round(loop.time() - since, 3),
                    waited=self._limited_accepts,
                )
            return await loop.sock_accept(lsock)
        self._limited_accepts += 1
        client.setblocking(False)
        return client, peer

    def _spawn(self, client: socket.socket, peer: Any) -> None:
        self._next_id += 1
        conn = _Connection(self, self._next_id, peer)
        task = asyncio.create_task(self._serve(conn, client), name=f"proxy-conn-{conn.id}")
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.discard(task)
        assert self._slots is not None
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("connection_crashed", error=repr(task.exception()))

    # ---- one connection ----------------------------------------------------------------

    async def _serve(self, conn: _Connection, client_sock: socket.socket) -> None:
        cfg = self.config
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        loop = asyncio.get_running_loop()
        self._conns[conn.id] = conn
        outcome = "closed"
        try:
            client_sock.setblocking(False)
            if client_sock.family != socket.AF_UNIX:
                client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if cfg.mirrors:
                if mirror_sampled(conn.peer, cfg.mirror_sample, conn.id):
                    stats.connections_mirrored += 1
                    conn.mirrors = [
                        _Mirror(conn.id, stats, ep, self.mirror_stats[str(ep)], self._throttle)
                        for ep in cfg.mirrors
                    ]
                    for m in conn.mirrors:
                        m.mstats.connections += 1
                else:
                    stats.connections_not_mirrored += 1
            for m in conn.mirrors:
                m.task = asyncio.create_task(self._connect_mirror(m))
            try:
                upstream_sock = await _connect(cfg.upstream, cfg.connect_timeout)
            except (OSError, TimeoutError) as exc:
                stats.upstream_failures += 1
                self._throttle.warning(
                    "upstream_connect_failed",
                    str(cfg.upstream),
                    conn=conn.id,
                    peer=_peer(conn.peer),
                    upstream=str(cfg.upstream),
                    error=repr(exc),
                )
                await _close_politely(client_sock)
                outcome = "upstream_failed"
                return
            try:
                conn.client = await self.driver.attach(client_sock)
            except BaseException:
                upstream_sock.close()
                raise
            conn.upstream = await self.driver.attach(upstream_sock)
            log.debug("connection_open", conn=conn.id, peer=_peer(conn.peer))
            conn.last_active = loop.time()
            conn.activity = conn.activity_mark()[0]
            conn.idle_handle = loop.call_later(
                cfg.idle_timeout / _IDLE_CHECKS, self._idle_check, conn
            )
            conn.tasks = [
                asyncio.create_task(self._pump(conn, conn.client, conn.upstream, True)),
                asyncio.create_task(self._pump(conn, conn.upstream, conn.client, False)),
            ]
            outcome = await self._wait_pumps(conn)
        except asyncio.CancelledError:
            outcome = "shutdown" if self._closing else "cancelled"
            self._abort(conn)
            raise
        finally:
            # Cleanup must run to the end even if this task is cancelled (again) meanwhile:
            # the waits below are uncancellable, a cancellation is re-raised afterwards.
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            for task in conn.tasks:
                task.cancel()
            interrupted = await _wait_all(conn.tasks)
            graceful = outcome == "closed"  # an idle cut resets too
            if conn.client is None and client_sock.fileno() >= 0:
                client_sock.close()  # never attached: still ours
            for chan in (conn.client, conn.upstream):
                if chan is not None:
                    chan.close(abort=not graceful)
            for m in conn.mirrors:
                m.close(abort=not graceful)
            interrupted |= await _wait_all([m.task for m in conn.mirrors if m.task is not None])
            # A task that failed or was cancelled keeps its exception, whose traceback keeps
            # the coroutine's frame, which keeps ``conn`` (a pump's) or the mirror: drop the
            # finished tasks, or every reset, idle or shut-down connection would be a
            # reference cycle (with its channels and last lease) for the cyclic GC.
            conn.tasks = []
            for m in conn.mirrors:
                m.task = None
            self._conns.pop(conn.id, None)
            stats.connections_active -= 1
            up_bytes = conn.client.bytes_received if conn.client is not None else 0
            down_bytes = conn.upstream.bytes_received if conn.upstream is not None else 0
            log.debug(
                "connection_closed",
                conn=conn.id,
                outcome=outcome,
                bytes_up=up_bytes,
                bytes_down=down_bytes,
                mirrors={
                    str(m.endpoint): {"bytes": m.sent, "dropped_bytes": m.dropped}
                    for m in conn.mirrors
                },
            )
            if interrupted and outcome not in ("shutdown", "cancelled"):
                raise asyncio.CancelledError

    async def _connect_mirror(self, m: _Mirror) -> None:
        try:
            await m.connect(self.config.connect_timeout, self.config.mirror_lag)
        except (OSError, TimeoutError) as exc:
            m.fail("connect_failed", exc)

    async def _wait_pumps(self, conn: _Connection) -> str:
        """Wait for both pumps; the first failure aborts the connection."""
        pending: set[asyncio.Task[None]] = set(conn.tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.cancelled():
                    return "idle_timeout" if conn.idle_handle is None else "cancelled"
                exc = task.exception()
                if exc is not None:
                    side = "client" if task is conn.tasks[0] else "upstream"
                    if isinstance(exc, ConnectionResetError | BrokenPipeError):
                        self.stats.resets += 1
                        log.info("connection_reset", conn=conn.id, side=side, error=repr(exc))
                        return "reset"
                    if isinstance(exc, OSError):
                        self.stats.resets += 1
                        log.warning("connection_error", conn=conn.id, side=side, error=repr(exc))
                        return "error"
                    raise exc
        return "closed"

    def _abort(self, conn: _Connection) -> None:
        for task in conn.tasks:
            task.cancel()

    def _idle_check(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.config.idle_timeout
        now = loop.time()
        mark, in_flight = conn.activity_mark()
        if in_flight or mark != conn.activity:
            conn.activity = mark
            conn.last_active = now
        idle = now - conn.last_active
        if idle < timeout:
            delay = min(timeout / _IDLE_CHECKS, timeout - idle)
            conn.idle_handle = loop.call_later(delay, self._idle_check, conn)
            return
        conn.idle_handle = None
        self.stats.idle_timeouts += 1
        # The pumps end cancelled, and _serve resets both sides (and the mirrors).
        log.info(
            "idle_timeout",
            conn=conn.id,
            peer=_peer(conn.peer),
            idle=round(idle, 3),
            timeout=timeout,
            bytes_up=conn.client.bytes_received if conn.client is not None else 0,
            bytes_down=conn.upstream.bytes_received if conn.upstream is not None else 0,
            action="reset",
        )
        for task in conn.tasks:
            task.cancel()

    async def _pump(
        self, conn: _Connection, src: RelayChannel, dst: RelayChannel, upstream_dir: bool
    ) -> None:
        """Relay ``src`` to ``dst`` (and the mirrors, client→upstream) until end of stream
        (see :class:`~aiofused_drivers.relay._pipe.Pipe`); a reset or error raises ``OSError``."""
        loop = asyncio.get_running_loop()
        pipe = Pipe(self, conn, src, dst, upstream_dir)
        done = loop.create_future()
        try:
            pipe.start(done)
            try:
                await done
            except asyncio.CancelledError:
                pipe.abort()
                while pipe.in_flight:  # through any cancellation: the buffer comes back
                    stopped = loop.create_future()
                    pipe.wait_stopped(stopped)
                    with contextlib.suppress(asyncio.CancelledError):
                        await stopped
                raise
        finally:
            pipe.close()
        pipe.raise_error()

    def _settle_first(self, pipe: Pipe, cmd: Any, n: int) -> asyncio.Task[None]:
        return asyncio.ensure_future(self._settle_then_send(pipe, cmd, n))

    async def _settle_then_send(self, pipe: Pipe, cmd: Any, n: int) -> None:
        conn = pipe.conn
        assert isinstance(conn, _Connection)
        await self._settle_mirrors(conn)
        pipe.settled(cmd, n)

    async def _settle_mirrors(self, conn: _Connection) -> None:
        """At the first byte, wait briefly for mirrors still connecting (they started with
        the upstream's connect); one not connected by then is cut."""
        connecting = [m.task for m in conn.mirrors if m.task is not None and not m.task.done()]
        if connecting:
            await asyncio.wait(connecting, timeout=max(self.config.mirror_grace, 0.1))
        self._cut_unconnected(conn)

    @staticmethod
    def _cut_unconnected(conn: _Connection) -> None:
        for m in conn.mirrors:
            if not m.failed and m.sock is None:
                m.fail("not_connected_by_first_byte")


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


# ---- process plumbing ----------------------------------------------------------------


def _new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


async def _serve_until_signalled(config: ProxyConfig, sock: socket.socket | None) -> int:
    loop = asyncio.get_running_loop()
    server = ProxyServer(config, sock=sock)
    metrics = None
    if config.metrics is not None:
        from aiofused_drivers._metrics import MetricsServer

        metrics = MetricsServer(*config.metrics, server.metric_families)
        await metrics.start()
    try:
        await server.start()
    except BaseException:
        if metrics is not None:
            await metrics.aclose()
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "proxy_listening",
        address=_format_address(server.address),
        upstream=str(config.upstream),
        mirrors=[str(m) for m in config.mirrors],
        backend=server.backend,
        loop=type(loop).__module__.split(".")[0],
        pid=os.getpid(),
    )
    await stop.wait()
    log.info("proxy_shutdown", pid=os.getpid(), connections=server.stats.connections_active)
    closing = asyncio.ensure_future(server.aclose())
    stop.clear()
    forced = asyncio.ensure_future(stop.wait())
    await asyncio.wait({closing, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not closing.done():
        # A second signal: close the open connections now instead of letting them finish.
        log.info("proxy_shutdown_forced", pid=os.getpid())
        for task in list(server._conn_tasks):
            task.cancel()
    await closing
    if metrics is not None:
        await metrics.aclose()
    forced.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await forced
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)  # a late signal must not kill a clean exit
    log.info(
        "proxy_stopped",
        pid=os.getpid(),
        **server.stats.as_dict(),
        mirrors=server.mirror_statistics(),
    )
    return 0


def _format_address(addr: Any) -> str:
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{addr}"


def _worker_main(config: ProxyConfig, sock: socket.socket, log_level: str, fmt: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    # Workers share the parent's stderr: buffer each log line so that it reaches the
    # pipe in one write and lines of different workers never interleave.
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)  # noqa: SIM115
    configure_logging(log_level, fmt)
    loop = _new_event_loop(config.loop)
    try:
        code = loop.run_until_complete(_serve_until_signalled(config, sock))
    finally:
        loop.close()
    sys.exit(code)


def run_proxy(config: ProxyConfig, *, log_level: str = "info", log_format: str = "console") -> int:
    """Run the proxy in the foreground until SIGINT/SIGTERM; return the exit status."""
    config.validate()
    if config.workers == 1:
        loop = _new_event_loop(config.loop)
        try:
            return loop.run_until_complete(_serve_until_signalled(config, None))
        finally:
            loop.close()
    return _run_workers(config, log_level, log_format)


def _run_workers(config: ProxyConfig, log_level: str, log_format: str) -> int:
    ctx = multiprocessing.get_context("fork")
    # One listener for all the workers, without SO_REUSEPORT: the address is this
    # instance's alone (see "Workers" above).  Port 0 is resolved here, once.
    listener = make_listener(config.listen, config.backlog)
    if not config.listen.is_unix:
        port = listener.getsockname()[1]
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, port=port))
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(config, listener, log_level, log_format),
            name=f"aiofused-proxy-{i}",
        )
        for i in range(config.workers)
    ]
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        # The workers hold it now; once the last has closed its copy (at shutdown), the
        # port refuses connections instead of queueing them for nobody.
        listener.close()
        log.info(
            "proxy_workers",
            workers=config.workers,
            address=str(config.listen),
            pids=[p.pid for p in procs],
        )
        codes = []
        for p in procs:
            while p.exitcode is None:
                p.join(0.2)
                if p.exitcode is not None and p.exitcode != 0 and not stopping:
                    log.error("proxy_worker_died", pid=p.pid, exitcode=p.exitcode)
                    forward(signal.SIGTERM, None)
            codes.append(p.exitcode)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        listener.close()
        if config.listen.is_unix:
            with contextlib.suppress(OSError):
                os.unlink(config.listen.path)
    return 0 if all(c == 0 for c in codes) else 1


# ---- command line ----------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``proxy`` subcommand on ``subparsers`` (``args.func(args)`` runs it).

    The ``proxy`` entry point of the ``aiofused.commands`` group (see :mod:`aiofused.cli`).
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        "proxy",
        help="zero-copy mirroring TCP proxy (fused commands on the relay driver)",
        description=(
            "Relay every connection on --listen to --upstream, and copy the client's bytes "
            "to each --mirror (traffic shadowing). Payload is received into pooled buffers "
            "and sent from them by fused commands: no Python-level copy."
        ),
    )
    p.add_argument(
        "--listen", required=True, metavar="HOST:PORT|unix:PATH", help="where clients connect"
    )
    p.add_argument(
        "--upstream", required=True, metavar="HOST:PORT|unix:PATH", help="the real server"
    )
    p.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST:PORT|unix:PATH",
        help="shadow upstream (repeatable); never slows the main path",
    )
    p.add_argument(
        "--workers",
        type=int_arg(1),
        default=1,
        help="worker processes sharing one listening socket (the address is this "
        "instance's alone: a second instance on it fails to start)",
    )
    p.add_argument(
        "--max-connections", type=int_arg(1), default=1024, help="open connections per worker"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="reset (RST both sides) a connection on which no byte moved either way "
        "for this long (a send the peer still takes is not idle)",
    )
    p.add_argument(
        "--buffer-size",
        type=size_arg(1024),
        default="1M",
        metavar="SIZE",
        help="pool buffer size: the most one fused command lends",
    )
    p.add_argument(
        "--pool-size",
        type=int_arg(0),
        default=0,
        help="buffers per worker (0: 4 x --max-connections)",
    )
    p.add_argument(
        "--mirror-lag",
        type=size_arg(0),
        default="8M",
        metavar="SIZE",
        help="how far a mirror may fall behind before it is cut: its socket send buffer "
        "(above 2 x net.core.wmem_max, TCP autotuning decides)",
    )
    p.add_argument(
        "--mirror-grace",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long the main path may wait for a lagging mirror per chunk (default 0)",
    )
    p.add_argument(
        "--mirror-sample",
        type=_percent_arg,
        default=100.0,
        metavar="PERCENT",
        help="mirror this percentage (0-100) of the connections, chosen by a stable hash "
        "of the client's address: a connection is mirrored whole or not at all",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting to the upstream after this long",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, wait this long for open connections",
    )
    p.add_argument(
        "--warn-interval",
        type=_seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="log a repeated warning (a dead mirror or upstream, the connection limit) at "
        "most once per this interval, with the count of those held back (0: every one)",
    )
    p.add_argument(
        "--stats-interval",
        type=_seconds_arg,
        default=0.0,
        metavar="SECONDS",
        help="log the counters (proxy_stats: connections, bytes, per mirror bytes sent, "
        "dropped and lag) every this many seconds (0: only at exit)",
    )
    p.add_argument(
        "--backend", choices=("auto", "uring", "asyncio"), default="auto", help="ring backend"
    )
    p.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop"
    )
    p.add_argument(
        "--metrics",
        type=host_port_arg,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs --workers 1)",
    )
    # SUPPRESS: a --log-format/--log-level given to the main parser is not overwritten.
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=argparse.SUPPRESS,
        help="default: the global --log-format (console)",
    )
    p.add_argument(
        "--log-level",
        dest="proxy_log_level",
        type=log_level_arg,
        default=None,
        help="default: the global --log-level if given, else info (connection failures, "
        "resets, mirror cuts, shutdown)",
    )
    p.set_defaults(func=_cli_proxy)
    return p


def _percent_arg(text: str) -> float:
    """An argparse ``type=``: a percentage, 0-100 (``12.5`` or ``12.5%``)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a percentage, 0-100")
    return value


def _seconds_arg(text: str) -> float:
    """An argparse ``type=``: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected seconds, 0 or more")
    return value


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    def endpoint(option: str, text: str) -> Endpoint:
        try:
            return Endpoint.parse(text)
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None

    return ProxyConfig(
        listen=endpoint("--listen", args.listen),
        upstream=endpoint("--upstream", args.upstream),
        mirrors=tuple(endpoint("--mirror", m) for m in args.mirror),
        workers=args.workers,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        buffer_size=args.buffer_size,
        pool_size=args.pool_size,
        connect_timeout=args.connect_timeout,
        mirror_lag=args.mirror_lag,
        mirror_grace=args.mirror_grace,
        mirror_sample=args.mirror_sample,
        shutdown_timeout=args.shutdown_timeout,
        backend=args.backend,
        loop=args.loop,
        metrics=args.metrics,
        warn_interval=args.warn_interval,
        stats_interval=args.stats_interval,
    )


def _cli_proxy(args: argparse.Namespace) -> int:
    fmt = getattr(args, "log_format", "console")
    # A server logs its life at info by default; an explicit level wins, here or before
    # the subcommand (the main parser's own default is "warning").
    level = args.proxy_log_level or getattr(args, "log_level", "warning")
    if args.proxy_log_level is None and level == "warning":
        level = "info"
    configure_logging(level, fmt)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        raise CommandError(str(exc), status=2) from None
    if config.backend == "uring":
        probe = get_backend_class("uring").probe()
        if not probe.available:
            raise CommandError(
                f"--backend uring: io_uring unavailable here ({probe.reason}); "
                "use --backend auto or asyncio"
            )
    try:
        return run_proxy(config, log_level=level, log_format=fmt)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.ENOENT):
            raise CommandError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
        log.error("proxy_failed", error=repr(exc), errno=errno.errorcode.get(exc.errno or 0))
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m aiofused_drivers.relay.proxy ...``: the ``proxy`` subcommand on its own."""
    parser = ArgumentParser(prog="aiofused")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["proxy", *(sys.argv[1:] if argv is None else argv)])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as exc:
        sys.stderr.write(f"aiofused proxy: error: {exc}\n")
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
