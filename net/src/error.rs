//! The crate's single error type.

use std::io;

use libp2p::{Multiaddr, PeerId};

/// Everything that can go wrong in hearth-net.
///
/// Outcomes a caller should expect in normal operation (a peer that is not connected, a
/// slow peer that was dropped) are not errors: they come back as values such as
/// [`crate::SendOutcome`] or `bool`. This enum is for misuse, bad input and shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Stored identity bytes are not a protobuf-encoded Ed25519 keypair.
    #[error("stored device identity is not a valid Ed25519 keypair: {0}")]
    IdentityDecode(String),

    /// A [`crate::Config`] field is out of range.
    #[error("invalid network config: {0}")]
    Config(String),

    /// The libp2p transport stack could not be assembled.
    #[error("cannot build the network transport: {0}")]
    Transport(String),

    /// Binding a listen address failed (port in use, unsupported protocol, ...).
    #[error("cannot listen on {addr}: {reason}; pick another address or free the port")]
    Listen {
        /// The address that was refused.
        addr: Multiaddr,
        /// Why the transport refused it.
        reason: String,
    },

    /// mDNS could not start, usually because the multicast socket could not be bound.
    #[error("cannot start mDNS discovery: {0}; run with mDNS off if this host has no multicast")]
    Mdns(#[source] io::Error),

    /// A static peer address lacks the `/p2p/<peer id>` suffix that names whom to expect.
    #[error("address {addr} has no /p2p/<peer id> suffix; static peers must name their PeerId")]
    MissingPeerId {
        /// The address as given.
        addr: Multiaddr,
    },

    /// A dial failed or could not be started.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address that was dialled.
        addr: Multiaddr,
        /// The transport's or the swarm's explanation.
        reason: String,
    },

    /// A frame is larger than the protocol allows; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Length announced or offered.
        len: usize,
        /// The limit for this protocol.
        max: usize,
    },

    /// The stream ended in the middle of a frame.
    #[error("truncated frame: expected {expected} bytes, the stream ended after {received}")]
    TruncatedFrame {
        /// Bytes the frame (or its header) should have had.
        expected: usize,
        /// Bytes that actually arrived.
        received: usize,
    },

    /// Reading or writing a stream failed.
    #[error("stream i/o failed: {0}")]
    Io(#[from] io::Error),

    /// A bounded table is full.
    #[error("too many {what} (limit {limit})")]
    Capacity {
        /// What ran out of room.
        what: &'static str,
        /// The named limit that was hit.
        limit: usize,
    },

    /// A request needs a connection to `peer`, there is none, and no address was given
    /// to dial.
    #[error("peer {peer} is not connected and no address to dial it was given")]
    NotConnected {
        /// The peer asked for.
        peer: PeerId,
    },

    /// The peer's network layer turned a pairing request away (rate limit, too many
    /// pairing peers); the request never reached its node. Retrying later may work.
    #[error("peer {peer} refused the pairing request: {reason}")]
    PairRefused {
        /// The peer that refused.
        peer: PeerId,
        /// Its stated reason, cut to a bounded printable string.
        reason: String,
    },

    /// A pairing request got no answer: the connection could not be made or closed, the
    /// peer does not speak `/hearth/pair/1`, or the time limit passed. The peer may or may
    /// not have seen the request.
    #[error("pairing request to {peer} failed: {reason}")]
    PairFailed {
        /// The peer asked.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },

    /// The network event loop has stopped, so the command could not run.
    #[error("the network event loop has stopped")]
    Shutdown,
}

/// The error [`crate::DeviceIdentity::from_bytes`] returns.
///
/// An alias kept so callers written against the identity module's own error keep
/// compiling; it is the crate's one error enum.
pub type IdentityError = Error;
