//! The core actor: owns the Automerge documents (through `hearth_crdt::Engine`) and
//! persists them through the store. API handlers and library handles talk to it over a
//! bounded channel; each request carries a oneshot reply.
//!
//! Writes are acknowledged after their chunks are flushed. The actor does not wait for
//! that flush itself: it hands the batch to the storage thread (which group-commits
//! whatever is queued) and moves on, so one slow flush never stalls other requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_crdt::{DocId, Engine};
use hearth_net::PeerClass;
use hearth_storage::{Batch, Keyspace, StoreHandle};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Error;
pub(crate) mod durability;
pub(crate) mod effects;
pub(crate) mod quarantine;
pub(crate) mod send_gate;
pub(crate) use durability::MAX_PERSISTS_IN_FLIGHT;
#[cfg(feature = "test-hooks")]
pub(crate) mod hooks;
pub(crate) mod keyring;
mod load;
mod outputs;
pub(crate) mod resident;
pub(crate) mod status;
#[cfg(test)]
pub(crate) mod testing;

use crate::entities::batching;
use crate::pairing::service as pairing;
use crate::peers::{admission as peers, heartbeat};
use crate::revocation::set as revocations;
use crate::rooms::service as rooms;
use crate::sharing::service as sharing;

use hearth_crdt::wire::Frame;

use crate::home::HomeRecord;
use crate::records::HOME_KEY;
use crate::trust::keys::{DeviceSecret, DocKey};
use keyring::Keyring;

/// Requests queued for the core before callers wait.
const CORE_QUEUE: usize = 256;
/// Events buffered per subscriber before it starts missing some.
pub const CHANGE_BUFFER: usize = 1024;
/// Entries read per page while loading documents at start.
const LOAD_PAGE: usize = 4096;
/// How long a caller waits for the core to answer one request. Writes answer within the
/// store's own request limit; this is the backstop for a core that is stuck or swamped.
pub(crate) const CORE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Read jobs (history listings, entity lists) computing at once, off the core. More
/// wait their turn, each holding only its snapshot.
const READ_JOBS: usize = 2;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the core: one service's own request, routed to that service alone.
pub(crate) enum Request {
    Node(NodeRequest),
    Entities(crate::entities::service::EntityRequest),
    Rooms(crate::rooms::service::RoomRequest),
    Pairing(crate::pairing::service::PairingRequest),
    Sharing(crate::sharing::service::SharingRequest),
    Revocation(crate::revocation::service::RevocationRequest),
    Locks(crate::locks::service::LockRequest),
    Propagation(crate::propagation::service::PropagationRequest),
    Users(crate::users::service::UserRequest),
    Alerts(crate::alerts::service::AlertRequest),
    Sessions(crate::sessions::service::SessionRequest),
    Activities(crate::activities::service::ActivityRequest),
    Playback(crate::playback::service::PlaybackRequest),
    #[cfg(feature = "test-hooks")]
    Hooks(hooks::HookRequest),
    /// Unit tests only: run a closure on the core (see `testing.rs`).
    #[cfg(test)]
    OnCore(testing::OnCore),
}

macro_rules! route {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Request {
            fn from(request: $ty) -> Self {
                Request::$variant(request)
            }
        })*
    };
}
route!(
    Node(NodeRequest),
    Entities(crate::entities::service::EntityRequest),
    Rooms(crate::rooms::service::RoomRequest),
    Pairing(crate::pairing::service::PairingRequest),
    Sharing(crate::sharing::service::SharingRequest),
    Revocation(crate::revocation::service::RevocationRequest),
    Locks(crate::locks::service::LockRequest),
    Propagation(crate::propagation::service::PropagationRequest),
    Users(crate::users::service::UserRequest),
    Alerts(crate::alerts::service::AlertRequest),
    Sessions(crate::sessions::service::SessionRequest),
    Activities(crate::activities::service::ActivityRequest),
    Playback(crate::playback::service::PlaybackRequest),
);
#[cfg(feature = "test-hooks")]
route!(Hooks(hooks::HookRequest));

impl Request {
    /// Whether the request writes (and so is refused while the store is failed).
    fn is_write(&self) -> bool {
        match self {
            Request::Node(r) => matches!(r, NodeRequest::Repair { drop: true, .. }),
            Request::Entities(r) => r.is_write(),
            Request::Rooms(r) => r.is_write(),
            Request::Pairing(r) => r.is_write(),
            Request::Sharing(r) => r.is_write(),
            Request::Revocation(r) => r.is_write(),
            Request::Locks(r) => r.is_write(),
            Request::Propagation(r) => r.is_write(),
            Request::Users(r) => r.is_write(),
            Request::Alerts(r) => r.is_write(),
            Request::Sessions(r) => r.is_write(),
            Request::Activities(r) => r.is_write(),
            Request::Playback(r) => r.is_write(),
            #[cfg(feature = "test-hooks")]
            Request::Hooks(r) => r.is_write(),
            #[cfg(test)]
            Request::OnCore(_) => false,
        }
    }

    /// Answers a write request with `error` without running it.
    fn refuse(self, error: Error) {
        match self {
            Request::Node(NodeRequest::Repair { reply, .. }) => {
                let _ = reply.send(Err(error));
            }
            // Only a repair that drops records writes.
            Request::Node(_) => {}
            Request::Entities(r) => r.refuse(error),
            Request::Rooms(r) => r.refuse(error),
            Request::Pairing(r) => r.refuse(error),
            Request::Sharing(r) => r.refuse(error),
            Request::Revocation(r) => r.refuse(error),
            Request::Locks(r) => r.refuse(error),
            Request::Propagation(r) => r.refuse(error),
            Request::Users(r) => r.refuse(error),
            Request::Alerts(r) => r.refuse(error),
            Request::Sessions(r) => r.refuse(error),
            Request::Activities(r) => r.refuse(error),
            Request::Playback(r) => r.refuse(error),
            #[cfg(feature = "test-hooks")]
            Request::Hooks(r) => r.refuse(error),
            #[cfg(test)]
            Request::OnCore(_) => {}
        }
    }
}

/// Requests about the node itself: readiness, counters, the store's repair.
pub(crate) enum NodeRequest {
    /// Readiness: answered at once by a core that is running and reading its queue.
    #[cfg_attr(not(feature = "api"), expect(dead_code, reason = "only the API asks"))]
    Ping {
        reply: Reply<()>,
    },
    Counters {
        reply: Reply<SyncCounters>,
    },
    /// Per-peer sync lag and document counts, for status and metrics.
    SyncReport {
        reply: Reply<SyncReport>,
    },
    /// This home's devices as the home document lists them, for the dashboard.
    #[cfg_attr(not(feature = "api"), expect(dead_code, reason = "only the API asks"))]
    Devices {
        reply: Reply<Vec<status::DeviceInfo>>,
    },
    /// The store, for reads that need no core state (the audit log).
    Store {
        reply: Reply<StoreHandle>,
    },
    /// Documents quarantined at start; with `drop`, their damaged records are deleted.
    #[cfg_attr(not(feature = "api"), expect(dead_code, reason = "only the API asks"))]
    Repair {
        drop: bool,
        reply: Reply<quarantine::RepairReport>,
    },
}

/// How far each admitted device is behind, and what this device holds.
#[derive(Clone, Debug, Default)]
pub(crate) struct SyncReport {
    /// Per admitted peer: PeerId, ms since a frame last came from it (`None`: nothing yet),
    /// and documents whose sync session with it is not in sync.
    pub(crate) peers: Vec<PeerLag>,
    /// Documents loaded.
    pub(crate) documents: u64,
    /// Entities of this home shared with other homes.
    pub(crate) entities_shared_out: u64,
    /// Entities of other homes shared with this one.
    pub(crate) entities_shared_in: u64,
    /// Engine counters.
    pub(crate) engine: hearth_crdt::EngineStats,
    /// Frames refused for size outside the engine (see [`SyncCounters::frames_oversized`]).
    pub(crate) frames_oversized: u64,
}

/// How far this device is from the home's devices it is connected to ([`crate::Node::sync_lag`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncLag {
    /// Documents this device holds.
    pub documents: u64,
    /// Per admitted peer: its PeerId and the documents not yet in sync with it.
    pub peers: Vec<(String, u64)>,
}

/// One admitted peer's lag.
#[derive(Clone, Debug)]
pub(crate) struct PeerLag {
    pub(crate) peer: String,
    pub(crate) last_heard_ms: Option<u64>,
    pub(crate) docs_behind: u64,
}

/// Cheap handle to the core actor.
#[derive(Clone)]
pub(crate) struct CoreHandle {
    tx: mpsc::Sender<Request>,
    /// Test hook: while true, the core reads no network events (see
    /// `Node::debug_stall_network_reads`).
    #[cfg(feature = "test-hooks")]
    pub(crate) stall_net: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    /// Every event (entities, rooms, presence, peers), for [`crate::Node::events`].
    pub(crate) node_events: broadcast::Sender<crate::events::Event>,
    /// Slots for store batches in flight; shutdown takes them all before closing the store.
    pub(crate) persists: std::sync::Arc<tokio::sync::Semaphore>,
}

impl CoreHandle {
    /// Sends a request and waits for its reply, at most [`CORE_CALL_TIMEOUT`].
    pub(crate) async fn call<T, R: Into<Request>>(
        &self,
        make: impl FnOnce(Reply<T>) -> R,
    ) -> Result<Result<T, Error>, Error> {
        let (reply, rx) = oneshot::channel();
        let asked = async {
            self.tx
                .send(make(reply).into())
                .await
                .map_err(|_| Error::Stopped)?;
            rx.await.map_err(|_| Error::Stopped)
        };
        tokio::time::timeout(CORE_CALL_TIMEOUT, asked)
            .await
            .map_err(|_| Error::Timeout(CORE_CALL_TIMEOUT.as_secs()))?
    }
}

/// Facts about the node that the core needs and the API shows.
pub(crate) struct NodeFacts {
    pub(crate) home_id: String,
    pub(crate) home_name: String,
    /// Subscribed before the core's task started, so it holds every event the core has
    /// announced (a static peer admitted at once, say); for the event bus, whose history
    /// must not miss them.
    pub(crate) events_from_start: broadcast::Receiver<crate::events::Event>,
}

pub(crate) struct Core {
    pub(crate) engine: Engine<String>,
    /// The entities service's state.
    pub(crate) entities: crate::entities::service::EntityState,
    /// The rooms and presence service's state.
    pub(crate) rooms: rooms::RoomState,
    /// The state of this home's devices on the network.
    pub(crate) peers: crate::peers::PeerState,
    /// The locks service's state.
    pub(crate) locks: crate::locks::service::LockState,
    /// The events-across-devices service's state.
    pub(crate) propagation: crate::propagation::service::PropagationState,
    pub(crate) users: crate::users::service::UserStates,
    /// The emergency alerts service's state.
    pub(crate) alerts: crate::alerts::service::AlertState,
    /// The sessions service's state (handoffs under way).
    pub(crate) sessions: crate::sessions::service::SessionState,
    /// The activities service's state (starts waiting for acknowledgements, what was
    /// announced).
    pub(crate) activities: crate::activities::service::ActivityState,
    /// The playback service's state (clock estimates, playbacks).
    pub(crate) playback: crate::playback::service::PlaybackState,
    pub(crate) store: StoreHandle,
    pub(crate) net: hearth_net::Handle,
    pub(crate) home: HomeRecord,
    pub(crate) peer_id: String,
    /// Next incremental chunk number per document, and the first one not yet covered by
    /// a snapshot (deleted when the next snapshot lands).
    pub(crate) chunk_seq: HashMap<DocId, (u64, u64)>,
    /// Document keys this device holds.
    pub(crate) keyring: Keyring,
    /// This device's X25519 secret, for keys other devices wrap for it.
    pub(crate) device: DeviceSecret,
    /// Frames the engine produced, sealed and sent after each step.
    pub(crate) outbox: Vec<(String, Frame)>,
    /// Frames waiting for the store batches queued before them (send_gate.rs).
    pub(crate) gate: send_gate::SendGate,
    /// Tickets of background store batches, and how far they finished.
    pub(crate) tickets: send_gate::Tickets,
    /// Invite codes and pairing exchanges.
    pub(crate) pairing: pairing::Pairing,
    /// (doc id, heads hash) of every document this device holds a key for, kept current,
    /// for digest reconciliation with devices of the home.
    pub(crate) digest: hearth_crdt::digest::DigestTree,
    /// Counters shown by `sync_counters` and the metrics.
    pub(crate) counters: SyncCounters,
    /// Every event, for library subscribers and the event bus; nobody listening is normal.
    pub(crate) node_events: broadcast::Sender<crate::events::Event>,
    /// This device's name: the default user of rooms and presence.
    pub(crate) device_name: String,
    /// The node's metrics.
    pub(crate) metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Paired homes' devices and the entities shared each way.
    pub(crate) sharing: sharing::Sharing,
    /// Signed revocations of this home's and paired homes' devices; only ever added to.
    pub(crate) revocations: revocations::Revocations,
    /// Whether the home document has read whole since start (see `is_revoked`).
    pub(crate) home_doc_read: std::cell::Cell<bool>,
    /// The core's own request queue, for tasks it spawns to report back.
    pub(crate) self_tx: Option<mpsc::Sender<Request>>,
    /// Test hook: where received frames are recorded, when set.
    #[cfg(feature = "test-hooks")]
    pub(crate) capture: Option<hooks::CaptureSink>,
    /// Store batches waiting for a slot (durability.rs).
    pub(crate) persist_queue: Vec<durability::Pending>,
    /// Slots for store batches in flight.
    pub(crate) persists: std::sync::Arc<tokio::sync::Semaphore>,
    /// What failed store batches left unstored, stored again once the store is back.
    pub(crate) unpersisted: std::sync::Arc<std::sync::Mutex<durability::Unpersisted>>,
    /// Documents whose stored records could not be loaded at start (quarantine.rs).
    pub(crate) quarantine: quarantine::Quarantine,
    /// Permits for read jobs (`spawn_read`).
    pub(crate) read_jobs: Arc<tokio::sync::Semaphore>,
    /// The loaded entity documents and what keeps them loaded (resident.rs).
    pub(crate) resident: resident::Resident,
}

/// What reconnects cost, counted since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncCounters {
    /// Digest exchanges completed.
    pub reconciliations: u64,
    /// Documents that needed a sync exchange after a digest (they differed).
    pub docs_synced: u64,
    /// Documents a digest showed equal, attached without any sync message.
    pub docs_already_in_sync: u64,
    /// Digest messages sent and received.
    pub digest_messages: u64,
    /// Digest bytes sent and received.
    pub digest_bytes: u64,
    /// Frames (pushes, sync messages, digests) queued for admitted peers.
    pub frames_sent: u64,
    /// Bytes of those frames as sealed and encoded, before the transport's framing.
    pub frame_bytes_sent: u64,
    /// Frames received from peers.
    pub frames_received: u64,
    /// Bytes of those frames as received, before opening.
    pub frame_bytes_received: u64,
    /// Root hash of the digest over every held document's heads, in hex: two devices
    /// holding the same documents at the same heads show the same root. Empty when this
    /// device holds no document yet.
    pub heads_root: String,
    /// Frames from devices of paired homes refused: for documents not shared with their
    /// home, carrying changes their home may not make, or carrying changes by a revoked
    /// device.
    pub frames_refused: u64,
    /// Frames sealed under an older key epoch than their document's current one: from
    /// before a rotation, which a revoked device could still seal.
    pub frames_old_epoch: u64,
    /// Peers refused at hello: revoked devices, certificates that do not verify, devices
    /// of homes this one is not paired with.
    pub hellos_refused: u64,
    /// Frames dropped because their sender was no longer admitted as what it was when
    /// it sent them (disconnected, revoked, or its home forgotten) by the time they were
    /// read. A device of this home sends them again through sync once it is back.
    pub frames_unadmitted: u64,
    /// Frames over the network's frame cap: refused before sending (the transport would
    /// not take them) or on arrival. Sync messages and pushes too large for the engine's
    /// caps count in the engine's own `oversized` total; the metrics add the two.
    pub frames_oversized: u64,
    /// Documents loaded in memory now (the rest are held by header and heads, and load
    /// when used).
    pub documents_loaded: u64,
    /// Documents loaded from the store since start because they were used.
    pub documents_loads: u64,
    /// Documents unloaded since start to stay within the memory budget.
    pub documents_evicted: u64,
}

/// A stored document as read: its id, its chunks in order, and its next chunk number.
pub(crate) type StoredDoc = (DocId, Vec<Vec<u8>>, u64);

/// Loads every stored document, creates the home on first start, and spawns the actor.
// Each argument is a separate piece the node assembled; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start(
    store: StoreHandle,
    peer_id: String,
    peer_id_bytes: &[u8],
    device_name: &str,
    net: hearth_net::Handle,
    net_events: hearth_net::EventStream,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    batch_window: std::time::Duration,
    chat_keep: rooms::ChatRetention,
    users: crate::users::UsersConfig,
    documents_cache_bytes: usize,
    history: crate::config::HistoryConfig,
    cancel: CancellationToken,
) -> Result<(CoreHandle, NodeFacts, tokio::task::JoinHandle<()>), Error> {
    let stored = store.get(Keyspace::Meta, HOME_KEY.to_vec()).await?;
    let fresh = stored.is_none();
    let home = match stored {
        Some(bytes) => HomeRecord::decode(&bytes)?,
        None => HomeRecord::create(device_name)?,
    };
    let node_events = broadcast::channel(CHANGE_BUFFER).0;
    let events_from_start = node_events.subscribe();
    let mut core = Core {
        engine: Engine::new(peer_id_bytes, peers::engine_config()),
        entities: crate::entities::service::EntityState {
            of_doc: HashMap::new(),
            by_id: HashMap::new(),
            views: HashMap::new(),
            last_view: None,
            writes: batching::WriteWindow::new(batch_window),
            actor_names: HashMap::new(),
            generations: crate::entities::generations::Generations::new(history),
        },
        rooms: rooms::RoomState {
            seen: HashMap::new(),
            chat_keep,
            presence_seen: Default::default(),
        },
        peers: crate::peers::PeerState::default(),
        locks: crate::locks::service::LockState::default(),
        propagation: Default::default(),
        users: crate::users::service::UserStates::new(users),
        alerts: Default::default(),
        sessions: Default::default(),
        activities: Default::default(),
        playback: Default::default(),
        store,
        net,
        home,
        peer_id,
        chunk_seq: HashMap::new(),
        keyring: Keyring::default(),
        device: DeviceSecret::generate(),
        outbox: Vec::new(),
        gate: send_gate::SendGate::default(),
        tickets: send_gate::Tickets::new(),
        pairing: pairing::Pairing::default(),
        digest: hearth_crdt::digest::DigestTree::new(),
        counters: SyncCounters::default(),
        node_events,
        device_name: clean_device_name(device_name),
        metrics,
        sharing: sharing::Sharing::default(),
        revocations: revocations::Revocations::default(),
        home_doc_read: std::cell::Cell::new(false),
        self_tx: None,
        #[cfg(feature = "test-hooks")]
        capture: None,
        persist_queue: Vec::new(),
        persists: durability::persist_slots(),
        unpersisted: Default::default(),
        quarantine: Default::default(),
        read_jobs: Arc::new(tokio::sync::Semaphore::new(READ_JOBS)),
        resident: resident::Resident::new(documents_cache_bytes),
    };
    let mut batch = Batch::new();
    core.device = keyring::device_secret(&core.store, &mut batch).await?;
    if !batch.is_empty() {
        core.store.batch(batch).await?;
    }
    core.keyring = Keyring::load(&core.store).await?;
    core.load_shared_in().await;
    core.load_revocations().await;
    core.load_locks().await;
    core.load_lock_role().await;
    core.load_alerts().await;
    core.load_documents().await?;
    core.record_quarantine().await?;
    match core
        .step(|core, fx| {
            core.absorb_lock_naming(fx);
            Ok(core.absorb_revocations(fx))
        })
        .await
    {
        Ok(rotate) => core.rotate_each(rotate).await,
        Err(error) => tracing::warn!(%error, "acting on stored revocations failed part way"),
    }
    if fresh {
        core.create_home(device_name).await?;
    }
    let cert = core.load_certificate().await?;
    core.net
        .set_certificate(cert)
        .await
        .map_err(|e| Error::Network(e.to_string()))?;
    // Documents whose keys this device holds but whose content has not arrived yet (a
    // device that just joined) are tracked, so the first sync fills them.
    let held: Vec<_> = core.keyring.ids().collect();
    for (doc, epoch) in held {
        core.ensure_expected(doc, epoch);
    }
    core.build_entity_index_at_start();
    core.stay_on_held_generations().await;
    core.index_generations();
    core.refresh_actor_homes();
    core.reserve_own_devices().await;
    core.ensure_presence_doc().await?;
    core.ensure_users_doc().await?;
    core.remember_rooms_and_presence();
    core.sharing.paired_seen = core.paired().into_keys().collect();
    core.remember_user_states();
    core.close_stale_sessions().await;
    core.remember_activities();
    let held: Vec<_> = core.keyring.ids().map(|(d, _)| d).collect();
    for doc in held {
        core.refresh_digest(doc);
    }
    // A store loaded whole (written before meta records) trims back to the budget.
    core.trim();

    let facts = NodeFacts {
        home_id: core.home.home_id.clone(),
        home_name: core.home.name.clone(),
        events_from_start,
    };
    let (tx, rx) = mpsc::channel(CORE_QUEUE);
    core.self_tx = Some(tx.clone());
    // Only the stall test hook ever flips this. Without the hooks its sender is dropped
    // here, so the loop's guard stays false and its change branch never fires.
    let (stall_tx, stall_rx) = tokio::sync::watch::channel(false);
    let handle = CoreHandle {
        tx,
        #[cfg(feature = "test-hooks")]
        stall_net: std::sync::Arc::new(stall_tx),
        node_events: core.node_events.clone(),
        persists: core.persists.clone(),
    };
    #[cfg(not(feature = "test-hooks"))]
    drop(stall_tx);
    let task = tokio::spawn(tracing::Instrument::instrument(
        core.run(rx, net_events, stall_rx, cancel),
        tracing::error_span!("core"),
    ));
    Ok((handle, facts, task))
}

impl Core {
    pub(crate) fn engine_actor_bytes(&self) -> &[u8; 16] {
        // The engine's actor is always the 16-byte PeerId digest.
        let bytes = self.engine.actor().to_bytes();
        <&[u8; 16]>::try_from(bytes).unwrap_or(&[0; 16])
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        mut net_events: hearth_net::EventStream,
        mut stall_net: tokio::sync::watch::Receiver<bool>,
        cancel: CancellationToken,
    ) {
        let mut heartbeats = tokio::time::interval(heartbeat::HEARTBEAT_INTERVAL);
        // A late tick is not worth a burst of catch-up heartbeats.
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut store_health = self.store.watch_health();
        let mut batches_finished = self.tickets.watch();
        loop {
            let net_stalled = *stall_net.borrow_and_update();
            let window_closes = self.entities.writes.deadline();
            let lease_ends = self.next_lock_deadline();
            let alerts_due = self.alerts.deadline;
            let handoffs_due = self.sessions.deadline();
            let acks_due = self.activities.deadline();
            let deadline = self.engine.next_deadline();
            let timer = async {
                match deadline {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                request = rx.recv() => match request {
                    // Refused before anything applies, so memory, peers and disk stay in step.
                    Some(request) if request.is_write() && self.store.is_failed() => {
                        request.refuse(durability::refusal(&self.store));
                    }
                    Some(request) => {
                        let needs = self.needs(&request);
                        self.load_needs(needs).await;
                        self.route(request).await;
                        self.send_pending().await;
                    }
                    None => break,
                },
                _ = heartbeats.tick(), if !net_stalled => {
                    self.send_heartbeats().await;
                    self.playback_tick().await;
                    // Frees opening slots whose peer went quiet.
                    self.drain_attaches().await;
                }
                // Re-evaluates the guard below when the test hook flips.
                Ok(()) = stall_net.changed() => {}
                // Frames that waited for their store batches.
                Ok(()) = batches_finished.changed() => self.send_pending().await,
                Ok(()) = store_health.changed() => {
                    if !self.store.is_failed() {
                        self.repersist();
                    }
                }
                event = net_events.recv(), if !net_stalled => match event {
                    Some(event) => {
                        self.on_net_event(event).await;
                        self.drain_attaches().await;
                    }
                    None => break,
                },
                _ = timer => {
                    let out = self.engine.tick(now_ms());
                    self.persist_in_background(out);
                    self.send_pending().await;
                    self.drain_attaches().await;
                }
                _ = sleep_until_or_never(window_closes) => self.commit_window(),
                // Leases end on time, not when next read.
                _ = sleep_until_ms(lease_ends) => self.expire_locks().await,
                // Alert retries and expiries.
                _ = sleep_until_ms(alerts_due) => self.alert_tick().await,
                // Handoffs that were not accepted or acknowledged in time.
                _ = sleep_until_ms(handoffs_due) => self.session_tick().await,
                // Activity starts not acknowledged in time.
                _ = sleep_until_ms(acks_due) => self.activity_tick().await,
            }
            // Cuts, moves and deletions of generations the step made due.
            if self.generation_work_due() {
                self.run_generation_work().await;
                self.send_pending().await;
            }
            // Waits for a slot when too many batches are in flight: a burst of remote
            // changes then slows the core down instead of piling up tasks.
            self.start_persists().await;
            // Frames held behind a slow batch: take no more work until they can leave
            // (a hung store's requests time out, which finishes their batches). The open
            // window goes first: frames queued after it opened wait for its batch, and
            // only the loop above would commit it.
            if self.gate.len() > send_gate::MAX_HELD_FRAMES {
                self.commit_window();
                self.start_persists().await;
            }
            while self.gate.len() > send_gate::MAX_HELD_FRAMES {
                if batches_finished.changed().await.is_err() {
                    break;
                }
                self.send_pending().await;
            }
            self.trim();
        }
        self.commit_window_now().await;
        tracing::debug!("core stopped");
    }

    /// Reacts to the network.
    pub(crate) async fn on_net_event(&mut self, event: hearth_net::Event) {
        use hearth_net::Event;
        match event {
            Event::Hello { peer, certificate } => {
                let text = peer.to_base58();
                let was_admitted = self.peers.admitted.contains_key(&text);
                self.on_hello(peer, certificate).await;
                if !was_admitted && self.peers.admitted.contains_key(&text) {
                    // Admission counts as hearing from it; its own heartbeats follow.
                    self.heard_alive(&text, heartbeat::HEARTBEAT_TTL_MS);
                    self.notice_peer(text.clone(), true);
                    self.send_heartbeats().await;
                    self.on_playback_peer_up(&text).await;
                }
                // Alerts it has not acknowledged go at once, ahead of any backoff.
                self.on_alert_peer_up(&text).await;
            }
            Event::Frame { peer, class, bytes } => {
                self.metrics.frame_in(bytes.len());
                self.counters.frames_received += 1;
                self.counters.frame_bytes_received += bytes.len() as u64;
                let text = peer.to_base58();
                if !self.still_admitted_as(&text, &class, "sync") {
                    return;
                }
                self.peers.heard_from(&text, now_ms());
                self.on_frame(text, class, bytes).await
            }
            Event::PairRequest {
                peer,
                request_id,
                bytes,
            } => {
                self.metrics.pair_in_bytes(bytes.len());
                let reply = self.on_pair_request(peer, &bytes).await;
                self.metrics.pair_out(reply.len());
                if let Err(error) = self.net.pair_respond(request_id, reply).await {
                    tracing::warn!(%peer, %error, "could not answer a pairing request");
                }
            }
            Event::PeerConnected { peer, addr, .. } => {
                tracing::debug!(%peer, %addr, "peer connected");
            }
            Event::PeerDisconnected { peer, reason } => {
                let text = peer.to_base58();
                // hearth-net logs the disconnection itself, strangers' rate-limited.
                tracing::debug!(peer = %text, ?reason, "peer disconnected");
                if self.peers.forget(&text) {
                    self.notice_peer(text.clone(), false);
                }
                self.on_playback_peer_down(&text);
                // Requests forwarded to it will get no answer.
                self.fail_lock_forwards(Some(&text));
                self.check_handoff(Some(&text)).await;
                self.sharing.foreign.remove(&text);
                self.sharing.pending_hellos.remove(&peer);
                // Keep each session's state so a reconnect resumes rather than restarts.
                let mut batch = Batch::new();
                for (doc, state) in self.engine.detach_peer(&text) {
                    batch.put(
                        Keyspace::SyncStates,
                        crate::records::sync_state_key(&text, doc),
                        state,
                    );
                }
                if !batch.is_empty() {
                    let store = self.store.clone();
                    tokio::spawn(async move {
                        if let Err(error) = store.batch(batch).await {
                            tracing::warn!(%error, "could not save sync states");
                        }
                    });
                }
            }
            // Heartbeats are between devices of one home; a paired home's device may
            // only use this stream's alert lane.
            Event::EphemeralFrame { peer, class, bytes }
                if matches!(class, PeerClass::Own | PeerClass::Paired(_))
                    && self.still_admitted_as(&peer.to_base58(), &class, "ephemeral") =>
            {
                // Taken before anything else, for the clock probes' timestamps.
                let received_us = self.playback.now_us();
                let received_mono = self.playback.mono_us();
                match self.on_ephemeral(peer, &class, &bytes) {
                    Some(heartbeat::Lane::Alert(alert)) => {
                        self.on_alert_message(&peer.to_base58(), &class, &alert)
                            .await
                    }
                    Some(heartbeat::Lane::Clock(message)) => {
                        let own = class == PeerClass::Own;
                        self.on_clock_message(peer, own, &message, received_us, received_mono)
                            .await
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }

    /// Hands a request to the one service it belongs to.
    async fn route(&mut self, request: Request) {
        match request {
            Request::Node(request) => self.handle_node(request).await,
            Request::Entities(request) => self.handle_entities(request),
            Request::Rooms(request) => self.handle_rooms(request),
            Request::Pairing(request) => self.handle_pairing(request).await,
            Request::Sharing(request) => self.handle_sharing(request).await,
            Request::Revocation(request) => self.handle_revocation(request).await,
            Request::Locks(request) => self.handle_locks(request).await,
            Request::Propagation(request) => self.handle_propagation(request).await,
            Request::Users(request) => self.handle_users(request),
            Request::Alerts(request) => self.handle_alerts(request).await,
            Request::Sessions(request) => self.handle_sessions(request).await,
            Request::Activities(request) => self.handle_activities(request).await,
            Request::Playback(request) => self.handle_playback(request).await,
            #[cfg(feature = "test-hooks")]
            Request::Hooks(request) => self.handle_hook(request),
            #[cfg(test)]
            Request::OnCore(on) => on.run(self).await,
        }
    }

    async fn handle_node(&mut self, request: NodeRequest) {
        match request {
            NodeRequest::Ping { reply } => {
                let _ = reply.send(Ok(()));
            }
            NodeRequest::Counters { reply } => {
                let mut counters = self.counters.clone();
                counters.heads_root = self.digest.root_hash().map(hex::encode).unwrap_or_default();
                counters.documents_loaded = self.engine.loaded_count() as u64;
                counters.documents_loads = self.resident.loads;
                counters.documents_evicted = self.resident.evictions;
                let _ = reply.send(Ok(counters));
            }
            NodeRequest::SyncReport { reply } => {
                let _ = reply.send(Ok(self.sync_report()));
            }
            NodeRequest::Devices { reply } => {
                let _ = reply.send(self.devices());
            }
            NodeRequest::Store { reply } => {
                let _ = reply.send(Ok(self.store.clone()));
            }
            NodeRequest::Repair { drop, reply } => {
                let _ = reply.send(self.repair(drop).await);
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at_ms` (ms since the epoch), or forever when there is nothing to wait for.
async fn sleep_until_ms(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => {
            let wait = at.saturating_sub(now_ms());
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await
        }
        None => std::future::pending().await,
    }
}

pub(crate) fn new_key() -> Result<DocKey, Error> {
    DocKey::generate().map_err(|e| Error::Internal(format!("cannot make a document key: {e}")))
}

/// Moves every operation of `more` to the end of `batch`.
pub(crate) fn append(batch: &mut Batch, more: Batch) {
    for op in more.into_ops() {
        match op {
            hearth_storage::BatchOp::Put {
                keyspace,
                key,
                value,
            } => {
                batch.put(keyspace, key, value);
            }
            hearth_storage::BatchOp::Delete { keyspace, key } => {
                batch.delete(keyspace, key);
            }
        }
    }
}

/// A device name as certificates accept it: printable, at most 64 characters.
pub(crate) fn clean_device_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .filter(|c| !c.is_control())
        .take(crate::trust::cert::MAX_DEVICE_NAME_LEN)
        .collect();
    if cleaned.trim().is_empty() {
        "hearth-device".to_string()
    } else {
        cleaned
    }
}

pub(crate) fn doc_err(e: hearth_crdt::Error) -> Error {
    Error::Document(e.to_string())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970, which the
/// HLC then carries forward from its last reading).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `ms` (Unix ms) as the public timestamp, which bodies write as RFC 3339 in UTC
/// with milliseconds.
pub(crate) fn rfc3339_ms(ms: u64) -> crate::Timestamp {
    crate::Timestamp::from_unix_ms(ms)
}
