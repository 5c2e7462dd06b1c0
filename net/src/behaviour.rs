//! The composed libp2p behaviour and the swarm built around it.

use std::sync::Arc;
use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, connection_limits, identify, mdns, noise, ping, request_response, tcp,
    yamux,
};
use serde::{Deserialize, Serialize};

use crate::config::MAX_CERTIFICATE_SIZE;
use crate::event::Counters;
use crate::guard::Guard;
use crate::pair::{PAIR_MAX_CONCURRENT_STREAMS, PAIR_PROTOCOL, PAIR_REQUEST_TIMEOUT, PairCodec};
use crate::{Config, Error};

/// Protocol of the certificate exchange every new session starts with.
pub const HELLO_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/hello/1");

/// Protocol of the long-lived per-peer sync stream.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/sync/1");

/// Protocol of the long-lived per-peer stream for short-lived messages.
pub const EPHEMERAL_PROTOCOL: StreamProtocol = StreamProtocol::new("/hearth/ephemeral/1");

/// What identify announces, so peers can tell a Hearth node from other libp2p software.
pub(crate) const IDENTIFY_PROTOCOL_VERSION: &str = "/hearth/1.0.0";

/// How long a connection with no open stream lingers. Admitted peers always hold their
/// sync stream open and others are cut at the hello timeout, so this only reaps
/// connections that fell through both.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// CBOR framing around the certificate costs a few bytes; leave room for them.
const HELLO_MESSAGE_MAX: u64 = MAX_CERTIFICATE_SIZE as u64 + 1024;

/// The `/hearth/hello/1` message, sent as a request and as the response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// Opaque certificate bytes; CBOR byte string rather than an array of integers.
    #[serde(with = "serde_bytes")]
    pub(crate) certificate: Vec<u8>,
}

/// The two framed stream protocols. They share all machinery and differ in caps and in
/// what a full queue means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StreamKind {
    Sync,
    Ephemeral,
}

impl StreamKind {
    pub(crate) const ALL: [StreamKind; 2] = [StreamKind::Sync, StreamKind::Ephemeral];

    pub(crate) fn protocol(self) -> StreamProtocol {
        match self {
            Self::Sync => SYNC_PROTOCOL,
            Self::Ephemeral => EPHEMERAL_PROTOCOL,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Ephemeral => "ephemeral",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Sync => 0,
            Self::Ephemeral => 1,
        }
    }
}

/// Every protocol a Hearth node speaks, polled together by the swarm.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// First, so its refusals (per IP, unknown peers) are decided before the totals.
    pub(crate) guard: Guard,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) hello: request_response::cbor::Behaviour<Hello, Hello>,
    pub(crate) pair: request_response::Behaviour<PairCodec>,
    pub(crate) streams: libp2p_stream::Behaviour,
}

/// Two connections per peer, not one: during a simultaneous mutual dial each side would
/// otherwise refuse a different connection and the pair would end with none. The event
/// loop closes the duplicate deterministically as soon as it appears.
pub(crate) const MAX_CONNECTIONS_PER_PEER: u32 = 2;

/// Builds the swarm: TCP (and QUIC with the `quic` feature), Noise, Yamux and the
/// behaviours above.
pub(crate) fn build_swarm(
    config: &Config,
    counters: Arc<Counters>,
) -> Result<Swarm<Behaviour>, Error> {
    let keypair = config.identity.keypair().clone();
    let local_peer = keypair.public().to_peer_id();

    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(
                mdns::Config {
                    query_interval: config.mdns_query_interval,
                    ..mdns::Config::default()
                },
                local_peer,
            )
            .map_err(Error::Mdns)?,
        )
    } else {
        None
    };
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
        .with_max_established(Some(config.max_connections))
        .with_max_pending_incoming(Some(config.max_pending_incoming));
    let hello_codec = request_response::cbor::codec::Codec::<Hello, Hello>::default()
        .set_request_size_maximum(HELLO_MESSAGE_MAX)
        .set_response_size_maximum(HELLO_MESSAGE_MAX);
    // Request-response rather than a stream: pairing is a handful of rounds, each a
    // question and an answer, and the behaviour brings per-request timeouts and size caps.
    let guard = Guard::new(
        config.max_connections_per_ip,
        config.max_unknown_inbound,
        counters.clone(),
    );
    let pair_codec = PairCodec::new(counters);
    let behaviour = Behaviour {
        guard,
        limits: connection_limits::Behaviour::new(limits),
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
                .with_agent_version(format!("hearth/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.ping_interval)
                .with_timeout(config.ping_timeout),
        ),
        mdns: Toggle::from(mdns),
        hello: request_response::Behaviour::with_codec(
            hello_codec,
            [(HELLO_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(config.hello_timeout),
        ),
        pair: request_response::Behaviour::with_codec(
            pair_codec,
            [(PAIR_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(PAIR_REQUEST_TIMEOUT)
                .with_max_concurrent_streams(PAIR_MAX_CONCURRENT_STREAMS),
        ),
        streams: libp2p_stream::Behaviour::new(),
    };

    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error::Transport(e.to_string()))?;
    #[cfg(feature = "quic")]
    let builder = builder.with_quic();
    let swarm = match &config.metrics {
        Some(registry) => {
            let mut registry = crate::config::lock_registry(registry);
            builder
                .with_bandwidth_metrics(registry.sub_registry_with_prefix("libp2p"))
                .with_behaviour(move |_| behaviour)
                .map_err(|e| Error::Transport(e.to_string()))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
                .build()
        }
        None => builder
            .with_behaviour(move |_| behaviour)
            .map_err(|e| Error::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
            .build(),
    };
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_certificate_is_a_cbor_byte_string() {
        // A byte string keeps a certificate at its own size on the wire, within the
        // codec's cap; serde's default integer array would nearly double it.
        let hello = Hello {
            certificate: vec![0xab; 300],
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&hello, &mut buf).unwrap();
        assert!(buf.len() < 330, "encoded {} bytes", buf.len());
        let back: Hello = ciborium::from_reader(buf.as_slice()).unwrap();
        assert_eq!(back.certificate, hello.certificate);
    }

    #[test]
    fn stream_kinds_use_distinct_protocols() {
        assert_ne!(
            StreamKind::Sync.protocol(),
            StreamKind::Ephemeral.protocol()
        );
        assert_eq!(SYNC_PROTOCOL.as_ref(), "/hearth/sync/1");
        assert_eq!(HELLO_PROTOCOL.as_ref(), "/hearth/hello/1");
        assert_eq!(StreamKind::ALL.map(StreamKind::index), [0, 1]);
    }
}
