"""Exceptions, and the one place where a negative ``res`` becomes an exception.

::

    AiofusedError                       base of everything aiofused raises itself
    ├── BackendUnavailable              backend="uring" where the kernel refuses
    ├── DriverError                     no such driver plugin, or a driver broke its contract
    └── RingClosedError                 the ring is closed
    OSError (builtin tree)              a CQE's negative res at the high-level API:
                                        ConnectionResetError, TimeoutError, ... picked
                                        by errno as ``OSError(errno, strerror)`` does

Low-level calls never raise for I/O errors: they post ``-errno`` in a CQE.
"""

from __future__ import annotations

__all__ = [
    "AiofusedError",
    "BackendUnavailable",
    "DriverError",
    "LifecycleError",
    "RingClosedError",
    "check_res",
    "res_to_error",
]


class AiofusedError(Exception):
    """Base class of the exceptions aiofused raises itself."""


class LifecycleError(AssertionError):
    """A request received an input its state has no edge for (a ring bug)."""


class BackendUnavailable(AiofusedError):
    """The requested backend cannot run here; ``reason`` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class DriverError(AiofusedError):
    """A driver could not be loaded, or used the command API out of order."""


class RingClosedError(AiofusedError):
    """Operation on a closed ring."""


def res_to_error(res: int) -> OSError:
    """Turn a negative CQE ``res`` into the matching :class:`OSError` subclass."""
    if res >= 0:
        raise ValueError(f"res {res} is not an error")
    import os  # here, not at the top: the pure core imports this module's classes

    return OSError(-res, os.strerror(-res))


def check_res(res: int) -> int:
    """Return ``res`` if it is a success, raise the matching :class:`OSError` otherwise."""
    if res < 0:
        raise res_to_error(res)
    return res
