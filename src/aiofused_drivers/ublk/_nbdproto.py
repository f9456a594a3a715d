"""NBD wire protocol, sans I/O: constants, the fixed-newstyle handshake, request framing.

Nothing here touches a socket.  :class:`Handshake` consumes the client's bytes and
produces the server's; :func:`parse_request` and the ``*_reply`` builders frame the
transmission phase.  The numbers and rules are those of the NBD protocol document
(``doc/proto.md`` of the NetworkBlockDevice project); all integers are big-endian.

Theory of operation: the handshake is a small state machine,
``CLIENT_FLAGS -> OPTIONS -> (TRANSMISSION | CLOSED)``.  Every option gets exactly one
final reply; an option the server does not implement gets ``NBD_REP_ERR_UNSUP`` and
parsing goes on.  Anything malformed (bad magic, unknown client flag, an option
longer than :data:`MAX_OPTION_LEN`) moves to ``CLOSED`` with a reason: the caller drops
that connection and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "MAX_OPTION_LEN",
    "MAX_PAYLOAD",
    "REQUEST_HEADER",
    "Cmd",
    "CmdFlag",
    "ExportInfo",
    "Handshake",
    "HandshakeState",
    "Request",
    "TxFlag",
    "block_status_reply",
    "nbd_error",
    "parse_request",
    "read_reply_header",
    "simple_reply",
    "structured_error_reply",
]

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
REPLY_MAGIC_OPT: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

#: Largest READ/WRITE payload accepted; bigger requests close the connection.
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: Largest option payload accepted during the handshake.
MAX_OPTION_LEN: Final = 64 * 1024

HS_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
HS_FLAG_NO_ZEROES: Final = 1 << 1
CLIENT_FLAGS_KNOWN: Final = HS_FLAG_FIXED_NEWSTYLE | HS_FLAG_NO_ZEROES

#: ``struct nbd_request``: magic, flags, type, cookie, offset, length.
REQUEST_HEADER: Final = struct.Struct(">IHHQQI")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_CHUNK: Final = struct.Struct(">IHHQI")
_OPT_HEADER: Final = struct.Struct(">QII")
_OPT_REPLY: Final = struct.Struct(">QIII")

BASE_ALLOCATION: Final = "base:allocation"
#: The one meta context this server offers.
BASE_ALLOCATION_ID: Final = 1


class Opt(enum.IntEnum):
    """``NBD_OPT_*``."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(enum.IntEnum):
    """``NBD_REP_*`` option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    """``NBD_INFO_*``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(enum.IntFlag):
    """Transmission flags (``NBD_FLAG_*``, per export)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    """``NBD_CMD_*``."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """``NBD_CMD_FLAG_*``."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ChunkType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE: Final = 1

#: errno values the protocol knows; anything else is sent as EIO.
_NBD_ERRNO: Final = {
    errno.EPERM: errno.EPERM,
    errno.EIO: errno.EIO,
    errno.ENOMEM: errno.ENOMEM,
    errno.EINVAL: errno.EINVAL,
    errno.ENOSPC: errno.ENOSPC,
    errno.EDQUOT: errno.ENOSPC,
    errno.EFBIG: errno.ENOSPC,
    errno.EOVERFLOW: errno.EOVERFLOW,
    errno.ENOTSUP: errno.ENOTSUP,
    errno.ESHUTDOWN: errno.ESHUTDOWN,
}


def nbd_error(err: int) -> int:
    """Map a (positive or negative) errno to the value NBD puts on the wire."""
    return _NBD_ERRNO.get(abs(err), errno.EIO)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: TxFlag
    description: str = ""
    min_block: int = 512
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD


@dataclasses.dataclass(slots=True)
class Request:
    """One parsed transmission request header."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class HandshakeState(enum.Enum):
    """Where a :class:`Handshake` is."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Handshake:
    """Server side of the fixed-newstyle handshake.

    ``lookup(name)`` returns the :class:`ExportInfo` of an export or ``None``;
    ``names`` lists the exports for ``NBD_OPT_LIST``.  Feed the client's bytes to
    :meth:`receive_data`, send what :meth:`data_to_send` returns, and look at
    :attr:`state`.  On ``TRANSMISSION``, :attr:`export`, :attr:`structured`,
    :attr:`meta_context` and :attr:`block_size_agreed` describe the session and
    :attr:`leftover` holds bytes the client already sent for the transmission phase.
    """

    def __init__(
        self,
        lookup: Callable[[str], ExportInfo | None],
        names: Callable[[], Sequence[str]],
    ) -> None:
        self._lookup = lookup
        self._names = names
        self._buf = bytearray()
        self._out: list[bytes] = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT, CLIENT_FLAGS_KNOWN)]
        self.state = HandshakeState.CLIENT_FLAGS
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        self.meta_context = False
        self.block_size_agreed = False
        self.export: ExportInfo | None = None
        self.close_reason = ""
        self.leftover = b""
        #: Option numbers in the order received (for logs and tests).
        self.options_seen: list[int] = []

    # ---- I/O boundary ---------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the server must send now (possibly empty)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Consume client bytes; advances :attr:`state`."""
        if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
            self.leftover += data
            return
        self._buf += data
        while self._step():
            pass

    def bytes_wanted(self) -> int:
        """A hint: how many more bytes the current message needs (at least 1)."""
        if self.state is HandshakeState.CLIENT_FLAGS:
            return max(1, 4 - len(self._buf))
        if len(self._buf) < _OPT_HEADER.size:
            return _OPT_HEADER.size - len(self._buf)
        _, _, length = _OPT_HEADER.unpack_from(self._buf)
        return max(1, _OPT_HEADER.size + int(length) - len(self._buf))

    # ---- state machine --------------------------------------------------------

    def _close(self, reason: str) -> bool:
        self.state = HandshakeState.CLOSED
        self.close_reason = reason
        self._buf.clear()
        return False

    def _step(self) -> bool:
        if self.state is HandshakeState.CLIENT_FLAGS:
            if len(self._buf) < 4:
                return False
            (flags,) = struct.unpack_from(">I", self._buf)
            del self._buf[:4]
            if flags & ~CLIENT_FLAGS_KNOWN:
                return self._close(f"unknown client flags {flags:#x}")
            self.fixed = bool(flags & HS_FLAG_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & HS_FLAG_NO_ZEROES)
            self.state = HandshakeState.OPTIONS
            return True
        if self.state is not HandshakeState.OPTIONS or len(self._buf) < _OPT_HEADER.size:
            return False
        magic, opt, length = _OPT_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            return self._close(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LEN:
            return self._close(f"option {opt} too long ({length} bytes)")
        end = _OPT_HEADER.size + length
        if len(self._buf) < end:
            return False
        data = bytes(self._buf[_OPT_HEADER.size : end])
        del self._buf[:end]
        self.options_seen.append(opt)
        self._option(opt, data)
        if self._transmitting():
            self.leftover = bytes(self._buf)
            self._buf.clear()
            return False
        return self.state is HandshakeState.OPTIONS

    def _transmitting(self) -> bool:
        return self.state is HandshakeState.TRANSMISSION

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rep, len(data)) + data)

    def _option(self, opt: int, data: bytes) -> None:
        if opt == Opt.EXPORT_NAME:
            info = self._lookup(data.decode("utf-8", "replace"))
            if info is None:
                self._close("unknown export in NBD_OPT_EXPORT_NAME")
                return
            self.export = info
            out = struct.pack(">QH", info.size, int(self._flags(info)))
            if not self.no_zeroes:
                out += bytes(124)
            self._out.append(out)
            self.state = HandshakeState.TRANSMISSION
        elif opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self._close("client sent NBD_OPT_ABORT")
        elif not self.fixed:
            # Plain newstyle: the server may only close on options it does not know.
            self._close(f"option {opt} without fixed newstyle")
        elif opt == Opt.LIST:
            if data:
                self._reply(opt, Rep.ERR_INVALID)
                return
            for name in self._names():
                raw = name.encode()
                self._reply(opt, Rep.SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(opt, Rep.ACK)
        elif opt in (Opt.INFO, Opt.GO):
            self._info_or_go(opt, data)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                self._reply(opt, Rep.ERR_INVALID)
                return
            self.structured = True
            self._reply(opt, Rep.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._reply(opt, Rep.ERR_UNSUP)

    def _flags(self, info: ExportInfo) -> TxFlag:
        flags = info.flags | TxFlag.HAS_FLAGS
        if self.structured:
            flags |= TxFlag.SEND_DF
        return flags

    def _info_or_go(self, opt: int, data: bytes) -> None:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen]
            if len(name) != nlen:
                raise ValueError("short name")
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError("bad length")
            wanted = struct.unpack_from(f">{nreq}H", data, 6 + nlen)
        except (struct.error, ValueError):
            self._reply(opt, Rep.ERR_INVALID)
            return
        info = self._lookup(name.decode("utf-8", "replace"))
        if info is None:
            self._reply(opt, Rep.ERR_UNKNOWN)
            return
        if Info.NAME in wanted:
            raw = info.name.encode()
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.NAME) + raw)
        if Info.DESCRIPTION in wanted and info.description:
            raw = info.description.encode()
            self._reply(opt, Rep.INFO, struct.pack(">H", Info.DESCRIPTION) + raw)
        self._reply(
            opt,
            Rep.INFO,
            struct.pack(
                ">HIII", Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block
            ),
        )
        self._reply(
            opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, info.size, int(self._flags(info)))
        )
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self.export = info
            self.block_size_agreed = Info.BLOCK_SIZE in wanted
            self.state = HandshakeState.TRANSMISSION

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._reply(opt, Rep.ERR_INVALID)
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4 : 4 + nlen]
            if len(name) != nlen:
                raise ValueError("short name")
            (nq,) = struct.unpack_from(">I", data, 4 + nlen)
            pos = 8 + nlen
            queries: list[str] = []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                q = data[pos + 4 : pos + 4 + qlen]
                if len(q) != qlen:
                    raise ValueError("short query")
                queries.append(q.decode("utf-8", "replace"))
                pos += 4 + qlen
            if pos != len(data):
                raise ValueError("trailing bytes")
        except (struct.error, ValueError):
            self._reply(opt, Rep.ERR_INVALID)
            return
        if self._lookup(name.decode("utf-8", "replace")) is None:
            self._reply(opt, Rep.ERR_UNKNOWN)
            return
        if opt == Opt.LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
            self.meta_context = match
        if match:
            raw = BASE_ALLOCATION.encode()
            self._reply(opt, Rep.META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID) + raw)
        self._reply(opt, Rep.ACK)


# ---- transmission phase -----------------------------------------------------------


def parse_request(buf: bytes | bytearray | memoryview, pos: int = 0) -> Request | None:
    """Parse a request header at ``pos``; ``None`` if the magic is wrong."""
    magic, flags, typ, cookie, offset, length = REQUEST_HEADER.unpack_from(buf, pos)
    if magic != REQUEST_MAGIC:
        return None
    return Request(flags, typ, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (``error`` is an NBD errno, 0 for success)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def read_reply_header(cookie: int, offset: int, nbytes: int) -> bytes:
    """Header of a one-chunk structured READ reply; the ``nbytes`` of data follow it."""
    return _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.OFFSET_DATA, cookie, 8 + nbytes
    ) + struct.pack(">Q", offset)


def structured_error_reply(cookie: int, error: int) -> bytes:
    """A final ``NBD_REPLY_TYPE_ERROR`` chunk."""
    return _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.ERROR, cookie, 6
    ) + struct.pack(">IH", error, 0)


def block_status_reply(cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """A final ``BLOCK_STATUS`` chunk for ``base:allocation``: (length, flags) pairs."""
    payload = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return (
        _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ChunkType.BLOCK_STATUS,
            cookie,
            len(payload),
        )
        + payload
    )
