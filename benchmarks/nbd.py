"""NBD server benchmark: aiofused (ublk ``loop`` target) vs ``nbdkit file`` vs ``qemu-nbd``.

Same backing file, unix socket, servers interleaved within each repetition, median of
``--reps``.  Workloads: ``fio --ioengine=nbd`` 4 KiB randread/randwrite at iodepth 1
and 32 (one job = one connection), and ``nbdcopy`` of ``--size`` in (file -> export)
and out (export -> ``null:``).

    python benchmarks/nbd.py                   # 1 GiB, 3 reps, all servers
    python benchmarks/nbd.py --size 256M --reps 1 --runtime 2
    python benchmarks/nbd.py --aiofused-workers 1    # one process (default: CPU count)

Targets (issue): at iodepth 32 >= 1.0x qemu-nbd and >= 0.8x nbdkit; nbdcopy >= 1.5x
qemu-nbd.  Every external command runs under a timeout; servers are stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

MiB = 1 << 20
WORKLOADS = [
    ("randread-qd1", "IOPS"),
    ("randread-qd32", "IOPS"),
    ("randwrite-qd1", "IOPS"),
    ("randwrite-qd32", "IOPS"),
    ("nbdcopy-in", "MiB/s"),
    ("nbdcopy-out", "MiB/s"),
]


def parse_size(text: str) -> int:
    text = text.upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def server_argv(name: str, disk: str, sock: str, extra: list[str]) -> list[str]:
    if name == "aiofused":
        return [
            sys.executable,
            "-m",
            "aiofused_drivers.ublk.cli",
            "nbd",
            "serve",
            "--export",
            f"={'loop:' + disk}",
            "--socket",
            sock,
            "--log-level",
            "warning",
            *extra,
        ]
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", sock, "file", disk]
    if name == "qemu-nbd":
        return [
            "qemu-nbd",
            "-f",
            "raw",
            "-t",
            "-e",
            "8",
            "--cache=writeback",
            "--aio=threads",
            "--discard=unmap",
            "-k",
            sock,
            disk,
        ]
    raise ValueError(name)


class Server:
    def __init__(self, name: str, disk: str, workdir: str, extra: list[str]) -> None:
        self.sock = os.path.join(workdir, f"{name}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log = open(os.path.join(workdir, f"{name}.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            server_argv(name, disk, self.sock, extra),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start (see {self.log.name})")
            time.sleep(0.05)
        time.sleep(0.2)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {r.stderr[-1000:]}")
    return r.stdout


def fio(uri: str, rw: str, qd: int, size: int, runtime: float) -> float:
    out = run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            "--bs=4k",
            f"--iodepth={qd}",
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime}",
            "--ramp_time=0.5",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ],
        timeout=runtime + 60,
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["iops"])


def nbdcopy(src: str, dst: str, size: int) -> float:
    t = time.perf_counter()
    run(["nbdcopy", src, dst], timeout=600)
    return size / MiB / (time.perf_counter() - t)


def make_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="1G", help="disk and nbdcopy size (default 1G)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    ap.add_argument("--servers", default="aiofused,nbdkit,qemu-nbd")
    ap.add_argument("--workloads", default=",".join(w for w, _ in WORKLOADS))
    ap.add_argument(
        "--aiofused-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="`nbd serve --workers` (default: the CPU count; nbdkit and qemu-nbd use threads)",
    )
    ap.add_argument("--aiofused-args", default="", help="extra args for `nbd serve`")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write results to this file")
    args = ap.parse_args()

    servers = [s for s in args.servers.split(",") if s]
    tools = {"aiofused": "fio", "nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd"}
    for tool in ["fio", "nbdcopy", *(tools[s] for s in servers)]:
        if shutil.which(tool) is None:
            print(f"missing tool: {tool} (apt-get install fio libnbd-bin nbdkit qemu-utils)")
            return 2
    size = parse_size(args.size)
    workloads = [w for w in args.workloads.split(",") if w]
    extra = ["--workers", str(args.aiofused_workers), *shlex.split(args.aiofused_args)]
    own = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="nbdbench", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    src, disk = os.path.join(workdir, "src.img"), os.path.join(workdir, "disk.img")
    print(f"# preparing {size // MiB} MiB of random data in {workdir}", flush=True)
    make_file(src, size)
    shutil.copyfile(src, disk)

    results: dict[str, dict[str, list[float]]] = {s: {w: [] for w in workloads} for s in servers}
    jobs: dict[str, Callable[[str], float]] = {
        "randread-qd1": lambda u: fio(u, "randread", 1, size, args.runtime),
        "randread-qd32": lambda u: fio(u, "randread", 32, size, args.runtime),
        "randwrite-qd1": lambda u: fio(u, "randwrite", 1, size, args.runtime),
        "randwrite-qd32": lambda u: fio(u, "randwrite", 32, size, args.runtime),
        "nbdcopy-in": lambda u: nbdcopy(src, u, size),
        "nbdcopy-out": lambda u: nbdcopy(u, "null:", size),
    }
    try:
        for rep in range(args.reps):
            for name in servers:  # interleaved: every server once per repetition
                srv = Server(name, disk, workdir, extra if name == "aiofused" else [])
                try:
                    for w in workloads:
                        value = jobs[w](srv.uri)
                        results[name][w].append(value)
                        print(f"rep {rep + 1} {name:9} {w:15} {value:12,.0f}", flush=True)
                finally:
                    srv.stop()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {s: {w: statistics.median(v) for w, v in r.items() if v} for s, r in results.items()}
    print()
    head = "| workload | unit | " + " | ".join(servers)
    ratios = [s for s in ("qemu-nbd", "nbdkit") if s in servers and "aiofused" in servers]
    head += "".join(f" | aiofused / {s}" for s in ratios) + " |"
    print(head)
    print("|" + "---|" * (2 + len(servers) + len(ratios)))
    for w, unit in WORKLOADS:
        if w not in workloads:
            continue
        row = f"| {w} | {unit} | " + " | ".join(f"{med[s][w]:,.0f}" for s in servers)
        row += "".join(f" | {med['aiofused'][w] / med[s][w]:.2f}x" for s in ratios)
        print(row + " |")
    print(
        f"\nmedian of {args.reps} rep(s), {size // MiB} MiB, fio runtime {args.runtime}s, "
        f"aiofused: nbd serve {shlex.join(extra)}"
    )
    if "aiofused" in servers:
        checks = []
        a = med["aiofused"]
        for w in ("randread-qd32", "randwrite-qd32"):
            if w in a and "qemu-nbd" in med:
                checks.append((f"{w} >= 1.0x qemu-nbd", a[w] / med["qemu-nbd"][w], 1.0))
            if w in a and "nbdkit" in med:
                checks.append((f"{w} >= 0.8x nbdkit", a[w] / med["nbdkit"][w], 0.8))
        for w in ("nbdcopy-in", "nbdcopy-out"):
            if w in a and "qemu-nbd" in med:
                checks.append((f"{w} >= 1.5x qemu-nbd", a[w] / med["qemu-nbd"][w], 1.5))
        for label, ratio, goal in checks:
            print(f"target {label}: {ratio:.2f}x {'met' if ratio >= goal else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": med, "runs": results, "size": size}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
