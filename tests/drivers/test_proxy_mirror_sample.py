"""``--mirror-sample PERCENT`` and the per-mirror counters (connections, bytes sent, bytes
dropped, lag) in the statistics, the logs and the Prometheus metrics.

In-process proxies on loopback (clients from several 127.0.0.x addresses), and the
``aiofused proxy`` command for the flag's validation and the final log line.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
from typing import Any

import pytest
from test_proxy_cli import PROXY, echo_server, proxy_process, roundtrip
from test_proxy_e2e import (
    Upstream,
    no_leaks,
    ring_backend_for_proxies,
    running_proxy,
    sha,
    wait_idle,
)

from aiofused_drivers.relay.proxy import mirror_sampled

__all__ = ["no_leaks", "ring_backend_for_proxies"]  # autouse fixtures, used by name


# ---- the decision ----------------------------------------------------------------------------


def _addresses(n: int) -> list[tuple[str, int]]:
    rng = random.Random(11)
    return [
        (f"127.0.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(65536)) for _ in range(n)
    ]


def test_sampling_is_stable_proportional_and_nested() -> None:
    peers = _addresses(20_000)
    at = {p: {peer for peer in peers if mirror_sampled(peer, p)} for p in (0, 10, 25, 50, 100)}
    assert not at[0] and len(at[100]) == len(peers)
    for p in (10, 25, 50):
        assert abs(len(at[p]) / len(peers) - p / 100) < 0.015, (p, len(at[p]))
    # Raising the percentage only adds connections.
    assert at[10] <= at[25] <= at[50] <= at[100]
    # The same answer for the same address, in another process too (no salted hash()).
    code = (
        "from aiofused_drivers.relay.proxy import mirror_sampled as s;"
        f"print(''.join('1' if s(p, 25) else '0' for p in {peers[:200]!r}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "".join("1" if p in at[25] else "0" for p in peers[:200])


def test_unix_clients_are_sampled_by_connection_number() -> None:
    picked = [mirror_sampled("", 50, conn_id=i) for i in range(2000)]
    assert 0.45 < sum(picked) / len(picked) < 0.55
    assert picked == [mirror_sampled("", 50, conn_id=i) for i in range(2000)]


# ---- end to end ---------------------------------------------------------------------------------


async def _from(host: str, port: int, payload: bytes) -> tuple[tuple[str, int], bytes]:
    """Send ``payload`` from ``host`` (a loopback address), half-close, read the reply."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        me = sock.getsockname()
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := await loop.sock_recv(sock, 65536):
            chunks.append(data)
        return me, b"".join(chunks)
    finally:
        sock.close()


async def test_sampled_connections_are_mirrored_whole_the_rest_not_at_all() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randint(1, 300_000)) for _ in range(40)]
    async with (
        Upstream("sink") as up,
        Upstream("sink") as mirror,
        # A mirror still connecting when a client's first byte arrives may take its time.
        running_proxy(up.endpoint, (mirror.endpoint,), mirror_sample=50, mirror_grace=2) as proxy,
    ):
        port = proxy.address[1]
        async with asyncio.timeout(30):
            results = await asyncio.gather(
                *(_from(f"127.0.0.{2 + i % 20}", port, p) for i, p in enumerate(payloads))
            )
            await wait_idle(proxy)
            for rec in mirror.records:
                await rec.done.wait()
        for (_, reply), p in zip(results, payloads, strict=True):
            assert reply == sha(p).encode(), "the main path lost integrity"
        chosen = [p for (me, _), p in zip(results, payloads, strict=True) if mirror_sampled(me, 50)]
        assert 0 < len(chosen) < len(payloads), "a 50% sample took all or none of 40"
        # Exactly the sampled connections reached the mirror, each one whole.
        assert sorted(r.sha for r in mirror.records) == sorted(sha(p) for p in chosen)
        assert all(r.eof for r in mirror.records)
        st = proxy.stats
        assert (st.connections_mirrored, st.connections_not_mirrored) == (
            len(chosen),
            len(payloads) - len(chosen),
        )
        row = proxy.mirror_statistics()[str(mirror.endpoint)]
        assert row["connections"] == len(chosen)
        assert row["bytes"] == sum(map(len, chosen)) and row["dropped_bytes"] == 0
        assert row["open"] == 0 and row["lag_bytes"] == 0


async def test_sample_0_opens_no_mirror_connection() -> None:
    async with (
        Upstream("echo") as up,
        Upstream("sink") as mirror,
        running_proxy(up.endpoint, (mirror.endpoint,), mirror_sample=0) as proxy,
    ):
        async with asyncio.timeout(10):
            for i in range(5):
                _, reply = await _from("127.0.0.1", proxy.address[1], b"x%d" % i)
                assert reply == b"x%d" % i
        await wait_idle(proxy)
        assert mirror.records == []
        assert proxy.stats.connections_not_mirrored == 5
        assert proxy.stats.mirror_dropped_bytes == 0


def _metric(families: list[Any], name: str, **labels: str) -> float:
    for fam in families:
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no {name} {labels}")


async def test_a_stalled_mirror_shows_its_lag_then_its_dropped_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mirror that reads nothing: its lag grows while the main path is served; when it
    is cut, what it missed is dropped, counted per mirror, and said in the cut's log."""
    loop = asyncio.get_running_loop()
    mib = 1024 * 1024
    async with (
        Upstream("sink") as up,
        Upstream("stall") as mirror,
        running_proxy(up.endpoint, (mirror.endpoint,), mirror_lag=8 * mib) as proxy,
    ):
        name = str(mirror.endpoint)
        sock = socket.create_connection(proxy.address)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(20):
                while proxy.mirror_statistics()[name]["open"] < 1:  # connected: not cut
                    await asyncio.sleep(0.01)
                await loop.sock_sendall(sock, os.urandom(2 * mib))
                # Counted once a chunk's command is done, its mirror send settled before.
                while proxy.stats.bytes_upstream < 2 * mib:
                    await asyncio.sleep(0.01)
                fams = proxy.metric_families()
                row = proxy.mirror_statistics()[name]
                assert row["open"] == 1 and row["bytes"] == 2 * mib and row["dropped_bytes"] == 0
                # The mirror's receive window took some; the rest sits in the proxy's socket.
                assert 256 * 1024 < row["lag_bytes"] <= 2 * mib, row
                assert _metric(fams, "aiofused_proxy_mirror_lag_bytes", mirror=name) > 256 * 1024
                assert _metric(fams, "aiofused_proxy_mirror_connections_total", mirror=name) == 1
                # 24 MiB more: the mirror's 8 MiB of lag is exceeded, it is cut.
                await loop.sock_sendall(sock, os.urandom(24 * mib))
                sock.shutdown(socket.SHUT_WR)
                assert await loop.sock_recv(sock, 100)  # the sink's digest: main path whole
                await wait_idle(proxy)
        finally:
            sock.close()
        row = proxy.mirror_statistics()[name]
        assert row["failures"] == 1 and row["dropped_bytes"] > 0
        assert row["bytes"] + row["dropped_bytes"] == 26 * mib
        fams = proxy.metric_families()
        assert (
            _metric(fams, "aiofused_proxy_mirror_dropped_bytes_total", mirror=name)
            == row["dropped_bytes"]
        )
        assert _metric(fams, "aiofused_proxy_mirror_lag_bytes", mirror=name) == 0
    (cut,) = [r.getMessage() for r in caplog.records if "] mirror_cut " in r.getMessage()]
    assert "reason=lagging" in cut and f"mirror={name}" in cut
    sent = int(cut.split("bytes_sent=")[1].split()[0])
    dropped = int(cut.split("bytes_dropped=")[1].split()[0])
    lag = int(cut.split("lag_bytes=")[1].split()[0])
    assert sent >= 2 * mib and dropped > 0 and lag > 256 * 1024, cut


# ---- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mirror-sample", "150"], "'150'"),
        (["--mirror-sample", "-1"], "'-1'"),
        (["--mirror-sample", "half"], "'half'"),
        (["--mirror-sample", "nan"], "'nan'"),
        (["--mirror-sample", "50"], "--mirror-sample 50: there is no --mirror"),
    ],
)
async def test_bad_mirror_sample_is_one_error_line(args: list[str], needle: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PROXY,
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    (line,) = err.decode().splitlines()
    assert "--mirror-sample" in line and needle in line, line


async def test_final_log_line_has_the_per_mirror_counters() -> None:
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
            "--mirror-sample",
            "100%",
        ) as p,
    ):
        port = await p.port()
        payload = os.urandom(200_000)
        assert await roundtrip(port, payload) == payload
        assert await p.stop() == 0
    stopped = next(e for e in p.events if e["event"] == "proxy_stopped")
    assert stopped["connections_mirrored"] == 1 and stopped["connections_not_mirrored"] == 0
    row = stopped["mirrors"][f"127.0.0.1:{mirror}"]
    assert row["connections"] == 1 and row["bytes"] == 200_000
    assert row["dropped_bytes"] == 0 and row["lag_bytes"] == 0


async def test_stats_interval_logs_the_lag_of_a_stalled_mirror() -> None:
    """``--stats-interval``: ``proxy_stats`` lines while it runs, with each mirror's lag."""
    loop = asyncio.get_running_loop()
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(4)  # accepted by the kernel, never read
    try:
        async with (
            echo_server() as up,
            proxy_process(
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{up}",
                "--mirror",
                f"127.0.0.1:{stall.getsockname()[1]}",
                "--stats-interval",
                "0.2",
            ) as p,
        ):
            name = f"127.0.0.1:{stall.getsockname()[1]}"
            port = await p.port()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            try:
                payload = os.urandom(2 * 1024 * 1024)
                async with asyncio.timeout(20):
                    sender = asyncio.create_task(loop.sock_sendall(sock, payload))
                    got = 0
                    while got < len(payload):  # the echo: the main path is not held up
                        got += len(await loop.sock_recv(sock, 65536))
                    await sender
                    count = 1
                    while True:  # every byte counted, and much of it not taken yet
                        ev = await p.wait_event("proxy_stats", count=count)
                        count += 1
                        row = ev["mirrors"][name]
                        if row["bytes"] == len(payload) and row["lag_bytes"] > 256 * 1024:
                            break
                assert row["open"] == 1 and row["dropped_bytes"] == 0
                assert ev["bytes_upstream"] == len(payload)
            finally:
                sock.close()
            assert await p.stop() == 0
    finally:
        stall.close()
