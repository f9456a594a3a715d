"""TCP proxy benchmark: aiofused's fused-command proxy against the usual baselines.

Run as a script::

    python benchmarks/proxy.py                 # 1 GiB bulk, redis GET rr, 3 interleaved reps
    python benchmarks/proxy.py --quick         # 256 MiB, 1 rep (a smoke run)
    python benchmarks/proxy.py --json out.json

Every variant is measured in the same run, repetitions interleaved (A B C ... A B C ...),
and the medians are compared as ratios: absolute numbers on a shared 2-vCPU VM move by
10-25 % between runs, the ratios much less.

* **bulk**: one connection, the client sends ``--size`` bytes in 64 KiB writes, shuts
  down its write side, and waits for the sink's byte count to come back through the
  proxy (so both directions and the half-close are exercised).  MB/s at the client,
  proxy CPU seconds per GiB (utime+stime of the proxy process, children included).
* **rr**: ``redis-benchmark -t get -d 64 -c 50 -n N -P 1`` through the proxy to a local
  ``redis-server`` (Debian's ``redis-server``/``redis-tools``); without them, an
  equivalent 64-byte ping-pong load over 50 connections against an echo server.
* **alloc**: the aiofused proxy in a child with ``tracemalloc``; after a warm-up, the
  Python heap's net growth per MiB forwarded, and the largest transient growth (a
  payload-sized copy anywhere on the path would show up there).

Variants: direct (no proxy); naive asyncio streams proxy on the default loop and on
uvloop; asyncio ``Protocol`` proxy on uvloop; ``socat`` and HAProxy (``mode tcp``, one
thread; if installed); aiofused on the default loop and on uvloop; aiofused on uvloop with
one mirror.

Targets (issue 11): rr proxy CPU per request <= 1.0x the Protocol proxy's, rr throughput
>= 0.55x direct, rr with one mirror >= 0.85x without; bulk >= 1.0x the Protocol proxy,
<= 0.6 CPU s/GiB, with one mirror >= 0.8x without.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.abspath(__file__)
CHUNK = 64 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
GiB = 1 << 30
MiB = 1 << 20


# ---- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until 127.0.0.1:port is LISTENing (read from /proc, no probe connection)."""
    want = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(path) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (stat field 3): utime, stime, cutime, cstime are 14-17.
    return sum(int(x) for x in fields[11:15])


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


def cpu_seconds(pid: int, settle: bool = False) -> float:
    """CPU seconds of ``pid`` and its live children, plus its reaped children (socat forks
    one per connection).  ``settle`` first waits (up to 3 s) for children to exit."""
    if settle:
        deadline = time.monotonic() + 3
        while _children(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    ticks = _ticks(pid)
    for child in _children(pid):
        with contextlib.suppress(OSError):
            ticks += _ticks(child)
    return ticks / CLK_TCK


@contextlib.contextmanager
def spawn(argv: list[str], port: int | None = None, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=kw.pop("stdout", subprocess.DEVNULL),
        stderr=kw.pop("stderr", subprocess.DEVNULL),
        start_new_session=True,
        **kw,
    )
    try:
        if port is not None:
            wait_port(port)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def self_cmd(*args: str) -> list[str]:
    return [sys.executable, HERE, *args]


# ---- servers run as children of this script ----------------------------------------------


def run_sink(port: int) -> None:
    """Count bytes until EOF, reply with the count (8 bytes), close; one thread per conn."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(512)

    def handle(conn: socket.socket) -> None:
        buf = memoryview(bytearray(1 << 20))
        total = 0
        with conn:
            try:
                while n := conn.recv_into(buf):
                    total += n
                conn.sendall(total.to_bytes(8, "little"))
            except OSError:
                pass

    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def run_echo(port: int, loop_kind: str) -> None:
    """Echo server for the rr fallback load (asyncio Protocol)."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=512)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    _run(main(), loop_kind)


def _run(coro: Any, loop_kind: str) -> Any:
    loop: asyncio.AbstractEventLoop
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def serve_streams(port: int, up: int, loop_kind: str) -> None:
    """The naive proxy: StreamReader.read(64 KiB) / StreamWriter.write + drain."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(CHUNK):
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except OSError:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", up)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        w.close()
        uw.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
        loop.add_signal_handler(signal.SIGTERM, os._exit, 0)
        await server.serve_forever()

    _run(main(), loop_kind)


def serve_protocol(port: int, up: int, loop_kind: str) -> None:
    """asyncio.Protocol proxy with transport flow control (pause/resume)."""

    class Side(asyncio.Protocol):
        def __init__(self) -> None:
            self.t: Any = None
            self.peer: Side | None = None
            self.early: list[bytes] = []
            self.eof = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            if self.peer is None or self.peer.t is None:
                self.early.append(data)
                self.t.pause_reading()
            else:
                self.peer.t.write(data)

        def eof_received(self) -> bool:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.write_eof()
            else:
                self.eof = True
            return True

        def pause_writing(self) -> None:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.pause_reading()

        def resume_writing(self) -> None:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.close()

    class Client(Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            try:
                _, upstream = await loop.create_connection(Side, "127.0.0.1", up)
            except OSError:
                self.t.close()
                return
            upstream.peer = self
            self.peer = upstream
            for data in self.early:
                upstream.t.write(data)
            self.early.clear()
            if self.eof:
                upstream.t.write_eof()
            else:
                self.t.resume_reading()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Client, "127.0.0.1", port, backlog=512)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    _run(main(), loop_kind)


def serve_aiofused(
    port: int, up: int, loop_kind: str, mirrors: list[int], trace: str | None, buffer_size: int
) -> None:
    """The aiofused proxy in this process; with ``trace``, tracemalloc stats on SIGUSR1."""
    import tracemalloc

    from aiofused.driver import configure_logging
    from aiofused_drivers.relay.proxy import Endpoint, ProxyConfig, ProxyServer

    configure_logging("warning")
    cfg = ProxyConfig(
        listen=Endpoint("127.0.0.1", port),
        upstream=Endpoint("127.0.0.1", up),
        mirrors=tuple(Endpoint("127.0.0.1", m) for m in mirrors),
        max_connections=256,
        buffer_size=buffer_size,
        loop=loop_kind,
        # The mirror must really get every byte for the comparison to mean anything:
        # let the main path wait for it (a cut mirror would make mirroring look free).
        mirror_grace=1.0,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with ProxyServer(cfg) as server:
            if trace:

                def dump() -> None:
                    current, peak = tracemalloc.get_traced_memory()
                    with open(trace, "a") as f:
                        f.write(
                            json.dumps(
                                {
                                    "current": current,
                                    "peak": peak,
                                    "bytes": server.stats.bytes_upstream
                                    + server.stats.bytes_downstream,
                                    "backend": server.backend,
                                }
                            )
                            + "\n"
                        )
                    tracemalloc.reset_peak()

                loop.add_signal_handler(signal.SIGUSR1, dump)
            await stop.wait()
            with open(os.environ.get("AIOFUSED_BENCH_INFO", os.devnull), "w") as f:
                json.dump({"backend": server.backend, "stats": server.stats.as_dict()}, f)

    if trace:
        tracemalloc.start()
    _run(main(), loop_kind if loop_kind != "auto" else "uvloop")


# ---- load generators -----------------------------------------------------------------------


def bulk_client(port: int, size: int, payload: memoryview) -> float:
    """Send ``size`` bytes in 64 KiB writes, half-close, wait for the count; return seconds."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        left = size
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(payload[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            more = s.recv(8 - len(reply))
            if not more:
                break
            reply += more
        dt = time.perf_counter() - t0
    got = int.from_bytes(reply, "little") if len(reply) == 8 else -1
    if got != size:
        raise RuntimeError(f"sink counted {got} bytes, sent {size}")
    return dt


def redis_rr(port: int, n: int) -> float:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "get",
            "-d",
            "64",
            "-c",
            "50",
            "-n",
            str(n),
            "-P",
            "1",
            "--csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET":
            return float(cells[1])
    raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")


def echo_rr(port: int, n: int) -> float:
    """50 connections of 64-byte ping-pong, ``n`` round trips in total; returns req/s."""

    async def one(count: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        msg = b"x" * 64
        for _ in range(count):
            w.write(msg)
            await r.readexactly(64)
        w.close()

    async def main() -> float:
        per = max(1, n // 50)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(per) for _ in range(50)))
        return per * 50 / (time.perf_counter() - t0)

    result: float = _run(main(), "uvloop")
    return result


# ---- variants ------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    kind: str  # direct | streams | protocol | socat | haproxy | aiofused
    loop: str = "asyncio"
    mirrors: int = 0
    results: dict[str, list[float]] = field(default_factory=dict)
    info: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)

    def med(self, key: str) -> float | None:
        vals = self.results.get(key)
        return statistics.median(vals) if vals else None


@contextlib.contextmanager
def proxy_for(
    v: Variant, upstream: int, mirror_ports: list[int], buffer_size: int, trace: str | None = None
) -> Iterator[tuple[int, int | None]]:
    """Start the proxy of ``v`` in front of ``upstream``; yield (port, pid)."""
    if v.kind == "direct":
        yield upstream, None
        return
    port = free_port()
    env = dict(os.environ)
    info_file = None
    cfg = None
    if v.kind == "haproxy":
        fd, cfg = tempfile.mkstemp(prefix="aiofused-bench-haproxy-", suffix=".cfg")
        with os.fdopen(fd, "w") as f:
            f.write(
                "global\n  maxconn 4096\n  nbthread 1\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 60s\n  timeout server 60s\n"
                f"listen p\n  bind 127.0.0.1:{port}\n  server s 127.0.0.1:{upstream}\n"
            )
        argv = ["haproxy", "-db", "-f", cfg]
    elif v.kind == "socat":
        argv = [
            "socat",
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=512",
            f"TCP:127.0.0.1:{upstream}",
        ]
    elif v.kind == "aiofused":
        fd, info_file = tempfile.mkstemp(prefix="aiofused-bench-")
        os.close(fd)
        env["AIOFUSED_BENCH_INFO"] = info_file
        argv = self_cmd(
            "_serve",
            "aiofused",
            str(port),
            str(upstream),
            v.loop,
            "--mirrors",
            ",".join(map(str, mirror_ports[: v.mirrors])),
            "--buffer-size",
            str(buffer_size),
        )
        if trace:
            argv += ["--trace", trace]
    else:
        argv = self_cmd("_serve", v.kind, str(port), str(upstream), v.loop)
    # aiofused's warnings (mirror cuts, ...) are part of the result; baselines stay quiet.
    stderr = None if v.kind == "aiofused" else subprocess.DEVNULL
    try:
        with spawn(argv, port, env=env, stderr=stderr) as proc:
            yield port, proc.pid
    finally:
        if cfg:
            os.unlink(cfg)
    if info_file:
        with open(info_file) as f:
            text = f.read()
        os.unlink(info_file)
        if text:
            info = json.loads(text)
            v.info = info["backend"]
            for key in ("mirror_bytes", "mirror_dropped_bytes", "chunks", "bytes_upstream"):
                v.counters[key] = v.counters.get(key, 0) + info["stats"][key]


def measure_bulk(
    v: Variant, sink: int, mirror_ports: list[int], size: int, payload: memoryview, buffer_size: int
) -> None:
    with proxy_for(v, sink, mirror_ports, buffer_size) as (port, pid):
        bulk_client(port, min(size, 16 * MiB), payload)  # warm-up
        c0 = cpu_seconds(pid) if pid else 0.0
        dt = bulk_client(port, size, payload)
        c1 = cpu_seconds(pid, settle=True) if pid else 0.0
    v.add("bulk_mbps", size / dt / 1e6)
    if pid:
        v.add("cpu_s_per_gib", (c1 - c0) / (size / GiB))


def measure_rr(
    v: Variant, server: int, mirror_ports: list[int], n: int, use_redis: bool, buffer_size: int
) -> None:
    with proxy_for(v, server, mirror_ports, buffer_size) as (port, pid):
        c0 = cpu_seconds(pid) if pid else 0.0
        rate = redis_rr(port, n) if use_redis else echo_rr(port, n)
        c1 = cpu_seconds(pid, settle=True) if pid else 0.0
    v.add("rr_rps", rate)
    if pid:
        v.add("cpu_us_per_req", (c1 - c0) / n * 1e6)


def measure_alloc(
    sink: int, payload: memoryview, size: int, loop: str, buffer_size: int
) -> dict[str, Any]:
    """One long connection: warm up, then three windows of ``size`` bytes with a
    tracemalloc reading of the proxy between them (connection setup is left out)."""
    fd, trace = tempfile.mkstemp(prefix="aiofused-trace-")
    os.close(fd)
    v = Variant("alloc", "aiofused", loop)

    def stream(s: socket.socket, nbytes: int) -> None:
        while nbytes > 0:
            n = min(nbytes, CHUNK)
            s.sendall(payload[:n])
            nbytes -= n

    def snapshot(pid: int, count: int) -> None:
        time.sleep(0.3)  # let the bytes in flight drain through the proxy
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(trace) as f:
                if len(f.read().splitlines()) >= count:
                    return
            time.sleep(0.02)

    try:
        with proxy_for(v, sink, [], buffer_size, trace=trace) as (port, pid):
            assert pid is not None
            with socket.create_connection(("127.0.0.1", port)) as s:
                stream(s, 64 * MiB)  # warm-up
                for i in range(4):
                    snapshot(pid, i + 1)
                    if i < 3:
                        stream(s, size)
                s.shutdown(socket.SHUT_WR)
                s.recv(8)
        with open(trace) as f:
            snaps = [json.loads(x) for x in f.read().splitlines()]
    finally:
        os.unlink(trace)
    first, last = snaps[0], snaps[-1]
    mib = (last["bytes"] - first["bytes"]) / MiB
    peak = max(s["peak"] for s in snaps[1:]) - first["current"]
    return {
        "mib_forwarded": round(mib, 1),
        "net_bytes_per_mib": (last["current"] - first["current"]) / mib if mib else 0.0,
        "peak_transient_bytes": peak,
        "backend": first.get("backend", ""),
    }


# ---- report --------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(variants: list[Variant], alloc: dict[str, Any] | None, rr_kind: str) -> dict[str, Any]:
    by = {v.name: v for v in variants}
    direct = by["direct"]
    print()
    print(
        f"| path | bulk MB/s | vs direct | CPU s/GiB | rr req/s ({rr_kind}) | rr vs direct "
        "| CPU µs/req |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        name = v.name + (f" [{v.info}]" if v.info else "")
        print(
            f"| {name} | {fmt(v.med('bulk_mbps'))} "
            f"| {fmt(ratio(v.med('bulk_mbps'), direct.med('bulk_mbps')), '.2f')} "
            f"| {fmt(v.med('cpu_s_per_gib'), '.2f')} | {fmt(v.med('rr_rps'))} "
            f"| {fmt(ratio(v.med('rr_rps'), direct.med('rr_rps')), '.2f')} "
            f"| {fmt(v.med('cpu_us_per_req'), '.1f')} |"
        )
    checks: list[tuple[str, float | None, float, str]] = []

    def bulk(name: str) -> float | None:
        return by[name].med("bulk_mbps") if name in by else None

    def rr(name: str) -> float | None:
        return by[name].med("rr_rps") if name in by else None

    best = max(("aiofused/asyncio", "aiofused/uvloop"), key=lambda n: bulk(n) or 0.0)
    checks.append(
        (f"bulk {best} / streams/asyncio", ratio(bulk(best), bulk("streams/asyncio")), 1.5, ">=")
    )
    checks.append(
        (f"bulk {best} / protocol/uvloop", ratio(bulk(best), bulk("protocol/uvloop")), 1.0, ">=")
    )
    checks.append(
        (f"CPU s/GiB {best}", by[best].med("cpu_s_per_gib") if best in by else None, 0.6, "<=")
    )

    def cpu_req(name: str) -> float | None:
        return by[name].med("cpu_us_per_req") if name in by else None

    for name in ("aiofused/asyncio", "aiofused/uvloop"):
        checks.append(
            (
                f"rr CPU/req {name} / protocol/uvloop",
                ratio(cpu_req(name), cpu_req("protocol/uvloop")),
                1.0,
                "<=",
            )
        )
        checks.append((f"rr {name} / direct", ratio(rr(name), rr("direct")), 0.55, ">="))
    checks.append(
        (
            "bulk mirror / no-mirror (uvloop)",
            ratio(bulk("aiofused/uvloop+mirror"), bulk("aiofused/uvloop")),
            0.8,
            ">=",
        )
    )
    checks.append(
        (
            "rr mirror / no-mirror (uvloop)",
            ratio(rr("aiofused/uvloop+mirror"), rr("aiofused/uvloop")),
            0.85,
            ">=",
        )
    )
    if alloc is not None:
        checks.append(
            ("steady-state Python heap growth, B/MiB", alloc["net_bytes_per_mib"], 1024, "<=")
        )
    print()
    print("| target | measured | goal | met |")
    print("|---|---:|---:|:-:|")
    out_checks = []
    for label, value, goal, op in checks:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        print(
            f"| {label} | {fmt(value, '.2f')} | {op} {goal} | "
            f"{'-' if met is None else ('yes' if met else 'NO')} |"
        )
        out_checks.append({"target": label, "value": value, "goal": f"{op} {goal}", "met": met})
    print()
    for v in variants:
        c = v.counters
        if c.get("chunks"):
            avg = c["bytes_upstream"] / max(1, c["chunks"]) / 1024
            line = f"{v.name}: {c['chunks']:,} fused commands, {avg:.0f} KiB lent on average"
            if v.mirrors:
                line += (
                    f"; mirror got {c['mirror_bytes'] / MiB:,.0f} MiB, "
                    f"dropped {c['mirror_dropped_bytes'] / MiB:,.1f} MiB"
                )
            print(line)
    if alloc is not None:
        print()
        print(
            f"allocations (aiofused/{alloc.get('loop')}, backend {alloc['backend']}, "
            f"{alloc['mib_forwarded']} MiB after warm-up): net heap growth "
            f"{alloc['net_bytes_per_mib']:.1f} B/MiB, largest transient growth "
            f"{alloc['peak_transient_bytes'] / 1024:.1f} KiB "
            f"(a payload copy would be >= {CHUNK // 1024} KiB)"
        )
    return {
        "variants": {
            v.name: {"info": v.info, "counters": v.counters, **v.results} for v in variants
        },
        "checks": out_checks,
        "alloc": alloc,
        "rr_kind": rr_kind,
    }


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=GiB, help="bulk bytes per run (default 1 GiB)")
    ap.add_argument("--requests", type=int, default=50_000, help="rr requests per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--buffer-size", type=int, default=1024 * 1024, help="aiofused pool buffers (1 MiB)"
    )
    ap.add_argument("--quick", action="store_true", help="256 MiB, 20k requests, 1 rep")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--skip", default="", help="comma-separated: bulk,rr,alloc")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.requests, args.reps = 256 * MiB, 20_000, 1
    skip = set(filter(None, args.skip.split(",")))

    variants = [
        Variant("direct", "direct"),
        Variant("streams/asyncio", "streams", "asyncio"),
        Variant("streams/uvloop", "streams", "uvloop"),
        Variant("protocol/uvloop", "protocol", "uvloop"),
        Variant("aiofused/asyncio", "aiofused", "asyncio"),
        Variant("aiofused/uvloop", "aiofused", "uvloop"),
        Variant("aiofused/uvloop+mirror", "aiofused", "uvloop", mirrors=1),
    ]
    if shutil.which("socat"):
        variants.insert(4, Variant("socat", "socat"))
    else:
        print("socat not installed: skipped (apt-get install socat)")
    if shutil.which("haproxy"):
        variants.insert(4, Variant("haproxy", "haproxy"))
    else:
        print("haproxy not installed: skipped (apt-get install haproxy)")
    if args.only:
        keep = set(args.only.split(",")) | {"direct"}
        variants = [v for v in variants if v.name in keep]

    use_redis = bool(shutil.which("redis-server") and shutil.which("redis-benchmark"))
    rr_kind = "redis GET" if use_redis else "64 B echo"
    if not use_redis:
        print("redis-server/redis-benchmark not installed: rr uses a 64-byte echo load")
    payload = memoryview(os.urandom(CHUNK))

    sink_port, mirror_port, rr_port, rr_mirror_port = (free_port() for _ in range(4))
    with contextlib.ExitStack() as stack:
        stack.enter_context(spawn(self_cmd("_sink", str(sink_port)), sink_port))
        stack.enter_context(spawn(self_cmd("_sink", str(mirror_port)), mirror_port))
        stack.enter_context(spawn(self_cmd("_sink", str(rr_mirror_port)), rr_mirror_port))
        if use_redis:
            stack.enter_context(
                spawn(
                    [
                        "redis-server",
                        "--port",
                        str(rr_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--protected-mode",
                        "no",
                    ],
                    rr_port,
                )
            )
        else:
            stack.enter_context(spawn(self_cmd("_echo", str(rr_port)), rr_port))
        for rep in range(args.reps):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            if "bulk" not in skip:
                for v in order:
                    measure_bulk(v, sink_port, [mirror_port], args.size, payload, args.buffer_size)
                    print(
                        f"rep {rep + 1} bulk {v.name}: {v.results['bulk_mbps'][-1]:,.0f} MB/s",
                        flush=True,
                    )
            if "rr" not in skip:
                for v in order:
                    measure_rr(
                        v, rr_port, [rr_mirror_port], args.requests, use_redis, args.buffer_size
                    )
                    print(
                        f"rep {rep + 1} rr {v.name}: {v.results['rr_rps'][-1]:,.0f} req/s",
                        flush=True,
                    )
        alloc = None
        if "alloc" not in skip:
            alloc = measure_alloc(sink_port, payload, 128 * MiB, "uvloop", args.buffer_size)
            alloc["loop"] = "uvloop"
    result = report(variants, alloc, rr_kind)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def child_main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "_sink":
        run_sink(int(argv[1]))
    elif mode == "_echo":
        run_echo(int(argv[1]), "uvloop")
    elif mode == "_serve":
        ap = argparse.ArgumentParser()
        ap.add_argument("kind")
        ap.add_argument("port", type=int)
        ap.add_argument("upstream", type=int)
        ap.add_argument("loop")
        ap.add_argument("--mirrors", default="")
        ap.add_argument("--trace", default=None)
        ap.add_argument("--buffer-size", type=int, default=1024 * 1024)
        a = ap.parse_args(argv[1:])
        if a.kind == "streams":
            serve_streams(a.port, a.upstream, a.loop)
        elif a.kind == "protocol":
            serve_protocol(a.port, a.upstream, a.loop)
        elif a.kind == "aiofused":
            mirrors = [int(m) for m in a.mirrors.split(",") if m]
            serve_aiofused(a.port, a.upstream, a.loop, mirrors, a.trace, a.buffer_size)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main())
