"""The linear target's new extents (issue 10, item 5): the unwritten parts of an
extent allocated by a write read as zeroes, not as what the physical volume held
there before, and stay zeroes after a restart."""

from __future__ import annotations

import os

from aiofused_drivers.ublk import SqliteMappingStore
from aiofused_drivers.ublk.testing import RawClient, serve, settle, short_tmpdir

MiB = 1 << 20
READ, WRITE, DISC = 0, 1, 2
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}
OLD = b"\xee"  # what the PV held before: an old volume's blocks


async def _reads(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    c = await RawClient.connect(path)
    try:
        await c.go("lv")
        out = []
        for i, (off, n) in enumerate(ranges):
            c.request(READ, off, n, cookie=i)
            err, cookie, data = await c.simple_reply(n)
            assert (err, cookie) == (0, i)
            out.append(data)
        c.request(DISC, 0, 0, 0)
        return out
    finally:
        await c.close()


async def test_new_extent_reads_zeroes_where_unwritten(ring_backend: str) -> None:
    with short_tmpdir() as d:
        pv = os.path.join(d, "pv.img")
        with open(pv, "wb") as f:
            f.write(OLD * (8 * MiB))
        db = os.path.join(d, "map.db")
        spec = f"lv=linear:{db},pv={pv},size=16M,extent=1M"
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            # Never written: zeroes (unmapped, read from /dev/zero).
            assert await _reads(srv.sock_path, [(0, MiB)]) == [bytes(MiB)]
            c = await RawClient.connect(srv.sock_path)
            try:
                await c.go("lv")
                # 4 KiB into extent 0; 8 KiB across the boundary of extents 2 and 3.
                c.request(WRITE, 4096, 4096, cookie=1, payload=b"\x11" * 4096)
                assert await c.simple_reply() == (0, 1, b"")
                c.request(WRITE, 3 * MiB - 4096, 8192, cookie=2, payload=b"\x22" * 8192)
                assert await c.simple_reply() == (0, 2, b"")
                c.request(DISC, 0, 0, 0)
            finally:
                await c.close()
            first, second = await _reads(srv.sock_path, [(0, MiB), (2 * MiB, 2 * MiB)])
            assert first == bytes(4096) + b"\x11" * 4096 + bytes(MiB - 8192)
            assert second == bytes(MiB - 4096) + b"\x22" * 8192 + bytes(MiB - 4096)
            assert await settle(srv.service) == NO_LEAKS
        store = SqliteMappingStore(db)
        try:
            assert store.mapped_count() == 3
        finally:
            store.close()
        # After a restart, from the database alone: the same.
        async with serve(backend=ring_backend, exports=[f"lv=linear:{db}"]) as srv:
            first, second = await _reads(srv.sock_path, [(0, MiB), (2 * MiB, 2 * MiB)])
            assert first == bytes(4096) + b"\x11" * 4096 + bytes(MiB - 8192)
            assert second == bytes(MiB - 4096) + b"\x22" * 8192 + bytes(MiB - 4096)
        # The PV extents not mapped still hold the old bytes (nothing else was touched).
        with open(pv, "rb") as f:
            assert f.read().count(OLD) == 5 * MiB
