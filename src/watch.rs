//! `hearth events` and `hearth entity watch`: a live stream over the node's WebSocket,
//! one line per event.

use std::io::Write;
use std::net::TcpStream;

use anyhow::{Context, Result, bail};
use hearth::bus::Pattern;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::client::Client;

/// What to watch.
pub(crate) enum Watch {
    /// Every event whose name matches the pattern.
    Events(Pattern),
    /// Changes to entities whose id matches the pattern (ids are dotted like names).
    Entities(Pattern),
}

/// Subscribes, waits until the node has applied the subscription, then prints until the
/// node closes the stream or stdout goes away.
pub(crate) fn run(client: &Client, watch: Watch, json_out: bool) -> Result<()> {
    let mut socket = client.websocket()?;
    let patterns = match &watch {
        Watch::Events(p) => vec![p.as_str().to_string()],
        Watch::Entities(_) => vec!["entity.*".to_string()],
    };
    send(
        &mut socket,
        json!({"type": "subscribe", "data": {"patterns": patterns}}),
    )?;
    // The node handles messages in order: the ack means the subscription is in force, so
    // "watching" on stderr is a promise that nothing after it is missed.
    send(&mut socket, json!({"type": "heartbeat", "data": {}}))?;
    let mut acked = false;
    let mut out = std::io::stdout().lock();
    loop {
        let message = socket
            .read()
            .context("the live stream from the node broke")?;
        let text = match message {
            Message::Text(t) => t,
            Message::Close(frame) => {
                let why = frame
                    .map(|f| format!(" ({}: {})", u16::from(f.code), f.reason))
                    .unwrap_or_default();
                bail!("the node closed the live stream{why}");
            }
            _ => continue,
        };
        let frame: Value = serde_json::from_str(text.as_str())
            .with_context(|| format!("the node sent a frame that is not JSON: {text}"))?;
        let kind = frame["type"].as_str().unwrap_or("");
        let data = &frame["data"];
        match kind {
            "heartbeat_ack" if !acked => {
                acked = true;
                eprintln!(
                    "watching {}; stop with Ctrl-C",
                    match &watch {
                        Watch::Events(p) => format!("events {p}"),
                        Watch::Entities(p) => format!("entities {p}"),
                    }
                );
                continue;
            }
            "error" => bail!(
                "the node refused the subscription: {}",
                data["detail"].as_str().unwrap_or("-")
            ),
            "connected" | "heartbeat_ack" => continue,
            _ => {}
        }
        let line = match &watch {
            Watch::Entities(ids) if kind == "event" => {
                // Deletions are not one of the typed frames; they come as events.
                if data["name"] != "entity.deleted"
                    || !ids.matches(data["subject"].as_str().unwrap_or(""))
                {
                    continue;
                }
                if json_out {
                    data.to_string()
                } else {
                    format!(
                        "{} deleted by {}",
                        data["subject"].as_str().unwrap_or("-"),
                        data["source"]["device"].as_str().unwrap_or("-")
                    )
                }
            }
            Watch::Entities(ids) => {
                if kind != "state_update" || !ids.matches(data["entity_id"].as_str().unwrap_or(""))
                {
                    continue;
                }
                if json_out {
                    data.to_string()
                } else {
                    format!(
                        "{} {} {} by {}",
                        data["entity_id"].as_str().unwrap_or("-"),
                        data["state"].as_str().unwrap_or("-"),
                        data["attributes"],
                        data["source_device"].as_str().unwrap_or("-"),
                    )
                }
            }
            Watch::Events(_) if json_out => frame.to_string(),
            Watch::Events(_) => event_line(kind, data),
        };
        // Lines for people pass through `printable`; JSON escapes what it carries.
        let line = if json_out {
            line
        } else {
            crate::verbs::printable(&line)
        };
        // A reader that went away (`| head`) ends the watch quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// One human line per frame: what happened, to what, and the payload.
fn event_line(kind: &str, data: &Value) -> String {
    let s = |k: &str| data[k].as_str().unwrap_or("-").to_string();
    match kind {
        "state_update" => format!(
            "entity.changed {} {} {} by {}",
            s("entity_id"),
            s("state"),
            data["attributes"],
            s("source_device")
        ),
        "chat_message" => format!(
            "room.chat {} {}: {}",
            s("room_id"),
            s("sender"),
            s("message")
        ),
        "presence" => format!("presence.changed {} {}", s("user"), s("status")),
        _ => format!("{} {} {}", s("name"), s("subject"), data["data"]),
    }
}

fn send(socket: &mut WebSocket<TcpStream>, frame: Value) -> Result<()> {
    socket
        .send(Message::Text(frame.to_string().into()))
        .context("cannot write to the node's live stream")
}
