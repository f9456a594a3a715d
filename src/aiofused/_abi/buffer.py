"""CPython's buffer protocol through ctypes: an export that pins an object's memory.

Kept out of the uring backend's module so that module can be compiled: mypyc cannot
compile a ``ctypes.Structure`` subclass, and the export's lifetime is easier to audit
in one small interpreted module.
"""

from __future__ import annotations

import ctypes

__all__ = ["BufferExport"]


class _Py_buffer(ctypes.Structure):
    """CPython's ``Py_buffer``."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_PyBUF_SIMPLE = 0
_PyBUF_WRITABLE = 1
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_Py_buffer),)
_release_buffer.restype = None


class BufferExport:
    """A ``Py_buffer`` export of an object (C-contiguous), held until :meth:`release`.

    Used for read-only views, which ``from_buffer`` refuses, and for registered
    buffers.  Like any export it pins the exporter: a ``bytearray`` cannot be resized,
    an ``mmap`` cannot be closed, a ``memoryview`` cannot be released.
    """

    __slots__ = ("_view", "addr", "nbytes")

    def __init__(self, obj: object, writable: bool) -> None:
        view = _Py_buffer()
        # Raises BufferError/TypeError (set by CPython) if obj cannot be exported.
        _get_buffer(obj, ctypes.byref(view), _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE)
        self._view: _Py_buffer | None = view
        # Safety: view.buf stays valid while the export is held (until release()).
        self.addr: int = view.buf or 0
        self.nbytes: int = view.len

    def release(self) -> None:
        """Give the export back (idempotent); the memory may move or go after this."""
        view = self._view
        if view is not None:
            self._view = None
            _release_buffer(ctypes.byref(view))

    def __del__(self) -> None:
        # Reached only if the owner never released it; the kernel is done by then.
        self.release()
