"""Connection dispatch for ``nbd serve --workers N``.

Workers that share one listening socket balance badly: every worker is woken for a
new connection, and whichever drains the backlog first takes a whole burst (nbdcopy
opens its four connections at once, so one worker often got all of them).  Instead
the parent process keeps the listener, accepts, and hands each connection to the
worker serving the fewest, over a unix socketpair (``SCM_RIGHTS``).  A worker writes
one byte back on that socketpair when a connection it was given ends.

Wire format on a worker's channel: parent -> worker, one byte per passed fd (the fd
rides in the ancillary data); worker -> parent, ``b"x"`` per ended connection.

A worker that dies while the server runs (a signal, an exit of its own) is logged
(``nbd.worker_died``) and replaced by a new one (``nbd.worker_restarted``); the
connections it served are gone, the others go on.  If workers keep dying (more than
:data:`MAX_RESTARTS` within :data:`RESTART_WINDOW` seconds), the server gives up:
every worker is stopped and the exit status is non-zero (1, or the dead worker's own
non-zero code), never 0 after a worker died.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from aiofused.driver import get_logger

__all__ = ["Dispatcher", "recv_connections", "report_ended"]

log = get_logger(__name__)

#: Connections handed over per ``recvmsg`` at most.
_BATCH = 16
#: Worker restarts allowed within RESTART_WINDOW seconds before the server gives up.
MAX_RESTARTS = 5
RESTART_WINDOW = 30.0

#: ``spawn(close)``: fork a worker and return (pid, the parent's end of its channel);
#: the child closes the objects in ``close`` (the parent's sockets) first.
Spawn = Callable[[Sequence[Any]], tuple[int, socket.socket]]


def recv_connections(channel: socket.socket) -> list[socket.socket] | None:
    """Worker side: the connections waiting on ``channel`` (``[]`` if none yet), or
    ``None`` once the parent is gone."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(channel, _BATCH, _BATCH)
    except (BlockingIOError, InterruptedError):
        return []
    except OSError as e:
        log.warning("nbd.channel_failed", error=str(e))
        return None
    if not msg and not fds:
        return None
    socks = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def report_ended(channel: socket.socket) -> None:
    """Worker side: tell the parent one connection it handed over has ended."""
    with contextlib.suppress(OSError):
        channel.send(b"x")


class Dispatcher:
    """Parent side: accept on ``listener``, pass each connection to the least busy
    worker, until SIGTERM/SIGINT (forwarded to the workers) and every worker exited.

    ``channels[i]`` is the parent's end of worker ``pids[i]``'s socketpair; with
    ``spawn``, a worker that dies is replaced (module doc), else the server stops.
    """

    def __init__(
        self,
        listener: socket.socket,
        channels: Sequence[socket.socket],
        pids: Sequence[int],
        spawn: Spawn | None = None,
    ) -> None:
        self.listener: socket.socket | None = listener
        self.channels = list(channels)
        self.pids = list(pids)
        #: Live connections per worker, as far as the parent knows.
        self.load = [0] * len(pids)
        self._alive = [True] * len(pids)
        self._next = 0
        self._status = 0
        self._spawn = spawn
        self._restarts: list[float] = []
        self._sel = selectors.DefaultSelector()
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def run(self) -> int:
        """Serve until every worker exited; return the first non-zero exit code (or 0)."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake = (wake_r, wake_w)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        sel = self._sel
        assert self.listener is not None
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, self._accept)
        sel.register(wake_r, selectors.EVENT_READ, lambda: _drain(wake_r))
        for i, ch in enumerate(self.channels):
            ch.setblocking(False)
            sel.register(ch, selectors.EVENT_READ, _bind(self._on_channel, i))
        try:
            while any(self._alive):
                for key, _ in sel.select(timeout=0.5):
                    key.data()
                self._reap_children()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            self._stop_accepting()
            for ch in self.channels:
                ch.close()
            wake_r.close()
            wake_w.close()
            sel.close()
        return self._status

    # ---- events -----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_accepting()
        for pid, alive in zip(self.pids, self._alive, strict=True):
            if alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def _stop_accepting(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _accept(self) -> None:
        while self.listener is not None:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("nbd.accept_failed", error=str(e))
                    return
                raise
            with conn:
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        n = len(self.pids)
        order = sorted(
            (i for i in range(n) if self._alive[i]),
            key=lambda i: (self.load[i], (i - self._next) % n),
        )
        for i in order:
            try:
                socket.send_fds(self.channels[i], [b"c"], [conn.fileno()])
            except OSError as e:
                log.warning("nbd.handover_failed", worker=self.pids[i], error=str(e))
                continue
            self.load[i] += 1
            self._next = (i + 1) % n
            log.debug("nbd.dispatched", worker=self.pids[i], load=self.load)
            return
        log.error("nbd.no_worker", reason="every worker refused the connection")

    def _on_channel(self, i: int) -> None:
        try:
            data = self.channels[i].recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.channels[i])
            return
        self.load[i] = max(0, self.load[i] - len(data))

    def _reap_children(self) -> None:
        for i, pid in enumerate(self.pids):
            if not self._alive[i]:
                continue
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, st = pid, 0
            if done == 0:
                continue
            self._alive[i] = False
            code = os.waitstatus_to_exitcode(st)
            if self.listener is None:  # shutting down: workers are expected to go
                if code > 0 and not self._status:
                    self._status = code
                continue
            how = {"signal": signal.Signals(-code).name} if code < 0 else {"code": code}
            log.error("nbd.worker_died", worker=pid, connections=self.load[i], **how)
            if not self._restart(i):
                if not self._status:
                    self._status = code if code > 0 else 1
                self._stop_accepting()
                self._on_signal(signal.SIGTERM, None)

    def _restart(self, i: int) -> bool:
        """Replace dead worker ``i``; False if restarts are not possible or too many."""
        if self._spawn is None:
            return False
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
        if len(self._restarts) >= MAX_RESTARTS:
            log.error(
                "nbd.giving_up",
                reason=f"{len(self._restarts)} worker restarts within {RESTART_WINDOW:.0f}s",
            )
            return False
        self._restarts.append(now)
        old = self.channels[i]
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(old)
        old.close()
        close: list[Any] = [self.listener, self._sel, *self.channels]
        if self._wake is not None:
            close.extend(self._wake)
        try:
            pid, channel = self._spawn(close)
        except OSError as e:
            log.error("nbd.worker_restart_failed", error=str(e))
            return False
        channel.setblocking(False)
        self.channels[i] = channel
        self._sel.register(channel, selectors.EVENT_READ, _bind(self._on_channel, i))
        dead = self.pids[i]
        self.pids[i] = pid
        self.load[i] = 0
        self._alive[i] = True
        log.warning("nbd.worker_restarted", worker=pid, replaces=dead)
        return True


def _bind(fn: Callable[[int], None], i: int) -> Callable[[], None]:
    return lambda: fn(i)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(512):
            pass
