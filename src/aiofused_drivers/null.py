"""The null driver: the reference every plumbing test uses first.

``cmd_op`` selects the behaviour:

* ``NULL_LEND`` (0): lend a buffer of ``size`` bytes (driver option, default 64 KiB);
  complete with 0 once the secondaries returned, or -ECANCELED if the command was
  cancelled.
* ``NULL_INLINE`` (1): complete inline with the signed 32-bit result packed in ``cmd``.
* ``NULL_QUEUED`` (2): queue, then complete from task work with that result.
* ``NULL_RESULTS`` (3): lend, then complete with the sum of the secondaries' results.

A plain URING_CMD with ``NULL_LEND`` completes with 0.  The buffer is allocated per
command (a ``bytearray``) unless a ``buffer`` is given, in which case every command
lends that same buffer (for zero-copy tests).
"""

from __future__ import annotations

import errno
import struct
from typing import Any, Final

from aiofused import EIOCBQUEUED, UringCmd

__all__ = ["NULL_INLINE", "NULL_LEND", "NULL_QUEUED", "NULL_RESULTS", "NullDriver"]

NULL_LEND: Final = 0
NULL_INLINE: Final = 1
NULL_QUEUED: Final = 2
NULL_RESULTS: Final = 3


def _packed_result(cmd: bytes) -> int:
    return int(struct.unpack_from("<i", cmd.ljust(4, b"\0"))[0])


class NullDriver:
    """Lends a buffer and completes; see the module docstring for ``cmd_op`` values."""

    name = "null"

    def __init__(self, size: int = 65536, can_fused: bool = True, buffer: Any = None) -> None:
        self.size = size
        self.can_fused = can_fused
        self.buffer = buffer
        self.commands = 0

    def uring_cmd(self, cmd: UringCmd, issue_flags: int) -> int:
        """Handle one command (see the module docstring)."""
        self.commands += 1
        op = cmd.cmd_op
        if op == NULL_INLINE:
            return _packed_result(cmd.cmd)
        if op == NULL_QUEUED:
            cmd.complete_in_task(_done_with_packed_result)
            return EIOCBQUEUED
        if op != NULL_LEND and op != NULL_RESULTS:
            return -errno.EINVAL
        if not cmd.is_fused:
            return 0
        buf = self.buffer if self.buffer is not None else bytearray(self.size)
        cmd.provide_buf_and_start(buf, _returned)
        return EIOCBQUEUED


# (Module functions, not a lambda or a bound method: nothing is made per command.)


def _done_with_packed_result(cmd: UringCmd) -> None:
    cmd.done(_packed_result(cmd.cmd))


def _returned(cmd: UringCmd) -> None:
    if cmd.cancelled:
        cmd.done(-errno.ECANCELED)
    elif cmd.cmd_op == NULL_RESULTS:
        cmd.done(sum(cmd.secondary_results))
    else:
        cmd.done(0)
