//! The hello exchange and admission: both ends swap certificates when a session starts,
//! the node then admits the peer (with a [`PeerClass`]) or rejects it, and a peer not
//! admitted by its deadline is disconnected.

use std::time::Instant;

use libp2p::PeerId;
use libp2p::request_response;
use tracing::{debug, info, warn};

use super::EventLoop;
use crate::behaviour::{Hello, StreamKind};
use crate::config::check_certificate;
use crate::dial::REJECTED_COOLDOWN;
use crate::event::{DisconnectReason, Event, PeerClass, bump};
use crate::handle::PeerOutboxes;
use crate::stream::Outbox;

/// Hello requests per session before giving up (the peer is then cut at the hello
/// timeout). Retries cover a request lost on a duplicate connection being closed.
const HELLO_MAX_ATTEMPTS: u32 = 3;

/// Where a session stands with the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    Pending { deadline: Instant },
    Admitted(PeerClass),
    Rejected,
}

impl EventLoop {
    /// Both ends send a hello request when a session starts and answer the other's, so
    /// each learns the other's certificate from whichever message arrives first; the
    /// exchange completes even if one direction is lost on a closing duplicate.
    pub(super) fn on_hello_event(&mut self, event: request_response::Event<Hello, Hello>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let response = Hello {
                        certificate: self.certificate.clone(),
                    };
                    if self
                        .swarm
                        .behaviour_mut()
                        .hello
                        .send_response(channel, response)
                        .is_err()
                    {
                        debug!(%peer, "hello response not sent: connection gone");
                    }
                    self.on_certificate(peer, request.certificate);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    self.hello_requests.remove(&request_id);
                    self.on_certificate(peer, response.certificate);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some((_, session)) = self.hello_requests.remove(&request_id) else {
                    return;
                };
                let retry = self.peers.get(&peer).is_some_and(|s| {
                    s.session == session
                        && !s.hello_received
                        && s.closing.is_none()
                        && s.hello_attempts < HELLO_MAX_ATTEMPTS
                });
                debug!(%peer, %error, retry, "hello request failed");
                if retry {
                    self.send_hello(peer);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound hello failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn send_hello(&mut self, peer: PeerId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.hello_attempts += 1;
        let session = state.session;
        let request = Hello {
            certificate: self.certificate.clone(),
        };
        let id = self
            .swarm
            .behaviour_mut()
            .hello
            .send_request(&peer, request);
        self.hello_requests.insert(id, (peer, session));
    }

    fn on_certificate(&mut self, peer: PeerId, certificate: Vec<u8>) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.hello_received || state.closing.is_some() {
            return;
        }
        if check_certificate(&certificate).is_err() {
            // The codec caps the message, so only a cap mismatch could get here.
            warn!(%peer, len = certificate.len(), "oversized certificate in hello; ignoring");
            return;
        }
        state.hello_received = true;
        if !certificate.is_empty()
            && let Admission::Pending { deadline } = &mut state.admission
        {
            // A certificate earns the full hello timeout (from connecting), for the node
            // to check it; pairing may have pushed the deadline further already.
            *deadline = (*deadline).max(state.started + self.hello_timeout);
        }
        debug!(%peer, len = certificate.len(), "hello received");
        self.emit(Event::Hello { peer, certificate });
    }

    /// Admits a peer: creates its outbound queues and starts (or accepts) its streams.
    /// The queues exist from this moment, so frames sent right after `admit` are kept
    /// until the stream is up instead of being refused.
    ///
    /// A peer keeps the class it was first admitted with for the rest of its session:
    /// admitting it again as something else is refused, so frames already in flight can
    /// never be read under a class they were not sent with.
    pub(super) fn admit(&mut self, peer: PeerId, class: PeerClass) -> bool {
        let Some(state) = self.peers.get_mut(&peer) else {
            return false;
        };
        match &state.admission {
            Admission::Rejected => return false,
            Admission::Admitted(held) => return *held == class,
            Admission::Pending { .. } if state.closing.is_some() => return false,
            Admission::Pending { .. } => {}
        }
        // Only the home's own devices earn a reserved slot, from both caps (devices of one
        // home often share an address, as on one host or behind one NAT): a paired home
        // can mint device certificates at will, so its devices stay under the strangers'.
        let own = class == PeerClass::Own;
        state.admission = Admission::Admitted(class);
        if own {
            let guard = &mut self.swarm.behaviour_mut().guard;
            guard.admitted(peer);
            guard.vouch(peer);
        }
        let Some(state) = self.peers.get_mut(&peer) else {
            return false;
        };
        let (sync, sync_rx) = Outbox::new(StreamKind::Sync);
        let (ephemeral, ephemeral_rx) = Outbox::new(StreamKind::Ephemeral);
        state.channels[StreamKind::Sync.index()].outbox = Some(sync_rx);
        state.channels[StreamKind::Ephemeral.index()].outbox = Some(ephemeral_rx);
        self.shared.outboxes().insert(
            peer,
            PeerOutboxes {
                session: state.session,
                queues: [sync, ephemeral],
            },
        );
        // A peer that got all the way to admission is a healthy target again.
        if let Some(entry) = self.statics.get_mut(&peer) {
            entry.backoff.reset();
        }
        if let Some(hint) = self.discovered.get_mut(&peer) {
            hint.backoff.reset();
            hint.admitted = true;
        }
        info!(%peer, "peer admitted");
        for kind in StreamKind::ALL {
            self.drive_channel(peer, kind);
        }
        true
    }

    /// Rejects a peer: it loses any standing it had and, if connected, is cut. False
    /// when it was not connected.
    pub(super) fn reject(&mut self, peer: PeerId, reason: String) -> bool {
        // Whatever standing the peer had is gone, connected or not.
        self.swarm.behaviour_mut().guard.forget(&peer);
        let known = self.peers.contains_key(&peer);
        if known {
            // A stranger presenting a bad certificate over and over causes these.
            if self.stranger_log() {
                info!(%peer, %reason, "peer rejected");
            }
            // Marked before disconnecting so a stream or hello still in flight
            // from this peer is refused rather than parked.
            if let Some(state) = self.peers.get_mut(&peer) {
                state.admission = Admission::Rejected;
            }
            // mDNS keeps re-announcing it; without a cooldown the next tick would
            // dial it straight back into another rejection.
            if let Some(hint) = self.discovered.get_mut(&peer) {
                hint.cooldown_until = Some(Instant::now() + REJECTED_COOLDOWN);
            }
            self.disconnect(peer, DisconnectReason::Rejected(reason));
        }
        known
    }

    /// Disconnects every peer whose admission deadline passed.
    pub(super) fn expire_hellos(&mut self, now: Instant) {
        let expired: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, s)| {
                s.closing.is_none()
                    && matches!(s.admission, Admission::Pending { deadline } if deadline <= now)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            bump(&self.counters.hello_timeouts, 1);
            if self.stranger_log() {
                let certificate = self.peers.get(&peer).is_some_and(|s| s.hello_received);
                info!(%peer, hello_received = certificate, "peer not admitted in time; disconnecting");
            }
            self.disconnect(peer, DisconnectReason::HelloTimeout);
        }
    }
}
