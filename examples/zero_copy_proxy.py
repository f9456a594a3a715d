"""A zero-copy mirroring TCP proxy on aiofused's fused commands, in one screen.

    python examples/zero_copy_proxy.py LISTEN_PORT UPSTREAM_PORT [MIRROR_PORT ...]

Per connection and direction, one fused command per chunk: the relay driver (the
primary) receives into a buffer from its bounded pool and lends it; SEND secondaries
read that same memory, to the upstream and to every mirror at once; the buffer goes
back to the pool when the primary completes.  Python never copies the payload.

This sketch leaves out what ``aiofused proxy`` adds: a lag bound so a slow mirror
never slows the main path, reading and discarding mirror replies, resets, idle
timeouts, connection limits, workers, signals and logs.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from aiofused import BufDir, DriverFile, Ring, SetupFlag
from aiofused_drivers.relay import RELAY_RECV, RelayChannel, RelayDriver


async def pump(
    ring: Ring, relay: DriverFile, src: RelayChannel, dests: list[socket.socket]
) -> None:
    """Relay ``src`` to every socket in ``dests`` until end of stream."""
    while True:
        async with ring.fused(relay, RELAY_RECV, cmd=src.cmd, buf_dir=BufDir.SRC) as lease:
            if not lease.lent:  # end of stream: the driver completed without lending
                break
            n = len(lease.buffer)  # bytes received into a pooled buffer, lent read-only
            # 1:N fan-out: every SEND reads the same lent memory, concurrently.
            await asyncio.gather(*(lease.send(d, 0, n, socket.MSG_WAITALL) for d in dests))
    for d in dests:  # pass the half-close on
        d.shutdown(socket.SHUT_WR)


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def main(listen: int, upstream: int, mirrors: list[int]) -> None:
    async with Ring(256, flags=SetupFlag.FUSED_REQ) as ring:
        driver = RelayDriver(buffer_size=256 * 1024, pool_size=1024)
        relay = ring.register_driver(driver)

        async def handle(client: socket.socket) -> None:
            chans: list[RelayChannel] = []
            shadows: list[socket.socket] = []
            try:
                up = await driver.attach(await connect(upstream))
                chans.append(up)
                for m in mirrors:
                    shadows.append(await connect(m))
                cl = await driver.attach(client)
                chans.append(cl)
                await asyncio.gather(
                    pump(ring, relay, cl, [up.sock, *shadows]),  # client -> upstream + mirrors
                    pump(ring, relay, up, [cl.sock]),  # upstream -> client
                )
            finally:
                for chan in chans:
                    chan.close()
                for s in shadows:
                    s.close()
                if len(chans) < 2:  # not attached: the client socket is still ours
                    client.close()

        server = socket.create_server(("127.0.0.1", listen))
        server.setblocking(False)
        loop = asyncio.get_running_loop()
        tasks = set()
        print(f"proxy 127.0.0.1:{listen} -> {upstream}, mirrors {mirrors}", file=sys.stderr)
        while True:
            client, _ = await loop.sock_accept(server)
            task = asyncio.create_task(handle(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]))
