//! Command-line parsing (clap derive) and the verbs.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::Client;

/// Hearth: a peer-to-peer sync node for homes.
///
/// `hearth up` runs a node. Every other verb talks to the running node through its local
/// API, found through --api (or HEARTH_API), else through `<data>/api.addr`.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, propagate_version = true)]
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
    Up(UpArgs),
    /// Show the running node: PeerId, device, data dir, API address and uptime.
    Status(ClientArgs),
    /// Print the API bearer token of the node in the data dir.
    Token,
    /// Print shell completions for SHELL to stdout.
    Completions {
        /// The shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Address for the local HTTP API; port 0 picks a free port (written to <data>/api.addr).
    #[arg(long, value_name = "ADDR", default_value_t = hearth::DEFAULT_API_ADDR)]
    api: SocketAddr,

    /// This device's name, shown to people (default: the host name, or the last name given).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
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
        Command::Up(up) => run_up(data, up),
        Command::Status(c) => status(&Client::find(&data, c.api, c.token)?, c.json),
        Command::Token => {
            let path = data.join(hearth::TOKEN_FILE);
            let token = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no token at {}; start the node once with `hearth up --data {}`",
                    path.display(),
                    data.display()
                )
            })?;
            println!("{}", token.trim());
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

/// How long a stopping node may take before the process gives up on a clean exit.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);

fn run_up(data: PathBuf, up: UpArgs) -> Result<()> {
    init_tracing(up.log_format);
    let passphrase = std::env::var("HEARTH_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
        .map(hearth::Passphrase);
    let config = hearth::Config {
        data_dir: data,
        api_addr: up.api,
        device_name: up.name,
        passphrase,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let node = hearth::Node::start(config).await?;
        // A closed stdout (a supervisor that stopped reading) must not stop the node, so
        // write errors are ignored rather than panicking as println! would.
        let _ = writeln!(
            std::io::stdout(),
            "hearth node {} is up\n  device    {}\n  data dir  {}\n  api       http://{}",
            node.peer_id(),
            node.device_name(),
            node.data_dir().display(),
            node.api_addr()
        );
        wait_for_signal().await?;
        tracing::info!("stopping");
        tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown())
            .await
            .context("node did not stop within 2 s")??;
        Ok(())
    })
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG overrides; without it the node logs at info.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
    let field = |k: &str| {
        body.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_string()
    };
    let uptime = body.get("uptime_s").and_then(|v| v.as_f64()).unwrap_or(0.0);
    if field("peer_id") == "-" {
        bail!("the node's status reply has no peer_id: {body}");
    }
    println!("node      {}", field("peer_id"));
    println!("device    {}", field("device"));
    println!("data dir  {}", field("data_dir"));
    println!("api       {}", field("api"));
    println!("version   {}", field("version"));
    println!(
        "uptime    {}",
        humanize(Duration::from_secs(uptime.max(0.0) as u64))
    );
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
