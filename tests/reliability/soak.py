"""Soak: two paired homes of two devices each under steady writes, sampled for growth.

Four namespaces on one bridge, mDNS on. Home A (devices 1, 2) holds ENTITIES entities and
shares SHARED of them with home B (devices 3, 4). Writers keep RATE writes a second going:
most on home A's devices to any of its entities, the rest on home B's devices to the shared
ones. Every SAMPLE_EVERY the RSS of each node and the size of its data dir are sampled. At the
end the writers stop and all four must agree within 10 s, no node may have logged an ERROR
line, and the slopes of RSS and disk after the first sample (warm-up) are reported. Nothing
compacts history yet, so documents grow with every write and so does the disk; RSS is
compared with that growth rather than asserted flat.
"""

import os
import threading
import time

from harness import (PEER_PORT, Api, Failure, Lan, Node, enter, in_ns, log, make_home, rng,
                     slope_per_min)

ENTITIES = 1000
SHARED = 100
RATE = 10
CONVERGE_LIMIT = 10
# The first sync of every entity to the other devices, before the clock starts. It keeps up
# with the setup's writes (under a second after it on a quiet machine); it took minutes while
# each remote registry change made a device read the whole registry.
INITIAL_LIMIT = 60


def agree(nodes, limit, when, every=0.2):
    """Waits until home A's devices agree on every entity, home B's too, and both homes on
    the shared ones, listing every entity of all four each `every` seconds; raises after
    `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        views = [{k: e["version"] for k, e in n.entities().items() if k.startswith("soak.")}
                 for n in nodes]
        shared_a = {k: v for k, v in views[0].items() if int(k[6:]) < SHARED}
        if (views[0] == views[1] and views[2] == views[3] and len(views[0]) == ENTITIES
                and shared_a == views[2]):
            return
        if time.monotonic() > deadline:
            diff = lambda x, y: sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))  # noqa: E731
            raise Failure(f"soak: the four devices did not agree within {limit}s {when}: sizes "
                          f"{[len(v) for v in views]}; 1 vs 2 differ on {diff(views[0], views[1])[:5]}, "
                          f"3 vs 4 on {diff(views[2], views[3])[:5]}, shared 1 vs 3 on "
                          f"{diff(shared_a, views[2])[:5]}")
        time.sleep(every)


def run(ctx, table):
    duration = int(os.environ.get("SOAK_SECONDS", 3600 if ctx.full else 300))
    sample_every = 60 if ctx.full else 30
    lan = Lan(f"{ctx.tag}s", 4, "10.243.0")
    nodes = [Node(ctx.bin, lan.names[i], f"{ctx.work}/soak/node-{i + 1}", f"soak-{i + 1}")
             for i in range(4)]
    listen = lambda i: f"/ip4/{lan.ip(i)}/tcp/{PEER_PORT}"  # noqa: E731
    make_home(nodes[:2], listen)
    make_home(nodes[2:], lambda i: listen(i + 2))
    for i, n in enumerate(nodes):
        n.start("--listen", listen(i))
    a, b = nodes[0], nodes[2]
    code, body = a.call("POST", "/api/invites", {"kind": "home"})
    if code != 200:
        raise Failure(f"soak: home invite answered {code}: {body}")
    code, body = b.call("POST", "/api/pair", {"code": body["code"]})
    if code != 200:
        raise Failure(f"soak: pairing the homes answered {code}: {body}")
    home_b = b.status()["home"]["home_id"]
    keys = [f"soak.e{k}" for k in range(ENTITIES)]

    def setup():
        api = Api(a.token(), timeout=10)
        for key in keys:
            c, bd = api.call("PUT", f"/api/entities/{key}", {"state": "0", "attributes": {"k": key}})
            if c != 200:
                raise Failure(f"soak: PUT {key} answered {c}: {bd}")
        for key in keys[:SHARED]:
            c, bd = api.call("POST", "/api/shares", {"entity_id": key, "home": home_b})
            if c != 200:
                raise Failure(f"soak: sharing {key} answered {c}: {bd}")
        api.close()

    in_ns(a.ns, setup)
    log(f"soak: {ENTITIES} entities written, {SHARED} shared; writing {RATE}/s for {duration}s")

    t_setup = time.monotonic()
    # Each poll lists all 1000 entities on all four nodes, which is work for them too, so
    # the first sync is polled less often than the final agreement (the figure is good to
    # a second).
    agree(nodes, INITIAL_LIMIT, "after the setup", every=1.0)
    initial = time.monotonic() - t_setup
    log(f"soak: all four agree {initial:.1f}s after the setup")

    running = True
    acked = [0] * 4
    problems = []

    def writer(i, targets, per_second):
        enter(nodes[i].ns)
        api = Api(nodes[i].token(), timeout=10)
        r = rng(ctx.seed * 31 + i)
        n = 0
        next_at = time.monotonic()
        while running:
            n += 1
            key = r.choice(targets)
            try:
                c, bd = api.call("PUT", f"/api/entities/{key}", {"state": str(n)})
                if c == 200:
                    acked[i] += 1
                else:
                    problems.append(f"node-{i + 1} PUT {key}: {c} {bd}")
            except OSError as e:
                problems.append(f"node-{i + 1} PUT {key}: {e}")
            next_at += 1 / per_second
            time.sleep(max(0.0, next_at - time.monotonic()))
        api.close()

    threads = [threading.Thread(target=writer, args=args, daemon=True) for args in (
        (0, keys, RATE * 0.4), (1, keys, RATE * 0.4),
        (2, keys[:SHARED], RATE * 0.1), (3, keys[:SHARED], RATE * 0.1))]
    for t in threads:
        t.start()
    start = time.monotonic()
    rss = [[] for _ in nodes]
    disk = [[] for _ in nodes]
    try:
        while True:
            minutes = (time.monotonic() - start) / 60
            for i, n in enumerate(nodes):
                if n.proc.poll() is not None:
                    raise Failure(f"soak: {n.name} exited ({n.proc.returncode})")
                rss[i].append((minutes, n.rss_kib() / 1024))
                disk[i].append((minutes, n.disk_kib() / 1024))
            if time.monotonic() - start >= duration:
                break
            time.sleep(sample_every)
    finally:
        running = False
        for t in threads:
            t.join(15)
    stopped = time.monotonic()
    agree(nodes, CONVERGE_LIMIT, "of the last write")
    took = time.monotonic() - stopped
    for n in nodes:
        n.stop()
    errors = [line for n in nodes for line in n.error_lines()]
    warm = lambda s: s[1:] if len(s) > 2 else s  # noqa: E731
    rss_slopes = [slope_per_min(warm(s)) for s in rss]
    disk_slopes = [slope_per_min(warm(s)) for s in disk]
    params = (f"2 homes x 2, {ENTITIES} entities ({SHARED} shared), {RATE} writes/s for "
              f"{duration // 60} min, sampled every {sample_every}s")
    table.add("soak", params, "pass" if not errors and not problems else "FAIL",
              f"{sum(acked)} writes acknowledged, {len(problems)} refused; agreed {took:.2f}s "
              f"after the last; {len(errors)} ERROR lines; first sync of the {ENTITIES} "
              f"entities to all 4 took {initial:.1f}s")
    table.add("soak", "RSS, after the first sample (report only)", "report",
              "MiB/min per node: " + ", ".join(f"{s:+.2f}" for s in rss_slopes)
              + "; last MiB: " + ", ".join(f"{s[-1][1]:.0f}" for s in rss))
    table.add("soak", "data dir size, after the first sample (report only)", "report",
              "MiB/min per node: " + ", ".join(f"{s:+.2f}" for s in disk_slopes)
              + "; last MiB: " + ", ".join(f"{s[-1][1]:.1f}" for s in disk))
    if errors:
        raise Failure(f"soak: {len(errors)} ERROR lines, the first: {errors[0][:300]}")
    if problems:
        raise Failure(f"soak: {len(problems)} writes refused, the first: {problems[0][:300]}")
