"""Randomized scheduling (Hypothesis): random batches of NOP/READ/invalid SQEs and fused
commands, random flags (LINK, HARDLINK, CQE_SKIP_SUCCESS, DRAIN), random results and a
random completion order, checked against a reference model of the SPEC.

The model is written from the rules, not from the core: chains end at the first SQE
without a link flag or at the end of a submit (L1); a failure (res < 0 or a short READ)
cancels the rest of its chain unless HARDLINK (L2); an init error fails its whole chain
(L3); SKIP hides a success, and a failed SKIP request hides the cancelled rest of its
chain (L4, as the kernel's ``req_set_fail``); DRAIN after any SKIP is -EOPNOTSUPP (R3);
a fused primary's secondaries post before it, -ECANCELED if it never lends (F7, F9).

Checked on every example:
* the posted CQEs are exactly the model's (one per consumed SQE unless SKIP hides it),
  every ``flags`` 0, no user_data twice, every SQE consumed;
* a chain's members run one after another: every event of one member (start, backend
  completion, CQE) comes before every event of the next (L1, F10);
* a primary's CQE comes after every event of its secondaries (F9);
* a drained unit starts after every earlier unit ended and ends before any later unit
  starts (L5; units failed at init complete at once, as in the kernel);
* at the end nothing is in flight, lent or viewed, nothing pending; the port went idle
  (if anything ever went to a backend).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recording_port import DRAIN, HARD, LINK, SKIP, LendingDriver, RecordingPort, make_core

from aiofused._abi import ECANCELED, EINVAL, EIO, EOPNOTSUPP
from aiofused._core.records import DriverFile
from aiofused._core.ring import RingCore

PLAIN_N = 8
SEC_N = 16
RESULTS = {"full": None, "short": 3, "eof": 0, "error": EIO}
DRIVER_RES = {"ok": 0, "fail": -5, "inline": 7}
#: ``AIOFUSED_FUZZ_EXAMPLES=5000`` for a deep run; the default keeps the suite fast.
EXAMPLES = int(os.environ.get("AIOFUSED_FUZZ_EXAMPLES", "150"))


@dataclasses.dataclass
class Sec:
    result: str
    flags: int
    ud: int = 0

    def res(self) -> int:
        r = RESULTS[self.result]
        return SEC_N if r is None else r


@dataclasses.dataclass
class Item:
    kind: str  # "nop", "read", "bad", "fused"
    flags: int
    result: str = "full"
    mode: str = "ok"
    secs: list[Sec] = dataclasses.field(default_factory=list)
    ud: int = 0
    err: int = 0

    def res(self) -> int:
        r = RESULTS[self.result]
        return PLAIN_N if r is None else r


flags_st = st.sampled_from([0, 0, 0, LINK, LINK, LINK | SKIP, HARD, HARD | SKIP, SKIP, DRAIN])
result_st = st.sampled_from(["full", "full", "full", "short", "eof", "error"])
sec_st = st.builds(Sec, result_st, st.sampled_from([0, 0, SKIP]))
item_st = st.one_of(
    st.builds(Item, st.sampled_from(["nop", "nop", "read", "read", "read", "bad"]), flags_st),
    st.builds(
        Item,
        st.just("read"),
        flags_st,
        result_st,
    ),
    st.builds(
        Item,
        st.just("fused"),
        st.sampled_from([0, 0, LINK, HARD, SKIP, LINK | SKIP]),
        st.just("full"),
        st.sampled_from(["ok", "ok", "fail", "inline"]),
        st.lists(sec_st, min_size=1, max_size=3),
    ),
)
batches_st = st.lists(st.lists(item_st, min_size=1, max_size=8), min_size=1, max_size=4)


# ---- the model ----------------------------------------------------------------------


def chains(batch: list[Item]) -> list[list[Item]]:
    """SPEC L1: a chain ends at the first SQE without a link flag, or at the batch end."""
    out: list[list[Item]] = []
    cur: list[Item] = []
    for it in batch:
        cur.append(it)
        if not it.flags & (LINK | HARD):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


class Model:
    def __init__(self) -> None:
        self.skip_seen = False
        #: ud -> res of every CQE that must be posted.
        self.posted: dict[int, int] = {}

    def init_errors(self, batch: list[Item]) -> None:
        """SPEC R3 in consumption order (an unknown opcode is rejected before the flags
        are looked at, so its SKIP does not count, as in io_init_req)."""
        for it in batch:
            if it.kind == "bad":
                it.err = EINVAL
                continue
            if it.flags & SKIP:
                self.skip_seen = True
            if it.flags & DRAIN and self.skip_seen:
                it.err = EOPNOTSUPP
            for s in it.secs:
                if s.flags & SKIP:
                    self.skip_seen = True

    def post(self, ud: int, res: int, hidden: bool) -> None:
        assert ud not in self.posted
        if not hidden:
            self.posted[ud] = res

    def cancel(self, it: Item, hidden: bool, res: int = ECANCELED) -> None:
        for s in it.secs:
            self.post(s.ud, ECANCELED, hidden)
        self.post(it.ud, res, hidden)

    def unit(self, unit: list[Item]) -> None:
        if any(it.err for it in unit):  # SPEC L3
            head = unit[0]
            self.cancel(head, False, head.err or ECANCELED)
            drop = bool(head.flags & SKIP)  # L4: the head failed
            for m in unit[1:]:
                self.cancel(m, drop, m.err or ECANCELED)
            return
        severed: bool | None = None
        for m in unit:
            if severed is not None:
                self.cancel(m, severed)
                continue
            ok = self.run(m)
            if not ok and not m.flags & HARD:
                severed = bool(m.flags & SKIP)

    def run(self, m: Item) -> bool:
        if m.kind == "nop":
            res, ok = 0, True
        elif m.kind == "read":
            res = m.res()
            ok = res == PLAIN_N
        else:
            if m.mode == "inline":
                for s in m.secs:
                    self.post(s.ud, ECANCELED, False)
            else:
                for s in m.secs:
                    sres = s.res()
                    self.post(s.ud, sres, bool(s.flags & SKIP) and sres == SEC_N)
            res = DRIVER_RES[m.mode]
            ok = res >= 0
        self.post(m.ud, res, bool(m.flags & SKIP) and ok)
        return ok


# ---- running it ---------------------------------------------------------------------


def lending_drivers(core: RingCore, port: RecordingPort) -> dict[str, DriverFile]:
    """One LendingDriver per DRIVER_RES mode, registered in ``core``."""
    drivers = {}
    for mode, res in DRIVER_RES.items():
        drv = LendingDriver(result=res)
        drv.port = port
        drivers[mode] = DriverFile(drv, core.add_file(drv), core.id)
    return drivers


def number(batches: list[list[Item]]) -> dict[int, int]:
    """Give every item and secondary its user_data (from 1, in order); return the result
    each READ and secondary completes with, by user_data."""
    ud = 1
    for batch in batches:
        for it in batch:
            it.ud, ud = ud, ud + 1
            for s in it.secs:
                s.ud, ud = ud, ud + 1
    results = {it.ud: it.res() for b in batches for it in b if it.kind == "read"}
    results |= {s.ud: s.res() for b in batches for it in b for s in it.secs}
    return results


def prep(core: RingCore, it: Item, drivers: dict[str, Any]) -> None:
    s = core.get_sqe()
    assert s is not None
    if it.kind == "nop":
        s.prep_nop()
    elif it.kind == "bad":
        s.prep_nop()
        s.opcode = 255
    elif it.kind == "read":
        s.prep_read(5, bytearray(PLAIN_N))
    else:
        cmd_op = 1 if it.mode == "inline" else 0
        s.prep_fused_cmd(drivers[it.mode], cmd_op, nr_secondary=len(it.secs))
    s.user_data = it.ud
    s.flags |= it.flags
    for k, sec in enumerate(it.secs):
        t = core.get_sqe()
        assert t is not None
        t.prep_read(5, SEC_N * k, SEC_N, 0)
        t.user_data = sec.ud
        t.flags |= sec.flags


def span(events: list[tuple[Any, ...]], uds: set[int]) -> tuple[int, int] | None:
    idx = [i for i, e in enumerate(events) if len(e) > 1 and e[1] in uds]
    return (min(idx), max(idx)) if idx else None


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=batches_st, data=st.data())
def test_random_scheduling_follows_the_model(batches: list[list[Item]], data: Any) -> None:
    core, port = make_core(entries=64)
    drivers = lending_drivers(core, port)
    results = number(batches)

    model = Model()
    for batch in batches:
        model.init_errors(batch)
        for unit in chains(batch):
            model.unit(unit)

    todo = list(batches)
    consumed = 0
    while True:
        choices = (["submit"] if todo else []) + (["complete"] if port.pending else [])
        choices += ["work"] if port.work else []
        if not choices:
            break
        action = data.draw(st.sampled_from(choices), label="action")
        if action == "submit":
            batch = todo.pop(0)
            for it in batch:
                prep(core, it, drivers)
            while core.sq_ready():
                n = core.submit()
                assert n > 0
                consumed += n
        elif action == "complete":
            k = data.draw(st.integers(0, len(port.pending) - 1), label="which")
            req = port.pending[k]
            port.complete(req, results[req.user_data])
        else:
            port.run_work(limit=1)

    _check(batches, model, port, consumed)
    port.assert_quiet()
    if port.started:
        assert port.idle_count >= 1  # went idle once the last op finished


def _check(batches: list[list[Item]], model: Model, port: RecordingPort, consumed: int) -> None:
    total = sum(1 + len(it.secs) for b in batches for it in b)
    assert consumed == total  # every SQE consumed (R4 only delays)
    uds = [c.user_data for c in port.cqes]
    assert len(uds) == len(set(uds)), "a user_data got two CQEs"
    assert all(c.flags == 0 for c in port.cqes)
    assert {c.user_data: c.res for c in port.cqes} == model.posted

    events = port.events
    units: list[tuple[list[Item], bool]] = []
    for batch in batches:
        for unit in chains(batch):
            units.append((unit, any(it.err for it in unit)))
    for unit, _ in units:  # L1/F10: serial members; F9: P after its secondaries
        prev: tuple[int, int] | None = None
        for m in unit:
            block = span(events, {m.ud, *(s.ud for s in m.secs)})
            if block is None:
                continue
            if prev is not None:
                assert prev[1] < block[0], f"chain member {m.ud} overlaps the one before"
            prev = block
            if m.secs and m.ud in model.posted:
                p_cqe = events.index(("cqe", m.ud, model.posted[m.ud], 0))
                secs = span(events, {s.ud for s in m.secs})
                assert secs is None or secs[1] < p_cqe, f"P {m.ud} before a secondary"
    spans = [
        (span(events, {u for m in unit for u in (m.ud, *(s.ud for s in m.secs))}), failed)
        for unit, failed in units
    ]
    for i, (unit, failed) in enumerate(units):  # L5
        if failed or not any(m.flags & DRAIN for m in unit) or spans[i][0] is None:
            continue
        first, last = spans[i][0]
        for j, (sp, other_failed) in enumerate(spans):
            if sp is None or j == i:
                continue
            if j < i:
                assert sp[1] < first, f"drained unit {i} started before unit {j} ended"
            elif not other_failed:
                assert last < sp[0], f"unit {j} started before drained unit {i} ended"
