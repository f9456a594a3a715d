"""The 1:N fan-out comparison: one fused command vs a link chain vs ``asyncio.gather``.

Theory of operation
-------------------
The seed's claim (``research/seed-semantics.md`` §2.4): when N requests depend on one
and not on each other, a link chain issues them one after the other, while a
primary/secondary command issues all N at once.  The effect shows when each of the N
requests takes a fixed time *after it was issued*.  Here that time is made real:

* N peers, each a stream socket pair (AF_UNIX ``socketpair`` or loopback TCP).  The
  sending side is non-blocking with a small ``SO_SNDBUF`` (the receiving side gets a
  small ``SO_RCVBUF``), so a SEND of ``chunk`` bytes with ``MSG_WAITALL`` cannot
  complete before the peer has read most of it.
* Each peer's reader is a thread (the event loop stays free): it waits for the first
  byte of a round, sleeps ``delay`` seconds from that moment, then drains exactly
  ``chunk`` bytes with a blocking ``recv_into`` and counts them.

A SEND therefore takes about ``delay`` after it was *issued*.  Three ways to push the
same bytes to the N peers are timed, interleaved round by round (the order rotates):

* ``fused``: one ``FUSED_CMD`` on the null driver lending one buffer, with N SEND
  secondaries (offset 0, ``chunk`` bytes, ``MSG_WAITALL``): about ``delay`` per round.
* ``chain``: the same N SENDs of the same buffer as one ``IO_LINK`` chain on the same
  ring: each starts when the previous one completed, about ``N * delay``.
* ``gather``: ``asyncio.gather`` of N ``loop.sock_sendall`` on the same sockets.

After every round the readers' byte counts are checked (every peer got ``chunk``
more bytes), and the CQEs are checked (every SEND moved ``chunk`` bytes; the
primary's CQE comes last with res 0, SPEC F9).  Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Awaitable, Callable

from aiofused import MAX_SECONDARY, DriverFile, Ring, SetupFlag, SqeFlag
from aiofused.driver import get_logger

__all__ = ["VARIANTS", "FanoutError", "FanoutResult", "ProgressCallback", "compare_fanout"]

log = get_logger("aiofused.fanout")

#: The compared variants, in their default order.
VARIANTS: tuple[str, ...] = ("fused", "chain", "gather")

#: ``progress(variant, round_index, seconds)``: called after every timed round.
ProgressCallback = Callable[[str, int, float], None]

_NULL_LEND = 0  # the null driver's cmd_op that lends its buffer
_MSG_WAITALL = socket.MSG_WAITALL


class FanoutError(RuntimeError):
    """A round produced wrong results (bad CQE, missing bytes) or did not finish in time."""


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutResult:
    """Seconds per round (medians) of the three ways to send one buffer to ``n`` peers."""

    n: int
    backend: str
    delay: float
    chunk: int
    transport: str
    fused: float
    chain: float
    gather: float
    fused_rounds: tuple[float, ...] = ()
    chain_rounds: tuple[float, ...] = ()
    gather_rounds: tuple[float, ...] = ()
    #: Bytes the readers received and counted, over all rounds (warm-up included).
    bytes_verified: int = 0

    @property
    def chain_speedup(self) -> float:
        """``chain / fused``: how many times faster the fused command was (seed claim: ~N)."""
        return self.chain / self.fused if self.fused > 0 else float("inf")

    @property
    def fused_vs_gather(self) -> float:
        """``fused / gather``: the fused command's time relative to plain asyncio."""
        return self.fused / self.gather if self.gather > 0 else float("inf")


class _Peer:
    """One sender socket and the reader thread behind its peer socket."""

    def __init__(self, tx: socket.socket, rx: socket.socket, owner: _Peers) -> None:
        self.tx = tx
        self.rx = rx
        self.owner = owner
        self.received = 0
        self.chunks = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="fanout-reader", daemon=True)

    def _run(self) -> None:
        owner = self.owner
        chunk = owner.chunk
        view = memoryview(bytearray(chunk))
        poller = select.poll()
        poller.register(self.rx, select.POLLIN)
        idle_ms = int(owner.idle_timeout * 1000)
        try:
            while not owner.stopping:
                if not poller.poll(idle_ms) or owner.stopping:
                    break
                start_at = time.monotonic() + owner.delay
                while (left := start_at - time.monotonic()) > 0:
                    if owner.stop_event.wait(left):
                        return
                got = 0
                while got < chunk:
                    k = self.rx.recv_into(view[got:], chunk - got, _MSG_WAITALL)
                    if k == 0:
                        if not owner.stopping:
                            self.error = f"EOF after {got} of {chunk} bytes"
                        return
                    got += k
                self.received += got
                self.chunks += 1
                owner.notify()
        except OSError as exc:
            if not owner.stopping:
                self.error = f"{type(exc).__name__}: {exc}"


class _Peers:
    """N socket pairs with delayed reader threads; counts chunks on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        n: int,
        chunk: int,
        delay: float,
        sockbuf: int,
        transport: str,
        idle_timeout: float,
    ) -> None:
        self.loop = loop
        self.chunk = chunk
        self.delay = delay
        self.idle_timeout = idle_timeout
        self.stopping = False
        self.stop_event = threading.Event()
        self.chunks = 0  # counted on the loop thread
        self._target = 0
        self._waiter: asyncio.Future[None] | None = None
        self.peers: list[_Peer] = []
        try:
            for _ in range(n):
                tx, rx = _make_pair(transport, sockbuf)
                self.peers.append(_Peer(tx, rx, self))
        except BaseException:
            self.close()
            raise
        for p in self.peers:
            p.thread.start()

    @property
    def senders(self) -> list[socket.socket]:
        """The non-blocking sending sockets, one per peer."""
        return [p.tx for p in self.peers]

    def notify(self) -> None:
        """Reader thread: one chunk was fully received."""
        with contextlib.suppress(RuntimeError):  # loop closed during teardown
            self.loop.call_soon_threadsafe(self._on_chunk)

    def _on_chunk(self) -> None:
        self.chunks += 1
        w = self._waiter
        if w is not None and not w.done() and self.chunks >= self._target:
            w.set_result(None)

    async def wait_chunks(self, target: int, timeout: float) -> None:
        """Wait until ``target`` chunks in total were received, and check every peer."""
        if self.chunks < target:
            self._target = target
            self._waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise FanoutError(
                    f"readers got {self.chunks} of {target} chunks after {timeout:.1f} s"
                    f"{self._errors()}"
                ) from None
            finally:
                self._waiter = None
        rounds = target // len(self.peers)
        bad = [i for i, p in enumerate(self.peers) if p.received != rounds * self.chunk]
        if bad:
            got = [self.peers[i].received for i in bad[:4]]
            raise FanoutError(
                f"peers {bad[:4]} received {got} bytes, expected {rounds * self.chunk} each"
                f"{self._errors()}"
            )

    def _errors(self) -> str:
        errs = [f"peer {i}: {p.error}" for i, p in enumerate(self.peers) if p.error]
        return ("; " + "; ".join(errs[:4])) if errs else ""

    @property
    def received(self) -> int:
        """Bytes received by all readers so far."""
        return sum(p.received for p in self.peers)

    def close(self) -> None:
        """Stop the readers (bounded) and close every socket."""
        self.stopping = True
        self.stop_event.set()
        for p in self.peers:
            with contextlib.suppress(OSError):
                p.rx.shutdown(socket.SHUT_RDWR)
        for p in self.peers:
            if p.thread.is_alive():
                p.thread.join(timeout=5.0)
                if p.thread.is_alive():
                    log.warning("fanout_reader_stuck", thread=p.thread.name)
            p.tx.close()
            p.rx.close()


def _make_pair(transport: str, sockbuf: int) -> tuple[socket.socket, socket.socket]:
    """A connected (sender, receiver) pair with small buffers."""
    if transport == "unix":
        tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    elif transport == "tcp":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            tx = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
                tx.settimeout(5.0)
                tx.connect(lsock.getsockname())
                lsock.settimeout(5.0)
                rx, _ = lsock.accept()
            except BaseException:
                tx.close()
                raise
    else:
        raise ValueError(f"transport must be 'unix' or 'tcp', got {transport!r}")
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
    tx.setblocking(False)
    rx.setblocking(True)
    # Bound every blocking receive in the reader thread.
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 30, 0))
    return tx, rx


async def _fused_round(
    ring: Ring, df: DriverFile, senders: list[socket.socket], chunk: int
) -> None:
    n = len(senders)
    sqe = ring.get_sqe()
    if sqe is None:
        raise FanoutError("SQ full")
    sqe.prep_fused_cmd(df, _NULL_LEND, nr_secondary=n)
    sqe.user_data = n
    for i, s in enumerate(senders):
        q = ring.get_sqe()
        if q is None:
            raise FanoutError("SQ full")
        q.prep_send(s, 0, chunk, _MSG_WAITALL)
        q.user_data = i
    ring.submit()
    cqes = await ring.wait_cqes(n + 1)
    last = cqes[-1]
    if last.user_data != n or last.res != 0:
        raise FanoutError(f"fused: primary CQE not last or failed: {cqes[-3:]}")
    seen = sorted(c.user_data for c in cqes[:-1])
    if seen != list(range(n)) or any(c.res != chunk for c in cqes[:-1]):
        raise FanoutError(f"fused: bad secondary CQEs: {[c for c in cqes if c.res != chunk][:4]}")


async def _chain_round(
    ring: Ring, buf: bytearray, senders: list[socket.socket], chunk: int
) -> None:
    n = len(senders)
    for i, s in enumerate(senders):
        q = ring.get_sqe()
        if q is None:
            raise FanoutError("SQ full")
        q.prep_send(s, buf, chunk, _MSG_WAITALL)
        q.user_data = i
        if i < n - 1:
            q.flags |= SqeFlag.IO_LINK
    ring.submit()
    cqes = await ring.wait_cqes(n)
    if [c.user_data for c in cqes] != list(range(n)) or any(c.res != chunk for c in cqes):
        raise FanoutError(f"chain: bad CQEs: {[c for c in cqes if c.res != chunk][:4]}")


async def _gather_round(
    loop: asyncio.AbstractEventLoop, view: memoryview, senders: list[socket.socket]
) -> None:
    await asyncio.gather(*(loop.sock_sendall(s, view) for s in senders))


async def compare_fanout(
    n: int,
    *,
    delay: float = 0.02,
    chunk: int = 256 * 1024,
    sockbuf: int = 16 * 1024,
    rounds: int = 3,
    warmup: bool = True,
    backend: str = "auto",
    transport: str = "unix",
    timeout: float = 30.0,
    variants: tuple[str, ...] = VARIANTS,
    progress: ProgressCallback | None = None,
) -> FanoutResult:
    """Time sending one ``chunk``-byte buffer to ``n`` delayed readers, three ways.

    ``delay`` is how long each reader waits after the first byte of a round arrived
    before it drains; ``sockbuf`` sets ``SO_SNDBUF``/``SO_RCVBUF`` (keep ``chunk``
    several times larger, so a SEND cannot finish before its reader started);
    ``rounds`` timed rounds per variant, interleaved, after one untimed warm-up round
    of ``fused`` and ``gather`` if ``warmup``; ``backend`` is the ring's backend;
    ``transport`` is ``"unix"`` (socketpairs) or ``"tcp"`` (loopback).  Every round
    is bounded by ``timeout`` seconds.  ``variants`` may leave some of
    :data:`VARIANTS` out (their times are then ``nan``).  Raises
    :class:`FanoutError` if a round gives a wrong result or times out.
    """
    if not 1 <= n <= MAX_SECONDARY:
        raise ValueError(f"n must be in 1..{MAX_SECONDARY}, got {n}")
    if rounds < 1 or chunk < 1 or delay < 0 or timeout <= 0:
        raise ValueError("rounds and chunk must be positive, delay >= 0, timeout > 0")
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}")
    loop = asyncio.get_running_loop()
    payload = bytearray(chunk)
    payload[:] = bytes(range(256)) * (chunk // 256) + bytes(range(chunk % 256))
    view = memoryview(payload)
    times: dict[str, list[float]] = {v: [] for v in variants}
    peers = _Peers(loop, n, chunk, delay, sockbuf, transport, idle_timeout=4 * timeout + 10)
    sent_rounds = 0
    log.info(
        "fanout_start",
        n=n,
        delay=delay,
        chunk=chunk,
        sockbuf=sockbuf,
        rounds=rounds,
        transport=transport,
        backend=backend,
    )
    try:
        async with Ring(2 * (n + 1), flags=SetupFlag.FUSED_REQ, backend=backend) as ring:
            df = ring.open_driver("null", buffer=payload)
            senders = peers.senders
            run: dict[str, Callable[[], Awaitable[None]]] = {
                "fused": lambda: _fused_round(ring, df, senders, chunk),
                "chain": lambda: _chain_round(ring, payload, senders, chunk),
                "gather": lambda: _gather_round(loop, view, senders),
            }

            async def one(variant: str) -> float:
                nonlocal sent_rounds
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        await run[variant]()
                except TimeoutError:
                    raise FanoutError(
                        f"{variant} round with n={n} did not finish in {timeout:.1f} s "
                        f"(ring in flight: {ring.in_flight()}){peers._errors()}"
                    ) from None
                dt = time.perf_counter() - t0
                sent_rounds += 1
                await peers.wait_chunks(sent_rounds * n, timeout)
                return dt

            if warmup:
                for variant in variants:
                    if variant != "chain":
                        await one(variant)
            for r in range(rounds):
                k = r % len(variants)
                for variant in variants[k:] + variants[:k]:
                    dt = await one(variant)
                    times[variant].append(dt)
                    log.debug("fanout_round", variant=variant, n=n, round=r, seconds=dt)
                    if progress is not None:
                        progress(variant, r, dt)
            used = ring.backend
    finally:
        verified = peers.received
        peers.close()
        view.release()

    def med(v: str) -> float:
        return statistics.median(times[v]) if times.get(v) else float("nan")

    result = FanoutResult(
        n=n,
        backend=used,
        delay=delay,
        chunk=chunk,
        transport=transport,
        fused=med("fused"),
        chain=med("chain"),
        gather=med("gather"),
        fused_rounds=tuple(times.get("fused", ())),
        chain_rounds=tuple(times.get("chain", ())),
        gather_rounds=tuple(times.get("gather", ())),
        bytes_verified=verified,
    )
    log.info(
        "fanout_done",
        n=n,
        backend=used,
        fused=result.fused,
        chain=result.chain,
        gather=result.gather,
        bytes_verified=verified,
    )
    return result
