"""10,000 mixed ops in flight on one ring, on every backend: every one completes
exactly once, and nothing is left in flight or pinned (SPEC R1-R2, F13)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from pathlib import Path

import pytest

from aiofused import Ring, SetupFlag


@pytest.mark.timeout(120)
async def test_ten_thousand_mixed_ops(ring_backend: str, tmp_path: Path) -> None:
    """2,500 each of READ, WRITE, NOP and RECV (parked until data comes) in flight."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1 << 20))
    rfd = os.open(src, os.O_RDONLY)
    wfd = os.open(tmp_path / "dst", os.O_CREAT | os.O_WRONLY)
    pairs = [socket.socketpair() for _ in range(50)]
    bufs = [bytearray(1) for _ in range(2500)]
    try:
        async with Ring(16384, flags=SetupFlag.FUSED_REQ, backend=ring_backend) as ring:
            ud = 0
            kinds: dict[int, str] = {}
            for i in range(2500):
                for kind in ("read", "write", "nop", "recv"):
                    sqe = ring.get_sqe()
                    assert sqe is not None
                    if kind == "read":
                        sqe.prep_read(rfd, bytearray(4096), 4096, (i * 4096) % (1 << 20))
                    elif kind == "write":
                        sqe.prep_write(wfd, b"w" * 512, 512, i * 512)
                    elif kind == "nop":
                        sqe.prep_nop()
                    else:
                        sqe.prep_recv(pairs[i % 50][0], bufs[i])
                    sqe.user_data = ud
                    kinds[ud] = kind
                    ud += 1
            assert ring.submit() == 10_000
            await asyncio.sleep(0.05)
            assert ring.in_flight() >= 2500  # the RECVs are parked
            for _, b in pairs:
                b.sendall(b"x" * 50)
            cqes = await asyncio.wait_for(ring.wait_cqes(10_000), 60)
            assert ring.in_flight() == 0
            assert sorted(c.user_data for c in cqes) == list(range(10_000))
            wrong = [
                (kinds[c.user_data], c.res)
                for c in cqes
                if c.res != {"read": 4096, "write": 512, "nop": 0, "recv": 1}[kinds[c.user_data]]
            ]
            assert not wrong, Counter(wrong).most_common(5)
            assert all(b == b"x" for b in bufs)
            for b in bufs:
                b.extend(b"!")  # nothing is pinned any more
    finally:
        os.close(rfd)
        os.close(wfd)
        for a, b in pairs:
            a.close()
            b.close()
