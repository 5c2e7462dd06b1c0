//! Prometheus metrics, served as text on `/metrics` (behind the API token unless `--metrics-open`).
//!
//! Counters that only the core, the engine or the network know (documents, sync errors,
//! lag) are read from them at each scrape and written into the registry's gauges and
//! counters there; counters with a natural place to count (frames, events, API requests)
//! are counted as they happen. libp2p's own metrics (connections, bandwidth per
//! transport, identify, ping) sit in the same registry under the `libp2p` prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The sync stream's protocol, the label of frames counted by the core.
pub(crate) const SYNC_PROTOCOL: &str = "/hearth/sync/1";
/// The pairing protocol.
pub(crate) const PAIR_PROTOCOL: &str = "/hearth/pair/1";
/// The ephemeral stream's protocol (presence heartbeats).
pub(crate) const EPHEMERAL_PROTOCOL: &str = "/hearth/ephemeral/1";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FlowLabels {
    pub(crate) protocol: &'static str,
    pub(crate) direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub(crate) direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AdmittedLabels {
    pub(crate) admitted: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PeerLabels {
    pub(crate) peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabels {
    pub(crate) name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    /// `GET`, `PUT`, `POST`, `DELETE` or `OTHER`, never the raw method text.
    pub(crate) method: &'static str,
    pub(crate) route: String,
    pub(crate) status: u16,
}

/// Seed 001's metrics (`connections_total`, `active_users_total`, `messages_sent_total`,
/// `notifications_sent_total`, `rooms_active_total`, unprefixed as the seed names them),
/// and Hearth's gauges of seed clients and active rooms.
#[derive(Default)]
pub(crate) struct SeedMetrics {
    pub(crate) connections: Counter,
    pub(crate) active_users: Gauge,
    pub(crate) messages_sent: Counter,
    pub(crate) notifications_sent: Counter,
    pub(crate) rooms_active: Gauge,
    pub(crate) ws_clients: Gauge,
}

impl SeedMetrics {
    fn register(&self, top: &mut Registry) {
        top.register(
            "connections",
            "Seed WebSocket connections opened",
            self.connections.clone(),
        );
        top.register(
            "active_users_total",
            "Users with a seed WebSocket open on this node",
            self.active_users.clone(),
        );
        top.register(
            "messages_sent",
            "Chat messages sent through the seed protocol",
            self.messages_sent.clone(),
        );
        top.register(
            "notifications_sent",
            "Notifications sent",
            self.notifications_sent.clone(),
        );
        top.register(
            "rooms_active_total",
            "Rooms with at least one member",
            self.rooms_active.clone(),
        );
        let hearth = top.sub_registry_with_prefix("hearth");
        hearth.register(
            "ws_clients",
            "Seed WebSocket clients connected to this node",
            self.ws_clients.clone(),
        );
        hearth.register(
            "rooms_active",
            "Rooms with at least one member",
            self.rooms_active.clone(),
        );
    }
}

/// Every metric of the node, and the registry that encodes them.
pub(crate) struct Metrics {
    /// Shared with the network layer, which registers libp2p's metrics in it.
    registry: Arc<Mutex<Registry>>,
    pub(crate) connected_peers: Family<AdmittedLabels, Gauge>,
    pub(crate) documents: Gauge,
    pub(crate) entities_shared: Family<DirectionLabels, Gauge>,
    pub(crate) sync_messages: Family<FlowLabels, Counter>,
    pub(crate) sync_bytes: Family<FlowLabels, Counter>,
    pub(crate) sync_errors: Family<KindLabels, Counter>,
    pub(crate) sync_lag_ms: Family<PeerLabels, Gauge>,
    pub(crate) sync_docs_behind: Family<PeerLabels, Gauge>,
    pub(crate) events: Family<EventLabels, Counter>,
    pub(crate) api_requests: Family<RouteLabels, Counter>,
    /// Seed 001's metrics, under its names, and the WebSocket gauges beside them.
    pub(crate) seed: SeedMetrics,
    /// The last totals of refusals for size seen from the core (engine and frames) and
    /// from the network, which arrive separately but share `kind="oversized"`.
    oversized_core: AtomicU64,
    oversized_net: AtomicU64,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut top = Registry::default();
        let registry = top.sub_registry_with_prefix("hearth");
        let m = Self {
            registry: Arc::new(Mutex::new(Registry::default())),
            connected_peers: Family::default(),
            documents: Gauge::default(),
            entities_shared: Family::default(),
            sync_messages: Family::default(),
            sync_bytes: Family::default(),
            sync_errors: Family::default(),
            sync_lag_ms: Family::default(),
            sync_docs_behind: Family::default(),
            events: Family::default(),
            api_requests: Family::default(),
            seed: SeedMetrics::default(),
            oversized_core: AtomicU64::new(0),
            oversized_net: AtomicU64::new(0),
        };
        registry.register(
            "connected_peers",
            "Peers with an open connection, by whether they are admitted devices of this home",
            m.connected_peers.clone(),
        );
        registry.register("documents", "Documents loaded", m.documents.clone());
        registry.register(
            "entities_shared",
            "Entities shared with other homes (out) and from other homes (in)",
            m.entities_shared.clone(),
        );
        registry.register(
            "sync_messages",
            "Sync frames and pairing requests, by protocol and direction",
            m.sync_messages.clone(),
        );
        registry.register(
            "sync_bytes",
            "Bytes of sync frames, by protocol and direction",
            m.sync_bytes.clone(),
        );
        registry.register(
            "sync_errors",
            "Sync failures by kind",
            m.sync_errors.clone(),
        );
        registry.register(
            "sync_lag_ms",
            "Milliseconds since a frame last came from each admitted peer",
            m.sync_lag_ms.clone(),
        );
        registry.register(
            "sync_docs_behind",
            "Documents whose sync session with each admitted peer is not in sync",
            m.sync_docs_behind.clone(),
        );
        registry.register("events", "Events announced, by name", m.events.clone());
        registry.register(
            "api_requests",
            "Local API requests by method, route and status",
            m.api_requests.clone(),
        );
        m.seed.register(&mut top);
        *m.lock() = top;
        // Every direction and kind shows from the start, at zero, so dashboards and
        // alerts see the series before the first traffic.
        for direction in ["in", "out"] {
            let _ = m
                .entities_shared
                .get_or_create(&DirectionLabels { direction });
            for protocol in [SYNC_PROTOCOL, PAIR_PROTOCOL, EPHEMERAL_PROTOCOL] {
                let _ = m.sync_messages.get_or_create(&FlowLabels {
                    protocol,
                    direction,
                });
                let _ = m.sync_bytes.get_or_create(&FlowLabels {
                    protocol,
                    direction,
                });
            }
        }
        m
    }

    /// The registry, for the network layer to add libp2p's metrics to.
    pub(crate) fn registry(&self) -> Arc<Mutex<Registry>> {
        self.registry.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while encoding leaves nothing half-written that matters here.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what is not counted as it happens from the core and the network, then
    /// encodes the whole registry as OpenMetrics text. A core or network that does not
    /// answer leaves its figures as they were at the last scrape.
    pub(crate) async fn scrape(
        &self,
        core: &crate::core::CoreHandle,
        net: &hearth_net::Handle,
    ) -> Result<String, crate::Error> {
        match core
            .call(|reply| crate::core::NodeRequest::SyncReport { reply })
            .await
        {
            Ok(Ok(report)) => self.observe_core(&report),
            Ok(Err(e)) | Err(e) => tracing::warn!(error = %e, "metrics: core did not report"),
        }
        if let Ok(peers) = net.connected_peers().await {
            self.observe_net(&net.metrics(), &peers);
        }
        self.encode()
            .map_err(|_| crate::Error::Internal("metrics could not be encoded".into()))
    }

    /// The whole registry as OpenMetrics text.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.lock())?;
        Ok(text)
    }

    /// A sync frame arrived.
    pub(crate) fn frame_in(&self, bytes: usize) {
        self.flow(SYNC_PROTOCOL, "in", bytes);
    }

    /// A sync frame was queued to a peer.
    pub(crate) fn frame_out(&self, bytes: usize) {
        self.flow(SYNC_PROTOCOL, "out", bytes);
    }

    /// An ephemeral message arrived (`true`) or was queued to a peer (`false`).
    pub(crate) fn ephemeral(&self, incoming: bool, bytes: usize) {
        self.flow(
            EPHEMERAL_PROTOCOL,
            if incoming { "in" } else { "out" },
            bytes,
        );
    }

    /// A pairing request arrived: its bytes (the messages are counted by the network
    /// layer, which also sees requests refused before they reach the core).
    pub(crate) fn pair_in_bytes(&self, bytes: usize) {
        self.sync_bytes
            .get_or_create(&FlowLabels {
                protocol: PAIR_PROTOCOL,
                direction: "in",
            })
            .inc_by(bytes as u64);
    }

    /// A pairing answer went out.
    pub(crate) fn pair_out(&self, bytes: usize) {
        self.flow(PAIR_PROTOCOL, "out", bytes);
    }

    fn flow(&self, protocol: &'static str, direction: &'static str, bytes: usize) {
        let labels = FlowLabels {
            protocol,
            direction,
        };
        self.sync_messages.get_or_create(&labels).inc();
        self.sync_bytes.get_or_create(&labels).inc_by(bytes as u64);
    }

    /// An event was announced.
    pub(crate) fn event(&self, name: &'static str) {
        self.events.get_or_create(&EventLabels { name }).inc();
    }

    /// Records what the core reported at a scrape.
    pub(crate) fn observe_core(&self, report: &crate::core::SyncReport) {
        self.documents
            .set(i64::try_from(report.documents).unwrap_or(i64::MAX));
        let gauge = |f: &Family<DirectionLabels, Gauge>, direction, v: u64| {
            f.get_or_create(&DirectionLabels { direction })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.entities_shared, "out", report.entities_shared_out);
        gauge(&self.entities_shared, "in", report.entities_shared_in);
        // A peer that left drops its series rather than freezing at its last value.
        self.sync_lag_ms.clear();
        self.sync_docs_behind.clear();
        for p in &report.peers {
            let labels = PeerLabels {
                peer: p.peer.clone(),
            };
            if let Some(ms) = p.last_heard_ms {
                self.sync_lag_ms
                    .get_or_create(&labels)
                    .set(i64::try_from(ms).unwrap_or(i64::MAX));
            }
            self.sync_docs_behind
                .get_or_create(&labels)
                .set(i64::try_from(p.docs_behind).unwrap_or(i64::MAX));
        }
        let e = &report.engine;
        for (kind, value) in [
            ("session_reset", e.session_resets),
            ("session_restart", e.session_restarts),
            ("automerge_panic", e.panics_caught),
            ("compressed_refused", e.compressed_refused),
            ("schema_violation", e.schema_violations),
            ("push_evicted", e.pushes_evicted),
        ] {
            self.error_total(kind, value);
        }
        let core = e.oversized.saturating_add(report.frames_oversized);
        self.oversized_core.store(core, Ordering::Relaxed);
        self.oversized_total();
    }

    /// Raises `kind="oversized"` to every refusal for size: sync messages and pushes the
    /// engine would not generate or accept, frames the core would not send or decode,
    /// and frames the network refused on arrival.
    fn oversized_total(&self) {
        let total = self
            .oversized_core
            .load(Ordering::Relaxed)
            .saturating_add(self.oversized_net.load(Ordering::Relaxed));
        self.error_total("oversized", total);
    }

    /// Records what the network reported at a scrape.
    pub(crate) fn observe_net(&self, net: &hearth_net::Metrics, peers: &[hearth_net::PeerInfo]) {
        let admitted = peers.iter().filter(|p| p.admitted).count();
        for (label, n) in [("true", admitted), ("false", peers.len() - admitted)] {
            self.connected_peers
                .get_or_create(&AdmittedLabels { admitted: label })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        raise_to(
            &self.sync_messages.get_or_create(&FlowLabels {
                protocol: PAIR_PROTOCOL,
                direction: "in",
            }),
            net.pair_requests_received,
        );
        for (kind, value) in [
            ("malformed_frame", net.malformed_frames),
            ("slow_peer_dropped", net.slow_peers_dropped),
            ("dial_failure", net.dial_failures),
            ("hello_timeout", net.hello_timeouts),
            ("pair_request_refused", net.pair_requests_refused),
            ("pair_request_malformed", net.pair_requests_malformed),
        ] {
            self.error_total(kind, value);
        }
        self.oversized_net
            .store(net.oversized_frames, Ordering::Relaxed);
        self.oversized_total();
    }

    fn error_total(&self, kind: &'static str, total: u64) {
        raise_to(&self.sync_errors.get_or_create(&KindLabels { kind }), total);
    }

    /// Counts one API request. The caller maps method and route onto fixed sets.
    #[cfg(feature = "api")]
    pub(crate) fn api_request(&self, method: &'static str, route: &str, status: u16) {
        self.api_requests
            .get_or_create(&RouteLabels {
                method,
                route: route.to_string(),
                status,
            })
            .inc();
    }
}

/// Moves a counter up to a total kept elsewhere (counters only go up).
fn raise_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_totals_and_encode() {
        let m = Metrics::new();
        m.frame_in(100);
        m.event("entity.changed");
        #[cfg(feature = "api")]
        m.api_request("GET", "/api/status", 200);
        m.error_total("oversized", 3);
        m.error_total("oversized", 2);
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "hearth_sync_bytes_total{protocol=\"/hearth/sync/1\",direction=\"in\"} 100"
            ),
            "{text}"
        );
        assert!(
            text.contains("hearth_events_total{name=\"entity.changed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hearth_sync_errors_total{kind=\"oversized\"} 3"),
            "{text}"
        );
        #[cfg(feature = "api")]
        assert!(text.contains("route=\"/api/status\""), "{text}");
    }

    #[test]
    fn oversized_adds_the_engine_the_core_and_the_network() {
        let m = Metrics::new();
        let mut report = crate::core::SyncReport::default();
        report.engine.oversized = 2;
        report.frames_oversized = 1;
        m.observe_core(&report);
        let mut net = hearth_net::Metrics::default();
        net.oversized_frames = 4;
        m.observe_net(&net, &[]);
        // A later scrape with the same totals adds nothing.
        m.observe_core(&report);
        let text = m.encode().unwrap();
        assert!(
            text.contains("hearth_sync_errors_total{kind=\"oversized\"} 7"),
            "{text}"
        );
    }
}
