"""Seeded random batches through RingCore over the recording port, as one JSON trace.

``python twin_trace.py FIRST COUNT`` prints ``{"core": ..., "traces": [...]}``: for each
seed, every event the recording port saw (starts, driver calls, cancels, CQEs, idle) and
what the core holds at the end.  ``test_core_twin`` runs it once on each core and
compares: the compiled twin must do exactly what the pure core does.

Batches are drawn as ``test_core_random`` draws them (NOP/READ/invalid SQEs and fused
commands, LINK/HARDLINK/CQE_SKIP_SUCCESS/DRAIN, short, failed and inline results), plus
ASYNC_CANCELs of earlier requests, and the world's moves (submit, complete one pending
op, run one task work item) are picked by the same seeded generator.
"""

from __future__ import annotations

import errno
import json
import random
import sys
from typing import Any

from recording_port import DRAIN, HARD, LINK, SKIP, make_core
from test_core_random import Item, Sec, lending_drivers, number, prep

import aiofused
from aiofused._core.ring import RingCore

FLAGS = [0, 0, 0, LINK, LINK, LINK | SKIP, HARD, HARD | SKIP, SKIP, DRAIN]
RESULTS = ["full", "full", "full", "short", "eof", "error"]


def draw_item(rng: random.Random) -> Item:
    pick = rng.random()
    if pick < 0.55:
        return Item(rng.choice(["nop", "nop", "read", "read", "read", "bad"]), rng.choice(FLAGS))
    if pick < 0.75:
        return Item("read", rng.choice(FLAGS), rng.choice(RESULTS))
    secs = [Sec(rng.choice(RESULTS), rng.choice([0, 0, SKIP])) for _ in range(rng.randint(1, 3))]
    return Item(
        "fused",
        rng.choice([0, 0, LINK, HARD, SKIP, LINK | SKIP]),
        "full",
        rng.choice(["ok", "ok", "fail", "inline"]),
        secs,
    )


def run(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    core, port = make_core(entries=64)
    drivers = lending_drivers(core, port)
    batches = [[draw_item(rng) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 4))]
    results = number(batches)
    ud = 1 + sum(1 + len(it.secs) for b in batches for it in b)  # the next free user_data
    cancel_ud = 10_000
    todo = list(batches)
    while True:
        choices = (["submit"] if todo else []) + (["complete"] if port.pending else [])
        choices += ["work"] if port.work else []
        choices += ["answer"] if port.cancels else []
        if not choices:
            break
        action = rng.choice(choices)
        if action == "submit":
            for it in todo.pop(0):
                prep(core, it, drivers)
            if rng.random() < 0.3 and ud > 1:
                _cancel(core, cancel_ud, rng.randrange(1, ud))
                cancel_ud += 1
            while core.sq_ready():
                core.submit()
        elif action == "complete":
            req = port.pending[rng.randrange(len(port.pending))]
            port.complete(req, results.get(req.user_data, 0))
        elif action == "answer":
            port.answer_all_cancels(rng.choice([0, 0, -errno.EALREADY]))
        else:
            port.run_work(limit=1)
    return {
        "events": port.events,
        "errors": [event for event, _ in port.errors],
        "end": [core.live, core.views, core.lent, core.sq_ready(), core.cq_ready()],
    }


def _cancel(core: RingCore, user_data: int, target: int) -> None:
    s = core.get_sqe()
    assert s is not None
    s.prep_cancel(target)
    s.user_data = user_data


def main(argv: list[str]) -> int:
    first, count = int(argv[0]), int(argv[1])
    traces = [run(seed) for seed in range(first, first + count)]
    json.dump({"core": aiofused.CORE, "traces": traces}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
