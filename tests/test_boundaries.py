"""The public faces hold: plugins import only public names, the runtime imports no plugin.

Every ``.py`` file under ``src/aiofused_drivers``, ``benchmarks``, ``examples`` and
``tests/drivers`` imports aiofused only through :mod:`aiofused`, :mod:`aiofused.driver`
and :mod:`aiofused.backend` (driver tests may use :mod:`aiofused.testing` too): no
``aiofused._anything``, no ``aiofused.backends._x``, in whatever spelling
(``from aiofused import _abi``, ``importlib.import_module("aiofused._core")``, an
import inside a function or under ``TYPE_CHECKING``).  Every file under
``src/aiofused`` imports nothing of ``aiofused_drivers``: plugins come in through
entry points only.  Relative imports stay inside their own package and are not
checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

#: The modules a plugin may import from (and, in driver tests, aiofused.testing).
PUBLIC = frozenset({"aiofused", "aiofused.driver", "aiofused.backend"})
CLIENTS = {
    "src/aiofused_drivers": PUBLIC,
    "benchmarks": PUBLIC,
    "examples": PUBLIC,
    "tests/drivers": PUBLIC | {"aiofused.testing"},
}
RUNTIME = "src/aiofused"


def _imported(tree: ast.AST) -> Iterator[tuple[int, str, bool]]:
    """``(line, dotted name, is_module)`` of each absolute import in ``tree``.

    ``from m import a, b`` gives ``m`` (a module) and ``m.a``, ``m.b`` (modules or not:
    ``from aiofused import _abi`` imports a module, ``from aiofused import Ring`` a name).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, True
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module is None:
                continue  # relative: inside the file's own package
            yield node.lineno, node.module, True
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{node.module}.{alias.name}", False
        elif isinstance(node, ast.Call) and node.args:
            func, arg = node.func, node.args[0]
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                yield node.lineno, arg.value, True


def _is_private(dotted: str) -> bool:
    """``aiofused._x``, ``aiofused.backends._x``, ...: a ``_name`` (not a dunder) inside."""
    parts = dotted.split(".")
    return parts[0] == "aiofused" and any(
        p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts[1:]
    )


def _is_aiofused_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


class _Found(list[tuple[int, str]]):
    """Violations, one per import: ``from aiofused._abi import A, B`` is reported once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def add(self, line: int, dotted: str, what: str) -> None:
        parts = dotted.split(".")
        if any((line, ".".join(parts[:i])) in self._seen for i in range(1, len(parts))):
            return
        self._seen.add((line, dotted))
        self.append((line, what))


def client_violations(source: str, allowed: frozenset[str] = PUBLIC) -> list[tuple[int, str]]:
    """``(line, what)`` for each import of a private or non-public aiofused module."""
    found = _Found()
    for line, dotted, is_module in _imported(ast.parse(source)):
        if dotted.split(".")[0] != "aiofused":
            continue
        if _is_private(dotted):
            found.add(line, dotted, f"imports private {dotted}")
        elif (is_module or _is_aiofused_module(dotted)) and dotted not in allowed:
            found.add(line, dotted, f"imports {dotted}, not one of {', '.join(sorted(allowed))}")
    return list(found)


def runtime_violations(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each import of ``aiofused_drivers`` (or a module of it)."""
    found = _Found()
    for line, dotted, _ in _imported(ast.parse(source)):
        if dotted.split(".")[0] == "aiofused_drivers":
            found.add(line, dotted, f"imports plugin {dotted}")
    return list(found)


def _files(tree: str) -> list[Path]:
    files = sorted((ROOT / tree).rglob("*.py"))
    assert files, f"no .py files under {tree}: the walk would prove nothing"
    return files


def _report(path: Path, found: list[tuple[int, str]]) -> list[str]:
    rel = path.relative_to(ROOT)
    return [f"{rel}:{line}: {what}" for line, what in found]


@pytest.mark.parametrize("tree", sorted(CLIENTS))
def test_plugins_import_only_public_names(tree: str) -> None:
    problems = []
    for path in _files(tree):
        problems += _report(path, client_violations(path.read_text(), CLIENTS[tree]))
    assert not problems, "private aiofused imports:\n" + "\n".join(problems)


def test_runtime_imports_no_plugin() -> None:
    problems = []
    for path in _files(RUNTIME):
        problems += _report(path, runtime_violations(path.read_text()))
    assert not problems, "the runtime imports plugins:\n" + "\n".join(problems)


def test_the_walks_cover_the_moved_modules() -> None:
    """The applications live in the plugins now, and the walks see them."""
    walked = {p.relative_to(ROOT).as_posix() for tree in CLIENTS for p in _files(tree)}
    assert {
        "src/aiofused_drivers/relay/proxy.py",
        "src/aiofused_drivers/demo/fanout.py",
        "src/aiofused_drivers/demo/showcase.py",
        "src/aiofused_drivers/demo/cli.py",
        "src/aiofused_drivers/ublk/cli.py",
        "tests/drivers/test_proxy_e2e.py",
    } <= walked
    assert not any((SRC / "aiofused" / f).exists() for f in ("_proxy.py", "_fanout.py"))


@pytest.mark.parametrize(
    "source",
    [
        "from aiofused._ring import Ring",
        "import aiofused._abi as abi",
        "import aiofused._core.ring",
        "from aiofused.backends._base import IoOp",
        "from aiofused.backends import _uring",
        "from aiofused import _abi",
        "from aiofused._abi import BufDir, SqeFlag",
        "from aiofused.backends import get_backend_class",
        "import aiofused.cli",
        "def f():\n    from aiofused._log import get_logger",
        "if TYPE_CHECKING:\n    from aiofused._core.records import Req",
        "import importlib\nmod = importlib.import_module('aiofused._core.ring')",
        "mod = __import__('aiofused.backends._uring')",
    ],
)
def test_a_private_import_is_caught(source: str) -> None:
    found = client_violations(source)
    assert len(found) == 1 and found[0][0] == source.count("\n") + 1, found


@pytest.mark.parametrize(
    "source",
    [
        "from aiofused import Ring, SetupFlag, __version__",
        "import aiofused",
        "from aiofused.driver import BufferPool, get_logger",
        "from aiofused.backend import IoOp, get_backend_class",
        "from . import _nbdproto as P",
        "from ._device import UblkDriver",
        "from aiofused_drivers.ublk import _targets",
        "import asyncio._private_looking",
    ],
)
def test_a_public_import_passes(source: str) -> None:
    assert client_violations(source) == []


def test_driver_tests_may_use_the_testing_plugin() -> None:
    source = "from aiofused.testing import backend_params"
    assert client_violations(source, CLIENTS["tests/drivers"]) == []
    assert client_violations(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "from aiofused_drivers.relay.proxy import add_parser",
        "import aiofused_drivers",
        "def f():\n    import aiofused_drivers.ublk.cli",
        "import importlib\nimportlib.import_module('aiofused_drivers.demo')",
    ],
)
def test_a_plugin_import_in_the_runtime_is_caught(source: str) -> None:
    found = runtime_violations(source)
    assert len(found) == 1 and found[0][0] == source.count("\n") + 1, found
    assert runtime_violations("from aiofused._log import get_logger") == []
