"""``ring.open_fused`` on the real backends (the plugin's ``ring`` fixture: uring and
asyncio): secondaries started from the lend callback read a real file into the
driver's buffer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiofused import Op, Ring, UringCmd
from aiofused_drivers.null import NULL_LEND, NullDriver


async def test_secondaries_read_a_file_into_the_lent_buffer(ring: Ring, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 16)
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = bytearray(4096)
        df = ring.register_driver(NullDriver(size=4096, buffer=seen))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        log: list[tuple[str, int]] = []

        def lent(cmd: UringCmd, nbytes: int) -> None:
            log.append(("lent", nbytes))
            for i in range(2):
                ring.fused_secondary(
                    cmd,
                    Op.READ,
                    fd,
                    at=2048 * i,
                    nbytes=2048,
                    offset=2048 * i,
                    on_complete=lambda res, flags: log.append(("secondary", res)),
                )
            ring.seal(cmd)

        def complete(res: int, flags: int) -> None:
            log.append(("primary", res))
            done.set_result(res)

        ring.open_fused(df, NULL_LEND, on_lent=lent, on_complete=complete)
        assert await asyncio.wait_for(done, 10) == 0
        assert log == [("lent", 4096), ("secondary", 2048), ("secondary", 2048), ("primary", 0)]
        assert bytes(seen) == path.read_bytes()
    finally:
        os.close(fd)
