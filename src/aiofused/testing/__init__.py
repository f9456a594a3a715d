"""Test support users can reuse: a pytest plugin (loaded through the ``pytest11``
entry point; it acts only on tests that opt in, see :mod:`aiofused.testing.plugin`)
with per-loop and per-backend fixtures and a leak check, and :class:`FakeBackend`, a
backend whose ops complete when the test says so."""

from aiofused.testing.fake import FakeBackend, FakeOp
from aiofused.testing.plugin import LeakError, assert_no_leaks, backend_params, find_leaks

__all__ = ["FakeBackend", "FakeOp", "LeakError", "assert_no_leaks", "backend_params", "find_leaks"]
