"""Kernel ABI values, spelled as ``include/uapi/linux/io_uring.h`` spells them.

Every enum carries the kernel's numbers so that an SQE built here means the same
thing to a real ring.  ``Op.FUSED_CMD``, ``SetupFlag.FUSED_REQ``,
``Feature.FUSED_REQ`` and ``UringCmdFlag.FUSED_BUF`` come from the unmerged V6
series "io_uring/ublk: add generic IORING_OP_FUSED_CMD"; the opcode takes a number
above the kernel's range so it can never collide with a real one.
"""

from __future__ import annotations

import enum
import errno
from typing import Final

__all__ = [
    "EIOCBQUEUED",
    "MAX_SECONDARY",
    "MSG_WAITALL",
    "BufDir",
    "CqeFlag",
    "Feature",
    "IssueFlag",
    "Op",
    "SetupFlag",
    "SqeFlag",
    "UringCmdFlag",
]

#: Returned by a driver's ``uring_cmd`` to say "queued, I will call ``cmd.done``".
#: The kernel's value is ``-EIOCBQUEUED`` (529 is not exported to userspace errno).
EIOCBQUEUED: Final = -529

#: Upper bound of ``nr_secondary`` (SPEC F3).
MAX_SECONDARY: Final = 64

#: ``fsync_flags`` bit: fdatasync instead of fsync.
IORING_FSYNC_DATASYNC: Final = 1 << 0
#: ``ASYNC_CANCEL`` flag: cancel every request matching the key.
IORING_ASYNC_CANCEL_ALL: Final = 1 << 0
#: ``timeout_flags`` bits (TIMEOUT, LINK_TIMEOUT).
IORING_TIMEOUT_ABS: Final = 1 << 0
IORING_TIMEOUT_BOOTTIME: Final = 1 << 2
IORING_TIMEOUT_REALTIME: Final = 1 << 3
IORING_TIMEOUT_ETIME_SUCCESS: Final = 1 << 5
IORING_TIMEOUT_MULTISHOT: Final = 1 << 6
#: Every ``timeout_flags`` bit a TIMEOUT/LINK_TIMEOUT may carry (``__io_timeout_prep``).
IORING_TIMEOUT_VALID: Final = (
    IORING_TIMEOUT_ABS
    | IORING_TIMEOUT_BOOTTIME
    | IORING_TIMEOUT_REALTIME
    | IORING_TIMEOUT_ETIME_SUCCESS
    | IORING_TIMEOUT_MULTISHOT
)
#: ``nop_flags`` bits: post ``len`` as the result; look up ``fd`` (a fixed slot with
#: NOP_FIXED_FILE); look up registered buffer ``buf_index``; complete from task work.
IORING_NOP_INJECT_RESULT: Final = 1 << 0
IORING_NOP_FILE: Final = 1 << 1
IORING_NOP_FIXED_FILE: Final = 1 << 2
IORING_NOP_FIXED_BUFFER: Final = 1 << 3
IORING_NOP_TW: Final = 1 << 4
IORING_NOP_VALID: Final = 0x1F
#: SEND/RECV carry ``IORING_RECVSEND_*`` in ``ioprio``; POLL_FIRST is the one without a
#: provided or registered buffer (the others need BUFFER_SELECT or a fixed buffer).
IORING_RECVSEND_POLL_FIRST: Final = 1 << 0
IORING_SEND_ZC_REPORT_USAGE: Final = 1 << 3
#: ``ioprio`` of READ/WRITE: class in bits 13-15, level in bits 0-2, hints between.
IOPRIO_CLASS_SHIFT: Final = 13
IOPRIO_LEVEL_MASK: Final = 0x7
#: The bytes of a URING_CMD's ``cmd`` (the 80-byte ``cmd`` area of a 128-byte SQE).
MAX_CMD_BYTES: Final = 80


class Op(enum.IntEnum):
    """``IORING_OP_*`` opcodes (kernel numbers)."""

    NOP = 0
    READV = 1
    WRITEV = 2
    FSYNC = 3
    READ_FIXED = 4
    WRITE_FIXED = 5
    TIMEOUT = 11
    ASYNC_CANCEL = 14
    LINK_TIMEOUT = 15
    FALLOCATE = 17
    READ = 22
    WRITE = 23
    SEND = 26
    RECV = 27
    URING_CMD = 46
    SEND_ZC = 47
    #: Never merged upstream; above the kernel's range, below 255 (which stays unknown).
    FUSED_CMD = 128


class SqeFlag(enum.IntFlag):
    """``IOSQE_*`` flags."""

    FIXED_FILE = 1 << 0
    IO_DRAIN = 1 << 1
    IO_LINK = 1 << 2
    IO_HARDLINK = 1 << 3
    ASYNC = 1 << 4
    BUFFER_SELECT = 1 << 5
    CQE_SKIP_SUCCESS = 1 << 6


#: Every bit the ring understands; anything else in ``sqe.flags`` is -EINVAL (SPEC R3).
SQE_VALID_FLAGS: Final = int(
    SqeFlag.FIXED_FILE
    | SqeFlag.IO_DRAIN
    | SqeFlag.IO_LINK
    | SqeFlag.IO_HARDLINK
    | SqeFlag.ASYNC
    | SqeFlag.BUFFER_SELECT
    | SqeFlag.CQE_SKIP_SUCCESS
)


class SetupFlag(enum.IntFlag):
    """``IORING_SETUP_*`` flags (only those aiofused gives a meaning)."""

    NONE = 0
    IOPOLL = 1 << 0
    CQSIZE = 1 << 3
    SUBMIT_ALL = 1 << 7
    #: V6: the ring accepts fused commands.
    FUSED_REQ = 1 << 14


class Feature(enum.IntFlag):
    """``IORING_FEAT_*`` bits reported by :attr:`Ring.features`."""

    NODROP = 1 << 1
    SUBMIT_STABLE = 1 << 2
    CQE_SKIP = 1 << 11
    FUSED_REQ = 1 << 14


class CqeFlag(enum.IntFlag):
    """``IORING_CQE_F_*`` flags."""

    NONE = 0
    BUFFER = 1 << 0
    MORE = 1 << 1
    SOCK_NONEMPTY = 1 << 2
    NOTIF = 1 << 3


class UringCmdFlag(enum.IntFlag):
    """``sqe->uring_cmd_flags`` bits."""

    NONE = 0
    FIXED = 1 << 0
    #: V6 ``IORING_FUSED_CMD_BUF``: the primary provides a buffer to its secondaries.
    FUSED_BUF = 1 << 1


class IssueFlag(enum.IntFlag):
    """``issue_flags`` bits passed to ``uring_cmd`` (V6 ``IO_URING_F_FUSED_BUF_*``)."""

    NONE = 0
    #: Secondaries write into the lent buffer.
    FUSED_BUF_DEST = 1 << 11
    #: Secondaries read from the lent buffer.
    FUSED_BUF_SRC = 1 << 12
    FUSED_BUF = FUSED_BUF_DEST | FUSED_BUF_SRC


#: ``MSG_WAITALL`` (Linux): a SEND/RECV with it fails a link when short (``min_ret``).
MSG_WAITALL: Final = 0x100
#: ``MSG_TRUNC`` (Linux): a datagram/seqpacket recv returns the record's whole length.
MSG_TRUNC: Final = 0x20
#: Not a CQE flag: a backend's mark on a completion that the kernel fails although its
#: res is whole (a MSG_WAITALL RECV that truncated a record); the core clears it.
IO_FAILED: Final = 1 << 31


class BufDir(enum.IntEnum):
    """Direction of a lent buffer as the secondaries use it (V6 opdef ``buf_dir``)."""

    #: Secondaries read from the buffer (WRITE, SEND, SEND_ZC).
    SRC = 0
    #: Secondaries write into the buffer (READ, RECV).
    DEST = 1


#: errno values used across the ring, as negative CQE results.
ECANCELED: Final = -errno.ECANCELED
EINVAL: Final = -errno.EINVAL
EBADF: Final = -errno.EBADF
EFAULT: Final = -errno.EFAULT
EOPNOTSUPP: Final = -errno.EOPNOTSUPP
ENOENT: Final = -errno.ENOENT
EALREADY: Final = -errno.EALREADY
ETIME: Final = -errno.ETIME
EIO: Final = -errno.EIO
EINTR: Final = -errno.EINTR
EAGAIN: Final = -errno.EAGAIN
EBUSY: Final = -errno.EBUSY
EPERM: Final = -errno.EPERM
ENOSPC: Final = -errno.ENOSPC
ENXIO: Final = -errno.ENXIO
ENOBUFS: Final = -errno.ENOBUFS
EOF_: Final = 0
