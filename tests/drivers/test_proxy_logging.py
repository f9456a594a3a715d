"""What the proxy logs when things go wrong repeatedly: a dead mirror or upstream is one
warning per interval with a count of those held back, and reaching and leaving
``--max-connections`` are each logged once.

In-process proxies on loopback; the log lines are the ones structlog renders.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys

import pytest
from test_proxy_e2e import (
    RefusedPort,
    Upstream,
    exchange,
    no_leaks,
    ring_backend_for_proxies,
    running_proxy,
    wait_idle,
)

__all__ = ["no_leaks", "ring_backend_for_proxies"]  # autouse fixtures, used by name


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    pattern = re.compile(rf"\] {event}\s")
    return [r.getMessage() for r in caplog.records if pattern.search(r.getMessage())]


def suppressed(line: str) -> int:
    m = re.search(r"\bsuppressed=(\d+)", line)
    return int(m.group(1)) if m else 0


def events(cuts: list[str]) -> int:
    """How many warnings these lines stand for: one each, or a summary's count."""
    return sum(suppressed(x) or 1 for x in cuts)


async def test_dead_mirror_warns_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiofused.proxy")
    with RefusedPort() as dead:
        async with (
            Upstream("echo") as up,
            running_proxy(up.endpoint, (dead,), warn_interval=1.5) as proxy,
        ):
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(20):
                assert await exchange(proxy.address[1], b"request %d" % i) == b"request %d" % i
            await wait_idle(proxy)
            assert proxy.stats.mirror_failures == 20
            if loop.time() - start < 1.2:  # all 20 in the first interval (a slow machine: skip)
                assert len(lines(caplog, "mirror_cut")) == 1
            async with asyncio.timeout(5):  # the interval ends: one line with the count
                while events(lines(caplog, "mirror_cut")) < 20:
                    await asyncio.sleep(0.05)
    cuts = lines(caplog, "mirror_cut")
    assert events(cuts) == 20, cuts
    assert suppressed(cuts[0]) == 0 and "reason=connect_failed" in cuts[0]
    assert 2 <= len(cuts) <= 4, cuts
    assert f"mirror=127.0.0.1:{dead.port}" in cuts[-1] and "interval=1.5" in cuts[-1]


async def test_refused_upstream_warning_is_rate_limited_and_flushed_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with RefusedPort() as dead:
        async with running_proxy(dead, warn_interval=60) as proxy:
            for _ in range(5):
                assert await exchange(proxy.address[1], b"hello?") == b""
            await wait_idle(proxy)
            assert len(lines(caplog, "upstream_connect_failed")) == 1
        # Closing the server logs what it still held back.
    failed = lines(caplog, "upstream_connect_failed")
    assert [suppressed(x) for x in failed] == [0, 4], failed
    assert proxy.stats.upstream_failures == 5


async def test_every_warning_is_logged_with_interval_0(caplog: pytest.LogCaptureFixture) -> None:
    with RefusedPort() as dead:
        async with running_proxy(dead, warn_interval=0) as proxy:
            for _ in range(3):
                assert await exchange(proxy.address[1], b"hello?") == b""
            await wait_idle(proxy)
    assert [suppressed(x) for x in lines(caplog, "upstream_connect_failed")] == [0, 0, 0]


async def test_reaching_and_leaving_max_connections_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiofused.proxy")
    async with Upstream("echo") as up, running_proxy(up.endpoint, max_connections=2) as proxy:
        port = proxy.address[1]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for i, (r, w) in enumerate(conns):
            w.write(b"%d" % i)
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"%d" % i
        async with asyncio.timeout(5):
            while not lines(caplog, "max_connections_reached"):
                await asyncio.sleep(0.01)
        (reached,) = lines(caplog, "max_connections_reached")
        assert "limit=2" in reached and "active=2" in reached
        assert not lines(caplog, "max_connections_left")
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)  # waits in the backlog
        w3.write(b"3")
        conns[0][1].close()
        assert await asyncio.wait_for(r3.readexactly(1), 5) == b"3"
        await asyncio.sleep(0.1)
        assert not lines(caplog, "max_connections_left"), "at the limit again (2 open)"
        conns[1][1].close()  # below the limit, nobody waiting: left
        async with asyncio.timeout(5):
            while not lines(caplog, "max_connections_left"):
                await asyncio.sleep(0.01)
        (left,) = lines(caplog, "max_connections_left")
        assert "limit=2" in left and "waited=1" in left
        w3.close()
        await wait_idle(proxy)
        assert proxy.stats.max_connections_reached == 1
        (fam,) = [
            f for f in proxy.metric_families() if f.name == "aiofused_proxy_max_connections_reached"
        ]
        assert [x.value for x in fam.samples if x.name.endswith("_total")] == [1]


@pytest.mark.parametrize("option", ["--warn-interval", "--stats-interval"])
@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
async def test_bad_interval_is_one_error_line(option: str, value: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiofused",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        option,
        value,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    (line,) = err.decode().splitlines()
    assert option in line and repr(value) in line, line
