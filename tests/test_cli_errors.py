"""CLI errors and input checks (issue 13, items 3, 4, 7, 11): one line naming the bad
value and what is expected, exit status 2 for usage errors and 1 at run time, checked
at start-up; one size parser everywhere; ``--help`` shows the defaults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aiofused import cli
from aiofused.backend import ProbeResult, get_backend_class
from aiofused.driver import parse_size, size_arg

ROOT = Path(__file__).resolve().parent.parent


def aiofused(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiofused", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(proc: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["proxy", "--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1"],
            ["--listen", "'127.0.0.1:99999'", "0-65535"],
        ),
        (
            ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:70000"],
            ["--upstream", "'127.0.0.1:70000'", "0-65535"],
        ),
        (  # a proxy needs the port; nbd serve defaults to 10809 (tests/drivers)
            ["proxy", "--listen", "127.0.0.1", "--upstream", "127.0.0.1:1"],
            ["--listen", "'127.0.0.1'", "HOST:PORT"],
        ),
        (
            ["nbd", "serve", "--listen", "127.0.0.1:abc", "--export", "a=null:1M"],
            ["--listen", "'127.0.0.1:abc'", "port 'abc'"],
        ),
        (
            ["nbd", "serve", "--listen", "127.0.0.1:99999", "--export", "a=null:1M"],
            ["'127.0.0.1:99999'", "0-65535"],
        ),
        (
            ["nbd", "serve", "-U", "/tmp/x.sock", "--export", "a=null:1M", "--block-size", "1000"],
            ["--block-size", "'1000'", "power of two"],
        ),
        (
            ["nbd", "serve", "-U", "/tmp/x.sock", "-e", "a=null:1M", "-e", "a=null:2M"],
            ["duplicate export name 'a'"],
        ),
        (
            ["nbd", "serve", "-U", "/tmp/x.sock", "--export", "a=null:1X"],
            ["'1X'", "K, M, G or T"],
        ),
        (
            [
                "nbd",
                "serve",
                "-U",
                "/tmp/x.sock",
                "--export",
                "a=null:1M",
                "--log-level",
                "verbose",
            ],
            ["'verbose'", "debug, info, warning"],
        ),
        (["--log-level", "verbose", "info"], ["'verbose'", "debug, info, warning"]),
        (["demo", "--size", "1X"], ["--size", "'1X'"]),
        (
            ["proxy", "--listen", ":0", "--upstream", ":1", "--buffer-size", "64k!"],
            ["--buffer-size", "'64k!'"],
        ),
        (["proxy", "--listen", ":0", "--upstream", ":1", "--workers", "0"], ["--workers", "'0'"]),
    ],
    ids=lambda v: "_".join(v)[:60] if isinstance(v, list) else None,
)
def test_a_usage_error_is_one_line_and_exit_2(args: list[str], needles: list[str]) -> None:
    one_line(aiofused(*args), 2, *needles)


def test_runtime_failures_name_the_address_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "nbd.sock"
    one_line(
        aiofused("nbd", "serve", "-U", str(missing), "--export", "a=null:1M"),
        1,
        str(missing.parent),
        "does not exist",
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        addr = f"127.0.0.1:{port}"
        one_line(
            aiofused("nbd", "serve", "--listen", addr, "--export", "a=null:1M"),
            1,
            addr,
            "in use",
        )
        # the proxy's listener is bound with SO_REUSEPORT, so an unrelated socket
        # bound without it is what conflicts
        one_line(
            aiofused("proxy", "--listen", addr, "--upstream", "127.0.0.1:1"), 1, addr, "in use"
        )
    one_line(
        aiofused("proxy", "--listen", f"unix:{missing}", "--upstream", "127.0.0.1:1"),
        2,
        str(missing.parent),
    )


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--quick", "--backend", "uring"],
        ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--backend", "uring"],
        ["nbd", "serve", "--listen", "127.0.0.1:0", "-e", "a=null:1M", "--backend", "uring"],
    ],
    ids=["demo", "proxy", "nbd"],
)
def test_a_refused_uring_backend_is_one_line_and_exit_1(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cls = get_backend_class("uring")
    refused = ProbeResult("uring", False, "io_uring_setup: EPERM (seccomp)")
    monkeypatch.setattr(cls, "probe", classmethod(lambda c: refused))
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--backend uring" in err and "EPERM (seccomp)" in err and "asyncio" in err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64k", 65536),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("1.5M", 3 << 19),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
        ("8mb", 8 << 20),
        (" 0 ", 0),
    ],
)
def test_one_size_parser(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1X", "-1", "K", "1.3", "64k!"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace(".", r"\.")):
        parse_size(text)


def test_sizes_take_the_same_suffixes_everywhere(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(200_000))
    dst = tmp_path / "dst"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "fanout_copy.py"),
            str(src),
            str(dst),
            "--chunk",
            "64k",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == src.read_bytes()
    assert size_arg(512, 4096, power_of_two=True)("4K") == 4096


@pytest.mark.parametrize(
    ("args", "defaults"),
    [
        (["--help"], ["(default: warning)", "(default: console)"]),
        (["info", "--help"], ["(default: auto)"]),
        (["demo", "--help"], ["(default: auto)"]),
        (
            ["proxy", "--help"],
            [
                "(default: 1M)",
                "(default: 8M)",
                "(default: 1024)",
                "(default: 300.0)",
                "(default: 10.0)",
                "(default: 0)",
            ],
        ),
        (
            ["nbd", "serve", "--help"],
            [
                "(default: 512)",
                "(default: 256K)",
                "(default: 4M)",
                "(default: 128)",
                "(default: 1)",
                "(default: auto)",
                "targets:\n  null:SIZE",
            ],
        ),
    ],
)
def test_help_shows_the_defaults(args: list[str], defaults: list[str]) -> None:
    proc = aiofused(*args)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    for d in defaults:
        assert (" ".join(d.split()) in flat) if "\n" not in d else (d in proc.stdout), (
            d,
            proc.stdout,
        )
