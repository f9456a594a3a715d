"""Request records and the two lifecycles, as transition tables.

One :class:`Req` per consumed SQE, recycled through the core's free list (the kernel's
request cache).  A URING_CMD/FUSED_CMD record is also what its driver sees: the public
``UringCmd`` *is* this class, so a command costs no coordinator or command object of
its own (the kernel's ``io_uring_cmd`` lives inside its ``io_kiocb`` the same way).

Both lifecycles are tables keyed by ``state + input`` (states are multiples of 16,
inputs below 16, so the key is a plain int that hashes in C).  The lookup is the
validation: a missing edge raises :class:`~aiofused.DriverError` for the fused lifecycle
(drivers call into it) and :class:`LifecycleError` for the request lifecycle (only a
ring bug can get there).

Request lifecycle::

    FREE --consume--> PREPARED --issue--> INFLIGHT --complete--> DONE --recycle--> FREE
                         \\--fail (never issued)------------------^       ^
                                           INFLIGHT --result--> NOTIF --notif--/   (SEND_ZC)

Fused lifecycle of a primary (refines its INFLIGHT period)::

    PREPARED --issue--> ISSUED --lend--> LENT --returned--> RETURNING --done--> DONE
        |                 \\--done / force_cancel--> DONE
        |                                   LENT --done--> CLOSING --returned--> DONE
        \\--fail--> DONE
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiofused._abi import BufDir, Op
from aiofused._errors import DriverError, LifecycleError

if TYPE_CHECKING:
    from aiofused._core.opdef import OpDef
    from aiofused._core.ring import RingCore

__all__ = [
    "FUSED_EDGES",
    "REQ_EDGES",
    "DriverFile",
    "FusedInput",
    "FusedState",
    "IoOp",
    "LifecycleError",
    "Req",
    "ReqInput",
    "ReqState",
    "fused_step",
    "req_step",
]


class ReqState(enum.IntEnum):
    """Where a request record is (values are multiples of 16: ``state + input`` is a key)."""

    FREE = 0
    PREPARED = 16
    INFLIGHT = 32
    NOTIF = 48
    DONE = 64


class ReqInput(enum.IntEnum):
    """What can happen to a request."""

    CONSUME = 0
    ISSUE = 1
    FAIL = 2
    COMPLETE = 3
    RESULT = 4
    NOTIF = 5
    RECYCLE = 6


_RS: Final = ReqState
_RI: Final = ReqInput
REQ_TRANSITIONS: Final[dict[tuple[ReqState, ReqInput], ReqState]] = {
    (_RS.FREE, _RI.CONSUME): _RS.PREPARED,
    (_RS.PREPARED, _RI.ISSUE): _RS.INFLIGHT,
    (_RS.PREPARED, _RI.FAIL): _RS.DONE,
    (_RS.INFLIGHT, _RI.COMPLETE): _RS.DONE,
    (_RS.INFLIGHT, _RI.RESULT): _RS.NOTIF,
    (_RS.NOTIF, _RI.NOTIF): _RS.DONE,
    (_RS.DONE, _RI.RECYCLE): _RS.FREE,
}
#: ``REQ_TRANSITIONS`` keyed by ``int(state) + int(input)``.
REQ_EDGES: Final[dict[int, ReqState]] = {
    int(s) + int(i): d for (s, i), d in REQ_TRANSITIONS.items()
}


def _dense(edges: dict[int, Any], states: type[enum.IntEnum]) -> tuple[Any, ...]:
    """``edges`` as a tuple indexed by the key, None where there is no edge (a tuple
    index costs no hashing)."""
    return tuple(edges.get(k) for k in range(max(states) + 16))


#: ``REQ_EDGES`` as the table :func:`req_step` reads.
REQ_NEXT: Final[tuple[ReqState | None, ...]] = _dense(REQ_EDGES, ReqState)


def req_step(req: Req, inp: ReqInput) -> ReqState:
    """Move ``req`` along ``inp``; raise :class:`LifecycleError` if there is no edge."""
    new = REQ_NEXT[req.state + inp]
    if new is None:
        raise LifecycleError(
            f"request ud={req.user_data}: {inp.name.lower()} in state {req.state.name.lower()}"
        )
    req.state = new
    return new


class FusedState(enum.IntEnum):
    """Lifecycle of a primary (URING_CMD or FUSED_CMD)."""

    PREPARED = 0
    ISSUED = 16
    LENT = 32
    RETURNING = 48
    CLOSING = 64
    DONE = 80


class FusedInput(enum.IntEnum):
    """What can happen to a primary."""

    ISSUE = 0
    FAIL = 1
    LEND = 2
    DONE = 3
    FORCE_CANCEL = 4
    RETURNED = 5


_FS: Final = FusedState
_FI: Final = FusedInput
FUSED_TRANSITIONS: Final[dict[tuple[FusedState, FusedInput], FusedState]] = {
    (_FS.PREPARED, _FI.ISSUE): _FS.ISSUED,
    (_FS.PREPARED, _FI.FAIL): _FS.DONE,
    (_FS.ISSUED, _FI.LEND): _FS.LENT,
    (_FS.ISSUED, _FI.DONE): _FS.DONE,
    (_FS.ISSUED, _FI.FORCE_CANCEL): _FS.DONE,
    (_FS.LENT, _FI.RETURNED): _FS.RETURNING,
    (_FS.LENT, _FI.DONE): _FS.CLOSING,
    (_FS.RETURNING, _FI.DONE): _FS.DONE,
    (_FS.CLOSING, _FI.RETURNED): _FS.DONE,
}
FUSED_EDGES: Final[dict[int, FusedState]] = {
    int(s) + int(i): d for (s, i), d in FUSED_TRANSITIONS.items()
}
#: ``FUSED_EDGES`` as the table :func:`fused_step` reads.
FUSED_NEXT: Final[tuple[FusedState | None, ...]] = _dense(FUSED_EDGES, FusedState)


def fused_step(p: Req, inp: FusedInput) -> FusedState:
    """Move primary ``p`` along ``inp``; raise :class:`DriverError` if there is no edge."""
    new = FUSED_NEXT[p.fstate + inp]
    if new is None:
        raise DriverError(
            f"fused command ud={p.user_data}: {inp.name.lower()} is not allowed "
            f"in state {p.fstate.name.lower()}"
        )
    p.fstate = new
    return new


def _check_tables() -> None:
    if len(REQ_EDGES) != len(REQ_TRANSITIONS) or len(FUSED_EDGES) != len(FUSED_TRANSITIONS):
        raise AssertionError("lifecycle keys collide: states must be multiples of 16")
    if max(ReqInput) >= 16 or max(FusedInput) >= 16:
        raise AssertionError("lifecycle inputs must stay below 16")
    for dense, edges in ((REQ_NEXT, REQ_EDGES), (FUSED_NEXT, FUSED_EDGES)):
        if {k: d for k, d in enumerate(dense) if d is not None} != edges:
            raise AssertionError("a dense lifecycle table differs from its edges")


_check_tables()


class IoOp:
    """One leaf I/O op as the ring hands it to a backend (fields already validated).

    A plain ``__slots__`` class rather than a slotted dataclass: ``dataclass(slots=True)``
    replaces the class it decorates, which the compiled twin (mypyc) cannot follow.
    """

    __slots__ = ("buf", "buf_index", "fd", "file", "nbytes", "offset", "opcode", "rw_flags")

    def __init__(
        self,
        opcode: int,
        fd: int,
        buf: memoryview | None = None,
        nbytes: int = 0,
        offset: int = 0,
        rw_flags: int = 0,
        buf_index: int = -1,
        file: object = None,
    ) -> None:
        #: The opcode (an :class:`~aiofused.Op` value, held as a plain int).
        self.opcode = opcode
        #: OS file descriptor (already resolved from a fixed-file slot or ``fileno()``).
        self.fd = fd
        #: The buffer the op reads from or writes into (None for FSYNC).  For fused
        #: secondaries this is a slice of the lent buffer.
        self.buf = buf
        #: Byte count to transfer (``len(buf)`` unless the SQE said less).
        self.nbytes = nbytes
        #: File offset for READ/WRITE; -1 means "current position" as in the kernel.
        self.offset = offset
        #: ``msg_flags`` for SEND/RECV, ``RWF_*`` for READ/WRITE, fsync flags for FSYNC.
        self.rw_flags = rw_flags
        #: Index in the backend's registered buffers, or -1.
        self.buf_index = buf_index
        #: The object the fd came from (a socket, a file), kept alive with the op.
        self.file = file

    def __call__(self, res: int, flags: int) -> None:
        """The op's completion, when the op is its own (a :class:`Req` is); a bare IoOp
        is completed through the callable its backend was given with it.  (Declared here
        so that every IoOp has one layout: mypyc gives a callable class a vectorcall
        slot, which a subclass adding ``__call__`` would insert ahead of these fields.)"""
        raise TypeError("a bare IoOp has no completion of its own")

    def __repr__(self) -> str:
        return (
            f"IoOp(opcode={self.opcode}, fd={self.fd}, nbytes={self.nbytes}, offset={self.offset})"
        )


class DriverFile:
    """A driver registered in a ring's fixed-file table; use it as an SQE's ``fd``."""

    __slots__ = ("driver", "index", "ring_id")

    def __init__(self, driver: Any, index: int, ring_id: int) -> None:
        self.driver = driver
        self.index = index
        self.ring_id = ring_id

    def __repr__(self) -> str:
        return f"<DriverFile {self.driver.name!r} slot={self.index}>"


_FS_DONE: Final = FusedState.DONE
_FS_PREPARED: Final = FusedState.PREPARED
_RS_PREPARED: Final = ReqState.PREPARED


class Req(IoOp):
    """One consumed SQE, from submit to its final completion; for a command, also what
    its driver sees (``UringCmd``).

    Driver-facing members: ``cmd_op`` and ``cmd`` (from the SQE), ``pdu`` (scratch),
    ``is_fused``/``buf_dir`` (the secondaries), ``secondary_results`` (valid in the lend
    callback), ``cancelled``, ``cancel_hook``, ``user_data``, and the methods
    :meth:`provide_buf_and_start`, :meth:`done`, :meth:`complete_in_task`.
    A record a driver still references when it completes is never recycled, so a
    command kept past its completion stays a finished command.
    """

    __slots__ = (
        "_pdu",
        "backend",
        "base",
        "buf_dir",
        "callback",
        "cancel_hook",
        "cancelled",
        "cmd",
        "cmd_op",
        "command",
        "driver",
        "early_res",
        "err",
        "extra_views",
        "fired",
        "fixed_index",
        "flags",
        "fstate",
        "handle",
        "inext",
        "iprev",
        "is_fused",
        "issue_err",
        "link",
        "lt",
        "lt_target",
        "on_cqe",
        "on_lent",
        "opdef",
        "outstanding",
        "primary",
        "res",
        "ring",
        "sealed",
        "sec_index",
        "sec_off",
        "secondaries",
        "secondary_results",
        "seconds",
        "state",
        "target",
        "timer",
        "user_data",
        "want",
    )

    def __init__(self, ring: RingCore) -> None:
        self.ring = ring
        self.opcode = 0
        self.fd = -1
        self.buf = None
        self.nbytes = 0
        self.offset = 0
        self.rw_flags = 0
        self.buf_index = -1
        self.file = None
        self.user_data = 0
        self.flags = 0
        self.opdef: OpDef | None = None
        self.state = ReqState.FREE
        self.res = 0
        #: The least ``res`` that is a success for links (SPEC L2): 0, or the length for
        #: ops where a short transfer fails (READ/WRITE, MSG_WAITALL).
        self.want = 0
        #: Init error (SPEC R3), and the error reported when issued (as the kernel's import).
        self.err = 0
        self.issue_err = 0
        #: Chain: the next request, this request's LINK_TIMEOUT, a LINK_TIMEOUT's target.
        self.link: Req | None = None
        self.lt: Req | None = None
        self.lt_target: Req | None = None
        self.timer: object = None
        #: The ring's in-flight list (issued, not yet released): neighbours, or None.
        self.inext: Req | None = None
        self.iprev: Req | None = None
        self.seconds = 0.0
        self.target = 0
        self.fired = False
        #: Private requests (the lease): the CQE goes here instead of the CQ.
        self.on_cqe: Callable[[int, int], None] | None = None
        self.handle: object = None
        self.backend: Any = None
        #: A secondary's primary, its index in the primary's results, its offset.
        self.primary: Req | None = None
        self.sec_index = -1
        self.sec_off = 0
        # ---- command (URING_CMD / FUSED_CMD) -----------------------------------------
        self.command = False
        self.fstate = FusedState.PREPARED
        self.driver: Any = None
        self.cmd_op = 0
        self.cmd = b""
        self._pdu: dict[str, Any] | None = None
        self.is_fused = False
        self.buf_dir: BufDir | None = None
        self.secondary_results: list[int] = []
        self.cancelled = False
        #: Set by the driver to be told about ASYNC_CANCEL/ring close before it lent
        #: (``io_uring_cmd_mark_cancelable``); without it the ring completes the command
        #: with -ECANCELED itself.
        self.cancel_hook: Callable[[Req], None] | None = None
        self.callback: Callable[[Req], None] | None = None
        #: A primary's secondaries by index (None once released).
        self.secondaries: list[Req | None] = []
        self.outstanding = 0
        self.sealed = True
        self.base: memoryview | None = None
        self.extra_views: list[memoryview] = []
        self.early_res = 0
        self.fixed_index = -1
        #: A private primary's "lent" event: ``on_lent(cmd, nbytes)`` (the lease, open_fused).
        self.on_lent: Callable[[Req, int], None] | None = None

    def __call__(self, res: int, flags: int) -> None:
        """Backend completion entry point (``complete(res, flags)``)."""
        self.ring.io_done(self, res, flags)

    def __repr__(self) -> str:
        try:
            name = Op(self.opcode).name
        except ValueError:
            name = str(self.opcode)
        return f"<Req {name} ud={self.user_data} {self.state.name.lower()}>"

    # ---- the driver's view (UringCmd) ------------------------------------------------

    @property
    def pdu(self) -> dict[str, Any]:
        """The driver's per-command scratch space."""
        pdu = self._pdu
        if pdu is None:
            pdu = self._pdu = {}
        return pdu

    @property
    def finished(self) -> bool:
        """True once the command's completion has been posted."""
        return self.fstate is _FS_DONE

    def provide_buf_and_start(self, buf: Any, callback: Callable[[Req], None]) -> None:
        """Lend ``buf`` to the secondaries and issue them all at once (SPEC F8-F9).

        ``callback(cmd)`` runs as task work (``loop.call_soon``) once every secondary
        has completed; it should call :meth:`done`.  The driver may reuse ``buf`` only
        after the command's completion.
        """
        self.ring.lend(self, buf, callback)

    def done(self, res: int, res2: int = 0) -> None:
        """Post the command's completion (``io_uring_cmd_done``)."""
        self.ring.cmd_done(self, res)

    def complete_in_task(self, callback: Callable[[Req], None]) -> None:
        """Run ``callback(cmd)`` as task work on the ring's loop."""
        self.ring.queue_task_work(callback, self)
