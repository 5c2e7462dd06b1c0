//! hearth-net: Hearth's network layer.
//!
//! One event loop owns the libp2p swarm: TCP (QUIC with the `quic` feature), Noise, Yamux,
//! mDNS, identify, ping and connection limits, plus four Hearth protocols:
//!
//! - `/hearth/hello/1`: every new session starts by swapping certificates (opaque bytes to
//!   this crate; empty for a device that is still joining). The node then
//!   [admits](Handle::admit) or [rejects](Handle::reject) the peer; a peer not admitted
//!   within [`Config::hello_timeout`] is disconnected (within the shorter
//!   [`Config::hello_timeout_no_cert`] while it has presented no certificate), and until
//!   then it can use nothing but the hello exchange and pairing.
//! - `/hearth/pair/1`: request-response rounds of opaque bytes (at most
//!   [`MAX_PAIR_MESSAGE_SIZE`]) for the pairing exchange, open before admission. The
//!   joiner calls [`Handle::pair_request`] (dialling first if needed) once per round; the
//!   issuer gets [`Event::PairRequest`] and answers with [`Handle::pair_respond`]. Each
//!   pairing message pushes a non-admitted peer's hello deadline out by another
//!   `hello_timeout`, never past [`Config::pairing_max_duration`] after it connected.
//!   Requests are rate limited per peer ([`PAIR_RATE_BURST`], then one per
//!   [`PAIR_RATE_INTERVAL`]) and at most [`MAX_PAIRING_PEERS`] pair at once; refusals come
//!   back as [`Error::PairRefused`] without reaching the node, and unreadable or
//!   oversized requests have their stream closed.
//! - `/hearth/sync/1`: one long-lived stream per admitted peer carrying length-prefixed
//!   frames (u32 big-endian length, then the bytes; at most [`MAX_FRAME_SIZE`]). Only the
//!   peer with the smaller PeerId opens it, so there is exactly one.
//! - `/hearth/ephemeral/1`: the same framing on a second stream, for short-lived messages.
//!
//! What a stranger or a misbehaving member can take is bounded: inbound connections per
//! remote IP address ([`Config::max_connections_per_ip`]) and from unknown peers
//! ([`Config::max_unknown_inbound`]), with static peers, peers admitted before and peers
//! named by [`Handle::reserve_peer`] kept clear of the second cap so the home's own
//! devices always get in; the time one frame may take to arrive
//! ([`Config::frame_read_timeout`]); the received bytes one peer may have waiting for the
//! node ([`Config::max_inbound_bytes_per_peer`], out of [`INBOUND_BUFFER_BYTES`] for all);
//! and the log lines unadmitted peers can cause ([`UNADMITTED_LOG_BURST`] per
//! [`UNADMITTED_LOG_INTERVAL`]).
//!
//! [`new`] returns a [`Handle`] (cheap to clone; commands with oneshot replies over a
//! bounded channel), an [`EventStream`] and the [`EventLoop`] to spawn:
//!
//! ```no_run
//! # async fn demo() -> Result<(), hearth_net::Error> {
//! use hearth_net::{Config, Event, PeerClass};
//! use tokio_util::sync::CancellationToken;
//!
//! let config = Config {
//!     listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
//!     mdns: false,
//!     ..Config::default()
//! };
//! let (handle, mut events, event_loop) = hearth_net::new(config)?;
//! let cancel = CancellationToken::new();
//! tokio::spawn(event_loop.run(cancel.clone()));
//! while let Some(event) = events.recv().await {
//!     match event {
//!         // Check the certificate here; admit opens the sync stream.
//!         Event::Hello { peer, .. } => {
//!             handle.admit(peer, PeerClass::Own).await?;
//!         }
//!         Event::Frame { peer, bytes, .. } => {
//!             let _ = handle.send(peer, bytes).await?; // echo
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A process without a running node (`hearth join`) pairs through a temporary network of
//! its own: no listen address, mDNS off, no certificate.
//!
//! ```no_run
//! # async fn demo(issuer: hearth_net::PeerId, addr: hearth_net::Multiaddr)
//! # -> Result<(), hearth_net::Error> {
//! use tokio_util::sync::CancellationToken;
//!
//! let config = hearth_net::Config {
//!     listen: Vec::new(),
//!     mdns: false,
//!     ..hearth_net::Config::default()
//! };
//! let (handle, _events, event_loop) = hearth_net::new(config)?;
//! let cancel = CancellationToken::new();
//! let task = tokio::spawn(event_loop.run(cancel.clone()));
//! // The first round dials the issuer's address from the invite code ...
//! let reply = handle.pair_request(issuer, Some(addr), b"round 1".to_vec()).await?;
//! // ... and later rounds reuse the connection.
//! let grant = handle.pair_request(issuer, None, reply).await?;
//! # let _ = grant;
//! cancel.cancel();
//! let _ = task.await;
//! # Ok(()) }
//! ```
//!
//! Dialing is built so that two nodes always end with exactly one connection: static
//! peers are redialled with exponential backoff from a fresh source port, only the smaller
//! PeerId dials an mDNS-discovered peer, and duplicate connections are closed by a rule
//! both ends evaluate identically. Every channel and queue is bounded; a peer whose
//! outbound queue fills is dropped rather than allowed to grow memory.
//!
//! The [`DeviceIdentity`] (the Ed25519 keypair behind the PeerId) also lives here.

mod behaviour;
mod config;
mod dial;
mod error;
mod event;
mod event_loop;
mod frame;
mod guard;
mod handle;
mod identity;
mod log_limit;
mod pair;
mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

pub use behaviour::{EPHEMERAL_PROTOCOL, HELLO_PROTOCOL, SYNC_PROTOCOL};
pub use bytes::Bytes;
pub use config::{
    Config, DEFAULT_FRAME_READ_TIMEOUT, DEFAULT_HELLO_TIMEOUT_NO_CERT,
    DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MAX_INBOUND_BYTES_PER_PEER,
    DEFAULT_MAX_UNKNOWN_INBOUND, DEFAULT_PORT, MAX_CERTIFICATE_SIZE, MAX_STATIC_PEERS,
    SharedRegistry,
};
pub use dial::MAX_DISCOVERED_PEERS;
pub use error::{Error, IdentityError};
pub use event::{
    DisconnectReason, Event, EventStream, KnownPeer, Metrics, PeerClass, PeerInfo, SendOutcome,
};
pub use event_loop::EventLoop;
pub use guard::MAX_RESERVED_PEERS;
pub use handle::Handle;
pub use identity::DeviceIdentity;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use log_limit::{UNADMITTED_LOG_BURST, UNADMITTED_LOG_INTERVAL};
pub use pair::{
    MAX_PAIR_MESSAGE_SIZE, MAX_PAIRING_PEERS, PAIR_CONNECT_TIMEOUT, PAIR_PROTOCOL, PAIR_RATE_BURST,
    PAIR_RATE_INTERVAL, PAIR_REQUEST_TIMEOUT, PairRequestId,
};
pub use stream::{
    EPHEMERAL_QUEUE_BYTES, EPHEMERAL_QUEUE_FRAMES, INBOUND_BUFFER_BYTES, MAX_EPHEMERAL_FRAME_SIZE,
    MAX_FRAME_SIZE, SYNC_QUEUE_BYTES, SYNC_QUEUE_FRAMES,
};

use behaviour::StreamKind;
use event_loop::{CONTROL_EVENT_CAPACITY, FRAME_EVENT_CAPACITY, Parts};
use handle::{COMMAND_CAPACITY, Shared};

/// Builds the network: binds the listen addresses and returns the handle, the event
/// stream and the event loop, which must be spawned (see [`EventLoop::run`]).
///
/// Must be called from within a Tokio runtime, because binding sockets registers them
/// with its reactor.
pub fn new(config: Config) -> Result<(Handle, EventStream, EventLoop), Error> {
    let statics = config.validate()?;
    let shared = Arc::new(Shared::default());
    let mut swarm = behaviour::build_swarm(&config, shared.counters.clone())?;
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    }
    let mut stream_control = swarm.behaviour().streams.new_control();
    let mut incoming = Vec::new();
    for kind in StreamKind::ALL {
        // The behaviour was built just above, so nothing can have registered these yet.
        let streams = stream_control
            .accept(kind.protocol())
            .map_err(|e| Error::Transport(format!("{}: {e}", kind.protocol())))?;
        incoming.push((kind, streams));
    }

    let (command_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_EVENT_CAPACITY);
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_EVENT_CAPACITY);
    let budget = Arc::new(Semaphore::new(INBOUND_BUFFER_BYTES));
    let local = config.identity.to_peer_id();

    let handle = Handle::new(local, command_tx, shared.clone());
    let events = EventStream::new(control_rx, frames_rx, budget.clone());
    let event_loop = EventLoop::new(Parts {
        swarm,
        config,
        statics,
        commands,
        control_tx,
        frames_tx,
        budget,
        shared,
        stream_control,
        incoming,
    });
    Ok((handle, events, event_loop))
}
