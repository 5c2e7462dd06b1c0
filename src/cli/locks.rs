//! `hearth lock acquire|release|status|watch|arbiter`: device locks (seed 004) through
//! the node's API.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::{ClientArgs, client, parse_duration};
use crate::verbs;

#[derive(Debug, Subcommand)]
pub(super) enum LockCommand {
    /// Lock a device (an entity id or any name) and print the lock's key.
    Acquire {
        /// The device.
        device: String,
        /// MAINTENANCE, QUEUE_EXECUTING, MANUAL_OPERATOR or QUEUE_QUEUED (or 0 to 3).
        #[arg(long = "type", value_name = "TYPE", default_value = "MANUAL_OPERATOR")]
        lock_type: String,
        /// Lease length, like 300s, 5m or 1h (default 300 s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Why, shown to others.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Who holds it (a label; default: $USER, else `hearth`).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Release a lock with its key (or force it with a MAINTENANCE lock's key).
    Release {
        /// The device.
        device: String,
        /// The key `lock acquire` printed; `-` or absent reads it from stdin, which keeps it
        /// out of the shell's history and the process list.
        key: Option<String>,
        /// Who releases it (default: $USER, else `hearth`).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show which device decides locks, or name another (run on the admin device).
    ///
    /// The current arbiter stops granting and hands its table (leases, keys, fencing
    /// counter) to the new one before the naming is written, so two devices never grant
    /// the same lock. If the handoff does not complete, the arbiter stays where it was.
    Arbiter {
        /// The device to name (its name or PeerId); absent: show the current arbiter.
        device: Option<String>,
        /// Name it without the old arbiter's table, for an arbiter that is gone for good:
        /// the leases it granted are lost.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show every held lock, or one device's.
    Status {
        /// One device.
        device: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every lock change as it happens.
    Watch {
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) fn lock(data: &std::path::Path, cmd: LockCommand) -> Result<()> {
    let user = |given: Option<String>| {
        given
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "hearth".into())
    };
    match cmd {
        LockCommand::Acquire {
            device,
            lock_type,
            timeout,
            reason,
            user: u,
            client: c,
        } => verbs::lock_acquire(
            &client(data, &c)?,
            &device,
            &lock_type,
            timeout,
            reason.as_deref(),
            &user(u),
            c.json,
        ),
        LockCommand::Release {
            device,
            key,
            user: u,
            client: c,
        } => {
            let key = match key.filter(|k| k != "-") {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("cannot read the lock key from stdin")?;
                    line.trim().to_string()
                }
            };
            verbs::lock_release(&client(data, &c)?, &device, &key, &user(u), c.json)
        }
        LockCommand::Status { device, client: c } => {
            verbs::lock_status(&client(data, &c)?, device.as_deref(), c.json)
        }
        LockCommand::Watch { client: c } => verbs::lock_watch(&client(data, &c)?, c.json),
        LockCommand::Arbiter {
            device,
            force,
            client: c,
        } => verbs::lock_arbiter(&client(data, &c)?, device.as_deref(), force, c.json),
    }
}
