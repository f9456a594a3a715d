"""Which event loop a program runs on: uvloop when installed (or asked for), else asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["loop_name", "run_on_loop"]

T = TypeVar("T")


def loop_name(kind: str = "auto") -> str:
    """The loop ``kind`` resolves to: ``"uvloop"`` when asked for (or auto and installed)."""
    if kind == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if kind == "uvloop":
            raise SystemExit("uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run_on_loop(coro: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """Run ``coro`` on uvloop when installed (or asked for), else the default loop.

    ``kind`` is ``"auto"``, ``"uvloop"`` (exits with a message when it is not
    installed) or ``"asyncio"``: what a ``--loop`` option of a command takes.
    """
    if loop_name(kind) == "uvloop":
        import uvloop

        result: T = uvloop.run(coro)
        return result
    return asyncio.run(coro)
