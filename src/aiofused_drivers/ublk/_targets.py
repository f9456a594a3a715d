"""Targets: what a ublk server does with each request.  Data always moves through
fused commands on the request's own buffer.

``null``    READ fills the buffer from ``/dev/zero``, WRITE goes to ``/dev/null``
``loop``    one backing file
``mirror``  N backing files: a WRITE is one primary with N secondaries, a READ goes
            to one healthy replica (round robin); a failed replica is logged and taken
            out of service, the request is retried on the others.  Running out of
            space (ENOSPC, EDQUOT, EFBIG) on every replica is that request's error
            (NBD_ENOSPC), not a replica failure; a replica out of space while another
            took the write missed it, and leaves service
``linear``  the "generic lvm": logical extents mapped to (file, offset) in a mapping
            store (SQLite by default, :mod:`._mapping`), cached in memory and
            consulted before the fused command; unmapped ranges read as zeroes
            (a fused READ from ``/dev/zero`` into that part of the buffer) and are
            allocated on first write, the physical extent zeroed (and synced)
            before the mapping is recorded, so its unwritten bytes read as zeroes

Targets are built from a spec string ``KIND:ARGS`` by :func:`make_target`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import ClassVar

from aiofused import BufDir
from aiofused.driver import get_logger
from aiofused.driver import parse_size as _parse_size

from ._device import UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP, IoOp
from ._mapping import MappingStore, SqliteMappingStore
from ._mirrorstate import MirrorState
from ._server import Ctx, Piece

__all__ = [
    "LinearTarget",
    "LoopTarget",
    "MirrorTarget",
    "NullTarget",
    "Target",
    "make_target",
    "parse_size",
]

log = get_logger(__name__)

#: Errors that say "no room", not "broken": a request's error, not a replica's.
NO_SPACE: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: base:allocation flags.
STATE_HOLE = 1
STATE_ZERO = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

_ZERO_CHUNK = bytes(1 << 20)


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864: :func:`aiofused.driver.parse_size` (binary K, M, G, T), the
    one size parser of every command."""
    return _parse_size(text)


def _falloc(fd: int, mode: int, offset: int, length: int) -> int:
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    return -ctypes.get_errno()


def zero_range(fd: int, offset: int, length: int, may_trim: bool) -> None:
    """Make ``[offset, offset+length)`` of ``fd`` read as zeroes."""
    if length <= 0:
        return
    if may_trim and _falloc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    if _falloc(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), end - offset)], offset)
        offset += n


def punch(fd: int, offset: int, length: int) -> None:
    """Discard: a hint, errors ignored."""
    if length > 0:
        _falloc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def file_extents(fd: int, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
    """base:allocation extents of a file region from SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    end = offset + length
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return [(length, 0)]
            data = end
        if data > pos:
            out.append((min(data, end) - pos, STATE_HOLE | STATE_ZERO))
            pos = min(data, end)
            if req_one:
                break
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = max(min(hole, end), pos + 1)
        out.append((hole - pos, 0))
        pos = hole
        if req_one or len(out) >= 1024:
            break
    return out


def _open_rw(path: str, read_only: bool) -> int:
    return os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)


class Target:
    """Base class: the default ``handle`` maps READ/WRITE through :meth:`pieces`."""

    kind: ClassVar[str] = ""
    #: Told (:meth:`request_ended`) when each request it handled ended.
    wants_end: ClassVar[bool] = False
    #: NBD_FLAG_CAN_MULTI_CONN is advertised: a write completed on one connection is
    #: seen by a read started afterwards on any other, and a FLUSH on any connection
    #: makes every write completed before it durable, whoever sent it.  Every target
    #: here keeps that.  All connections of a process share one target object (one
    #: view of the replicas, one mapping cache), and a FLUSH fsyncs every backing file
    #: of the target, which covers the pages any process wrote.  Across the workers of
    #: ``--workers N``: loop and null have no state but the page cache they share;
    #: linear records an allocation before the write that needed it is acknowledged
    #: and a worker looks up again what it cached as unmapped once another committed;
    #: the mirror takes a replica out before the write it missed is acknowledged and
    #: every worker reloads the replica state before each request.  Mid-resync too: a
    #: replica being resynced is written by every worker but read by none until it
    #: holds everything, a region a crash (or another worker's writes) may have left
    #: different is read from one replica, and a region being copied holds back the
    #: writes to it in every worker.  A target whose reads depend on per-connection
    #: or per-process state that other writers do not update must set this to False.
    multi_conn: ClassVar[bool] = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_only = False

    # hooks
    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        raise NotImplementedError

    def flush_fds(self) -> Sequence[int]:
        return ()

    def discard(self, offset: int, length: int) -> None:
        """TRIM; default: nothing (a hint)."""

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        raise NotImplementedError

    def space_pieces(self, ctx: Ctx) -> list[Piece] | None:
        """Where a DISCARD or WRITE_ZEROES acts, as FALLOCATE pieces run on the ring
        (``nbytes`` at ``file_offset`` of ``fd``); None: the blocking ``discard`` /
        ``write_zeroes`` hooks instead."""
        return None

    def extents(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        return [(length, 0)]

    def close(self) -> None:
        """Release files."""

    def start(self) -> None:
        """Called on the loop once the device is served (background work starts)."""

    async def stop(self) -> None:
        """Called on the loop once no request is served any more, before :meth:`close`."""

    def request_ended(self, q_id: int, tag: int) -> None:
        """The request on ``(q_id, tag)`` ended (its commit ran), if :attr:`wants_end`."""

    def describe(self) -> str:
        return self.kind

    # request handling
    def handle(self, ctx: Ctx) -> None:
        iod = ctx.iod
        op = iod.op
        fua = bool(iod.flags & UBLK_IO_F_FUA)
        if op == IoOp.READ:
            ctx.fused(BufDir.DEST, self.pieces(ctx, False))
        elif op == IoOp.WRITE:
            ctx.fused(BufDir.SRC, self.pieces(ctx, True), self.flush_fds() if fua else ())
        elif op == IoOp.FLUSH:
            fds = self.flush_fds()
            if fds:
                ctx.fsync_then_commit(fds)
            else:
                ctx.commit(0)
        elif op in (IoOp.DISCARD, IoOp.WRITE_ZEROES):
            space = self.space_pieces(ctx)
            if space is not None:
                # As ublksrv's loop target: FALLOCATE SQEs linked to the commit (punch a
                # hole; zero the range where holes are not allowed), not a blocking call.
                if op == IoOp.WRITE_ZEROES and iod.flags & UBLK_IO_F_NOUNMAP:
                    mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                else:
                    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                ctx.fallocate_then_commit(mode, space, self.flush_fds() if fua else ())
                return
            try:
                if op == IoOp.DISCARD:
                    self.discard(iod.start, iod.nr_bytes)
                else:
                    self.write_zeroes(iod.start, iod.nr_bytes, not (iod.flags & UBLK_IO_F_NOUNMAP))
            except OSError as e:
                ctx.commit(-(e.errno or errno.EIO))
                return
            fds = self.flush_fds() if fua else ()
            if fds:
                ctx.fsync_then_commit(fds)
            else:
                ctx.commit(0)
        else:
            ctx.commit(-errno.EOPNOTSUPP)

    def fused_failed(self, ctx: Ctx, res: int) -> None:
        """The fused submit failed (``ctx.failed`` lists failed secondaries)."""
        log.warning("ublk.io_error", target=self.kind, op=ctx.iod.op, offset=ctx.iod.start, res=res)
        ctx.commit(res)

    def fallocate_failed(self, ctx: Ctx, label: int, res: int) -> None:
        """A FALLOCATE of :meth:`space_pieces` failed (the rest of its chain did not run).
        A DISCARD is a hint: done.  WRITE_ZEROES falls back to :meth:`write_zeroes`
        (another mode, or writing zeroes), e.g. where the filesystem refused the mode."""
        iod = ctx.iod
        log.info("ublk.fallocate_failed", target=self.kind, op=iod.op, piece=label, res=res)
        if iod.op == IoOp.DISCARD:
            ctx.commit(0)
            return
        try:
            self.write_zeroes(iod.start, iod.nr_bytes, not (iod.flags & UBLK_IO_F_NOUNMAP))
        except OSError as e:
            ctx.commit(-(e.errno or errno.EIO))
            return
        fds = self.flush_fds() if iod.flags & UBLK_IO_F_FUA else ()
        if fds:
            ctx.fsync_then_commit(fds)
        else:
            ctx.commit(0)

    def fsync_failed(self, ctx: Ctx, fd: int, res: int) -> None:
        """The FSYNC of ``fd`` (FLUSH, or FUA) failed; the rest of its chain did not run."""
        log.warning("ublk.fsync_failed", target=self.kind, op=ctx.iod.op, fd=fd, res=res)
        ctx.commit(res)


class NullTarget(Target):
    """Discards writes, reads zeroes; still moves data through fused commands."""

    kind = "null"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        self._devnull = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)

    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        return [Piece(self._devnull if write else self._zero, 0, 0, ctx.iod.nr_bytes)]

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        pass

    def extents(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        return [(length, STATE_HOLE | STATE_ZERO)]

    def close(self) -> None:
        os.close(self._zero)
        os.close(self._devnull)


class LoopTarget(Target):
    """One backing file."""

    kind = "loop"

    def __init__(self, path: str, size: int | None = None, read_only: bool = False) -> None:
        fd = _open_rw(path, read_only)
        real = os.fstat(fd).st_size
        super().__init__(real if size is None else size)
        if size is not None and size > real and not read_only:
            os.ftruncate(fd, size)
        self.path = path
        self.fd = fd
        self._fds = (fd,)

    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        iod = ctx.iod
        return [Piece(self.fd, iod.start, 0, iod.nr_bytes)]

    def flush_fds(self) -> Sequence[int]:
        return self._fds

    def space_pieces(self, ctx: Ctx) -> list[Piece] | None:
        iod = ctx.iod
        return [Piece(self.fd, iod.start, 0, iod.nr_bytes)]

    def discard(self, offset: int, length: int) -> None:
        punch(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        zero_range(self.fd, offset, length, may_trim)

    def extents(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        return file_extents(self.fd, offset, length, req_one)

    def close(self) -> None:
        os.close(self.fd)

    def describe(self) -> str:
        return f"loop {self.path}"


class MirrorTarget(Target):
    """RAID-1 over N files; see the module doc.

    Theory of operation (replica state, see :mod:`._mirrorstate`): ``healthy`` are the
    replicas in sync (read and written), ``writable`` those written (``healthy`` plus
    those being resynced).  Taking a replica out is recorded durably before the
    request that found it fails or succeeds.  Every request that changes data
    (WRITE, TRIM, WRITE_ZEROES) first marks its regions dirty (durably) and counts
    itself in flight on them until it ends (:meth:`request_ended`); a cleaner clears
    regions with nothing in flight once the replicas were synced after their last
    write.  At start, stale replicas are resynced online (full copy from an in-sync
    replica) and regions left dirty (writes were in flight at a crash) are copied from
    one replica to the others; until then such a region is read from that one replica
    only.  A region being copied is *locked*: requests that change it wait, and the
    copy waits until nothing is in flight on it.  Copies run in a thread, a region at
    a time, and log their progress.

    Several processes (``nbd serve --workers N``) may serve one mirror: each has a
    :class:`MirrorState` on the same database and sees the others' changes before
    each request (``PRAGMA data_version``), and every :attr:`watch_interval` when
    idle.  A replica one of them takes out is out for all (``take_out`` is durable
    before the request that found it is answered, and the others' next request
    reloads the replica state).  Each has its own write-intent bitmap, so none clears
    a region under another's writes; a region another process's bitmap holds (it is
    writing there, or it crashed) is read from ``self.source`` only.  One process, the
    *leader* (a lock on ``STATE-leader``; another takes over if it dies), runs the
    resyncs: it copies the regions of processes that are gone, and the stale
    replicas, each region locked in the database so that every process holds back its
    writes there while the leader waits for those in flight elsewhere.
    """

    kind = "mirror"
    wants_end = True
    #: Seconds between two cleaner passes (tests shorten it).
    clean_interval = 5.0
    #: Seconds between two looks at what other processes did, when idle.
    watch_interval = 0.05
    #: Seconds between two progress lines of a resync.
    progress_interval = 2.0

    def __init__(
        self,
        paths: Sequence[str],
        size: int | None = None,
        state: str | None = None,
        region: int | None = None,
    ) -> None:
        if not paths:
            raise ValueError("mirror needs at least one replica")
        if len(paths) > 64:
            raise ValueError("mirror supports at most 64 replicas")
        if region is not None and (region < 4096 or region & (region - 1)):
            raise ValueError("mirror region must be a power of two >= 4096")
        self.paths = list(paths)
        self.state_path = state or f"{paths[0]}.mirror.db"
        self.state = MirrorState(self.state_path, self.paths, region)
        try:
            self.fds = [_open_rw(p, False) for p in paths]
        except OSError:
            self.state.close()
            raise
        sizes = [os.fstat(fd).st_size for fd in self.fds]
        if size is None:
            size = min(sizes)
        for fd, s in zip(self.fds, sizes, strict=True):
            if s < size:
                os.ftruncate(fd, size)
        super().__init__(size)
        self.region_size = self.state.region_size
        self._rshift = self.region_size.bit_length() - 1
        self.healthy: list[int] = []
        self.writable: list[int] = []
        #: Replicas waiting for (or in) their full resync.
        self.resyncing: list[int] = []
        #: Regions another process's bitmap holds (a crash left them, or it writes
        #: there) or locked for a copy: read from ``self.source`` only.
        self.unsafe: set[int] = set()
        self.source = 0
        #: Replicas that failed here while the table keeps them in sync (the last one):
        #: (events, resync) then; out of service here until the table changes for them.
        self._broken: dict[int, tuple[int, bool]] = {}
        #: Regions of processes gone to copy (the leader's).
        self._orphans: set[int] = set()
        self._stale_at_start = self.state.stale()
        self._apply_view()
        try:
            if self.state.lead():
                self._take_lead()
        except (OSError, sqlite3.Error) as e:
            self.close()
            raise ValueError(f"mirror state {self.state_path!r}: {e}") from None
        self._rr = 0
        self._inflight: dict[int, int] = {}
        self._written: dict[int, int] = {}
        self._seq = 0
        self._active: dict[tuple[int, int], tuple[int, int]] = {}
        self._locked: set[int] = set()
        self._deferred: dict[int, list[Ctx]] = {}
        self._idle_waiter: tuple[int, asyncio.Future[None]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._resync_task: asyncio.Task[None] | None = None
        self._clean_task: asyncio.Task[None] | None = None
        self._stopping = False
        stale = self._stale_at_start
        if stale:
            log.warning(
                "ublk.mirror_stale_replicas",
                replicas=stale,
                paths=[self.paths[r] for r in stale],
                events=[self.state.replica_events[r] for r in stale],
                mirror_events=self.state.events,
            )
        if self._orphans:
            log.warning("ublk.mirror_dirty_regions", regions=len(self._orphans))

    # ---- the view of the shared state --------------------------------------------

    def _apply_view(self) -> None:
        """healthy/writable/resyncing/source/unsafe from the state as last loaded."""
        st = self.state
        broken = self._broken
        for r, seen in list(broken.items()):
            if seen != (st.replica_events[r], st.replica_resync[r]):
                del broken[r]  # resynced or taken out since: the table says
        self.healthy = [r for r in st.in_sync() if r not in broken]
        self.resyncing = [r for r in st.resyncing() if r not in broken]
        self.writable = sorted(self.healthy + self.resyncing)
        if self.healthy:
            self.source = self.healthy[0]
        self.unsafe = (st.others | st.locked_elsewhere) if len(self.writable) > 1 else set()

    def _take_lead(self) -> None:
        """This process runs the resyncs now: of the stale replicas (every process
        writes them from now on) and of the regions of processes gone."""
        st = self.state
        stale = [r for r in st.stale() if r not in st.resyncing()]
        if stale and st.in_sync():
            st.start_resync(stale)
        self._orphans = st.orphans() if len(st.in_sync()) + len(st.resyncing()) > 1 else set()
        self._apply_view()
        log.info("ublk.mirror_leader", pid=os.getpid(), state=self.state_path)

    def _refresh(self) -> None:
        """Take in what other processes committed (before each request)."""
        if not self.state.changed():
            return
        self._apply_view()
        locked = self.state.locked_elsewhere
        for region in [r for r in self._deferred if r not in locked and r not in self._locked]:
            self._resume(region)
        if locked & self.state.mine:
            self._clean_soon()

    def _resume(self, region: int) -> None:
        for ctx in self._deferred.pop(region, []):
            try:
                self.handle(ctx)
            except Exception:
                log.exception("ublk.target_failed", q_id=ctx.q_id, tag=ctx.tag)
                ctx.commit(-errno.EIO)

    def _clean_soon(self) -> None:
        """Clear what can be cleared now (a copy elsewhere waits for this bitmap)."""
        if self._stopping or (self._clean_task is not None and not self._clean_task.done()):
            return
        self._clean_task = asyncio.get_running_loop().create_task(self._clean())

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the cleaner and the watch, and the resync if anything needs one."""
        self._tasks.append(asyncio.create_task(self._cleaner(), name="mirror-cleaner"))
        self._tasks.append(asyncio.create_task(self._watch(), name="mirror-watch"))
        self._maybe_resync()

    def _maybe_resync(self) -> None:
        if not self.state.leader or self._stopping:
            return
        if self._resync_task is not None and not self._resync_task.done():
            return
        if self._orphans or self.resyncing:
            self._resync_task = asyncio.create_task(self._resync(), name="mirror-resync")
            self._tasks.append(self._resync_task)

    async def stop(self) -> None:
        """Stop the resync and the cleaner (a copy ends at its next chunk); with
        nothing in flight, sync the replicas and clear the bitmap but for regions a
        crash left that were not copied yet."""
        self._stopping = True
        for task in self._tasks:
            if not task.done() and task.get_name() in ("mirror-cleaner", "mirror-watch"):
                task.cancel()
        if self._clean_task is not None:
            await asyncio.wait([self._clean_task], timeout=30)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        self._tasks.clear()
        if not any(self._inflight.values()):
            await self._clean(final=True)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.state.close()

    def describe(self) -> str:
        return f"mirror x{len(self.paths)}"

    # ---- regions ---------------------------------------------------------------------

    def _regions(self, offset: int, length: int) -> range:
        return range(offset >> self._rshift, ((offset + max(length, 1) - 1) >> self._rshift) + 1)

    def request_ended(self, q_id: int, tag: int) -> None:
        regions = self._active.pop((q_id, tag), None)
        if regions is None:
            return
        inflight = self._inflight
        for r in range(*regions):
            n = inflight[r] - 1
            if n:
                inflight[r] = n
            else:
                del inflight[r]
                waiter = self._idle_waiter
                if waiter is not None and waiter[0] == r and not waiter[1].done():
                    waiter[1].set_result(None)
                if r in self.state.locked_elsewhere:
                    self._clean_soon()

    def _begin_change(self, ctx: Ctx) -> bool:
        """Count a data-changing request on its regions (once per request); False if
        one of them is locked by a copy (the request waits for it)."""
        if ctx.scratch is not None:
            return True
        iod = ctx.iod
        regions = self._regions(iod.start, iod.nr_bytes)
        elsewhere = self.state.locked_elsewhere
        for r in regions:
            if r in self._locked or r in elsewhere:
                self._deferred.setdefault(r, []).append(ctx)
                return False
        locked = self.state.mark_dirty(regions)  # looks for locks in the same transaction
        if locked:
            self._deferred.setdefault(min(locked), []).append(ctx)
            self._apply_view()
            return False
        self._seq += 1
        seq = self._seq
        inflight, written = self._inflight, self._written
        for r in regions:
            inflight[r] = inflight.get(r, 0) + 1
            written[r] = seq
        self._active[(ctx.q_id, ctx.tag)] = (regions.start, regions.stop)
        ctx.scratch = regions
        return True

    # ---- requests ----------------------------------------------------------------------

    def _fail(self, label: int, res: int) -> None:
        if label not in self.writable:
            return
        st = self.state
        st.take_out(label)  # durable, from the table's state: other processes see it
        if label in st.in_sync():  # the last replica stays recorded in sync: it holds the data
            self._broken[label] = (st.replica_events[label], st.replica_resync[label])
        self._apply_view()
        log.error(
            "ublk.mirror_replica_failed",
            replica=label,
            path=self.paths[label],
            error=os.strerror(-res) if res < 0 else f"short transfer ({res})",
            healthy=len(self.healthy),
            events=self.state.events,
        )

    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        iod = ctx.iod
        if write:
            return [Piece(self.fds[r], iod.start, 0, iod.nr_bytes, r) for r in self.writable]
        r = -1
        if self.unsafe and any(x in self.unsafe for x in self._regions(iod.start, iod.nr_bytes)):
            r = self.source  # not the same everywhere yet: one replica answers
        if r not in self.healthy:
            self._rr = (self._rr + 1) % len(self.healthy)
            r = self.healthy[self._rr]
        return [Piece(self.fds[r], iod.start, 0, iod.nr_bytes, r)]

    def handle(self, ctx: Ctx) -> None:
        try:
            self._refresh()
        except (OSError, sqlite3.Error) as e:
            log.error("ublk.mirror_state_failed", error=str(e))
            ctx.commit(-errno.EIO)
            return
        if not self.healthy:
            ctx.commit(-errno.EIO)
            return
        if ctx.iod.op in _CHANGES:
            try:
                if not self._begin_change(ctx):
                    return
            except (OSError, sqlite3.Error) as e:
                log.error("ublk.mirror_state_failed", error=str(e))
                ctx.commit(-errno.EIO)
                return
        super().handle(ctx)

    def fused_failed(self, ctx: Ctx, res: int) -> None:
        iod = ctx.iod
        failed = {label for label, _ in ctx.failed}
        if iod.op == IoOp.WRITE and failed:
            self._write_failed(ctx, failed)
            return
        for label, r in ctx.failed:
            self._fail(label, r)
        if not failed:
            # The primary failed without a failing secondary: a short transfer.
            # Take no replica out blindly; retry the whole request once.
            ctx.attempt += 1
            if ctx.attempt > len(self.paths):
                ctx.commit(res)
                return
            self.handle(ctx)
            return
        # READ: retry on another healthy replica.
        if self.healthy:
            self.handle(ctx)
        else:
            ctx.commit(res)

    def _write_failed(self, ctx: Ctx, failed: set[int]) -> None:
        """Replicas in sync that did not fail have written: the write succeeded if any
        did, and a replica that failed (out of space included) missed it and leaves
        service.  If none did, a replica that is merely full stays: the request fails
        with ENOSPC (a broken one still leaves service)."""
        iod = ctx.iod
        wrote = [r for r in self.healthy if r not in failed]
        full = [(label, r) for label, r in ctx.failed if -r in NO_SPACE]
        for label, r in ctx.failed:
            if wrote or -r not in NO_SPACE:
                self._fail(label, r)
        if wrote:
            if iod.flags & UBLK_IO_F_FUA:
                ctx.fsync_then_commit(self.flush_fds(), iod.nr_bytes)
            else:
                ctx.commit(iod.nr_bytes)
            return
        if full:
            log.warning(
                "ublk.mirror_no_space",
                offset=iod.start,
                length=iod.nr_bytes,
                replicas=sorted({label for label, _ in full}),
                error=os.strerror(-full[0][1]),
            )
            ctx.commit(full[0][1])
            return
        ctx.commit(ctx.failed[0][1])

    def fsync_failed(self, ctx: Ctx, fd: int, res: int) -> None:
        """A replica that cannot make its data durable is taken out of service; the
        request succeeds once every replica still healthy was synced."""
        if fd not in self.fds:
            super().fsync_failed(ctx, fd, res)
            return
        self._fail(self.fds.index(fd), res)
        if not self.healthy:
            ctx.commit(res)
            return
        # Sync the replicas left again (each round takes one replica out, so this
        # ends), then commit what was intended.
        ctx.fsync_then_commit(self.flush_fds(), ctx.result)

    def flush_fds(self) -> Sequence[int]:
        return [self.fds[r] for r in self.writable]

    def space_pieces(self, ctx: Ctx) -> list[Piece] | None:
        iod = ctx.iod
        return [Piece(self.fds[r], iod.start, 0, iod.nr_bytes, r) for r in self.writable]

    def discard(self, offset: int, length: int) -> None:
        for r in self.writable:
            punch(self.fds[r], offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Zero the range on every written replica; out of space on all of them is
        ENOSPC (no replica leaves), see :meth:`_write_failed`."""
        errors: dict[int, int] = {}
        for r in list(self.writable):
            try:
                zero_range(self.fds[r], offset, length, may_trim)
            except OSError as e:
                errors[r] = e.errno or errno.EIO
        wrote = [r for r in self.healthy if r not in errors]
        for r, err in errors.items():
            if wrote or err not in NO_SPACE:
                self._fail(r, -err)
        if not wrote:
            full = [err for err in errors.values() if err in NO_SPACE]
            if full:
                raise OSError(full[0], os.strerror(full[0]))
            raise OSError(errno.EIO, "no healthy replica")

    # ---- resync and cleaning ------------------------------------------------------------

    async def _resync(self) -> None:
        try:
            if self._orphans:
                regions = sorted(self._orphans)
                await self._copy_regions("dirty regions", regions, lambda: self.healthy)
            if self.resyncing and not self._stopping:
                everything = list(range(((self.size - 1) >> self._rshift) + 1))
                await self._copy_regions("replicas", everything, lambda: self.resyncing)
                if not self._stopping:
                    for r in list(self.resyncing):
                        self.state.mark_in_sync(r)
                        self._apply_view()
                        log.info(
                            "ublk.mirror_replica_in_sync",
                            replica=r,
                            path=self.paths[r],
                            events=self.state.events,
                        )
        except Exception:
            log.exception("ublk.mirror_resync_failed")

    async def _copy_regions(
        self, what: str, regions: Sequence[int], dests: Callable[[], Sequence[int]]
    ) -> None:
        loop = asyncio.get_running_loop()
        total = len(regions) * self.region_size
        log.info("ublk.mirror_resync_start", what=what, bytes=total, replicas=list(dests()))
        t0 = last = loop.time()
        done = 0
        for region in regions:
            if self._stopping:
                log.info("ublk.mirror_resync_stopped", what=what, done=done, bytes=total)
                return
            self._refresh()
            if self.source not in self.healthy:
                raise RuntimeError("no replica in sync to copy from")
            await self._copy_region(region, dests)
            self._orphans.discard(region)
            done += self.region_size
            now = loop.time()
            if now - last >= self.progress_interval:
                last = now
                log.info(
                    "ublk.mirror_resync",
                    what=what,
                    done=done,
                    bytes=total,
                    percent=round(100 * done / total, 1),
                )
        log.info(
            "ublk.mirror_resync_done",
            what=what,
            bytes=total,
            seconds=round(loop.time() - t0, 3),
        )

    async def _copy_region(self, region: int, dests: Callable[[], Sequence[int]]) -> None:
        """Copy ``region`` from the source to ``dests()``: locked (here and, in the
        table, for every process) once no write is in flight on it anywhere."""
        self._locked.add(region)
        st = self.state
        copied = False
        try:
            st.lock(region)
            while self._inflight.get(region):
                fut = asyncio.get_running_loop().create_future()
                self._idle_waiter = (region, fut)
                try:
                    await fut
                finally:
                    self._idle_waiter = None
            # Another process with writes in flight here keeps its bitmap row until
            # they are done (it clears it at once when it sees the lock).
            loop = asyncio.get_running_loop()
            since = loop.time()
            while st.writers_elsewhere(region) and not self._stopping:
                if loop.time() - since > 10:  # a worker stopped, or cannot sync
                    log.warning("ublk.mirror_resync_waiting", region=region)
                    since = loop.time()
                await asyncio.sleep(0.01)
            self._refresh()
            to = [r for r in dests() if r != self.source and r in self.writable]
            if to and not self._stopping:
                start = region << self._rshift
                n = min(self.region_size, self.size - start)
                src = self.fds[self.source]
                await asyncio.to_thread(self._copy, src, [self.fds[r] for r in to], start, n)
            if not self._stopping:
                st.copied(region)  # the lock goes with the rows of processes gone
                copied = True
                self._apply_view()
        finally:
            self._locked.discard(region)
            if not copied:
                with contextlib.suppress(sqlite3.Error):
                    st.unlock(region)
            self._resume(region)

    def _copy(self, src: int, dests: Sequence[int], offset: int, length: int) -> None:
        """In a thread: copy ``length`` bytes at ``offset`` from ``src`` to ``dests``
        (nothing writes that region meanwhile: it is locked)."""
        end = offset + length
        while offset < end and not self._stopping:
            data = os.pread(src, min(_COPY_CHUNK, end - offset), offset)
            if not data:
                data = bytes(min(_COPY_CHUNK, end - offset))
            for fd in dests:
                view = memoryview(data)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view = view[n:]
                    pos += n
            offset += len(data)
        for fd in dests:
            os.fdatasync(fd)

    async def _cleaner(self) -> None:
        try:
            while not self._stopping:
                await asyncio.sleep(self.clean_interval)
                await self._clean()
                if not self.state.leader and self.state.lead():  # the leader is gone
                    self._take_lead()
                elif self.state.leader and not self._orphans:
                    # A process that served this mirror died: copy its regions.
                    self._orphans = self.state.orphans() if len(self.writable) > 1 else set()
                self._maybe_resync()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("ublk.mirror_cleaner_failed")

    async def _watch(self) -> None:
        """Take in other processes' changes while no request comes (a lock to give
        way to, a lock gone that deferred requests wait for)."""
        try:
            while not self._stopping:
                await asyncio.sleep(self.watch_interval)
                self._refresh()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("ublk.mirror_watch_failed")

    async def _clean(self, final: bool = False) -> None:
        """Clear this process's dirty regions with nothing in flight, once the
        replicas were synced after their last write."""
        blocked = self._locked
        candidates = [r for r in self.state.mine if r not in blocked and not self._inflight.get(r)]
        if not candidates:
            return
        seq = self._seq
        fds = [self.fds[r] for r in self.writable]
        try:
            await asyncio.to_thread(_sync_all, fds)
        except OSError as e:
            log.warning("ublk.mirror_sync_failed", error=str(e))
            return
        written, inflight = self._written, self._inflight
        done = [r for r in candidates if not inflight.get(r) and written.get(r, 0) <= seq]
        self.state.clear(done)
        if final:
            log.info("ublk.mirror_clean", dirty=len(self.state.dirty))


_CHANGES = frozenset({IoOp.WRITE, IoOp.DISCARD, IoOp.WRITE_ZEROES})
_COPY_CHUNK = 1 << 20


def _sync_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


class LinearTarget(Target):
    """Logical extents -> (physical volume file, offset) through a mapping store."""

    kind = "linear"
    MIN_EXTENT = 1 << 20

    def __init__(self, store: MappingStore) -> None:
        super().__init__(store.size)
        self.store = store
        self.extent = store.extent_size
        if self.extent < self.MIN_EXTENT or self.extent & (self.extent - 1):
            raise ValueError("extent size must be a power of two >= 1 MiB")
        self._shift = self.extent.bit_length() - 1
        self.pv_fds = [_open_rw(p, False) for p in store.pv_paths]
        self._zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        #: le -> (pv, pe); a value of None caches "unmapped".
        self._cache: dict[int, tuple[int, int] | None] = {}

    def lookup(self, le: int) -> tuple[int, int] | None:
        try:
            m = self._cache[le]
        except KeyError:
            pass
        else:
            # A mapping never changes; "unmapped" holds until another worker (or
            # process) sharing the store commits: then forget every cached "unmapped".
            if m is not None or not self.store.changed():
                return m
            self._cache = {k: v for k, v in self._cache.items() if v is not None}
        m = self.store.lookup(le)
        self._cache[le] = m
        return m

    def _allocate(self, le: int) -> tuple[int, int]:
        m = self.store.allocate(le, self._zero_extent)
        self._cache[le] = m
        return m

    def _zero_extent(self, pv: int, pe: int) -> None:
        """Make physical extent ``pe`` of ``pv`` read as zeroes, durably, before it is
        mapped (it may hold anything: an old volume, another extent's old data)."""
        fd = self.pv_fds[pv]
        zero_range(fd, pe << self._shift, self.extent, True)
        os.fdatasync(fd)

    def _walk(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """Split into (le, offset_in_extent, nbytes)."""
        out = []
        pos, end, ext = start, start + length, self.extent
        while pos < end:
            le = pos >> self._shift
            off = pos - (le << self._shift)
            n = min(ext - off, end - pos)
            out.append((le, off, n))
            pos += n
        return out

    def pieces(self, ctx: Ctx, write: bool) -> list[Piece]:
        iod = ctx.iod
        out: list[Piece] = []
        at = 0
        for le, off, n in self._walk(iod.start, iod.nr_bytes):
            m = self.lookup(le)
            if m is None and write:
                m = self._allocate(le)
            if m is None:
                fd, foff = self._zero, 0
            else:
                fd, foff = self.pv_fds[m[0]], (m[1] << self._shift) + off
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.fd == fd
                and (fd == self._zero or prev.file_offset + prev.nbytes == foff)
            ):
                prev.nbytes += n
            else:
                out.append(Piece(fd, foff, at, n))
            at += n
        return out

    def handle(self, ctx: Ctx) -> None:
        try:
            super().handle(ctx)
        except OSError as e:
            ctx.commit(-(e.errno or errno.EIO))

    def flush_fds(self) -> Sequence[int]:
        return self.pv_fds

    def _mapped(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        out = []
        for le, off, n in self._walk(offset, length):
            m = self.lookup(le)
            if m is not None:
                out.append((self.pv_fds[m[0]], (m[1] << self._shift) + off, n))
        return out

    def space_pieces(self, ctx: Ctx) -> list[Piece] | None:
        # Only mapped extents: an unmapped one already reads as zeroes.
        iod = ctx.iod
        return [Piece(fd, foff, 0, n) for fd, foff, n in self._mapped(iod.start, iod.nr_bytes)]

    def discard(self, offset: int, length: int) -> None:
        for fd, foff, n in self._mapped(offset, length):
            punch(fd, foff, n)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        for fd, foff, n in self._mapped(offset, length):
            zero_range(fd, foff, n, may_trim)

    def extents(self, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for le, _off, n in self._walk(offset, length):
            state = 0 if self.lookup(le) is not None else STATE_HOLE | STATE_ZERO
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + n, state)
            else:
                if req_one and out:
                    break
                out.append((n, state))
        return out

    def close(self) -> None:
        for fd in self.pv_fds:
            os.close(fd)
        os.close(self._zero)
        self.store.close()

    def describe(self) -> str:
        return f"linear {len(self.pv_fds)} PVs, extent {self.extent}"


def _split_args(args: str) -> tuple[list[str], dict[str, list[str]]]:
    positional: list[str] = []
    named: dict[str, list[str]] = {}
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if sep and key.isidentifier():
            named.setdefault(key, []).append(value)
        else:
            positional.append(item)
    return positional, named


def make_target(spec: str, read_only: bool = False) -> Target:
    """Build a target from ``KIND:ARGS``.

    ``null:size=1G`` | ``loop:PATH[,size=S]`` |
    ``mirror:PATH,PATH[,...][,size=S][,state=DB][,region=S]`` |
    ``linear:DB[,pv=PATH]...[,size=S][,extent=S]`` (the PVs, size and extent size are
    recorded in the database the first time and read back afterwards).
    """
    kind, _, args = spec.partition(":")
    pos, named = _split_args(args)
    size = parse_size(named["size"][-1]) if "size" in named else None
    target: Target
    if kind == "null":
        target = NullTarget(size if size is not None else parse_size(pos[0] if pos else "1G"))
    elif kind == "loop":
        path = named.get("path", pos)[0] if (pos or "path" in named) else ""
        if not path:
            raise ValueError("loop needs a backing file: loop:PATH")
        target = LoopTarget(path, size, read_only)
    elif kind == "mirror":
        paths = pos + named.get("replica", [])
        target = MirrorTarget(
            paths,
            size,
            state=named["state"][-1] if "state" in named else None,
            region=parse_size(named["region"][-1]) if "region" in named else None,
        )
    elif kind == "linear":
        db = named.get("db", pos)[0] if (pos or "db" in named) else ""
        if not db:
            raise ValueError("linear needs a mapping database: linear:DB,pv=FILE,...")
        store = SqliteMappingStore(
            db,
            pv_paths=named.get("pv", pos[1:]),
            size=size,
            extent_size=parse_size(named["extent"][-1]) if "extent" in named else None,
        )
        target = LinearTarget(store)
    else:
        raise ValueError(f"unknown target {kind!r} (null, loop, mirror, linear)")
    target.read_only = read_only
    return target
