//! Upkeep: the periodic tick that serves every deadline, liveness by ping, identify and
//! mDNS reports, and the shared budget for log lines that strangers can cause.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, identify, mdns, ping};
use tracing::{debug, info, trace, warn};

use super::{Admission, EventLoop};
use crate::behaviour::StreamKind;
use crate::event::{DisconnectReason, Event, bump};
use crate::log_limit::Verdict;

/// How often timers (hello deadlines, redials, stream reopens) are checked.
pub(super) const MAINTENANCE_TICK: Duration = Duration::from_millis(100);

impl EventLoop {
    /// The periodic pass over every timer: hello deadlines, dead connections, redials and
    /// stream reopens. One coarse tick instead of a timer per peer keeps the loop simple,
    /// and 100 ms is far below every deadline it serves.
    pub(super) fn maintain(&mut self, now: Instant) {
        self.expire_hellos(now);
        if let Some(suppressed) = self.stranger_logs.flush(now) {
            warn!(
                suppressed,
                "log lines about unadmitted peers were suppressed"
            );
        }
        self.prune_peer_budgets();
        let dead: Vec<(PeerId, ConnectionId)> = self
            .peers
            .iter()
            .flat_map(|(peer, s)| {
                s.conns
                    .iter()
                    .filter(|(_, c)| {
                        c.ping_supported
                            && !c.close_requested
                            && now.saturating_duration_since(c.last_alive) > self.liveness_timeout
                    })
                    .map(|(id, _)| (*peer, *id))
            })
            .collect();
        for (peer, connection) in dead {
            info!(%peer, %connection, silent_for = ?self.liveness_timeout, "no ping answered; closing connection");
            self.close_dead_connection(peer, connection);
        }
        self.redial_statics(now);
        self.dial_discovered(now);
        self.expire_pairs(now);
        let admitted: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, s)| matches!(s.admission, Admission::Admitted(_)))
            .map(|(p, _)| *p)
            .collect();
        for peer in admitted {
            for kind in StreamKind::ALL {
                self.drive_channel(peer, kind);
            }
        }
    }

    /// Whether a log line caused by an unadmitted or misbehaving peer may be written.
    /// Anyone on the LAN can cause these at will, so they share one budget; the first
    /// line let through after some were held back says how many.
    pub(super) fn stranger_log(&mut self) -> bool {
        match self.stranger_logs.check(Instant::now()) {
            Verdict::Log { suppressed } => {
                if suppressed > 0 {
                    warn!(
                        suppressed,
                        "log lines about unadmitted peers were suppressed"
                    );
                }
                true
            }
            Verdict::Suppress => {
                bump(&self.counters.log_lines_suppressed, 1);
                false
            }
        }
    }

    /// Records a ping result on its connection; a failed ping closes the connection.
    pub(super) fn on_ping(&mut self, event: ping::Event) {
        let ping::Event {
            peer,
            connection,
            result,
        } = event;
        let conn = self
            .peers
            .get_mut(&peer)
            .and_then(|s| s.conns.get_mut(&connection));
        match result {
            Ok(rtt) => {
                trace!(%peer, ?rtt, "ping");
                if let Some(conn) = conn {
                    conn.last_alive = Instant::now();
                }
            }
            Err(ping::Failure::Unsupported) => {
                debug!(%peer, "peer does not answer pings");
                if let Some(conn) = conn {
                    conn.ping_supported = false;
                }
            }
            Err(failure) => {
                debug!(%peer, %connection, %failure, "ping failed; closing connection");
                self.close_dead_connection(peer, connection);
            }
        }
    }

    /// Closes a connection that stopped answering pings, recording why if it was the
    /// peer's last one.
    pub(super) fn close_dead_connection(&mut self, peer: PeerId, connection: ConnectionId) {
        if let Some(state) = self.peers.get_mut(&peer) {
            let last = state.conns.len() == 1;
            if let Some(conn) = state.conns.get_mut(&connection) {
                conn.close_requested = true;
                if last {
                    state.closing.get_or_insert(DisconnectReason::PingTimeout);
                }
            }
        }
        self.swarm.close_connection(connection);
    }

    /// Logs what a peer says it runs; nothing here depends on it.
    pub(super) fn on_identify(&self, event: identify::Event) {
        if let identify::Event::Received { peer_id, info, .. } = event {
            debug!(
                peer = %peer_id,
                agent = %info.agent_version,
                protocol = %info.protocol_version,
                "identified peer"
            );
        }
    }

    /// Takes in discovered peers, and forgets expired ones that are not connected.
    pub(super) fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(list) => self.on_discovered(list),
            mdns::Event::Expired(list) => {
                for (peer, _) in list {
                    if !self.peers.contains_key(&peer) {
                        self.discovered.remove(&peer);
                    }
                }
            }
        }
    }

    /// Folds an mDNS report into the capped hint table. Only new peers are reported to
    /// the node, since mDNS repeats itself on every query.
    fn on_discovered(&mut self, list: Vec<(PeerId, Multiaddr)>) {
        let now = Instant::now();
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in list {
            if peer != self.local {
                by_peer.entry(peer).or_default().push(addr);
            }
        }
        for (peer, addrs) in by_peer {
            if self
                .discovered
                .insert(peer, addrs.clone(), now, self.redial_max)
            {
                debug!(%peer, ?addrs, known = self.discovered.len(), "discovered peer");
                self.emit(Event::Discovered { peer, addrs });
            }
        }
        self.dial_discovered(now);
    }
}
