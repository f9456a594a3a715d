"""Both lifecycle tables (``REQ_TRANSITIONS``, ``FUSED_TRANSITIONS``): every edge, every
missing edge, and Hypothesis state machines over state x input.

The request lifecycle is the core's own (a missing edge is a ring bug:
``LifecycleError``); the fused lifecycle is driven by drivers (a missing edge is the
driver's fault: ``DriverError``).  Besides the tables, the real core is driven through
the driver API to show that it refuses out-of-order calls with ``DriverError``.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from recording_port import LendingDriver, make_core, sqe

from aiofused._abi import ECANCELED
from aiofused._core.records import (
    FUSED_EDGES,
    FUSED_TRANSITIONS,
    REQ_EDGES,
    REQ_TRANSITIONS,
    DriverFile,
    FusedInput,
    FusedState,
    LifecycleError,
    Req,
    ReqInput,
    ReqState,
    fused_step,
    req_step,
)
from aiofused._errors import DriverError

RS, RI, FS, FI = ReqState, ReqInput, FusedState, FusedInput

EXPECTED_REQ = {
    (RS.FREE, RI.CONSUME): RS.PREPARED,
    (RS.PREPARED, RI.ISSUE): RS.INFLIGHT,
    (RS.PREPARED, RI.FAIL): RS.DONE,
    (RS.INFLIGHT, RI.COMPLETE): RS.DONE,
    (RS.INFLIGHT, RI.RESULT): RS.NOTIF,
    (RS.NOTIF, RI.NOTIF): RS.DONE,
    (RS.DONE, RI.RECYCLE): RS.FREE,
}
EXPECTED_FUSED = {
    (FS.PREPARED, FI.ISSUE): FS.ISSUED,
    (FS.PREPARED, FI.FAIL): FS.DONE,
    (FS.ISSUED, FI.LEND): FS.LENT,
    (FS.ISSUED, FI.DONE): FS.DONE,
    (FS.ISSUED, FI.FORCE_CANCEL): FS.DONE,
    (FS.LENT, FI.RETURNED): FS.RETURNING,
    (FS.LENT, FI.DONE): FS.CLOSING,
    (FS.RETURNING, FI.DONE): FS.DONE,
    (FS.CLOSING, FI.RETURNED): FS.DONE,
}


def _record(state: ReqState = RS.FREE, fstate: FusedState = FS.PREPARED) -> Req:
    core, _ = make_core()
    r = Req(core)
    r.state = state
    r.fstate = fstate
    return r


# ---- the tables as data -------------------------------------------------------------


def test_tables_are_the_documented_lifecycles() -> None:
    assert REQ_TRANSITIONS == EXPECTED_REQ
    assert FUSED_TRANSITIONS == EXPECTED_FUSED


def test_int_keyed_edges_are_the_tables() -> None:
    """``state + input`` keys: states are multiples of 16, inputs below 16, no collision."""
    assert all(int(s) % 16 == 0 for s in (*RS, *FS))
    assert all(0 <= int(i) < 16 for i in (*RI, *FI))
    assert {int(s) + int(i): d for (s, i), d in EXPECTED_REQ.items()} == REQ_EDGES
    assert {int(s) + int(i): d for (s, i), d in EXPECTED_FUSED.items()} == FUSED_EDGES


MISSING_REQ = [(s, i) for s, i in itertools.product(RS, RI) if (s, i) not in EXPECTED_REQ]
MISSING_FUSED = [(s, i) for s, i in itertools.product(FS, FI) if (s, i) not in EXPECTED_FUSED]


def test_every_req_edge() -> None:
    for (state, inp), want in EXPECTED_REQ.items():
        r = _record(state)
        assert req_step(r, inp) is want, (state, inp)
        assert r.state is want, (state, inp)


def test_every_missing_req_edge_raises_lifecycle_error() -> None:
    assert len(MISSING_REQ) == len(RS) * len(RI) - len(EXPECTED_REQ)
    for state, inp in MISSING_REQ:
        r = _record(state)
        with pytest.raises(LifecycleError, match=inp.name.lower()):
            req_step(r, inp)
        assert r.state is state, (state, inp)  # unchanged


def test_every_fused_edge() -> None:
    for (state, inp), want in EXPECTED_FUSED.items():
        r = _record(fstate=state)
        assert fused_step(r, inp) is want, (state, inp)
        assert r.fstate is want, (state, inp)


def test_every_missing_fused_edge_raises_driver_error() -> None:
    assert len(MISSING_FUSED) == len(FS) * len(FI) - len(EXPECTED_FUSED)
    for state, inp in MISSING_FUSED:
        r = _record(fstate=state)
        with pytest.raises(DriverError, match=inp.name.lower()):
            fused_step(r, inp)
        assert r.fstate is state, (state, inp)


def _reachable(table: dict, start: object) -> set:
    seen = {start}
    todo = deque([start])
    while todo:
        s = todo.popleft()
        for (src, _), dst in table.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


@pytest.mark.parametrize(
    ("table", "states", "start", "done"),
    [(EXPECTED_REQ, RS, RS.FREE, RS.DONE), (EXPECTED_FUSED, FS, FS.PREPARED, FS.DONE)],
    ids=["req", "fused"],
)
def test_every_state_is_reachable_and_can_reach_done(
    table: dict, states: type, start: object, done: object
) -> None:
    reach = _reachable(table, start)
    assert reach == set(states)  # no dead state in the enum
    for s in reach:
        assert done in _reachable(table, s), f"{s!r} cannot reach DONE"


# ---- Hypothesis: random input sequences ---------------------------------------------


class ReqMachine(RuleBasedStateMachine):
    """Random inputs on one record: it follows an edge or raises and stays put."""

    def __init__(self) -> None:
        super().__init__()
        self.r = _record()
        self.model = RS.FREE
        self.visited = {RS.FREE}

    @rule(inp=st.sampled_from(list(RI)))
    def step(self, inp: ReqInput) -> None:
        want = EXPECTED_REQ.get((self.model, inp))
        if want is None:
            with pytest.raises(LifecycleError):
                req_step(self.r, inp)
        else:
            assert req_step(self.r, inp) is want
            self.model = want
            self.visited.add(want)

    @invariant()
    def state_is_defined_and_tracked(self) -> None:
        assert isinstance(self.r.state, ReqState)
        assert self.r.state is self.model
        assert RS.DONE in _reachable(EXPECTED_REQ, self.r.state)


class FusedMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.r = _record()
        self.model = FS.PREPARED

    @rule(inp=st.sampled_from(list(FI)))
    def step(self, inp: FusedInput) -> None:
        want = EXPECTED_FUSED.get((self.model, inp))
        if want is None:
            with pytest.raises(DriverError):
                fused_step(self.r, inp)
        else:
            assert fused_step(self.r, inp) is want
            self.model = want

    @invariant()
    def state_is_defined_and_tracked(self) -> None:
        assert isinstance(self.r.fstate, FusedState)
        assert self.r.fstate is self.model
        assert FS.DONE in _reachable(EXPECTED_FUSED, self.r.fstate)


_machine_settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestReqMachine = ReqMachine.TestCase
TestReqMachine.settings = _machine_settings
TestFusedMachine = FusedMachine.TestCase
TestFusedMachine.settings = _machine_settings


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(RI)), max_size=30))
def test_req_sequences_follow_edges_or_raise(inputs: list[ReqInput]) -> None:
    r = _record()
    for inp in inputs:
        before = r.state
        want = EXPECTED_REQ.get((before, inp))
        try:
            got = req_step(r, inp)
        except LifecycleError:
            assert want is None and r.state is before
        else:
            assert got is want is r.state


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(FI)), max_size=30))
def test_fused_sequences_follow_edges_or_raise(inputs: list[FusedInput]) -> None:
    r = _record()
    for inp in inputs:
        before = r.fstate
        want = EXPECTED_FUSED.get((before, inp))
        try:
            got = fused_step(r, inp)
        except DriverError:
            assert want is None and r.fstate is before
        else:
            assert got is want is r.fstate


def test_done_is_reached_by_the_shortest_paths() -> None:
    r = _record()
    for inp in (RI.CONSUME, RI.ISSUE, RI.COMPLETE):
        req_step(r, inp)
    assert r.state is RS.DONE
    r = _record()
    for inp in (RI.CONSUME, RI.ISSUE, RI.RESULT, RI.NOTIF, RI.RECYCLE):
        req_step(r, inp)
    assert r.state is RS.FREE
    f = _record()
    for fin in (FI.ISSUE, FI.LEND, FI.DONE, FI.RETURNED):
        fused_step(f, fin)
    assert f.fstate is FS.DONE


# ---- the real core refuses out-of-order driver calls ---------------------------------


def _issued_command(cmd_op: int = 2, fused: bool = True) -> tuple:
    core, port = make_core()
    drv = LendingDriver(keep=True)
    df = DriverFile(drv, core.add_file(drv), core.id)
    if fused:
        sqe(core, 1, "fused_cmd", df, cmd_op)
        sqe(core, 2, "read", 5, 0, 16, 0)
    else:
        sqe(core, 1, "uring_cmd", df, cmd_op)
    core.submit()
    (cmd,) = drv.kept
    return core, port, drv, cmd


def test_lend_twice_is_a_driver_error() -> None:
    _core, port, drv, cmd = _issued_command()
    cmd.provide_buf_and_start(drv.buf, lambda c: c.done(0))
    with pytest.raises(DriverError, match="lent"):
        cmd.provide_buf_and_start(drv.buf, lambda c: c.done(0))
    port.complete(2, 16)
    port.run_work()
    assert port.pairs() == [(2, 16), (1, 0)]
    with pytest.raises(DriverError, match="completed"):
        cmd.provide_buf_and_start(drv.buf, lambda c: c.done(0))
    del cmd, drv.kept[:]
    port.assert_quiet()


def test_lend_on_a_plain_uring_cmd_is_a_driver_error() -> None:
    _core, port, drv, cmd = _issued_command(fused=False)
    with pytest.raises(DriverError, match="plain URING_CMD"):
        cmd.provide_buf_and_start(drv.buf, lambda c: c.done(0))
    cmd.done(7)
    assert port.pairs() == [(1, 7)]
    del cmd, drv.kept[:]
    port.assert_quiet()


def test_done_after_done_posts_nothing_more() -> None:
    """``done`` on a finished command is ignored: one CQE per SQE."""
    _core, port, drv, cmd = _issued_command()
    cmd.done(3)
    assert port.pairs() == [(2, ECANCELED), (1, 3)]
    cmd.done(4)
    assert port.pairs() == [(2, ECANCELED), (1, 3)]
    assert cmd.finished
    del cmd, drv.kept[:]
    port.assert_quiet()


def test_done_while_lent_closes_then_completes_after_the_secondaries() -> None:
    """LENT --done--> CLOSING: the secondaries in flight are cancelled; P's CQE comes
    after their final completion with the driver's result."""
    _core, port, drv, cmd = _issued_command()
    cmd.provide_buf_and_start(drv.buf, lambda c: c.done(99))
    cmd.done(5)
    assert cmd.fstate is FS.CLOSING
    assert port.pairs() == []
    port.answer_cancel(2)
    assert port.pairs() == [(2, ECANCELED), (1, 5)]
    assert not port.work  # the lend callback never runs after done()
    del cmd, drv.kept[:]
    port.assert_quiet()


def test_a_second_backend_completion_raises_lifecycle_error() -> None:
    core, port = make_core()
    sqe(core, 1, "read", 5, bytearray(8))
    core.submit()
    req = port.pending[0]
    port.complete(req, 8)
    with pytest.raises(LifecycleError):
        core.io_done(req, 8, 0)
    assert port.pairs() == [(1, 8)]  # nothing more posted
    del req
    port.assert_quiet()
