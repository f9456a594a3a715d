"""``nbd serve --workers N`` as processes (issue 10, item 6): a worker killed by a
signal is logged and replaced and the server goes on; workers that keep dying make it
give up with a non-zero status, never 0.  Also: Ctrl-C (SIGINT to the whole process
group) is one clean shutdown, and ``--listen HOST:0`` logs the port it got."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiofused_drivers.ublk.testing import RawClient, short_tmpdir

CLI = [sys.executable, "-m", "aiofused_drivers.ublk.cli", "nbd", "serve"]
MiB = 1 << 20


class Server:
    """``nbd serve`` in a session of its own, its JSON log lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.stderr.append(text)
            if text.startswith("{"):
                self.events.append(json.loads(text))

    async def wait_event(self, name: str, count: int = 1, timeout: float = 20) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            found = [e for e in self.events if e["event"] == name]
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.returncode is None or not self._reader.done(), self.log()
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name} x{count} within {timeout}s\n{self.log()}")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def log(self) -> str:
        return "\n".join(self.stderr[-60:])

    def workers(self) -> list[int]:
        """The server's child processes now."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]

    async def wait_exit(self, timeout: float = 20) -> int:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"server still running after {timeout}s\n{self.log()}") from None
        await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode or 0

    async def kill_all(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for child in self._children_safe():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def _children_safe(self) -> list[int]:
        try:
            return self.workers()
        except OSError:
            return []


@contextlib.asynccontextmanager
async def running(*args: str) -> AsyncIterator[Server]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        "--log-format",
        "json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    srv = Server(proc)
    try:
        yield srv
    finally:
        await srv.kill_all()


async def read_zeroes(sock: str, n: int = 4) -> None:
    """``n`` clients, each reads 64 KiB of the null export."""
    for i in range(n):
        c = await asyncio.wait_for(RawClient.connect(sock), 10)
        try:
            await asyncio.wait_for(c.go("z"), 10)
            c.request(0, i * 65536, 65536, cookie=i)
            assert await c.simple_reply(65536) == (0, i, bytes(65536))
            c.request(2, 0, 0, 0)
        finally:
            await c.close()


async def new_workers(srv: Server, old: set[int], timeout: float = 20) -> list[int]:
    """Wait until the server has two workers again, one of them not in ``old``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        now = srv.workers()
        if len(now) == 2 and set(now) - old:
            return now
        assert srv.proc.returncode is None, srv.log()
        await asyncio.sleep(0.02)
    raise AssertionError(f"no worker replaced within {timeout}s\n{srv.log()}")


@pytest.mark.timeout(90)
async def test_a_killed_worker_is_replaced_and_the_server_goes_on() -> None:
    with short_tmpdir() as d:
        sock = os.path.join(d, "s.sock")
        async with running("-e", "z=null:16M", "--socket", sock, "--workers", "2") as srv:
            await srv.wait_event("nbd.listening", count=2)
            await read_zeroes(sock)
            first = srv.workers()
            assert len(first) == 2
            victim = first[0]
            os.kill(victim, signal.SIGKILL)
            now = await new_workers(srv, set(first))
            assert victim not in now and first[1] in now
            died = await srv.wait_event("nbd.worker_died")
            assert (died["worker"], died["signal"]) == (victim, "SIGKILL")
            restarted = await srv.wait_event("nbd.worker_restarted")
            assert restarted["replaces"] == victim and restarted["worker"] in now
            await srv.wait_event("nbd.listening", count=3)  # the new worker serves
            await read_zeroes(sock, 6)
            srv.proc.send_signal(signal.SIGTERM)
            assert await srv.wait_exit() == 0, srv.log()
        assert not srv.named("nbd.forced_exit")
        assert srv.named("nbd.stopped")


@pytest.mark.timeout(120)
async def test_workers_that_keep_dying_end_the_server_non_zero() -> None:
    with short_tmpdir() as d:
        sock = os.path.join(d, "s.sock")
        async with running("-e", "z=null:16M", "--socket", sock, "--workers", "2") as srv:
            await srv.wait_event("nbd.listening", count=2)
            known = set(srv.workers())
            for _ in range(5):  # MAX_RESTARTS
                now = srv.workers()
                os.kill(now[0], signal.SIGKILL)
                now = await new_workers(srv, known)
                known |= set(now)
            os.kill(srv.workers()[0], signal.SIGKILL)
            code = await srv.wait_exit()
            assert code != 0, srv.log()
            assert srv.named("nbd.giving_up")
            assert len(srv.named("nbd.worker_died")) == 6


@pytest.mark.timeout(60)
async def test_ctrl_c_is_one_clean_shutdown_with_workers() -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C: every process got it
    once from the terminal and the workers once more from the parent, which they took
    for a second Ctrl-C (nbd.forced_exit, exit 1)."""
    with short_tmpdir() as d:
        sock = os.path.join(d, "s.sock")
        async with running("-e", "z=null:16M", "--socket", sock, "--workers", "2") as srv:
            await srv.wait_event("nbd.listening", count=2)
            await read_zeroes(sock, 2)
            os.killpg(srv.proc.pid, signal.SIGINT)
            assert await srv.wait_exit() == 0, srv.log()
            assert not srv.named("nbd.forced_exit"), srv.log()
            assert len(srv.named("nbd.stopped")) == 2
            assert not os.path.exists(sock)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_listen_port_0_logs_the_bound_port(workers: str) -> None:
    async with running("-e", "z=null:16M", "--listen", "127.0.0.1:0", "--workers", workers) as srv:
        event = await srv.wait_event("nbd.listening")
        host, _, port = event["address"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0, event
        if workers == "2":
            assert srv.named("nbd.dispatching")[0]["address"] == event["address"]
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", int(port)), 10)
        c = RawClient(r, w)
        try:
            size, _ = await c.go("z")
            assert size == 16 * MiB
            c.request(0, 0, 4096, cookie=5)
            assert await c.simple_reply(4096) == (0, 5, bytes(4096))
        finally:
            await c.close()
        srv.proc.send_signal(signal.SIGTERM)
        assert await srv.wait_exit() == 0, srv.log()
