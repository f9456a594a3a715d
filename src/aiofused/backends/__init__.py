"""Backends execute plain I/O ops for a :class:`~aiofused.Ring`; see ``_base``."""

from aiofused.backends._base import (
    BACKENDS,
    Backend,
    BackendOp,
    Completion,
    IoOp,
    ProbeResult,
    available_backends,
    get_backend_class,
    select_backend,
)

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
