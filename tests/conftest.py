"""Shared helpers for the test suite (fixtures come from ``aiofused.testing.plugin``)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiofused import Cqe, Ring, Sqe

ECANCELED = -errno.ECANCELED
EINVAL = -errno.EINVAL
EBADF = -errno.EBADF
EFAULT = -errno.EFAULT
EOPNOTSUPP = -errno.EOPNOTSUPP
ENOENT = -errno.ENOENT
EALREADY = -errno.EALREADY
ETIME = -errno.ETIME
EIO = -errno.EIO


def add(ring: Ring, ud: int, prep: str, *args: Any, flags: int = 0, **kw: Any) -> Sqe:
    """Get an SQE, call ``sqe.prep_<prep>(*args)``, set ``user_data`` and OR ``flags``."""
    sqe = ring.get_sqe()
    assert sqe is not None, "SQ full"
    getattr(sqe, f"prep_{prep}")(*args, **kw)
    sqe.user_data = ud
    sqe.flags |= flags
    return sqe


async def reap(
    ring: Ring, n: int, settle: float = 0.02, timeout: float = 5.0
) -> list[tuple[int, int]]:
    """Wait for exactly ``n`` CQEs; fail if more arrive within ``settle`` seconds."""
    cqes = await asyncio.wait_for(ring.wait_cqes(n), timeout)
    await asyncio.sleep(settle)
    extra = []
    while ring.peek_cqe() is not None:
        c = ring.peek_cqe()
        assert c is not None
        ring.cqe_seen(c)
        extra.append((c.user_data, c.res))
    assert not extra, f"unexpected extra CQEs {extra} after {[(c.user_data, c.res) for c in cqes]}"
    return [(c.user_data, c.res) for c in cqes]


def pairs(cqes: list[Cqe]) -> list[tuple[int, int]]:
    """``(user_data, res)`` of each CQE."""
    return [(c.user_data, c.res) for c in cqes]


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An open (read-write) fd on a 64 KiB file of random content, and the content."""
    content = os.urandom(1 << 16)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    yield fd, content
    os.close(fd)


@pytest.fixture
def sockpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected unix stream socket pair, non-blocking."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def sockpairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Eight connected unix stream socket pairs."""
    ps = [socket.socketpair() for _ in range(8)]
    for a, b in ps:
        a.setblocking(False)
        b.setblocking(False)
    yield ps
    for a, b in ps:
        a.close()
        b.close()


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic GC off for the test (collected first, re-enabled after)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage(types: tuple[type, ...]) -> list[str]:
    """Names of the objects of ``types`` that only the cyclic GC could free right now."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [type(o).__name__ for o in gc.garbage if isinstance(o, types)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found
