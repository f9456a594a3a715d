"""Test support users can reuse: a pytest plugin (loaded through the ``pytest11``
entry point) with per-loop and per-backend fixtures and an autouse leak check."""

from aiofused.testing.plugin import LeakError, assert_no_leaks, backend_params

__all__ = ["LeakError", "assert_no_leaks", "backend_params"]
