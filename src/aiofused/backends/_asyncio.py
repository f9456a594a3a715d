"""The asyncio backend: leaf I/O on the running loop, no kernel ring needed.

Theory of operation
-------------------
It does what io_uring does for each op, with the loop's primitives:

* sockets (SEND, RECV, SEND_ZC) and non-blocking pipes/ttys: try the syscall at once
  with ``MSG_DONTWAIT``; on EAGAIN park the op in a per-fd FIFO watched by one
  ``add_reader``/``add_writer`` (io_uring's poll arming), and retry on readiness.
  ``MSG_WAITALL`` is honoured by retrying until the whole length moved.
* regular files (buffered, explicit offset): READ/WRITE first try ``preadv``/``pwritev``
  with ``RWF_NOWAIT`` on the loop, as the kernel issues with ``IOCB_NOWAIT``.  A full
  transfer (or EOF) completes from there; on EAGAIN or a short count the rest of the
  transfer goes to the thread pool, which retries short counts until EOF.  A filesystem
  that refuses ``RWF_NOWAIT`` (EOPNOTSUPP/EINVAL) is remembered per backend and goes
  straight to the pool.  ``O_DIRECT`` and synchronous writes always go to the pool.
* block devices, blocking descriptors and the rest: a small thread pool runs
  ``preadv``/``pwritev``/``fsync`` (io_uring's io-wq), so the loop never blocks.

Completions are delivered with ``loop.call_soon`` (or ``call_soon_threadsafe`` from
the pool), never inside ``start``/``cancel``.  Cancel removes a parked op at once
(-ECANCELED), cancels a pool job that has not started, and answers -EALREADY for one
that is running or that already moved bytes inline: the ring keeps holding its buffer
until it completes.  An op finished inline answers -ENOENT, as any finished op.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
from collections.abc import Callable
from typing import Any, ClassVar

from aiofused._abi import (
    EALREADY,
    ECANCELED,
    ENOENT,
    IO_FAILED,
    IORING_FSYNC_DATASYNC,
    CqeFlag,
    Op,
)
from aiofused._core.opdef import OPDEFS
from aiofused._log import get_logger
from aiofused.backends._base import Backend, BackendOp, Completion, IoOp, ProbeResult

__all__ = ["BACKEND", "AsyncioBackend"]

_MSG_WAITALL = socket.MSG_WAITALL
_MSG_DONTWAIT = socket.MSG_DONTWAIT
_MSG_TRUNC = socket.MSG_TRUNC
_SOCK_OPS = frozenset({Op.SEND, Op.RECV, Op.SEND_ZC})
_SOCK_NONEMPTY = int(CqeFlag.SOCK_NONEMPTY)
# 0 where the platform has no RWF_NOWAIT: every file op then goes to the pool.
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_RWF_SYNC_ANY: int = getattr(os, "RWF_DSYNC", 0) | getattr(os, "RWF_SYNC", 0)
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
# O_SYNC includes the O_DSYNC bit on Linux.
_O_DSYNC: int = getattr(os, "O_DSYNC", 0)
# Errors meaning "this file does not do RWF_NOWAIT" (EINVAL: some filesystems' writes).
_NOWAIT_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EINVAL})

log = get_logger("aiofused.backend.asyncio")

# Handle states.
_NEW, _PARKED, _THREAD, _DONE = range(4)


class _Op(BackendOp):
    __slots__ = (
        "cflags",
        "cfut",
        "complete",
        "done",
        "io",
        "owned",
        "polled",
        "sock",
        "state",
        "write",
    )

    def __init__(self, io: IoOp, complete: Completion) -> None:
        self.io = io
        self.complete = complete
        self.state = _NEW
        self.done = 0
        #: CQE flags of the result (SOCK_NONEMPTY).
        self.cflags = 0
        #: A blocking stream fd read or written with RWF_NOWAIT on readiness.
        self.polled = False
        self.sock: socket.socket | None = None
        self.owned = False
        self.write = False
        self.cfut: concurrent.futures.Future[int] | None = None


def _errno_res(exc: OSError) -> int:
    return -(exc.errno or errno.EIO)


class AsyncioBackend(Backend):
    """Plain ops on the asyncio loop (uvloop or the default loop)."""

    name: ClassVar[str] = "asyncio"
    _OPS: ClassVar[frozenset[Op]] = frozenset(d.op for d in OPDEFS.values() if d.asyncio)

    #: Try regular-file READ/WRITE inline with RWF_NOWAIT first (False: always the pool).
    _NOWAIT_DEFAULT: ClassVar[bool] = bool(_RWF_NOWAIT)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._parked: dict[tuple[int, bool], collections.deque[_Op]] = {}
        self._live = 0
        self._nowait = self._NOWAIT_DEFAULT
        #: (st_dev, write) pairs whose files refused RWF_NOWAIT.
        self._no_nowait: set[tuple[int, bool]] = set()
        #: File READ/WRITEs completed on the loop without the pool.
        self.inline_ops = 0
        #: Jobs handed to the thread pool (including the rest of a short inline op).
        self.pool_ops = 0
        #: File READ/WRITEs that moved some bytes inline and finished in the pool.
        self.partial_ops = 0

    @classmethod
    def probe(cls) -> ProbeResult:
        """Always available."""
        return ProbeResult(cls.name, True, "", cls._OPS)

    @property
    def supported_ops(self) -> frozenset[Op]:
        """The op table's ``asyncio`` ops (leaf I/O but the ``_FIXED`` forms)."""
        return self._OPS

    def in_flight(self) -> int:
        """Ops started and not yet completed."""
        return self._live

    # ---- start -----------------------------------------------------------------

    def start(self, op: IoOp, complete: Completion) -> BackendOp:
        """Begin ``op``; ``complete`` runs later on the loop."""
        h = _Op(op, complete)
        self._live += 1
        code = op.opcode
        if code in _SOCK_OPS:
            sock = op.file if isinstance(op.file, socket.socket) else None
            if sock is None:
                try:
                    sock = socket.socket(fileno=op.fd)
                except OSError as exc:
                    self._finish(h, _errno_res(exc))
                    return h
                h.owned = True
            h.sock = sock
            h.write = code != Op.RECV
            self._attempt(h)
            return h
        if code == Op.FALLOCATE:
            self._to_thread(h, _fallocate, op.fd, op.rw_flags, op.offset, op.nbytes)
            return h
        if code == Op.FSYNC:
            datasync = bool(op.rw_flags & IORING_FSYNC_DATASYNC)
            self._to_thread(h, _fsync, op.fd, datasync)
            return h
        h.write = code == Op.WRITE
        try:
            st = os.fstat(op.fd)
            seekable = stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
            blocking = seekable or os.get_blocking(op.fd)
        except OSError as exc:
            self._finish(h, _errno_res(exc))
            return h
        if op.rw_flags:
            err = _rw_flags_error(op.rw_flags, stat.S_ISREG(st.st_mode))
            if err:
                self._finish(h, err)
                return h
        if self._nowait and op.offset >= 0 and stat.S_ISREG(st.st_mode):
            self._start_file(h, st.st_dev)
        elif blocking and not seekable and _RWF_NOWAIT:
            # A blocking pipe, socket or eventfd: readiness and RWF_NOWAIT, as io_uring
            # polls it whatever its O_NONBLOCK, so that a cancel or a LINK_TIMEOUT can
            # stop it (issue 12, class 20); the pool only if RWF_NOWAIT is refused.
            h.polled = True
            self._attempt(h)
        elif blocking:
            fn = _pwrite if h.write else _pread
            # A stream (pipe, tty, socket) has no position: the offset is ignored, as the
            # kernel does for FMODE_STREAM files.
            offset = op.offset if seekable else -1
            self._to_thread(h, fn, op.fd, op.buf, offset, op.rw_flags)
        else:
            self._attempt(h)
        return h

    # ---- regular files: inline RWF_NOWAIT, then the pool ------------------------------

    def _start_file(self, h: _Op, dev: int) -> None:
        """READ/WRITE on a regular file: inline without blocking, else the pool."""
        io = h.io
        write = h.write
        key = (dev, write)
        if key not in self._no_nowait and not (write and io.rw_flags & _RWF_SYNC_ANY):
            try:
                fl = fcntl.fcntl(io.fd, fcntl.F_GETFL)
            except OSError as exc:
                self._finish(h, _errno_res(exc))
                return
            # O_DIRECT would wait for the device on the loop, a sync write for the flush.
            if not (fl & _O_DIRECT or (write and fl & _O_DSYNC)):
                res = self._inline(h, key)
                if res is not None:
                    self.inline_ops += 1
                    self._finish(h, res)
                    return
                if h.done:
                    self.partial_ops += 1
        self._to_thread(h, _prw_rest, io.fd, io.buf, io.offset, io.rw_flags, write, h.done)

    def _inline(self, h: _Op, key: tuple[int, bool]) -> int | None:
        """Move what the page cache allows now; return the result, or None to punt the rest."""
        io = h.io
        buf = io.buf
        assert buf is not None
        want = len(buf)
        fd = io.fd
        flags = io.rw_flags | _RWF_NOWAIT
        caller_nowait = io.rw_flags & _RWF_NOWAIT  # then EAGAIN and short counts are final
        while True:
            done = h.done
            view = buf if not done else buf[done:]
            try:
                if h.write:
                    n = os.pwritev(fd, [view], io.offset + done, flags)
                else:
                    n = os.preadv(fd, [view], io.offset + done, flags)
            except BlockingIOError:
                if caller_nowait:
                    return done if done else -errno.EAGAIN
                return None
            except OverflowError:  # an offset or flags no off_t/int holds, as -EINVAL
                return done if done else -errno.EINVAL
            except OSError as exc:
                if done:
                    return done
                if caller_nowait and exc.errno == errno.EOPNOTSUPP:
                    return -errno.EAGAIN  # a file without nowait I/O: io_uring's answer
                if exc.errno in _NOWAIT_REFUSED and not caller_nowait:
                    if not io.rw_flags:  # RWF_NOWAIT alone was refused: remember the fs
                        self._no_nowait.add(key)
                        log.debug("nowait_refused", fd=fd, write=h.write, errno=exc.errno)
                    return None
                return _errno_res(exc)
            finally:
                if view is not buf:
                    view.release()
            h.done = done + n
            if n == 0 or h.done >= want or caller_nowait:
                return h.done

    # ---- readiness path ----------------------------------------------------------

    def _attempt(self, h: _Op) -> bool:
        """Try the syscall; finish, or park on EAGAIN.  True if it finished."""
        io = h.io
        buf = io.buf
        assert buf is not None
        want = io.nbytes
        view = buf if not h.done else buf[h.done :]
        try:
            sock = h.sock
            if sock is not None:
                flags = (io.rw_flags & ~_MSG_WAITALL) | _MSG_DONTWAIT
                if h.write:
                    n = sock.send(view, flags)
                elif io.rw_flags & _MSG_WAITALL and _is_record_socket(sock):
                    # MSG_TRUNC tells a truncated record, which io_uring fails (its
                    # MSG_WAITALL and MSG_TRUNC check): report it so (issue 12, class 10).
                    left = want - h.done
                    n = sock.recv_into(view, left, flags | _MSG_TRUNC)
                    if n > left and not io.rw_flags & _MSG_TRUNC:
                        n = left
                        h.cflags |= IO_FAILED
                else:
                    n = sock.recv_into(view, want - h.done, flags)
            elif h.polled:
                if h.write:
                    n = os.pwritev(io.fd, [view], -1, _RWF_NOWAIT)
                else:
                    n = os.preadv(io.fd, [view], -1, _RWF_NOWAIT)
            elif h.write:
                n = os.write(io.fd, view)
            else:
                n = os.readv(io.fd, [view])
        except (BlockingIOError, InterruptedError):
            nowait = _MSG_DONTWAIT if h.sock is not None else _RWF_NOWAIT
            if io.rw_flags & nowait:
                # The caller asked not to wait (the kernel's REQ_F_NOWAIT): no parking.
                self._finish(h, h.done if h.done else -errno.EAGAIN)
                return True
            if h.state != _PARKED:
                self._park(h)
            return False
        except OSError as exc:
            if h.polled and exc.errno == errno.EOPNOTSUPP and not h.done:
                h.polled = False  # no RWF_NOWAIT on this file: a blocking call in the pool
                fn = _pwrite if h.write else _pread
                self._to_thread(h, fn, io.fd, io.buf, -1, io.rw_flags)
                return True
            self._finish(h, h.done if h.done else _errno_res(exc))
            return True
        finally:
            if view is not buf:
                view.release()
        h.done += n
        sock = h.sock
        if n and h.done < want and io.rw_flags & _MSG_WAITALL and sock is not None:
            if h.state != _PARKED:
                self._park(h)
            return False
        if sock is not None and not h.write and n and h.done == want:
            h.cflags |= _sock_nonempty(sock)
        self._finish(h, h.done)
        return True

    def _park(self, h: _Op) -> None:
        key = (h.io.fd, h.write)
        q = self._parked.get(key)
        if q is None:
            q = self._parked[key] = collections.deque()
            if h.write:
                self.loop.add_writer(key[0], self._on_ready, key)
            else:
                self.loop.add_reader(key[0], self._on_ready, key)
        q.append(h)
        h.state = _PARKED

    def _unwatch(self, key: tuple[int, bool]) -> None:
        del self._parked[key]
        if key[1]:
            self.loop.remove_writer(key[0])
        else:
            self.loop.remove_reader(key[0])

    def _on_ready(self, key: tuple[int, bool]) -> None:
        q = self._parked.get(key)
        if not q:
            return
        for _ in range(len(q)):
            h = q[0]
            if not self._attempt(h):
                break  # still EAGAIN: the others would see the same
            q.popleft()
        if not q:
            self._unwatch(key)

    # ---- thread path -------------------------------------------------------------

    def _to_thread(self, h: _Op, fn: Callable[..., int], *args: object) -> None:
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=8, thread_name_prefix="aiofused-io"
            )
        h.state = _THREAD
        self.pool_ops += 1
        fut = pool.submit(fn, *args)
        h.cfut = fut
        loop = self.loop
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._thread_done, h, f))

    def _thread_done(self, h: _Op, fut: concurrent.futures.Future[int]) -> None:
        h.cfut = None  # the future's done callback refers to h: no cycle once done
        if fut.cancelled():
            res = ECANCELED
        else:
            exc = fut.exception()
            if exc is None:
                res = fut.result()
            elif isinstance(exc, OSError):
                res = _errno_res(exc)
            else:
                res = -errno.EIO
        self._finish(h, res, defer=False)

    # ---- completion and cancel -------------------------------------------------------

    def _finish(self, h: _Op, res: int, defer: bool = True) -> None:
        if h.state == _DONE:
            return
        h.state = _DONE
        sock = h.sock
        if sock is not None:
            h.sock = None
            if h.owned:
                sock.detach()
        if defer:
            self.loop.call_soon(self._deliver, h, res)
        else:
            self._deliver(h, res)

    def _deliver(self, h: _Op, res: int) -> None:
        self._live -= 1
        if h.io.opcode == Op.SEND_ZC:
            h.complete(res, CqeFlag.MORE)
            h.complete(0, CqeFlag.NOTIF)  # the data was copied: the buffer is free now
        else:
            h.complete(res, h.cflags)

    def cancel(self, handle: BackendOp, on_result: Callable[[int], None]) -> None:
        """Cancel a parked op or a pool job that has not started."""
        assert isinstance(handle, _Op)
        h = handle
        if h.state == _PARKED:
            key = (h.io.fd, h.write)
            q = self._parked.get(key)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(h)
                if not q:
                    self._unwatch(key)
            self._finish(h, h.done if h.done else ECANCELED)
            res = 0
        elif h.state == _THREAD:
            assert h.cfut is not None
            # Bytes already moved inline: the op is running, it completes with its count.
            res = 0 if not h.done and h.cfut.cancel() else EALREADY
        elif h.state == _DONE:
            res = ENOENT
        else:
            res = EALREADY
        self.loop.call_soon(on_result, res)

    async def aclose(self) -> None:
        """Stop the thread pool (every op has completed by now)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


#: ``RWF_*`` bits the kernel knows (HIPRI, DSYNC, SYNC, NOWAIT, APPEND, NOAPPEND, ATOMIC,
#: DONTCACHE); ATOMIC and DONTCACHE need a file that supports them.
_RWF_KNOWN = 0xFF
_RWF_HIPRI = 0x01
_RWF_FILE_ONLY = 0x40 | 0x80


def _rw_flags_error(flags: int, regular: bool) -> int:
    """What io_uring answers for READ/WRITE ``rw_flags`` before it moves a byte: unknown
    bits -EOPNOTSUPP; RWF_HIPRI -EINVAL (this ring is not IOPOLL); ATOMIC/DONTCACHE on
    a pipe, socket or eventfd -EOPNOTSUPP (on a regular file ``preadv2`` decides)."""
    if flags & ~_RWF_KNOWN:
        return -errno.EOPNOTSUPP
    if flags & _RWF_HIPRI:
        return -errno.EINVAL
    if not regular and flags & _RWF_FILE_ONLY:
        return -errno.EOPNOTSUPP
    return 0


def _is_record_socket(sock: socket.socket) -> bool:
    """A datagram or seqpacket socket (where MSG_TRUNC reports a record's length)."""
    return sock.type in (socket.SOCK_SEQPACKET, socket.SOCK_DGRAM)


def _sock_nonempty(sock: socket.socket) -> int:
    """``CqeFlag.SOCK_NONEMPTY`` if a stream socket that just filled a RECV's buffer
    still holds data (the kernel's ``msg_inq``; its datagram and seqpacket sockets do
    not report it), else 0.  A RECV that got less than it asked for drained it."""
    if sock.type != socket.SOCK_STREAM:
        return 0
    try:
        left = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0
    return _SOCK_NONEMPTY if left > 0 else 0


def _pread(fd: int, buf: memoryview, offset: int, flags: int) -> int:
    if offset < 0:
        return os.readv(fd, [buf])
    if flags:
        return os.preadv(fd, [buf], offset, flags)
    return os.preadv(fd, [buf], offset)


def _pwrite(fd: int, buf: memoryview, offset: int, flags: int) -> int:
    if offset < 0:
        return os.writev(fd, [buf])
    if flags:
        return os.pwritev(fd, [buf], offset, flags)
    return os.pwritev(fd, [buf], offset)


def _prw_rest(fd: int, buf: memoryview, offset: int, flags: int, write: bool, done: int) -> int:
    """Move ``buf[done:]`` at ``offset + done``, retrying short counts until EOF.

    Return the total moved; an error after some progress returns the progress.
    """
    want = len(buf)
    while True:
        view = buf[done:] if done else buf
        try:
            if write:
                n = os.pwritev(fd, [view], offset + done, flags)
            else:
                n = os.preadv(fd, [view], offset + done, flags)
        except OSError:
            if done:
                return done
            raise
        finally:
            if view is not buf:
                view.release()
        done += n
        if n == 0 or done >= want or flags & _RWF_NOWAIT:
            return done


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(2)`` (``os`` has only ``posix_fallocate``, without a mode)."""
    try:
        ret = _libc_fallocate(fd, mode, offset, length)
    except ctypes.ArgumentError:  # beyond off_t: what the kernel answers for it
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return 0


def _load_fallocate() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()


def _fsync(fd: int, datasync: bool) -> int:
    if datasync:
        os.fdatasync(fd)
    else:
        os.fsync(fd)
    return 0


BACKEND = AsyncioBackend
