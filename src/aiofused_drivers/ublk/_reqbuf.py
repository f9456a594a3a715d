"""Request buffers for the block layer side: page-aligned, recycled per size class.

The front end takes one buffer per READ/WRITE request, receives WRITE payloads
straight into it, lends it (through the device) to the target's fused commands, and
sends READ replies from it.  :attr:`RequestBuffers.outstanding` is the leak counter
the tests check.

Requests that fit a slot of the ring's registered :class:`aiofused.BufferPool` get one
(lent as the :class:`PoolBuffer`, so the secondaries run as fixed-buffer ops on the
kernel backend); bigger requests, or any request while the pool is empty, get a
page-aligned buffer from the size-class cache.
"""

from __future__ import annotations

import mmap
from typing import Any

from aiofused.driver import BufferPool, PoolBuffer

__all__ = ["ReqBuf", "RequestBuffers"]

_MIN_CLASS = 12  # 4 KiB
_MAX_CLASS = 25  # 32 MiB


class ReqBuf:
    """One buffer: ``view`` is a writable memoryview of exactly the requested size."""

    __slots__ = ("_mem", "cls", "lend", "pooled", "view")

    def __init__(self, mem: Any, cls: int, nbytes: int, pooled: PoolBuffer | None = None) -> None:
        self._mem = mem
        self.cls = cls
        self.view = memoryview(mem)[:nbytes]
        self.pooled = pooled
        #: What the driver lends: the pool slot (fixed-buffer secondaries) or the view.
        self.lend: Any = pooled if pooled is not None else self.view


class RequestBuffers:
    """Power-of-two size classes from 4 KiB to 32 MiB; keeps up to ``keep_bytes`` free.

    ``allocator(nbytes)`` returns the backing memory of a new buffer (default: an
    anonymous ``mmap``, page aligned); a ring's registered pool can be plugged in.
    """

    def __init__(
        self, keep_bytes: int = 256 << 20, allocator: Any = None, pool: BufferPool | None = None
    ) -> None:
        self.keep_bytes = keep_bytes
        self.pool = pool
        self._pool_size = pool.size if pool is not None else 0
        self._alloc = allocator or (lambda n: mmap.mmap(-1, n))
        self._free: list[list[Any]] = [[] for _ in range(_MAX_CLASS + 1)]
        self._kept = 0
        self.outstanding = 0

    def acquire(self, nbytes: int) -> ReqBuf:
        if nbytes <= self._pool_size:
            assert self.pool is not None
            pb = self.pool.try_acquire()
            if pb is not None:
                self.outstanding += 1
                return ReqBuf(pb.view, 0, nbytes, pb)
        cls = max(_MIN_CLASS, (nbytes - 1).bit_length())
        if cls > _MAX_CLASS:
            raise ValueError(f"request buffer of {nbytes} bytes is too large")
        free = self._free[cls]
        if free:
            mem = free.pop()
            self._kept -= 1 << cls
        else:
            mem = self._alloc(1 << cls)
        self.outstanding += 1
        return ReqBuf(mem, cls, nbytes)

    def release(self, buf: ReqBuf) -> None:
        self.outstanding -= 1
        if buf.pooled is not None:
            buf.view.release()
            buf.pooled.release()
            buf.pooled = None
            buf.lend = None
            return
        try:
            buf.view.release()
        except BufferError:  # someone still exports it: drop the memory instead
            buf._mem = None
            return
        size = 1 << buf.cls
        if self._kept + size <= self.keep_bytes:
            self._free[buf.cls].append(buf._mem)
            self._kept += size
        buf._mem = None

    def clear(self) -> None:
        """Drop the cached free buffers."""
        for free in self._free:
            for mem in free:
                if isinstance(mem, mmap.mmap):
                    mem.close()
            free.clear()
        self._kept = 0
