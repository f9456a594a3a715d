"""The compiled twin (mypyc) of the core and the Ring is the pure code, only faster.

* Both cores run the same seeded random batches (``twin_trace``) and must produce the
  same trace, event for event.
* The core and ring test layers, and the relay driver's, the ublk server's and the NBD
  server's tests, pass on the other core too (this run covers the one ``import aiofused``
  picked; a child pytest covers the other).
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
from importlib.machinery import EXTENSION_SUFFIXES
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


def _compiled(module: str) -> bool:
    return sys.modules[module].__file__.endswith(tuple(EXTENSION_SUFFIXES))  # type: ignore[union-attr]


def test_the_choice_is_reported() -> None:
    assert aiofused.CORE in ("compiled", "pure")
    compiled = aiofused.CORE == "compiled"
    for name in ("aiofused._core.ring", "aiofused._core.records", "aiofused._runtime.ring"):
        assert _compiled(name) == compiled, (name, aiofused.CORE_REASON)
    if BUILT and not os.environ.get("AIOFUSED_NO_EXTENSIONS"):
        assert aiofused.CORE == "compiled", aiofused.CORE_REASON


#: Prints the core, then whether the core's ring and the Ring came from extensions.
PROBE = (
    "import aiofused, aiofused._core.ring as r, aiofused._runtime.ring as rr; "
    "print(aiofused.CORE, r.__file__.endswith('.so'), rr.__file__.endswith('.so')); "
    "print(aiofused.CORE_REASON)"
)


def test_the_twin_sources_exist_and_setup_compiles_them() -> None:
    """One list says what is compiled: setup.py reads aiofused._twin.SOURCES (from its
    source: the build cannot import the package), whose files all exist."""
    setup_py = (ROOT / "setup.py").read_text()
    assert "SOURCES = _twin_sources()" in setup_py
    assert len(set(_twin.SOURCES)) == len(_twin.SOURCES)
    for path in _twin.SOURCES:
        assert (ROOT / "src" / path).is_file(), path


def test_no_extensions_runs_the_pure_core() -> None:
    assert _python(PROBE, "pure").splitlines() == [
        "pure False False",
        "AIOFUSED_NO_EXTENSIONS is set",
    ]


#: Imports compiled driver modules before aiofused itself, then prints, for each of them
#: and for the core's records, whether it came from an extension.
DRIVERS_FIRST = (
    "import sys; import aiofused_drivers.relay, aiofused_drivers.ublk._device; "
    "mods = ('aiofused_drivers.relay', 'aiofused_drivers.ublk._device', "
    "'aiofused._core.records'); "
    "print(*(sys.modules[m].__file__.endswith('.so') for m in mods))"
)


@pytest.mark.parametrize("core", ["pure", pytest.param("compiled", marks=needs_twin)])
def test_a_driver_imported_before_aiofused_runs_on_the_same_core(core: str) -> None:
    """The twin selection runs before any compiled driver module loads: a driver imported
    first once loaded compiled beside a pure core (and did with AIOFUSED_NO_EXTENSIONS=1),
    so its native type checks refused the core's records ("Req object expected; got
    Req")."""
    same = "True" if core == "compiled" else "False"
    assert _python(DRIVERS_FIRST, core) == " ".join([same] * 3)


def _copy_package(dest: Path) -> None:
    """Copy the installed aiofused (with its twin) to ``dest``."""
    pkg = Path(aiofused.__file__).resolve().parent
    for name in ("aiofused", "aiofused_drivers"):
        shutil.copytree(
            pkg.parent / name, dest / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for lib in pkg.parent.glob("aiofused_twin__mypyc*"):
        shutil.copy2(lib, dest / lib.name)


@needs_twin
def test_a_twin_built_from_other_sources_is_not_used(tmp_path: Path) -> None:
    """An edited core that was not rebuilt runs pure: the twin never stands in for code
    it was not compiled from."""
    _copy_package(tmp_path)
    assert _python(PROBE, "compiled", tmp_path).splitlines()[0] == "compiled True True"
    ring = tmp_path / "aiofused" / "_runtime" / "ring.py"
    ring.write_text(ring.read_text() + "\n# an edit\n")
    out = _python(PROBE, "compiled", tmp_path).splitlines()
    assert out[0] == "pure False False"  # the core too: never half of each
    assert "other sources" in out[1]


@needs_twin
def test_a_partial_twin_is_not_used(tmp_path: Path) -> None:
    """A build that compiled some modules only (a compiler that failed half-way) leaves
    the pure core running, not an import error."""
    _copy_package(tmp_path)
    for ext in (tmp_path / "aiofused" / "_core").glob("ring.*.so"):
        ext.unlink()
    out = _python(PROBE, "compiled", tmp_path).splitlines()
    assert out == ["pure False False", "the compiled core is not built"]


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
@pytest.mark.timeout(660)  # a child pytest of ~450 tests (its own limit: 600 s)
def test_the_core_ring_and_driver_tests_pass_on_the_other_core() -> None:
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
            "tests/drivers/test_relay_driver.py",
            "tests/drivers/test_relay_pipe.py",
            "tests/drivers/test_ublk_device.py",
            "tests/drivers/test_ublk_batch.py",
            "tests/drivers/test_nbd_bounds.py",
            "tests/e2e/test_uring_abi.py",
            "tests/e2e/test_uring_backend.py",
            "tests/e2e/test_uring_direct.py",
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
