"""Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img/qemu-io, fio) against the
in-process server with a ``loop`` target.  Each client runs in a subprocess."""

from __future__ import annotations

import json
import os
import re

import pytest

from aiofused_drivers.ublk import ExportSpec
from aiofused_drivers.ublk.testing import missing_tools, run_client, serve, settle, short_tmpdir

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _skip(*tools: str) -> pytest.MarkDecorator:
    reason = missing_tools(*tools)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _random_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _sparse_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@_skip("nbdinfo")
async def test_nbdinfo_plain_list_and_map(ring_backend: str) -> None:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        _sparse_file(disk, 64 * MiB)
        with open(disk, "r+b") as f:
            f.seek(8 * MiB)
            f.write(b"x" * MiB)
        async with serve(
            backend=ring_backend, exports=[f"disk={'loop:' + disk}", "zero=null:16M"]
        ) as srv:
            r = (await run_client("nbdinfo", srv.uri("disk"), timeout=20)).check()
            assert "export-size: 67108864" in r.stdout
            assert "structured" in r.stdout
            assert "can_flush: true" in r.stdout and "can_fua: true" in r.stdout
            assert "base:allocation" in r.stdout

            r = (await run_client("nbdinfo", "--list", srv.uri(), timeout=20)).check()
            assert 'export="disk"' in r.stdout and 'export="zero"' in r.stdout

            r = (await run_client("nbdinfo", "--map", srv.uri("disk"), timeout=20)).check()
            rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
            data = [(int(row[0]), int(row[1])) for row in rows if row[2] == "0"]
            assert (8 * MiB, MiB) in data or any(
                s <= 8 * MiB and s + n >= 9 * MiB for s, n in data
            ), r.stdout
            assert any("hole" in line for line in r.stdout.splitlines()), r.stdout

            r = (await run_client("nbdinfo", "--map", srv.uri("zero"), timeout=20)).check()
            assert "hole,zero" in r.stdout

            r = await run_client("nbdinfo", srv.uri("missing"), timeout=20)
            assert r.returncode != 0
            assert await settle(srv.service) == {
                "buffers": 0,
                "lent": 0,
                "inflight": 0,
                "connections": 0,
            }


@_skip("nbdcopy", "cmp")
@pytest.mark.timeout(120)
async def test_nbdcopy_in_and_out_identical(ring_backend: str) -> None:
    with short_tmpdir() as d:
        src, disk, out = (os.path.join(d, n) for n in ("src.img", "disk.img", "out.img"))
        _random_file(src, 128 * MiB)
        _sparse_file(disk, 128 * MiB)
        async with serve(backend=ring_backend, exports=[f"disk=loop:{disk}"]) as srv:
            (await run_client("nbdcopy", src, srv.uri("disk"), timeout=90)).check()
            (await run_client("nbdcopy", srv.uri("disk"), out, timeout=90)).check()
            (await run_client("cmp", src, out)).check()
            (await run_client("cmp", src, disk)).check()
            assert (await settle(srv.service))["buffers"] == 0


@_skip("qemu-img")
async def test_qemu_img_info_compare_convert(ring_backend: str) -> None:
    with short_tmpdir() as d:
        src, disk, out = (os.path.join(d, n) for n in ("src.img", "disk.img", "out.img"))
        _random_file(src, 32 * MiB)
        _sparse_file(disk, 32 * MiB)
        async with serve(backend=ring_backend, exports=[f"disk=loop:{disk}"]) as srv:
            u = srv.uri("disk")
            r = (await run_client("qemu-img", "info", u)).check()
            assert "32 MiB" in r.stdout
            conv = ("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, u)
            (await run_client(*conv)).check()
            r = (await run_client("qemu-img", "compare", "-f", "raw", "-F", "raw", src, u)).check()
            assert "identical" in r.stdout
            back = ("qemu-img", "convert", "-f", "raw", "-O", "raw", u, out)
            (await run_client(*back)).check()
            with open(src, "rb") as a, open(out, "rb") as b:
                assert a.read() == b.read()
            r = (await run_client("qemu-img", "map", "--output=json", "-f", "raw", u)).check()
            assert json.loads(r.stdout)


@_skip("qemu-io")
async def test_qemu_io_patterns_zeroes_discard_flush(ring_backend: str) -> None:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        _random_file(disk, 16 * MiB)
        async with serve(backend=ring_backend, exports=[f"disk=loop:{disk}"]) as srv:
            cmds = [
                "write -P 0xab 0 1M",
                "read -P 0xab 0 1M",
                "write -P 0x5a 1536 4k",  # unaligned to 4k, FUA by qemu-io default
                "read -P 0x5a 1536 4k",
                "write -z 2M 1M",
                "read -P 0 2M 1M",
                "discard 4M 1M",
                "flush",
                "aio_write -P 0x11 8M 64k",
                "aio_write -P 0x22 9M 64k",
                "aio_flush",
                "read -P 0x11 8M 64k",
                "read -P 0x22 9M 64k",
            ]
            argv = ["qemu-io", "-f", "raw"]
            for c in cmds:
                argv += ["-c", c]
            r = (await run_client(*argv, srv.uri("disk"))).check()
            assert "Pattern verification failed" not in r.stdout + r.stderr
            assert "error" not in r.stdout.lower(), r.stdout
        with open(disk, "rb") as f:
            data = f.read()
        assert data[:1536] == b"\xab" * 1536
        assert data[1536 + 4096 : MiB] == b"\xab" * (MiB - 1536 - 4096)
        assert data[1536 : 1536 + 4096] == b"\x5a" * 4096
        assert data[2 * MiB : 3 * MiB] == bytes(MiB)
        assert data[8 * MiB : 8 * MiB + 65536] == b"\x11" * 65536


@_skip("fio")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("iodepth", [1, 32])
async def test_fio_verify_crc32c(iodepth: int, ring_backend: str) -> None:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        _sparse_file(disk, 64 * MiB)
        async with serve(backend=ring_backend, exports=[f"disk=loop:{disk}"]) as srv:
            r = await run_client(
                "fio",
                "--name=verify",
                "--ioengine=nbd",
                f"--uri={srv.uri('disk')}",
                "--rw=randwrite",
                "--bs=4k",
                f"--iodepth={iodepth}",
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--output-format=json",
                timeout=80,
            )
            r.check()
            report = json.loads(r.stdout[r.stdout.index("{") :])
            job = report["jobs"][0]
            assert job["error"] == 0
            assert job["write"]["io_bytes"] >= 16 * MiB
            assert job["read"]["io_bytes"] >= 16 * MiB  # the verify pass
            assert await settle(srv.service) == {
                "buffers": 0,
                "lent": 0,
                "inflight": 0,
                "connections": 0,
            }


@_skip("qemu-io", "nbdinfo")
async def test_read_only_export(ring_backend: str) -> None:
    with short_tmpdir() as d:
        disk = os.path.join(d, "disk.img")
        _random_file(disk, 4 * MiB)
        with open(disk, "rb") as f:
            before = f.read()
        async with serve(
            backend=ring_backend, exports=[ExportSpec("ro", f"loop:{disk}", read_only=True)]
        ) as srv:
            r = (await run_client("nbdinfo", srv.uri("ro"))).check()
            assert re.search(r"is_read_only: true", r.stdout)
            r = await run_client("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri("ro"))
            assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
            r = await run_client("qemu-io", "-f", "raw", "-r", "-c", "read -v 0 512", srv.uri("ro"))
            r.check()
        with open(disk, "rb") as f:
            assert f.read() == before
