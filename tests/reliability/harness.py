"""Shared machinery of the reliability suite: namespaces, nodes, API calls, the figures table.

Every node runs in a network namespace this suite made, so each can use the default API port
(127.0.0.1:8012) and peer port on its own loopback and LAN address, and mDNS, where a scenario
turns it on, never leaves those namespaces. The harness itself stays in the root namespace and
reaches a node's API from a thread that has entered the node's namespace (setns(2) changes the
namespace of the calling thread only), so polling costs one HTTP request, not a process.
"""

import ctypes
import http.client
import json
import os
import random
import signal
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
API_PORT = 8012
PEER_PORT = 4640
_libc = ctypes.CDLL(None, use_errno=True)

# Everything made by this run, torn down by `cleanup` whatever happens.
_NAMESPACES = []
_PROCESSES = []
_LOCK = threading.Lock()


class Failure(Exception):
    """A scenario's check did not hold."""


def log(msg):
    print(f"reliability: {msg}", flush=True)


def sh(*args, check=True, timeout=30, ns=None):
    """Runs a command (inside namespace `ns` when given) and returns its stdout."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise Failure(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def enter(ns):
    """Moves the calling thread into namespace `ns`. Only ever called on threads the harness
    starts for that purpose, never on the main thread."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


def in_ns(ns, fn, *args):
    """Runs fn(*args) on a fresh thread inside namespace `ns` and returns its result."""
    box = {}

    def run():
        try:
            enter(ns)
            box["value"] = fn(*args)
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Lan:
    """A hub namespace holding a bridge, and node namespaces joined to it by veth pairs.

    Nothing is created in, or attached to, the root namespace: each veth is made inside the
    hub with its other end placed straight into the node's namespace."""

    def __init__(self, tag, count, subnet):
        self.tag = tag
        self.subnet = subnet
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-n{i}" for i in range(1, count + 1)]
        self._add(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names, 1):
            self._add(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
            sh("ip", "-n", self.hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
               "netns", name)
            sh("ip", "-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", name, "addr", "add", f"{self.ip(i - 1)}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            # mDNS sends to 224.0.0.251; with no default route the kernel needs this one.
            sh("ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def _add(self, name):
        sh("ip", "netns", "add", name)
        with _LOCK:
            _NAMESPACES.append(name)

    def ip(self, index):
        return f"{self.subnet}.{11 + index}"


def spawn(args, ns, logfile, env=None):
    """Starts a process inside `ns`, its output appended to `logfile`; returns the Popen.

    `ip netns exec` execs the command, so the pid is the process's own."""
    out = open(logfile, "ab")
    p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(a) for a in args], stdout=out,
                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out.close()
    with _LOCK:
        _PROCESSES.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10):
    """Stops one process this harness started; True if it went on `sig` within `timeout`."""
    if p.poll() is not None:
        return True
    try:
        p.send_signal(sig)
        p.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return False


def cleanup():
    """Kills every process and deletes every namespace this run made."""
    with _LOCK:
        procs, names = list(_PROCESSES), list(_NAMESPACES)
        _PROCESSES.clear()
        _NAMESPACES.clear()
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Api:
    """A persistent HTTP connection to one node's API, usable only on a thread inside the
    node's namespace (or the root namespace for nodes there)."""

    def __init__(self, token, host="127.0.0.1", port=API_PORT, timeout=5):
        self.token = token
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def call(self, method, path, body=None, raw=False):
        """Returns (status, parsed JSON or None; the text with `raw`). Raises OSError when the
        node is unreachable."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                data = None if body is None else json.dumps(body).encode()
                headers = {"Authorization": f"Bearer {self.token}"}
                if data is not None:
                    headers["Content-Type"] = "application/json"
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if raw:
                    return r.status, data.decode(errors="replace")
                try:
                    parsed = json.loads(data) if data else None
                except ValueError:
                    parsed = None
                return r.status, parsed
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                # A kept-alive connection the server closed fails once; a fresh one decides.
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Node:
    """One hearth node in a namespace, with a data dir that outlives its processes."""

    def __init__(self, bin_path, ns, data, name, log_level=None):
        # RELIABILITY_LOG sets every node's RUST_LOG where a scenario does not.
        log_level = log_level or os.environ.get("RELIABILITY_LOG", "info")
        self.bin = bin_path
        self.ns = ns
        self.data = data
        self.name = name
        self.log = f"{data}.log"
        self.proc = None
        self.args = []
        self.peer_id = None
        self.log_level = log_level
        os.makedirs(data, exist_ok=True)

    def cli(self, *args, timeout=30):
        return sh(self.bin, *args, "--data", self.data, ns=self.ns, timeout=timeout)

    def start(self, *args, wait=True):
        """Starts `hearth up` with `args` (kept for restarts); returns the time it was launched."""
        self.args = list(args)
        env = dict(os.environ, RUST_LOG=self.log_level)
        t0 = time.monotonic()
        self.proc = spawn([self.bin, "up", "--data", self.data, "--name", self.name,
                           "--log-format", "json", *args], self.ns, self.log, env)
        if wait:
            self.wait_ready()
        return t0

    def restart(self):
        return self.start(*self.args, wait=False)

    def token(self):
        with open(os.path.join(self.data, "token")) as f:
            return f.read().strip()

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"{self.name} exited during start-up ({self.proc.returncode}); see {self.log}")
            try:
                st = self.status()
                # api.addr is what the CLI finds the node by; it may land just after.
                if st and st.get("peer_id") and os.path.exists(os.path.join(self.data, "api.addr")):
                    self.peer_id = st["peer_id"]
                    return st
            except (OSError, http.client.HTTPException, FileNotFoundError):
                pass
            time.sleep(0.02)
        raise Failure(f"{self.name} did not answer within {timeout}s; see {self.log}")

    def call(self, method, path, body=None, raw=False):
        """One API call from a thread in the node's namespace (a fresh connection)."""
        token = self.token()

        def go():
            api = Api(token)
            try:
                return api.call(method, path, body, raw)
            finally:
                api.close()

        return in_ns(self.ns, go)

    def status(self):
        code, body = self.call("GET", "/api/status")
        return body if code == 200 else None

    def entities(self):
        code, body = self.call("GET", "/api/entities")
        if code != 200:
            raise Failure(f"{self.name}: GET /api/entities answered {code}: {body}")
        return {e["id"]: e for e in body["entities"]}

    def kill(self):
        stop(self.proc, signal.SIGKILL)

    def stop(self):
        if self.proc is not None and not stop(self.proc):
            raise Failure(f"{self.name} did not stop within 10 s of SIGTERM")

    def rss_kib(self):
        """Resident set size of the running node, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def disk_kib(self):
        total = 0
        for root, _, files in os.walk(self.data):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total // 1024

    def error_lines(self):
        """The node's log lines at ERROR level."""
        bad = []
        with open(self.log, errors="replace") as f:
            for line in f:
                if line.startswith("{") and '"level":"ERROR"' in line:
                    bad.append(line.strip())
        return bad


def make_home(nodes, listen):
    """nodes[0] creates a home, the others join it with device codes. Every node is left stopped.

    `listen(i)` is the listen multiaddr of node i during pairing."""
    first = nodes[0]
    first.start("--no-mdns", "--listen", listen(0))
    try:
        for i, n in enumerate(nodes[1:], 1):
            code = first.cli("invite").strip()
            sh(n.bin, "join", code, "--data", n.data, "--name", n.name, ns=n.ns)
            n.start("--no-mdns", "--listen", listen(i),
                    "--peer", f"{listen(0)}/p2p/{first.peer_id}")
            n.stop()
    finally:
        first.stop()


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def slope_per_min(samples):
    """Least-squares slope of (minutes, value) samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    den = sum((x - mx) ** 2 for x, _ in samples)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in samples) / den


class Table:
    """The figures printed at the end: one row per check."""

    def __init__(self):
        self.rows = []
        self.lock = threading.Lock()

    def add(self, scenario, params, result, figure):
        with self.lock:
            self.rows.append((scenario, params, result, figure))
        log(f"{scenario}: {result}: {figure} ({params})")

    def render(self):
        head = ("scenario", "parameters", "result", "figure")
        rows = [head] + self.rows
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = []
        for k, r in enumerate(rows):
            lines.append(" | ".join(r[i].ljust(widths[i]) for i in range(4)))
            if k == 0:
                lines.append("-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def rng(seed):
    return random.Random(seed)
