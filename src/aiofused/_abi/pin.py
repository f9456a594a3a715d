"""Pin a buffer and write the SQE that names it, in one call.

:func:`pin_rw` is what the uring backend does for every READ/WRITE-shaped op: export
``buf`` writable (the returned pin holds the export, so the memory cannot move or be
freed until the pin is dropped, after the op's final CQE), check that it holds
``nbytes``, and write the whole 64-byte SQE naming that memory into the SQ array
``sqes`` at byte ``offset``.  This module is the readable reference; the C twin
``aiofused._abi._pin`` (built beside it when a compiler is there) does the same in one
C call, and is used unless ``AIOFUSED_NO_EXTENSIONS`` is set or it was not built
(:data:`IMPL` says which).  Errors, in both: ``buf`` not a buffer, TypeError; not
writable or not C-contiguous, BufferError; empty, or shorter than ``nbytes``,
ValueError (as is an SQE offset outside ``sqes``).  ``off``, ``rw_flags`` and
``buf_index`` are taken modulo their field's width (-1 is "the current file
position"), as the kernel reads them.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import Final

from aiofused._abi.uring import SQE_STRUCT
from aiofused._twin import c_twin

__all__ = ["IMPL", "REASON", "PinRw", "SqArray", "pin_rw", "pin_rw_py"]

#: What holds the SQ array: the ring's mapping (tests: any writable buffer).
SqArray = mmap.mmap | bytearray | memoryview
_U64: Final = (1 << 64) - 1
_U32: Final = (1 << 32) - 1
_c_char_from_buffer: Final = ctypes.c_char.from_buffer
_pack_sqe: Final = SQE_STRUCT.pack_into
_addressof: Final = ctypes.addressof


def pin_rw_py(
    sqes: SqArray,
    offset: int,
    opcode: int,
    fd: int,
    off: int,
    buf: object,
    nbytes: int,
    rw_flags: int,
    user_data: int,
    buf_index: int,
) -> object:
    """Export ``buf`` and write the SQE naming it at ``sqes[offset:offset + 64]``;
    return the export (the pin).  The reference for the C twin's ``pin_rw``."""
    kind = type(buf)
    if kind is bytearray:  # flat, contiguous and writable by construction
        size = len(buf)  # type: ignore[arg-type]
    else:
        with memoryview(buf) as view:  # type: ignore[arg-type]
            if view.readonly:
                raise BufferError("buffer is not writable")
            if not view.c_contiguous:
                raise BufferError("buffer is not C-contiguous")
            size = view.nbytes
    if not size or not 0 <= nbytes <= size:
        raise ValueError(f"buffer of {size} bytes cannot hold {nbytes}")
    if not 0 <= offset <= len(sqes) - SQE_STRUCT.size:
        raise ValueError(f"SQE offset {offset} outside the {len(sqes)}-byte SQ array")
    # One byte's type is enough to export buf and learn its address (the export covers
    # the whole buffer: a bytearray cannot be resized while it lives).
    pin = _c_char_from_buffer(buf)  # type: ignore[arg-type]
    _pack_sqe(
        sqes,
        offset,
        opcode,
        0,
        0,
        fd,
        off & _U64,
        _addressof(pin),
        nbytes,
        rw_flags & _U32,
        user_data,
        buf_index & 0xFFFF,
        0,
        0,
        0,
        0,
    )
    return pin


#: The signature both implementations share.
PinRw = Callable[[SqArray, int, int, int, int, object, int, int, int, int], object]


_SELECTED: Final = c_twin("aiofused._abi._pin", "pin_rw", pin_rw_py)
#: ``"c"`` when the C twin runs, ``"python"`` when this module's reference does;
#: :data:`REASON` says why (``aiofused info`` prints both).
IMPL: Final = _SELECTED[0]
REASON: Final = _SELECTED[1]
pin_rw: Final = _SELECTED[2]
