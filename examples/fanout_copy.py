"""Copy one file to N replicas with fused commands: no Python-level copy of the data.

For each chunk, one primary lends a pool buffer for a READ secondary (the buffer is
the destination), then a second primary lends the same buffer to N WRITE secondaries
that run concurrently (the buffer is the source).  The null driver lends whatever
buffer it is given, so the chunk never moves between the two commands.

    python examples/fanout_copy.py SRC DST1 [DST2 ...] [--chunk 1M]
"""

from __future__ import annotations

import asyncio
import os

from aiofused import BufDir, BufferPool, Ring, SetupFlag
from aiofused.driver import ArgumentParser, size_arg

NULL_LEND = 0  # the null driver's "lend my buffer" command


async def fanout_copy(src: str, dsts: list[str], chunk: int = 1 << 20) -> int:
    """Copy ``src`` to every path in ``dsts``; return the bytes copied per replica."""
    pool = BufferPool(1, chunk)
    buf = pool.try_acquire()
    assert buf is not None
    fin = os.open(src, os.O_RDONLY)
    outs = [os.open(d, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644) for d in dsts]
    offset = 0
    try:
        async with Ring(64, flags=SetupFlag.FUSED_REQ) as ring:
            ring.register_buffers(pool)  # fixed buffers on the kernel backend
            null = ring.open_driver("null", buffer=buf)
            while True:
                async with ring.fused(null, NULL_LEND, buf_dir=BufDir.DEST) as lease:
                    n = await lease.read(fin, offset)
                if n == 0:
                    return offset
                async with ring.fused(null, NULL_LEND, buf_dir=BufDir.SRC) as lease:
                    await asyncio.gather(*(lease.write(fd, offset, nbytes=n) for fd in outs))
                offset += n
    finally:
        os.close(fin)
        for fd in outs:
            os.close(fd)
        pool.release(buf)
        pool.close()


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="file to copy")
    parser.add_argument("dst", nargs="+", help="replicas to write")
    parser.add_argument(
        "--chunk",
        type=size_arg(1),
        default="1M",
        metavar="SIZE",
        help="bytes per fused command (64K, 1M, ...)",
    )
    args = parser.parse_args()
    copied = asyncio.run(fanout_copy(args.src, args.dst, args.chunk))
    print(f"copied {copied} bytes to {len(args.dst)} replicas")


if __name__ == "__main__":
    main()
