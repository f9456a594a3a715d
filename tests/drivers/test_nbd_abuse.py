"""Protocol abuse against the NBD front end, with a hand-driven client: errors where the
protocol has them, a closed connection where it has none, other clients unaffected,
nothing left lent or in flight."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
from collections.abc import AsyncIterator

import pytest

from aiofused_drivers.ublk import ExportSpec
from aiofused_drivers.ublk._nbdproto import IHAVEOPT
from aiofused_drivers.ublk.testing import RawClient, Served, serve, settle, short_tmpdir

MiB = 1 << 20
SIZE = 8 * MiB
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}


@pytest.fixture
async def srv(ring_backend: str) -> AsyncIterator[Served]:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.write(b"\x07" * SIZE)
        specs = [ExportSpec("disk", f"loop:{disk}"), ExportSpec("ro", f"loop:{disk}", True)]
        async with serve(backend=ring_backend, exports=specs) as s:
            s.disk = disk  # type: ignore[attr-defined]
            yield s


async def client(srv: Served, name: str = "disk", structured: bool = False) -> RawClient:
    c = await RawClient.connect(srv.sock_path)
    size, _flags = await c.go(name, structured)
    assert size == SIZE
    return c


async def still_serves(srv: Served, c: RawClient | None = None) -> None:
    """A (new or given) client can still read."""
    own = c is None
    c = c or await client(srv)
    c.request(READ, 4096, 512, cookie=0xABC)
    err, cookie, data = await c.simple_reply(512)
    assert (err, cookie, data) == (0, 0xABC, b"\x07" * 512)
    if own:
        c.request(DISC, 0, 0, 0)
        await c.close()


async def no_leaks(srv: Served) -> None:
    assert await settle(srv.service) == NO_LEAKS


async def test_errors_keep_the_connection(srv: Served) -> None:
    c = await client(srv)
    cases = [
        (READ, SIZE - 512, 1024, b"", errno.EINVAL),  # past the end
        (WRITE, SIZE, 512, b"x" * 512, errno.ENOSPC),  # write past the end (payload skipped)
        (TRIM, SIZE - 512, 4096, b"", errno.EINVAL),
        (WRITE_ZEROES, SIZE, 512, b"", errno.ENOSPC),
        (READ, 1, 512, b"", errno.EINVAL),  # misaligned (block sizes were agreed)
        (WRITE, 512, 100, b"y" * 100, errno.EINVAL),  # misaligned length, payload skipped
        (READ, 0, 0, b"", errno.EINVAL),  # zero length
        (CACHE, 0, 512, b"", errno.EINVAL),  # not advertised
        (99, 0, 512, b"", errno.EINVAL),  # unknown command
        (BLOCK_STATUS, 0, 512, b"", errno.EINVAL),  # no structured replies negotiated
    ]
    for i, (typ, off, length, payload, want) in enumerate(cases):
        c.request(typ, off, length, cookie=i, payload=payload)
        err, cookie, _ = await c.simple_reply()
        assert (cookie, err) == (i, want), (typ, off, length)
    c.request(READ, 0, 512, cookie=77, flags=1 << 9)  # unknown flag
    assert (await c.simple_reply())[:2] == (errno.EINVAL, 77)
    await still_serves(srv, c)
    with open(srv.disk, "rb") as f:  # type: ignore[attr-defined]
        assert f.read() == b"\x07" * SIZE  # nothing was written by the bad requests
    c.request(DISC, 0, 0, 0)
    assert await c.at_eof()
    await c.close()
    await no_leaks(srv)


async def test_read_only_export_refuses_writes(srv: Served) -> None:
    c = await client(srv, "ro")
    c.request(WRITE, 0, 512, cookie=1, payload=b"z" * 512)
    c.request(TRIM, 0, 512, cookie=2)
    c.request(WRITE_ZEROES, 0, 512, cookie=3)
    c.request(FLUSH, 0, 0, cookie=4)
    got = {}
    for _ in range(4):
        err, cookie, _ = await c.simple_reply()
        got[cookie] = err
    assert got == {1: errno.EPERM, 2: errno.EPERM, 3: errno.EPERM, 4: 0}
    await still_serves(srv, c)
    await c.close()
    await no_leaks(srv)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(struct.pack(">IHHQQI", 0x12345678, 0, READ, 1, 0, 512), id="bad-magic"),
        pytest.param(struct.pack(">IHHQQI", 0x25609513, 0, READ, 1, 0, 64 * MiB), id="big-read"),
        pytest.param(
            struct.pack(">IHHQQI", 0x25609513, 0, WRITE, 1, 0, 33 * MiB) + b"x" * 4096,
            id="big-write",
        ),
    ],
)
async def test_fatal_requests_close_only_that_connection(srv: Served, frame: bytes) -> None:
    other = await client(srv)
    bad = await client(srv)
    bad.writer.write(frame)
    assert await bad.at_eof()
    await bad.close()
    await still_serves(srv, other)
    await still_serves(srv)
    await other.close()
    await no_leaks(srv)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack(">I", 0xFF), id="unknown-client-flags"),
        pytest.param(struct.pack(">IQII", 3, 0xBAD, 7, 0), id="bad-option-magic"),
        pytest.param(struct.pack(">IQII", 3, IHAVEOPT, 7, 1 << 30), id="huge-option"),
        pytest.param(struct.pack(">IQII", 1, IHAVEOPT, 1, 4) + b"nope", id="unknown-export-name"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="garbage"),
    ],
)
async def test_malformed_handshake_closes(srv: Served, data: bytes) -> None:
    c = await RawClient.connect(srv.sock_path)
    await c.greeting()
    c.writer.write(data)
    assert await c.at_eof()
    await c.close()
    await still_serves(srv)
    await no_leaks(srv)


async def test_handshake_timeout(srv: Served) -> None:
    srv.service.nbd.handshake_timeout = 0.3
    c = await RawClient.connect(srv.sock_path)
    await c.greeting()
    assert await c.at_eof(5)  # said nothing: dropped
    await c.close()
    await still_serves(srv)


async def test_truncated_payload_then_disconnect(srv: Served) -> None:
    c = await client(srv)
    c.request(WRITE, 0, 65536, cookie=1, payload=b"t" * 1000)
    await c.writer.drain()
    await asyncio.sleep(0.05)
    await c.close()
    await no_leaks(srv)
    with open(srv.disk, "rb") as f:  # type: ignore[attr-defined]
        assert f.read(65536) == b"\x07" * 65536
    await still_serves(srv)


async def test_disconnect_with_requests_in_flight(srv: Served) -> None:
    for _ in range(3):
        c = await client(srv)
        for i in range(64):
            c.request(WRITE, MiB + (i % 16) * 65536, 65536, cookie=i, payload=bytes([i]) * 65536)
            c.request(READ, MiB + (i % 16) * 65536, 65536, cookie=1000 + i)
        await c.close()  # without reading a single reply
    await no_leaks(srv)
    await still_serves(srv)


async def test_pipelined_requests_all_answered(srv: Served) -> None:
    c = await client(srv, structured=True)
    cookies = set()
    for i in range(200):
        cookie = 0xF000_0000_0000 + i
        cookies.add(cookie)
        if i % 3 == 0:
            c.request(WRITE, (i % 64) * 4096, 4096, cookie, payload=b"\x07" * 4096)
        else:
            c.request(READ, (i % 64) * 4096, 4096 * (1 + i % 4), cookie)
    c.request(FLUSH, 0, 0, 1)
    cookies.add(1)
    seen: set[int] = set()
    while len(seen) < len(cookies):
        hdr = await asyncio.wait_for(c.reader.readexactly(4), 10)
        (magic,) = struct.unpack(">I", hdr)
        if magic == 0x67446698:
            err, cookie = struct.unpack(">IQ", await c.reader.readexactly(12))
        else:
            assert magic == 0x668E33EF
            flags, typ, cookie, length = struct.unpack(">HHQI", await c.reader.readexactly(16))
            payload = await c.reader.readexactly(length)
            err = 0
            assert flags & 1 and typ == 1
            assert payload[8:] == b"\x07" * (length - 8)
        assert err == 0 and cookie in cookies and cookie not in seen
        seen.add(cookie)
    await c.close()
    await no_leaks(srv)


async def test_shutdown_finishes_in_flight_and_drops_stalled_handshakes(srv: Served) -> None:
    stalled = await RawClient.connect(srv.sock_path)
    await stalled.greeting()
    c = await client(srv)
    for i in range(32):
        c.request(READ, i * 4096, 4096, cookie=i)
    await c.writer.drain()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closing = asyncio.create_task(srv.service.nbd.close())
    got = set()
    for _ in range(32):
        err, cookie, data = await c.simple_reply(4096)
        # Received before the shutdown: served; after it: ESHUTDOWN (soft disconnect).
        assert (err, data) in ((0, b"\x07" * 4096), (errno.ESHUTDOWN, b""))
        got.add(cookie)
    assert got == set(range(32))
    c.request(READ, 0, 512, cookie=99)
    assert (await c.simple_reply())[:2] == (errno.ESHUTDOWN, 99)
    c.request(DISC, 0, 0, 0)
    assert await c.at_eof()
    assert await stalled.at_eof()
    await asyncio.wait_for(closing, 5)
    assert loop.time() - t0 < 5
    await c.close()
    await stalled.close()
    await no_leaks(srv)


async def test_random_garbage_never_hurts_the_server(srv: Served) -> None:
    rng = random.Random(1234)
    for i in range(24):
        c = await RawClient.connect(srv.sock_path)
        await c.greeting()
        if i % 2:  # garbage in the transmission phase rather than the handshake
            c.writer.write(struct.pack(">I", 3))
            c.option(7, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
            for _ in range(8):  # INFO replies, then ACK
                if (await c.option_reply())[0] == 1:
                    break
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600)))
        c.writer.write(blob)
        await c.at_eof(0.2)  # closed, or waiting for more bytes: either is fine
        await c.close()
    await still_serves(srv)
    with open(srv.disk, "rb") as f:  # type: ignore[attr-defined]
        assert f.read() == b"\x07" * SIZE
    await no_leaks(srv)
