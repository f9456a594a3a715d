"""A mirror whose replicas are full (issue 10, item 7): ENOSPC is that request's error
(NBD_ENOSPC), the replicas stay in service, and acknowledged blocks still read back.
Each replica lives on its own small tmpfs, so it really runs out of space."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from aiofused_drivers.ublk import MirrorTarget
from aiofused_drivers.ublk.testing import RawClient, serve, settle, short_tmpdir

MiB = 1 << 20
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FUA, NO_HOLE = 1 << 0, 1 << 1
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}


def _cannot_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "not installed: mount (apt-get install mount)"
    return None


pytestmark = pytest.mark.skipif(_cannot_mount() is not None, reason=_cannot_mount() or "")


@contextlib.contextmanager
def small_fs(parent: str, name: str, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` mounted at ``parent/name``, unmounted afterwards."""
    path = os.path.join(parent, name)
    os.mkdir(path)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=20)


def _sparse(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def _connect(path: str) -> RawClient:
    c = await RawClient.connect(path)
    await c.go("m")
    return c


@pytest.mark.timeout(60)
async def test_every_replica_full_is_enospc_and_keeps_the_data(ring_backend: str) -> None:
    with short_tmpdir() as d, small_fs(d, "a", "2m") as a, small_fs(d, "b", "2m") as b:
        paths = [_sparse(os.path.join(fs, "r.img"), 16 * MiB) for fs in (a, b)]
        target = MirrorTarget(paths, state=os.path.join(d, "m.db"))
        data = os.urandom(MiB)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _connect(srv.sock_path)
                try:
                    c.request(WRITE, 0, MiB, cookie=1, payload=data)
                    assert await c.simple_reply() == (0, 1, b"")
                    # 4 MiB into what is left of 2 MiB: short writes, then ENOSPC, on both.
                    c.request(WRITE, 4 * MiB, 4 * MiB, cookie=2, payload=b"\x33" * (4 * MiB))
                    assert (await c.simple_reply())[:2] == (errno.ENOSPC, 2)
                    c.request(WRITE, 8 * MiB, 4 * MiB, cookie=3, flags=FUA, payload=bytes(4 * MiB))
                    assert (await c.simple_reply())[:2] == (errno.ENOSPC, 3)
                    # Zeroes that must be allocated (NO_HOLE): no room either.
                    c.request(WRITE_ZEROES, 12 * MiB, 4 * MiB, cookie=4, flags=NO_HOLE)
                    assert (await c.simple_reply())[:2] == (errno.ENOSPC, 4)
                    assert target.healthy == [0, 1]
                    # The acknowledged block reads back, from either replica.
                    for cookie in range(10, 14):
                        c.request(READ, 0, MiB, cookie=cookie)
                        assert await c.simple_reply(MiB) == (0, cookie, data)
                    # Room again (TRIM punches the failed writes' blocks): writes work.
                    c.request(TRIM, 4 * MiB, 12 * MiB, cookie=20)
                    assert await c.simple_reply() == (0, 20, b"")
                    c.request(WRITE, 4 * MiB, 65536, cookie=21, payload=b"\x44" * 65536)
                    assert await c.simple_reply() == (0, 21, b"")
                    c.request(FLUSH, 0, 0, cookie=22)
                    assert await c.simple_reply() == (0, 22, b"")
                    for cookie in (23, 24):
                        c.request(READ, 4 * MiB, 65536, cookie=cookie)
                        assert await c.simple_reply(65536) == (0, cookie, b"\x44" * 65536)
                    c.request(DISC, 0, 0, 0)
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
            assert target.healthy == [0, 1]
        finally:
            target.close()
        for p in paths:
            with open(p, "rb") as f:
                assert f.read(MiB) == data
                f.seek(4 * MiB)
                assert f.read(65536) == b"\x44" * 65536


@pytest.mark.timeout(60)
async def test_one_full_replica_misses_the_write_and_leaves(ring_backend: str) -> None:
    """Replica 0 is full, replica 1 has room: the write succeeds (replica 1 holds
    it), and replica 0, which missed it, is never read again."""
    with short_tmpdir() as d, small_fs(d, "a", "2m") as a:
        paths = [
            _sparse(os.path.join(a, "r0.img"), 16 * MiB),
            _sparse(os.path.join(d, "r1.img"), 16 * MiB),
        ]
        target = MirrorTarget(paths, state=os.path.join(d, "m.db"))
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                c = await _connect(srv.sock_path)
                try:
                    payload = os.urandom(4 * MiB)
                    c.request(WRITE, 0, 4 * MiB, cookie=1, payload=payload)
                    assert await c.simple_reply() == (0, 1, b"")
                    assert target.healthy == [1]
                    for cookie in range(2, 6):
                        c.request(READ, 0, 4 * MiB, cookie=cookie)
                        assert await c.simple_reply(4 * MiB) == (0, cookie, payload)
                    c.request(DISC, 0, 0, 0)
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
