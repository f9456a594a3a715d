"""The core is pure: it imports no ``asyncio``, ``os`` or ``ctypes``.

In a fresh interpreter, ``sys.modules["asyncio"] = sys.modules["os"] =
sys.modules["ctypes"] = None`` makes any later import of them fail; then the core
modules are imported and a RingCore over the recording port runs a NOP and a fused
command.  Two things make that honest:

* ``import aiofused._core.ring`` would first run ``aiofused/__init__.py``, which pulls in
  the asyncio runtime; the test shows that ``import aiofused`` indeed fails under the
  poisoning, then stands a bare package module in for ``aiofused`` (its ``__path__``
  only) so that the core's own imports are what gets tested.
* The standard library modules the core imports at module level (``enum``, ``typing``, ...)
  are imported *before* the poisoning: some of them use ``os`` internally
  (``dataclasses`` -> ``inspect`` -> ``linecache`` -> ``os``), which says nothing about
  the core.  That list is derived from the core's source, so a new ``import os`` in the
  core fails here twice: statically, and in the poisoned interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import aiofused._core

POISONED = ("asyncio", "os", "ctypes")
CORE_MODULES = ("ring", "records", "opdef", "sqe", "fused", "port")
PKG = Path(aiofused._core.__file__).resolve().parent.parent
TESTS_CORE = Path(__file__).resolve().parent
#: Modules of aiofused the core may load (the ABI numbers, the exception classes).
ALLOWED = {"aiofused", "aiofused._abi", "aiofused._errors", "aiofused._core"} | {
    f"aiofused._core.{m}" for m in CORE_MODULES
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Absolute imports executed at import time (not in functions, not TYPE_CHECKING)."""
    out: list[str] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module != "__future__":
                    out.append(node.module)
                    out.extend(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for h in node.handlers:
                    walk(h.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, ast.ClassDef | ast.With):
                walk(node.body)

    walk(tree.body)
    return out


def _source_of(module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = PKG.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None  # a name inside a module, not a module


def _closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(aiofused modules loaded, other top-level modules imported) from ``roots``."""
    seen: set[str] = set()
    stdlib: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _source_of(mod)
        assert path is not None, mod
        for name in _module_level_imports(ast.parse(path.read_text())):
            if name.split(".")[0] == "aiofused":
                parts = name.split(".")
                for i in range(2, len(parts) + 1):  # the parent packages load too
                    sub = ".".join(parts[:i])
                    if _source_of(sub) is not None and sub not in seen:
                        todo.append(sub)
            else:
                stdlib.add(name)
    return seen, stdlib


def test_core_imports_statically_stay_pure() -> None:
    loaded, others = _closure([f"aiofused._core.{m}" for m in CORE_MODULES])
    assert loaded - {"aiofused"} <= ALLOWED, sorted(loaded - ALLOWED)
    tops = {n.split(".")[0] for n in others}
    assert not tops & set(POISONED), sorted(tops & set(POISONED))


SCRIPT = textwrap.dedent(
    """
    import sys, types
    import importlib.util  # the harness's own (contextlib needs os), before the poisoning
    pkg_dir, tests_dir, poisoned, pre, core_modules = sys.argv[1:6]
    poisoned, pre, core_modules = poisoned.split(","), pre.split(","), core_modules.split(",")
    for name in pre:
        __import__(name)
    for name in poisoned:
        sys.modules[name] = None
    for name in poisoned:  # the poisoning works ...
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"FAIL: {name} still importable")
    try:  # ... and catches what needs asyncio: the package itself
        import aiofused
    except ImportError as exc:
        print("aiofused refused:", exc)
    else:
        raise SystemExit("FAIL: aiofused imported with asyncio/os/ctypes poisoned")
    for key in [k for k in sys.modules if k == "aiofused" or k.startswith("aiofused.")]:
        del sys.modules[key]
    bare = types.ModuleType("aiofused")
    bare.__path__ = [pkg_dir]
    sys.modules["aiofused"] = bare

    class Sources:  # the core's sources, not a compiled twin built beside them
        def find_spec(self, name, path, target=None):
            if name.startswith("aiofused._core."):
                file = pkg_dir + "/_core/" + name.rpartition(".")[2] + ".py"
                return importlib.util.spec_from_file_location(name, file)
            return None

    sys.meta_path.insert(0, Sources())
    for m in core_modules:
        __import__("aiofused._core." + m)
        assert sys.modules["aiofused._core." + m].__file__.endswith(".py"), m
    sys.path.insert(0, tests_dir)
    from recording_port import LendingDriver, make_core, sqe
    from aiofused._core.records import DriverFile
    from aiofused._core.ring import RingCore

    core, port = make_core()
    assert isinstance(core, RingCore)
    sqe(core, 1, "nop")
    assert core.submit() == 1
    drv = LendingDriver()
    df = DriverFile(drv, core.add_file(drv), core.id)
    sqe(core, 10, "fused_cmd", df, 0, nr_secondary=2)
    sqe(core, 11, "read", 5, 0, 16, 0)
    sqe(core, 12, "read", 5, 16, 16, 0)
    assert core.submit() == 3
    port.complete(12, 16)
    port.complete(11, 8)
    assert port.run_work() == 1
    assert port.pairs() == [(1, 0), (12, 16), (11, 8), (10, 0)], port.pairs()
    assert drv.callbacks[0][0] == [8, 16]
    port.assert_quiet()
    for name in poisoned:
        assert sys.modules[name] is None, name  # nobody got around the poison
    loaded = sorted(k for k in sys.modules if k == "aiofused" or k.startswith("aiofused."))
    print("loaded:", ",".join(loaded))
    print("OK")
    """
)


def _stdlib_deps() -> list[str]:
    """Standard-library modules the core and the recording port import at module level."""
    _, names = _closure([f"aiofused._core.{m}" for m in CORE_MODULES])
    rp = ast.parse((TESTS_CORE / "recording_port.py").read_text())
    names |= {n for n in _module_level_imports(rp) if n.split(".")[0] != "aiofused"}
    assert not {n.split(".")[0] for n in names} & set(POISONED)
    out = []
    for name in sorted(names):
        if name.split(".")[0] not in sys.stdlib_module_names:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # ``typing.Any``: a name, not a module
            continue
        if spec is not None:
            out.append(name)
    return out


def test_core_runs_with_asyncio_os_ctypes_poisoned() -> None:
    pre = _stdlib_deps()
    assert "enum" in pre and "typing" in pre
    proc = subprocess.run(
        [
            sys.executable,
            "-I",  # no PYTHONPATH, no user site: only the paths given here
            "-c",
            SCRIPT,
            str(PKG),
            str(TESTS_CORE),
            ",".join(POISONED),
            ",".join(pre),
            ",".join(CORE_MODULES),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK", proc.stdout + proc.stderr
    assert lines[0].startswith("aiofused refused:")
    assert any(p in lines[0] for p in POISONED), lines[0]
    loaded = set(lines[-2].removeprefix("loaded: ").split(","))
    assert loaded <= ALLOWED, sorted(loaded - ALLOWED)
    assert {f"aiofused._core.{m}" for m in CORE_MODULES} <= loaded
