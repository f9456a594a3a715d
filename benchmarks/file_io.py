"""File reads from the page cache: uring backend vs asyncio backend vs the usual ways.

Workloads (a 256 MiB file that is in the page cache):
  rand4k-qdN  4 KiB random reads with N in flight (N = 1, 32, 128), in IOPS
  seq1m       1 MiB sequential reads, one in flight, in IOPS and MB/s

Contenders, all measured in the same run and on the same loop:
  uring       ``aiofused.Ring(backend="uring")``: prep_read + submit, wait_cqes, N in
              flight (with ``--api backend``, or while the ring does not work: the
              backend driven like ``uring-be``)
  uring-be    the uring backend driven directly: N coroutines, one future per read
  uring-cb    the uring backend driven by completion callbacks (no future per read)
  asyncio     ``aiofused.Ring(backend="asyncio")`` (inline ``RWF_NOWAIT`` reads for cached
              data, the backend's thread pool otherwise), driven like ``uring``
  aiofiles    one handle per coroutine: ``await f.seek(off); await f.read(n)``
  executor    ``await loop.run_in_executor(None, os.preadv, fd, [buf], off)``
  fio         ``fio --ioengine=io_uring`` with the same depth (skipped if fio is absent)

Every cell is run ``--reps`` times for ``--seconds`` each and the median is printed,
followed by the ratios the project targets (uring >= 12x aiofiles, >= 6x executor,
>= 35% of fio at QD32).

Usage: python benchmarks/file_io.py [--loop asyncio|uvloop] [--seconds 1.0] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiofused import Op
from aiofused.backend import Backend, IoOp, get_backend_class

FILE_SIZE = 256 << 20
CELL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Workload:
    name: str
    bs: int
    qd: int
    random: bool


WORKLOADS = [
    Workload("rand4k-qd1", 4096, 1, True),
    Workload("rand4k-qd32", 4096, 32, True),
    Workload("rand4k-qd128", 4096, 128, True),
    Workload("seq1m", 1 << 20, 1, False),
]


def make_file(path: Path) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(FILE_SIZE >> 20):
            f.write(block[i % 7 :] + block[: i % 7])
    # Read it once so that every page is cached.
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def offsets_for(w: Workload, count: int = 1 << 16) -> list[int]:
    if w.random:
        rng = random.Random(1234)
        return [rng.randrange(FILE_SIZE // w.bs) * w.bs for _ in range(count)]
    return [(i * w.bs) % FILE_SIZE for i in range(FILE_SIZE // w.bs)]


class Offsets:
    def __init__(self, offs: list[int]) -> None:
        self.offs = offs
        self.i = 0

    def next(self) -> int:
        i = self.i
        self.i = i + 1
        return self.offs[i % len(self.offs)]


async def timed(
    seconds: float, qd: int, worker: Callable[[int, Callable[[], bool]], Awaitable[int]]
) -> float:
    """Run ``qd`` workers until ``seconds`` pass; return completed ops per second."""
    stop = False
    done_at_stop = 0
    counts = [0] * qd

    def stopped() -> bool:
        return stop

    async def run(i: int) -> None:
        counts[i] = await worker(i, stopped)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(run(i)) for i in range(qd)]
    await asyncio.sleep(seconds)
    stop = True
    t1 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*tasks), CELL_TIMEOUT)
    done_at_stop = sum(counts)
    return done_at_stop / (t1 - t0)


# ---- contenders ------------------------------------------------------------------------


class _Waiter:
    """One in-flight read of a worker: its IoOp is reused, a future per read."""

    __slots__ = ("fut", "op")

    def __init__(self, op: IoOp) -> None:
        self.op = op
        self.fut: asyncio.Future[int] | None = None

    def complete(self, res: int, flags: int) -> None:
        fut = self.fut
        assert fut is not None
        fut.set_result(res)


async def bench_backend_await(
    backend: Backend, fd: int, w: Workload, seconds: float, offs: Offsets
) -> float:
    """``qd`` coroutines, each awaiting one future per read (what an awaiting API costs)."""
    loop = asyncio.get_running_loop()

    async def worker(i: int, stopped: Callable[[], bool]) -> int:
        waiter = _Waiter(IoOp(Op.READ, fd, memoryview(bytearray(w.bs)), w.bs))
        op = waiter.op
        complete = waiter.complete
        n = 0
        while not stopped():
            waiter.fut = fut = loop.create_future()
            op.offset = offs.next()  # the backend let go of op at its completion
            backend.start(op, complete)
            res = await fut
            if res != w.bs:
                raise OSError(-res if res < 0 else 0, f"short or failed read: {res}")
            n += 1
        return n

    return await timed(seconds, w.qd, worker)


async def bench_backend_callbacks(
    backend: Backend, fd: int, w: Workload, seconds: float, offs: Offsets
) -> float:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    bufs = [memoryview(bytearray(w.bs)) for _ in range(w.qd)]
    state = {"stop": False, "inflight": 0, "count": 0, "errors": 0}

    ops = [IoOp(Op.READ, fd, bufs[i], w.bs) for i in range(w.qd)]

    def issue(i: int) -> None:
        state["inflight"] += 1
        op = ops[i]
        op.offset = offs.next()
        backend.start(op, callbacks[i])

    def make_callback(i: int) -> Callable[[int, int], None]:
        def complete(res: int, flags: int) -> None:
            state["inflight"] -= 1
            if res != w.bs:
                state["errors"] += 1
            state["count"] += 1
            if not state["stop"]:
                issue(i)
            elif not state["inflight"] and not finished.done():
                finished.set_result(None)

        return complete

    callbacks = [make_callback(i) for i in range(w.qd)]
    t0 = time.perf_counter()
    for i in range(w.qd):
        issue(i)
    await asyncio.sleep(seconds)
    state["stop"] = True
    t1 = time.perf_counter()
    count = state["count"]
    await asyncio.wait_for(finished, CELL_TIMEOUT)
    if state["errors"]:
        raise OSError(0, f"{state['errors']} failed or short reads")
    return count / (t1 - t0)


async def bench_ring(
    backend_name: str, fd: int, w: Workload, seconds: float, offs: Offsets
) -> float:
    """Through ``aiofused.Ring``: prep_read + submit, wait_cqes, keep ``qd`` in flight."""
    import aiofused

    async with aiofused.Ring(max(w.qd, 8), backend=backend_name) as ring:
        bufs = [bytearray(w.bs) for _ in range(w.qd)]

        def prep(i: int) -> None:
            sqe = ring.get_sqe()
            assert sqe is not None
            sqe.prep_read(fd, bufs[i], w.bs, offs.next())
            sqe.user_data = i

        for i in range(w.qd):
            prep(i)
        ring.submit()
        inflight = w.qd
        t0 = time.perf_counter()
        deadline = t0 + seconds
        async with asyncio.timeout(seconds + CELL_TIMEOUT):  # one bound, not one per wait
            count, t1 = await _ring_loop(ring, w, prep, inflight, deadline)
        return count / ((t1 or time.perf_counter()) - t0)


async def _ring_loop(
    ring: Any,
    w: Workload,
    prep: Callable[[int], None],
    inflight: int,
    deadline: float,
) -> tuple[int, float]:
    """Reap, re-arm until ``deadline``, then drain; return (reads counted, end time)."""
    count = 0
    t1 = 0.0
    while inflight:
        cqes = await ring.wait_cqes(1)
        while (cqe := ring.peek_cqe()) is not None:
            ring.cqe_seen(cqe)
            cqes.append(cqe)
        now = time.perf_counter()
        for cqe in cqes:
            if cqe.res != w.bs:
                raise OSError(0, f"short or failed read: {cqe.res}")
            inflight -= 1
            if now < deadline:
                count += 1
                prep(cqe.user_data)
                inflight += 1
            elif not t1:
                t1 = now
        if now < deadline:
            ring.submit()
    return count, t1


async def bench_aiofiles(path: Path, w: Workload, seconds: float, offs: Offsets) -> float:
    import aiofiles  # type: ignore[import-untyped]

    async def worker(i: int, stopped: Callable[[], bool]) -> int:
        n = 0
        async with aiofiles.open(path, "rb", buffering=0) as f:
            while not stopped():
                await f.seek(offs.next())
                data = await f.read(w.bs)
                if len(data) != w.bs:
                    raise OSError(0, "short read")
                n += 1
        return n

    return await timed(seconds, w.qd, worker)


async def bench_executor(fd: int, w: Workload, seconds: float, offs: Offsets) -> float:
    loop = asyncio.get_running_loop()

    async def worker(i: int, stopped: Callable[[], bool]) -> int:
        buf = bytearray(w.bs)
        n = 0
        while not stopped():
            res = await loop.run_in_executor(None, os.preadv, fd, [buf], offs.next())
            if res != w.bs:
                raise OSError(0, "short read")
            n += 1
        return n

    return await timed(seconds, w.qd, worker)


def bench_fio(path: Path, w: Workload, seconds: float) -> float | None:
    fio = shutil.which("fio")
    if fio is None:
        return None
    cmd = [
        fio,
        "--name=file_io",
        f"--filename={path}",
        f"--rw={'randread' if w.random else 'read'}",
        f"--bs={w.bs}",
        "--ioengine=io_uring",
        f"--iodepth={w.qd}",
        "--direct=0",
        "--invalidate=0",  # keep the page cache: fio drops it otherwise
        "--time_based",
        f"--runtime={int(seconds * 1000)}ms",
        "--norandommap",
        "--randrepeat=0",
        "--thread",
        "--output-format=json",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=CELL_TIMEOUT, check=True)
        iops: float = json.loads(out.stdout)["jobs"][0]["read"]["iops"]
    except (subprocess.SubprocessError, KeyError, ValueError, OSError) as exc:
        print(f"  fio failed: {exc}", file=sys.stderr)
        return None
    return iops


# ---- driver ------------------------------------------------------------------------------


def ring_works() -> str:
    """Return "" if ``aiofused.Ring`` can run a READ on both backends, else why not."""

    async def check() -> None:
        import aiofused

        with tempfile.TemporaryFile() as f:
            f.write(b"x" * 4096)
            f.flush()
            for name in ("uring", "asyncio"):
                async with aiofused.Ring(8, backend=name) as ring:
                    sqe = ring.get_sqe()
                    assert sqe is not None
                    buf = bytearray(4096)
                    sqe.prep_read(f.fileno(), buf, 4096, 0)
                    ring.submit()
                    (cqe,) = await asyncio.wait_for(ring.wait_cqes(1), 5)
                    assert cqe.res == 4096, cqe

    try:
        asyncio.run(asyncio.wait_for(check(), 10))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


async def run_cell(
    name: str, path: Path, fd: int, w: Workload, seconds: float, api: str
) -> float | None:
    offs = Offsets(offsets_for(w))
    loop = asyncio.get_running_loop()
    if name in ("uring", "uring-be", "uring-cb"):
        if api == "ring" and name == "uring":
            return await bench_ring("uring", fd, w, seconds, offs)
        backend: Backend = get_backend_class("uring")(loop)
        try:
            if name in ("uring", "uring-be"):
                return await bench_backend_await(backend, fd, w, seconds, offs)
            return await bench_backend_callbacks(backend, fd, w, seconds, offs)
        finally:
            await backend.aclose()
    if name == "asyncio":
        if api == "ring":
            return await bench_ring("asyncio", fd, w, seconds, offs)
        backend = get_backend_class("asyncio")(loop)
        try:
            return await bench_backend_await(backend, fd, w, seconds, offs)
        finally:
            await backend.aclose()
    if name == "aiofiles":
        return await bench_aiofiles(path, w, seconds, offs)
    if name == "executor":
        return await bench_executor(fd, w, seconds, offs)
    raise ValueError(name)


def verify(fd: int) -> None:
    """Check that the uring backend reads the same bytes as os.pread."""

    async def check() -> None:
        b = get_backend_class("uring")(asyncio.get_running_loop())
        try:
            for off in (0, 4096 * 1000, FILE_SIZE - 4096):
                buf = bytearray(4096)
                waiter = _Waiter(IoOp(Op.READ, fd, memoryview(buf), 4096, off))
                waiter.fut = fut = asyncio.get_running_loop().create_future()
                b.start(waiter.op, waiter.complete)
                assert await asyncio.wait_for(fut, 5) == 4096
                assert bytes(buf) == os.pread(fd, 4096, off)
        finally:
            await b.aclose()

    asyncio.run(check())


def new_loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--seconds", type=float, default=1.0, help="duration of one cell")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is printed")
    ap.add_argument("--api", choices=("auto", "ring", "backend"), default="auto")
    ap.add_argument("--dir", default=None, help="where to create the 256 MiB file")
    ap.add_argument("--only", default="", help="comma-separated workloads to run")
    ap.add_argument("--json", default="", help="also write the medians to this file")
    args = ap.parse_args()

    probe = get_backend_class("uring").probe()
    if not probe.available:
        print(f"uring backend unavailable: {probe.reason}")
        return 1
    api = args.api
    if api in ("auto", "ring"):
        why = ring_works()
        if why:
            if api == "ring":
                print(f"aiofused.Ring unusable: {why}")
                return 1
            print(f"note: aiofused.Ring not usable yet ({why}); driving the backends directly")
            api = "backend"
        else:
            api = "ring"
    contenders = ["uring", "uring-be", "uring-cb", "asyncio", "aiofiles", "executor"]
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    tmpdir = tempfile.mkdtemp(prefix="aiofused-fileio-", dir=args.dir)
    path = Path(tmpdir) / "data.bin"
    results: dict[str, dict[str, float | None]] = {}
    try:
        make_file(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            verify(fd)
            print(
                f"file_io: 256 MiB in page cache, loop={args.loop}, api={api}, "
                f"{args.reps} x {args.seconds:.1f}s per cell, median IOPS"
            )
            for w in workloads:
                results[w.name] = {}
                for name in contenders:
                    samples: list[float] = []
                    for _ in range(args.reps):
                        with asyncio.Runner(loop_factory=new_loop_factory(args.loop)) as r:
                            value = r.run(run_cell(name, path, fd, w, args.seconds, api))
                        if value is not None:
                            samples.append(value)
                    results[w.name][name] = statistics.median(samples) if samples else None
                fio_samples = [
                    v
                    for _ in range(args.reps)
                    if (v := bench_fio(path, w, args.seconds)) is not None
                ]
                results[w.name]["fio"] = statistics.median(fio_samples) if fio_samples else None
                print_row(w, results[w.name])
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print_summary(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"loop": args.loop, "api": api, "results": results}, indent=2)
        )
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def print_row(w: Workload, row: dict[str, float | None]) -> None:
    cells = "  ".join(f"{k}={_fmt(v)}" for k, v in row.items())
    extra = ""
    if not w.random and row.get("uring"):
        mbps = {k: v * w.bs / 1e6 for k, v in row.items() if v}
        extra = "  MB/s: " + "  ".join(f"{k}={v:,.0f}" for k, v in mbps.items())
    print(f"{w.name:13s} {cells}{extra}", flush=True)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "   -  "
    return f"{a / b:6.2f}"


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    print()
    print(f"{'ratio':22s} " + " ".join(f"{name:>13s}" for name in results))
    for num in ("uring", "uring-be", "uring-cb"):
        for den in ("aiofiles", "executor", "fio", "asyncio"):
            cells = " ".join(f"{_ratio(row[num], row[den]):>13s}" for row in results.values())
            print(f"{num + ' / ' + den:22s} {cells}")
    qd32 = results.get("rand4k-qd32")
    if qd32:
        print()
        for num in ("uring", "uring-be", "uring-cb"):
            for label, den, target in (
                (">= 12x aiofiles", "aiofiles", 12.0),
                (">= 6x executor", "executor", 6.0),
                (">= 35% of fio", "fio", 0.35),
            ):
                a, b = qd32[num], qd32[den]
                if not a or not b:
                    print(f"QD32 {num} {label}: not measured")
                    continue
                verdict = "met" if a / b >= target else "MISSED"
                print(f"QD32 {num:8s} {label:16s} {a / b:6.2f}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
