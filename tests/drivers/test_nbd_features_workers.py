"""``nbd serve --workers N`` for the linear target (issue 10): the mapping lives in
SQLite (WAL) and is shared by the worker processes.  An allocation is one write
transaction, so two workers never map one physical extent twice nor one logical
extent to two places, and a worker that cached "unmapped" sees another worker's
allocation (``PRAGMA data_version``) before it answers a read."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator

import pytest

from aiofused_drivers.ublk import SqliteMappingStore
from aiofused_drivers.ublk.testing import RawClient, short_tmpdir

MiB = 1 << 20
READ, WRITE = 0, 1
CLI = [sys.executable, "-m", "aiofused_drivers.ublk.cli", "nbd", "serve"]


def _file(d: str, name: str, size: int, fill: bytes = b"") -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        if fill:
            f.write(fill * size)
        f.truncate(size)
    return path


def test_two_stores_on_one_database_share_the_mapping() -> None:
    with short_tmpdir() as d:
        pv, db = _file(d, "pv", 8 * MiB), os.path.join(d, "map.db")
        a = SqliteMappingStore(db, pv_paths=[pv], extent_size=MiB)
        b = SqliteMappingStore(db)
        try:
            assert not b.changed()
            assert a.lookup(3) is None and b.lookup(3) is None
            got = a.allocate(3)
            assert b.changed() and not b.changed()  # a's commit, seen once
            assert b.lookup(3) == got
            assert b.allocate(3) == got  # mapped already: the same extent
            other = b.allocate(4)  # b's free list still holds a's extent: skipped
            assert other != got
            assert a.changed() and a.lookup(4) == other
            prepared: list[tuple[int, int]] = []
            third = a.allocate(5, lambda pv, pe: prepared.append((pv, pe)))
            assert prepared == [third] and len({got, other, third}) == 3
        finally:
            a.close()
            b.close()


def _allocate_many(db: str, les: list[int], out: multiprocessing.Queue[object]) -> None:
    store = SqliteMappingStore(db)
    try:
        out.put({le: store.allocate(le) for le in les})
    except Exception as e:  # reported to the test
        out.put(repr(e))
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_processes_allocating_at_once_never_share_an_extent() -> None:
    """Four processes allocate overlapping logical extents at once: each extent is
    mapped once, every process got the mapping the table holds, and no physical
    extent is used twice."""
    with short_tmpdir() as d:
        pv0, pv1, db = _file(d, "pv0", 48 * MiB), _file(d, "pv1", 48 * MiB), os.path.join(d, "m")
        SqliteMappingStore(db, pv_paths=[pv0, pv1], size=96 * MiB, extent_size=MiB).close()
        ctx = multiprocessing.get_context("fork")
        out: multiprocessing.Queue[object] = ctx.Queue()
        rng = random.Random(7)
        plans = [rng.sample(range(96), 40) for _ in range(4)]
        procs = [ctx.Process(target=_allocate_many, args=(db, p, out)) for p in plans]
        for p in procs:
            p.start()
        results = [out.get(timeout=50) for _ in procs]
        for p in procs:
            p.join(10)
        assert all(isinstance(r, dict) for r in results), results
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT le, pv, pe FROM extents").fetchall()
        table = {le: (pv, pe) for le, pv, pe in rows}
        assert len(set(table.values())) == len(table)  # no physical extent twice
        assert set(table) == {le for p in plans for le in p}
        for r in results:
            assert isinstance(r, dict)
            for le, m in r.items():
                assert table[le] == m


@pytest.fixture
async def linear_two_workers() -> AsyncIterator[str]:
    with short_tmpdir() as d:
        pv, sock = _file(d, "pv", 16 * MiB, b"\xee"), os.path.join(d, "s.sock")
        spec = f"lv=linear:{os.path.join(d, 'map.db')},pv={pv},size=16M,extent=1M"
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "-e",
            spec,
            "-U",
            sock,
            "--workers",
            "2",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                while not os.path.exists(sock):
                    assert proc.returncode is None, "server exited"
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            yield sock
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.timeout(60)
async def test_a_read_in_one_worker_sees_an_extent_another_worker_allocated(
    linear_two_workers: str,
) -> None:
    """Two clients held open land on the two workers.  Each reads an unmapped extent
    (zeroes: the worker caches "unmapped"), the other then writes it (allocates it),
    and the first reads the new data, never zeroes nor the PV's old bytes."""
    a, b = await RawClient.connect(linear_two_workers), await RawClient.connect(linear_two_workers)
    try:
        await a.go("lv")
        await b.go("lv")
        for k, (reader, writer) in enumerate([(a, b), (b, a), (a, b)]):
            offset = k * 3 * MiB + 8192
            reader.request(READ, offset, 4096, cookie=1)
            assert await reader.simple_reply(4096) == (0, 1, bytes(4096))
            data = bytes([k + 1]) * 4096
            writer.request(WRITE, offset, 4096, cookie=2, payload=data)
            assert await writer.simple_reply() == (0, 2, b"")
            reader.request(READ, offset - 8192, 12288, cookie=3)
            assert await reader.simple_reply(12288) == (0, 3, bytes(8192) + data)
    finally:
        await a.close()
        await b.close()
