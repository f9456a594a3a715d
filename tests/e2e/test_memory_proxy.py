"""The proxy frees its connections and chunks by reference counting alone.

Like ``test_memory.py`` for the ring: each test relays traffic over loopback with the
GC disabled, then asks the GC what it would have to free.  Per chunk, a fused command
(request, primary, command, scope, lease) must not be left in a cycle; per connection,
neither must the connection, its channels and mirrors, nor the objects a failed or
cancelled pump's exception reaches through its traceback (the ``_pump`` frame).
The default loop's own transports are in a cycle of the standard library
(``_SelectorSocketTransport._read_ready_cb``), so only aiofused's types are checked.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from conftest import cyclic_garbage

from aiofused import FusedScope, Lease
from aiofused._core.records import Req
from aiofused_drivers.relay import RelayChannel
from aiofused_drivers.relay.proxy import Endpoint, ProxyConfig, ProxyServer, _Connection, _Mirror

_CHUNK_TYPES = (Req, FusedScope, Lease)
_CONNECTION_TYPES = (_Connection, _Mirror, RelayChannel)
_RUNTIME_TYPES = _CHUNK_TYPES + _CONNECTION_TYPES
_RESET = struct.pack("ii", 1, 0)


def cyclic_runtime_garbage() -> list[str]:
    """Names of the runtime objects only the cyclic GC could free right now."""
    return cyclic_garbage(_RUNTIME_TYPES)


def live_connections() -> list[str]:
    """Connection objects still alive (without collecting): none once all are closed."""
    return [type(o).__name__ for o in gc.get_objects() if isinstance(o, _CONNECTION_TYPES)]


# ---- loopback peers ----------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    """Echoes; closes at end of stream.  ``reset``: RST at the first byte."""

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.reset:
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, _RESET
            )
            self.transport.abort()
        else:
            self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echoed bytes are out (FIN)


@asynccontextmanager
async def upstream(reset: bool = False) -> AsyncIterator[Endpoint]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(reset), "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def proxy(
    ring_backend: str, up: Endpoint, mirrors: tuple[Endpoint, ...] = (), **options: Any
) -> AsyncIterator[ProxyServer]:
    config = ProxyConfig(
        listen=Endpoint("127.0.0.1", 0),
        upstream=up,
        mirrors=mirrors,
        max_connections=16,
        buffer_size=16 * 1024,
        backend=ring_backend,
        **options,
    )
    async with ProxyServer(config) as server:
        yield server
        async with asyncio.timeout(5):
            while server.stats.connections_active:
                await asyncio.sleep(0.005)
        assert server.pool.available == server.pool.size


async def _connect(server: ProxyServer) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(sock, server.address)
    return sock


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def _drain_to_eof(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    total = 0
    for _ in range(10_000):
        try:
            chunk = await loop.sock_recv(sock, 64 * 1024)
        except ConnectionResetError:
            break
        if not chunk:
            break
        total += len(chunk)
    return total


async def round_trips(server: ProxyServer, count: int, size: int = 64) -> None:
    """``count`` request/response exchanges of ``size`` bytes on one connection."""
    loop = asyncio.get_running_loop()
    sock = await _connect(server)
    try:
        for i in range(count):
            msg = bytes([i % 251]) * size
            await loop.sock_sendall(sock, msg)
            assert await _recv_exactly(sock, size) == msg
        sock.shutdown(socket.SHUT_WR)
        assert await _drain_to_eof(sock) == 0
    finally:
        sock.close()


async def bulk(server: ProxyServer, size: int) -> None:
    """Stream ``size`` bytes through the echo and read them all back."""
    loop = asyncio.get_running_loop()
    sock = await _connect(server)
    try:
        block = bytes(range(256)) * 256

        async def send() -> None:
            for _ in range(size // len(block)):
                await loop.sock_sendall(sock, block)
            sock.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(send())
        assert await _drain_to_eof(sock) == size
        await sender
    finally:
        sock.close()


async def _settle(server: ProxyServer) -> None:
    async with asyncio.timeout(5):
        while server.stats.connections_active:
            await asyncio.sleep(0.005)


# ---- tests -------------------------------------------------------------------------------


async def test_round_trips_and_bulk_leave_no_cycles(no_gc: None, ring_backend: str) -> None:
    """Hundreds of chunks (request/response and bulk) leave nothing cyclic behind."""
    async with upstream() as up, proxy(ring_backend, up) as server:
        await asyncio.gather(*(round_trips(server, 50) for _ in range(4)), bulk(server, 1 << 20))
        await _settle(server)
        assert server.stats.chunks >= 400
        assert cyclic_runtime_garbage() == []
        assert live_connections() == []


async def test_mirrored_connections_leave_no_cycles(no_gc: None, ring_backend: str) -> None:
    """A mirror must not keep its connection in a cycle (mirror <-> connection)."""
    async with upstream() as up, upstream() as mirror, proxy(ring_backend, up, (mirror,)) as server:
        await asyncio.gather(*(round_trips(server, 20) for _ in range(3)))
        await _settle(server)
        assert server.stats.mirror_bytes == 3 * 20 * 64
        assert cyclic_runtime_garbage() == []
        assert live_connections() == []


async def test_reset_connections_leave_no_cycles(no_gc: None, ring_backend: str) -> None:
    """A pump that fails keeps its exception; its traceback must not lead back to it."""
    loop = asyncio.get_running_loop()
    async with upstream(reset=True) as up, proxy(ring_backend, up) as server:
        for _ in range(3):
            sock = await _connect(server)
            try:
                await loop.sock_sendall(sock, b"ping")
                await _drain_to_eof(sock)
            finally:
                sock.close()
        await _settle(server)
        assert server.stats.resets == 3
        assert cyclic_runtime_garbage() == []
        assert live_connections() == []


async def test_idle_timeouts_leave_no_cycles(no_gc: None, ring_backend: str) -> None:
    """Pumps cancelled by the idle timer (CancelledError in their tasks) leave no cycle."""
    loop = asyncio.get_running_loop()
    async with upstream() as up, proxy(ring_backend, up, idle_timeout=0.05) as server:
        socks = [await _connect(server) for _ in range(3)]
        try:
            for sock in socks:
                await loop.sock_sendall(sock, b"ping")
                assert await _recv_exactly(sock, 4) == b"ping"
            for sock in socks:
                await _drain_to_eof(sock)
        finally:
            for sock in socks:
                sock.close()
        await _settle(server)
        assert server.stats.idle_timeouts == 3
        assert cyclic_runtime_garbage() == []
        assert live_connections() == []


async def test_shutdown_with_open_connections_leaves_no_cycles(
    no_gc: None, ring_backend: str
) -> None:
    """Closing the proxy cancels open connections mid-lease: nothing cyclic remains."""
    loop = asyncio.get_running_loop()
    async with upstream() as up, upstream() as mirror:
        config = ProxyConfig(
            listen=Endpoint("127.0.0.1", 0),
            upstream=up,
            mirrors=(mirror,),
            max_connections=16,
            buffer_size=16 * 1024,
            backend=ring_backend,
        )
        server = ProxyServer(config)
        await server.start()
        socks = [await _connect(server) for _ in range(3)]
        try:
            for sock in socks:
                await loop.sock_sendall(sock, b"ping")
                assert await _recv_exactly(sock, 4) == b"ping"
            await server.aclose(timeout=0)
            assert server.stats.connections_active == 0
        finally:
            for sock in socks:
                sock.close()
        assert server.pool.available == server.pool.size
        del server
        assert cyclic_runtime_garbage() == []
        assert live_connections() == []
