//! The MQTT bridge to Home Assistant (feature `mqtt`): this home's entities, and those
//! shared with it, published with Home Assistant's MQTT discovery; commands from Home
//! Assistant written through the node like any other write; entities Home Assistant
//! publishes under a prefix imported as entities of this home.
//!
//! A service of the node built on its public handles only ([`crate::Entities`] and the
//! event stream): it reaches no other service's state, and a broker that is down or slow
//! never holds up the node.

mod bridge;
mod ha;
mod import;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub(crate) use bridge::spawn;
pub use ha::COMPONENTS;
pub use import::{IMPORT_MARKER, MAX_IMPORT_ATTRIBUTES, MAX_IMPORT_ATTRIBUTES_BYTES};

use crate::Error;

/// The root of every topic the bridge owns: `hearth/<node_id>/...`.
pub const TOPIC_ROOT: &str = "hearth";
/// Home Assistant's discovery prefix unless told otherwise.
pub const DEFAULT_DISCOVERY_PREFIX: &str = "homeassistant";
/// Most entities imported from MQTT unless told otherwise.
pub const DEFAULT_MAX_IMPORTED: usize = 1000;
/// The largest MQTT packet the bridge accepts from the broker. Larger packets end the
/// connection (the client refuses them before reading them whole), and the bridge
/// reconnects.
pub const MAX_MQTT_PACKET: usize = 256 * 1024;
/// The largest command payload acted on; commands are one word or a number.
pub const MAX_COMMAND_PAYLOAD: usize = 1024;
/// The largest import message acted on.
pub const MAX_IMPORT_PAYLOAD: usize = 16 * 1024;

/// The MQTT bridge's settings ([`crate::Config::mqtt`]).
#[derive(Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// The broker, `mqtt://host[:port]` (port 1883 by default). TLS is not spoken; reach a
    /// remote broker through a local one or a tunnel.
    pub url: String,
    /// The user name to log in with, if the broker asks for one.
    pub user: Option<String>,
    /// The password to log in with; never shown in `Debug` output.
    pub password: Option<String>,
    /// Home Assistant's discovery prefix ([`DEFAULT_DISCOVERY_PREFIX`]).
    pub discovery_prefix: String,
    /// The node id in discovery topics (`<prefix>/<component>/<node_id>/<object>/config`)
    /// and under `hearth/<node_id>/`: letters, digits, `_` and `-`. `None` derives one from
    /// this device's PeerId, so two devices of a home never share one.
    pub node_id: Option<String>,
    /// Which entities to export, as event-name patterns on the entity id (`light.*`,
    /// `sensor.kitchen_temp`, `*`). Entities of this home and those shared with it both
    /// count. Default: every entity (`*`). Only the domains of [`COMPONENTS`] are exported.
    pub export: Vec<String>,
    /// Import the entities Home Assistant publishes under this prefix (its
    /// `mqtt_statestream` layout) as entities of this home. `None` (the default) imports
    /// nothing.
    pub import_prefix: Option<String>,
    /// Most entities imported ([`DEFAULT_MAX_IMPORTED`]); more are refused and logged.
    pub max_imported: usize,
}

impl MqttConfig {
    /// A bridge to the broker at `url` with the defaults: discovery under `homeassistant`,
    /// every entity exported, nothing imported.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user: None,
            password: None,
            discovery_prefix: DEFAULT_DISCOVERY_PREFIX.into(),
            node_id: None,
            export: vec!["*".into()],
            import_prefix: None,
            max_imported: DEFAULT_MAX_IMPORTED,
        }
    }
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("discovery_prefix", &self.discovery_prefix)
            .field("node_id", &self.node_id)
            .field("export", &self.export)
            .field("import_prefix", &self.import_prefix)
            .field("max_imported", &self.max_imported)
            .finish()
    }
}

/// The settings checked and parsed, ready for the bridge.
#[derive(Clone, Debug)]
pub(crate) struct Checked {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) discovery_prefix: String,
    pub(crate) node_id: String,
    pub(crate) export: Vec<crate::bus::Pattern>,
    pub(crate) import_prefix: Option<String>,
    pub(crate) max_imported: usize,
}

/// Splits `mqtt://host[:port]` (or `tcp://`) into host and port.
fn parse_url(url: &str) -> Result<(String, u16), Error> {
    let bad = |why: &str| Error::Invalid(format!("MQTT broker URL {url:?}: {why}"));
    let rest = if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        rest
    } else if url.starts_with("mqtts://") || url.starts_with("ssl://") {
        return Err(bad(
            "TLS is not supported; use mqtt:// to a local broker (bridge it to a remote one)",
        ));
    } else {
        return Err(bad("use mqtt://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '@', '?']) {
        return Err(bad(
            "give only host and port; pass the user and password separately",
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal in brackets: `[::1]:1883`.
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?;
            (host, port)
        }
        _ => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port))
}

/// A topic prefix: non-empty, no wildcards, no empty levels.
fn check_prefix(what: &str, prefix: &str) -> Result<(), Error> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 128
        && !prefix.contains(['+', '#', '\0'])
        && prefix.split('/').all(|level| !level.is_empty());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "MQTT {what} {prefix:?}: use topic levels without wildcards, e.g. `homeassistant`"
        )))
    }
}

/// The node id derived from a PeerId: `hearth_` and its last 10 characters, lowercased
/// (Home Assistant's node ids allow letters, digits, `_` and `-`).
fn default_node_id(peer_id: &str) -> String {
    let tail: String = peer_id
        .chars()
        .rev()
        .take(10)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("hearth_{}", tail.to_ascii_lowercase())
}

impl MqttConfig {
    /// Checks the settings as [`crate::Node::start`] does, before any node runs: the URL,
    /// the prefixes, the node id, the export patterns and the credentials. Errors say which
    /// one is wrong and how to fix it.
    pub fn validate(&self) -> Result<(), Error> {
        self.check("").map(|_| ())
    }

    /// Checks the settings; errors say which one is wrong and how to fix it.
    pub(crate) fn check(&self, peer_id: &str) -> Result<Checked, Error> {
        let (host, port) = parse_url(&self.url)?;
        check_prefix("discovery prefix", &self.discovery_prefix)?;
        if let Some(prefix) = &self.import_prefix {
            check_prefix("import prefix", prefix)?;
            if prefix == TOPIC_ROOT
                || prefix.starts_with(&format!("{TOPIC_ROOT}/"))
                || prefix == &self.discovery_prefix
            {
                return Err(Error::Invalid(format!(
                    "MQTT import prefix {prefix:?} overlaps the bridge's own topics; \
                     use the base topic of Home Assistant's mqtt_statestream"
                )));
            }
        }
        let node_id = match &self.node_id {
            Some(id) => {
                let ok = !id.is_empty()
                    && id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    return Err(Error::Invalid(format!(
                        "MQTT node id {id:?}: use 1 to 64 letters, digits, `_` or `-`"
                    )));
                }
                id.clone()
            }
            None => default_node_id(peer_id),
        };
        let export = self
            .export
            .iter()
            .map(|p| crate::bus::Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let credentials = match (&self.user, &self.password) {
            (Some(user), password) => Some((user.clone(), password.clone().unwrap_or_default())),
            (None, Some(_)) => {
                return Err(Error::Invalid(
                    "an MQTT password was given without a user; give the user too".into(),
                ));
            }
            (None, None) => None,
        };
        if self.max_imported == 0 && self.import_prefix.is_some() {
            return Err(Error::Invalid(
                "MQTT import is on but at most 0 entities may be imported".into(),
            ));
        }
        Ok(Checked {
            host,
            port,
            credentials,
            discovery_prefix: self.discovery_prefix.clone(),
            node_id,
            export,
            import_prefix: self.import_prefix.clone(),
            max_imported: self.max_imported,
        })
    }
}

/// What the bridge has done so far ([`crate::Node::mqtt_status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttStatus {
    /// The node id in its topics.
    pub node_id: String,
    /// Connected to the broker now.
    pub connected: bool,
    /// Connections made since start (reconnections included).
    pub connections: u64,
    /// Entities published with discovery now.
    pub exported: usize,
    /// Entities imported from MQTT since start.
    pub imported: usize,
    /// Commands from MQTT written.
    pub commands: u64,
    /// Commands refused because the entity is shared with this home read-only.
    pub refused: u64,
    /// Commands and import messages rejected as malformed, unknown or over a cap.
    pub rejected: u64,
}

/// The counters the bridge keeps, read by [`crate::Node::mqtt_status`].
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) node_id: String,
    pub(crate) connected: AtomicBool,
    pub(crate) connections: AtomicU64,
    pub(crate) exported: AtomicUsize,
    pub(crate) imported: AtomicUsize,
    pub(crate) commands: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> MqttStatus {
        MqttStatus {
            node_id: self.node_id.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            imported: self.imported.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// The running bridge, as the node holds it.
pub(crate) struct Running {
    pub(crate) stats: Arc<Stats>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_url("mqtt://broker.lan").unwrap(),
            ("broker.lan".into(), 1883)
        );
        assert_eq!(parse_url("tcp://[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert!(
            parse_url("mqtts://x:8883")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(parse_url("mqtt://u:p@x:1").is_err());
        assert!(parse_url("mqtt://x:port").is_err());
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://").is_err());
    }

    #[test]
    fn settings_are_checked_and_the_node_id_defaults_from_the_peer_id() {
        let peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";
        let checked = MqttConfig::new("mqtt://h").check(peer).unwrap();
        assert_eq!(checked.node_id, "hearth_z9kscve2xo");
        assert!(checked.credentials.is_none());
        let mut bad = MqttConfig::new("mqtt://h");
        bad.node_id = Some("has space".into());
        assert!(bad.check(peer).is_err());
        let mut bad = MqttConfig::new("mqtt://h");
        bad.discovery_prefix = "home/#".into();
        assert!(bad.check(peer).is_err());
        let mut bad = MqttConfig::new("mqtt://h");
        bad.import_prefix = Some("hearth/x".into());
        assert!(bad.check(peer).is_err());
        let mut bad = MqttConfig::new("mqtt://h");
        bad.password = Some("p".into());
        assert!(bad.check(peer).is_err());
        let mut bad = MqttConfig::new("mqtt://h");
        bad.export = vec!["light.*x".into()];
        assert!(bad.check(peer).is_err());
        let mut good = MqttConfig::new("mqtt://h");
        good.user = Some("u".into());
        good.password = Some("secret".into());
        assert!(!format!("{good:?}").contains("secret"));
        assert_eq!(
            good.check(peer).unwrap().credentials,
            Some(("u".into(), "secret".into()))
        );
    }
}
