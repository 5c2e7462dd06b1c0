//! The one task that owns the swarm.
//!
//! It `select!`s over swarm events, handle commands, reports from stream tasks and a
//! maintenance tick. All per-peer state lives here, so no lock guards it; the stream tasks
//! own their streams and talk back only through a bounded channel.
//!
//! This file holds the loop and its dispatch; the handlers are `impl EventLoop` blocks in
//! the submodules, by concern: `connections` (sessions, dialing, the inbound limits'
//! refusals), `hello` (certificates and admission), `channels` (the sync and ephemeral
//! streams), `pairing` and `maintenance` (the tick, ping, identify, mDNS, log budget).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error_span, info, trace, warn};

use crate::Error;
use crate::behaviour::{Behaviour, BehaviourEvent, StreamKind};
use crate::config::check_certificate;
use crate::dial::DiscoveredTable;
use crate::event::{Counters, Delivery, DisconnectReason, Event, PeerInfo, bump};
use crate::handle::{Command, Shared};
use crate::log_limit::{LogLimiter, UNADMITTED_LOG_BURST, UNADMITTED_LOG_INTERVAL};
use crate::pair::{PairRequestId, RateTable};
use crate::stream::{OutboxRx, StreamEnd};

mod channels;
mod connections;
mod hello;
mod maintenance;
mod pairing;

use channels::{Channel, ChannelState, accept_loop};
use connections::{ConnInfo, StaticPeer};
use hello::Admission;
use maintenance::MAINTENANCE_TICK;
use pairing::{InboundPair, OutboundPair, WaitingPair};

/// Capacity of the lifecycle event channel to the node.
pub(crate) const CONTROL_EVENT_CAPACITY: usize = 1024;

/// Capacity, in frames, of the frame event channel to the node.
pub(crate) const FRAME_EVENT_CAPACITY: usize = 256;

/// Lifecycle events held by the loop while the node is not reading. The loop never waits
/// on the node (the node may be waiting on a command reply from the loop); past this
/// many, events are dropped and counted.
pub(crate) const EVENT_BACKLOG_CAPACITY: usize = 4096;

/// Capacity of the channel from stream, open and accept tasks back to the loop.
pub(crate) const INTERNAL_CAPACITY: usize = 256;

/// How long shutdown waits for stream tasks to wind down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Reports from spawned tasks.
pub(crate) enum Internal {
    Inbound {
        peer: PeerId,
        kind: StreamKind,
        stream: libp2p::Stream,
    },
    Opened {
        peer: PeerId,
        session: u64,
        kind: StreamKind,
        generation: u64,
        result: Result<libp2p::Stream, String>,
    },
    Ended {
        peer: PeerId,
        session: u64,
        kind: StreamKind,
        generation: u64,
        outbox: OutboxRx,
        end: StreamEnd,
    },
}

/// A connected peer: one session lasts from its first connection to its last.
struct PeerState {
    session: u64,
    started: Instant,
    conns: BTreeMap<ConnectionId, ConnInfo>,
    /// Bumped whenever a connection is established, so an open that raced a new
    /// connection can tell it may have landed on it.
    conn_epoch: u64,
    admission: Admission,
    hello_received: bool,
    hello_attempts: u32,
    /// Set when this node decided to end the session, so the reason survives until the
    /// last connection reports closed.
    closing: Option<DisconnectReason>,
    channels: [Channel; 2],
    /// Until when the peer counts as pairing (see [`crate::pair::PAIR_ACTIVE_WINDOW`]).
    pairing_until: Option<Instant>,
}

/// Drives the swarm. Run it with [`EventLoop::run`] on its own task.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// libp2p's own metrics, when the config handed in a registry.
    metrics: Option<libp2p::metrics::Metrics>,
    local: PeerId,
    hello_timeout: Duration,
    hello_timeout_no_cert: Duration,
    pairing_max_duration: Duration,
    frame_read_timeout: Duration,
    max_inbound_bytes_per_peer: usize,
    /// Each peer's share of `budget`, kept past its session while frames it sent still
    /// wait for the node, so reconnecting does not grant a fresh share.
    peer_budgets: HashMap<PeerId, Arc<Semaphore>>,
    /// Budget for log lines that unadmitted or misbehaving peers cause.
    stranger_logs: LogLimiter,
    liveness_timeout: Duration,
    redial_max: Duration,
    dial_discovered: bool,
    certificate: Vec<u8>,
    commands: mpsc::Receiver<Command>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    control_tx: mpsc::Sender<Event>,
    backlog: VecDeque<Event>,
    frames_tx: mpsc::Sender<Delivery>,
    budget: Arc<Semaphore>,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    stream_control: libp2p_stream::Control,
    incoming: Vec<(StreamKind, libp2p_stream::IncomingStreams)>,
    peers: HashMap<PeerId, PeerState>,
    statics: HashMap<PeerId, StaticPeer>,
    discovered: DiscoveredTable,
    pending_dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, Error>>)>,
    hello_requests: HashMap<OutboundRequestId, (PeerId, u64)>,
    pair_inbound: HashMap<PairRequestId, InboundPair>,
    next_pair_id: u64,
    pair_outbound: HashMap<OutboundRequestId, OutboundPair>,
    pair_waiting: Vec<WaitingPair>,
    /// Dials started for a pairing request, with the address, for the error message.
    pair_dials: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    pair_rates: RateTable,
    listen_addrs: Vec<Multiaddr>,
    next_session: u64,
    tasks: TaskTracker,
    tasks_cancel: CancellationToken,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("local", &self.local)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// The channels and shared state [`crate::new`] wires between the loop and its handles.
pub(crate) struct Parts {
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) config: crate::Config,
    pub(crate) statics: Vec<(PeerId, Multiaddr)>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) control_tx: mpsc::Sender<Event>,
    pub(crate) frames_tx: mpsc::Sender<Delivery>,
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stream_control: libp2p_stream::Control,
    pub(crate) incoming: Vec<(StreamKind, libp2p_stream::IncomingStreams)>,
}

impl EventLoop {
    pub(crate) fn new(parts: Parts) -> Self {
        let Parts {
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
        } = parts;
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_CAPACITY);
        let now = Instant::now();
        let statics: HashMap<PeerId, StaticPeer> = statics
            .into_iter()
            .map(|(peer, addr)| (peer, StaticPeer::new(addr, config.redial_max, now)))
            .collect();
        let mut swarm = swarm;
        for peer in statics.keys() {
            swarm.behaviour_mut().guard.add_static(*peer);
        }
        let metrics = config.metrics.as_ref().map(|r| {
            libp2p::metrics::Metrics::new(
                crate::config::lock_registry(r).sub_registry_with_prefix("libp2p"),
            )
        });
        Self {
            metrics,
            local: *swarm.local_peer_id(),
            swarm,
            hello_timeout: config.hello_timeout,
            hello_timeout_no_cert: config.hello_timeout_no_cert,
            frame_read_timeout: config.frame_read_timeout,
            max_inbound_bytes_per_peer: config.max_inbound_bytes_per_peer,
            peer_budgets: HashMap::new(),
            stranger_logs: LogLimiter::new(UNADMITTED_LOG_BURST, UNADMITTED_LOG_INTERVAL),
            pairing_max_duration: config.pairing_max_duration,
            liveness_timeout: config.liveness_timeout(),
            redial_max: config.redial_max,
            dial_discovered: config.dial_discovered,
            certificate: config.certificate,
            commands,
            internal_tx,
            internal_rx,
            control_tx,
            backlog: VecDeque::new(),
            frames_tx,
            budget,
            counters: shared.counters.clone(),
            shared,
            stream_control,
            incoming,
            peers: HashMap::new(),
            statics,
            discovered: DiscoveredTable::default(),
            pending_dials: HashMap::new(),
            hello_requests: HashMap::new(),
            pair_inbound: HashMap::new(),
            next_pair_id: 0,
            pair_outbound: HashMap::new(),
            pair_waiting: Vec::new(),
            pair_dials: HashMap::new(),
            pair_rates: RateTable::default(),
            listen_addrs: Vec::new(),
            next_session: 0,
            tasks: TaskTracker::new(),
            tasks_cancel: CancellationToken::new(),
        }
    }

    /// Runs until `cancel` fires or every [`crate::Handle`] is dropped, then closes all
    /// connections and waits briefly for the stream tasks to finish.
    ///
    /// Spawn it; it must be polled for the network to make progress.
    pub async fn run(self, cancel: CancellationToken) {
        let span = error_span!("net", local = %self.local);
        self.run_inner(cancel).instrument(span).await;
    }

    async fn run_inner(mut self, cancel: CancellationToken) {
        // If this future is dropped instead of cancelled, the tasks still stop.
        let _stop_tasks = self.tasks_cancel.clone().drop_guard();
        for (kind, incoming) in std::mem::take(&mut self.incoming) {
            let internal = self.internal_tx.clone();
            let stop = self.tasks_cancel.clone();
            let span = error_span!("net", accept = kind.name());
            self.tasks
                .spawn(accept_loop(incoming, kind, internal, stop).instrument(span));
        }
        // A clone, so the pending `reserve` borrows it rather than `self`.
        let control_tx = self.control_tx.clone();
        let mut tick = tokio::time::interval(MAINTENANCE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(listen = ?self.swarm.listeners().collect::<Vec<_>>(), "network started");

        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(report) = self.internal_rx.recv() => self.on_internal(report),
                _ = tick.tick() => self.maintain(Instant::now()),
                permit = control_tx.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.backlog.pop_front() {
                            permit.send(event);
                        }
                    }
                    Err(_) => self.backlog.clear(),
                },
            }
        }

        info!("network stopping");
        self.tasks_cancel.cancel();
        // Tasks report back on the internal channel; closing it turns their last send
        // into an immediate error instead of a wait on a loop that no longer reads.
        self.internal_rx.close();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(grace = ?SHUTDOWN_GRACE, "stream tasks still running at shutdown");
        }
        // Dropping the swarm closes the listeners and every connection.
    }

    fn emit(&mut self, event: Event) {
        if self.backlog.is_empty() {
            match self.control_tx.try_send(event) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.backlog.push_back(event);
                    return;
                }
            }
        }
        if self.backlog.len() >= EVENT_BACKLOG_CAPACITY {
            bump(&self.counters.events_dropped, 1);
            warn!(
                backlog = self.backlog.len(),
                ?event,
                "node is not reading network events; dropping one"
            );
            return;
        }
        self.backlog.push_back(event);
    }

    // ---- commands -------------------------------------------------------------------

    /// Answers a handle's command. Replies are sent with `let _ =` throughout: a caller
    /// that gave up waiting (dropped its future) is not an error for the loop.
    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.peer_infos());
            }
            Command::KnownPeers { reply } => {
                let _ = reply.send(self.known_peers());
            }
            Command::Dial { addr, reply } => self.dial_once(addr, reply),
            Command::AddStaticPeer { addr, reply } => {
                let result = self.add_static_peer(&addr);
                let _ = reply.send(result);
            }
            Command::RemoveStaticPeer { peer, reply } => {
                self.swarm.behaviour_mut().guard.remove_static(&peer);
                let _ = reply.send(self.statics.remove(&peer).is_some());
            }
            Command::RetryRejected { reply } => {
                let _ = reply.send(self.discovered.retry_rejected(Instant::now()));
            }
            Command::ReservePeer { peer, reply } => {
                self.swarm.behaviour_mut().guard.vouch(peer);
                let _ = reply.send(());
            }
            Command::Admit { peer, class, reply } => {
                let _ = reply.send(self.admit(peer, class));
            }
            Command::Reject {
                peer,
                reason,
                reply,
            } => {
                let _ = reply.send(self.reject(peer, reason));
            }
            Command::Disconnect { peer, reply } => {
                let known = self.peers.contains_key(&peer);
                if known {
                    self.disconnect(peer, DisconnectReason::Requested);
                }
                let _ = reply.send(known);
            }
            Command::SetCertificate { certificate, reply } => {
                let result = check_certificate(&certificate).map(|()| {
                    self.certificate = certificate;
                });
                let _ = reply.send(result);
            }
            Command::PairRequest {
                peer,
                addr,
                bytes,
                reply,
            } => self.pair_request(peer, addr, bytes, reply),
            Command::PairRespond {
                request_id,
                bytes,
                reply,
            } => {
                let _ = reply.send(self.pair_respond(request_id, bytes));
            }
            Command::SlowPeer {
                peer,
                session,
                queued_frames,
                queued_bytes,
            } => self.on_slow_peer(peer, session, queued_frames, queued_bytes),
        }
    }

    /// A snapshot of every session, for `connected_peers`.
    fn peer_infos(&self) -> Vec<PeerInfo> {
        let now = Instant::now();
        let outboxes = self.shared.outboxes();
        self.peers
            .iter()
            .map(|(peer, state)| {
                let sync = &state.channels[StreamKind::Sync.index()];
                let (queued_frames, queued_bytes) = outboxes
                    .get(peer)
                    .filter(|o| o.session == state.session)
                    .map(|o| o.queues[StreamKind::Sync.index()].queued())
                    .unwrap_or((0, 0));
                PeerInfo {
                    peer: *peer,
                    addrs: state.conns.values().map(|c| c.addr.clone()).collect(),
                    connections: state.conns.len(),
                    admitted: matches!(state.admission, Admission::Admitted(_)),
                    is_static: self.statics.contains_key(peer),
                    hello_received: state.hello_received,
                    pairing: state.pairing_until.is_some_and(|t| t > now),
                    sync_stream_open: matches!(sync.state, ChannelState::Active { .. }),
                    sync_streams: sync.streams,
                    queued_frames,
                    queued_bytes,
                    connected_for: state.started.elapsed(),
                }
            })
            .collect()
    }

    // ---- swarm events ---------------------------------------------------------------

    /// Dispatches one swarm event. Failures of single connections are logged at debug:
    /// they are routine (a peer went away, a duplicate lost the tie-break) and the
    /// redial logic deals with them.
    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(metrics) = &self.metrics {
            use libp2p::metrics::Recorder;
            metrics.record(&event);
            match &event {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => metrics.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => metrics.record(e),
                _ => {}
            }
        }
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connection_established(
                peer_id,
                connection_id,
                endpoint.get_remote_address().clone(),
                endpoint.is_dialer(),
            ),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, connection = %connection_id, cause = ?cause, "connection closed");
                self.on_connection_closed(peer_id, connection_id);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self.on_dial_error(connection_id, peer_id, &error),
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => self.on_incoming_connection_error(&send_back_addr, peer_id, &error),
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(addr = %address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address.clone());
                }
                self.emit(Event::ListenAddr { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.emit(Event::ListenAddrExpired { addr: address });
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(%error, "listener error");
            }
            SwarmEvent::ListenerClosed {
                addresses, reason, ..
            } => {
                warn!(?addresses, ?reason, "listener closed");
                for addr in addresses {
                    self.listen_addrs.retain(|a| a != &addr);
                    self.emit(Event::ListenAddrExpired { addr });
                }
            }
            other => trace!(event = ?other, "swarm event"),
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Hello(event) => self.on_hello_event(event),
            BehaviourEvent::Pair(event) => self.on_pair_event(event),
            BehaviourEvent::Ping(event) => self.on_ping(event),
            BehaviourEvent::Identify(event) => self.on_identify(event),
            BehaviourEvent::Mdns(event) => self.on_mdns(event),
            BehaviourEvent::Guard(never) => match never {},
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Streams(()) => {}
        }
    }

    // ---- task reports ---------------------------------------------------------------

    /// Handles reports from spawned tasks. Every report carries the session and
    /// generation it was started under, and stale ones are dropped: a task may finish
    /// after its peer reconnected or after a newer stream replaced it.
    fn on_internal(&mut self, report: Internal) {
        match report {
            Internal::Inbound { peer, kind, stream } => self.on_inbound_stream(peer, kind, stream),
            Internal::Opened {
                peer,
                session,
                kind,
                generation,
                result,
            } => self.on_stream_opened(peer, session, kind, generation, result),
            Internal::Ended {
                peer,
                session,
                kind,
                generation,
                outbox,
                end,
            } => self.on_stream_ended(peer, session, kind, generation, outbox, end),
        }
    }
}
