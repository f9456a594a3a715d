"""Short READ/WRITE secondaries are continued for the rest, as ublk servers do, never
answered with EIO (issue 10, item 4): /dev/zero reads come back short under load (the
null export, unmapped linear space), a read across end of file stops at it."""

from __future__ import annotations

import os

import pytest

from aiofused_drivers.ublk import LoopTarget
from aiofused_drivers.ublk.testing import (
    RawClient,
    missing_tools,
    run_client,
    serve,
    settle,
    short_tmpdir,
)

MiB = 1 << 20
READ, WRITE = 0, 1
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}


def _sparse(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["null", "linear"])
async def test_32_mib_reads_of_zero_space_succeed(ring_backend: str, kind: str) -> None:
    """16 READs of 32 MiB, two in flight at a time, of the null export and of a linear
    volume whose first extent only is mapped: every reply is data, and the right data
    (the zeroes of /dev/zero, the mapped extent's bytes where it is mapped)."""
    with short_tmpdir() as d:
        if kind == "null":
            spec = "z=null:64M"
        else:
            pv = _sparse(os.path.join(d, "pv.img"), 8 * MiB)
            spec = f"z=linear:{d}/map.db,pv={pv},size=64M,extent=1M"
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            c = await RawClient.connect(srv.sock_path)
            try:
                await c.go("z")
                want = bytearray(32 * MiB)
                if kind == "linear":
                    c.request(WRITE, 4096, 8192, cookie=1, payload=b"\x5a" * 8192)
                    assert await c.simple_reply() == (0, 1, b"")
                    want[4096 : 4096 + 8192] = b"\x5a" * 8192
                for i in range(0, 16, 2):
                    c.request(READ, 0, 32 * MiB, cookie=100 + i)
                    c.request(READ, 32 * MiB, 32 * MiB, cookie=101 + i)
                    replies = {}
                    for _ in range(2):
                        err, cookie, data = await c.simple_reply(32 * MiB)
                        assert err == 0, f"READ {cookie} failed with errno {err}"
                        replies[cookie] = data
                    assert replies[100 + i] == want
                    assert replies[101 + i] == bytes(32 * MiB)
            finally:
                await c.close()
            assert await settle(srv.service) == NO_LEAKS


async def test_read_across_end_of_file_is_continued_with_zeroes(ring_backend: str) -> None:
    """A read-only loop export bigger than its file: a READ across the file's end gets
    a short secondary (every time, on both backends), is continued, and reads the
    file's bytes then zeroes."""
    with short_tmpdir() as d:
        path = os.path.join(d, "short.img")
        body = os.urandom(MiB + 5000)
        with open(path, "wb") as f:
            f.write(body)
        target = LoopTarget(path, size=4 * MiB, read_only=True)
        try:
            async with serve(backend=ring_backend, targets=[("s", target, True)]) as srv:
                c = await RawClient.connect(srv.sock_path)
                try:
                    size, _ = await c.go("s")
                    assert size == 4 * MiB
                    c.request(READ, 0, 2 * MiB, cookie=7)
                    err, cookie, data = await c.simple_reply(2 * MiB)
                    assert (err, cookie) == (0, 7)
                    assert data == body + bytes(2 * MiB - len(body))
                    c.request(READ, 3 * MiB, MiB, cookie=8)  # wholly past the end
                    assert await c.simple_reply(MiB) == (0, 8, bytes(MiB))
                finally:
                    await c.close()
                assert srv.service.servers[0].continued >= 2
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()


_reason = missing_tools("nbdcopy")


@pytest.mark.interop
@pytest.mark.timeout(120)
@pytest.mark.skipif(_reason is not None, reason=_reason or "")
async def test_nbdcopy_32_mib_requests_from_the_null_export(ring_backend: str) -> None:
    """The issue's reproducer: ``nbdcopy --no-extents --request-size=33554432`` from a
    null export (it failed 3 times in 3 on the uring backend)."""
    with short_tmpdir() as d:
        out = os.path.join(d, "out.img")
        async with serve(backend=ring_backend, exports=["z=null:256M"]) as srv:
            for _ in range(2):
                r = await run_client(
                    "nbdcopy",
                    "--no-extents",
                    "--request-size=33554432",
                    srv.uri("z"),
                    out,
                    timeout=90,
                )
                r.check()
            assert await settle(srv.service) == NO_LEAKS
        assert os.path.getsize(out) == 256 * MiB
        with open(out, "rb") as f:
            while block := f.read(16 * MiB):
                assert block.count(0) == len(block)
