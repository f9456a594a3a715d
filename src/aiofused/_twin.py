"""Which core this process runs: the compiled twin, or the pure-Python reference.

The modules in :data:`SOURCES` (the core, the ``Ring`` that subclasses it, the null and
relay drivers, the ublk and NBD servers) are the readable reference.  Where the build could,
``setup.py`` compiled those same modules with mypyc: each has an extension module beside
its source, which Python's import system prefers, and ``aiofused._core._stamp`` holds
the SHA-256 of the sources compiled.  :func:`select` (run when ``import aiofused``
imports this module, first) lets the extensions load only if every one is there and
they were built from exactly the installed sources, and unless
``AIOFUSED_NO_EXTENSIONS`` is set (to anything but ``0``); otherwise a finder at the
head of ``sys.meta_path`` imports all of those modules from their sources, so a process
never mixes the two.  An edited checkout that was not rebuilt runs pure (``aiofused
info`` says why).

:data:`CORE` names the core that runs (``"compiled"`` or ``"pure"``), :data:`REASON` why.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final, TypeVar

__all__ = [
    "CORE",
    "REASON",
    "SOURCES",
    "built",
    "c_twin",
    "extensions_disabled",
    "select",
    "source_sha",
]

#: The compiled modules' sources under the installation's root (``src/`` here), in the
#: order the stamp hashes them; setup.py compiles this list.  The Ring is compiled with
#: the core because it subclasses RingCore (an interpreted subclass would reach every
#: method through Python); the uring backend because every kernel op goes through it
#: (its ctypes structures and buffer exports stay interpreted, in ``aiofused._abi``);
#: the null and relay drivers, the proxy's pipe and the ublk and NBD servers because
#: the benchmarks, the proxy and ``nbd serve`` run on them.  The ublk device
#: (``UblkDriver``, which users subclass) is compiled with interpreted subclasses
#: allowed (``mypyc_attr``).  Not the targets: their resync and cleaner coroutines
#: await inside exception handlers, where mypyc has mishandled the exception state.
SOURCES: Final = (
    "aiofused/_buffers.py",
    "aiofused/_core/fused.py",
    "aiofused/_core/opdef.py",
    "aiofused/_core/records.py",
    "aiofused/_core/ring.py",
    "aiofused/_core/sqe.py",
    "aiofused/_runtime/ring.py",
    "aiofused/backends/_uring.py",
    "aiofused_drivers/null.py",
    "aiofused_drivers/relay/__init__.py",
    "aiofused_drivers/relay/_pipe.py",
    "aiofused_drivers/ublk/_device.py",
    "aiofused_drivers/ublk/_nbd.py",
    "aiofused_drivers/ublk/_server.py",
)
_ROOT: Final = Path(__file__).resolve().parent.parent
#: Module name -> its source file, for every module the twin compiles.
_MODULES: Final = {
    path.removesuffix(".py").removesuffix("/__init__").replace("/", "."): _ROOT / path
    for path in SOURCES
}
_STAMP: Final = "aiofused._core._stamp"
_F = TypeVar("_F", bound=Callable[..., Any])


def source_sha() -> str:
    """SHA-256 of the twin's sources as installed, as ``setup.py`` stamps the twin."""
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.encode() + b"\0" + (_ROOT / path).read_bytes() + b"\0")
    return h.hexdigest()


def _extension(source: Path) -> bool:
    """An extension module of ``source``'s name sits beside it."""
    stem = source.with_suffix("")
    return any(
        Path(f"{stem}{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def built() -> bool:
    """True if the whole twin is installed (whether or not this process runs it)."""
    stamp = _ROOT / "aiofused" / "_core" / "_stamp.py"
    return _extension(stamp) and all(map(_extension, _MODULES.values()))


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Import the twin's modules from their ``.py`` sources, never the extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = _MODULES.get(fullname)
        if source is None:
            return None
        if source.name == "__init__.py":  # a package: its submodules stay findable
            return importlib.util.spec_from_file_location(
                fullname, source, submodule_search_locations=[str(source.parent)]
            )
        return importlib.util.spec_from_file_location(fullname, source)


def extensions_disabled() -> bool:
    """``AIOFUSED_NO_EXTENSIONS`` is set (to anything but ``0``): every twin runs pure."""
    return os.environ.get("AIOFUSED_NO_EXTENSIONS", "") not in ("", "0")


def c_twin(module: str, name: str, reference: _F) -> tuple[str, str, _F]:
    """Pick a hand-written C twin: ``("c", module, module.name)`` when ``module`` (an
    optional extension) was built and extensions are allowed, else ``("python", why,
    reference)``."""
    if extensions_disabled():
        return "python", "AIOFUSED_NO_EXTENSIONS is set", reference
    try:
        twin = importlib.import_module(module)
    except ImportError:
        return "python", "the C twin is not built", reference
    fn: _F = getattr(twin, name)
    return "c", module, fn


def _pick() -> tuple[str, str]:
    if any(name in sys.modules for name in _MODULES):
        loaded = sys.modules.get("aiofused._core.ring")
        core = "compiled" if loaded is not None and _is_extension(loaded) else "pure"
        return core, "the core was imported before aiofused chose one"
    if extensions_disabled():
        return "pure", "AIOFUSED_NO_EXTENSIONS is set"
    if not built():
        return "pure", "the compiled core is not built"
    stamp = importlib.import_module(_STAMP)
    if getattr(stamp, "SOURCE_SHA", None) != source_sha():
        # Said by REASON (``aiofused info``), not logged: an import writes nothing.
        return "pure", "the compiled core was built from other sources: rebuild it"
    return "compiled", "the mypyc twin of the core, the Ring and the hot driver paths"


def _is_extension(module: ModuleType) -> bool:
    return str(getattr(module, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )


def select() -> tuple[str, str]:
    """Decide which core runs (installing the source finder for the pure one)."""
    core, reason = _pick()
    if core == "pure" and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
    return core, reason


CORE, REASON = select()
