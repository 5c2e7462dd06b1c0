"""Rotation and cut: SIGKILL the device that rotates keys and cuts generations, mid-work.

Two homes in namespaces on one bridge, mDNS on: home A of two devices (a1, the admin device,
and a2) and home B of one (b1), paired. Every node runs with a small cut threshold
(`--history-cut-changes 20 --history-keep-versions 20`), so a1 cuts an entity's document
into a new generation every 20 changes; a2 moves to it, and old generations are deleted once
both moved and the newer ones hold 20 versions.

Entities, all owned by home A, each with one writer so its state (a counter) only grows:
- TOGGLED, written on a1 and shared with home B, then unshared, then shared again, by a
  toggler on a1 without pause: each unshare rotates the entity's key on a1; while unshared
  the entity is cut like any other;
- SENTINEL, written on a1, and FROM_B, written on b1: shared with B throughout;
- LOCAL_A1, written on a1, and LOCAL_A2, written on a2: never shared, cut often.

Each round a1 is SIGKILLed (every fourth round a2 too): in a third of the rounds at a
random moment, in a third within 20 ms of a1 logging a cut (it logs cuts at debug level;
the cut's store batch is then likely still on its way), in a third within 30 ms of the
toggler sending an unshare (the rotation is then likely under way). After the restart:
- a1 answers every entity (GET 200 with a state) and holds every write it acknowledged;
- the share state a1 reports is the acknowledged one (an operation cut off by the kill may
  have gone either way);
- within CONVERGE_LIMIT (60 s), a2 holds every acknowledged write of every entity, a1 holds b1's
  and a2's, b1 holds every acknowledged write of what is shared with it now, and no GET on
  any device answers anything but 200 (or 404 on b1 for what was never shared with it);
- an entity unshared now shows on b1 no write started after its unshare was acknowledged
  (or, for an unshare cut off by the kill, after the kill), and a never-shared one is not
  on b1 at all;
- generations stay bounded: at most MAX_HELD held per entity on a1 and a2.
An acknowledged unshare must come back with a newer key epoch than the share before it; an
unshare cut off by a kill that did take effect must also have rotated the key (checked at
the next share: same generation, same epoch is a failure). At the end all devices agree and
no log holds a panic or an ERROR line about a damaged or quarantined document.
"""

import datetime
import json
import threading
import time

from harness import PEER_PORT, Api, Failure, Lan, Node, enter, in_ns, log, make_home, rng

CUT_CHANGES = 20
KEEP_VERSIONS = 20
TOGGLED = ["rot.t0", "rot.t1", "rot.t2"]
SENTINEL = "rot.sentinel"
FROM_B = "rot.from_b"
LOCAL_A1 = ["rot.c0", "rot.c1", "rot.c2"]
LOCAL_A2 = ["rot.d0", "rot.d1"]
ALL = TOGGLED + [SENTINEL, FROM_B] + LOCAL_A1 + LOCAL_A2
# After a restart, how long the devices may take to hold every acknowledged write. A debug
# build catching up on its generations after a restart, beside the rest of the suite on two
# cores, took over 30 s twice (the writes arrived later); the times are reported.
CONVERGE_LIMIT = 60
# Generations an entity may hold on a device: the current one, the one whose deletion waits
# until the current one holds KEEP_VERSIONS versions, and slack for a move or a deletion in
# progress.
MAX_HELD = 4
# A kill counts as landing in a cut when a1 logged a cut this long before it.
CUT_WINDOW = 0.25
BAD_WORDS = ("quarantin", "damaged", "corrupt", "unreadable")


class Writers:
    """One thread per (node, keys): writes a counter to each key in turn. A key has one
    writer, so a larger number is always a later write."""

    def __init__(self, seed):
        self.acked = {}  # key -> last acknowledged number
        self.issued = {}  # key -> last number sent
        self.count = 0
        self.problems = []
        self.lock = threading.Lock()
        self.running = True
        self.threads = []
        self.seed = seed

    def add(self, node, keys, pause):
        t = threading.Thread(target=self.run, args=(node, keys, pause, len(self.threads)),
                             daemon=True)
        self.threads.append(t)
        t.start()

    def run(self, node, keys, pause, k):
        enter(node.ns)
        api = Api(node.token(), timeout=3)
        r = rng(self.seed * 100 + k)
        n = 0
        while self.running:
            n += 1
            key = keys[n % len(keys)]
            with self.lock:
                self.issued[key] = n
            try:
                code, body = api.call("PUT", f"/api/entities/{key}", {"state": str(n)})
            except OSError:
                time.sleep(0.05)  # killed or restarting: this write's outcome is unknown
                continue
            if code == 200:
                with self.lock:
                    self.acked[key] = max(self.acked.get(key, 0), n)
                    self.count += 1
            else:
                with self.lock:
                    self.problems.append(f"{node.name} PUT {key} answered {code}: {body}")
                time.sleep(0.2)
            time.sleep(pause * r.uniform(0.5, 1.5))
        api.close()

    def snapshot(self):
        with self.lock:
            return dict(self.acked), dict(self.issued)

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join(10)


def epoch_counter(epoch):
    return int(epoch.split("-")[0], 16)


class Toggler:
    """Shares and unshares TOGGLED with home B on a1, one at a time, without pause."""

    def __init__(self, node, home_b, writers, seed):
        self.node, self.home_b, self.writers = node, home_b, writers
        self.shared = {e: True for e in TOGGLED}  # as last acknowledged (or settled)
        self.cap = {}  # unshared entity -> last number of its writes B may see
        self.share_epoch = {}  # entity -> (epoch, generation) at its last share
        self.unsettled = None  # (entity, op) cut off by a kill
        self.rotations = self.shares = 0
        self.unshare_kills = self.share_kills = 0
        self.failures = []
        self.lock = threading.Lock()
        self.go = threading.Event()
        self.idle = threading.Event()
        self.unsharing = threading.Event()  # set as an unshare is sent
        self.running = True
        self.r = rng(seed * 7)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self):
        self.go.set()
        self.thread.start()

    def pause(self):
        """Stops it before its next operation and waits until it is not in one."""
        self.go.clear()
        self.idle.wait(15)

    def resume(self):
        self.go.set()

    def run(self):
        try:
            self.loop()
        except Exception as e:  # a dead toggler must fail the round, not go quiet
            with self.lock:
                self.failures.append(f"the toggler stopped: {e!r}")
            self.idle.set()

    def loop(self):
        enter(self.node.ns)
        token = self.node.token()
        api = Api(token, timeout=5)
        while self.running:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait(1)
                continue
            self.idle.clear()
            if not self.go.is_set():
                continue
            e = self.r.choice(TOGGLED)
            op = "unshare" if self.shared[e] else "share"
            started = time.time()
            after = None
            try:
                if op == "unshare":
                    self.unsharing.set()
                    code, body = api.call("DELETE", f"/api/shares/{e}/{self.home_b}")
                else:
                    gen = self.generation(api, e)
                    code, body = api.call("POST", "/api/shares", {"entity_id": e, "home": self.home_b})
                    if code == 200:
                        try:
                            after = self.generation(api, e)
                        except OSError:
                            pass  # killed just after the share: its epoch goes unchecked
            except OSError:
                # The kill: this operation may or may not have taken effect.
                with self.lock:
                    self.unsettled = (e, op, started)
                self.go.clear()
                api.close()
                api = Api(token, timeout=5)
                continue
            with self.lock:
                if code != 200:
                    self.failures.append(f"{op} {e} answered {code}: {body}")
                elif op == "unshare":
                    _, issued = self.writers.snapshot()
                    self.cap[e] = issued.get(e, 0)
                    self.shared[e] = False
                    self.rotations += 1
                    before = self.share_epoch.get(e)
                    if before and epoch_counter(body["epoch"]) <= epoch_counter(before[0]):
                        self.failures.append(f"unshare {e} left the key epoch at {body['epoch']} "
                                             f"(shared under {before[0]})")
                else:
                    self.shared[e] = True
                    self.cap.pop(e, None)
                    self.shares += 1
                    before = self.share_epoch.get(e)
                    # A cut can land between the generation read and the share (the
                    # entity was unshared, so a1 may cut it): the share then names the new
                    # generation's first epoch. Only a share whose generation did not move
                    # across it is compared.
                    if (before and before[1] == gen and after == gen
                            and before[0] == body["epoch"]):
                        self.failures.append(f"share {e}: shared again under epoch {body['epoch']} "
                                             f"of generation {gen}, the key it had before it was "
                                             "unshared (the unshare did not rotate it)")
                    if after is None:
                        self.share_epoch.pop(e, None)
                    else:
                        self.share_epoch[e] = (body["epoch"], after)
            time.sleep(self.r.uniform(0.05, 0.2))
        api.close()

    @staticmethod
    def generation(api, e):
        code, body = api.call("GET", f"/api/entities/{e}/storage")
        return body["generation"] if code == 200 else None

    def settle(self, actual, issued_at_kill, killed_at):
        """After a restart: the share state a1 reports against the acknowledged one. An
        operation sent before the kill and not answered may have gone either way; one sent
        after it never reached the node."""
        with self.lock:
            if self.unsettled and self.unsettled[2] >= killed_at:
                self.unsettled = None
            if self.unsettled:
                if self.unsettled[1] == "unshare":
                    self.unshare_kills += 1
                else:
                    self.share_kills += 1
            for e in TOGGLED:
                if self.unsettled and self.unsettled[0] == e:
                    if self.shared[e] and not actual[e]:
                        self.cap[e] = issued_at_kill.get(e, 0)
                    elif actual[e]:
                        self.cap.pop(e, None)
                        if self.unsettled[1] == "share":
                            # Shared under an epoch this never saw.
                            self.share_epoch.pop(e, None)
                    self.shared[e] = actual[e]
                elif actual[e] != self.shared[e]:
                    self.failures.append(f"after a restart {e} is {'shared' if actual[e] else 'unshared'}, "
                                         f"but its last acknowledged operation "
                                         f"{'shared' if self.shared[e] else 'unshared'} it")
                    self.shared[e] = actual[e]
            self.unsettled = None
            return dict(self.shared), dict(self.cap)

    def stop(self):
        self.running = False
        self.go.set()
        self.thread.join(15)


def read_all(node, keys, storage=False):
    """GET every key on `node` from one connection: {key: (code, body)}."""
    def go():
        api = Api(node.token(), timeout=10)
        try:
            out = {}
            for k in keys:
                out[k] = api.call("GET", f"/api/entities/{k}" + ("/storage" if storage else ""))
            return out
        finally:
            api.close()
    return in_ns(node.ns, go)


def shared_now(node, home_b):
    code, body = node.call("GET", "/api/shares")
    if code != 200:
        raise Failure(f"rotation: GET /api/shares on {node.name} answered {code}: {body}")
    on = {s["entity_id"] for s in body["shared_out"] if s["home"] == home_b and s["rights"] != "none"}
    return {e: e in on for e in TOGGLED}


def diagnose(a1, a2, b1, home_b):
    """Logs what the devices say about their peers, shares and generations."""
    for n in (a1, a2, b1):
        st = n.status() or {}
        log(f"rotation: {n.name} peers: {json.dumps(st.get('peers'))[:800]}")
        code, body = n.call("GET", "/api/shares")
        log(f"rotation: {n.name} shares: {json.dumps(body)[:1500]}")
        for key, (c, bd) in read_all(n, ALL, storage=True).items():
            log(f"rotation: {n.name} {key} storage: {c} {bd}")
    code, body = a1.call("GET", "/api/audit?limit=60")
    for e in (body or {}).get("entries", [])[-60:]:
        log(f"rotation: a1 audit {e}")


def wait_for_cut(node, limit):
    """Returns as soon as `node` logs its next cut (or after `limit` seconds)."""
    deadline = time.monotonic() + limit
    with open(node.log, errors="replace") as f:
        f.seek(0, 2)
        while time.monotonic() < deadline:
            line = f.readline()
            if not line:
                time.sleep(0.002)
            elif '"cut a new generation"' in line:
                return True
    return False


def cut_times(node):
    """Wall-clock times of the cuts `node` logged."""
    out = []
    with open(node.log, errors="replace") as f:
        for line in f:
            if '"cut a new generation"' not in line:
                continue
            try:
                ts = json.loads(line)["timestamp"]
                out.append(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
            except (ValueError, KeyError):
                pass
    return out


def run(ctx, table):
    kills = 200 if ctx.full else 10
    lan = Lan(f"{ctx.tag}r", 3, "10.246.0")
    level = "info,hearth::entities::generations=debug"
    a1, a2, b1 = (Node(ctx.bin, lan.names[i], f"{ctx.work}/rotation/{name}", f"rotation-{name}",
                       log_level=level) for i, name in enumerate(("a1", "a2", "b1")))
    nodes = [a1, a2, b1]
    listen = lambda i: f"/ip4/{lan.ip(i)}/tcp/{PEER_PORT}"  # noqa: E731
    make_home([a1, a2], listen)
    make_home([b1], lambda i: listen(2))
    flags = ["--history-cut-changes", CUT_CHANGES, "--history-keep-versions", KEEP_VERSIONS]
    for i, n in enumerate(nodes):
        n.start("--listen", listen(i), *flags)
    code, body = a1.call("POST", "/api/invites", {"kind": "home"})
    if code != 200:
        raise Failure(f"rotation: home invite answered {code}: {body}")
    code, body = b1.call("POST", "/api/pair", {"code": body["code"]})
    if code != 200:
        raise Failure(f"rotation: pairing the homes answered {code}: {body}")
    home_b = b1.status()["home"]["home_id"]

    def setup():
        api = Api(a1.token(), timeout=10)
        for key in ALL:
            c, bd = api.call("PUT", f"/api/entities/{key}", {"state": "0"})
            if c != 200:
                raise Failure(f"rotation: PUT {key} answered {c}: {bd}")
        for key in TOGGLED + [SENTINEL, FROM_B]:
            c, bd = api.call("POST", "/api/shares", {"entity_id": key, "home": home_b})
            if c != 200:
                raise Failure(f"rotation: sharing {key} answered {c}: {bd}")
        api.close()

    in_ns(a1.ns, setup)
    deadline = time.monotonic() + 60
    while True:
        got_a2 = read_all(a2, ALL)
        got_b1 = read_all(b1, TOGGLED + [SENTINEL, FROM_B])
        if all(c == 200 for c, _ in got_a2.values()) and all(c == 200 for c, _ in got_b1.values()):
            break
        if time.monotonic() > deadline:
            raise Failure("rotation: a2 and b1 did not hold the entities within 60 s of the setup")
        time.sleep(0.2)

    writers = Writers(ctx.seed)
    writers.add(a1, TOGGLED + [SENTINEL], 0.01)
    writers.add(a1, LOCAL_A1, 0.01)
    writers.add(a2, LOCAL_A2, 0.02)
    writers.add(b1, [FROM_B], 0.05)
    toggler = Toggler(a1, home_b, writers, ctx.seed)
    toggler.start()
    r = rng(ctx.seed)
    kill_times, converge, unreadable, leaks = [], [], [], []
    max_held = {n.name: 0 for n in (a1, a2)}
    max_changes = 0  # of the entities that are never shared, so cut
    both = 0
    try:
        for k in range(1, kills + 1):
            # Rounds take turns: a kill at a random moment, one just after a cut is logged
            # (its store batch is likely still on its way), one just after an unshare was
            # sent (the rotation is likely under way).
            kind = ("random", "cut", "unshare")[k % 3]
            time.sleep(r.uniform(0.5, 1.8) if kind == "random" else r.uniform(0.2, 0.8))
            if kind == "cut":
                wait_for_cut(a1, 5)
                time.sleep(r.uniform(0, 0.02))
            elif kind == "unshare":
                toggler.unsharing.clear()
                toggler.unsharing.wait(5)
                time.sleep(r.uniform(0, 0.03))
            victims = [a1] + ([a2] if k % 4 == 0 else [])
            both += len(victims) > 1
            for v in victims:
                v.kill()
            kill_times.append(time.time())
            toggler.pause()
            acked, issued_at_kill = writers.snapshot()
            for v in victims:
                v.restart()
            for v in victims:
                v.wait_ready()
            t_ready = time.monotonic()
            # The restarted admin device answers every entity and holds its own writes.
            own = read_all(a1, ALL)
            for key, (c, bd) in own.items():
                if c != 200 or not isinstance(bd, dict) or "state" not in bd:
                    unreadable.append(f"round {k}: a1 GET {key} answered {c}: {bd}")
            for key in (TOGGLED + [SENTINEL] + LOCAL_A1):
                c, bd = own[key]
                if c == 200 and int(bd["state"]) < acked.get(key, 0):
                    raise Failure(f"rotation round {k}: the restarted a1 lost acknowledged writes to "
                                  f"{key}: {bd['state']} < {acked[key]}")
            if a2 in victims:
                got = read_all(a2, LOCAL_A2)
                for key in LOCAL_A2:
                    c, bd = got[key]
                    if c != 200 or int(bd["state"]) < acked.get(key, 0):
                        raise Failure(f"rotation round {k}: the restarted a2 lost acknowledged writes "
                                      f"to {key}: {c} {bd}")
            if unreadable:
                raise Failure(f"rotation round {k}: entities unreadable: {unreadable[:3]}")
            shared, cap = toggler.settle(shared_now(a1, home_b), issued_at_kill, kill_times[-1])
            # Every device holds every acknowledged write it should, and reads every entity.
            want, _ = writers.snapshot()
            on_b = [e for e in TOGGLED if shared[e]] + [SENTINEL, FROM_B]
            views = {}
            while True:
                views = {a1.name: read_all(a1, ALL), a2.name: read_all(a2, ALL),
                         b1.name: read_all(b1, ALL)}
                lacking = []
                for n in nodes:
                    for key, (c, bd) in views[n.name].items():
                        if c == 404 and n is b1 and key not in on_b:
                            continue
                        if c not in (200, 404):
                            unreadable.append(f"round {k}: {n.name} GET {key} answered {c}: {bd}")
                        elif c == 404:
                            lacking.append(f"{n.name} {key}: absent")
                        elif "state" not in bd:
                            unreadable.append(f"round {k}: {n.name} GET {key} has no state: {bd}")
                        elif (n is not b1 or key in on_b) and int(bd["state"]) < want.get(key, 0):
                            lacking.append(f"{n.name} {key}: {bd['state']}/{want[key]}")
                if unreadable:
                    raise Failure(f"rotation round {k}: entities unreadable: {unreadable[:3]}")
                if not lacking:
                    break
                if time.monotonic() - t_ready > CONVERGE_LIMIT:
                    diagnose(a1, a2, b1, home_b)
                    raise Failure(f"rotation round {k}: {CONVERGE_LIMIT}s after the restart devices "
                                  f"lack acknowledged writes: {lacking[:6]}")
                time.sleep(0.1)
            converge.append(time.monotonic() - t_ready)
            # What is not shared with B now shows there nothing written after its unshare.
            for key in ALL:
                c, bd = views[b1.name][key]
                if key in on_b or c != 200:
                    continue
                if key not in TOGGLED:
                    leaks.append(f"round {k}: never-shared {key} is on b1")
                elif int(bd["state"]) > cap.get(key, 0):
                    leaks.append(f"round {k}: {key} on b1 shows write {bd['state']}, started after "
                                 f"its unshare (last before: {cap.get(key, 0)})")
            if leaks:
                raise Failure(f"rotation round {k}: writes reached home B after an unshare: {leaks[:3]}")
            for n in (a1, a2):
                for key, (c, bd) in read_all(n, ALL, storage=True).items():
                    if c != 200:
                        raise Failure(f"rotation round {k}: {n.name} GET {key}/storage answered {c}: {bd}")
                    max_held[n.name] = max(max_held[n.name], bd["generations_held"])
                    if key in LOCAL_A1 + LOCAL_A2:
                        max_changes = max(max_changes, bd["changes"])
            if max(max_held.values()) > MAX_HELD:
                raise Failure(f"rotation round {k}: an entity holds {max(max_held.values())} "
                              f"generations (at most {MAX_HELD})")
            if toggler.failures:
                raise Failure(f"rotation round {k}: {toggler.failures[0]}")
            if writers.problems:
                raise Failure(f"rotation round {k}: {writers.problems[0]}")
            toggler.resume()
            if k % 4 == 0 or k == kills:
                log(f"rotation: {k}/{kills} kills, {writers.count} writes, {toggler.rotations} "
                    f"rotations acknowledged")
    finally:
        toggler.stop()
        writers.stop()
    # After the load: a1 and a2 agree on every entity, b1 with them on what it is shared.
    acked, _ = writers.snapshot()
    shared = toggler.shared
    on_b = [e for e in TOGGLED if shared[e]] + [SENTINEL, FROM_B]
    stopped = time.monotonic()
    while True:
        v = {n.name: {k: (bd or {}).get("version") for k, (_, bd) in read_all(n, ALL).items()}
             for n in nodes}
        if v[a1.name] == v[a2.name] and all(v[b1.name][e] == v[a1.name][e] for e in on_b):
            break
        if time.monotonic() - stopped > 15:
            raise Failure(f"rotation: 15 s after the load the devices disagree: a1 {v[a1.name]}, "
                          f"a2 {v[a2.name]}, b1 {v[b1.name]}")
        time.sleep(0.2)
    final = {k: bd for k, (c, bd) in read_all(a1, ALL, storage=True).items()}
    for n in nodes:
        n.stop()
    cuts_logged = cut_times(a1)
    in_cut = sum(1 for t in kill_times if any(t - CUT_WINDOW <= c <= t for c in cuts_logged))
    generations = sum(bd["generation"] for bd in final.values())
    bad, other, panics, refused = [], [], [], 0
    for n in nodes:
        with open(n.log, errors="replace") as f:
            for line in f:
                if "panicked" in line:
                    panics.append(f"{n.name}: {line.strip()[:200]}")
                if "generation refused" in line:
                    refused += 1
        for line in n.error_lines():
            (bad if any(w in line.lower() for w in BAD_WORDS) else other).append(f"{n.name}: {line[:200]}")
    params = (f"2 homes (2 + 1 devices), cut every {CUT_CHANGES} changes, {kills} SIGKILLs of the "
              f"admin device (random, after a cut, after an unshare in turn; {both} with a2 too)")
    table.add("rotation", params, "pass: every entity readable, 0 acknowledged writes lost",
              f"{writers.count} writes acknowledged; {toggler.rotations} unshares (key rotations) and "
              f"{toggler.shares} shares acknowledged; kills with an unshare in flight: "
              f"{toggler.unshare_kills}, with a share in flight: {toggler.share_kills}; no write after "
              f"an unshare reached home B")
    table.add("cut", params, "pass: every entity readable on all devices after every restart",
              f"{len(cuts_logged)} cuts logged by a1, {generations} generations now across "
              f"{len(ALL)} entities (so {max(0, len(cuts_logged) - generations)} cuts lost to a kill "
              f"before they were stored, and made again); {in_cut} of {kills} kills within {CUT_WINDOW * 1000:.0f} ms after "
              f"a cut; generations held per entity max {max(max_held.values())} (bound {MAX_HELD}), "
              f"changes held per never-shared entity max {max_changes}; {refused} generations refused")
    table.add("rotation", "restart -> every device holds every acknowledged write", "report",
              f"median {sorted(converge)[len(converge) // 2]:.2f}s, max {max(converge):.2f}s from a1 "
              "answering")
    if panics:
        raise Failure(f"rotation: panics in the logs: {panics[0]}")
    if bad:
        raise Failure(f"rotation: ERROR lines about damaged documents: {bad[0]}")
    if other:
        table.add("rotation", "other ERROR lines in the logs", "note", f"{len(other)}: {other[0]}")
