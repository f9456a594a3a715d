"""``aiofused proxy --workers N``: one instance per address, its workers share the port.

Real ``aiofused proxy`` processes on loopback: a second instance on the same address
must fail to start (one error line, non-zero exit), whatever the worker counts, and
every connection keeps going to the first instance's upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import pytest
from test_proxy_cli import PROXY, echo_server, proxy_process, roundtrip


@contextlib.asynccontextmanager
async def tagging_server(tag: bytes) -> AsyncIterator[int]:
    """Answers every connection with ``tag`` and what it read, then closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            w.write(tag + await r.read())
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("first", "second"), [(2, 2), (2, 1), (1, 2)])
async def test_second_instance_on_the_same_address_fails_to_start(first: int, second: int) -> None:
    async with (
        tagging_server(b"A") as up_a,
        tagging_server(b"B") as up_b,
        proxy_process(
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{up_a}",
            "--workers",
            str(first),
        ) as a,
    ):
        try:
            await a.wait_event("proxy_listening", count=first)
        except TimeoutError:
            pytest.fail(f"the first instance's workers did not all listen: {a.raw}")
        port = await a.port()
        b = await asyncio.create_subprocess_exec(
            *PROXY,
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"127.0.0.1:{up_b}",
            "--workers",
            str(second),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        started = False
        try:
            async with asyncio.timeout(10):
                _, err = await b.communicate()
        except TimeoutError:
            started = True
            os.killpg(b.pid, signal.SIGKILL)  # its workers too
            _, err = await b.communicate()
        assert not started, f"a second instance started on 127.0.0.1:{port}: {err!r}"
        lines = err.decode().splitlines()
        assert b.returncode == 1, lines
        assert lines == [
            f"aiofused proxy: error: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]
        # Every connection still reaches the first instance's upstream.
        replies = await asyncio.gather(*(roundtrip(port, b"%d" % i) for i in range(30)))
        assert replies == [b"A%d" % i for i in range(30)]
        assert await a.stop() == 0


async def test_workers_share_one_listening_socket_and_stop_cleanly() -> None:
    """Two workers serve one port; after SIGTERM nothing listens there any more."""
    async with (
        echo_server() as up,
        proxy_process(
            "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{up}", "--workers", "2"
        ) as p,
    ):
        await p.wait_event("proxy_listening", count=2)
        port = await p.port()
        payloads = [b"x" * (1000 + i) for i in range(40)]
        assert await asyncio.gather(*(roundtrip(port, x) for x in payloads)) == payloads
        assert await p.stop() == 0
    stopped = [e for e in p.events if e["event"] == "proxy_stopped"]
    assert len(stopped) == 2 and sum(e["connections_total"] for e in stopped) == 40
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
