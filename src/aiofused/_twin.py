"""Which core this process runs: the compiled twin, or the pure-Python reference.

``aiofused._core`` is the readable reference.  ``setup.py`` compiles a copy of it with
mypyc as ``aiofused._ccore``, stamped with the SHA-256 of the sources it came from.
:func:`select` (run when ``import aiofused`` imports this module, first) makes
``aiofused._core.<module>`` *be* the twin's module, so every importer gets one
implementation, unless:

* ``AIOFUSED_NO_EXTENSIONS`` is set to a non-empty value other than ``0``;
* the twin was not built (no compiler or mypyc at install time);
* the twin was built from other sources than the installed core (an edited checkout
  not rebuilt): the pure core then runs, and a warning says so.

:data:`CORE` names the core that runs (``"compiled"`` or ``"pure"``), :data:`REASON` why.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Final

__all__ = ["CORE", "MODULES", "REASON", "built", "select", "source_sha"]

#: The core's modules, in the order the stamp hashes them (``setup.py`` keeps the same).
MODULES: Final = ("fused", "opdef", "port", "records", "ring", "sqe")
#: The modules the twin compiles (``port`` is a typing Protocol: it stays pure).
COMPILED: Final = ("sqe", "records", "opdef", "fused", "ring")


def source_sha() -> str:
    """SHA-256 of the pure core's sources, as ``setup.py`` stamps the twin."""
    core = Path(__file__).resolve().parent / "_core"
    h = hashlib.sha256()
    for name in MODULES:
        h.update(name.encode() + b"\0" + (core / f"{name}.py").read_bytes() + b"\0")
    return h.hexdigest()


def built() -> bool:
    """True if the compiled twin is installed (whether or not this process runs it)."""
    try:
        spec = importlib.util.find_spec("aiofused._ccore._stamp")
    except ImportError:
        return False
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _disabled() -> bool:
    value = os.environ.get("AIOFUSED_NO_EXTENSIONS", "")
    return value not in ("", "0")


def select() -> tuple[str, str]:
    """Alias ``aiofused._core.*`` to the twin if it may run; return (core, reason)."""
    if any(f"aiofused._core.{m}" in sys.modules for m in COMPILED):
        return "pure", "the core was imported before aiofused chose one"
    if _disabled():
        return "pure", "AIOFUSED_NO_EXTENSIONS is set"
    if not built():
        return "pure", "the compiled core is not built"
    stamp = importlib.import_module("aiofused._ccore._stamp")
    if source_sha() != stamp.SOURCE_SHA:
        from aiofused._log import get_logger

        get_logger("aiofused").warning("compiled_core_stale", using="pure")
        return "pure", "the compiled core was built from other sources: rebuild it"
    try:
        modules = {name: importlib.import_module(f"aiofused._ccore.{name}") for name in COMPILED}
    except ImportError as exc:  # a partial build
        return "pure", f"the compiled core is incomplete ({exc})"
    import aiofused._core as pure

    for name, module in modules.items():
        sys.modules[f"aiofused._core.{name}"] = module
        setattr(pure, name, module)
    return "compiled", "the mypyc twin of aiofused._core"


CORE, REASON = select()
