"""A ublk-style block device served over NBD: a mirror over two files.

Every WRITE is one fused command whose request buffer (received straight from the
client's socket) is lent to two WRITE secondaries, one per replica; every READ is a
fused command lending the request buffer to one READ secondary, and the reply is sent
from that same buffer.  The script writes and reads through a minimal NBD client, then
checks both replica files byte by byte.

    python examples/nbd_block_device.py                  # demo, then exit
    python examples/nbd_block_device.py --serve DIR      # keep serving for real clients:
        nbdinfo 'nbd+unix:///disk?socket=DIR/nbd.sock'
        qemu-io -f raw -c 'write -P 7 0 1M' 'nbd+unix:///disk?socket=DIR/nbd.sock'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

from aiofused_drivers.ublk import BlockService, parse_export
from aiofused_drivers.ublk.testing import RawClient

SIZE = 8 << 20
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH = 0, 1, 3


async def demo(directory: str, serve_forever: bool) -> None:
    replicas = [os.path.join(directory, f"replica{i}.img") for i in range(2)]
    for path in replicas:
        with open(path, "wb") as f:
            f.truncate(SIZE)
    sock_path = os.path.join(directory, "nbd.sock")
    spec = parse_export("disk=mirror:" + ",".join(replicas))
    async with BlockService([spec]) as service:
        service.serve(service.nbd.bind_unix(sock_path))
        backend = service.ring.backend if service.ring else "?"
        print(f"serving nbd+unix:///disk?socket={sock_path} (ring backend: {backend})")
        if serve_forever:
            await asyncio.Event().wait()
        client = await RawClient.connect(sock_path)
        try:
            size, _flags = await client.go("disk")
            data = os.urandom(256 << 10)
            client.request(NBD_CMD_WRITE, 1 << 20, len(data), cookie=1, payload=data)
            client.request(NBD_CMD_FLUSH, 0, 0, cookie=2)
            replies = [await client.simple_reply() for _ in range(2)]
            assert sorted(r[:2] for r in replies) == [(0, 1), (0, 2)], replies
            client.request(NBD_CMD_READ, 1 << 20, len(data), cookie=3)
            error, _, got = await client.simple_reply(len(data))
            assert error == 0 and got == data
        finally:
            await client.close()
    for path in replicas:
        with open(path, "rb") as f:
            f.seek(1 << 20)
            assert f.read(len(data)) == data, path
    print(f"device of {size} bytes: wrote and read back {len(data)} bytes, both replicas match")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", metavar="DIR", help="keep serving (replicas and socket in DIR)")
    args = ap.parse_args()
    try:
        if args.serve:
            os.makedirs(args.serve, exist_ok=True)
            asyncio.run(demo(args.serve, True))
        else:
            with tempfile.TemporaryDirectory(prefix="nbd", dir="/tmp") as d:
                asyncio.run(demo(d, False))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
