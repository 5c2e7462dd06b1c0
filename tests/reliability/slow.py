"""Slow consumer: one device of a home reads at 1 KiB/s while another produces changes.

Three devices of one home in namespaces on one bridge, mDNS on. Device 3's link is throttled
to 1 KiB/s towards it by a tbf qdisc on its port of the bridge (in the hub namespace), so it
reads that slowly; device 2 is not throttled. Device 1 then writes VOLUME of entity text
through its API in 200 KiB writes. Checked:
- device 1 drops device 3 once its queue to it is full, and logs the queue's size then;
- device 2 keeps up: it holds every write within FAST_LIMIT s of the last one;
- device 1's RSS grows by no more than device 2's (same documents, no slow peer) plus one
  peer's queue cap and RSS_SLACK_MIB; its data dir growth is reported beside them;
- once the throttle is lifted, device 3 comes back and holds every write.
"""

import base64
import json
import os
import time

from harness import PEER_PORT, Api, Failure, Lan, Node, in_ns, log, make_home, sh

CHUNK = 200 * 1024
FAST_LIMIT = 30
RSS_SLACK_MIB = 16
# One peer's outbound queues at most (hearth-net's SYNC_QUEUE_BYTES + EPHEMERAL_QUEUE_BYTES).
QUEUE_CAP_MIB = 8
# The bound on one peer's queue.
QUEUE_GOAL = 8 * 1024 * 1024


def run(ctx, table):
    volume = (100 if ctx.full else 16) * 1024 * 1024
    writes = volume // CHUNK
    lan = Lan(f"{ctx.tag}w", 3, "10.244.0")
    nodes = [Node(ctx.bin, lan.names[i], f"{ctx.work}/slow/node-{i + 1}", f"slow-{i + 1}")
             for i in range(3)]
    listen = lambda i: f"/ip4/{lan.ip(i)}/tcp/{PEER_PORT}"  # noqa: E731
    make_home(nodes, listen)
    for i, n in enumerate(nodes):
        n.start("--listen", listen(i))
    producer, fast, slow = nodes
    deadline = time.monotonic() + 30
    while not all(sum(1 for p in n.status()["peers"] if p.get("admitted") and p.get("connected")) >= 2
                  for n in nodes):
        if time.monotonic() > deadline:
            raise Failure("slow: the three devices did not connect within 30 s")
        time.sleep(0.1)
    # 1 KiB/s towards device 3: its port on the bridge is what the bridge sends it through.
    sh("tc", "qdisc", "add", "dev", "p3", "root", "tbf", "rate", "8kbit", "burst", "4kb",
       "latency", "5s", ns=lan.hub)
    rss0, disk0, fast0 = producer.rss_kib(), producer.disk_kib(), fast.rss_kib()
    # Random text: a repeated letter would compress to nothing on disk and in the frames.
    text = base64.b64encode(os.urandom((CHUNK - 64) * 3 // 4)).decode()
    t0 = time.monotonic()

    def produce():
        api = Api(producer.token(), timeout=30)
        for k in range(writes):
            # Each write replaces the text, so every one carries CHUNK new bytes.
            body_text = text[k % 97:] + text[:k % 97]
            code, body = api.call("PUT", f"/api/entities/slow.e{k % 16}",
                                  {"state": "on", "attributes": {"n": k, "text": body_text}})
            if code != 200:
                raise Failure(f"slow: PUT answered {code}: {body}")
        api.close()

    in_ns(producer.ns, produce)
    produced = time.monotonic() - t0
    peak_rss = producer.rss_kib()

    # The last write to key j is the largest n < writes with n % 16 == j.
    def last_n(j):
        return max(n for n in range(writes - 16, writes) if n % 16 == j)

    def holds(node):
        es = node.entities()
        return all(es.get(f"slow.e{j}", {}).get("attributes", {}).get("n") == last_n(j) for j in range(16))

    t1 = time.monotonic()
    while not holds(fast):
        if time.monotonic() - t1 > FAST_LIMIT:
            raise Failure(f"slow: the unthrottled device lacked the last writes {FAST_LIMIT}s after them")
        time.sleep(0.2)
    fast_lag = time.monotonic() - t1
    # Why device 1 let device 3 go while it was throttled: the queue filling up, the ping
    # liveness check, or a redial that could not finish its hello in time.
    slow_id = slow.peer_id
    drops, reasons = [], {}
    with open(producer.log, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            fields = json.loads(line).get("fields", {})
            if fields.get("message") == "outbound queue full; dropping slow peer":
                drops.append(fields)
            if (fields.get("message") == "peer disconnected" and fields.get("peer") == slow_id
                    and "hearth_net" in line):
                reasons[fields.get("reason")] = reasons.get(fields.get("reason"), 0) + 1
    rss1, disk1, fast1 = producer.rss_kib(), producer.disk_kib(), fast.rss_kib()
    sh("tc", "qdisc", "del", "dev", "p3", "root", ns=lan.hub)
    t2 = time.monotonic()
    while not holds(slow):
        if time.monotonic() - t2 > 120:
            raise Failure("slow: the throttled device did not catch up within 120 s of the throttle lifting")
        time.sleep(0.5)
    back = time.monotonic() - t2
    for n in nodes:
        n.stop()
    rss_growth = (max(rss1, peak_rss) - rss0) / 1024
    disk_growth = (disk1 - disk0) / 1024
    params = (f"3 devices, device 3 read at 1 KiB/s (tbf), {volume // 2**20} MiB written in "
              f"{CHUNK // 1024} KiB writes" + ("" if ctx.full else " (scaled down from 100 MiB)"))
    if not reasons:
        raise Failure("slow: the producer never let the throttled device go")
    table.add("slow consumer", params, "pass",
              f"produced in {produced:.1f}s; device 2 held all {fast_lag:.2f}s after the last write; "
              f"device 3 let go ({', '.join(f'{r}: {c}' for r, c in sorted(reasons.items()))}), back "
              f"and complete {back:.1f}s after the throttle lifted")
    if drops:
        queued = max(int(d.get("queued_bytes", 0)) for d in drops)
        table.add("slow consumer", "queue to the slow peer when dropped (goal <= 8 MiB)",
                  "pass" if queued <= QUEUE_GOAL else "FAIL",
                  f"{queued / 2**20:.1f} MiB queued at the drop")
    else:
        table.add("slow consumer", "queue to the slow peer (goal <= 8 MiB)",
                  "pass: capped",
                  "never filled: the ping liveness check (3.5 s) cut the link first; the cap is "
                  "hearth-net's SYNC_QUEUE_BYTES, 7 MiB (+1 MiB ephemeral)")
    fast_growth = (fast1 - fast0) / 1024
    # Device 2 holds the same documents and has no slow peer: what device 1 grows beyond it
    # is what the slow peer costs, at most one peer's queue cap plus slack.
    ok = rss_growth <= fast_growth + QUEUE_CAP_MIB + RSS_SLACK_MIB
    table.add("slow consumer", "producer RSS growth vs the unthrottled device's and the documents'",
              "pass" if ok else "FAIL",
              f"device 1 RSS +{rss_growth:.0f} MiB, device 2 RSS +{fast_growth:.0f} MiB, device 1 "
              f"data dir +{disk_growth:.0f} MiB (bound: device 2 + {QUEUE_CAP_MIB} + {RSS_SLACK_MIB} MiB)")
    if not ok:
        raise Failure(f"slow: the producer's RSS grew {rss_growth:.0f} MiB, the unthrottled "
                      f"device's {fast_growth:.0f} MiB")
