"""Wiring: a ring, one ublk device + server + target per export, and the NBD front end."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from aiofused import Ring, SetupFlag
from aiofused.driver import BufferPool, get_logger

from ._nbd import DEFAULT_CONNECTION_BYTES, Export, NbdServer, export_from_spec
from ._reqbuf import RequestBuffers
from ._server import RingHost, UblkServer
from ._targets import Target, make_target

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["BlockService", "ExportSpec", "parse_export"]

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportSpec:
    """``NAME=TARGET:ARGS`` from the command line."""

    name: str
    target: str
    read_only: bool = False


#: The word in an export's ARGS that makes it read-only (``disk=loop:disk.img,ro``).
READ_ONLY_WORD = "ro"


def parse_export(text: str, read_only: bool = False) -> ExportSpec:
    """Parse ``NAME=KIND:ARGS`` (``NAME`` may be empty: the default export); ``ro``
    among the comma-separated ARGS makes that export read-only (``read_only``: all)."""
    name, sep, target = text.partition("=")
    kind, colon, args = target.partition(":")
    if "," in kind:  # ``null,ro``: a target without ARGS, then flags
        kind, _, args = kind.partition(",")
        colon = ":"
    words = args.split(",") if colon else []
    if READ_ONLY_WORD in words:
        read_only = True
        words = [w for w in words if w != READ_ONLY_WORD]
        target = f"{kind}:{','.join(words)}" if any(words) or kind != "null" else kind
    if not sep or (":" not in target and target not in ("null",)):
        raise ValueError(f"export {text!r}: expected NAME=TARGET:ARGS")
    return ExportSpec(name, target, read_only)


class BlockService:
    """Everything ``aiofused nbd serve`` runs, as an async context manager.

    ``specs`` are exports; ``targets`` may hold ready-made targets instead (tests).
    Inside the block, :attr:`nbd` is the :class:`NbdServer`; call ``serve`` on it with
    a listening socket.
    """

    def __init__(
        self,
        specs: Sequence[ExportSpec] = (),
        *,
        targets: Sequence[tuple[str, Target, bool]] = (),
        backend: str = "auto",
        queue_depth: int = 128,
        nr_queues: int = 1,
        entries: int = 4096,
        block_size: int = 512,
        max_inflight: int = 256,
        socket_buffer: int = 0,
        pool_buffers: int = 256,
        pool_buffer_size: int = 256 * 1024,
        max_connection_bytes: int = DEFAULT_CONNECTION_BYTES,
        buffer_memory: int = 1 << 30,
    ) -> None:
        self._specs = list(specs)
        self._given = list(targets)
        self.backend = backend
        self.queue_depth = queue_depth
        self.nr_queues = nr_queues
        self.entries = entries
        self.block_size = block_size
        self.max_inflight = max_inflight
        self.socket_buffer = socket_buffer
        self.ring: Ring | None = None
        self.host: RingHost | None = None
        self.servers: list[UblkServer] = []
        self.targets: list[Target] = []
        self.exports: list[Export] = []
        self.pool_buffers = pool_buffers
        self.pool_buffer_size = pool_buffer_size
        self.pool: BufferPool | None = None
        self.max_connection_bytes = max_connection_bytes
        self.buffer_memory = buffer_memory
        self.buffers = RequestBuffers(max_bytes=buffer_memory)
        self._nbd: NbdServer | None = None
        #: Targets whose start() ran (stop() is due).
        self._started: list[Target] = []

    @property
    def nbd(self) -> NbdServer:
        assert self._nbd is not None, "use BlockService as an async context manager"
        return self._nbd

    async def __aenter__(self) -> BlockService:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _start(self) -> None:
        entries = self.entries
        self.ring = Ring(entries, flags=SetupFlag.FUSED_REQ, backend=self.backend)
        if self.pool_buffers > 0:
            # Request buffers from a registered pool: fixed-buffer secondaries.
            self.pool = BufferPool(self.pool_buffers, self.pool_buffer_size)
            self.ring.register_buffers(self.pool)
            self.buffers = RequestBuffers(pool=self.pool, max_bytes=self.buffer_memory)
        self.host = RingHost(self.ring, self.ring.sq_entries)
        self.host.start()
        items: list[tuple[str, Target, bool]] = list(self._given)
        for spec in self._specs:
            target = make_target(spec.target, spec.read_only)
            self.targets.append(target)
            items.append((spec.name, target, spec.read_only))
        for dev_id, (name, target, ro) in enumerate(items, start=1):
            exp = export_from_spec(
                name,
                target,
                read_only=ro,
                nr_queues=self.nr_queues,
                queue_depth=self.queue_depth,
                block_size=self.block_size,
            )
            server = UblkServer(self.host, exp.driver, target, dev_id)
            server.start()
            target.start()
            self._started.append(target)
            self.servers.append(server)
            self.exports.append(exp)
            log.info(
                "ublk.device_added",
                dev_id=dev_id,
                export=name,
                target=target.describe(),
                size=target.size,
                read_only=exp.read_only,
                backend=self.ring.backend,
            )
        self._nbd = NbdServer(
            self.exports,
            self.buffers,
            max_inflight=self.max_inflight,
            socket_buffer=self.socket_buffer,
            max_connection_bytes=self.max_connection_bytes,
        )

    def serve(self, listener: socket.socket) -> None:
        self.nbd.serve(listener)

    def serve_channel(self, channel: socket.socket) -> None:
        """Serve connections a dispatching parent passes over ``channel``."""
        self.nbd.serve_channel(channel)

    async def aclose(self) -> None:
        if self._nbd is not None:
            await self._nbd.close()
        for server in self.servers:
            await server.stop()
        self.servers.clear()
        for target in self._started:
            try:
                await target.stop()
            except Exception:
                log.exception("ublk.target_stop_failed", target=target.describe())
        self._started.clear()
        host, self.host = self.host, None
        if host is not None:
            await host.close()
        if self.ring is not None:
            try:
                await asyncio.wait_for(self.ring.close(), 15)
            except TimeoutError:
                log.error("ublk.ring_close_timeout", in_flight=self.ring.in_flight())
            self.ring = None
        if host is not None:
            host.close_files()
        for target in self.targets:
            with contextlib.suppress(OSError):
                target.close()
        self.targets.clear()
        self.buffers.clear()
        if self.pool is not None:
            try:
                self.pool.close()
            except RuntimeError as e:  # a buffer still out: keep the mapping alive
                log.error("ublk.pool_close_failed", error=str(e))
            self.pool = None

    def metric_families(self) -> list[Metric]:
        """The Prometheus metric families of this process (``--metrics``), per export."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from aiofused_drivers._metrics import ring_families

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"aiofused_nbd_{name}", doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"aiofused_nbd_{name}", doc, labels=labels)

        requests = counter("requests", "NBD requests", ["export"])
        nbytes = counter("bytes", "bytes read or written", ["export", "direction"])
        errors = counter("errors", "requests answered with an error", ["export"])
        in_flight = gauge("in_flight", "requests queued to the device now", ["export"])
        lent = gauge("buffers_lent", "request buffers lent by fused commands now", ["export"])
        conns = gauge("connections", "clients connected now", ["export"])
        per_export = collections.Counter(
            c.export.name for c in (self._nbd.connections if self._nbd else ()) if c.export
        )
        for exp in self.exports:
            st = exp.stats
            requests.add_metric([exp.name], st.requests)
            nbytes.add_metric([exp.name, "read"], st.read_bytes)
            nbytes.add_metric([exp.name, "write"], st.write_bytes)
            errors.add_metric([exp.name], st.errors)
            in_flight.add_metric([exp.name], exp.driver.inflight)
            lent.add_metric([exp.name], exp.driver.lent)
            conns.add_metric([exp.name], per_export[exp.name])
        families: list[Metric] = [requests, nbytes, errors, in_flight, lent, conns]
        stats = self.ring.statistics() if self.ring is not None else None
        return families + ring_families("aiofused_nbd", stats)

    def leaks(self) -> dict[str, int]:
        """Counters that must be 0 once the clients are gone (for tests)."""
        return {
            "buffers": self.buffers.outstanding,
            "lent": sum(e.driver.lent for e in self.exports),
            "inflight": sum(e.driver.inflight for e in self.exports),
            "connections": len(self.nbd.connections) if self._nbd else 0,
        }
