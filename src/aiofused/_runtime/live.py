"""The rings alive in this process (the pytest plugin's leak check reads them).

A compiled :class:`~aiofused.Ring` (the mypyc twin) takes no weak reference, so each ring
registers a small token that does; ring and token refer to each other, so the token's
entry leaves the registry when the cyclic GC frees the ring.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiofused._runtime.ring import Ring

__all__ = ["live_rings", "register", "token"]


class _Token:
    __slots__ = ("__weakref__", "ring")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring


_LIVE: weakref.WeakSet[_Token] = weakref.WeakSet()


def register(ring: Ring) -> object:
    """Register ``ring``; it keeps the returned token for as long as it lives."""
    token = _Token(ring)
    _LIVE.add(token)
    return token


def live_rings() -> list[Ring]:
    """Every ring registered and not yet freed."""
    return [token.ring for token in list(_LIVE)]


def token(ring: Ring) -> object:
    """``ring``'s token (weakly referenceable where a compiled ring is not)."""
    return ring._live_token
