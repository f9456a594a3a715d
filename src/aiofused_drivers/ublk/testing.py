"""Test helpers for the ublk/NBD suite: an in-process server, real clients in
subprocesses (never blocking the loop the server runs on), skips with reasons."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ._nbdproto import IHAVEOPT, NBDMAGIC, REQUEST_MAGIC
from ._service import BlockService, ExportSpec, parse_export
from ._targets import Target

__all__ = [
    "ClientResult",
    "RawClient",
    "missing_tools",
    "run_client",
    "serve",
    "settle",
    "short_tmpdir",
    "uri",
]


#: The Debian package of each tool the interop tests drive.
DEBIAN_PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "fio": "fio",
    "nbdkit": "nbdkit",
    "fusermount3": "fuse3",
    "losetup": "mount",
    "mount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
}


def missing_tools(*tools: str) -> str | None:
    """A skip reason naming the tools that are not installed and the Debian packages
    that have them, or ``None``."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = dict.fromkeys(DEBIAN_PACKAGES.get(t, t) for t in missing)
        return f"not installed: {', '.join(missing)} (apt-get install {' '.join(packages)})"
    return None


@contextlib.contextmanager
def short_tmpdir() -> Any:
    """A short directory under /tmp (unix socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="nbd", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def uri(sock_path: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock_path}"


@dataclasses.dataclass
class ClientResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> ClientResult:
        if self.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.argv)} exited {self.returncode}\n"
                f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"
            )
        return self


async def run_client(*argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> ClientResult:
    """Run a client without blocking the loop; kill it after ``timeout`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"{' '.join(argv)} timed out after {timeout}s\n{err.decode(errors='replace')[-2000:]}"
        ) from None
    return ClientResult(
        list(argv), proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )


@dataclasses.dataclass
class Served:
    service: BlockService
    sock_path: str

    def uri(self, export: str = "") -> str:
        return uri(self.sock_path, export)


@contextlib.asynccontextmanager
async def serve(
    exports: Sequence[str | ExportSpec] = (),
    *,
    targets: Sequence[tuple[str, Target, bool]] = (),
    backend: str | None = None,
    **kw: Any,
) -> AsyncIterator[Served]:
    """Run a :class:`BlockService` on a fresh unix socket for the duration of the block."""
    specs = [parse_export(e) if isinstance(e, str) else e for e in exports]
    be = backend or os.environ.get("AIOFUSED_BACKEND", "auto")
    with short_tmpdir() as d:
        path = os.path.join(d, "s.sock")
        async with BlockService(specs, targets=targets, backend=be, **kw) as svc:
            svc.serve(svc.nbd.bind_unix(path))
            yield Served(svc, path)


async def settle(svc: BlockService, timeout: float = 5.0) -> dict[str, int]:
    """Wait (bounded) until nothing is in flight, lent or connected; return the counters."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    leaks = svc.leaks()
    while any(leaks.values()) and loop.time() < deadline:
        await asyncio.sleep(0.02)
        leaks = svc.leaks()
    return leaks


class RawClient:
    """A hand-driven NBD client over a unix socket, for protocol-abuse tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        r, w = await asyncio.open_unix_connection(path)
        return cls(r, w)

    async def greeting(self) -> int:
        data = await asyncio.wait_for(self.reader.readexactly(18), 5)
        magic, opt, flags = struct.unpack(">QQH", data)
        assert magic == NBDMAGIC and opt == IHAVEOPT
        return int(flags)

    async def go(self, name: str = "", structured: bool = False) -> tuple[int, int]:
        """Fixed newstyle + NO_ZEROES, optional STRUCTURED_REPLY, then GO."""
        await self.greeting()
        self.writer.write(struct.pack(">I", 3))
        if structured:
            self.option(8, b"")
            typ, _ = await self.option_reply()
            assert typ == 1
        raw = name.encode()
        self.option(7, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3))
        size = flags = 0
        while True:
            typ, data = await self.option_reply()
            if typ == 1:
                return size, flags
            if typ == 3 and struct.unpack_from(">H", data)[0] == 0:
                _, size, flags = struct.unpack(">HQH", data)
            elif typ & (1 << 31):
                raise OSError(f"GO failed with reply {typ:#x}")

    def option(self, opt: int, data: bytes) -> None:
        self.writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    async def option_reply(self) -> tuple[int, bytes]:
        hdr = await asyncio.wait_for(self.reader.readexactly(20), 5)
        _, _, typ, length = struct.unpack(">QIII", hdr)
        data = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return typ, data

    def request(
        self, typ: int, offset: int, length: int, cookie: int, flags: int = 0, payload: bytes = b""
    ) -> None:
        self.writer.write(
            struct.pack(">IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length) + payload
        )

    async def simple_reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data) of one simple reply."""
        hdr = await asyncio.wait_for(self.reader.readexactly(16), 10)
        magic, error, cookie = struct.unpack(">IIQ", hdr)
        assert magic == 0x67446698, hex(magic)
        data = b""
        if error == 0 and data_len:
            data = await asyncio.wait_for(self.reader.readexactly(data_len), 10)
        return error, cookie, data

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the server closed the connection (after discarding anything sent)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
