"""A long differential run against the kernel (issue 12): generated batches on io_uring
(``tests/kdiff/executor.c`` on liburing) and on aiofused's backends, mismatches grouped
in classes, one minimized batch per class.

    python benchmarks/kdiff.py --batches 3000 --seed 7
    python benchmarks/kdiff.py --features all            # the open classes too
    python benchmarks/kdiff.py --features default,-skip,+async

Needs gcc and liburing-dev (Debian).  Exit status 1 if anything differs.  CI runs the
bounded version of the same (``tests/e2e/test_kernel_diff.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kdiff import harness


def _features(spec: str) -> frozenset[str]:
    out: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "default":
            out |= harness.DEFAULT_FEATURES
        elif part == "all":
            out |= harness.FEATURES
        elif part.startswith("-"):
            out.discard(part[1:])
        elif part:
            name = part.lstrip("+")
            if name not in harness.FEATURES:
                raise SystemExit(f"unknown feature {name!r}: {sorted(harness.FEATURES)}")
            out.add(name)
    return frozenset(out)


async def _run(args: argparse.Namespace, workdir: Path) -> int:
    kernel = harness.Kernel(workdir)
    features = _features(args.features)
    batches = harness.batches(args.seed, args.batches, features)
    t0 = time.monotonic()
    results = []
    for i in range(0, len(batches), 200):  # bounded executor runs
        results += kernel.run_stable(batches[i : i + 200])
    unstable = sum(r is None for r in results)
    print(f"kernel: {len(batches)} batches in {time.monotonic() - t0:.1f}s, {unstable} unstable")
    classes: collections.Counter[tuple[str, str]] = collections.Counter()
    first: dict[tuple[str, str], harness.Batch] = {}
    for backend in args.backends:
        t0 = time.monotonic()
        for b, k in zip(batches, results, strict=True):
            if k is None:
                continue
            m = harness.compare(b, k, await harness.run_aiofused(b, backend, workdir))
            for c in set(m.classes):
                classes[(backend, c)] += 1
                first.setdefault((backend, c), b)
        print(f"{backend}: {time.monotonic() - t0:.1f}s")
    if not classes:
        print("no mismatches")
        return 0
    print(f"\n{len(classes)} mismatch classes (batches, backend, class):")
    for (backend, c), n in classes.most_common():
        print(f"  {n:5d}  {backend:8s} {c}")
    for (backend, c), _ in classes.most_common(args.show):
        b = first[(backend, c)]
        small = await harness.shrink(kernel, b, backend, workdir, c)
        m = await harness.check(kernel, small, backend, workdir)
        print(f"\n=== {backend}: {c}  (seed {b.seed}, minimized)")
        print(small.describe())
        print("\n".join(m.lines) if m else "(did not reproduce)")
    return 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--features", default="default", help="default|all, then +name/-name")
    p.add_argument("--backends", nargs="+", default=["asyncio", "uring"])
    p.add_argument("--show", type=int, default=10, help="classes to minimize and print")
    args = p.parse_args()
    reason = harness.unavailable_reason()
    if reason:
        print(f"kdiff: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kdiff-") as tmp:
        return asyncio.run(_run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
