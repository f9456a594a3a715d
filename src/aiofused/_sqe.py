"""``Sqe`` and ``Cqe``, and the liburing-style ``prep_*`` helpers.

An :class:`Sqe` is a mutable slot, as in the kernel's SQ array; the ring copies its
fields when :meth:`Ring.submit` consumes it, so the slot object can be dropped
afterwards.  A :class:`Cqe` is an immutable record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

from aiofused._driver import DriverFile
from aiofused._uapi import Op, SqeFlag, UringCmdFlag

__all__ = ["Cqe", "FileLike", "Sqe"]

_F_FIXED = int(SqeFlag.FIXED_FILE)


class FileLike(Protocol):
    """Anything with ``fileno()``."""

    def fileno(self) -> int: ...


class Cqe(NamedTuple):
    """A completion (immutable): ``user_data``, ``res`` (>= 0 or ``-errno``) and ``flags``."""

    user_data: int
    res: int
    flags: int = 0


@dataclasses.dataclass(slots=True, eq=False)
class Sqe:
    """A submission queue entry.  Fields mirror ``struct io_uring_sqe``.

    ``addr`` is an int or, for plain ops, a buffer object; ``fd`` is an int, an
    object with ``fileno()``, or a :class:`~aiofused.DriverFile`.
    """

    opcode: int = int(Op.NOP)
    flags: int = 0
    ioprio: int = 0
    fd: Any = -1
    off: int = 0
    addr: Any = 0
    len: int = 0
    rw_flags: int = 0
    user_data: int = 0
    buf_index: int = 0
    nr_secondary: int = 0
    uring_cmd_flags: int = 0
    cmd_op: int = 0
    cmd: bytes = b""
    pad1: int = 0

    # ---- helpers -------------------------------------------------------------

    def _prep(self, op: Op, fd: Any, addr: Any, length: int, off: int) -> None:
        """Reset every field but ``user_data`` and ``flags`` (as ``io_uring_prep_rw``)."""
        self.opcode = int(op)
        self.ioprio = 0
        self.fd = fd
        self.off = off
        self.addr = addr
        self.len = length
        self.rw_flags = 0
        self.buf_index = 0
        self.nr_secondary = 0
        self.uring_cmd_flags = 0
        self.cmd_op = 0
        self.cmd = b""
        self.pad1 = 0
        if isinstance(fd, DriverFile):
            self.flags = int(self.flags) | _F_FIXED

    @staticmethod
    def _nbytes(buf: Any, nbytes: int | None) -> int:
        if nbytes is not None:
            return nbytes
        if isinstance(buf, int):
            raise ValueError("nbytes is required when buf is an offset into a lent buffer")
        return memoryview(buf).nbytes

    def prep_nop(self) -> None:
        """``IORING_OP_NOP``: completes with res 0."""
        self._prep(Op.NOP, -1, 0, 0, 0)

    def prep_read(self, fd: Any, buf: Any, nbytes: int | None = None, offset: int = 0) -> None:
        """READ ``nbytes`` at ``offset`` into ``buf`` (-1: current file position)."""
        self._prep(Op.READ, fd, buf, self._nbytes(buf, nbytes), offset)

    def prep_write(self, fd: Any, buf: Any, nbytes: int | None = None, offset: int = 0) -> None:
        """WRITE ``nbytes`` of ``buf`` at ``offset`` (-1: current file position)."""
        self._prep(Op.WRITE, fd, buf, self._nbytes(buf, nbytes), offset)

    def prep_read_fixed(
        self, fd: Any, buf: int, nbytes: int, offset: int = 0, buf_index: int = 0
    ) -> None:
        """READ_FIXED into registered buffer ``buf_index`` at byte offset ``buf``."""
        self._prep(Op.READ_FIXED, fd, buf, nbytes, offset)
        self.buf_index = buf_index

    def prep_write_fixed(
        self, fd: Any, buf: int, nbytes: int, offset: int = 0, buf_index: int = 0
    ) -> None:
        """WRITE_FIXED from registered buffer ``buf_index`` at byte offset ``buf``."""
        self._prep(Op.WRITE_FIXED, fd, buf, nbytes, offset)
        self.buf_index = buf_index

    def prep_send(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """SEND on a socket with ``MSG_*`` ``flags``."""
        self._prep(Op.SEND, fd, buf, self._nbytes(buf, nbytes), 0)
        self.rw_flags = flags

    def prep_recv(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """RECV from a socket with ``MSG_*`` ``flags``."""
        self._prep(Op.RECV, fd, buf, self._nbytes(buf, nbytes), 0)
        self.rw_flags = flags

    def prep_send_zc(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """SEND_ZC: a result CQE with ``CqeFlag.MORE``, then a ``NOTIF`` CQE (SPEC R8)."""
        self._prep(Op.SEND_ZC, fd, buf, self._nbytes(buf, nbytes), 0)
        self.rw_flags = flags

    def prep_fsync(self, fd: Any, fsync_flags: int = 0) -> None:
        """FSYNC (``IORING_FSYNC_DATASYNC`` = 1 in ``fsync_flags`` for fdatasync)."""
        self._prep(Op.FSYNC, fd, 0, 0, 0)
        self.rw_flags = fsync_flags

    def prep_fallocate(self, fd: Any, mode: int, offset: int, length: int) -> None:
        """FALLOCATE ``length`` bytes at ``offset`` with ``FALLOC_FL_*`` ``mode``
        (``io_uring_prep_fallocate``: ``addr`` carries the length, ``len`` the mode)."""
        self._prep(Op.FALLOCATE, fd, length, mode, offset)

    def prep_timeout(self, seconds: float, count: int = 0) -> None:
        """TIMEOUT: -ETIME after ``seconds``, or 0 once ``count`` other CQEs were posted."""
        self._prep(Op.TIMEOUT, -1, float(seconds), 1, count)

    def prep_link_timeout(self, seconds: float) -> None:
        """LINK_TIMEOUT for the previous (``IO_LINK``) SQE."""
        self._prep(Op.LINK_TIMEOUT, -1, float(seconds), 1, 0)

    def prep_cancel(self, user_data: int, flags: int = 0) -> None:
        """ASYNC_CANCEL of the request with ``user_data``."""
        self._prep(Op.ASYNC_CANCEL, -1, user_data, 0, 0)
        self.rw_flags = flags

    def prep_uring_cmd(self, fd: Any, cmd_op: int, cmd: bytes = b"") -> None:
        """URING_CMD to a driver."""
        self._prep(Op.URING_CMD, fd, 0, 0, 0)
        self.cmd_op = cmd_op
        self.cmd = bytes(cmd)

    def prep_fused_cmd(self, fd: Any, cmd_op: int, nr_secondary: int = 1, cmd: bytes = b"") -> None:
        """FUSED_CMD primary; the next ``nr_secondary`` SQEs are its secondaries."""
        self._prep(Op.FUSED_CMD, fd, 0, 0, 0)
        self.cmd_op = cmd_op
        self.cmd = bytes(cmd)
        self.nr_secondary = nr_secondary
        self.uring_cmd_flags = int(UringCmdFlag.FUSED_BUF)
