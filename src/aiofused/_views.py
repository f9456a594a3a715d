"""Process-wide accounting of what the runtime holds, for leak checks.

``views`` counts the memoryviews the runtime made (buffers of plain ops, the lent
buffer and every slice of it) and has not released yet; ``lent`` counts primaries
whose buffer is lent right now.  Both must be 0 when nothing is in flight.
"""

from __future__ import annotations

from aiofused._log import get_logger

__all__ = ["counters", "lent_changed", "view_made", "view_release"]

log = get_logger("aiofused.views")

_counters = {"lent": 0, "views": 0}


def counters() -> dict[str, int]:
    """A copy of the counters."""
    return dict(_counters)


def view_made() -> None:
    """Count one more view held by the runtime."""
    _counters["views"] += 1


def lent_changed(delta: int) -> None:
    """A buffer was lent (+1) or returned (-1)."""
    _counters["lent"] += delta


def view_release(view: memoryview) -> bool:
    """Release a runtime view; False (and an error log) if someone still exports it."""
    try:
        view.release()
    except BufferError:
        log.error("view_still_exported", nbytes=view.nbytes)
        return False
    _counters["views"] -= 1
    return True
