"""Durable mirror replica state (issue 10, item 3), as md RAID-1 keeps it: a replica
that missed writes is never read again until an online resync brought it back, even
after a restart; regions that had writes in flight at a crash are read from one
replica until they were made the same everywhere."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys

import pytest

from aiofused_drivers.ublk import MirrorTarget
from aiofused_drivers.ublk._mirrorstate import MirrorState
from aiofused_drivers.ublk.testing import RawClient, serve, settle, short_tmpdir

MiB = 1 << 20
READ, WRITE, DISC = 0, 1, 2
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}
CLI = [sys.executable, "-m", "aiofused_drivers.ublk.cli", "nbd", "serve"]


def _files(d: str, n: int, size: int) -> list[str]:
    paths = []
    for i in range(n):
        p = os.path.join(d, f"r{i}.img")
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    return paths


def _read(path: str, offset: int = 0, n: int = -1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


async def _client(sock: str) -> RawClient:
    c = await asyncio.wait_for(RawClient.connect(sock), 10)
    await asyncio.wait_for(c.go("m"), 10)
    return c


async def _write(c: RawClient, offset: int, data: bytes, cookie: int = 1) -> None:
    c.request(WRITE, offset, len(data), cookie=cookie, payload=data)
    assert await c.simple_reply() == (0, cookie, b"")


async def _reads(c: RawClient, offset: int, n: int, times: int) -> list[bytes]:
    out = []
    for i in range(times):
        c.request(READ, offset, n, cookie=100 + i)
        err, cookie, data = await c.simple_reply(n)
        assert (err, cookie) == (0, 100 + i)
        out.append(data)
    return out


async def _until(cond: object, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(90)
async def test_a_replica_that_missed_writes_is_not_read_after_restart(
    ring_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with short_tmpdir() as d:
        paths = _files(d, 3, 8 * MiB)
        old, new = b"\x11" * (4 * MiB), b"\x22" * (4 * MiB)
        target = MirrorTarget(paths, region=MiB)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _client(srv.sock_path)
                try:
                    await _write(c, 0, old)
                    bad = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # EISDIR from now on
                    os.dup2(bad, target.fds[1])
                    os.close(bad)
                    await _write(c, 0, new, cookie=2)  # replica 1 misses it
                    assert target.healthy == [0, 2]
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
        assert _read(paths[1], 0, 4 * MiB) == old  # really stale
        state = MirrorState(f"{paths[0]}.mirror.db", paths, None)
        try:
            assert state.stale() == [1] and state.in_sync() == [0, 2]
            assert state.dirty == set()  # a clean stop leaves nothing to resync
        finally:
            state.close()

        # Restart from the files alone: replica 1 is stale, never read, resynced online.
        target = MirrorTarget(paths)
        target.progress_interval = 0
        try:
            assert target.healthy == [0, 2] and target.resyncing == [1]
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _client(srv.sock_path)
                try:
                    for _ in range(3):
                        assert await _reads(c, 0, MiB, 6) == [new[:MiB]] * 6
                    await _until(lambda: target.healthy == [0, 1, 2])
                    assert await _reads(c, 2 * MiB, MiB, 6) == [new[:MiB]] * 6
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
        assert _read(paths[1]) == _read(paths[0]) == _read(paths[2])
        events = [r.getMessage() for r in caplog.records]
        assert any("ublk.mirror_resync_start" in m for m in events)
        progress = [m for m in events if "ublk.mirror_resync " in m and "percent=" in m]
        assert len(progress) >= 2, events  # a line per region here (progress_interval 0)
        assert any("ublk.mirror_resync_done" in m for m in events)
        assert any("ublk.mirror_replica_in_sync" in m for m in events)
        state = MirrorState(f"{paths[0]}.mirror.db", paths, None)
        try:
            assert state.stale() == [] and state.in_sync() == [0, 1, 2]
        finally:
            state.close()


@pytest.mark.timeout(90)
async def test_writes_during_the_resync_reach_every_replica(ring_backend: str) -> None:
    with short_tmpdir() as d:
        paths = _files(d, 2, 64 * MiB)
        target = MirrorTarget(paths, region=MiB)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _client(srv.sock_path)
                try:
                    bad = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                    os.dup2(bad, target.fds[1])
                    os.close(bad)
                    await _write(c, 0, os.urandom(MiB))
                    assert target.healthy == [0]
                finally:
                    await c.close()
        finally:
            target.close()
        target = MirrorTarget(paths)
        want = bytearray(_read(paths[0]))
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _client(srv.sock_path)
                try:
                    for i in range(32):
                        off = ((i * 7) % 64) * MiB + 4096 * i
                        data = bytes([i + 1]) * 65536
                        await _write(c, off, data, cookie=i + 1)
                        want[off : off + len(data)] = data
                    await _until(lambda: target.healthy == [0, 1])
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
        assert _read(paths[0]) == bytes(want)
        assert _read(paths[1]) == bytes(want)


@pytest.mark.timeout(90)
async def test_regions_in_flight_at_a_crash_read_the_same_until_resynced(
    ring_backend: str,
) -> None:
    """SIGKILL while writes are in flight; then the replicas differ where they were
    (made so here: replica 1 holds other bytes in that region).  After the restart
    every read of that region returns the same bytes, and the resync makes the
    replicas equal; a region no write touched is not copied."""
    with short_tmpdir() as d:
        paths = _files(d, 2, 8 * MiB)
        sock = os.path.join(d, "s.sock")
        spec = f"m=mirror:{paths[0]},{paths[1]},region=1M"
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "-e",
            spec,
            "--socket",
            sock,
            "--backend",
            ring_backend,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await _until(lambda: os.path.exists(sock))
            c = await _client(sock)
            await _write(c, 6 * MiB, b"\x66" * MiB)  # region 6: written, then quiet
            for i in range(400):  # keep regions 0 and 5 busy, never waiting for replies
                c.request(
                    WRITE, (0 if i % 2 else 5 * MiB) + (i % 16) * 4096, 4096, i, 0, b"\x33" * 4096
                )
            await asyncio.wait_for(c.writer.drain(), 10)
            await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            c.writer.transport.abort()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        db = sqlite3.connect(f"{paths[0]}.mirror.db")
        try:
            dirty = {r for (r,) in db.execute("SELECT region FROM dirty")}
        finally:
            db.close()
        assert {0, 5} <= dirty, dirty
        # The in-flight writes reached replica 0 but not replica 1:
        with open(paths[1], "r+b") as f:
            f.write(b"\xee" * MiB)
        with open(paths[0], "r+b") as f:
            f.seek(7 * MiB)
            f.write(b"\x77" * 4096)  # outside any dirty region: left alone by the resync
        first = _read(paths[0], 0, MiB)
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            target = srv.service.exports[0].target
            assert isinstance(target, MirrorTarget)
            c = await _client(srv.sock_path)
            try:
                got = await _reads(c, 0, MiB, 8)
                assert got == [first] * 8  # never alternating
                await _until(lambda: not target.unsafe)
                assert await _reads(c, 0, MiB, 4) == [first] * 4
                await _until(lambda: 0 not in target.state.dirty and 5 not in target.state.dirty)
            finally:
                await c.close()
            assert await settle(srv.service) == NO_LEAKS
        assert _read(paths[0], 0, 7 * MiB) == _read(paths[1], 0, 7 * MiB)
        assert _read(paths[1], 7 * MiB, 4096) == bytes(4096)


def test_mirror_state_refuses_other_replicas() -> None:
    with short_tmpdir() as d:
        paths = _files(d, 3, MiB)
        MirrorTarget(paths[:2]).close()
        with pytest.raises(ValueError, match="belongs to replicas"):
            MirrorTarget([paths[0], paths[2]])
