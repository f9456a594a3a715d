"""``Sqe`` and ``Cqe``, and the liburing-style ``prep_*`` helpers.

An :class:`Sqe` is a slot of the ring's SQ array, as in the kernel: ``get_sqe`` hands
out the next slot as it is, a ``prep_*`` helper sets every field its op reads (as
liburing's ``io_uring_prep_rw``: ``flags`` and ``ioprio`` go back to 0, so set flags
after the prep), and ``submit`` copies what it needs into a request record and drops
the slot's references, so the slot can be handed out again.  Keep no reference to an
SQE past ``submit``.  A :class:`Cqe` is
an immutable record.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple, Protocol

from aiofused._abi import Op, SqeFlag, UringCmdFlag
from aiofused._core.records import DriverFile

__all__ = ["Cqe", "FileLike", "Sqe", "new_cqe"]

_F_FIXED: Final = int(SqeFlag.FIXED_FILE)
_OP_NOP: Final = int(Op.NOP)
_OP_READ: Final = int(Op.READ)
_OP_WRITE: Final = int(Op.WRITE)
_OP_READ_FIXED: Final = int(Op.READ_FIXED)
_OP_WRITE_FIXED: Final = int(Op.WRITE_FIXED)
_OP_SEND: Final = int(Op.SEND)
_OP_RECV: Final = int(Op.RECV)
_OP_SEND_ZC: Final = int(Op.SEND_ZC)
_OP_FSYNC: Final = int(Op.FSYNC)
_OP_FALLOCATE: Final = int(Op.FALLOCATE)
_OP_TIMEOUT: Final = int(Op.TIMEOUT)
_OP_LINK_TIMEOUT: Final = int(Op.LINK_TIMEOUT)
_OP_ASYNC_CANCEL: Final = int(Op.ASYNC_CANCEL)
_OP_URING_CMD: Final = int(Op.URING_CMD)
_OP_FUSED_CMD: Final = int(Op.FUSED_CMD)
_CMD_FUSED_BUF: Final = int(UringCmdFlag.FUSED_BUF)


class FileLike(Protocol):
    """Anything with ``fileno()``."""

    def fileno(self) -> int: ...


class Cqe(NamedTuple):
    """A completion (immutable): ``user_data``, ``res`` (>= 0 or ``-errno``) and ``flags``."""

    user_data: int
    res: int
    flags: int = 0


_tuple_new: Final = tuple.__new__


def new_cqe(cls: type[Cqe], user_data: int, res: int, flags: int) -> Cqe:
    """A ``cls`` (:class:`Cqe`) holding the three fields, made as ``tuple.__new__``
    makes it, without the NamedTuple's Python-level ``__new__``: the readable
    reference of the C twin ``aiofused._abi._cqe.new_cqe``, which the runtime installs
    as its core's :attr:`~aiofused._core.ring.RingCore.new_cqe` where it was built."""
    return _tuple_new(cls, (user_data, res, flags))


def _nbytes(buf: Any) -> int:
    if isinstance(buf, int):
        raise ValueError("nbytes is required when buf is an offset into a lent buffer")
    return memoryview(buf).nbytes


#: Sqe's fields in ``struct io_uring_sqe`` order (its repr).
_SQE_FIELDS: Final = (
    "opcode",
    "flags",
    "ioprio",
    "fd",
    "off",
    "addr",
    "len",
    "rw_flags",
    "user_data",
    "buf_index",
    "nr_secondary",
    "uring_cmd_flags",
    "cmd_op",
    "cmd",
    "pad1",
)


class Sqe:
    """A submission queue entry.  Fields mirror ``struct io_uring_sqe``.

    ``addr`` is an int or, for plain ops, a buffer object; ``fd`` is an int, an
    object with ``fileno()``, or a :class:`~aiofused.DriverFile`.
    """

    __slots__ = (
        "addr",
        "buf_index",
        "cmd",
        "cmd_op",
        "fd",
        "flags",
        "ioprio",
        "len",
        "nr_secondary",
        "off",
        "opcode",
        "pad1",
        "rw_flags",
        "uring_cmd_flags",
        "user_data",
    )

    def __init__(
        self,
        opcode: int = int(Op.NOP),
        flags: int = 0,
        ioprio: int = 0,
        fd: Any = -1,
        off: int = 0,
        addr: Any = 0,
        len: int = 0,
        rw_flags: int = 0,
        user_data: int = 0,
        buf_index: int = 0,
        nr_secondary: int = 0,
        uring_cmd_flags: int = 0,
        cmd_op: int = 0,
        cmd: bytes = b"",
        pad1: int = 0,
    ) -> None:
        self.opcode = opcode
        self.flags = flags
        self.ioprio = ioprio
        self.fd = fd
        self.off = off
        self.addr = addr
        self.len = len
        self.rw_flags = rw_flags
        self.user_data = user_data
        self.buf_index = buf_index
        self.nr_secondary = nr_secondary
        self.uring_cmd_flags = uring_cmd_flags
        self.cmd_op = cmd_op
        self.cmd = cmd
        self.pad1 = pad1

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in _SQE_FIELDS)
        return f"Sqe({body})"

    # ---- helpers -------------------------------------------------------------

    def _prep(self, op: int, fd: Any, addr: Any, length: int, off: int) -> None:
        """Set the fields every op reads (``io_uring_prep_rw``; ``user_data`` too)."""
        self.opcode = op
        self.flags = _F_FIXED if type(fd) is DriverFile else 0
        self.ioprio = 0
        self.fd = fd
        self.off = off
        self.addr = addr
        self.len = length
        self.rw_flags = 0
        self.user_data = 0
        self.buf_index = 0

    def prep_nop(self) -> None:
        """``IORING_OP_NOP``: completes with res 0."""
        self._prep(_OP_NOP, -1, 0, 0, 0)

    def prep_read(self, fd: Any, buf: Any, nbytes: int | None = None, offset: int = 0) -> None:
        """READ ``nbytes`` at ``offset`` into ``buf`` (-1: current file position)."""
        self._prep(_OP_READ, fd, buf, nbytes if nbytes is not None else _nbytes(buf), offset)

    def prep_write(self, fd: Any, buf: Any, nbytes: int | None = None, offset: int = 0) -> None:
        """WRITE ``nbytes`` of ``buf`` at ``offset`` (-1: current file position)."""
        self._prep(_OP_WRITE, fd, buf, nbytes if nbytes is not None else _nbytes(buf), offset)

    def prep_read_fixed(
        self, fd: Any, buf: int, nbytes: int, offset: int = 0, buf_index: int = 0
    ) -> None:
        """READ_FIXED into registered buffer ``buf_index`` at byte offset ``buf``."""
        self._prep(_OP_READ_FIXED, fd, buf, nbytes, offset)
        self.buf_index = buf_index

    def prep_write_fixed(
        self, fd: Any, buf: int, nbytes: int, offset: int = 0, buf_index: int = 0
    ) -> None:
        """WRITE_FIXED from registered buffer ``buf_index`` at byte offset ``buf``."""
        self._prep(_OP_WRITE_FIXED, fd, buf, nbytes, offset)
        self.buf_index = buf_index

    def prep_send(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """SEND on a socket with ``MSG_*`` ``flags``."""
        self._prep(_OP_SEND, fd, buf, nbytes if nbytes is not None else _nbytes(buf), 0)
        self.rw_flags = flags

    def prep_recv(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """RECV from a socket with ``MSG_*`` ``flags``."""
        self._prep(_OP_RECV, fd, buf, nbytes if nbytes is not None else _nbytes(buf), 0)
        self.rw_flags = flags

    def prep_send_zc(self, fd: Any, buf: Any, nbytes: int | None = None, flags: int = 0) -> None:
        """SEND_ZC: a result CQE with ``CqeFlag.MORE``, then a ``NOTIF`` CQE (SPEC R8)."""
        self._prep(_OP_SEND_ZC, fd, buf, nbytes if nbytes is not None else _nbytes(buf), 0)
        self.rw_flags = flags

    def prep_fsync(self, fd: Any, fsync_flags: int = 0) -> None:
        """FSYNC (``IORING_FSYNC_DATASYNC`` = 1 in ``fsync_flags`` for fdatasync)."""
        self._prep(_OP_FSYNC, fd, 0, 0, 0)
        self.rw_flags = fsync_flags

    def prep_fallocate(self, fd: Any, mode: int, offset: int, length: int) -> None:
        """FALLOCATE ``length`` bytes at ``offset`` with ``FALLOC_FL_*`` ``mode``
        (``io_uring_prep_fallocate``: ``addr`` carries the length, ``len`` the mode)."""
        self._prep(_OP_FALLOCATE, fd, length, mode, offset)

    def prep_timeout(self, seconds: float, count: int = 0) -> None:
        """TIMEOUT: -ETIME after ``seconds``, or 0 once ``count`` other CQEs were posted."""
        self._prep(_OP_TIMEOUT, -1, float(seconds), 1, count)

    def prep_link_timeout(self, seconds: float) -> None:
        """LINK_TIMEOUT for the previous (``IO_LINK``) SQE."""
        self._prep(_OP_LINK_TIMEOUT, -1, float(seconds), 1, 0)

    def prep_cancel(self, user_data: int, flags: int = 0) -> None:
        """ASYNC_CANCEL of the request with ``user_data``."""
        self._prep(_OP_ASYNC_CANCEL, -1, user_data, 0, 0)
        self.rw_flags = flags

    def prep_uring_cmd(self, fd: Any, cmd_op: int, cmd: bytes = b"") -> None:
        """URING_CMD to a driver."""
        self._prep(_OP_URING_CMD, fd, 0, 0, 0)
        self.uring_cmd_flags = self.pad1 = 0
        self.cmd_op = cmd_op
        self.cmd = cmd if type(cmd) is bytes else bytes(cmd)

    def prep_fused_cmd(self, fd: Any, cmd_op: int, nr_secondary: int = 1, cmd: bytes = b"") -> None:
        """FUSED_CMD primary; the next ``nr_secondary`` SQEs are its secondaries."""
        self._prep(_OP_FUSED_CMD, fd, 0, 0, 0)
        self.pad1 = 0
        self.cmd_op = cmd_op
        self.cmd = cmd if type(cmd) is bytes else bytes(cmd)
        self.nr_secondary = nr_secondary
        self.uring_cmd_flags = _CMD_FUSED_BUF
