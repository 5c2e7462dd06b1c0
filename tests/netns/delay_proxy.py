#!/usr/bin/python3
"""A TCP proxy that delays every byte: LISTEN_HOST:LISTEN_PORT -> TARGET_HOST:TARGET_PORT.

Bytes from the client reach the target IN_MS milliseconds after they arrived here, and bytes from
the target reach the client OUT_MS milliseconds after; order is kept and throughput is not
limited beyond a bounded queue per direction of each connection (MAX_QUEUED chunks of at most
64 KiB; a full queue stops reading until the writer catches up), so a fast sender cannot make it
hold unbounded memory (the kernels here have no sch_netem, so this stands in for `tc netem
delay`). It runs
until killed, and prints "ready" on stdout once it listens.

Usage: delay_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT IN_MS OUT_MS
"""

import asyncio
import sys

# Chunks waiting for their delay, per direction of a connection.
MAX_QUEUED = 256


async def pump(reader, writer, delay):
    """Copies reader to writer, each chunk delivered `delay` seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(maxsize=MAX_QUEUED)

    async def read():
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((loop.time() + delay, b""))

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
    listen_host, listen_port, target_host, target_port, in_ms, out_ms = sys.argv[1:7]
    delay_in, delay_out = float(in_ms) / 1000, float(out_ms) / 1000

    async def handle(client_reader, client_writer):
        try:
            target_reader, target_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(
                pump(client_reader, target_writer, delay_in),
                pump(target_reader, client_writer, delay_out),
            )
        finally:
            for w in (client_writer, target_writer):
                w.close()

    server = await asyncio.start_server(handle, listen_host, int(listen_port))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    asyncio.run(main())
