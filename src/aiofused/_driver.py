"""Drivers: the ``Driver`` protocol, what a driver sees (``UringCmd``), and the plugin registry.

A driver is one declarative object (nbdkit's plugin struct is the model): a
``name``, a ``can_fused`` capability, and ``uring_cmd(cmd, issue_flags)``, which
returns a result (inline completion) or :data:`EIOCBQUEUED` and calls
``cmd.done(res)`` later.  Optional: ``close()``, called when the ring closes.

Plugins are found through the entry-point group ``aiofused.drivers``; the in-tree
drivers register themselves the same way.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Protocol, runtime_checkable

from aiofused._abi import IssueFlag
from aiofused._core.records import DriverFile, Req
from aiofused._errors import DriverError
from aiofused._log import get_logger

log = get_logger("aiofused.driver")

__all__ = [
    "ENTRY_POINT_GROUP",
    "Driver",
    "DriverFile",
    "IssueFlag",
    "UringCmd",
    "load_driver",
]

ENTRY_POINT_GROUP = "aiofused.drivers"


@runtime_checkable
class Driver(Protocol):
    """Anything with these three members is a driver."""

    name: str
    can_fused: bool

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        """Handle a command: return a result, or ``EIOCBQUEUED`` and call ``cmd.done`` later."""
        ...


#: What a driver sees of one URING_CMD or FUSED_CMD primary: the request record itself
#: (``cmd_op``, ``cmd``, ``pdu``, ``is_fused``, ``buf_dir``, ``secondary_results``,
#: ``cancelled``, ``cancel_hook``, ``provide_buf_and_start``, ``done``,
#: ``complete_in_task``, ``finished``).
UringCmd = Req


_registry_cache: dict[str, importlib.metadata.EntryPoint] | None = None


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    global _registry_cache
    if _registry_cache is None:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        _registry_cache = {ep.name: ep for ep in eps}
    return _registry_cache


def available_drivers() -> list[str]:
    """Names of the driver plugins installed in the entry-point group."""
    return sorted(_entry_points())


def load_driver(name: str, **options: Any) -> Driver:
    """Instantiate the driver plugin ``name`` with ``options``."""
    try:
        ep = _entry_points()[name]
    except KeyError:
        known = ", ".join(available_drivers()) or "none"
        raise DriverError(f"no driver plugin {name!r} (installed: {known})") from None
    factory = ep.load()
    driver = factory(**options)
    if not isinstance(driver, Driver):
        raise DriverError(f"plugin {name!r} does not implement the Driver protocol")
    return driver
