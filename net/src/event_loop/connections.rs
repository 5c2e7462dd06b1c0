//! Connections and sessions: a peer's session runs from its first connection to its
//! last. Dialing (one-off, static peers with backoff, discovered peers past the
//! tie-break), folding further connections in and closing duplicates, ending sessions,
//! and logging what the per-IP and unknown-peer limits refuse.

use std::collections::BTreeMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, ListenError};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;
use tracing::{debug, info, trace};

use super::{Admission, Channel, ChannelState, EventLoop, PeerState};
use crate::Error;
use crate::behaviour::StreamKind;
use crate::config::{MAX_STATIC_PEERS, split_peer_addr};
use crate::dial::{Backoff, REDIAL_BASE, connections_to_close, should_dial_discovered};
use crate::event::{DisconnectReason, Event, bump};
use crate::guard::Refused;

/// Dials started by [`crate::Handle::dial`] still waiting for an answer.
const MAX_PENDING_DIALS: usize = 64;

/// One connection of a peer's session.
pub(super) struct ConnInfo {
    pub(super) addr: Multiaddr,
    /// When a ping last succeeded on it (or when it was established).
    pub(super) last_alive: Instant,
    /// False once the peer has said it does not speak ping; such links are not timed out.
    pub(super) ping_supported: bool,
    /// Set once this node asked the swarm to close it, so it is not asked again.
    pub(super) close_requested: bool,
}

/// A peer from the config or `add_static_peer`, redialled whenever it is not connected.
pub(super) struct StaticPeer {
    addr: Multiaddr,
    pub(super) backoff: Backoff,
    next_dial: Instant,
    dialing: Option<ConnectionId>,
}

impl StaticPeer {
    pub(super) fn new(addr: Multiaddr, redial_max: Duration, now: Instant) -> Self {
        Self {
            addr,
            backoff: Backoff::new(REDIAL_BASE, redial_max),
            next_dial: now,
            dialing: None,
        }
    }
}

impl EventLoop {
    /// Starts a one-off dial and parks the reply until the swarm reports the outcome for
    /// that connection id.
    pub(super) fn dial_once(
        &mut self,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, Error>>,
    ) {
        if self.pending_dials.len() >= MAX_PENDING_DIALS {
            let _ = reply.send(Err(Error::Capacity {
                what: "pending dials",
                limit: MAX_PENDING_DIALS,
            }));
            return;
        }
        let opts = match split_peer_addr(&addr) {
            Ok((peer, _)) if peer == self.local => {
                let _ = reply.send(Err(Error::Dial {
                    addr,
                    reason: "that is this node's own PeerId".into(),
                }));
                return;
            }
            Ok((peer, _)) if self.peers.contains_key(&peer) => {
                let _ = reply.send(Ok(peer));
                return;
            }
            // A concurrent dial may race a static redial; the duplicate is closed later.
            Ok((peer, base)) => DialOpts::peer_id(peer)
                .addresses(vec![base])
                .condition(PeerCondition::Disconnected)
                .allocate_new_port()
                .build(),
            Err(_) => DialOpts::unknown_peer_id()
                .address(addr.clone())
                .allocate_new_port()
                .build(),
        };
        let id = opts.connection_id();
        bump(&self.counters.dials, 1);
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, (addr, reply));
            }
            Err(e) => {
                bump(&self.counters.dial_failures, 1);
                let _ = reply.send(Err(Error::Dial {
                    addr,
                    reason: e.to_string(),
                }));
            }
        }
    }

    /// Records (or re-addresses) a static peer and dials it at once rather than on the
    /// next tick, so adding a peer connects without a visible delay.
    pub(super) fn add_static_peer(&mut self, addr: &Multiaddr) -> Result<PeerId, Error> {
        let (peer, base) = split_peer_addr(addr)?;
        if peer == self.local {
            return Err(Error::Config(format!(
                "static peer {addr} is this node itself"
            )));
        }
        let now = Instant::now();
        if !self.statics.contains_key(&peer) && self.statics.len() >= MAX_STATIC_PEERS {
            return Err(Error::Capacity {
                what: "static peers",
                limit: MAX_STATIC_PEERS,
            });
        }
        self.swarm.behaviour_mut().guard.add_static(peer);
        match self.statics.entry(peer) {
            Entry::Occupied(mut entry) => {
                let entry = entry.get_mut();
                entry.addr = base;
                entry.backoff.reset();
                entry.next_dial = now;
            }
            Entry::Vacant(entry) => {
                entry.insert(StaticPeer::new(base, self.redial_max, now));
            }
        }
        self.redial_statics(now);
        Ok(peer)
    }

    /// Starts a session on a peer's first connection (hello sent, admission deadline
    /// set), or folds a further connection into it and closes duplicates.
    pub(super) fn on_connection_established(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        addr: Multiaddr,
        local_dialed: bool,
    ) {
        if let Some((_, reply)) = self.pending_dials.remove(&id) {
            let _ = reply.send(Ok(peer));
        }
        self.pair_dials.remove(&id);
        if let Some(entry) = self.statics.get_mut(&peer) {
            entry.dialing = None;
        }
        if let Some(hint) = self.discovered.get_mut(&peer) {
            hint.dialing = None;
        }
        let now = Instant::now();
        let is_new = !self.peers.contains_key(&peer);
        if is_new {
            let session = self.next_session;
            self.next_session += 1;
            self.peers.insert(
                peer,
                PeerState {
                    session,
                    started: now,
                    conns: BTreeMap::new(),
                    conn_epoch: 0,
                    // The short deadline until a certificate shows up; see
                    // `Config::hello_timeout_no_cert`.
                    admission: Admission::Pending {
                        deadline: now + self.hello_timeout.min(self.hello_timeout_no_cert),
                    },
                    hello_received: false,
                    hello_attempts: 0,
                    closing: None,
                    channels: [Channel::new(now), Channel::new(now)],
                    pairing_until: None,
                },
            );
            // Every peer is a stranger at this point; admission is logged separately.
            if self.stranger_log() {
                info!(%peer, %addr, outbound = local_dialed, "peer connected");
            }
            self.emit(Event::PeerConnected {
                peer,
                addr: addr.clone(),
                outbound: local_dialed,
            });
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        // Any new connection may be the one an ongoing open lands on; bumping the epoch
        // lets the open's result detect that.
        state.conn_epoch += 1;
        state.conns.insert(
            id,
            ConnInfo {
                addr,
                last_alive: now,
                ping_supported: true,
                close_requested: false,
            },
        );
        if state.closing.is_some() {
            // The session is being torn down; a late connection must not revive it.
            self.swarm.close_connection(id);
            return;
        }
        let conns: Vec<ConnectionId> = state.conns.keys().copied().collect();
        let keep = state.channels[StreamKind::Sync.index()]
            .conn()
            .or(state.channels[StreamKind::Ephemeral.index()].conn());
        if is_new {
            self.send_hello(peer);
            self.flush_waiting_pairs(peer);
        }
        for duplicate in connections_to_close(&self.local, &peer, &conns, keep) {
            debug!(%peer, connection = %duplicate, "closing duplicate connection");
            bump(&self.counters.duplicate_connections_closed, 1);
            self.swarm.close_connection(duplicate);
        }
    }

    /// Ends the session when the peer's last connection closes; until then the peer
    /// stays connected and only the streams on the lost connection are restarted.
    pub(super) fn on_connection_closed(&mut self, peer: PeerId, id: ConnectionId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.conns.remove(&id);
        if !state.conns.is_empty() {
            // A stream on the connection that went away is dead even if its reads have
            // not noticed yet; cut it so the queue moves to a new stream.
            for channel in &mut state.channels {
                if channel.conn() == Some(id)
                    && let ChannelState::Active { cancel, .. } = &channel.state
                {
                    cancel.cancel();
                }
            }
            // A duplicate went away; the opener may now open its streams.
            for kind in StreamKind::ALL {
                self.drive_channel(peer, kind);
            }
            return;
        }
        let Some(mut state) = self.peers.remove(&peer) else {
            return;
        };
        // A reason this node recorded wins; otherwise the link simply went away.
        let reason = state
            .closing
            .take()
            .unwrap_or(DisconnectReason::ConnectionClosed);
        self.shared.remove_outboxes(&peer, state.session);
        for channel in &mut state.channels {
            channel.cancel();
        }
        let was_admitted = matches!(state.admission, Admission::Admitted(_));
        let now = Instant::now();
        if let Some(entry) = self.statics.get_mut(&peer) {
            // A session that never got admitted counts as a failure, so a peer that keeps
            // being rejected is retried ever more slowly rather than in a tight loop.
            let wait = if was_admitted {
                entry.backoff.delay()
            } else {
                entry.backoff.fail()
            };
            entry.next_dial = now + wait;
        }
        // Not at once: if the peer just restarted, an immediate redial would only race
        // its listener coming back.
        if let Some(hint) = self.discovered.get_mut(&peer) {
            hint.next_dial = now + hint.backoff.delay();
        }
        if was_admitted || self.stranger_log() {
            info!(%peer, %reason, "peer disconnected");
        }
        self.emit(Event::PeerDisconnected { peer, reason });
    }

    /// Fails the waiting `dial` call, if any, and pushes the matching static or
    /// discovered peer's next attempt out by its backoff.
    pub(super) fn on_dial_error(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        error: &DialError,
    ) {
        bump(&self.counters.dial_failures, 1);
        if let Some((addr, reply)) = self.pending_dials.remove(&id) {
            let _ = reply.send(Err(Error::Dial {
                addr,
                reason: error.to_string(),
            }));
        }
        if let Some((peer, addr)) = self.pair_dials.remove(&id) {
            self.on_pair_dial_failed(peer, &addr, &error.to_string());
        }
        let Some(peer) = peer else {
            debug!(%error, "dial failed");
            return;
        };
        let now = Instant::now();
        if let Some(entry) = self.statics.get_mut(&peer)
            && entry.dialing == Some(id)
        {
            entry.dialing = None;
            let wait = entry.backoff.fail();
            entry.next_dial = now + wait;
            debug!(%peer, %error, retry_in = ?wait, "static peer dial failed");
            return;
        }
        if let Some(hint) = self.discovered.get_mut(&peer)
            && hint.dialing == Some(id)
        {
            hint.dialing = None;
            let wait = hint.backoff.fail();
            hint.next_dial = now + wait;
            debug!(%peer, %error, retry_in = ?wait, "discovered peer dial failed");
            return;
        }
        debug!(%peer, %error, "dial failed");
    }

    /// Logs an inbound connection that failed or that a limit refused; refusals are
    /// what strangers cause, so they share the rate-limited budget.
    pub(super) fn on_incoming_connection_error(
        &mut self,
        send_back_addr: &Multiaddr,
        peer_id: Option<PeerId>,
        error: &ListenError,
    ) {
        let refused = match error {
            libp2p::swarm::ListenError::Denied { cause } => {
                cause.downcast_ref::<Refused>().cloned()
            }
            _ => None,
        };
        match refused {
            Some(refused) => {
                if self.stranger_log() {
                    info!(from = %send_back_addr, peer = ?peer_id, %refused, "inbound connection refused");
                }
            }
            None => {
                debug!(from = %send_back_addr, peer = ?peer_id, %error, "incoming connection failed");
            }
        }
    }

    /// Ends a peer's session from this side with `reason`.
    pub(super) fn disconnect(&mut self, peer: PeerId, reason: DisconnectReason) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.closing.is_none() {
            debug!(%peer, %reason, "disconnecting peer");
            state.closing = Some(reason);
        }
        // Queues go first, so handles stop accepting frames for a peer on its way out.
        self.shared.remove_outboxes(&peer, state.session);
        for channel in &mut state.channels {
            channel.cancel();
        }
        // The session itself ends when the swarm reports the last connection closed;
        // `closing` carries the reason until then.
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Static and discovered peers with no open connection, in PeerId order.
    pub(super) fn known_peers(&self) -> Vec<crate::KnownPeer> {
        let mut known: std::collections::BTreeMap<PeerId, crate::KnownPeer> = Default::default();
        let blank = |peer: PeerId| crate::KnownPeer {
            peer,
            addrs: Vec::new(),
            is_static: false,
            discovered: false,
        };
        for (peer, s) in &self.statics {
            if !self.peers.contains_key(peer) {
                let entry = known.entry(*peer).or_insert_with(|| blank(*peer));
                entry.is_static = true;
                entry.addrs.push(s.addr.clone());
            }
        }
        for (peer, d) in self.discovered.iter() {
            if !self.peers.contains_key(peer) {
                let entry = known.entry(*peer).or_insert_with(|| blank(*peer));
                entry.discovered = true;
                for addr in &d.addrs {
                    if !entry.addrs.contains(addr) {
                        entry.addrs.push(addr.clone());
                    }
                }
            }
        }
        known.into_values().collect()
    }

    /// Dials every static peer that is not connected, not being dialled, and whose backoff
    /// has elapsed. Both ends of a static pair dial; duplicates are closed afterwards.
    pub(super) fn redial_statics(&mut self, now: Instant) {
        let due: Vec<(PeerId, Multiaddr)> = self
            .statics
            .iter()
            .filter(|(peer, s)| {
                !self.peers.contains_key(peer) && s.dialing.is_none() && s.next_dial <= now
            })
            .map(|(peer, s)| (*peer, s.addr.clone()))
            .collect();
        for (peer, addr) in due {
            let result = self.dial_peer(peer, addr);
            if let Some(entry) = self.statics.get_mut(&peer) {
                match result {
                    Ok(Some(id)) => entry.dialing = Some(id),
                    // Already dialling through another path; look again shortly.
                    Ok(None) => entry.next_dial = now + REDIAL_BASE,
                    Err(error) => {
                        let wait = entry.backoff.fail();
                        entry.next_dial = now + wait;
                        debug!(%peer, %error, retry_in = ?wait, "static dial refused");
                    }
                }
            }
        }
    }

    /// Dials discovered peers that pass the tie-break and their backoff, when enabled.
    pub(super) fn dial_discovered(&mut self, now: Instant) {
        if !self.dial_discovered {
            return;
        }
        let local = self.local;
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .discovered
            .iter_mut()
            .filter(|(peer, d)| {
                should_dial_discovered(&local, peer, d, self.peers.contains_key(*peer), now)
            })
            .map(|(peer, d)| (*peer, d.addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            // A fresh port for the same reason as static dials (see `dial_peer`).
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .allocate_new_port()
                .build();
            let id = opts.connection_id();
            bump(&self.counters.dials, 1);
            let dialed = self.swarm.dial(opts).is_ok();
            if let Some(hint) = self.discovered.get_mut(&peer) {
                if dialed {
                    hint.dialing = Some(id);
                } else {
                    hint.next_dial = now + hint.backoff.fail();
                }
            }
        }
    }

    /// Dials a known peer from a fresh port. `Ok(None)` means a dial or connection to it
    /// already exists.
    fn dial_peer(
        &mut self,
        peer: PeerId,
        addr: Multiaddr,
    ) -> Result<Option<ConnectionId>, DialError> {
        // A fresh source port, rather than reusing the listen port, rules out a TCP
        // simultaneous open when both sides dial at once: that yields one socket on
        // which both run the Noise initiator role, and the handshake fails.
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                bump(&self.counters.dials, 1);
                trace!(%peer, "dialing static peer");
                Ok(Some(id))
            }
            Err(DialError::DialPeerConditionFalse(_)) => Ok(None),
            Err(error) => {
                bump(&self.counters.dial_failures, 1);
                Err(error)
            }
        }
    }
}
