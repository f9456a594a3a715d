"""The real kernel io_uring backend: a ctypes ring run as a sidecar of the event loop.

Theory of operation
-------------------
*Submission.*  :meth:`UringBackend.start` writes the op's SQE straight into the mmap'd
SQE array (slot ``tail & mask``; the SQ index array is the identity, written once) and
schedules one ``loop.call_soon(_flush)`` per loop tick.  ``_flush`` publishes the SQ
tail with a single store and calls ``io_uring_enter(to_submit)`` once, so a burst of
ops in one tick costs one syscall.  An op that finds the SQ full waits in a Python
backlog; ``_flush`` refills the SQ and enters again until the backlog is empty.
``EINTR`` is retried at once; ``EAGAIN``/``EBUSY``/``ENOMEM`` after reaping, backing
off to a 1 ms timer if they persist; any other error withdraws the SQEs the kernel did
not consume (without SQPOLL the kernel reads the SQ only inside ``io_uring_enter``) and
completes their ops with it.  Everything runs on the loop's thread.

*Completion.*  An eventfd is registered with plain ``IORING_REGISTER_EVENTFD`` (never
``_ASYNC``: it stays silent for task-work completions) and watched with
``loop.add_reader``.  Around our own ``io_uring_enter`` we set
``IORING_CQ_EVENTFD_DISABLED`` so completions posted inline cost no wake-up; after
clearing it we issue a full barrier and reap, so a CQE posted while the flag was set is
seen by that reap, and one posted after it signals the eventfd (no lost wake-up).  Every
wake-up drains the CQ to empty and, while ``IORING_SQ_CQ_OVERFLOW`` is set, flushes the
kernel's overflow list (``IORING_FEAT_NODROP``) with ``io_uring_enter(GETEVENTS)`` and
drains again.  A slow watchdog timer peeks at the CQ while ops are in flight, as a
last line of defence.

*user_data* is ``id(record)``, the key of the in-flight dict.  A record lives until
its final CQE, so no other live op can have its user_data while the kernel may still
report on it.  An address can be reused once the record is gone, but never by an op
whose SQE precedes a cancel aimed at the old one: ``cancel`` only targets live records,
SQEs (and the backlog) are consumed in order and ``IORING_OP_ASYNC_CANCEL`` runs when it
is issued, so the stale cancel finds nothing (-ENOENT).

*Buffer lifetime (SPEC F13).*  The record holds the ``IoOp`` (so ``op.buf`` and
``op.file``; a direct op, taken by :meth:`UringBackend.start_direct` with no ring
record, has only its ``user_data`` and the export) and a buffer export taken on
``op.buf`` (a ctypes array from
``from_buffer`` for writable views, a ``Py_buffer`` from ``PyObject_GetBuffer`` for
read-only ones).  The export is what gives the kernel its address, and it pins the
underlying object: a ``bytearray`` cannot be resized and an ``mmap`` cannot be closed
while it exists, and unlike the caller's own view nobody else can release it.  It is
released only when the op's final CQE has been reaped from the
kernel (for SEND_ZC: the ``IORING_CQE_F_NOTIF`` one), just before ``complete`` runs.
Cancelling only submits ``IORING_OP_ASYNC_CANCEL``; the record stays until the CQE.
Every open backend sits in a module-level set until :meth:`aclose` has drained it, so
garbage collection can never free a buffer the kernel may still write.

*SEND_ZC.*  The kernel posts the result with ``IORING_CQE_F_MORE`` and later a
``IORING_CQE_F_NOTIF`` CQE; both are passed on in that order.  If the result comes
without ``F_MORE`` (no notification will follow) the NOTIF is synthesised.  A socket
that cannot do zero copy (AF_UNIX) answers ``-EOPNOTSUPP``: the backend waits for that
attempt's notification and reissues the op as a plain SEND, as the asyncio backend
would have done, so both backends give the same results.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

from aiofused._abi import IO_FAILED, MSG_TRUNC, MSG_WAITALL, CqeFlag, Op
from aiofused._abi import uring as abi
from aiofused._abi.buffer import BufferExport
from aiofused._abi.pin import pin_rw
from aiofused._core.opdef import DIRECT_OPS, OPDEFS, UringEnc
from aiofused._errors import BackendUnavailable
from aiofused._log import get_logger
from aiofused.backends._base import Backend, BackendOp, Completion, IoOp, ProbeResult

if TYPE_CHECKING:
    from aiofused._core.sqe import Sqe

__all__ = ["BACKEND", "UringBackend", "reset_probe_cache"]

log: Final = get_logger("aiofused.backend.uring")

# ---- test hooks (module attributes so tests can monkeypatch them) -------------------

#: The ``io_uring_setup`` used by :meth:`UringBackend.probe` and the constructor; tests
#: replace it with a function raising ``OSError(EPERM)`` to simulate seccomp.
setup_syscall: Callable[[int, abi.io_uring_params], int] = abi.io_uring_setup
#: The sysctl that disables io_uring system-wide (6.6+): 0 on, 1 restricted, 2 off.
IO_URING_DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"

_probe_cache: ProbeResult | None = None


def reset_probe_cache() -> None:
    """Forget the cached :meth:`UringBackend.probe` result (tests)."""
    global _probe_cache
    _probe_cache = None


# ---- constants -------------------------------------------------------------------------

# Per-opcode facts used by start(), from the op table: bits of the third field.
_I_OFFSET: Final = int(UringEnc.OFFSET)  # the SQE carries op.offset
_I_FIXED: Final = int(UringEnc.FIXED)  # the SQE carries op.buf_index
_I_DEST: Final = int(UringEnc.DEST)  # the kernel writes the buffer (needs a writable view)
_I_NEEDS_BUF: Final = int(UringEnc.BUF)
_I_FALLOC: Final = int(UringEnc.FALLOC)  # addr carries op.nbytes (the length), len the mode

# Record kinds.
_K_PLAIN: Final = 0
_K_ZC: Final = 1
_K_CANCEL: Final = 2
_K_DIRECT: Final = 3  # a standalone op the ring handed over as is (start_direct)

#: opcode -> (kernel opcode number, record kind, _I_* flags), for every op the op table
#: gives a kernel encoding.
_OPINFO: Final[dict[int, tuple[int, int, int]]] = {
    d.op: (int(d.op), _K_ZC if d.uring & UringEnc.ZC else _K_PLAIN, int(d.uring))
    for d in OPDEFS.values()
    if d.uring & UringEnc.KERNEL
}
#: Opcodes this backend executes (intersected with what the kernel reports).
IMPLEMENTED_OPS: Final = frozenset(Op(op) for op in _OPINFO)

_U64: Final = 0xFFFFFFFFFFFFFFFF
_U32: Final = 0xFFFFFFFF

_ECANCELED: Final = -errno.ECANCELED
_ENOENT: Final = -errno.ENOENT
_EALREADY: Final = -errno.EALREADY
_EFAULT: Final = -errno.EFAULT
_EINVAL: Final = -errno.EINVAL
_EOPNOTSUPP: Final = -errno.EOPNOTSUPP
_F_MORE: Final = int(CqeFlag.MORE)
_F_SOCK_NONEMPTY: Final = int(CqeFlag.SOCK_NONEMPTY)
#: What a plain op's completion passes on: SOCK_NONEMPTY, and our failure mark.
_F_CQE_KEEP: Final = _F_SOCK_NONEMPTY | IO_FAILED
_MSG_WAITALL: Final = MSG_WAITALL
_OP_RECV: Final = int(Op.RECV)


def _recv_trunc(op: IoOp) -> int:
    """``msg_flags`` of a MSG_WAITALL op: a RECV on a datagram or seqpacket socket
    object gets MSG_TRUNC too, so that its CQE tells a truncated record (never on a
    stream socket, where MSG_TRUNC would drop data; an int fd is left as it is)."""
    rw = op.rw_flags & _U32
    sock = op.file
    if (
        op.opcode == _OP_RECV
        and not rw & MSG_TRUNC
        and isinstance(sock, socket.socket)
        and sock.type in (socket.SOCK_SEQPACKET, socket.SOCK_DGRAM)
    ):
        return rw | MSG_TRUNC
    return rw


_F_NOTIF: Final = int(CqeFlag.NOTIF)

# Record states.
_S_QUEUED: Final = 0  # in the Python backlog, no SQE written yet
_S_KERNEL: Final = 1  # SQE in the SQ (published at the next flush) or in the kernel
_S_NOTIF: Final = 2  # SEND_ZC: result delivered, waiting for the kernel's notification
_S_DONE: Final = 3

# SEND_ZC bits in _Record.zc.
_ZC_WAIT_NOTIF: Final = 1  # failed zero-copy attempt: waiting for its NOTIF to reissue
_ZC_REISSUED: Final = 2  # now running as a plain SEND
_ZC_NOTIF_EARLY: Final = 4  # the NOTIF CQE came before the result CQE
_ZC_CANCELLED: Final = 8  # cancelled while waiting to be reissued

#: Bounds of the retry loops (EINTR/EAGAIN/EBUSY, overflow flushing).
_ENTER_RETRIES: Final = 64
_BACKOFF_AFTER: Final = 8
_WATCHDOG_PERIOD: Final = 1.0
_CLOSE_PROGRESS_PERIOD: Final = 1.0
_CLOSE_GIVE_UP: Final = 120.0

#: Backends that still have a ring open: they (and every buffer their records pin) are
#: never garbage collected before aclose() has drained the kernel.
_OPEN: Final[set[UringBackend]] = set()
#: What a ring abandoned with ops still in the kernel pinned (aclose gave up): kept
#: forever rather than risk the kernel writing into freed memory.
_ABANDONED: Final[list[object]] = []


# ---- buffer exports ----------------------------------------------------------------------


_array_types: Final[dict[int, Any]] = {}
_pack_sqe: Final = abi.SQE_STRUCT.pack_into
_pin_rw: Final = pin_rw  # a C call when the C twin is built


def _array_type(nbytes: int) -> Any:
    t = _array_types.get(nbytes)
    if t is None:
        t = ctypes.c_char * nbytes
        if len(_array_types) < 512:
            _array_types[nbytes] = t
    return t


# ---- records ---------------------------------------------------------------------------


class _Record(BackendOp):
    """One op (or one of our ASYNC_CANCELs) between ``start`` and its final CQE.

    ``op`` (hence ``op.buf`` and ``op.file``) and ``pin`` (the buffer export whose
    address the kernel has) are dropped only when the final CQE has been reaped.
    ``sqe`` is set only while the record waits in the backlog; ``zc`` and ``addr``
    only for SEND_ZC.  A direct op's record (``_K_DIRECT``, from :meth:`start_direct`)
    has no ``op`` or ``complete``: only ``pin`` and the ring's ``user_data``.
    """

    __slots__ = (
        "addr",
        "complete",
        "kind",
        "nbytes",
        "op",
        "pin",
        "sqe",
        "state",
        "user_data",
        "zc",
    )

    def __init__(self, kind: int, op: IoOp | None, complete: Any, pin: object) -> None:
        self.kind = kind
        self.op = op
        #: ``complete(res, flags)`` for ops; ``on_result(res)`` for our cancels.
        self.complete = complete
        self.pin = pin
        self.state = _S_KERNEL
        self.sqe: tuple[int, ...]
        self.zc: int
        self.addr: int
        self.nbytes: int
        #: The ring's user_data of a direct op (its CQE goes back under it).
        self.user_data: int


# ---- probe --------------------------------------------------------------------------------


def _errno_reason(exc: OSError) -> str:
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    hint = {
        errno.ENOSYS: "kernel without io_uring, or io_uring_setup blocked by seccomp",
        errno.EPERM: "blocked by seccomp/container policy or io_uring_disabled",
        errno.EACCES: "denied by a security module",
        errno.ENOMEM: "cannot allocate ring memory (RLIMIT_MEMLOCK or memcg)",
    }.get(code, "io_uring_setup refused")
    return f"io_uring_setup failed with {name} ({hint})"


def _read_disabled_sysctl() -> int | None:
    try:
        with open(IO_URING_DISABLED_PATH, encoding="ascii") as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None


#: Optional setup flags, best first; a kernel that does not know one answers -EINVAL.
#: COOP_TASKRUN: completions the kernel finishes on our behalf (io-wq, async buffered
#: reads) are posted at our next kernel entry instead of interrupting the loop with an
#: IPI; a sleeping loop is still woken, and the eventfd still fires.
_OPTIONAL_SETUP_FLAGS: Final = (
    abi.IORING_SETUP_SUBMIT_ALL | abi.IORING_SETUP_COOP_TASKRUN,
    abi.IORING_SETUP_SUBMIT_ALL,
    0,
)


def _setup(sq_entries: int, cq_entries: int) -> tuple[int, abi.io_uring_params]:
    """Create a ring, dropping the optional setup flags the kernel may not know."""
    base = abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_CLAMP
    for extra in _OPTIONAL_SETUP_FLAGS:
        p = abi.io_uring_params()
        p.flags = base | extra
        p.cq_entries = cq_entries
        try:
            return setup_syscall(sq_entries, p), p
        except OSError as exc:
            if exc.errno != errno.EINVAL or extra == 0:
                raise
    raise AssertionError("unreachable")


def _do_probe() -> ProbeResult:
    name = UringBackend.name
    reason = abi.arch_unsupported_reason()
    if reason:
        return ProbeResult(name, False, reason)
    disabled = _read_disabled_sysctl()
    if disabled == 2:
        return ProbeResult(name, False, f"io_uring disabled by {IO_URING_DISABLED_PATH}=2")
    try:
        fd, p = _setup(4, 8)
    except OSError as exc:
        reason = _errno_reason(exc)
        if disabled == 1:
            reason += f"; {IO_URING_DISABLED_PATH}=1 restricts io_uring to io_uring_group"
        return ProbeResult(name, False, reason)
    try:
        if not p.features & abi.IORING_FEAT_NODROP:
            return ProbeResult(name, False, "kernel lacks IORING_FEAT_NODROP (CQEs could be lost)")
        try:
            kernel_ops = abi.probe_ops(fd)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return ProbeResult(name, False, f"IORING_REGISTER_PROBE failed with {code}")
    finally:
        os.close(fd)
    ops = frozenset(op for op in IMPLEMENTED_OPS if int(op) in kernel_ops)
    if not ops:
        return ProbeResult(name, False, "the kernel supports none of the ops this backend runs")
    return ProbeResult(name, True, "", ops)


# ---- the backend --------------------------------------------------------------------------


class UringBackend(Backend):
    """Runs leaf I/O ops on a kernel io_uring, integrated as a sidecar of ``loop``.

    ``sq_entries``/``cq_entries`` size the ring (the CQ defaults to 4 x SQ); the ring
    calls ``UringBackend(loop)``, tests pass a tiny CQ to force overflow.
    """

    name: ClassVar[str] = "uring"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        sq_entries: int = 256,
        cq_entries: int | None = None,
    ) -> None:
        super().__init__(loop)
        probe = self.probe()
        if not probe.available:
            raise BackendUnavailable(self.name, probe.reason)
        self._ops = probe.ops
        #: opcode -> its _OPINFO entry, for the ops the kernel has (None: not here);
        #: lists indexed by opcode, which cost no hashing.
        self._opinfo: list[tuple[int, int, int] | None] = [None] * 256
        #: opcode -> (opcode, _I_* flags) for what start_direct takes.
        self._direct_info: list[tuple[int, int] | None] = [None] * 256
        for op in probe.ops:
            info = _OPINFO[op]
            self._opinfo[op] = info
            if op in DIRECT_OPS:
                self._direct_info[op] = (info[0], info[2])
        if cq_entries is None:
            cq_entries = 4 * sq_entries
        self._closed = False
        self._closing = False
        self._efd = -1
        self._maps: abi.RingMaps | None = None
        self._buf_exports: list[BufferExport] = []
        self._retired_exports: list[BufferExport] = []
        try:
            fd, p = _setup(sq_entries, max(cq_entries, sq_entries))
        except OSError as exc:
            raise BackendUnavailable(self.name, _errno_reason(exc)) from exc
        self._fd: int = fd
        self.features: int = p.features
        #: The ``IORING_SETUP_*`` flags the kernel accepted (see _OPTIONAL_SETUP_FLAGS).
        self.setup_flags: int = p.flags
        self.sq_entries: int = p.sq_entries
        self.cq_entries: int = p.cq_entries
        try:
            self._maps = maps = abi.map_rings(fd, p)
            # Identity SQ index array: SQE slot i is always published as index i.
            array_word = p.sq_off.array // 4
            for i in range(p.sq_entries):
                maps.sq_words[array_word + i] = i
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            # The kernel copies the int during the call.
            abi.io_uring_register(fd, abi.IORING_REGISTER_EVENTFD, ctypes.c_int32(self._efd), 1)
        except BaseException:
            self._teardown()
            raise
        # Ring geometry, cached as plain ints for the hot path (annotated: ctypes fields are
        # Any to the compiler, which would make every index computation generic).
        self._sq_tail_idx: int = p.sq_off.tail // 4
        self._sq_head_idx: int = p.sq_off.head // 4
        self._sq_flags_idx: int = p.sq_off.flags // 4
        self._sq_mask: int = p.sq_entries - 1
        self._sq_tail: int = maps.sq_words[self._sq_tail_idx]
        #: SQ slots we may still fill before the next io_uring_enter.
        self._sq_free: int = p.sq_entries
        self._cq_head_idx: int = p.cq_off.head // 4
        self._cq_tail_idx: int = p.cq_off.tail // 4
        self._cq_flags_idx: int = p.cq_off.flags // 4
        self._cq_mask: int = p.cq_entries - 1
        self._cq_head: int = maps.cq_words[self._cq_head_idx]
        self._sq_words = maps.sq_words
        self._cq_words = maps.cq_words
        self._sqes = maps.sqes
        self._cqes = maps.cqes
        # In flight: user_data (id of the record) -> record, until the final CQE.
        self._inflight: dict[int, _Record] = {}
        self._n_cancels = 0  # our ASYNC_CANCEL records among them
        self._backlog: deque[_Record] = deque()
        self._flush_handle: asyncio.Handle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        #: Counters (tests and benchmarks read them).
        self.enter_calls = 0
        self.overflow_flushes = 0
        self.eventfd_wakeups = 0
        self.watchdog_reaps = 0
        #: Ops taken as is by start_direct (no ring record).
        self.direct_ops = 0
        loop.add_reader(self._efd, self._on_eventfd)
        _OPEN.add(self)
        log.debug(
            "uring_open",
            fd=fd,
            sq_entries=self.sq_entries,
            cq_entries=self.cq_entries,
            features=hex(self.features),
        )

    # ---- Backend API -------------------------------------------------------------------

    @classmethod
    def probe(cls) -> ProbeResult:
        """Try ``io_uring_setup`` and ``IORING_REGISTER_PROBE``; cached after the first call.

        Unavailable (with the reason) on a non-x86-64 CPU, with
        ``/proc/sys/kernel/io_uring_disabled`` = 2, when setup fails (ENOSYS, EPERM,
        EACCES, ENOMEM, ...), or when the kernel lacks IORING_FEAT_NODROP or the probe.
        """
        global _probe_cache
        result = _probe_cache
        if result is None:
            result = _probe_cache = _do_probe()
            if not result.available:
                log.debug("uring_probe_unavailable", reason=result.reason)
        return result

    @property
    def supported_ops(self) -> frozenset[Op]:
        """The kernel's supported opcodes intersected with :data:`IMPLEMENTED_OPS`."""
        return self._ops

    def in_flight(self) -> int:
        """Ops started and not yet finally completed (SEND_ZC: until its NOTIF)."""
        return len(self._inflight) - self._n_cancels

    def start(self, op: IoOp, complete: Completion) -> BackendOp:
        """Write ``op``'s SQE (or queue it); the flush at the end of this tick submits it."""
        opcode = op.opcode
        info = self._opinfo[opcode] if 0 <= opcode < 256 else None
        buf = op.buf
        # The fast path: a plain op on a writable buffer, with room in the SQ (there is
        # no room while anything waits in the backlog, so the order is kept).
        if info is None or info[1] or buf is None or buf.readonly or not self._sq_free:
            return self._start_general(op, complete, info)
        nbytes = op.nbytes  # (pin_rw refuses more than buf holds: the general path clamps)
        # Safety: the pin exports buf (its memory cannot move or be freed) for as long as
        # the record holds it, i.e. until the op's final CQE has been reaped; pin_rw
        # writes the SQE naming that memory only once the export is held.
        rec = _Record(_K_PLAIN, op, complete, None)
        ud = id(rec)
        flags = info[2]
        tail = self._sq_tail
        try:
            rec.pin = _pin_rw(
                self._sqes,
                (tail & self._sq_mask) << 6,
                info[0],
                op.fd,
                op.offset if flags & _I_OFFSET else 0,
                buf,
                nbytes,
                _recv_trunc(op) if op.rw_flags & _MSG_WAITALL else op.rw_flags,
                ud,
                op.buf_index if flags & _I_FIXED else 0,
            )
        except (BufferError, TypeError, ValueError):
            return self._start_general(op, complete, info)
        self._inflight[ud] = rec
        self._sq_tail = tail + 1
        self._sq_free -= 1
        if self._flush_handle is None:
            self._schedule_flush()
        return rec

    def start_direct(self, sqe: Sqe) -> bool:
        """Copy standalone flagless ``sqe`` into the SQ as is, with a record of its own
        user_data, if it is a kernel op on an int fd with a writable bytearray or
        memoryview that holds ``len`` bytes and the SQ has room (else False: the ring's
        general path takes it, and gives any error)."""
        opcode = sqe.opcode
        info = self._direct_info[opcode] if 0 <= opcode < 256 else None
        fd = sqe.fd
        if info is None or type(fd) is not int or fd < 0 or not self._sq_free:
            return False
        buf = sqe.addr
        kind = type(buf)
        if kind is bytearray:
            size = len(buf)
        elif kind is memoryview and buf.c_contiguous:
            size = buf.nbytes
        else:
            return False
        nbytes = sqe.len
        if not 0 <= nbytes <= size or not size:
            return False
        # Safety: the pin exports buf (it cannot move or be freed) until the record drops
        # it, when the op's CQE has been reaped (_dispatch).
        rec = _Record(_K_DIRECT, None, None, None)
        ud = id(rec)
        op, flags = info
        tail = self._sq_tail
        try:
            rec.pin = _pin_rw(
                self._sqes,
                (tail & self._sq_mask) << 6,
                op,
                fd,
                sqe.off if flags & _I_OFFSET else 0,
                buf,
                nbytes,
                0,
                ud,
                0,
            )
        except (BufferError, TypeError, ValueError):
            return False
        rec.user_data = sqe.user_data
        self._inflight[ud] = rec
        self.direct_ops += 1
        self._sq_tail = tail + 1
        self._sq_free -= 1
        if self._flush_handle is None:
            self._schedule_flush()
        return True

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        """Submit an ASYNC_CANCEL for each direct op in the kernel with ``user_data``."""
        n = 0
        for ud, rec in list(self._inflight.items()):
            if (
                rec.kind == _K_DIRECT
                and rec.state == _S_KERNEL
                and (user_data is None or rec.user_data == user_data)
            ):
                self._submit_cancel(ud, on_result)
                n += 1
                if not every:
                    break
        return n

    def _schedule_flush(self) -> None:
        self._flush_handle = self.loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(_WATCHDOG_PERIOD, self._on_watchdog)

    def _start_general(
        self, op: IoOp, complete: Completion, info: tuple[int, int, int] | None
    ) -> BackendOp:
        """Every case the fast path of :meth:`start` leaves out (and every error)."""
        if self._closing:
            raise RuntimeError("uring backend is closed")
        kind = _K_PLAIN if info is None else info[1]
        rec = _Record(kind, op, complete, None)
        ud = id(rec)
        self._inflight[ud] = rec
        if info is None:
            self._fail_soon(rec, _EINVAL)
            return rec
        flags = info[2]
        addr = 0
        nbytes = 0
        buf = op.buf
        if buf is not None:
            nbytes = op.nbytes
            if not 0 <= nbytes <= buf.nbytes:
                nbytes = buf.nbytes
            try:
                if buf.readonly:
                    if flags & _I_DEST:
                        self._fail_soon(rec, _EFAULT)
                        return rec
                    exp = BufferExport(buf, writable=False)
                    rec.pin = exp
                    addr = exp.addr
                else:
                    arr = _array_type(nbytes).from_buffer(buf)
                    rec.pin = arr
                    # Safety: arr exports buf until the op's final CQE (see start()).
                    addr = ctypes.addressof(arr)
            except (BufferError, TypeError, ValueError):
                self._fail_soon(rec, _EFAULT)
                return rec
        elif flags & _I_NEEDS_BUF:
            self._fail_soon(rec, _EFAULT)
            return rec
        if kind == _K_ZC:
            rec.zc = 0
            rec.addr = addr
            rec.nbytes = nbytes
        rw_flags = _recv_trunc(op) if op.rw_flags & _MSG_WAITALL else op.rw_flags & _U32
        if flags & _I_FALLOC:
            addr, nbytes, rw_flags = op.nbytes & _U64, rw_flags, 0
        sqe = (
            info[0],
            0,
            0,
            op.fd,
            op.offset & _U64 if flags & _I_OFFSET else 0,
            addr,
            nbytes,
            rw_flags,
            ud,
            op.buf_index & 0xFFFF if flags & _I_FIXED else 0,
        )
        self._push(rec, sqe)
        return rec

    def cancel(self, handle: BackendOp, on_result: Callable[[int], None]) -> None:
        """Submit ``IORING_OP_ASYNC_CANCEL`` for ``handle``; ``on_result`` gets its CQE's res.

        The kernel's answer is passed on: 0 (found; the op completes, usually with
        -ECANCELED), -EALREADY (running, it completes normally) or -ENOENT (already
        done).  The op's buffer stays pinned until the op's own final CQE.
        """
        rec = handle
        if not isinstance(rec, _Record) or rec.kind == _K_CANCEL:
            raise TypeError(f"not a uring backend op: {handle!r}")
        state = rec.state
        loop = self.loop
        if state in (_S_DONE, _S_NOTIF) or self._closed:
            loop.call_soon(on_result, _ENOENT)
        elif state == _S_QUEUED:
            # Never reached the kernel: cancel it here.
            self._backlog.remove(rec)
            self._fail_soon(rec, _ECANCELED)
            loop.call_soon(on_result, 0)
        elif rec.kind == _K_ZC and rec.zc & _ZC_WAIT_NOTIF:
            # Waiting for the notification of a failed zero-copy attempt; the plain SEND
            # that would replace it has not started.
            rec.zc |= _ZC_CANCELLED
            loop.call_soon(on_result, 0)
        else:
            self._submit_cancel(id(rec), on_result)

    def register_buffers(self, buffers: list[memoryview]) -> bool:
        """Register ``buffers`` with IORING_REGISTER_BUFFERS for READ_FIXED/WRITE_FIXED.

        Each buffer stays exported (pinned) while registered, i.e. until :meth:`aclose`.
        Registering again replaces the set; the old exports are kept until close, since
        fixed ops still in flight may use them.  Returns False (and logs why) when the
        kernel refuses (ENOMEM under RLIMIT_MEMLOCK, read-only memory, ...).
        """
        if self._closing or not buffers:
            return False
        exports: list[BufferExport] = []
        try:
            for b in buffers:
                exports.append(BufferExport(b, writable=True))
        except (BufferError, TypeError, ValueError) as exc:
            for e in exports:
                e.release()
            log.info("uring_register_buffers_refused", reason=str(exc))
            return False
        iovs = (abi.iovec * len(exports))()
        for i, e in enumerate(exports):
            iovs[i].iov_base = e.addr
            iovs[i].iov_len = e.nbytes
        if self._buf_exports:
            with contextlib.suppress(OSError):
                abi.io_uring_register(self._fd, abi.IORING_UNREGISTER_BUFFERS, None, 0)
            self._retired_exports.extend(self._buf_exports)
            self._buf_exports = []
        try:
            # Safety: each iov_base stays exported in self._buf_exports until the
            # buffers are unregistered (the kernel copies the iovecs during the call).
            abi.io_uring_register(self._fd, abi.IORING_REGISTER_BUFFERS, iovs, len(exports))
        except OSError as exc:
            for e in exports:
                e.release()
            log.info(
                "uring_register_buffers_failed",
                errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                count=len(exports),
            )
            return False
        self._buf_exports = exports
        return True

    async def aclose(self) -> None:
        """Cancel in-kernel work, wait for every CQE, then release the ring.

        Completions still reach their callbacks (mostly -ECANCELED).  Progress is
        logged every second; after two minutes the ring and everything its records pin
        are abandoned (kept alive forever) rather than freed under the kernel.
        """
        if self._closed:
            return
        self._closing = True
        self._opinfo = [None] * 256  # start() now takes the general path, which refuses
        self._direct_info = [None] * 256
        loop = self.loop
        # Ops that never reached the kernel are cancelled here.
        while self._backlog:
            self._fail_soon(self._backlog.popleft(), _ECANCELED)
        started = time.monotonic()
        while self._inflight:
            # Ask the kernel to cancel whatever is still in flight (ops found running
            # answer -EALREADY and complete on their own).
            for ud, rec in list(self._inflight.items()):
                if rec.kind != _K_CANCEL and rec.state == _S_KERNEL:
                    self._submit_cancel(ud, _ignore_cancel_result)
            self._submit_and_reap()
            if not self._inflight:
                break
            self._drained = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), _CLOSE_PROGRESS_PERIOD)
            except TimeoutError:
                elapsed = time.monotonic() - started
                log.warning(
                    "uring_close_waiting", in_flight=self.in_flight(), seconds=round(elapsed)
                )
                if elapsed > _CLOSE_GIVE_UP:
                    log.error("uring_close_abandoned", in_flight=self.in_flight())
                    self._close_fds(abandon=True)
                    return
            finally:
                self._drained = None
        self._close_fds(abandon=False)

    # ---- submission --------------------------------------------------------------------

    def _push(self, rec: _Record, sqe: tuple[int, ...]) -> None:
        """Write ``sqe`` into the SQ if there is room, else queue it; schedule a flush."""
        if self._sq_free:
            tail = self._sq_tail
            _pack_sqe(self._sqes, (tail & self._sq_mask) << 6, *sqe, 0, 0, 0, 0)
            self._sq_tail = tail + 1
            self._sq_free -= 1
            rec.state = _S_KERNEL
        else:
            rec.sqe = sqe
            rec.state = _S_QUEUED
            self._backlog.append(rec)
        if self._flush_handle is None:
            self._schedule_flush()

    def _submit_cancel(self, target_ud: int, on_result: Callable[[int], None]) -> None:
        rec = _Record(_K_CANCEL, None, on_result, None)
        ud = id(rec)
        self._inflight[ud] = rec
        self._n_cancels += 1
        self._push(rec, (abi.IORING_OP_ASYNC_CANCEL, 0, 0, -1, 0, target_ud, 0, 0, ud, 0))

    def _fill_from_backlog(self) -> None:
        backlog = self._backlog
        tail = self._sq_tail
        mask = self._sq_mask
        pack = abi.SQE_STRUCT.pack_into
        sqes = self._sqes
        n = self._sq_free
        while backlog and n:
            rec = backlog.popleft()
            pack(sqes, (tail & mask) << 6, *rec.sqe, 0, 0, 0, 0)
            rec.state = _S_KERNEL
            tail += 1
            n -= 1
        self._sq_free = n
        self._sq_tail = tail

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._closed:
            self._submit_and_reap()

    def _submit_and_reap(self) -> None:
        """Submit everything written (and the backlog), then drain the CQ to empty."""
        words = self._sq_words
        cq_words = self._cq_words
        flags_idx = self._cq_flags_idx
        head_idx = self._sq_head_idx
        for attempt in range(_ENTER_RETRIES):
            if self._backlog:
                self._fill_from_backlog()
            to_submit = (self._sq_tail - words[head_idx]) & _U32
            self._sq_tail &= _U32
            if not to_submit:
                break
            # Publish the SQEs written so far (x86-64: this store is a release).
            words[self._sq_tail_idx] = self._sq_tail
            cq_words[flags_idx] |= abi.IORING_CQ_EVENTFD_DISABLED
            ret = abi.io_uring_enter_raw(self._fd, to_submit, 0, 0)
            cq_words[flags_idx] &= ~abi.IORING_CQ_EVENTFD_DISABLED
            # The clear must be visible before we read the CQ tail (Dekker with the
            # kernel's "post CQE, then check the flag"): a full barrier on x86-64.
            abi.full_barrier()
            self.enter_calls += 1
            # Not SQPOLL: the kernel consumes SQEs only inside io_uring_enter.  Refill
            # from the backlog before anything else can start an op: while the backlog
            # is not empty, _sq_free stays 0 and start() cannot overtake it.
            self._sq_free = self.sq_entries - ((self._sq_tail - words[head_idx]) & _U32)
            refilled = bool(self._backlog)
            if refilled:
                self._fill_from_backlog()
            self._reap()
            if ret == to_submit and not refilled:
                return
            if ret >= 0 or ret == -errno.EINTR:
                continue
            if ret in (-errno.EAGAIN, -errno.EBUSY, -errno.ENOMEM):
                # Back-pressure: we reaped above; retry, and back off if it persists.
                if attempt >= _BACKOFF_AFTER:
                    log.warning("uring_enter_backoff", errno=errno.errorcode.get(-ret, -ret))
                    self._retry_later()
                    return
                continue
            self._fail_unsubmitted(ret)
            break
        else:
            self._retry_later()
            return
        self._reap()

    def _retry_later(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = self.loop.call_later(0.001, self._flush)

    def _fail_unsubmitted(self, res: int) -> None:
        """``io_uring_enter`` failed hard: take back the unconsumed SQEs and fail them."""
        log.error("uring_enter_failed", errno=errno.errorcode.get(-res, -res))
        words = self._sq_words
        head = words[self._sq_head_idx]
        uds = []
        while head != self._sq_tail & _U32:
            slot_off = (head & self._sq_mask) << 6
            uds.append(abi.SQE_STRUCT.unpack_from(self._sqes, slot_off)[8])
            head = (head + 1) & _U32
        # Not SQPOLL: the kernel reads the SQ only inside io_uring_enter, so moving the
        # tail back withdraws the SQEs.
        self._sq_tail = words[self._sq_head_idx]
        words[self._sq_tail_idx] = self._sq_tail
        self._sq_free = self.sq_entries
        backlog = list(self._backlog)
        self._backlog.clear()
        for ud in uds:
            rec = self._inflight.get(ud)
            if rec is not None:
                self._fail_soon(rec, res)
        for rec in backlog:
            self._fail_soon(rec, res)

    def _fail_soon(self, rec: _Record, res: int) -> None:
        """Complete ``rec`` with ``res`` on a later loop iteration (never synchronously)."""
        rec.state = _S_DONE
        self.loop.call_soon(self._finish_without_kernel, rec, res)

    def _finish_without_kernel(self, rec: _Record, res: int) -> None:
        if rec.kind == _K_DIRECT:
            if rec.pin is not None:  # else already finished
                self._release(rec)
                self.deliver([(rec.user_data, res, 0)])
            return
        if rec.complete is None and rec.op is None:
            return  # already finished (failed twice, e.g. withdrawn then closed)
        complete = rec.complete
        kind = rec.kind
        self._release(rec)
        if complete is None:
            return
        if kind == _K_CANCEL:
            # The cancel never reached the kernel: its target runs on.
            complete(_EALREADY)
        elif kind == _K_ZC:
            complete(res, _F_MORE)
            complete(0, _F_NOTIF)
        else:
            complete(res, 0)

    # ---- completion --------------------------------------------------------------------

    def _release(self, rec: _Record) -> None:
        """Drop everything ``rec`` pins and free its slot (the kernel is done with it)."""
        if self._inflight.pop(id(rec), None) is None:
            return
        pin = rec.pin
        if pin is not None:
            rec.pin = None
            if type(pin) is BufferExport:
                pin.release()
        rec.op = None
        rec.complete = None
        rec.state = _S_DONE
        if rec.kind == _K_CANCEL:
            self._n_cancels -= 1
        if self._drained is not None:
            self._check_drained()

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done() and not self._inflight:
            drained.set_result(None)

    def _on_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._efd, 8)
        self.eventfd_wakeups += 1
        self._reap()

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self._closed:
            return
        if self._cq_words[self._cq_tail_idx] != self._cq_head:
            # CQEs waiting: normally their wake-up is pending (the eventfd is readable and
            # the reader runs next), a race with task-work completions.  A CQE without
            # a wake-up should not happen: say so loudly, then recover either way.
            self.watchdog_reaps += 1
            readable = bool(select.select([self._efd], [], [], 0)[0])
            if readable:
                log.debug("uring_watchdog_reaped", wakeup_pending=True)
            else:
                log.warning("uring_watchdog_reaped", wakeup_pending=False)
            self._reap()
        if self._inflight:
            self._watchdog = self.loop.call_later(_WATCHDOG_PERIOD, self._on_watchdog)

    def _reap(self) -> None:
        """Drain the CQ to empty, flushing the kernel's overflow list as needed."""
        cq_words = self._cq_words
        tail_idx = self._cq_tail_idx
        mask = self._cq_mask
        cqes = self._cqes
        iter_unpack = abi.CQE_STRUCT.iter_unpack
        for _ in range(_ENTER_RETRIES):
            head = self._cq_head
            tail = cq_words[tail_idx]
            if tail == head:
                if not self._sq_words[self._sq_flags_idx] & abi.IORING_SQ_CQ_OVERFLOW:
                    return
                self._flush_overflow()
                continue
            # Copy the ready CQEs out (at most two contiguous runs: before and after
            # the wrap), so the kernel may reuse the slots at once.
            start = head & mask
            n = (tail - head) & _U32
            if start + n <= mask + 1:
                batch = list(iter_unpack(cqes[start << 4 : (start + n) << 4]))
            else:
                batch = list(iter_unpack(cqes[start << 4 :]))
                batch += iter_unpack(cqes[: (start + n - mask - 1) << 4])
            head = tail
            # Hand the slots back to the kernel before dispatching (x86-64: release store).
            cq_words[self._cq_head_idx] = head
            self._cq_head = head
            self._dispatch(batch)
        # Still more after many rounds: continue on the next loop iteration.
        if self._flush_handle is None and not self._closed:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush_overflow(self) -> None:
        """NODROP kept CQEs on the overflow list: have the kernel move them to the CQ."""
        self.overflow_flushes += 1
        log.debug("uring_cq_overflow_flush", cq_entries=self.cq_entries)
        cq_words = self._cq_words
        flags_idx = self._cq_flags_idx
        cq_words[flags_idx] |= abi.IORING_CQ_EVENTFD_DISABLED
        ret = abi.io_uring_enter_raw(self._fd, 0, 0, abi.IORING_ENTER_GETEVENTS)
        cq_words[flags_idx] &= ~abi.IORING_CQ_EVENTFD_DISABLED
        abi.full_barrier()
        self.enter_calls += 1
        if ret < 0 and ret != -errno.EINTR:
            log.warning("uring_overflow_flush_failed", errno=errno.errorcode.get(-ret, -ret))

    def _dispatch(self, batch: list[tuple[int, int, int]]) -> None:
        """Hand the batch's completions over in order: plain ops' in one ``deliver`` call
        (their buffers let go first), SEND_ZC and our cancels through their own paths."""
        inflight = self._inflight
        out: list[tuple[Any, int, int]] = []  # (complete or a direct op's user_data, ...)
        for ud, res, flags in batch:
            rec = inflight.pop(ud, None)
            if rec is None:
                log.warning("uring_stray_cqe", user_data=ud, res=res, flags=flags)
                continue
            kind = rec.kind
            if kind == _K_DIRECT:
                rec.pin = None
                rec.state = _S_DONE
                out.append((rec.user_data, res, flags & _F_SOCK_NONEMPTY))  # as below
                continue
            if kind == _K_PLAIN:
                # The op's final CQE: let go of the buffer, then complete.
                pin = rec.pin
                if pin is not None:
                    rec.pin = None
                    if type(pin) is BufferExport:
                        pin.release()
                # Of a plain op's CQE flags only SOCK_NONEMPTY (a RECV that left data
                # behind) means something to the ring.
                op = rec.op
                if (
                    op is not None
                    and res > op.nbytes
                    and op.rw_flags & _MSG_WAITALL
                    and not op.rw_flags & MSG_TRUNC
                ):
                    # Only the MSG_TRUNC we added makes a RECV say more: a truncated
                    # record, which io_uring fails under MSG_WAITALL (issue 12, class 10);
                    # a caller's own MSG_TRUNC gets the record's length, as on the kernel.
                    res = op.nbytes
                    flags |= IO_FAILED
                out.append((rec.complete, res, flags & _F_CQE_KEEP))
                rec.op = rec.complete = None
                rec.state = _S_DONE
                continue
            if out:  # keep the kernel's order across the two paths
                self.deliver(out)
                out = []
            inflight[ud] = rec  # _dispatch_special decides when it is final
            try:
                self._dispatch_special(rec, res, flags)
            except Exception:
                log.exception("uring_completion_callback_failed", user_data=ud, res=res)
        if out:
            self.deliver(out)
        if self._drained is not None:
            self._check_drained()

    def _dispatch_special(self, rec: _Record, res: int, flags: int) -> None:
        if rec.kind == _K_CANCEL:
            on_result = rec.complete
            self._release(rec)
            if res not in (0, _EALREADY, _ENOENT):
                # Anything else leaves the target running; it will complete on its own.
                res = _EALREADY
            if on_result is not None:
                on_result(res)
            return
        # SEND_ZC.
        if flags & abi.IORING_CQE_F_NOTIF:
            if rec.state == _S_NOTIF:
                self._finish_zc(rec)
            elif rec.zc & _ZC_WAIT_NOTIF:
                self._zc_reissue(rec)
            else:
                rec.zc |= _ZC_NOTIF_EARLY  # the result CQE is still to come
            return
        more = flags & abi.IORING_CQE_F_MORE
        if res == _EOPNOTSUPP and not rec.zc & (_ZC_WAIT_NOTIF | _ZC_REISSUED):
            # No zero copy on this socket (AF_UNIX): nothing was sent.  Reissue as a plain
            # SEND once the failed attempt's notification (if any) has arrived.
            rec.zc |= _ZC_WAIT_NOTIF
            if not more or rec.zc & _ZC_NOTIF_EARLY:
                self._zc_reissue(rec)
            return
        complete = rec.complete
        if rec.zc & _ZC_REISSUED:
            # Result of the plain SEND that replaced the zero-copy attempt: the kernel is
            # done with the buffer, so the notification follows at once.
            self._release(rec)
            if complete is not None:
                complete(res, _F_MORE)
                complete(0, _F_NOTIF)
            return
        rec.state = _S_NOTIF
        if complete is not None:
            complete(res, _F_MORE)
        if not more or rec.zc & _ZC_NOTIF_EARLY:
            self._finish_zc(rec)

    def _zc_reissue(self, rec: _Record) -> None:
        op = rec.op
        if rec.zc & _ZC_CANCELLED or op is None or self._closing:
            complete = rec.complete
            self._release(rec)
            if complete is not None:
                complete(_ECANCELED, _F_MORE)
                complete(0, _F_NOTIF)
            return
        rec.zc = _ZC_REISSUED
        ud = id(rec)
        log.debug("uring_send_zc_fallback", fd=op.fd)
        # rec.addr/rec.nbytes: what the first attempt was given, still pinned by rec.pin
        # (op.buf itself may have been released by its owner meanwhile).
        self._push(
            rec,
            (abi.IORING_OP_SEND, 0, 0, op.fd, 0, rec.addr, rec.nbytes, op.rw_flags & _U32, ud, 0),
        )

    def _finish_zc(self, rec: _Record) -> None:
        complete = rec.complete
        self._release(rec)
        if complete is not None:
            complete(0, _F_NOTIF)

    # ---- teardown -------------------------------------------------------------------------

    def _close_fds(self, abandon: bool) -> None:
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._efd >= 0:
            self.loop.remove_reader(self._efd)
        _OPEN.discard(self)
        if abandon:
            # The kernel may still use buffers: keep the ring fd, the maps and every
            # record (with its pins) alive for the life of the process.
            _ABANDONED.append(self)
            return
        self._teardown()
        log.debug("uring_closed", enter_calls=self.enter_calls)

    def _teardown(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            if self._efd >= 0:
                with contextlib.suppress(OSError):
                    abi.io_uring_register(self._fd, abi.IORING_UNREGISTER_EVENTFD, None, 0)
            if self._buf_exports:
                with contextlib.suppress(OSError):
                    abi.io_uring_register(self._fd, abi.IORING_UNREGISTER_BUFFERS, None, 0)
            # Every op has completed, so closing the ring waits for nothing.
            os.close(self._fd)
            self._fd = -1
        for e in (*self._buf_exports, *self._retired_exports):
            e.release()
        self._buf_exports = []
        self._retired_exports = []
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


def _ignore_cancel_result(res: int) -> None:
    """``on_result`` of the cancels :meth:`UringBackend.aclose` submits itself."""


BACKEND: Final = UringBackend
