//! `hearth activity start|show|score|pause|resume|step|end`: group activities through
//! the node's API.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{ClientArgs, client};
use crate::verbs::{printable, segment};

#[derive(Debug, Subcommand)]
pub(super) enum ActivityCommand {
    /// Start an activity run by this device, and print its id. It is `starting` until
    /// every device acknowledged, then `active`; `ended` (no_ack) if one did not in time.
    Start {
        /// trivia, story, sing_along or sync_playback.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// A device taking part (name or PeerId); repeat for each.
        #[arg(long = "device", value_name = "DEVICE", required = true)]
        devices: Vec<String>,
        /// Its configuration, a JSON object (e.g. '{"rounds":10}').
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// The room it runs in (id or unique name).
        #[arg(long, value_name = "ROOM")]
        room: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one activity with its devices and scores, or list the home's activities.
    Show {
        /// The activity's id (default: list them all).
        id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add to a device's score (negative to take away), from any device of the home.
    Score {
        /// The activity's id.
        id: String,
        /// The device whose score changes (name or PeerId).
        device: String,
        /// How much to add.
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hold an activity this device runs.
    Pause {
        /// The activity's id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Carry on with a paused activity this device runs.
    Resume {
        /// The activity's id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move an activity this device runs to its next step.
    Step {
        /// The activity's id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End an activity this device runs, and print the final scores.
    End {
        /// The activity's id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) fn activity(data: &std::path::Path, cmd: ActivityCommand) -> Result<()> {
    let (c, reply): (ClientArgs, Value) = match cmd {
        ActivityCommand::Start {
            kind,
            devices,
            config,
            room,
            client: c,
        } => {
            let config: Value = match config {
                Some(text) => serde_json::from_str(&text).context("--config is not JSON")?,
                None => json!({}),
            };
            if !config.is_object() {
                bail!("--config must be a JSON object, like '{{\"rounds\":10}}'");
            }
            let body =
                json!({ "type": kind, "device_ids": devices, "config": config, "room_id": room });
            let reply: Value = client(data, &c)?.post("/api/activities", &body)?;
            if !c.json {
                println!("{}", printable(reply["id"].as_str().unwrap_or("")));
                return Ok(());
            }
            (c, reply)
        }
        ActivityCommand::Show {
            id: None,
            client: c,
        } => {
            let reply: Value = client(data, &c)?.get("/api/activities")?;
            if !c.json {
                let list = reply["activities"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no activities in this home yet");
                }
                for a in &list {
                    println!("{}", summary(a));
                }
                return Ok(());
            }
            (c, reply)
        }
        ActivityCommand::Show {
            id: Some(id),
            client: c,
        } => {
            let reply: Value =
                client(data, &c)?.get(&format!("/api/activities/{}", segment(&id)))?;
            (c, reply)
        }
        ActivityCommand::Score {
            id,
            device,
            delta,
            client: c,
        } => {
            let reply: Value = client(data, &c)?.post(
                &format!("/api/activities/{}/score", segment(&id)),
                &json!({ "device": device, "delta": delta }),
            )?;
            (c, reply)
        }
        ActivityCommand::Pause { id, client: c } => act(data, c, &id, "pause")?,
        ActivityCommand::Resume { id, client: c } => act(data, c, &id, "resume")?,
        ActivityCommand::Step { id, client: c } => act(data, c, &id, "step")?,
        ActivityCommand::End { id, client: c } => act(data, c, &id, "end")?,
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        show(&reply);
    }
    Ok(())
}

fn act(
    data: &std::path::Path,
    c: ClientArgs,
    id: &str,
    action: &str,
) -> Result<(ClientArgs, Value)> {
    let reply: Value = client(data, &c)?.post(
        &format!("/api/activities/{}/{action}", segment(id)),
        &json!({}),
    )?;
    Ok((c, reply))
}

fn text(v: &Value) -> String {
    printable(v.as_str().unwrap_or("-"))
}

fn summary(a: &Value) -> String {
    format!(
        "{}  {}  {}{}  step {}",
        text(&a["id"]),
        text(&a["type"]),
        text(&a["state"]),
        a["reason"]
            .as_str()
            .map(|r| format!(" ({})", printable(r)))
            .unwrap_or_default(),
        a["step"]
    )
}

fn show(a: &Value) {
    println!("{}", summary(a));
    let finals = &a["final_scores"];
    for d in a["devices"].as_array().into_iter().flatten() {
        let id = d["device_id"].as_str().unwrap_or("");
        println!(
            "  {:<16} {}  score {}{}",
            text(&d["device"]),
            printable(id),
            d["score"],
            if d["acknowledged_at"].is_null() {
                "  (not acknowledged)"
            } else {
                ""
            }
        );
        if !finals.is_null() {
            println!("    final {}", finals[id]);
        }
    }
    for m in a["missing"].as_array().into_iter().flatten() {
        println!("  did not answer: {}", text(m));
    }
}
