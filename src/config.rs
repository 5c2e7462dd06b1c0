//! Node configuration: plain data with public fields, validated by [`crate::Node::start`].
//! [`crate::Node::builder`] fills the same struct.

use std::fmt;
#[cfg(feature = "api")]
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where the local API listens unless told otherwise.
#[cfg(feature = "api")]
pub const DEFAULT_API_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8012);

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The data dir: the store, its key file and the lock live here, and the token and
    /// `api.addr` too when the node serves the API.
    pub data_dir: PathBuf,
    /// The local HTTP API, or `None` (the default) for a headless node: no HTTP server,
    /// and no `token` or `api.addr` in the data dir. `hearth up` always serves it.
    #[cfg(feature = "api")]
    pub api: Option<ApiConfig>,
    /// The device name shown to people; defaults to the host name.
    pub device_name: Option<String>,
    /// Derive the store key from this passphrase (Argon2id) instead of using the
    /// key file `<data>/store.key`.
    pub passphrase: Option<Passphrase>,
    /// Multiaddrs to listen on for peers, e.g. `/ip4/0.0.0.0/tcp/4640`; tests use
    /// `/ip4/127.0.0.1/tcp/0`.
    pub listen: Vec<String>,
    /// Discover the home's peers on the LAN with mDNS. Turn it off where multicast must
    /// not leave the host, and use `static_peers` instead.
    pub mdns: bool,
    /// Peers to keep dialled, each `/ip4/ADDR/tcp/PORT/p2p/PEERID`.
    pub static_peers: Vec<String>,
    /// How long local writes wait for company before their changes are flushed to disk
    /// together ([`DEFAULT_BATCH_WINDOW`]). A write is acknowledged, and its pushes leave
    /// for peers, after its window's flush. Zero flushes each write on its own.
    pub batch_window: Duration,
    /// Most connections from one IP address ([`DEFAULT_MAX_CONNECTIONS_PER_IP`]); the
    /// home's own devices and static peers are exempt. A LAN neighbour opening more is
    /// refused right after the handshake.
    pub max_connections_per_ip: u32,
    /// Memory for loaded documents, in MiB ([`DEFAULT_DOCUMENTS_CACHE_MIB`]). Every
    /// document's header, heads and key stay in memory; an entity document itself is
    /// loaded from the store when first used, and the least recently used ones are
    /// unloaded once the loaded ones pass this (each counted by an estimate from its
    /// stored size). The home's other documents stay loaded.
    pub documents_cache_mib: u32,
    /// Audit entries kept at most ([`DEFAULT_AUDIT_MAX_ENTRIES`]); the oldest go first.
    pub audit_max_entries: usize,
    /// Audit entries older than this are pruned ([`DEFAULT_AUDIT_MAX_AGE`]).
    pub audit_max_age: Duration,
    /// Chat messages each room keeps at most ([`DEFAULT_CHAT_MAX_MESSAGES`]); the oldest go
    /// first. A room is one document of the home, so the smallest limit among its devices
    /// is the one that holds.
    pub chat_max_messages: usize,
    /// Chat messages older than this are pruned ([`DEFAULT_CHAT_MAX_AGE`]).
    pub chat_max_age: Duration,
    /// Users' state and client sessions (seed 001's session and sync settings).
    pub users: crate::UsersConfig,
    /// When an entity's document is cut into a new generation, and how much history is
    /// kept behind it.
    pub history: HistoryConfig,
    /// The MQTT bridge to Home Assistant, or `None` (the default) for none.
    #[cfg(feature = "mqtt")]
    pub mqtt: Option<crate::MqttConfig>,
}

/// How the local HTTP API is served ([`Config::api`]).
#[cfg(feature = "api")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address to listen on; port 0 picks a free port, which the node writes to
    /// `<data>/api.addr`.
    pub addr: SocketAddr,
    /// Serve `/metrics` without the bearer token. Off by default: the metrics name peers
    /// and count traffic, which is for the home's owner, not for any local program.
    pub metrics_open: bool,
    /// Web origins (`scheme://host[:port]`, e.g. `http://dashboard.lan:3000`) whose pages
    /// may open the API's WebSockets, besides the node's own (`http://` plus its bound
    /// address, `localhost:PORT` or `127.0.0.1:PORT`). Empty by default.
    pub allowed_origins: Vec<String>,
    /// Seed 001's WebSocket and room settings.
    pub seed: SeedApiConfig,
}

/// Seed 001's `websocket` and `collaboration` settings, for its `/ws/{user_id}` clients.
#[cfg(feature = "api")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedApiConfig {
    /// How often the node pings each client.
    pub heartbeat_interval: Duration,
    /// A client that sends nothing (not even a heartbeat or a pong) for this long is closed.
    pub timeout: Duration,
    /// Clients connected to this node at once; more are refused with 503.
    pub max_connections: usize,
    /// Room size when `/create-room` gives none, and the most it may ask for.
    pub max_room_size: u64,
}

#[cfg(feature = "api")]
impl Default for SeedApiConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_room_size: crate::DEFAULT_ROOM_SIZE,
        }
    }
}

/// The longest interval between the node's pings to a seed 001 client (an hour).
#[cfg(feature = "api")]
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest a seed 001 client may stay silent before it is closed (a day).
#[cfg(feature = "api")]
pub const MAX_WS_TIMEOUT: Duration = Duration::from_secs(86_400);

#[cfg(feature = "api")]
impl SeedApiConfig {
    /// Checks the times: the heartbeat interval 1 s to [`MAX_HEARTBEAT_INTERVAL`], the
    /// timeout 1 s to [`MAX_WS_TIMEOUT`].
    pub fn check(&self) -> Result<(), crate::Error> {
        let second = Duration::from_secs(1);
        if self.heartbeat_interval < second || self.heartbeat_interval > MAX_HEARTBEAT_INTERVAL {
            return Err(crate::Error::Invalid(
                "heartbeat_interval must be 1s to 1h".into(),
            ));
        }
        if self.timeout < second || self.timeout > MAX_WS_TIMEOUT {
            return Err(crate::Error::Invalid("timeout must be 1s to 1 day".into()));
        }
        Ok(())
    }
}

#[cfg(feature = "api")]
impl ApiConfig {
    /// The API on `addr`, with the token required everywhere and no extra origins.
    pub fn on(addr: SocketAddr) -> Self {
        Self {
            addr,
            metrics_open: false,
            allowed_origins: Vec::new(),
            seed: SeedApiConfig::default(),
        }
    }
}

#[cfg(feature = "api")]
impl Default for ApiConfig {
    fn default() -> Self {
        Self::on(DEFAULT_API_ADDR)
    }
}

/// Connections accepted from one IP address unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = hearth_net::DEFAULT_MAX_CONNECTIONS_PER_IP;

/// Memory for loaded documents unless told otherwise: 32 MiB.
pub const DEFAULT_DOCUMENTS_CACHE_MIB: u32 = 32;

/// Chat messages each room keeps unless told otherwise: 1000 (what one read returns).
pub const DEFAULT_CHAT_MAX_MESSAGES: usize = 1_000;
/// How long chat messages are kept unless told otherwise: 30 days.
pub const DEFAULT_CHAT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Bounds on an entity's history ([`Config::history`]). Past `cut_changes` changes or
/// `cut_bytes` stored bytes, the home's admin device starts a new generation of the
/// entity's document (a fresh document holding its current state); while the admin
/// device is offline, cuts wait. An older generation is deleted once every device of the
/// home has moved past it and it is outside the retention window: the newer generations
/// hold at least `keep_versions` versions, or it was cut off more than `keep_days` ago.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Changes in an entity's document that start a new generation
    /// ([`DEFAULT_CUT_CHANGES`]).
    pub cut_changes: usize,
    /// Stored bytes of an entity's document that start a new generation
    /// ([`DEFAULT_CUT_BYTES`]).
    pub cut_bytes: usize,
    /// Versions kept readable and restorable behind the newest
    /// ([`DEFAULT_KEEP_VERSIONS`]).
    pub keep_versions: usize,
    /// Days of versions kept readable and restorable ([`DEFAULT_KEEP_DAYS`]).
    pub keep_days: u32,
}

/// Changes after which an entity's document is cut, unless told otherwise: 1000.
pub const DEFAULT_CUT_CHANGES: usize = 1_000;
/// Stored bytes after which an entity's document is cut, unless told otherwise: 1 MiB.
pub const DEFAULT_CUT_BYTES: usize = 1 << 20;
/// Versions kept behind the newest, unless told otherwise: 1000.
pub const DEFAULT_KEEP_VERSIONS: usize = 1_000;
/// Days of versions kept, unless told otherwise: 30.
pub const DEFAULT_KEEP_DAYS: u32 = 30;
/// The fewest changes a cut threshold may name: below it, cuts would outnumber writes.
pub const MIN_CUT_CHANGES: usize = 16;

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            cut_changes: DEFAULT_CUT_CHANGES,
            cut_bytes: DEFAULT_CUT_BYTES,
            keep_versions: DEFAULT_KEEP_VERSIONS,
            keep_days: DEFAULT_KEEP_DAYS,
        }
    }
}

impl HistoryConfig {
    /// Checks the bounds `Node::start` relies on.
    pub fn check(&self) -> Result<(), crate::Error> {
        if self.cut_changes < MIN_CUT_CHANGES {
            return Err(crate::Error::Invalid(format!(
                "history.cut_changes is {}; at least {MIN_CUT_CHANGES}",
                self.cut_changes
            )));
        }
        if self.cut_bytes < 4096 {
            return Err(crate::Error::Invalid(format!(
                "history.cut_bytes is {}; at least 4096",
                self.cut_bytes
            )));
        }
        Ok(())
    }
}

/// Audit entries kept unless told otherwise: 10 000.
pub const DEFAULT_AUDIT_MAX_ENTRIES: usize = 10_000;
/// How long audit entries are kept unless told otherwise: 90 days.
pub const DEFAULT_AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// The batching window unless told otherwise: 1 ms.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(1);
/// The longest batching window accepted.
pub const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);

/// Where the node listens for peers unless told otherwise.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/4640";

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir().unwrap_or_else(|| PathBuf::from("hearth-data")),
            #[cfg(feature = "api")]
            api: None,
            device_name: None,
            passphrase: None,
            listen: vec![DEFAULT_LISTEN.to_string()],
            mdns: true,
            static_peers: Vec::new(),
            batch_window: DEFAULT_BATCH_WINDOW,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            documents_cache_mib: DEFAULT_DOCUMENTS_CACHE_MIB,
            audit_max_entries: DEFAULT_AUDIT_MAX_ENTRIES,
            audit_max_age: DEFAULT_AUDIT_MAX_AGE,
            chat_max_messages: DEFAULT_CHAT_MAX_MESSAGES,
            chat_max_age: DEFAULT_CHAT_MAX_AGE,
            users: crate::UsersConfig::default(),
            history: HistoryConfig::default(),
            #[cfg(feature = "mqtt")]
            mqtt: None,
        }
    }
}

/// The platform's data dir for Hearth (for example `~/.local/share/hearth` on Linux),
/// or `None` when the platform reports no home directory.
pub fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "hearth").map(|d| d.data_dir().to_path_buf())
}

/// A store passphrase. Its `Debug` output is redacted so it never reaches logs.
#[derive(Clone)]
pub struct Passphrase(pub String);

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}
