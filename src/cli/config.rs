//! `hearth up`'s settings, layered: flags over environment over the config file over
//! defaults (figment does the file and environment layers). The file is `hearth.toml` in
//! the data dir, or `--config FILE`; `hearth config check [FILE]` reads one and prints
//! what it comes to.
//!
//! Its sections are Hearth's own (`node`, `api`) and seed 001's `config.yaml` sections,
//! in TOML, with the seed's key names where they apply: `agent` (`host`, `port`: the
//! API's address), `websocket` (`max_connections`, `heartbeat_interval`, `timeout`),
//! `session_management` (`session_ttl`, `max_devices_per_user`), `synchronization`
//! (`conflict_resolution`), `notifications` (`types`, `retry_attempts`, `retry_delay`),
//! `collaboration` (`max_room_size`) and `push_services` (`webhooks`, `ntfy`). The seed's
//! keys that do not apply here (Redis, FCM and APNS credentials, compression, ...) are
//! read and reported as unused; any other key is an error naming it. Times are whole
//! seconds, as in the seed, except `node.batch_window` (`"1ms"`).
//!
//! The environment overrides any key as `HEARTH_<SECTION>__<KEY>`, e.g.
//! `HEARTH_SESSION_MANAGEMENT__SESSION_TTL=600`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use super::{LogFormat, parse_duration};

/// The config file's name in the data dir.
pub(super) const CONFIG_FILE: &str = "hearth.toml";

/// `hearth up`'s flags; each one given wins over the file and the environment.
#[derive(Debug, clap::Args)]
pub(super) struct UpArgs {
    /// Settings file (default: hearth.toml in the data dir, when there is one).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address for the local HTTP API; port 0 picks a free port (written to
    /// <data>/api.addr). Default 127.0.0.1:4650.
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,

    /// Multiaddr to listen on for peers; repeatable. Default /ip4/0.0.0.0/tcp/0.
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<String>,

    /// Do not discover peers with mDNS. Use this where multicast must not leave the host
    /// (and there use --peer).
    #[arg(long)]
    no_mdns: bool,

    /// A peer to keep dialled, `/ip4/ADDR/tcp/PORT/p2p/PEERID`; repeatable.
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,

    /// This device's name, shown to people (default: the host name, or the last name given).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// How long local writes wait for company before one flush covers them all, e.g.
    /// `1ms`, `500us`; `0s` flushes each write on its own. Pushes to peers never wait.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    batch_window: Option<Duration>,

    /// Serve /metrics without the API token. By default a scraper sends the token as
    /// `Authorization: Bearer <token>`, like any client.
    #[arg(long)]
    metrics_open: bool,

    /// A web origin whose pages may open the API's WebSockets, as a browser sends it
    /// (`http://dashboard.lan:3000`); repeatable. The node's own origins (http:// plus its
    /// API address, localhost or 127.0.0.1 with the API port) always may.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,

    /// Most connections one IP address may hold to this node; the home's own devices and
    /// --peer addresses are exempt. Default 16.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_ip: Option<u32>,

    /// Log output format (default pretty).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,

    /// How long a seed 001 client session lives after its last socket closed (default 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    session_ttl: Option<Duration>,

    /// Distinct seed 001 clients (device ids) a user may have live across the home
    /// (default 5).
    #[arg(long, value_name = "N")]
    max_devices_per_user: Option<usize>,

    /// How concurrent writes of a user's state are shown: last-write-wins (only the
    /// latest; the default) or vector-clock (the concurrent ones beside it).
    #[arg(long, value_enum)]
    conflict_resolution: Option<Resolution>,

    /// Post every notification this device makes to this URL as JSON (repeatable).
    #[arg(long = "notify-webhook", value_name = "URL")]
    notify_webhooks: Vec<String>,

    /// Post every notification this device makes to this ntfy topic URL (repeatable).
    #[arg(long = "notify-ntfy", value_name = "URL")]
    notify_ntfy: Vec<String>,

    /// Tries per push target (default 3).
    #[arg(long, value_name = "N")]
    notify_retry_attempts: Option<u32>,

    /// Wait between tries of a push target (default 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    notify_retry_delay: Option<Duration>,

    #[command(flatten)]
    mqtt: super::mqtt::MqttArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(super) enum Resolution {
    /// The latest write of each key wins.
    LastWriteWins,
    /// Concurrent writes are kept and shown.
    VectorClock,
}

/// The file (and environment) layer. Every key is optional; a missing one keeps its
/// default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileConfig {
    agent: Agent,
    node: NodeSection,
    api: ApiSection,
    websocket: Websocket,
    session_management: Sessions,
    synchronization: Synchronization,
    notifications: Notifications,
    collaboration: Collaboration,
    push_services: PushServices,
    mqtt: super::mqtt::MqttSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Agent {
    /// The seed's agent name: not used.
    name: Option<String>,
    host: Option<IpAddr>,
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct NodeSection {
    name: Option<String>,
    listen: Option<Vec<String>>,
    mdns: Option<bool>,
    peers: Option<Vec<String>>,
    batch_window: Option<String>,
    max_connections_per_ip: Option<u32>,
    log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ApiSection {
    addr: Option<SocketAddr>,
    metrics_open: Option<bool>,
    allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Websocket {
    max_connections: Option<usize>,
    heartbeat_interval: Option<u64>,
    timeout: Option<u64>,
    /// Not used: the WebSocket frames are small JSON.
    compression: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Sessions {
    session_ttl: Option<u64>,
    max_devices_per_user: Option<usize>,
    /// Not used: state always follows a user across the home's devices.
    multi_device_sync: Option<bool>,
    /// Not used: there is no Redis; the home's devices share the users document.
    redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Synchronization {
    conflict_resolution: Option<String>,
    /// Not used: changes go to the other devices at once.
    sync_interval: Option<u64>,
    /// Not used: see `node.batch_window`.
    batch_updates: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Notifications {
    types: Option<Vec<String>>,
    retry_attempts: Option<u32>,
    retry_delay: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Collaboration {
    /// Not used: chat is always on.
    enable_peer_chat: Option<bool>,
    /// Not used: rooms are always on.
    enable_study_rooms: Option<bool>,
    max_room_size: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PushServices {
    webhooks: Option<Vec<String>>,
    ntfy: Option<Vec<String>>,
    /// Not used: FCM and APNS are reached through a webhook relay; Web Push subscriptions
    /// come from clients.
    fcm_enabled: Option<bool>,
    apns_enabled: Option<bool>,
    web_push_enabled: Option<bool>,
    fcm_server_key: Option<String>,
    fcm_project_id: Option<String>,
}

impl FileConfig {
    /// The seed's keys that were given but do not apply here.
    fn unused(&self) -> Vec<&'static str> {
        let given = [
            (self.agent.name.is_some(), "agent.name"),
            (
                self.websocket.compression.is_some(),
                "websocket.compression",
            ),
            (
                self.session_management.multi_device_sync.is_some(),
                "session_management.multi_device_sync",
            ),
            (
                self.session_management.redis_url.is_some(),
                "session_management.redis_url",
            ),
            (
                self.synchronization.sync_interval.is_some(),
                "synchronization.sync_interval",
            ),
            (
                self.synchronization.batch_updates.is_some(),
                "synchronization.batch_updates",
            ),
            (
                self.collaboration.enable_peer_chat.is_some(),
                "collaboration.enable_peer_chat",
            ),
            (
                self.collaboration.enable_study_rooms.is_some(),
                "collaboration.enable_study_rooms",
            ),
            (
                self.push_services.fcm_enabled.is_some()
                    || self.push_services.fcm_server_key.is_some()
                    || self.push_services.fcm_project_id.is_some(),
                "push_services.fcm_* (reach FCM through a webhook relay)",
            ),
            (
                self.push_services.apns_enabled.is_some(),
                "push_services.apns_enabled (reach APNS through a webhook relay)",
            ),
            (
                self.push_services.web_push_enabled.is_some(),
                "push_services.web_push_enabled (Web Push is always on: clients subscribe through the API)",
            ),
        ];
        given
            .into_iter()
            .filter(|(g, _)| *g)
            .map(|(_, k)| k)
            .collect()
    }
}

/// Reads `path` (when it exists, or when it must) under the environment's overrides.
pub(super) fn load(path: &Path, must_exist: bool) -> Result<FileConfig> {
    if must_exist && !path.exists() {
        bail!("no config file at {}", path.display());
    }
    Figment::new()
        .merge(Toml::file(path))
        .merge(
            Env::prefixed("HEARTH_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        )
        .extract::<FileConfig>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn resolution(text: &str) -> Result<hearth::ConflictResolution> {
    match text {
        "last_write_wins" => Ok(hearth::ConflictResolution::LastWriteWins),
        "vector_clock" => Ok(hearth::ConflictResolution::VectorClock),
        other => bail!(
            "synchronization.conflict_resolution is {other:?}; use last_write_wins or vector_clock"
        ),
    }
}

/// Flags over the file over the defaults: the node's config, the log format, and notes
/// (keys that were read but do not apply) for the log.
pub(super) fn resolve(
    data: PathBuf,
    up: UpArgs,
) -> Result<(hearth::Config, LogFormat, Vec<String>)> {
    let (path, must) = match &up.config {
        Some(p) => (p.clone(), true),
        None => (data.join(CONFIG_FILE), false),
    };
    let file = load(&path, must)?;
    let mut notes: Vec<String> = file
        .unused()
        .into_iter()
        .map(|k| format!("{}: {k} is read but not used by Hearth", path.display()))
        .collect();
    let defaults = hearth::Config::default();
    let secs = Duration::from_secs;

    let api_addr = up
        .api
        .or(file.api.addr)
        .or_else(|| match (file.agent.host, file.agent.port) {
            (None, None) => None,
            (host, port) => Some(SocketAddr::new(
                host.unwrap_or(hearth::DEFAULT_API_ADDR.ip()),
                port.unwrap_or(hearth::DEFAULT_API_ADDR.port()),
            )),
        })
        .unwrap_or(hearth::DEFAULT_API_ADDR);
    let batch_window = match (up.batch_window, &file.node.batch_window) {
        (Some(w), _) => w,
        (None, Some(text)) => {
            parse_duration(text).map_err(|e| anyhow::anyhow!("node.batch_window: {e}"))?
        }
        (None, None) => defaults.batch_window,
    };
    let mut seed = hearth::SeedApiConfig::default();
    if let Some(n) = file.websocket.max_connections {
        seed.max_connections = n;
    }
    if let Some(s) = file.websocket.heartbeat_interval {
        seed.heartbeat_interval = secs(s.max(1));
    }
    if let Some(s) = file.websocket.timeout {
        seed.timeout = secs(s.max(1));
    }
    if let Some(n) = file.collaboration.max_room_size {
        seed.max_room_size = n;
    }
    let mut users = hearth::UsersConfig::default();
    if let Some(t) = up
        .session_ttl
        .or(file.session_management.session_ttl.map(secs))
    {
        users.session_ttl = t;
    }
    if let Some(n) = up
        .max_devices_per_user
        .or(file.session_management.max_devices_per_user)
    {
        users.max_devices_per_user = n;
    }
    users.conflict_resolution = match (
        up.conflict_resolution,
        &file.synchronization.conflict_resolution,
    ) {
        (Some(Resolution::LastWriteWins), _) => hearth::ConflictResolution::LastWriteWins,
        (Some(Resolution::VectorClock), _) => hearth::ConflictResolution::VectorClock,
        (None, Some(text)) => resolution(text)?,
        (None, None) => users.conflict_resolution,
    };
    if let Some(types) = file.notifications.types {
        users.notification_types = types;
    }
    if let Some(n) = up
        .notify_retry_attempts
        .or(file.notifications.retry_attempts)
    {
        users.push.retry_attempts = n;
    }
    if let Some(d) = up
        .notify_retry_delay
        .or(file.notifications.retry_delay.map(secs))
    {
        users.push.retry_delay = d;
    }
    let (webhooks, ntfy) = if up.notify_webhooks.is_empty() && up.notify_ntfy.is_empty() {
        (
            file.push_services.webhooks.unwrap_or_default(),
            file.push_services.ntfy.unwrap_or_default(),
        )
    } else {
        (up.notify_webhooks, up.notify_ntfy)
    };
    users.push.targets = webhooks
        .into_iter()
        .map(hearth::PushTarget::Webhook)
        .chain(ntfy.into_iter().map(hearth::PushTarget::Ntfy))
        .collect();
    users
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;

    let or_file = |flag: Vec<String>, file: Option<Vec<String>>| {
        if flag.is_empty() {
            file.unwrap_or_default()
        } else {
            flag
        }
    };
    let listen = or_file(up.listen, file.node.listen);
    let file_dir = path.parent().unwrap_or(Path::new("."));
    let mqtt = super::mqtt::resolve(up.mqtt, file.mqtt, file_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    let config = hearth::Config {
        data_dir: data,
        api: Some(hearth::ApiConfig {
            addr: api_addr,
            metrics_open: up.metrics_open || file.api.metrics_open.unwrap_or(false),
            allowed_origins: or_file(up.allowed_origins, file.api.allowed_origins),
            seed,
        }),
        device_name: up.name.or(file.node.name),
        passphrase: std::env::var("HEARTH_PASSPHRASE")
            .ok()
            .filter(|p| !p.is_empty())
            .map(hearth::Passphrase),
        listen: if listen.is_empty() {
            vec![hearth::DEFAULT_LISTEN.to_string()]
        } else {
            listen
        },
        mdns: !up.no_mdns && file.node.mdns.unwrap_or(true),
        static_peers: or_file(up.peers, file.node.peers),
        batch_window,
        max_connections_per_ip: up
            .max_connections_per_ip
            .or(file.node.max_connections_per_ip)
            .unwrap_or(hearth::DEFAULT_MAX_CONNECTIONS_PER_IP),
        users,
        mqtt,
        ..defaults
    };
    let log_format = up
        .log_format
        .or(file.node.log_format)
        .unwrap_or(LogFormat::Pretty);
    if !path.exists() && up.config.is_none() {
        notes.clear();
    }
    Ok((config, log_format, notes))
}

/// `hearth config check [FILE]`: reads the file (default: the data dir's) with the
/// environment's overrides, and prints the settings it comes to, or what is wrong.
pub(super) fn check(data: &Path, file: Option<PathBuf>, json: bool) -> Result<()> {
    let path = file.clone().unwrap_or_else(|| data.join(CONFIG_FILE));
    let up = UpArgs {
        config: Some(path.clone()),
        api: None,
        listen: Vec::new(),
        no_mdns: false,
        peers: Vec::new(),
        name: None,
        batch_window: None,
        metrics_open: false,
        allowed_origins: Vec::new(),
        max_connections_per_ip: None,
        log_format: None,
        session_ttl: None,
        max_devices_per_user: None,
        conflict_resolution: None,
        notify_webhooks: Vec::new(),
        notify_ntfy: Vec::new(),
        notify_retry_attempts: None,
        notify_retry_delay: None,
        mqtt: Default::default(),
    };
    let (config, _, notes) = resolve(data.to_path_buf(), up)
        .with_context(|| format!("{} is not valid", path.display()))?;
    let api = config.api.clone().unwrap_or_default();
    let summary = serde_json::json!({
        "file": path.display().to_string(),
        "api": { "addr": api.addr.to_string(), "metrics_open": api.metrics_open,
                 "allowed_origins": api.allowed_origins },
        "node": { "name": config.device_name, "listen": config.listen, "mdns": config.mdns,
                  "peers": config.static_peers,
                  "batch_window_us": config.batch_window.as_micros() as u64,
                  "max_connections_per_ip": config.max_connections_per_ip },
        "websocket": { "max_connections": api.seed.max_connections,
                       "heartbeat_interval": api.seed.heartbeat_interval.as_secs(),
                       "timeout": api.seed.timeout.as_secs() },
        "session_management": { "session_ttl": config.users.session_ttl.as_secs(),
                                "max_devices_per_user": config.users.max_devices_per_user },
        "synchronization": { "conflict_resolution": config.users.conflict_resolution },
        "notifications": { "types": config.users.notification_types,
                           "retry_attempts": config.users.push.retry_attempts,
                           "retry_delay": config.users.push.retry_delay.as_secs() },
        "collaboration": { "max_room_size": api.seed.max_room_size },
        "push_services": { "targets": config.users.push.targets },
        "mqtt": config.mqtt.as_ref().map(|m| serde_json::json!({
            "url": m.url, "user": m.user, "password": m.password.as_ref().map(|_| "<set>"),
            "discovery_prefix": m.discovery_prefix, "node_id": m.node_id, "export": m.export,
            "import_prefix": m.import_prefix, "max_imported": m.max_imported })),
        "unused": notes,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{} is valid", path.display());
        for note in summary["unused"].as_array().into_iter().flatten() {
            println!("  note: {}", note.as_str().unwrap_or_default());
        }
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("hearth.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_seeds_keys_are_read_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"
[agent]
name = "realtime_coordination_agent"
port = 8012

[websocket]
max_connections = 100
heartbeat_interval = 10
timeout = 20
compression = true

[session_management]
redis_url = "redis://localhost:6379"
session_ttl = 600
max_devices_per_user = 3

[synchronization]
conflict_resolution = "vector_clock"

[notifications]
types = ["milestone_achieved"]
retry_attempts = 2
retry_delay = 1

[collaboration]
max_room_size = 10

[push_services]
webhooks = ["http://127.0.0.1:9/hook"]
"#,
        );
        let file = load(&path, true).unwrap();
        assert_eq!(
            file.unused(),
            vec![
                "agent.name",
                "websocket.compression",
                "session_management.redis_url"
            ]
        );
        let bad = write(dir.path(), "[session_management]\nsesion_ttl = 5\n");
        let error = load(&bad, true).unwrap_err().to_string();
        assert!(error.contains("sesion_ttl"), "{error}");
        assert!(load(&dir.path().join("missing.toml"), true).is_err());
        assert!(load(&dir.path().join("missing.toml"), false).is_ok());
    }
}
