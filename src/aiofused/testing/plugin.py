"""pytest plugin: loops, backends, a ``ring`` fixture, and an autouse leak check.

* Every async test runs on the default asyncio loop and on uvloop (when installed),
  through pytest-asyncio's ``pytest_asyncio_loop_factories`` hook.
* ``ring_backend`` is parametrized over ``"asyncio"`` and ``"uring"``; the uring
  case is skipped with the probe's reason where the kernel refuses.
* ``ring`` is a ``Ring(64, flags=SetupFlag.FUSED_REQ)`` on that backend, closed after
  the test.
* After each test: no request in flight on any ring, no buffer lent, no runtime
  view alive (``assert_no_leaks``).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest

__all__ = ["LeakError", "assert_no_leaks", "backend_params"]


class LeakError(AssertionError):
    """Something the runtime holds outlived the test."""


def assert_no_leaks() -> None:
    """Raise :class:`LeakError` if a request is in flight, a buffer lent or a view alive."""
    from aiofused import Ring

    leaks = []
    for ring in list(Ring._instances):
        stats = ring.statistics()
        if stats["in_flight"] or stats["lent"] or stats["views"] or stats["sq_pending"]:
            leaks.append(f"ring {id(ring):#x}: {stats}")
    if leaks:
        raise LeakError("leak after test: " + "; ".join(leaks))


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@pytest.hookimpl(optionalhook=True)
def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every async test on the default loop and on uvloop."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    uv = _uvloop_factory()
    if uv is not None:
        factories["uvloop"] = uv
    return factories


def backend_params() -> list[Any]:
    """``pytest.param`` per backend, the uring one skipped with the probe's reason."""
    from aiofused.backends import available_backends

    params = []
    for probe in available_backends():
        marks = [] if probe.available else [pytest.mark.skip(reason=probe.reason)]
        params.append(pytest.param(probe.name, marks=marks, id=probe.name))
    return params


@pytest.fixture(params=backend_params())
def ring_backend(request: pytest.FixtureRequest) -> str:
    """Name of the backend the test's ring uses."""
    name: str = request.param
    return name


@pytest.fixture
async def ring(ring_backend: str) -> AsyncIterator[Any]:
    """A ``Ring(64, flags=SetupFlag.FUSED_REQ)`` on ``ring_backend``."""
    from aiofused import Ring, SetupFlag

    async with Ring(64, flags=SetupFlag.FUSED_REQ, backend=ring_backend) as r:
        yield r


@pytest.fixture(autouse=True)
def _aiofused_leak_check() -> Iterator[None]:
    """Fail a test that leaves work in flight, a buffer lent or a view alive."""
    yield
    gc.collect()
    assert_no_leaks()
