"""What users of nbdkit and qemu-nbd expect of ``nbd serve`` (issue 10): the NBD port
10809 when ``--listen`` names no port, read-only exports (one, or all), and
NBD_FLAG_CAN_MULTI_CONN, so nbdcopy and qemu open several connections; against the
real clients (libnbd's nbdinfo/nbdcopy, qemu-io)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiofused_drivers.ublk import LoopTarget
from aiofused_drivers.ublk.testing import (
    RawClient,
    missing_tools,
    run_client,
    serve,
    settle,
    short_tmpdir,
    uri,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
CLI = [sys.executable, "-m", "aiofused_drivers.ublk.cli", "nbd", "serve"]
READ, WRITE, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 3, 4, 6
NO_LEAKS = {"buffers": 0, "lent": 0, "inflight": 0, "connections": 0}


def _skip(*tools: str) -> pytest.MarkDecorator:
    reason = missing_tools(*tools)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _file(d: str, name: str, size: int, data: bytes = b"") -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


async def _info(u: str) -> dict[str, Any]:
    r = (await run_client("nbdinfo", "--json", u, timeout=20)).check()
    (export,) = json.loads(r.stdout)["exports"]
    return dict(export)


class Cli:
    """``nbd serve`` as a process, its JSON log lines collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace"))

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    async def wait_event(self, name: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while len(self.events(name)) < count:
                if self.proc.returncode is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}: {self.log()}")
                await asyncio.sleep(0.05)
        return self.events(name)[count - 1]

    def log(self) -> str:
        return "".join(self.lines)[-4000:]

    async def stop(self, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM: {self.log()}") from None
        await self._reader
        return code


@contextlib.asynccontextmanager
async def running(*args: str, workers: int = 1, timeout: float = 20) -> AsyncIterator[Cli]:
    """``nbd serve ARGS`` until every worker listens (within ``timeout``); on exit,
    SIGTERM and a clean exit 0 within ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        "--log-format",
        "json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    cli = Cli(proc)
    try:
        await cli.wait_event("nbd.listening", count=workers, timeout=timeout)
        yield cli
    finally:
        code = await cli.stop(timeout)
        assert code == 0, cli.log()


# ---- the default port -------------------------------------------------------------------


def _port_10809_busy() -> str | None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 10809))
        except OSError as e:
            return f"port 10809 is busy on this machine ({e.strerror})"
    return None


@_skip("nbdinfo")
@pytest.mark.timeout(60)
async def test_listen_without_a_port_uses_the_nbd_port_10809() -> None:
    busy = _port_10809_busy()
    if busy:
        pytest.skip(busy)
    async with running("-e", "z=null:16M", "--listen", "127.0.0.1") as srv:
        event = srv.events("nbd.listening")[0]
        assert event["address"] == "127.0.0.1:10809", event
        # nbd:// URIs without a port mean 10809, as for nbdkit and qemu-nbd.
        info = await _info("nbd://127.0.0.1/z")
        assert info["export-size"] == 16 * MiB


@pytest.mark.timeout(60)
async def test_listen_port_0_still_picks_a_free_port_and_logs_it() -> None:
    async with running("-e", "z=null:16M", "--listen", "127.0.0.1:0") as srv:
        host, _, port = srv.events("nbd.listening")[0]["address"].rpartition(":")
        assert host == "127.0.0.1" and int(port) not in (0, 10809)
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", int(port)), 10)
        c = RawClient(r, w)
        try:
            assert (await c.go("z"))[0] == 16 * MiB
        finally:
            await c.close()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("127.0.0.1:x", "invalid address '127.0.0.1:x'"),
        ("127.0.0.1:70000", "port 70000 is not in 0-65535"),
        ("[::1", "invalid address '[::1'"),
        ("", "invalid address ''"),
    ],
)
async def test_bad_listen_address_is_one_line_naming_it(value: str, needle: str) -> None:
    r = await run_client(*CLI, "-e", "z=null:1M", "--listen", value, timeout=30)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- read-only exports ---------------------------------------------------------------


@_skip("nbdinfo", "qemu-io")
async def test_one_export_read_only_beside_a_writable_one(ring_backend: str) -> None:
    """``NAME=TARGET:ARGS,ro``: NBD_FLAG_READ_ONLY on that export only; its writes,
    trims and zeroes are EPERM and its file is unchanged, the other one is written."""
    with short_tmpdir() as d:
        golden = _file(d, "golden.img", 4 * MiB, os.urandom(4 * MiB))
        scratch = _file(d, "scratch.img", 4 * MiB)
        with open(golden, "rb") as f:
            before = f.read()
        exports = [f"scratch=loop:{scratch}", f"golden=loop:{golden},ro", "zero=null:1M,ro"]
        async with serve(backend=ring_backend, exports=exports) as srv:
            ro, rw, zero = [await _info(srv.uri(n)) for n in ("golden", "scratch", "zero")]
            assert ro["is_read_only"] is True and ro["can_trim"] is False
            assert ro["can_zero"] is False and ro["export-size"] == 4 * MiB
            assert zero["is_read_only"] is True
            assert rw["is_read_only"] is False and rw["can_trim"] and rw["can_zero"]
            r = await run_client("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri("golden"))
            assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
            (
                await run_client(
                    "qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", srv.uri("scratch")
                )
            ).check()
            c = await RawClient.connect(srv.sock_path)
            try:
                await c.go("golden")
                c.request(WRITE, 0, 4096, cookie=1, payload=b"\x01" * 4096)
                assert await c.simple_reply() == (errno.EPERM, 1, b"")
                c.request(TRIM, 0, 4096, cookie=2)
                assert await c.simple_reply() == (errno.EPERM, 2, b"")
                c.request(WRITE_ZEROES, 4096, 4096, cookie=3)
                assert await c.simple_reply() == (errno.EPERM, 3, b"")
                c.request(READ, 0, 4096, cookie=4)
                assert await c.simple_reply(4096) == (0, 4, before[:4096])
                c.request(FLUSH, 0, 0, cookie=5)
                assert await c.simple_reply() == (0, 5, b"")
            finally:
                await c.close()
            assert await settle(srv.service) == NO_LEAKS
        with open(golden, "rb") as f:
            assert f.read() == before
        with open(scratch, "rb") as f:
            assert f.read(4096) == b"\x07" * 4096


@_skip("nbdinfo")
@pytest.mark.timeout(60)
async def test_cli_ro_suffix_and_global_read_only() -> None:
    """``-e NAME=...,ro`` makes one export read-only; ``--read-only`` (``-r``, as
    ``nbdkit -r`` and ``qemu-nbd -r``) all of them."""
    with short_tmpdir() as d:
        a, b, sock = _file(d, "a.img", MiB), _file(d, "b.img", MiB), os.path.join(d, "s.sock")
        async with running("-e", f"a=loop:{a}", "-e", f"b=loop:{b},ro", "-U", sock):
            assert (await _info(uri(sock, "a")))["is_read_only"] is False
            assert (await _info(uri(sock, "b")))["is_read_only"] is True
        async with running("-e", f"a=loop:{a}", "-e", "z=null,ro", "-U", sock, "-r"):
            assert (await _info(uri(sock, "a")))["is_read_only"] is True
            z = await _info(uri(sock, "z"))
            assert z["is_read_only"] is True and z["export-size"] == 1 << 30


async def test_help_documents_ro_and_the_default_port() -> None:
    r = (await run_client(*CLI, "--help", timeout=30)).check()
    assert "NAME=TARGET:ARGS[,ro]" in r.stdout and "10809" in r.stdout
    assert "--read-only" in r.stdout


# ---- NBD_FLAG_CAN_MULTI_CONN -----------------------------------------------------------


class _PerConnectionTarget(LoopTarget):
    """A target that could not keep CAN_MULTI_CONN's promise (it says so)."""

    multi_conn = False


@_skip("nbdinfo")
async def test_can_multi_conn_is_advertised_where_it_holds(ring_backend: str) -> None:
    with short_tmpdir() as d:
        loop, m1, m2, pv = (_file(d, n, 8 * MiB) for n in ("l.img", "m1", "m2", "pv"))
        other = _file(d, "other.img", MiB)
        exports = [
            "z=null:8M",
            f"l=loop:{loop}",
            f"m=mirror:{m1},{m2}",
            f"lv=linear:{os.path.join(d, 'map.db')},pv={pv},extent=1M",
            f"ro=loop:{other},ro",
        ]
        targets = [("no", _PerConnectionTarget(other), False)]
        async with serve(backend=ring_backend, exports=exports, targets=targets) as srv:
            for name in ("z", "l", "m", "lv", "ro"):
                assert (await _info(srv.uri(name)))["can_multi_conn"] is True, name
            assert (await _info(srv.uri("no")))["can_multi_conn"] is False


def _connected(srv: Cli, export: str) -> list[dict[str, Any]]:
    return [e for e in srv.events("nbd.connected") if e.get("export") == export]


@_skip("nbdcopy", "cmp")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["loop", "linear"])
async def test_nbdcopy_opens_several_connections_over_two_workers(kind: str) -> None:
    """CAN_MULTI_CONN: nbdcopy ``-C 4 -T 4`` opens four connections (one only
    without the flag), spread over two worker processes; what one worker wrote is
    read back whole through the others (a linear export's mapping shared in SQLite)."""
    with short_tmpdir() as d:
        src = _file(d, "src.img", 32 * MiB, os.urandom(32 * MiB))
        out, sock = os.path.join(d, "out.img"), os.path.join(d, "s.sock")
        if kind == "loop":
            spec = f"disk=loop:{_file(d, 'disk.img', 32 * MiB)}"
        else:
            pv0, pv1 = _file(d, "pv0", 20 * MiB), _file(d, "pv1", 20 * MiB)
            spec = f"disk=linear:{os.path.join(d, 'map.db')},pv={pv0},pv={pv1},size=32M,extent=1M"
        async with running("-e", spec, "-U", sock, "--workers", "2", workers=2) as srv:
            u = uri(sock, "disk")
            assert (await _info(u))["can_multi_conn"] is True
            before = len(_connected(srv, "disk"))
            (await run_client("nbdcopy", "-C", "4", "-T", "4", src, u, timeout=90)).check()
            (await run_client("nbdcopy", "-C", "4", "-T", "4", u, out, timeout=90)).check()
            (await run_client("cmp", src, out)).check()
            await asyncio.sleep(0.2)
            conns = _connected(srv, "disk")[before:]
        assert len(conns) == 8, conns  # four in, four out
        assert len({e["worker"] for e in conns}) == 2, conns


@_skip("qemu-nbd")
async def test_qemu_nbd_list_shows_multi_conn_and_read_only(ring_backend: str) -> None:
    """qemu's own view of the flags (``qemu-nbd --list``): ``multi`` on every export,
    ``readonly`` on the ``,ro`` one only."""
    with short_tmpdir() as d:
        disk = _file(d, "disk.img", MiB)
        exports = [f"d=loop:{disk}", "r=null:1M,ro"]
        async with serve(backend=ring_backend, exports=exports) as srv:
            r = (await run_client("qemu-nbd", "--list", "-k", srv.sock_path)).check()
        flags = {
            name: line
            for name, line in zip(
                re.findall(r"export: '(\w+)'", r.stdout),
                re.findall(r"flags: (.*)", r.stdout),
                strict=True,
            )
        }
        assert "multi" in flags["d"] and "readonly" not in flags["d"], r.stdout
        assert "multi" in flags["r"] and "readonly" in flags["r"], r.stdout
