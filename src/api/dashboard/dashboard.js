// The dashboard: reads the node's /api routes with the session cookie, keeps them live
// over /api/ws, and writes through the same routes. Every value from the node (names,
// states, messages from other homes) goes into the page as text, never as markup.
"use strict";

const POLL_MS = 5000; // peer lag and the audit tail change without events
const CHAT_LIMIT = 30;
const AUDIT_LIMIT = 20;
const TOGGLE_DOMAINS = ["switch", "light", "fan", "input_boolean"];

const view = {
  status: null,
  devices: [],
  homes: [],
  shares: { shared_out: [], shared_in: [] },
  entities: new Map(),
  rooms: [],
  room: null, // the room whose chat is shown
  chat: [],
  presence: new Map(),
  audit: [],
};

// ----- helpers ----------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function tbody(id) {
  return document.querySelector(`#${id} tbody`);
}

function short(id) {
  return id && id.length > 16 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id || "";
}

function deviceName(peer) {
  const d = view.devices.find((x) => x.peer_id === peer);
  if (d) return d.name;
  const h = view.homes.find((x) => x.devices.includes(peer));
  return h ? `${short(peer)} (${h.name})` : short(peer);
}

function homeName(home) {
  if (view.status && home === view.status.home.home_id) return "this home";
  const h = view.homes.find((x) => x.home_id === home);
  return h ? h.name : short(home);
}

function ago(ms) {
  if (ms === null || ms === undefined) return "-";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}

function when(t) {
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleTimeString();
}

function problem(text) {
  const p = document.getElementById("problem");
  p.textContent = text || "";
  p.hidden = !text;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (method !== "GET") {
    // The node refuses a cookie-authenticated change without this header.
    init.headers["X-Hearth-Csrf"] = "1";
  }
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    // The session ended (expired, logged out, node restarted): back to the login page.
    location.replace("/");
    throw new Error("logged out");
  }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error((data && data.detail) || `${method} ${path}: ${res.status}`);
  return data;
}

// Reads that overlap (an event's reload while a timer's is in flight) may answer out of
// order: only the answer to the latest read of each kind is used.
const reads = {};
async function latest(kind, path) {
  const n = (reads[kind] = (reads[kind] || 0) + 1);
  const data = await api("GET", path);
  return n === reads[kind] ? data : null;
}

// Runs a section's loader; a failure shows in the section, not over the whole page.
async function load(section, loader) {
  const box = document.getElementById(section);
  try {
    await loader();
    box.classList.remove("failed");
    box.removeAttribute("title");
  } catch (e) {
    box.classList.add("failed");
    box.title = String(e.message || e);
  }
}

// ----- this node, devices, peers ----------------------------------------------------

async function loadStatus() {
  const status = await latest("status", "/api/status");
  if (!status) return;
  view.status = status;
  renderNode();
  renderPeers();
}

async function loadDevices() {
  const devices = await latest("devices", "/api/devices");
  if (!devices) return;
  view.devices = devices.devices;
  renderDevices();
  renderAudit();
  renderPeers();
}

function renderNode() {
  const s = view.status;
  document.getElementById("home-name").textContent = `· ${s.home.name}`;
  document.title = `Hearth · ${s.home.name}`;
  const facts = [
    ["Device", s.device],
    ["PeerId", s.peer_id],
    ["Home", `${s.home.name} (${short(s.home.home_id)})`],
    ["Version", s.version],
    ["Up for", ago(Math.round(s.uptime_s * 1000))],
    ["API", s.api],
    ["Listening", s.listen.join(", ") || "-"],
    ["Store", s.store.health + (s.store.reason ? `: ${s.store.reason}` : "")],
  ];
  if (s.store.quarantined.length) {
    facts.push(["Quarantined", `${s.store.quarantined.length} document(s); see hearth repair`]);
  }
  const dl = document.getElementById("node-facts");
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderDevices() {
  const peers = (view.status && view.status.peers) || [];
  tbody("devices").replaceChildren(
    ...view.devices.map((d) => {
      const peer = peers.find((p) => p.peer_id === d.peer_id);
      let state = d.this_device ? "this device" : peer && peer.connected ? "connected" : "away";
      if (d.revoked) state = "revoked";
      return el(
        "tr",
        { dataset: { device: d.peer_id }, class: d.revoked ? "revoked" : "" },
        el("td", {}, d.name, d.verified ? null : el("span", { class: "badge warn" }, "unverified")),
        el("td", { class: "mono", title: d.peer_id }, short(d.peer_id)),
        el("td", {}, d.admin ? "admin" : "member"),
        el("td", {}, state),
      );
    }),
  );
}

function renderPeers() {
  if (!view.status) return;
  const rows = view.status.peers.map((p) => {
    const link = p.connected ? (p.admitted ? "admitted" : "connected") : p.discovered ? "discovered" : "dialling";
    return el(
      "tr",
      { dataset: { peer: p.peer_id, link } },
      el("td", { title: p.peer_id }, deviceName(p.peer_id)),
      el("td", {}, el("span", { class: `badge ${p.admitted ? "on" : "off"}` }, link)),
      el("td", {}, ago(p.last_heard_ms)),
      el("td", { class: "docs-behind" }, p.docs_behind === null || p.docs_behind === undefined ? "-" : p.docs_behind),
    );
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "no peers")));
  tbody("peers").replaceChildren(...rows);
  renderDevices();
}

// ----- paired homes and shares ------------------------------------------------------

async function loadHomes() {
  const [homes, shares] = await Promise.all([latest("homes", "/api/homes"), latest("shares", "/api/shares")]);
  if (!homes || !shares) return;
  view.homes = homes.homes;
  view.shares = shares;
  renderHomes();
  renderEntities();
  renderAudit();
}

function renderHomes() {
  const box = document.querySelector("#homes .body");
  if (!view.homes.length) {
    box.replaceChildren(el("p", { class: "empty" }, "No paired homes. Pair one with hearth invite --home and hearth join."));
    return;
  }
  box.replaceChildren(
    ...view.homes.map((h) => {
      const out = view.shares.shared_out.filter((s) => s.home === h.home_id);
      const inn = view.shares.shared_in.filter((s) => s.owner === h.home_id);
      const item = (id, rights, extra) => el("li", {}, el("span", { class: "mono" }, id), ` ${rights}`, extra || "");
      return el(
        "div",
        { class: "home", dataset: { home: h.home_id } },
        el("h3", {}, h.name, " ", el("span", { class: "mono dim" }, short(h.home_id))),
        el("p", { class: "dim" }, `${h.devices.length} device(s)`,
          h.revoked_devices.length ? `, ${h.revoked_devices.length} revoked` : ""),
        el("div", { class: "cols" },
          el("div", {}, el("h4", {}, "We share"),
            el("ul", {}, out.length ? out.map((s) => item(s.entity_id, s.rights, ` · ${s.policy}`)) : el("li", { class: "empty" }, "nothing"))),
          el("div", {}, el("h4", {}, "They share"),
            el("ul", {}, inn.length ? inn.map((s) => item(s.entity_id, s.rights, s.revoked ? " (revoked)" : "")) : el("li", { class: "empty" }, "nothing")))),
      );
    }),
  );
}

// ----- entities ---------------------------------------------------------------------

// Entities changed by live updates since the latest list read began: the list may predate
// them, so their live copy wins.
let patched = new Set();

async function loadEntities() {
  const since = (patched = new Set());
  const list = await latest("entities", "/api/entities");
  if (!list) return;
  const fresh = new Map(list.entities.map((e) => [e.id, e]));
  for (const id of since) {
    const live = view.entities.get(id);
    if (live) fresh.set(id, live);
  }
  view.entities = fresh;
  renderEntities();
}

// What this node may do to an entity: its own home's are writable; another home's as
// the share grants.
function rights(e) {
  if (!view.status || e.owner === view.status.home.home_id) return "write";
  const s = view.shares.shared_in.find((x) => x.entity_id === e.id && x.owner === e.owner);
  return s && !s.revoked ? s.rights : "read";
}

async function writeState(id, state) {
  try {
    const e = await api("PUT", `/api/entities/${encodeURIComponent(id)}`, { state });
    view.entities.set(e.id, e);
    // Leaving the field lets the table redraw (it waits while a state is being typed).
    if (document.activeElement && document.activeElement.closest("#entities")) document.activeElement.blur();
    renderEntities();
    problem("");
  } catch (err) {
    problem(`${id}: ${err.message}`);
  }
}

function stateControl(e) {
  const writable = rights(e) === "write";
  const domain = e.id.split(".")[0];
  const value = el("span", { class: "state-value" }, e.state);
  if (!writable) return el("td", {}, value, el("span", { class: "badge dim" }, "read only"));
  if (TOGGLE_DOMAINS.includes(domain) && (e.state === "on" || e.state === "off")) {
    const on = e.state === "on";
    return el("td", {}, el("button", {
      type: "button", class: `toggle ${on ? "on" : "off"}`, "aria-pressed": String(on),
      title: `turn ${on ? "off" : "on"}`, onclick: () => writeState(e.id, on ? "off" : "on"),
    }, value));
  }
  const input = el("input", { value: e.state, "aria-label": `state of ${e.id}`, maxlength: "1024" });
  const form = el("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); writeState(e.id, input.value); } },
    input, el("button", { type: "submit" }, "Set"));
  return el("td", {}, form, el("span", { class: "state-value", hidden: "" }, e.state));
}

function renderEntities() {
  const rows = [...view.entities.values()].sort((a, b) => a.id.localeCompare(b.id)).map((e) =>
    el("tr", { dataset: { entity: e.id, state: e.state } },
      el("td", { class: "mono" }, e.id),
      stateControl(e),
      el("td", { class: "mono attrs" }, Object.keys(e.attributes || {}).length ? JSON.stringify(e.attributes) : ""),
      el("td", {}, homeName(e.owner)),
      el("td", { title: e.updated_by }, `${when(e.updated_at)} by ${deviceName(e.updated_by)}`)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no entities")));
  // Keep a half-typed state: skip redrawing while a state field has focus.
  const active = document.activeElement;
  if (active && active.closest && active.closest("#entities form")) return;
  tbody("entities").replaceChildren(...rows);
}

// Redraw once focus leaves the state fields, for updates that came while one was being typed.
document.querySelector("#entities tbody").addEventListener("focusout", (ev) => {
  const to = ev.relatedTarget;
  if (!(to && to.closest && to.closest("#entities form"))) setTimeout(renderEntities, 0);
});

function onStateUpdate(d) {
  const e = view.entities.get(d.entity_id);
  if (!e) {
    load("entities", loadEntities);
    return;
  }
  patched.add(d.entity_id);
  e.state = d.state;
  e.attributes = d.attributes || {};
  e.updated_by = d.source_device;
  e.updated_at = d.timestamp;
  renderEntities();
}

// ----- rooms and chat ---------------------------------------------------------------

async function loadRooms() {
  const rooms = await latest("rooms", "/api/rooms");
  if (!rooms) return;
  view.rooms = rooms.rooms;
  if (view.room && !view.rooms.some((r) => r.room_id === view.room)) view.room = null;
  if (!view.room && view.rooms.length) view.room = view.rooms[0].room_id;
  renderRooms();
  await loadChat();
}

async function loadChat() {
  const room = view.room;
  if (!room) return;
  const chat = await latest("chat", `/api/rooms/${encodeURIComponent(room)}/messages?limit=${CHAT_LIMIT}`);
  if (!chat || room !== view.room) return;
  view.chat = chat.messages;
  renderRooms();
}

function renderRooms() {
  const box = document.querySelector("#rooms .body");
  if (!view.rooms.length) {
    box.replaceChildren(el("p", { class: "empty" }, "No rooms. Create one with hearth room create NAME."));
    return;
  }
  const tabs = el("div", { class: "tabs" }, view.rooms.map((r) =>
    el("button", {
      type: "button", class: r.room_id === view.room ? "tab active" : "tab",
      onclick: () => { view.room = r.room_id; view.chat = []; load("rooms", loadRooms); },
    }, `${r.name} (${r.members.length}/${r.max_size})`)));
  const room = view.rooms.find((r) => r.room_id === view.room);
  // Messages from the page are sent as this device's name, which must be a member.
  const me = view.status && view.status.device;
  const join = me && !room.members.some((m) => m.user === me)
    ? el("button", {
      type: "button", class: "join",
      onclick: async () => {
        try {
          await api("POST", `/api/rooms/${encodeURIComponent(room.room_id)}/join`, {});
          load("rooms", loadRooms);
        } catch (err) {
          problem(`join: ${err.message}`);
        }
      },
    }, `Join as ${me}`)
    : null;
  const members = el("p", { class: "dim" }, "Members: ", room.members.map((m) => m.user).join(", ") || "none", " ", join);
  const log = el("ol", { class: "chat" }, view.chat.map((m) =>
    el("li", {}, el("span", { class: "dim" }, when(m.timestamp)), " ", el("b", {}, m.sender), " ", m.message)));
  // A redraw keeps a half-typed message and the focus.
  const before = box.querySelector("form input");
  const typing = before && document.activeElement === before;
  const input = el("input", { placeholder: "message", required: "", maxlength: "4096", "aria-label": "message" });
  if (before) input.value = before.value;
  const form = el("form", {
    class: "inline",
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const message = input.value;
        await api("POST", `/api/rooms/${encodeURIComponent(room.room_id)}/messages`, { message });
        // The form may have been redrawn meanwhile; clear the one on the page.
        const now = box.querySelector("form input");
        if (now && now.value === message) now.value = "";
        problem("");
      } catch (err) {
        problem(`chat: ${err.message}`);
      }
    },
  }, input, el("button", { type: "submit" }, "Send"));
  box.replaceChildren(tabs, members, log, form);
  log.scrollTop = log.scrollHeight;
  if (typing) input.focus();
}

function onChat(d) {
  if (d.room_id !== view.room) return;
  view.chat.push({ sender: d.sender, message: d.message, timestamp: d.timestamp });
  view.chat = view.chat.slice(-CHAT_LIMIT);
  renderRooms();
  // The room's own list is the record (a read in flight may predate this message).
  load("rooms", loadChat);
}

// ----- presence, locks, alerts, audit -----------------------------------------------

async function loadPresence() {
  const list = await latest("presence", "/api/presence");
  if (!list) return;
  view.presence = new Map(list.presence.map((p) => [p.user, p]));
  renderPresence();
}

function renderPresence() {
  const items = [...view.presence.values()].sort((a, b) => a.user.localeCompare(b.user)).map((p) =>
    el("li", { dataset: { user: p.user } }, el("span", { class: `dot ${p.status}` }), el("b", {}, p.user), ` ${p.status}`,
      p.note ? ` · ${p.note}` : "", el("span", { class: "dim" }, ` since ${when(p.since)}`)));
  if (!items.length) items.push(el("li", { class: "empty" }, "nobody online"));
  document.querySelector("#presence ul").replaceChildren(...items);
}

function onPresence(d) {
  if (d.status === "offline") view.presence.delete(d.user);
  else view.presence.set(d.user, { ...(view.presence.get(d.user) || {}), user: d.user, status: d.status, since: d.since });
  renderPresence();
  // For the note and device, and over any read in flight that predates this change.
  load("presence", loadPresence);
}

async function loadLocks() {
  const status = await latest("locks", "/api/locks/status");
  if (!status) return;
  const locks = status.locks;
  const rows = locks.map((l) => el("tr", {},
    el("td", {}, l.device_name), el("td", {}, l.lock_type), el("td", {}, l.user_id, l.reason ? ` (${l.reason})` : ""),
    el("td", {}, when(l.expires_at))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "no locks held")));
  tbody("locks").replaceChildren(...rows);
}

async function loadAlerts() {
  const list = await latest("alerts", "/api/alerts");
  if (!list) return;
  const alerts = list.alerts;
  const items = alerts.slice(-20).reverse().map((a) => {
    const acked = a.receipts.filter((r) => r.state === "acknowledged").length;
    return el("li", { class: `alert ${a.severity}` },
      el("span", { class: "badge" }, a.severity), ` ${a.message} `,
      el("span", { class: "dim" },
        a.direction === "sent" ? `sent ${when(a.sent_at)}, ${acked}/${a.receipts.length} acknowledged`
          : `from ${deviceName(a.source.device)} ${when(a.sent_at)}`));
  });
  if (!items.length) items.push(el("li", { class: "empty" }, "no alerts"));
  document.querySelector("#alerts ul").replaceChildren(...items);
}

async function loadAudit() {
  const audit = await latest("audit", `/api/audit?limit=${AUDIT_LIMIT}`);
  if (!audit) return;
  view.audit = audit.entries;
  renderAudit();
}

// Drawn again when names arrive (devices, paired homes), since it shows actors by name.
function renderAudit() {
  const rows = view.audit.slice().reverse().map((a) => el("tr", {},
    el("td", {}, when(a.time)), el("td", {}, a.action), el("td", { title: a.actor }, deviceName(a.actor)),
    el("td", { class: "mono" }, a.subject)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "nothing audited yet")));
  tbody("audit").replaceChildren(...rows);
}

// ----- live updates -----------------------------------------------------------------

function setLive(on, text) {
  const b = document.getElementById("live");
  b.className = `badge ${on ? "on" : "off"}`;
  b.textContent = text;
}

let backoff = 500;
let opened = false;

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  // The session cookie authenticates the upgrade; no token in the URL.
  const ws = new WebSocket(`${scheme}${location.host}/api/ws`);
  ws.onopen = () => {
    backoff = 500;
    ws.send(JSON.stringify({
      type: "subscribe",
      data: { patterns: ["entity.*", "room.*", "presence.*", "peer.*", "share.*", "lock.*", "emergency.*", "conflict.*"] },
    }));
    setLive(true, "live");
    // Whatever changed while the socket was down.
    if (opened) loadAll();
    opened = true;
  };
  ws.onmessage = (m) => {
    let frame;
    try {
      frame = JSON.parse(m.data);
    } catch {
      return;
    }
    const d = frame.data || {};
    switch (frame.type) {
      case "state_update": return onStateUpdate(d);
      case "chat_message": return onChat(d);
      case "presence": return onPresence(d);
      case "missed": return loadAll();
      case "event": return onEvent(d);
      case "error": return problem(`live updates: ${d.detail || d.error}`);
      default: return undefined;
    }
  };
  ws.onclose = (e) => {
    // 1008: the session ended (logged out elsewhere, or expired); back to the login page.
    if (e.code === 1008) {
      location.replace("/");
      return;
    }
    setLive(false, "reconnecting");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

function onEvent(e) {
  const name = e.name || "";
  if (name.startsWith("peer.")) {
    load("peers", loadStatus);
    load("devices", loadDevices);
  } else if (name.startsWith("share.")) {
    load("homes", loadHomes);
  } else if (name === "entity.deleted") {
    view.entities.delete(e.subject);
    renderEntities();
  } else if (name.startsWith("room.")) {
    load("rooms", loadRooms);
  } else if (name.startsWith("lock.")) {
    load("locks", loadLocks);
  } else if (name.startsWith("emergency.")) {
    load("alerts", loadAlerts);
  }
  load("audit", loadAudit);
}

async function loadAll() {
  await load("node", loadStatus);
  await Promise.all([
    load("devices", loadDevices),
    load("homes", loadHomes),
    load("entities", loadEntities),
    load("rooms", loadRooms),
    load("presence", loadPresence),
    load("locks", loadLocks),
    load("alerts", loadAlerts),
    load("audit", loadAudit),
  ]);
}

document.getElementById("logout").addEventListener("click", async () => {
  try {
    await api("POST", "/api/logout");
  } finally {
    location.replace("/");
  }
});

document.getElementById("presence-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  try {
    await api("PUT", `/api/presence/${encodeURIComponent(f.user.value)}`, { status: f.status.value });
    problem("");
  } catch (err) {
    problem(`presence: ${err.message}`);
  }
});

loadAll();
connect();
setInterval(() => {
  load("node", loadStatus);
  load("audit", loadAudit);
}, POLL_MS);
