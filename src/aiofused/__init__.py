"""aiofused: fused I/O for asyncio.

An io_uring-faithful ring (SQEs, CQEs, links, ``-errno`` results) on the running
asyncio loop, with the primary/secondary *fused command* model of the unmerged
``IORING_OP_FUSED_CMD`` series: a driver's primary lends a buffer to secondary
READ/WRITE/SEND/RECV ops that run concurrently on it, and completes only after all
of them.  Plain ops run on a real kernel io_uring where the machine allows it, and
on asyncio otherwise, with the same semantics.
"""

# First: the core this process runs (the compiled twin or the pure one) is picked
# before anything imports it.  CORE is "compiled" or "pure"; CORE_REASON says why.
from aiofused._twin import CORE
from aiofused._twin import REASON as CORE_REASON

# isort: split
from aiofused._abi import (
    EIOCBQUEUED,
    MAX_SECONDARY,
    BufDir,
    CqeFlag,
    Feature,
    Op,
    SetupFlag,
    SqeFlag,
    UringCmdFlag,
)
from aiofused._buffers import BufferPool, PoolBuffer
from aiofused._core.sqe import Cqe, Sqe
from aiofused._driver import Driver, DriverFile, IssueFlag, UringCmd, available_drivers
from aiofused._errors import (
    AiofusedError,
    BackendUnavailable,
    DriverError,
    RingClosedError,
    check_res,
    res_to_error,
)
from aiofused._runtime.lease import FusedScope, Lease
from aiofused._runtime.ring import Ring

__version__ = "0.1.0"

__all__ = [
    "CORE",
    "CORE_REASON",
    "EIOCBQUEUED",
    "MAX_SECONDARY",
    "AiofusedError",
    "BackendUnavailable",
    "BufDir",
    "BufferPool",
    "Cqe",
    "CqeFlag",
    "Driver",
    "DriverError",
    "DriverFile",
    "Feature",
    "FusedScope",
    "IssueFlag",
    "Lease",
    "Op",
    "PoolBuffer",
    "Ring",
    "RingClosedError",
    "SetupFlag",
    "Sqe",
    "SqeFlag",
    "UringCmd",
    "UringCmdFlag",
    "__version__",
    "available_drivers",
    "check_res",
    "res_to_error",
]
