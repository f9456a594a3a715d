"""A RECV whose caller asks for MSG_TRUNC gets the record's real length, on both backends,
as on the kernel; only the MSG_TRUNC a backend adds itself (to tell a truncated record
under MSG_WAITALL) is turned into a failure."""

from __future__ import annotations

import asyncio
import socket

from aiofused import Ring


async def test_a_callers_msg_trunc_reports_the_whole_record(ring: Ring) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.send(b"x" * 100)
        buf = bytearray(10)
        s = ring.get_sqe()
        assert s is not None
        s.prep_recv(b, buf, 10, socket.MSG_TRUNC)
        s.user_data = 7
        ring.submit()
        cqe = await asyncio.wait_for(ring.wait_cqe(), 10)
        ring.cqe_seen(cqe)
        assert (cqe.user_data, cqe.res) == (7, 100)
        assert bytes(buf) == b"x" * 10
    finally:
        a.close()
        b.close()
