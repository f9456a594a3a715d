"""pytest plugin: loops, backends, a ``ring`` fixture, and a leak check, on request.

Loaded through the ``pytest11`` entry point wherever aiofused is installed, it does
nothing to a test that does not ask for it.  A test opts in by using one of its
fixtures (``ring``, ``ring_backend``, ``aiofused_loop_check``), by the ``aiofused``
marker (``@pytest.mark.aiofused``, a module's or class's ``pytestmark``), or every
test of a project does with the ini option ``aiofused_mode = auto``.  An opted-in test:

* runs, if it is a pytest-asyncio test, on the default asyncio loop and on uvloop
  (when installed), through pytest-asyncio's ``pytest_asyncio_loop_factories`` hook
  (a project's own implementation of that hook wins);
* is checked after its teardown: no request in flight on a ring, no buffer lent, no
  runtime view alive (:func:`assert_no_leaks`).  A leak fails that test only: the
  leaking ring is not blamed again on later tests.

Fixtures:

* ``ring_backend``: ``"uring"`` and ``"asyncio"``; the uring case is skipped with the
  probe's reason where the kernel refuses.
* ``ring``: a ``Ring(64, flags=SetupFlag.FUSED_REQ)`` on that backend, closed after the
  test.  It works under pytest-asyncio in strict mode (mark the test
  ``@pytest.mark.asyncio``) and auto mode, and under anyio (``@pytest.mark.anyio``;
  pytest-asyncio in strict mode, as anyio asks).

``-p no:aiofused`` disables the plugin altogether.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from aiofused import Ring

__all__ = ["LeakError", "assert_no_leaks", "backend_params", "find_leaks", "uses_plugin"]

MARKER = "aiofused"
FIXTURES = frozenset({"ring", "ring_backend", "aiofused_loop_check"})
_BACKEND_NAMES = ("uring", "asyncio")  # the order of aiofused.backend.BACKENDS

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LeakError(AssertionError):
    """Something the runtime holds outlived the test."""


def _leaking(ring: Ring) -> dict[str, int | str] | None:
    stats = ring.statistics()
    if stats["in_flight"] or stats["lent"] or stats["views"] or stats["sq_pending"]:
        return stats
    return None


def find_leaks(exclude: Any = ()) -> list[tuple[Ring, dict[str, int | str]]]:
    """Live rings with a request in flight, a buffer lent or a view alive, and their
    ``statistics()``; the rings in ``exclude`` (or their :func:`~aiofused._runtime.live.token`)
    are not looked at.  Cheap: no GC."""
    import sys

    live = sys.modules.get("aiofused._runtime.live")
    if live is None:  # aiofused never imported: no ring can exist
        return []
    found = []
    for ring in live.live_rings():
        if ring in exclude or live.token(ring) in exclude:
            continue
        stats = _leaking(ring)
        if stats is not None:
            found.append((ring, stats))
    return found


def _token(ring: Ring) -> object:
    from aiofused._runtime.live import token

    return token(ring)


def _describe(leaks: list[tuple[Ring, dict[str, int | str]]]) -> str:
    return "; ".join(f"ring {id(ring):#x}: {stats}" for ring, stats in leaks)


def assert_no_leaks() -> None:
    """Raise :class:`LeakError` if a request is in flight, a buffer lent or a view alive.

    The statistics are read first; only when they show something is the cyclic GC run
    (an unreachable lease or view may still hold a buffer) and the check repeated."""
    if find_leaks():
        gc.collect()
        leaks = find_leaks()
        if leaks:
            raise LeakError("leak after test: " + _describe(leaks))


def uses_plugin(item: pytest.Item, fixturenames: Iterable[str] | None = None) -> bool:
    """Whether a test opted in: ``aiofused_mode = auto``, the ``aiofused`` marker, or
    one of the plugin's fixtures among the test's (default: ``item.fixturenames``)."""
    if item.config.getini("aiofused_mode") == "auto":
        return True
    if item.get_closest_marker(MARKER) is not None:
        return True
    if fixturenames is None:
        fixturenames = getattr(item, "fixturenames", ())
    return not FIXTURES.isdisjoint(fixturenames)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "aiofused_mode",
        "'auto': every test gets aiofused's loops and leak check; 'strict' (default): "
        "only tests with the aiofused marker or its fixtures",
        default="strict",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run this async test on asyncio and uvloop and fail it if it leaves a "
        "ring request in flight, a buffer lent or a view alive (aiofused.testing)",
    )
    mode = config.getini("aiofused_mode")
    if mode not in ("auto", "strict"):
        raise pytest.UsageError(f"aiofused_mode: expected 'auto' or 'strict', got {mode!r}")
    config.stash[_reported_key] = weakref.WeakSet()


_reported_key = pytest.StashKey["weakref.WeakSet[Any]"]()


def _uvloop_factory() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_factories() -> dict[str, LoopFactory]:
    """The loops an opted-in async test runs on: ``asyncio`` and ``uvloop`` if installed."""
    factories: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    uv = _uvloop_factory()
    if uv is not None:
        factories["uvloop"] = uv
    return factories


class _LoopFactories:
    """Registered only while an opted-in test is being parametrized, so that
    pytest-asyncio sees no loop-factory hook for any other test."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_asyncio_loop_factories(
        self, config: pytest.Config, item: pytest.Item
    ) -> Mapping[str, LoopFactory]:
        return loop_factories()


@pytest.hookimpl(wrapper=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> Generator[None, None, None]:
    pm = metafunc.config.pluginmanager
    if not pm.has_plugin("asyncio") or not uses_plugin(metafunc.definition, metafunc.fixturenames):
        return (yield)
    plugin = _LoopFactories()
    pm.register(plugin, "aiofused-loop-factories")
    try:
        return (yield)
    finally:
        pm.unregister(plugin)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if uses_plugin(item):
        # Rings that already leak (a session-scoped fixture, a test run before that
        # failed) are not this test's doing.
        # (Held by their tokens: a compiled Ring takes no weak reference.)
        item.stash[_before_key] = weakref.WeakSet(_token(ring) for ring, _ in find_leaks())
    return (yield)


_before_key = pytest.StashKey["weakref.WeakSet[Any]"]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    before = item.stash.get(_before_key, None)
    if before is None:
        return result
    reported = item.config.stash[_reported_key]
    skip = set(before) | set(reported)
    if find_leaks(skip):
        gc.collect()
        leaks = find_leaks(skip)
        if leaks:
            for ring, _ in leaks:
                reported.add(_token(ring))
            pytest.fail(f"LeakError: {item.nodeid} leaked: {_describe(leaks)}", pytrace=False)
    return result


def backend_params() -> list[Any]:
    """``pytest.param`` per backend, the uring one skipped with the probe's reason."""
    from aiofused.backend import available_backends

    params = []
    for probe in available_backends():
        marks = [] if probe.available else [pytest.mark.skip(reason=probe.reason)]
        params.append(pytest.param(probe.name, marks=marks, id=probe.name))
    return params


@pytest.fixture(params=_BACKEND_NAMES)
def ring_backend(request: pytest.FixtureRequest) -> str:
    """Name of the backend the test's ring uses (``uring`` skipped where refused)."""
    name: str = request.param
    from aiofused.backend import get_backend_class

    try:
        probe = get_backend_class(name).probe()
    except ImportError as exc:
        pytest.skip(f"{name} backend not importable: {exc}")
    if not probe.available:
        pytest.skip(probe.reason)
    return name


@pytest.fixture
def aiofused_loop_check() -> None:
    """Opt a test in to the plugin (loops and leak check) without another fixture."""


async def _open_ring(backend: str) -> AsyncIterator[Any]:
    from aiofused import Ring, SetupFlag

    async with Ring(64, flags=SetupFlag.FUSED_REQ, backend=backend) as r:
        yield r


# The anyio variant is a plain async fixture: anyio's plugin runs it for a test that
# uses ``anyio_backend``.  The asyncio one is marked for pytest-asyncio, which then
# runs it in strict mode as in auto mode.
@pytest.fixture(name="_aiofused_ring_anyio")
async def _aiofused_ring_anyio(ring_backend: str) -> AsyncIterator[Any]:
    async for r in _open_ring(ring_backend):
        yield r


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - anyio only
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True

    @pytest_asyncio.fixture(name="_aiofused_ring_asyncio")
    async def _aiofused_ring_asyncio(ring_backend: str) -> AsyncIterator[Any]:
        async for r in _open_ring(ring_backend):
            yield r


@pytest.fixture
def ring(request: pytest.FixtureRequest, ring_backend: str) -> Any:
    """A ``Ring(64, flags=SetupFlag.FUSED_REQ)`` on ``ring_backend``, on the test's loop
    (pytest-asyncio's, or anyio's for a test that uses ``anyio_backend``)."""
    if "anyio_backend" in request.fixturenames:
        return request.getfixturevalue("_aiofused_ring_anyio")
    if not _HAVE_PYTEST_ASYNCIO:  # pragma: no cover
        pytest.fail("the ring fixture needs pytest-asyncio or an anyio test", pytrace=False)
    return request.getfixturevalue("_aiofused_ring_asyncio")
