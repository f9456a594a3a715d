"""The kernel io_uring ABI, spelled as ``include/uapi/linux/io_uring.h`` spells it.

Everything the uring backend needs from the kernel lives here: the structs (as
``ctypes`` structures, with their sizes asserted in ``tests/e2e/test_uring_abi.py``),
the ``IORING_*`` constants, the three syscalls, and the mmap of the SQ ring, the
CQ ring and the SQE array.  Nothing here knows about asyncio.

Memory ordering
---------------
The rings are shared with the kernel.  liburing orders its accesses with
``smp_store_release``/``smp_load_acquire``; pure Python has no such primitive.  On
x86-64 (TSO) plain aligned 32-bit loads and stores already have acquire/release
semantics (stores are not reordered with stores, loads not with loads, stores not
with earlier loads), and every access here goes through an opaque C call
(``struct.pack_into``, ``memoryview`` item access), which is also a compiler
barrier.  The one reordering x86 allows (a later load passing an earlier store)
matters only for a Dekker-style handshake; :func:`full_barrier` gives a locked
instruction for that.  Other architectures need real barriers, so
:func:`arch_unsupported_reason` refuses them and the caller falls back.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import sys
import threading
from typing import Any, Final, TypeAlias

from aiofused._abi import (  # noqa: F401 - re-exported kernel names
    IORING_ASYNC_CANCEL_ALL,
    IORING_FSYNC_DATASYNC,
    CqeFlag,
    Op,
)

__all__ = [
    "CQE_STRUCT",
    "IORING_OFF_CQ_RING",
    "IORING_OFF_SQES",
    "IORING_OFF_SQ_RING",
    "SQE_STRUCT",
    "RingMaps",
    "arch_unsupported_reason",
    "full_barrier",
    "io_cqring_offsets",
    "io_sqring_offsets",
    "io_uring_cqe",
    "io_uring_enter",
    "io_uring_enter_raw",
    "io_uring_params",
    "io_uring_probe",
    "io_uring_probe_op",
    "io_uring_register",
    "io_uring_setup",
    "io_uring_sqe",
    "iovec",
    "map_rings",
    "probe_ops",
]

# ---- syscall numbers (x86-64; io_uring uses the same numbers on every arch since 5.1,
# but only x86-64 is accepted here, see arch_unsupported_reason) ----------------------

NR_io_uring_setup: Final = 425
NR_io_uring_enter: Final = 426
NR_io_uring_register: Final = 427

# ---- opcodes used by the backend: the numbers live once, in aiofused._abi.Op ------

IORING_OP_NOP: Final = int(Op.NOP)
IORING_OP_READV: Final = int(Op.READV)
IORING_OP_WRITEV: Final = int(Op.WRITEV)
IORING_OP_FSYNC: Final = int(Op.FSYNC)
IORING_OP_FALLOCATE: Final = int(Op.FALLOCATE)
IORING_OP_READ_FIXED: Final = int(Op.READ_FIXED)
IORING_OP_WRITE_FIXED: Final = int(Op.WRITE_FIXED)
IORING_OP_ASYNC_CANCEL: Final = int(Op.ASYNC_CANCEL)
IORING_OP_READ: Final = int(Op.READ)
IORING_OP_WRITE: Final = int(Op.WRITE)
IORING_OP_SEND: Final = int(Op.SEND)
IORING_OP_RECV: Final = int(Op.RECV)
IORING_OP_SEND_ZC: Final = int(Op.SEND_ZC)

# ---- io_uring_setup flags ----------------------------------------------------------

IORING_SETUP_IOPOLL: Final = 1 << 0
IORING_SETUP_SQPOLL: Final = 1 << 1
IORING_SETUP_SQ_AFF: Final = 1 << 2
IORING_SETUP_CQSIZE: Final = 1 << 3
IORING_SETUP_CLAMP: Final = 1 << 4
IORING_SETUP_ATTACH_WQ: Final = 1 << 5
IORING_SETUP_R_DISABLED: Final = 1 << 6
IORING_SETUP_SUBMIT_ALL: Final = 1 << 7
IORING_SETUP_COOP_TASKRUN: Final = 1 << 8
IORING_SETUP_TASKRUN_FLAG: Final = 1 << 9
IORING_SETUP_SQE128: Final = 1 << 10
IORING_SETUP_CQE32: Final = 1 << 11
IORING_SETUP_SINGLE_ISSUER: Final = 1 << 12
IORING_SETUP_DEFER_TASKRUN: Final = 1 << 13

# ---- features reported in io_uring_params.features ---------------------------------

IORING_FEAT_SINGLE_MMAP: Final = 1 << 0
IORING_FEAT_NODROP: Final = 1 << 1
IORING_FEAT_SUBMIT_STABLE: Final = 1 << 2
IORING_FEAT_RW_CUR_POS: Final = 1 << 3
IORING_FEAT_CUR_PERSONALITY: Final = 1 << 4
IORING_FEAT_FAST_POLL: Final = 1 << 5
IORING_FEAT_POLL_32BITS: Final = 1 << 6
IORING_FEAT_SQPOLL_NONFIXED: Final = 1 << 7
IORING_FEAT_EXT_ARG: Final = 1 << 8
IORING_FEAT_NATIVE_WORKERS: Final = 1 << 9
IORING_FEAT_RSRC_TAGS: Final = 1 << 10
IORING_FEAT_CQE_SKIP: Final = 1 << 11
IORING_FEAT_LINKED_FILE: Final = 1 << 12

# ---- io_uring_enter flags ----------------------------------------------------------

IORING_ENTER_GETEVENTS: Final = 1 << 0
IORING_ENTER_SQ_WAKEUP: Final = 1 << 1
IORING_ENTER_SQ_WAIT: Final = 1 << 2
IORING_ENTER_EXT_ARG: Final = 1 << 3

# ---- ring flags ----------------------------------------------------------------------

#: sq_off.flags bits (written by the kernel).
IORING_SQ_NEED_WAKEUP: Final = 1 << 0
IORING_SQ_CQ_OVERFLOW: Final = 1 << 1
IORING_SQ_TASKRUN: Final = 1 << 2
#: cq_off.flags bits (written by the application).
IORING_CQ_EVENTFD_DISABLED: Final = 1 << 0

# ---- CQE flags -------------------------------------------------------------------------

IORING_CQE_F_BUFFER: Final = int(CqeFlag.BUFFER)
IORING_CQE_F_MORE: Final = int(CqeFlag.MORE)
IORING_CQE_F_SOCK_NONEMPTY: Final = int(CqeFlag.SOCK_NONEMPTY)
IORING_CQE_F_NOTIF: Final = int(CqeFlag.NOTIF)

# ---- per-op flags ----------------------------------------------------------------------

IORING_ASYNC_CANCEL_FD: Final = 1 << 1
IORING_ASYNC_CANCEL_ANY: Final = 1 << 2
IORING_ASYNC_CANCEL_FD_FIXED: Final = 1 << 3
IORING_ASYNC_CANCEL_USERDATA: Final = 1 << 4
IORING_RECVSEND_POLL_FIRST: Final = 1 << 0
IORING_RECVSEND_FIXED_BUF: Final = 1 << 2
IORING_SEND_ZC_REPORT_USAGE: Final = 1 << 3
IORING_NOTIF_USAGE_ZC_COPIED: Final = 1 << 31

# ---- io_uring_register opcodes -----------------------------------------------------

IORING_REGISTER_BUFFERS: Final = 0
IORING_UNREGISTER_BUFFERS: Final = 1
IORING_REGISTER_FILES: Final = 2
IORING_UNREGISTER_FILES: Final = 3
IORING_REGISTER_EVENTFD: Final = 4
IORING_UNREGISTER_EVENTFD: Final = 5
IORING_REGISTER_FILES_UPDATE: Final = 6
#: Never used by aiofused: signals only from io-wq workers, so task-work completions
#: (all poll-driven socket ops) would never wake the loop (perf-anchors §3c).
IORING_REGISTER_EVENTFD_ASYNC: Final = 7
IORING_REGISTER_PROBE: Final = 8

IO_URING_OP_SUPPORTED: Final = 1 << 0

# ---- mmap offsets ----------------------------------------------------------------------

IORING_OFF_SQ_RING: Final = 0
IORING_OFF_CQ_RING: Final = 0x8000000
IORING_OFF_SQES: Final = 0x10000000


# ---- structs ---------------------------------------------------------------------------


class io_sqring_offsets(ctypes.Structure):
    """Byte offsets of the SQ ring fields inside the SQ ring mmap."""

    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class io_cqring_offsets(ctypes.Structure):
    """Byte offsets of the CQ ring fields inside the CQ ring mmap."""

    _fields_ = (
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    )


class io_uring_params(ctypes.Structure):
    """Argument and result of ``io_uring_setup``."""

    _fields_ = (
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", io_sqring_offsets),
        ("cq_off", io_cqring_offsets),
    )


class io_uring_sqe(ctypes.Structure):
    """One submission queue entry (64 bytes; the unions are given their common name).

    The backend does not build SQEs through this class (the hot path packs them with
    :data:`SQE_STRUCT`); it documents the layout and the tests check both agree.
    """

    _fields_ = (
        ("opcode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ioprio", ctypes.c_uint16),
        ("fd", ctypes.c_int32),
        ("off", ctypes.c_uint64),  # union: addr2, cmd_op
        ("addr", ctypes.c_uint64),  # union: splice_off_in, level/optname
        ("len", ctypes.c_uint32),
        ("rw_flags", ctypes.c_uint32),  # union: fsync_flags, msg_flags, cancel_flags, ...
        ("user_data", ctypes.c_uint64),
        ("buf_index", ctypes.c_uint16),  # union: buf_group (packed)
        ("personality", ctypes.c_uint16),
        ("splice_fd_in", ctypes.c_int32),  # union: file_index, optlen, addr_len
        ("addr3", ctypes.c_uint64),
        ("__pad2", ctypes.c_uint64 * 1),
    )


class io_uring_cqe(ctypes.Structure):
    """One completion queue entry (16 bytes without ``IORING_SETUP_CQE32``)."""

    _fields_ = (
        ("user_data", ctypes.c_uint64),
        ("res", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    )


class io_uring_probe_op(ctypes.Structure):
    """One opcode entry of :class:`io_uring_probe`."""

    _fields_ = (
        ("op", ctypes.c_uint8),
        ("resv", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32),
    )


#: Opcode slots asked for in IORING_REGISTER_PROBE (the kernel caps at its own last op).
PROBE_OPS: Final = 256


class io_uring_probe(ctypes.Structure):
    """Result of IORING_REGISTER_PROBE, with room for :data:`PROBE_OPS` opcodes."""

    _fields_ = (
        ("last_op", ctypes.c_uint8),
        ("ops_len", ctypes.c_uint8),
        ("resv", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32 * 3),
        ("ops", io_uring_probe_op * PROBE_OPS),
    )


class iovec(ctypes.Structure):
    """``struct iovec`` for IORING_REGISTER_BUFFERS."""

    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


#: ``io_uring_sqe`` packed in one call: opcode, flags, ioprio, fd, off, addr, len,
#: rw_flags, user_data, buf_index, personality, splice_fd_in, addr3, __pad2.
SQE_STRUCT: Final = struct.Struct("<BBHiQQIIQHHiQQ")
#: ``io_uring_cqe``: user_data, res, flags.
CQE_STRUCT: Final = struct.Struct("<QiI")

# ---- syscalls ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


#: What :func:`io_uring_register` takes as its argument: a ctypes object, never an int.
RegisterArg: TypeAlias = "ctypes.Structure | ctypes.Array[Any] | ctypes.c_int32"


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def io_uring_setup(entries: int, params: io_uring_params) -> int:
    """``io_uring_setup(2)``: return the ring fd, or raise :class:`OSError`."""
    # Safety: params is a live ctypes object for the duration of the call; the kernel
    # reads and writes it only inside the syscall.
    return _check(
        _syscall(ctypes.c_long(NR_io_uring_setup), ctypes.c_uint(entries), ctypes.byref(params))
    )


def io_uring_enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """``io_uring_enter(2)`` without a signal mask; return the number of SQEs consumed."""
    # Safety: no pointer argument (sig is NULL, sz 0).
    return _check(
        _syscall(
            ctypes.c_long(NR_io_uring_enter),
            ctypes.c_int(fd),
            ctypes.c_uint(to_submit),
            ctypes.c_uint(min_complete),
            ctypes.c_uint(flags),
            ctypes.c_void_p(None),
            ctypes.c_size_t(0),
        )
    )


def io_uring_register(fd: int, opcode: int, arg: RegisterArg | None, nr_args: int) -> int:
    """``io_uring_register(2)`` with ``arg``'s address (NULL for None).

    ``arg`` is the ctypes object itself, never its address: this frame holds it for the
    whole syscall, whoever calls (compiled code drops a local after its last use, so an
    address taken before the call could point at freed memory during it).
    """
    # Safety: arg is referenced by this frame until _syscall returns; the kernel reads
    # (or, for the probe, writes) it only inside the call.  Memory arg points to (a
    # buffer's iov_base) is the caller's to keep alive until the matching unregister.
    return _check(
        _syscall(
            ctypes.c_long(NR_io_uring_register),
            ctypes.c_int(fd),
            ctypes.c_uint(opcode),
            ctypes.c_void_p(None) if arg is None else ctypes.byref(arg),
            ctypes.c_uint(nr_args),
        )
    )


# Fast-path variant of io_uring_enter: argtypes fixed once, so a call is one ctypes
# conversion per argument instead of building c_* wrappers in Python.
_enter_fn = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))


def io_uring_enter_raw(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """``io_uring_enter(2)`` returning ``-errno`` instead of raising (hot path)."""
    # Safety: no pointer argument (sig is NULL, sz 0).
    ret: int = _enter_fn(NR_io_uring_enter, fd, to_submit, min_complete, flags, None, 0)
    if ret < 0:
        return -ctypes.get_errno()
    return ret


# ---- architecture and ordering --------------------------------------------------------


def arch_unsupported_reason() -> str:
    """Return why this CPU/ABI cannot run the pure-Python ring, or ``""`` if it can."""
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux"):
        return f"io_uring needs Linux, not {sys.platform}"
    if machine not in ("x86_64", "amd64"):
        return (
            f"architecture {machine!r} needs memory barriers that pure Python cannot issue; "
            "only x86-64 (TSO) is supported"
        )
    if sys.maxsize < 2**63 - 1 or ctypes.sizeof(ctypes.c_void_p) != 8:
        return "only the 64-bit x86-64 ABI is supported (syscall numbers 425-427)"
    return ""


_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """Issue a full memory barrier (x86-64).

    A CPython lock acquire/release goes through a glibc atomic read-modify-write
    (``lock``-prefixed instruction), which x86-64 orders as a full fence: no later
    load passes an earlier store across it.
    """
    _barrier_lock.acquire()
    _barrier_lock.release()


# ---- mmap of the rings ------------------------------------------------------------------


class RingMaps:
    """The three shared regions of one ring, mapped with Python's :mod:`mmap`.

    ``sq_words``/``cq_words`` are ``memoryview.cast('I')`` views used for the 32-bit
    head, tail and flags words; ``sqes`` and ``cqes`` are the byte regions.
    """

    def __init__(self, fd: int, p: io_uring_params) -> None:
        sq_size = p.sq_off.array + p.sq_entries * 4
        cqes_end = cq_size = p.cq_off.cqes + p.cq_entries * ctypes.sizeof(io_uring_cqe)
        single = bool(p.features & IORING_FEAT_SINGLE_MMAP)
        if single:
            sq_size = cq_size = max(sq_size, cq_size)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        # Safety: IORING_OFF_SQ_RING maps the kernel's SQ ring (head/tail/flags/array) of
        # exactly sq_size bytes; the mapping lives until close(), after every view is released.
        self.sq_ring = mmap.mmap(fd, sq_size, flags, prot, offset=IORING_OFF_SQ_RING)
        if single:
            # Safety: with IORING_FEAT_SINGLE_MMAP the CQ ring shares the SQ ring mapping.
            self.cq_ring = self.sq_ring
        else:
            # Safety: IORING_OFF_CQ_RING maps the CQ ring (head/tail/flags/cqes), cq_size bytes.
            self.cq_ring = mmap.mmap(fd, cq_size, flags, prot, offset=IORING_OFF_CQ_RING)
        sqes_size = p.sq_entries * ctypes.sizeof(io_uring_sqe)
        # Safety: IORING_OFF_SQES maps the SQE array, sq_entries * 64 bytes.
        self.sqes = mmap.mmap(fd, sqes_size, flags, prot, offset=IORING_OFF_SQES)
        self.sq_words = memoryview(self.sq_ring).cast("I")
        self.cq_words = memoryview(self.cq_ring).cast("I")
        # Safety: cq_off.cqes is the kernel-given byte offset of the CQE array inside cq_ring,
        # which holds exactly cq_entries CQEs (the SQ array may follow it in the same map).
        self.cqes = memoryview(self.cq_ring)[p.cq_off.cqes : cqes_end]
        self._single = single

    def close(self) -> None:
        """Release the views and unmap (call only once the ring fd is done with)."""
        self.cqes.release()
        self.sq_words.release()
        self.cq_words.release()
        self.sqes.close()
        if not self._single:
            self.cq_ring.close()
        self.sq_ring.close()


def map_rings(fd: int, p: io_uring_params) -> RingMaps:
    """Map the SQ ring, CQ ring and SQE array of the ring ``fd`` set up with ``p``."""
    return RingMaps(fd, p)


def probe_ops(fd: int) -> frozenset[int]:
    """Return the opcodes the kernel reports as supported (IORING_REGISTER_PROBE)."""
    probe = io_uring_probe()
    # Safety: probe is a live ctypes object sized for PROBE_OPS entries; the kernel writes
    # at most nr_args entries into it during the call.
    io_uring_register(fd, IORING_REGISTER_PROBE, probe, PROBE_OPS)
    n = min(probe.ops_len, PROBE_OPS)
    return frozenset(
        probe.ops[i].op for i in range(n) if probe.ops[i].flags & IO_URING_OP_SUPPORTED
    )
