"""A mirror served by several processes (``nbd serve --workers N``, issue 10): the
replica state in SQLite (WAL) is theirs together.  A replica one process takes out
is read by no other; each process has a write-intent bitmap of its own, and a
region another process's bitmap holds (it writes there, or it died) is read from one
replica only until the resync leader copied it; one process only resyncs."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from typing import Any

import pytest

# The mirror-state tests' helpers: the same replicas, client, writes and reads.
from test_nbd_features import Cli, running
from test_ublk_mirror_state import (
    NO_LEAKS,
    WRITE,
    MiB,
    _client,
    _files,
    _read,
    _reads,
    _write,
)

from aiofused_drivers.ublk import MirrorTarget
from aiofused_drivers.ublk.testing import serve, settle, short_tmpdir


async def _until(cond: Any, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


# A mirror's workers start with a resync leader and stop after its bitmap cleanup:
# the same process helper as the other feature tests, with more time.
_SLOW = 30.0


@pytest.mark.timeout(90)
async def test_a_replica_one_process_took_out_is_read_by_no_other(ring_backend: str) -> None:
    """Two servers on one mirror (this process, and ``nbd serve`` beside it): replica 1
    fails here, a write it missed is acknowledged; every read through the other
    server returns that write, never replica 1's old bytes."""
    with short_tmpdir() as d:
        paths = _files(d, 2, 8 * MiB)
        old, new = b"\x11" * MiB, b"\x22" * MiB
        sock = os.path.join(d, "other.sock")
        spec = f"m=mirror:{paths[0]},{paths[1]},region=1M"
        target = MirrorTarget(paths, region=MiB)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                async with running(
                    "-e", spec, "-U", sock, "--backend", ring_backend, workers=1, timeout=_SLOW
                ):
                    here, there = await _client(srv.sock_path), await _client(sock)
                    try:
                        await _write(here, 0, old)
                        assert await _reads(there, 0, MiB, 4) == [old] * 4
                        bad = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # EISDIR from now on
                        os.dup2(bad, target.fds[1])
                        os.close(bad)
                        await _write(here, 0, new, cookie=2)  # replica 1 misses it
                        assert target.healthy == [0]
                        assert _read(paths[1], 0, MiB) == old
                        assert await _reads(there, 0, MiB, 8) == [new] * 8
                        # And the other server writes replica 0 only now.
                        await _write(there, 2 * MiB, new, cookie=3)
                        assert _read(paths[1], 2 * MiB, MiB) == bytes(MiB)
                    finally:
                        await here.close()
                        await there.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()


def _worker_of(cli: Cli, conn_index: int) -> int:
    return int(cli.events("nbd.connected")[conn_index]["worker"])


@pytest.mark.timeout(120)
async def test_a_killed_worker_s_regions_read_the_same_until_the_leader_copied_them() -> None:
    """--workers 2: SIGKILL the worker writing region 0 while its writes are in flight
    (and replica 1 differs there, as if they reached replica 0 only).  Reads through
    the other worker return one replica's bytes every time, the leader (whichever
    worker it is, or the one that replaced it) copies the region, and the replicas
    end equal."""
    with short_tmpdir() as d:
        paths = _files(d, 2, 8 * MiB)
        sock = os.path.join(d, "s.sock")
        spec = f"m=mirror:{paths[0]},{paths[1]},region=1M"
        async with running(
            "-e", spec, "-U", sock, "--workers", "2", workers=2, timeout=_SLOW
        ) as srv:
            writer = await _client(sock)
            await srv.wait_event("nbd.connected", 1, timeout=_SLOW)
            reader = await _client(sock)
            await srv.wait_event("nbd.connected", 2, timeout=_SLOW)
            victim = _worker_of(srv, 0)
            assert _worker_of(srv, 1) != victim
            try:
                await _write(writer, 0, b"\x33" * 65536)
                for i in range(400):  # region 0 busy, replies never read
                    writer.request(WRITE, (i % 16) * 4096, 4096, i + 10, 0, b"\x44" * 4096)
                await asyncio.wait_for(writer.writer.drain(), 10)
                with open(paths[1], "r+b") as f:  # not where the writes go, same region
                    f.seek(512 * 1024)
                    f.write(b"\xee" * 65536)
                os.kill(victim, signal.SIGKILL)
                writer.writer.transport.abort()
                first = _read(paths[0], 0, MiB)
                got = await _reads(reader, 0, MiB, 8)
                assert got == [got[0]] * 8  # never alternating
                assert got[0] == first
                await _until(lambda: _read(paths[0], 0, MiB) == _read(paths[1], 0, MiB))
                assert await _reads(reader, 0, MiB, 4) == [first] * 4
            finally:
                await reader.close()
            await srv.wait_event("nbd.worker_restarted", timeout=_SLOW)
        assert _read(paths[0]) == _read(paths[1])
        done = srv.events("ublk.mirror_resync_done")
        assert [e["what"] for e in done] == ["dirty regions"], srv.log()


@pytest.mark.timeout(120)
async def test_one_worker_resyncs_and_writes_through_every_worker_reach_every_replica(
    ring_backend: str,
) -> None:
    with short_tmpdir() as d:
        paths = _files(d, 2, 64 * MiB)
        target = MirrorTarget(paths, region=MiB)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv0:
                c = await _client(srv0.sock_path)
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
        want = bytearray(_read(paths[0]))
        sock = os.path.join(d, "s.sock")
        spec = f"m=mirror:{paths[0]},{paths[1]}"
        args = ("-e", spec, "-U", sock, "--workers", "2", "--backend", ring_backend)
        async with running(*args, workers=2, timeout=_SLOW) as srv:
            clients = [await _client(sock), await _client(sock)]
            try:
                await srv.wait_event("nbd.connected", 2, timeout=_SLOW)
                assert len({e["worker"] for e in srv.events("nbd.connected")}) == 2
                for i in range(32):
                    off = ((i * 7) % 64) * MiB + 4096 * i
                    data = bytes([i + 1]) * 65536
                    await _write(clients[i % 2], off, data, cookie=i + 1)
                    want[off : off + len(data)] = data
                await srv.wait_event("ublk.mirror_replica_in_sync", timeout=_SLOW)
                for i in range(8):  # after the resync too
                    off = i * 8 * MiB + 12288
                    data = bytes([0x80 + i]) * 8192
                    await _write(clients[i % 2], off, data, cookie=100 + i)
                    want[off : off + len(data)] = data
                for c in clients:
                    assert await _reads(c, 0, MiB, 2) == [bytes(want[:MiB])] * 2
            finally:
                for c in clients:
                    await c.close()
        assert _read(paths[0]) == bytes(want)
        assert _read(paths[1]) == bytes(want)
        assert len(srv.events("ublk.mirror_leader")) == 1, srv.log()
        starts = srv.events("ublk.mirror_resync_start")
        assert [e["what"] for e in starts] == ["replicas"], srv.log()  # one worker's


def test_a_state_database_of_one_process_is_taken_over() -> None:
    """A state database written before --workers (one bitmap, no owner): its dirty
    regions belong to a process gone, to be copied; the replica counts stay."""
    with short_tmpdir() as d:
        paths = _files(d, 2, 4 * MiB)
        db_path = f"{paths[0]}.mirror.db"
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute("CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT)")
        db.execute(
            "CREATE TABLE replicas (idx INTEGER PRIMARY KEY, path TEXT NOT NULL,"
            " events INTEGER NOT NULL)"
        )
        db.execute("CREATE TABLE dirty (region INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO config VALUES ('region_size', ?)", (str(MiB),))
        db.executemany(
            "INSERT INTO replicas VALUES (?, ?, ?)",
            [(i, os.path.abspath(p), 3) for i, p in enumerate(paths)],
        )
        db.executemany("INSERT INTO dirty VALUES (?)", [(1,), (3,)])
        db.close()
        target = MirrorTarget(paths)
        try:
            assert target.state.events == 3 and target.healthy == [0, 1]
            assert target.state.dirty == {1, 3} and target.unsafe == {1, 3}
            assert target.state.mine == set() and target.state.orphans() == {1, 3}
        finally:
            target.close()


def test_a_leader_lock_that_cannot_be_taken_is_a_value_error() -> None:
    with short_tmpdir() as d:
        paths = _files(d, 2, MiB)
        os.mkdir(f"{paths[0]}.mirror.db-leader")  # not a file: EISDIR
        with pytest.raises(ValueError, match=r"mirror state .*Is a directory"):
            MirrorTarget(paths)
