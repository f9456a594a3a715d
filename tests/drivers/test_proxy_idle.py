"""``--idle-timeout``: idle means no byte moved either way; a cut resets both sides.

Real loopback sockets on both sides of an in-process proxy: the client and the upstream
are plain sockets of the test, so what each peer sees (a reset, not an end of stream)
is what the kernel tells it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

# The in-process proxy harness: both ring backends, no fd or task left behind.
from test_proxy_e2e import no_leaks, ring_backend_for_proxies, running_proxy, wait_idle

from aiofused_drivers.relay.proxy import Endpoint, _Connection

__all__ = ["no_leaks", "ring_backend_for_proxies"]  # autouse fixtures, used by name


@contextlib.asynccontextmanager
async def listening() -> AsyncIterator[socket.socket]:
    """A loopback listener of the test's own (the upstream)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    try:
        yield lsock
    finally:
        lsock.close()


def proxy_to(upstream: socket.socket, **options: Any) -> Any:
    return running_proxy(Endpoint("127.0.0.1", upstream.getsockname()[1]), **options)


async def test_slow_upstream_with_a_large_upload_is_not_cut() -> None:
    """The upstream reads under 1.6 MB/s, so one 1 MiB chunk takes longer to send than the
    idle timeout once the kernel's buffers (some 4 MB) are full: bytes move all along, the
    upload arrives whole and nothing is cut."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(6 * 1024 * 1024)
    async with (
        listening() as lsock,
        proxy_to(lsock, idle_timeout=0.5, buffer_size=1024 * 1024) as proxy,
    ):
        client = socket.create_connection(proxy.address)
        client.setblocking(False)
        try:
            up, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
            with up:
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sender = asyncio.create_task(loop.sock_sendall(client, payload))
                digest, got = hashlib.sha256(), 0
                async with asyncio.timeout(30):
                    while got < len(payload):
                        data = await loop.sock_recv(up, 16 * 1024)
                        assert data, f"the upstream read an end of stream after {got} bytes"
                        digest.update(data)
                        got += len(data)
                        await asyncio.sleep(0.01)
                    await sender
                assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
                assert proxy.stats.idle_timeouts == 0
                # Still open: the reply direction works after the upload.
                await loop.sock_sendall(up, b"done")
                assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"done"
        finally:
            client.close()


async def _expect_reset(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        while await loop.sock_recv(sock, 65536):
            pass
        pytest.fail("end of stream (FIN) instead of a reset")


async def test_idle_connection_is_reset_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    """Client, upstream and mirror all see a reset: none takes the cut for an end."""
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.INFO, logger="aiofused.proxy")
    async with (
        listening() as lsock,
        listening() as msock,
        running_proxy(
            Endpoint("127.0.0.1", lsock.getsockname()[1]),
            (Endpoint("127.0.0.1", msock.getsockname()[1]),),
            idle_timeout=0.3,
        ) as proxy,
    ):
        client = socket.create_connection(proxy.address)
        client.setblocking(False)
        try:
            up, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
            mirror, _ = await asyncio.wait_for(loop.sock_accept(msock), 5)
            with up, mirror:
                await loop.sock_sendall(client, b"ping")
                assert await asyncio.wait_for(loop.sock_recv(up, 16), 5) == b"ping"
                assert await asyncio.wait_for(loop.sock_recv(mirror, 16), 5) == b"ping"
                await loop.sock_sendall(up, b"pong")
                assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"pong"
                started = loop.time()
                async with asyncio.timeout(5):
                    await _expect_reset(client)
                    await _expect_reset(up)
                    await _expect_reset(mirror)
                assert loop.time() - started >= 0.3
        finally:
            client.close()
        await wait_idle(proxy)
    assert proxy.stats.idle_timeouts == 1
    cuts = [r.getMessage() for r in caplog.records if "idle_timeout" in r.getMessage()]
    assert len(cuts) == 1 and "reset" in cuts[0], cuts


async def test_upstream_that_takes_nothing_for_the_whole_timeout_is_idle() -> None:
    """A send pending on an upstream that reads nothing at all: no byte moves, so the
    connection is idle (a dead upstream must not pin it and its buffers for ever)."""
    loop = asyncio.get_running_loop()
    async with (
        listening() as lsock,
        proxy_to(lsock, idle_timeout=0.4, buffer_size=1024 * 1024) as proxy,
    ):
        client = socket.create_connection(proxy.address)
        client.setblocking(False)
        try:
            up, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
            with up:
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(0.2):
                        await loop.sock_sendall(client, os.urandom(16 * 1024 * 1024))
                async with asyncio.timeout(5):
                    await _expect_reset(client)
        finally:
            client.close()
        await wait_idle(proxy)
    assert proxy.stats.idle_timeouts == 1
    # The cut pipe gave its command back and returned: nothing keeps the connection (a
    # pipe whose cancelled wait never ended kept its pump, hence the connection, alive).
    del proxy
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, _Connection)]


async def test_slow_unix_upstream_is_not_cut(tmp_path: Any) -> None:
    """A unix socket reports no byte counts: a send in flight counts as activity."""
    loop = asyncio.get_running_loop()
    path = str(tmp_path / "up.sock")
    payload = os.urandom(4 * 1024 * 1024)
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    lsock.setblocking(False)
    try:
        async with running_proxy(
            Endpoint(path=path), idle_timeout=0.5, buffer_size=1024 * 1024
        ) as proxy:
            client = socket.create_connection(proxy.address)
            client.setblocking(False)
            try:
                up, _ = await asyncio.wait_for(loop.sock_accept(lsock), 5)
                with up:
                    sender = asyncio.create_task(loop.sock_sendall(client, payload))
                    digest, got = hashlib.sha256(), 0
                    async with asyncio.timeout(30):
                        while got < len(payload):
                            data = await loop.sock_recv(up, 16 * 1024)
                            assert data, f"the upstream read an end of stream after {got} bytes"
                            digest.update(data)
                            got += len(data)
                            await asyncio.sleep(0.01)
                        await sender
                    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
                    assert proxy.stats.idle_timeouts == 0
            finally:
                client.close()
    finally:
        lsock.close()
