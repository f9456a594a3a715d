"""The backends that execute plain I/O ops for a :class:`~aiofused.Ring`: ``_uring`` (the
kernel's io_uring through ctypes) and ``_asyncio``; the interface is ``_base``, and the
public names are in :mod:`aiofused.backend`."""
