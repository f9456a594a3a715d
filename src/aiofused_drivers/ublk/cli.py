"""``aiofused nbd serve``: serve ublk-style block devices to NBD clients.

The ``nbd`` entry point of the ``aiofused.commands`` group (see :mod:`aiofused.cli`)
is :func:`add_parser`: it registers ``nbd`` (with ``serve``) and sets ``func=run``.

``python -m aiofused_drivers.ublk.cli nbd serve ...`` works on its own too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from aiofused.backend import get_backend_class
from aiofused.driver import (
    ArgumentParser,
    CommandError,
    configure_logging,
    get_logger,
    host_port_arg,
    int_arg,
    log_level_arg,
    parse_host_port,
    parse_size,
    size_arg,
)

from ._dispatch import Dispatcher
from ._nbd import NbdServer
from ._service import BlockService, ExportSpec, parse_export
from ._targets import _split_args

__all__ = ["add_parser", "main", "run"]

log = get_logger(__name__)

#: The IANA port of NBD, what nbdkit and qemu-nbd listen on when given no port.
NBD_PORT = 10809


def listen_arg(text: str) -> tuple[str, int]:
    """An argparse ``type=`` for ``--listen``: ``HOST:PORT``, or ``HOST`` alone (also
    ``[::1]`` or a bare IPv6 address) for the NBD port, 10809."""
    text = str(text)
    bare = text.startswith("[") and text.endswith("]")
    if bare or ":" not in text or (text.count(":") > 1 and not text.startswith("[")):
        host = text[1:-1] if bare else text
        if not host or any(c in host for c in "[]/ "):
            raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST[:PORT]")
        return host, NBD_PORT
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("HOST:PORT", "HOST[:PORT]")) from None


listen_arg.__name__ = "address"

EPILOG = """\
targets:
  null:SIZE | null:size=SIZE            zeroes in, writes discarded
  loop:PATH[,size=SIZE]                 one backing file
  mirror:PATH,PATH[,...][,state=DB][,region=SIZE]
                                        RAID-1 over N files; replica state (event
                                        counts, write-intent bitmap of SIZE regions,
                                        default 16M) in DB, default PATH.mirror.db
                                        of the first file
  linear:DB,pv=FILE[,pv=FILE...][,size=SIZE][,extent=SIZE]
                                        extents mapped in an SQLite table (created
                                        on first use, read back afterwards)
  ,ro after any of them                 that export is read-only: NBD_FLAG_READ_ONLY,
                                        writes, trims and zeroes answered EPERM
                                        (a file named ro: ./ro)
examples:
  aiofused nbd serve --export disk=loop:disk.img --socket /tmp/nbd.sock
  nbdinfo 'nbd+unix:///disk?socket=/tmp/nbd.sock'
  aiofused nbd serve -e disk=loop:disk.img -e golden=loop:base.img,ro --listen 0.0.0.0
  nbdinfo nbd://localhost/golden                # port 10809, read-only
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``nbd serve`` on an argparse subparsers object; returns the ``nbd`` parser."""
    nbd: argparse.ArgumentParser = subparsers.add_parser(
        "nbd", help="serve ublk-style block devices over NBD"
    )
    nbd_sub = nbd.add_subparsers(dest="nbd_command", required=True)
    serve = nbd_sub.add_parser("serve", help="serve exports to NBD clients", epilog=EPILOG)
    serve.add_argument(
        "--export",
        "-e",
        action="append",
        required=True,
        metavar="NAME=TARGET:ARGS[,ro]",
        help="an export (repeat for several; the first is the default export); "
        "ro among ARGS makes it read-only",
    )
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", "-U", metavar="PATH", help="listen on a unix socket")
    where.add_argument(
        "--listen",
        "-l",
        metavar="HOST[:PORT]",
        type=listen_arg,
        help=f"listen on TCP (port {NBD_PORT} if none is given; HOST:0 picks a free one)",
    )
    serve.add_argument(
        "--read-only",
        "-r",
        action="store_true",
        help="all exports read-only (one export: NAME=TARGET:ARGS,ro)",
    )
    serve.add_argument(
        "--workers",
        "-w",
        type=int_arg(1),
        default=1,
        help="worker processes (any target: mirror and linear share their SQLite state)",
    )
    serve.add_argument(
        "--backend", default="auto", choices=("auto", "uring", "asyncio"), help="ring backend"
    )
    serve.add_argument("--queue-depth", type=int_arg(1, 4096), default=128, help="tags per queue")
    serve.add_argument(
        "--queues", type=int_arg(1, 64), default=1, help="hardware queues per device"
    )
    serve.add_argument(
        "--block-size",
        type=size_arg(512, 4096, power_of_two=True),
        default="512",
        metavar="SIZE",
        help="minimum block size advertised (a power of two, 512-4096)",
    )
    serve.add_argument(
        "--pool-buffers",
        type=int_arg(0),
        default=256,
        help="request buffers in the ring's registered pool (0: none)",
    )
    serve.add_argument(
        "--pool-buffer-size",
        type=size_arg(1),
        default="256K",
        metavar="SIZE",
        help="size of one pool buffer; bigger requests use unregistered buffers",
    )
    serve.add_argument(
        "--socket-buffer",
        type=size_arg(0),
        default="4M",
        metavar="SIZE",
        help="SO_SNDBUF/SO_RCVBUF per connection, capped by net.core.[wr]mem_max (0: default)",
    )
    serve.add_argument(
        "--connection-memory",
        type=size_arg(1 << 20),
        default="64M",
        metavar="SIZE",
        help="request buffers and unsent replies one client may hold; its requests are "
        "not read beyond that until it reads its replies",
    )
    serve.add_argument(
        "--buffer-memory",
        type=size_arg(32 << 20),
        default="1G",
        metavar="SIZE",
        help="request buffer memory of a worker beyond the pool (at least 32M, the "
        "largest request); clients wait when it is in use",
    )
    serve.add_argument(
        "--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="event loop"
    )
    serve.add_argument(
        "--metrics",
        type=host_port_arg,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs --workers 1)",
    )
    # dest of their own: the options given before the subcommand are not overwritten.
    serve.add_argument(
        "--log-level",
        dest="nbd_log_level",
        type=log_level_arg,
        default=None,
        help="default: the global --log-level if given, else info",
    )
    serve.add_argument(
        "--log-format",
        dest="nbd_log_format",
        choices=("console", "json"),
        default=None,
        help="default: the global --log-format",
    )
    serve.set_defaults(func=run)
    return nbd


def _where(args: argparse.Namespace, listener: socket.socket | None = None) -> str:
    """The address, as logged; with the bound ``listener``, its real port (port 0
    asks the kernel for one)."""
    if args.socket:
        return f"unix:{args.socket}"
    host, port = args.listen
    if listener is not None:
        port = listener.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(args: argparse.Namespace) -> socket.socket:
    """The listening socket; a failure names the address (exit status 1)."""
    where = _where(args)
    if args.socket:
        parent = os.path.dirname(os.path.abspath(args.socket))
        if not os.path.isdir(parent):
            raise CommandError(f"cannot listen on {where}: directory {parent} does not exist")
    try:
        if args.socket:
            return NbdServer.bind_unix(args.socket)
        return NbdServer.bind_tcp(*args.listen)
    except OSError as e:
        raise CommandError(f"cannot listen on {where}: {e.strerror or e}") from None


_KINDS = ("null", "loop", "mirror", "linear")


def check_export(spec: ExportSpec) -> None:
    """Refuse an export whose target spec cannot work, before anything starts:
    ``ValueError`` naming the export and the bad part."""
    kind, _, rest = spec.target.partition(":")
    what = f"export {spec.name or '(default)'!r} ({spec.target!r})"
    if kind not in _KINDS:
        raise ValueError(f"{what}: unknown target {kind!r}, expected one of {', '.join(_KINDS)}")
    pos, named = _split_args(rest)
    sizes = [*named.get("size", []), *named.get("extent", []), *named.get("region", [])]
    if kind == "null":
        sizes += pos[:1]
    for text in sizes:
        try:
            parse_size(text)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if kind in ("loop", "mirror"):
        paths = (named.get("path", []) + pos) if kind == "loop" else pos + named.get("replica", [])
        if not paths:
            raise ValueError(
                f"{what}: expected {kind}:PATH" + (",PATH" if kind == "mirror" else "")
            )
        if kind == "mirror" and len(paths) < 2:
            raise ValueError(f"{what}: a mirror needs at least two files")
        for path in paths:
            if not os.path.exists(path):
                raise ValueError(f"{what}: {path}: no such file")
    dbs = []
    if kind == "mirror":
        dbs = named.get("state", [])[-1:] or [f"{(pos + named.get('replica', []))[0]}.mirror.db"]
    elif kind == "linear":
        dbs = (named.get("db", []) or pos)[:1]
    for db in dbs:
        parent = os.path.dirname(os.path.abspath(db))
        if not os.path.isdir(parent):
            raise ValueError(f"{what}: {db}: directory {parent} does not exist")


def check_backend(name: str) -> None:
    """``--backend uring`` where the kernel refuses it: :class:`CommandError` (exit 1)."""
    if name != "uring":
        return
    probe = get_backend_class(name).probe()
    if not probe.available:
        raise CommandError(
            f"--backend uring: io_uring unavailable here ({probe.reason}); "
            "use --backend auto or asyncio"
        )


def run(args: argparse.Namespace) -> int:
    """Handler of ``nbd serve``: returns the exit status."""
    fmt = args.nbd_log_format or getattr(args, "log_format", "console")
    level = args.nbd_log_level or getattr(args, "log_level", "warning")
    if args.nbd_log_level is None and level == "warning":
        level = "info"  # a server logs its life at info unless told otherwise
    args.log_level, args.log_format = level, fmt
    configure_logging(level, fmt)
    try:
        specs = [parse_export(e, args.read_only) for e in args.export]
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"--export: duplicate export name {spec.name!r}")
            seen.add(spec.name)
    except ValueError as e:
        raise CommandError(str(e), status=2) from None
    if args.workers > 1 and getattr(args, "metrics", None) is not None:
        raise CommandError(
            f"--metrics with --workers {args.workers}: each worker counts on its own; "
            "use --workers 1",
            status=2,
        )
    try:
        for spec in specs:
            check_export(spec)
    except ValueError as e:
        raise CommandError(str(e), status=2) from None
    check_backend(args.backend)
    listener = _bind(args)
    where = _where(args, listener)
    if args.workers == 1:
        return _run_worker(listener, specs, args, where)
    return _prefork(listener, specs, args, where)


def _run_worker(
    source: socket.socket,
    specs: Sequence[ExportSpec],
    args: argparse.Namespace,
    where: str,
    passed: bool = False,
) -> int:
    """Run one server process on a listening socket, or (``passed``) on the channel a
    dispatching parent hands connections over."""
    use_uvloop = args.loop == "uvloop"
    if args.loop == "auto":
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            use_uvloop = False
    coro = _serve(source, specs, args, where, passed)
    try:
        if use_uvloop:
            import uvloop

            return int(uvloop.run(coro))
        return asyncio.run(coro)
    except KeyboardInterrupt:
        return 0


async def _serve(
    source: socket.socket,
    specs: Sequence[ExportSpec],
    args: argparse.Namespace,
    where: str,
    passed: bool,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second signal while shutting down: give up at once
            log.warning("nbd.forced_exit")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        service = BlockService(
            specs,
            backend=args.backend,
            queue_depth=args.queue_depth,
            nr_queues=args.queues,
            block_size=args.block_size,
            pool_buffers=args.pool_buffers,
            pool_buffer_size=args.pool_buffer_size,
            socket_buffer=args.socket_buffer,
            max_connection_bytes=args.connection_memory,
            buffer_memory=args.buffer_memory,
        )
        async with service:
            metrics = None
            if getattr(args, "metrics", None) is not None:
                from aiofused_drivers._metrics import MetricsServer

                host, port = args.metrics
                metrics = MetricsServer(host, port, service.metric_families)
                await metrics.start()
            if passed:
                service.serve_channel(source)
            else:
                service.serve(source)
            log.info(
                "nbd.listening",
                address=where,
                exports=[s.name for s in specs],
                pid=os.getpid(),
                loop=type(loop).__module__.split(".")[0],
            )
            await stop.wait()
            log.info("nbd.shutting_down", connections=len(service.nbd.connections))
            if metrics is not None:
                await metrics.aclose()
    except (OSError, ValueError, sqlite3.Error) as e:
        log.error("nbd.start_failed", error=str(e))
        source.close()
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("nbd.stopped")
    return 0


def _die_with_parent() -> None:
    """Linux ``PR_SET_PDEATHSIG``: a worker gets SIGTERM if the parent dies."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        log.debug("nbd.pdeathsig_unavailable")


def _prefork(
    listener: socket.socket, specs: Sequence[ExportSpec], args: argparse.Namespace, where: str
) -> int:
    """Fork ``--workers`` processes; this process accepts and hands each connection to
    the least busy worker (:mod:`._dispatch`), forwards SIGTERM/SIGINT, and replaces a
    worker that dies.

    Each worker runs in a process group of its own: a Ctrl-C at the terminal reaches
    the parent only, which passes it on once (a worker that got it twice, from the
    terminal and from the parent, took the second as "give up at once")."""

    def spawn(close: Sequence[Any]) -> tuple[int, socket.socket]:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                with contextlib.suppress(OSError):
                    os.setpgid(0, 0)
                _die_with_parent()
                for obj in (listener, parent_end, *close):
                    if obj is not None:
                        with contextlib.suppress(OSError):
                            obj.close()
                code = _run_worker(child_end, specs, args, where, passed=True)
            finally:
                os._exit(code)
        child_end.close()
        return pid, parent_end

    children: list[int] = []
    channels: list[socket.socket] = []
    for _ in range(args.workers):
        pid, channel = spawn(channels)
        children.append(pid)
        channels.append(channel)
    log.info("nbd.dispatching", address=where, workers=children, pid=os.getpid())
    status = Dispatcher(listener, channels, children, spawn).run()
    if args.socket:
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m aiofused_drivers.ublk.cli nbd serve ...``."""
    parser = ArgumentParser(prog="aiofused")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as exc:
        sys.stderr.write(f"aiofused nbd serve: error: {exc}\n")
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
