"""CPU us per op of the ring beside fio's, measured in the same run.

Cells, each through the public API only (``get_sqe`` / ``prep_*`` / ``submit`` and
``wait_cqe`` / ``peek_cqe`` / ``cqe_seen`` / ``wait_cqes``), on a 64 MiB page-cached file:

  read1, read32    4 KiB READs at random page-aligned offsets into ``bytearray(4096)``
                   buffers (one per slot), QD1 / QD32 in flight.  Sliding window: reap
                   with ``await wait_cqe()`` then ``peek_cqe()`` until empty, refill the
                   slot of every CQE reaped (check ``res == 4096``), then one ``submit``.
  fused1, fused32  one FUSED_CMD on the null driver (``open_driver("null", size=4096)``,
                   cmd_op 0 = NULL_LEND lends a 4 KiB buffer) + one 4 KiB READ secondary
                   (``prep_read(fd, 0, 4096, offset)``: addr 0 of the lent buffer); 2 SQEs
                   and 2 CQEs per op, an op ends with the primary's CQE (which comes last).
                   Ring(flags=SetupFlag.FUSED_REQ); same sliding window as the reads.
  nop1, nop32      batches of 1 / 32 ``prep_nop`` + ``submit`` + ``await wait_cqes(n)``.

  fio-uring-qd1, fio-uring-qd32, fio-psync-qd1
                   ``fio --name=r --ioengine=io_uring|psync --rw=randread --bs=4k
                   --iodepth=N --filename=F --size=64M --io_size=... --norandommap
                   --randrepeat=0 --invalidate=0 --output-format=json`` on the same file
                   (``--invalidate=0``: fio's default drops the file's page cache first).

How CPU per op is measured:

* Ring cells run each in a fresh child (``ops.py --child CELL``) on uvloop (``--loop
  asyncio``: the default loop) per backend (``--backend uring|asyncio|all``; a backend
  whose probe fails is skipped with the probe's reason).  The child checks correctness
  first (a window of reads / fused reads whose bytes are compared with ``os.pread``; the
  NOPs' CQEs in order), warms up (a tenth of the op count), then measures
  ``ru_utime + ru_stime`` of ``getrusage(RUSAGE_SELF)`` (the utime+stime of
  ``/proc/self/stat`` and ``os.times()``, at us instead of 10 ms resolution; every
  thread of the process, io_uring's io-wq workers included) around a fixed op count,
  divided by the ops done; the bytes are checked again afterwards.  A wall-clock cap
  ends a measured phase early (flagged ``capped``; the per-op figure stays valid).
* fio runs as a child whose rusage is taken with ``os.wait4`` (fio's main process and its
  job process: ``ru_utime + ru_stime``).  That includes fio's setup (~0.1-0.2 s of CPU
  here), so each fio cell is run twice, back to back: a tiny run (64 ops) and the full
  run, and CPU per op is ``(cpu_full - cpu_tiny) / (ops_full - ops_tiny)``: the marginal
  cost of an op, the same quantity as the ring's.  fio's own figure (JSON ``usr_cpu +
  sys_cpu`` % x ``job_runtime`` / ``total_ios``, job process only) is printed beside it
  as a cross-check.

Contenders are interleaved: every repetition runs all of them, in an order rotated
between repetitions; medians are printed with the min-max range.  Each ring cell runs on
the compiled twin and on the pure core (``AIOFUSED_NO_EXTENSIONS=1`` in its child), both
in the same run (``--cores``; only the pure one where the twin is not built); a child
that ran on another core than asked is an error.

Targets (uvloop): read32 on the uring backend <= 1.6x fio io_uring QD32 (read1 is
reported beside fio QD1); fused32 on the uring backend <= 3.2x fio io_uring QD32; nop32
<= 0.6 us per op on every backend (a NOP never reaches the backend).

Usage: python benchmarks/ops.py [--quick] [--loop uvloop|asyncio]
       [--backend all|uring|asyncio] [--cores both|compiled|pure] [--reps R] [--strict]
       [--dir DIR] [--no-fio]
Exit status: 0 when every cell ran and returned correct results (targets are reported,
and enforced only with --strict: 1 if one was missed); 2 on a wrong result or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import kernel_uring_reason, loop_factory, probe_backends

from aiofused import Cqe, Ring, SetupFlag
from aiofused.driver import configure_logging

BS = 4096
FILE_SIZE = 64 << 20
NULL_LEND = 0
NOFF = 1 << 16  # random offsets per child (cycled)
CHECK_EVERY = 1024  # ops between two looks at the wall-clock cap
BACKENDS = ("uring", "asyncio")
LOOPS = ("uvloop", "asyncio")


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    kind: str  # "read", "fused" or "nop"
    qd: int
    ops: int  # measured ops of a default run (--quick: a tenth)
    fio: str | None  # the fio contender it is compared with
    target: float | None = None  # max ratio to fio, or max us per op if ``fio`` is None
    uring_only: bool = True  # the target applies to the uring backend only


CELLS = (
    Cell("read1", "read", 1, 50_000, "fio-uring-qd1"),
    Cell("read32", "read", 32, 200_000, "fio-uring-qd32", 1.6),
    Cell("fused1", "fused", 1, 30_000, "fio-uring-qd1"),
    Cell("fused32", "fused", 32, 100_000, "fio-uring-qd32", 3.2),
    Cell("nop1", "nop", 1, 200_000, None),
    Cell("nop32", "nop", 32, 1_000_000, None, 0.6, uring_only=False),
)
CELL_BY_NAME = {c.name: c for c in CELLS}


@dataclasses.dataclass(frozen=True)
class FioCell:
    name: str
    engine: str
    qd: int
    ops: int  # full run (--quick: a third); the tiny run does TINY_OPS


FIO_CELLS = (
    FioCell("fio-uring-qd1", "io_uring", 1, 300_000),
    FioCell("fio-uring-qd32", "io_uring", 32, 300_000),
    FioCell("fio-psync-qd1", "psync", 1, 300_000),
)
TINY_OPS = 64


class CellError(Exception):
    """A cell returned a wrong result."""


# ---- child: one ring cell ---------------------------------------------------------------


class Window:
    """Where a sliding window of reads stands between two calls (offsets cycle)."""

    def __init__(self, offsets: list[int]) -> None:
        self.offsets = offsets
        self.pos = 0


async def run_reads(
    ring: Ring, fd: int, bufs: list[bytearray], n: int, w: Window, deadline: float
) -> int:
    """``n`` READs, ``len(bufs)`` in flight (user_data = slot); return the ops done."""
    offsets = w.offsets
    mask = len(offsets) - 1
    pos = w.pos
    get_sqe, peek_cqe, cqe_seen, wait_cqe = (
        ring.get_sqe,
        ring.peek_cqe,
        ring.cqe_seen,
        ring.wait_cqe,
    )
    issued = done = 0
    while issued < len(bufs) and issued < n:
        sqe = get_sqe()
        assert sqe is not None
        sqe.prep_read(fd, bufs[issued], BS, offsets[pos])
        sqe.user_data = issued
        pos = (pos + 1) & mask
        issued += 1
    ring.submit()
    check_at = CHECK_EVERY
    while done < issued:
        cqe: Cqe | None = await wait_cqe()
        refilled = False
        while cqe is not None:
            cqe_seen(cqe)
            if cqe.res != BS:
                raise CellError(f"READ returned {cqe.res}, expected {BS}: {cqe}")
            done += 1
            if issued < n:
                slot = cqe.user_data
                sqe = get_sqe()
                assert sqe is not None
                sqe.prep_read(fd, bufs[slot], BS, offsets[pos])
                sqe.user_data = slot
                pos = (pos + 1) & mask
                issued += 1
                refilled = True
            cqe = peek_cqe()
        if refilled:
            ring.submit()
        if done >= check_at:
            check_at += CHECK_EVERY
            if time.perf_counter() > deadline:
                n = issued  # stop refilling; drain what is in flight
    w.pos = pos
    return done


async def run_fused(
    ring: Ring, null: Any, fd: int, qd: int, n: int, w: Window, deadline: float
) -> int:
    """``n`` fused reads, ``qd`` in flight: user_data 2*slot+1 primary, 2*slot secondary."""
    offsets = w.offsets
    mask = len(offsets) - 1
    pos = w.pos
    get_sqe, peek_cqe, cqe_seen, wait_cqe = (
        ring.get_sqe,
        ring.peek_cqe,
        ring.cqe_seen,
        ring.wait_cqe,
    )
    issued = done = secondaries = 0
    while issued < qd and issued < n:
        p = get_sqe()
        s = get_sqe()
        assert p is not None and s is not None
        p.prep_fused_cmd(null, NULL_LEND, nr_secondary=1)
        p.user_data = 2 * issued + 1
        s.prep_read(fd, 0, BS, offsets[pos])
        s.user_data = 2 * issued
        pos = (pos + 1) & mask
        issued += 1
    ring.submit()
    check_at = CHECK_EVERY
    while done < issued:
        cqe: Cqe | None = await wait_cqe()
        refilled = False
        while cqe is not None:
            cqe_seen(cqe)
            ud = cqe.user_data
            if not ud & 1:
                if cqe.res != BS:
                    raise CellError(f"READ secondary returned {cqe.res}, expected {BS}: {cqe}")
                secondaries += 1
            else:
                if cqe.res != 0:
                    raise CellError(f"FUSED_CMD primary returned {cqe.res}: {cqe}")
                done += 1
                if issued < n:
                    p = get_sqe()
                    s = get_sqe()
                    assert p is not None and s is not None
                    p.prep_fused_cmd(null, NULL_LEND, nr_secondary=1)
                    p.user_data = ud
                    s.prep_read(fd, 0, BS, offsets[pos])
                    s.user_data = ud - 1
                    pos = (pos + 1) & mask
                    issued += 1
                    refilled = True
            cqe = peek_cqe()
        if refilled:
            ring.submit()
        if done >= check_at:
            check_at += CHECK_EVERY
            if time.perf_counter() > deadline:
                n = issued
    if secondaries != done:
        raise CellError(f"{done} primary CQEs but {secondaries} secondary CQEs")
    w.pos = pos
    return done


async def run_nops(ring: Ring, qd: int, n: int, deadline: float) -> int:
    """``n`` NOPs (rounded up to batches of ``qd``): prep, submit, ``wait_cqes(qd)``."""
    get_sqe, submit, wait_cqes = ring.get_sqe, ring.submit, ring.wait_cqes
    last = qd - 1
    done = 0
    check_at = CHECK_EVERY
    while done < n:
        for i in range(qd):
            sqe = get_sqe()
            assert sqe is not None
            sqe.prep_nop()
            sqe.user_data = i
        submit()
        cqes = await wait_cqes(qd)
        c = cqes[-1]
        if c.res != 0 or c.user_data != last:
            raise CellError(f"NOP batch ended with {c}, expected user_data {last} res 0")
        done += qd
        if done >= check_at:
            check_at += CHECK_EVERY
            if time.perf_counter() > deadline:
                break
    return done


async def check_reads(ring: Ring, fd: int, qd: int, rng: random.Random) -> None:
    """One window of ``qd`` READs; every slot's bytes against ``os.pread``."""
    bufs = [bytearray(BS) for _ in range(qd)]
    offs = [rng.randrange(FILE_SIZE // BS) * BS for _ in range(qd)]
    for i in range(qd):
        sqe = ring.get_sqe()
        assert sqe is not None
        sqe.prep_read(fd, bufs[i], BS, offs[i])
        sqe.user_data = 1000 + i
    ring.submit()
    cqes = await ring.wait_cqes(qd)
    for c in cqes:
        i = c.user_data - 1000
        if c.res != BS or not 0 <= i < qd:
            raise CellError(f"check READ: unexpected CQE {c}")
        if bytes(bufs[i]) != os.pread(fd, BS, offs[i]):
            raise CellError(f"check READ at offset {offs[i]}: bytes differ from os.pread")


async def check_fused(ring: Ring, fd: int, qd: int, rng: random.Random) -> None:
    """``qd`` fused reads, each lending its own buffer (null ``buffer=``), bytes checked.

    Also checks the CQE order: the secondary's CQE before its primary's.
    """
    lent = [bytearray(BS) for _ in range(qd)]
    drivers = [ring.open_driver("null", size=BS, buffer=b) for b in lent]
    offs = [rng.randrange(FILE_SIZE // BS) * BS for _ in range(qd)]
    for i in range(qd):
        p = ring.get_sqe()
        s = ring.get_sqe()
        assert p is not None and s is not None
        p.prep_fused_cmd(drivers[i], NULL_LEND, nr_secondary=1)
        p.user_data = 2 * i + 1
        s.prep_read(fd, 0, BS, offs[i])
        s.user_data = 2 * i
    ring.submit()
    cqes = await ring.wait_cqes(2 * qd)
    seen: set[int] = set()
    for c in cqes:
        i = c.user_data // 2
        if c.user_data & 1:
            if c.res != 0 or 2 * i not in seen:
                raise CellError(f"check fused: primary {c} (secondary seen: {2 * i in seen})")
            if bytes(lent[i]) != os.pread(fd, BS, offs[i]):
                raise CellError(f"check fused at offset {offs[i]}: lent buffer differs")
        elif c.res != BS:
            raise CellError(f"check fused: secondary {c}")
        seen.add(c.user_data)
    for df in drivers:
        ring.unregister_driver(df)


async def check_nops(ring: Ring, qd: int) -> None:
    for i in range(qd):
        sqe = ring.get_sqe()
        assert sqe is not None
        sqe.prep_nop()
        sqe.user_data = 7000 + i
    ring.submit()
    cqes = await ring.wait_cqes(qd)
    if [(c.user_data, c.res) for c in cqes] != [(7000 + i, 0) for i in range(qd)]:
        raise CellError(f"check NOP: CQEs {cqes}")


def _usage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


async def child_cell(
    cell: Cell, backend: str, path: str, ops: int, cap: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    w = Window([rng.randrange(FILE_SIZE // BS) * BS for _ in range(NOFF)])
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != FILE_SIZE:
            raise CellError(f"{path} is not {FILE_SIZE} bytes")
        flags = SetupFlag.FUSED_REQ if cell.kind == "fused" else SetupFlag.NONE
        async with Ring(128 if cell.kind == "fused" else 64, flags=flags, backend=backend) as ring:
            if ring.backend != backend:
                raise CellError(f"asked for backend {backend}, got {ring.backend}")
            run: Callable[[int, float], Awaitable[int]]
            check: Callable[[], Awaitable[None]]
            if cell.kind == "read":
                bufs = [bytearray(BS) for _ in range(cell.qd)]

                def run(n: int, deadline: float) -> Awaitable[int]:
                    return run_reads(ring, fd, bufs, n, w, deadline)

                def check() -> Awaitable[None]:
                    return check_reads(ring, fd, cell.qd, rng)

            elif cell.kind == "fused":
                null = ring.open_driver("null", size=BS)

                def run(n: int, deadline: float) -> Awaitable[int]:
                    return run_fused(ring, null, fd, cell.qd, n, w, deadline)

                def check() -> Awaitable[None]:
                    return check_fused(ring, fd, cell.qd, rng)

            else:

                def run(n: int, deadline: float) -> Awaitable[int]:
                    return run_nops(ring, cell.qd, n, deadline)

                def check() -> Awaitable[None]:
                    return check_nops(ring, cell.qd)

            await check()
            warm = max(ops // 10, 4 * cell.qd)
            await run(warm, time.perf_counter() + cap)
            gc.collect()
            r0 = _usage()
            t0 = time.perf_counter()
            done = await run(ops, t0 + cap)
            t1 = time.perf_counter()
            r1 = _usage()
            await check()
            if ring.cq_ready() or ring.sq_ready():
                raise CellError(f"{ring.cq_ready()} CQEs / {ring.sq_ready()} SQEs left over")
    finally:
        os.close(fd)
    usr = r1.ru_utime - r0.ru_utime
    sys_ = r1.ru_stime - r0.ru_stime
    return {
        "ops": done,
        "cpu_us": (usr + sys_) * 1e6 / done,
        "sys_share": sys_ / (usr + sys_) if usr + sys_ > 0 else 0.0,
        "wall_us": (t1 - t0) * 1e6 / done,
        "vcsw_per_kop": (r1.ru_nvcsw - r0.ru_nvcsw) * 1000 / done,
        "capped": done < ops,
    }


def child_main(args: argparse.Namespace) -> int:
    configure_logging("warning")
    cell = CELL_BY_NAME[args.child]
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            out = runner.run(
                asyncio.wait_for(
                    child_cell(cell, args.backend, args.file, args.ops, args.cap, args.seed),
                    timeout=3 * args.cap + 30,
                )
            )
    except CellError as exc:
        print(json.dumps({"error": f"wrong result: {exc}"}))
        return 2
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    import aiofused

    print(json.dumps(out | {"core": aiofused.CORE}))
    return 0


# ---- parent: contenders -------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    cpu_us: float
    wall_us: float
    sys_share: float
    ops: int
    extra: float | None = None  # ring: voluntary context switches per 1k ops; fio: fio's own
    capped: bool = False


@dataclasses.dataclass
class Results:
    samples: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def cpu(self, key: str) -> float | None:
        s = self.samples.get(key)
        return statistics.median(x.cpu_us for x in s) if s else None


def run_ring_child(
    cell: Cell, backend: str, core: str, loop: str, path: str, ops: int, cap: float, seed: int
) -> Sample:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        cell.name,
        "--backend",
        backend,
        "--loop",
        loop,
        "--file",
        path,
        "--ops",
        str(ops),
        "--cap",
        str(cap),
        "--seed",
        str(seed),
    ]
    env = dict(os.environ)
    env.pop("AIOFUSED_NO_EXTENSIONS", None)
    if core == "pure":
        env["AIOFUSED_NO_EXTENSIONS"] = "1"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * cap + 60, env=env)
    except subprocess.TimeoutExpired as exc:
        raise CellError(f"child timed out after {exc.timeout:.0f} s") from None
    lines = p.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        out = {"error": f"no result (exit {p.returncode})"}
    if p.returncode == 0 and out.get("core", core) != core:
        out = {"error": f"ran on the {out['core']} core, not the {core} one"}
    if p.returncode != 0 or "error" in out:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        raise CellError(
            f"{out.get('error', f'exit {p.returncode}')}" + (f"\n{tail}" if tail else "")
        )
    return Sample(
        out["cpu_us"],
        out["wall_us"],
        out["sys_share"],
        out["ops"],
        out["vcsw_per_kop"],
        out["capped"],
    )


def _fio_once(
    fc: FioCell, path: str, ops: int, cap: float, workdir: str
) -> tuple[float, float, int, dict[str, Any]]:
    """Run fio once; return (utime, stime, ops, job JSON)."""
    out = os.path.join(workdir, "fio.json")
    err = os.path.join(workdir, "fio.err")
    cmd = [
        "fio",
        "--name=r",
        f"--ioengine={fc.engine}",
        "--rw=randread",
        "--bs=4k",
        f"--iodepth={fc.qd}",
        f"--filename={path}",
        f"--size={FILE_SIZE}",
        f"--io_size={ops * BS}",
        "--norandommap",
        "--randrepeat=0",
        "--invalidate=0",
        f"--runtime={cap:g}",
        "--output-format=json",
        f"--output={out}",
    ]
    with open(err, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=ef)
    deadline = time.monotonic() + 2 * cap + 30
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise CellError("fio timed out")
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise CellError(f"fio exited {proc.returncode}: {Path(err).read_text()[-500:].strip()}")
    try:
        job = json.loads(Path(out).read_text())["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise CellError(f"fio JSON: {exc}") from None
    rd = job["read"]
    if job["error"] or rd["short_ios"] or rd["total_ios"] <= 0:
        raise CellError(
            f"fio: error {job['error']}, {rd['short_ios']} short reads, {rd['total_ios']} ops"
        )
    return ru.ru_utime, ru.ru_stime, int(rd["total_ios"]), job


def run_fio(fc: FioCell, path: str, ops: int, cap: float, workdir: str) -> Sample:
    u0, s0, n0, _ = _fio_once(fc, path, TINY_OPS, cap, workdir)
    u1, s1, n1, job = _fio_once(fc, path, ops, cap, workdir)
    if n1 <= n0:
        raise CellError(f"fio did {n1} ops in the full run, {n0} in the tiny one")
    usr, sys_ = u1 - u0, s1 - s0
    cpu = (usr + sys_) * 1e6 / (n1 - n0)
    own = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] * 1e3 / n1
    wall = job["job_runtime"] * 1e3 / n1
    share = sys_ / (usr + sys_) if usr + sys_ > 0 else 0.0
    return Sample(cpu, wall, share, n1, own, capped=n1 < ops)


# ---- parent: setup and report -----------------------------------------------------------


def make_file(directory: str) -> tuple[str, str]:
    workdir = tempfile.mkdtemp(prefix="aiofused-ops-", dir=directory)
    path = os.path.join(workdir, "data")
    with open(path, "wb") as f:
        for _ in range(FILE_SIZE >> 24):
            f.write(os.urandom(16 << 20))
    return workdir, path


def warm_cache(path: str) -> int:
    """Read the whole file; return how many MiB were not in the page cache."""
    missed = 0
    buf = bytearray(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, FILE_SIZE, 1 << 20):
            try:
                os.preadv(fd, [buf], off, os.RWF_NOWAIT)
            except BlockingIOError:
                missed += 1
                os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
    return missed


def default_dir() -> str:
    for d in ("/var/tmp", str(Path(__file__).resolve().parent)):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(results: Results, keys: list[tuple[str, str]], loop: str) -> list[tuple[str, bool]]:
    """Print the contenders and the final table; return (label, met) per target."""
    hdr = (
        f"{'contender':<22} {'ops':>9} {'CPU us/op':>9} {'(min-max)':>13} {'sys':>4} "
        f"{'wall us/op':>10} {'note':>14}"
    )
    print(hdr)
    print("-" * len(hdr))
    for key, label in keys:
        s = results.samples.get(key, [])
        if key in results.skipped:
            print(f"{label:<22} skipped: {results.skipped[key]}")
            continue
        if not s:
            print(f"{label:<22} ERROR: {results.errors.get(key, 'no sample').splitlines()[0]}")
            continue
        cpu = [x.cpu_us for x in s]
        extras = [x.extra for x in s if x.extra is not None]
        if key.startswith("fio"):
            note = f"fio's own {statistics.median(extras):.2f}" if extras else ""
        else:
            note = f"{statistics.median(extras):.1f} vcsw/kop" if extras else ""
        if any(x.capped for x in s):
            note += " capped"
        err = " ERROR" if key in results.errors else ""
        print(
            f"{label:<22} {statistics.median(x.ops for x in s):>9,.0f} "
            f"{statistics.median(cpu):>9.2f} {f'({min(cpu):.2f}-{max(cpu):.2f})':>13} "
            f"{statistics.median(x.sys_share for x in s) * 100:>3.0f}% "
            f"{statistics.median(x.wall_us for x in s):>10.2f} {note:>14}{err}"
        )
    print(
        "CPU us/op: utime+stime per op, median of the reps (min-max); sys: its kernel share;\n"
        "wall us/op: elapsed per op; vcsw/kop: voluntary context switches per 1000 ops;\n"
        "fio's own: fio's JSON usr+sys over its job runtime (job process only, no setup)"
    )
    print()
    variants = sorted(
        {k.split("/")[1] for k, _ in keys if k.startswith("ring/")},
        key=lambda v: (BACKENDS.index(v.split(":")[0]), v),
    )
    hdr = (
        f"{'cell':<8} {'backend':<8} {'core':<8} {'aiofused CPU us/op':>18} "
        f"{'fio CPU us/op':>13} {'ratio':>6} {'target':>11} {'':>5}"
    )
    print(f"final table ({loop}; fio at the same QD: io_uring)")
    print(hdr)
    print("-" * len(hdr))
    targets: list[tuple[str, bool]] = []
    for v in variants:
        b, core = v.split(":")
        for c in CELLS:
            key = f"ring/{v}/{c.name}"
            mine = results.cpu(key)
            theirs = results.cpu(c.fio) if c.fio else None
            ratio = mine / theirs if mine is not None and theirs else None
            applies = (
                c.target is not None and loop == "uvloop" and (b == "uring" or not c.uring_only)
            )
            if c.target is None:
                tgt = "-"
            elif c.fio:
                tgt = f"<= {c.target:g}x"
            else:
                tgt = f"<= {c.target:g} us"
            verdict = ""
            if applies and key in results.errors:
                verdict = "ERROR"
            elif applies:
                value = ratio if c.fio else mine
                if value is not None:
                    ok = value <= (c.target or 0)
                    verdict = "PASS" if ok else "MISS"
                    targets.append((f"{c.name} {b} {core}", ok))
            elif c.target is not None:
                tgt = f"({tgt})"
            shown = "ERROR" if mine is None and key in results.errors else fmt(mine)
            print(
                f"{c.name:<8} {b:<8} {core:<8} {shown:>18} {fmt(theirs):>13} "
                f"{'-' if ratio is None else f'{ratio:.2f}x':>6} {tgt:>11} {verdict:>5}"
            )
    psync = results.cpu("fio-psync-qd1")
    if psync is not None:
        rel = ", ".join(
            f"read1 {v.replace(':', ' ')} {m / psync:.2f}x"
            for v in variants
            if (m := results.cpu(f"ring/{v}/read1")) is not None
        )
        print(f"reference: fio psync QD1 {psync:.2f} CPU us/op" + (f" ({rel})" if rel else ""))
    print("(target): reported, not checked (targets: uvloop; read32 and fused32: uring backend)")
    return targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    ap.add_argument("--loop", choices=LOOPS, default="uvloop")
    ap.add_argument("--backend", choices=("all", *BACKENDS), default="all")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target was missed")
    ap.add_argument("--dir", default=None, help="where the temporary 64 MiB file goes")
    ap.add_argument("--no-fio", action="store_true", help="skip the fio contenders")
    ap.add_argument(
        "--cores",
        choices=("both", "compiled", "pure"),
        default="both",
        help="the core the ring cells run on: the compiled twin, the pure one (by\n"
        "AIOFUSED_NO_EXTENSIONS=1), or both interleaved (default; pure only where the\n"
        "twin is not built)",
    )
    ap.add_argument("--child", choices=list(CELL_BY_NAME), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--ops", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=15.0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)

    configure_logging("warning")
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    scale = 10 if args.quick else 1
    fio_scale = 3 if args.quick else 1  # fio is cheap; its setup subtraction needs ops
    cap = 3.0 if args.quick else 15.0
    wanted = list(BACKENDS) if args.backend == "all" else [args.backend]
    backends, why = probe_backends(wanted)
    fio_why = ""
    fio_version = "absent"
    if args.no_fio:
        fio_why = "--no-fio"
    elif not shutil.which("fio"):
        fio_why = "fio not found"
    else:
        fio_version = subprocess.run(
            ["fio", "--version"], capture_output=True, text=True
        ).stdout.strip()
    uring_why = kernel_uring_reason()

    import uvloop

    import aiofused

    print("aiofused ops benchmark: CPU us per op (utime+stime) of the ring beside fio's")
    print(
        f"python {platform.python_version()}, uvloop {getattr(uvloop, '__version__', '?')}, "
        f"{fio_version}, "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(f"aiofused from {Path(aiofused.__file__).parent}")
    twin = aiofused.CORE == "compiled"
    if args.cores == "both":
        cores = ["compiled", "pure"] if twin else ["pure"]
    elif args.cores == "compiled" and not twin:
        print(f"no compiled core here ({aiofused.CORE_REASON})")
        return 2
    else:
        cores = [args.cores]
    print(f"cores: {', '.join(cores)}" + ("" if twin else f" ({aiofused.CORE_REASON})"))
    print(
        f"loop {args.loop}; backends: {', '.join(backends) or 'none'}"
        + "".join(f"; {n} skipped ({w})" for n, w in why.items())
    )

    results = Results()
    keys: list[tuple[str, str]] = []
    for b in backends:
        for core in cores:
            keys += [(f"ring/{b}:{core}/{c.name}", f"{c.name} ({b}, {core})") for c in CELLS]
    for fc in FIO_CELLS:
        keys.append((fc.name, f"fio {fc.engine} qd{fc.qd}"))
        if fio_why:
            results.skipped[fc.name] = fio_why
        elif fc.engine == "io_uring" and uring_why:
            results.skipped[fc.name] = f"kernel io_uring unavailable ({uring_why})"
    if not backends:
        print("no ring backend works here")
        return 2

    workdir, path = make_file(args.dir or default_dir())
    t_start = time.perf_counter()
    try:
        missed = warm_cache(path)
        print(
            f"file {FILE_SIZE >> 20} MiB in {workdir} (page-cached); {reps} reps, interleaved "
            f"(order rotated); ops per cell: "
            + ", ".join(f"{c.name} {c.ops // scale:,}" for c in CELLS)
            + f", fio {FIO_CELLS[0].ops // fio_scale:,}"
        )
        print()
        work: list[tuple[str, Callable[[int], Sample]]] = []
        for b in backends:
            for core in cores:
                for c in CELLS:

                    def ring_job(rep: int, c: Cell = c, b: str = b, core: str = core) -> Sample:
                        return run_ring_child(c, b, core, args.loop, path, c.ops // scale, cap, rep)

                    work.append((f"ring/{b}:{core}/{c.name}", ring_job))
        for fc in FIO_CELLS:
            if fc.name in results.skipped:
                continue

            def fio_job(rep: int, fc: FioCell = fc) -> Sample:
                return run_fio(fc, path, fc.ops // fio_scale, cap, workdir)

            work.append((fc.name, fio_job))
        for rep in range(reps):
            k = rep * len(work) // reps
            missed = warm_cache(path)
            if missed:
                print(f"  (rep {rep + 1}: {missed} MiB of the file had left the page cache)")
            line: list[str] = []
            for key, job in work[k:] + work[:k]:
                if key in results.errors:
                    continue
                try:
                    s = job(rep)
                except Exception as exc:  # report it and go on with the other contenders
                    results.errors[key] = f"{type(exc).__name__}: {exc}"
                    print(f"!! {key}: {results.errors[key]}", file=sys.stderr)
                    continue
                results.samples.setdefault(key, []).append(s)
                line.append(f"{key.removeprefix('ring/')} {s.cpu_us:.2f}")
            print(f"rep {rep + 1}/{reps}: " + ", ".join(line), flush=True)
        print()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    targets = report(results, keys, args.loop)
    print(f"\nwall time {time.perf_counter() - t_start:.1f} s")
    if results.errors:
        print(f"{len(results.errors)} contender(s) failed, see stderr")
        return 2
    if args.strict and not all(ok for _, ok in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
