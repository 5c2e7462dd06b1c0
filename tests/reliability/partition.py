"""Partition and heal: two homes of three devices each, behind delaying proxies, under loss and
random-halves partitions, with writes everywhere.

Six namespaces on one bridge. Home X is devices 1-3, home Y devices 4-6; the homes are paired
and each shares SHARED of its entities with the other, keeping PRIVATE unshared. Every node
listens on its own loopback only, behind tests/reliability/proxy.py in its namespace, which
delays each direction by 20-200 ms (per node) with jitter; nodes run with --no-mdns and --peer
at the other five proxies, so every byte between two nodes crosses one proxy.

Then, PARTITIONS times: the six are split into random halves with iptables DROP rules in
every namespace (on eth0 only: loopback, where the API and the proxy's inner leg are, is never
touched), a loss rate of 0-30% is drawn and applied to everything else arriving on eth0
(`-m statistic --mode random`), and the split holds for 10-30 s while one writer per node
writes its home's entities and the other home's shared ones. After the last, every rule is
removed, the writers stop, and the clock starts: all six must show identical versions of
every entity they hold in common (each home's own entities on its three devices, shared
entities on all six) within HEAL_LIMIT seconds. Throughout, no private entity of one home may
ever appear on a device of the other.
"""

import os
import threading
import time

from harness import Api, Failure, Lan, Node, enter, log, make_home, rng, sh, spawn

SHARED = 4
PRIVATE = 4
HEAL_LIMIT = 10
INNER_PORT = 4710
PROXY_PORT = 4700
WRITE_INTERVAL = 0.2


def entity_ids(home):
    return ([f"part.{home}_shared_{k}" for k in range(SHARED)],
            [f"part.{home}_private_{k}" for k in range(PRIVATE)])


class Writers:
    """One writer thread per node, each inside its node's namespace."""

    def __init__(self, nodes, homes, seed):
        self.running = True
        self.acked = [0] * len(nodes)
        self.refused = []
        self.lock = threading.Lock()
        self.threads = []
        for i, n in enumerate(nodes):
            own_shared, own_private = entity_ids(homes[i])
            other_shared, _ = entity_ids("y" if homes[i] == "x" else "x")
            targets = own_shared + own_private + other_shared
            t = threading.Thread(target=self.write, args=(i, n, targets, seed), daemon=True)
            t.start()
            self.threads.append(t)

    def write(self, i, node, targets, seed):
        enter(node.ns)
        api = Api(node.token(), timeout=5)
        r = rng(seed * 10 + i)
        n = 0
        while self.running:
            n += 1
            key = r.choice(targets)
            try:
                code, body = api.call("PUT", f"/api/entities/{key}", {"state": f"n{i + 1}-{n}"})
            except OSError as e:
                with self.lock:
                    self.refused.append(f"node-{i + 1} {key}: {e}")
                time.sleep(WRITE_INTERVAL)
                continue
            with self.lock:
                if code == 200:
                    self.acked[i] += 1
                else:
                    self.refused.append(f"node-{i + 1} {key}: {code} {body}")
            time.sleep(WRITE_INTERVAL)
        api.close()

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join(10)


def ipt(ns, *args):
    sh("iptables", "-w", *args, ns=ns)


def set_rules(lan, isolate_from, loss):
    """Replaces every namespace's test chain: DROP to and from the IPs in isolate_from[i], and
    a random loss of `loss` on the rest of eth0's input."""
    for i, ns in enumerate(lan.names):
        ipt(ns, "-F", "HRPART")
        for j in isolate_from[i]:
            ipt(ns, "-A", "HRPART", "-s", lan.ip(j), "-j", "DROP")
            ipt(ns, "-A", "HRPART", "-d", lan.ip(j), "-j", "DROP")
        if loss > 0:
            ipt(ns, "-A", "HRPART", "-m", "statistic", "--mode", "random",
                "--probability", f"{loss:.3f}", "-j", "DROP")


def views(nodes):
    """Each node's entities, id -> version."""
    return [{k: e["version"] for k, e in n.entities().items() if k.startswith("part.")}
            for n in nodes]


def check_isolation(nodes, homes, seen):
    """Raises if a private entity of one home is on a device of the other."""
    for i, v in enumerate(seen):
        other = "y" if homes[i] == "x" else "x"
        leaked = [k for k in v if k.startswith(f"part.{other}_private_")]
        if leaked:
            raise Failure(f"partition: {nodes[i].name} (home {homes[i]}) holds the other home's "
                          f"unshared {leaked}")


def converged(seen, homes):
    """True when each home's devices agree on every entity and both homes on shared ones."""
    for h in ("x", "y"):
        members = [v for v, home in zip(seen, homes) if home == h]
        if any(m != members[0] for m in members):
            return False
    xs = {k: v for k, v in seen[0].items() if "_shared_" in k}
    ys = {k: v for k, v in seen[3].items() if "_shared_" in k}
    return xs == ys and len(xs) == 2 * SHARED


def run(ctx, table):
    partitions = 40 if ctx.full else 3
    r = rng(ctx.seed + 7)
    lan = Lan(f"{ctx.tag}p", 6, "10.242.0")
    homes = ["x", "x", "x", "y", "y", "y"]
    nodes = [Node(ctx.bin, lan.names[i], f"{ctx.work}/partition/node-{i + 1}", f"part-{i + 1}")
             for i in range(6)]
    direct = lambda i: f"/ip4/{lan.ip(i)}/tcp/{INNER_PORT}"  # noqa: E731
    make_home(nodes[:3], direct)
    make_home(nodes[3:], lambda i: direct(i + 3))

    # Pair the homes and share; the first device of each home does it, on the LAN directly.
    x0, y0 = nodes[0], nodes[3]
    x0.start("--no-mdns", "--listen", direct(0))
    y0.start("--no-mdns", "--listen", direct(3))
    try:
        code, body = x0.call("POST", "/api/invites", {"kind": "home"})
        if code != 200:
            raise Failure(f"partition: home invite answered {code}: {body}")
        code, body = y0.call("POST", "/api/pair", {"code": body["code"]})
        if code != 200:
            raise Failure(f"partition: pairing the homes answered {code}: {body}")
        home_id = {"x": x0.status()["home"]["home_id"], "y": y0.status()["home"]["home_id"]}
        for owner, other in ((x0, "y"), (y0, "x")):
            mine = "x" if other == "y" else "y"
            shared, private = entity_ids(mine)
            for key in shared + private:
                code, body = owner.call("PUT", f"/api/entities/{key}", {"state": "initial"})
                if code != 200:
                    raise Failure(f"partition: PUT {key} answered {code}: {body}")
            for key in shared:
                code, body = owner.call("POST", "/api/shares", {"entity_id": key, "home": home_id[other]})
                if code != 200:
                    raise Failure(f"partition: sharing {key} answered {code}: {body}")
    finally:
        x0.stop()
        y0.stop()

    # The delaying proxies, then every node behind its own, dialling the other five's.
    delays = [r.randint(20, 200) for _ in range(6)]
    for i, ns in enumerate(lan.names):
        p = spawn(["/usr/bin/python3", os.path.join(os.path.dirname(__file__), "proxy.py"),
                   lan.ip(i), PROXY_PORT, "127.0.0.1", INNER_PORT, delays[i] // 2,
                   delays[i] // 4, ctx.seed + i], ns, f"{ctx.work}/partition/proxy-{i + 1}.log")
        deadline = time.monotonic() + 10
        while "ready" not in open(f"{ctx.work}/partition/proxy-{i + 1}.log").read():
            if p.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"partition: the proxy of node-{i + 1} did not start")
            time.sleep(0.05)
        ipt(ns, "-N", "HRPART")
        ipt(ns, "-A", "INPUT", "-i", "eth0", "-j", "HRPART")
        ipt(ns, "-A", "OUTPUT", "-o", "eth0", "-j", "HRPART")
    ids = [n.peer_id for n in nodes]
    for i, n in enumerate(nodes):
        peers = []
        for j in range(6):
            if j != i:
                peers += ["--peer", f"/ip4/{lan.ip(j)}/tcp/{PROXY_PORT}/p2p/{ids[j]}"]
        n.start("--no-mdns", "--listen", f"/ip4/127.0.0.1/tcp/{INNER_PORT}", *peers)

    # Everyone first agrees, so each later figure is about healing, not the first sync.
    deadline = time.monotonic() + 60
    while True:
        seen = views(nodes)
        check_isolation(nodes, homes, seen)
        if converged(seen, homes):
            break
        if time.monotonic() > deadline:
            raise Failure("partition: the six devices did not converge within 60 s before any partition")
        time.sleep(0.2)
    log("partition: six devices in two homes converged; partitions start")

    writers = Writers(nodes, homes, ctx.seed)
    losses, holds, samples = [], [], 0
    try:
        for k in range(1, partitions + 1):
            order = list(range(6))
            r.shuffle(order)
            half = set(order[:3])
            isolate = [[j for j in range(6) if (j in half) != (i in half)] for i in range(6)]
            loss = r.uniform(0, 0.3)
            hold = r.uniform(10, 30)
            losses.append(loss)
            holds.append(hold)
            set_rules(lan, isolate, loss)
            log(f"partition {k}/{partitions}: {sorted(i + 1 for i in half)} | "
                f"{sorted(i + 1 for i in range(6) if i not in half)}, loss {loss:.0%}, {hold:.0f}s")
            end = time.monotonic() + hold
            while time.monotonic() < end:
                check_isolation(nodes, homes, views(nodes))
                samples += 1
                time.sleep(1)
        set_rules(lan, [[] for _ in range(6)], 0)
        healed = time.monotonic()
    finally:
        writers.stop()
    stopped = time.monotonic()
    while True:
        seen = views(nodes)
        check_isolation(nodes, homes, seen)
        if converged(seen, homes):
            took = time.monotonic() - healed
            break
        if time.monotonic() - healed > 60:
            raise Failure("partition: the six devices did not converge within 60 s of the final heal")
        time.sleep(0.1)
    for n in nodes:
        n.stop()
    acked = sum(writers.acked)
    # Proof the partitions cut live sessions: disconnections the nodes logged.
    cuts = 0
    for n in nodes:
        with open(n.log, errors="replace") as f:
            cuts += sum(1 for line in f if '"peer disconnected"' in line and "hearth_net" in line)
    params = (f"2 homes x 3, {partitions} random-halves partitions of "
              f"{min(holds):.0f}-{max(holds):.0f}s, loss {min(losses):.0%}-{max(losses):.0%}, "
              f"delay {min(delays)}-{max(delays)} ms round trip +-25% jitter")
    result = "pass" if took <= HEAL_LIMIT else f"FAIL: over {HEAL_LIMIT}s"
    table.add("partition", params, result,
              f"identical versions on all 6 {took:.2f}s after the final heal (writers stopped "
              f"{stopped - healed:.2f}s after it); {acked} writes acknowledged, "
              f"{len(writers.refused)} refused or unreachable; {cuts} sessions cut")
    table.add("partition", f"{samples} samples of all 6 during the partitions", "pass",
              "no unshared entity ever on the other home's devices")
    if took > HEAL_LIMIT:
        raise Failure(f"partition: converged {took:.2f}s after the final heal, over {HEAL_LIMIT}s")
