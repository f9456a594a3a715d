"""``aiofused proxy`` end to end in a subprocess: JSON logs, workers, signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

PROXY = [sys.executable, "-m", "aiofused", "proxy"]  # the `aiofused proxy` command


class ProxyProcess:
    """A running ``aiofused proxy`` with its stderr parsed as JSON log lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode().strip()
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(text))
            self._changed.set()

    async def wait_event(self, name: str, count: int = 1, timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                found = [e for e in self.events if e.get("event") == name]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"proxy exited before {name!r}: {self.raw}")
                self._changed.clear()
                await self._changed.wait()

    async def port(self) -> int:
        ev = await self.wait_event("proxy_listening")
        return int(str(ev["address"]).rsplit(":", 1)[1])

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def proxy_process(*args: str) -> AsyncIterator[ProxyProcess]:
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        *args,
        "--log-format",
        "json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    p = ProxyProcess(proc)
    try:
        yield p
    finally:
        p.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await proc.wait()
                await p._reader


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


async def roundtrip(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    w.write_eof()
    try:
        async with asyncio.timeout(20):
            return await r.read()
    finally:
        w.close()


async def test_serves_logs_json_and_exits_0_on_sigterm() -> None:
    async with (
        echo_server() as up,
        echo_server() as mirror,
        proxy_process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{up}",
            "--mirror",
            f"127.0.0.1:{mirror}",
            "--max-connections",
            "16",
        ) as p,
    ):
        port = await p.port()
        payload = os.urandom(1_000_000)
        assert await roundtrip(port, payload) == payload
        assert await p.stop(signal.SIGTERM) == 0
    assert p.events, "no JSON log lines"
    assert all(line.startswith("{") for line in p.raw if line), p.raw
    names = [e["event"] for e in p.events]
    assert "proxy_shutdown" in names and "proxy_stopped" in names
    stopped = next(e for e in p.events if e["event"] == "proxy_stopped")
    assert stopped["bytes_upstream"] == 1_000_000
    assert stopped["connections_active"] == 0


async def test_sigterm_stops_accepting_and_closes_in_flight() -> None:
    async with (
        echo_server() as up,
        proxy_process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{up}",
            "--shutdown-timeout",
            "1",
        ) as p,
    ):
        port = await p.port()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"in flight")
        assert await asyncio.wait_for(r.readexactly(9), 10) == b"in flight"
        p.proc.send_signal(signal.SIGTERM)
        await p.wait_event("proxy_shutdown")
        # The open connection is closed after the 1 s grace period.
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""
        w.close()
        assert await p.stop() == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_unix_listen_and_sigint(tmp_path: Any) -> None:
    path = str(tmp_path / "proxy.sock")
    async with (
        echo_server() as up,
        proxy_process("--listen", f"unix:{path}", "--upstream", f"127.0.0.1:{up}") as p,
    ):
        await p.wait_event("proxy_listening")
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"over unix")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b"over unix"
        w.close()
        assert await p.stop(signal.SIGINT) == 0
    assert not os.path.exists(path)


async def test_workers_share_the_port() -> None:
    async with (
        echo_server() as up,
        proxy_process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{up}",
            "--workers",
            "2",
            "--max-connections",
            "64",
        ) as p,
    ):
        await p.wait_event("proxy_listening", count=2)
        pids = {e["pid"] for e in p.events if e["event"] == "proxy_listening"}
        assert len(pids) == 2
        port = await p.port()
        payloads = [os.urandom(50_000 + i) for i in range(40)]
        replies = await asyncio.gather(*(roundtrip(port, x) for x in payloads))
        assert replies == payloads
        assert await p.stop() == 0
    stopped = [e for e in p.events if e["event"] == "proxy_stopped"]
    assert len(stopped) == 2
    assert sum(e["connections_total"] for e in stopped) == 40
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_refused_upstream_is_logged() -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        dead = hole.getsockname()[1]
        async with proxy_process("--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{dead}") as p:
            port = await p.port()
            assert await roundtrip(port, b"hello?") == b""
            ev = await p.wait_event("upstream_connect_failed")
            assert "ConnectionRefusedError" in ev["error"]
            assert await p.stop() == 0


async def test_invalid_settings_exit_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--max-connections",
        "100",
        "--pool-size",
        "10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"pool-size" in err


async def test_example_proxy_relays_and_mirrors() -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "zero_copy_proxy.py")
    mirrored: list[bytes] = []
    got_mirror = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        mirrored.append(await r.read())
        got_mirror.set()
        w.close()

    mirror = await asyncio.start_server(sink, "127.0.0.1", 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    async with echo_server() as up:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            example,
            str(listen),
            str(up),
            str(mirror.sockets[0].getsockname()[1]),
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        drain: asyncio.Task[bytes] | None = None
        try:
            async with asyncio.timeout(20):
                # The example prints its banner once it listens: no probe connection
                # (which would be proxied and mirrored as a session of its own).
                banner = await proc.stderr.readline()
                assert f"proxy 127.0.0.1:{listen}".encode() in banner, banner
                drain = asyncio.create_task(proc.stderr.read())
                payload = os.urandom(3_000_000)
                assert await roundtrip(listen, payload) == payload
                await got_mirror.wait()
            assert mirrored == [payload]
        finally:
            proc.terminate()
            await proc.wait()
            if drain is not None:
                await drain
            mirror.close()
            await mirror.wait_closed()


async def test_demo_showcase_verifies_both_copies() -> None:
    import io

    from aiofused_drivers.demo.showcase import run_proxy_showcase

    out = io.StringIO()
    result = await run_proxy_showcase(16 * 1024 * 1024, mirrors=1, out=out)
    assert result["ok"], out.getvalue()
    assert result["verified"] == {"upstream": True, "mirror 1": True}
    assert result["python_copied_bytes"] == 0
    assert result["mirror_dropped_bytes"] == 0
    text = out.getvalue()
    assert "identical, byte for byte" in text and "bytes copied in Python 0" in text
