//! `hearth playback start|show`: synchronised playback across devices of the home,
//! through the node's API.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{ClientArgs, client, parse_duration};
use crate::verbs::{printable, segment};

#[derive(Debug, Subcommand)]
pub(super) enum PlaybackCommand {
    /// Start media on devices of the home at one instant; prints the playback's id.
    Start {
        /// What to play (a URL, a path, a title).
        media: String,
        /// When to start: ms since the Unix epoch or RFC 3339, by this device's clock.
        #[arg(long, value_name = "TIME", conflicts_with = "after")]
        at: Option<String>,
        /// When to start, from now (e.g. 3s); the default is 3s.
        #[arg(long = "in", value_name = "D", value_parser = parse_duration)]
        after: Option<Duration>,
        /// A device that plays it (name or PeerId); repeat it. Default: every device.
        #[arg(long = "to", value_name = "DEVICE")]
        to: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one playback with each device's local start, or list them.
    Show {
        /// The playback's id (default: list them all).
        id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `--at` as the API takes it: a number of ms as a number, anything else as text.
fn at_value(text: &str) -> Value {
    match text.parse::<u64>() {
        Ok(ms) => json!(ms),
        Err(_) => json!(text),
    }
}

pub(super) fn playback(data: &std::path::Path, cmd: PlaybackCommand) -> Result<()> {
    match cmd {
        PlaybackCommand::Start {
            media,
            at,
            after,
            to,
            client: c,
        } => {
            let start_at = match at {
                Some(text) => at_value(&text),
                None => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis();
                    let after = after.unwrap_or(Duration::from_secs(3)).as_millis();
                    json!(u64::try_from(now + after)?)
                }
            };
            let body = json!({ "media": media, "start_at": start_at, "device_ids": to });
            let reply: Value = client(data, &c)?.post("/api/playback", &body)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
                return Ok(());
            }
            println!("{}", printable(reply["id"].as_str().unwrap_or("")));
            eprintln!(
                "starts at {} ms on this clock on {} device(s); `hearth playback show ID` \
                 shows each one's local start",
                reply["start_at"],
                reply["devices"].as_array().map_or(0, Vec::len)
            );
            Ok(())
        }
        PlaybackCommand::Show { id, client: c } => {
            let cl = client(data, &c)?;
            let Some(id) = id else {
                let reply: Value = cl.get("/api/playback")?;
                if c.json {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                    return Ok(());
                }
                let list = reply["playbacks"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no playback started or received here");
                }
                for p in list {
                    println!(
                        "{}  {}  at {}  {}",
                        text(&p["id"]),
                        if p["initiated_here"] == json!(true) {
                            "started here"
                        } else {
                            "received    "
                        },
                        p["start_at"],
                        text(&p["media"])
                    );
                }
                return Ok(());
            };
            if id.trim().is_empty() {
                bail!("a playback id must not be blank");
            }
            let reply: Value = cl.get(&format!("/api/playback/{}", segment(&id)))?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
                return Ok(());
            }
            println!(
                "{}  {}  at {} (initiator {})",
                text(&reply["id"]),
                text(&reply["media"]),
                reply["start_at"],
                text(&reply["initiator"])
            );
            for d in reply["devices"].as_array().into_iter().flatten() {
                println!(
                    "  {:<10} {:<20} local start {}  offset {} ms ± {} ms",
                    text(&d["state"]),
                    text(&d["name"]),
                    d["local_start_at"],
                    d["offset_ms"],
                    d["uncertainty_ms"]
                );
            }
            Ok(())
        }
    }
}

fn text(v: &Value) -> String {
    printable(v.as_str().unwrap_or("-"))
}

#[cfg(test)]
mod tests {
    use super::super::{Args, Command};
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("hearth").chain(args.iter().copied()))
    }

    #[test]
    fn start_takes_a_time_or_a_delay_and_devices() {
        let Command::Playback(PlaybackCommand::Start { media, at, to, .. }) = parse(&[
            "playback",
            "start",
            "song.flac",
            "--at",
            "1767323045000",
            "--to",
            "a",
            "--to",
            "b",
        ])
        .unwrap()
        .command
        else {
            panic!("not playback start");
        };
        assert_eq!(media, "song.flac");
        assert_eq!(at_value(&at.unwrap()), json!(1_767_323_045_000u64));
        assert_eq!(to, ["a", "b"]);
        let Command::Playback(PlaybackCommand::Start { after, .. }) =
            parse(&["playback", "start", "x", "--in", "5s"])
                .unwrap()
                .command
        else {
            panic!("not playback start");
        };
        assert_eq!(after, Some(Duration::from_secs(5)));
        assert_eq!(
            at_value("2026-01-02T03:04:05Z"),
            json!("2026-01-02T03:04:05Z")
        );
        for bad in [
            &["playback", "start", "x", "--at", "1", "--in", "2s"][..],
            &["playback", "start", "x", "--in", "soon"],
            &["playback", "start"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
        assert!(matches!(
            parse(&["playback", "show"]).unwrap().command,
            Command::Playback(PlaybackCommand::Show { id: None, .. })
        ));
    }
}
