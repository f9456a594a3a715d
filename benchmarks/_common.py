"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/X.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiofused import Ring, SetupFlag


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio.new_event_loop`` or ``uvloop.new_event_loop``."""
    if kind == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def available_backends(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The backends among ``wanted`` that run a NOP here, and why the others do not."""
    ok: list[str] = []
    why: dict[str, str] = {}

    async def probe(name: str) -> None:
        async with Ring(8, flags=SetupFlag.FUSED_REQ, backend=name) as ring:
            if ring.backend != name:
                raise RuntimeError(f"got {ring.backend}")
            sqe = ring.get_sqe()
            assert sqe is not None
            sqe.prep_nop()
            ring.submit()
            async with asyncio.timeout(5):
                await ring.wait_cqes(1)

    for name in wanted:
        try:
            asyncio.run(probe(name))
            ok.append(name)
        except Exception as exc:
            why[name] = f"{type(exc).__name__}: {exc}"
    return ok, why
