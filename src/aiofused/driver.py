"""The public face for driver plugins: everything a driver may import.

A driver is one declarative object (:class:`Driver`): ``name``, ``can_fused`` and
``uring_cmd(cmd, issue_flags)``.  It sees each command as a :class:`UringCmd`, lends
buffers (often from a :class:`BufferPool`) with ``cmd.provide_buf_and_start`` and
completes with ``cmd.done``.  A plugin that is a program too (a subcommand of
``aiofused``, see :mod:`aiofused.cli`) logs with :func:`get_logger`, sets logging up
with :func:`configure_logging`, runs its loop with :func:`run_on_loop`, and parses
its options with the shared helpers (:func:`parse_size`, :func:`size_arg`, ...,
:class:`ArgumentParser`, :class:`CommandError`; see :mod:`aiofused.cli`).  Plugins
import only this module, :mod:`aiofused` and :mod:`aiofused.backend`; a test
(``tests/test_boundaries.py``) walks the in-tree plugins to keep it so.
"""

from aiofused._abi import EIOCBQUEUED, BufDir
from aiofused._args import (
    ArgumentParser,
    CommandError,
    host_port_arg,
    int_arg,
    log_level_arg,
    parse_host_port,
    parse_size,
    size_arg,
)
from aiofused._buffers import BufferPool, PoolBuffer
from aiofused._driver import (
    ENTRY_POINT_GROUP,
    Driver,
    DriverFile,
    IssueFlag,
    UringCmd,
    available_drivers,
    load_driver,
)
from aiofused._errors import DriverError
from aiofused._log import configure_logging, get_logger
from aiofused._loop import run_on_loop

__all__ = [
    "EIOCBQUEUED",
    "ENTRY_POINT_GROUP",
    "ArgumentParser",
    "BufDir",
    "BufferPool",
    "CommandError",
    "Driver",
    "DriverError",
    "DriverFile",
    "IssueFlag",
    "PoolBuffer",
    "UringCmd",
    "available_drivers",
    "configure_logging",
    "get_logger",
    "host_port_arg",
    "int_arg",
    "load_driver",
    "log_level_arg",
    "parse_host_port",
    "parse_size",
    "run_on_loop",
    "size_arg",
]
