"""The ``aiofused`` command (also ``python -m aiofused``).

Subcommands: ``info`` (version, loop, backends and why not, drivers), ``demo`` (the
fused fan-out against a link chain, then the zero-copy proxy showcase), ``proxy``
(the mirroring TCP proxy) and ``nbd serve`` (block devices over NBD).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from aiofused import __version__
from aiofused._log import configure_logging

__all__ = ["main", "run_on_loop"]

T = TypeVar("T")


def loop_name(kind: str = "auto") -> str:
    """The loop ``kind`` resolves to: ``"uvloop"`` when asked for (or auto and installed)."""
    if kind == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if kind == "uvloop":
            raise SystemExit("uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def run_on_loop(coro: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """Run ``coro`` on uvloop when installed (or asked for), else the default loop."""
    if loop_name(kind) == "uvloop":
        import uvloop

        result: T = uvloop.run(coro)
        return result
    return asyncio.run(coro)


# ---- info ----------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from aiofused._driver import available_drivers
    from aiofused.backends import available_backends

    loop = loop_name(args.loop)
    print(f"aiofused {__version__}")
    print(f"python   {sys.version.split()[0]}")
    print(f"loop     {loop}" + ("" if loop == "uvloop" else " (uvloop not installed)"))
    print("backends:")
    chosen = None
    for probe in available_backends():
        if probe.available and chosen is None:
            chosen = probe.name
        state = "available" if probe.available else f"unavailable: {probe.reason}"
        print(f"  {probe.name:8} {state}")
        if probe.available and probe.ops:
            ops = ", ".join(sorted(op.name for op in probe.ops))
            print(f"           opcodes: {ops}")
    print(f"auto     -> {chosen}")
    print(f"drivers  {', '.join(available_drivers()) or 'none'}")
    return 0


# ---- demo ----------------------------------------------------------------------


def _bar(label: str, done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / total) if total else width
    return f"\r  {label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


async def _demo_fanout(ns: Sequence[int], backend: str, rounds: int, quick: bool) -> list[Any]:
    from aiofused_drivers.demo.fanout import compare_fanout

    results = []
    out = sys.stdout
    print("1:N fan-out: one buffer sent to N slow readers (each starts reading 20 ms after")
    print("its first byte). Fused: one primary, N concurrent SEND secondaries on the lent")
    print("buffer. Chain: the same N SENDs as an IO_LINK chain. Gather: plain asyncio.\n")
    total = len(ns)
    for i, n in enumerate(ns):
        out.write(_bar(f"N={n}", i, total))
        out.flush()
        res = await compare_fanout(
            n,
            rounds=rounds,
            backend=backend,
            chunk=128 * 1024 if quick else 256 * 1024,
        )
        results.append(res)
    out.write(_bar("fan-out done", total, total) + "\n\n")
    print(
        f"  {'N':>3} {'fused ms':>9} {'chain ms':>9} {'gather ms':>10} {'chain/fused':>12}"
        f" {'fused/gather':>13}"
    )
    for r in results:
        print(
            f"  {r.n:>3} {r.fused * 1e3:>9.1f} {r.chain * 1e3:>9.1f} {r.gather * 1e3:>10.1f}"
            f" {r.chain_speedup:>11.1f}x {r.fused_vs_gather:>12.2f}x"
        )
    print(f"  (backend: {results[0].backend if results else backend})\n")
    return results


def _cmd_demo(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, "console")
    ns = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    start = time.perf_counter()

    async def run() -> None:
        await _demo_fanout(ns, args.backend, 2 if args.quick else 3, args.quick)
        if args.no_proxy:
            return
        from aiofused_drivers.demo.showcase import run_proxy_showcase

        size = args.size if args.size else (32 if args.quick else 256) * 1024 * 1024
        await run_proxy_showcase(size, mirrors=1, backend=args.backend)

    run_on_loop(run(), args.loop)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


# ---- parser --------------------------------------------------------------------


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    """The ``aiofused`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="aiofused", description="Fused I/O for asyncio: ring, drivers, proxy, NBD."
    )
    parser.add_argument("--version", action="version", version=f"aiofused {__version__}")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, loop, backends (and why not), drivers")
    info.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="fused fan-out vs link chain, then the zero-copy proxy")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    demo.add_argument("--backend", choices=("auto", "uring", "asyncio"), default="auto")
    demo.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    demo.add_argument("--size", type=_size, default=0, help="bytes through the proxy")
    demo.add_argument("--no-proxy", action="store_true", help="only the fan-out part")
    demo.set_defaults(func=_cmd_demo)

    try:
        from aiofused_drivers.relay.proxy import add_parser as add_proxy
    except ImportError:  # pragma: no cover - optional part
        pass
    else:
        add_proxy(sub)
    try:
        from aiofused_drivers.ublk.cli import add_parser as add_nbd
    except ImportError:  # pragma: no cover - drivers not installed
        pass
    else:
        add_nbd(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiofused`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
