"""``proxy --metrics`` and ``nbd serve --metrics``: a Prometheus endpoint, scraped while
traffic runs (issue 13, item 12)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiofused_drivers.ublk.testing import RawClient

AIOFUSED = [sys.executable, "-m", "aiofused"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(
    port: int, path: str = "/metrics"
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_scrapable(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            scrape(port)
            return
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err.decode()


def one_line(p: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert p.returncode == status, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr)


# ---- usage errors ----------------------------------------------------------------------

COMMANDS = {
    "proxy": ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"],
    "nbd": ["nbd", "serve", "-e", "d=null:1M", "--listen", "127.0.0.1:0"],
}


@pytest.mark.parametrize("kind", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("127.0.0.1:99999", "0-65535"),
        ("127.0.0.1", "HOST:PORT"),
        ("localhost:http", "HOST:PORT"),
    ],
)
def test_invalid_metrics_address_is_a_one_line_usage_error(
    kind: str, bad: str, needle: str
) -> None:
    p = subprocess.run(
        [*AIOFUSED, *COMMANDS[kind], "--metrics", bad], capture_output=True, text=True, timeout=30
    )
    one_line(p, 2, "--metrics", repr(bad), needle)


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_metrics_with_several_workers_is_refused(kind: str) -> None:
    args = [*AIOFUSED, *COMMANDS[kind], "--workers", "2", "--metrics", "127.0.0.1:0"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    one_line(p, 2, "--metrics with --workers 2", "--workers 1")


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_metrics_address_in_use_names_it(kind: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [*AIOFUSED, *COMMANDS[kind], "--metrics", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "AIOFUSED_BACKEND": "asyncio"},
        )
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert errors == [
        f"aiofused {' '.join(COMMANDS[kind][: 2 if kind == 'nbd' else 1])}: "
        f"error: --metrics 127.0.0.1:{port}: cannot listen: Address already in use"
    ]


# ---- the proxy -------------------------------------------------------------------------


@contextlib.contextmanager
def sink_server() -> Iterator[tuple[int, list[int]]]:
    """Accepts connections and reads everything (the upstream and the mirror)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    got = [0]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = lsock.accept()
                threading.Thread(target=drain, args=(conn,), daemon=True).start()

    def drain(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                got[0] += len(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield lsock.getsockname()[1], got
    finally:
        lsock.close()


@pytest.mark.timeout(90)
def test_proxy_metrics_scraped_while_traffic_runs() -> None:
    with sink_server() as (up, _), sink_server() as (mirror, mirrored):
        listen, mport = free_port(), free_port()
        proc = subprocess.Popen(
            [
                *AIOFUSED,
                "proxy",
                "--listen",
                f"127.0.0.1:{listen}",
                "--upstream",
                f"127.0.0.1:{up}",
                "--mirror",
                f"127.0.0.1:{mirror}",
                "--metrics",
                f"127.0.0.1:{mport}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_scrapable(mport, proc)
            upstream, mirror_name = f"127.0.0.1:{up}", f"127.0.0.1:{mirror}"
            before = scrape(mport)
            assert value(before, "aiofused_proxy_connections_total", upstream=upstream) == 0
            stop_sending = threading.Event()
            sent = [0]

            def client() -> None:
                chunk = os.urandom(1 << 16)
                with socket.create_connection(("127.0.0.1", listen)) as c:
                    while not stop_sending.is_set():
                        c.sendall(chunk)
                        sent[0] += len(chunk)
                        time.sleep(0.001)
                    c.shutdown(socket.SHUT_WR)
                    while c.recv(1 << 16):
                        pass

            t = threading.Thread(target=client)
            t.start()
            try:
                deadline = time.monotonic() + 20
                while sent[0] < 4 << 20 or mirrored[0] == 0:
                    assert time.monotonic() < deadline and t.is_alive()
                    time.sleep(0.05)
                during = scrape(mport)
                time.sleep(0.3)
                later = scrape(mport)
            finally:
                stop_sending.set()
                t.join(20)
            for name, labels in [
                ("aiofused_proxy_connections_in_flight", {"upstream": upstream}),
                ("aiofused_proxy_mirror_connections_in_flight", {"mirror": mirror_name}),
            ]:
                assert value(during, name, **labels) == 1, name
            up_bytes = ("aiofused_proxy_bytes_total", {"upstream": upstream, "direction": "up"})
            for name, labels in [
                up_bytes,
                ("aiofused_proxy_requests_total", {"upstream": upstream}),
                ("aiofused_proxy_mirror_bytes_total", {"mirror": mirror_name}),
                ("aiofused_proxy_mirror_requests_total", {"mirror": mirror_name}),
            ]:
                assert 0 < value(during, name, **labels) <= value(later, name, **labels), name
            assert value(later, *up_bytes[:1], **up_bytes[1]) > value(
                during, *up_bytes[:1], **up_bytes[1]
            )
            assert (
                value(during, "aiofused_proxy_errors_total", upstream=upstream, kind="reset") == 0
            )
            assert value(during, "aiofused_proxy_buffers") > 0
            assert 0 <= value(during, "aiofused_proxy_buffers_lent") <= 4
            backend = next(
                dict(k[1])["backend"] for k in during if k[0] == "aiofused_proxy_ring_lent"
            )
            for key in ("in_flight", "lent", "views", "sq_pending", "cq_ready", "cq_overflow"):
                assert value(during, f"aiofused_proxy_ring_{key}", backend=backend) >= 0
            deadline = time.monotonic() + 10
            while value(
                after := scrape(mport), "aiofused_proxy_connections_in_flight", upstream=upstream
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert value(after, *up_bytes[:1], **up_bytes[1]) == sent[0]
            assert value(after, "aiofused_proxy_buffers_lent") == 0
            with pytest.raises(urllib.error.HTTPError) as info:
                scrape(mport, "/nothing")
            assert info.value.code == 404
            info.value.close()
        finally:
            code, err = stop(proc)
        assert code == 0, err


# ---- nbd serve -------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_nbd_metrics_scraped_while_traffic_runs() -> None:
    with tempfile.TemporaryDirectory(prefix="aiofused-m") as d:
        sock, mport = os.path.join(d, "s.sock"), free_port()
        proc = subprocess.Popen(
            [
                *AIOFUSED,
                "nbd",
                "serve",
                "-e",
                "disk=null:64M",
                "-e",
                "idle=null:1M",
                "--socket",
                sock,
                "--metrics",
                f"127.0.0.1:{mport}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            await asyncio.to_thread(wait_scrapable, mport, proc)
            client = await RawClient.connect(sock)
            await client.go("disk")
            running = True
            done = {"read": 0, "write": 0}

            async def traffic() -> None:
                cookie = 0
                while running:
                    cookie += 1
                    # One at a time: pipelined requests may be answered out of order.
                    client.request(1, 0, 65536, cookie, payload=bytes(65536))  # WRITE
                    assert (await client.simple_reply())[0] == 0
                    client.request(0, 65536, 65536, cookie + 1)  # READ
                    assert (await client.simple_reply(65536))[0] == 0
                    done["write"] += 65536
                    done["read"] += 65536
                    cookie += 1

            task = asyncio.create_task(traffic())
            try:
                while done["read"] < 4 << 20:
                    await asyncio.sleep(0.02)
                    assert not task.done()
                during = await asyncio.to_thread(scrape, mport)
                await asyncio.sleep(0.2)
                later = await asyncio.to_thread(scrape, mport)
            finally:
                running = False
                await task
            assert value(during, "aiofused_nbd_connections", export="disk") == 1
            assert value(during, "aiofused_nbd_connections", export="idle") == 0
            for direction in ("read", "write"):
                b = value(during, "aiofused_nbd_bytes_total", export="disk", direction=direction)
                assert (
                    0
                    < b
                    < value(later, "aiofused_nbd_bytes_total", export="disk", direction=direction)
                )
                assert (
                    value(later, "aiofused_nbd_bytes_total", export="idle", direction=direction)
                    == 0
                )
            assert value(during, "aiofused_nbd_requests_total", export="disk") > 0
            assert value(during, "aiofused_nbd_errors_total", export="disk") == 0
            assert value(during, "aiofused_nbd_in_flight", export="disk") >= 0
            assert value(during, "aiofused_nbd_buffers_lent", export="disk") >= 0
            assert any(k[0] == "aiofused_nbd_ring_in_flight" for k in during)
            client.request(0, 64 << 20, 4096, 99)  # a READ past the end: EINVAL
            assert (await client.simple_reply())[0] != 0
            after = await asyncio.to_thread(scrape, mport)
            assert value(after, "aiofused_nbd_errors_total", export="disk") == 1
            assert (
                value(after, "aiofused_nbd_bytes_total", export="disk", direction="read")
                == done["read"]
            )
            assert value(after, "aiofused_nbd_in_flight", export="disk") == 0
            assert value(after, "aiofused_nbd_buffers_lent", export="disk") == 0
            await client.close()
        finally:
            code, err = await asyncio.to_thread(stop, proc)
        assert code == 0, err
