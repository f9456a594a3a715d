"""The ``aiofused`` command (also ``python -m aiofused``).

``aiofused info`` (version, loop, backends and why not, drivers) is the runtime's own.
Every other subcommand comes from a plugin through the ``aiofused.commands``
entry-point group (:data:`COMMANDS_ENTRY_POINT_GROUP`); the in-tree ones are ``demo``
(the fused fan-out against a link chain, then the zero-copy proxy showcase), ``proxy``
(the mirroring TCP proxy) and ``nbd serve`` (block devices over NBD)::

    [project.entry-points."aiofused.commands"]
    proxy = "aiofused_drivers.relay.proxy:add_parser"

The contract of such an entry point:

* Its name is the subcommand's name.  It loads a callable ``add_parser(subparsers)``
  that registers that one subcommand on the argparse sub-parsers action it is given
  (``subparsers.add_parser(name, help=...)``) and sets its handler with
  ``set_defaults(func=handler)``; the return value is ignored (the in-tree hooks
  return the new parser).
* ``handler(args: argparse.Namespace) -> int`` returns the exit status.  The options
  before the subcommand are in ``args`` too (``log_level``, ``log_format``), and
  :func:`configure_logging` has been called with them before the handler runs.
* Subcommands are added after ``info``, sorted by name (so ``aiofused --help``
  lists them the same on every install); a name already taken (``info``, or the same
  name from a distribution earlier on ``sys.path``) is skipped.
* ``subparsers.add_parser`` makes an :class:`aiofused.driver.ArgumentParser`: its
  ``--help`` shows each option's default, and a bad value is one line on stderr with
  exit status 2.  Values are parsed with the shared ``type=`` helpers of
  :mod:`aiofused.driver` (``size_arg``, ``int_arg``, ``host_port_arg``,
  ``log_level_arg``), so every command spells them the same.
* A failure at run time is one line on stderr and exit status 1: the handler raises
  :class:`aiofused.driver.CommandError` (or lets :class:`aiofused.BackendUnavailable`
  or an ``OSError`` out of start-up), and ``aiofused`` prints ``aiofused NAME: error:
  MESSAGE``.
* A plugin that fails to load or to register does not take the command down: its
  subcommand is still listed, and running it prints why it is unavailable on stderr
  and exits 1.

The runtime imports no plugin: this module only knows the group.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from aiofused import CORE, CORE_REASON, BackendUnavailable, __version__
from aiofused._args import ArgumentParser, CommandError, log_level_arg
from aiofused._loop import run_on_loop
from aiofused.driver import configure_logging

if TYPE_CHECKING:
    from aiofused.backend import ProbeResult

__all__ = ["COMMANDS_ENTRY_POINT_GROUP", "build_parser", "main", "run_on_loop"]

#: The entry-point group of plugin subcommands (see the module docstring).
COMMANDS_ENTRY_POINT_GROUP = "aiofused.commands"


# ---- info ----------------------------------------------------------------------


def _uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _loop_line(kind: str) -> str:
    """What ``--loop kind`` runs on, and why (the ``loop`` line of ``info``)."""
    installed = _uvloop_installed()
    if kind == "uvloop" and not installed:
        raise CommandError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    if kind == "asyncio":
        return "asyncio (--loop asyncio" + ("; uvloop installed too)" if installed else ")")
    return "uvloop" if installed else "asyncio (uvloop not installed)"


def _auto_line(probes: Sequence[ProbeResult]) -> str:
    """What ``backend="auto"`` picks here, and why: the rule of
    :func:`aiofused.backend.select_backend` (``AIOFUSED_BACKEND`` first, then uring
    when the kernel takes it, else asyncio)."""
    found = {p.name: p for p in probes}
    env = os.environ.get("AIOFUSED_BACKEND", "") or "auto"
    if env != "auto":
        probe = found.get(env)
        if probe is None:
            valid = ", ".join((*found, "auto"))
            return f"error (AIOFUSED_BACKEND={env!r} is not a backend: expected one of {valid})"
        if not probe.available:
            return f"{env} (AIOFUSED_BACKEND={env}), unavailable: {probe.reason}"
        return f"{env} (AIOFUSED_BACKEND={env})"
    uring = found.get("uring")
    if uring is not None and uring.available:
        return "uring"
    return "asyncio (uring unavailable)"


def _cmd_info(args: argparse.Namespace) -> int:
    from aiofused._abi import pin
    from aiofused._runtime.ring import CQE_TWIN
    from aiofused.backend import available_backends
    from aiofused.driver import available_drivers

    loop = _loop_line(args.loop)
    print(f"aiofused {__version__}")
    print(f"python   {sys.version.split()[0]}")
    print(f"loop     {loop}")
    print(f"core     {CORE} ({CORE_REASON})")
    print(f"sqe pin  {pin.IMPL} ({pin.REASON})")
    print(f"cqe      {CQE_TWIN[0]} ({CQE_TWIN[1]})")
    print("backends:")
    probes = available_backends()
    for probe in probes:
        state = "available" if probe.available else f"unavailable: {probe.reason}"
        print(f"  {probe.name:8} {state}")
        if probe.available and probe.ops:
            ops = ", ".join(sorted(op.name for op in probe.ops))
            print(f"           opcodes: {ops}")
    print(f"auto     -> {_auto_line(probes)}")
    print(f"drivers  {', '.join(available_drivers()) or 'none'}")
    return 0


# ---- plugin commands -----------------------------------------------------------


def command_entry_points() -> list[EntryPoint]:
    """The ``aiofused.commands`` entry points, in the order they are added (by name)."""
    return sorted(entry_points(group=COMMANDS_ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        sys.stderr.write(f"aiofused {name}: unavailable: {reason}\n")
        return 1

    return handler


def _add_plugin_commands(sub: Any) -> None:
    for ep in command_entry_points():
        if ep.name in sub.choices:
            continue
        try:
            ep.load()(sub)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc} (entry point {ep.value})"
            # Takes any arguments (no option prefix): running it only reports ``reason``.
            kw: dict[str, Any] = {"add_help": False, "prefix_chars": "\0"}
            if ep.name in sub.choices:  # registered, then broke: replace its parser
                parser = sub.choices[ep.name] = argparse.ArgumentParser(
                    prog=f"aiofused {ep.name}", **kw
                )
            else:
                parser = sub.add_parser(ep.name, help=f"unavailable: {reason}", **kw)
            parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
            parser.set_defaults(func=_unavailable(ep.name, reason))


# ---- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``aiofused`` argument parser: ``info`` and every plugin subcommand."""
    parser = ArgumentParser(
        prog="aiofused", description="Fused I/O for asyncio: ring, drivers, proxy, NBD."
    )
    parser.add_argument("--version", action="version", version=f"aiofused {__version__}")
    parser.add_argument(
        "--log-level", type=log_level_arg, default="warning", help="debug, info, warning, ..."
    )
    parser.add_argument(
        "--log-format", choices=("console", "json"), default="console", help="log line format"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, loop, backends (and why not), drivers")
    info.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop"
    )
    info.set_defaults(func=_cmd_info)

    _add_plugin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiofused`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    prog = " ".join(["aiofused", args.command, *filter(None, [getattr(args, "nbd_command", "")])])
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except CommandError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return exc.status
    except BackendUnavailable as exc:
        sys.stderr.write(f"{prog}: error: {exc} (try --backend auto or asyncio)\n")
        return 1
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
