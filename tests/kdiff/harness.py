"""Differential testing against the kernel: the same batches on io_uring and on aiofused.

A :class:`Batch` is a list of resources (a regular file, pipes, eventfds, unix socket
pairs, each created fresh and prefilled the same way on both sides) and a list of raw
SQEs.  :class:`Kernel` runs batches on the kernel's io_uring through ``executor.c`` (a
small liburing program, independent of aiofused, built with gcc); :func:`run_aiofused`
runs one on an :class:`aiofused.Ring` through its public low-level API only (``get_sqe``,
``prep_*``, raw fields, ``submit``, ``peek_cqe``/``cqe_seen``).  :func:`compare` checks
``submit()``'s count, each user_data's CQEs (res and flags, as a multiset) and the orders
the kernel guarantees: a chain's CQEs in chain order, a drained unit's after everything
submitted before it.  :func:`generate` draws random batches from the classes that are
deterministic on the kernel; :func:`minimize` shrinks a failing batch.

What the generator leaves out, and why (the ``FEATURES`` not in ``DEFAULT_FEATURES``;
issue 12 numbers the classes):

* anything whose kernel answer depends on timing: two requests racing for the same
  bytes (reads share a budget below what the pipe or socket holds, or one reader takes a
  resource alone), a cancel of a file READ/WRITE/FSYNC or of a chain member that is not
  a unit's head (the kernel's io-wq and task-work timing, classes 3, 4), a LINK_TIMEOUT
  racing its target (the short one only guards ops that block for good), file offsets of
  -1 (the shared file position), writes that extend the file;
* ``count`` (a counting TIMEOUT in chains behind io-wq ops counts what the worker's
  timing lets it see, class 5), ``null_buf`` (a NULL buffer the kernel never touches,
  class 16): opt-in while they are open or artefacts (see ``benchmarks/kdiff.py``).

Every op that could block forever (a read of an empty pipe, eventfd or socket, a long
TIMEOUT) is a "blocker": it is always followed by a short LINK_TIMEOUT, so a batch ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiofused import Op, Ring, SetupFlag, SqeFlag

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "executor.c"

LINK = int(SqeFlag.IO_LINK)
HARDLINK = int(SqeFlag.IO_HARDLINK)
DRAIN = int(SqeFlag.IO_DRAIN)
SKIP = int(SqeFlag.CQE_SKIP_SUCCESS)
ASYNC = int(SqeFlag.ASYNC)
FIXED = int(SqeFlag.FIXED_FILE)
BUFSEL = int(SqeFlag.BUFFER_SELECT)
MSG_WAITALL = 0x100
CANCEL_ALL = 1 << 0
TIMEOUT_ETIME_SUCCESS = 1 << 5
TIMEOUT_BOOTTIME = 1 << 2
TIMEOUT_REALTIME = 1 << 3
NOP_INJECT_RESULT = 1 << 0
RECVSEND_POLL_FIRST = 1 << 0
IOPRIO_CLASS_BE = 2 << 13
SOCK_NONEMPTY = 1 << 2

FILE_SIZE = 8192
PREFILL = 4096
RECORDS, RECORD = 6, 64
SHORT_NS = 3_000_000  # a LINK_TIMEOUT that must fire (on a blocker)
LONG_NS = 2_000_000_000  # one that must not (on an op that finishes at once)
BLOCK_NS = 10_000_000_000  # a TIMEOUT that only its LINK_TIMEOUT ends

#: Every generator class; DEFAULT_FEATURES are the deterministic ones CI runs.
FEATURES = frozenset(
    {
        "nop",
        "file",
        "pipe",
        "eventfd",
        "stream",
        "seqpacket",
        "fsync",
        "fallocate",
        "timeout",
        "link_timeout",
        "cancel",
        "link",
        "hardlink",
        "drain",
        "skip",
        "badfd",
        "badfield",
        "ioprio",
        "timeout_flags",
        "nop_flags",
        "submit_all",
        "sock_nonempty",
        "async",
        "count",
        "drain_member",
        "fused_op",
        "waitall_short",
        "bufsel",
        "null_buf",
        "lt_after_lt",
    }
)
OPEN_FEATURES = frozenset({"count", "null_buf"})
DEFAULT_FEATURES = FEATURES - OPEN_FEATURES


@dataclasses.dataclass
class SqeSpec:
    """One raw SQE.  ``fd``: ``"r<i>.<end>"`` (resource i's end) or an int; ``addr``:
    ``"b<n>"`` an n-byte buffer, ``"t<ns>"`` a timespec, ``"i<v>"`` the integer v."""

    ud: int
    op: int
    flags: int = 0
    ioprio: int = 0
    fd: str | int = -1
    off: int = 0
    len: int = 0
    rw: int = 0
    addr: str = "i0"
    buf_index: int = 0
    note: str = ""  # what the generator meant (for the reports)

    def line(self) -> str:
        return (
            f"S {self.ud} {self.op} {self.flags} {self.ioprio} {self.fd} {self.off} "
            f"{self.len} {self.rw} {self.addr} {self.buf_index}"
        )


@dataclasses.dataclass
class Batch:
    """Resources and SQEs, submitted with one ``submit()`` on a fresh ring."""

    resources: list[tuple[str, int, int]]
    sqes: list[SqeSpec]
    setup_flags: int = 0
    entries: int = 32
    seed: object = None

    @property
    def deadline_ms(self) -> float:
        """How long a batch with CQE_SKIP_SUCCESS is waited for: its timers, in series."""
        total = 0
        for s in self.sqes:
            if s.op in (Op.TIMEOUT, Op.LINK_TIMEOUT) and s.addr.startswith("t"):
                ns = int(s.addr[1:])
                if ns < 1_000_000_000:
                    total += ns
        return total / 1e6 + 25.0

    @property
    def hard_ms(self) -> float:
        return self.deadline_ms + 1500.0

    def text(self) -> str:
        lines = [f"B {self.setup_flags} {self.entries} {self.deadline_ms:.1f} {self.hard_ms:.1f}"]
        lines += [f"R {k} {a} {b}" for k, a, b in self.resources]
        lines += [s.line() for s in self.sqes]
        lines.append("E")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """The batch as Python-ish lines, for a report."""
        out = [f"setup_flags={self.setup_flags} resources={self.resources}"]
        for s in self.sqes:
            out.append(
                f"  ud={s.ud} {_opname(s.op)} flags={_flagnames(s.flags)} ioprio={s.ioprio} "
                f"fd={s.fd} off={s.off} len={s.len} rw={s.rw:#x} addr={s.addr}"
                + (f"  # {s.note}" if s.note else "")
            )
        return "\n".join(out)


@dataclasses.dataclass
class Result:
    submitted: int
    cqes: list[tuple[int, int, int]]
    hung: bool = False
    error: str = ""


def _opname(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"OP{op}"


def _flagnames(flags: int) -> str:
    names = [f.name for f in SqeFlag if flags & f and f.name]
    rest = flags & ~sum(int(f) for f in SqeFlag)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _resname(res: int) -> str:
    if res >= 0:
        return str(res)
    return "-" + errno.errorcode.get(-res, str(-res))


# ---- the kernel side -------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the kernel side cannot run here, or None."""
    if shutil.which("gcc") is None:
        return "gcc is not installed (Debian: gcc)"
    if not Path("/usr/include/liburing.h").exists():
        return "liburing is not installed (Debian: liburing-dev)"
    from aiofused.backend import available_backends

    for probe in available_backends():
        if probe.name == "uring" and not probe.available:
            return f"io_uring is unavailable: {probe.reason}"
    return None


class Kernel:
    """The executor, built once into ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.binary = self.workdir / "kdiff-exec"
        if not self.binary.exists():
            subprocess.run(
                ["gcc", "-O1", "-Wall", "-o", str(self.binary), str(SOURCE), "-luring"],
                check=True,
                capture_output=True,
            )

    def run(self, batches: Iterable[Batch]) -> list[Result]:
        batches = list(batches)
        proc = subprocess.run(
            [str(self.binary), str(self.workdir)],
            input="".join(b.text() for b in batches),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"executor failed ({proc.returncode}): {proc.stderr.strip()}")
        results: list[Result] = []
        cur: Result | None = None
        for line in proc.stdout.splitlines():
            kind, *rest = line.split()
            if kind == "B":
                cur = Result(int(rest[0]), [])
            elif kind == "C":
                assert cur is not None
                cur.cqes.append((int(rest[0]), int(rest[1]), int(rest[2])))
            elif kind == "H":
                assert cur is not None
                cur.hung = True
            elif kind == "E":
                assert cur is not None
                results.append(cur)
                cur = None
        if len(results) != len(batches):
            raise RuntimeError(f"executor gave {len(results)} results for {len(batches)}")
        return results

    def run_stable(self, batches: list[Batch], runs: int = 2) -> list[Result | None]:
        """Each batch's kernel result, or None where repeated runs disagree (a timing race
        the generator let through: such batches are not compared)."""
        first = self.run(batches)
        verdict: list[Result | None] = list(first)
        for _ in range(runs - 1):
            for i, again in enumerate(self.run(batches)):
                ref = verdict[i]
                if ref is not None and (
                    ref.submitted != again.submitted
                    or _per_ud(ref.cqes) != _per_ud(again.cqes)
                    or ref.hung
                    or again.hung
                ):
                    verdict[i] = None
        return verdict


# ---- the aiofused side -----------------------------------------------------------------


class _Resources:
    """The batch's resources, made as executor.c makes them."""

    def __init__(self, batch: Batch, workdir: Path) -> None:
        self.ends: list[tuple[Any, Any]] = []
        self.closers: list[Callable[[], None]] = []
        for i, (kind, a, b) in enumerate(batch.resources):
            if kind == "file":
                path = Path(workdir) / f"kdiff-py-{os.getpid()}-{i}.bin"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                _fill(fd, a, 4096)
                path.unlink()
                self.ends.append((fd, -1))
                self.closers.append(lambda fd=fd: os.close(fd))
            elif kind in ("pipe", "bpipe"):
                r, w = os.pipe2(os.O_NONBLOCK if kind == "pipe" else 0)
                _fill(w, a, 4096)
                self.ends.append((r, w))
                self.closers += [lambda r=r: os.close(r), lambda w=w: os.close(w)]
            elif kind == "eventfd":
                fd = os.eventfd(a, os.EFD_NONBLOCK)
                self.ends.append((fd, -1))
                self.closers.append(lambda fd=fd: os.close(fd))
            else:
                stype = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
                s0, s1 = socket.socketpair(socket.AF_UNIX, stype)
                s0.setblocking(False)
                s1.setblocking(False)
                if kind == "stream":
                    _fill(s1.fileno(), a, 4096)
                else:
                    for _ in range(a):
                        _fill(s1.fileno(), b, b)
                self.ends.append((s0, s1))
                self.closers += [s0.close, s1.close]

    def fd(self, spec: str | int) -> Any:
        if isinstance(spec, str) and spec.startswith("r"):
            i, end = spec[1:].split(".")
            return self.ends[int(i)][int(end)]
        return int(spec)

    def close(self) -> None:
        for c in self.closers:
            c()


def _fill(fd: int, n: int, chunk: int) -> None:
    data = bytes(ord("a") + i % 26 for i in range(4096))
    while n:
        k = min(n, chunk, 4096)
        n -= os.write(fd, data[:k])


_PREP = {
    int(Op.READ): "read",
    int(Op.WRITE): "write",
    int(Op.SEND): "send",
    int(Op.RECV): "recv",
}


def _fill_sqe(sqe: Any, s: SqeSpec, fd: Any, keep: list[Any]) -> None:
    """Set an SQE from the spec with the prep helper of its op, then the raw fields."""
    kind, val = s.addr[0], int(s.addr[1:])
    if kind == "b":
        buf = bytearray(max(val, 1))
        buf[0] = 1
        keep.append(buf)
        addr: Any = buf if val else bytearray(0)
    elif kind == "t":
        addr = val / 1e9
    else:
        addr = val
    prep = _PREP.get(s.op)
    if prep is not None and kind == "b":
        getattr(sqe, f"prep_{prep}")(fd, addr, s.len)
    elif s.op == Op.TIMEOUT and kind == "t":
        sqe.prep_timeout(addr, s.off)
    elif s.op == Op.LINK_TIMEOUT and kind == "t":
        sqe.prep_link_timeout(addr)
    elif s.op == Op.ASYNC_CANCEL:
        sqe.prep_cancel(val, s.rw)
    elif s.op == Op.FSYNC:
        sqe.prep_fsync(fd, s.rw)
    else:
        sqe.prep_nop()
    sqe.opcode = s.op
    sqe.fd = fd
    sqe.addr = addr
    sqe.len = s.len
    sqe.off = s.off
    sqe.rw_flags = s.rw
    sqe.ioprio = s.ioprio
    sqe.buf_index = s.buf_index
    sqe.user_data = s.ud
    sqe.flags = s.flags


async def run_aiofused(batch: Batch, backend: str, workdir: Path) -> Result:
    """Run ``batch`` on a fresh Ring; collect CQEs until nothing is in flight."""
    res = _Resources(batch, workdir)
    keep: list[Any] = []
    try:
        ring = Ring(batch.entries, flags=batch.setup_flags, backend=backend)
        try:
            for s in batch.sqes:
                sqe = ring.get_sqe()
                assert sqe is not None, "SQ full"
                _fill_sqe(sqe, s, res.fd(s.fd), keep)
            try:
                submitted = ring.submit()
            except Exception as exc:  # a crash is a finding, not a harness failure
                return Result(-1, [], error=f"submit raised {exc!r}")
            deadline = time.monotonic() + batch.hard_ms / 1e3
            hung = False
            while ring.statistics()["in_flight"]:
                if time.monotonic() > deadline:
                    hung = True
                    break
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
            cqes = []
            while (c := ring.peek_cqe()) is not None:
                ring.cqe_seen(c)
                cqes.append((c.user_data, c.res, int(c.flags)))
            return Result(submitted, cqes, hung=hung)
        finally:
            with contextlib.suppress(TimeoutError):  # a hang was reported already
                await asyncio.wait_for(ring.close(), 3.0)
    finally:
        res.close()


# ---- comparison ------------------------------------------------------------------------


def _per_ud(cqes: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    d: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for ud, r, f in cqes:
        d[ud].append((r, f))
    return {ud: sorted(v) for ud, v in d.items()}


def units(batch: Batch) -> list[list[int]]:
    """The batch's units (chains and standalone requests) as lists of SQE indexes."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i, s in enumerate(batch.sqes):
        cur.append(i)
        if not s.flags & (LINK | HARDLINK):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


_INIT_ERRORS = frozenset({-errno.EINVAL, -errno.EOPNOTSUPP})


def order_violations(
    batch: Batch, cqes: list[tuple[int, int, int]], kernel: list[tuple[int, int, int]]
) -> list[str]:
    """The kernel's guaranteed orders that ``cqes`` break (uds are unique per SQE).

    A unit that failed init is not drained (``io_queue_sqe_fallback`` fails it at once),
    so units where the kernel answered an init error (-EINVAL, -EOPNOTSUPP) are left out
    of the drain check.
    """
    init_failed = {ud for ud, r, _ in kernel if r in _INIT_ERRORS}
    # A chain that failed init gives its head -ECANCELED (with CQE_SKIP_SUCCESS on the
    # head, the member's own errno is hidden): leave those out as well.
    heads_cancelled = {ud for ud, r, _ in kernel if r == -errno.ECANCELED}
    pos: dict[int, int] = {}
    for i, (ud, _, _) in enumerate(cqes):
        pos.setdefault(ud, i)
    out = []
    us = units(batch)
    for unit in us:
        # Chain order: the members that are not LINK_TIMEOUTs (which race their target).
        seen = [
            batch.sqes[i].ud
            for i in unit
            if batch.sqes[i].op != Op.LINK_TIMEOUT and batch.sqes[i].ud in pos
        ]
        if [pos[u] for u in seen] != sorted(pos[u] for u in seen):
            out.append(f"chain {seen} out of order")
    for k in drained_units(batch):
        unit = us[k]
        if any(batch.sqes[i].ud in init_failed for i in unit):
            continue
        if len(unit) > 1 and batch.sqes[unit[0]].ud in heads_cancelled:
            continue
        before = [batch.sqes[i].ud for u in us[:k] for i in u if batch.sqes[i].ud in pos]
        mine = [batch.sqes[i].ud for i in unit if batch.sqes[i].ud in pos]
        after = [batch.sqes[i].ud for u in us[k + 1 :] for i in u if batch.sqes[i].ud in pos]
        if before and mine and max(pos[u] for u in before) > min(pos[u] for u in mine):
            out.append(f"drained unit {mine} before earlier {before}")
        if after and mine and max(pos[u] for u in mine) > min(pos[u] for u in after):
            out.append(f"later {after} before drained unit {mine}")
    return out


def drained_units(batch: Batch) -> list[int]:
    """Indexes of the units the kernel drains: those with an IO_DRAIN member, and the
    unit after one whose IO_DRAIN is on a member after its head (``drain_next``)."""
    out = []
    drain_next = False
    skip_seen = False  # after a CQE_SKIP_SUCCESS, IO_DRAIN is an init error (SPEC R3)
    for k, unit in enumerate(units(batch)):
        flags = []
        for i in unit:
            f = batch.sqes[i].flags
            skip_seen = skip_seen or bool(f & SKIP)
            flags.append(f & DRAIN if not skip_seen else 0)
        if drain_next or any(flags):
            out.append(k)
        drain_next = any(flags[1:])
    return out


@dataclasses.dataclass
class Mismatch:
    """What differs between the kernel and aiofused on one batch."""

    lines: list[str]
    classes: list[str]

    def __bool__(self) -> bool:
        return bool(self.lines)


def compare(batch: Batch, k: Result, a: Result) -> Mismatch:
    lines: list[str] = []
    classes: list[str] = []
    if a.error:
        return Mismatch([a.error], [f"error: {a.error.split('(')[0]}"])
    if a.hung:
        lines.append("aiofused: requests still in flight at the deadline (hang)")
        classes.append("hang")
    if k.submitted != a.submitted:
        lines.append(f"submit(): kernel {k.submitted}, aiofused {a.submitted}")
        classes.append("submit count")
    kd, ad = _per_ud(k.cqes), _per_ud(a.cqes)
    specs = {s.ud: s for s in batch.sqes}
    for ud in sorted(set(kd) | set(ad)):
        kv, av = kd.get(ud, []), ad.get(ud, [])
        if kv == av:
            continue
        s = specs.get(ud)
        what = f"{_opname(s.op)}[{_flagnames(s.flags)}]" if s else "?"
        lines.append(f"ud={ud} {what}: kernel {_cqes_str(kv)}, aiofused {_cqes_str(av)}")
        classes.append(f"{what}: K {_cqes_str(kv)} A {_cqes_str(av)}")
    for v in order_violations(batch, a.cqes, k.cqes):
        if v not in order_violations(batch, k.cqes, k.cqes):
            lines.append(f"aiofused order: {v}")
            classes.append("order")
    return Mismatch(lines, classes)


def _cqes_str(v: list[tuple[int, int]]) -> str:
    if not v:
        return "none"
    return ",".join(_resname(r) + (f"/f{f:#x}" if f else "") for r, f in v)


# ---- generation --------------------------------------------------------------------------

#: Resource indexes (every batch has them all).
R_FILE, R_PIPE, R_EPIPE, R_EFD, R_EEFD, R_STREAM, R_ESTREAM, R_SEQ, R_BPIPE = range(9)
RESOURCES = [
    ("file", FILE_SIZE, 0),
    ("pipe", PREFILL, 0),
    ("pipe", 0, 0),  # empty: reads block
    ("eventfd", 3, 0),
    ("eventfd", 0, 0),  # empty: reads block
    ("stream", PREFILL, 0),
    ("stream", 0, 0),  # empty: reads block
    ("seqpacket", RECORDS, RECORD),
    ("bpipe", 0, 0),  # empty and blocking: reads block, io_uring polls it all the same
]


class _Gen:
    def __init__(self, rng: random.Random, features: frozenset[str]) -> None:
        self.rng = rng
        self.f = features
        self.sqes: list[SqeSpec] = []
        # Read budgets: total bytes (records) the batch may take without a race.
        self.budget = {R_PIPE: PREFILL - 1, R_STREAM: PREFILL - 1, R_SEQ: RECORDS - 1}
        self.efd_read = False
        self.blockers: list[int] = []  # uds of unit heads that block until cancelled

    def has(self, name: str) -> bool:
        return name in self.f

    def ud(self) -> int:
        return len(self.sqes) + 1

    def add(self, s: SqeSpec) -> SqeSpec:
        self.sqes.append(s)
        return s

    # -- op choices; each returns (spec, blocks) --

    def quick_op(self, head: bool) -> tuple[SqeSpec, bool]:
        r = self.rng
        choices: list[Callable[[], tuple[SqeSpec, bool]]] = []
        if self.has("nop"):
            choices += [self.nop] * 2
        if self.has("file"):
            choices += [self.file_rw] * 3
        if self.has("pipe"):
            choices += [self.pipe_rw] * 2
        if self.has("eventfd"):
            choices.append(self.efd_rw)
        if self.has("stream"):
            choices += [self.stream_rw] * 2
        if self.has("seqpacket"):
            choices.append(self.seq_rw)
        if self.has("fsync"):
            choices.append(self.fsync)
        if self.has("fallocate"):
            choices.append(self.fallocate)
        if self.has("timeout"):
            choices.append(self.timeout)
        if self.has("link_timeout") and head:
            # Only a unit's head blocks: a member behind an io-wq op (FSYNC, a file
            # write) would block in that worker, where its LINK_TIMEOUT never fires
            # (issue 12 class 22, a kernel artefact).
            choices.append(self.blocker)
        if self.has("cancel"):
            choices.append(self.cancel)
        if self.has("badfd"):
            choices.append(self.badfd)
        if self.has("badfield"):
            choices.append(self.badfield)
        if not choices:
            choices.append(self.nop)
        return r.choice(choices)()

    def nop(self) -> tuple[SqeSpec, bool]:
        s = SqeSpec(self.ud(), int(Op.NOP))
        if self.has("nop_flags") and self.rng.random() < 0.3:
            s.rw = self.rng.choice([NOP_INJECT_RESULT, 1 << 7, 1 << 30])
            s.len = self.rng.choice([0, 5, 4096, 2**32 - errno.EIO])
            s.note = "nop_flags"
        return s, False

    def _buf(self, n: int) -> str:
        return f"b{n}"

    def file_rw(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        write = r.random() < 0.4
        n = r.choice([0, 1, 100, 512, 4096, 8192])
        if write:
            n = min(n, FILE_SIZE)
            off = r.randrange(0, FILE_SIZE - n + 1)
        else:
            off = r.choice([0, r.randrange(0, FILE_SIZE), FILE_SIZE - 10, FILE_SIZE, 20000])
        op = Op.WRITE if write else Op.READ
        s = SqeSpec(self.ud(), int(op), fd=f"r{R_FILE}.0", off=off, len=n, addr=self._buf(n))
        self._maybe_ioprio(s, rw=True)
        return s, False

    def pipe_rw(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        off = r.choice([0, 0, -1, 100])
        if r.random() < 0.4:
            n = r.choice([1, 64, 1000])
            s = SqeSpec(self.ud(), int(Op.WRITE), fd=f"r{R_PIPE}.1", off=off, len=n, addr=f"b{n}")
        else:
            n = self._take(R_PIPE, r.choice([1, 64, 1000]))
            if n is None:
                return self.nop()
            s = SqeSpec(self.ud(), int(Op.READ), fd=f"r{R_PIPE}.0", off=off, len=n, addr=f"b{n}")
        self._maybe_ioprio(s, rw=True)
        return s, False

    def _take(self, res: int, n: int) -> int | None:
        left = self.budget[res]
        if left <= 0:
            return None
        n = min(n, left)
        self.budget[res] = left - (1 if res == R_SEQ else n)
        return n

    def efd_rw(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        if not self.efd_read and r.random() < 0.6:
            self.efd_read = True
            n = r.choice([8, 8, 4, 16])
            return SqeSpec(self.ud(), int(Op.READ), fd=f"r{R_EFD}.0", len=n, addr=f"b{n}"), False
        n = r.choice([8, 8, 4])
        return SqeSpec(self.ud(), int(Op.WRITE), fd=f"r{R_EFD}.0", len=n, addr=f"b{n}"), False

    def stream_rw(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        write = r.random() < 0.35
        ops = [Op.SEND, Op.WRITE] if write else [Op.RECV, Op.READ]
        op = r.choice(ops)
        if write:
            n = r.choice([1, 100, 2000])
        else:
            got = self._take(R_STREAM, r.choice([1, 100, 2000]))
            if got is None:
                return self.nop()
            n = got
        s = SqeSpec(self.ud(), int(op), fd=f"r{R_STREAM}.0", len=n, addr=f"b{n}")
        if op in (Op.SEND, Op.RECV):
            if r.random() < 0.2:
                s.rw = MSG_WAITALL
            self._maybe_ioprio(s, rw=False)
        else:
            self._maybe_ioprio(s, rw=True)
        return s, False

    def seq_rw(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        if r.random() < 0.3:
            return (
                SqeSpec(self.ud(), int(Op.SEND), fd=f"r{R_SEQ}.0", len=32, addr="b32"),
                False,
            )
        if self._take(R_SEQ, 1) is None:
            return self.nop()
        n = r.choice([RECORD, RECORD, 128, 16])
        s = SqeSpec(self.ud(), int(Op.RECV), fd=f"r{R_SEQ}.0", len=n, addr=f"b{n}")
        if n < RECORD and self.has("waitall_short") and r.random() < 0.5:
            s.rw = MSG_WAITALL
            s.note = "waitall_short"
        return s, False

    def fsync(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        fd = r.choice([f"r{R_FILE}.0", f"r{R_FILE}.0", f"r{R_PIPE}.0", f"r{R_EFD}.0"])
        s = SqeSpec(self.ud(), int(Op.FSYNC), fd=fd, rw=r.choice([0, 0, 1, 2]))
        return s, False

    def fallocate(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        fd = r.choice([f"r{R_FILE}.0", f"r{R_PIPE}.0"])
        length = r.choice([0, 512, 4096])
        s = SqeSpec(self.ud(), int(Op.FALLOCATE), fd=fd, off=0, len=0, addr=f"i{length}")
        if length == 0:
            s.note = "fallocate len 0"
        return s, False

    def timeout(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        s = SqeSpec(self.ud(), int(Op.TIMEOUT), len=1, addr=f"t{r.choice([1, 2, 4]) * 1_000_000}")
        if self.has("count") and r.random() < 0.3:
            s.off = r.choice([1, 2])
        if self.has("timeout_flags") and r.random() < 0.3:
            s.rw = r.choice(
                [TIMEOUT_ETIME_SUCCESS, 1 << 7, TIMEOUT_BOOTTIME | TIMEOUT_REALTIME, 1 << 1]
            )
        if self.has("badfield") and r.random() < 0.1:
            s.len = 2
        return s, False

    def blocker(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        kind = r.choice(["pipe", "efd", "stream", "timeout", "bpipe"])
        ud = self.ud()
        if kind == "timeout":
            return SqeSpec(ud, int(Op.TIMEOUT), len=1, addr=f"t{BLOCK_NS}", note="blocker"), True
        if kind in ("pipe", "bpipe"):
            fd = f"r{R_EPIPE if kind == 'pipe' else R_BPIPE}.0"
            return SqeSpec(ud, int(Op.READ), fd=fd, len=10, addr="b10", note="blocker"), True
        if kind == "efd":
            return (
                SqeSpec(ud, int(Op.READ), fd=f"r{R_EEFD}.0", len=8, addr="b8", note="blocker"),
                True,
            )
        return (
            SqeSpec(ud, int(Op.RECV), fd=f"r{R_ESTREAM}.0", len=10, addr="b10", note="blocker"),
            True,
        )

    def cancel(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        ud = self.ud()
        choices = [10_000 + ud, ud]  # none such, itself
        choices += self.blockers * 3
        choices += [s.ud for s in self.sqes if s.op == Op.NOP and not s.rw]
        target = r.choice(choices)
        flags = 0
        if r.random() < 0.3:
            flags = r.choice([CANCEL_ALL, CANCEL_ALL, 1 << 7])
        s = SqeSpec(ud, int(Op.ASYNC_CANCEL), addr=f"i{target}", rw=flags)
        s.note = "cancel blocker" if target in self.blockers else "cancel"
        return s, False

    def badfd(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        n = 10
        choice = r.randrange(6)
        if choice == 0:
            s = SqeSpec(self.ud(), int(Op.READ), fd=9999, len=n, addr=f"b{n}")
        elif choice == 1:
            s = SqeSpec(self.ud(), int(Op.WRITE), fd=-1, len=n, addr=f"b{n}")
        elif choice == 2:
            s = SqeSpec(self.ud(), int(Op.READ), fd=f"r{R_PIPE}.1", len=n, addr=f"b{n}")
        elif choice == 3:
            s = SqeSpec(self.ud(), int(Op.WRITE), fd=f"r{R_PIPE}.0", len=n, addr=f"b{n}")
        elif choice == 4:
            s = SqeSpec(self.ud(), int(Op.RECV), fd=f"r{R_PIPE}.0", len=n, addr=f"b{n}")
        else:
            s = SqeSpec(self.ud(), int(Op.READ), flags=FIXED, fd=0, len=n, addr=f"b{n}")
        s.note = "bad fd"
        return s, False

    def badfield(self) -> tuple[SqeSpec, bool]:
        r = self.rng
        choice = r.randrange(5)
        if choice == 0:
            s = SqeSpec(self.ud(), 255)
        elif choice == 1:
            s = SqeSpec(self.ud(), int(Op.NOP), flags=1 << 7)
        elif choice == 2:
            s = SqeSpec(self.ud(), int(Op.NOP), ioprio=1)
        elif choice == 3:
            s = SqeSpec(self.ud(), int(Op.LINK_TIMEOUT), len=1, addr=f"t{LONG_NS}")
            s.note = "LINK_TIMEOUT without a target"
        else:
            s = SqeSpec(self.ud(), int(Op.READ), fd=f"r{R_FILE}.0", len=-1 & 0xFFFFFFFF)
            s.len = 10
            s.addr = "b10"
            s.rw = 1 << 30  # unknown RWF_ bit
        if self.has("fused_op") and r.random() < 0.2:
            s = SqeSpec(self.ud(), 128, note="opcode 128")
        if self.has("bufsel") and r.random() < 0.2:
            s = SqeSpec(
                self.ud(), int(Op.READ), flags=BUFSEL, fd=f"r{R_FILE}.0", len=10, addr="b10"
            )
        if self.has("null_buf") and r.random() < 0.2:
            s = SqeSpec(self.ud(), int(Op.READ), fd=f"r{R_FILE}.0", len=10, addr="i0")
        s.note = s.note or "bad field"
        return s, False

    def _maybe_ioprio(self, s: SqeSpec, rw: bool) -> None:
        r = self.rng
        if not self.has("ioprio") or r.random() > 0.15:
            return
        if rw:
            s.ioprio = r.choice([IOPRIO_CLASS_BE | 4, 7 << 13, 1, 1 << 13])
        else:
            # POLL_FIRST only where the op is issued from submit (see _sanitize).
            s.ioprio = r.choice([RECVSEND_POLL_FIRST, 1 << 7, 1 << 1])
        s.note = "ioprio"

    # -- units --

    def unit(self) -> None:
        r = self.rng
        chain = self.has("link") or self.has("hardlink")
        size = r.choice([1, 1, 2, 3, 4]) if chain else 1
        start = len(self.sqes)
        for k in range(size):
            head = k == 0
            s, blocks = self.quick_op(head)
            self.add(s)
            if s.op == Op.ASYNC_CANCEL and not head:
                # A cancel inside a chain runs after what precedes it: its target may be
                # gone by then (a race with the blocker's LINK_TIMEOUT); keep it simple.
                s.addr = f"i{10_000 + s.ud}"
                s.note = "cancel"
            if blocks or (
                self.has("link_timeout") and r.random() < 0.2 and s.op != Op.LINK_TIMEOUT
            ):
                s.flags |= self._link_flag()
                lt = SqeSpec(
                    self.ud(),
                    int(Op.LINK_TIMEOUT),
                    len=1,
                    addr=f"t{SHORT_NS if blocks else LONG_NS}",
                    note="short" if blocks else "long",
                )
                if self.has("timeout_flags") and r.random() < 0.15:
                    lt.rw = r.choice([TIMEOUT_ETIME_SUCCESS, 1 << 7])
                if self.has("badfield") and r.random() < 0.08:
                    lt.off = 1  # LINK_TIMEOUT with an offset: -EINVAL at init
                self.add(lt)
                if blocks and head and not self.has("drain_member"):
                    self.blockers.append(s.ud)
                if self.has("lt_after_lt") and r.random() < 0.1:
                    lt.flags |= LINK
                    self.add(SqeSpec(self.ud(), int(Op.LINK_TIMEOUT), len=1, addr=f"t{LONG_NS}"))
                if k < size - 1:
                    self.sqes[-1].flags |= self._link_flag()
            elif k < size - 1:
                s.flags |= self._link_flag()
        members = self.sqes[start:]
        for s in members:
            if self.has("skip") and r.random() < 0.2:
                s.flags |= SKIP
            if (
                self.has("async")
                and r.random() < 0.1
                and s.op != Op.ASYNC_CANCEL
                and s.note != "blocker"
            ):
                s.flags |= ASYNC
        if self.has("drain") and r.random() < 0.12:
            if self.has("drain_member") and len(members) > 1 and r.random() < 0.5:
                r.choice(members[1:]).flags |= DRAIN
            else:
                members[0].flags |= DRAIN
                # A drained unit starts late: a cancel of its blocker head would race.
                self.blockers = [b for b in self.blockers if b != members[0].ud]

    def _link_flag(self) -> int:
        if self.has("hardlink") and (not self.has("link") or self.rng.random() < 0.3):
            return HARDLINK
        return LINK


def _sanitize(b: Batch) -> None:
    """Drop what would make the kernel's answer depend on where it issues a request.

    The kernel runs some requests from io-wq: IOSQE_ASYNC ones, a chain left open at the
    end of the submission (``io_submit_state_end`` hands its head to
    ``io_queue_sqe_fallback``), drained ones and everything deferred behind a drain, and
    a chain's members behind an io-wq op.  There an ASYNC_CANCEL naming itself finds
    itself running (-EALREADY, -ENOENT elsewhere: aiofused follows for IOSQE_ASYNC, an
    open chain's head and drained heads, not for members behind an FSYNC or a file
    write) and a RECVSEND_POLL_FIRST op returns -EAGAIN.  Such a cancel, after a drain or
    inside a chain, gets a target that does not exist; POLL_FIRST stays only on a unit's
    head issued from submit.
    """
    us = units(b)
    open_tail = set(us[-1]) if us and b.sqes[us[-1][-1]].flags & (LINK | HARDLINK) else set()
    # A request io-wq runs may have run or not when a cancel looks for it (class 4).
    racy = {s.ud for s in b.sqes if s.flags & ASYNC}
    racy |= {b.sqes[i].ud for i in open_tail}
    for k in drained_units(b):
        racy |= {b.sqes[i].ud for i in us[k]}
    for s in b.sqes:
        if s.op == Op.ASYNC_CANCEL and s.addr != f"i{s.ud}" and int(s.addr[1:]) in racy:
            s.addr = f"i{10_000 + s.ud}"
    drained = False
    for unit in us:
        if any(b.sqes[i].flags & DRAIN for i in unit):
            drained = True
        for k, i in enumerate(unit):
            s = b.sqes[i]
            worker = drained or i in open_tail or bool(s.flags & ASYNC)
            if s.op == Op.ASYNC_CANCEL and s.addr == f"i{s.ud}" and (drained or k):
                s.addr = f"i{10_000 + s.ud}"
            if s.op in (Op.SEND, Op.RECV) and s.ioprio == RECVSEND_POLL_FIRST and (worker or k):
                s.ioprio = 0


def generate(rng: random.Random, features: frozenset[str] = DEFAULT_FEATURES) -> Batch:
    g = _Gen(rng, features)
    n_units = rng.randint(1, 4)
    for _ in range(n_units):
        g.unit()
        if len(g.sqes) > 10:
            break
    flags = 0
    if "submit_all" in features and rng.random() < 0.2:
        flags |= int(SetupFlag.SUBMIT_ALL)
    b = Batch(list(RESOURCES), g.sqes, setup_flags=flags)
    _sanitize(b)
    return b


def batches(seed: int, n: int, features: frozenset[str] = DEFAULT_FEATURES) -> list[Batch]:
    out = []
    for i in range(n):
        b = generate(random.Random(f"{seed}:{i}"), features)
        b.seed = (seed, i)
        out.append(b)
    return out


# ---- minimizing --------------------------------------------------------------------------


def candidates(b: Batch) -> Iterable[Batch]:
    """Smaller or simpler variants of ``b``: an SQE less, a flag less, a field zeroed."""
    n = len(b.sqes)
    for i in range(n):
        sqes = [dataclasses.replace(s) for j, s in enumerate(b.sqes) if j != i]
        yield dataclasses.replace(b, sqes=sqes)
    for i, s in enumerate(b.sqes):
        for bit in (LINK, HARDLINK, DRAIN, SKIP, ASYNC):
            if s.flags & bit:
                sqes = [dataclasses.replace(x) for x in b.sqes]
                sqes[i].flags &= ~bit
                yield dataclasses.replace(b, sqes=sqes)
        for field in ("ioprio", "rw", "off"):
            if getattr(s, field):
                sqes = [dataclasses.replace(x) for x in b.sqes]
                setattr(sqes[i], field, 0)
                yield dataclasses.replace(b, sqes=sqes)
    if b.setup_flags:
        yield dataclasses.replace(b, setup_flags=0, sqes=[dataclasses.replace(s) for s in b.sqes])


async def minimize(b: Batch, fails: Callable[[Batch], Awaitable[bool]], budget: int = 200) -> Batch:
    """Greedy shrinking: take the first candidate that still fails, until none does."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for c in candidates(b):
            tries += 1
            if await fails(c):
                b = c
                improved = True
                break
            if tries >= budget:
                break
    return b


async def check(kernel: Kernel, b: Batch, backend: str, workdir: Path) -> Mismatch | None:
    """``b``'s mismatch on ``backend`` (None: the kernel's answer is not stable)."""
    k = kernel.run_stable([b])[0]
    if k is None:
        return None
    return compare(b, k, await run_aiofused(b, backend, workdir))


async def shrink(
    kernel: Kernel, b: Batch, backend: str, workdir: Path, want: str | None = None
) -> Batch:
    """Minimize ``b`` keeping mismatch class ``want`` (default: its first)."""
    if want is None:
        first = await check(kernel, b, backend, workdir)
        if not first:
            return b
        want = first.classes[0]

    async def fails(c: Batch) -> bool:
        m = await check(kernel, c, backend, workdir)
        return bool(m) and want in m.classes  # type: ignore[union-attr]

    return await minimize(b, fails)
