"""The pure ring core: SQ and CQ, request records, the link/drain/skip scheduler,
timeout bookkeeping and the fused lifecycle.  It imports no asyncio, os or ctypes.

Theory of operation
-------------------
``submit()`` reads SQEs in order and copies each into a :class:`~.records.Req` taken
from the free list, runs the generic init checks and the op's ``prep`` (SPEC R3), and
assembles link chains exactly as ``io_submit_sqe``/``io_submit_fail_init`` do (SPEC
L1-L5): an init error inside a chain fails the whole chain once it ends; an init error
that ends a chain, or a standalone one, stops consumption (unless SUBMIT_ALL).  A
FUSED_CMD consumes its secondaries right after itself (SPEC F3-F5); they hang off the
primary, never in a chain.  Two kinds of SQE take no record: a plain standalone NOP
(its CQE is posted at once) and a standalone flagless READ/WRITE/SEND/RECV that the
port's ``start_direct`` takes (the backend runs the SQE as is and hands its CQE back in
a batch as ``(user_data, res, flags)``; ``live`` counts it, ASYNC_CANCEL and close reach
it through ``port.cancel_direct``).  What the kernel starts from task work or io-wq (a
chain's next member, IOSQE_ASYNC requests, drained units) is queued on ``_later`` and
started at the end of ``submit()`` (SPEC R2).

A *unit* is one chain (or a standalone request).  Units are released in order through
the drain queue (SPEC L5); ``live`` counts the requests of released units that have not
finally completed.  Issuing goes through a work list (``_ready``) so that requests
completing at once (NOP, errors) never recurse.

Every request with a record ends in exactly one :meth:`RingCore.finish` (SEND_ZC: its
result, then its NOTIF): the CQE is posted (or hidden by CQE_SKIP_SUCCESS, or by a failed SKIP
request ahead in its chain, SPEC L4), the chain advances or is failed (SPEC L2), and the
record is released: its buffer view let go, its references dropped, the record back on
the free list.  Nothing a request holds is dropped before that point, whatever happens
to the Python task that submitted it (SPEC F13).  A record is reused only when nothing
but the free list refers to it, so a driver that keeps a finished command never sees it
come back as another request.

Effects (start this I/O, cancel that, call a driver, task work, timers, wake waiters)
go out after the core has updated its own state, through its effect methods
(``start_io``, ``call_driver``, ... in :class:`~aiofused._core.fused.FusedCommands`),
which forward to :attr:`RingCore.port`; the runtime, its own port, overrides them.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from aiofused._abi import (
    EALREADY,
    EBADF,
    ECANCELED,
    EFAULT,
    EINVAL,
    EIO,
    ENOENT,
    EOPNOTSUPP,
    ETIME,
    IO_FAILED,
    IORING_ASYNC_CANCEL_ALL,
    MAX_CMD_BYTES,
    SQE_VALID_FLAGS,
    CqeFlag,
    Feature,
    Op,
    SetupFlag,
    SqeFlag,
)
from aiofused._core.fused import FusedCommands
from aiofused._core.opdef import (
    DIRECT_OPS,
    OPDEFS,
    PLAIN_FORM,
    Issue,
    OpDef,
    UringEnc,
    ioprio_error,
    link_threshold,
    nop_result,
    resolve_fd,
)
from aiofused._core.records import Req, ReqInput, ReqState, req_step
from aiofused._core.sqe import Cqe, Sqe, new_cqe
from aiofused._errors import RingClosedError

if TYPE_CHECKING:
    from aiofused._core.port import Port

__all__ = ["MAX_ENTRIES", "RingCore"]

MAX_ENTRIES: Final = 32768

# Plain ints on the hot path (IntFlag arithmetic allocates enum members).
_F_DRAIN: Final = int(SqeFlag.IO_DRAIN)
_F_HARDLINK: Final = int(SqeFlag.IO_HARDLINK)
_F_SKIP: Final = int(SqeFlag.CQE_SKIP_SUCCESS)
_F_BUFSEL: Final = int(SqeFlag.BUFFER_SELECT)
_F_ASYNC: Final = int(SqeFlag.ASYNC)
_LINK_FLAGS: Final = int(SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK)
#: Flags whose presence needs the generic init checks.
_CHECKED_FLAGS: Final = ~int(
    SqeFlag.IO_LINK | SqeFlag.IO_HARDLINK | SqeFlag.ASYNC | SqeFlag.FIXED_FILE
)
_CQE_MORE: Final = int(CqeFlag.MORE)
_CQE_NOTIF: Final = int(CqeFlag.NOTIF)
_OP_NOP: Final = int(Op.NOP)
_OP_LINK_TIMEOUT: Final = int(Op.LINK_TIMEOUT)
_OP_TIMEOUT: Final = int(Op.TIMEOUT)
_OP_ASYNC_CANCEL: Final = int(Op.ASYNC_CANCEL)
_OP_FUSED_CMD: Final = int(Op.FUSED_CMD)

_S: Final = ReqState
_FREE: Final = _S.FREE
_PREPARED: Final = _S.PREPARED
_INFLIGHT: Final = _S.INFLIGHT
_NOTIF: Final = _S.NOTIF
_DONE: Final = _S.DONE
_I: Final = ReqInput
_CONSUME: Final = _I.CONSUME
_ISSUE: Final = _I.ISSUE
_FAIL: Final = _I.FAIL
_COMPLETE: Final = _I.COMPLETE
_RESULT: Final = _I.RESULT
_NOTIF_IN: Final = _I.NOTIF
_RECYCLE: Final = _I.RECYCLE
_ISSUE_IO: Final = Issue.IO
_ISSUE_CMD: Final = Issue.COMMAND
_ISSUE_NOP: Final = Issue.NOP
_ISSUE_TIMEOUT: Final = Issue.TIMEOUT
_ISSUE_CANCEL: Final = Issue.CANCEL
_ZC: Final = UringEnc.ZC
_opdefs_get: Final = OPDEFS.get
_NO_FUSED: Final = {op: d for op, d in OPDEFS.items() if op != Op.FUSED_CMD}
_refcount: Final = sys.getrefcount
_CQE: Final = Cqe


def _unshared_refcount() -> int:
    """What ``_refcount`` reads, in :meth:`RingCore._new`'s shape (pop into a local, then
    ask), for an object nothing else refers to: 2 on CPython 3.11 (the local and the
    call's argument); measured rather than assumed, since interpreters that borrow
    references on their stack read less, and reading less than the truth would let a
    record that someone still holds be reused."""
    free = [object()]
    while free:
        probe = free.pop()
        return _refcount(probe)
    raise AssertionError("unreachable")


_UNSHARED: Final = _unshared_refcount()


def _ignore(res: int) -> None:
    pass


class RingCore(FusedCommands):
    """The ring's state machine; :class:`aiofused.Ring` is its runtime (and its port)."""

    def __init__(
        self, entries: int, flags: int, port: Port, *, cq_entries: int | None = None
    ) -> None:
        if entries <= 0 or entries > MAX_ENTRIES:
            raise ValueError(f"entries must be in 1..{MAX_ENTRIES}, got {entries}")
        self.sq_entries = 1 << (entries - 1).bit_length()
        cq = cq_entries if cq_entries is not None else 2 * self.sq_entries
        if cq < self.sq_entries:
            raise ValueError("cq_entries must be at least the SQ size")
        self.cq_entries = 1 << (cq - 1).bit_length()
        self.flags = SetupFlag(flags)
        self.features = Feature.NODROP | Feature.SUBMIT_STABLE | Feature.CQE_SKIP
        self.fused_ok = bool(self.flags & SetupFlag.FUSED_REQ)
        if self.fused_ok:
            self.features |= Feature.FUSED_REQ
        self.port = port
        self.id = id(self)
        #: The op table this ring knows: without FUSED_REQ, opcode 128 is as unknown as
        #: any number the kernel lacks (-EINVAL, nothing after it a secondary: SPEC F1).
        self._opdef_get: Callable[[int], OpDef | None] = (
            _opdefs_get if self.fused_ok else _NO_FUSED.get
        )
        #: The same, indexed by opcode (a list index costs no hashing).
        self._opdefs: list[OpDef | None] = [self._opdef_get(op) for op in range(256)]
        # SQ: a fixed array of slots handed out in turn; ``_sq`` holds the pending ones.
        self._slots = [Sqe() for _ in range(self.sq_entries)]
        self._sq_mask = self.sq_entries - 1
        self._sq_next = 0
        self._sq: list[Sqe] = []
        #: The CQ: ``cq[cq_head:]`` are the CQEs not yet seen (a list and a head index
        #: rather than a deque: list operations are native when compiled; the seen prefix
        #: is dropped when the CQ empties, or once it is the larger part).
        self.cq: list[Cqe] = []
        self.cq_head = 0
        self.cq_overflow = 0
        #: How a CQE is made: :func:`~aiofused._core.sqe.new_cqe`, or its C twin (the
        #: runtime installs it where it was built; the core itself imports no extension).
        self.new_cqe: Callable[[type[Cqe], int, int, int], Cqe] = new_cqe
        #: Set by the runtime while a task waits for CQEs (``port.wake`` is called then).
        self.waiting = False
        self._files: list[Any] = []
        #: Registered buffers (READ_FIXED/WRITE_FIXED), the pool they came from, and
        #: whether the kernel backend has them registered too.
        self.reg_views: list[memoryview] = []
        self.reg_pool: object = None
        self.reg_kernel = False
        #: Issued requests not yet released, in issue order: an intrusive list through
        #: ``Req.iprev``/``Req.inext`` from ``_in_head`` to ``_in_tail`` (no hashing).
        self._in_head: Req | None = None
        self._in_tail: Req | None = None
        #: Requests to start once the one being started returns (no recursion).
        self._ready: list[Req] = []
        self._issuing = False
        #: Inside io_batch (waiters are woken at its end), and whether it queued task work.
        self._batching = False
        self._batch_task_work = False
        #: Task work, in order: a primary (its lend callback is due) or ``(fn, arg)``.
        self._task_work: list[Req | tuple[Callable[[Any], None], Any]] = []
        self.live = 0
        #: Units waiting behind a drain: (head, requests it stands for, drains).
        self._deferred: collections.deque[tuple[Req, int, bool]] = collections.deque()
        self._barrier = False
        self._skip_seen = False
        #: An IO_DRAIN on a chain member after its head drains the next unit too
        #: (``io_init_drain``'s drain_next), also across ``submit()`` calls.
        self._drain_next = False
        #: Inside ``submit()``; what it leaves to after the submission (SPEC R2).
        self._submitting = False
        self._submit_again = False
        self._later: list[Req] = []
        self._cqe_seq = 0
        self._count_timeouts: list[tuple[int, int, Req]] = []
        self._tseq = itertools.count()
        self._free: list[Req] = []
        #: Memoryviews the core made and has not released; buffers lent right now.
        self.views = 0
        self.lent = 0
        self.closing = False

    # ---- SQ ----------------------------------------------------------------------------

    def get_sqe(self) -> Sqe | None:
        """Return the next SQE slot, or None when the SQ is full; a ``prep_*`` helper then
        sets it (as in liburing, the slot still holds what it held before)."""
        if self.closing:
            raise RingClosedError("ring is closed")
        sq = self._sq
        if len(sq) >= self.sq_entries:
            return None
        sqe = self._slots[self._sq_next & self._sq_mask]
        self._sq_next += 1
        sq.append(sqe)
        return sqe

    def sq_ready(self) -> int:
        """Number of SQEs waiting for :meth:`submit`."""
        return len(self._sq)

    def submit(self) -> int:
        """Consume the SQ in order; return how many SQEs were consumed (SPEC R2, R4)."""
        if self.closing:
            raise RingClosedError("ring is closed")
        if self._submitting:
            # A callback run while this consumes (a driver that completes inline, whose
            # owner submits more) submits again: the running submit() consumes those SQEs
            # before it returns, in order, instead of reading its own again.
            self._submit_again = True
            return 0
        sq = self._sq
        n = len(sq)
        i = 0
        chain: list[Req] | None = None
        chain_failed = False
        seq0 = self._cqe_seq
        self._submitting = True
        try:
            while i < n:
                sqe = sq[i]
                i += 1
                if (
                    sqe.opcode == _OP_NOP
                    and chain is None
                    and not sqe.flags
                    and not sqe.ioprio
                    and not sqe.rw_flags
                    and not (self._deferred or self._barrier or self._issuing or self._drain_next)
                ):
                    # A plain standalone NOP: nothing to check or track, its CQE at once.
                    self._post_cqe(sqe.user_data, 0, 0)
                    continue
                if (
                    sqe.opcode in DIRECT_OPS
                    and chain is None
                    and not (sqe.flags or sqe.ioprio or sqe.rw_flags)
                    and not (self._deferred or self._barrier or self._issuing or self._drain_next)
                    and self.port.start_direct(sqe)
                ):
                    # A standalone kernel op with no flags: the kernel's semantics are the
                    # ring's here, so the backend runs the SQE as is, with no record; its CQE
                    # comes back through io_batch as (user_data, res, flags).
                    self.live += 1
                    sqe.fd = -1
                    sqe.addr = 0
                    continue
                req = self.consume(sqe, chain[-1] if chain is not None else None)
                if req.command and req.is_fused:
                    i = self.take_secondaries(req, sq, i, n, int(sqe.nr_secondary))
                linked = req.flags & _LINK_FLAGS
                if chain is None:
                    if self._drain_next:
                        self._drain_next = False
                        req.flags |= _F_DRAIN  # the kernel sets REQ_F_IO_DRAIN on it
                    if linked:
                        chain, chain_failed = [req], bool(req.err)
                    elif req.err:
                        self._fail_unit([req])
                        if self._stop_on_error():
                            break  # SPEC R4
                    else:
                        if req.opcode == _OP_TIMEOUT and req.offset and self._cqe_seq != seq0:
                            self._count_earlier(req, seq0)
                        self._start(req, self._count(req), bool(req.flags & _F_DRAIN))
                    continue
                chain.append(req)
                chain_failed = chain_failed or bool(req.err)
                if req.flags & _F_DRAIN and self._drain_checked(req):
                    self._drain_next = True  # SPEC L5: a member's drain drains the next unit
                if linked:
                    continue
                unit, chain = chain, None
                if self._end_chain(unit, chain_failed, seq0) and self._stop_on_error():
                    break  # the kernel stops only if the failing SQE ends the chain
            if chain is not None:  # SPEC L1: the last SQE ends the chain
                if not chain_failed:
                    # io_submit_state_end hands an unterminated chain to io-wq.
                    chain[0].flags |= _F_ASYNC
                self._end_chain(chain, chain_failed, seq0)
        finally:
            self._submitting = False
        del sq[:i]
        if self._later:
            self._issue_later()
        if self._submit_again:
            self._submit_again = False
            i += self.submit()
        return i

    def _count_earlier(self, req: Req, seq0: int) -> None:
        """A counting TIMEOUT issued by this ``submit()`` counts the CQEs the same call
        posted before it: the kernel arms it from the CQ tail it cached, and flushes the
        submission's completions after (R7).  Not when it waits behind a drain: it is
        armed later then, after they were flushed."""
        if (
            self._deferred
            or self._barrier
            or req.flags & _F_ASYNC
            or (req.flags & _F_DRAIN and self.live)
        ):
            return  # armed after the submission, once its CQEs were flushed
        left = req.offset - (self._cqe_seq - seq0)
        req.offset = left if left > 0 else -1  # -1: reached at arming (0 means no count)

    def _stop_on_error(self) -> bool:
        """An init error that ends a unit stops ``submit`` (SPEC R4), unless the ring was
        set up with ``SetupFlag.SUBMIT_ALL`` (``io_submit_sqes``)."""
        return not self.flags & SetupFlag.SUBMIT_ALL

    def _end_chain(self, chain: list[Req], failed: bool, seq0: int) -> bool:
        """Start a complete chain, or fail it (SPEC L3); True if its last SQE failed init,
        which stops ``submit`` (SPEC R4)."""
        if not failed:
            head = chain[0]
            if head.offset and head.opcode == _OP_TIMEOUT and self._cqe_seq != seq0:
                self._count_earlier(head, seq0)
            self._start_unit(chain)
            return False
        self._fail_unit(chain)
        return bool(chain[-1].err)

    # ---- CQ ----------------------------------------------------------------------------

    def peek_cqe(self) -> Cqe | None:
        """Return the first CQE without consuming it, or None."""
        cq = self.cq
        head = self.cq_head
        return cq[head] if head < len(cq) else None

    def cqe_seen(self, cqe: Cqe) -> None:
        """Consume ``cqe`` (normally the one ``wait_cqe``/``peek_cqe`` returned)."""
        cq = self.cq
        head = self.cq_head
        if head < len(cq) and cq[head] is cqe:
            head += 1
            if head == len(cq):
                cq.clear()
                head = 0
            elif head >= 64 and 2 * head >= len(cq):
                del cq[:head]
                head = 0
            self.cq_head = head
            return
        for i in range(head, len(cq)):
            if cq[i] == cqe:  # (as deque.remove: an equal CQE is that CQE)
                del cq[i]
                return
        raise ValueError("CQE is not in the completion queue")

    def cq_ready(self) -> int:
        """Number of CQEs waiting to be consumed."""
        return len(self.cq) - self.cq_head

    def take_cqes(self, n: int) -> list[Cqe]:
        """Consume and return the first ``n`` CQEs (``n <= cq_ready()``)."""
        cq = self.cq
        head = self.cq_head
        if head + n == len(cq):
            out = cq[head:] if head else cq
            self.cq = []
            self.cq_head = 0
            return out
        out = cq[head : head + n]
        self.cq_head = head + n
        return out

    def pending_cqes(self) -> list[Cqe]:
        """The CQEs not yet consumed, in order (a copy)."""
        return self.cq[self.cq_head :]

    def in_flight(self) -> int:
        """Requests consumed and not yet finally completed."""
        return self.live + sum(n for _, n, _ in self._deferred)

    # ---- drivers -----------------------------------------------------------------------

    def add_file(self, driver: Any) -> int:
        """Put ``driver`` in the fixed-file table; return its slot."""
        self._files.append(driver)
        return len(self._files) - 1

    def remove_file(self, index: int) -> None:
        """Empty slot ``index``: later SQEs naming it fail with -EBADF."""
        if 0 <= index < len(self._files):
            self._files[index] = None

    def fixed_driver(self, index: int) -> Any:
        """The driver in fixed-file slot ``index``, or None."""
        if 0 <= index < len(self._files):
            return self._files[index]
        return None

    # ---- private requests (the high-level API) ---------------------------------------

    def private_primary(
        self,
        driver_file: Any,
        cmd_op: int,
        cmd: bytes,
        buf_dir: Any,
        on_cqe: Callable[[int, int], None],
    ) -> Req:
        """A FUSED_CMD primary whose CQE goes to ``on_cqe``, open for more secondaries."""
        if self.closing:
            raise RingClosedError("ring is closed")
        req = self._new(0, int(Op.FUSED_CMD), 0, OPDEFS[Op.FUSED_CMD])
        req.on_cqe = on_cqe
        self.init_command(req, cmd_op, cmd, True)
        if not self.fused_ok or len(cmd) > MAX_CMD_BYTES:
            req.err = EINVAL
        resolve_fd(self, req, driver_file, 0)
        req.sealed = False
        req.buf_dir = buf_dir
        return req

    def start_private(self, req: Req) -> None:
        """Submit a private primary as a standalone unit."""
        if req.err:
            self._fail_unit([req])
        else:
            self._start_unit([req])

    def private_secondary(
        self,
        op: Op,
        fd: Any,
        at: int,
        nbytes: int,
        offset: int,
        flags: int,
        on_cqe: Callable[[int, int], None],
    ) -> Req:
        """A secondary for an open primary; its CQE goes to ``on_cqe``."""
        opdef = OPDEFS[op]
        s = self._new(0, int(op), 0, opdef)
        s.on_cqe = on_cqe
        err = resolve_fd(self, s, fd, 0)
        if err or s.driver is not None:
            s.issue_err = err or EINVAL
        elif nbytes < 0 or at < 0:
            s.issue_err = EINVAL
        s.sec_off = at
        s.nbytes = nbytes
        s.offset = offset
        s.rw_flags = flags = flags if type(flags) is int else int(flags)  # MSG_* are IntFlags
        s.want = link_threshold(opdef, flags, nbytes)
        return s

    # ---- init --------------------------------------------------------------------------

    def _new(self, user_data: int, opcode: int, flags: int, opdef: OpDef | None) -> Req:
        """A record for a newly consumed request: a free one that only the free list refers
        to (a record someone still holds is left to them), or a new one."""
        free = self._free
        while free:
            req = free.pop()
            if _refcount(req) == _UNSHARED:  # nobody but this local refers to it
                break
        else:
            req = Req(self)
        req_step(req, _CONSUME)
        req.user_data = user_data
        req.opcode = opdef.op if opdef is not None else opcode
        req.flags = flags
        req.opdef = opdef
        req.res = 0
        req.want = 0
        req.err = 0
        req.issue_err = 0
        req.buf_index = -1
        req.sec_index = -1
        req.fired = False
        req.command = False
        return req

    def consume(
        self, sqe: Sqe, after: Req | None = None, primary: Req | None = None, index: int = -1
    ) -> Req:
        """Copy ``sqe`` into a record and run its init checks (SPEC R3).  ``after``: the
        request it is linked after, if any (a LINK_TIMEOUT needs one that is not itself a
        LINK_TIMEOUT); with ``primary``: as that primary's secondary ``index`` (whose
        checks take_secondaries completes)."""
        flags = sqe.flags
        if type(flags) is not int:  # user code may have made it an IntFlag
            flags = int(flags)
        opcode = sqe.opcode
        if type(opcode) is int and 0 <= opcode < 256:
            opdef = self._opdefs[opcode]
        else:
            opdef = self._opdef_get(opcode)  # an IntEnum member, or not an opcode at all
        req = self._new(sqe.user_data, sqe.opcode, flags, opdef)
        if primary is not None:
            req.primary = primary
            req.sec_index = index
        if opdef is None:
            req.err = EINVAL
        elif primary is not None and primary.err:
            pass  # the primary failed: its secondaries are only consumed
        elif flags & _CHECKED_FLAGS or sqe.ioprio:
            req.err = self._generic_init(req, sqe, opdef) or opdef.prep(self, req, sqe)
            if flags & _F_BUFSEL and not req.err and req.issue_err in (0, EFAULT):
                # Taken, and failed at issue (no buffer group); its addr is not a buffer.
                req.issue_err = opdef.bufsel_issue_err
        else:
            req.err = opdef.prep(self, req, sqe)
        if req.err and opdef is not None and opdef.issue is _ISSUE_CMD and not req.command:
            self.init_command(req, 0, b"", opdef.op == _OP_FUSED_CMD)
        elif (
            req.opcode == _OP_LINK_TIMEOUT
            and not req.err
            and primary is None
            and (after is None or after.opcode == _OP_LINK_TIMEOUT)
        ):
            req.err = EINVAL  # a LINK_TIMEOUT must follow a linked request
        sqe.fd = -1  # the slot keeps no reference to the caller's objects
        sqe.addr = 0
        return req

    @staticmethod
    def _drain_checked(req: Req) -> bool:
        """Whether ``req``'s IO_DRAIN passed ``io_init_req``'s drain check (its opcode
        and flags were valid and drain was not disabled): errors after it leave the
        drain in force."""
        return req.opdef is not None and not req.flags & ~SQE_VALID_FLAGS and req.err != EOPNOTSUPP

    def _generic_init(self, req: Req, sqe: Sqe, opdef: OpDef) -> int:
        flags = req.flags
        if flags & ~SQE_VALID_FLAGS:
            return EINVAL
        if flags & _F_SKIP:
            self._skip_seen = True
        if flags & _F_DRAIN and self._skip_seen:
            return EOPNOTSUPP
        if sqe.ioprio:
            err = ioprio_error(opdef, sqe.ioprio)
            if err:
                return err
        if flags & _F_BUFSEL:
            return opdef.buffer_select_err
        return 0

    # ---- units, drain ------------------------------------------------------------------

    @staticmethod
    def _link_unit(reqs: list[Req]) -> int:
        """Wire ``link``/``lt`` pointers; return the number of requests (with secondaries)."""
        prev: Req | None = None
        count = 0
        for r in reqs:
            count += RingCore._count(r)
            if r.opcode == _OP_LINK_TIMEOUT and prev is not None and prev.lt is None and not r.err:
                # (A LINK_TIMEOUT that failed init, such as a second one in a row, is
                # never armed on its target: it stays an ordinary member, so the failed
                # chain completes it with its errno, issue 12 class 8.)
                prev.lt = r
                r.lt_target = prev
                continue
            if prev is not None:
                prev.link = r
            prev = r
        return count

    @staticmethod
    def _count(req: Req) -> int:
        """Requests a unit member stands for in ``live`` (a primary: with its secondaries)."""
        return 1 + len(req.secondaries) if req.command else 1

    def _start_unit(self, reqs: list[Req]) -> None:
        """A chain (or a standalone request) without init errors."""
        if len(reqs) == 1:
            head = reqs[0]
            self._start(head, self._count(head), bool(head.flags & _F_DRAIN))
        else:
            self._start(reqs[0], self._link_unit(reqs), any(r.flags & _F_DRAIN for r in reqs))

    def _start(self, head: Req, count: int, drain: bool) -> None:
        """Release a unit now, or queue it behind the drain barrier (SPEC L5)."""
        if self._deferred or self._barrier or (drain and self.live):
            self._deferred.append((head, count, drain))
        else:
            self._release_unit(head, count, drain)

    def _release_unit(self, head: Req, count: int, drain: bool, later: bool = False) -> None:
        self.live += count
        if drain:
            self._barrier = True
        if later or drain or head.flags & _F_ASYNC:
            head.flags |= _F_ASYNC  # the kernel runs drained and deferred units in io-wq
            if self._submitting:
                self._later.append(head)  # after the whole submission
                return
        self.issue(head)

    def _release_deferred(self) -> None:
        deferred = self._deferred
        while deferred and not self._barrier:
            head, count, drain = deferred[0]
            if drain and self.live:
                return
            deferred.popleft()
            self._release_unit(head, count, drain, later=True)

    def _issue_later(self) -> None:
        """The end of ``submit()``: start what the kernel starts from task work or io-wq
        after the submission (chain followers, IOSQE_ASYNC requests, a chain left open at
        the end, drained units released meanwhile), in the order they became ready."""
        later, self._later = self._later, []  # what these start may queue more
        for req in later:
            self.issue(req)

    def _fail_unit(self, reqs: list[Req]) -> None:
        """A chain (or standalone request) with an init error (SPEC L3, F-rules): its head
        fails, then (through the links) the rest; a submission failure severs even an
        IO_HARDLINK (io_queue_sqe_fallback)."""
        self.live += self._link_unit(reqs)
        head = reqs[0]
        head.err = head.err or ECANCELED
        self.fail_one(head, head.err, False)

    # ---- issue -------------------------------------------------------------------------

    def issue(self, req: Req) -> None:
        """Start ``req`` now, or right after the request being started (no recursion)."""
        if self._issuing:
            self._ready.append(req)
            return
        self._issuing = True
        try:
            self._issue_one(req)
            ready = self._ready
            while ready:
                self._issue_one(ready.pop(0))  # a handful at most: pop(0) is cheap
        finally:
            self._issuing = False

    def _issue_one(self, req: Req) -> None:
        if req.state is not _PREPARED:
            return  # completed meanwhile (a chain failed under it)
        if self.closing and req.primary is None:
            req.err = ECANCELED
            self.fail_one(req, ECANCELED, False)
            return
        req_step(req, _ISSUE)
        self._track(req)
        lt = req.lt
        if lt is not None:
            req_step(lt, _ISSUE)
            self._track(lt)
            lt.timer = self.arm_timer(lt.seconds, self._link_timeout_fired, lt)
        try:
            self._dispatch_issue(req, req.opdef.issue)  # type: ignore[union-attr]
        except Exception:
            self._issue_failed(req)

    def _issue_failed(self, req: Req) -> None:
        """Its issuer raised: log it, and complete ``req`` with -EIO if still in flight."""
        self.log_error("issue_failed", exc=True, op=req.opcode, user_data=req.user_data)
        if req.state is _INFLIGHT:
            self.finish(req, EIO, _COMPLETE)

    def _dispatch_issue(self, req: Req, issue: Issue) -> None:
        """Start ``req`` the way its op table entry's Issue kind says."""
        if issue is _ISSUE_IO:
            self._issue_io(req)
        elif issue is _ISSUE_CMD:
            self.issue_command(req)
        elif issue is _ISSUE_NOP:
            self._issue_nop(req)
        elif issue is _ISSUE_TIMEOUT:
            self._arm_timeout(req)
        elif issue is _ISSUE_CANCEL:
            self._async_cancel(req)
        else:
            self._issue_link_timeout(req)

    def _track(self, req: Req) -> None:
        """Append issued ``req`` to the in-flight list."""
        tail = self._in_tail
        req.iprev = tail
        req.inext = None
        if tail is None:
            self._in_head = req
        else:
            tail.inext = req
        self._in_tail = req

    def _untrack(self, req: Req) -> None:
        """Take ``req`` off the in-flight list (if it is on it)."""
        prev = req.iprev
        nxt = req.inext
        if prev is None:
            if self._in_head is not req:
                return  # never issued (failed at init or behind a failed chain)
            self._in_head = nxt
        else:
            prev.inext = nxt
        if nxt is None:
            self._in_tail = prev
        else:
            nxt.iprev = prev
        req.iprev = req.inext = None

    def inflight_reqs(self) -> list[Req]:
        """The issued requests not yet released, in issue order (a copy)."""
        out: list[Req] = []
        r = self._in_head
        while r is not None:
            out.append(r)
            r = r.inext
        return out

    def _issue_io(self, req: Req) -> None:
        if req.issue_err or req.fd < 0:
            if req.want < 0:
                req.want = 0  # not issued at all: a failure even for FSYNC/FALLOCATE
            err = req.issue_err
            if err != EBADF and err != EINVAL and (req.fd < 0 or not self.fd_is_open(req.fd)):
                err = EBADF  # the kernel looks the file up before the buffer (SPEC R5)
            self.finish(req, err or EBADF, _COMPLETE)
        elif req.want < 0 and not self.fd_is_open(req.fd):
            # FSYNC/FALLOCATE fail (sever, show under SKIP) only when the kernel cannot
            # get their file; what the syscall answers is just their result.
            req.want = 0
            self.finish(req, EBADF, _COMPLETE)
        else:
            if not self.reg_kernel and req.opcode in PLAIN_FORM:
                req.opcode = PLAIN_FORM[req.opcode]  # same bytes, plain form
            self.start_io(req)

    def _issue_nop(self, req: Req) -> None:
        self.finish(req, nop_result(self, req) if req.rw_flags else 0, _COMPLETE)

    @staticmethod
    def _issue_link_timeout(req: Req) -> None:
        raise AssertionError("a LINK_TIMEOUT is armed with its target, never issued")

    def io_done(self, req: Req, res: int, flags: int) -> None:
        """A backend's completion of leaf op ``req`` (SEND_ZC: twice, MORE then NOTIF)."""
        if not flags:
            self.finish(req, res, _COMPLETE)
        elif flags & IO_FAILED:
            # Whole, and still a failure to the kernel (a truncated MSG_WAITALL record).
            req.want = res + 1
            self.io_done(req, res, flags & ~IO_FAILED)
        elif flags & _CQE_NOTIF:
            if req.state is _NOTIF:
                req_step(req, _NOTIF_IN)
                on_cqe = req.on_cqe
                if on_cqe is not None:
                    on_cqe(0, _CQE_NOTIF)
                else:
                    self._post_cqe(req.user_data, 0, _CQE_NOTIF)
                self._release(req)
        elif req.opdef is not None and req.opdef.uring & _ZC:
            self.finish(req, res, _RESULT, _CQE_MORE)
        else:
            self.finish(req, res, _COMPLETE, flags)

    def io_batch(self, batch: list[tuple[Any, int, int]]) -> None:
        """A backend's batch of completions, ``(req, res, flags)`` in completion order
        (``req`` is the user_data of an op the backend ran as is).

        Waiters are woken once, after the batch, and after the task work the batch
        queued (a primary whose secondaries came back), as the kernel runs task work
        before it returns to userspace: the task sees both generations at once.
        """
        self._batching = True
        try:
            for req, res, flags in batch:
                try:
                    if type(req) is int:
                        self._direct_done(req, res, flags)
                    elif flags:
                        self.io_done(req, res, flags)
                    else:
                        self.finish(req, res, _COMPLETE)
                except Exception:
                    ud = req if type(req) is int else req.user_data
                    self.log_error("completion_failed", exc=True, user_data=ud)
        finally:
            self._batching = False
        if self.waiting:
            if self._batch_task_work:
                self.queue_task_work(self._wake_waiters, None)
            else:
                self.wake()
        self._batch_task_work = False

    def _direct_done(self, user_data: int, res: int, flags: int) -> None:
        """The CQE of an op the backend ran as is (see :meth:`submit`)."""
        self._post_cqe(user_data, res, flags)
        self.live -= 1
        if self.live == 0 or self._deferred:
            self._after_release()

    def _wake_waiters(self, _: object) -> None:
        if self.waiting:
            self.wake()

    def queue_task_work(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Run ``fn(arg)`` as task work.  Task work is batched: everything queued before
        the hop runs in that one ``port.task_work`` hop, in order; a batch of completions
        notes that it queued some, so that its waiters are woken after it."""
        self._queue_item((fn, arg))

    def queue_lend_callback(self, p: Req) -> None:
        """Run primary ``p``'s lend callback as task work (:meth:`run_callback`)."""
        self._queue_item(p)

    def _queue_item(self, item: Req | tuple[Callable[[Any], None], Any]) -> None:
        tw = self._task_work
        tw.append(item)
        if len(tw) == 1:
            self.task_work(self._run_task_work, None)
        if self._batching:
            self._batch_task_work = True

    def _run_task_work(self, _: object) -> None:
        tw = self._task_work
        self._task_work = []  # what the items queue now runs in the next hop
        for item in tw:
            if isinstance(item, Req):
                self.run_callback(item)  # catches what the callback raises
                continue
            fn, arg = item
            try:
                fn(arg)
            except Exception:
                self.log_error("task_work_raised", exc=True, fn=repr(fn))

    # ---- timeouts and cancellation -----------------------------------------------------

    def _arm_timeout(self, req: Req) -> None:
        req.timer = self.arm_timer(req.seconds, self._timeout_fired, req)
        if req.offset:
            target = self._cqe_seq + req.offset
            heapq.heappush(self._count_timeouts, (target, next(self._tseq), req))
            if target <= self._cqe_seq:
                self._flush_count_timeouts()

    def _timeout_fired(self, req: Req) -> None:
        req.timer = None
        if req.state is _INFLIGHT:
            self.finish(req, ETIME, _COMPLETE)

    def _link_timeout_fired(self, lt: Req) -> None:
        lt.timer = None
        target = lt.lt_target
        if lt.state is not _INFLIGHT or target is None or target.state is not _INFLIGHT:
            return
        lt.fired = True  # the cancel's answer completes it, not the target's completion

        def cancelled(res: int) -> None:
            if lt.state is _INFLIGHT:
                self.finish(lt, res or ETIME, _COMPLETE)

        self.cancel_req(target, cancelled)

    def _disarm_link_timeout(self, req: Req) -> None:
        """The target finished: its LINK_TIMEOUT completes -ECANCELED, armed or not (the
        target never started), and that is no failure: only its own CQE_SKIP_SUCCESS
        hides it (``io_disarm_next`` completes it apart from the chain's rest)."""
        lt = req.lt
        req.lt = None
        if lt is None or lt.state is _DONE or lt.state is _FREE or lt.fired:
            return
        if lt.state is _PREPARED:
            req_step(lt, _ISSUE)
        self.finish(lt, ECANCELED, _COMPLETE)

    def _async_cancel(self, req: Req) -> None:
        key = req.target
        targets = [
            r
            for r in self.inflight_reqs()
            if r.user_data == key
            and r is not req
            and r.state is _INFLIGHT
            and r.on_cqe is None
            and r.opcode != _OP_ASYNC_CANCEL
            and r.opcode != _OP_LINK_TIMEOUT
        ]
        if self._later:
            # Queued for io-wq by this submit and not started: found where they wait.
            targets += [
                r
                for r in self._later
                if r.user_data == key
                and r.state is _PREPARED
                and r.flags & _F_ASYNC
                and r.opcode != _OP_LINK_TIMEOUT
                and r is not req
            ]
        every = req.rw_flags & IORING_ASYNC_CANCEL_ALL
        if not every:
            targets = targets[:1]
        results: list[int] = []
        pending = 0

        def one(res: int) -> None:
            nonlocal pending
            results.append(res)
            pending -= 1
            if pending == 0 and req.state is _INFLIGHT:
                # CANCEL_ALL: how many were found (cancelled or already running), as
                # __io_async_cancel counts every answer but -ENOENT.
                found = sum(1 for r in results if r != ENOENT) if every else results[0]
                self.finish(req, found, _COMPLETE)

        # Ops run as is are the backend's to find; their answers never come at once.
        direct = self.cancel_direct(key, bool(every), one) if every or not targets else 0
        pending = len(targets) + direct
        if not pending:
            # With CANCEL_ALL the result is a count, 0 when nothing matched.
            if every:
                res = 0
            elif key == req.user_data and req.flags & _F_ASYNC:
                res = EALREADY  # run as io-wq work (SPEC L6), it finds itself running
            else:
                res = ENOENT
            self.finish(req, res, _COMPLETE)
            return
        for t in targets:
            if t.state is _PREPARED:
                self.fail_one(t, ECANCELED, False)  # io-wq work cancelled before it ran
                one(0)
            else:
                self.cancel_req(t, one)

    def cancel_req(self, req: Req, on_result: Callable[[int], None]) -> None:
        """Request cancellation of an issued request; ``on_result`` gets 0/-EALREADY/-ENOENT."""
        if req.state is not _INFLIGHT:
            on_result(ENOENT)
        elif req.command:
            self.cancel_command(req, on_result)
        elif req.opcode == _OP_TIMEOUT:
            self.finish(req, ECANCELED, _COMPLETE)
            on_result(0)
        elif req.backend is not None and req.handle is not None:
            self.cancel_io(req, on_result)
        else:
            on_result(EALREADY)

    def drop_free_records(self) -> None:
        """Forget the free list (a closed ring: records and ring then free by refcount)."""
        self._free.clear()

    def cancel_all(self) -> None:
        """Closing: fail what waits for its turn, cancel everything in flight (SPEC F12)."""
        self.closing = True
        self._sq.clear()
        while self._deferred:
            head, count, _ = self._deferred.popleft()
            self.live += count
            head.err = head.err or ECANCELED
            self.fail_one(head, head.err, False)
        for req in self.inflight_reqs():
            if req.state is _INFLIGHT and req.opcode not in (_OP_ASYNC_CANCEL, _OP_LINK_TIMEOUT):
                self.cancel_req(req, _ignore)
        self.cancel_direct(None, True, _ignore)

    # ---- completion --------------------------------------------------------------------

    def _post_cqe(self, user_data: int, res: int, flags: int, counts: bool = True) -> None:
        """Append a CQE; ``counts``: it counts for TIMEOUTs with a count (an expired or
        count-completed TIMEOUT's own CQE does not)."""
        cq = self.cq
        cq.append(self.new_cqe(_CQE, user_data, res, flags))
        if len(cq) - self.cq_head > self.cq_entries:
            self.cq_overflow += 1
        if counts:
            self._cqe_seq += 1
            if self._count_timeouts:
                self._flush_count_timeouts()
        if self.waiting and not self._batching:
            self.wake()

    def _flush_count_timeouts(self) -> None:
        heap = self._count_timeouts
        while heap and heap[0][0] <= self._cqe_seq:
            t = heapq.heappop(heap)[2]
            if t.state is _INFLIGHT:
                self.finish(t, 0, _COMPLETE)

    def finish(
        self, req: Req, res: int, inp: ReqInput, flags: int = 0, drop_cqe: bool = False
    ) -> None:
        """The final completion: CQE, chain, release (SEND_ZC's RESULT: all but release)."""
        req_step(req, inp)
        req.res = res
        timer = req.timer
        if timer is not None:
            req.timer = None
            self.disarm_timer(timer)
        skip = req.flags & _F_SKIP
        # < 0, or short where that fails (SPEC L2); an op whose result never fails it has
        # want = NEVER_FAILS (SPEC L4), reset by fail_one: what never started failed.
        failed = res < req.want
        if not drop_cqe and (not skip or failed):
            on_cqe = req.on_cqe
            if on_cqe is not None:
                try:
                    on_cqe(res, flags)
                except Exception:  # the record must still complete and be released
                    self.log_error("cqe_callback_raised", exc=True, user_data=req.user_data)
            else:
                # A TIMEOUT's CQE does not count when it expired or its count was
                # reached (the kernel's cq_timeouts); a cancelled one's does.
                self._post_cqe(
                    req.user_data,
                    res,
                    flags,
                    req.opcode != _OP_TIMEOUT or (res != 0 and res != ETIME),
                )
        if req.lt is not None:
            self._disarm_link_timeout(req)
        nxt = req.link
        if nxt is not None:
            req.link = None
            if failed and not (req.flags & _F_HARDLINK and not req.err):
                self._fail_links(nxt, bool(skip) or drop_cqe)
            else:
                if req.flags & _F_ASYNC:
                    nxt.flags |= _F_ASYNC  # an io-wq worker runs the chain on
                if self._submitting:
                    self._later.append(nxt)  # the kernel queues it as task work
                else:
                    self.issue(nxt)
        if inp is not _RESULT:
            self._release(req)

    def _fail_links(self, first: Req | None, drop_cqes: bool) -> None:
        """Complete the unstarted rest of a chain with -ECANCELED (SPEC L2, L4)."""
        m = first
        while m is not None:
            nxt = m.link
            m.link = None
            lt = m.lt
            m.lt = None
            self.fail_one(m, m.err or ECANCELED, drop_cqes)
            if lt is not None:
                self.fail_one(lt, lt.err or ECANCELED, drop_cqes)
            m = nxt

    def fail_one(self, m: Req, res: int, drop_cqe: bool) -> None:
        """Complete ``m``, which never started, with ``res``."""
        if m.state is not _PREPARED:
            return
        if m.command:
            self.fail_unissued_command(m, res, drop_cqes=drop_cqe)
        else:
            if m.want < 0:
                m.want = 0  # never started: a failure whatever the op (res < 0 here)
            self.finish(m, res, _FAIL, drop_cqe=drop_cqe)

    def release_view(self, view: memoryview) -> bool:
        """Release a view the core made; False (and an error log) if still exported."""
        try:
            view.release()
        except BufferError:
            self.log_error("view_still_exported", nbytes=view.nbytes)
            return False
        self.views -= 1
        return True

    def _release(self, req: Req) -> None:
        """Drop what the request holds and put the record back on the free list."""
        self._untrack(req)
        buf = req.buf
        prim = req.primary
        if buf is not None:
            req.buf = None
            if prim is None or buf is not prim.base:  # (a whole-buffer secondary's is P's)
                self.release_view(buf)
        req.file = req.handle = req.backend = req.on_cqe = req.driver = None
        req.lt_target = None
        self.live -= 1
        if req.command:
            req.callback = req.cancel_hook = req.on_lent = None
            req._pdu = None
            if req.secondaries:
                req.secondaries.clear()
        if prim is not None:
            req.primary = None
            self.secondary_released(prim, req)
        req_step(req, _RECYCLE)
        self._free.append(req)
        if self.live == 0 or self._deferred:
            self._after_release()

    def _after_release(self) -> None:
        if self.live == 0:
            self._barrier = False
            self.idle()
        if self._deferred and not self._barrier:
            self._release_deferred()
