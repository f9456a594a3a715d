"""The pytest plugin (issue 13, items 1-2), driven in a pytest subprocess on a scratch
project: nothing happens to tests that do not opt in; ``ring`` works in pytest-asyncio's
strict and auto modes and under anyio; a leak fails the leaking test only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Counts the plugin's gc.collect() calls (it looks gc.collect up at call time).
COUNT_GC = """
import gc
import pytest

CALLS = []
_collect = gc.collect


def _counting(*args):
    CALLS.append(1)
    return _collect(*args)


gc.collect = _counting


def pytest_sessionfinish(session):
    print(f"\\nGC_COLLECT_CALLS={len(CALLS)}")
"""

UNRELATED = """
import asyncio
import pytest


@pytest.mark.parametrize("i", range(50))
def test_sync(i):
    assert i >= 0


@pytest.mark.asyncio
async def test_async():
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_loop_is_the_policys():
    assert type(asyncio.get_running_loop()) is asyncio.SelectorEventLoop
"""

USERS = """
import asyncio
import socket

import pytest

from aiofused import Ring


@pytest.mark.asyncio
async def test_ring_strict(ring):
    sqe = ring.get_sqe()
    sqe.prep_nop()
    sqe.user_data = 7
    ring.submit()
    cqe = await ring.wait_cqe()
    assert cqe.user_data == 7
    ring.cqe_seen(cqe)
    with open("loops.txt", "a") as f:
        print(type(asyncio.get_running_loop()).__module__, file=f)


@pytest.mark.aiofused
@pytest.mark.asyncio
async def test_marked_leaks():
    a, b = socket.socketpair()
    ring = Ring(8)
    sqe = ring.get_sqe()
    sqe.prep_recv(a, bytearray(16), 16, 0)
    ring.submit()
    await asyncio.sleep(0)
    test_marked_leaks.keep = (ring, a, b)  # the RECV never completes


@pytest.mark.aiofused
@pytest.mark.asyncio
async def test_after_the_leak():
    await asyncio.sleep(0)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_ring_anyio(ring, anyio_backend):
    import anyio

    sqe = ring.get_sqe()
    sqe.prep_nop()
    sqe.user_data = 9
    ring.submit()
    with anyio.fail_after(5):
        cqe = await ring.wait_cqe()
    assert cqe.user_data == 9
"""

AUTO = """
import pytest


async def test_ring_auto(ring):
    sqe = ring.get_sqe()
    sqe.prep_nop()
    sqe.user_data = 3
    ring.submit()
    assert (await ring.wait_cqe()).user_data == 3


def test_sync_untouched():
    pass
"""


def run(tmp_path: Path, tests: str, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "conftest.py").write_text(COUNT_GC)
    (tmp_path / "test_it.py").write_text(textwrap.dedent(tests))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AIOFUSED_"))}
    env["AIOFUSED_BACKEND"] = "asyncio"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def outcomes(out: str) -> dict[str, str]:
    return dict(re.findall(r"^test_it\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", out, re.M))


def gc_calls(out: str) -> int:
    m = re.search(r"GC_COLLECT_CALLS=(\d+)", out)
    assert m, out
    return int(m.group(1))


def test_a_project_that_does_not_use_the_plugin_pays_nothing(tmp_path: Path) -> None:
    proc = run(tmp_path, UNRELATED, "strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = outcomes(proc.stdout)
    # every async test ran once, on the loop pytest-asyncio would use anyway
    assert set(got) == {f"test_sync[{i}]" for i in range(50)} | {
        "test_async",
        "test_loop_is_the_policys",
    }
    assert gc_calls(proc.stdout) == 0
    assert "aiofused: run this async test" in run(tmp_path, UNRELATED, "strict", "--markers").stdout


def test_ring_in_strict_mode_and_anyio_and_a_leak_fails_only_its_test(tmp_path: Path) -> None:
    proc = run(tmp_path, USERS, "strict")
    out = proc.stdout + proc.stderr
    got = outcomes(proc.stdout)
    # on both loops and both backends (uring skipped where the kernel refuses it)
    for name in ("asyncio-uring", "asyncio-asyncio", "uvloop-uring", "uvloop-asyncio"):
        expected = ("PASSED", "SKIPPED") if "uring" in name else ("PASSED",)
        assert got[f"test_ring_strict[{name}]"] in expected, out
    loops = set((tmp_path / "loops.txt").read_text().split())
    assert loops == {"asyncio.unix_events", "uvloop"}
    # the leak: the test that leaked errors at teardown (once per loop), the next passes
    assert got["test_marked_leaks[asyncio]"] == "ERROR", out
    assert got["test_marked_leaks[uvloop]"] == "ERROR", out
    assert "LeakError: test_it.py::test_marked_leaks[asyncio] leaked: ring" in out
    assert "'in_flight': 1" in out
    assert got["test_after_the_leak[asyncio]"] == "PASSED", out
    assert got["test_after_the_leak[uvloop]"] == "PASSED", out
    assert got["test_ring_anyio[uring]"] in ("PASSED", "SKIPPED"), out
    assert got["test_ring_anyio[asyncio]"] == "PASSED", out
    assert "Traceback" not in proc.stderr and "INTERNALERROR" not in out
    assert proc.returncode == 1


def test_ring_in_auto_mode(tmp_path: Path) -> None:
    proc = run(tmp_path, AUTO, "auto")
    got = outcomes(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert got["test_ring_auto[asyncio-asyncio]"] == "PASSED"
    assert got["test_ring_auto[uvloop-asyncio]"] == "PASSED"
    assert got["test_sync_untouched"] == "PASSED"
    # the cheap statistics check passed everywhere: no GC run
    assert gc_calls(proc.stdout) == 0


def test_this_suite_opts_in_to_everything(request: pytest.FixtureRequest) -> None:
    assert request.config.getini("aiofused_mode") == "auto"


def test_the_readme_example_works_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### The pytest plugin", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = run(tmp_path, example, "strict")
    got = outcomes(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert got["test_nop[asyncio-asyncio]"] == "PASSED"
    assert got["test_nop[uvloop-asyncio]"] == "PASSED"
    assert got["test_nop_anyio[asyncio]"] == "PASSED", got
