"""A bounded pool of equal, page-aligned buffers carved from one anonymous mapping.

Theory of operation
-------------------
One ``mmap`` holds ``count`` slots of ``size`` bytes, each starting on a page
boundary; pages are touched only when used, and slots are reused last-in-first-out,
so a large pool costs address space, and memory only for its peak concurrency.
:meth:`BufferPool.acquire` waits while the pool is empty, which is how a producer
feels backpressure: memory is bounded by the pool, never by the traffic.

Registered with a ring (:meth:`Ring.register_buffers`), slot ``i`` is the kernel's
fixed buffer ``i``: READ_FIXED/WRITE_FIXED name it by ``buf_index``, and the
secondaries of a primary that lends a :class:`PoolBuffer` run as fixed ops on the
kernel backend.  A buffer is lent or owned by exactly one holder at a time; release
it only after the command that lent it completed (SPEC F11).
"""

from __future__ import annotations

import asyncio
import collections
import mmap

from mypy_extensions import mypyc_attr

__all__ = ["BufferPool", "PoolBuffer"]


@mypyc_attr(allow_interpreted_subclasses=True)
class PoolBuffer:
    """One slot: ``view`` is a writable memoryview of ``size`` bytes, ``index`` its slot."""

    __slots__ = ("_held", "index", "pool", "view")

    def __init__(self, pool: BufferPool, index: int, view: memoryview) -> None:
        self.pool = pool
        self.index = index
        self.view = view
        self._held = False

    def __buffer__(self, flags: int) -> memoryview:  # PEP 688 (3.12+); 3.11 uses .view
        return self.view

    def release(self) -> None:
        """Give the buffer back to its pool."""
        self.pool.release(self)

    def __repr__(self) -> str:
        return f"<PoolBuffer {self.index} of {self.pool!r}>"


@mypyc_attr(allow_interpreted_subclasses=True)
class BufferPool:
    """``count`` page-aligned buffers of ``size`` bytes; ``acquire`` waits when empty."""

    def __init__(self, count: int, size: int) -> None:
        if count <= 0 or size <= 0:
            raise ValueError("count and size must be positive")
        page = mmap.PAGESIZE
        self.size = size
        self.count = count
        stride = -(-size // page) * page
        # MAP_NORESERVE: a big pool costs address space; pages are touched only when used.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, stride * count, flags=flags)
        whole = memoryview(self._map)
        # Safety: each slot view keeps ``whole`` (and the mapping) alive; close() releases
        # them only when every buffer is back in the pool.
        self._whole = whole
        self._slots = [
            PoolBuffer(self, i, whole[i * stride : i * stride + size]) for i in range(count)
        ]
        self._free: list[PoolBuffer] = list(reversed(self._slots))
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def __repr__(self) -> str:
        return f"<BufferPool {self.available}/{self.count} free x {self.size} B>"

    @property
    def available(self) -> int:
        """Buffers in the pool now."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Buffers taken and not yet released."""
        return self.count - len(self._free)

    def views(self) -> list[memoryview]:
        """Every slot's view, in index order (what a ring registers)."""
        return [b.view for b in self._slots]

    def try_acquire(self) -> PoolBuffer | None:
        """Take a buffer, or None if the pool is empty."""
        if self._closed:
            raise RuntimeError("pool is closed")
        if not self._free:
            return None
        buf = self._free.pop()  # LIFO: the most recently used (warm, resident) slot first
        buf._held = True
        return buf

    async def acquire(self) -> PoolBuffer:
        """Take a buffer, waiting while the pool is empty (backpressure)."""
        while True:
            buf = self.try_acquire()
            if buf is not None:
                return buf
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake()  # pass the wake-up on
                raise

    def release(self, buf: PoolBuffer) -> None:
        """Give ``buf`` back; releasing twice or to the wrong pool raises ValueError."""
        if buf.pool is not self or not buf._held:
            raise ValueError(f"{buf!r} is not held from this pool")
        buf._held = False
        self._free.append(buf)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close(self) -> None:
        """Unmap the pool; every buffer must be back (RuntimeError otherwise)."""
        if self._closed:
            return
        if self.in_use:
            raise RuntimeError(f"{self.in_use} pool buffers are still in use")
        self._closed = True
        for b in self._slots:
            b.view.release()
        self._whole.release()
        self._map.close()
