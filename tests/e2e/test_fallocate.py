"""IORING_OP_FALLOCATE (``prep_fallocate``) on real files, on every loop and backend:
``addr`` carries the length and ``len`` the mode, as io_uring's prep; results are
``fallocate(2)``'s."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import ECANCELED, EINVAL, add, reap

from aiofused import Ring, SqeFlag

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
EBADF = -errno.EBADF
KiB = 1024


@pytest.fixture
def rand_file(tmp_path: Path) -> Any:
    content = os.urandom(256 * KiB)
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    yield fd, content
    os.close(fd)


async def test_punch_zero_and_allocate(ring: Ring, rand_file: Any) -> None:
    """PUNCH_HOLE and ZERO_RANGE zero their range only; plain mode 0 extends the file,
    KEEP_SIZE does not."""
    fd, content = rand_file
    add(ring, 1, "fallocate", fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * KiB, 16 * KiB)
    add(ring, 2, "fallocate", fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 64 * KiB, 4 * KiB)
    add(ring, 3, "fallocate", fd, FALLOC_FL_KEEP_SIZE, 0, 1024 * KiB)
    assert ring.submit() == 3
    assert sorted(await reap(ring, 3)) == [(1, 0), (2, 0), (3, 0)]
    data = os.pread(fd, 256 * KiB, 0)
    assert os.fstat(fd).st_size == 256 * KiB
    expect = bytearray(content)
    expect[8 * KiB : 24 * KiB] = bytes(16 * KiB)
    expect[64 * KiB : 68 * KiB] = bytes(4 * KiB)
    assert data == expect
    add(ring, 4, "fallocate", fd, 0, 256 * KiB, 64 * KiB)
    assert ring.submit() == 1
    assert await reap(ring, 1) == [(4, 0)]
    assert os.fstat(fd).st_size == 320 * KiB
    assert os.pread(fd, 64 * KiB, 256 * KiB) == bytes(64 * KiB)


async def test_linked_fallocate_then_read(ring: Ring, rand_file: Any) -> None:
    """A punch linked to a READ of the range: the READ runs after it and sees zeroes;
    a FALLOCATE whose syscall fails does not sever the link (the kernel never marks it
    failed: SPEC L2, issue 12 class 9), and a bad fd does."""
    fd, _ = rand_file
    buf = bytearray(4 * KiB)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    add(ring, 1, "fallocate", fd, mode, 0, 4 * KiB, flags=SqeFlag.IO_LINK)
    add(ring, 2, "read", fd, buf, 4 * KiB, 0)
    add(ring, 3, "fallocate", fd, mode, -4 * KiB, 4 * KiB, flags=SqeFlag.IO_LINK)
    add(ring, 4, "read", fd, bytearray(16), 16, 0)
    add(ring, 5, "fallocate", 9999, mode, 0, 4 * KiB, flags=SqeFlag.IO_LINK)
    add(ring, 6, "read", fd, bytearray(16), 16, 0)
    assert ring.submit() == 6
    cqes = await reap(ring, 6)
    assert cqes.index((1, 0)) < cqes.index((2, 4 * KiB))
    assert cqes.index((3, EINVAL)) < cqes.index((4, 16))
    assert cqes.index((5, EBADF)) < cqes.index((6, ECANCELED))
    assert buf == bytes(4 * KiB)


@pytest.mark.parametrize(
    ("mutate", "res"),
    [
        pytest.param(lambda s: setattr(s, "rw_flags", 1), EINVAL, id="rw_flags"),
        pytest.param(lambda s: setattr(s, "buf_index", 1), EINVAL, id="buf_index"),
        pytest.param(lambda s: setattr(s, "addr", b"x"), EINVAL, id="addr-not-a-length"),
        pytest.param(lambda s: setattr(s, "len", 0x7FFF), -errno.EOPNOTSUPP, id="bad-mode"),
        pytest.param(lambda s: setattr(s, "addr", 0), EINVAL, id="zero-length"),
    ],
)
async def test_bad_fallocate(ring: Ring, rand_file: Any, mutate: Any, res: int) -> None:
    """Bad SQE fields are -EINVAL (init); bad values are the syscall's errno; the file
    is untouched either way."""
    fd, content = rand_file
    sqe = add(ring, 1, "fallocate", fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4 * KiB)
    mutate(sqe)
    assert ring.submit() == 1
    ((ud, got),) = await reap(ring, 1)
    assert ud == 1
    assert got == res
    assert os.pread(fd, len(content), 0) == content


async def test_fallocate_bad_fds(ring: Ring, tmp_path: Path) -> None:
    """A closed fd is -EBADF, a driver's file -EINVAL, a read-only file -EBADF."""
    ro = tmp_path / "ro.bin"
    ro.write_bytes(b"x" * 8192)
    ro_fd = os.open(ro, os.O_RDONLY)
    closed = os.open(ro, os.O_RDONLY)
    os.close(closed)
    df = ring.open_driver("null")
    try:
        add(ring, 1, "fallocate", closed, 0, 0, 4096)
        add(ring, 2, "fallocate", df, 0, 0, 4096)
        add(ring, 3, "fallocate", ro_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert ring.submit() == 3
        assert sorted(await reap(ring, 3)) == [(1, EBADF), (2, EINVAL), (3, EBADF)]
    finally:
        os.close(ro_fd)
    assert ro.read_bytes() == b"x" * 8192
