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


def probe_backends(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """Like :func:`available_backends`, but a backend whose probe fails
    (``aiofused.backend.available_backends()``) is skipped with the probe's reason."""
    from aiofused.backend import available_backends as probe_all

    probes = {p.name: p for p in probe_all()}
    why: dict[str, str] = {}
    candidates: list[str] = []
    for name in wanted:
        probe = probes.get(name)
        if probe is None:
            why[name] = "unknown backend"
        elif not probe.available:
            why[name] = probe.reason or "probe failed"
        else:
            candidates.append(name)
    ok, failed = available_backends(candidates)
    why.update(failed)
    return ok, why


def kernel_uring_reason() -> str:
    """Why the kernel's io_uring is unusable here ("" when it works), from the uring probe."""
    from aiofused.backend import available_backends as probe_all

    for probe in probe_all():
        if probe.name == "uring":
            return "" if probe.available else probe.reason or "probe failed"
    return "no uring backend"
