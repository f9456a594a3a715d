"""The public face of backends: what executes plain I/O ops under a ring.

``BACKENDS`` names them (``"uring"``: the kernel's io_uring through ctypes;
``"asyncio"``: non-blocking syscalls on the running loop); :func:`available_backends`
probes each by trying (``io_uring_setup`` + ``IORING_REGISTER_PROBE``), never by kernel
version, and says why one is unavailable.
"""

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
