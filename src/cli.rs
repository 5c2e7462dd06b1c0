//! Command-line parsing (clap derive) and the verbs.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::Client;
use crate::verbs;

mod activities;
mod alerts;
mod config;
mod events;
mod invite;
mod locks;
mod mqtt;
mod playback;
pub(crate) mod progress;
mod sessions;

/// `hearth --version`: the crate's version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("HEARTH_GIT_COMMIT"),
    ")"
);

/// Hearth: a peer-to-peer sync node for homes.
///
/// `hearth up` runs a node. Every other verb talks to the running node through its local
/// API, found through --api (or HEARTH_API), else through `<data>/api.addr`.
#[derive(Debug, Parser)]
#[command(name = "hearth", version = VERSION, propagate_version = true)]
pub(crate) struct Args {
    /// Data dir (default: the platform's data dir, e.g. ~/.local/share/hearth).
    #[arg(long, global = true, env = "HEARTH_DATA", value_name = "DIR")]
    data: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node in the foreground until SIGINT or SIGTERM.
    ///
    /// A fresh data dir gets a new device identity, a store key file (or, with
    /// HEARTH_PASSPHRASE set, a key derived from the passphrase) and an API token.
    Up(Box<config::UpArgs>),
    /// Show the running node: PeerId, device, home, listen addresses, peers with their
    /// sync lag, data dir, API address and uptime.
    Status(ClientArgs),
    /// List connected peers, admitted or not, with their sync lag.
    Peers(ClientArgs),
    /// List documents quarantined at start because a stored record was damaged; with
    /// `--drop`, delete their damaged records (devices of the home sync the documents back).
    Repair {
        /// Delete the quarantined documents' stored records.
        #[arg(long)]
        drop: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create, join, leave and show rooms; chat in them.
    #[command(subcommand)]
    Room(RoomCommand),
    /// Set and read presence (online, away, busy; offline is derived).
    #[command(subcommand)]
    Presence(PresenceCommand),
    /// Device locks: priority leases decided by the home's arbiter (its admin device).
    #[command(subcommand)]
    Lock(locks::LockCommand),
    /// User sessions, readable on every device of the home, and their handoff between
    /// devices (prepare, accept, acknowledge; rolled back on timeout).
    #[command(subcommand)]
    Session(sessions::SessionCommand),
    /// Synchronised playback: start media on devices of the home at one instant (each
    /// converts the start to its own clock from clock probes), show each one's start.
    #[command(subcommand)]
    Playback(playback::PlaybackCommand),
    /// Group activities (trivia, story, sing-along, synchronised playback): start, show,
    /// score, pause, resume, step and end.
    #[command(subcommand)]
    Activity(activities::ActivityCommand),
    /// Send a notification to a user: every client of theirs on every device of the home
    /// gets it, and clients that are away get it when they connect, within its TTL.
    Notify {
        /// The user.
        user: String,
        /// The title.
        title: String,
        /// The body.
        #[arg(long, value_name = "TEXT")]
        body: Option<String>,
        /// low, normal (default), high or urgent.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// Seed 001's type: milestone_achieved, review_reminder, peer_message (default),
        /// achievement_unlocked or intervention_alert.
        #[arg(long = "type", value_name = "TYPE", default_value = "peer_message")]
        kind: String,
        /// How long it is kept for clients that are away, like 1h or 1d (default 1 day).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A user's state, which follows them across their clients and devices (seed 001).
    #[command(subcommand)]
    User(UserCommand),
    /// The settings file (`hearth.toml` in the data dir, or `up --config FILE`).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask the running node for a single-use invite code.
    ///
    /// The code goes to stdout alone; a QR code and instructions go to stderr.
    Invite {
        /// Invite another home rather than a device of this one.
        #[arg(long)]
        home: bool,
        /// How long the code stays valid, e.g. `10m`, `1h`.
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Join a home with an invite code.
    ///
    /// A device code runs without a node: it pairs with the issuer, stores the
    /// membership in --data (which must not hold a home yet) and exits; then run
    /// `hearth up` with the same --data. A home code goes to this home's running node,
    /// and the two homes become known to each other.
    Join {
        /// The invite code.
        code: String,
        /// This device's name (default: the host name); device codes only.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List paired homes, with what is shared each way; `homes alerts HOME on|off` takes
    /// or refuses a paired home's emergency alerts.
    #[command(args_conflicts_with_subcommands = true)]
    Homes {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: Option<alerts::HomesCommand>,
    },
    /// Forget a paired home: everything shared with it is unshared (keys rotate) and its
    /// devices are no longer admitted.
    Forget {
        /// The home: its HomeId, or its name when unique.
        home: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Share entities of this home with a paired home: ids, or patterns over this home's
    /// entities (`light.*`, `**`). Many at once show a progress bar on a terminal.
    Share {
        /// Entity ids or patterns, e.g. `light.porch` or `'light.*'`.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// The home to share with: its HomeId, or its name when unique.
        #[arg(long = "with", value_name = "HOME")]
        with: String,
        /// Grant read rights only (default: read and write).
        #[arg(long)]
        read_only: bool,
        /// Conflict policy: latest-wins, merge, owner-wins, sharer-wins or user-choice.
        #[arg(long, value_name = "POLICY")]
        policy: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop sharing an entity with a home; its key rotates, and the home reads nothing
    /// written after this.
    Unshare {
        /// The entity id.
        id: String,
        /// The home: its HomeId, or its name when unique.
        #[arg(long = "from", value_name = "HOME")]
        from: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List what this home shares, and what other homes share with it.
    Shared(ClientArgs),
    /// Set an entity's conflict policy: latest-wins, merge, owner-wins, sharer-wins or
    /// user-choice.
    Policy {
        /// The entity id.
        id: String,
        /// The policy.
        policy: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List conflicts waiting for a choice (entities under the user-choice policy).
    Conflicts(ClientArgs),
    /// Settle a conflict: write candidate CHOICE (its index in `hearth conflicts`) over
    /// the others.
    Resolve {
        /// The entity id.
        id: String,
        /// `state` or `attributes.<name>`.
        field: String,
        /// The candidate's index.
        choice: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a device of this home (admin device only): it is refused from now on, and
    /// every document's key rotates so it reads nothing new.
    RevokeDevice {
        /// The device: its PeerId, or its name when unique.
        device: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the audit log: pairings, shares, rotations, revocations, refused requests.
    Audit {
        /// Only entries since an RFC 3339 time or a duration back from now (`15m`, `2h`).
        #[arg(long, value_name = "SINCE")]
        since: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create, update and read entities.
    #[command(subcommand)]
    Entity(EntityCommand),
    /// Print the node's events live, one line each, until stopped.
    ///
    /// PATTERN matches event names: `entity.*`, `room.**`; `*` or `**` (the default)
    /// is every event. `--json` prints each WebSocket frame as it arrives. `events
    /// history|dead|stats` are `bus history|dead|stats`.
    #[command(args_conflicts_with_subcommands = true)]
    Events {
        /// Event name pattern.
        #[arg(default_value = "**")]
        pattern: String,
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        bus: Option<events::BusCommand>,
    },
    /// Publish an event for the home's devices: every device, or the ones named with --to.
    Emit(events::EmitArgs),
    /// Raise an emergency alert on every device of the home and of the paired homes that
    /// take this home's alerts; devices away get it when they return within its TTL.
    Alert(alerts::AlertArgs),
    /// The emergency alerts this device sent or received, or one with its receipts.
    Alerts(alerts::AlertsArgs),
    /// The node's event bus: recent events, failed deliveries, counters.
    #[command(subcommand)]
    Bus(events::BusCommand),
    /// Measure the sync path on this machine: latency, throughput, fanout, reconnect,
    /// cold start, wire bytes, memory, history and batching, each against an in-run
    /// baseline. Runs its own nodes on loopback (mDNS off) in a scratch dir.
    Bench(crate::bench::BenchArgs),
    /// Print the API bearer token of the node in the data dir.
    Token,
    /// Print shell completions for SHELL to stdout.
    Completions {
        /// The shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum EntityCommand {
    /// Create or update an entity: `hearth entity set light.porch on --attr brightness=80`.
    Set {
        /// Entity id, `domain.object` (e.g. `light.porch`).
        id: String,
        /// The new state (a string, as in Home Assistant).
        state: String,
        /// An attribute as KEY=VALUE; VALUE is parsed as JSON when it can be, else kept as
        /// a string. Repeatable.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// All attributes as one JSON object (combined with --attr, which wins).
        #[arg(long = "attrs", value_name = "JSON")]
        attrs_json: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one entity.
    Get {
        /// Entity id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every entity.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print entity changes live, local and from other devices, until stopped.
    ///
    /// PATTERN matches entity ids the way event patterns match names: `light.*`,
    /// `sensor.**`; the default is every entity. `--json` prints each change's JSON.
    Watch {
        /// Entity id pattern.
        #[arg(default_value = "**")]
        pattern: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an entity on every device of the home.
    Delete {
        /// Entity id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List an entity's versions, oldest first.
    History {
        /// Entity id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Bring back the state and attributes of an earlier version (as a new version).
    Restore {
        /// Entity id.
        id: String,
        /// The version: its id, or a prefix of 8 or more hex digits.
        #[arg(value_name = "VERSION")]
        version_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Read a settings file (default: hearth.toml in the data dir, when there is one) with
    /// the environment's HEARTH_<SECTION>__<KEY> overrides, and print what `up` would run
    /// with and where each value came from, or what is wrong (exit 1).
    Check {
        /// The file.
        file: Option<PathBuf>,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Show a user's state: each key's current value, concurrent writes when the node
    /// keeps them, and the user's client sessions.
    State {
        /// The user.
        user: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum RoomCommand {
    /// Create a room; you join it at once.
    Create {
        /// The room's name (unique in the home).
        name: String,
        /// Most members the room admits (1 to 1000; default 50).
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// The user creating it (default: the device name).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Join a room (by id or unique name).
    Join {
        /// Room id or name.
        room: String,
        /// The user joining (default: the device name).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Leave a room.
    Leave {
        /// Room id or name.
        room: String,
        /// The user leaving (default: the device name).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a room and its members.
    Show {
        /// Room id or name.
        room: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the home's rooms.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Post a chat message.
    Say {
        /// Room id or name.
        room: String,
        /// The message.
        text: String,
        /// The sender (default: the device name); must be a member.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read the newest chat messages, oldest first.
    Chat {
        /// Room id or name.
        room: String,
        /// How many messages (at most 1000).
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SettableStatus {
    /// Available.
    Online,
    /// Away from the device.
    Away,
    /// Present but not to be disturbed.
    Busy,
}

#[derive(Debug, Subcommand)]
enum PresenceCommand {
    /// Set a user's status.
    Set {
        /// The status.
        #[arg(value_enum)]
        status: SettableStatus,
        /// The user (default: the device name).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// A short note shown with the status.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a user's status (default: the device name's).
    Show {
        /// The user.
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List who is not offline, in the home or in one room.
    Online {
        /// Only members of this room (id or name).
        #[arg(long, value_name = "ROOM")]
        room: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// How a client verb finds its node.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Node API address, `host:port` or `http://host:port` (default: read <data>/api.addr).
    #[arg(long, env = "HEARTH_API", value_name = "ADDR")]
    api: Option<String>,

    /// API bearer token (default: read <data>/token).
    #[arg(
        long,
        env = "HEARTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs the parsed command.
pub(crate) fn run(args: Args) -> Result<()> {
    let data = match args.data {
        Some(d) => d,
        None => hearth::default_data_dir().context(
            "the platform reports no home directory; pass --data DIR or set HEARTH_DATA",
        )?,
    };
    match args.command {
        Command::Up(up) => run_up(data, *up),
        Command::Status(c) => status(&Client::find(&data, c.api, c.token)?, c.json),
        Command::Entity(cmd) => entity(&data, cmd),
        Command::Peers(c) => verbs::peers(&client(&data, &c)?, c.json),
        Command::Repair { drop, client: c } => verbs::repair(&client(&data, &c)?, drop, c.json),
        Command::Room(cmd) => room(&data, cmd),
        Command::Presence(cmd) => presence(&data, cmd),
        Command::Lock(cmd) => locks::lock(&data, cmd),
        Command::Session(cmd) => sessions::session(&data, cmd),
        Command::Playback(cmd) => playback::playback(&data, cmd),
        Command::Activity(cmd) => activities::activity(&data, cmd),
        Command::Notify {
            user,
            title,
            body,
            priority,
            kind,
            ttl,
            client: c,
        } => verbs::notify(
            &client(&data, &c)?,
            &serde_json::json!({
                "user_id": user,
                "title": title,
                "body": body.unwrap_or_default(),
                "priority": priority,
                "type": kind,
                "ttl": ttl.map_or(86_400, |t| t.as_secs()),
            }),
            c.json,
        ),
        Command::Config(ConfigCommand::Check { file, json }) => config::check(&data, file, json),
        Command::User(UserCommand::State { user, client: c }) => {
            verbs::user_state(&client(&data, &c)?, &user, c.json)
        }
        Command::Invite {
            home,
            ttl,
            client: c,
        } => invite::invite(&data, home, ttl, &c),
        Command::Join {
            code,
            name,
            client: c,
        } => {
            if hearth::invite_code_kind(&code)? == "home" {
                crate::verbs::pair_home(&client(&data, &c)?, &code, c.json)
            } else {
                join(data, &code, name)
            }
        }
        Command::Homes { cmd: Some(cmd), .. } => alerts::homes(&data, cmd),
        Command::Homes { client: c, .. } => crate::verbs::homes(&client(&data, &c)?, c.json),
        Command::Alert(args) => alerts::alert(&data, args),
        Command::Alerts(args) => alerts::alerts(&data, args),
        Command::Forget { home, client: c } => {
            crate::verbs::forget(&client(&data, &c)?, &home, c.json)
        }
        Command::Share {
            ids,
            with,
            read_only,
            policy,
            client: c,
        } => crate::verbs::share(
            &client(&data, &c)?,
            &ids,
            &with,
            read_only,
            policy.as_deref(),
            c.json,
        ),
        Command::Unshare {
            id,
            from,
            client: c,
        } => crate::verbs::unshare(&client(&data, &c)?, &id, &from, c.json),
        Command::Shared(c) => crate::verbs::shared(&client(&data, &c)?, c.json),
        Command::Policy {
            id,
            policy,
            client: c,
        } => crate::verbs::set_policy(&client(&data, &c)?, &id, &policy, c.json),
        Command::RevokeDevice { device, client: c } => {
            crate::verbs::revoke_device(&client(&data, &c)?, &device, c.json)
        }
        Command::Conflicts(c) => crate::verbs::conflicts(&client(&data, &c)?, c.json),
        Command::Resolve {
            id,
            field,
            choice,
            client: c,
        } => crate::verbs::resolve(&client(&data, &c)?, &id, &field, choice, c.json),
        Command::Audit { since, client: c } => {
            crate::verbs::audit(&client(&data, &c)?, since.as_deref(), c.json)
        }
        Command::Events { bus: Some(cmd), .. } | Command::Bus(cmd) => events::bus(&data, cmd),
        Command::Emit(args) => events::emit(&data, args),
        Command::Events {
            pattern,
            client: c,
            bus: None,
        } => {
            let pattern = hearth::bus::Pattern::parse(&pattern)?;
            crate::watch::run(
                &client(&data, &c)?,
                crate::watch::Watch::Events(pattern),
                c.json,
            )
        }
        Command::Bench(args) => crate::bench::run(args),
        Command::Token => {
            let path = data.join(hearth::TOKEN_FILE);
            let token = hearth::read_token(&data)?.with_context(|| {
                format!(
                    "no token at {}; start the node once with `hearth up --data {}`",
                    path.display(),
                    data.display()
                )
            })?;
            println!("{token}");
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "hearth",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// How long a stopping node may take before the process gives up on a clean exit. The
/// node bounds each step of its stop within it, failed store included; with the runtime's
/// own stop below, the process exits within 5 s of the signal.
const SHUTDOWN_LIMIT: Duration = Duration::from_millis(4500);
/// How long the runtime waits for leftover blocking tasks once the node has stopped.
const RUNTIME_STOP_LIMIT: Duration = Duration::from_millis(300);

/// Shows the first catch-up with the home's devices as a bar on a terminal: a device that
/// just joined fetches the whole home. It ends once a device of the home is in sync with
/// this one, or is set aside after a minute without progress (a document no connected
/// device holds).
async fn initial_sync(node: &hearth::Node) {
    const STALL: Duration = Duration::from_secs(60);
    if !progress::shown() {
        return;
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last = (u64::MAX, std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        // A core that stopped answering ends the node through `failed`, not here.
        let Ok(lag) = node.sync_lag().await else {
            continue;
        };
        let Some(behind) = lag.peers.iter().map(|(_, b)| *b).min() else {
            continue;
        };
        if behind == 0 {
            if let Some(bar) = bar {
                bar.finish_and_clear();
                eprintln!("in sync with the home: {} documents", lag.documents);
            }
            return;
        }
        let bar = bar.get_or_insert_with(|| {
            let bar = progress::bar(lag.documents, "initial sync");
            progress::under_logs(&bar);
            bar
        });
        bar.set_length(lag.documents);
        bar.set_position(lag.documents.saturating_sub(behind));
        bar.set_message(format!("documents ({} device(s))", lag.peers.len()));
        if behind != last.0 {
            last = (behind, std::time::Instant::now());
        } else if last.1.elapsed() > STALL {
            bar.abandon_with_message(format!("{behind} documents not yet in sync"));
            return;
        }
    }
}

fn run_up(data: PathBuf, up: config::UpArgs) -> Result<()> {
    let (config, log_format, notes) = config::resolve(data, up)?;
    init_tracing(log_format);
    for note in notes {
        tracing::warn!("{note}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        // Watch the signals before the node publishes its address: a supervisor that reads
        // api.addr and at once sends SIGTERM must get a clean stop, not the default kill.
        let stop = stop_signal()?;
        let node = hearth::Node::start(config).await?;
        let api = node
            .api_addr()
            .context("the node started without its API")?;
        // A closed stdout (a supervisor that stopped reading) must not stop the node, so
        // write errors are ignored rather than panicking as println! would.
        let _ = writeln!(
            std::io::stdout(),
            "hearth node {} is up\n  device    {}\n  data dir  {}\n  api       http://{}",
            node.peer_id(),
            node.device_name(),
            node.data_dir().display(),
            api
        );
        // Test hook: the integration tests kill the core of a running `hearth up` this way.
        #[cfg(feature = "test-hooks")]
        if std::env::var_os("HEARTH_TEST_ABORT_CORE").is_some() {
            node.debug_abort_core();
        }
        // A node whose core or network died answers nothing any more; staying up would
        // hide that from the supervisor, so it stops and exits 1.
        let failure = tokio::select! {
            stopped = stop => { stopped?; None }
            reason = node.failed() => Some(reason),
            never = async {
                initial_sync(&node).await;
                std::future::pending::<std::convert::Infallible>().await
            } => match never {},
        };
        match failure {
            None => {
                tracing::info!("stopping");
                tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown())
                    .await
                    .context("node did not stop within 4.5 s")??;
                Ok(())
            }
            Some(reason) => {
                tracing::error!(%reason, "stopping after a node task failed");
                // Best effort: the store still closes cleanly; the exit says what failed.
                let _ = tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown()).await;
                bail!("the node stopped working: {reason}")
            }
        }
    });
    // Dropping a runtime waits for every blocking task without limit; this does not.
    runtime.shutdown_timeout(RUNTIME_STOP_LIMIT);
    result
}

/// Registers SIGTERM and SIGINT handlers now, and returns a future that resolves on
/// either.
fn stop_signal() -> Result<impl std::future::Future<Output = Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG overrides; without it the node logs at info.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| progress::LogWriter);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn status(client: &Client, json: bool) -> Result<()> {
    let body: serde_json::Value = client.get("/api/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let field = |k: &str| verbs::printable(body.get(k).and_then(|v| v.as_str()).unwrap_or("-"));
    let uptime = body.get("uptime_s").and_then(|v| v.as_f64()).unwrap_or(0.0);
    if field("peer_id") == "-" {
        bail!("the node's status reply has no peer_id: {body}");
    }
    println!("node      {}", field("peer_id"));
    println!("device    {}", field("device"));
    let home = &body["home"];
    println!(
        "home      {} ({})",
        verbs::printable(home["home_id"].as_str().unwrap_or("-")),
        verbs::printable(home["name"].as_str().unwrap_or("-"))
    );
    println!("data dir  {}", field("data_dir"));
    println!("api       {}", field("api"));
    for addr in body["listen"].as_array().into_iter().flatten() {
        println!(
            "listen    {}",
            verbs::printable(addr.as_str().unwrap_or("-"))
        );
    }
    let peers = body["peers"].as_array().cloned().unwrap_or_default();
    println!("version   {}", field("version"));
    println!(
        "uptime    {}",
        humanize(Duration::from_secs(uptime.max(0.0) as u64))
    );
    println!("peers     {}", peers.len());
    if !peers.is_empty() {
        println!("{}", verbs::peers_table(&peers));
    }
    let store = &body["store"];
    match store["health"].as_str() {
        Some("failed") => println!(
            "store     FAILED, writes refused until it recovers: {}",
            verbs::printable(store["reason"].as_str().unwrap_or("-"))
        ),
        Some(health) => println!("store     {}", verbs::printable(health)),
        None => {}
    }
    let damaged = store["quarantined"].as_array().cloned().unwrap_or_default();
    if !damaged.is_empty() {
        let ids: Vec<String> = damaged
            .iter()
            .map(|d| verbs::printable(d["doc"].as_str().unwrap_or("-")))
            .collect();
        println!(
            "damaged   {} document(s) quarantined: {}; see `hearth repair`",
            damaged.len(),
            ids.join(", ")
        );
    }
    Ok(())
}

fn room(data: &std::path::Path, cmd: RoomCommand) -> Result<()> {
    match cmd {
        RoomCommand::Create {
            name,
            max,
            user,
            client: c,
        } => verbs::room_create(&client(data, &c)?, &name, max, user.as_deref(), c.json),
        RoomCommand::Join {
            room,
            user,
            client: c,
        } => verbs::room_join_leave(&client(data, &c)?, &room, user.as_deref(), true, c.json),
        RoomCommand::Leave {
            room,
            user,
            client: c,
        } => verbs::room_join_leave(&client(data, &c)?, &room, user.as_deref(), false, c.json),
        RoomCommand::Show { room, client: c } => {
            verbs::room_show(&client(data, &c)?, &room, c.json)
        }
        RoomCommand::List { client: c } => verbs::room_list(&client(data, &c)?, c.json),
        RoomCommand::Say {
            room,
            text,
            user,
            client: c,
        } => verbs::room_say(&client(data, &c)?, &room, &text, user.as_deref(), c.json),
        RoomCommand::Chat {
            room,
            limit,
            client: c,
        } => verbs::room_chat(&client(data, &c)?, &room, limit, c.json),
    }
}

fn presence(data: &std::path::Path, cmd: PresenceCommand) -> Result<()> {
    match cmd {
        PresenceCommand::Set {
            status,
            user,
            note,
            client: c,
        } => {
            let status = match status {
                SettableStatus::Online => "online",
                SettableStatus::Away => "away",
                SettableStatus::Busy => "busy",
            };
            verbs::presence_set(
                &client(data, &c)?,
                status,
                note.as_deref(),
                user.as_deref(),
                c.json,
            )
        }
        PresenceCommand::Show { user, client: c } => {
            verbs::presence_show(&client(data, &c)?, user.as_deref(), c.json)
        }
        PresenceCommand::Online { room, client: c } => {
            verbs::presence_online(&client(data, &c)?, room.as_deref(), c.json)
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e}; write it like 10m or 1h"))
}

fn join(data: PathBuf, code: &str, name: Option<String>) -> Result<()> {
    init_tracing_quiet();
    let passphrase = std::env::var("HEARTH_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
        .map(hearth::Passphrase);
    let config = hearth::Config {
        data_dir: data.clone(),
        device_name: name,
        passphrase,
        ..hearth::Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let joined = runtime.block_on(hearth::Node::join(code, &config))?;
    println!(
        "joined home {} ({}) as device {}\nstart it with: hearth up --data {}",
        verbs::printable(&joined.home_name),
        joined.home_id,
        joined.peer_id,
        data.display()
    );
    Ok(())
}

/// Warnings only, for short-lived commands that have their own output.
fn init_tracing_quiet() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn client(data: &std::path::Path, c: &ClientArgs) -> Result<Client> {
    Client::find(data, c.api.clone(), c.token.clone())
}

fn entity(data: &std::path::Path, cmd: EntityCommand) -> Result<()> {
    match cmd {
        EntityCommand::Set {
            id,
            state,
            attrs,
            attrs_json,
            client: c,
        } => {
            let attributes = build_attributes(attrs_json.as_deref(), &attrs)?;
            let mut body = serde_json::json!({ "state": state });
            if let Some(a) = attributes {
                body["attributes"] = serde_json::Value::Object(a);
            }
            let entity: serde_json::Value = client(data, &c)?.put(&entity_path(&id), &body)?;
            print_entity(&entity, c.json)
        }
        EntityCommand::Get { id, client: c } => {
            let entity: serde_json::Value = client(data, &c)?.get(&entity_path(&id))?;
            print_entity(&entity, c.json)
        }
        EntityCommand::Watch { pattern, client: c } => {
            let pattern = hearth::bus::Pattern::parse(&pattern)?;
            crate::watch::run(
                &client(data, &c)?,
                crate::watch::Watch::Entities(pattern),
                c.json,
            )
        }
        EntityCommand::List { client: c } => {
            let body: serde_json::Value = client(data, &c)?.get("/api/entities")?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            let list = body
                .get("entities")
                .and_then(|e| e.as_array())
                .context("the node's reply has no entities list")?;
            if list.is_empty() {
                println!("no entities yet; create one with `hearth entity set ID STATE`");
            }
            // Entities shared in come from other homes: nothing raw reaches the terminal.
            for e in list {
                println!(
                    "{:<32} {:<12} {}",
                    verbs::printable(e["id"].as_str().unwrap_or("-")),
                    verbs::printable(e["state"].as_str().unwrap_or("-")),
                    verbs::printable(&e["attributes"].to_string())
                );
            }
            Ok(())
        }
        EntityCommand::Delete { id, client: c } => {
            verbs::entity_delete(&client(data, &c)?, &entity_path(&id), c.json)
        }
        EntityCommand::History { id, client: c } => {
            verbs::entity_history(&client(data, &c)?, &entity_path(&id), c.json)
        }
        EntityCommand::Restore {
            id,
            version_id,
            client: c,
        } => {
            let entity = verbs::entity_restore(&client(data, &c)?, &entity_path(&id), &version_id)?;
            print_entity(&entity, c.json)
        }
    }
}

/// Entity ids are `domain.object` with a restricted alphabet, so they need no escaping;
/// anything else is passed through for the node to refuse with its own message.
fn entity_path(id: &str) -> String {
    let encoded: String = id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/api/entities/{encoded}")
}

fn build_attributes(
    json: Option<&str>,
    pairs: &[String],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    if json.is_none() && pairs.is_empty() {
        return Ok(None);
    }
    let mut map = match json {
        Some(text) => match serde_json::from_str(text).context("--attrs is not valid JSON")? {
            serde_json::Value::Object(m) => m,
            _ => bail!("--attrs must be a JSON object, e.g. '{{\"brightness\": 80}}'"),
        },
        None => serde_json::Map::new(),
    };
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--attr {pair:?} is not KEY=VALUE");
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        map.insert(k.to_string(), value);
    }
    Ok(Some(map))
}

fn print_entity(e: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(e)?);
        return Ok(());
    }
    let f = |k: &str| verbs::printable(e.get(k).and_then(|v| v.as_str()).unwrap_or("-"));
    println!("{}  {}", f("id"), f("state"));
    println!(
        "  attributes  {}",
        verbs::printable(
            &e.get("attributes")
                .unwrap_or(&serde_json::Value::Null)
                .to_string()
        )
    );
    println!("  updated     {} by {}", f("updated_at"), f("updated_by"));
    println!("  owner       {}", f("owner"));
    println!("  version     {}", f("version"));
    Ok(())
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
