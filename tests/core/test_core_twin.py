"""The compiled twin (``aiofused._ccore``, mypyc) is the pure core, only faster.

* Both cores run the same seeded random batches (``twin_trace``) and must produce the
  same trace, event for event.
* The core and ring test layers pass on the other core too (this run covers the one
  ``import aiofused`` picked; a child pytest covers the other).
* The choice is honest: ``AIOFUSED_NO_EXTENSIONS=1`` runs the pure core, and a twin
  built from other sources than the installed core is never used.

Where the twin is not built (no compiler or mypyc at install time), the tests that need
it skip, saying so; the choice tests still run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import aiofused
from aiofused import _twin

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILT = _twin.built()
needs_twin = pytest.mark.skipif(not BUILT, reason="the compiled core is not built")
SEEDS = int(os.environ.get("AIOFUSED_TWIN_SEEDS", "400"))


def _env(core: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AIOFUSED_NO_EXTENSIONS", None)
    if core == "pure":
        env["AIOFUSED_NO_EXTENSIONS"] = "1"
    return env


def _python(code: str, core: str, path: Path | None = None) -> str:
    """Run ``code`` on ``core``; ``path``: import aiofused from there."""
    env = _env(core)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout.strip()


def test_the_choice_is_reported() -> None:
    assert aiofused.CORE in ("compiled", "pure")
    ring_module = sys.modules["aiofused._core.ring"]
    compiled = ring_module.__name__ == "aiofused._ccore.ring"
    assert compiled == (aiofused.CORE == "compiled"), aiofused.CORE_REASON
    if BUILT and not os.environ.get("AIOFUSED_NO_EXTENSIONS"):
        assert aiofused.CORE == "compiled", aiofused.CORE_REASON


def test_no_extensions_runs_the_pure_core() -> None:
    out = _python(
        "import aiofused, aiofused._core.ring as r; print(aiofused.CORE, r.__name__)", "pure"
    )
    assert out == "pure aiofused._core.ring"


def _copy_package(dest: Path) -> None:
    """Copy the installed aiofused (with its twin) to ``dest``."""
    pkg = Path(aiofused.__file__).resolve().parent
    shutil.copytree(pkg, dest / "aiofused", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in pkg.parent.glob("aiofused_ccore__mypyc*"):
        shutil.copy2(lib, dest / lib.name)


@needs_twin
def test_a_twin_built_from_other_sources_is_not_used(tmp_path: Path) -> None:
    """An edited core that was not rebuilt runs pure: the twin never stands in for code
    it was not compiled from."""
    _copy_package(tmp_path)
    code = (
        "import aiofused, aiofused._core.ring as r; "
        f"print(aiofused.CORE, r.__name__, r.__file__.startswith({str(tmp_path)!r}))"
    )
    assert _python(code, "compiled", tmp_path) == "compiled aiofused._ccore.ring True"
    ring = tmp_path / "aiofused" / "_core" / "ring.py"
    ring.write_text(ring.read_text() + "\n# an edit\n")
    out = _python(code + "; print(aiofused.CORE_REASON)", "compiled", tmp_path)
    assert out.splitlines()[0] == "pure aiofused._core.ring True"
    assert "other sources" in out.splitlines()[1]


@needs_twin
def test_a_partial_twin_is_not_used(tmp_path: Path) -> None:
    """A build that compiled some modules only (a compiler that failed half-way) leaves
    the pure core running, not an import error."""
    _copy_package(tmp_path)
    for ext in (tmp_path / "aiofused" / "_ccore").glob("ring.*"):
        ext.unlink()
    out = _python(
        "import aiofused, aiofused._core.ring as r; "
        "print(aiofused.CORE, r.__name__); print(aiofused.CORE_REASON)",
        "compiled",
        tmp_path,
    )
    assert out.splitlines()[0] == "pure aiofused._core.ring"
    assert "incomplete" in out.splitlines()[1]


@needs_twin
def test_both_cores_give_the_same_trace() -> None:
    traces = {}
    for core in ("compiled", "pure"):
        proc = subprocess.run(
            [sys.executable, str(HERE / "twin_trace.py"), "0", str(SEEDS)],
            env=_env(core),
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        out = json.loads(proc.stdout)
        assert out["core"] == core
        traces[core] = out["traces"]
    assert len(traces["pure"]) == SEEDS
    for seed, (a, b) in enumerate(zip(traces["compiled"], traces["pure"], strict=True)):
        assert a == b, f"seed {seed}: the cores differ"
    events = [e[0] for t in traces["pure"] for e in t["events"]]
    for kind in ("start", "cqe", "driver", "cancel", "idle"):
        assert kind in events, f"the traces never show a {kind!r} event"


@needs_twin
def test_the_core_and_ring_tests_pass_on_the_other_core() -> None:
    other = "pure" if aiofused.CORE == "compiled" else "compiled"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/core",
            "tests/ring",
            "--ignore=tests/core/test_core_twin.py",
        ],
        env=_env(other),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
