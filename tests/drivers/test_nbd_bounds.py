"""What one client can make the NBD server hold is bounded (issue 10, items 1 and 2):
request buffers come from bounded chunks (no mapping per request), a connection whose
client does not read its replies stops being read, a failure inside one connection
(MemoryError included) closes that connection only, and other clients are served
throughout."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator

import pytest

from aiofused_drivers.ublk import ExportSpec
from aiofused_drivers.ublk import _nbd as nbd_mod
from aiofused_drivers.ublk.testing import RawClient, Served, serve, settle, short_tmpdir

MiB = 1 << 20
SIZE = 256 * MiB
READ, WRITE, DISC = 0, 1, 2
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}
PATTERN = b"\x07" * 4096


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture
async def srv(ring_backend: str) -> AsyncIterator[Served]:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(SIZE)
            f.write(PATTERN)  # the first 4 KiB, what still_serves reads back
        async with serve(backend=ring_backend, exports=[ExportSpec("disk", f"loop:{disk}")]) as s:
            yield s


async def client(srv: Served) -> RawClient:
    c = await RawClient.connect(srv.sock_path)
    size, _ = await c.go("disk")
    assert size == SIZE
    return c


async def still_serves(srv: Served) -> None:
    """A new client connects, reads the right bytes, and leaves."""
    c = await asyncio.wait_for(client(srv), 10)
    try:
        for cookie in range(4):
            c.request(READ, 0, 4096, cookie=cookie)
            assert await c.simple_reply(4096) == (0, cookie, PATTERN)
        c.request(DISC, 0, 0, 0)
    finally:
        await c.close()


def abort(c: RawClient) -> None:
    """Leave at once (requests the server never read are still in our buffer)."""
    c.writer.transport.abort()


async def quiet(srv: Served, seconds: float = 20.0) -> None:
    """Wait (bounded) until the server has nothing in flight for a while: it read
    what it was going to read and served it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    calm = 0
    while loop.time() < deadline and calm < 10:
        await asyncio.sleep(0.05)
        calm = calm + 1 if srv.service.leaks()["inflight"] == 0 else 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("count", "size"), [(1000, MiB), (24, 32 * MiB)], ids=["1M", "32M"])
async def test_unread_reads_keep_memory_flat(srv: Served, count: int, size: int) -> None:
    """1,000 pipelined 1 MiB READs whose replies are never read grew RSS by ~1 GiB,
    24 of 32 MiB (672 bytes of requests) by 768 MiB; now the connection stops being
    read at its 64 MiB, and others are served."""
    await still_serves(srv)
    before = rss()
    bad = await client(srv)
    try:
        for i in range(count):
            bad.request(READ, (i % (SIZE // size)) * size, size, cookie=i)
        await quiet(srv)
        await still_serves(srv)
        grown = rss() - before
        assert grown < 200 * MiB, f"RSS grew by {grown >> 20} MiB"
        held = max(c.held for c in srv.service.nbd.connections)
        assert 0 < held <= srv.service.nbd.max_connection_bytes + size
    finally:
        abort(bad)
    assert await settle(srv.service, 20) == NO_LEAKS
    await still_serves(srv)


@pytest.mark.timeout(90)
async def test_unread_4k_reads_do_not_map_per_request(srv: Served) -> None:
    """20,000 pipelined 4 KiB READs, never read: each one held its own mmap (70k of
    them reached vm.max_map_count); now the buffers are slots of a few chunks."""
    await still_serves(srv)
    maps_before = mappings()
    bad = await client(srv)
    try:
        for i in range(20_000):
            bad.request(READ, (i % 4096) * 4096, 4096, cookie=i)
        await quiet(srv)
        await still_serves(srv)
        grown = mappings() - maps_before
        assert grown < 100, f"{grown} new mappings"
    finally:
        abort(bad)
    assert await settle(srv.service, 20) == NO_LEAKS
    await still_serves(srv)


@pytest.mark.timeout(90)
async def test_unread_error_replies_stop_the_reading(srv: Served) -> None:
    """300,000 invalid requests whose error replies are never read: the server stops
    reading that client once its replies pile up, instead of queueing them all."""
    bad = await client(srv)
    n = 300_000
    try:
        for i in range(n):
            bad.request(READ, 0, 512, cookie=i, flags=1 << 9)  # unknown flag: EINVAL
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bad.writer.drain(), 3)
        await still_serves(srv)
        errors = srv.service.nbd.stats["errors"]
        assert errors < n // 3, f"{errors} error replies made"
        queued = max(len(c._out) for c in srv.service.nbd.connections)
        assert 0 < queued <= nbd_mod.MAX_QUEUED_REPLIES
        # The client reads again: the server reads on and answers everything.
        got = 0
        while got < n:
            err, cookie, _ = await bad.simple_reply()
            assert (err, cookie) == (errno.EINVAL, got)
            got += 1
    finally:
        await bad.close()
    assert await settle(srv.service, 20) == NO_LEAKS


async def test_a_connection_waits_for_spent_buffers(ring_backend: str) -> None:
    """With the shared request-buffer budget spent (two unread 32 MiB READs of one
    client), another client's big READ waits, and is served once the first client
    reads its replies; nothing is refused and nothing leaks."""
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(SIZE)
            f.write(PATTERN)
        async with serve(
            backend=ring_backend,
            exports=[ExportSpec("disk", f"loop:{disk}")],
            buffer_memory=64 * MiB,
        ) as srv:
            hog = await client(srv)
            other = await client(srv)
            try:
                hog.request(READ, 0, 32 * MiB, cookie=1)
                hog.request(READ, 32 * MiB, 32 * MiB, cookie=2)
                await quiet(srv)
                assert srv.service.buffers.mapped == 64 * MiB
                other.request(READ, 0, MiB, cookie=3)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(other.simple_reply(MiB), 0.5)
                assert (await hog.simple_reply(32 * MiB))[:2] == (0, 1)
                assert (await hog.simple_reply(32 * MiB))[:2] == (0, 2)
                err, cookie, data = await other.simple_reply(MiB)
                assert (err, cookie, data[:4096]) == (0, 3, PATTERN)
            finally:
                await hog.close()
                await other.close()
            assert await settle(srv.service) == NO_LEAKS
            assert srv.service.buffers.mapped <= 64 * MiB


async def test_accept_survives_a_failing_connection(
    srv: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose setup fails with MemoryError (what reaching vm.max_map_count
    did) is dropped; the accept loop lives and the next client is served."""
    real = srv.service.nbd.connection_class
    failures = []

    def failing(*args: object) -> object:
        if not failures:
            failures.append(1)
            raise MemoryError
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(srv.service.nbd, "connection_class", failing)
    dropped = await RawClient.connect(srv.sock_path)
    try:
        assert await dropped.at_eof()
    finally:
        await dropped.close()
    assert failures == [1]
    await still_serves(srv)
    assert await settle(srv.service) == NO_LEAKS


async def test_memory_error_mid_request_closes_only_that_connection(
    srv: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    bufs = srv.service.buffers
    real = bufs.acquire

    def acquire(nbytes: int) -> object:
        if nbytes == 12288:
            raise MemoryError
        return real(nbytes)

    other = await client(srv)
    bad = await client(srv)
    monkeypatch.setattr(bufs, "acquire", acquire)
    try:
        bad.request(READ, 0, 12288, cookie=1)
        assert await bad.at_eof()
        other.request(READ, 0, 4096, cookie=2)
        assert await other.simple_reply(4096) == (0, 2, PATTERN)
        await still_serves(srv)
    finally:
        await bad.close()
        await other.close()
    assert await settle(srv.service) == NO_LEAKS


async def test_accept_survives_a_failing_accept(
    srv: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() itself failing (EMFILE) is logged and retried after a back-off: the loop
    lives on and the next client is served (the back-off waits outside the handler)."""
    loop = asyncio.get_running_loop()
    real = loop.sock_accept
    failures: list[int] = []

    async def accept(sock: object) -> object:
        if not failures:
            failures.append(1)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await real(sock)  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(loop, "sock_accept", accept)
    except (AttributeError, TypeError):
        pytest.skip(f"{type(loop).__name__}.sock_accept cannot be patched")
    # The pending accept was started before the patch: this client takes it, and the
    # loop's next accept is the failing one.
    await still_serves(srv)
    await still_serves(srv)
    assert failures == [1]
    assert await settle(srv.service) == NO_LEAKS


async def test_the_server_counts_requests_by_command_and_errors(srv: Served) -> None:
    """NbdServer.stats: each request under its command number (an unknown number as
    ``cmd?``), each error reply under ``errors``."""
    c = await client(srv)
    try:
        c.request(READ, 0, 4096, cookie=1)
        assert await c.simple_reply(4096) == (0, 1, PATTERN)
        c.request(WRITE, 4096, 512, cookie=2, payload=b"w" * 512)
        assert await c.simple_reply() == (0, 2, b"")
        c.request(READ, SIZE, 512, cookie=3)  # past the end: EINVAL
        assert await c.simple_reply() == (errno.EINVAL, 3, b"")
        c.request(999, 0, 0, cookie=4)  # unknown command: EINVAL
        assert await c.simple_reply() == (errno.EINVAL, 4, b"")
    finally:
        await c.close()
    assert dict(srv.service.nbd.stats) == {"cmd0": 2, "cmd1": 1, "cmd?": 1, "errors": 2}
    assert await settle(srv.service) == NO_LEAKS
