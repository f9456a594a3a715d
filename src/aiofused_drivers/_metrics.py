"""``--metrics HOST:PORT``: a Prometheus endpoint for ``proxy`` and ``nbd serve``.

The endpoint is served on the server's own event loop (a few lines of HTTP/1.0 over
``asyncio.start_server``), so a scrape reads the counters in the thread that updates
them, between two callbacks: no locks, nothing on the data path.  The exposition
format is prometheus-client's (``generate_latest``); each server passes a function
that builds its metric families at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from aiofused.driver import CommandError, get_logger

__all__ = ["MetricsServer", "ring_families"]

log = get_logger(__name__)

_MAX_REQUEST = 16 * 1024


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def ring_families(prefix: str, stats: Mapping[str, int | str] | None) -> list[Metric]:
    """``Ring.statistics()`` as gauges ``{prefix}_ring_{key}``, labelled by backend."""
    if stats is None:
        return []
    backend = str(stats.get("backend", ""))
    families: list[Metric] = []
    for key, value in stats.items():
        if isinstance(value, str):
            continue
        g = GaugeMetricFamily(
            f"{prefix}_ring_{key}", f"Ring.statistics()[{key!r}]", labels=["backend"]
        )
        g.add_metric([backend], float(value))
        families.append(g)
    return families


class MetricsServer:
    """``GET /metrics`` (or ``/``) on ``host:port``, answered from ``collect()``."""

    def __init__(self, host: str, port: int, collect: Callable[[], Iterable[Metric]]) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Callback(collect))
        self._server: asyncio.Server | None = None

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when 0 was asked for)."""
        assert self._server is not None, "not started"
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        """Listen; an address that cannot be bound is a :class:`CommandError` naming it."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise CommandError(f"--metrics {self.where}: cannot listen: {why}") from None
        host, port = self.address
        log.info("metrics_listening", address=f"{host}:{port}")

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST:
                raise ValueError("request too large")
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(), "", ""]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?", 1)[0] not in ("/", "/metrics"):
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            header = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except (
            OSError,
            ValueError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            log.debug("metrics_request_failed", error=repr(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
