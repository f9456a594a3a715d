"""The op table: one :class:`OpDef` per opcode, with every per-op fact, checked at import.

Capabilities are data (``needs_file``, ``fused_secondary``, ``buf_dir``, ``ioprio``,
``short_fails``), each entry names its ``prep`` (init-time validation: returns 0 or
``-errno``) and its ``issue`` kind, and the backends read their encoding from here too:
``uring`` (how the op's SQE is packed for the kernel) and ``asyncio`` (whether the
asyncio backend runs it).  Modelled on the kernel's ``io_uring/opdef.c`` and
``io_uring_optable_init``.  Adding an opcode is one entry here plus its ``prep``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiofused._abi import (
    EBADF,
    EFAULT,
    EINVAL,
    ENOBUFS,
    ENOENT,
    EOPNOTSUPP,
    ETIME,
    IOPRIO_CLASS_SHIFT,
    IOPRIO_LEVEL_MASK,
    IORING_ASYNC_CANCEL_ALL,
    IORING_FSYNC_DATASYNC,
    IORING_NOP_FILE,
    IORING_NOP_FIXED_BUFFER,
    IORING_NOP_FIXED_FILE,
    IORING_NOP_INJECT_RESULT,
    IORING_NOP_VALID,
    IORING_RECVSEND_POLL_FIRST,
    IORING_SEND_ZC_REPORT_USAGE,
    IORING_TIMEOUT_ABS,
    IORING_TIMEOUT_BOOTTIME,
    IORING_TIMEOUT_ETIME_SUCCESS,
    IORING_TIMEOUT_MULTISHOT,
    IORING_TIMEOUT_REALTIME,
    IORING_TIMEOUT_VALID,
    MAX_CMD_BYTES,
    MSG_WAITALL,
    BufDir,
    Op,
    SqeFlag,
    UringCmdFlag,
)
from aiofused._core.records import DriverFile

if TYPE_CHECKING:
    from aiofused._core.records import Req
    from aiofused._core.ring import RingCore
    from aiofused._core.sqe import Sqe

__all__ = [
    "DIRECT_OPS",
    "FIXED_FORM",
    "NEVER_FAILS",
    "OPDEFS",
    "PLAIN_FORM",
    "Issue",
    "OpDef",
    "UringEnc",
    "ioprio_error",
    "link_threshold",
    "nop_result",
    "resolve_fd",
]

Prep = Callable[["RingCore", "Req", "Sqe"], int]

_F_FIXED: Final = int(SqeFlag.FIXED_FILE)
_F_SKIP: Final = int(SqeFlag.CQE_SKIP_SUCCESS)
_CMD_FIXED: Final = int(UringCmdFlag.FIXED)
_CMD_FUSED_BUF: Final = int(UringCmdFlag.FUSED_BUF)
_DEST: Final = BufDir.DEST
_SRC: Final = BufDir.SRC
#: ``Req.want`` of an op whose result never fails it (FSYNC, FALLOCATE, LINK_TIMEOUT):
#: the kernel sets REQ_F_FAIL for them only when the request could not be issued at all
#: (a bad file), so an error result neither severs a chain nor shows under
#: CQE_SKIP_SUCCESS (issue 12, classes 7 and 9).
NEVER_FAILS: Final = -(1 << 62)
_CLOCKS: Final = IORING_TIMEOUT_BOOTTIME | IORING_TIMEOUT_REALTIME
_SOCK_OPS: Final = (Op.SEND, Op.RECV, Op.SEND_ZC)


class Issue(enum.IntEnum):
    """How the core starts an op once it is its turn."""

    NOP = 0
    IO = 1  # a leaf op run by a backend
    TIMEOUT = 2
    LINK_TIMEOUT = 3  # armed with its target, never issued on its own
    CANCEL = 4
    COMMAND = 5  # URING_CMD / FUSED_CMD: the driver's uring_cmd


class UringEnc(enum.IntFlag):
    """How the uring backend packs an op's SQE (bits of :attr:`OpDef.uring`)."""

    NONE = 0
    #: The kernel runs the op (the backend may take it).
    KERNEL = 1 << 0
    #: The SQE carries ``op.offset``.
    OFFSET = 1 << 1
    #: The SQE carries ``op.buf_index`` (READ_FIXED/WRITE_FIXED).
    FIXED = 1 << 2
    #: The kernel writes the buffer (it must be writable).
    DEST = 1 << 3
    #: The op needs a buffer.
    BUF = 1 << 4
    #: FALLOCATE: ``addr`` carries the length, ``len`` the mode.
    FALLOC = 1 << 5
    #: SEND_ZC: two CQEs (result with MORE, then NOTIF).
    ZC = 1 << 6


class OpDef:
    """What the ring and its backends know about one opcode (never changed once built)."""

    __slots__ = (
        "asyncio",
        "buf_dir",
        "buffer_select_err",
        "bufsel_issue_err",
        "fused_secondary",
        "ioprio",
        "issue",
        "needs_file",
        "op",
        "prep",
        "short_fails",
        "uring",
    )

    def __init__(
        self,
        op: Op,
        prep: Prep,
        issue: Issue,
        needs_file: bool = False,
        fused_secondary: bool = False,
        buf_dir: BufDir | None = None,
        ioprio: bool = False,
        short_fails: bool = False,
        buffer_select_err: int = EOPNOTSUPP,
        bufsel_issue_err: int = 0,
        uring: UringEnc = UringEnc.NONE,
        asyncio: bool = False,
    ) -> None:
        self.op: Final = op
        self.prep: Final = prep
        self.issue: Final = issue
        self.needs_file: Final = needs_file
        #: May be a secondary of a fused command (V6 ``fused_secondary``).
        self.fused_secondary: Final = fused_secondary
        #: DEST: the op writes into its buffer; SRC: it reads from it.
        self.buf_dir: Final = buf_dir
        self.ioprio: Final = ioprio
        #: A short result (res != requested length) fails the request, severing links.
        self.short_fails: Final = short_fails
        #: errno for ``IOSQE_BUFFER_SELECT`` on this op at init (0: the op takes it).
        self.buffer_select_err: Final = buffer_select_err
        #: errno an op that takes ``IOSQE_BUFFER_SELECT`` answers at issue, after its file
        #: checks: no buffer group is ever provided here (READ/RECV -ENOBUFS, SEND -ENOENT).
        self.bufsel_issue_err: Final = bufsel_issue_err
        #: The uring backend's encoding (``UringEnc.NONE``: not a kernel op here).
        self.uring: Final = uring
        #: The asyncio backend runs it.
        self.asyncio: Final = asyncio

    def __repr__(self) -> str:
        return f"<OpDef {self.op.name} issue={self.issue.name}>"

    @property
    def backend(self) -> bool:
        """Executed by a backend (leaf I/O)."""
        return self.issue is Issue.IO


def ioprio_error(opdef: OpDef, ioprio: int) -> int:
    """The init error for a non-zero ``ioprio`` on ``opdef``'s op, or 0.

    READ/WRITE: an I/O priority (``ioprio_check_cap``): class 0 (none) with a level, or a
    class above 3 is -EINVAL (a real-time class without CAP_SYS_NICE is -EPERM in the
    kernel; aiofused does not check capabilities).  SEND/RECV: ``IORING_RECVSEND_*``
    bits; only POLL_FIRST (and SEND_ZC's REPORT_USAGE) work without provided or
    registered buffers.  Other ops: -EINVAL.
    """
    if not opdef.ioprio:
        return EINVAL
    op = opdef.op
    if op in _SOCK_OPS:
        allowed = IORING_RECVSEND_POLL_FIRST
        if op is Op.SEND_ZC:
            allowed |= IORING_SEND_ZC_REPORT_USAGE
        return EINVAL if ioprio & ~allowed else 0
    cls = (ioprio >> IOPRIO_CLASS_SHIFT) & 0x7
    if cls > 3 or (cls == 0 and ioprio & IOPRIO_LEVEL_MASK):
        return EINVAL
    return 0


def nop_result(core: RingCore, req: Req) -> int:
    """What a NOP with ``nop_flags`` (kept in ``req.rw_flags``) completes with: an error
    of the file or buffer it names, else the injected result (``req.nbytes``) or 0."""
    flags = req.rw_flags
    if flags & IORING_NOP_FILE:
        if flags & IORING_NOP_FIXED_FILE:
            if core.fixed_driver(req.fd) is None:
                return EBADF
        elif req.fd < 0 or not core.fd_is_open(req.fd):
            return EBADF
    if flags & IORING_NOP_FIXED_BUFFER and not 0 <= req.buf_index < len(core.reg_views):
        return EFAULT
    return req.nbytes if flags & IORING_NOP_INJECT_RESULT else 0


def link_threshold(opdef: OpDef, rw_flags: int, nbytes: int) -> int:
    """The least result that does not fail a link (SPEC L2): the whole length for
    READ/WRITE and for SEND/RECV with MSG_WAITALL (the kernel's ``min_ret``), else 0."""
    return nbytes if opdef.short_fails or rw_flags & MSG_WAITALL else 0


# ---- fd and buffer resolution -------------------------------------------------------


def resolve_fd(core: RingCore, req: Req, fd: Any, flags: int) -> int:
    """Fill ``req.fd``/``req.file``/``req.driver``; return 0 or an init error."""
    if type(fd) is DriverFile:
        req.fd = -1
        if fd.ring_id == core.id:
            req.driver = core.fixed_driver(fd.index)
        return 0
    if flags & _F_FIXED:
        if not isinstance(fd, int):
            return EINVAL
        req.driver = core.fixed_driver(fd)
        req.fd = -1
        return 0
    if isinstance(fd, int):
        req.fd = fd
        return 0
    fileno = getattr(fd, "fileno", None)
    if fileno is None:
        return EBADF
    try:
        req.fd = int(fileno())
    except (OSError, ValueError):
        req.fd = -1
    req.file = fd
    return 0


def take_buffer(core: RingCore, req: Req, addr: Any, length: int, writable: bool) -> int:
    """Hold ``addr`` as a byte memoryview of ``length``; 0 or the issue-time error."""
    if length < 0:
        return EINVAL
    if type(addr) is bytearray and length == len(addr):  # the common case: no checks needed
        req.buf = memoryview(addr)
        core.views += 1
        return 0
    try:
        mv = memoryview(addr)
    except TypeError:
        return EFAULT
    if not mv.c_contiguous:
        mv.release()
        return EFAULT
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        flat = mv.cast("B")
        mv.release()
        mv = flat
    if (writable and mv.readonly) or length > mv.nbytes:
        mv.release()
        return EFAULT
    if length != mv.nbytes:
        view = mv[:length]
        mv.release()
        mv = view
    req.buf = mv
    core.views += 1
    return 0


# ---- prep -----------------------------------------------------------------------------


def _prep_nop(core: RingCore, req: Req, sqe: Sqe) -> int:
    flags = sqe.rw_flags
    if not flags:
        req.rw_flags = 0  # a recycled record may hold another op's flags
        return 0
    if flags & ~IORING_NOP_VALID:
        return EINVAL
    req.rw_flags = int(flags)
    n = sqe.len & 0xFFFFFFFF  # the kernel reads the u32 len as the s32 result
    req.nbytes = n - (1 << 32) if n >= 1 << 31 else n
    fd = sqe.fd
    req.fd = fd if type(fd) is int else -1
    req.buf_index = sqe.buf_index
    return 0


def _no_driver(req: Req, flags: int) -> None:
    """A plain-file op given a driver's file or a fixed slot fails at issue, as the
    kernel's file check does (-EINVAL for a driver, -EBADF for an empty slot)."""
    if req.driver is not None or flags & _F_FIXED:
        req.issue_err = EBADF if req.driver is None else EINVAL


def _prep_rw(core: RingCore, req: Req, sqe: Sqe) -> int:
    fd = sqe.fd
    flags = req.flags
    if type(fd) is int and not flags & _F_FIXED:
        req.fd = fd  # the common case, without the general resolution
    else:
        err = resolve_fd(core, req, fd, flags)
        if err:
            return err
        _no_driver(req, flags)
        if req.issue_err:
            return 0
    n = sqe.len
    req.nbytes = n
    req.offset = sqe.off
    rw = sqe.rw_flags
    if type(rw) is not int:
        rw = int(rw)  # socket.MSG_* are IntFlags
    req.rw_flags = rw
    if n < 0:
        return EINVAL
    req.want = link_threshold(req.opdef, rw, n)  # type: ignore[arg-type]
    addr = sqe.addr
    if req.primary is not None:  # fused secondary: addr is an offset into the lent buffer
        if isinstance(addr, int):
            req.sec_off = addr
        else:
            req.issue_err = EFAULT
        return 0
    if isinstance(addr, int):
        req.issue_err = EFAULT  # SPEC R5: an int addr only means something in a secondary
        return 0
    req.issue_err = take_buffer(core, req, addr, n, req.opdef.buf_dir is _DEST)  # type: ignore[union-attr]
    return 0


def _prep_fixed(core: RingCore, req: Req, sqe: Sqe) -> int:
    """READ_FIXED/WRITE_FIXED: ``addr`` is a byte offset into registered buffer ``buf_index``."""
    err = resolve_fd(core, req, sqe.fd, req.flags)
    if err:
        return err
    _no_driver(req, req.flags)
    if req.issue_err:
        return 0
    if sqe.len < 0:
        return EINVAL
    req.nbytes = req.want = sqe.len
    req.offset = sqe.off
    req.rw_flags = int(sqe.rw_flags)
    views = core.reg_views
    idx, off = sqe.buf_index, sqe.addr
    if not isinstance(off, int) or not 0 <= idx < len(views):
        req.issue_err = EFAULT
        return 0
    base = views[idx]
    if off < 0 or off > len(base) or sqe.len > len(base) - off:
        req.issue_err = EFAULT
        return 0
    req.buf = base[off : off + sqe.len]
    req.buf_index = idx
    core.views += 1
    return 0


def _prep_send_zc(core: RingCore, req: Req, sqe: Sqe) -> int:
    if req.flags & _F_SKIP:
        return EINVAL  # the kernel does not support SKIP on SEND_ZC
    return _prep_rw(core, req, sqe)


def _file_only(core: RingCore, req: Req, sqe: Sqe) -> int:
    err = resolve_fd(core, req, sqe.fd, req.flags)
    if not err:
        _no_driver(req, req.flags)
    return err


def _prep_fsync(core: RingCore, req: Req, sqe: Sqe) -> int:
    if not isinstance(sqe.addr, int) or sqe.addr or sqe.buf_index:
        return EINVAL
    if sqe.rw_flags & ~IORING_FSYNC_DATASYNC:
        return EINVAL
    req.rw_flags = int(sqe.rw_flags)
    req.want = NEVER_FAILS
    return _file_only(core, req, sqe)


def _prep_fallocate(core: RingCore, req: Req, sqe: Sqe) -> int:
    # io_fallocate_prep: addr is the length, len the mode; no buffer, no flags.
    if not isinstance(sqe.addr, int) or sqe.buf_index or sqe.rw_flags:
        return EINVAL
    req.offset = sqe.off
    req.nbytes = sqe.addr
    req.rw_flags = sqe.len
    req.want = NEVER_FAILS
    return _file_only(core, req, sqe)


def _timeout_seconds(sqe: Sqe) -> float | None:
    value = sqe.addr
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _timeout_flags_error(flags: int) -> int:
    """``__io_timeout_prep``'s checks of ``timeout_flags``; ABS and MULTISHOT, which the
    kernel takes, are refused here (-EINVAL: aiofused has no absolute or repeating
    timers, SPEC R7)."""
    if flags & ~IORING_TIMEOUT_VALID or flags & _CLOCKS == _CLOCKS:
        return EINVAL
    if flags & (IORING_TIMEOUT_ABS | IORING_TIMEOUT_MULTISHOT):
        return EINVAL
    return 0


def _prep_timeout(core: RingCore, req: Req, sqe: Sqe) -> int:
    if sqe.len != 1 or sqe.buf_index or sqe.off < 0:
        return EINVAL
    flags = sqe.rw_flags
    if flags:
        err = _timeout_flags_error(flags)
        if err:
            return err
        if flags & IORING_TIMEOUT_ETIME_SUCCESS:
            req.want = ETIME  # expiring is a success (a cancel still fails it)
    seconds = _timeout_seconds(sqe)
    if seconds is None:
        return EINVAL
    req.seconds = seconds
    req.offset = sqe.off
    return 0


def _prep_link_timeout(core: RingCore, req: Req, sqe: Sqe) -> int:
    if sqe.len != 1 or sqe.off != 0 or sqe.buf_index:
        return EINVAL
    if sqe.rw_flags and _timeout_flags_error(sqe.rw_flags):
        return EINVAL
    seconds = _timeout_seconds(sqe)
    if seconds is None:
        return EINVAL
    req.seconds = seconds
    req.want = NEVER_FAILS  # its -ETIME/-ECANCELED fail nothing (io_req_task_link_timeout)
    return 0  # the position in a chain is checked by the link assembly


def _prep_cancel(core: RingCore, req: Req, sqe: Sqe) -> int:
    if not isinstance(sqe.addr, int) or sqe.rw_flags & ~IORING_ASYNC_CANCEL_ALL:
        return EINVAL
    req.target = sqe.addr
    req.rw_flags = int(sqe.rw_flags)
    return 0


def _prep_command(core: RingCore, req: Req, sqe: Sqe, fused: bool) -> int:
    err = resolve_fd(core, req, sqe.fd, req.flags)
    cmd = sqe.cmd
    core.init_command(req, int(sqe.cmd_op), cmd if type(cmd) is bytes else bytes(cmd), fused)
    return err


def _prep_uring_cmd(core: RingCore, req: Req, sqe: Sqe) -> int:
    if sqe.pad1 or sqe.uring_cmd_flags & ~_CMD_FIXED or len(sqe.cmd) > MAX_CMD_BYTES:
        core.init_command(req, 0, b"", False)
        return EINVAL
    return _prep_command(core, req, sqe, False)


def _prep_fused(core: RingCore, req: Req, sqe: Sqe) -> int:
    # SPEC F1, F2 (F3-F5 need the secondaries: RingCore.take_secondaries).
    if (
        not core.fused_ok
        or sqe.pad1
        or sqe.uring_cmd_flags != _CMD_FUSED_BUF
        or len(sqe.cmd) > MAX_CMD_BYTES
    ):
        core.init_command(req, 0, b"", True)
        return EINVAL
    return _prep_command(core, req, sqe, True)


_K: Final = UringEnc
_RW_DEST: Final = _K.KERNEL | _K.BUF | _K.DEST
_RW_SRC: Final = _K.KERNEL | _K.BUF


_BUFSEL_ISSUE: Final = {Op.READ: ENOBUFS, Op.RECV: ENOBUFS, Op.SEND: ENOENT}


def _io(op: Op, prep: Prep, buf_dir: BufDir, uring: UringEnc, *, secondary: bool) -> OpDef:
    """A leaf I/O op run by a backend (READ/WRITE/SEND/RECV and their variants)."""
    bufsel = _BUFSEL_ISSUE.get(op, 0)
    return OpDef(
        op,
        prep,
        Issue.IO,
        needs_file=True,
        fused_secondary=secondary,
        buf_dir=buf_dir,
        ioprio=True,
        short_fails=op in (Op.READ, Op.WRITE, Op.READ_FIXED, Op.WRITE_FIXED),
        buffer_select_err=0 if bufsel else EOPNOTSUPP,
        bufsel_issue_err=bufsel,
        uring=uring,
        asyncio=op not in (Op.READ_FIXED, Op.WRITE_FIXED),
    )


OPDEFS: Final[dict[int, OpDef]] = {
    Op.NOP: OpDef(Op.NOP, _prep_nop, Issue.NOP),
    Op.READ: _io(Op.READ, _prep_rw, _DEST, _RW_DEST | _K.OFFSET, secondary=True),
    Op.WRITE: _io(Op.WRITE, _prep_rw, _SRC, _RW_SRC | _K.OFFSET, secondary=True),
    Op.READ_FIXED: _io(
        Op.READ_FIXED, _prep_fixed, _DEST, _RW_DEST | _K.OFFSET | _K.FIXED, secondary=False
    ),
    Op.WRITE_FIXED: _io(
        Op.WRITE_FIXED, _prep_fixed, _SRC, _RW_SRC | _K.OFFSET | _K.FIXED, secondary=False
    ),
    Op.SEND: _io(Op.SEND, _prep_rw, _SRC, _RW_SRC, secondary=True),
    Op.RECV: _io(Op.RECV, _prep_rw, _DEST, _RW_DEST, secondary=True),
    Op.SEND_ZC: _io(Op.SEND_ZC, _prep_send_zc, _SRC, _RW_SRC | _K.ZC, secondary=True),
    Op.FSYNC: OpDef(
        Op.FSYNC, _prep_fsync, Issue.IO, needs_file=True, uring=_K.KERNEL, asyncio=True
    ),
    Op.FALLOCATE: OpDef(
        Op.FALLOCATE,
        _prep_fallocate,
        Issue.IO,
        needs_file=True,
        uring=_K.KERNEL | _K.OFFSET | _K.FALLOC,
        asyncio=True,
    ),
    Op.TIMEOUT: OpDef(Op.TIMEOUT, _prep_timeout, Issue.TIMEOUT),
    Op.LINK_TIMEOUT: OpDef(Op.LINK_TIMEOUT, _prep_link_timeout, Issue.LINK_TIMEOUT),
    Op.ASYNC_CANCEL: OpDef(Op.ASYNC_CANCEL, _prep_cancel, Issue.CANCEL),
    Op.URING_CMD: OpDef(Op.URING_CMD, _prep_uring_cmd, Issue.COMMAND, needs_file=True),
    Op.FUSED_CMD: OpDef(
        Op.FUSED_CMD, _prep_fused, Issue.COMMAND, needs_file=True, buffer_select_err=EINVAL
    ),
}
"""Opcodes without an entry (READV, ...) are -EINVAL at init."""

#: READ/WRITE -> their registered-buffer forms, and back (same bytes moved).
FIXED_FORM: Final[dict[int, Op]] = {int(Op.READ): Op.READ_FIXED, int(Op.WRITE): Op.WRITE_FIXED}
PLAIN_FORM: Final[dict[int, Op]] = {int(fixed): Op(plain) for plain, fixed in FIXED_FORM.items()}

#: Ops a backend may run as is when standalone and flagless (``Backend.start_direct``):
#: one buffer, no registered-buffer index, one CQE.
DIRECT_OPS: Final[frozenset[int]] = frozenset(
    int(op)
    for op, d in OPDEFS.items()
    if d.uring & UringEnc.BUF and not d.uring & (UringEnc.FIXED | UringEnc.ZC | UringEnc.FALLOC)
)


def _check_table() -> None:
    for op, d in OPDEFS.items():
        if d.op != op:
            raise AssertionError(f"OPDEFS[{op!r}] describes {d.op!r}")
        if d.fused_secondary and d.buf_dir is None:
            raise AssertionError(f"{op!r} is a fused secondary without a buf_dir")
        if d.backend and not d.needs_file:
            raise AssertionError(f"{op!r} runs on a backend but needs no file")
        if d.backend != bool(d.uring & UringEnc.KERNEL):
            raise AssertionError(f"{op!r}: a backend op needs a uring encoding, and only it")
        if d.asyncio and not d.backend:
            raise AssertionError(f"{op!r}: only backend ops run on the asyncio backend")
        if bool(d.uring & UringEnc.DEST) != (d.buf_dir is _DEST):
            raise AssertionError(f"{op!r}: the uring DEST bit disagrees with buf_dir")


_check_table()
