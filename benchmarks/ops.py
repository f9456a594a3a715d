"""Per-op cost of the ring: NOP and fused round trips, against a bare loop round trip.

Cells (each through the public low-level API: get_sqe / prep / submit / wait_cqes):

  nop          get_sqe + prep_nop, submit, then ``await ring.wait_cqes``.  A NOP completes
               inside ``submit()`` (SPEC R2), so this is the ring's own bookkeeping and
               never suspends the task.
  nop-awaited  the submit is made from a ``loop.call_soon`` callback while the task is
               already parked in ``await ring.wait_cqes``: every batch costs one loop
               round trip and one future, exactly the shape of the baseline below, with
               the ring in the middle (the ratio to the baseline is the ring's cost).
  fused-read   one FUSED_CMD on the null driver (lends a 4 KiB buffer) with one 4 KiB READ
               secondary at a random page-aligned offset of a page-cached file; a round
               trip ends with the primary's CQE (2 SQEs, 2 CQEs).
  baseline     ``fut = loop.create_future(); loop.call_soon(fut.set_result, None);
               await fut`` (perf-anchors §4: about 2 us on uvloop, 5 us on asyncio).

Depth 1 and 32: with 32, a sliding window keeps 32 round trips in flight (for ``nop``
and ``nop-awaited`` the 32 are submitted and reaped as one batch).  Every cell runs on
uvloop and on the default loop, for each ring backend that works here ("uring" needs a
kernel io_uring), ``--reps`` times for ``--seconds`` each, interleaved (order rotated);
the median is printed with the min-max range, as round trips per second and us per
round trip, with the ratio to the baseline measured in the same run.

Targets (uvloop): a NOP through the ring <= 5 us (checked for ``nop`` and
``nop-awaited`` at depth 1, every backend); with the uring backend also <= 3 us per
NOP at depth 32.

Usage: python benchmarks/ops.py [--quick] [--loop both|uvloop|asyncio]
       [--backend all|uring|asyncio] [--seconds S] [--reps R] [--strict]
Exit status: 0 when every cell ran and returned correct results (targets are
reported, and only enforced with --strict: 1 if one failed); 2 on a wrong result,
an error or a timeout in a cell.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from _common import available_backends, loop_factory

from aiofused import Cqe, DriverFile, Ring, SetupFlag
from aiofused._log import configure_logging

FILE_SIZE = 16 << 20
BS = 4096
DEPTHS = (1, 32)
CELLS = ("nop", "nop-awaited", "fused-read")
BACKENDS = ("uring", "asyncio")
LOOPS = ("uvloop", "asyncio")
NULL_LEND = 0
NOP_TARGET_US = 5.0  # uvloop, any backend
URING_DEPTH32_TARGET_US = 3.0


class CellError(Exception):
    """A cell returned a wrong result."""


Key = tuple[str, str, str, int]  # (loop, backend, cell, depth); backend "-": baseline


@dataclass
class Results:
    """Samples per key: round trips per second (wall clock) and CPU us per round trip."""

    samples: dict[Key, list[float]] = field(default_factory=dict)
    cpu: dict[Key, list[float]] = field(default_factory=dict)
    errors: dict[Key, str] = field(default_factory=dict)

    def add(self, key: Key, sample: tuple[float, float]) -> None:
        self.samples.setdefault(key, []).append(sample[0])
        self.cpu.setdefault(key, []).append(sample[1])

    def median(self, key: Key) -> float | None:
        s = self.samples.get(key)
        return statistics.median(s) if s else None

    def best(self, key: Key) -> float | None:
        s = self.samples.get(key)
        return max(s) if s else None

    def cpu_us(self, key: Key) -> float | None:
        s = self.cpu.get(key)
        return statistics.median(s) if s else None


# ---- cells ------------------------------------------------------------------------------


async def timed(run_batch: Callable[[], Awaitable[int]], seconds: float) -> tuple[float, float]:
    """Call ``run_batch`` (returns ops done) until ``seconds`` passed.

    Returns (round trips per second of wall time, process CPU us per round trip).
    """
    # Warm-up: a tenth of the time, not counted.
    end = time.perf_counter() + seconds / 10
    while time.perf_counter() < end:
        await run_batch()
    ops = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        ops += await run_batch()
        now = time.perf_counter()
        if now >= end:
            return ops / (now - t0), (time.process_time() - c0) * 1e6 / ops


def baseline_batch(loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        for _ in range(256):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, None)
            await fut
        return 256

    return run


def nop_batch(ring: Ring, depth: int) -> Callable[[], Awaitable[int]]:
    reps = max(1, 256 // depth)

    async def run() -> int:
        for _ in range(reps):
            for i in range(depth):
                sqe = ring.get_sqe()
                assert sqe is not None
                sqe.prep_nop()
                sqe.user_data = i
            ring.submit()
            cqes = await ring.wait_cqes(depth)
            if cqes[-1].res != 0 or cqes[-1].user_data != depth - 1:
                raise CellError(f"nop: unexpected CQE {cqes[-1]}")
        return reps * depth

    return run


def nop_awaited_batch(ring: Ring, depth: int) -> Callable[[], Awaitable[int]]:
    reps = max(1, 256 // depth)
    loop = ring.loop

    def submit_nops() -> None:
        for i in range(depth):
            sqe = ring.get_sqe()
            assert sqe is not None
            sqe.prep_nop()
            sqe.user_data = i
        ring.submit()

    async def run() -> int:
        for _ in range(reps):
            loop.call_soon(submit_nops)
            cqes = await ring.wait_cqes(depth)
            if cqes[-1].res != 0 or cqes[-1].user_data != depth - 1:
                raise CellError(f"nop-awaited: unexpected CQE {cqes[-1]}")
        return reps * depth

    return run


def fused_read_batch(
    ring: Ring, df: DriverFile, fd: int, depth: int, offsets: list[int]
) -> Callable[[], Awaitable[int]]:
    """A sliding window of ``depth`` fused round trips; user_data 2k+1 = primary k."""
    per_batch = max(256, 4 * depth)
    state = {"pos": 0}
    noff = len(offsets)

    async def run() -> int:
        issued = done = inflight = 0
        pos = state["pos"]
        while done < per_batch:
            while inflight < depth and issued < per_batch:
                p = ring.get_sqe()
                s = ring.get_sqe()
                assert p is not None and s is not None
                p.prep_fused_cmd(df, NULL_LEND, nr_secondary=1)
                p.user_data = 2 * issued + 1
                s.prep_read(fd, 0, BS, offsets[pos])
                s.user_data = 2 * issued
                pos = (pos + 1) % noff
                issued += 1
                inflight += 1
            ring.submit()
            cqe: Cqe | None = await ring.wait_cqe()
            while cqe is not None:
                ring.cqe_seen(cqe)
                ud = cqe.user_data
                if ud & 1:
                    if cqe.res != 0:
                        raise CellError(f"fused-read: primary failed: {cqe}")
                    inflight -= 1
                    done += 1
                elif cqe.res != BS:
                    raise CellError(f"fused-read: READ secondary returned {cqe.res}")
                cqe = ring.peek_cqe()
        state["pos"] = pos
        return per_batch

    return run


async def check_fused_read(ring: Ring, df: DriverFile, fd: int, data: bytes) -> None:
    """One fused READ whose bytes are checked, through the high-level lease API."""
    off = 5 * BS
    async with ring.fused(df, NULL_LEND) as lease:
        n = await lease.read(fd, off, 0, BS)
        if n != BS or bytes(lease.buffer[:BS]) != data[off : off + BS]:
            raise CellError("fused-read: lent buffer does not hold the file's bytes")


# ---- one repetition on one loop -----------------------------------------------------------


async def run_rep(
    loop_kind: str,
    backends: list[str],
    fd: int,
    data: bytes,
    offsets: list[int],
    seconds: float,
    rep: int,
    results: Results,
) -> None:
    loop = asyncio.get_running_loop()
    cell_timeout = seconds * 20 + 10
    work: list[tuple[Key, Callable[[], Awaitable[tuple[float, float]]]]] = []
    work.append(((loop_kind, "-", "baseline", 1), lambda: timed(baseline_batch(loop), seconds)))
    for backend in backends:
        for cell in CELLS:
            for depth in DEPTHS:

                async def go(
                    backend: str = backend, cell: str = cell, depth: int = depth
                ) -> tuple[float, float]:
                    async with Ring(128, flags=SetupFlag.FUSED_REQ, backend=backend) as ring:
                        if ring.backend != backend:
                            raise CellError(f"asked for backend {backend}, got {ring.backend}")
                        if cell == "nop":
                            return await timed(nop_batch(ring, depth), seconds)
                        if cell == "nop-awaited":
                            return await timed(nop_awaited_batch(ring, depth), seconds)
                        df = ring.open_driver("null", size=BS)
                        await check_fused_read(ring, df, fd, data)
                        return await timed(fused_read_batch(ring, df, fd, depth, offsets), seconds)

                work.append(((loop_kind, backend, cell, depth), go))
    k = rep % len(work)
    for key, fn in work[k:] + work[:k]:
        if key in results.errors:
            continue
        try:
            async with asyncio.timeout(cell_timeout):
                results.add(key, await fn())
        except Exception as exc:  # report it and go on with the other cells
            results.errors[key] = f"{type(exc).__name__}: {exc}"
            print(f"!! {'/'.join(map(str, key))}: {results.errors[key]}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)


# ---- setup and report -----------------------------------------------------------------------


def make_file() -> tuple[str, bytes]:
    fd, path = tempfile.mkstemp(prefix="aiofused-ops-", suffix=".dat")
    block = os.urandom(1 << 20)
    data = b"".join(block[i:] + block[:i] for i in range(FILE_SIZE >> 20))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path, data


def warm_cache(fd: int) -> None:
    for off in range(0, FILE_SIZE, 1 << 20):
        os.pread(fd, 1 << 20, off)


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_us(v: float | None) -> str:
    return "-" if v is None or v <= 0 else f"{1e6 / v:.2f}"


def report(results: Results, loops: list[str], backends: list[str]) -> list[tuple[str, bool]]:
    hdr = (
        f"{'loop':<8} {'backend':<8} {'cell':<12} {'depth':>5} {'round trips/s':>13} "
        f"{'(min-max)':>19} {'us/op':>7} {'best':>6} {'cpu us':>7} {'x baseline':>10} {'(cpu)':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for lk in loops:
        base_key = (lk, "-", "baseline", 1)
        base = results.median(base_key)
        base_cpu = results.cpu_us(base_key)
        rows = [base_key] + [(lk, b, c, d) for b in backends for c in CELLS for d in DEPTHS]
        for key in rows:
            med = results.median(key)
            s = results.samples.get(key, [])
            rng = f"({min(s):,.0f}-{max(s):,.0f})" if s else ""
            if key in results.errors:
                rng = "ERROR"
            ratio = f"{base / med:.2f}x" if med and base else "-"
            cpu = results.cpu_us(key)
            cpu_ratio = f"{cpu / base_cpu:.2f}x" if cpu and base_cpu else "-"
            _, b, c, d = key
            print(
                f"{lk:<8} {b:<8} {c:<12} {d:>5} {fmt_rate(med):>13} {rng:>19} "
                f"{fmt_us(med):>7} {fmt_us(results.best(key)):>6} "
                f"{'-' if cpu is None else f'{cpu:.2f}':>7} {ratio:>10} {cpu_ratio:>6}"
            )
        print()
    print(
        "us/op: median wall-clock us per round trip; best: fastest repetition; cpu us: process\n"
        "CPU time per round trip (median); x baseline: us/op over the baseline's us/op, and\n"
        "(cpu) the same with cpu us (robust when other processes share the CPUs)"
    )
    print()
    checks: list[tuple[str, str, int, float]] = []  # (cell, backend, depth, limit us)
    if "uvloop" in loops:
        for b in backends:
            checks += [(c, b, 1, NOP_TARGET_US) for c in ("nop", "nop-awaited")]
        if "uring" in backends:
            checks += [(c, "uring", 32, URING_DEPTH32_TARGET_US) for c in ("nop", "nop-awaited")]
    targets: list[tuple[str, bool]] = []
    print("targets (uvloop, median us per NOP)")
    for cell, b, depth, limit in checks:
        key = ("uvloop", b, cell, depth)
        med = results.median(key)
        if not med:
            continue
        us = 1e6 / med
        ok = us <= limit
        label = f"{cell} depth {depth}, {b} backend, uvloop: {us:.2f} us <= {limit:g}"
        targets.append((label, ok))
        print(
            f"  {'PASS' if ok else 'FAIL'}  {label} "
            f"(best {fmt_us(results.best(key))}, cpu {results.cpu_us(key) or 0:.2f})"
        )
    return targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (<= 10 s)")
    ap.add_argument("--loop", choices=("both", *LOOPS), default="both")
    ap.add_argument("--backend", choices=("all", *BACKENDS), default="all")
    ap.add_argument("--seconds", type=float, default=None, help="per cell and repetition")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target failed")
    args = ap.parse_args()
    configure_logging("warning")
    seconds = args.seconds if args.seconds is not None else (0.03 if args.quick else 0.12)
    reps = args.reps if args.reps is not None else (5 if args.quick else 9)
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    backends, why = available_backends(list(BACKENDS) if args.backend == "all" else [args.backend])

    import uvloop

    print("aiofused ops benchmark: ring round trips vs a bare loop round trip")
    print(
        f"python {platform.python_version()}, uvloop {getattr(uvloop, '__version__', '?')}, "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"backends: {', '.join(backends) or 'none'}"
        + "".join(f"; {n} unavailable ({w})" for n, w in why.items())
    )
    print(
        f"{reps} reps x {seconds:g} s per cell, interleaved; median (min-max); "
        f"fused-read: 4 KiB random reads of a {FILE_SIZE >> 20} MiB page-cached file"
    )
    print()
    if not backends:
        print("no ring backend works here")
        return 2
    path, data = make_file()
    results = Results()
    t_start = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            rng = random.Random(1234)
            offsets = [rng.randrange(FILE_SIZE // BS) * BS for _ in range(1 << 14)]
            for rep in range(reps):
                order = loops if rep % 2 == 0 else loops[::-1]
                for lk in order:
                    warm_cache(fd)
                    with asyncio.Runner(loop_factory=loop_factory(lk)) as runner:
                        runner.run(run_rep(lk, backends, fd, data, offsets, seconds, rep, results))
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
    targets = report(results, loops, backends)
    print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
    if results.errors:
        print(f"{len(results.errors)} cell(s) failed, see stderr")
        return 2
    if args.strict and not all(ok for _, ok in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
