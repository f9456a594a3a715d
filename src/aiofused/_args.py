"""Command-line helpers shared by ``aiofused`` and its plugin subcommands.

One parser per kind of value, so every option takes the same spelling and every bad
value is refused the same way, at start-up, in one line that names it and says what
is expected:

* :func:`parse_size` (``4096``, ``64K``, ``1.5M``, ``2GiB``: binary K, M, G, T);
* :func:`parse_host_port` (``HOST:PORT``, ``[V6]:PORT``; the port 0-65535);
* ``type=`` callables for argparse (:func:`size_arg`, :func:`int_arg`,
  :func:`host_port_arg`, :func:`log_level_arg`) that raise
  :class:`argparse.ArgumentTypeError` with that message;
* :class:`ArgumentParser`: ``--help`` shows every option's default, and an error is
  one line, ``PROG: error: MESSAGE`` on stderr, exit status 2 (usage);
* :class:`CommandError`: a handler raises it for a failure at run time (a backend the
  kernel refuses, an address in use); ``aiofused`` prints it in one line and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = [
    "LOG_LEVELS",
    "ArgumentParser",
    "CommandError",
    "HelpFormatter",
    "host_port_arg",
    "int_arg",
    "log_level_arg",
    "parse_host_port",
    "parse_size",
    "size_arg",
]

#: What ``--log-level`` takes (any case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SIZE_HELP = "a number of bytes, optionally with a K, M, G or T suffix (binary: 64K = 65536)"


class CommandError(Exception):
    """A command failed at run time: ``aiofused`` prints ``PROG: error: MESSAGE``, exit 1."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536: a byte count with an optional binary K, M, G or T suffix
    (``B``/``iB`` may follow: ``4MiB``).  Raises ``ValueError`` naming ``text``."""
    m = _SIZE.fullmatch(str(text))
    if m is None:
        raise ValueError(f"invalid size {text!r}: expected {SIZE_HELP}")
    number, unit = m.group(1), m.group(2).lower()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_host_port(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``; ``"[::1]:80"``, ``":80"``
    (``default_host``).  Raises ``ValueError`` naming ``text``."""
    host, sep, port = str(text).rpartition(":")
    if not sep or (host and ":" in host and not host.startswith("[")):
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT (no port given)")
    if not port.isdigit():
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT, port {port!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: port {port} is not in 0-65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"invalid address {text!r}: unbalanced brackets")
    return host.strip("[]") or default_host, int(port)


def _named(f: Callable[[str], object], name: str) -> None:
    f.__name__ = name  # argparse names the type in a ValueError message


def size_arg(
    minimum: int = 0, maximum: int | None = None, power_of_two: bool = False
) -> Callable[[str], int]:
    """An argparse ``type=``: :func:`parse_size`, then range and power-of-two checks."""

    def convert(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if power_of_two and (value <= 0 or value & (value - 1)):
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected a power of two"
                + (f" between {minimum} and {maximum}" if maximum is not None else "")
            )
        if value < minimum or (maximum is not None and value > maximum):
            top = f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected at least {minimum}{top}"
            )
        return value

    _named(convert, "size")
    return convert


def int_arg(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an integer within ``[minimum, maximum]``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected an integer"
            ) from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            if maximum is None:
                want = f"at least {minimum}"
            elif minimum is None:
                want = f"at most {maximum}"
            else:
                want = f"{minimum}-{maximum}"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {want}")
        return value

    _named(convert, "integer")
    return convert


def host_port_arg(text: str) -> tuple[str, int]:
    """An argparse ``type=``: :func:`parse_host_port`."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level_arg(text: str) -> str:
    """An argparse ``type=``: one of :data:`LOG_LEVELS`, any case."""
    level = text.strip().lower()
    if level not in LOG_LEVELS or level.upper() not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(
            f"invalid log level {text!r}: expected one of {', '.join(LOG_LEVELS)}"
        )
    return level


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default, descriptions and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help  # nothing worth showing
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """:class:`HelpFormatter` by default; an error is one line on stderr, exit 2.

    Sub-parsers made from it (``add_subparsers().add_parser``) are of this class too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
