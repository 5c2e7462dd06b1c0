//! Admission control at the connection level: a cap on inbound connections per remote IP
//! address, and a cap on inbound connections from peers the node does not know.
//!
//! libp2p's `connection-limits` caps totals, which is what a flood fills: anyone on the
//! LAN can open connections under fresh PeerIds until the total is reached and the
//! home's devices are locked out. This behaviour refuses the flood first.
//!
//! Who is exempt from what:
//! - static peers and peers the node vouched for ([`crate::Handle::reserve_peer`]) are
//!   never refused here;
//! - peers admitted during this run do not count against, and are never refused by,
//!   the cap on unknown peers. They stay under the per-IP cap: a paired home can mint
//!   device certificates at will, so admission alone does not earn unlimited slots.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::event::{Counters, bump};

/// Most peers remembered as admitted, and separately as vouched for. Static peers are
/// capped on their own ([`crate::MAX_STATIC_PEERS`]); past this the oldest entry is
/// forgotten, so the sets stay bounded however long the node runs.
pub const MAX_RESERVED_PEERS: usize = 1024;

/// Why the guard refused an inbound connection. Carried inside libp2p's
/// `ConnectionDenied`, so the event loop can tell its own refusals apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    /// The remote IP address already holds its share of inbound connections.
    #[error("{ip} already has {limit} inbound connections")]
    PerIp { ip: IpAddr, limit: u32 },
    /// Every slot for unknown peers is taken.
    #[error("all {limit} inbound slots for unknown peers are taken")]
    Unknown { limit: u32 },
}

/// A set that forgets its oldest member past a cap.
#[derive(Debug, Default)]
struct BoundedSet {
    members: HashSet<PeerId>,
    order: VecDeque<PeerId>,
}

impl BoundedSet {
    fn insert(&mut self, peer: PeerId) {
        if !self.members.insert(peer) {
            return;
        }
        self.order.push_back(peer);
        while self.order.len() > MAX_RESERVED_PEERS {
            if let Some(old) = self.order.pop_front() {
                self.members.remove(&old);
            }
        }
    }

    fn remove(&mut self, peer: &PeerId) {
        if self.members.remove(peer) {
            self.order.retain(|p| p != peer);
        }
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.members.contains(peer)
    }
}

/// The connection guard; see the module docs.
pub(crate) struct Guard {
    max_per_ip: u32,
    max_unknown: u32,
    /// Static peers; kept apart so removing a static peer does not forget a vouched one.
    statics: HashSet<PeerId>,
    vouched: BoundedSet,
    admitted: BoundedSet,
    /// Established inbound connections: remote IP (if the address has one) and peer.
    inbound: HashMap<ConnectionId, (Option<IpAddr>, PeerId)>,
    counters: Arc<Counters>,
}

impl Guard {
    pub(crate) fn new(max_per_ip: u32, max_unknown: u32, counters: Arc<Counters>) -> Self {
        Self {
            max_per_ip,
            max_unknown,
            statics: HashSet::new(),
            vouched: BoundedSet::default(),
            admitted: BoundedSet::default(),
            inbound: HashMap::new(),
            counters,
        }
    }

    /// Static or vouched for: never refused here.
    fn is_trusted(&self, peer: &PeerId) -> bool {
        self.statics.contains(peer) || self.vouched.contains(peer)
    }

    /// Known in any way: outside the unknown cap.
    pub(crate) fn is_known(&self, peer: &PeerId) -> bool {
        self.is_trusted(peer) || self.admitted.contains(peer)
    }

    pub(crate) fn add_static(&mut self, peer: PeerId) {
        self.statics.insert(peer);
    }

    pub(crate) fn remove_static(&mut self, peer: &PeerId) {
        self.statics.remove(peer);
    }

    /// Remembers a peer the node vouched for.
    pub(crate) fn vouch(&mut self, peer: PeerId) {
        self.vouched.insert(peer);
    }

    /// Remembers a peer the node admitted.
    pub(crate) fn admitted(&mut self, peer: PeerId) {
        self.admitted.insert(peer);
    }

    /// Forgets a peer the node rejected; a static entry stays until it is removed.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        self.vouched.remove(peer);
        self.admitted.remove(peer);
    }

    /// The check itself, apart from libp2p's plumbing so it can be tested directly.
    fn check(&self, peer: &PeerId, remote: &Multiaddr) -> Result<(), Refused> {
        if self.is_trusted(peer) {
            return Ok(());
        }
        if let Some(ip) = ip_of(remote) {
            let from_ip = self
                .inbound
                .values()
                .filter(|(other, _)| *other == Some(ip))
                .count();
            if from_ip >= self.max_per_ip as usize {
                return Err(Refused::PerIp {
                    ip,
                    limit: self.max_per_ip,
                });
            }
        }
        if self.admitted.contains(peer) {
            return Ok(());
        }
        // Counted on demand: the map is bounded by the connection limits, and a peer
        // admitted since its connection came up stops counting at once.
        let unknown = self
            .inbound
            .values()
            .filter(|(_, p)| !self.is_known(p))
            .count();
        if unknown >= self.max_unknown as usize {
            return Err(Refused::Unknown {
                limit: self.max_unknown,
            });
        }
        Ok(())
    }
}

/// The IP address of a multiaddr's first IP component, if any.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for Guard {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    // The check waits for the established stage, where the PeerId is proven: at the
    // pending stage a reserved peer could not be told from the flood. Handshakes in
    // flight are bounded by `Config::max_pending_incoming`.
    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        match self.check(&peer, remote_addr) {
            Ok(()) => Ok(dummy::ConnectionHandler),
            Err(refused) => {
                let counter = match refused {
                    Refused::PerIp { .. } => &self.counters.connections_refused_per_ip,
                    Refused::Unknown { .. } => &self.counters.connections_refused_unknown,
                };
                bump(counter, 1);
                Err(ConnectionDenied::new(refused))
            }
        }
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // This node chose to dial; its own dialing policy bounds these.
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) if e.endpoint.is_listener() => {
                let ip = ip_of(e.endpoint.get_remote_address());
                self.inbound.insert(e.connection_id, (ip, e.peer_id));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.inbound.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/5000").parse().unwrap()
    }

    fn connect(guard: &mut Guard, peer: PeerId, ip: &str) -> Result<(), Refused> {
        guard.check(&peer, &addr(ip))?;
        let id = ConnectionId::new_unchecked(guard.inbound.len() + 1);
        guard.inbound.insert(id, (ip_of(&addr(ip)), peer));
        Ok(())
    }

    #[test]
    fn per_ip_cap_refuses_the_flood_but_not_trusted_peers() {
        let mut guard = Guard::new(2, 100, Arc::default());
        connect(&mut guard, PeerId::random(), "10.0.0.1").unwrap();
        connect(&mut guard, PeerId::random(), "10.0.0.1").unwrap();
        assert!(matches!(
            connect(&mut guard, PeerId::random(), "10.0.0.1"),
            Err(Refused::PerIp { limit: 2, .. })
        ));
        // Admission alone does not lift the per-IP cap.
        let foreign = PeerId::random();
        guard.admitted(foreign);
        assert!(connect(&mut guard, foreign, "10.0.0.1").is_err());
        // Another address has its own share.
        connect(&mut guard, PeerId::random(), "10.0.0.2").unwrap();
        let device = PeerId::random();
        guard.add_static(device);
        connect(&mut guard, device, "10.0.0.1").unwrap();
        let vouched = PeerId::random();
        guard.vouch(vouched);
        connect(&mut guard, vouched, "10.0.0.1").unwrap();
    }

    #[test]
    fn unknown_cap_spares_known_peers_and_admission_frees_a_slot() {
        let mut guard = Guard::new(100, 2, Arc::default());
        let first = PeerId::random();
        connect(&mut guard, first, "10.0.0.1").unwrap();
        connect(&mut guard, PeerId::random(), "10.0.0.2").unwrap();
        assert_eq!(
            connect(&mut guard, PeerId::random(), "10.0.0.3"),
            Err(Refused::Unknown { limit: 2 })
        );
        let known = PeerId::random();
        guard.admitted(known);
        connect(&mut guard, known, "10.0.0.4").unwrap();
        // Admitting the first unknown peer moves it out of the unknown slots.
        guard.admitted(first);
        connect(&mut guard, PeerId::random(), "10.0.0.5").unwrap();
        guard.forget(&known);
        assert!(!guard.is_known(&known));
    }

    #[test]
    fn remembered_peers_are_bounded() {
        let mut guard = Guard::new(1, 1, Arc::default());
        let first = PeerId::random();
        guard.admitted(first);
        for _ in 0..MAX_RESERVED_PEERS {
            guard.admitted(PeerId::random());
        }
        assert!(!guard.is_known(&first), "the oldest is forgotten");
        assert_eq!(guard.admitted.members.len(), MAX_RESERVED_PEERS);
        assert_eq!(guard.admitted.order.len(), MAX_RESERVED_PEERS);
    }
}
