"""The backend interface: what the ring asks of whatever executes plain I/O.

Theory of operation
-------------------
The ring core (``aiofused._core``) owns every rule of the SPEC: links, skip, drain, fused
commands, timeouts, cancellation bookkeeping.  A backend only *executes leaf I/O
ops* (READ, WRITE, SEND, RECV, SEND_ZC, FSYNC and the ``_FIXED`` forms) and reports
their completions.  Contract, for every backend:

* ``start(op, complete)`` begins ``op`` and returns a handle.  ``complete(res, flags)``
  is called later from the event loop, **never synchronously inside** ``start`` or
  ``cancel``.  It is called exactly once per op, except for SEND_ZC, which calls it
  exactly twice: ``(res, CqeFlag.MORE)`` then ``(0, CqeFlag.NOTIF)`` once the buffer
  is no longer used (the backend synthesises the NOTIF if the kernel does not).
* The buffer in ``op.buf`` may be touched until the *final* ``complete`` call; the
  ring holds it (and the fd object) until then, whatever Python-level cancellation
  happened (SPEC F13).
* ``cancel(handle, on_result)`` requests cancellation; ``on_result(res)`` reports,
  later, 0 (cancel accepted: the op will complete, usually with -ECANCELED),
  -EALREADY (already running, it will complete normally) or -ENOENT (already done).
* ``aclose()`` runs after the ring has cancelled and drained every op.

Backends are found by name (``BACKENDS``), imported lazily, and probed by trying,
never by kernel version.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from aiofused._abi import Op
from aiofused._core.records import IoOp
from aiofused._errors import BackendUnavailable
from aiofused._log import get_logger

if TYPE_CHECKING:
    from aiofused._core.sqe import Sqe

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendOp",
    "Completion",
    "IoOp",
    "ProbeResult",
    "available_backends",
    "get_backend_class",
    "select_backend",
]

log = get_logger("aiofused.backend")

BACKENDS: tuple[str, ...] = ("uring", "asyncio")
_MODULES = {"uring": "aiofused.backends._uring", "asyncio": "aiofused.backends._asyncio"}

#: ``complete(res, cqe_flags)``
Completion = Callable[[int, int], None]


def deliver_each(batch: list[tuple[Completion, int, int]]) -> None:
    """The default :attr:`Backend.deliver`: ``complete(res, flags)`` for each, in order."""
    for complete, res, flags in batch:
        try:
            complete(res, flags)
        except Exception:
            log.exception("completion_callback_failed", res=res)


class BackendOp:
    """Opaque handle of a started op; backends subclass it."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult:
    """What probing a backend found."""

    name: str
    available: bool
    reason: str = ""
    ops: frozenset[Op] = frozenset()


class Backend(abc.ABC):
    """Executes leaf I/O ops for one ring on one event loop."""

    name: ClassVar[str]

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Where a backend that reaps completions in batches (the uring backend: every
        #: CQE of one wake-up) hands them over: ``deliver([(complete, res, flags), ...])``,
        #: in completion order (an op taken by :meth:`start_direct` as ``(user_data, res,
        #: flags)``).  By default each ``complete(res, flags)`` is called in turn; a ring
        #: installs its own to take the whole batch in one call.
        self.deliver: Callable[[list[tuple[Any, int, int]]], None] = deliver_each

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> ProbeResult:
        """Say whether this backend can run here, and which opcodes it executes."""

    @property
    @abc.abstractmethod
    def supported_ops(self) -> frozenset[Op]:
        """Opcodes :meth:`start` accepts; the ring sends others to the asyncio backend."""

    @abc.abstractmethod
    def start(self, op: IoOp, complete: Completion) -> BackendOp:
        """Begin ``op``; see the module docstring for the completion contract."""

    @abc.abstractmethod
    def cancel(self, handle: BackendOp, on_result: Callable[[int], None]) -> None:
        """Request cancellation of ``handle``; ``on_result`` gets 0, -EALREADY or -ENOENT."""

    def start_direct(self, sqe: Sqe) -> bool:
        """Run a standalone flagless READ/WRITE/SEND/RECV ``sqe`` as is, with no ring
        record (a kernel backend copies it into its SQ): its completion goes to
        :attr:`deliver` as ``(sqe.user_data, res, flags)``.  False (the default, and for
        anything it does not take) leaves the op to the ring's general path."""
        return False

    def cancel_direct(
        self, user_data: int | None, every: bool, on_result: Callable[[int], None]
    ) -> int:
        """Cancel ops taken by :meth:`start_direct` whose user_data is ``user_data`` (any
        with None; the first only unless ``every``); return how many cancels started.
        Each reports 0, -EALREADY or -ENOENT to ``on_result`` later, never at once."""
        return 0

    def register_buffers(self, buffers: list[memoryview]) -> bool:
        """Register fixed buffers (the pool); return False if unsupported."""
        return False

    def in_flight(self) -> int:
        """Number of ops started and not yet finally completed."""
        return 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release backend resources once every op has completed."""


def get_backend_class(name: str) -> type[Backend]:
    """Import and return the backend class called ``name``."""
    try:
        module = importlib.import_module(_MODULES[name])
    except KeyError:
        raise LookupError(
            f"unknown backend {name!r}; valid: {', '.join((*BACKENDS, 'auto'))}"
        ) from None
    cls: type[Backend] = module.BACKEND
    return cls


def available_backends() -> list[ProbeResult]:
    """Probe every backend and return what each found."""
    results = []
    for name in BACKENDS:
        try:
            results.append(get_backend_class(name).probe())
        except ImportError as exc:
            results.append(ProbeResult(name, False, f"not importable: {exc}"))
    return results


_fallback_logged: set[str] = set()


def select_backend(name: str, loop: asyncio.AbstractEventLoop) -> Backend:
    """Instantiate the backend for ``name`` (``"auto"``, ``"uring"`` or ``"asyncio"``).

    ``AIOFUSED_BACKEND`` overrides ``"auto"``.  ``"uring"`` raises
    :class:`BackendUnavailable` with the probe's reason; ``"auto"`` logs the
    reason once and falls back to asyncio.
    """
    if name == "auto":
        name = os.environ.get("AIOFUSED_BACKEND", "auto") or "auto"
    if name == "auto":
        try:
            probe = get_backend_class("uring").probe()
        except ImportError as exc:
            probe = ProbeResult("uring", False, f"not importable: {exc}")
        if probe.available:
            return get_backend_class("uring")(loop)
        if probe.reason not in _fallback_logged:
            _fallback_logged.add(probe.reason)
            log.info("backend_fallback", wanted="uring", using="asyncio", reason=probe.reason)
        return get_backend_class("asyncio")(loop)
    cls = get_backend_class(name)
    probe = cls.probe()
    if not probe.available:
        raise BackendUnavailable(name, probe.reason)
    return cls(loop)
