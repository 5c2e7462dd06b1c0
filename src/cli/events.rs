//! `hearth emit` (publish an event for the home's devices) and `hearth bus
//! history|dead|stats` (the node's event bus: recent events, failed deliveries, counters).
//!
//! The payload flag is `--payload`, named after the REST field: `--data` is every verb's
//! data dir already.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{ClientArgs, client};
use crate::verbs::{printable, segment};

/// `hearth emit TYPE [--to DEVICE]... [--payload JSON]`.
#[derive(Debug, Args)]
pub(super) struct EmitArgs {
    /// The event type, `<area>.<action>`, e.g. `coordination.broadcast`.
    #[arg(value_name = "TYPE")]
    event_type: String,
    /// A target device (PeerId or device name); repeatable. Without one, every device of
    /// the home gets the event, this one included.
    #[arg(long = "to", value_name = "DEVICE")]
    to: Vec<String>,
    /// The payload, a JSON object (default `{}`).
    #[arg(long, value_name = "JSON")]
    payload: Option<String>,
    /// A correlation id that every device receiving the event keeps.
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// `hearth bus ...` (also `hearth events history|dead|stats`).
#[derive(Debug, Subcommand)]
pub(super) enum BusCommand {
    /// Recent events on the node's bus, oldest first.
    History {
        /// Only events whose name matches, e.g. `coordination.*` (default: every event).
        pattern: Option<String>,
        /// At most this many (the most recent).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deliveries whose handler failed (the dead-letter queue), oldest first.
    Dead {
        /// At most this many (the most recent).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Counters: per event name, per handler, and events between devices.
    Stats(ClientArgs),
}

pub(super) fn emit(data: &std::path::Path, args: EmitArgs) -> Result<()> {
    let payload: Value = match args.payload.as_deref() {
        Some(text) => serde_json::from_str(text).context("--payload is not valid JSON")?,
        None => json!({}),
    };
    if !payload.is_object() {
        bail!("--payload must be a JSON object, e.g. '{{\"message\": \"dinner\"}}'");
    }
    let mut body = json!({ "type": args.event_type, "payload": payload });
    if !args.to.is_empty() {
        body["target_device_ids"] = json!(args.to);
    }
    if let Some(c) = &args.correlation_id {
        body["correlation_id"] = json!(c);
    }
    let reply: Value = client(data, &args.client)?.post("/api/events", &body)?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let list = |key: &str| -> Vec<String> {
        reply[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(printable).collect())
            .unwrap_or_default()
    };
    let (sent, absent) = (list("sent_to"), list("not_connected"));
    let here = if reply["delivered_here"] == json!(true) {
        "this device and "
    } else {
        ""
    };
    println!(
        "published {} to {here}{} other device(s){}",
        printable(reply["type"].as_str().unwrap_or("")),
        sent.len(),
        if sent.is_empty() {
            String::new()
        } else {
            format!(": {}", sent.join(", "))
        }
    );
    if !absent.is_empty() {
        eprintln!("not connected, so not sent: {}", absent.join(", "));
    }
    Ok(())
}

pub(super) fn bus(data: &std::path::Path, cmd: BusCommand) -> Result<()> {
    match cmd {
        BusCommand::History {
            pattern,
            limit,
            client: c,
        } => {
            let mut path = format!("/api/events/history?limit={limit}");
            if let Some(p) = pattern {
                path.push_str(&format!("&pattern={}", segment(&p)));
            }
            let reply: Value = client(data, &c)?.get(&path)?;
            if c.json {
                return print_json(&reply);
            }
            for e in reply["events"].as_array().into_iter().flatten() {
                println!("{}", event_line(e));
            }
            Ok(())
        }
        BusCommand::Dead { limit, client: c } => {
            let reply: Value =
                client(data, &c)?.get(&format!("/api/events/dead-letters?limit={limit}"))?;
            if c.json {
                return print_json(&reply);
            }
            for d in reply["dead_letters"].as_array().into_iter().flatten() {
                let handler = d["label"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("sub-{}", d["subscription"]));
                println!(
                    "{}  {}{}: {}",
                    event_line(&d["event"]),
                    printable(&handler),
                    if d["panicked"] == json!(true) {
                        " (panicked)"
                    } else {
                        ""
                    },
                    printable(d["error"].as_str().unwrap_or(""))
                );
            }
            Ok(())
        }
        BusCommand::Stats(c) => {
            let reply: Value = client(data, &c)?.get("/api/events/stats")?;
            if c.json {
                return print_json(&reply);
            }
            println!(
                "published {}  refused {}  dropped by middleware {}  subscriptions {}  \
                 dead letters {}",
                reply["published"],
                reply["refused"],
                reply["dropped_by_middleware"],
                reply["subscriptions"],
                reply["dead_letters"]
            );
            let d = &reply["devices"];
            println!(
                "between devices: published {}  sent {}  received {}  dropped {} (rate {})",
                d["published"], d["sent"], d["received"], d["dropped_malformed"], d["dropped_rate"]
            );
            for (name, s) in reply["by_name"].as_object().into_iter().flatten() {
                println!(
                    "  {:<32} published {:>6}  delivered {:>6}  handler errors {}",
                    printable(name),
                    s["published"],
                    s["delivered"],
                    s["handler_errors"].as_u64().unwrap_or(0)
                        + s["handler_panics"].as_u64().unwrap_or(0)
                );
            }
            for h in reply["handlers"].as_array().into_iter().flatten() {
                println!(
                    "  handler {:<24} calls {:>6}  errors {}  panics {}  avg {:.6}s  max {:.6}s",
                    printable(h["handler"].as_str().unwrap_or("")),
                    h["calls"],
                    h["errors"],
                    h["panics"],
                    h["average_time_s"].as_f64().unwrap_or(0.0),
                    h["max_time_s"].as_f64().unwrap_or(0.0)
                );
            }
            Ok(())
        }
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One event as a line: time, name, subject, correlation id, data.
fn event_line(e: &Value) -> String {
    let time = e["time"].as_f64().unwrap_or(0.0);
    let correlation = e["correlation_id"]
        .as_str()
        .map(|c| format!(" [{}]", printable(c)))
        .unwrap_or_default();
    format!(
        "{time:.3}  {}  {}{correlation}  {}",
        printable(e["name"].as_str().unwrap_or("")),
        printable(e["subject"].as_str().unwrap_or("")),
        printable(&e["data"].to_string())
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Args, Command};
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("hearth").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn emit_takes_targets_and_a_payload_beside_the_data_dir() {
        let args = parse(&[
            "emit",
            "coordination.broadcast",
            "--to",
            "kitchen",
            "--to",
            "hall",
            "--payload",
            "{\"a\":1}",
            "--data",
            "/tmp/d",
        ]);
        assert_eq!(args.data.as_deref(), Some(std::path::Path::new("/tmp/d")));
        let Command::Emit(emit) = args.command else {
            panic!("not emit");
        };
        assert_eq!(emit.to, ["kitchen", "hall"]);
        assert_eq!(emit.payload.as_deref(), Some("{\"a\":1}"));
    }

    #[test]
    fn events_reads_the_bus_or_streams_a_pattern() {
        let history = parse(&["events", "history", "coordination.*", "--limit", "5"]);
        assert!(matches!(
            history.command,
            Command::Events {
                bus: Some(BusCommand::History { limit: 5, .. }),
                ..
            }
        ));
        let live = parse(&["events", "entity.*"]);
        assert!(matches!(
            live.command,
            Command::Events { bus: None, ref pattern, .. } if pattern == "entity.*"
        ));
        assert!(matches!(
            parse(&["bus", "stats", "--json"]).command,
            Command::Bus(BusCommand::Stats(_))
        ));
    }
}
