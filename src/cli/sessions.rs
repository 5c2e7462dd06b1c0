//! `hearth session start|show|handoff`: user sessions and their handoff between devices,
//! through the node's API.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{ClientArgs, client};
use crate::verbs::{printable, segment};

#[derive(Debug, Subcommand)]
pub(super) enum SessionCommand {
    /// Start a session for a user on this device, and print its id.
    Start {
        /// The user it belongs to.
        user: String,
        /// The persona it runs with.
        #[arg(long)]
        persona: Option<String>,
        /// Its context snapshot, a JSON object (e.g. '{"page":"recipes"}').
        #[arg(long, value_name = "JSON")]
        context: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one session with its handoffs, or list the home's sessions.
    Show {
        /// The session's id (default: list them all).
        id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hand a session over to another device (run on the device it is active on). Exits
    /// 1 when the target did not accept in time and the session stayed here.
    Handoff {
        /// The session's id.
        id: String,
        /// The device to hand it to: its name or PeerId.
        #[arg(long = "to", value_name = "DEVICE")]
        to: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) fn session(data: &std::path::Path, cmd: SessionCommand) -> Result<()> {
    match cmd {
        SessionCommand::Start {
            user,
            persona,
            context,
            client: c,
        } => {
            let context: Value = match context {
                Some(text) => serde_json::from_str(&text).context("--context is not JSON")?,
                None => json!({}),
            };
            if !context.is_object() {
                bail!("--context must be a JSON object, like '{{\"page\":\"recipes\"}}'");
            }
            let body = json!({ "user": user, "persona": persona, "context": context });
            let reply: Value = client(data, &c)?.post("/api/sessions", &body)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                println!("{}", printable(reply["id"].as_str().unwrap_or("")));
            }
            Ok(())
        }
        SessionCommand::Show { id, client: c } => {
            let cl = client(data, &c)?;
            let Some(id) = id else {
                let reply: Value = cl.get("/api/sessions")?;
                if c.json {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                    return Ok(());
                }
                let list = reply["sessions"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!(
                        "no sessions in this home yet; `hearth session start USER` starts one"
                    );
                }
                for s in list {
                    println!("{}", summary(&s));
                }
                return Ok(());
            };
            let reply: Value = cl.get(&format!("/api/sessions/{}", segment(&id)))?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
                return Ok(());
            }
            println!("{}", summary(&reply));
            println!("  context {}", printable(&reply["context"].to_string()));
            for h in reply["handoffs"].as_array().into_iter().flatten() {
                println!(
                    "  handoff {} to {} ({}): {}",
                    text(&h["id"]),
                    text(&h["to_device"]),
                    text(&h["to"]),
                    text(&h["outcome"])
                );
            }
            Ok(())
        }
        SessionCommand::Handoff { id, to, client: c } => {
            let reply: Value = client(data, &c)?.post(
                &format!("/api/sessions/{}/handoff", segment(&id)),
                &json!({ "to_device": to }),
            )?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            }
            if reply["handoff"]["outcome"] == "completed" {
                if !c.json {
                    println!(
                        "session {} is now active on {}",
                        printable(&id),
                        text(&reply["session"]["device"])
                    );
                }
                Ok(())
            } else {
                bail!(
                    "the handoff rolled back ({}); the session stays on {}",
                    text(&reply["reason"]),
                    text(&reply["session"]["device"])
                )
            }
        }
    }
}

fn text(v: &Value) -> String {
    printable(v.as_str().unwrap_or("-"))
}

fn summary(s: &Value) -> String {
    format!(
        "{}  user {}  persona {}  on {} ({})",
        text(&s["id"]),
        text(&s["user"]),
        text(&s["persona"]),
        text(&s["device"]),
        text(&s["device_id"])
    )
}
