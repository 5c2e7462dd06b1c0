#!/usr/bin/python3
"""Floods a node from a neighbour namespace: fake mDNS answers and bare TCP connections.

Every PERIOD/RATE seconds it multicasts one mDNS answer (to 224.0.0.251:5353, as libp2p-mdns
sends them) announcing a fresh, random PeerId at this host's PORT_FAKE (nothing listens
there), and opens one TCP connection to TARGET:TARGET_PORT that sends the multistream-select
header, waits HOLD seconds and closes. Runs for SECONDS, then prints its counts as JSON.

A connection here never finishes the Noise handshake, so it has no PeerId: what it spends on
the node is a pending inbound connection, which is what the caps on those must bound.

Usage: flooder.py TARGET TARGET_PORT SECONDS ANSWERS_PER_MIN DIALS_PER_MIN SEED
"""

import asyncio
import json
import random
import socket
import struct
import sys
import time

PORT_FAKE = 9
HOLD = 1.0
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58(data):
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def fresh_peer_id(rng):
    # An identity multihash of an Ed25519 public key in its protobuf form, as libp2p makes
    # PeerIds of Ed25519 keys: 0x00 0x24, then 08 01 12 20 and 32 key bytes.
    return b58(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + rng.randbytes(32))


def qname(labels):
    out = b""
    for label in labels:
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def answer(peer_id, ip, rng):
    """One mDNS response: a PTR for _p2p._udp.local to a random name, and that name's TXT
    record carrying `dnsaddr=/ip4/IP/tcp/PORT_FAKE/p2p/PEER`."""
    service = ["_p2p", "_udp", "local"]
    name = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(32))] + service
    ttl = 300
    header = struct.pack(">HHHHHH", 0, 0x8400, 0, 1, 0, 1)
    ptr_rdata = qname(name)
    ptr = qname(service) + struct.pack(">HHIH", 12, 1, ttl, len(ptr_rdata)) + ptr_rdata
    txt = f"dnsaddr=/ip4/{ip}/tcp/{PORT_FAKE}/p2p/{peer_id}".encode()
    txt_rdata = bytes([len(txt)]) + txt
    add = qname(name) + struct.pack(">HHIH", 16, 1, ttl, len(txt_rdata)) + txt_rdata
    return header + ptr + add


async def main():
    target, target_port, seconds, answers_pm, dials_pm, seed = sys.argv[1:7]
    rng = random.Random(int(seed))
    seconds = float(seconds)
    answers_pm, dials_pm = int(answers_pm), int(dials_pm)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    # The source address the node will see, which libp2p-mdns puts in the fake address.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((target, 1))
    own_ip = probe.getsockname()[0]
    probe.close()
    counts = {"answers": 0, "dials": 0, "dials_refused": 0, "dials_failed": 0}
    tasks = set()

    async def dial():
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(target, int(target_port)), 5)
        except ConnectionRefusedError:
            counts["dials_refused"] += 1
            return
        except (OSError, asyncio.TimeoutError):
            counts["dials_failed"] += 1
            return
        try:
            w.write(b"\x13/multistream/1.0.0\n")
            await w.drain()
            await asyncio.sleep(HOLD)
        except OSError:
            pass
        finally:
            w.close()

    start = time.monotonic()
    next_answer = next_dial = start
    while time.monotonic() - start < seconds:
        now = time.monotonic()
        if answers_pm and now >= next_answer:
            udp.sendto(answer(fresh_peer_id(rng), own_ip, rng), ("224.0.0.251", 5353))
            counts["answers"] += 1
            next_answer += 60 / answers_pm
        if dials_pm and now >= next_dial:
            t = asyncio.create_task(dial())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            counts["dials"] += 1
            next_dial += 60 / dials_pm
        await asyncio.sleep(max(0.0, min(next_answer if answers_pm else 1e9,
                                         next_dial if dials_pm else 1e9) - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    asyncio.run(main())
