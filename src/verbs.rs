//! Client verbs for peers, entity history, rooms and presence, and their tables.

use anyhow::{Context, Result, bail};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

use crate::client::Client;

/// One path segment, percent-encoded: room names and users may hold any character.
pub(crate) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// A JSON value as a table cell or a line of text, made [`printable`].
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => printable(s),
        Value::Null => "-".into(),
        // JSON escapes C0 controls but not DEL or C1 (0x9B starts a CSI on some terminals).
        other => printable(&other.to_string()),
    }
}

/// Text from the node made safe for a terminal. Names, ids, states and messages may come
/// from another home, and an escape sequence in one could move the cursor, rewrite lines
/// already printed (a fake table row), set the window title or worse. So ANSI escape
/// sequences (7- and 8-bit) are dropped whole, tabs and line breaks become spaces, and
/// every other control character and bidirectional override is dropped. JSON output
/// (`--json`) does not pass through here: JSON escapes what it carries.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                Some('[') => skip_csi(&mut chars),
                Some(']' | 'P' | 'X' | '^' | '_') => skip_string(&mut chars),
                // ESC, intermediates (0x20-0x2F), one final: `ESC ( B`, `ESC c`.
                Some(' '..='/') => {
                    while chars.next_if(|c| matches!(c, ' '..='/')).is_some() {}
                    chars.next_if(|c| matches!(c, '0'..='~'));
                }
                _ => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            '\u{90}' | '\u{98}' | '\u{9d}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            '\t' | '\n' | '\r' => out.push(' '),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {}
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

/// Skips a control sequence's parameters and intermediates (0x20-0x3F) and its final
/// byte (0x40-0x7E). Anything else ends it unconsumed, so a malformed sequence cannot
/// swallow the text after it.
fn skip_csi(chars: &mut Chars<'_>) {
    while chars.next_if(|c| matches!(c, ' '..='?')).is_some() {}
    chars.next_if(|c| matches!(c, '@'..='~'));
}

/// Skips a control string (OSC, DCS, SOS, PM, APC) up to its terminator: BEL, ESC \ or
/// ST. An unterminated one runs to the end of the text, which is all dropped: the
/// terminal would have swallowed it too.
fn skip_string(chars: &mut Chars<'_>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            '\u{1b}' => {
                chars.next_if_eq(&'\\');
                return;
            }
            _ => {}
        }
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn list<'a>(body: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    body.get(key)
        .and_then(|v| v.as_array())
        .with_context(|| format!("the node's reply has no {key} list"))
}

/// Connected peers as a table: admitted or not, addresses, sync lag.
/// One word for where a peer stands: admitted, connected (not admitted), or known only.
fn peer_state(p: &Value) -> &'static str {
    let flag = |k: &str| p[k].as_bool() == Some(true);
    match (flag("connected"), flag("admitted")) {
        (true, true) => "admitted",
        (true, false) => "connected",
        (false, _) if flag("is_static") => "redialling",
        (false, _) => "discovered",
    }
}

pub(crate) fn peers_table(peers: &[Value]) -> Table {
    let mut t = table(&[
        "PEER",
        "STATE",
        "ADDRESS",
        "LAST HEARD",
        "DOCS BEHIND",
        "CLOCK OFFSET",
    ]);
    for p in peers {
        let heard = p["last_heard_ms"]
            .as_u64()
            .map(|ms| format!("{ms} ms ago"))
            .unwrap_or_else(|| "-".into());
        t.add_row(vec![
            text(&p["peer_id"]),
            peer_state(p).into(),
            p["addrs"]
                .as_array()
                .and_then(|a| a.first())
                .map(text)
                .unwrap_or_else(|| "-".into()),
            heard,
            text(&p["docs_behind"]),
            clock(&p["clock"]),
        ]);
    }
    t
}

/// A peer's clock against this device's: `+2500.1 ± 0.4 ms`, or `-`.
fn clock(c: &Value) -> String {
    match (c["offset_ms"].as_f64(), c["uncertainty_ms"].as_f64()) {
        (Some(offset), Some(uncertainty)) => format!("{offset:+.1} ± {uncertainty:.1} ms"),
        _ => "-".into(),
    }
}

pub(crate) fn peers(client: &Client, json: bool) -> Result<()> {
    let body: Value = client.get("/api/peers")?;
    if json {
        return print_json(&body);
    }
    let peers = list(&body, "peers")?;
    if peers.is_empty() {
        println!("no peers known");
    } else {
        println!("{}", peers_table(peers));
    }
    Ok(())
}

pub(crate) fn entity_delete(client: &Client, path: &str, json: bool) -> Result<()> {
    let entity: Value = client.delete(path)?;
    if json {
        return print_json(&entity);
    }
    println!("deleted {}", text(&entity["id"]));
    Ok(())
}

pub(crate) fn entity_history(client: &Client, path: &str, json: bool) -> Result<()> {
    let body: Value = client.get(&format!("{path}/history"))?;
    if json {
        return print_json(&body);
    }
    let mut t = table(&["VERSION", "TIME", "DEVICE"]);
    for v in list(&body, "versions")? {
        // 16 digits name a version unambiguously in practice; 8 are accepted.
        let version = text(&v["version"]);
        t.add_row(vec![
            version.chars().take(16).collect(),
            text(&v["time"]),
            text(&v["device"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn entity_restore(client: &Client, path: &str, version: &str) -> Result<Value> {
    client.post(&format!("{path}/restore"), &json!({ "version": version }))
}

fn room_path(room: &str) -> String {
    format!("/api/rooms/{}", segment(room))
}

fn with_user(user: Option<&str>) -> Value {
    match user {
        Some(u) => json!({ "user": u }),
        None => json!({}),
    }
}

pub(crate) fn print_room(room: &Value, json: bool) -> Result<()> {
    if json {
        return print_json(room);
    }
    println!(
        "room      {} ({})",
        text(&room["name"]),
        text(&room["room_id"])
    );
    println!("creator   {}", text(&room["creator"]));
    println!("created   {}", text(&room["created_at"]));
    let members = list(room, "members")?;
    println!(
        "members   {} of at most {}",
        members.len(),
        text(&room["max_size"])
    );
    let mut t = table(&["USER", "DEVICE", "JOINED"]);
    for m in members {
        t.add_row(vec![
            text(&m["user"]),
            text(&m["device"]),
            text(&m["joined_at"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn room_create(
    client: &Client,
    name: &str,
    max: Option<u64>,
    user: Option<&str>,
    json: bool,
) -> Result<()> {
    let mut body = with_user(user);
    body["name"] = json!(name);
    if let Some(m) = max {
        body["max_size"] = json!(m);
    }
    let room: Value = client.post("/api/rooms", &body)?;
    if json {
        return print_json(&room);
    }
    println!(
        "created room {} ({})",
        text(&room["name"]),
        text(&room["room_id"])
    );
    Ok(())
}

pub(crate) fn room_join_leave(
    client: &Client,
    room: &str,
    user: Option<&str>,
    join: bool,
    json: bool,
) -> Result<()> {
    let action = if join { "join" } else { "leave" };
    let reply: Value = client.post(&format!("{}/{action}", room_path(room)), &with_user(user))?;
    if json {
        return print_json(&reply);
    }
    let verb = if join { "joined" } else { "left" };
    println!("{verb} room {}", text(&reply["name"]));
    Ok(())
}

pub(crate) fn room_show(client: &Client, room: &str, json: bool) -> Result<()> {
    let reply: Value = client.get(&room_path(room))?;
    print_room(&reply, json)
}

pub(crate) fn room_list(client: &Client, json: bool) -> Result<()> {
    let body: Value = client.get("/api/rooms")?;
    if json {
        return print_json(&body);
    }
    let mut t = table(&["ROOM", "ID", "MEMBERS", "MAX"]);
    for r in list(&body, "rooms")? {
        t.add_row(vec![
            text(&r["name"]),
            text(&r["room_id"]),
            r["members"].as_array().map_or(0, |m| m.len()).to_string(),
            text(&r["max_size"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn room_say(
    client: &Client,
    room: &str,
    message: &str,
    user: Option<&str>,
    json: bool,
) -> Result<()> {
    let mut body = with_user(user);
    body["message"] = json!(message);
    let sent: Value = client.post(&format!("{}/messages", room_path(room)), &body)?;
    if json {
        return print_json(&sent);
    }
    println!(
        "{} {}: {}",
        text(&sent["timestamp"]),
        text(&sent["sender"]),
        text(&sent["message"])
    );
    Ok(())
}

pub(crate) fn room_chat(client: &Client, room: &str, limit: usize, json: bool) -> Result<()> {
    let body: Value = client.get(&format!("{}/messages?limit={limit}", room_path(room)))?;
    if json {
        return print_json(&body);
    }
    let messages = list(&body, "messages")?;
    if messages.is_empty() {
        println!("no messages yet");
    }
    for m in messages {
        println!(
            "{} {}: {}",
            text(&m["timestamp"]),
            text(&m["sender"]),
            text(&m["message"])
        );
    }
    Ok(())
}

/// The user a presence verb is about: `--user`, else the node's device name.
fn user_or_device(client: &Client, user: Option<&str>) -> Result<String> {
    match user {
        Some(u) => Ok(u.to_string()),
        None => {
            let status: Value = client.get("/api/status")?;
            status["device"]
                .as_str()
                .map(str::to_string)
                .context("the node's status reply has no device name; pass --user")
        }
    }
}

fn presence_table(entries: &[Value]) -> Table {
    let mut t = table(&["USER", "STATUS", "SINCE", "DEVICE", "NOTE"]);
    for p in entries {
        t.add_row(vec![
            text(&p["user"]),
            text(&p["status"]),
            text(&p["since"]),
            text(&p["device"]),
            p.get("note").map(text).unwrap_or_default(),
        ]);
    }
    t
}

pub(crate) fn presence_set(
    client: &Client,
    status: &str,
    note: Option<&str>,
    user: Option<&str>,
    json: bool,
) -> Result<()> {
    let user = user_or_device(client, user)?;
    let mut body = json!({ "status": status });
    if let Some(n) = note {
        body["note"] = json!(n);
    }
    let reply: Value = client.put(&format!("/api/presence/{}", segment(&user)), &body)?;
    if json {
        return print_json(&reply);
    }
    println!("{} is {}", text(&reply["user"]), text(&reply["status"]));
    Ok(())
}

pub(crate) fn presence_show(client: &Client, user: Option<&str>, json: bool) -> Result<()> {
    let user = user_or_device(client, user)?;
    let reply: Value = client.get(&format!("/api/presence/{}", segment(&user)))?;
    if json {
        return print_json(&reply);
    }
    println!("{}", presence_table(std::slice::from_ref(&reply)));
    Ok(())
}

pub(crate) fn presence_online(client: &Client, room: Option<&str>, json: bool) -> Result<()> {
    let path = match room {
        Some(r) => format!("/api/presence?room={}", segment(r)),
        None => "/api/presence".to_string(),
    };
    let body: Value = client.get(&path)?;
    if json {
        return print_json(&body);
    }
    let entries = list(&body, "presence")?;
    if entries.is_empty() {
        println!("nobody is online");
    } else {
        println!("{}", presence_table(entries));
    }
    Ok(())
}

// ----- sharing between homes ------------------------------------------------------------

pub(crate) fn pair_home(client: &Client, code: &str, json: bool) -> Result<()> {
    let paired: Value = client.post("/api/pair", &json!({ "code": code.trim() }))?;
    if json {
        return print_json(&paired);
    }
    println!(
        "paired with home {} ({})",
        text(&paired["name"]),
        text(&paired["home_id"])
    );
    Ok(())
}

pub(crate) fn homes(client: &Client, json: bool) -> Result<()> {
    let body: Value = client.get("/api/homes")?;
    if json {
        return print_json(&body);
    }
    let mut t = table(&[
        "HOME",
        "ID",
        "DEVICES",
        "WE SHARE",
        "THEY SHARE",
        "MADE BY REVOKED DEVICES",
    ]);
    let names = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    for h in list(&body, "homes")? {
        t.add_row(vec![
            text(&h["name"]),
            text(&h["home_id"]),
            h["devices"].as_array().map_or(0, |d| d.len()).to_string(),
            names(&h["we_share"]),
            names(&h["they_share"]),
            names(&h["made_by_revoked"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn forget(client: &Client, home: &str, json: bool) -> Result<()> {
    let body: Value = client.delete(&format!("/api/homes/{}", segment(home)))?;
    if json {
        return print_json(&body);
    }
    println!(
        "forgot home {} ({})",
        text(&body["name"]),
        text(&body["home_id"])
    );
    Ok(())
}

/// The entities `ids` name: ids as given, and each pattern (`light.*`) as the entities of
/// this home it matches.
fn share_targets(client: &Client, ids: &[String]) -> Result<Vec<String>> {
    if !ids.iter().any(|i| i.contains('*')) {
        return Ok(ids.to_vec());
    }
    let status: Value = client.get("/api/status")?;
    let home = status["home"]["home_id"]
        .as_str()
        .context("the node's status names no home")?;
    let list: Value = client.get("/api/entities")?;
    let own: Vec<&str> = list["entities"]
        .as_array()
        .context("the node's reply has no entities list")?
        .iter()
        .filter(|e| e["owner"].as_str() == Some(home))
        .filter_map(|e| e["id"].as_str())
        .collect();
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if !id.contains('*') {
            out.push(id.clone());
            continue;
        }
        let pattern = hearth::bus::Pattern::parse(id)?;
        let matched: Vec<&str> = own.iter().copied().filter(|e| pattern.matches(e)).collect();
        if matched.is_empty() {
            bail!("no entity of this home matches {}", printable(id));
        }
        out.extend(matched.into_iter().map(str::to_string));
    }
    out.dedup();
    Ok(out)
}

pub(crate) fn share(
    client: &Client,
    ids: &[String],
    home: &str,
    read_only: bool,
    policy: Option<&str>,
    json: bool,
) -> Result<()> {
    let targets = share_targets(client, ids)?;
    let one = |id: &str| -> Result<Value> {
        let mut body = json!({ "entity_id": id, "home": home, "read_only": read_only });
        if let Some(p) = policy {
            body["policy"] = json!(p);
        }
        client.post("/api/shares", &body)
    };
    let line = |out: &Value| {
        format!(
            "shared {} with {} ({}, policy {})",
            text(&out["entity_id"]),
            text(&out["home"]),
            text(&out["rights"]),
            text(&out["policy"])
        )
    };
    // One id: one share, as before.
    if let [id] = targets.as_slice()
        && ids.len() == 1
        && !ids[0].contains('*')
    {
        let out = one(id)?;
        if json {
            return print_json(&out);
        }
        println!("{}", line(&out));
        return Ok(());
    }
    let bar = crate::cli::progress::bar(targets.len() as u64, "sharing");
    let mut shared = Vec::new();
    let mut failed = Vec::new();
    for id in &targets {
        bar.set_message(printable(id));
        match one(id) {
            Ok(out) => {
                if !json {
                    bar.suspend(|| println!("{}", line(&out)));
                }
                shared.push(out);
            }
            Err(e) => failed.push(json!({ "entity_id": id, "error": format!("{e:#}") })),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if json {
        print_json(&json!({ "shared": shared, "failed": failed }))?;
    }
    if !failed.is_empty() {
        let what: Vec<String> = failed
            .iter()
            .map(|f| format!("{}: {}", text(&f["entity_id"]), text(&f["error"])))
            .collect();
        bail!(
            "{} of {} shares failed: {}",
            failed.len(),
            targets.len(),
            what.join("; ")
        );
    }
    Ok(())
}

pub(crate) fn unshare(client: &Client, id: &str, home: &str, json: bool) -> Result<()> {
    let out: Value = client.delete(&format!("/api/shares/{}/{}", segment(id), segment(home)))?;
    if json {
        return print_json(&out);
    }
    println!(
        "unshared {} from {}; its key is now at epoch {}",
        text(&out["entity_id"]),
        text(&out["home"]),
        text(&out["epoch"])
    );
    Ok(())
}

pub(crate) fn shared(client: &Client, json: bool) -> Result<()> {
    let body: Value = client.get("/api/shares")?;
    if json {
        return print_json(&body);
    }
    let mut t = table(&["ENTITY", "DIRECTION", "HOME", "RIGHTS", "NOTE"]);
    for s in list(&body, "shared_out")? {
        t.add_row(vec![
            text(&s["entity_id"]),
            "we share".into(),
            text(&s["home"]),
            text(&s["rights"]),
            format!("policy {}", text(&s["policy"])),
        ]);
    }
    for s in list(&body, "shared_in")? {
        t.add_row(vec![
            text(&s["entity_id"]),
            "shared with us".into(),
            text(&s["owner"]),
            text(&s["rights"]),
            if s["revoked"].as_bool() == Some(true) {
                "revoked".into()
            } else {
                String::new()
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn audit(client: &Client, since: Option<&str>, json: bool) -> Result<()> {
    // The API pages back from the newest entry; follow the cursors to the start (or to
    // `since`), then show everything oldest first.
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = "/api/audit?limit=1000".to_string();
        if let Some(s) = since {
            path.push_str(&format!("&since={}", segment(s)));
        }
        if let Some(b) = &before {
            path.push_str(&format!("&before={}", segment(b)));
        }
        let page: Value = client.get(&path)?;
        pages.push(list(&page, "entries")?.to_vec());
        match page["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    let entries: Vec<Value> = pages.into_iter().rev().flatten().collect();
    let body = json!({ "entries": entries });
    if json {
        return print_json(&body);
    }
    let mut t = table(&["TIME", "ACTION", "ACTOR", "SUBJECT"]);
    for e in list(&body, "entries")? {
        t.add_row(vec![
            text(&e["time"]),
            text(&e["action"]),
            text(&e["actor"]),
            text(&e["subject"]),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn set_policy(client: &Client, id: &str, policy: &str, json: bool) -> Result<()> {
    let entity: Value = client.put(
        &format!("/api/entities/{}/policy", segment(id)),
        &json!({ "policy": policy }),
    )?;
    if json {
        return print_json(&entity);
    }
    println!(
        "{} now uses {policy}; state {}",
        text(&entity["id"]),
        text(&entity["state"])
    );
    Ok(())
}

pub(crate) fn conflicts(client: &Client, json: bool) -> Result<()> {
    let body: Value = client.get("/api/conflicts")?;
    if json {
        return print_json(&body);
    }
    let mut t = table(&["ENTITY", "FIELD", "CHOICE", "VALUE", "DEVICE", "TIME"]);
    for c in list(&body, "conflicts")? {
        for (i, cand) in list(c, "candidates")?.iter().enumerate() {
            t.add_row(vec![
                text(&c["entity_id"]),
                text(&c["field"]),
                i.to_string(),
                text(&cand["value"]),
                text(&cand["device"]),
                text(&cand["time"]),
            ]);
        }
    }
    println!("{t}");
    Ok(())
}

pub(crate) fn resolve(
    client: &Client,
    id: &str,
    field: &str,
    choice: usize,
    json: bool,
) -> Result<()> {
    let entity: Value = client.post(
        "/api/conflicts/resolve",
        &json!({ "entity_id": id, "field": field, "choice": choice }),
    )?;
    if json {
        return print_json(&entity);
    }
    println!(
        "{} resolved; state {}",
        text(&entity["id"]),
        text(&entity["state"])
    );
    Ok(())
}

pub(crate) fn revoke_device(client: &Client, device: &str, json: bool) -> Result<()> {
    let out: Value = client.post(
        &format!("/api/devices/{}/revoke", segment(device)),
        &json!({}),
    )?;
    if json {
        return print_json(&out);
    }
    println!(
        "revoked {} ({}); {} document keys rotated",
        text(&out["name"]),
        text(&out["peer_id"]),
        text(&out["rotated"])
    );
    Ok(())
}

/// `hearth repair [--drop]`: the documents quarantined at start, and with `--drop` deletes
/// their damaged records.
pub(crate) fn repair(client: &Client, drop: bool, json: bool) -> Result<()> {
    let body: serde_json::Value = if drop {
        client.post("/api/repair/drop", &serde_json::json!({}))?
    } else {
        client.get("/api/repair")?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let key = if drop { "dropped" } else { "quarantined" };
    let docs = body[key].as_array().cloned().unwrap_or_default();
    if docs.is_empty() {
        println!("no damaged documents");
        return Ok(());
    }
    for doc in &docs {
        let entity = doc["entity"]
            .as_str()
            .map(|e| format!(" (entity {})", printable(e)))
            .unwrap_or_default();
        println!(
            "{} {}{}: {}",
            if drop { "dropped" } else { "quarantined" },
            printable(doc["doc"].as_str().unwrap_or("-")),
            entity,
            printable(doc["reason"].as_str().unwrap_or("-"))
        );
    }
    if !drop {
        println!("run `hearth repair --drop` to delete their damaged records");
    }
    Ok(())
}

/// A lock's one-line summary.
fn lock_line(lock: &Value) -> String {
    format!(
        "{} {} by {} (token {}, until {}){}",
        printable(&text(&lock["device_name"])),
        text(&lock["lock_type"]),
        printable(&text(&lock["user_id"])),
        lock["fencing_token"],
        text(&lock["expires_at"]),
        lock["reason"]
            .as_str()
            .map(|r| format!(": {}", printable(r)))
            .unwrap_or_default()
    )
}

/// `lock acquire`: prints the key alone on stdout, so scripts can capture it.
pub(crate) fn lock_acquire(
    client: &Client,
    device: &str,
    lock_type: &str,
    timeout: Option<std::time::Duration>,
    reason: Option<&str>,
    user: &str,
    json: bool,
) -> Result<()> {
    let lock_type = match lock_type.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(lock_type.to_ascii_uppercase()),
    };
    let mut body = json!({"device_name": device, "lock_type": lock_type, "user_id": user});
    if let Some(t) = timeout {
        body["timeout"] = json!(t.as_secs_f64());
    }
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    let reply: Value = client.post("/api/lock/request", &body)?;
    if json {
        return print_json(&reply);
    }
    if reply["success"] != json!(true) {
        anyhow::bail!(
            "{}; held: {}",
            printable(&text(&reply["message"])),
            lock_line(&reply["lock"])
        );
    }
    println!("{}", text(&reply["lock_key"]));
    eprintln!("locked {}", lock_line(&reply["lock"]));
    Ok(())
}

pub(crate) fn lock_release(
    client: &Client,
    device: &str,
    key: &str,
    user: &str,
    json: bool,
) -> Result<()> {
    let body = json!({"device_name": device, "lock_key": key, "user_id": user});
    let reply: Value = client.post("/api/lock/release", &body)?;
    if json {
        return print_json(&reply);
    }
    println!("{}", printable(&text(&reply["message"])));
    Ok(())
}

pub(crate) fn lock_status(client: &Client, device: Option<&str>, json: bool) -> Result<()> {
    let reply: Value = match device {
        Some(d) => client.get(&format!("/api/locks/device/{}", segment(d)))?,
        None => client.get("/api/locks/status")?,
    };
    if json {
        return print_json(&reply);
    }
    let locks: Vec<Value> = match device {
        Some(_) => reply["lock"]
            .as_object()
            .map(|_| reply["lock"].clone())
            .into_iter()
            .collect(),
        None => reply["locks"].as_array().cloned().unwrap_or_default(),
    };
    if locks.is_empty() {
        println!("no locks held");
    }
    for lock in &locks {
        println!("{}", lock_line(lock));
    }
    Ok(())
}

/// `notify USER TITLE`: sends it and prints its id.
pub(crate) fn notify(client: &Client, body: &Value, json: bool) -> Result<()> {
    let reply: Value = client.post("/api/notify", body)?;
    if json {
        return print_json(&reply);
    }
    println!(
        "notification {} sent to {}",
        reply["notification_id"].as_str().unwrap_or("?"),
        reply["user_id"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `user state USER`.
pub(crate) fn user_state(client: &Client, user: &str, json: bool) -> Result<()> {
    let reply: Value = client.get(&format!("/api/users/{}/state", segment(user)))?;
    if json {
        return print_json(&reply);
    }
    let state = reply["state"].as_object().cloned().unwrap_or_default();
    if state.is_empty() {
        println!("{user} has no state");
    }
    for (key, value) in &state {
        println!("{key} = {value}");
        if let Some(others) = reply["conflicts"][key].as_array() {
            for other in others {
                println!(
                    "  concurrent: {} (from {})",
                    other["value"],
                    other["source_device"].as_str().unwrap_or("?")
                );
            }
        }
    }
    let sessions = reply["sessions"].as_array().cloned().unwrap_or_default();
    let live = sessions.iter().filter(|s| s["live"] == true).count();
    println!("{live} live client session(s) of {}", sessions.len());
    Ok(())
}

/// `lock arbiter [DEVICE]`: shows the arbiter, or names another and waits for the
/// handoff.
pub(crate) fn lock_arbiter(
    client: &Client,
    device: Option<&str>,
    force: bool,
    json: bool,
) -> Result<()> {
    let reply: Value = match device {
        Some(d) => client.put(
            "/api/locks/arbiter",
            &serde_json::json!({ "device": d, "force": force }),
        )?,
        None => client.get("/api/locks/arbiter")?,
    };
    if json {
        return print_json(&reply);
    }
    let name = reply["device_name"].as_str().unwrap_or("(name unknown)");
    let peer = reply["peer_id"].as_str().unwrap_or_default();
    let here = if reply["this_device"].as_bool() == Some(true) {
        " (this device)"
    } else {
        ""
    };
    println!("lock arbiter: {name} {peer}{here}");
    if reply["handoff_running"].as_bool() == Some(true) {
        println!("a handoff is running");
    }
    Ok(())
}

/// `lock watch`: one line per lock change, from seed 004's `/ws`.
pub(crate) fn lock_watch(client: &Client, json: bool) -> Result<()> {
    let mut socket = client.websocket_at("/ws")?;
    eprintln!("watching lock changes (Ctrl-C to stop)");
    loop {
        let message = socket
            .read()
            .map_err(|e| anyhow::anyhow!("the lock stream from the node broke: {e}"))?;
        let tungstenite::Message::Text(t) = message else {
            if let tungstenite::Message::Close(_) = message {
                anyhow::bail!("the node closed the lock stream");
            }
            continue;
        };
        let frame: Value = serde_json::from_str(t.as_str())?;
        if json {
            println!("{frame}");
            continue;
        }
        match frame["type"].as_str() {
            Some("lock_update") => {
                println!("{} {}", text(&frame["action"]), lock_line(&frame["lock"]))
            }
            Some("initial_status") => {
                eprintln!("{} locks held", frame["data"]["total_count"]);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_drops_escapes_and_controls_and_keeps_text() {
        let cases = [
            ("light.porch", "light.porch"),
            ("Küche 🏠 日本", "Küche 🏠 日本"),
            ("\u{1b}[31mred\u{1b}[0m", "red"),
            ("a\u{1b}[2J\u{1b}[1;1Hb", "ab"),
            ("\u{1b}]0;pwned\u{7}title", "title"),
            (
                "\u{1b}]8;;http://evil\u{1b}\\link\u{1b}]8;;\u{1b}\\",
                "link",
            ),
            ("\u{1b}(Bx\u{1b}c", "x"),
            ("\u{9b}31mc1\u{9d}0;t\u{9c}", "c1"),
            ("bell\u{7}del\u{7f}nul\u{0}", "belldelnul"),
            ("two\nlines\there\r", "two lines here "),
            ("\u{202e}gnp.exe", "gnp.exe"),
            ("trailing\u{1b}", "trailing"),
            ("\u{1b}[99", ""),
            ("\u{1b}[1\u{e9}x", "\u{e9}x"),
            ("\u{1b}]never ends", ""),
        ];
        for (input, want) in cases {
            assert_eq!(printable(input), want, "{input:?}");
        }
    }

    #[test]
    fn cells_are_printable_whatever_the_json_type() {
        assert_eq!(text(&json!("\u{1b}[31mhome")), "home");
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!(3)), "3");
        // serde_json escapes ESC itself but not C1 controls.
        assert_eq!(text(&json!({"k": "\u{9b}2Jx"})), r#"{"k":"x"}"#);
    }
}
