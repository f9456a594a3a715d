"""NBD server benchmark: aiofused (ublk ``loop`` target) vs ``nbdkit file`` vs ``qemu-nbd``.

Same page-cached backing file, unix socket, servers interleaved within each repetition,
median of ``--reps``.  Workloads: ``fio --ioengine=nbd`` 4 KiB randread/randwrite at
iodepth 1 and 32 (one job = one connection), and ``nbdcopy`` of ``--size`` in (file ->
export) and out (export -> ``null:``).

Each fio workload reports IOPS and the **server's CPU time per request**: the utime +
stime deltas (``/proc/PID/stat``, every thread; summed over the server's process tree, so
``--workers`` children count) around the fio run, divided by the requests fio completed.
``aiofused`` is one process (``nbd serve --workers 1``), the one the CPU target is about;
``aiofused-mp`` runs ``--workers`` = the CPU count, the one the IOPS target is about.

    python benchmarks/nbd.py                   # 1 GiB, 3 reps, all servers
    python benchmarks/nbd.py --size 256M --reps 1 --runtime 2

Targets (issue 10): 4 KiB randread/randwrite QD32 CPU per request <= 1.0x nbdkit's (one
worker), IOPS >= 1.0x nbdkit (workers = CPUs); QD1 latency <= 1.2x nbdkit's; nbdcopy in
and out >= 1.0x nbdkit.  Every external command runs under a timeout; servers are stopped
by pid.
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
    if name.startswith("aiofused"):
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

    def cpu_seconds(self) -> float:
        """utime + stime of the server and its descendants (each with all its threads)."""
        total = 0.0
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total


CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {r.stderr[-1000:]}")
    return r.stdout


def fio(uri: str, rw: str, qd: int, size: int, runtime: float) -> tuple[float, int, float]:
    """IOPS, requests completed, mean completion latency in us."""
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
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ],
        timeout=runtime + 60,
    )
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    return float(side["iops"]), int(side["total_ios"]), float(side["clat_ns"]["mean"]) / 1000


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
    ap.add_argument("--servers", default="aiofused,aiofused-mp,nbdkit,qemu-nbd")
    ap.add_argument("--workloads", default=",".join(w for w, _ in WORKLOADS))
    ap.add_argument(
        "--aiofused-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="`nbd serve --workers` of aiofused-mp (default: the CPU count)",
    )
    ap.add_argument("--aiofused-args", default="", help="extra args for `nbd serve`")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write results to this file")
    args = ap.parse_args()

    servers = [s for s in args.servers.split(",") if s]
    tools = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd"}
    for tool in ["fio", "nbdcopy", *(tools[s] for s in servers if s in tools)]:
        if shutil.which(tool) is None:
            print(f"missing tool: {tool} (apt-get install fio libnbd-bin nbdkit qemu-utils)")
            return 2
    size = parse_size(args.size)
    workloads = [w for w in args.workloads.split(",") if w]
    own = shlex.split(args.aiofused_args)
    extra = {
        "aiofused": ["--workers", "1", *own],
        "aiofused-mp": ["--workers", str(args.aiofused_workers), *own],
    }
    own_dir = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="nbdbench", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    src, disk = os.path.join(workdir, "src.img"), os.path.join(workdir, "disk.img")
    print(f"# preparing {size // MiB} MiB of random data in {workdir}", flush=True)
    make_file(src, size)
    shutil.copyfile(src, disk)

    # results[server][workload][metric] -> one value per repetition
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {w: {} for w in workloads} for s in servers
    }

    def fio_job(rw: str, qd: int) -> Callable[[Server], dict[str, float]]:
        def job(srv: Server) -> dict[str, float]:
            cpu0 = srv.cpu_seconds()
            iops, ios, lat = fio(srv.uri, rw, qd, size, args.runtime)
            cpu = srv.cpu_seconds() - cpu0
            return {"value": iops, "cpu_us": cpu * 1e6 / max(ios, 1), "lat_us": lat}

        return job

    def copy_job(inbound: bool) -> Callable[[Server], dict[str, float]]:
        def job(srv: Server) -> dict[str, float]:
            mib_s = nbdcopy(src, srv.uri, size) if inbound else nbdcopy(srv.uri, "null:", size)
            return {"value": mib_s}

        return job

    jobs: dict[str, Callable[[Server], dict[str, float]]] = {
        "randread-qd1": fio_job("randread", 1),
        "randread-qd32": fio_job("randread", 32),
        "randwrite-qd1": fio_job("randwrite", 1),
        "randwrite-qd32": fio_job("randwrite", 32),
        "nbdcopy-in": copy_job(True),
        "nbdcopy-out": copy_job(False),
    }
    try:
        for rep in range(args.reps):
            # Interleaved: every server once per repetition, in a rotated order.
            for name in servers[rep % len(servers) :] + servers[: rep % len(servers)]:
                srv = Server(name, disk, workdir, extra.get(name, []))
                try:
                    for w in workloads:
                        got = jobs[w](srv)
                        for k, v in got.items():
                            results[name][w].setdefault(k, []).append(v)
                        cpu = f"  {got['cpu_us']:7.1f} CPU us/req" if "cpu_us" in got else ""
                        line = f"rep {rep + 1} {name:11} {w:15} {got['value']:12,.0f}{cpu}"
                        print(line, flush=True)
                finally:
                    srv.stop()
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {
        s: {w: {k: statistics.median(v) for k, v in m.items()} for w, m in r.items() if m}
        for s, r in results.items()
    }
    print()
    print("| workload | unit | " + " | ".join(servers) + " |")
    print("|" + "---|" * (2 + len(servers)))
    for w, unit in WORKLOADS:
        if w not in workloads:
            continue
        cells = [f"{med[s][w]['value']:,.0f}" for s in servers]
        print(f"| {w} | {unit} | " + " | ".join(cells) + " |")
        if w.startswith("rand"):
            cells = [f"{med[s][w]['cpu_us']:.1f}" for s in servers]
            print(f"| {w} | server CPU us/req | " + " | ".join(cells) + " |")
    print(
        f"\nmedian of {args.reps} rep(s), {size // MiB} MiB, fio runtime {args.runtime}s; "
        f"aiofused: nbd serve {shlex.join(extra['aiofused'])}, "
        f"aiofused-mp: nbd serve {shlex.join(extra['aiofused-mp'])}"
    )
    checks: list[tuple[str, float, float, bool]] = []  # label, ratio, goal, lower is better
    one, mp, kit = med.get("aiofused"), med.get("aiofused-mp"), med.get("nbdkit")
    if kit is not None:
        for w in ("randread-qd32", "randwrite-qd32"):
            if one is not None and w in one:
                ratio = one[w]["cpu_us"] / kit[w]["cpu_us"]
                checks.append((f"{w} CPU/req <= 1.0x nbdkit (1 worker)", ratio, 1.0, True))
            if mp is not None and w in mp:
                ratio = mp[w]["value"] / kit[w]["value"]
                checks.append((f"{w} IOPS >= 1.0x nbdkit (workers)", ratio, 1.0, False))
        for w in ("randread-qd1", "randwrite-qd1"):
            if one is not None and w in one:
                ratio = one[w]["lat_us"] / kit[w]["lat_us"]
                checks.append((f"{w} latency <= 1.2x nbdkit", ratio, 1.2, True))
        for w in ("nbdcopy-in", "nbdcopy-out"):
            best = mp if mp is not None else one
            if best is not None and w in best:
                ratio = best[w]["value"] / kit[w]["value"]
                checks.append((f"{w} >= 1.0x nbdkit", ratio, 1.0, False))
    for label, ratio, goal, lower in checks:
        ok = ratio <= goal if lower else ratio >= goal
        print(f"target {label}: {ratio:.2f}x {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": med, "runs": results, "size": size}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
