"""Public surface (SPEC §1 names), the op table, the fused state table, driver plugins,
backend selection and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ECANCELED, add, reap

import aiofused
from aiofused import (
    EIOCBQUEUED,
    BackendUnavailable,
    BufDir,
    Driver,
    DriverError,
    Op,
    Ring,
    SetupFlag,
    SqeFlag,
)
from aiofused._core.opdef import OPDEFS
from aiofused._core.records import FUSED_TRANSITIONS as TRANSITIONS
from aiofused._core.records import FusedState as State
from aiofused.backend import BACKENDS, get_backend_class, select_backend

SPEC_NAMES = [
    "Ring",
    "Sqe",
    "Cqe",
    "Op",
    "SqeFlag",
    "SetupFlag",
    "Feature",
    "CqeFlag",
    "UringCmdFlag",
    "BufDir",
    "Driver",
    "UringCmd",
    "DriverFile",
    "EIOCBQUEUED",
]


def test_public_names_exist_and_are_exported() -> None:
    """SPEC §1: every name exists and ``__all__`` lists exactly what the package defines."""
    for name in SPEC_NAMES:
        assert name in aiofused.__all__, name
    for name in aiofused.__all__:
        assert hasattr(aiofused, name), name


def test_enum_values_are_the_kernels() -> None:
    """SPEC §1: kernel numbers; FUSED_CMD above the kernel's range and below 255."""
    assert (SqeFlag.FIXED_FILE, SqeFlag.IO_DRAIN, SqeFlag.IO_LINK, SqeFlag.IO_HARDLINK) == (
        1,
        2,
        4,
        8,
    )
    assert (SqeFlag.ASYNC, SqeFlag.BUFFER_SELECT, SqeFlag.CQE_SKIP_SUCCESS) == (16, 32, 64)
    assert (Op.NOP, Op.READ, Op.WRITE, Op.SEND, Op.RECV, Op.URING_CMD, Op.SEND_ZC) == (
        0,
        22,
        23,
        26,
        27,
        46,
        47,
    )
    assert (Op.TIMEOUT, Op.ASYNC_CANCEL, Op.LINK_TIMEOUT, Op.FSYNC) == (11, 14, 15, 3)
    assert Op.SEND_ZC < Op.FUSED_CMD < 255
    assert EIOCBQUEUED == -529
    assert (BufDir.SRC, BufDir.DEST) == (0, 1)


def test_op_table_is_complete() -> None:
    """STYLE: one op table; every fused secondary has a direction (V6 opdef)."""
    secondaries = {op for op, d in OPDEFS.items() if d.fused_secondary}
    assert secondaries == {Op.READ, Op.WRITE, Op.SEND, Op.RECV, Op.SEND_ZC}
    assert {op: OPDEFS[op].buf_dir for op in secondaries} == {
        Op.READ: BufDir.DEST,
        Op.RECV: BufDir.DEST,
        Op.WRITE: BufDir.SRC,
        Op.SEND: BufDir.SRC,
        Op.SEND_ZC: BufDir.SRC,
    }


def test_fused_state_table_reaches_done_from_everywhere() -> None:
    """The fused lifecycle: every state but DONE has an edge; DONE has none."""
    sources = {s for s, _ in TRANSITIONS}
    assert sources == set(State) - {State.DONE}
    reach = {State.DONE}
    changed = True
    while changed:
        changed = False
        for (src, _), dst in TRANSITIONS.items():
            if dst in reach and src not in reach:
                reach.add(src)
                changed = True
    assert reach == set(State)


async def test_driver_plugins_through_entry_points(ring: Ring) -> None:
    """Plugins load by entry-point name; unknown names and non-drivers are typed errors."""
    assert {"null", "relay", "ublk"} <= set(aiofused.available_drivers())
    df = ring.open_driver("null", size=128)
    assert isinstance(df.driver, Driver)
    with pytest.raises(DriverError):
        ring.open_driver("no-such-driver")
    with pytest.raises(TypeError):
        ring.register_driver(object())  # type: ignore[arg-type]
    ring.unregister_driver(df)
    add(ring, 1, "uring_cmd", df, 0)
    ring.submit()
    assert await reap(ring, 1) == [(1, -9)]


async def test_third_party_driver_protocol(ring: Ring, data_file: tuple[int, bytes]) -> None:
    """Any object with name/can_fused/uring_cmd is a driver (no base class needed)."""

    class Tiny:
        name = "tiny"
        can_fused = True

        def __init__(self) -> None:
            self.buf = bytearray(64)

        def uring_cmd(self, cmd: aiofused.UringCmd, issue_flags: int) -> int:
            cmd.provide_buf_and_start(self.buf, lambda c: c.done(sum(c.secondary_results)))
            return EIOCBQUEUED

    fd, content = data_file
    df = ring.register_driver(Tiny())
    async with ring.fused(df, 0) as lease:
        await lease.read(fd, 0, 0, 64)
    assert lease.result == 64
    assert bytes(df.driver.buf) == content[:64]  # type: ignore[attr-defined]


async def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend=`` names are checked; AIOFUSED_BACKEND overrides auto; uring raises
    a typed error with the probe's reason where the kernel refuses."""
    assert BACKENDS == ("uring", "asyncio")
    with pytest.raises(LookupError):
        get_backend_class("nope")
    import asyncio

    loop = asyncio.get_running_loop()
    monkeypatch.setenv("AIOFUSED_BACKEND", "asyncio")
    assert select_backend("auto", loop).name == "asyncio"
    async with Ring(4) as r:
        assert r.backend == "asyncio"
    monkeypatch.delenv("AIOFUSED_BACKEND")
    probe = get_backend_class("uring").probe()
    if not probe.available:
        with pytest.raises(BackendUnavailable) as info:
            Ring(4, backend="uring")
        assert probe.reason in str(info.value)
        async with Ring(4) as r:
            assert r.backend == "asyncio"


async def test_close_is_idempotent_and_refuses_new_work() -> None:
    """After close, get_sqe/submit raise RingClosedError; close twice is fine."""
    r = Ring(4, flags=SetupFlag.FUSED_REQ, backend="asyncio")
    await r.close()
    await r.close()
    with pytest.raises(aiofused.RingClosedError):
        r.get_sqe()
    assert r.closed and ECANCELED < 0


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "aiofused", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_cli_info() -> None:
    """``aiofused info``: version, loop, each backend with its state, drivers."""
    p = _run_cli("info")
    assert p.returncode == 0, p.stderr
    assert f"aiofused {aiofused.__version__}" in p.stdout
    assert "uring" in p.stdout and "asyncio" in p.stdout
    assert "null" in p.stdout


def test_cli_demo_fanout_quick() -> None:
    """``aiofused demo --quick --no-proxy``: the fan-out table, fused beats the chain."""
    p = _run_cli("demo", "--quick", "--no-proxy", "--loop", "asyncio")
    assert p.returncode == 0, p.stderr
    rows = [
        line.split() for line in p.stdout.splitlines() if line.strip()[:2] in ("1 ", "4 ", "16")
    ]
    table = {int(r[0]): r for r in rows if len(r) == 6}
    assert set(table) == {1, 4, 16}, p.stdout
    assert float(table[16][4].rstrip("x")) > 4  # chain/fused speed-up


async def test_ring_falls_back_when_the_kernel_refuses(
    monkeypatch: pytest.MonkeyPatch, data_file: tuple[int, bytes]
) -> None:
    """Seccomp-style refusal (io_uring_setup -> EPERM): auto runs on asyncio with the same
    results; backend="uring" raises BackendUnavailable naming the reason."""
    import errno as errno_mod

    from aiofused.backends import _uring

    def refuse(entries: int, params: object) -> int:
        raise OSError(errno_mod.EPERM, "Operation not permitted")

    monkeypatch.setattr(_uring, "setup_syscall", refuse)
    monkeypatch.delenv("AIOFUSED_BACKEND", raising=False)
    _uring.reset_probe_cache()
    try:
        with pytest.raises(BackendUnavailable) as info:
            Ring(4, backend="uring")
        assert "EPERM" in info.value.reason
        fd, content = data_file
        async with Ring(8, flags=SetupFlag.FUSED_REQ) as r:
            assert r.backend == "asyncio"
            buf = bytearray(64)
            add(r, 1, "read", fd, buf, 64, 0)
            r.submit()
            assert await reap(r, 1) == [(1, 64)]
            assert bytes(buf) == content[:64]
    finally:
        _uring.reset_probe_cache()
