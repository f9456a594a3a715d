"""Request buffers for the block layer side: bounded, carved from a few big mappings.

The front end takes one buffer per READ/WRITE request, receives WRITE payloads
straight into it, lends it (through the device) to the target's fused commands, and
sends READ replies from it.  :attr:`RequestBuffers.outstanding` is the leak counter
the tests check.

Requests that fit a slot of the ring's registered :class:`aiofused.BufferPool` get one
(lent as the :class:`PoolBuffer`, so the secondaries run as fixed-buffer ops on the
kernel backend).  Bigger requests, or any request while that pool is empty, get a slot
of a *chunk*.

Theory of operation (memory bound, buffer lifetime): a chunk is one anonymous mapping
of :data:`CHUNK` bytes (the largest request), carved into equal slots of one power-of-
two size class while any slot is in use; once its last slot is back it is idle and
may be carved for any class.  At most ``max_bytes`` of chunks are ever mapped, so the
number of mappings is bounded (never one per request: a flood of requests cannot
reach ``vm.max_map_count``), and :meth:`RequestBuffers.acquire` returns ``None`` when
the budget is spent: the caller waits for a :meth:`~RequestBuffers.release` (the
``on_release`` callbacks say when).  Idle chunks beyond ``keep_bytes`` give their
pages back (``MADV_DONTNEED``) but stay mapped.  A slot is reused only after its
buffer was released, which the front end does only once the request ended (every
fused command on it completed) and its reply was sent; a buffer whose view is still
exported when released is never reused (its chunk stays carved).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable
from typing import Any

from aiofused.driver import BufferPool, PoolBuffer

__all__ = ["CHUNK", "ReqBuf", "RequestBuffers"]

_MIN_CLASS = 12  # 4 KiB
_MAX_CLASS = 25  # 32 MiB
#: Bytes of one chunk mapping: the largest request buffer.
CHUNK = 1 << _MAX_CLASS
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class _Chunk:
    """One mapping; ``cls`` is the size class it is carved for (0: idle)."""

    __slots__ = ("base", "cls", "free", "fresh", "mem", "resident", "used")

    def __init__(self) -> None:
        self.mem = mmap.mmap(-1, CHUNK, flags=_MAP_FLAGS)
        # Safety: slot views are slices of ``base``; the mapping is closed only in
        # RequestBuffers.clear(), when no buffer is out.
        self.base = memoryview(self.mem)
        self.cls = 0
        self.free: list[int] = []
        self.fresh = 0
        self.used = 0
        self.resident = False

    def room(self) -> bool:
        return bool(self.free) or self.fresh < CHUNK


class ReqBuf:
    """One buffer: ``view`` is a writable memoryview of exactly the requested size;
    ``lend`` what the driver lends (the registered pool slot, or ``view``)."""

    __slots__ = ("chunk", "cls", "lend", "nbytes", "offset", "pooled", "view")

    def __init__(
        self,
        view: memoryview,
        cls: int,
        nbytes: int,
        pooled: PoolBuffer | None = None,
        chunk: _Chunk | None = None,
        offset: int = 0,
    ) -> None:
        self.view = view
        self.cls = cls
        self.nbytes = nbytes
        self.pooled = pooled
        self.chunk = chunk
        self.offset = offset
        self.lend: Any = pooled if pooled is not None else view


class RequestBuffers:
    """Request buffers of 1 byte to 32 MiB, from the registered ``pool`` when they fit,
    else from at most ``max_bytes`` of chunks (see the module doc)."""

    def __init__(
        self,
        keep_bytes: int = 64 << 20,
        pool: BufferPool | None = None,
        max_bytes: int = 1 << 30,
    ) -> None:
        if max_bytes < CHUNK:
            raise ValueError(f"max_bytes must be at least {CHUNK} (one largest request)")
        self.keep_bytes = keep_bytes
        self.max_bytes = max_bytes
        self.pool = pool
        self._pool_size = pool.size if pool is not None else 0
        self._chunks: list[_Chunk] = []
        #: Per class, the carved chunks with a free slot.
        self._avail: list[list[_Chunk]] = [[] for _ in range(_MAX_CLASS + 1)]
        self._idle: list[_Chunk] = []
        #: Called (no arguments) after a buffer went back, for callers that got None.
        self.on_release: list[Callable[[], None]] = []
        self.outstanding = 0
        #: Buffers never reused because their view was still exported when released.
        self.pinned = 0

    @property
    def mapped(self) -> int:
        """Bytes of chunk mappings (the bound is ``max_bytes``)."""
        return len(self._chunks) * CHUNK

    def acquire(self, nbytes: int) -> ReqBuf | None:
        """A buffer of ``nbytes``, or ``None`` while ``max_bytes`` are in use (retry
        after a release).  ``ValueError`` above 32 MiB or below 1 byte."""
        if nbytes <= self._pool_size:
            assert self.pool is not None
            pb = self.pool.try_acquire()
            if pb is not None:
                self.outstanding += 1
                return ReqBuf(pb.view[:nbytes], 0, nbytes, pb)
        if not 0 < nbytes <= CHUNK:
            raise ValueError(f"request buffer of {nbytes} bytes (1 to {CHUNK})")
        cls = max(_MIN_CLASS, (nbytes - 1).bit_length())
        avail = self._avail[cls]
        if avail:
            chunk = avail[-1]
        else:
            found = self._carve(cls)
            if found is None:
                return None
            chunk = found
        if chunk.free:
            off = chunk.free.pop()
        else:
            off = chunk.fresh
            chunk.fresh += 1 << cls
        chunk.used += 1
        if not chunk.room():
            avail.pop()
        self.outstanding += 1
        return ReqBuf(chunk.base[off : off + nbytes], cls, nbytes, None, chunk, off)

    def _carve(self, cls: int) -> _Chunk | None:
        if self._idle:
            chunk = self._idle.pop()
        elif len(self._chunks) * CHUNK + CHUNK <= self.max_bytes:
            chunk = _Chunk()
            self._chunks.append(chunk)
        else:
            return None
        chunk.cls = cls
        chunk.free.clear()
        chunk.fresh = 0
        chunk.resident = True
        self._avail[cls].append(chunk)
        return chunk

    def release(self, buf: ReqBuf) -> None:
        """Give ``buf`` back (once its request ended and its reply was sent)."""
        self.outstanding -= 1
        view = buf.view
        try:
            view.release()
        except BufferError:  # still exported somewhere: never reuse that memory
            self.pinned += 1
            buf.pooled = buf.chunk = None
            self._released()
            return
        buf.lend = None
        if buf.pooled is not None:
            buf.pooled.release()
            buf.pooled = None
        else:
            chunk = buf.chunk
            assert chunk is not None
            buf.chunk = None
            had_room = chunk.room()
            chunk.used -= 1
            if chunk.used == 0:
                self._to_idle(chunk, had_room)
            else:
                chunk.free.append(buf.offset)
                if not had_room:
                    self._avail[chunk.cls].append(chunk)
        self._released()

    def _to_idle(self, chunk: _Chunk, listed: bool) -> None:
        if listed:
            self._avail[chunk.cls].remove(chunk)
        chunk.cls = 0
        self._idle.append(chunk)
        extra = len(self._idle) - self.keep_bytes // CHUNK
        if extra > 0 and _DONTNEED is not None:
            # The least recently used idle chunks give their pages back; the mappings
            # stay (address space only).  _carve takes the most recent first.
            for old in self._idle[:extra]:
                if old.resident:
                    old.mem.madvise(_DONTNEED)
                    old.resident = False

    def _released(self) -> None:
        for cb in self.on_release:
            cb()

    def clear(self) -> None:
        """Unmap the idle chunks (every chunk, once no buffer is out)."""
        keep = []
        for chunk in self._chunks:
            if chunk.used:
                keep.append(chunk)
                continue
            chunk.base.release()
            with contextlib.suppress(BufferError):  # a stray slice alive: the GC unmaps
                chunk.mem.close()
        self._chunks = keep
        self._idle.clear()
        for avail in self._avail:
            avail[:] = [c for c in avail if c.used]
