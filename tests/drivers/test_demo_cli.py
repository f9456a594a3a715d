"""``aiofused demo``: progress bars that degrade to plain lines off a terminal, and a
clean exit on Ctrl-C (issue 13, item 6)."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from aiofused_drivers.demo._progress import Bar

DEMO = [sys.executable, "-m", "aiofused", "demo", "--quick"]


def test_demo_output_off_a_terminal_is_plain_lines() -> None:
    p = subprocess.run(
        [*DEMO, "--size", "4M", "--loop", "asyncio"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stdout and "\x1b" not in p.stdout, repr(p.stdout)
    lines = p.stdout.splitlines()
    assert any(ln.split()[:4] == ["fan-out", "done", "100.0%", "3/3"] for ln in lines), lines
    assert any(ln.split()[:2] == ["proxy", "100.0%"] for ln in lines), lines
    assert "demo finished" in lines[-1]


def test_bar_plain_lines_each_step_and_the_end() -> None:
    out = io.StringIO()
    with Bar(out, "copy", 100, plain_step=25) as bar:
        for done in range(0, 100, 5):
            bar.update(done, f"{done} B")
        bar.finish("100 B")
    assert out.getvalue().splitlines() == [
        f"  {'copy':<22} {pct:5.1f}%  {pct:.0f} B" for pct in (0.0, 25.0, 50.0, 75.0, 100.0)
    ]


def test_bar_on_a_terminal_is_rich_and_ends_its_line() -> None:
    out = io.StringIO()
    with Bar(out, "copy", 100, plain_step=25, terminal=True) as bar:
        bar.update(50, "half")
        bar.finish("all")
    text = out.getvalue()
    assert "\x1b[" in text and "copy" in text and "100%" in text and "all" in text
    assert text.removesuffix("\x1b[?25h").endswith("\n")  # the line ended, cursor shown


def test_bar_interrupted_leaves_no_final_line() -> None:
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Bar(out, "copy", 100, plain_step=50) as bar:
        bar.update(10, "some")
        raise KeyboardInterrupt
    assert out.getvalue().splitlines() == [f"  {'copy':<22}  10.0%  some"]


def _session_members(sid: int) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session
            found.append(pid)
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "kill-int"])
def test_sigint_in_the_proxy_phase_exits_130_in_one_line(to_group: bool) -> None:
    """Ctrl-C (SIGINT to the process group, helper included) or ``kill -INT`` of the
    demo alone during the proxy transfer: status 130, ``aiofused demo: interrupted``
    and nothing else on stderr, and no process of the demo left."""
    proc = subprocess.Popen(
        [*DEMO, "--size", "64G"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"\n  proxy " not in seen:  # the transfer's first progress line
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([proc.stdout], [], [], 0.5)[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        time.sleep(0.5)
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.decode() == "aiofused demo: interrupted\n"
    assert b"\r" not in seen + out
    deadline = time.monotonic() + 5
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the demo left: {left}"
