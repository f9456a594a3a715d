"""Logging: structlog event dicts on top of the standard ``logging`` tree.

The library only emits (``get_logger(__name__)``); it never configures anything, so an
application's ``logging`` setup decides what is shown (by default: warnings and
errors on stderr).  The CLI calls :func:`configure_logging` for console or JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_state = {"format": "console"}
_console = structlog.dev.ConsoleRenderer(colors=False)
_json = structlog.processors.JSONRenderer()


def _render(logger: Any, method: str, event: Any) -> Any:
    if _state["format"] == "json":
        return _json(logger, method, event)
    return _console(logger, method, event)


_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.format_exc_info,
    _render,
]


def get_logger(name: str) -> Any:
    """A structlog logger that writes through ``logging.getLogger(name)``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """For programs: ``level`` and ``fmt`` (``"console"`` or ``"json"``), one line each, stderr."""
    _state["format"] = fmt
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_aiofused", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._aiofused = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.getLogger("aiofused").setLevel(lvl)
