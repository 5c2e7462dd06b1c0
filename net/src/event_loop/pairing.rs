//! The event loop's side of `/hearth/pair/1`: sending requests (dialling first when
//! needed), admitting inbound ones past the rate limit and capacity checks, and keeping
//! a pairing peer's admission deadline ahead of its exchange.

use std::time::Instant;

use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, ResponseChannel};
use libp2p::swarm::DialError;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{Admission, EventLoop};
use crate::Error;
use crate::event::{Event, bump};
use crate::pair::{
    MAX_PAIRING_PEERS, MAX_PENDING_PAIR_REQUESTS, MAX_PENDING_PAIR_RESPONSES, PAIR_ACTIVE_WINDOW,
    PAIR_CONNECT_TIMEOUT, PAIR_REQUEST_TIMEOUT, PairRequestId, PairRequestMsg, PairResponseMsg,
    Refusal, extended_deadline, sanitize_reason,
};

/// Slack past the request-response timeout before the loop's own backstop fails a
/// request, so the behaviour's more precise error normally wins.
const BACKSTOP_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

type PairReply = oneshot::Sender<Result<Vec<u8>, Error>>;

/// An inbound pairing request the node has not answered yet.
pub(super) struct InboundPair {
    peer: PeerId,
    channel: ResponseChannel<PairResponseMsg>,
    deadline: Instant,
}

/// An outbound pairing request on the wire.
pub(super) struct OutboundPair {
    peer: PeerId,
    reply: PairReply,
    /// A backstop: request-response times the request out first.
    deadline: Instant,
}

/// An outbound pairing request waiting for its peer to connect.
pub(super) struct WaitingPair {
    peer: PeerId,
    bytes: Vec<u8>,
    reply: PairReply,
    deadline: Instant,
}

impl EventLoop {
    /// Starts an outbound pairing request: at once on an existing connection, else after
    /// dialling `addr`.
    pub(super) fn pair_request(
        &mut self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        bytes: Vec<u8>,
        reply: PairReply,
    ) {
        if peer == self.local {
            let _ = reply.send(Err(Error::Config(
                "a pairing request cannot go to this node itself".into(),
            )));
            return;
        }
        if self.pair_outbound.len() + self.pair_waiting.len() >= MAX_PENDING_PAIR_REQUESTS {
            let _ = reply.send(Err(Error::Capacity {
                what: "pending pairing requests",
                limit: MAX_PENDING_PAIR_REQUESTS,
            }));
            return;
        }
        if let Some(state) = self.peers.get(&peer) {
            if state.closing.is_some() {
                // Its connections are going; a new dial cannot start until they are gone.
                let _ = reply.send(Err(Error::NotConnected { peer }));
            } else {
                self.send_pair_request(peer, bytes, reply);
            }
            return;
        }
        let Some(addr) = addr else {
            let _ = reply.send(Err(Error::NotConnected { peer }));
            return;
        };
        let base = match strip_peer(&addr, peer) {
            Ok(base) => base,
            Err(reason) => {
                let _ = reply.send(Err(Error::Dial { addr, reason }));
                return;
            }
        };
        // A fresh port for the same reason as every other dial here (see `dial_peer`).
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![base])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .allocate_new_port()
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                bump(&self.counters.dials, 1);
                self.pair_dials.insert(id, (peer, addr));
            }
            // Some other dial to this peer is under way; its connection serves as well.
            Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(error) => {
                bump(&self.counters.dial_failures, 1);
                let _ = reply.send(Err(Error::Dial {
                    addr,
                    reason: error.to_string(),
                }));
                return;
            }
        }
        self.pair_waiting.push(WaitingPair {
            peer,
            bytes,
            reply,
            deadline: Instant::now() + PAIR_CONNECT_TIMEOUT,
        });
    }

    fn send_pair_request(&mut self, peer: PeerId, bytes: Vec<u8>, reply: PairReply) {
        let now = Instant::now();
        let id = self
            .swarm
            .behaviour_mut()
            .pair
            .send_request(&peer, PairRequestMsg { bytes });
        self.pair_outbound.insert(
            id,
            OutboundPair {
                peer,
                reply,
                deadline: now + PAIR_REQUEST_TIMEOUT + BACKSTOP_SLACK,
            },
        );
        // The joining side does not admit the issuer either (it has no home to check
        // against yet), so its own hello timer needs the same extension.
        self.note_pairing(peer, now);
    }

    /// Sends the requests that were waiting for `peer` to connect.
    pub(super) fn flush_waiting_pairs(&mut self, peer: PeerId) {
        if !self.pair_waiting.iter().any(|w| w.peer == peer) {
            return;
        }
        let (ready, waiting) = std::mem::take(&mut self.pair_waiting)
            .into_iter()
            .partition(|w| w.peer == peer);
        self.pair_waiting = waiting;
        for WaitingPair { bytes, reply, .. } in ready {
            self.send_pair_request(peer, bytes, reply);
        }
    }

    /// Fails the requests waiting on a dial that did not connect.
    pub(super) fn on_pair_dial_failed(&mut self, peer: PeerId, addr: &Multiaddr, reason: &str) {
        if self.peers.contains_key(&peer) {
            // Another connection made it; the waiting requests went out on that one.
            return;
        }
        let (failed, waiting) = std::mem::take(&mut self.pair_waiting)
            .into_iter()
            .partition(|w| w.peer == peer);
        self.pair_waiting = waiting;
        let failed: Vec<WaitingPair> = failed;
        for WaitingPair { reply, .. } in failed {
            let _ = reply.send(Err(Error::Dial {
                addr: addr.clone(),
                reason: reason.to_owned(),
            }));
        }
    }

    /// Answers an inbound request; false when it is no longer waiting.
    pub(super) fn pair_respond(&mut self, id: PairRequestId, bytes: Vec<u8>) -> bool {
        let Some(pending) = self.pair_inbound.remove(&id) else {
            return false;
        };
        if !pending.channel.is_open() {
            return false;
        }
        let peer = pending.peer;
        let sent = self
            .swarm
            .behaviour_mut()
            .pair
            .send_response(pending.channel, PairResponseMsg::Reply(bytes))
            .is_ok();
        if sent {
            self.note_pairing(peer, Instant::now());
        }
        sent
    }

    /// Marks `peer` as pairing and, if it is still waiting for admission, pushes its
    /// deadline out, within [`crate::Config::pairing_max_duration`] of its connecting.
    fn note_pairing(&mut self, peer: PeerId, now: Instant) {
        let hello_timeout = self.hello_timeout;
        let bound = self.pairing_max_duration;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.pairing_until = Some(now + PAIR_ACTIVE_WINDOW);
        if let Admission::Pending { deadline } = &mut state.admission {
            *deadline = extended_deadline(*deadline, now, state.started, hello_timeout, bound);
        }
    }

    pub(super) fn on_pair_event(
        &mut self,
        event: request_response::Event<PairRequestMsg, PairResponseMsg>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_pair_request(peer, request.bytes, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let Some(pending) = self.pair_outbound.remove(&request_id) else {
                        return;
                    };
                    let result = match response {
                        PairResponseMsg::Reply(bytes) => {
                            self.note_pairing(peer, Instant::now());
                            Ok(bytes)
                        }
                        PairResponseMsg::Refused(reason) => Err(Error::PairRefused {
                            peer,
                            reason: sanitize_reason(&reason),
                        }),
                    };
                    let _ = pending.reply.send(result);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some(pending) = self.pair_outbound.remove(&request_id) else {
                    return;
                };
                let reason = match error {
                    OutboundFailure::Timeout => {
                        format!("no answer within {PAIR_REQUEST_TIMEOUT:?}")
                    }
                    OutboundFailure::UnsupportedProtocols => {
                        "the peer does not speak /hearth/pair/1".into()
                    }
                    other => other.to_string(),
                };
                debug!(%peer, %reason, "pairing request failed");
                let _ = pending.reply.send(Err(Error::PairFailed { peer, reason }));
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Mostly the node not answering in time, or the peer leaving; the entry's
                // channel is closed now and the next maintenance pass drops it.
                debug!(%peer, %error, "inbound pairing request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Passes an inbound request to the node, or refuses it here.
    fn on_pair_request(
        &mut self,
        peer: PeerId,
        bytes: Vec<u8>,
        channel: ResponseChannel<PairResponseMsg>,
    ) {
        let now = Instant::now();
        match self.check_pair_request(peer, now) {
            Ok(()) => {
                let request_id = PairRequestId(self.next_pair_id);
                self.next_pair_id += 1;
                self.pair_inbound.insert(
                    request_id,
                    InboundPair {
                        peer,
                        channel,
                        deadline: now + PAIR_REQUEST_TIMEOUT,
                    },
                );
                self.note_pairing(peer, now);
                bump(&self.counters.pair_requests_received, 1);
                debug!(%peer, %request_id, len = bytes.len(), "pairing request");
                self.emit(Event::PairRequest {
                    peer,
                    request_id,
                    bytes,
                });
            }
            Err(refusal) => {
                bump(&self.counters.pair_requests_refused, 1);
                if self.stranger_log() {
                    info!(%peer, ?refusal, "pairing request refused");
                }
                let response = PairResponseMsg::Refused(refusal.reason());
                if self
                    .swarm
                    .behaviour_mut()
                    .pair
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!(%peer, "pairing refusal not sent: stream gone");
                }
            }
        }
    }

    /// The checks an inbound request must pass, cheapest and most specific first. The
    /// rate limit is charged last, so a request refused for capacity does not also use up
    /// the peer's budget.
    fn check_pair_request(&mut self, peer: PeerId, now: Instant) -> Result<(), Refusal> {
        let Some(state) = self.peers.get(&peer) else {
            return Err(Refusal::Closing);
        };
        if state.closing.is_some() || state.admission == Admission::Rejected {
            return Err(Refusal::Closing);
        }
        let already_pairing = state.pairing_until.is_some_and(|t| t > now);
        if !already_pairing {
            let pairing = self
                .peers
                .values()
                .filter(|s| s.pairing_until.is_some_and(|t| t > now))
                .count();
            if pairing >= MAX_PAIRING_PEERS {
                return Err(Refusal::TooManyPairingPeers);
            }
        }
        if self.pair_inbound.len() >= MAX_PENDING_PAIR_RESPONSES {
            return Err(Refusal::Busy);
        }
        if !self.pair_rates.try_take(peer, now) {
            return Err(Refusal::RateLimited);
        }
        Ok(())
    }

    /// Drops what timed out: inbound requests the node never answered (their streams
    /// are closed by now), outbound ones past the backstop, and requests still waiting
    /// for a connection. Also forgets idle rate-limit entries.
    pub(super) fn expire_pairs(&mut self, now: Instant) {
        self.pair_inbound
            .retain(|_, p| p.deadline > now && p.channel.is_open());
        let expired: Vec<_> = self
            .pair_outbound
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(pending) = self.pair_outbound.remove(&id) {
                warn!(peer = %pending.peer, "pairing request outlived its timeout");
                let _ = pending.reply.send(Err(Error::PairFailed {
                    peer: pending.peer,
                    reason: format!("no answer within {PAIR_REQUEST_TIMEOUT:?}"),
                }));
            }
        }
        if self.pair_waiting.iter().any(|w| w.deadline <= now) {
            let (late, waiting) = std::mem::take(&mut self.pair_waiting)
                .into_iter()
                .partition(|w| w.deadline <= now);
            self.pair_waiting = waiting;
            let late: Vec<WaitingPair> = late;
            for WaitingPair { peer, reply, .. } in late {
                let _ = reply.send(Err(Error::PairFailed {
                    peer,
                    reason: format!("not connected within {PAIR_CONNECT_TIMEOUT:?}"),
                }));
            }
        }
        self.pair_rates.prune(now);
    }
}

/// The address to dial for `peer`: `addr` without a `/p2p/` suffix, which if present
/// must name `peer`.
fn strip_peer(addr: &Multiaddr, peer: PeerId) -> Result<Multiaddr, String> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(named)) if named != peer => {
            Err(format!("the address names peer {named}, not {peer}"))
        }
        Some(Protocol::P2p(_)) => Ok(base),
        Some(_) => Ok(addr.clone()),
        None => Err("the address is empty".into()),
    }
    .and_then(|base| {
        if base.is_empty() {
            Err("the address has nothing to dial".into())
        } else {
            Ok(base)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_addresses_may_carry_the_expected_peer_only() {
        let peer = PeerId::random();
        let plain: Multiaddr = "/ip4/127.0.0.1/tcp/4640".parse().unwrap();
        assert_eq!(strip_peer(&plain, peer).unwrap(), plain);
        let named = plain.clone().with(Protocol::P2p(peer));
        assert_eq!(strip_peer(&named, peer).unwrap(), plain);
        let other = plain.clone().with(Protocol::P2p(PeerId::random()));
        assert!(strip_peer(&other, peer).unwrap_err().contains("names peer"));
        assert!(strip_peer(&Multiaddr::empty(), peer).is_err());
        let bare = Multiaddr::empty().with(Protocol::P2p(peer));
        assert!(strip_peer(&bare, peer).is_err());
    }
}
