"""``nbd serve`` as a process: unix and TCP sockets, named and read-only exports,
several workers, structured logs, clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import sys

import pytest

from aiofused_drivers.ublk.testing import (
    RawClient,
    missing_tools,
    run_client,
    serve,
    short_tmpdir,
    uri,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
_reason = missing_tools("nbdinfo", "qemu-io")
requires_clients = pytest.mark.skipif(_reason is not None, reason=_reason or "")
CLI = [sys.executable, "-m", "aiofused_drivers.ublk.cli", "nbd", "serve"]


class Server:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            _, err = await asyncio.wait_for(self.proc.communicate(), 20)
        except TimeoutError:
            self.proc.kill()
            _, err = await self.proc.communicate()
            raise AssertionError("server did not stop on SIGTERM") from None
        return self.proc.returncode or 0, err.decode(errors="replace")


async def start(*args: str, wait_for: str | tuple[str, int]) -> Server:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        if proc.returncode is not None:
            _, err = await proc.communicate()
            raise AssertionError(f"server exited {proc.returncode}: {err.decode()[-2000:]}")
        if isinstance(wait_for, str):
            if os.path.exists(wait_for):
                break
        else:
            with socket.socket() as s:
                if s.connect_ex(wait_for) == 0:
                    break
        await asyncio.sleep(0.05)
    else:
        proc.kill()
        await proc.communicate()
        raise AssertionError("server did not start listening")
    await asyncio.sleep(0.1)
    return Server(proc)


def _disk(d: str, name: str = "disk.img", size: int = 16 * MiB) -> str:
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


@requires_clients
@pytest.mark.timeout(60)
async def test_serve_unix_named_exports_and_clean_shutdown() -> None:
    with short_tmpdir() as d:
        disk, sock = _disk(d), os.path.join(d, "s.sock")
        srv = await start(
            "--export",
            f"disk=loop:{disk}",
            "--export",
            "zero=null:size=8M",
            "--socket",
            sock,
            "--log-format",
            "json",
            wait_for=sock,
        )
        try:
            r = (await run_client("nbdinfo", "--list", uri(sock))).check()
            assert 'export="disk"' in r.stdout and 'export="zero"' in r.stdout
            u = uri(sock, "disk")
            qio = ("qemu-io", "-f", "raw", "-c", "write -P 9 0 64k", "-c", "read -P 9 0 64k", u)
            (await run_client(*qio)).check()
            r = (await run_client("nbdinfo", "--size", uri(sock, "zero"))).check()
            assert r.stdout.strip() == str(8 * MiB)
        finally:
            code, err = await srv.stop()
        assert code == 0, err
        events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert "nbd.listening" in events and "nbd.stopped" in events
        assert "nbd.connected" in events
        assert not os.path.exists(sock)
        with open(disk, "rb") as f:
            assert f.read(65536) == b"\x09" * 65536


@requires_clients
@pytest.mark.timeout(60)
async def test_serve_tcp_read_only_two_workers() -> None:
    with short_tmpdir() as d:
        disk = _disk(d)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = await start(
            "--export",
            f"disk=loop:{disk}",
            "--listen",
            f"127.0.0.1:{port}",
            "--read-only",
            "--workers",
            "2",
            wait_for=("127.0.0.1", port),
        )
        try:
            u = f"nbd://127.0.0.1:{port}/disk"
            results = await asyncio.gather(*(run_client("nbdinfo", u) for _ in range(4)))
            for r in results:
                assert "is_read_only: true" in r.check().stdout
            r = await run_client("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", u)
            assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
            (await run_client("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 64k", u)).check()
        finally:
            code, err = await srv.stop()
        assert code == 0, err


@requires_clients
@pytest.mark.timeout(60)
async def test_workers_get_connections_evenly_and_share_data() -> None:
    """--workers 2: the parent hands each connection to the least busy worker, so four
    clients that stay connected land two per worker; a write served by one worker is
    read back through the other (one page cache, CAN_MULTI_CONN)."""
    with short_tmpdir() as d:
        disk, sock = _disk(d), os.path.join(d, "s.sock")
        srv = await start(
            "--export",
            f"disk=loop:{disk}",
            "--socket",
            sock,
            "--workers",
            "2",
            "--log-format",
            "json",
            wait_for=sock,
        )
        clients: list[RawClient] = []
        try:
            for _ in range(4):
                c = await RawClient.connect(sock)
                await c.go("disk")
                clients.append(c)
            data = os.urandom(4096)
            clients[0].request(1, 8192, 4096, cookie=7, payload=data)  # WRITE
            assert await clients[0].simple_reply() == (0, 7, b"")
            for k, c in enumerate(clients[1:], start=1):
                c.request(0, 8192, 4096, cookie=k)  # READ
                assert await c.simple_reply(4096) == (0, k, data)
        finally:
            for c in clients:
                await c.close()
            code, err = await srv.stop()
        assert code == 0, err
        logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        workers = [e["worker"] for e in logs if e["event"] == "nbd.connected"]
        assert len(workers) == 4 and sorted(collections.Counter(workers).values()) == [2, 2]
        assert not os.path.exists(sock)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--export", "nonsense", "--socket", "/tmp/x.sock"], "'nonsense': expected NAME="),
        (["--export", "d=loop:,ro", "--socket", "/tmp/x.sock"], "expected loop:PATH"),
        (["--export", "d=null:1Q,ro", "--socket", "/tmp/x.sock"], "'1Q'"),
        (["--export", "d=null:1M", "--listen", "h:p"], "invalid address 'h:p'"),
        (
            ["--export", "m=mirror:/a,/b", "--socket", "/tmp/x.sock", "--workers", "2"],
            "/a: no such file",  # with --workers too: the files are what is wrong
        ),
        (
            ["--export", "d=loop:/nonexistent/file", "--socket", "/tmp/nbd-x.sock"],
            "/nonexistent/file: no such file",
        ),
        (
            ["-e", "m=mirror:/dev/null,/dev/zero,state=/nonexistent/m.db", "-U", "/tmp/x.sock"],
            "/nonexistent/m.db: directory /nonexistent does not exist",
        ),
        (
            ["-e", "l=linear:/nonexistent/map.db,pv=/dev/null", "-U", "/tmp/x.sock"],
            "/nonexistent/map.db: directory /nonexistent does not exist",
        ),
        (
            ["-e", "d=null:1M", "-U", "/tmp/x.sock", "--connection-memory", "64K"],
            "--connection-memory",
        ),
        (["-e", "d=null:1M", "-U", "/tmp/x.sock", "--buffer-memory", "16M"], "--buffer-memory"),
    ],
)
async def test_bad_arguments_fail_cleanly(args: list[str], needle: str) -> None:
    """Refused at start-up, in one line naming the bad value, exit status 2 (usage)."""
    r = await run_client(*CLI, *args, timeout=30)
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


async def test_a_state_file_that_is_not_a_database_is_one_error_line() -> None:
    with short_tmpdir() as d:
        a, b, state = _disk(d, "a.img"), _disk(d, "b.img"), _disk(d, "state.db", 4096)
        with open(state, "wb") as f:
            f.write(b"not a database" * 100)
        spec = f"m=mirror:{a},{b},state={state}"
        r = await run_client(*CLI, "-e", spec, "-U", os.path.join(d, "s.sock"), timeout=30)
    assert r.returncode == 1, r.stderr
    assert "nbd.start_failed" in r.stderr and "not a database" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


async def test_socket_buffer_sizes_each_connection() -> None:
    """``socket_buffer`` (``--socket-buffer``) sets SO_SNDBUF/SO_RCVBUF on every
    connection, as far as net.core.[wr]mem_max allow (Linux reports twice the value)."""
    want = 1 << 20
    caps = []
    for name in ("wmem_max", "rmem_max"):
        with open(f"/proc/sys/net/core/{name}") as f:
            caps.append(int(f.read()))
    async with serve(["d=null:1M"], socket_buffer=want) as srv:
        c = await RawClient.connect(srv.sock_path)
        try:
            await c.go("d")
            (conn,) = srv.service.nbd.connections
            snd = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            rcv = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        finally:
            await c.close()
    assert snd == 2 * min(want, caps[0]) and rcv == 2 * min(want, caps[1])
