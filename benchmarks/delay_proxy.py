"""A TCP proxy that holds every byte for D milliseconds in each direction.

    python benchmarks/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Stands in for the distance between the two domains (an emulated link round
trip of 2 x DELAY_MS) where `tc netem` is not available: peers.Airlock with
`link_delay_ms` puts it between the gateway and its vault.  Bytes keep their
order; there is no bandwidth limit and no loss.  Loopback only.
"""
from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            loop.call_later(delay, writer.write, data)
            if writer.transport.get_write_buffer_size() > 64 << 20:
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    await asyncio.sleep(delay)
    writer.close()


async def _main(listen_port: int, target_port: int, delay: float) -> None:
    async def handle(r1, w1):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            w1.close()
            return
        await asyncio.gather(_pipe(r1, w2, delay), _pipe(r2, w1, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
