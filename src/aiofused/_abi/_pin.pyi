"""Types of the C twin of :mod:`aiofused._abi.pin`."""

import mmap

SqArray = mmap.mmap | bytearray | memoryview

class Pin:
    """A writable export of a buffer, released when the Pin is freed."""

    @property
    def address(self) -> int: ...
    @property
    def nbytes(self) -> int: ...

def pin_rw(
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
    /,
) -> Pin: ...
