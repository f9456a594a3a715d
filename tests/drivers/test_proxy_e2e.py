"""The mirroring proxy end to end, in process, on real loopback sockets.

Upstreams and mirrors here are small asyncio servers in the test's own loop: an echo
server, a sink that answers with the sha256 of what it read, a mirror that never reads
and one that resets.  After every test: every connection closed, the pool full, no
task left behind, no fd left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from aiofused.backend import get_backend_class
from aiofused_drivers.relay.proxy import Endpoint, ProxyConfig, ProxyServer

# ---- harness -----------------------------------------------------------------------------


def _uring_skip() -> Any:
    try:
        probe = get_backend_class("uring").probe()
        ok, reason = probe.available, probe.reason
    except ImportError as exc:
        ok, reason = False, f"not importable: {exc}"
    return pytest.mark.skipif(not ok, reason=f"uring backend: {reason}")


BACKENDS = ["asyncio", pytest.param("uring", marks=_uring_skip())]
_backend = {"name": "auto"}


@pytest.fixture(autouse=True, params=BACKENDS)
def ring_backend_for_proxies(request: pytest.FixtureRequest) -> str:
    """Every proxy a test here starts runs its ring on this backend (both, in turn)."""
    _backend["name"] = request.param
    return str(request.param)


try:  # uvloop opens a process-wide pipe pair with its first loop: not a leak of ours
    import uvloop as _uvloop

    _uvloop.new_event_loop().close()
except ImportError:  # pragma: no cover
    pass

# Every async test here runs on the default loop and on uvloop (aiofused's pytest plugin).


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    # uvloop (libuv) opens /dev/null lazily for its own use, per loop.
    return {fd: t for fd, t in _open_fds().items() if fd not in before and t != "/dev/null"}


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """No fd left open, no task left running (bounded wait for closes to settle)."""
    before = _open_fds()
    yield
    for _ in range(100):
        leaked = _new_fds(before)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not leaked and not tasks:
            break
        await asyncio.sleep(0.02)
    assert not tasks, f"tasks left: {tasks}"
    assert not leaked, f"fds left open: {leaked}"


@dataclass
class Record:
    """What one upstream/mirror connection received."""

    digest: Any = field(default_factory=hashlib.sha256)
    nbytes: int = 0
    eof: bool = False
    reset: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def sha(self) -> str:
        return str(self.digest.hexdigest())


class Upstream:
    """A loopback server: ``echo``, ``sink`` (answers the sha256 at EOF), ``stall`` (never
    reads) or ``reset`` (reads ``reset_after`` bytes, then RST)."""

    def __init__(self, mode: str, reset_after: int = 0, slow: float = 0.0) -> None:
        self.mode = mode
        self.reset_after = reset_after
        self.slow = slow
        self.records: list[Record] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._stop.set()
        for w in self._writers:
            w.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self._server.wait_closed()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(w)
        rec = Record()
        self.records.append(rec)
        try:
            if self.mode == "stall":
                await self._stop.wait()
                return
            while True:
                data = await r.read(256 * 1024)
                if not data:
                    rec.eof = True
                    break
                rec.digest.update(data)
                rec.nbytes += len(data)
                if self.mode == "echo":
                    w.write(data)
                    await w.drain()
                if self.slow:
                    await asyncio.sleep(self.slow)
                if self.mode == "reset" and rec.nbytes >= self.reset_after:
                    sock = w.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
                    return
            if self.mode == "echo":
                w.write_eof()
            elif self.mode == "sink":
                w.write(rec.sha.encode())
                w.write_eof()
            await w.drain()
        except OSError:  # reset, broken pipe, or closed by __aexit__
            rec.reset = True
        finally:
            rec.done.set()
            w.close()
            self._tasks.discard(task)


class RefusedPort:
    """A bound, never listening TCP port: connecting to it is refused."""

    def __enter__(self) -> Endpoint:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return Endpoint("127.0.0.1", self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def running_proxy(
    upstream: Endpoint, mirrors: tuple[Endpoint, ...] = (), **options: Any
) -> AsyncIterator[ProxyServer]:
    options.setdefault("max_connections", 64)
    options.setdefault("buffer_size", 64 * 1024)
    options.setdefault("backend", _backend["name"])
    config = ProxyConfig(
        listen=Endpoint("127.0.0.1", 0), upstream=upstream, mirrors=mirrors, **options
    )
    server = ProxyServer(config)
    await server.start()
    try:
        yield server
        await wait_idle(server)
        assert server.pool.available == server.pool.size, "a relay buffer leaked"
        assert server.driver.channels == 0
    finally:
        await server.aclose(timeout=0)


async def wait_idle(server: ProxyServer, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while server.stats.connections_active:
            await asyncio.sleep(0.01)


async def exchange(port: int, payload: bytes, *, read: bool = True, chunk: int = 100_000) -> bytes:
    """Send ``payload`` (in random-sized writes), half-close, read the reply to EOF."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random(len(payload))

    async def send() -> None:
        view = memoryview(payload)
        while view:
            n = rng.randint(1, chunk)
            w.write(view[:n])
            view = view[n:]
            await w.drain()
        w.write_eof()

    try:
        sender = asyncio.create_task(send())
        reply = await r.read() if read else b""
        await sender
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
    return reply


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- integrity -----------------------------------------------------------------------------


async def test_both_directions_and_mirror_are_byte_identical() -> None:
    rng = random.Random(1234)
    sizes = [0, 1, 1500, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1] + [
        rng.randint(1, 3 * 1024 * 1024) for _ in range(4)
    ]
    payloads = [rng.randbytes(n) for n in sizes]
    async with (
        Upstream("echo") as up,
        Upstream("sink") as mirror,
        running_proxy(up.endpoint, (mirror.endpoint,)) as proxy,
    ):
        async with asyncio.timeout(40):
            replies = await asyncio.gather(*(exchange(proxy.address[1], p) for p in payloads))
            for rec in mirror.records:
                await rec.done.wait()
        assert [sha(r) for r in replies] == [sha(p) for p in payloads]
        assert sorted(r.sha for r in up.records) == sorted(sha(p) for p in payloads)
        assert sorted(r.sha for r in mirror.records) == sorted(sha(p) for p in payloads)
        assert proxy.stats.mirror_dropped_bytes == 0
        assert proxy.stats.bytes_upstream == sum(sizes)
        assert proxy.stats.bytes_downstream == sum(sizes)
        assert proxy.driver.copied_bytes == 0


async def test_500_concurrent_connections() -> None:
    rng = random.Random(500)
    payloads = [rng.randbytes(rng.randint(1, 20_000)) for _ in range(500)]
    async with (
        Upstream("echo") as up,
        running_proxy(up.endpoint, max_connections=600, buffer_size=16 * 1024) as proxy,
    ):
        port = proxy.address[1]
        async with asyncio.timeout(50):
            replies = await asyncio.gather(*(exchange(port, p, chunk=4096) for p in payloads))
        assert replies == payloads
        assert proxy.stats.connections_total == 500


async def test_half_close_reaches_upstream_and_reply_flows_back() -> None:
    async with Upstream("sink") as up, running_proxy(up.endpoint) as proxy:
        payload = os.urandom(300_000)
        async with asyncio.timeout(10):
            reply = await exchange(proxy.address[1], payload)
        # The sink replied only after it saw EOF: the half-close crossed the proxy.
        assert reply == sha(payload).encode()
        assert up.records[0].eof


async def test_unix_socket_listen_and_upstream(tmp_path: Any) -> None:
    """client -unix-> outer proxy -unix-> inner proxy -tcp-> echo, with a 2 MiB payload."""
    inner_path = Endpoint(path=str(tmp_path / "inner.sock"))
    outer_path = Endpoint(path=str(tmp_path / "outer.sock"))
    payload = os.urandom(2 * 1024 * 1024)
    async with Upstream("echo") as up:
        inner = ProxyServer(
            ProxyConfig(
                listen=inner_path,
                upstream=up.endpoint,
                max_connections=8,
                backend=_backend["name"],
            )
        )
        outer = ProxyServer(
            ProxyConfig(
                listen=outer_path,
                upstream=inner_path,
                max_connections=8,
                backend=_backend["name"],
            )
        )
        async with inner, outer:
            r, w = await asyncio.open_unix_connection(outer_path.path)
            w.write(payload)
            w.write_eof()
            async with asyncio.timeout(20):
                assert await r.read() == payload
            w.close()
            await wait_idle(outer)
            await wait_idle(inner)
            assert outer.pool.available == outer.pool.size
            assert inner.pool.available == inner.pool.size
    assert not os.path.exists(inner_path.path) and not os.path.exists(outer_path.path)


# ---- failures on the main path --------------------------------------------------------------


async def test_client_reset_mid_stream_closes_upstream() -> None:
    async with Upstream("sink") as up, running_proxy(up.endpoint) as proxy:
        sock = socket.create_connection(proxy.address)
        sock.sendall(os.urandom(200_000))
        async with asyncio.timeout(10):
            while not up.records or up.records[0].nbytes < 200_000:
                await asyncio.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        async with asyncio.timeout(10):
            await up.records[0].done.wait()
            await wait_idle(proxy)
        assert up.records[0].reset or not up.records[0].eof
        assert proxy.stats.resets == 1


async def test_upstream_reset_mid_stream_resets_client() -> None:
    async with Upstream("reset", reset_after=100_000) as up, running_proxy(up.endpoint) as proxy:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(proxy.address)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(10):
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(sock, os.urandom(1_000_000))
                with pytest.raises(ConnectionResetError):
                    while await loop.sock_recv(sock, 65536):
                        pass
                    raise ConnectionResetError  # EOF instead of RST would also end here
                await wait_idle(proxy)
        finally:
            sock.close()
        assert proxy.stats.resets == 1


async def test_refused_upstream_closes_client_cleanly() -> None:
    with RefusedPort() as refused:
        async with running_proxy(refused) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.address[1])
            async with asyncio.timeout(10):
                assert await r.read() == b""
            w.close()
            await wait_idle(proxy)
            assert proxy.stats.upstream_failures == 1


# ---- mirrors never break the main path --------------------------------------------------------


async def _main_path_with_mirror(mirror: Endpoint, size: int) -> ProxyServer:
    payload = os.urandom(size)
    async with Upstream("sink") as up, running_proxy(up.endpoint, (mirror,)) as proxy:
        async with asyncio.timeout(40):
            reply = await exchange(proxy.address[1], payload)
        assert reply == sha(payload).encode(), "the main path lost integrity"
        assert up.records[0].sha == sha(payload)
    return proxy


async def test_refused_mirror_is_dropped_and_counted() -> None:
    with RefusedPort() as refused:
        proxy = await _main_path_with_mirror(refused, 2_000_000)
    assert proxy.stats.mirror_failures == 1
    assert proxy.stats.mirror_dropped_bytes == 2_000_000
    assert proxy.stats.mirror_bytes == 0


async def test_stalled_mirror_is_cut_beyond_its_lag() -> None:
    async with Upstream("stall") as stalled:
        proxy = await _main_path_with_mirror(stalled.endpoint, 48 * 1024 * 1024)
    assert proxy.stats.mirror_failures == 1
    assert proxy.stats.mirror_dropped_bytes > 0
    assert proxy.stats.mirror_bytes + proxy.stats.mirror_dropped_bytes == 48 * 1024 * 1024


@pytest.mark.parametrize("grace", [0.0, 10.0])
async def test_slow_mirror_is_cut_unless_given_grace(grace: float) -> None:
    """A mirror reading at ~25 MB/s: cut beyond its lag by default; with a grace period
    the main path waits for it and it gets an identical copy."""
    payload = os.urandom(24 * 1024 * 1024)
    async with (
        Upstream("sink") as up,
        Upstream("sink", slow=0.01) as mirror,
        running_proxy(
            up.endpoint, (mirror.endpoint,), mirror_grace=grace, mirror_lag=1024 * 1024
        ) as proxy,
    ):
        async with asyncio.timeout(40):
            assert await exchange(proxy.address[1], payload) == sha(payload).encode()
            await mirror.records[0].done.wait()
        if grace:
            assert proxy.stats.mirror_failures == 0
            assert mirror.records[0].sha == sha(payload)
        else:
            assert proxy.stats.mirror_failures == 1
            assert proxy.stats.mirror_dropped_bytes > 0


async def test_mirror_reset_mid_stream() -> None:
    async with Upstream("reset", reset_after=300_000) as mirror:
        proxy = await _main_path_with_mirror(mirror.endpoint, 8 * 1024 * 1024)
        assert mirror.records[0].nbytes >= 300_000
    assert proxy.stats.mirror_failures == 1
    assert proxy.stats.mirror_dropped_bytes > 0


# ---- backpressure, limits, shutdown -------------------------------------------------------------


async def test_slow_reader_slows_the_sender_and_memory_stays_bounded() -> None:
    """An upstream that does not read: the client's writes stall, the pool holds at most
    two buffers for that direction; once it reads, everything arrives intact."""
    gate = asyncio.Event()
    up = Upstream("sink")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        await Upstream._handle(up, r, w)

    async with up:
        assert up._server is not None
        up._server.close()
        await up._server.wait_closed()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with running_proxy(Endpoint("127.0.0.1", port), buffer_size=64 * 1024) as proxy:
            payload = os.urandom(64 * 1024 * 1024)
            r, w = await asyncio.open_connection("127.0.0.1", proxy.address[1])
            w.transport.set_write_buffer_limits(high=0)
            sent = 0
            view = memoryview(payload)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while sent < len(payload):
                        w.write(view[sent : sent + 65536])
                        sent += 65536
                        await w.drain()
            assert sent < len(payload), "the sender was never slowed down"
            in_use = proxy.pool.size - proxy.pool.available
            assert in_use <= 3, f"{in_use} buffers held: memory is not bounded"
            gate.set()
            w.write(view[sent:])
            w.write_eof()
            async with asyncio.timeout(30):
                await w.drain()
                reply = await r.read()
            assert reply == sha(payload).encode()
            w.close()
        server.close()
        await server.wait_closed()


async def test_idle_timeout_resets_quiet_connections() -> None:
    async with Upstream("echo") as up, running_proxy(up.endpoint, idle_timeout=0.3) as proxy:
        r, w = await asyncio.open_connection("127.0.0.1", proxy.address[1])
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionResetError):
                await r.read()
            await up.records[0].done.wait()
        assert up.records[0].reset and not up.records[0].eof
        w.close()
        await wait_idle(proxy)
        assert proxy.stats.idle_timeouts == 1


async def test_max_connections_defers_accepting() -> None:
    async with Upstream("echo") as up, running_proxy(up.endpoint, max_connections=2) as proxy:
        port = proxy.address[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for i, (r, w) in enumerate(conns[:2]):
            w.write(b"%d" % i)
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"%d" % i
        r3, w3 = conns[2]
        w3.write(b"3")
        third = asyncio.create_task(r3.readexactly(1))
        done, _ = await asyncio.wait({third}, timeout=0.3)
        assert not done, "a third connection was served beyond --max-connections 2"
        conns[0][1].close()
        assert await asyncio.wait_for(third, 5) == b"3"
        for _, w in conns[1:]:
            w.close()


async def test_graceful_close_finishes_in_flight_transfers() -> None:
    async with Upstream("sink", slow=0.005) as up:
        config = ProxyConfig(
            listen=Endpoint("127.0.0.1", 0),
            upstream=up.endpoint,
            max_connections=8,
            backend=_backend["name"],
        )
        proxy = ProxyServer(config)
        await proxy.start()
        payload = os.urandom(4 * 1024 * 1024)
        port = proxy.address[1]
        transfer = asyncio.create_task(exchange(port, payload))
        async with asyncio.timeout(5):
            while not up.records:
                await asyncio.sleep(0.01)
        await proxy.aclose(timeout=20)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert await transfer == sha(payload).encode()
        assert proxy.stats.connections_active == 0


async def test_forced_close_while_clients_hang_up_leaks_nothing() -> None:
    """Connections ending at the very moment the server is force-closed: every pump,
    lease and buffer is still accounted for."""
    async with Upstream("echo") as up:
        config = ProxyConfig(
            listen=Endpoint("127.0.0.1", 0),
            upstream=up.endpoint,
            max_connections=64,
            backend=_backend["name"],
        )
        proxy = ProxyServer(config)
        await proxy.start()
        conns = [await asyncio.open_connection("127.0.0.1", proxy.address[1]) for _ in range(40)]
        for round_ in range(3):
            for _, w in conns:
                w.write(b"ping %d" % round_)
            for r, _ in conns:
                assert await asyncio.wait_for(r.readexactly(6), 10) == b"ping %d" % round_
        for _, w in conns:
            w.close()
        await proxy.aclose(timeout=0)
        assert proxy.buffers_leaked == 0
        assert proxy.stats.connections_active == 0
        assert proxy.driver.channels == 0
