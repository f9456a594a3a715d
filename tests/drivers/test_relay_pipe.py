"""The proxy's callback-driven pipe (``aiofused_drivers.relay._pipe.Pipe``) against a
recording ring: a chunk's mirror settle countdown and grace timer belong to that chunk
only.

(With the real ring the race needs a mirror that finishes during the countdown and a
next chunk whose main SEND is slow, which loopback timing does not give on demand.)
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from aiofused_drivers.relay import _pipe as P


class RecordingRing:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.n = 0

    def open_fused(self, *a: Any, **k: Any) -> Any:
        self.n += 1
        self.log.append(("open", self.n))
        return types.SimpleNamespace(name=f"cmd{self.n}", sealed=False)

    def fused_secondary(self, cmd: Any, op: Any, fd: Any, **k: Any) -> None:
        self.log.append(("secondary", cmd.name, fd))

    def seal(self, cmd: Any) -> None:
        cmd.sealed = True
        self.log.append(("seal", cmd.name))

    def cancel_secondaries(self, cmd: Any) -> None:
        self.log.append(("cancel", cmd.name))


def _mirror() -> Any:
    m = types.SimpleNamespace(
        live=True, sock="mirror", busy=False, failed=False, task=None,
        mstats=types.SimpleNamespace(sends=0),
    )  # fmt: skip
    m.count = lambda sent, dropped: None
    m.fail = lambda *a: setattr(m, "failed", True)
    m.close = lambda **k: None
    return m


@pytest.mark.parametrize("grace", [0.0, 0.2])
async def test_a_chunks_settle_never_cancels_the_next_chunk(grace: float) -> None:
    ring = RecordingRing()
    stats = types.SimpleNamespace(chunks=0, bytes_upstream=0, bytes_downstream=0)
    server: Any = types.SimpleNamespace(
        _ring=ring, _relay_file="relay", stats=stats,
        config=types.SimpleNamespace(mirror_grace=grace),
    )  # fmt: skip
    conn: Any = types.SimpleNamespace(mirrors=[_mirror()], chunks=0)
    chan: Any = types.SimpleNamespace(cmd=b"", sock="upstream")
    pipe = P.Pipe(server, conn, chan, chan, True)
    pipe._first = False
    pipe._next()  # chunk 1
    cmd1 = pipe._cmd
    pipe._lent_cb(cmd1, 100)  # main SEND + the mirror's
    pipe._sent_cb(100, 0)  # main SEND done: the settle countdown starts
    pipe._mirror_cb(0, 0, 0)  # the mirror's socket is full (nothing sent)
    if grace:
        await asyncio.sleep(0.01)  # the countdown ran: the grace timer is armed
        pipe._mirror_cb(0, 100, 0)  # the mirror catches up within the grace
    pipe._complete_cb(100, 0)  # chunk 1 done: chunk 2 opens
    cmd2 = pipe._cmd
    assert cmd2 is not cmd1
    pipe._lent_cb(cmd2, 100)  # chunk 2: its main SEND is still in flight
    await asyncio.sleep(grace + 0.05)
    assert ("cancel", "cmd2") not in ring.log, ring.log
