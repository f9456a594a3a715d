"""The io_uring ABI module: struct layouts, constants, syscalls and the ring mmaps."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from collections.abc import Iterator

import pytest

from aiofused._abi import CqeFlag, Op, SqeFlag
from aiofused._abi import uring as abi
from aiofused.backends._uring import UringBackend


def test_struct_sizes() -> None:
    assert ctypes.sizeof(abi.io_uring_sqe) == 64
    assert ctypes.sizeof(abi.io_uring_cqe) == 16
    assert ctypes.sizeof(abi.io_sqring_offsets) == 40
    assert ctypes.sizeof(abi.io_cqring_offsets) == 40
    assert ctypes.sizeof(abi.io_uring_params) == 120
    assert ctypes.sizeof(abi.io_uring_probe_op) == 8
    assert abi.io_uring_probe.ops.offset == 16
    assert ctypes.sizeof(abi.iovec) == 16
    assert abi.SQE_STRUCT.size == 64
    assert abi.CQE_STRUCT.size == 16


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("opcode", 0),
        ("flags", 1),
        ("ioprio", 2),
        ("fd", 4),
        ("off", 8),
        ("addr", 16),
        ("len", 24),
        ("rw_flags", 28),
        ("user_data", 32),
        ("buf_index", 40),
        ("personality", 42),
        ("splice_fd_in", 44),
        ("addr3", 48),
    ],
)
def test_sqe_field_offsets(field: str, offset: int) -> None:
    assert getattr(abi.io_uring_sqe, field).offset == offset


def test_params_offsets() -> None:
    assert abi.io_uring_params.features.offset == 20
    assert abi.io_uring_params.sq_off.offset == 40
    assert abi.io_uring_params.cq_off.offset == 80
    assert abi.io_cqring_offsets.flags.offset == 24
    assert abi.io_sqring_offsets.array.offset == 24


def test_sqe_struct_matches_ctypes_layout() -> None:
    values = (22, 0x41, 0x1234, -7, 2**63 + 5, 0xDEADBEEF00, 4096, 0x80000001, 2**64 - 2, 9, 3)
    raw = bytearray(64)
    abi.SQE_STRUCT.pack_into(raw, 0, *values, -1, 2**40, 0)
    sqe = abi.io_uring_sqe.from_buffer_copy(raw)
    got = (
        sqe.opcode,
        sqe.flags,
        sqe.ioprio,
        sqe.fd,
        sqe.off,
        sqe.addr,
        sqe.len,
        sqe.rw_flags,
        sqe.user_data,
        sqe.buf_index,
        sqe.personality,
    )
    assert got == values
    assert sqe.splice_fd_in == -1
    assert sqe.addr3 == 2**40


def test_cqe_struct_matches_ctypes_layout() -> None:
    raw = abi.CQE_STRUCT.pack(2**64 - 1, -errno.ECANCELED, abi.IORING_CQE_F_NOTIF)
    cqe = abi.io_uring_cqe.from_buffer_copy(raw)
    assert (cqe.user_data, cqe.res, cqe.flags) == (2**64 - 1, -errno.ECANCELED, 8)


def test_constants_agree_with_uapi_enums() -> None:
    for op in (
        Op.NOP,
        Op.FSYNC,
        Op.READ_FIXED,
        Op.WRITE_FIXED,
        Op.ASYNC_CANCEL,
        Op.READ,
        Op.WRITE,
        Op.SEND,
        Op.RECV,
        Op.SEND_ZC,
    ):
        assert getattr(abi, f"IORING_OP_{op.name}") == int(op)
    assert int(CqeFlag.MORE) == abi.IORING_CQE_F_MORE
    assert int(CqeFlag.NOTIF) == abi.IORING_CQE_F_NOTIF
    assert abi.IORING_FEAT_NODROP == 1 << 1
    assert abi.IORING_CQ_EVENTFD_DISABLED == 1
    assert abi.IORING_SQ_CQ_OVERFLOW == 2
    assert abi.IORING_OFF_CQ_RING == 0x8000000
    assert abi.IORING_OFF_SQES == 0x10000000
    assert abi.IORING_REGISTER_PROBE == 8
    assert abi.IORING_REGISTER_EVENTFD == 4
    assert int(SqeFlag.CQE_SKIP_SUCCESS) == 1 << 6


def test_arch_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    reason = abi.arch_unsupported_reason()
    assert "aarch64" in reason
    assert "x86-64" in reason


def test_arch_accepts_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    if not sys.platform.startswith("linux"):
        pytest.skip("not Linux")
    assert abi.arch_unsupported_reason() == ""


@pytest.fixture
def kernel_ring() -> Iterator[tuple[int, abi.io_uring_params]]:
    probe = UringBackend.probe()
    if not probe.available:
        pytest.skip(probe.reason)
    p = abi.io_uring_params()
    p.flags = abi.IORING_SETUP_CQSIZE
    p.cq_entries = 32
    fd = abi.io_uring_setup(8, p)
    yield fd, p
    os.close(fd)


def test_setup_fills_params(kernel_ring: tuple[int, abi.io_uring_params]) -> None:
    _, p = kernel_ring
    assert p.sq_entries == 8
    assert p.cq_entries == 32
    assert p.features & abi.IORING_FEAT_NODROP
    assert p.sq_off.array > 0
    assert p.cq_off.cqes > 0


def test_probe_ops_lists_basic_opcodes(kernel_ring: tuple[int, abi.io_uring_params]) -> None:
    fd, _ = kernel_ring
    ops = abi.probe_ops(fd)
    assert {abi.IORING_OP_NOP, abi.IORING_OP_READ, abi.IORING_OP_ASYNC_CANCEL} <= ops
    assert 255 not in ops


def test_nop_round_trip_through_the_maps(kernel_ring: tuple[int, abi.io_uring_params]) -> None:
    fd, p = kernel_ring
    maps = abi.map_rings(fd, p)
    try:
        words = maps.sq_words
        words[p.sq_off.array // 4] = 0
        abi.SQE_STRUCT.pack_into(
            maps.sqes, 0, abi.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 77, *[0] * 5
        )
        words[p.sq_off.tail // 4] = 1
        assert abi.io_uring_enter(fd, 1, 1, abi.IORING_ENTER_GETEVENTS) == 1
        cq = maps.cq_words
        head, tail = cq[p.cq_off.head // 4], cq[p.cq_off.tail // 4]
        assert (tail - head) & 0xFFFFFFFF == 1
        off = (head & (p.cq_entries - 1)) * 16
        assert abi.CQE_STRUCT.unpack_from(maps.cqes, off) == (77, 0, 0)
        cq[p.cq_off.head // 4] = tail
    finally:
        maps.close()


def test_syscall_errors() -> None:
    p = abi.io_uring_params()
    with pytest.raises(OSError) as info:
        abi.io_uring_setup(0, p)  # 0 entries is EINVAL (or ENOSYS/EPERM where refused)
    assert info.value.errno in (errno.EINVAL, errno.ENOSYS, errno.EPERM)
    r, w = os.pipe()
    try:
        # Not a ring: io_uring_enter and io_uring_register refuse the fd.
        assert abi.io_uring_enter_raw(r, 0, 0, 0) in (-errno.EOPNOTSUPP, -errno.ENOSYS)
        with pytest.raises(OSError) as info:
            abi.io_uring_register(r, abi.IORING_REGISTER_PROBE, None, 0)
        assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOSYS)
    finally:
        os.close(r)
        os.close(w)
    assert abi.io_uring_enter_raw(2**31 - 1, 0, 0, 0) in (-errno.EBADF, -errno.ENOSYS)


def test_register_takes_the_object_never_an_address(
    kernel_ring: tuple[int, abi.io_uring_params],
) -> None:
    """io_uring_register holds its argument for the whole syscall: it takes the ctypes
    object (compiled callers drop a local after its last use, so an address taken
    before the call could point at freed memory during it) and refuses a bare int."""
    fd, _ = kernel_ring
    with pytest.raises(TypeError):
        abi.io_uring_register(fd, abi.IORING_REGISTER_PROBE, 4096, 1)  # type: ignore[arg-type]
    probe = abi.io_uring_probe()
    abi.io_uring_register(fd, abi.IORING_REGISTER_PROBE, probe, abi.PROBE_OPS)
    assert probe.ops_len > int(abi.Op.READ)  # the kernel wrote into this very object


def test_full_barrier_is_callable() -> None:
    abi.full_barrier()
    abi.full_barrier()
