"""aiofused._abi.pin: the C twin and the Python reference pin the same memory and write
the same SQE bytes, fail alike, and hold the export for as long as the pin lives."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable

import pytest

from aiofused._abi import pin as pinmod
from aiofused._abi.uring import SQE_STRUCT

IMPLS: list[tuple[str, Callable[..., object]]] = [("python", pinmod.pin_rw_py)]
try:
    from aiofused._abi import _pin

    IMPLS.append(("c", _pin.pin_rw))
    C_WHY = ""
except ImportError as exc:
    C_WHY = f"the C twin is not built: {exc}"

needs_c = pytest.mark.skipif(bool(C_WHY), reason=C_WHY or "built")


def _args(rng: random.Random, buf: bytearray) -> tuple[int, ...]:
    return (
        rng.randrange(8) * 64,  # offset in an 8-slot SQ array
        rng.randrange(256),  # opcode
        rng.randrange(-(2**31), 2**31),  # fd
        rng.choice([0, -1, rng.randrange(2**64), rng.randrange(2**40)]),  # off (-1: current)
        rng.randrange(len(buf) + 1),  # nbytes
        rng.choice([0, rng.randrange(2**32), rng.randrange(2**40)]),  # rw_flags (masked)
        rng.randrange(2**64),  # user_data
        rng.randrange(2**20),  # buf_index (masked to 16 bits)
    )


@needs_c
def test_c_and_python_write_the_same_sqe_for_random_inputs() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        buf = bytearray(rng.randrange(1, 9000))
        offset, opcode, fd, off, nbytes, rw_flags, ud, buf_index = _args(rng, buf)
        outs = []
        for _name, fn in IMPLS:
            sq = bytearray(rng.randbytes(8 * 64))  # junk: every byte of the SQE is written
            pin = fn(sq, offset, opcode, fd, off, buf, nbytes, rw_flags, ud, buf_index)
            outs.append((bytes(sq[offset : offset + 64]), sq[:offset] + sq[offset + 64 :]))
            del pin
        (py_sqe, _), (c_sqe, _) = outs
        assert py_sqe == c_sqe
        fields = SQE_STRUCT.unpack(c_sqe)
        assert fields[0] == opcode and fields[3] == fd and fields[4] == off % 2**64
        assert fields[5] == ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert fields[6] == nbytes and fields[7] == rw_flags % 2**32 and fields[8] == ud
        assert fields[9] == buf_index % 2**16
        assert fields[1] == fields[2] == fields[10] == fields[11] == fields[12] == 0


def _raises(fn: Callable[..., object], *args: object) -> type[BaseException] | None:
    try:
        fn(*args)
    except Exception as exc:
        return type(exc)
    return None


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("read-only", BufferError),
        ("not a buffer", TypeError),
        ("empty", ValueError),
        ("too short", ValueError),
        ("negative nbytes", ValueError),
        ("strided", BufferError),
        ("SQE outside the array", ValueError),
        ("SQE far outside the array", ValueError),
    ],
)
@pytest.mark.parametrize(("impl", "fn"), IMPLS, ids=[n for n, _ in IMPLS])
def test_bad_buffers_fail_alike_and_write_nothing(
    impl: str, fn: Callable[..., object], case: str, expected: type[BaseException]
) -> None:
    buf: object = bytearray(4096)
    nbytes, offset = 4096, 0
    if case == "read-only":
        buf = bytes(4096)
    elif case == "not a buffer":
        buf = 4096
    elif case == "empty":
        buf, nbytes = bytearray(), 0
    elif case == "too short":
        nbytes = 4097
    elif case == "negative nbytes":
        nbytes = -1
    elif case == "strided":
        buf = memoryview(bytearray(8192))[::2]
    elif case == "SQE outside the array":
        offset = 8 * 64 - 32
    else:
        offset = 2**63 - 1  # no overflow in the bounds check
    sq = bytearray(b"\xa5" * 8 * 64)
    assert _raises(fn, sq, offset, 22, 3, 0, buf, nbytes, 0, 1, 0) is expected
    assert sq == bytearray(b"\xa5" * 8 * 64)  # nothing written
    if isinstance(buf, bytearray):
        buf.extend(b"x")  # and nothing left exported


@pytest.mark.parametrize(("impl", "fn"), IMPLS, ids=[n for n, _ in IMPLS])
def test_the_pin_holds_the_export_until_dropped(impl: str, fn: Callable[..., object]) -> None:
    buf = bytearray(4096)
    pin = fn(bytearray(64), 0, 22, 3, 0, buf, 4096, 0, 1, 0)
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the kernel may be writing it: it cannot move
    del pin
    buf.extend(b"x")
    assert len(buf) == 4097


@needs_c
def test_the_c_pin_names_the_exported_memory() -> None:
    buf = bytearray(100)
    pin = _pin.pin_rw(bytearray(64), 0, 22, 3, 0, buf, 10, 0, 1, 0)
    assert pin.address == ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert pin.nbytes == 100


def test_impl_follows_the_environment() -> None:
    import os

    if os.environ.get("AIOFUSED_NO_EXTENSIONS", "") not in ("", "0") or C_WHY:
        assert pinmod.IMPL == "python" and pinmod.pin_rw is pinmod.pin_rw_py
    else:
        assert pinmod.IMPL == "c" and pinmod.pin_rw is _pin.pin_rw
