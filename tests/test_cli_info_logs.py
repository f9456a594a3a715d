"""``aiofused info`` says what it really picks, and the global ``--log-level`` /
``--log-format`` reach the servers (issue 13, item 5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from aiofused import cli
from aiofused.backend import available_backends


def info(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiofused", "info", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )


def line(out: str, key: str) -> str:
    (found,) = [ln for ln in out.splitlines() if ln.startswith(key)]
    return found


# ---- info: auto and the loop -------------------------------------------------------


@pytest.mark.parametrize("name", ["asyncio", "uring"])
def test_info_auto_names_the_aiofused_backend_override(name: str) -> None:
    p = info(AIOFUSED_BACKEND=name)
    assert p.returncode == 0, p.stderr
    auto = line(p.stdout, "auto")
    assert auto.startswith(f"auto     -> {name} (AIOFUSED_BACKEND={name})"), auto


def test_info_auto_without_override_is_what_select_backend_picks() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIOFUSED_BACKEND"}
    p = subprocess.run(
        [sys.executable, "-m", "aiofused", "info"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    uring = {b.name: b for b in available_backends()}["uring"]
    want = "uring" if uring.available else "asyncio (uring unavailable)"
    assert line(p.stdout, "auto") == f"auto     -> {want}", p.stdout


@pytest.mark.parametrize("no_ext", ["", "1"])
def test_info_names_the_sqe_pin_that_runs(no_ext: str) -> None:
    import importlib.util

    p = info(AIOFUSED_NO_EXTENSIONS=no_ext)
    assert p.returncode == 0, p.stderr
    got = line(p.stdout, "sqe pin")
    if no_ext:
        assert got == "sqe pin  python (AIOFUSED_NO_EXTENSIONS is set)", got
    elif importlib.util.find_spec("aiofused._abi._pin") is not None:  # built: it runs
        assert got == "sqe pin  c (aiofused._abi._pin)", got
    else:
        assert got == "sqe pin  python (the C twin is not built)", got
    got = line(p.stdout, "cqe")
    if no_ext:
        assert got == "cqe      python (AIOFUSED_NO_EXTENSIONS is set)", got
    elif importlib.util.find_spec("aiofused._abi._cqe") is not None:
        assert got == "cqe      c (aiofused._abi._cqe)", got
    else:
        assert got == "cqe      python (the C twin is not built)", got


def test_info_auto_with_a_bad_override_says_so() -> None:
    p = info(AIOFUSED_BACKEND="bogus")
    assert p.returncode == 0, p.stderr
    auto = line(p.stdout, "auto")
    assert "AIOFUSED_BACKEND='bogus'" in auto and "uring, asyncio" in auto, auto


def test_info_loop_asyncio_does_not_claim_uvloop_is_missing() -> None:
    pytest.importorskip("uvloop")
    p = info("--loop", "asyncio")
    assert p.returncode == 0, p.stderr
    loop = line(p.stdout, "loop")
    assert "not installed" not in loop, loop
    assert loop == "loop     asyncio (--loop asyncio; uvloop installed too)"
    assert line(info().stdout, "loop") == "loop     uvloop"


def test_info_loop_without_uvloop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert cli.main(["info"]) == 0
    assert line(capsys.readouterr().out, "loop") == "loop     asyncio (uvloop not installed)"
    assert cli.main(["info", "--loop", "asyncio"]) == 0
    assert line(capsys.readouterr().out, "loop") == "loop     asyncio (--loop asyncio)"
    assert cli.main(["info", "--loop", "uvloop"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "aiofused info: error: --loop uvloop: uvloop is not installed (pip install uvloop)\n"
    )


# ---- the global log options, honoured by the servers -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(kind: str, workers: int, port: int, *globals_: str) -> subprocess.Popen[str]:
    if kind == "nbd":
        cmd = ["nbd", "serve", "--export", "d=null:1M", "--listen", f"127.0.0.1:{port}"]
    else:
        cmd = ["proxy", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{_free_port()}"]
    return subprocess.Popen(
        [sys.executable, "-m", "aiofused", *globals_, *cmd, "--workers", str(workers)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _connect_once(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                time.sleep(0.3)  # let the server see it (and log it)
                c.close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server never listened"
            time.sleep(0.05)
    time.sleep(0.3)


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)  # the parent only, as `kill -INT PID`
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["nbd", "proxy"])
def test_global_log_format_json_and_level_debug_reach_the_server(kind: str, workers: int) -> None:
    port = _free_port()
    proc = _server(kind, workers, port, "--log-format", "json", "--log-level", "debug")
    _connect_once(port, proc)
    code, err = _stop(proc)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    records = []
    for ln in lines:
        try:
            records.append(json.loads(ln))
        except ValueError:
            pytest.fail(f"not a JSON log line: {ln!r}\n{err}")
    events = {r["event"] for r in records}
    levels = {r["level"] for r in records}
    listening = "nbd.listening" if kind == "nbd" else "proxy_listening"
    assert listening in events, events
    assert "info" in levels, levels
    if kind == "proxy" or workers > 1:  # a debug event every run has (connection_open,
        assert "debug" in levels, events  # nbd.dispatched)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["nbd", "proxy"])
def test_global_log_level_error_silences_the_servers_info_lines(kind: str) -> None:
    port = _free_port()
    proc = _server(kind, 1, port, "--log-level", "error")
    _connect_once(port, proc)
    code, err = _stop(proc)
    assert code == 0, err
    assert err == "", err
