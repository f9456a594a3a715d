"""``aiofused`` subcommands from the ``aiofused.commands`` entry-point group."""

from __future__ import annotations

import argparse
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from aiofused import cli


def test_in_tree_commands_come_from_entry_points() -> None:
    """demo, nbd and proxy are entry points of the group, added after info, by name."""
    names = [ep.name for ep in cli.command_entry_points()]
    assert {"demo", "nbd", "proxy"} <= set(names)
    assert names == sorted(names)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices)[:4] == ["info", "demo", "nbd", "proxy"]


def _fake_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eps: list[tuple[str, str]]
) -> None:
    (tmp_path / "fake_commands.py").write_text(
        textwrap.dedent(
            """
            def add_parser(subparsers):
                p = subparsers.add_parser("hello", help="say hello")
                p.add_argument("--who", default="world")
                p.set_defaults(func=lambda args: print(f"hello {args.who}") or 7)
                return p

            def half(subparsers):
                subparsers.add_parser("half", help="registers, then breaks")
                raise RuntimeError("broken after registering")

            def info(subparsers):
                raise AssertionError("info is the runtime's own")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_commands", raising=False)
    fake = [EntryPoint(name, value, cli.COMMANDS_ENTRY_POINT_GROUP) for name, value in eps]
    monkeypatch.setattr(cli, "command_entry_points", lambda: fake)


def test_plugin_command_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loaded ``add_parser`` registers its subcommand; main returns the handler's status."""
    _fake_group(monkeypatch, tmp_path, [("hello", "fake_commands:add_parser")])
    assert cli.main(["hello", "--who", "plugins"]) == 7
    assert capsys.readouterr().out == "hello plugins\n"


def test_taken_names_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``info`` stays the runtime's own; a second entry point of a taken name is not loaded."""
    _fake_group(
        monkeypatch,
        tmp_path,
        [("info", "fake_commands:info"), ("hello", "fake_commands:add_parser")] * 2,
    )
    parser = cli.build_parser()
    assert parser.parse_args(["info"]).func is cli._cmd_info


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("gone", "no_such_module_for_aiofused:add_parser", "ModuleNotFoundError"),
        ("hello", "fake_commands:no_such_hook", "AttributeError"),
        ("half", "fake_commands:half", "RuntimeError: broken after registering"),
    ],
)
def test_broken_plugin_is_listed_and_reports_why(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    why: str,
) -> None:
    """A plugin that fails to load or register leaves ``info`` working; running its
    command prints the reason on stderr and exits 1, whatever the arguments."""
    _fake_group(monkeypatch, tmp_path, [(name, value)])
    assert cli.main(["info"]) == 0
    capsys.readouterr()
    assert cli.main([name, "--anything", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"aiofused {name}: unavailable: ") and why in err
    assert value in err
