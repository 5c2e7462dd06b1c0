//! Dialing policy: who dials whom, how often to retry, which duplicate connection to
//! drop, and the capped table of mDNS hints.
//!
//! Everything here is plain data and pure functions so the rules that decide whether two
//! nodes end up with exactly one connection can be tested without sockets.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// First retry delay after a failed dial or a dropped session.
pub(crate) const REDIAL_BASE: Duration = Duration::from_millis(250);

/// Most mDNS-discovered peers remembered at once; mDNS is unauthenticated, so a noisy
/// LAN must not grow this table without bound.
pub const MAX_DISCOVERED_PEERS: usize = 256;

/// Most addresses kept per discovered peer.
pub(crate) const MAX_ADDRS_PER_DISCOVERED_PEER: usize = 8;

/// Dial attempts made to a discovered peer before waiting for mDNS to report it again.
pub(crate) const MAX_DISCOVERED_DIAL_ATTEMPTS: u32 = 5;

/// How long a discovered peer the node rejected is left alone before dialing it again.
pub(crate) const REJECTED_COOLDOWN: Duration = Duration::from_secs(300);

/// Exponential backoff: `base, 2*base, 4*base, ...` capped at `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The wait before the next attempt, given the failures so far.
    pub(crate) fn delay(&self) -> Duration {
        // Cap the exponent so the shift cannot overflow; 2^16 * base is past any sane max.
        let factor = 1u32 << self.failures.min(16);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns the (longer) wait before the next attempt.
    pub(crate) fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay()
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// Whether `local` is the side that acts first in a symmetric situation.
///
/// Both ends evaluate this with the roles swapped and get opposite answers, which is what
/// makes the tie-breaks below agree without any message exchange.
pub(crate) fn is_smaller(local: &PeerId, remote: &PeerId) -> bool {
    local.to_bytes() < remote.to_bytes()
}

/// Which of a peer's connections this node should close so that exactly one survives.
///
/// Only the peer with the smaller PeerId closes duplicates; the other side never does. A
/// rule both ends applied on their own views could close different connections and leave
/// none, and one side deciding alone cannot disagree with itself. The smaller side is also
/// the one that opens the sync and ephemeral streams, so it knows which connection they
/// run on (`keep`) and keeps that one, so de-duplication never cuts a live stream.
/// Without such a hint it keeps its oldest connection (the lowest [`ConnectionId`]).
pub(crate) fn connections_to_close(
    local: &PeerId,
    remote: &PeerId,
    conns: &[ConnectionId],
    keep: Option<ConnectionId>,
) -> Vec<ConnectionId> {
    if conns.len() < 2 || !is_smaller(local, remote) {
        return Vec::new();
    }
    let Some(oldest) = conns.iter().min().copied() else {
        return Vec::new();
    };
    let keep = keep.filter(|k| conns.contains(k)).unwrap_or(oldest);
    conns.iter().copied().filter(|c| *c != keep).collect()
}

/// One mDNS hint.
#[derive(Debug)]
pub(crate) struct Discovered {
    pub(crate) addrs: Vec<Multiaddr>,
    /// When the peer was first heard of; the larger PeerId dials only after
    /// [`LARGER_SIDE_GRACE`] from then.
    pub(crate) first_seen: Instant,
    pub(crate) last_seen: Instant,
    pub(crate) backoff: Backoff,
    pub(crate) next_dial: Instant,
    pub(crate) dialing: Option<ConnectionId>,
    /// Set when the node rejected this peer; no automatic dial before then.
    pub(crate) cooldown_until: Option<Instant>,
    /// Set once a session with this peer was admitted: a device of the home (or of a paired
    /// home) that this node must be able to redial. Such entries are evicted last.
    pub(crate) admitted: bool,
}

/// The capped table of mDNS-discovered peers.
#[derive(Debug, Default)]
pub(crate) struct DiscoveredTable {
    peers: HashMap<PeerId, Discovered>,
}

impl DiscoveredTable {
    /// Records addresses for `peer`; returns true if the peer was not known before.
    ///
    /// When the table is full the least recently seen peer that was never admitted is
    /// evicted (the least recently seen of all only if every entry was admitted): a flood
    /// of fake announcements then only pushes out other strangers. A real neighbour
    /// announces itself once per query interval while a flood turns the whole table over
    /// within seconds, so recency alone would let a flood push out the home's own devices,
    /// which then could not be redialled after a dropped connection.
    pub(crate) fn insert(
        &mut self,
        peer: PeerId,
        addrs: impl IntoIterator<Item = Multiaddr>,
        now: Instant,
        redial_max: Duration,
    ) -> bool {
        let is_new = !self.peers.contains_key(&peer);
        if is_new && self.peers.len() >= MAX_DISCOVERED_PEERS {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, d)| (d.admitted, d.last_seen))
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
            }
        }
        let entry = self.peers.entry(peer).or_insert_with(|| Discovered {
            addrs: Vec::new(),
            first_seen: now,
            last_seen: now,
            backoff: Backoff::new(REDIAL_BASE, redial_max),
            next_dial: now,
            dialing: None,
            cooldown_until: None,
            admitted: false,
        });
        entry.last_seen = now;
        for addr in addrs {
            if entry.addrs.len() >= MAX_ADDRS_PER_DISCOVERED_PEER {
                break;
            }
            if !entry.addrs.contains(&addr) {
                entry.addrs.push(addr);
            }
        }
        // A fresh announcement after giving up earns a new round of attempts.
        if entry.backoff.failures() >= MAX_DISCOVERED_DIAL_ATTEMPTS {
            entry.backoff.reset();
            entry.next_dial = now;
        }
        is_new
    }

    pub(crate) fn remove(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Ends every rejection cooldown and gives those peers a fresh round of dial
    /// attempts from `now`. Returns how many were cooling down.
    pub(crate) fn retry_rejected(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for entry in self.peers.values_mut() {
            if entry.cooldown_until.take().is_some_and(|until| until > now) {
                n += 1;
                entry.backoff.reset();
                entry.next_dial = now;
            }
        }
        n
    }

    pub(crate) fn get_mut(&mut self, peer: &PeerId) -> Option<&mut Discovered> {
        self.peers.get_mut(peer)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PeerId, &Discovered)> {
        self.peers.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&PeerId, &mut Discovered)> {
        self.peers.iter_mut()
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

/// How long the larger PeerId of a pair waits for the smaller one to dial before dialling
/// itself. mDNS discovery is not always mutual: a node that starts after its neighbour's
/// query hears the neighbour, but the neighbour does not hear it until its next query,
/// minutes later. Without this fallback such a pair, with the larger side the only one
/// that knows, would never connect. It is short because that is exactly what a restarted
/// node sees: its start-up query hears every neighbour at once, none of them hears it, and
/// the pair should be connected again well within the 2 s a restart may take to heal.
/// Dialling from a fresh port (see `dial_peer`) keeps a dial that crosses the smaller
/// side's from failing; the duplicate is closed.
pub(crate) const LARGER_SIDE_GRACE: Duration = Duration::from_millis(300);

/// Whether this node should dial a discovered peer now.
///
/// The smaller PeerId dials a discovered peer, so two neighbours that hear each other's
/// announcements at the same moment do not both dial (the simultaneous-open case that
/// fails the Noise handshake). The larger one dials only if no connection came up within
/// [`LARGER_SIDE_GRACE`], and from a fresh port, as every dial here does.
pub(crate) fn should_dial_discovered(
    local: &PeerId,
    remote: &PeerId,
    entry: &Discovered,
    connected: bool,
    now: Instant,
) -> bool {
    (is_smaller(local, remote) || now >= entry.first_seen + LARGER_SIDE_GRACE)
        && !connected
        && entry.dialing.is_none()
        && !entry.addrs.is_empty()
        && entry.backoff.failures() < MAX_DISCOVERED_DIAL_ATTEMPTS
        && entry.next_dial <= now
        && entry.cooldown_until.is_none_or(|until| until <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    fn ordered_pair() -> (PeerId, PeerId) {
        let a = PeerId::random();
        let b = PeerId::random();
        if is_smaller(&a, &b) { (a, b) } else { (b, a) }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(450));
        assert_eq!(b.delay(), Duration::from_millis(100));
        assert_eq!(b.fail(), Duration::from_millis(200));
        assert_eq!(b.fail(), Duration::from_millis(400));
        assert_eq!(b.fail(), Duration::from_millis(450));
        for _ in 0..100 {
            b.fail();
        }
        assert_eq!(
            b.delay(),
            Duration::from_millis(450),
            "no overflow after many failures"
        );
        b.reset();
        assert_eq!(b.delay(), Duration::from_millis(100));
    }

    #[test]
    fn tie_break_is_antisymmetric() {
        let (small, large) = ordered_pair();
        assert!(is_smaller(&small, &large));
        assert!(!is_smaller(&large, &small));
        assert!(!is_smaller(&small, &small));
    }

    /// Simulates both ends of a mutual dial: each sees the same two TCP connections under
    /// its own local ids.
    #[test]
    fn mutual_dial_leaves_exactly_one_connection() {
        let (small, large) = ordered_pair();
        // X and Y are the two connections; the small side knows them as 1 and 2, the
        // large side as 7 and 8.
        let small_closes = connections_to_close(&small, &large, &[id(1), id(2)], None);
        let large_closes = connections_to_close(&large, &small, &[id(7), id(8)], None);
        assert_eq!(small_closes, vec![id(2)], "the small side keeps its oldest");
        assert!(large_closes.is_empty(), "the large side never closes");
    }

    #[test]
    fn the_connection_carrying_the_streams_is_kept() {
        let (small, large) = ordered_pair();
        let conns = [id(3), id(5), id(9)];
        assert_eq!(
            connections_to_close(&small, &large, &conns, Some(id(5))),
            vec![id(3), id(9)]
        );
        // A stale hint (that connection is gone) falls back to the oldest.
        assert_eq!(
            connections_to_close(&small, &large, &conns, Some(id(4))),
            vec![id(5), id(9)]
        );
        assert!(connections_to_close(&large, &small, &conns, Some(id(5))).is_empty());
    }

    #[test]
    fn a_single_connection_is_never_closed() {
        let (small, large) = ordered_pair();
        assert!(connections_to_close(&small, &large, &[id(1)], None).is_empty());
        assert!(connections_to_close(&large, &small, &[id(1)], Some(id(2))).is_empty());
    }

    /// A flood of fresh announcements, each newer than the home's device was last heard,
    /// fills the table many times over; the admitted device stays and can be redialled.
    #[test]
    fn a_flood_of_announcements_never_evicts_an_admitted_peer() {
        let mut table = DiscoveredTable::default();
        let start = Instant::now();
        let device = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        table.insert(device, [addr.clone()], start, Duration::from_secs(1));
        table.get_mut(&device).unwrap().admitted = true;
        for i in 0..4 * MAX_DISCOVERED_PEERS {
            let now = start + Duration::from_millis(i as u64 + 1);
            table.insert(
                PeerId::random(),
                [addr.clone()],
                now,
                Duration::from_secs(1),
            );
            assert!(table.len() <= MAX_DISCOVERED_PEERS);
        }
        assert_eq!(table.len(), MAX_DISCOVERED_PEERS);
        assert!(
            table.get_mut(&device).is_some(),
            "the admitted device was evicted"
        );
    }

    #[test]
    fn discovered_table_is_capped_and_evicts_the_stalest() {
        let mut table = DiscoveredTable::default();
        let start = Instant::now();
        let first = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        table.insert(first, [addr.clone()], start, Duration::from_secs(1));
        for i in 0..MAX_DISCOVERED_PEERS {
            let now = start + Duration::from_millis(i as u64 + 1);
            table.insert(
                PeerId::random(),
                [addr.clone()],
                now,
                Duration::from_secs(1),
            );
        }
        assert_eq!(table.len(), MAX_DISCOVERED_PEERS);
        assert!(
            table.get_mut(&first).is_none(),
            "the stalest entry was evicted"
        );
    }

    #[test]
    fn discovered_addresses_are_capped_and_deduplicated() {
        let mut table = DiscoveredTable::default();
        let peer = PeerId::random();
        let now = Instant::now();
        let addrs: Vec<Multiaddr> = (0..20)
            .map(|p| {
                format!("/ip4/127.0.0.1/tcp/{}", 1000 + p % 12)
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(table.insert(peer, addrs.clone(), now, Duration::from_secs(1)));
        assert!(!table.insert(peer, addrs, now, Duration::from_secs(1)));
        let entry = table.get_mut(&peer).unwrap();
        assert_eq!(entry.addrs.len(), MAX_ADDRS_PER_DISCOVERED_PEER);
    }

    #[test]
    fn only_the_smaller_peer_dials_a_discovered_peer() {
        let (small, large) = ordered_pair();
        let now = Instant::now();
        let mut table = DiscoveredTable::default();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        table.insert(large, [addr.clone()], now, Duration::from_secs(1));
        table.insert(small, [addr], now, Duration::from_secs(1));
        let to_large = table.get_mut(&large).unwrap();
        assert!(should_dial_discovered(&small, &large, to_large, false, now));
        assert!(
            !should_dial_discovered(&small, &large, to_large, true, now),
            "connected"
        );
        to_large.cooldown_until = Some(now + REJECTED_COOLDOWN);
        assert!(
            !should_dial_discovered(&small, &large, to_large, false, now),
            "cooling down"
        );
        // A pairing makes the rejected peer worth dialling again at once.
        assert_eq!(table.retry_rejected(now), 1);
        let to_large = table.get_mut(&large).unwrap();
        assert!(should_dial_discovered(&small, &large, to_large, false, now));
        assert_eq!(table.retry_rejected(now), 0);
        let to_large = table.get_mut(&large).unwrap();
        to_large.cooldown_until = Some(now + REJECTED_COOLDOWN);
        let to_small = table.get_mut(&small).unwrap();
        assert!(!should_dial_discovered(
            &large, &small, to_small, false, now
        ));
        // Discovery can be one-sided: if the smaller peer has not connected after the
        // grace period, the larger one dials after all.
        let after_grace = now + LARGER_SIDE_GRACE;
        assert!(should_dial_discovered(
            &large,
            &small,
            to_small,
            false,
            after_grace
        ));
        assert!(!should_dial_discovered(
            &large,
            &small,
            to_small,
            true,
            after_grace
        ));
    }

    #[test]
    fn discovered_dials_give_up_until_the_peer_is_announced_again() {
        let (small, large) = ordered_pair();
        let now = Instant::now();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let mut table = DiscoveredTable::default();
        table.insert(large, [addr.clone()], now, Duration::from_secs(1));
        let entry = table.get_mut(&large).unwrap();
        for _ in 0..MAX_DISCOVERED_DIAL_ATTEMPTS {
            entry.backoff.fail();
        }
        let later = now + Duration::from_secs(3600);
        assert!(!should_dial_discovered(&small, &large, entry, false, later));
        table.insert(large, [addr], later, Duration::from_secs(1));
        let entry = table.get_mut(&large).unwrap();
        assert!(should_dial_discovered(&small, &large, entry, false, later));
    }
}
