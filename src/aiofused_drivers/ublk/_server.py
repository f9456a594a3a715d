"""The ublk server loop: fetch requests, run the target, commit results, all on one ring.

One :class:`RingHost` per process owns a :class:`aiofused.Ring` and its CQE reaper;
each device gets a :class:`UblkServer` that arms every tag with ``FETCH_REQ`` and
turns each fetched request into one submission chain, using the low-level API::

    FUSED_CMD(SUBMIT_IO, CQE_SKIP_SUCCESS|IO_LINK) + N secondaries (CQE_SKIP_SUCCESS)
      -> COMMIT_AND_FETCH_REQ(result)

so a READ or WRITE that succeeds costs one CQE: the next request arriving on its tag.
A failing member posts its own CQE and, by SPEC L4, silences the rest of the chain; the
server then asks the target (:meth:`Target.fused_failed`) what to commit.

FSYNC and FALLOCATE are different: as in the kernel, their error result neither severs
a link nor shows under CQE_SKIP_SUCCESS (only a request that could not be issued at all
does).  So they form a *tail* that the server reads: linked among themselves (in
order: the FALLOCATEs, then the FSYNCs), every member posting its CQE, and no commit
linked behind them::

    [FUSED_CMD(SKIP|LINK) + secondaries ->] [FALLOCATE(LINK)...] FSYNC(LINK)... FSYNC

Once every member's CQE is in (a member that did not run posts -ECANCELED), the server
commits, or asks the target (:meth:`Target.fallocate_failed`,
:meth:`Target.fsync_failed`) about the first that failed.  If the fused command in
front fails, the tail's CQEs are not posted (SPEC L4) and the tail is forgotten.

Short transfers are continued, as ublk servers do (the kernel's ublk driver requeues
the rest of a partly completed request): a secondary that moved fewer bytes than asked
posts its CQE (SPEC L2: a short READ/WRITE fails), the primary then fails and severs the
commit, and the server submits a new fused command for the rest of each short piece
(the same chain behind it).  A READ that hits end of file reads the rest as zeroes (as
the kernel's loop driver); a WRITE that moves nothing is -EIO.  Every round moves at
least one byte (or turns a piece at end of file into a read of ``/dev/zero``, once) or
ends the request, so this ends; :data:`MAX_CONTINUATIONS` bounds it besides.  If another
secondary failed in the same round, the short ones are still finished first (a primary
without the commit behind it, so its CQE comes back), then the target is asked.

Batch mode (a device with ``batch_io``, the kernel's ``UBLK_F_BATCH_IO``): a request
costs no FETCH or COMMIT record or CQE of its own.  One ``FETCH_IO_CMDS`` per queue is
armed; its completion hands over every tag that landed since, and it is re-armed once
they are all started.  Each request is one fused primary driven by callbacks
(:meth:`aiofused.Ring.open_fused`: the device lends the request's own buffer, the
READ/WRITE secondaries start from the lend, the primary is sealed), with no SQE, task
or future; its completion queues ``(tag, result)``, and every result queued until the
next submit goes to the device in one ``COMMIT_IO_CMDS`` (CQE_SKIP_SUCCESS).  Failures,
short transfers (continued the same way, each round a primary of its own) and the
FSYNC/FALLOCATE tails are handled as above; a tail is submitted once the fused command
before it succeeded, and the commit is queued when the tail is in.

``user_data`` layout: ``dev u16 | kind u8 | index u8 | q_id u16 | tag u16``; the index
of a secondary is its position in the submitted pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from aiofused import BufDir, Cqe, DriverFile, Op, Ring, SqeFlag
from aiofused.driver import UringCmd, get_logger

from ._device import (
    UBLK_IO_COMMIT_AND_FETCH_REQ,
    UBLK_IO_COMMIT_IO_CMDS,
    UBLK_IO_FETCH_IO_CMDS,
    UBLK_IO_FETCH_REQ,
    UBLK_IO_FUSED_SUBMIT_IO,
    UBLK_IO_RES_ABORT,
    UBLK_IO_RES_OK,
    IoDesc,
    UblkDriver,
    pack_batch_cmd,
    pack_io_cmd,
)

if TYPE_CHECKING:
    from ._targets import Target

__all__ = ["Ctx", "Piece", "RingHost", "UblkServer"]

log: Final = get_logger(__name__)

KIND_IO: Final = 1
KIND_FUSED: Final = 2
KIND_SEC: Final = 3
KIND_FSYNC: Final = 4
KIND_ONESHOT: Final = 5
KIND_FALLOC: Final = 6
KIND_FETCH: Final = 7
KIND_COMMIT: Final = 8

_SKIP: Final = int(SqeFlag.CQE_SKIP_SUCCESS)
_LINK: Final = int(SqeFlag.IO_LINK)
_SKIP_LINK: Final = int(SqeFlag.CQE_SKIP_SUCCESS | SqeFlag.IO_LINK)
IORING_FSYNC_DATASYNC: Final = 1
_DEST: Final = int(BufDir.DEST)
_EIO: Final = errno.EIO
#: Rounds of continued short transfers one request may take (each moves >= 1 byte).
MAX_CONTINUATIONS: Final = 4096


def _ud(dev: int, kind: int, index: int, q_id: int, tag: int) -> int:
    return (dev << 48) | (kind << 40) | (index << 32) | (q_id << 16) | tag


# ``kind`` already shifted into place, to OR into a tag's base user_data.
_UD_IO: Final = KIND_IO << 40
_UD_FUSED: Final = KIND_FUSED << 40
_UD_SEC: Final = KIND_SEC << 40
_UD_FSYNC: Final = KIND_FSYNC << 40
_UD_FALLOC: Final = KIND_FALLOC << 40
_BUF_DEST: Final = BufDir.DEST
_BUF_SRC: Final = BufDir.SRC
_OP_READ: Final = Op.READ
_OP_WRITE: Final = Op.WRITE


class Piece:
    """One secondary: ``nbytes`` at ``file_offset`` of ``fd`` <-> ``at`` in the request
    buffer.  ``label`` is the target's own tag for it (e.g. a replica index)."""

    __slots__ = ("at", "fd", "file_offset", "label", "nbytes")

    def __init__(self, fd: int, file_offset: int, at: int, nbytes: int, label: int = 0) -> None:
        self.fd = fd
        self.file_offset = file_offset
        self.at = at
        self.nbytes = nbytes
        self.label = label

    def _key(self) -> tuple[int, int, int, int, int]:
        return (self.fd, self.file_offset, self.at, self.nbytes, self.label)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Piece):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Piece(fd={self.fd}, file_offset={self.file_offset}, at={self.at}, "
            f"nbytes={self.nbytes}, label={self.label})"
        )


class Ctx:
    """Per-tag context a target works with while it owns the tag's request."""

    __slots__ = (
        "attempt",
        "buf_dir",
        "chain",
        "cmd_bytes",
        "cmd_expected",
        "failed",
        "fsync_fds",
        "fused_cb",
        "iod",
        "lent_cb",
        "pieces",
        "q_id",
        "result",
        "rounds",
        "scratch",
        "sec_cbs",
        "server",
        "short",
        "tag",
        "tail_failed",
        "tail_left",
        "ud",
    )

    def __init__(self, server: UblkServer, q_id: int, tag: int, iod: IoDesc) -> None:
        self.server = server
        self.q_id = q_id
        self.tag = tag
        #: user_data of this tag's SQEs with kind and index 0.
        self.ud = _ud(server.dev_id, 0, 0, q_id, tag)
        self.iod = iod
        #: (label, res) of the secondaries that failed in the last fused submit.
        self.failed: list[tuple[int, int]] = []
        #: (index in ``pieces``, bytes moved) of the secondaries that came back short.
        self.short: list[tuple[int, int]] = []
        #: The pieces and direction of the last fused submit, and how many
        #: continuation rounds this request took.
        self.pieces: Sequence[Piece] = ()
        self.buf_dir = _DEST
        self.rounds = 0
        #: CQEs of the tail still to come, and the first failure in it (kind, index, res).
        self.tail_left = 0
        self.tail_failed: tuple[int, int, int] | None = None
        self.attempt = 0
        #: The fds of the FSYNCs in the last submission (an FSYNC CQE names its index).
        self.fsync_fds: Sequence[int] = ()
        #: The result the last submission commits if every member succeeds.
        self.result = 0
        self.scratch: Any = None
        # Batch mode: the callbacks of this tag's fused primaries, made once (no closure
        # per request), and its FUSED_SUBMIT_IO cmd bytes for the last byte count.
        self.chain = True
        self.cmd_expected = -1
        self.cmd_bytes = b""
        self.lent_cb = self._lent
        self.fused_cb = self._fused_complete
        self.sec_cbs: list[Callable[[int, int], None]] = [functools.partial(self._sec_done, 0)]

    # ---- batch mode: the callbacks of an open fused primary -------------------------

    def _lent(self, cmd: UringCmd, nbytes: int) -> None:
        """The device lent the request's buffer: start every piece, then seal."""
        ring = self.server.ring
        op = _OP_READ if self.buf_dir == _DEST else _OP_WRITE
        cbs = self.sec_cbs
        try:
            for i, p in enumerate(self.pieces):
                if i >= len(cbs):
                    cbs.append(functools.partial(self._sec_done, i))
                ring.fused_secondary(
                    cmd,
                    op,
                    p.fd,
                    at=p.at,
                    nbytes=p.nbytes,
                    offset=p.file_offset,
                    on_complete=cbs[i],
                )
        except Exception:
            log.exception("ublk.secondary_failed", q_id=self.q_id, tag=self.tag)
            self.failed.append((-1, -_EIO))
        ring.seal(cmd)

    def _sec_done(self, index: int, res: int, flags: int) -> None:
        pieces = self.pieces
        if index >= len(pieces):
            log.error("ublk.cqe_unknown_piece", q_id=self.q_id, tag=self.tag, index=index, res=res)
        elif res < 0:
            self.failed.append((pieces[index].label, res))
        elif res < pieces[index].nbytes:
            self.short.append((index, res))

    def _fused_complete(self, res: int, flags: int) -> None:
        server = self.server
        server.fused_inflight -= 1
        if res >= 0 and self.chain and not self.short and not self.failed and not self.fsync_fds:
            # The common case, inline: queue the commit (as server.submit_commit).
            elems = server.commits[self.q_id]
            elems.append(self.tag)
            elems.append(self.result)
            if not server.fused_inflight:
                # The last one in flight: nothing more can join this batch, commit now
                # rather than one loop iteration later.
                server.commit_now()
            elif not server.commit_wanted:
                server.commit_wanted = True
                server.host.want_flush(server)
            return
        try:
            server.fused_complete(self, res)
        except Exception:
            log.exception("ublk.target_failed", q_id=self.q_id, tag=self.tag)
            self.commit(-_EIO)

    def fused(
        self,
        buf_dir: BufDir,
        pieces: Sequence[Piece],
        fsync_fds: Sequence[int] = (),
        result: int | None = None,
    ) -> None:
        """Submit one fused command over ``pieces`` then commit (see module doc)."""
        server = self.server
        if server.batch:
            self.failed.clear()
            self.rounds = 0
            server.open_fused(
                self, buf_dir, pieces, fsync_fds, self.iod.nr_bytes if result is None else result
            )
            return
        server.submit_fused(self, buf_dir, pieces, fsync_fds, result)

    def fallocate_then_commit(
        self, mode: int, pieces: Sequence[Piece], fsync_fds: Sequence[int] = ()
    ) -> None:
        """FALLOCATE each piece (DISCARD, WRITE_ZEROES), FSYNC ``fsync_fds``, commit 0."""
        self.server.submit_fallocate(self, mode, pieces, fsync_fds)

    def fsync_then_commit(self, fds: Sequence[int], result: int = 0) -> None:
        """FSYNC every fd, then commit ``result``."""
        self.server.submit_fsync(self, fds, result)

    def commit(self, result: int) -> None:
        """Commit ``result`` for this tag's request and fetch the next."""
        self.server.submit_commit(self, result)


class RingHost:
    """A ring plus its single CQE reaper, shared by every device of a process."""

    def __init__(self, ring: Ring, entries: int) -> None:
        self.ring = ring
        self.entries = entries
        self._servers: dict[int, UblkServer] = {}
        #: Servers with batch commits to prepare before the next submit.
        self._pre: list[UblkServer] = []
        self._queued = 0
        self._kick_pending = False
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        #: ``/dev/zero``, what a READ past end of file continues from.
        self.zero_fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)

    def start(self) -> None:
        self._task = asyncio.create_task(self._reap(), name="ublk-reaper")

    def add(self, server: UblkServer) -> None:
        self._servers[server.dev_id] = server

    def remove(self, server: UblkServer) -> None:
        self._servers.pop(server.dev_id, None)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` consecutive SQEs in the SQ."""
        if self._queued + n > self.entries:
            self.flush()

    def sqe(self) -> Any:
        sqe = self.ring.get_sqe()
        if sqe is None:
            self.flush()
            sqe = self.ring.get_sqe()
            if sqe is None:
                raise RuntimeError("submission queue full after submit")
        self._queued += 1
        return sqe

    def want_flush(self, server: UblkServer) -> None:
        """``server.prep_commits()`` runs before the next submit (which comes soon)."""
        self._pre.append(server)
        self.kick()

    def flush(self) -> None:
        """Submit everything prepared so far."""
        if self._pre:
            pre, self._pre = self._pre, []
            for server in pre:
                server.prep_commits()
        while self._queued:
            n = self.ring.submit()
            if n <= 0:
                break
            self._queued -= n
        self._queued = max(self._queued, 0)

    def kick(self) -> None:
        """Submit at the end of this loop iteration (for SQEs prepared outside the reaper)."""
        if not self._kick_pending:
            self._kick_pending = True
            self._loop.call_soon(self._kicked)

    def _kicked(self) -> None:
        self._kick_pending = False
        self.flush()

    async def _reap(self) -> None:
        ring = self.ring
        servers = self._servers
        while True:
            cqe: Cqe | None = await ring.wait_cqe()
            while cqe is not None:
                ring.cqe_seen(cqe)
                server = servers.get(cqe.user_data >> 48)
                if server is None:
                    log.debug("ublk.cqe_orphan", user_data=cqe.user_data, res=cqe.res)
                else:
                    try:
                        server.on_cqe(cqe)
                    except Exception:
                        log.exception("ublk.cqe_handler_failed", user_data=cqe.user_data)
                cqe = ring.peek_cqe()
            self.flush()

    async def close(self) -> None:
        """Stop reaping.  The files stay open until :meth:`close_files` (after the ring
        closed: an op still in flight may name them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def close_files(self) -> None:
        if self.zero_fd >= 0:
            os.close(self.zero_fd)
            self.zero_fd = -1


class UblkServer:
    """Serves one :class:`UblkDriver` with one target through a :class:`RingHost`."""

    def __init__(self, host: RingHost, driver: UblkDriver, target: Target, dev_id: int) -> None:
        self.host = host
        self.driver = driver
        self.target = target
        self.dev_id = dev_id
        self.ring = host.ring
        self.dfile: DriverFile = host.ring.register_driver(driver)
        if target.wants_end:
            driver.end_hook = target.request_ended
        self._ctx = [
            [Ctx(self, q, t, driver.iod(q, t)) for t in range(driver.queue_depth)]
            for q in range(driver.nr_queues)
        ]
        self._armed = 0
        #: Batch mode (module doc): per queue, the ``tag, result`` pairs to commit.
        self.batch = driver.batch_io
        self.commits: list[list[int]] = [[] for _ in range(driver.nr_queues)]
        self.commit_wanted = False
        #: Batch mode: fused primaries opened and not yet completed.
        self.fused_inflight = 0
        self._fetch_cmds = [pack_batch_cmd(q) for q in range(driver.nr_queues)]
        #: Continuation rounds submitted for short transfers (for tests and metrics).
        self.continued = 0
        self._all_aborted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        host.add(self)

    def start(self) -> None:
        """Arm every tag of every queue with FETCH_REQ (batch mode: each queue with one
        FETCH_IO_CMDS)."""
        host = self.host
        if self.batch:
            for q in range(self.driver.nr_queues):
                self._prep_fetch(q)
                self._armed += 1
            host.flush()
            return
        for q in range(self.driver.nr_queues):
            for tag in range(self.driver.queue_depth):
                host.reserve(1)
                sqe = host.sqe()
                sqe.prep_uring_cmd(self.dfile, UBLK_IO_FETCH_REQ, pack_io_cmd(q, tag))
                sqe.user_data = _ud(self.dev_id, KIND_IO, 0, q, tag)
                self._armed += 1
        host.flush()

    async def stop(self) -> None:
        """Stop the device and wait until every tag reported ABORT."""
        self.driver.stop()
        if self._armed:
            try:
                await asyncio.wait_for(asyncio.shield(self._all_aborted), 10)
            except TimeoutError:
                log.warning("ublk.stop_timeout", armed=self._armed)
        self.host.remove(self)

    def _prep_fetch(self, q_id: int) -> None:
        host = self.host
        host.reserve(1)
        sqe = host.sqe()
        sqe.prep_uring_cmd(self.dfile, UBLK_IO_FETCH_IO_CMDS, self._fetch_cmds[q_id])
        sqe.user_data = _ud(self.dev_id, KIND_FETCH, 0, q_id, 0)

    def prep_commits(self) -> None:
        """Batch mode: one COMMIT_IO_CMDS per queue for every result queued so far."""
        self.commit_wanted = False
        host = self.host
        driver = self.driver
        commits = self.commits
        for q_id, elems in enumerate(commits):
            if not elems:
                continue
            commits[q_id] = []
            addr = driver.commit_buffer(q_id, elems)
            host.reserve(1)
            sqe = host.sqe()
            sqe.prep_uring_cmd(
                self.dfile, UBLK_IO_COMMIT_IO_CMDS, pack_batch_cmd(q_id, len(elems) // 2, addr)
            )
            sqe.flags |= _SKIP
            sqe.user_data = _ud(self.dev_id, KIND_COMMIT, 0, q_id, 0)

    def commit_now(self) -> None:
        """Batch mode: submit the queued commits at once."""
        self.prep_commits()
        self.host.flush()

    # ---- CQEs -----------------------------------------------------------------------

    def _handle(self, ctx: Ctx) -> None:
        ctx.attempt = 0
        ctx.scratch = None
        ctx.failed.clear()
        try:
            self.target.handle(ctx)
        except Exception:
            log.exception("ublk.target_failed", q_id=ctx.q_id, tag=ctx.tag)
            ctx.commit(-errno.EIO)

    def on_cqe(self, cqe: Cqe) -> None:
        ud = cqe.user_data
        kind = (ud >> 40) & 0xFF
        q_id = (ud >> 16) & 0xFFFF
        tag = ud & 0xFFFF
        res = cqe.res
        if kind == KIND_FETCH:
            if res >= 0:
                ctxs = self._ctx[q_id]
                handle = self._handle
                for t in self.driver.take_fetched(q_id):
                    handle(ctxs[t])
                self._prep_fetch(q_id)
                return
            kind = KIND_IO  # the fetch ended: as an aborted per-tag FETCH below
        elif kind == KIND_COMMIT:  # only a failed one posts a CQE
            log.error("ublk.commit_failed", q_id=q_id, res=res)
            return
        if kind == KIND_IO:
            if res == UBLK_IO_RES_OK:
                self._handle(self._ctx[q_id][tag])
                return
            self._armed -= 1
            if res not in (UBLK_IO_RES_ABORT, -errno.ECANCELED):
                log.error("ublk.io_cmd_failed", q_id=q_id, tag=tag, res=res)
            if self._armed == 0 and not self._all_aborted.done():
                self._all_aborted.set_result(None)
            return
        ctx = self._ctx[q_id][tag]
        if kind == KIND_SEC:
            index = (ud >> 32) & 0xFF
            pieces = ctx.pieces
            if index >= len(pieces):
                log.error("ublk.cqe_unknown_piece", q_id=q_id, tag=tag, index=index, res=res)
            elif res < 0:
                ctx.failed.append((pieces[index].label, res))
            elif res < pieces[index].nbytes:
                ctx.short.append((index, res))
        elif kind == KIND_FUSED:
            ctx.tail_left = 0  # a tail behind it did not run and posts nothing (L4)
            ctx.tail_failed = None
            if ctx.short:
                self._continue(ctx)
                return
            if res >= 0:
                # A round without the commit behind it finished the rest of the short
                # pieces: now the target decides about the secondaries that failed.
                res = ctx.failed[0][1] if ctx.failed else -_EIO
            self._ask_target(ctx, self.target.fused_failed, res)
        elif kind in (KIND_FALLOC, KIND_FSYNC):
            if ctx.tail_left <= 0:
                log.error("ublk.cqe_unexpected", q_id=q_id, tag=tag, kind=kind, res=res)
                return
            if res < 0 and res != -errno.ECANCELED and ctx.tail_failed is None:
                ctx.tail_failed = (kind, (ud >> 32) & 0xFF, res)
            ctx.tail_left -= 1
            if ctx.tail_left == 0:
                self._tail_done(ctx)

    def _tail_done(self, ctx: Ctx) -> None:
        failed, ctx.tail_failed = ctx.tail_failed, None
        if failed is None:
            self.submit_commit(ctx, ctx.result)
            return
        kind, index, res = failed
        if kind == KIND_FALLOC:
            self._ask_target(ctx, self.target.fallocate_failed, index, res)
            return
        fds = ctx.fsync_fds
        fd = fds[index] if index < len(fds) else -1
        self._ask_target(ctx, self.target.fsync_failed, fd, res)

    @staticmethod
    def _ask_target(ctx: Ctx, hook: Callable[..., None], *args: int) -> None:
        """Let the target decide about a failed chain member; -EIO if the hook raises."""
        try:
            hook(ctx, *args)
        except Exception:
            log.exception("ublk.target_failed", q_id=ctx.q_id, tag=ctx.tag)
            ctx.commit(-errno.EIO)

    # ---- submissions ----------------------------------------------------------------

    def submit_fused(
        self,
        ctx: Ctx,
        buf_dir: BufDir,
        pieces: Sequence[Piece],
        fsync_fds: Sequence[int],
        result: int | None,
    ) -> None:
        ctx.failed.clear()
        ctx.rounds = 0
        self._submit_fused(
            ctx, buf_dir, pieces, fsync_fds, ctx.iod.nr_bytes if result is None else result, True
        )

    def _submit_fused(
        self,
        ctx: Ctx,
        buf_dir: int,
        pieces: Sequence[Piece],
        fsync_fds: Sequence[int],
        result: int,
        chain: bool,
    ) -> None:
        """One fused command over ``pieces``; with ``chain``, the commit (or the FSYNC
        tail) linked behind it, else nothing behind it (its CQE always comes: the
        server goes on from there).  Batch mode: an open primary instead, whose
        completion (:meth:`fused_complete`) does what the chain would."""
        if self.batch:
            self.open_fused(ctx, buf_dir, pieces, fsync_fds, result, chain)
            return
        host = self.host
        n = len(pieces)
        q_id, tag, ud = ctx.q_id, ctx.tag, ctx.ud
        expected = pieces[0].nbytes if n == 1 else sum(p.nbytes for p in pieces)
        host.reserve(n + len(fsync_fds) + 2)
        ctx.pieces = pieces
        ctx.buf_dir = buf_dir
        ctx.short.clear()
        sqe = host.sqe()
        sqe.prep_fused_cmd(self.dfile, UBLK_IO_FUSED_SUBMIT_IO, n, pack_io_cmd(q_id, tag, expected))
        if chain:
            sqe.flags |= _SKIP_LINK
        sqe.user_data = ud | _UD_FUSED
        dest = buf_dir == _DEST
        for i, p in enumerate(pieces):
            s = host.sqe()
            if dest:
                s.prep_read(p.fd, p.at, p.nbytes, p.file_offset)
            else:
                s.prep_write(p.fd, p.at, p.nbytes, p.file_offset)
            s.flags |= _SKIP
            s.user_data = ud | _UD_SEC | (i << 32)
        if chain:
            if fsync_fds:
                ctx.result = result
                self._prep_tail(ctx, 0, (), fsync_fds, IORING_FSYNC_DATASYNC)
            else:
                self._prep_commit(ctx, result)
        else:
            ctx.fsync_fds = fsync_fds
            ctx.result = result
            host.kick()

    def open_fused(
        self,
        ctx: Ctx,
        buf_dir: int,
        pieces: Sequence[Piece],
        fsync_fds: Sequence[int],
        result: int,
        chain: bool = True,
    ) -> None:
        """Batch mode: one fused primary over ``pieces``, driven by ``ctx``'s callbacks;
        its completion commits ``result`` (after an FSYNC of ``fsync_fds``) or goes to
        :meth:`fused_complete`."""
        expected = pieces[0].nbytes if len(pieces) == 1 else sum(p.nbytes for p in pieces)
        if expected != ctx.cmd_expected:
            ctx.cmd_expected = expected
            ctx.cmd_bytes = pack_io_cmd(ctx.q_id, ctx.tag, expected)
        ctx.pieces = pieces
        ctx.buf_dir = buf_dir
        ctx.short.clear()
        ctx.fsync_fds = fsync_fds
        ctx.result = result
        ctx.chain = chain
        self.fused_inflight += 1
        self.ring.open_fused(
            self.dfile,
            UBLK_IO_FUSED_SUBMIT_IO,
            cmd=ctx.cmd_bytes,
            buf_dir=_BUF_DEST if buf_dir == _DEST else _BUF_SRC,
            on_lent=ctx.lent_cb,
            on_complete=ctx.fused_cb,
        )

    def fused_complete(self, ctx: Ctx, res: int) -> None:
        """Batch mode: a fused primary of ``ctx`` completed (after its secondaries)."""
        if ctx.short:
            self._continue(ctx)
            return
        if res >= 0 and ctx.chain and not ctx.failed:
            if ctx.fsync_fds:
                self.host.reserve(len(ctx.fsync_fds))
                self._prep_tail(ctx, 0, (), ctx.fsync_fds, IORING_FSYNC_DATASYNC)
            else:
                self.submit_commit(ctx, ctx.result)
            return
        if res >= 0:
            res = ctx.failed[0][1] if ctx.failed else -_EIO
        self._ask_target(ctx, self.target.fused_failed, res)

    def _continue(self, ctx: Ctx) -> None:
        """Submit the rest of the short pieces of the last fused command (module doc)."""
        dest = ctx.buf_dir == _DEST
        zero = self.host.zero_fd
        rest: list[Piece] = []
        pieces = ctx.pieces
        for index, got in ctx.short:
            p = pieces[index]
            if got:
                rest.append(Piece(p.fd, p.file_offset + got, p.at + got, p.nbytes - got, p.label))
            elif dest and p.fd != zero:  # end of file: the rest reads as zeroes
                rest.append(Piece(zero, 0, p.at, p.nbytes, p.label))
            else:  # nothing moved (a WRITE, or /dev/zero itself): no progress possible
                ctx.failed.append((p.label, -_EIO))
        ctx.short.clear()
        ctx.rounds += 1
        if not rest or ctx.rounds > MAX_CONTINUATIONS:
            log.warning(
                "ublk.short_transfer",
                op=ctx.iod.op,
                offset=ctx.iod.start,
                rounds=ctx.rounds,
                left=sum(p.nbytes for p in rest),
            )
            ctx.failed.extend((p.label, -_EIO) for p in rest)
            self._ask_target(ctx, self.target.fused_failed, -_EIO)
            return
        self.continued += 1
        self._submit_fused(ctx, ctx.buf_dir, rest, ctx.fsync_fds, ctx.result, chain=not ctx.failed)

    def submit_fallocate(
        self, ctx: Ctx, mode: int, pieces: Sequence[Piece], fsync_fds: Sequence[int]
    ) -> None:
        ctx.result = 0
        if not pieces and not fsync_fds:
            self.submit_commit(ctx, 0)
            return
        self.host.reserve(len(pieces) + len(fsync_fds))
        self._prep_tail(ctx, mode, pieces, fsync_fds)

    def submit_fsync(self, ctx: Ctx, fds: Sequence[int], result: int) -> None:
        ctx.result = result
        if not fds:
            self.submit_commit(ctx, result)
            return
        self.host.reserve(len(fds))
        self._prep_tail(ctx, 0, (), fds)

    def _prep_tail(
        self,
        ctx: Ctx,
        mode: int,
        pieces: Sequence[Piece],
        fds: Sequence[int],
        fsync_flags: int = 0,
    ) -> None:
        """The FALLOCATEs of ``pieces`` then an FSYNC per fd, linked, each posting its
        CQE (module doc); a FALLOCATE's CQE names its piece's label, an FSYNC's its
        index in ``fds``.  The commit (``ctx.result``) follows once all are in."""
        host = self.host
        ctx.fsync_fds = fds
        ctx.tail_failed = None
        ctx.tail_left = n = len(pieces) + len(fds)
        ud = ctx.ud
        i = 0
        for p in pieces:
            i += 1
            s = host.sqe()
            s.prep_fallocate(p.fd, mode, p.file_offset, p.nbytes)
            if i < n:
                s.flags |= _LINK
            s.user_data = ud | _UD_FALLOC | (p.label << 32)
        for index, fd in enumerate(fds):
            i += 1
            s = host.sqe()
            s.prep_fsync(fd, fsync_flags)
            if i < n:
                s.flags |= _LINK
            s.user_data = ud | _UD_FSYNC | (index << 32)
        host.kick()

    def submit_commit(self, ctx: Ctx, result: int) -> None:
        if self.batch:
            ctx.result = result
            elems = self.commits[ctx.q_id]
            elems.append(ctx.tag)
            elems.append(result)
            if not self.commit_wanted:
                self.commit_wanted = True
                self.host.want_flush(self)
            return
        self.host.reserve(1)
        self._prep_commit(ctx, result)

    def _prep_commit(self, ctx: Ctx, result: int) -> None:
        ctx.result = result
        sqe = self.host.sqe()
        sqe.prep_uring_cmd(
            self.dfile, UBLK_IO_COMMIT_AND_FETCH_REQ, pack_io_cmd(ctx.q_id, ctx.tag, result)
        )
        sqe.user_data = ctx.ud | _UD_IO
        self.host.kick()
