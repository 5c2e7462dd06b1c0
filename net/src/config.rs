//! Network configuration.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::stream::{INBOUND_BUFFER_BYTES, MAX_FRAME_SIZE};
use crate::{DeviceIdentity, Error};

/// Largest certificate accepted in, or sent through, the `/hearth/hello/1` exchange.
pub const MAX_CERTIFICATE_SIZE: usize = 64 * 1024;

/// Most static peers a node keeps dialled.
pub const MAX_STATIC_PEERS: usize = 256;

/// Longest accepted hello timeout or redial backoff.
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted ping interval or timeout; liveness past a minute is no liveness.
const MAX_PING: Duration = Duration::from_secs(60);

/// The TCP port a node listens on by default.
pub const DEFAULT_PORT: u16 = 4640;

/// Default for [`Config::max_connections_per_ip`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 16;

/// Default for [`Config::max_unknown_inbound`].
pub const DEFAULT_MAX_UNKNOWN_INBOUND: u32 = 64;

/// Default for [`Config::hello_timeout_no_cert`].
pub const DEFAULT_HELLO_TIMEOUT_NO_CERT: Duration = Duration::from_secs(3);

/// Default for [`Config::frame_read_timeout`].
pub const DEFAULT_FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`Config::max_inbound_bytes_per_peer`].
pub const DEFAULT_MAX_INBOUND_BYTES_PER_PEER: usize = 8 * 1024 * 1024;

/// Settings for [`crate::new`].
///
/// Every field is public; start from [`Config::default`] and override what you need.
#[derive(Debug, Clone)]
pub struct Config {
    /// The device's keypair, which fixes its PeerId. The default is a fresh random
    /// identity, which suits tests; a node loads its stored identity instead.
    pub identity: DeviceIdentity,
    /// Addresses to listen on. Default `/ip4/0.0.0.0/tcp/4640` (plus
    /// `/ip4/0.0.0.0/udp/4640/quic-v1` when built with the `quic` feature). Tests use
    /// `/ip4/127.0.0.1/tcp/0`.
    pub listen: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN with mDNS. Default true. Discovered addresses
    /// are hints only: a discovered peer is still subject to the hello exchange and
    /// admission.
    pub mdns: bool,
    /// How often mDNS asks the LAN who is there, once start-up probing is over. Default
    /// 10 s. libp2p stops its start-up probing at the first answer from anyone, so two
    /// nodes that start at the same moment can each miss the other's first query (its
    /// listener was not up yet); this bound is how long such a pair waits for the next
    /// query. libp2p's own default of 5 minutes leaves them strangers that long.
    pub mdns_query_interval: Duration,
    /// Whether to dial mDNS-discovered peers automatically. Only the smaller PeerId of a
    /// pair dials, which avoids simultaneous dials. Default true.
    pub dial_discovered: bool,
    /// Peers to keep dialled, each as `/ip4/../tcp/N/p2p/<peer id>`. Both sides of a pair
    /// may list each other; duplicates are closed so exactly one connection remains.
    pub static_peers: Vec<Multiaddr>,
    /// This node's certificate, sent as-is to every peer in the hello exchange. Opaque to
    /// this crate; empty until the node has one.
    pub certificate: Vec<u8>,
    /// How long a connected peer may stay un-admitted (see [`crate::Handle::admit`])
    /// before it is disconnected. Default 10 s.
    pub hello_timeout: Duration,
    /// How long a connected peer that has presented no certificate (an empty hello, or
    /// none yet) may stay un-admitted. Default 3 s ([`DEFAULT_HELLO_TIMEOUT_NO_CERT`]).
    /// A peer starts on the shorter of this and `hello_timeout`, and moves to
    /// `hello_timeout` when a non-empty certificate arrives. Strangers on the LAN need no
    /// certificate to connect, so they get the short deadline; a device that is pairing
    /// (also without a certificate) keeps the pairing extension below.
    pub hello_timeout_no_cert: Duration,
    /// Longest a non-admitted peer may stay connected while it is pairing. Each pairing
    /// message pushes its admission deadline out by another `hello_timeout`, but never
    /// past this long after it connected, so a stalled or hostile joiner cannot hold a
    /// connection slot. Default 60 s.
    pub pairing_max_duration: Duration,
    /// How often each connection is pinged. Default 1 s. A connection on which no ping
    /// has succeeded for `ping_interval + 2 * ping_timeout` (3.5 s by default) is closed as
    /// dead, so a silently vanished peer (no FIN, no RST) is noticed within that time plus
    /// one 100 ms maintenance tick. A peer that closes its connection is noticed at once.
    pub ping_interval: Duration,
    /// How long one ping may take. Default 1.25 s.
    pub ping_timeout: Duration,
    /// Longest wait between redials of a static or discovered peer. Default 30 s.
    pub redial_max: Duration,
    /// Cap on established connections across all peers. Default 128.
    pub max_connections: u32,
    /// Cap on connections still in their handshake, inbound. Default 32.
    pub max_pending_incoming: u32,
    /// Cap on established inbound connections from one remote IP address. Default 16
    /// ([`DEFAULT_MAX_CONNECTIONS_PER_IP`]). Connections past it are closed right after
    /// the handshake and counted in [`crate::Metrics::connections_refused_per_ip`].
    /// Static peers and peers named by [`crate::Handle::reserve_peer`] are never refused
    /// by it; admitted peers are (a paired home can mint device certificates at will).
    pub max_connections_per_ip: u32,
    /// Cap on established inbound connections from unknown peers: not static, not named
    /// by [`crate::Handle::reserve_peer`] and not admitted during this run. Default 64
    /// ([`DEFAULT_MAX_UNKNOWN_INBOUND`]); must stay below `max_connections`, so that room
    /// is always left for known peers, which neither count against this cap nor are
    /// refused by it. A flood of strangers therefore cannot lock the home's own devices
    /// out. Refusals are counted in [`crate::Metrics::connections_refused_unknown`].
    pub max_unknown_inbound: u32,
    /// How long one sync or ephemeral frame may take to arrive once its length prefix has.
    /// Default 10 s ([`DEFAULT_FRAME_READ_TIMEOUT`]). Time spent waiting for the node to
    /// consume earlier frames does not count. A peer past it is disconnected as sending a
    /// malformed frame and counted in [`crate::Metrics::frame_read_timeouts`]. A full
    /// [`crate::MAX_FRAME_SIZE`] frame within 10 s needs about 3.4 Mbit/s; raise it for
    /// peers behind slow links.
    pub frame_read_timeout: Duration,
    /// Received frame bytes one peer may have waiting for the node (read but not yet
    /// yielded by the [`crate::EventStream`]), across its sync and ephemeral streams.
    /// Default 8 MiB ([`DEFAULT_MAX_INBOUND_BYTES_PER_PEER`]); at least
    /// [`crate::MAX_FRAME_SIZE`] and at most the 64 MiB shared by all peers, so one peer
    /// can hold only part of the shared budget.
    pub max_inbound_bytes_per_peer: usize,
    /// A Prometheus registry to add libp2p's metrics to (connections, bandwidth per
    /// transport, identify, ping), under the `libp2p` prefix. Default none.
    pub metrics: Option<SharedRegistry>,
}

/// A Prometheus registry shared between the network and its owner, which encodes it.
pub type SharedRegistry = std::sync::Arc<std::sync::Mutex<prometheus_client::registry::Registry>>;

/// Locks a shared registry; a panic elsewhere while it was held leaves nothing unsafe.
pub(crate) fn lock_registry(
    r: &SharedRegistry,
) -> std::sync::MutexGuard<'_, prometheus_client::registry::Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Config {
    fn default() -> Self {
        let mut listen = vec![
            Multiaddr::empty()
                .with(Protocol::Ip4([0, 0, 0, 0].into()))
                .with(Protocol::Tcp(DEFAULT_PORT)),
        ];
        if cfg!(feature = "quic") {
            listen.push(
                Multiaddr::empty()
                    .with(Protocol::Ip4([0, 0, 0, 0].into()))
                    .with(Protocol::Udp(DEFAULT_PORT))
                    .with(Protocol::QuicV1),
            );
        }
        Self {
            identity: DeviceIdentity::generate(),
            listen,
            mdns: true,
            mdns_query_interval: Duration::from_secs(10),
            dial_discovered: true,
            static_peers: Vec::new(),
            certificate: Vec::new(),
            metrics: None,
            hello_timeout: Duration::from_secs(10),
            hello_timeout_no_cert: DEFAULT_HELLO_TIMEOUT_NO_CERT,
            pairing_max_duration: Duration::from_secs(60),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(1250),
            redial_max: Duration::from_secs(30),
            max_connections: 128,
            max_pending_incoming: 32,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_unknown_inbound: DEFAULT_MAX_UNKNOWN_INBOUND,
            frame_read_timeout: DEFAULT_FRAME_READ_TIMEOUT,
            max_inbound_bytes_per_peer: DEFAULT_MAX_INBOUND_BYTES_PER_PEER,
        }
    }
}

impl Config {
    /// How long a connection may go without a successful ping before it is closed.
    ///
    /// libp2p's ping forgives the first failed ping and then waits for a fresh stream,
    /// which on a dead link takes the 10 s substream timeout; tracking success ourselves
    /// keeps detection inside the 5 s the design asks for.
    pub(crate) fn liveness_timeout(&self) -> Duration {
        self.ping_interval + self.ping_timeout * 2
    }

    /// Checks every field, returning the static peers split into (PeerId, address).
    pub(crate) fn validate(&self) -> Result<Vec<(PeerId, Multiaddr)>, Error> {
        // Upper bounds too: deadlines are computed as `Instant + duration`, which panics
        // on overflow, and a config file must not be able to crash the node.
        let in_range = |name: &str, value: Duration, max: Duration| {
            if value.is_zero() || value > max {
                Err(Error::Config(format!(
                    "{name} is {value:?}; it must be above zero and at most {max:?}"
                )))
            } else {
                Ok(())
            }
        };
        in_range("hello_timeout", self.hello_timeout, MAX_TIMER)?;
        in_range(
            "hello_timeout_no_cert",
            self.hello_timeout_no_cert,
            MAX_TIMER,
        )?;
        in_range("frame_read_timeout", self.frame_read_timeout, MAX_TIMER)?;
        in_range("pairing_max_duration", self.pairing_max_duration, MAX_TIMER)?;
        in_range("redial_max", self.redial_max, MAX_TIMER)?;
        in_range("ping_interval", self.ping_interval, MAX_PING)?;
        in_range("ping_timeout", self.ping_timeout, MAX_PING)?;
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.max_connections_per_ip == 0 || self.max_unknown_inbound == 0 {
            return Err(Error::Config(
                "max_connections_per_ip and max_unknown_inbound must be at least 1".into(),
            ));
        }
        if self.max_unknown_inbound >= self.max_connections {
            return Err(Error::Config(format!(
                "max_unknown_inbound ({}) must be below max_connections ({}), or strangers \
                 could take every connection slot",
                self.max_unknown_inbound, self.max_connections
            )));
        }
        // Below one frame a peer could never deliver its largest frame; above the shared
        // budget the cap would mean nothing.
        let per_peer = self.max_inbound_bytes_per_peer;
        if !(MAX_FRAME_SIZE..=INBOUND_BUFFER_BYTES).contains(&per_peer) {
            return Err(Error::Config(format!(
                "max_inbound_bytes_per_peer is {per_peer}; it must be between \
                 {MAX_FRAME_SIZE} (the largest frame) and {INBOUND_BUFFER_BYTES}"
            )));
        }
        check_certificate(&self.certificate)?;
        if self.static_peers.len() > MAX_STATIC_PEERS {
            return Err(Error::Capacity {
                what: "static peers",
                limit: MAX_STATIC_PEERS,
            });
        }
        self.static_peers.iter().map(split_peer_addr).collect()
    }
}

/// Refuses certificates the remote side would refuse anyway.
pub(crate) fn check_certificate(certificate: &[u8]) -> Result<(), Error> {
    if certificate.len() > MAX_CERTIFICATE_SIZE {
        return Err(Error::Config(format!(
            "certificate is {} bytes; the hello exchange carries at most {MAX_CERTIFICATE_SIZE}",
            certificate.len()
        )));
    }
    Ok(())
}

/// Splits `/ip4/../tcp/N/p2p/<peer>` into the PeerId and the address without its suffix.
pub(crate) fn split_peer_addr(addr: &Multiaddr) -> Result<(PeerId, Multiaddr), Error> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) if !base.is_empty() => Ok((peer, base)),
        _ => Err(Error::MissingPeerId { addr: addr.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_listens_on_the_well_known_port_with_mdns_on() {
        let config = Config::default();
        assert_eq!(config.listen[0].to_string(), "/ip4/0.0.0.0/tcp/4640");
        assert!(config.mdns);
        assert_eq!(config.hello_timeout, Duration::from_secs(10));
        assert_eq!(config.pairing_max_duration, Duration::from_secs(60));
        assert!(
            config.liveness_timeout() + Duration::from_millis(500) < Duration::from_secs(5),
            "a silently departed peer must be noticed within 5 s"
        );
        assert!(config.validate().unwrap().is_empty());
    }

    #[test]
    fn static_peers_must_name_their_peer_id() {
        let peer = PeerId::random();
        let good: Multiaddr = format!("/ip4/127.0.0.1/tcp/9/p2p/{peer}").parse().unwrap();
        let (got, base) = split_peer_addr(&good).unwrap();
        assert_eq!(got, peer);
        assert_eq!(base.to_string(), "/ip4/127.0.0.1/tcp/9");

        let bad: Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().unwrap();
        assert!(matches!(
            split_peer_addr(&bad),
            Err(Error::MissingPeerId { .. })
        ));
        let bare: Multiaddr = format!("/p2p/{peer}").parse().unwrap();
        assert!(
            split_peer_addr(&bare).is_err(),
            "a PeerId alone is not dialable"
        );

        let config = Config {
            static_peers: vec![bad],
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let zero_hello = Config {
            hello_timeout: Duration::ZERO,
            ..Config::default()
        };
        assert!(matches!(zero_hello.validate(), Err(Error::Config(_))));
        let huge_cert = Config {
            certificate: vec![0; MAX_CERTIFICATE_SIZE + 1],
            ..Config::default()
        };
        assert!(matches!(huge_cert.validate(), Err(Error::Config(_))));
        let forever = Config {
            redial_max: Duration::MAX,
            ..Config::default()
        };
        assert!(matches!(forever.validate(), Err(Error::Config(_))));
        let endless_pairing = Config {
            pairing_max_duration: Duration::MAX,
            ..Config::default()
        };
        assert!(matches!(endless_pairing.validate(), Err(Error::Config(_))));
        let no_conns = Config {
            max_connections: 0,
            ..Config::default()
        };
        assert!(no_conns.validate().is_err());
        for bad in [MAX_FRAME_SIZE - 1, INBOUND_BUFFER_BYTES + 1] {
            let config = Config {
                max_inbound_bytes_per_peer: bad,
                ..Config::default()
            };
            assert!(matches!(config.validate(), Err(Error::Config(_))), "{bad}");
        }
        let no_ip_share = Config {
            max_connections_per_ip: 0,
            ..Config::default()
        };
        assert!(no_ip_share.validate().is_err());
        let no_read_time = Config {
            frame_read_timeout: Duration::ZERO,
            ..Config::default()
        };
        assert!(no_read_time.validate().is_err());
    }
}
