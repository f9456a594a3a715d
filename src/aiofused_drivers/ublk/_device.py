"""The ublk-style device: queues, tags, request descriptors, and the driver commands.

Roles, as in the kernel (``drivers/block/ublk_drv.c``): the *block layer* side
(here: the NBD front end) queues :class:`BlockRequest` objects with
:meth:`UblkDriver.queue_rq`; the *ublk server* side (``_server.py`` and the targets)
talks to the device only through ring commands:

``UBLK_IO_FETCH_REQ``            arm a tag; completes (res 0) when a request lands on it
``UBLK_IO_COMMIT_AND_FETCH_REQ`` end the tag's request with ``result`` and re-arm the tag
``UBLK_IO_FUSED_SUBMIT_IO``      (fused primary) lend the request's own buffer to the
                                 secondaries: DEST for a READ, SRC for a WRITE (SPEC F7,
                                 seed F26); -EINVAL for the wrong direction or a request
                                 without data; -EOPNOTSUPP for any other fused cmd_op (F35)

With ``batch_io`` (the kernel's ``UBLK_F_BATCH_IO``) a queue's tags are not armed one
command each; instead (``cmd`` bytes are ``struct ublk_batch_io``, :data:`BATCH_CMD`:
``q_id u16, flags u16, nr_elem u32, addr u64``):

``UBLK_IO_FETCH_IO_CMDS``        one per queue: completes (res = how many) once requests
                                 landed on the queue's tags; :meth:`UblkDriver.take_fetched`
                                 then hands over *every* tag that landed since (the
                                 kernel writes them into the fetch's buffer), so one
                                 completion serves a whole burst.  Issued while requests
                                 are waiting, it completes inline.  -EBUSY if one is armed.
``UBLK_IO_COMMIT_IO_CMDS``       end many requests at once: ``addr`` names an element list
                                 the server stored with :meth:`UblkDriver.commit_buffer`
                                 (the kernel reads ``nr_elem`` ``(tag, result)`` elements
                                 from user memory at ``addr``); res = ``nr_elem``, or
                                 -EINVAL if any element named a tag without a fetched
                                 request (the others still commit).  A committed tag
                                 takes the next request at once; no re-arm is needed.

The per-tag commands are -EINVAL on a batch device and the batch ones on a per-tag
device; FUSED_SUBMIT_IO is the same on both.

Theory of operation (buffer lifetime): a request holds its buffer from ``queue_rq``
until the front end is done with it.  Every successful fused submit takes a reference
on the request; COMMIT_AND_FETCH ends the request only once those references are
gone (seed F37), so a lent buffer never outlives its request.  ``cmd`` bytes are
``struct ublksrv_io_cmd`` (little endian ``q_id u16, tag u16, result s32, addr u64``);
for FUSED_SUBMIT_IO, ``result`` carries the byte count the secondaries should move,
so the primary's ``res`` can report a short transfer as -EIO.

Deviation from ublk, on purpose: descriptors count bytes, not 512-byte sectors,
because NBD clients that did not negotiate block sizes may send unaligned requests.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import functools
import struct
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from aiofused import EIOCBQUEUED, BufDir, UringCmd
from aiofused.driver import get_logger

__all__ = [
    "BATCH_CMD",
    "IO_CMD",
    "UBLK_IO_COMMIT_AND_FETCH_REQ",
    "UBLK_IO_COMMIT_IO_CMDS",
    "UBLK_IO_FETCH_IO_CMDS",
    "UBLK_IO_FETCH_REQ",
    "UBLK_IO_FUSED_SUBMIT_IO",
    "UBLK_IO_RES_ABORT",
    "UBLK_IO_RES_OK",
    "BlockRequest",
    "IoDesc",
    "IoOp",
    "UblkDriver",
    "pack_batch_cmd",
    "pack_io_cmd",
]

log = get_logger(__name__)

UBLK_IO_FETCH_REQ: Final = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ: Final = 0x21
UBLK_IO_FUSED_SUBMIT_IO: Final = 0x23
UBLK_IO_COMMIT_IO_CMDS: Final = 0x26
UBLK_IO_FETCH_IO_CMDS: Final = 0x27

UBLK_IO_RES_OK: Final = 0
UBLK_IO_RES_ABORT: Final = -errno.ENODEV

#: ``struct ublksrv_io_cmd``.
IO_CMD: Final = struct.Struct("<HHiQ")
#: ``struct ublk_batch_io`` (here: ``q_id, flags, nr_elem, addr``).
BATCH_CMD: Final = struct.Struct("<HHIQ")

UBLK_IO_F_FUA: Final = 1 << 13
UBLK_IO_F_NOUNMAP: Final = 1 << 15


class IoOp(enum.IntEnum):
    """``UBLK_IO_OP_*``."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_SAME = 4
    WRITE_ZEROES = 5


def pack_io_cmd(q_id: int, tag: int, result: int = 0, addr: int = 0) -> bytes:
    """Build the ``cmd`` bytes of a ublk io command."""
    return IO_CMD.pack(q_id, tag, result, addr)


def pack_batch_cmd(q_id: int, nr_elem: int = 0, addr: int = 0) -> bytes:
    """Build the ``cmd`` bytes of a batch command (FETCH_IO_CMDS, COMMIT_IO_CMDS)."""
    return BATCH_CMD.pack(q_id, 0, nr_elem, addr)


_OP_READ: Final = int(IoOp.READ)
_OP_WRITE: Final = int(IoOp.WRITE)
_DEST: Final = int(BufDir.DEST)
_SRC: Final = int(BufDir.SRC)


class BlockRequest:
    """One block request as the block layer queues it.

    ``buf`` is the request's data buffer (a writable memoryview of ``length`` bytes)
    for READ and WRITE, ``None`` otherwise; ``lend`` is what fused submits lend (``buf``,
    or the registered pool slot holding it).  ``on_done(req, res)`` runs once, when
    the request ends (``res`` is the committed result, ``-errno`` on failure).
    """

    __slots__ = (
        "buf",
        "commit_result",
        "ctx",
        "ended",
        "flags",
        "lend",
        "length",
        "offset",
        "on_done",
        "op",
        "q_id",
        "refs",
        "tag",
    )

    def __init__(
        self,
        op: IoOp,
        offset: int,
        length: int,
        flags: int,
        buf: memoryview | None,
        on_done: Callable[[BlockRequest, int], None],
        ctx: Any = None,
        lend: Any = None,
    ) -> None:
        self.op = op
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buf = buf
        self.on_done = on_done
        self.ctx = ctx
        self.refs = 0
        self.ended = False
        self.commit_result: int | None = None
        self.tag = -1
        self.q_id = 0
        #: What a fused submit lends (default ``buf``), e.g. a registered pool slot.
        self.lend = buf if lend is None else lend


class IoDesc:
    """``struct ublksrv_io_desc`` of one tag (bytes instead of sectors, see module doc)."""

    __slots__ = ("flags", "nr_bytes", "op", "start")

    def __init__(self, op: int = 0, flags: int = 0, nr_bytes: int = 0, start: int = 0) -> None:
        self.op = op
        self.flags = flags
        self.nr_bytes = nr_bytes
        self.start = start

    def __repr__(self) -> str:
        return (
            f"IoDesc(op={self.op}, flags={self.flags}, nr_bytes={self.nr_bytes}, "
            f"start={self.start})"
        )


class _Io:
    """Per-tag state (``struct ublk_io``).  ``fcmd``/``freq``/``fexpected`` hold the
    tag's (first) fused submit in flight, so a lend needs no pdu entries; ``fdone`` is
    its completion callback, made once per tag."""

    __slots__ = ("cmd", "fcmd", "fdone", "fexpected", "freq", "key", "req")

    def __init__(self, key: tuple[int, int]) -> None:
        self.cmd: UringCmd | None = None
        self.req: BlockRequest | None = None
        #: ``(q_id, tag)``, what an armed command's pdu names.
        self.key = key
        self.fcmd: UringCmd | None = None
        self.freq: BlockRequest | None = None
        self.fexpected = 0
        self.fdone: Callable[[UringCmd], None] | None = None


class _Queue:
    __slots__ = (
        "backlog",
        "commits",
        "fetch_cmd",
        "fetched",
        "free_tags",
        "iods",
        "ios",
        "next_addr",
        "q_id",
    )

    def __init__(self, q_id: int, depth: int) -> None:
        self.q_id = q_id
        self.ios = [_Io((q_id, tag)) for tag in range(depth)]
        self.iods = [IoDesc() for _ in range(depth)]
        self.free_tags: collections.deque[int] = collections.deque()
        self.backlog: collections.deque[BlockRequest] = collections.deque()
        # batch_io: the armed FETCH_IO_CMDS, the tags that landed and were not yet taken
        # by the server, and the commit element lists by ``addr``.
        self.fetch_cmd: UringCmd | None = None
        self.fetched: list[int] = []
        self.commits: dict[int, list[int]] = {}
        self.next_addr = 1


@mypyc_attr(allow_interpreted_subclasses=True)
class UblkDriver:
    """A ublk-style block device, usable as an aiofused driver (``ublk`` entry point).

    ``size`` is the device size in bytes; ``nr_queues`` hardware queues of
    ``queue_depth`` tags each.  The block layer calls :meth:`queue_rq`; the server
    reads :meth:`iod` after a FETCH completion and answers with ring commands.
    """

    name = "ublk"
    can_fused = True

    def __init__(
        self,
        size: int = 0,
        nr_queues: int = 1,
        queue_depth: int = 128,
        logical_block_size: int = 512,
        batch_io: bool = False,
    ) -> None:
        if not 1 <= nr_queues <= 64:
            raise ValueError("nr_queues must be 1..64")
        if not 1 <= queue_depth <= 4096:
            raise ValueError("queue_depth must be 1..4096")
        self.size = size
        self.nr_queues = nr_queues
        self.queue_depth = queue_depth
        self.logical_block_size = logical_block_size
        self._queues = [_Queue(q, queue_depth) for q in range(nr_queues)]
        #: UBLK_F_BATCH_IO: tags are fetched and committed in batches (module doc).
        self.batch_io = batch_io
        for q in self._queues:
            for io in q.ios:
                io.fdone = functools.partial(self._fused_done_io, io)
            if batch_io:  # every tag takes a request; none needs arming
                q.free_tags.extend(range(queue_depth))
        self._cancel_hook = self._cancel  # one bound method, not one per armed command
        self._fetch_cancel_hook = self._cancel_fetch
        self._stopped = False
        #: Requests queued and not yet ended (for leak checks).
        self.inflight = 0
        #: Fused submits currently holding a request buffer.
        self.lent = 0
        #: ``end_hook(q_id, tag)`` runs as each request that reached a tag ends (before
        #: its ``on_done``): the server side learns when its commit took effect.
        self.end_hook: Callable[[int, int], None] | None = None

    # ---- block layer side ---------------------------------------------------------

    def queue_rq(self, req: BlockRequest, q_id: int = 0) -> None:
        """Queue ``req`` on hardware queue ``q_id``; it ends through ``req.on_done``."""
        if self._stopped:
            req.ended = True
            req.on_done(req, -errno.ESHUTDOWN)
            return
        q = self._queues[q_id % self.nr_queues]
        req.q_id = q.q_id
        self.inflight += 1
        if q.free_tags:
            self._start(q, q.free_tags.popleft(), req)
        else:
            q.backlog.append(req)

    def _start(self, q: _Queue, tag: int, req: BlockRequest) -> None:
        io = q.ios[tag]
        assert io.req is None
        io.req = req
        req.tag = tag
        iod = q.iods[tag]
        iod.op = req.op
        iod.flags = req.flags
        iod.nr_bytes = req.length
        iod.start = req.offset
        if self.batch_io:
            fetched = q.fetched
            fetched.append(tag)
            cmd = q.fetch_cmd
            if cmd is not None:
                q.fetch_cmd = None
                cmd.done(len(fetched))
            return
        cmd = io.cmd
        assert cmd is not None
        io.cmd = None
        cmd.done(UBLK_IO_RES_OK)

    def take_fetched(self, q_id: int) -> list[int]:
        """batch_io: the tags whose requests landed since the last call (the server reads
        them after a FETCH_IO_CMDS completion), in arrival order."""
        q = self._queues[q_id]
        tags = q.fetched
        if not tags:
            return tags
        q.fetched = []
        return tags

    def commit_buffer(self, q_id: int, elems: list[int]) -> int:
        """batch_io: store ``elems`` (``tag, result`` pairs, flat) for one
        COMMIT_IO_CMDS; returns the ``addr`` that command names."""
        q = self._queues[q_id]
        addr = q.next_addr
        q.next_addr = addr + 1
        q.commits[addr] = elems
        return addr

    def iod(self, q_id: int, tag: int) -> IoDesc:
        """The descriptor of the request on ``(q_id, tag)`` (the server's mmap view)."""
        return self._queues[q_id].iods[tag]

    def stop(self) -> None:
        """Stop the device: armed tags complete with ``UBLK_IO_RES_ABORT``, queued
        requests end with -ESHUTDOWN, new ones are refused."""
        if self._stopped:
            return
        self._stopped = True
        for q in self._queues:
            while q.backlog:
                req = q.backlog.popleft()
                self._end(req, -errno.ESHUTDOWN)
            q.free_tags.clear()
            # batch_io: requests that landed but were never fetched end here.
            fetched, q.fetched = q.fetched, []
            for tag in fetched:
                io = q.ios[tag]
                landed, io.req = io.req, None
                if landed is not None:
                    self._end(landed, -errno.ESHUTDOWN)
            cmd, q.fetch_cmd = q.fetch_cmd, None
            if cmd is not None and not cmd.finished:
                cmd.done(UBLK_IO_RES_ABORT)
            for io in q.ios:
                cmd, io.cmd = io.cmd, None
                if cmd is not None and not cmd.finished:
                    cmd.done(UBLK_IO_RES_ABORT)

    @property
    def stopped(self) -> bool:
        return self._stopped

    # ---- driver ---------------------------------------------------------------------

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        """Handle FETCH / COMMIT_AND_FETCH / FUSED_SUBMIT_IO (see the module doc)."""
        op = cmd.cmd_op
        if op in (UBLK_IO_FETCH_IO_CMDS, UBLK_IO_COMMIT_IO_CMDS):
            if cmd.is_fused:
                return -errno.EOPNOTSUPP
            return self._batch_cmd(cmd, op)
        try:
            q_id, tag, result, _addr = IO_CMD.unpack_from(cmd.cmd)
        except struct.error:
            return -errno.EINVAL
        if q_id >= self.nr_queues or tag >= self.queue_depth:
            return -errno.EINVAL
        q = self._queues[q_id]
        io = q.ios[tag]
        if cmd.is_fused:
            if cmd.cmd_op != UBLK_IO_FUSED_SUBMIT_IO:
                return -errno.EOPNOTSUPP
            return self._fused_submit(io, cmd, result)
        if self.batch_io:  # per-tag FETCH/COMMIT_AND_FETCH do not exist in batch mode
            return -errno.EINVAL
        if cmd.cmd_op == UBLK_IO_FETCH_REQ:
            if self._stopped:
                return UBLK_IO_RES_ABORT
            if io.cmd is not None or io.req is not None:
                return -errno.EBUSY
            self._arm(q, tag, io, cmd)
            return EIOCBQUEUED
        if cmd.cmd_op == UBLK_IO_COMMIT_AND_FETCH_REQ:
            req = io.req
            if req is None or io.cmd is not None:
                return -errno.EINVAL
            io.req = None
            req.commit_result = result
            if req.refs == 0:
                self._end(req, result)
            if self._stopped:
                return UBLK_IO_RES_ABORT
            self._arm(q, tag, io, cmd)
            return EIOCBQUEUED
        # UBLK_IO_FUSED_SUBMIT_IO without the fused flag, or an unknown command.
        return -errno.EINVAL

    def _batch_cmd(self, cmd: UringCmd, op: int) -> int:
        if not self.batch_io:
            return -errno.EINVAL
        try:
            q_id, _flags, nr_elem, addr = BATCH_CMD.unpack_from(cmd.cmd)
        except struct.error:
            return -errno.EINVAL
        if q_id >= self.nr_queues:
            return -errno.EINVAL
        q = self._queues[q_id]
        if op == UBLK_IO_FETCH_IO_CMDS:
            if self._stopped:
                return UBLK_IO_RES_ABORT
            if q.fetch_cmd is not None:
                return -errno.EBUSY
            if q.fetched:
                return len(q.fetched)
            q.fetch_cmd = cmd
            cmd.cancel_hook = self._fetch_cancel_hook
            return EIOCBQUEUED
        elems = q.commits.pop(addr, None)
        if elems is None or len(elems) != 2 * nr_elem:
            return -errno.EINVAL
        return self._commit_many(q, elems)

    def _commit_many(self, q: _Queue, elems: list[int]) -> int:
        """COMMIT_IO_CMDS: end each ``(tag, result)``'s request once its lends are back
        (as COMMIT_AND_FETCH, seed F37); the tag takes the next request at once."""
        ios = q.ios
        depth = self.queue_depth
        bad = 0
        stopped = self._stopped
        backlog = q.backlog
        for i in range(0, len(elems), 2):
            tag = elems[i]
            result = elems[i + 1]
            if not 0 <= tag < depth:
                bad += 1
                continue
            io = ios[tag]
            req = io.req
            if req is None:
                bad += 1
                continue
            io.req = None
            req.commit_result = result
            if req.refs == 0:
                self._end(req, result)
            if stopped:
                continue
            if backlog:
                self._start(q, tag, backlog.popleft())
            else:
                q.free_tags.append(tag)
        if bad:
            log.error("ublk.commit_bad_elements", q_id=q.q_id, bad=bad, elements=len(elems) // 2)
            return -errno.EINVAL
        return len(elems) // 2

    def _cancel_fetch(self, cmd: UringCmd) -> None:
        for q in self._queues:
            if q.fetch_cmd is cmd:
                q.fetch_cmd = None
        if not cmd.finished:
            cmd.done(-errno.ECANCELED)

    def _arm(self, q: _Queue, tag: int, io: _Io, cmd: UringCmd) -> None:
        io.cmd = cmd
        cmd.cancel_hook = self._cancel_hook
        cmd.pdu["ublk"] = io.key
        if q.backlog:
            self._start(q, tag, q.backlog.popleft())
        else:
            q.free_tags.append(tag)

    def _cancel(self, cmd: UringCmd) -> None:
        q_id, tag = cmd.pdu["ublk"]
        q = self._queues[q_id]
        io = q.ios[tag]
        if io.cmd is cmd:
            io.cmd = None
            with contextlib.suppress(ValueError):
                q.free_tags.remove(tag)
        if not cmd.finished:
            cmd.done(-errno.ECANCELED)

    def _fused_submit(self, io: _Io, cmd: UringCmd, expected: int) -> int:
        req = io.req
        if req is None or req.buf is None:
            return -errno.EINVAL
        op = req.op
        want = _DEST if op == _OP_READ else _SRC
        if (op != _OP_READ and op != _OP_WRITE) or cmd.buf_dir != want:
            return -errno.EINVAL
        req.refs += 1
        self.lent += 1
        if io.fcmd is None:  # the common case: the tag's only fused submit
            io.fcmd = cmd
            io.freq = req
            io.fexpected = expected
            callback = io.fdone
            assert callback is not None
        else:
            pdu = cmd.pdu
            pdu["req"] = req
            pdu["expected"] = expected
            callback = self._fused_done
        try:
            cmd.provide_buf_and_start(req.lend, callback)
        except BaseException:
            req.refs -= 1
            self.lent -= 1
            if io.fcmd is cmd:
                io.fcmd = io.freq = None
            raise
        return EIOCBQUEUED

    def _fused_done_io(self, io: _Io, cmd: UringCmd) -> None:
        if io.fcmd is not cmd:
            self._fused_done(cmd)
            return
        req = io.freq
        assert req is not None
        expected = io.fexpected
        io.fcmd = io.freq = None  # before done(): a record still referenced is not reused
        self._finish_fused(cmd, req, expected)

    def _fused_done(self, cmd: UringCmd) -> None:
        pdu = cmd.pdu
        req: BlockRequest = pdu.pop("req")
        expected: int = pdu.pop("expected")
        self._finish_fused(cmd, req, expected)

    def _finish_fused(self, cmd: UringCmd, req: BlockRequest, expected: int) -> None:
        res = 0
        for r in cmd.secondary_results:
            if r < 0:
                res = r
                break
            res += r
        else:
            if expected and res != expected:
                res = -errno.EIO
        req.refs -= 1
        self.lent -= 1
        if req.refs == 0 and req.commit_result is not None and not req.ended:
            self._end(req, req.commit_result)
        cmd.done(res)

    def _end(self, req: BlockRequest, res: int) -> None:
        if req.ended:
            return
        req.ended = True
        self.inflight -= 1
        hook = self.end_hook
        if hook is not None and req.tag >= 0:
            try:
                hook(req.q_id, req.tag)
            except Exception:
                log.exception("ublk.end_hook_failed", q_id=req.q_id, tag=req.tag)
        try:
            req.on_done(req, res)
        except Exception:
            log.exception("ublk.on_done_failed", op=int(req.op), offset=req.offset)
