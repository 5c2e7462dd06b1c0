#!/usr/bin/python3
"""A TCP proxy that delays every chunk by a base delay plus jitter, per direction.

LISTEN_HOST:LISTEN_PORT -> TARGET_HOST:TARGET_PORT. Each chunk read in one direction is
written DELAY_MS +- JITTER_MS (uniform) after it arrived, but never before the chunk ahead of
it: a TCP stream cannot be reordered, so jitter shows as varying latency and as bursts. Per
direction of each connection at most MAX_QUEUED chunks of up to 64 KiB wait; a full queue
stops reading, so a fast sender cannot make it hold unbounded memory. The kernels here have no
sch_netem, so this stands in for `tc netem delay D J`. Prints "ready" once it listens.

Usage: proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS JITTER_MS SEED
"""

import asyncio
import random
import sys

MAX_QUEUED = 256


async def pump(reader, writer, delay, jitter, rng):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(maxsize=MAX_QUEUED)

    async def read():
        last = 0.0
        try:
            while True:
                data = await reader.read(65536)
                due = max(last, loop.time() + max(0.0, delay + rng.uniform(-jitter, jitter)))
                last = due
                await queue.put((due, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((loop.time(), b""))

    async def write():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    await asyncio.gather(read(), write())


async def main():
    listen_host, listen_port, target_host, target_port, delay_ms, jitter_ms, seed = sys.argv[1:8]
    delay, jitter = float(delay_ms) / 1000, float(jitter_ms) / 1000
    rng = random.Random(int(seed))

    async def handle(client_reader, client_writer):
        try:
            target_reader, target_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(
                pump(client_reader, target_writer, delay, jitter, rng),
                pump(target_reader, client_writer, delay, jitter, rng),
            )
        finally:
            for w in (client_writer, target_writer):
                w.close()

    server = await asyncio.start_server(handle, listen_host, int(listen_port))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    asyncio.run(main())
