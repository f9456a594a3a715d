"""The op table: one :class:`OpDef` per opcode, checked at import.

Capabilities are data (``needs_file``, ``fused_secondary``, ``buf_dir``, ``ioprio``,
``short_fails``), and each entry names its ``prep`` (init-time validation, returns 0
or ``-errno``) and ``issue`` (start the op; the ring completes it).  Modelled on the
kernel's ``io_uring/opdef.c`` and ``io_uring_optable_init``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiofused._driver import Driver, DriverFile
from aiofused._uapi import (
    EBADF,
    EFAULT,
    EINVAL,
    EOPNOTSUPP,
    BufDir,
    Op,
    SqeFlag,
    UringCmdFlag,
)
from aiofused._views import view_made

if TYPE_CHECKING:
    from aiofused._ring import Req, Ring
    from aiofused._sqe import Sqe

__all__ = ["OPDEFS", "OpDef"]

Prep = Callable[["Ring", "Req", "Sqe"], int]
Issue = Callable[["Ring", "Req"], None]

#: ``IORING_FSYNC_DATASYNC``
FSYNC_DATASYNC = 1
#: ``IORING_ASYNC_CANCEL_ALL``
ASYNC_CANCEL_ALL = 1 << 0
MAX_CMD_BYTES = 80
_F_FIXED = int(SqeFlag.FIXED_FILE)
_F_SKIP = int(SqeFlag.CQE_SKIP_SUCCESS)
_CMD_FIXED = int(UringCmdFlag.FIXED)
_CMD_FUSED_BUF = int(UringCmdFlag.FUSED_BUF)


@dataclasses.dataclass(frozen=True, slots=True)
class OpDef:
    """What the ring knows about one opcode."""

    op: Op
    prep: Prep
    issue: Issue
    needs_file: bool = False
    #: May be a secondary of a fused command (V6 ``fused_secondary``).
    fused_secondary: bool = False
    #: DEST: the op writes into its buffer; SRC: it reads from it.
    buf_dir: BufDir | None = None
    ioprio: bool = False
    #: A short result (res != requested length) fails the request, severing links.
    short_fails: bool = False
    #: Executed by a backend (leaf I/O).
    backend: bool = False
    #: errno for ``IOSQE_BUFFER_SELECT`` on this op (no provided-buffer rings here).
    buffer_select_err: int = EOPNOTSUPP


# ---- fd and buffer resolution -------------------------------------------------


def resolve_fd(ring: Ring, req: Req, fd: Any, flags: int) -> int:
    """Fill ``req.fd``/``req.file``/``req.driver``; return 0 or an init error."""
    if isinstance(fd, DriverFile):
        if fd.ring_id != id(ring):
            req.fd = -1
            return 0
        req.driver = ring._fixed_driver(fd.index)
        req.fd = -1
        return 0
    if flags & _F_FIXED:
        if not isinstance(fd, int):
            return EINVAL
        req.driver = ring._fixed_driver(fd)
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


def _take_buffer(req: Req, addr: Any, length: int, writable: bool) -> int:
    """Hold ``addr`` as a byte memoryview of ``length``; 0 or the issue-time error."""
    if length < 0:
        return EINVAL
    if type(addr) is bytearray and length == len(addr):  # the common case: no checks needed
        req.buf = memoryview(addr)
        view_made()
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
    if writable and mv.readonly:
        mv.release()
        return EFAULT
    if length > mv.nbytes:
        mv.release()
        return EFAULT
    if length != mv.nbytes:
        view = mv[:length]
        mv.release()
        mv = view
    req.buf = mv
    view_made()
    return 0


# ---- prep ---------------------------------------------------------------------


def _prep_nop(ring: Ring, req: Req, sqe: Sqe) -> int:
    return 0


def _prep_rw(ring: Ring, req: Req, sqe: Sqe) -> int:
    fd = sqe.fd
    if type(fd) is int and not sqe.flags & _F_FIXED:
        req.fd = fd  # the common case, without the general resolution
    else:
        err = resolve_fd(ring, req, fd, sqe.flags)
        if err:
            return err
        if req.driver is not None or (sqe.flags & _F_FIXED):
            req.issue_err = EBADF if req.driver is None else EINVAL
            return 0
    req.nbytes = sqe.len
    req.offset = sqe.off
    flags = sqe.rw_flags
    req.rw_flags = flags if type(flags) is int else int(flags)  # socket.MSG_* are IntFlags
    if sqe.len < 0:
        return EINVAL
    if req.primary is not None:  # fused secondary: addr is an offset into the lent buffer
        if not isinstance(sqe.addr, int):
            req.issue_err = EFAULT
        req.sec_off = sqe.addr if isinstance(sqe.addr, int) else 0
        return 0
    if isinstance(sqe.addr, int):
        req.issue_err = EFAULT  # SPEC R5: an int addr only means something in a secondary
        return 0
    opdef = req.opdef
    req.issue_err = _take_buffer(req, sqe.addr, sqe.len, opdef.buf_dir is _DEST)
    return 0


def _prep_fixed(ring: Ring, req: Req, sqe: Sqe) -> int:
    """READ_FIXED/WRITE_FIXED: ``addr`` is a byte offset into registered buffer ``buf_index``."""
    err = resolve_fd(ring, req, sqe.fd, sqe.flags)
    if err:
        return err
    if req.driver is not None or (sqe.flags & _F_FIXED):
        req.issue_err = EBADF if req.driver is None else EINVAL
        return 0
    if sqe.len < 0:
        return EINVAL
    req.nbytes = sqe.len
    req.offset = sqe.off
    req.rw_flags = sqe.rw_flags
    views = ring._reg_views
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
    view_made()
    return 0


def _prep_send_zc(ring: Ring, req: Req, sqe: Sqe) -> int:
    if sqe.flags & _F_SKIP:
        return EINVAL  # the kernel does not support SKIP on SEND_ZC
    return _prep_rw(ring, req, sqe)


def _file_only(ring: Ring, req: Req, sqe: Sqe) -> int:
    """Resolve the fd of an op that needs a plain file: an init error, or 0 (a driver's
    file or a fixed slot then fails at issue, as the kernel's file check does)."""
    err = resolve_fd(ring, req, sqe.fd, sqe.flags)
    if not err and (req.driver is not None or (sqe.flags & _F_FIXED)):
        req.issue_err = EBADF if req.driver is None else EINVAL
    return err


def _prep_fsync(ring: Ring, req: Req, sqe: Sqe) -> int:
    if (isinstance(sqe.addr, int) and sqe.addr) or not isinstance(sqe.addr, int) or sqe.buf_index:
        return EINVAL
    if sqe.rw_flags & ~FSYNC_DATASYNC:
        return EINVAL
    req.rw_flags = sqe.rw_flags
    return _file_only(ring, req, sqe)


def _prep_fallocate(ring: Ring, req: Req, sqe: Sqe) -> int:
    # io_fallocate_prep: addr is the length, len the mode; no buffer, no flags.
    if not isinstance(sqe.addr, int) or sqe.buf_index or sqe.rw_flags:
        return EINVAL
    req.offset = sqe.off
    req.nbytes = sqe.addr
    req.rw_flags = sqe.len
    return _file_only(ring, req, sqe)


def _timeout_seconds(sqe: Sqe) -> float | None:
    value = sqe.addr
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _prep_timeout(ring: Ring, req: Req, sqe: Sqe) -> int:
    if sqe.len != 1 or sqe.buf_index or sqe.off < 0:
        return EINVAL
    seconds = _timeout_seconds(sqe)
    if seconds is None:
        return EINVAL
    req.seconds = seconds
    req.offset = sqe.off
    return 0


def _prep_link_timeout(ring: Ring, req: Req, sqe: Sqe) -> int:
    if sqe.len != 1 or sqe.off != 0 or sqe.buf_index:
        return EINVAL
    seconds = _timeout_seconds(sqe)
    if seconds is None:
        return EINVAL
    req.seconds = seconds
    return 0  # position in a chain is checked by the ring's link assembly


def _prep_cancel(ring: Ring, req: Req, sqe: Sqe) -> int:
    if not isinstance(sqe.addr, int) or sqe.rw_flags & ~ASYNC_CANCEL_ALL:
        return EINVAL
    req.target = sqe.addr
    req.rw_flags = sqe.rw_flags
    return 0


def _prep_uring_cmd(ring: Ring, req: Req, sqe: Sqe) -> int:
    if sqe.pad1 or sqe.uring_cmd_flags & ~_CMD_FIXED or len(sqe.cmd) > MAX_CMD_BYTES:
        return EINVAL
    err = resolve_fd(ring, req, sqe.fd, sqe.flags)
    if err:
        return err
    return ring._prep_primary(req, sqe, fused=False)


def _prep_fused(ring: Ring, req: Req, sqe: Sqe) -> int:
    # SPEC F1, F2 (F3-F5 need the secondaries and run in Ring._take_secondaries).
    if not ring._fused_ok:
        return EINVAL
    if sqe.pad1 or sqe.uring_cmd_flags != _CMD_FUSED_BUF or len(sqe.cmd) > MAX_CMD_BYTES:
        return EINVAL
    err = resolve_fd(ring, req, sqe.fd, sqe.flags)
    if err:
        return err
    return ring._prep_primary(req, sqe, fused=True)


# ---- issue --------------------------------------------------------------------


def _issue_nop(ring: Ring, req: Req) -> None:
    ring._complete(req, 0)


def _issue_io(ring: Ring, req: Req) -> None:
    ring._issue_io(req)


def _issue_timeout(ring: Ring, req: Req) -> None:
    ring._arm_timeout(req)


def _issue_link_timeout(ring: Ring, req: Req) -> None:
    raise AssertionError("LINK_TIMEOUT is armed with its target, never issued")


def _issue_cancel(ring: Ring, req: Req) -> None:
    ring._async_cancel(req)


def _issue_uring_cmd(ring: Ring, req: Req) -> None:
    assert req.fused is not None
    req.fused.issue()


def check_driver_fd(req: Req, fused: bool) -> tuple[Driver | None, int]:
    """SPEC F6: the driver behind a primary's fd, or the errno."""
    if req.driver is not None:
        if fused and not req.driver.can_fused:
            return None, EOPNOTSUPP
        return req.driver, 0
    if req.fd < 0:
        return None, EBADF
    try:
        os.fstat(req.fd)
    except OSError:
        return None, EBADF
    return None, EOPNOTSUPP  # an open fd that is not a driver has no uring_cmd


def _io(op: Op, prep: Prep, buf_dir: BufDir, *, secondary: bool, short: bool) -> OpDef:
    """A leaf I/O op run by a backend (READ/WRITE/SEND/RECV and their variants)."""
    return OpDef(
        op,
        prep,
        _issue_io,
        needs_file=True,
        fused_secondary=secondary,
        buf_dir=buf_dir,
        ioprio=True,
        short_fails=short,
        backend=True,
    )


_DEST, _SRC = BufDir.DEST, BufDir.SRC

OPDEFS: dict[int, OpDef] = {
    Op.NOP: OpDef(Op.NOP, _prep_nop, _issue_nop),
    Op.READ: _io(Op.READ, _prep_rw, _DEST, secondary=True, short=True),
    Op.WRITE: _io(Op.WRITE, _prep_rw, _SRC, secondary=True, short=True),
    Op.READ_FIXED: _io(Op.READ_FIXED, _prep_fixed, _DEST, secondary=False, short=True),
    Op.WRITE_FIXED: _io(Op.WRITE_FIXED, _prep_fixed, _SRC, secondary=False, short=True),
    Op.SEND: _io(Op.SEND, _prep_rw, _SRC, secondary=True, short=False),
    Op.RECV: _io(Op.RECV, _prep_rw, _DEST, secondary=True, short=False),
    Op.SEND_ZC: _io(Op.SEND_ZC, _prep_send_zc, _SRC, secondary=True, short=False),
    Op.FSYNC: OpDef(Op.FSYNC, _prep_fsync, _issue_io, needs_file=True, backend=True),
    Op.FALLOCATE: OpDef(Op.FALLOCATE, _prep_fallocate, _issue_io, needs_file=True, backend=True),
    Op.TIMEOUT: OpDef(Op.TIMEOUT, _prep_timeout, _issue_timeout),
    Op.LINK_TIMEOUT: OpDef(Op.LINK_TIMEOUT, _prep_link_timeout, _issue_link_timeout),
    Op.ASYNC_CANCEL: OpDef(Op.ASYNC_CANCEL, _prep_cancel, _issue_cancel),
    Op.URING_CMD: OpDef(Op.URING_CMD, _prep_uring_cmd, _issue_uring_cmd, needs_file=True),
    Op.FUSED_CMD: OpDef(
        Op.FUSED_CMD, _prep_fused, _issue_uring_cmd, needs_file=True, buffer_select_err=EINVAL
    ),
}

#: Opcodes with a definition but no backend support fall back to the asyncio backend;
#: the kernel-only opcodes (READV, READ_FIXED, ...) have no entry: -EINVAL at init.


def _check_table() -> None:
    for op, d in OPDEFS.items():
        assert d.op == op, f"OPDEFS[{op!r}] describes {d.op!r}"
        if d.fused_secondary:
            assert d.buf_dir is not None, f"{op!r} is a fused secondary without a buf_dir"
        if d.backend:
            assert d.needs_file, f"{op!r} runs on a backend but needs no file"
    implemented = {
        Op.NOP,
        Op.READ_FIXED,
        Op.WRITE_FIXED,
        Op.READ,
        Op.WRITE,
        Op.SEND,
        Op.RECV,
        Op.SEND_ZC,
        Op.FSYNC,
        Op.FALLOCATE,
        Op.TIMEOUT,
        Op.LINK_TIMEOUT,
        Op.ASYNC_CANCEL,
        Op.URING_CMD,
        Op.FUSED_CMD,
    }
    assert implemented == set(OPDEFS), "every implemented opcode needs exactly one OpDef"


_check_table()
