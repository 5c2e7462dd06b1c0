//! The two framed streams of each admitted peer, sync and ephemeral: which side opens
//! them, parking inbound ones until admission, handing the peer's queue and its share of
//! the inbound byte budget to a stream task (which reads frames under the read timeout
//! and writes the queue), reopening after failures, and dropping a peer whose queue
//! overflowed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::PeerId;
use libp2p::swarm::ConnectionId;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error_span, warn};

use super::{Admission, EventLoop, Internal};
use crate::behaviour::StreamKind;
use crate::dial::{Backoff, is_smaller};
use crate::event::{DisconnectReason, Event, bump};
use crate::stream::{self, OutboxRx, StreamEnd, StreamTask};

/// Retry delays for reopening a failed sync or ephemeral stream.
const STREAM_REOPEN_BASE: Duration = Duration::from_millis(50);
const STREAM_REOPEN_MAX: Duration = Duration::from_secs(5);

/// A stream that lived at least this long counts as healthy, resetting its backoff.
const STREAM_STABLE: Duration = Duration::from_secs(1);

pub(super) enum ChannelState {
    Idle,
    /// An open task is running; it was started when `conn` was the only connection and
    /// the peer's connection epoch was `epoch`.
    Opening {
        epoch: u64,
        conn: ConnectionId,
    },
    Active {
        cancel: CancellationToken,
        drain: CancellationToken,
        since: Instant,
        /// The connection the stream runs on, when this side opened it and so knows.
        conn: Option<ConnectionId>,
    },
}

/// One framed stream (sync or ephemeral) of one peer.
pub(super) struct Channel {
    pub(super) state: ChannelState,
    /// Bumped for every open attempt and started stream, so late reports are ignored.
    generation: u64,
    /// Streams started this session.
    pub(super) streams: u64,
    /// The queue's receiving side while no task holds it.
    pub(super) outbox: Option<OutboxRx>,
    /// An inbound stream waiting for admission or for the previous task to hand back
    /// the queue. Never read while parked.
    parked: Option<libp2p::Stream>,
    reopen: Backoff,
    next_open: Instant,
}

impl Channel {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            state: ChannelState::Idle,
            generation: 0,
            streams: 0,
            outbox: None,
            parked: None,
            reopen: Backoff::new(STREAM_REOPEN_BASE, STREAM_REOPEN_MAX),
            next_open: now,
        }
    }

    /// Cuts the stream off at once; for sessions that are ending anyway.
    pub(super) fn cancel(&mut self) {
        if let ChannelState::Active { cancel, .. } = &self.state {
            cancel.cancel();
        }
        self.parked = None;
    }

    /// The connection this side's open stream runs on, if known.
    pub(super) fn conn(&self) -> Option<ConnectionId> {
        match &self.state {
            ChannelState::Active { conn, .. } => *conn,
            _ => None,
        }
    }
}

impl EventLoop {
    /// Takes an open task's result: starts the stream on it, or schedules another try.
    pub(super) fn on_stream_opened(
        &mut self,
        peer: PeerId,
        session: u64,
        kind: StreamKind,
        generation: u64,
        result: Result<libp2p::Stream, String>,
    ) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let conn_epoch = state.conn_epoch;
        let single = state.conns.len() == 1;
        let channel = &mut state.channels[kind.index()];
        let ChannelState::Opening { epoch, conn } = channel.state else {
            return;
        };
        if state.session != session || channel.generation != generation {
            return;
        }
        channel.state = ChannelState::Idle;
        match result {
            Ok(stream) if epoch != conn_epoch || !single => {
                // A connection appeared while opening, so the stream may be on a
                // duplicate about to be closed. Nothing was written on it yet:
                // dropping it loses nothing, and the retry waits for one connection.
                debug!(%peer, stream = kind.name(), "connections changed while opening; reopening");
                drop(stream);
            }
            Ok(stream) => {
                bump(&self.counters.streams_opened, 1);
                self.start_stream(peer, kind, stream, Some(conn));
            }
            Err(reason) => {
                let wait = channel.reopen.fail();
                channel.next_open = Instant::now() + wait;
                debug!(%peer, stream = kind.name(), %reason, retry_in = ?wait, "stream open failed");
            }
        }
    }

    /// Decides what to do with a stream the peer opened: refuse (drop, which closes it),
    /// or park it until the peer is admitted and the channel is free.
    pub(super) fn on_inbound_stream(
        &mut self,
        peer: PeerId,
        kind: StreamKind,
        stream: libp2p::Stream,
    ) {
        let refuse = |why: &str| {
            debug!(%peer, stream = kind.name(), why, "refusing inbound stream");
        };
        let local_opens = is_smaller(&self.local, &peer);
        let Some(state) = self.peers.get_mut(&peer) else {
            refuse("peer not connected");
            bump(&self.counters.streams_refused, 1);
            return;
        };
        if state.closing.is_some() || state.admission == Admission::Rejected {
            refuse("peer is being disconnected");
            bump(&self.counters.streams_refused, 1);
            return;
        }
        if local_opens {
            // Only the smaller PeerId opens, so there is one stream per peer and kind.
            bump(&self.counters.streams_refused, 1);
            if self.stranger_log() {
                warn!(%peer, stream = kind.name(), "peer opened a stream it should have accepted; refusing");
            }
            return;
        }
        let channel = &mut state.channels[kind.index()];
        // The newest stream wins: the opener only opens again once its previous stream
        // is finished on its side, so the old one is retired gracefully (its last frames
        // still delivered) and the new one takes over the queue. A stream from an
        // un-admitted peer waits here unread.
        channel.parked = Some(stream);
        if let ChannelState::Active { drain, .. } = &channel.state {
            drain.cancel();
        }
        self.drive_channel(peer, kind);
    }

    /// Takes the queue back from a finished stream task and decides what comes next:
    /// disconnect on garbage, reopen (as the opener) after a failure, or nothing.
    pub(super) fn on_stream_ended(
        &mut self,
        peer: PeerId,
        session: u64,
        kind: StreamKind,
        generation: u64,
        outbox: OutboxRx,
        end: StreamEnd,
    ) {
        let local_opens = is_smaller(&self.local, &peer);
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.session != session {
            return;
        }
        let channel = &mut state.channels[kind.index()];
        channel.outbox = Some(outbox);
        let mut lived = Duration::ZERO;
        if channel.generation == generation {
            if let ChannelState::Active { since, .. } = &channel.state {
                lived = since.elapsed();
            }
            channel.state = ChannelState::Idle;
        }
        match end {
            StreamEnd::Malformed(reason) => {
                if self.stranger_log() {
                    warn!(%peer, stream = kind.name(), %reason, "closing stream: malformed frame");
                }
                self.disconnect(peer, DisconnectReason::MalformedFrame(reason));
                return;
            }
            StreamEnd::ReadTimeout(limit) => {
                let reason = format!("frame not complete within {limit:?} of its header");
                if self.stranger_log() {
                    warn!(%peer, stream = kind.name(), %reason, "closing stream: frame too slow");
                }
                self.disconnect(peer, DisconnectReason::MalformedFrame(reason));
                return;
            }
            StreamEnd::Cancelled
            | StreamEnd::Drained
            | StreamEnd::OutboxClosed
            | StreamEnd::EventsClosed => {
                debug!(%peer, stream = kind.name(), ?end, "stream ended");
            }
            StreamEnd::RemoteClosed | StreamEnd::Io(_) => {
                let reason = match &end {
                    StreamEnd::Io(reason) => reason.as_str(),
                    _ => "closed by peer",
                };
                debug!(%peer, stream = kind.name(), reason, ?lived, "stream ended");
                if local_opens {
                    if lived >= STREAM_STABLE {
                        channel.reopen.reset();
                    }
                    let wait = channel.reopen.fail();
                    channel.next_open = Instant::now() + wait;
                }
            }
        }
        self.drive_channel(peer, kind);
    }

    /// Moves one channel forward: start a parked stream, or (as the opener) open one.
    pub(super) fn drive_channel(&mut self, peer: PeerId, kind: StreamKind) {
        let local_opens = is_smaller(&self.local, &peer);
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if !matches!(state.admission, Admission::Admitted(_)) || state.closing.is_some() {
            return;
        }
        let single_connection = state.conns.len() == 1;
        let session = state.session;
        let channel = &mut state.channels[kind.index()];
        if !matches!(channel.state, ChannelState::Idle) || channel.outbox.is_none() {
            return;
        }
        if let Some(stream) = channel.parked.take() {
            bump(&self.counters.streams_accepted, 1);
            self.start_stream(peer, kind, stream, None);
            return;
        }
        // Wait for duplicates to close first: libp2p-stream picks a random connection,
        // and a stream on the one being closed would die at once.
        if !local_opens || !single_connection || channel.next_open > Instant::now() {
            return;
        }
        let Some(conn) = state.conns.keys().next().copied() else {
            return;
        };
        channel.generation += 1;
        channel.state = ChannelState::Opening {
            epoch: state.conn_epoch,
            conn,
        };
        let generation = channel.generation;
        let control = self.stream_control.clone();
        let internal = self.internal_tx.clone();
        let stop = self.tasks_cancel.clone();
        let span = error_span!("net", %peer, open = kind.name());
        self.tasks.spawn(
            async move {
                let result = tokio::select! {
                    () = stop.cancelled() => return,
                    result = stream::open(control, peer, kind) => result,
                };
                let report = Internal::Opened {
                    peer,
                    session,
                    kind,
                    generation,
                    result,
                };
                let _ = internal.send(report).await;
            }
            .instrument(span),
        );
    }

    /// Hands a negotiated stream and the peer's queue to a new stream task. Each task
    /// gets its own cancellation token, a child of the loop's, so one stream can be cut
    /// without touching the others and shutdown still reaches all of them.
    fn start_stream(
        &mut self,
        peer: PeerId,
        kind: StreamKind,
        stream: libp2p::Stream,
        conn: Option<ConnectionId>,
    ) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        // Streams start only for admitted peers; anything else gets no stream task.
        let Admission::Admitted(class) = state.admission.clone() else {
            return;
        };
        let session = state.session;
        let channel = &mut state.channels[kind.index()];
        let Some(outbox) = channel.outbox.take() else {
            return;
        };
        channel.generation += 1;
        channel.streams += 1;
        let generation = channel.generation;
        let cancel = self.tasks_cancel.child_token();
        let drain = CancellationToken::new();
        channel.state = ChannelState::Active {
            cancel: cancel.clone(),
            drain: drain.clone(),
            since: Instant::now(),
            conn,
        };
        debug!(%peer, stream = kind.name(), n = channel.streams, "stream up");
        let per_peer = self.max_inbound_bytes_per_peer;
        let peer_budget = self
            .peer_budgets
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(per_peer)))
            .clone();
        let task = StreamTask {
            peer,
            class,
            kind,
            stream,
            outbox,
            frames: self.frames_tx.clone(),
            budget: self.budget.clone(),
            peer_budget,
            read_timeout: self.frame_read_timeout,
            counters: self.counters.clone(),
            cancel,
            drain,
        };
        let internal = self.internal_tx.clone();
        let span = error_span!("net", %peer, stream = kind.name());
        self.tasks.spawn(
            async move {
                let (outbox, end) = task.run().await;
                let report = Internal::Ended {
                    peer,
                    session,
                    kind,
                    generation,
                    outbox,
                    end,
                };
                let _ = internal.send(report).await;
            }
            .instrument(span),
        );
    }

    /// Drops a peer whose outbound queue filled, as a handle reported.
    pub(super) fn on_slow_peer(
        &mut self,
        peer: PeerId,
        session: u64,
        queued_frames: usize,
        queued_bytes: usize,
    ) {
        // The report may be stale: the handle saw the queue full, but the peer may
        // have been dropped and even reconnected since. Only the session whose
        // queue overflowed is cut.
        let current = self
            .peers
            .get(&peer)
            .is_some_and(|s| s.session == session && s.closing.is_none());
        if current {
            bump(&self.counters.slow_peers_dropped, 1);
            warn!(%peer, queued_frames, queued_bytes, "outbound queue full; dropping slow peer");
            self.emit(Event::SlowPeerDropped {
                peer,
                queued_frames,
                queued_bytes,
            });
            self.disconnect(peer, DisconnectReason::SlowPeer);
        }
    }

    /// Drops a peer's share of the inbound budget once the peer is gone and every frame
    /// it sent was consumed.
    pub(super) fn prune_peer_budgets(&mut self) {
        let per_peer = self.max_inbound_bytes_per_peer;
        self.peer_budgets.retain(|peer, share| {
            self.peers.contains_key(peer) || share.available_permits() < per_peer
        });
    }
}

/// Hands inbound streams to the loop as fast as they come: libp2p-stream drops an inbound
/// stream when its (one-slot) channel is full, so this task does nothing else.
pub(super) async fn accept_loop(
    mut incoming: libp2p_stream::IncomingStreams,
    kind: StreamKind,
    internal: mpsc::Sender<Internal>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = incoming.next() => next,
        };
        let Some((peer, stream)) = next else {
            return;
        };
        if internal
            .send(Internal::Inbound { peer, kind, stream })
            .await
            .is_err()
        {
            return;
        }
    }
}
