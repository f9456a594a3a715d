"""The proxy part of ``aiofused demo``: a mirrored transfer through the fused-command proxy.

A helper process runs a client, an upstream and a mirror (plain blocking sockets,
sha256 on both ends); this process runs the proxy, draws a progress bar from the
proxy's counters, and prints what happened: throughput, proxy CPU per GiB, both
copies verified byte for byte, and the bytes Python copied on the way (none: the
payload is received into pooled buffers and sent from them by fused commands).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import tracemalloc
from typing import Any, TextIO

from aiofused_drivers.relay.proxy import Endpoint, ProxyConfig, ProxyServer

from ._progress import Bar

__all__ = ["run_proxy_showcase"]

MiB = 1 << 20

# The helper: an upstream (answers the sha256 of what it read) and mirrors (report it),
# then, once told the proxy's port, a client streaming ``size`` bytes through it.
_HELPER = r"""
import json, random, signal, socket, sys, threading, time

# Ctrl-C reaches the whole process group: the demo handles it and kills this helper.
signal.signal(signal.SIGINT, signal.SIG_IGN)
nmirrors = int(sys.argv[1])
BLOCK = random.Random(20261124).randbytes(1 << 20)
DOUBLE = BLOCK + BLOCK  # any window of <= 1 MiB of the stream is DOUBLE[pos:pos + k]
results = {}

def sink(lsock, name, reply):
    conn, _ = lsock.accept()
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    n, same = 0, True
    try:
        while k := conn.recv_into(buf):
            # Byte-for-byte check against the known stream (memcmp, no copy).
            same = same and DOUBLE.startswith(mv[:k], n % len(BLOCK))
            n += k
        results[name] = {"bytes": n, "identical": same}
        if reply:
            conn.sendall(json.dumps(results[name]).encode())
    except OSError as exc:  # the proxy went away (the demo interrupted): report it
        results[name] = {"bytes": n, "identical": False, "error": str(exc)}
    conn.close()

servers = {"upstream": socket.create_server(("127.0.0.1", 0))}
for i in range(nmirrors):
    servers[f"mirror{i}"] = socket.create_server(("127.0.0.1", 0))
threads = [
    threading.Thread(target=sink, args=(s, name, name == "upstream"), daemon=True)
    for name, s in servers.items()
]
for t in threads:
    t.start()
sys.stdout.write(json.dumps({n: s.getsockname()[1] for n, s in servers.items()}) + "\n")
sys.stdout.flush()

line = sys.stdin.readline()
if not line:  # the demo went away before the transfer
    sys.exit(0)
port, size = map(int, line.split())
c = socket.create_connection(("127.0.0.1", port))
t0 = time.perf_counter()
view, sent = memoryview(BLOCK), 0
try:
    while sent < size:
        n = min(size - sent, 64 * 1024, len(BLOCK) - sent % len(BLOCK))
        c.sendall(view[sent % len(BLOCK) : sent % len(BLOCK) + n])
        sent += n
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := c.recv(256):
        reply += chunk
except OSError:  # the proxy went away (the demo interrupted): nothing to report
    sys.exit(1)
seconds = time.perf_counter() - t0
c.close()
for t in threads:
    t.join(30)
sys.stdout.write(json.dumps({"seconds": seconds, "reply": reply.decode(), "sinks": results}) + "\n")
sys.stdout.flush()
"""


def _emit(*parts: str, file: TextIO) -> None:
    """One line of the demo's report on ``file`` (the CLI's stdout by default)."""
    file.write("".join(parts) + "\n")


def _note(done: int, total: int, rate: float) -> str:
    return f"{done / MiB:7.1f} / {total / MiB:.0f} MiB  {rate / 1e6:7.0f} MB/s"


def _cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_proxy_showcase(
    size: int = 256 * MiB,
    *,
    mirrors: int = 1,
    backend: str = "auto",
    buffer_size: int = 1024 * 1024,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Push ``size`` bytes through the proxy to a local upstream and ``mirrors`` mirrors,
    verify every copy, print the numbers, and return them."""
    out = out if out is not None else sys.stdout
    helper = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HELPER,
        str(mirrors),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert helper.stdin is not None and helper.stdout is not None
    try:
        ports = json.loads(await asyncio.wait_for(helper.stdout.readline(), 30))
        config = ProxyConfig(
            listen=Endpoint("127.0.0.1", 0),
            upstream=Endpoint("127.0.0.1", ports["upstream"]),
            mirrors=tuple(Endpoint("127.0.0.1", ports[f"mirror{i}"]) for i in range(mirrors)),
            max_connections=16,
            buffer_size=buffer_size,
            backend=backend,
            # A busy machine may deschedule the local mirror for a moment: let it catch
            # up (the showcase verifies every copy) instead of cutting it.
            mirror_grace=2.0,
        )
        async with ProxyServer(config) as proxy:
            shadow = f", mirrored to {mirrors} shadow upstream{'s' * (mirrors != 1)}"
            _emit(
                f"proxy showcase: {size / MiB:.0f} MiB client -> aiofused proxy -> upstream"
                f"{shadow if mirrors else ''} (backend {proxy.backend})",
                file=out,
            )
            tracing = tracemalloc.is_tracing()
            if not tracing:
                tracemalloc.start()
            heap0 = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            cpu0 = _cpu()
            t0 = time.perf_counter()
            helper.stdin.write(f"{proxy.address[1]} {size}\n".encode())
            await helper.stdin.drain()
            result_line = asyncio.ensure_future(helper.stdout.readline())
            with Bar(out, "proxy", size, plain_step=size / 4) as bar:
                try:
                    while not result_line.done():
                        done = proxy.stats.bytes_upstream
                        elapsed = time.perf_counter() - t0
                        bar.update(done, _note(done, size, done / elapsed if elapsed else 0.0))
                        await asyncio.wait({result_line}, timeout=0.1)
                finally:
                    result_line.cancel()
                report = json.loads(result_line.result())
                async with asyncio.timeout(10):
                    while proxy.stats.connections_active:
                        await asyncio.sleep(0.01)
                cpu = _cpu() - cpu0
                heap_peak = tracemalloc.get_traced_memory()[1] - heap0
                if not tracing:
                    tracemalloc.stop()
                bar.finish(_note(size, size, size / report["seconds"]))
            stats = proxy.stats
            pool_ok = proxy.pool.available == proxy.pool.size
            copied = proxy.driver.copied_bytes
    finally:
        if helper.returncode is None:
            helper.kill()
        await helper.wait()

    sinks = report["sinks"]
    copies = {"upstream": sinks.get("upstream", {})}
    for i in range(mirrors):
        copies[f"mirror {i + 1}"] = sinks.get(f"mirror{i}", {})
    verified = {
        name: bool(c.get("identical")) and c.get("bytes") == size for name, c in copies.items()
    }
    mbps = size / report["seconds"] / 1e6
    cpu_per_gib = cpu / (size / (1 << 30))
    _emit(f"  throughput            {mbps:,.0f} MB/s (proxy CPU {cpu_per_gib:.2f} s/GiB)", file=out)
    for name, ok in verified.items():
        got = copies[name].get("bytes", 0)
        mark = "identical, byte for byte" if ok else f"DIFFERENT ({got:,} bytes)"
        _emit(f"  {name + ' copy':<21} {size:,} bytes {mark}", file=out)
    avg = (stats.bytes_upstream + stats.bytes_downstream) / max(1, stats.chunks)
    _emit(
        f"  bytes copied in Python {copied}  (received into pooled buffers, sent from them)",
        file=out,
    )
    _emit(
        f"  {'':21} Python's heap peaked +{heap_peak / 1024:.0f} KiB over the "
        f"{size / MiB:.0f} MiB; one copied chunk would be {avg / 1024:.0f} KiB",
        file=out,
    )
    _emit(
        f"  fused commands        {stats.chunks:,} (avg {avg / 1024:.0f} KiB lent each); "
        f"pool {'full again' if pool_ok else 'NOT full'}; mirror dropped "
        f"{stats.mirror_dropped_bytes} B",
        file=out,
    )
    return {
        "bytes": size,
        "seconds": report["seconds"],
        "mb_per_s": mbps,
        "cpu_s_per_gib": cpu_per_gib,
        "verified": verified,
        "python_copied_bytes": copied,
        "python_heap_peak_bytes": heap_peak,
        "fused_commands": stats.chunks,
        "mirror_dropped_bytes": stats.mirror_dropped_bytes,
        "pool_full": pool_ok,
        "ok": all(verified.values()) and pool_ok and json.loads(report["reply"] or "{}") != {},
    }


if __name__ == "__main__":
    from aiofused.driver import configure_logging

    configure_logging("warning")
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 256 * MiB
    result = asyncio.run(run_proxy_showcase(size))
    sys.exit(0 if result["ok"] else 1)
