//! [`NodeBuilder`]: the short way to a [`Config`] and a running [`Node`].

use std::path::PathBuf;
use std::time::Duration;

use crate::{Config, Error, Node, Passphrase};

/// Builds a [`Node`]; get one from [`Node::builder`]. Options left unset keep
/// [`Config::default`]'s values, so the node is headless unless `NodeBuilder::api`
/// asks for the local API.
///
/// ```no_run
/// # async fn run() -> Result<(), hearth::Error> {
/// let node = hearth::Node::builder()
///     .data_dir("/tmp/hearth-example")
///     .listen(["/ip4/127.0.0.1/tcp/0"])
///     .mdns(false)
///     .start()
///     .await?;
/// # node.shutdown().await }
/// ```
#[derive(Clone, Debug, Default)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct NodeBuilder {
    config: Config,
}

impl From<Config> for NodeBuilder {
    /// A builder that starts from `config`, for the options the builder has no method for.
    fn from(config: Config) -> Self {
        Self { config }
    }
}

impl NodeBuilder {
    /// The data dir ([`Config::data_dir`]).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = dir.into();
        self
    }

    /// The device name ([`Config::device_name`]).
    pub fn device_name(mut self, name: impl Into<String>) -> Self {
        self.config.device_name = Some(name.into());
        self
    }

    /// Derives the store key from a passphrase ([`Config::passphrase`]).
    pub fn passphrase(mut self, passphrase: impl Into<String>) -> Self {
        self.config.passphrase = Some(Passphrase(passphrase.into()));
        self
    }

    /// The multiaddrs to listen on for peers, replacing the default ([`Config::listen`]).
    pub fn listen<A: Into<String>>(mut self, addrs: impl IntoIterator<Item = A>) -> Self {
        self.config.listen = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// Whether to discover the home's peers with mDNS ([`Config::mdns`]); on by default.
    pub fn mdns(mut self, on: bool) -> Self {
        self.config.mdns = on;
        self
    }

    /// Adds a peer to keep dialled, `/ip4/ADDR/tcp/PORT/p2p/PEERID`
    /// ([`Config::static_peers`]).
    pub fn static_peer(mut self, addr: impl Into<String>) -> Self {
        self.config.static_peers.push(addr.into());
        self
    }

    /// The write batching window ([`Config::batch_window`]).
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.config.batch_window = window;
        self
    }

    /// Serves the local HTTP API on `addr` (port 0 picks a free one), with its defaults:
    /// the token required everywhere, no extra origins. Without this the node is headless.
    #[cfg(feature = "api")]
    pub fn api(self, addr: std::net::SocketAddr) -> Self {
        self.api_config(crate::ApiConfig::on(addr))
    }

    /// Serves the local HTTP API as `api` says ([`Config::api`]).
    #[cfg(feature = "api")]
    pub fn api_config(mut self, api: crate::ApiConfig) -> Self {
        self.config.api = Some(api);
        self
    }

    /// Bridges the node's entities to an MQTT broker with Home Assistant discovery
    /// ([`Config::mqtt`]).
    #[cfg(feature = "mqtt")]
    pub fn mqtt(mut self, mqtt: crate::MqttConfig) -> Self {
        self.config.mqtt = Some(mqtt);
        self
    }

    /// The config as built so far.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Starts the node; see [`Node::start`].
    ///
    /// Not cancel-safe, as [`Node::start`] is not.
    pub async fn start(self) -> Result<Node, Error> {
        Node::start(self.config).await
    }
}
