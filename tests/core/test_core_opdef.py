"""The op table (``aiofused._core.opdef.OPDEFS``) and the ABI numbers, without a loop.

Every entry is checked for internal consistency and against SPEC F4/F5 (which ops may be
fused secondaries, and their buffer direction); the numbers are checked against
``/usr/include/linux/io_uring.h`` where that header has them.  The header on a build
machine is usually older than the running kernel: a name it lacks is skipped, never
failed, and ``Op.FUSED_CMD`` (never merged) must lie above everything the header knows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from recording_port import FUSED, make_core, sqe

from aiofused._abi import (
    EINVAL,
    ENOBUFS,
    ENOENT,
    EOPNOTSUPP,
    IORING_ASYNC_CANCEL_ALL,
    IORING_FSYNC_DATASYNC,
    BufDir,
    CqeFlag,
    Feature,
    Op,
    SetupFlag,
    SqeFlag,
    UringCmdFlag,
)
from aiofused._core.opdef import OPDEFS, Issue, OpDef, UringEnc
from aiofused._core.sqe import Sqe

HEADER = Path("/usr/include/linux/io_uring.h")
SECONDARY_OPS = {Op.READ: BufDir.DEST, Op.RECV: BufDir.DEST}
SECONDARY_OPS |= {Op.WRITE: BufDir.SRC, Op.SEND: BufDir.SRC, Op.SEND_ZC: BufDir.SRC}
LEAF_OPS = {
    Op.READ,
    Op.WRITE,
    Op.READ_FIXED,
    Op.WRITE_FIXED,
    Op.SEND,
    Op.RECV,
    Op.SEND_ZC,
    Op.FSYNC,
    Op.FALLOCATE,
}


def _header_text() -> str:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not installed")
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _enum(text: str, name: str) -> dict[str, int]:
    """Members of C ``enum name { ... }`` with their values (implicit or explicit)."""
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\}", text, flags=re.S)
    if m is None:
        pytest.skip(f"the header has no enum {name}")
    values: dict[str, int] = {}
    nxt = 0
    for item in m.group(1).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, expr = (s.strip() for s in item.split("=", 1))
            nxt = int(expr, 0) if re.fullmatch(r"-?(0x)?[0-9a-fA-F]+", expr) else values[expr]
        else:
            key = item
        values[key] = nxt
        nxt += 1
    return values


def _shift_defines(text: str, bits: dict[str, int] | None = None) -> dict[str, int]:
    """``#define NAME (1U << N)`` (N a number or a name from ``bits``)."""
    out = {}
    for name, shift in re.findall(r"#define\s+(\w+)\s+\(1U?\s*<<\s*(\w+)\)", text):
        if shift.isdigit():
            out[name] = 1 << int(shift)
        elif bits is not None and shift in bits:
            out[name] = 1 << bits[shift]
    return out


# ---- the table itself -------------------------------------------------------------------


def test_every_entry_is_consistent() -> None:
    for opcode, d in OPDEFS.items():
        _check_entry(opcode, d)


def _check_entry(opcode: int, d: OpDef) -> None:
    assert isinstance(d, OpDef)
    assert d.op == opcode and isinstance(d.op, Op)
    assert callable(d.prep)
    assert isinstance(d.issue, Issue)
    # Leaf I/O runs on a backend, needs a file, and has a kernel encoding; nothing else does.
    assert d.backend == (d.issue is Issue.IO)
    assert d.backend == (d.op in LEAF_OPS)
    if d.backend:
        assert d.needs_file
        assert d.uring & UringEnc.KERNEL
    else:
        assert d.uring == UringEnc.NONE
        assert not d.asyncio
    # The uring encoding agrees with the buffer facts.
    assert bool(d.uring & UringEnc.DEST) == (d.buf_dir is BufDir.DEST)
    if d.uring & UringEnc.BUF:
        assert d.buf_dir is not None
    assert bool(d.uring & UringEnc.FIXED) == (d.op in (Op.READ_FIXED, Op.WRITE_FIXED))
    assert bool(d.uring & UringEnc.ZC) == (d.op is Op.SEND_ZC)
    assert bool(d.uring & UringEnc.FALLOC) == (d.op is Op.FALLOCATE)
    assert bool(d.uring & UringEnc.OFFSET) == (
        d.op in (Op.READ, Op.WRITE, Op.READ_FIXED, Op.WRITE_FIXED, Op.FALLOCATE)
    )
    # The asyncio backend runs every leaf op but the registered-buffer forms.
    assert d.asyncio == (d.backend and d.op not in (Op.READ_FIXED, Op.WRITE_FIXED))
    # A short transfer fails a link only for READ/WRITE (SEND/RECV: with MSG_WAITALL).
    assert d.short_fails == (d.op in (Op.READ, Op.WRITE, Op.READ_FIXED, Op.WRITE_FIXED))
    # ioprio is a read/write field (SPEC R3).
    assert d.ioprio == (d.buf_dir is not None)
    # BUFFER_SELECT: on a FUSED_CMD primary -EINVAL (F2); READ/RECV/SEND take it and fail
    # at issue, as the kernel does without a provided buffer group (issue 12, class 17);
    # the rest -EOPNOTSUPP.
    takes = {Op.READ: ENOBUFS, Op.RECV: ENOBUFS, Op.SEND: ENOENT}
    if d.op is Op.FUSED_CMD:
        assert d.buffer_select_err == EINVAL
    elif d.op in takes:
        assert (d.buffer_select_err, d.bufsel_issue_err) == (0, takes[d.op])
    else:
        assert (d.buffer_select_err, d.bufsel_issue_err) == (EOPNOTSUPP, 0)
    # The command ops are the only ones issued to a driver.
    assert (d.issue is Issue.COMMAND) == (d.op in (Op.URING_CMD, Op.FUSED_CMD))


def test_fused_secondaries_are_exactly_spec_f4_with_f5_directions() -> None:
    """SPEC F4: READ, WRITE, SEND, RECV, SEND_ZC may be secondaries (nothing else, in
    particular not FUSED_CMD); F5: READ/RECV write into the buffer, the rest read it."""
    got = {d.op: d.buf_dir for d in OPDEFS.values() if d.fused_secondary}
    assert got == SECONDARY_OPS
    for op in got:
        d = OPDEFS[op]
        assert d.backend and d.needs_file
    assert not OPDEFS[Op.FUSED_CMD].fused_secondary


def test_every_op_member_has_an_entry_or_is_einval_at_init() -> None:
    """Op members without an entry (READV, WRITEV) and unknown numbers (255) are
    consumed with -EINVAL (SPEC R3)."""
    missing = [op for op in Op if op not in OPDEFS]
    assert set(missing) == {Op.READV, Op.WRITEV}
    core, port = make_core()
    for i, code in enumerate([*missing, 255, 200, 129]):
        s = sqe(core, 100 + i, "nop")
        s.opcode = int(code)
        assert core.submit() == 1
    assert port.pairs() == [(100 + i, EINVAL) for i in range(len(missing) + 3)]
    port.assert_quiet()


PREPS = {
    "nop": ((), Op.NOP),
    "read": ((5, bytearray(4)), Op.READ),
    "write": ((5, b"abcd"), Op.WRITE),
    "read_fixed": ((5, 0, 4), Op.READ_FIXED),
    "write_fixed": ((5, 0, 4), Op.WRITE_FIXED),
    "send": ((5, b"x"), Op.SEND),
    "recv": ((5, bytearray(1)), Op.RECV),
    "send_zc": ((5, b"x"), Op.SEND_ZC),
    "fsync": ((5,), Op.FSYNC),
    "fallocate": ((5, 0, 0, 4096), Op.FALLOCATE),
    "timeout": ((1.0,), Op.TIMEOUT),
    "link_timeout": ((1.0,), Op.LINK_TIMEOUT),
    "cancel": ((7,), Op.ASYNC_CANCEL),
    "uring_cmd": ((5, 1), Op.URING_CMD),
    "fused_cmd": ((5, 1), Op.FUSED_CMD),
}


def test_prep_helpers_set_the_opcode_of_their_entry() -> None:
    for name, (args, op) in PREPS.items():
        s = Sqe()
        getattr(s, f"prep_{name}")(*args)
        assert s.opcode == op and s.opcode in OPDEFS, name
        if name == "fused_cmd":
            assert s.uring_cmd_flags == UringCmdFlag.FUSED_BUF and s.nr_secondary == 1
    prep_names = {n[5:] for n in dir(Sqe) if n.startswith("prep_")}
    assert prep_names == set(PREPS), "a prep helper without a test entry"


# ---- kernel numbers ---------------------------------------------------------------------


def test_opcodes_match_the_kernel_header() -> None:
    kernel = _enum(_header_text(), "io_uring_op")
    assert kernel["IORING_OP_NOP"] == 0
    checked = 0
    for op in Op:
        name = f"IORING_OP_{op.name}"
        if name in kernel:
            assert int(op) == kernel[name], name
            checked += 1
    assert checked == len(Op) - 1  # every member but FUSED_CMD (never merged)
    assert "IORING_OP_FUSED_CMD" not in kernel


def test_fused_cmd_number_is_above_the_kernel_range() -> None:
    """SPEC §1: FUSED_CMD takes a number above the kernel's range and below 255."""
    kernel = _enum(_header_text(), "io_uring_op")
    assert kernel["IORING_OP_LAST"] < Op.FUSED_CMD < 255
    assert int(Op.FUSED_CMD) not in kernel.values()
    assert 255 not in {int(op) for op in Op}


def test_flag_bits_match_the_kernel_header() -> None:
    text = _header_text()
    bits = _enum(text, "io_uring_sqe_flags_bit") if "io_uring_sqe_flags_bit" in text else {}
    defines = _shift_defines(text, bits)
    checks: list[tuple[str, int]] = [
        *((f"IOSQE_{f.name}", int(f)) for f in SqeFlag),
        *((f"IORING_CQE_F_{f.name}", int(f)) for f in CqeFlag if f),
        *((f"IORING_SETUP_{f.name}", int(f)) for f in SetupFlag if f),
        *((f"IORING_FEAT_{f.name}", int(f)) for f in Feature),
        ("IORING_URING_CMD_FIXED", int(UringCmdFlag.FIXED)),
        ("IORING_FSYNC_DATASYNC", IORING_FSYNC_DATASYNC),
        ("IORING_ASYNC_CANCEL_ALL", IORING_ASYNC_CANCEL_ALL),
    ]
    found = 0
    for name, value in checks:
        if name in defines:
            assert defines[name] == value, name
            found += 1
    assert found >= len(SqeFlag) + 4  # the header has at least the old, stable bits
    # SPEC §1: the SQE flag values are fixed.
    assert [int(f) for f in SqeFlag] == [1 << i for i in range(7)]


def test_core_rejects_a_flag_bit_the_kernel_does_not_define() -> None:
    """SPEC R3: any SQE flag bit beyond the seven is -EINVAL."""
    core, port = make_core(flags=FUSED)
    sqe(core, 1, "nop", flags=1 << 7)
    core.submit()
    assert port.pairs() == [(1, EINVAL)]
    port.assert_quiet()
