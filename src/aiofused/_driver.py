"""Drivers: the ``Driver`` protocol, what a driver sees (``UringCmd``), and the plugin registry.

A driver is one declarative object (nbdkit's plugin struct is the model): a
``name``, a ``can_fused`` capability, and ``uring_cmd(cmd, issue_flags)``, which
returns a result (inline completion) or :data:`EIOCBQUEUED` and calls
``cmd.done(res)`` later.  Optional: ``close()``, called when the ring closes.

Plugins are found through the entry-point group ``aiofused.drivers``; the in-tree
drivers register themselves the same way.
"""

from __future__ import annotations

import enum
import importlib.metadata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aiofused._errors import DriverError
from aiofused._log import get_logger
from aiofused._uapi import BufDir

if TYPE_CHECKING:
    from aiofused._fused import Primary

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


class IssueFlag(enum.IntFlag):
    """``issue_flags`` bits passed to ``uring_cmd`` (V6 ``IO_URING_F_FUSED_BUF_*``)."""

    NONE = 0
    #: Secondaries write into the lent buffer.
    FUSED_BUF_DEST = 1 << 11
    #: Secondaries read from the lent buffer.
    FUSED_BUF_SRC = 1 << 12
    FUSED_BUF = FUSED_BUF_DEST | FUSED_BUF_SRC


@runtime_checkable
class Driver(Protocol):
    """Anything with these three members is a driver."""

    name: str
    can_fused: bool

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        """Handle a command: return a result, or ``EIOCBQUEUED`` and call ``cmd.done`` later."""
        ...


class DriverFile:
    """A driver registered in a ring's fixed-file table; use it as an SQE's ``fd``."""

    __slots__ = ("driver", "index", "ring_id")

    def __init__(self, driver: Driver, index: int, ring_id: int) -> None:
        self.driver = driver
        self.index = index
        self.ring_id = ring_id

    def __repr__(self) -> str:
        return f"<DriverFile {self.driver.name!r} slot={self.index}>"


class UringCmd:
    """What a driver sees of one URING_CMD or FUSED_CMD primary.

    ``cmd_op`` and ``cmd`` come from the SQE; ``pdu`` is the driver's scratch
    space; ``is_fused``/``buf_dir`` describe the secondaries; ``secondary_results``
    is valid in the lend callback; ``cancelled`` is set if the command was cancelled.
    """

    __slots__ = (
        "_loop",
        "_owner",
        "buf_dir",
        "cancel_hook",
        "cancelled",
        "cmd",
        "cmd_op",
        "is_fused",
        "pdu",
        "secondary_results",
        "user_data",
    )

    def __init__(
        self, owner: Primary, cmd_op: int, cmd: bytes, is_fused: bool, buf_dir: BufDir | None
    ) -> None:
        #: The primary behind this command; ``None`` once it completed (the ring drops
        #: the link then, so a command a driver keeps holds no request alive).
        self._owner: Primary | None = owner
        self._loop = owner.ring.loop
        self.cmd_op = cmd_op
        self.cmd = cmd
        self.is_fused = is_fused
        self.buf_dir = buf_dir
        self.pdu: dict[str, Any] = {}
        self.secondary_results: list[int] = []
        self.cancelled = False
        #: Set by the driver to be told about ASYNC_CANCEL/ring close before it lent
        #: (``io_uring_cmd_mark_cancelable``); without it the ring completes the
        #: command with -ECANCELED itself.
        self.cancel_hook: Callable[[UringCmd], None] | None = None
        self.user_data = 0

    def provide_buf_and_start(self, buf: Any, callback: Callable[[UringCmd], None]) -> None:
        """Lend ``buf`` to the secondaries and issue them all at once (SPEC F8-F9).

        ``callback(cmd)`` runs as task work (``loop.call_soon``) once every secondary
        has completed; it should call :meth:`done`.  The driver may reuse ``buf``
        only after the command's completion.
        """
        owner = self._owner
        if owner is None:
            raise DriverError("cannot lend a buffer: the command already completed")
        owner.lend(buf, callback)

    def done(self, res: int, res2: int = 0) -> None:
        """Post the command's completion (``io_uring_cmd_done``)."""
        owner = self._owner
        if owner is None:
            log.debug("done_after_completion", user_data=self.user_data, res=res)
            return
        owner.done(res, res2)

    def complete_in_task(self, callback: Callable[[UringCmd], None]) -> None:
        """Run ``callback(cmd)`` as task work on the ring's loop."""
        self._loop.call_soon(callback, self)

    @property
    def finished(self) -> bool:
        """True once the command's completion has been posted."""
        owner = self._owner
        return owner is None or owner.finished


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
