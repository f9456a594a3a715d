"""BufferPool, registered buffers (READ_FIXED/WRITE_FIXED) and fused commands lending a
registered pool buffer, on every backend."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest
from conftest import EFAULT, add, reap

from aiofused import EIOCBQUEUED, BufferPool, PoolBuffer, Ring, UringCmd


async def test_pool_bounds_and_backpressure() -> None:
    """acquire waits while empty; release wakes one waiter; misuse raises."""
    pool = BufferPool(2, 1000)
    a = await pool.acquire()
    b = pool.try_acquire()
    assert b is not None and pool.try_acquire() is None and pool.available == 0
    assert a.view.nbytes == 1000 and not a.view.readonly
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    pool.release(a)
    c = await asyncio.wait_for(waiter, 1)
    assert c is a
    with pytest.raises(ValueError):
        pool.release(a := PoolBuffer(BufferPool(1, 8), 0, memoryview(bytearray(8))))
    with pytest.raises(RuntimeError):
        pool.close()
    pool.release(b)  # type: ignore[arg-type]
    pool.release(c)
    with pytest.raises(ValueError):
        pool.release(c)
    pool.close()
    a.pool.close()


async def test_read_write_fixed(ring: Ring, data_file: Any, tmp_path: Any) -> None:
    """READ_FIXED/WRITE_FIXED on registered buffers; bad index or range -> -EFAULT;
    registering twice -> EBUSY."""
    fd, content = data_file
    pool = BufferPool(4, 8192)
    try:
        ring.register_buffers(pool)
        with pytest.raises(OSError) as info:
            ring.register_buffers(pool)
        assert info.value.errno == errno.EBUSY
        add(ring, 1, "read_fixed", fd, 100, 4096, 0, buf_index=2)
        add(ring, 2, "read_fixed", fd, 0, 4096, 0, buf_index=9)
        add(ring, 3, "read_fixed", fd, 8000, 4096, 0, buf_index=0)
        ring.submit()
        assert sorted(await reap(ring, 3)) == [(1, 4096), (2, EFAULT), (3, EFAULT)]
        assert bytes(pool.views()[2][100:4196]) == content[:4096]
        out = os.open(tmp_path / "o", os.O_CREAT | os.O_RDWR)
        try:
            add(ring, 4, "write_fixed", out, 100, 4096, 0, buf_index=2)
            ring.submit()
            assert await reap(ring, 1) == [(4, 4096)]
            assert os.pread(out, 4096, 0) == content[:4096]
        finally:
            os.close(out)
    finally:
        await ring.close()
        pool.close()


class PoolLender:
    """Lends a buffer taken from a registered pool; gives it back on completion."""

    name = "pool-lender"
    can_fused = True

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.last: PoolBuffer | None = None

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        buf = self.pool.try_acquire()
        if buf is None:
            return -errno.EBUSY
        self.last = buf

        def returned(c: UringCmd) -> None:
            c.done(sum(c.secondary_results))
            self.pool.release(buf)

        cmd.provide_buf_and_start(buf, returned)
        return EIOCBQUEUED


async def test_fused_secondaries_on_registered_pool_buffer(ring: Ring, data_file: Any) -> None:
    """A primary lending a registered pool buffer: its READ secondaries land in the slot
    (as fixed ops on the kernel backend); the slot is back in the pool afterwards."""
    fd, content = data_file
    pool = BufferPool(2, 16384)
    try:
        ring.register_buffers(pool)
        drv = PoolLender(pool)
        df = ring.register_driver(drv)
        async with ring.fused(df, 0) as lease:
            got = await asyncio.gather(
                *(lease.read(fd, i * 4096, i * 4096, 4096) for i in range(4))
            )
        assert got == [4096] * 4 and lease.result == 16384
        assert drv.last is not None and bytes(drv.last.view) == content[:16384]
        assert pool.available == 2
    finally:
        await ring.close()
        pool.close()
