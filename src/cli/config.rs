//! `hearth up`'s settings, layered by figment: flags over the environment over the config
//! file over the defaults. The file is `hearth.toml` in the data dir, or `--config FILE`;
//! `hearth config check [FILE]` reads one and prints each setting with where it came from.
//!
//! Every flag of `hearth up` has a key (see [`FLAGS`]), except `--config` and the global
//! `--data`, which say where the file is. Its sections are Hearth's own (`node`, `api`) and
//! seed 001's `config.yaml` sections, in TOML, with the seed's key names where they apply:
//! `agent` (`host`, `port`: the API's address, another way to write `api.addr`),
//! `websocket` (`max_connections`, `heartbeat_interval`, `timeout`), `session_management`
//! (`session_ttl`, `max_devices_per_user`), `synchronization` (`conflict_resolution`),
//! `notifications` (`types`, `retry_attempts`, `retry_delay`), `collaboration`
//! (`max_room_size`) and `push_services` (`webhooks`, `ntfy`); and `mqtt`, the bridge to
//! Home Assistant (see [`super::mqtt`]). The seed's keys that do not
//! apply here (Redis, FCM and APNS credentials, compression, ...) are read and reported as
//! unused; any other key is an error naming its path. Times are whole seconds, as in the
//! seed, or a duration text (`"1ms"`, `"10m"`).
//!
//! The environment overrides any key as `HEARTH_<SECTION>__<KEY>`, e.g.
//! `HEARTH_SESSION_MANAGEMENT__SESSION_TTL=600`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use super::{LogFormat, parse_duration};

/// The config file's name in the data dir.
pub(super) const CONFIG_FILE: &str = "hearth.toml";

/// Each flag of `hearth up` and the key it sets.
pub(super) const FLAGS: &[(&str, &str)] = &[
    ("api", "api.addr"),
    ("metrics-open", "api.metrics_open"),
    ("allowed-origin", "api.allowed_origins"),
    ("name", "node.name"),
    ("listen", "node.listen"),
    ("no-mdns", "node.mdns"),
    ("peer", "node.peers"),
    ("batch-window", "node.batch_window"),
    ("max-connections-per-ip", "node.max_connections_per_ip"),
    ("documents-cache-mib", "node.documents_cache_mib"),
    ("log-format", "node.log_format"),
    ("ws-max-connections", "websocket.max_connections"),
    ("ws-heartbeat-interval", "websocket.heartbeat_interval"),
    ("ws-timeout", "websocket.timeout"),
    ("session-ttl", "session_management.session_ttl"),
    (
        "max-devices-per-user",
        "session_management.max_devices_per_user",
    ),
    ("conflict-resolution", "synchronization.conflict_resolution"),
    ("notification-type", "notifications.types"),
    ("notify-retry-attempts", "notifications.retry_attempts"),
    ("notify-retry-delay", "notifications.retry_delay"),
    ("max-room-size", "collaboration.max_room_size"),
    ("notify-webhook", "push_services.webhooks"),
    ("notify-ntfy", "push_services.ntfy"),
    ("history-cut-changes", "history.cut_changes"),
    ("history-cut-bytes", "history.cut_bytes"),
    ("history-keep-versions", "history.keep_versions"),
    ("history-keep-days", "history.keep_days"),
    ("mqtt", "mqtt.url"),
    ("mqtt-user", "mqtt.user"),
    ("mqtt-password-file", "mqtt.password_file"),
];

/// `hearth up`'s flags; each one given wins over the environment and the file.
#[derive(Debug, Default, clap::Args)]
pub(super) struct UpArgs {
    /// Settings file (default: hearth.toml in the data dir, when there is one).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address for the local HTTP API; port 0 picks a free port (written to
    /// <data>/api.addr). Default 127.0.0.1:8012.
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,

    /// Multiaddr to listen on for peers; repeatable. Default /ip4/0.0.0.0/tcp/4640.
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

    /// Memory for loaded documents, in MiB: documents are loaded when first used and the
    /// least recently used are unloaded past this. Default 32.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    documents_cache_mib: Option<u32>,

    /// Log output format (default pretty).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,

    /// Seed 001 clients connected to this node at once; more are refused with 503
    /// (default 10000).
    #[arg(long, value_name = "N")]
    ws_max_connections: Option<usize>,

    /// How often the node pings each seed 001 client (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ws_heartbeat_interval: Option<Duration>,

    /// A seed 001 client silent this long is closed (default 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ws_timeout: Option<Duration>,

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

    /// A notification type seed 001 clients may send (repeatable; default: the seed's).
    #[arg(long = "notification-type", value_name = "TYPE")]
    notification_types: Vec<String>,

    /// Room size when a seed 001 client gives none, and the most it may ask for.
    #[arg(long, value_name = "N")]
    max_room_size: Option<u64>,

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

    /// Changes after which an entity's document starts a new generation (default 1000).
    #[arg(long, value_name = "N")]
    history_cut_changes: Option<usize>,

    /// Stored bytes after which an entity's document starts a new generation (default
    /// 1048576).
    #[arg(long, value_name = "BYTES")]
    history_cut_bytes: Option<usize>,

    /// Versions of an entity kept readable and restorable (default 1000).
    #[arg(long, value_name = "N")]
    history_keep_versions: Option<usize>,

    /// Days of an entity's versions kept readable and restorable (default 30).
    #[arg(long, value_name = "DAYS")]
    history_keep_days: Option<u32>,

    #[command(flatten)]
    mqtt: super::mqtt::MqttArgs,
}

/// How concurrent writes of a user's state are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Resolution {
    /// The latest write of each key wins.
    #[serde(alias = "last-write-wins")]
    LastWriteWins,
    /// Concurrent writes are kept and shown.
    #[serde(alias = "vector-clock")]
    VectorClock,
}

/// A time: whole seconds (as seed 001 writes them) or a duration text (`"1ms"`, `"10m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span(Duration);

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.subsec_nanos() == 0 {
            s.serialize_u64(self.0.as_secs())
        } else {
            s.serialize_str(&humantime::format_duration(self.0).to_string())
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("whole seconds or a duration like \"10m\" or \"1ms\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Span, E> {
                u64::try_from(v)
                    .map(|v| Span(Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Span, E> {
                parse_duration(v).map(Span).map_err(E::custom)
            }
        }
        d.deserialize_any(Visit)
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// Text settings take any scalar as its text: the environment's values are parsed, so
/// `HEARTH_NODE__NAME=1234` arrives as a number and `=true` as a bool.
pub(super) mod text {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{Deserializer, Error, Visitor};

    struct Text(String);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl Visitor<'_> for Visit {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("text")
                }
                fn visit_str<E: Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_char<E: Error>(self, v: char) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_bool<E: Error>(self, v: bool) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_i64<E: Error>(self, v: i64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_u64<E: Error>(self, v: u64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_i128<E: Error>(self, v: i128) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_u128<E: Error>(self, v: u128) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_f64<E: Error>(self, v: f64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
            }
            d.deserialize_any(Visit)
        }
    }

    pub(in crate::cli) fn one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Text>::deserialize(d)?.map(|t| t.0))
    }

    pub(in crate::cli) fn list<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<String>>, D::Error> {
        Ok(Option::<Vec<Text>>::deserialize(d)?.map(|v| v.into_iter().map(|t| t.0).collect()))
    }
}

/// The settings, as each layer writes them. Every key is optional: a layer sets the keys
/// it has, and the defaults layer sets all but `node.name` and `agent.*`.
#[derive(Debug, Default, Deserialize, Serialize)]
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
    history: History,
    mqtt: super::mqtt::MqttSection,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct History {
    cut_changes: Option<usize>,
    cut_bytes: Option<usize>,
    keep_versions: Option<usize>,
    keep_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Agent {
    /// The seed's agent name: not used.
    #[serde(deserialize_with = "text::one")]
    name: Option<String>,
    host: Option<IpAddr>,
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct NodeSection {
    #[serde(deserialize_with = "text::one")]
    name: Option<String>,
    #[serde(deserialize_with = "text::list")]
    listen: Option<Vec<String>>,
    mdns: Option<bool>,
    #[serde(deserialize_with = "text::list")]
    peers: Option<Vec<String>>,
    batch_window: Option<Span>,
    max_connections_per_ip: Option<u32>,
    documents_cache_mib: Option<u32>,
    log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct ApiSection {
    addr: Option<SocketAddr>,
    metrics_open: Option<bool>,
    #[serde(deserialize_with = "text::list")]
    allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Websocket {
    max_connections: Option<usize>,
    heartbeat_interval: Option<Span>,
    timeout: Option<Span>,
    /// Not used: the WebSocket frames are small JSON.
    compression: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Sessions {
    session_ttl: Option<Span>,
    max_devices_per_user: Option<usize>,
    /// Not used: state always follows a user across the home's devices.
    multi_device_sync: Option<bool>,
    /// Not used: there is no Redis; the home's devices share the users document.
    #[serde(deserialize_with = "text::one")]
    redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Synchronization {
    conflict_resolution: Option<Resolution>,
    /// Not used: changes go to the other devices at once.
    sync_interval: Option<u64>,
    /// Not used: see `node.batch_window`.
    batch_updates: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Notifications {
    #[serde(deserialize_with = "text::list")]
    types: Option<Vec<String>>,
    retry_attempts: Option<u32>,
    retry_delay: Option<Span>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct Collaboration {
    /// Not used: chat is always on.
    enable_peer_chat: Option<bool>,
    /// Not used: rooms are always on.
    enable_study_rooms: Option<bool>,
    max_room_size: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct PushServices {
    #[serde(deserialize_with = "text::list")]
    webhooks: Option<Vec<String>>,
    #[serde(deserialize_with = "text::list")]
    ntfy: Option<Vec<String>>,
    /// Not used: FCM and APNS are reached through a webhook relay; Web Push subscriptions
    /// come from clients.
    fcm_enabled: Option<bool>,
    apns_enabled: Option<bool>,
    web_push_enabled: Option<bool>,
    #[serde(deserialize_with = "text::one")]
    fcm_server_key: Option<String>,
    #[serde(deserialize_with = "text::one")]
    fcm_project_id: Option<String>,
}

impl FileConfig {
    /// The defaults layer: every setting Hearth has a default for.
    fn defaults() -> Self {
        let node = hearth::Config::default();
        let seed = hearth::SeedApiConfig::default();
        let users = hearth::UsersConfig::default();
        FileConfig {
            node: NodeSection {
                name: None,
                listen: Some(vec![hearth::DEFAULT_LISTEN.to_string()]),
                mdns: Some(true),
                peers: Some(Vec::new()),
                batch_window: Some(Span(node.batch_window)),
                max_connections_per_ip: Some(hearth::DEFAULT_MAX_CONNECTIONS_PER_IP),
                documents_cache_mib: Some(hearth::DEFAULT_DOCUMENTS_CACHE_MIB),
                log_format: Some(LogFormat::Pretty),
            },
            api: ApiSection {
                addr: Some(hearth::DEFAULT_API_ADDR),
                metrics_open: Some(false),
                allowed_origins: Some(Vec::new()),
            },
            websocket: Websocket {
                max_connections: Some(seed.max_connections),
                heartbeat_interval: Some(Span(seed.heartbeat_interval)),
                timeout: Some(Span(seed.timeout)),
                ..Websocket::default()
            },
            session_management: Sessions {
                session_ttl: Some(Span(users.session_ttl)),
                max_devices_per_user: Some(users.max_devices_per_user),
                ..Sessions::default()
            },
            synchronization: Synchronization {
                conflict_resolution: Some(match users.conflict_resolution {
                    hearth::ConflictResolution::LastWriteWins => Resolution::LastWriteWins,
                    hearth::ConflictResolution::VectorClock => Resolution::VectorClock,
                }),
                ..Synchronization::default()
            },
            notifications: Notifications {
                types: Some(users.notification_types),
                retry_attempts: Some(users.push.retry_attempts),
                retry_delay: Some(Span(users.push.retry_delay)),
            },
            collaboration: Collaboration {
                max_room_size: Some(seed.max_room_size),
                ..Collaboration::default()
            },
            push_services: PushServices {
                webhooks: Some(Vec::new()),
                ntfy: Some(Vec::new()),
                ..PushServices::default()
            },
            history: {
                let h = hearth::HistoryConfig::default();
                History {
                    cut_changes: Some(h.cut_changes),
                    cut_bytes: Some(h.cut_bytes),
                    keep_versions: Some(h.keep_versions),
                    keep_days: Some(h.keep_days),
                }
            },
            mqtt: super::mqtt::MqttSection::defaults(),
            agent: Agent::default(),
        }
    }

    /// The flags layer: the flags that were given.
    fn flags(up: &UpArgs) -> Self {
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        FileConfig {
            node: NodeSection {
                name: up.name.clone(),
                listen: list(&up.listen),
                mdns: up.no_mdns.then_some(false),
                peers: list(&up.peers),
                batch_window: up.batch_window.map(Span),
                max_connections_per_ip: up.max_connections_per_ip,
                documents_cache_mib: up.documents_cache_mib,
                log_format: up.log_format,
            },
            api: ApiSection {
                addr: up.api,
                metrics_open: up.metrics_open.then_some(true),
                allowed_origins: list(&up.allowed_origins),
            },
            websocket: Websocket {
                max_connections: up.ws_max_connections,
                heartbeat_interval: up.ws_heartbeat_interval.map(Span),
                timeout: up.ws_timeout.map(Span),
                ..Websocket::default()
            },
            session_management: Sessions {
                session_ttl: up.session_ttl.map(Span),
                max_devices_per_user: up.max_devices_per_user,
                ..Sessions::default()
            },
            synchronization: Synchronization {
                conflict_resolution: up.conflict_resolution,
                ..Synchronization::default()
            },
            notifications: Notifications {
                types: list(&up.notification_types),
                retry_attempts: up.notify_retry_attempts,
                retry_delay: up.notify_retry_delay.map(Span),
            },
            collaboration: Collaboration {
                max_room_size: up.max_room_size,
                ..Collaboration::default()
            },
            push_services: PushServices {
                webhooks: list(&up.notify_webhooks),
                ntfy: list(&up.notify_ntfy),
                ..PushServices::default()
            },
            history: History {
                cut_changes: up.history_cut_changes,
                cut_bytes: up.history_cut_bytes,
                keep_versions: up.history_keep_versions,
                keep_days: up.history_keep_days,
            },
            mqtt: super::mqtt::MqttSection::flags(&up.mqtt),
            agent: Agent::default(),
        }
    }

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

/// Where a setting came from, lowest precedence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Default,
    File,
    Env,
    Flag,
}

impl Layer {
    const ALL: [Layer; 4] = [Layer::Default, Layer::File, Layer::Env, Layer::Flag];

    fn name(self) -> &'static str {
        match self {
            Layer::Default => "default",
            Layer::File => "file",
            Layer::Env => "environment",
            Layer::Flag => "flag",
        }
    }

    fn of(metadata: &Metadata) -> Layer {
        Layer::ALL
            .into_iter()
            .find(|l| l.name() == metadata.name)
            .unwrap_or(Layer::Default)
    }

    /// How this layer spells a key: `--flag`, `HEARTH_SECTION__KEY`, or its dotted path.
    fn spell(self, key: &str) -> String {
        match self {
            Layer::Flag => FLAGS
                .iter()
                .find(|(_, k)| *k == key)
                .map(|(flag, _)| format!("--{flag}"))
                .unwrap_or_else(|| key.to_string()),
            Layer::Env => format!("HEARTH_{}", key.replace('.', "__").to_ascii_uppercase()),
            Layer::Default | Layer::File => key.to_string(),
        }
    }
}

/// One layer's settings as a figment provider, named by its [`Layer`].
struct Source {
    layer: Layer,
    file: Option<PathBuf>,
    data: Dict,
}

impl Source {
    fn of(layer: Layer, settings: &FileConfig) -> Result<Self> {
        let mut data = Serialized::defaults(settings)
            .data()?
            .remove(&Profile::Default)
            .unwrap_or_default();
        drop_empty(&mut data);
        Ok(Source {
            layer,
            file: None,
            data,
        })
    }
}

/// Drops the keys a layer does not set (serialized `None`s) so lower layers show through.
fn drop_empty(dict: &mut Dict) {
    dict.retain(|_, v| match v {
        Value::Empty(..) => false,
        Value::Dict(_, inner) => {
            drop_empty(inner);
            true
        }
        _ => true,
    });
}

impl Provider for Source {
    fn metadata(&self) -> Metadata {
        let layer = self.layer;
        let metadata = Metadata::named(layer.name())
            .interpolater(move |_: &Profile, keys: &[&str]| layer.spell(&keys.join(".")));
        match &self.file {
            Some(path) => metadata.source(path.as_path()),
            None => metadata,
        }
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// The layers, merged.
struct Layered {
    figment: Figment,
    settings: FileConfig,
    path: PathBuf,
}

impl Layered {
    /// Where the value at `key` came from, or `None` when no layer sets it.
    fn layer(&self, key: &str) -> Option<Layer> {
        self.figment.find_metadata(key).map(Layer::of)
    }

    /// Says where `key`'s value came from: `default`, `file PATH`, `env HEARTH_..`,
    /// `flag --..`, or `not set`.
    fn origin(&self, key: &str) -> String {
        match self.layer(key) {
            None => "not set".to_string(),
            Some(Layer::Default) => "default".to_string(),
            Some(Layer::File) => format!("file {}", self.path.display()),
            Some(Layer::Env) => format!("env {}", Layer::Env.spell(key)),
            Some(Layer::Flag) => format!("flag {}", Layer::Flag.spell(key)),
        }
    }

    /// Every key some layer sets, with its value (as TOML writes it) and origin.
    fn rows(&self) -> Result<Vec<(String, String, String)>> {
        let mut keys = Vec::new();
        leaves(
            &Source::of(Layer::Default, &self.settings)?.data,
            "",
            &mut keys,
        );
        Ok(keys
            .into_iter()
            .map(|(key, value)| {
                let origin = self.origin(&key);
                (key, value, origin)
            })
            .collect())
    }
}

fn leaves(dict: &Dict, prefix: &str, out: &mut Vec<(String, String)>) {
    for (key, value) in dict {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Dict(_, inner) => leaves(inner, &path, out),
            value => {
                let shown = serde_json::to_value(value)
                    .map(|v| redact(&path, v))
                    .and_then(|v| serde_json::to_string(&v));
                out.push((path, shown.unwrap_or_else(|e| format!("({e})"))));
            }
        }
    }
}

/// Whether `key` holds a secret whose value is never shown: a password, token, secret or
/// key (`push_services.fcm_server_key`, `mqtt.password`).
fn is_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    ["password", "secret", "token", "_key"]
        .iter()
        .any(|s| last.ends_with(s))
}

/// A setting's value as `config check` shows it: a secret as `<set, N chars>`, and any URL
/// as its scheme and host (a URL's user, password, path and query may be secret: an ntfy
/// topic, a webhook's token, Redis's password).
fn redact(key: &str, value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        J::String(s) if is_secret(key) => J::String(format!("<set, {} chars>", s.chars().count())),
        J::String(s) => J::String(redact_url(&s)),
        J::Array(items) => J::Array(items.into_iter().map(|v| redact(key, v)).collect()),
        J::Null => J::Null,
        other if is_secret(key) => J::String(format!("<set, {} chars>", other.to_string().len())),
        other => other,
    }
}

/// `scheme://host[:port]` of a URL, without its user, password, path, query or fragment;
/// text that is not a URL as it is.
fn redact_url(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    format!("{scheme}://{host}")
}

/// Says what is wrong in each of figment's errors, with the key's full path and where
/// the value came from.
fn explain(error: figment::Error, path: &Path) -> anyhow::Error {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let layer = e.metadata.as_ref().map(Layer::of).unwrap_or(Layer::File);
            let mut key = e.path.join(".");
            let what = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    // The path names the field already, except at the top.
                    if key.is_empty() {
                        key = field.clone();
                    }
                    format!("unknown key (known here: {})", expected.join(", "))
                }
                // A secret's value is never echoed, even when it is wrong.
                _ if is_secret(&key) => "not valid (the value is not shown)".to_string(),
                kind => kind.to_string(),
            };
            let at = match layer {
                Layer::File => format!("in {}", path.display()),
                Layer::Env => "in the environment".to_string(),
                Layer::Flag => "in the flags".to_string(),
                Layer::Default => "in the defaults".to_string(),
            };
            format!("{} {at}: {what}", layer.spell(&key))
        })
        .collect();
    anyhow!("{}", lines.join("\n"))
}

/// Merges the defaults, the file at `path` (when it exists, or when it must), the
/// environment's `HEARTH_<SECTION>__<KEY>` and the flags, in that order.
fn layered(path: &Path, must_exist: bool, up: &UpArgs) -> Result<Layered> {
    if must_exist && !path.exists() {
        bail!("no config file at {}", path.display());
    }
    let file = if path.exists() {
        Toml::file_exact(path)
            .data()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .remove(&Profile::Default)
            .unwrap_or_default()
    } else {
        Dict::new()
    };
    let env = Env::prefixed("HEARTH_")
        .filter(|k| k.as_str().contains("__"))
        .split("__")
        .data()
        .map_err(|e| anyhow!("the environment: {e}"))?
        .remove(&Profile::Default)
        .unwrap_or_default();
    let figment = Figment::new()
        .merge(Source::of(Layer::Default, &FileConfig::defaults())?)
        .merge(Source {
            layer: Layer::File,
            file: Some(path.to_path_buf()),
            data: file,
        })
        .merge(Source {
            layer: Layer::Env,
            file: None,
            data: env,
        })
        .merge(Source::of(Layer::Flag, &FileConfig::flags(up))?);
    let settings = figment
        .extract::<FileConfig>()
        .map_err(|e| explain(e, path))?;
    Ok(Layered {
        figment,
        settings,
        path: path.to_path_buf(),
    })
}

/// Reads `path` (when it exists, or when it must) under the environment's overrides.
#[cfg(test)]
fn load(path: &Path, must_exist: bool) -> Result<FileConfig> {
    layered(path, must_exist, &UpArgs::default()).map(|l| l.settings)
}

fn need<T>(value: Option<T>, key: &str) -> Result<T> {
    value.ok_or_else(|| anyhow!("{key} has no value"))
}

/// The time at `key`, which must be `min` to `max`.
fn bounded(span: Option<Span>, key: &str, min: Duration, max: Duration) -> Result<Duration> {
    let d = need(span, key)?.0;
    if d < min || d > max {
        bail!(
            "{key} is {}; it must be {} to {}",
            humantime::format_duration(d),
            humantime::format_duration(min),
            humantime::format_duration(max)
        );
    }
    Ok(d)
}

/// The API's address: `api.addr`, or seed 001's `agent.host` and `agent.port`, each part
/// from the highest layer that sets it (`--api` over `HEARTH_AGENT__PORT` over a file's
/// `api.addr`). Both spellings in one layer are an error.
fn api_addr(l: &Layered) -> Result<SocketAddr> {
    let addr = need(l.settings.api.addr, "api.addr")?;
    let addr_layer = l.layer("api.addr").unwrap_or(Layer::Default);
    let part = |key: &str| -> Result<bool> {
        match l.layer(key) {
            Some(layer) if layer == addr_layer && layer != Layer::Default => bail!(
                "api.addr and {key} are both set in the {}; keep one",
                layer.name()
            ),
            Some(layer) => Ok(layer > addr_layer),
            None => Ok(false),
        }
    };
    let host = match l.settings.agent.host {
        Some(h) if part("agent.host")? => h,
        _ => addr.ip(),
    };
    let port = match l.settings.agent.port {
        Some(p) if part("agent.port")? => p,
        _ => addr.port(),
    };
    Ok(SocketAddr::new(host, port))
}

/// Flags over the environment over the file over the defaults: the node's config, the
/// log format, and notes (keys that were read but do not apply) for the log.
pub(super) fn resolve(
    data: PathBuf,
    up: UpArgs,
) -> Result<(hearth::Config, LogFormat, Vec<String>)> {
    let (path, must) = match &up.config {
        Some(p) => (p.clone(), true),
        None => (data.join(CONFIG_FILE), false),
    };
    let layered = layered(&path, must, &up)?;
    let (config, log_format) =
        settle(data, &layered).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let notes = layered
        .settings
        .unused()
        .into_iter()
        .map(|k| format!("{}: {k} is read but not used by Hearth", path.display()))
        .collect();
    Ok((config, log_format, notes))
}

/// The merged settings as the node's config.
fn settle(data: PathBuf, l: &Layered) -> Result<(hearth::Config, LogFormat)> {
    let s = &l.settings;
    let seed = hearth::SeedApiConfig {
        max_connections: need(s.websocket.max_connections, "websocket.max_connections")?,
        heartbeat_interval: bounded(
            s.websocket.heartbeat_interval,
            "websocket.heartbeat_interval",
            SECOND,
            hearth::MAX_HEARTBEAT_INTERVAL,
        )?,
        timeout: bounded(
            s.websocket.timeout,
            "websocket.timeout",
            SECOND,
            hearth::MAX_WS_TIMEOUT,
        )?,
        max_room_size: need(s.collaboration.max_room_size, "collaboration.max_room_size")?,
    };
    let mut users = hearth::UsersConfig {
        session_ttl: bounded(
            s.session_management.session_ttl,
            "session_management.session_ttl",
            Duration::from_nanos(1),
            hearth::MAX_SESSION_TTL,
        )?,
        max_devices_per_user: need(
            s.session_management.max_devices_per_user,
            "session_management.max_devices_per_user",
        )?,
        conflict_resolution: match need(
            s.synchronization.conflict_resolution,
            "synchronization.conflict_resolution",
        )? {
            Resolution::LastWriteWins => hearth::ConflictResolution::LastWriteWins,
            Resolution::VectorClock => hearth::ConflictResolution::VectorClock,
        },
        notification_types: need(s.notifications.types.clone(), "notifications.types")?,
        ..hearth::UsersConfig::default()
    };
    users.push.retry_attempts = need(
        s.notifications.retry_attempts,
        "notifications.retry_attempts",
    )?;
    users.push.retry_delay = bounded(
        s.notifications.retry_delay,
        "notifications.retry_delay",
        Duration::ZERO,
        hearth::MAX_RETRY_DELAY,
    )?;
    users.push.targets = need(s.push_services.webhooks.clone(), "push_services.webhooks")?
        .into_iter()
        .map(hearth::PushTarget::Webhook)
        .chain(
            need(s.push_services.ntfy.clone(), "push_services.ntfy")?
                .into_iter()
                .map(hearth::PushTarget::Ntfy),
        )
        .collect();
    users.check()?;
    let max_connections_per_ip =
        need(s.node.max_connections_per_ip, "node.max_connections_per_ip")?;
    if max_connections_per_ip == 0 {
        bail!("node.max_connections_per_ip must be at least 1");
    }
    let documents_cache_mib = need(s.node.documents_cache_mib, "node.documents_cache_mib")?;
    if documents_cache_mib == 0 {
        bail!("node.documents_cache_mib must be at least 1");
    }
    // A password file named in the file is read from the file's folder; one from a flag or
    // the environment from the working dir.
    let password_dir = match l.layer("mqtt.password_file") {
        Some(Layer::File) => l.path.parent(),
        _ => None,
    };
    let mqtt = s.mqtt.settle(password_dir)?;
    let history = hearth::HistoryConfig {
        cut_changes: need(s.history.cut_changes, "history.cut_changes")?,
        cut_bytes: need(s.history.cut_bytes, "history.cut_bytes")?,
        keep_versions: need(s.history.keep_versions, "history.keep_versions")?,
        keep_days: need(s.history.keep_days, "history.keep_days")?,
    };
    history.check()?;
    let config = hearth::Config {
        data_dir: data,
        api: Some(hearth::ApiConfig {
            addr: api_addr(l)?,
            metrics_open: need(s.api.metrics_open, "api.metrics_open")?,
            allowed_origins: need(s.api.allowed_origins.clone(), "api.allowed_origins")?,
            seed,
        }),
        device_name: s.node.name.clone(),
        passphrase: std::env::var("HEARTH_PASSPHRASE")
            .ok()
            .filter(|p| !p.is_empty())
            .map(hearth::Passphrase),
        listen: need(s.node.listen.clone(), "node.listen")?,
        mdns: need(s.node.mdns, "node.mdns")?,
        static_peers: need(s.node.peers.clone(), "node.peers")?,
        batch_window: bounded(
            s.node.batch_window,
            "node.batch_window",
            Duration::ZERO,
            hearth::MAX_BATCH_WINDOW,
        )?,
        max_connections_per_ip,
        documents_cache_mib,
        users,
        history,
        mqtt,
        ..hearth::Config::default()
    };
    Ok((config, need(s.node.log_format, "node.log_format")?))
}

/// `hearth config check [FILE]`: reads the file (default: the data dir's, when there is
/// one) with the environment's overrides, and prints each setting with where it came
/// from, or what is wrong.
pub(super) fn check(data: &Path, file: Option<PathBuf>, json: bool) -> Result<()> {
    // A file named must exist; without one, the data dir's is read when it is there.
    let must = file.is_some();
    let path = file.unwrap_or_else(|| data.join(CONFIG_FILE));
    let up = UpArgs::default();
    let layered =
        layered(&path, must, &up).with_context(|| format!("{} is not valid", path.display()))?;
    let (config, _) = settle(data.to_path_buf(), &layered)
        .with_context(|| format!("{} is not valid", path.display()))?;
    let notes: Vec<String> = layered
        .settings
        .unused()
        .into_iter()
        .map(|k| format!("{k} is read but not used by Hearth"))
        .collect();
    let rows = layered.rows()?;
    let api = config.api.clone().unwrap_or_default();
    let api_from = match (
        layered.layer("agent.host").is_some() || layered.layer("agent.port").is_some(),
        layered.origin("api.addr"),
    ) {
        (false, from) => from,
        (true, from) => format!(
            "api.addr: {from}; agent.host: {}; agent.port: {}",
            layered.origin("agent.host"),
            layered.origin("agent.port")
        ),
    };
    let summary = serde_json::json!({
        "file": path.display().to_string(),
        "file_exists": path.exists(),
        "api": { "addr": api.addr.to_string(), "metrics_open": api.metrics_open,
                 "allowed_origins": api.allowed_origins },
        "node": { "name": config.device_name, "listen": config.listen, "mdns": config.mdns,
                  "peers": config.static_peers,
                  "batch_window_us": u64::try_from(config.batch_window.as_micros()).unwrap_or(u64::MAX),
                  "max_connections_per_ip": config.max_connections_per_ip,
                  "documents_cache_mib": config.documents_cache_mib },
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
        "push_services": { "targets": config.users.push.targets.iter().map(|t| serde_json::json!({
            "kind": t.kind(), "url": redact_url(t.url()),
        })).collect::<Vec<_>>() },
        "history": { "cut_changes": config.history.cut_changes,
                     "cut_bytes": config.history.cut_bytes,
                     "keep_versions": config.history.keep_versions,
                     "keep_days": config.history.keep_days },
        "mqtt": config.mqtt.as_ref().map(super::mqtt::summary),
        "api_addr_from": api_from,
        "sources": rows.iter().map(|(k, v, from)| (k.clone(), serde_json::json!({
            "value": serde_json::from_str::<serde_json::Value>(v).unwrap_or_default(),
            "from": from,
        }))).collect::<serde_json::Map<_, _>>(),
        "unused": notes,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    if path.exists() {
        println!("{} is valid", path.display());
    } else {
        println!(
            "there is no {}; the defaults and the environment are valid",
            path.display()
        );
    }
    for note in &notes {
        println!("  note: {note}");
    }
    let width = rows
        .iter()
        .map(|(k, v, _)| k.len() + v.len() + 3)
        .filter(|w| *w <= 60)
        .max()
        .unwrap_or(0);
    for (key, value, from) in &rows {
        let pair = format!("{key} = {value}");
        println!("  {pair:width$}  # {from}");
    }
    println!("  the API listens on {} ({api_from})", api.addr);
    println!("  {}", super::mqtt::describe(config.mqtt.as_ref()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command, FromArgMatches};

    use super::super::mqtt::MqttArgs;
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("hearth.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_seeds_keys_are_read_and_unknown_keys_are_named_with_their_path() {
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
        assert!(error.contains("session_management.sesion_ttl"), "{error}");
        assert!(error.contains("unknown key"), "{error}");
        let bad = write(dir.path(), "[nodes]\nname = \"x\"\n");
        let error = load(&bad, true).unwrap_err().to_string();
        assert!(error.starts_with("nodes "), "{error}");
        let bad = write(dir.path(), "[node]\nmdns = \"perhaps\"\n");
        let error = load(&bad, true).unwrap_err().to_string();
        assert!(error.contains("node.mdns"), "{error}");
        assert!(load(&dir.path().join("missing.toml"), true).is_err());
        assert!(load(&dir.path().join("missing.toml"), false).is_ok());
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[node]\nname = \"hall\"\nbatch_window = \"5ms\"\nmdns = true\n\
             [api]\naddr = \"127.0.0.1:5000\"\n\
             [session_management]\nsession_ttl = \"10m\"\n",
        );
        let up = UpArgs {
            config: Some(path.clone()),
            name: Some("kitchen".into()),
            no_mdns: true,
            ws_timeout: Some(Duration::from_secs(90)),
            notify_retry_delay: Some(Duration::from_millis(1500)),
            ..UpArgs::default()
        };
        let (config, format, _) = resolve(dir.path().to_path_buf(), up).unwrap();
        assert_eq!(config.device_name.as_deref(), Some("kitchen"));
        assert!(!config.mdns);
        assert_eq!(config.batch_window, Duration::from_millis(5));
        let api = config.api.unwrap();
        assert_eq!(api.addr, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(api.seed.timeout, Duration::from_secs(90));
        assert_eq!(config.users.session_ttl, Duration::from_secs(600));
        // A time that is not whole seconds keeps its fraction through the flags layer.
        assert_eq!(config.users.push.retry_delay, Duration::from_millis(1500));
        assert!(matches!(format, LogFormat::Pretty));
        assert_eq!(config.listen, vec![hearth::DEFAULT_LISTEN.to_string()]);

        let layered = layered(&path, true, &UpArgs::default()).unwrap();
        assert_eq!(
            layered.origin("node.name"),
            format!("file {}", path.display())
        );
        assert_eq!(layered.origin("node.listen"), "default");
        let flagged = UpArgs {
            api: Some("127.0.0.1:7000".parse().unwrap()),
            ..UpArgs::default()
        };
        let layered = super::layered(&path, true, &flagged).unwrap();
        assert_eq!(layered.origin("api.addr"), "flag --api");
        assert_eq!(api_addr(&layered).unwrap().port(), 7000);
    }

    #[test]
    fn the_seeds_agent_port_and_api_addr_take_each_part_from_the_higher_layer() {
        let dir = tempfile::tempdir().unwrap();
        // A port alone keeps the default host.
        let path = write(dir.path(), "[agent]\nport = 8099\n");
        let layered = layered(&path, true, &UpArgs::default()).unwrap();
        assert_eq!(
            api_addr(&layered).unwrap(),
            "127.0.0.1:8099".parse().unwrap()
        );
        // The flag wins over the file's agent.port.
        let flagged = UpArgs {
            api: Some("127.0.0.1:7000".parse().unwrap()),
            ..UpArgs::default()
        };
        let layered = super::layered(&path, true, &flagged).unwrap();
        assert_eq!(
            api_addr(&layered).unwrap(),
            "127.0.0.1:7000".parse().unwrap()
        );
        // Both spellings in one file are an error.
        let path = write(
            dir.path(),
            "[agent]\nport = 8012\n[api]\naddr = \"127.0.0.1:5000\"\n",
        );
        let layered = super::layered(&path, true, &UpArgs::default()).unwrap();
        let error = api_addr(&layered).unwrap_err().to_string();
        assert!(error.contains("api.addr and agent.port"), "{error}");
    }

    #[test]
    fn the_mqtt_section_is_layered_and_its_password_file_is_read_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mqtt.password"), "s3cret\n").unwrap();
        let path = write(
            dir.path(),
            "[mqtt]\nurl = \"mqtt://broker.lan:1883\"\nuser = \"hearth\"\n\
             password_file = \"mqtt.password\"\nexport = [\"light.*\"]\n",
        );
        let up = UpArgs {
            config: Some(path.clone()),
            ..UpArgs::default()
        };
        let (config, _, _) = resolve(dir.path().to_path_buf(), up).unwrap();
        let mqtt = config.mqtt.unwrap();
        assert_eq!(mqtt.url, "mqtt://broker.lan:1883");
        assert_eq!(mqtt.user.as_deref(), Some("hearth"));
        assert_eq!(mqtt.password.as_deref(), Some("s3cret"));
        assert_eq!(mqtt.export, vec!["light.*".to_string()]);
        assert_eq!(mqtt.discovery_prefix, "homeassistant");

        // The flags win over the file, and say so.
        let flagged = UpArgs {
            config: Some(path.clone()),
            mqtt: MqttArgs::from_arg_matches(
                &MqttArgs::augment_args(Command::new("up")).get_matches_from([
                    "up",
                    "--mqtt",
                    "mqtt://127.0.0.1:1884",
                    "--mqtt-user",
                    "me",
                ]),
            )
            .unwrap(),
            ..UpArgs::default()
        };
        let layered = super::layered(&path, true, &flagged).unwrap();
        assert_eq!(layered.origin("mqtt.url"), "flag --mqtt");
        assert_eq!(layered.origin("mqtt.user"), "flag --mqtt-user");
        assert_eq!(
            layered.origin("mqtt.password_file"),
            format!("file {}", path.display())
        );
        assert_eq!(layered.origin("mqtt.max_imported"), "default");
        let (config, _) = settle(dir.path().to_path_buf(), &layered).unwrap();
        let mqtt = config.mqtt.unwrap();
        assert_eq!(mqtt.url, "mqtt://127.0.0.1:1884");
        assert_eq!(mqtt.user.as_deref(), Some("me"));
        assert_eq!(mqtt.password.as_deref(), Some("s3cret"));
        // The password is never among the rows `config check` prints.
        let rows = layered.rows().unwrap();
        assert!(rows.iter().all(|(_, v, _)| !v.contains("s3cret")));
        assert!(rows.iter().any(|(k, _, _)| k == "mqtt.password_file"));

        // No broker: no bridge; an unknown key in the section is named.
        let path = write(dir.path(), "[mqtt]\nnode_id = \"house\"\n");
        let layered = super::layered(&path, true, &UpArgs::default()).unwrap();
        let (config, _) = settle(dir.path().to_path_buf(), &layered).unwrap();
        assert!(config.mqtt.is_none());
        let bad = write(dir.path(), "[mqtt]\npassword = \"x\"\n");
        let error = load(&bad, true).unwrap_err().to_string();
        assert!(error.contains("mqtt.password "), "{error}");
        assert!(error.contains("unknown key"), "{error}");
    }

    /// The keys of [`FLAGS`] that have no default: unset, they leave their feature off (or
    /// take the device's host name).
    const NO_DEFAULT: &[&str] = &["node.name", "mqtt.url", "mqtt.user", "mqtt.password_file"];

    #[test]
    fn every_flag_of_up_has_a_key_and_every_key_a_flag_or_a_default() {
        let command = UpArgs::augment_args(Command::new("up"));
        let defaults = Source::of(Layer::Default, &FileConfig::defaults()).unwrap();
        let mut keys = Vec::new();
        leaves(&defaults.data, "", &mut keys);
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "config" {
                continue;
            }
            let (_, key) = FLAGS
                .iter()
                .find(|(flag, _)| *flag == long)
                .unwrap_or_else(|| panic!("--{long} has no key in FLAGS"));
            // The device name's default is the host name, found at start; the MQTT
            // bridge is off until a broker is named.
            assert!(
                NO_DEFAULT.contains(key) || keys.iter().any(|(k, _)| k == key),
                "--{long}'s key {key} has no default"
            );
        }
        for (flag, _) in FLAGS {
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(flag)),
                "FLAGS names --{flag}, which up does not have"
            );
        }
    }

    #[test]
    fn each_time_has_an_upper_bound_named_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let huge = 10_000_000_000_i64;
        for (section, key) in [
            ("websocket", "heartbeat_interval"),
            ("websocket", "timeout"),
            ("session_management", "session_ttl"),
            ("notifications", "retry_delay"),
            ("node", "batch_window"),
        ] {
            let path = write(dir.path(), &format!("[{section}]\n{key} = {huge}\n"));
            let layered = layered(&path, true, &UpArgs::default()).unwrap();
            let error = settle(dir.path().to_path_buf(), &layered)
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("{section}.{key} is ")),
                "{error}"
            );
        }
        let path = write(
            dir.path(),
            "[websocket]\nheartbeat_interval = \"1h\"\ntimeout = \"1day\"\n\
             [session_management]\nsession_ttl = \"365days\"\n\
             [notifications]\nretry_delay = \"1h\"\n[node]\nbatch_window = \"1s\"\n",
        );
        let layered = layered(&path, true, &UpArgs::default()).unwrap();
        settle(dir.path().to_path_buf(), &layered).unwrap();
        // The library checks the same bounds for a config built without the CLI.
        let mut users = hearth::UsersConfig {
            session_ttl: Duration::MAX,
            ..hearth::UsersConfig::default()
        };
        assert!(users.check().is_err());
        users.session_ttl = Duration::from_secs(60);
        users.push.retry_delay = Duration::from_secs(7200);
        assert!(users.check().is_err());
        let seed = hearth::SeedApiConfig {
            heartbeat_interval: Duration::from_secs(u64::MAX),
            ..hearth::SeedApiConfig::default()
        };
        assert!(seed.check().is_err());
        assert!(hearth::SeedApiConfig::default().check().is_ok());
    }

    #[test]
    fn secrets_and_urls_are_redacted() {
        assert_eq!(
            redact_url("redis://u:pw@redis.lan:6379/0?x=1"),
            "redis://redis.lan:6379"
        );
        assert_eq!(redact_url("https://ntfy.sh/topic"), "https://ntfy.sh");
        assert_eq!(redact_url("https://h.example#frag"), "https://h.example");
        assert_eq!(redact_url("/ip4/1.2.3.4/tcp/1"), "/ip4/1.2.3.4/tcp/1");
        let key = serde_json::json!("abcd");
        assert_eq!(
            redact("push_services.fcm_server_key", key.clone()),
            "<set, 4 chars>"
        );
        assert_eq!(redact("mqtt.password", key.clone()), "<set, 4 chars>");
        assert_eq!(redact("node.name", key), "abcd");
        assert_eq!(
            redact(
                "push_services.webhooks",
                serde_json::json!(["https://a.example/t?k=1"])
            ),
            serde_json::json!(["https://a.example"])
        );
    }

    #[test]
    fn the_annotated_example_checks_clean_and_names_every_key() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hearth.toml");
        let layered = layered(&example, true, &UpArgs::default()).unwrap();
        assert!(layered.settings.unused().is_empty());
        settle(PathBuf::from("/tmp/hearth-example"), &layered).unwrap();
        let text = std::fs::read_to_string(&example).unwrap();
        for (_, key) in FLAGS {
            let (section, name) = key.split_once('.').unwrap();
            assert!(text.contains(&format!("[{section}]")), "no [{section}]");
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{name} ="))),
                "the example does not show {key}"
            );
        }
    }
}
