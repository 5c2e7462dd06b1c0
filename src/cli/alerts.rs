//! `hearth alert MESSAGE` (raise an emergency alert for the home and the paired homes
//! that take this home's alerts), `hearth alerts [ID]` (what this device sent or
//! received, or one alert with its receipts) and `hearth homes alerts HOME on|off` (opt
//! this home in to a paired home's alerts, or out).

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::{ClientArgs, client, parse_duration};
use crate::verbs::{printable, segment};

/// `hearth alert MESSAGE [--severity S] [--ttl D]`.
#[derive(Debug, Args)]
pub(super) struct AlertArgs {
    /// What the alert says.
    #[arg(value_name = "MESSAGE")]
    message: String,
    /// How urgent it is.
    #[arg(long, value_enum, default_value_t = SeverityArg::Warning)]
    severity: SeverityArg,
    /// How long it lives, e.g. 30m or 2h (default 1h); a device away longer misses it.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    ttl: Option<Duration>,
    #[command(flatten)]
    client: ClientArgs,
}

/// An alert's severity on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum SeverityArg {
    Info,
    Warning,
    Critical,
}

/// `hearth alerts [ID]`.
#[derive(Debug, Args)]
pub(super) struct AlertsArgs {
    /// One alert's id, to show it with each target's receipt (default: list them all).
    id: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// `hearth homes alerts HOME on|off`.
#[derive(Debug, Subcommand)]
pub(super) enum HomesCommand {
    /// Take (on) or refuse (off) the emergency alerts of a paired home, for every device
    /// of this home.
    Alerts {
        /// The paired home: its HomeId, or its name when unique.
        home: String,
        /// `on` or `off`.
        #[arg(value_enum)]
        state: OnOff,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum OnOff {
    On,
    Off,
}

pub(super) fn alert(data: &std::path::Path, args: AlertArgs) -> Result<()> {
    let severity = match args.severity {
        SeverityArg::Info => "info",
        SeverityArg::Warning => "warning",
        SeverityArg::Critical => "critical",
    };
    let mut body = json!({ "message": args.message, "severity": severity });
    if let Some(ttl) = args.ttl {
        // Whole seconds, a part second rounded up; 0 is refused by the node.
        body["ttl_s"] = json!(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
    }
    let reply: Value = client(data, &args.client)?.post("/api/alerts", &body)?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("{}", printable(reply["id"].as_str().unwrap_or("")));
    let targets = reply["receipts"].as_array().map_or(0, Vec::len);
    eprintln!(
        "{} alert raised here for {targets} other device(s); it expires at {}. \
         `hearth alerts ID` shows who has it.",
        severity,
        reply["expires_at"].as_str().unwrap_or("-")
    );
    Ok(())
}

pub(super) fn alerts(data: &std::path::Path, args: AlertsArgs) -> Result<()> {
    let c = client(data, &args.client)?;
    let Some(id) = args.id else {
        let reply: Value = c.get("/api/alerts")?;
        if args.client.json {
            println!("{}", serde_json::to_string_pretty(&reply)?);
            return Ok(());
        }
        let list = reply["alerts"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("no alerts sent or received here");
        }
        for a in list {
            println!("{}", summary(&a));
        }
        return Ok(());
    };
    let reply: Value = c.get(&format!("/api/alerts/{}", segment(&id)))?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!("{}", summary(&reply));
    println!(
        "  from {} of home {}, expires {}",
        text(&reply["source"]["device"]),
        text(&reply["source"]["home"]),
        text(&reply["expires_at"])
    );
    for r in reply["receipts"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {} (home {}, {} cop{})",
            text(&r["state"]),
            text(&r["device"]),
            text(&r["home"]),
            r["attempts"],
            if r["attempts"] == json!(1) {
                "y"
            } else {
                "ies"
            }
        );
    }
    Ok(())
}

pub(super) fn homes(data: &std::path::Path, cmd: HomesCommand) -> Result<()> {
    let HomesCommand::Alerts {
        home,
        state,
        client: c,
    } = cmd;
    let body = json!({ "accept": state == OnOff::On });
    let reply: Value =
        client(data, &c)?.put(&format!("/api/homes/{}/alerts", segment(&home)), &body)?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    let verb = if reply["accept"] == json!(true) {
        "takes"
    } else {
        "refuses"
    };
    println!(
        "this home now {verb} emergency alerts from {} ({})",
        text(&reply["name"]),
        text(&reply["home_id"])
    );
    Ok(())
}

fn text(v: &Value) -> String {
    printable(v.as_str().unwrap_or("-"))
}

/// One line: time, severity, sent or received, id, message.
fn summary(a: &Value) -> String {
    format!(
        "{}  {:<8} {:<8} {}  {}",
        text(&a["sent_at"]),
        text(&a["severity"]),
        text(&a["direction"]),
        text(&a["id"]),
        text(&a["message"])
    )
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
    fn alert_takes_a_severity_and_a_ttl_and_refuses_bad_ones() {
        let args = parse(&["alert", "smoke", "--severity", "critical", "--ttl", "30m"]).unwrap();
        let Command::Alert(alert) = args.command else {
            panic!("not alert");
        };
        assert_eq!(alert.message, "smoke");
        assert_eq!(alert.severity, SeverityArg::Critical);
        assert_eq!(alert.ttl, Some(Duration::from_secs(1800)));
        let Command::Alert(plain) = parse(&["alert", "smoke"]).unwrap().command else {
            panic!("not alert");
        };
        assert_eq!(plain.severity, SeverityArg::Warning);
        assert_eq!(plain.ttl, None);
        for bad in [
            &["alert", "smoke", "--severity", "loud"][..],
            &["alert", "smoke", "--ttl", "soon"],
            &["alert"],
        ] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn homes_lists_or_switches_a_home_s_alerts() {
        assert!(matches!(
            parse(&["homes", "--json"]).unwrap().command,
            Command::Homes { cmd: None, .. }
        ));
        let Command::Homes {
            cmd: Some(HomesCommand::Alerts { home, state, .. }),
            ..
        } = parse(&["homes", "alerts", "Oak Ave", "on"])
            .unwrap()
            .command
        else {
            panic!("not homes alerts");
        };
        assert_eq!((home.as_str(), state), ("Oak Ave", OnOff::On));
        assert!(parse(&["homes", "alerts", "Oak Ave", "maybe"]).is_err());
        assert!(matches!(
            parse(&["alerts", "5Kq9wXyzAbCdEfGhJk"]).unwrap().command,
            Command::Alerts(AlertsArgs { id: Some(_), .. })
        ));
    }
}
