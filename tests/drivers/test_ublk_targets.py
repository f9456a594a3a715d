"""Every target through real NBD clients: integrity, mirror fan-out and failure,
linear mapping persisted across a restart."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from aiofused_drivers.ublk import LinearTarget, LoopTarget, MirrorTarget, SqliteMappingStore
from aiofused_drivers.ublk import _targets as targets_mod
from aiofused_drivers.ublk.testing import (
    RawClient,
    missing_tools,
    run_client,
    serve,
    settle,
    short_tmpdir,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
_reason = missing_tools("qemu-io", "nbdcopy", "fio", "nbdinfo")
requires_clients = pytest.mark.skipif(_reason is not None, reason=_reason or "")
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}


def _files(d: str, n: int, size: int, prefix: str = "r") -> list[str]:
    paths = []
    for i in range(n):
        p = os.path.join(d, f"{prefix}{i}.img")
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    return paths


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    r = (await run_client(*argv, uri)).check()
    out = r.stdout + r.stderr
    assert "Pattern verification failed" not in out, out
    assert "failed" not in out.lower(), out
    return out


def _spec(kind: str, d: str) -> str:
    if kind == "null":
        return "null:32M"
    if kind == "loop":
        return "loop:" + _files(d, 1, 32 * MiB, "loop")[0]
    if kind == "mirror":
        return "mirror:" + ",".join(_files(d, 3, 32 * MiB))
    pvs = _files(d, 2, 20 * MiB, "pv")
    return f"linear:{os.path.join(d, 'map.db')},pv={pvs[0]},pv={pvs[1]},size=32M,extent=1M"


@requires_clients
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["null", "loop", "mirror", "linear"])
async def test_target_integrity(kind: str, ring_backend: str) -> None:
    with short_tmpdir() as d:
        async with serve(backend=ring_backend, exports=[f"disk={_spec(kind, d)}"]) as srv:
            u = srv.uri("disk")
            if kind == "null":
                await qemu_io(u, "write -P 0x55 0 1M", "read -P 0 0 1M", "flush")
            else:
                await qemu_io(
                    u,
                    "write -P 0x11 0 64k",
                    "write -P 0x22 1536k 2M",  # spans three 1 MiB extents
                    "write -z 8M 1M",
                    "write -P 0x33 31M 1M",
                    "discard 20M 1M",
                    "flush",
                    "read -P 0x11 0 64k",
                    "read -P 0x22 1536k 2M",
                    "read -P 0 8M 1M",
                    "read -P 0 12M 1M",  # never written: zeroes
                    "read -P 0x33 31M 1M",
                )
                src = os.path.join(d, "src.img")
                out = os.path.join(d, "out.img")
                with open(src, "wb") as f:
                    f.write(os.urandom(32 * MiB))
                (await run_client("nbdcopy", src, u, timeout=60)).check()
                (await run_client("nbdcopy", u, out, timeout=60)).check()
                assert _read(src) == _read(out)
            assert await settle(srv.service) == NO_LEAKS


async def _fio(uri: str, size: str = "16M", runtime: float = 0, **extra: str) -> dict[str, object]:
    argv = [
        "fio",
        "--name=w",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
    ]
    argv += [f"--{k}={v}" for k, v in extra.items()]
    r = (await run_client(*argv, timeout=80)).check()
    report: dict[str, object] = json.loads(r.stdout[r.stdout.index("{") :])
    return report


@requires_clients
@pytest.mark.timeout(90)
async def test_mirror_replicas_identical_after_random_writes(ring_backend: str) -> None:
    with short_tmpdir() as d:
        paths = _files(d, 3, 32 * MiB)
        async with serve(backend=ring_backend, exports=["m=mirror:" + ",".join(paths)]) as srv:
            report = await _fio(srv.uri("m"))
            assert report["jobs"][0]["error"] == 0  # type: ignore[index]
            await qemu_io(srv.uri("m"), "write -z 1M 64k", "discard 2M 64k", "flush")
            assert await settle(srv.service) == NO_LEAKS
        first = _read(paths[0])
        assert first.count(0) < len(first)  # something was written
        assert _read(paths[1]) == first and _read(paths[2]) == first


@requires_clients
@pytest.mark.timeout(90)
async def test_mirror_replica_failing_mid_run(ring_backend: str) -> None:
    with short_tmpdir() as d:
        paths = _files(d, 3, 32 * MiB)
        target = MirrorTarget(paths)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                fio = asyncio.create_task(_fio(srv.uri("m"), size="24M"))
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                # Let fio get going, then make replica 1 fail every read and write.
                while loop.time() < deadline and os.stat(paths[0]).st_blocks < 2048:
                    await asyncio.sleep(0.02)
                bad = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                os.dup2(bad, target.fds[1])
                os.close(bad)
                report = await fio
                job = report["jobs"][0]  # type: ignore[index]
                assert job["error"] == 0  # the verify pass read good data
                assert target.healthy == [0, 2]
                await qemu_io(srv.uri("m"), "write -P 0x44 0 64k", "read -P 0x44 0 64k")
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
        assert _read(paths[0]) == _read(paths[2])
        assert _read(paths[0])[:65536] == b"\x44" * 65536


@requires_clients
@pytest.mark.timeout(60)
async def test_mirror_replica_failing_fsync_is_taken_out(ring_backend: str) -> None:
    """A replica whose fsync fails (here: its fd now names /dev/zero, where writes
    vanish, reads return zeroes and fsync is EINVAL) leaves service at the FLUSH or FUA
    write that found it; the request still succeeds on the other replicas, and no
    later read is served from it."""
    with short_tmpdir() as d:
        paths = _files(d, 3, 8 * MiB)
        target = MirrorTarget(paths)
        try:
            async with serve(backend=ring_backend, targets=[("m", target, False)]) as srv:
                u = srv.uri("m")
                await qemu_io(u, "write -P 0x11 0 64k", "flush")
                assert target.healthy == [0, 1, 2]
                bad = os.open("/dev/zero", os.O_RDWR)
                os.dup2(bad, target.fds[1])
                os.close(bad)
                await qemu_io(u, "write -P 0x22 0 64k", "flush")
                assert target.healthy == [0, 2]
                await qemu_io(u, *["read -P 0x22 0 64k"] * 4, "write -f -P 0x33 1M 64k")
                # The same through FUA alone: replica 2 fails at a FUA write.
                bad = os.open("/dev/zero", os.O_RDWR)
                os.dup2(bad, target.fds[2])
                os.close(bad)
                await qemu_io(u, "write -f -P 0x44 2M 64k", *["read -P 0x44 2M 64k"] * 3)
                assert target.healthy == [0]
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
        with open(paths[0], "rb") as f:
            assert f.read(65536) == b"\x22" * 65536
            f.seek(MiB)
            assert f.read(65536) == b"\x33" * 65536
            f.seek(2 * MiB)
            assert f.read(65536) == b"\x44" * 65536


@requires_clients
@pytest.mark.timeout(60)
async def test_linear_mapping_persists_across_restart(ring_backend: str) -> None:
    with short_tmpdir() as d:
        pvs = _files(d, 2, 8 * MiB, "pv")
        db = os.path.join(d, "map.db")
        spec = f"lv=linear:{db},pv={pvs[0]},pv={pvs[1]},size=64M,extent=1M"
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            u = srv.uri("lv")
            await qemu_io(u, "write -P 0xa1 0 4k", "write -P 0xb2 40M 1M", "write -P 0xc3 63M 8k")
            await qemu_io(u, "read -P 0 10M 1M", "read -P 0xb2 40M 1M")
            r = (await run_client("nbdinfo", "--map", u)).check()
            assert "hole" in r.stdout and "data" in r.stdout
            assert await settle(srv.service) == NO_LEAKS
        store = SqliteMappingStore(db)
        try:
            assert store.mapped_count() == 3
            mapped = {le: store.lookup(le) for le in (0, 40, 63)}
            assert all(m is not None for m in mapped.values())
            assert store.lookup(10) is None
        finally:
            store.close()
        # Written data really went to the PV extents the table names.
        pv, pe = mapped[40]  # type: ignore[misc]
        with open(pvs[pv], "rb") as f:
            f.seek(pe * MiB)
            assert f.read(MiB) == b"\xb2" * MiB
        # Restart from the database alone.
        async with serve(backend=ring_backend, exports=[f"lv=linear:{db}"]) as srv:
            u = srv.uri("lv")
            await qemu_io(
                u,
                "read -P 0xa1 0 4k",
                "read -P 0xb2 40M 1M",
                "read -P 0xc3 63M 8k",
                "read -P 0 20M 1M",
                read_only=True,
            )
            target = srv.service.exports[0].target
            assert isinstance(target, LinearTarget) and target.size == 64 * MiB


@requires_clients
async def test_linear_out_of_space_is_an_error_not_corruption(ring_backend: str) -> None:
    with short_tmpdir() as d:
        pvs = _files(d, 1, 2 * MiB, "pv")
        db = os.path.join(d, "map.db")
        async with serve(
            backend=ring_backend, exports=[f"lv=linear:{db},pv={pvs[0]},size=8M,extent=1M"]
        ) as srv:
            u = srv.uri("lv")
            await qemu_io(u, "write -P 1 0 1M", "write -P 2 4M 1M")
            r = await run_client("qemu-io", "-f", "raw", "-c", "write -P 3 6M 4k", u)
            assert "No space left" in r.stdout + r.stderr or r.returncode != 0
            await qemu_io(u, "read -P 1 0 1M", "read -P 2 4M 1M", "read -P 0 6M 4k")
            assert await settle(srv.service) == NO_LEAKS


_READ, _WRITE, _FLUSH, _TRIM, _WRITE_ZEROES = 0, 1, 3, 4, 6
_FUA, _NO_HOLE = 1 << 0, 1 << 1


@pytest.mark.parametrize("kind", ["loop", "mirror", "linear"])
async def test_trim_and_zeroes_run_on_the_ring(
    ring_backend: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Every file-backed target turns TRIM and WRITE_ZEROES into FALLOCATE SQEs (punch
    hole; zero range for NO_HOLE) on the places its mapping names, never into blocking
    calls on the loop; the device then reads zeroes there and the data elsewhere."""

    def blocking(*args: object) -> None:
        raise AssertionError("a blocking fallocate on the loop")

    with short_tmpdir() as d:
        files = _files(d, 2 if kind == "mirror" else 1, 4 * MiB)
        spec = {
            "loop": f"t=loop:{files[0]}",
            "mirror": "t=mirror:" + ",".join(files),
            "linear": f"t=linear:{d}/map.db,pv={files[0]},size=4M,extent=1M",
        }[kind]
        data = os.urandom(4 * MiB)
        want = bytearray(data)
        for off, n in ((0, MiB), (2 * MiB, 64 * 1024), (3 * MiB, 64 * 1024)):
            want[off : off + n] = bytes(n)
        async with serve(backend=ring_backend, exports=[spec]) as srv:
            c = await RawClient.connect(srv.sock_path)
            try:
                await c.go("t")
                for k in range(4):
                    c.request(_WRITE, k * MiB, MiB, cookie=10 + k, payload=data[k * MiB :][:MiB])
                    assert await c.simple_reply() == (0, 10 + k, b"")
                # From here on (the writes above allocated the linear extents, which
                # zeroes them first, as the mapping commit, on the loop):
                monkeypatch.setattr(targets_mod, "zero_range", blocking)
                monkeypatch.setattr(targets_mod, "punch", blocking)
                c.request(_TRIM, 0, MiB, cookie=1)
                c.request(_WRITE_ZEROES, 2 * MiB, 64 * 1024, cookie=2, flags=_NO_HOLE | _FUA)
                c.request(_WRITE_ZEROES, 3 * MiB, 64 * 1024, cookie=3)
                replies = sorted([await c.simple_reply() for _ in range(3)])
                assert replies == [(0, 1, b""), (0, 2, b""), (0, 3, b"")]
                for k in range(4):
                    c.request(_READ, k * MiB, MiB, cookie=20 + k)
                    assert await c.simple_reply(MiB) == (0, 20 + k, want[k * MiB :][:MiB])
            finally:
                await c.close()
            assert await settle(srv.service) == NO_LEAKS
        if kind != "linear":
            for path in files:
                assert _read(path) == want
                fd = os.open(path, os.O_RDONLY)
                try:  # the TRIM really punched: the first MiB is a hole now
                    assert os.lseek(fd, 0, os.SEEK_DATA) >= MiB
                finally:
                    os.close(fd)


async def test_loop_write_zeroes_falls_back_when_fallocate_fails(ring_backend: str) -> None:
    """A backing file that refuses fallocate (here /dev/zero: ENODEV) still gets
    WRITE_ZEROES through the zero_range fallback; TRIM, a hint, succeeds as a no-op."""
    with short_tmpdir() as d:
        (path,) = _files(d, 1, 4 * MiB)
        target = LoopTarget(path)
        try:
            async with serve(backend=ring_backend, targets=[("l", target, False)]) as srv:
                bad = os.open("/dev/zero", os.O_RDWR)
                os.dup2(bad, target.fd)
                os.close(bad)
                c = await RawClient.connect(srv.sock_path)
                try:
                    await c.go("l")
                    c.request(_WRITE_ZEROES, 0, 64 * 1024, cookie=1)
                    c.request(_TRIM, MiB, 64 * 1024, cookie=2)
                    c.request(_WRITE_ZEROES, 2 * MiB, 4096, cookie=3, flags=_FUA)
                    replies = sorted([await c.simple_reply() for _ in range(3)])
                    # FUA after the fallback: fsync of /dev/zero is EINVAL, an EINVAL reply.
                    assert replies == [(0, 1, b""), (0, 2, b""), (22, 3, b"")]
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()


async def test_loop_fsync_errors_are_the_reply(ring_backend: str) -> None:
    """FSYNC results are read, never assumed: they neither sever a link nor show
    under CQE_SKIP_SUCCESS when they fail (as in the kernel), so a FLUSH or FUA WRITE
    whose fsync fails (here the backing fd names /dev/zero: EINVAL) must answer that
    error, and a good FLUSH still answers 0."""
    with short_tmpdir() as d:
        (path,) = _files(d, 1, 4 * MiB)
        target = LoopTarget(path)
        try:
            async with serve(backend=ring_backend, targets=[("l", target, False)]) as srv:
                c = await RawClient.connect(srv.sock_path)
                try:
                    await c.go("l")
                    c.request(_FLUSH, 0, 0, cookie=1)
                    assert await c.simple_reply() == (0, 1, b"")
                    bad = os.open("/dev/zero", os.O_RDWR)
                    os.dup2(bad, target.fd)
                    os.close(bad)
                    c.request(_FLUSH, 0, 0, cookie=2)
                    assert await c.simple_reply() == (22, 2, b"")
                    c.request(_WRITE, 0, 4096, cookie=3, flags=_FUA, payload=b"f" * 4096)
                    assert await c.simple_reply() == (22, 3, b"")
                    c.request(_WRITE, 0, 4096, cookie=4, payload=b"f" * 4096)
                    assert await c.simple_reply() == (0, 4, b"")
                finally:
                    await c.close()
                assert await settle(srv.service) == NO_LEAKS
        finally:
            target.close()
