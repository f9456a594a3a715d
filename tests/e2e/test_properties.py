"""Property tests (Hypothesis) over random SQE batches: random ops, flags, links,
fused groups and bad fields, on both loops and every available backend.

Invariants checked after each batch (SPEC R2, R4, L1-L4, F3, F9, F11):
* every SQE is eventually consumed; no user_data gets two CQEs;
* without any CQE_SKIP_SUCCESS in the batch, every consumed SQE has exactly one CQE;
* a primary's CQE comes after each of its secondaries' CQEs;
* the CQEs of one chain appear in chain order;
* afterwards nothing is in flight, nothing lent, no view alive, and the loop saw no
  unhandled exception.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiofused import Ring, SetupFlag, SqeFlag
from aiofused.testing import backend_params

LINK = int(SqeFlag.IO_LINK)
HARD = int(SqeFlag.IO_HARDLINK)
SKIP = int(SqeFlag.CQE_SKIP_SUCCESS)
DRAIN = int(SqeFlag.IO_DRAIN)

KINDS = ["nop", "read", "read_short", "read_badfd", "write", "bad_op", "bad_flag", "timeout"]


@dataclass
class Item:
    kind: str
    flags: int
    secondaries: list[tuple[str, int]] = field(default_factory=list)  # (kind, flags)
    nr_delta: int = 0


flag_st = st.sampled_from([0, 0, 0, LINK, LINK, HARD, SKIP, SKIP | LINK, DRAIN])
sec_st = st.tuples(
    st.sampled_from(["read", "read", "read_oob", "read_badfd", "write", "fsync", "nop"]),
    st.sampled_from([0, 0, 0, SKIP, LINK]),
)
item_st = st.one_of(
    st.builds(Item, st.sampled_from(KINDS), flag_st),
    st.builds(
        Item,
        st.just("fused"),
        flag_st,
        st.lists(sec_st, min_size=0, max_size=4),
        st.sampled_from([0, 0, 0, 1, -1]),
    ),
)
batch_st = st.lists(item_st, min_size=1, max_size=12)


def _loops() -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]]:
    loops: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [
        ("asyncio", asyncio.new_event_loop)
    ]
    try:
        import uvloop

        loops.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        pass
    return loops


async def _scenario(batch: list[Item], backend: str, fd: int, wfd: int) -> None:
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    ring = Ring(128, flags=SetupFlag.FUSED_REQ, backend=backend)
    df = ring.open_driver("null", size=4096)
    flat: list[tuple[int, int, int]] = []  # (user_data, flags, nr_secondary or -1)
    ud = 0
    any_skip = False

    def prep(sqe: Any, kind: str, secondary: bool) -> None:
        if kind == "nop":
            sqe.prep_nop()
        elif kind in ("read", "read_short", "read_oob"):
            off = 4096 - 100 if kind == "read_short" else 0
            if secondary:
                sqe.prep_read(fd, 5000 if kind == "read_oob" else 0, 512, off)
            else:
                sqe.prep_read(fd, bytearray(512), 512, off)
        elif kind == "read_badfd":
            sqe.prep_read(-1, 0 if secondary else bytearray(8), 8, 0)
        elif kind == "write":
            sqe.prep_write(wfd, 0 if secondary else b"w" * 64, 64, 0)
        elif kind == "fsync":
            sqe.prep_fsync(wfd)
        elif kind == "bad_op":
            sqe.prep_nop()
            sqe.opcode = 255
        elif kind == "bad_flag":
            sqe.prep_nop()
            sqe.flags |= 1 << 7
        elif kind == "timeout":
            sqe.prep_timeout(0.001)

    for item in batch:
        ud += 1
        sqe = ring.get_sqe()
        assert sqe is not None
        nr = -1
        if item.kind == "fused":
            nr = max(len(item.secondaries) + item.nr_delta, 0)
            sqe.prep_fused_cmd(df, 0, nr_secondary=nr)
        else:
            prep(sqe, item.kind, False)
        sqe.flags |= item.flags
        sqe.user_data = ud
        flat.append((ud, sqe.flags, nr))
        for kind, flags in item.secondaries:
            ud += 1
            s = ring.get_sqe()
            assert s is not None
            prep(s, kind, True)
            s.flags |= flags
            s.user_data = ud
            flat.append((ud, s.flags, -1))
    any_skip = any(f & SKIP for _, f, _ in flat)
    total = len(flat)
    # The structure the kernel would see: a primary takes the next nr SQEs (SPEC F3).
    primaries: dict[int, list[int]] = {}
    chains: list[list[int]] = []
    current: list[int] | None = None
    i = 0
    while i < total:
        u, f, nr = flat[i]
        i += 1
        if nr >= 1:
            primaries[u] = [x[0] for x in flat[i : i + nr]]
            i += len(primaries[u])
        if current is None:
            current = []
            chains.append(current)
        current.append(u)
        if not f & (LINK | HARD):
            current = None
    consumed = 0
    for _ in range(total + 1):
        if not ring.sq_ready():
            break
        consumed += ring.submit()
    assert consumed == total, "every SQE is eventually consumed"
    for _ in range(500):
        if ring.in_flight() == 0:
            break
        await asyncio.sleep(0.005)
    assert ring.in_flight() == 0, "work left in flight"
    cqes = []
    while (c := ring.peek_cqe()) is not None:
        ring.cqe_seen(c)
        cqes.append(c.user_data)
    await ring.close()
    assert len(cqes) == len(set(cqes)), f"a user_data got two CQEs: {cqes}"
    if not any_skip:
        assert sorted(cqes) == list(range(1, total + 1)), "one CQE per consumed SQE"
    pos = {u: i for i, u in enumerate(cqes)}
    for p, secs in primaries.items():
        for s in secs:
            if p in pos and s in pos:
                assert pos[s] < pos[p], f"secondary {s} after primary {p}: {cqes}"
    for chain in chains:
        seen = [pos[u] for u in chain if u in pos]
        assert seen == sorted(seen), f"chain {chain} out of order in {cqes}"
    stats = ring.statistics()
    assert (stats["lent"], stats["views"]) == (0, 0)
    assert not errors, errors


@pytest.mark.parametrize("backend", backend_params())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=batch_st)
def test_random_batches(backend: str, batch: list[Item]) -> None:
    """Random SQE batches keep every invariant of the module docstring."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data")
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
        fd = os.open(path, os.O_RDONLY)
        wfd = os.open(os.path.join(d, "out"), os.O_CREAT | os.O_WRONLY)
        try:
            for _, factory in _loops():
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(_scenario(batch, backend, fd, wfd))
        finally:
            os.close(fd)
            os.close(wfd)
