//! What the network reports to the node, and the stream that carries it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Semaphore, mpsc};

use crate::PairRequestId;

/// Something the network layer observed. Read them from the [`EventStream`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The node listens on a new address.
    ListenAddr {
        /// The bound address, without the `/p2p/` suffix.
        addr: Multiaddr,
    },
    /// A listen address went away (interface down, listener closed).
    ListenAddrExpired {
        /// The address no longer served.
        addr: Multiaddr,
    },
    /// The first connection to a peer came up. The peer is not admitted yet: expect a
    /// [`Event::Hello`], then call [`crate::Handle::admit`] or [`crate::Handle::reject`].
    PeerConnected {
        /// The remote peer.
        peer: PeerId,
        /// The remote address of that connection.
        addr: Multiaddr,
        /// True when this node dialled.
        outbound: bool,
    },
    /// The peer's certificate arrived through `/hearth/hello/1`. Once per connection
    /// session; the bytes are exactly what the peer sent, unverified.
    Hello {
        /// The remote peer.
        peer: PeerId,
        /// The peer's certificate, at most [`crate::MAX_CERTIFICATE_SIZE`] bytes.
        certificate: Vec<u8>,
    },
    /// A frame arrived from an admitted peer on `/hearth/sync/1`.
    Frame {
        /// The sender.
        peer: PeerId,
        /// What the sender was admitted as when the frame arrived. A frame may still be
        /// queued when its sender's disconnection is reported (lifecycle events overtake
        /// frames), so the node checks the frame against this tag, not against whatever
        /// it thinks of the peer by the time it reads the frame.
        class: PeerClass,
        /// The frame payload, without its length prefix.
        bytes: Bytes,
    },
    /// A frame arrived from an admitted peer on `/hearth/ephemeral/1`.
    EphemeralFrame {
        /// The sender.
        peer: PeerId,
        /// What the sender was admitted as when the frame arrived.
        class: PeerClass,
        /// The frame payload, without its length prefix.
        bytes: Bytes,
    },
    /// A peer sent a pairing message on `/hearth/pair/1`. Admitted and non-admitted
    /// peers alike; answer with [`crate::Handle::pair_respond`] within
    /// [`crate::PAIR_REQUEST_TIMEOUT`]. While a non-admitted peer keeps pairing its
    /// admission deadline is extended (up to [`crate::Config::pairing_max_duration`]).
    PairRequest {
        /// The sender, as proven by the Noise handshake.
        peer: PeerId,
        /// What to answer with.
        request_id: PairRequestId,
        /// The message, at most [`crate::MAX_PAIR_MESSAGE_SIZE`] bytes, unverified.
        bytes: Vec<u8>,
    },
    /// A peer's outbound sync queue filled up, so it was disconnected instead of letting
    /// memory grow. A [`Event::PeerDisconnected`] with [`DisconnectReason::SlowPeer`]
    /// follows.
    SlowPeerDropped {
        /// The peer that was not keeping up.
        peer: PeerId,
        /// Frames waiting in its queue when it was dropped.
        queued_frames: usize,
        /// Bytes waiting in its queue when it was dropped.
        queued_bytes: usize,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The remote peer.
        peer: PeerId,
        /// Why this node, or the link, ended the session.
        reason: DisconnectReason,
    },
    /// mDNS reported a peer on the LAN. An address hint only: nothing about the peer is
    /// verified until its hello.
    Discovered {
        /// The announced PeerId.
        peer: PeerId,
        /// The announced addresses (capped).
        addrs: Vec<Multiaddr>,
    },
}

/// What the node admitted a peer as ([`crate::Handle::admit`]). Every frame from the peer
/// carries the class it was admitted with, so the node can authorise the frame by what
/// the sender was when it sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerClass {
    /// A device of the node's own home.
    Own,
    /// A device of another home the node knows; the text names that home (the node's
    /// choice, e.g. its HomeId).
    Paired(Arc<str>),
}

/// Why a peer's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The remote closed, the link failed, or this node shut down.
    ConnectionClosed,
    /// Pings went unanswered, so the connection was declared dead.
    PingTimeout,
    /// The node did not admit the peer within [`crate::Config::hello_timeout`] (or, for
    /// a peer that was pairing, within its extended deadline).
    HelloTimeout,
    /// The node rejected the peer, with its reason.
    Rejected(String),
    /// The peer's outbound queue overflowed.
    SlowPeer,
    /// The peer sent a frame this node cannot parse; the text says what was wrong.
    MalformedFrame(String),
    /// The node asked for the disconnection ([`crate::Handle::disconnect`]).
    Requested,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectionClosed => f.write_str("connection closed"),
            Self::PingTimeout => f.write_str("ping timeout"),
            Self::HelloTimeout => f.write_str("not admitted before the hello timeout"),
            Self::Rejected(reason) => write!(f, "rejected: {reason}"),
            Self::SlowPeer => f.write_str("outbound queue full"),
            Self::MalformedFrame(reason) => write!(f, "malformed frame: {reason}"),
            Self::Requested => f.write_str("disconnect requested"),
        }
    }
}

/// The result of [`crate::Handle::send`] and [`crate::Handle::send_ephemeral`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a frame may not have been queued"]
#[non_exhaustive]
pub enum SendOutcome {
    /// The frame is in the peer's outbound queue. It is delivered unless the connection
    /// drops first; frames to one peer arrive in the order they were queued.
    Queued,
    /// The peer is not connected, or not admitted yet; nothing was queued.
    NotReady,
    /// The sync queue was full: the peer is being disconnected as too slow, and an
    /// [`Event::SlowPeerDropped`] is on its way.
    SlowPeerDropped,
    /// The ephemeral queue was full and this message was discarded; the peer stays.
    /// Ephemeral messages are short-lived, so losing one beats dropping the peer.
    Shed,
}

/// A snapshot of one connected peer, from [`crate::Handle::connected_peers`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The remote peer.
    pub peer: PeerId,
    /// Remote address of each open connection.
    pub addrs: Vec<Multiaddr>,
    /// Open connections; 1 once duplicates are closed.
    pub connections: usize,
    /// Whether the node admitted this peer.
    pub admitted: bool,
    /// Whether this peer is in the static peer list.
    pub is_static: bool,
    /// Whether the peer's certificate arrived.
    pub hello_received: bool,
    /// Whether a pairing exchange with the peer is under way (a pairing message went
    /// either way within the last [`crate::PAIR_REQUEST_TIMEOUT`]).
    pub pairing: bool,
    /// Whether the long-lived sync stream is up.
    pub sync_stream_open: bool,
    /// Sync streams set up with this peer during the current session; 1 means the same
    /// stream has carried everything.
    pub sync_streams: u64,
    /// Frames waiting in the outbound sync queue.
    pub queued_frames: usize,
    /// Bytes waiting in the outbound sync queue.
    pub queued_bytes: usize,
    /// How long ago the session started.
    pub connected_for: Duration,
}

/// A peer the node knows of but is not connected to; see [`crate::Handle::known_peers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KnownPeer {
    /// The peer.
    pub peer: PeerId,
    /// Where it was last said to be: its static address, or what mDNS reported.
    pub addrs: Vec<Multiaddr>,
    /// Whether it is in the static peer list (so it is being redialled).
    pub is_static: bool,
    /// Whether mDNS reported it.
    pub discovered: bool,
}

/// Counters since the event loop started; read them with [`crate::Handle::metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Frames written to peers (sync and ephemeral).
    pub frames_sent: u64,
    /// Frames read from peers (sync and ephemeral).
    pub frames_received: u64,
    /// Payload bytes read from peers.
    pub bytes_received: u64,
    /// Streams this node opened.
    pub streams_opened: u64,
    /// Streams peers opened that this node accepted.
    pub streams_accepted: u64,
    /// Inbound streams refused (peer not admitted, rejected, or breaking the opener rule).
    pub streams_refused: u64,
    /// Streams closed because a frame was oversized or truncated.
    pub malformed_frames: u64,
    /// Peers dropped for a full outbound queue.
    pub slow_peers_dropped: u64,
    /// Ephemeral messages discarded because their queue was full.
    pub ephemeral_shed: u64,
    /// Duplicate connections closed.
    pub duplicate_connections_closed: u64,
    /// Dials started.
    pub dials: u64,
    /// Dials that failed.
    pub dial_failures: u64,
    /// Peers disconnected for missing the hello timeout.
    pub hello_timeouts: u64,
    /// Events discarded because the consumer stopped reading for too long.
    pub events_dropped: u64,
    /// Pairing requests handed to the node as [`Event::PairRequest`].
    pub pair_requests_received: u64,
    /// Pairing requests refused before reaching the node (rate limit, capacity).
    pub pair_requests_refused: u64,
    /// Pairing requests that could not be read (undecodable, over the size cap, or cut
    /// off); their streams were closed without an answer.
    pub pair_requests_malformed: u64,
    /// Inbound connections refused because their remote IP address already had
    /// [`crate::Config::max_connections_per_ip`].
    pub connections_refused_per_ip: u64,
    /// Inbound connections from unknown peers refused because
    /// [`crate::Config::max_unknown_inbound`] were already connected.
    pub connections_refused_unknown: u64,
    /// Peers disconnected because a frame did not arrive whole within
    /// [`crate::Config::frame_read_timeout`] (also counted in `malformed_frames`).
    pub frame_read_timeouts: u64,
    /// Log lines about unadmitted peers held back by the log rate limit (see
    /// [`crate::UNADMITTED_LOG_BURST`]).
    pub log_lines_suppressed: u64,
    /// Frames a peer announced as larger than the stream's cap ([`crate::MAX_FRAME_SIZE`]
    /// on the sync stream); their streams were closed (also counted in
    /// `malformed_frames`).
    pub oversized_frames: u64,
}

/// The atomics behind [`Metrics`], shared by the event loop, the stream tasks and handles.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) streams_opened: AtomicU64,
    pub(crate) streams_accepted: AtomicU64,
    pub(crate) streams_refused: AtomicU64,
    pub(crate) malformed_frames: AtomicU64,
    pub(crate) slow_peers_dropped: AtomicU64,
    pub(crate) ephemeral_shed: AtomicU64,
    pub(crate) duplicate_connections_closed: AtomicU64,
    pub(crate) dials: AtomicU64,
    pub(crate) dial_failures: AtomicU64,
    pub(crate) hello_timeouts: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) pair_requests_received: AtomicU64,
    pub(crate) pair_requests_refused: AtomicU64,
    pub(crate) pair_requests_malformed: AtomicU64,
    pub(crate) connections_refused_per_ip: AtomicU64,
    pub(crate) connections_refused_unknown: AtomicU64,
    pub(crate) frame_read_timeouts: AtomicU64,
    pub(crate) log_lines_suppressed: AtomicU64,
    pub(crate) oversized_frames: AtomicU64,
}

/// Bumps a counter; relaxed ordering is enough because counters order nothing.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Metrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            frames_sent: get(&self.frames_sent),
            frames_received: get(&self.frames_received),
            bytes_received: get(&self.bytes_received),
            streams_opened: get(&self.streams_opened),
            streams_accepted: get(&self.streams_accepted),
            streams_refused: get(&self.streams_refused),
            malformed_frames: get(&self.malformed_frames),
            slow_peers_dropped: get(&self.slow_peers_dropped),
            ephemeral_shed: get(&self.ephemeral_shed),
            duplicate_connections_closed: get(&self.duplicate_connections_closed),
            dials: get(&self.dials),
            dial_failures: get(&self.dial_failures),
            hello_timeouts: get(&self.hello_timeouts),
            events_dropped: get(&self.events_dropped),
            pair_requests_received: get(&self.pair_requests_received),
            pair_requests_refused: get(&self.pair_requests_refused),
            pair_requests_malformed: get(&self.pair_requests_malformed),
            connections_refused_per_ip: get(&self.connections_refused_per_ip),
            connections_refused_unknown: get(&self.connections_refused_unknown),
            frame_read_timeouts: get(&self.frame_read_timeouts),
            log_lines_suppressed: get(&self.log_lines_suppressed),
            oversized_frames: get(&self.oversized_frames),
        }
    }
}

/// A received frame on its way to the [`EventStream`], with the peer's share of the
/// inbound budget it holds; both are returned when the stream yields it.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) event: Event,
    pub(crate) peer_budget: Arc<Semaphore>,
}

/// The node-facing stream of [`Event`]s returned by [`crate::new`].
///
/// Lifecycle events (connections, hellos, disconnections) and frames travel on separate
/// bounded channels, so a flood of frames never delays a `Hello` the node must answer;
/// lifecycle events are yielded first when both are ready. Frames from one peer keep
/// their order. The stream ends after the event loop has stopped.
///
/// Received frame bytes count against a shared budget, and against the sending peer's
/// share of it ([`crate::Config::max_inbound_bytes_per_peer`]), until they are yielded
/// here; a consumer that stops reading therefore pushes back on the peers rather than
/// letting buffered frames grow without bound, and no one peer can fill the budget.
pub struct EventStream {
    control: mpsc::Receiver<Event>,
    frames: mpsc::Receiver<Delivery>,
    inbound_budget: Arc<Semaphore>,
    control_done: bool,
    frames_done: bool,
}

impl EventStream {
    pub(crate) fn new(
        control: mpsc::Receiver<Event>,
        frames: mpsc::Receiver<Delivery>,
        inbound_budget: Arc<Semaphore>,
    ) -> Self {
        Self {
            control,
            frames,
            inbound_budget,
            control_done: false,
            frames_done: false,
        }
    }

    /// Waits for the next event; `None` once the event loop has stopped.
    ///
    /// Cancel-safe: dropping the future before it completes loses no event.
    pub async fn recv(&mut self) -> Option<Event> {
        futures::StreamExt::next(self).await
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl futures::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = &mut *self;
        if !this.control_done {
            match this.control.poll_recv(cx) {
                Poll::Ready(Some(event)) => return Poll::Ready(Some(event)),
                Poll::Ready(None) => this.control_done = true,
                Poll::Pending => {}
            }
        }
        if !this.frames_done {
            match this.frames.poll_recv(cx) {
                Poll::Ready(Some(Delivery { event, peer_budget })) => {
                    if let Event::Frame { bytes, .. } | Event::EphemeralFrame { bytes, .. } = &event
                    {
                        // The reader took these permits before allocating the frame.
                        this.inbound_budget.add_permits(bytes.len());
                        peer_budget.add_permits(bytes.len());
                    }
                    return Poll::Ready(Some(event));
                }
                Poll::Ready(None) => this.frames_done = true,
                Poll::Pending => {}
            }
        }
        if this.control_done && this.frames_done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
