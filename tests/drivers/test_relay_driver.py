"""The relay driver on its own: RELAY_RECV lends received bytes to SEND secondaries."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from aiofused import BufDir, Ring, SetupFlag
from aiofused.backend import get_backend_class
from aiofused_drivers.relay import RELAY_RECV, RelayDriver, RelayPool


def _backends() -> list[object]:
    params: list[object] = ["asyncio"]
    try:
        probe = get_backend_class("uring").probe()
        reason = probe.reason
        ok = probe.available
    except ImportError as exc:
        ok, reason = False, f"not importable: {exc}"
    params.append(
        pytest.param("uring", marks=pytest.mark.skipif(not ok, reason=f"uring backend: {reason}"))
    )
    return params


@pytest.fixture(params=_backends())
async def ring(request: pytest.FixtureRequest) -> AsyncIterator[Ring]:
    async with Ring(64, flags=SetupFlag.FUSED_REQ, backend=request.param) as r:
        yield r


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (resets behave as on a real network)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(10):
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            if not chunk:
                break
            out += chunk
    return bytes(out)


class _Setup:
    """A relay driver on ``ring`` with one attached channel fed by ``self.src``."""

    def __init__(self, ring: Ring, buffer_size: int, pool_size: int) -> None:
        self.ring = ring
        self.driver = RelayDriver(buffer_size=buffer_size, pool_size=pool_size)
        self.file = ring.register_driver(self.driver)
        self.src, peer = _pair()
        self._peer = peer
        self.socks: list[socket.socket] = [self.src]

    async def __aenter__(self) -> _Setup:
        self.chan = await self.driver.attach(self._peer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.chan.close()
        for s in self.socks:
            s.close()
        await asyncio.sleep(0)
        self.ring.unregister_driver(self.file)
        assert self.driver.pool.available == self.driver.pool.size, "a relay buffer leaked"
        self.driver.close_pool()

    def dest(self) -> tuple[socket.socket, socket.socket]:
        a, b = _pair()
        self.socks += [a, b]
        return a, b

    def fused(self) -> object:
        return self.ring.fused(self.file, RELAY_RECV, cmd=self.chan.cmd, buf_dir=BufDir.SRC)


async def test_lends_received_bytes_to_every_send(ring: Ring) -> None:
    async with _Setup(ring, buffer_size=64 * 1024, pool_size=4) as t:
        (d1, r1), (d2, r2) = t.dest(), t.dest()
        payload = os.urandom(3000)
        t.src.send(payload)
        async with t.fused() as lease:  # type: ignore[attr-defined]
            n = len(lease.buffer)
            assert lease.buffer.readonly
            assert bytes(lease.buffer) == payload[:n]
            results = await asyncio.gather(lease.send(d1, 0, n), lease.send(d2, 0, n))
        assert list(results) == [n, n]
        assert lease.result == n
        assert await _read_exactly(r1, n) == payload[:n]
        assert await _read_exactly(r2, n) == payload[:n]


async def test_parked_command_lends_when_bytes_arrive(ring: Ring) -> None:
    async with _Setup(ring, buffer_size=4096, pool_size=4) as t:
        d, r = t.dest()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, t.src.send, b"late bytes")
        async with asyncio.timeout(5), t.fused() as lease:  # type: ignore[attr-defined]
            assert bytes(lease.buffer) == b"late bytes"
            await lease.send(d, 0, len(lease.buffer))
        assert await _read_exactly(r, 10) == b"late bytes"


async def test_stream_round_trip_and_eof(ring: Ring) -> None:
    """Many commands in a row carry a multi-MiB stream intact; EOF completes with 0."""
    async with _Setup(ring, buffer_size=16 * 1024, pool_size=4) as t:
        d, r = t.dest()
        payload = os.urandom(3 * 1024 * 1024 + 17)
        loop = asyncio.get_running_loop()

        async def feed() -> None:
            await loop.sock_sendall(t.src, payload)
            t.src.shutdown(socket.SHUT_WR)

        async def drain() -> bytes:
            return await _read_exactly(r, len(payload))

        feeder = asyncio.create_task(feed())
        reader = asyncio.create_task(drain())
        total = 0
        async with asyncio.timeout(30):
            while True:
                async with t.fused() as lease:  # type: ignore[attr-defined]
                    n = len(lease.buffer)
                    sent = 0
                    while sent < n:
                        sent += await lease.send(d, sent, n - sent)
                if lease.result == 0:
                    break
                assert lease.result == n
                total += n
                assert t.driver.pool.size - t.driver.pool.available <= 2
        await feeder
        assert total == len(payload)
        assert hashlib.sha256(await reader).digest() == hashlib.sha256(payload).digest()
        # After EOF every further command completes with 0 without lending.
        async with t.fused() as lease:  # type: ignore[attr-defined]
            assert not lease.lent
            assert len(lease.buffer) == 0
        assert lease.result == 0


async def test_peer_reset_fails_the_command(ring: Ring) -> None:
    async with _Setup(ring, buffer_size=4096, pool_size=4) as t:
        t.src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, t.src.close)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5), t.fused():  # type: ignore[attr-defined]
                pass
        t.socks.remove(t.src)


async def test_cancelled_parked_command_frees_everything(ring: Ring) -> None:
    async with _Setup(ring, buffer_size=4096, pool_size=4) as t:
        d, r = t.dest()

        async def wait_forever() -> None:
            async with t.fused():  # type: ignore[attr-defined]
                pass

        task = asyncio.create_task(wait_forever())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The channel still works afterwards.
        t.src.send(b"after cancel")
        async with asyncio.timeout(5), t.fused() as lease:  # type: ignore[attr-defined]
            await lease.send(d, 0, len(lease.buffer))
        assert await _read_exactly(r, 12) == b"after cancel"


async def test_full_buffer_pauses_the_source(ring: Ring) -> None:
    """With no command pending, bytes coalesce into one buffer, then reading pauses."""
    async with _Setup(ring, buffer_size=4096, pool_size=4) as t:
        t.src.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        written = 0
        chunk = b"z" * 4096
        for _ in range(4096):  # bounded: stops at the first EAGAIN
            try:
                written += t.src.send(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                try:
                    written += t.src.send(chunk)
                except BlockingIOError:
                    break
        assert written < 4 * 1024 * 1024, "the source was never slowed down"
        assert t.driver.pool.size - t.driver.pool.available == 1
        d, r = t.dest()
        async with t.fused() as lease:  # type: ignore[attr-defined]
            assert len(lease.buffer) == 4096  # coalesced into one full buffer
            await lease.send(d, 0, 4096)
        assert await _read_exactly(r, 4096) == chunk


async def test_tiny_pool_serves_channels_in_turn(ring: Ring) -> None:
    """Two channels share a two-buffer pool: a lend waits for a returned buffer."""
    driver = RelayDriver(buffer_size=1024, pool_size=2)
    rf = ring.register_driver(driver)
    socks = []
    chans = []
    for _ in range(2):
        a, b = _pair()
        socks.append(a)
        chans.append(await driver.attach(b))
    dests = [_pair() for _ in range(2)]
    payloads = [os.urandom(64 * 1024), os.urandom(64 * 1024)]
    loop = asyncio.get_running_loop()

    async def pump(i: int) -> None:
        got = 0
        while got < len(payloads[i]):
            async with ring.fused(rf, RELAY_RECV, cmd=chans[i].cmd, buf_dir=BufDir.SRC) as lease:
                n = len(lease.buffer)
                sent = 0
                while sent < n:
                    sent += await lease.send(dests[i][0], sent, n - sent)
            got += n

    try:
        async with asyncio.timeout(30):
            feeds = [loop.sock_sendall(socks[i], payloads[i]) for i in range(2)]
            reads = [_read_exactly(dests[i][1], len(payloads[i])) for i in range(2)]
            out = await asyncio.gather(pump(0), pump(1), *feeds, *reads)
        assert out[4:] == payloads
    finally:
        for c in chans:
            c.close()
        for s in socks + [s for pair in dests for s in pair]:
            s.close()
        await asyncio.sleep(0)
        ring.unregister_driver(rf)
    assert driver.pool.available == 2
    driver.close_pool()


async def test_rejects_misuse(ring: Ring) -> None:
    async with _Setup(ring, buffer_size=4096, pool_size=4) as t:
        with pytest.raises(OSError) as info:
            async with ring.fused(t.file, RELAY_RECV, cmd=t.chan.cmd, buf_dir=BufDir.DEST):
                pass
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            async with ring.fused(t.file, 99, cmd=t.chan.cmd, buf_dir=BufDir.SRC):
                pass
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            async with ring.fused(t.file, RELAY_RECV, cmd=b"\x00" * 8, buf_dir=BufDir.SRC):
                pass
        assert info.value.errno == errno.EBADF

        async def first() -> None:
            async with t.fused():  # type: ignore[attr-defined]
                pass

        task = asyncio.create_task(first())
        await asyncio.sleep(0.02)
        with pytest.raises(OSError) as info:
            async with t.fused():  # type: ignore[attr-defined]
                pass
        assert info.value.errno == errno.EBUSY
        t.src.send(b"x")
        await asyncio.wait_for(task, 5)


async def test_pool_bounds() -> None:
    pool = RelayPool(buffer_size=5000, count=3)
    bufs = [pool.acquire() for _ in range(3)]
    assert pool.acquire() is None
    assert all(b is not None and len(b) == 5000 and not b.readonly for b in bufs)
    with pytest.raises(RuntimeError):
        pool.close()
    for b in bufs:
        assert b is not None
        pool.release(b)
    pool.close()
    with pytest.raises(ValueError):
        RelayPool(buffer_size=0)


async def test_entry_point_loads_the_driver(ring: Ring) -> None:
    df = ring.open_driver("relay", buffer_size=4096, pool_size=2)
    try:
        assert isinstance(df.driver, RelayDriver)
        assert df.driver.pool.buffer_size == 4096
        assert df.driver.can_fused
    finally:
        ring.unregister_driver(df)
        df.driver.close_pool()  # type: ignore[attr-defined]
