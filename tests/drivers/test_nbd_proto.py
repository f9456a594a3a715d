"""Pure tests of the NBD handshake state machine and framing (no loop, no sockets)."""

from __future__ import annotations

import struct

import pytest

from aiofused_drivers.ublk import _nbdproto as P

EXPORTS = {
    "disk": P.ExportInfo("disk", 1 << 20, P.TxFlag.HAS_FLAGS | P.TxFlag.SEND_FLUSH),
    "ro": P.ExportInfo("ro", 4096, P.TxFlag.HAS_FLAGS | P.TxFlag.READ_ONLY),
}


def make() -> P.Handshake:
    def lookup(name: str) -> P.ExportInfo | None:
        return EXPORTS.get(name or "disk")

    hs = P.Handshake(lookup, lambda: list(EXPORTS))
    greeting = hs.data_to_send()
    assert struct.unpack(">QQH", greeting) == (P.NBDMAGIC, P.IHAVEOPT, 3)
    return hs


def state(hs: P.Handshake) -> P.HandshakeState:
    return hs.state


def opt(o: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, o, len(data)) + data


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(raw):
        magic, o, typ, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == P.REPLY_MAGIC_OPT
        out.append((o, typ, raw[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def test_go_reports_export_and_block_size() -> None:
    hs = make()
    hs.receive_data(struct.pack(">I", 3) + opt(P.Opt.GO, go_data("disk", P.Info.BLOCK_SIZE)))
    reps = replies(hs.data_to_send())
    assert reps[-1][1] == P.Rep.ACK
    infos = {struct.unpack_from(">H", d)[0]: d for _, t, d in reps if t == P.Rep.INFO}
    _, size, flags = struct.unpack(">HQH", infos[P.Info.EXPORT])
    assert size == 1 << 20 and flags & P.TxFlag.SEND_FLUSH
    assert struct.unpack(">HIII", infos[P.Info.BLOCK_SIZE])[1:] == (512, 4096, P.MAX_PAYLOAD)
    assert hs.state is P.HandshakeState.TRANSMISSION
    assert hs.block_size_agreed and hs.export is EXPORTS["disk"]


def test_leftover_bytes_after_go_are_kept() -> None:
    hs = make()
    req = struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, 0, 1, 0, 512)
    hs.receive_data(struct.pack(">I", 3) + opt(P.Opt.GO, go_data("")) + req)
    assert hs.state is P.HandshakeState.TRANSMISSION
    assert hs.leftover == req
    assert not hs.block_size_agreed


def test_byte_at_a_time() -> None:
    hs = make()
    data = struct.pack(">I", 1) + opt(P.Opt.LIST) + opt(P.Opt.GO, go_data("ro"))
    for b in data:
        hs.receive_data(bytes([b]))
    assert hs.state is P.HandshakeState.TRANSMISSION
    assert hs.export is EXPORTS["ro"]


def test_list_info_unsupported_and_abort() -> None:
    hs = make()
    hs.receive_data(struct.pack(">I", 3))
    hs.receive_data(opt(P.Opt.LIST))
    reps = replies(hs.data_to_send())
    names = [d[4:].decode() for _, t, d in reps if t == P.Rep.SERVER]
    assert names == ["disk", "ro"] and reps[-1][1] == P.Rep.ACK
    hs.receive_data(opt(P.Opt.LIST, b"x"))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_INVALID
    hs.receive_data(opt(P.Opt.INFO, go_data("nope")))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_UNKNOWN
    hs.receive_data(opt(P.Opt.STARTTLS))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_UNSUP
    hs.receive_data(opt(99, b"whatever"))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_UNSUP
    hs.receive_data(opt(P.Opt.INFO, b"\x00\x00"))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_INVALID
    assert hs.state is P.HandshakeState.OPTIONS
    hs.receive_data(opt(P.Opt.ABORT))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ACK
    assert state(hs) is P.HandshakeState.CLOSED


def test_structured_and_meta_context() -> None:
    hs = make()
    hs.receive_data(struct.pack(">I", 3))
    meta = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1)
    meta += struct.pack(">I", len(P.BASE_ALLOCATION)) + P.BASE_ALLOCATION.encode()
    hs.receive_data(opt(P.Opt.SET_META_CONTEXT, meta))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ERR_INVALID  # before structured replies
    hs.receive_data(opt(P.Opt.STRUCTURED_REPLY))
    assert replies(hs.data_to_send())[0][1] == P.Rep.ACK
    hs.receive_data(opt(P.Opt.SET_META_CONTEXT, meta))
    reps = replies(hs.data_to_send())
    assert reps[0][1] == P.Rep.META_CONTEXT
    assert struct.unpack_from(">I", reps[0][2])[0] == P.BASE_ALLOCATION_ID
    hs.receive_data(opt(P.Opt.GO, go_data("disk")))
    assert hs.structured and hs.meta_context
    flags = [d for _, t, d in replies(hs.data_to_send()) if t == P.Rep.INFO and d[:2] == b"\0\0"]
    assert struct.unpack(">HQH", flags[0])[2] & P.TxFlag.SEND_DF


def test_export_name_old_style() -> None:
    hs = make()
    hs.receive_data(struct.pack(">I", 1) + opt(P.Opt.EXPORT_NAME, b"disk"))
    out = hs.data_to_send()
    assert len(out) == 8 + 2 + 124
    assert struct.unpack_from(">Q", out)[0] == 1 << 20
    assert hs.state is P.HandshakeState.TRANSMISSION


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", 1 << 7), "unknown client flags"),
        (struct.pack(">I", 3) + struct.pack(">QII", 0xDEADBEEF, 7, 0), "bad option magic"),
        (struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, 7, 1 << 30), "too long"),
        (struct.pack(">I", 3) + opt(P.Opt.EXPORT_NAME, b"missing"), "unknown export"),
    ],
)
def test_malformed_handshake_closes(data: bytes, reason: str) -> None:
    hs = make()
    hs.receive_data(data)
    assert hs.state is P.HandshakeState.CLOSED
    assert reason in hs.close_reason


def test_reply_framing() -> None:
    assert P.simple_reply(7, 22) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 22, 7)
    hdr = P.read_reply_header(9, 4096, 512)
    assert struct.unpack(">IHHQIQ", hdr) == (P.STRUCTURED_REPLY_MAGIC, 1, 1, 9, 520, 4096)
    err = P.structured_error_reply(3, 5)
    assert struct.unpack(">IHHQIIH", err)[2:] == (P.ChunkType.ERROR, 3, 6, 5, 0)
    bs = P.block_status_reply(4, [(4096, 3), (512, 0)])
    assert struct.unpack(">IHHQII4I", bs)[4:] == (20, 1, 4096, 3, 512, 0)
    assert P.nbd_error(-2) == 5 and P.nbd_error(-122) == 28 and P.nbd_error(95) == 95
    req = struct.pack(">IHHQQI", P.REQUEST_MAGIC, 1, 1, 5, 4096, 512)
    r = P.parse_request(req)
    assert r is not None and (r.flags, r.type, r.cookie, r.offset, r.length) == (1, 1, 5, 4096, 512)
    assert P.parse_request(b"\0" * 28) is None
