"""``aiofused demo``: the fused fan-out against a link chain, then the zero-copy proxy.

The ``demo`` entry point of the ``aiofused.commands`` group (see :mod:`aiofused.cli`)
is :func:`add_parser`.  The work is in :mod:`.fanout` and :mod:`.showcase`, imported
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiofused.backend import get_backend_class
from aiofused.driver import CommandError, configure_logging, run_on_loop, size_arg

from ._progress import Bar

__all__ = ["add_parser", "run"]


async def _demo_fanout(ns: Sequence[int], backend: str, rounds: int, quick: bool) -> list[Any]:
    from .fanout import compare_fanout

    results = []
    out = sys.stdout
    print("1:N fan-out: one buffer sent to N slow readers (each starts reading 20 ms after")
    print("its first byte). Fused: one primary, N concurrent SEND secondaries on the lent")
    print("buffer. Chain: the same N SENDs as an IO_LINK chain. Gather: plain asyncio.\n")
    total = len(ns)
    with Bar(out, "fan-out", total, plain_step=1) as bar:
        for i, n in enumerate(ns):
            bar.update(i, f"{i}/{total}", description=f"fan-out N={n}")
            res = await compare_fanout(
                n,
                rounds=rounds,
                backend=backend,
                chunk=128 * 1024 if quick else 256 * 1024,
            )
            results.append(res)
        bar.finish(f"{total}/{total}", description="fan-out done")
    out.write("\n")
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


def run(args: argparse.Namespace) -> int:
    """Handler of ``demo``: returns the exit status."""
    configure_logging(args.log_level, "console")
    if args.backend == "uring":
        probe = get_backend_class("uring").probe()
        if not probe.available:
            raise CommandError(
                f"--backend uring: io_uring unavailable here ({probe.reason}); "
                "use --backend auto or asyncio"
            )
    ns = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    start = time.perf_counter()

    async def demo() -> None:
        await _demo_fanout(ns, args.backend, 2 if args.quick else 3, args.quick)
        if args.no_proxy:
            return
        from .showcase import run_proxy_showcase

        size = args.size if args.size else (32 if args.quick else 256) * 1024 * 1024
        await run_proxy_showcase(size, mirrors=1, backend=args.backend)

    run_on_loop(demo(), args.loop)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on an argparse subparsers object (``args.func(args)`` runs it)."""
    demo: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="fused fan-out vs link chain, then the zero-copy proxy"
    )
    demo.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    demo.add_argument(
        "--backend", choices=("auto", "uring", "asyncio"), default="auto", help="ring backend"
    )
    demo.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop"
    )
    demo.add_argument(
        "--size",
        type=size_arg(1),
        default=None,
        metavar="SIZE",
        help="bytes through the proxy (default: 256M, 32M with --quick)",
    )
    demo.add_argument("--no-proxy", action="store_true", help="only the fan-out part")
    demo.set_defaults(func=run)
    return demo
