#!/usr/bin/env python3
"""A client of seed 001's realtime coordination agent, written against the seed's
documented messages and routes only, driving two devices of one Hearth home.

It starts two nodes on loopback (mDNS off; the second joins the first with an invite
code), then speaks the seed's protocol to both: the WebSocket /ws/{user_id}?device_id=,
every client message (heartbeat, sync_state, send_message, presence) and every server
message (connected, state_update, chat_message, notification), and the REST routes
(/notify, /broadcast/{room_id}, /sync-state, /create-room, /join-room,
/presence/{user_id}, /room/{room_id}, /health). The only changes from the seed's own
client are the base URL and the token.

Usage: client.py HEARTH_BIN
Needs python3 and the `websockets` package (Debian: python3-websockets).
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import websockets

TIMEOUT = 30


def fail(message):
    print(f"seed001: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


class Node:
    def __init__(self, binary, data, name):
        self.binary, self.data, self.name = binary, data, name
        self.proc = None

    def up(self):
        log = open(os.path.join(self.data + ".log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "up", "--data", self.data, "--no-mdns", "--name", self.name,
             "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0",
             "--session-ttl", "2s"],
            stdout=log, stderr=log)
        addr_file = os.path.join(self.data, "api.addr")
        deadline = time.time() + TIMEOUT
        while not os.path.exists(addr_file):
            check(self.proc.poll() is None, f"{self.name} exited at start")
            check(time.time() < deadline, f"{self.name} never wrote api.addr")
            time.sleep(0.1)
        time.sleep(0.2)
        self.base = "http://" + open(addr_file).read().strip()
        self.ws_base = self.base.replace("http://", "ws://")
        self.token = open(os.path.join(self.data, "token")).read().strip()

    def run(self, *args):
        out = subprocess.run([self.binary, *args, "--data", self.data],
                             capture_output=True, text=True, timeout=TIMEOUT)
        check(out.returncode == 0, f"hearth {' '.join(args)}: {out.stderr}")
        return out.stdout.strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def http(self, method, path, body=None, token=True):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def socket(self, user, device):
        return websockets.connect(
            f"{self.ws_base}/ws/{user}?device_id={device}",
            extra_headers={"Authorization": f"Bearer {self.token}"})


async def next_of(ws, kind):
    """The next message of `kind`, skipping others."""
    deadline = time.time() + TIMEOUT
    while True:
        left = deadline - time.time()
        check(left > 0, f"no {kind} message arrived")
        msg = json.loads(await asyncio.wait_for(ws.recv(), left))
        check(isinstance(msg.get("timestamp"), float), f"no float timestamp: {msg}")
        if msg["type"] == kind:
            return msg


async def send(ws, kind, data):
    await ws.send(json.dumps({"type": kind, "data": data}))


async def until(what, probe):
    deadline = time.time() + TIMEOUT
    while not probe():
        check(time.time() < deadline, what)
        await asyncio.sleep(0.1)


async def scenario(a, b):
    # Health needs no token; the rest do.
    status, health = a.http("GET", "/health", token=False)
    check(status == 200 and health["status"] == "healthy", f"health: {health}")
    status, _ = a.http("GET", "/presence/ann", token=False)
    check(status == 401, f"a route without the token answered {status}")

    # The users document reaches the second device from the first.
    await until("b never got the users document",
                lambda: b.http("POST", "/sync-state", {"user_id": "probe", "device_id": "p",
                                                       "state": {}})[0] == 200)

    async with a.socket("ann", "web1") as web, b.socket("ann", "phone1") as phone, \
            b.socket("bob", "tab1") as bob:
        for ws, device in ((web, "web1"), (phone, "phone1"), (bob, "tab1")):
            hello = await next_of(ws, "connected")
            check(hello["data"]["device_id"] == device, f"connected: {hello}")
            check("session_id" in hello["data"], f"connected: {hello}")

        await send(web, "heartbeat", {})
        await next_of(web, "heartbeat_ack")

        # Multi-device synchronisation: state follows ann to her phone on the other device.
        await send(web, "sync_state", {"state": {"progress": 0.75, "current_lesson": "lesson_5"}})
        update = await next_of(phone, "state_update")
        check(update["data"]["state"]["progress"] == 0.75, f"state_update: {update}")
        check(update["data"]["source_device"] == "web1", f"state_update: {update}")
        status, body = b.http("POST", "/sync-state", {"user_id": "ann", "device_id": "phone1",
                                                      "state": {"progress": 0.8}})
        check(status == 200 and body == {"success": True, "user_id": "ann",
                                         "device_id": "phone1"}, f"/sync-state: {body}")
        update = await next_of(web, "state_update")
        check(update["data"]["state"] == {"progress": 0.8}, f"state_update: {update}")

        # Study rooms and chat.
        status, room = a.http("POST", "/create-room", {"room_name": "Math Study Group",
                                                       "creator_id": "ann", "max_size": 20})
        check(status == 200 and room["success"], f"/create-room: {room}")
        room_id = room["room_id"]
        status, joined = a.http("POST", "/join-room", {"room_id": room_id, "user_id": "bob"})
        check(status == 200 and joined["user_id"] == "bob", f"/join-room: {joined}")
        status, info = a.http("GET", f"/room/{room_id}")
        check(status == 200 and info["member_count"] == 2 and info["is_active"], f"/room: {info}")
        check(info["room_name"] == "Math Study Group" and info["creator_id"] == "ann", f"{info}")
        await until("the room never reached b",
                    lambda: b.http("GET", f"/room/{room_id}")[1].get("member_count") == 2)
        await send(bob, "send_message", {"room_id": room_id, "message": "Great question!"})
        for ws in (web, phone, bob):
            chat = await next_of(ws, "chat_message")
            check(chat["sender_id"] == "bob" and chat["message"] == "Great question!",
                  f"chat_message: {chat}")
        status, sent = a.http("POST", f"/broadcast/{room_id}",
                              {"message": {"text": "Study session starting!",
                                           "type": "announcement"}, "sender_id": "ann"})
        check(status == 200 and sent["success"] and sent["sent_count"] == 2, f"/broadcast: {sent}")
        chat = await next_of(bob, "chat_message")
        check(chat["message"] == "Study session starting!", f"chat_message: {chat}")

        # Presence.
        await send(web, "presence", {"status": "away"})
        await until("presence never showed away",
                    lambda: a.http("GET", "/presence/ann")[1].get("status") == "away")
        status, p = a.http("GET", "/presence/ann")
        check(p == {"user_id": "ann", "status": "away", "is_online": True}, f"/presence: {p}")

        # Notifications reach every socket of the user, on both devices.
        status, body = b.http("POST", "/notify", {
            "user_id": "ann", "type": "milestone_achieved", "priority": "high",
            "title": "Congratulations!", "body": "You completed Chapter 1",
            "data": {"chapter": 1}, "ttl": 86400})
        check(status == 200 and body["success"] and body["type"] == "milestone_achieved",
              f"/notify: {body}")
        for ws in (web, phone):
            n = await next_of(ws, "notification")
            check(n["data"]["title"] == "Congratulations!" and n["data"]["priority"] == "high",
                  f"notification: {n}")

    # At most five clients of one user across the home; the sixth is refused.
    sockets = []
    for i in range(5):
        node = a if i % 2 == 0 else b
        ws = await node.socket("carl", f"c{i}").__aenter__()
        await next_of(ws, "connected")
        sockets.append(ws)

    def live_sessions():
        status, state = a.http("GET", "/api/users/carl/state")
        return status == 200 and sum(1 for s in state["sessions"] if s["live"]) == 5
    await until("the five sessions never all reached a", live_sessions)
    sixth = await a.socket("carl", "c5").__aenter__()
    try:
        msg = await asyncio.wait_for(sixth.recv(), TIMEOUT)
        fail(f"the sixth client got {msg}")
    except websockets.exceptions.ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else e.code
        check(code == 1008, f"the sixth client was closed with {code}")
    for ws in sockets:
        await ws.close()
    print("seed001: every message and route of the seed answered as the seed documents")


def main():
    if len(sys.argv) != 2:
        fail("usage: client.py HEARTH_BIN")
    binary = sys.argv[1]
    work = tempfile.mkdtemp(prefix="hearth-seed001-")
    a = Node(binary, os.path.join(work, "a"), "a")
    b = Node(binary, os.path.join(work, "b"), "b")
    try:
        a.up()
        code = a.run("invite").splitlines()[-1]
        subprocess.run([binary, "join", code, "--data", b.data, "--name", "b"],
                       check=True, capture_output=True, timeout=TIMEOUT)
        b.up()
        asyncio.run(scenario(a, b))
    except BaseException:
        for node in (a, b):
            log = node.data + ".log"
            if os.path.exists(log):
                print(f"--- {node.name} log (tail)", file=sys.stderr)
                print(open(log, errors="replace").read()[-4000:], file=sys.stderr)
        raise
    finally:
        a.stop()
        b.stop()
        if not os.environ.get("KEEP_LOGS"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
