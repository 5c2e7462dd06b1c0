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

use hearth_crdt::schema::registry;
use hearth_crdt::{ChunkKind, DocId, Engine, EntityUpdate, KeyEpoch, Origin, Output};
use hearth_net::PeerClass;
use hearth_storage::{Batch, DocChunk, Keyspace, Scan, StoreHandle};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Error;
mod batching;
mod conflicts;
mod durability;
pub(crate) mod quarantine;
pub(crate) use durability::MAX_PERSISTS_IN_FLIGHT;
mod pacing;
pub use batching::MAX_BATCH_WRITES;
mod entity_ops;
mod heartbeat;
#[cfg(feature = "test-hooks")]
mod hooks;
pub(crate) mod keyring;
pub(crate) mod pairing;
pub use revoke::RevokedDevice;
mod peers;
mod revocations;
mod revoke;
pub(crate) mod rooms;
mod share_lists;
mod sharing;
mod sync_states;

use hearth_crdt::schema::home as home_schema;
use hearth_crdt::wire::Frame;

use crate::entities::{Entity, EntityChange, EntityWrite};
use crate::home::{self, HOME_KEY, HomeRecord};
use crate::trust::cert::DeviceCert;
use crate::trust::keys::{self as doc_keys, DeviceSecret, DocKey};
use keyring::{CERT_KEY, Keyring};

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

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the core.
pub(crate) enum Request {
    SetEntity {
        id: String,
        write: EntityWrite,
        reply: Reply<Entity>,
    },
    SetPolicy {
        id: String,
        policy: String,
        reply: Reply<Entity>,
    },
    Conflicts {
        reply: Reply<Vec<crate::entities::ConflictInfo>>,
    },
    ResolveConflict {
        id: String,
        field: String,
        choice: usize,
        reply: Reply<Entity>,
    },
    /// Test hook: a write that skips this home's own check of its rights on the entity,
    /// to show the owner refuses it (see `Node::debug_write_unchecked`).
    #[cfg(feature = "test-hooks")]
    SetEntityUnchecked {
        id: String,
        write: EntityWrite,
        /// Instead of the entity's value, move its document's key epoch to this counter,
        /// as a writer home's library rewriting the header would.
        header_epoch: Option<u64>,
        reply: Reply<Entity>,
    },
    /// Readiness: answered at once by a core that is running and reading its queue.
    #[cfg_attr(not(feature = "api"), expect(dead_code, reason = "only the API asks"))]
    Ping {
        reply: Reply<()>,
    },
    /// Test hook: writes the home document as a device of the home that wants a revoked
    /// device back would: `revoked_at` cleared and the signed record deleted.
    #[cfg(feature = "test-hooks")]
    ClearRevocation {
        peer: String,
        reply: Reply<()>,
    },
    /// Many writes in order, acknowledged together (batching.rs).
    SetMany {
        writes: Vec<(String, EntityWrite)>,
        reply: Reply<Vec<Entity>>,
    },
    GetEntity {
        id: String,
        reply: Reply<Option<Entity>>,
    },
    ListEntities {
        reply: Reply<Vec<Entity>>,
    },
    CreateInvite {
        home: bool,
        ttl_s: u64,
        reply: Reply<pairing::NewInvite>,
    },
    Counters {
        reply: Reply<SyncCounters>,
    },
    // Entity history and deletion (entity_ops.rs).
    DeleteEntity {
        id: String,
        reply: Reply<Entity>,
    },
    EntityHistory {
        id: String,
        limit: usize,
        reply: Reply<Vec<crate::entities::EntityVersion>>,
    },
    RestoreEntity {
        id: String,
        version: String,
        reply: Reply<Entity>,
    },
    /// Internal: a restore's read job resolved the old version; write it as a new one.
    WriteRestored {
        id: String,
        doc: DocId,
        target: hearth_crdt::Entity,
        reply: Reply<Entity>,
    },
    // Rooms and presence (rooms.rs).
    CreateRoom {
        name: String,
        max_size: u64,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    GetRoom {
        room: String,
        reply: Reply<crate::rooms::Room>,
    },
    ListRooms {
        reply: Reply<Vec<crate::rooms::Room>>,
    },
    JoinRoom {
        room: String,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    LeaveRoom {
        room: String,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    Say {
        room: String,
        user: Option<String>,
        text: String,
        reply: Reply<crate::rooms::ChatMessage>,
    },
    Chat {
        room: String,
        limit: usize,
        reply: Reply<Vec<crate::rooms::ChatMessage>>,
    },
    /// Prunes every room's chat to the retention limits; answers how many went.
    PruneChat {
        reply: Reply<usize>,
    },
    SetPresence {
        user: Option<String>,
        status: crate::presence::Status,
        note: Option<String>,
        reply: Reply<crate::presence::PresenceInfo>,
    },
    GetPresence {
        user: Option<String>,
        reply: Reply<crate::presence::PresenceInfo>,
    },
    ListPresence {
        room: Option<String>,
        reply: Reply<Vec<crate::presence::PresenceInfo>>,
    },
    /// Per-peer sync lag and document counts, for status and metrics.
    SyncReport {
        reply: Reply<SyncReport>,
    },
    // Sharing between homes (sharing.rs).
    PairHome {
        code: String,
        reply: Reply<crate::shares::PairedWith>,
    },
    /// Internal: the joining side's pairing exchange ended.
    HomePairDone {
        issuer: hearth_net::PeerId,
        issuer_addrs: Vec<String>,
        expected_home: String,
        result: Result<Vec<u8>, Error>,
        reply: Reply<crate::shares::PairedWith>,
    },
    ListHomes {
        reply: Reply<Vec<crate::shares::KnownHome>>,
    },
    ForgetHome {
        home: String,
        reply: Reply<crate::shares::PairedWith>,
    },
    Share {
        entity_id: String,
        home: String,
        read_only: bool,
        policy: Option<String>,
        reply: Reply<crate::shares::ShareOut>,
    },
    Unshare {
        entity_id: String,
        home: String,
        reply: Reply<crate::shares::ShareOut>,
    },
    ListShares {
        reply: Reply<crate::shares::SharedList>,
    },
    /// Internal: a share listing's read job found the shared entities in the registry.
    FinishShareList {
        rows: Vec<share_lists::Row>,
        reply: share_lists::ListReply,
    },
    RevokeDevice {
        device: String,
        reply: Reply<revoke::RevokedDevice>,
    },
    /// The store, for reads that need no core state (the audit log).
    Store {
        reply: Reply<StoreHandle>,
    },
    /// Test hook: record every frame received from now on (see `Node::debug_capture`).
    #[cfg(feature = "test-hooks")]
    Capture {
        sink: hooks::CaptureSink,
        reply: Reply<()>,
    },
    /// Test hook: try to open a captured frame with this device's keys.
    #[cfg(feature = "test-hooks")]
    OpenFrame {
        bytes: Vec<u8>,
        reply: Reply<()>,
    },
    /// Test hook: seal a sync message payload for an entity's document.
    #[cfg(feature = "test-hooks")]
    SealSync {
        entity: String,
        payload: Vec<u8>,
        reply: Reply<Vec<u8>>,
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
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<Result<T, Error>, Error> {
        let (reply, rx) = oneshot::channel();
        let asked = async {
            self.tx
                .send(make(reply))
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
#[derive(Clone)]
pub(crate) struct NodeFacts {
    pub(crate) home_id: String,
    pub(crate) home_name: String,
}

struct Core {
    engine: Engine<String>,
    store: StoreHandle,
    net: hearth_net::Handle,
    home: HomeRecord,
    peer_id: String,
    /// Next incremental chunk number per document, and the first one not yet covered by
    /// a snapshot (deleted when the next snapshot lands).
    chunk_seq: HashMap<DocId, (u64, u64)>,
    /// Entity document -> entity id, from the registry.
    entity_of_doc: HashMap<DocId, String>,
    /// The reverse: entity id -> document, so a write finds its document in O(1).
    doc_of_entity_id: HashMap<String, DocId>,
    /// Document keys this device holds.
    keyring: Keyring,
    /// This device's X25519 secret, for keys other devices wrap for it.
    device: DeviceSecret,
    /// Admitted devices, by PeerId text.
    admitted: HashMap<String, hearth_net::PeerId>,
    /// Frames the engine produced, sealed and sent after each step.
    outbox: Vec<(String, Frame)>,
    /// Invite codes and pairing exchanges.
    pairing: pairing::Pairing,
    /// (doc id, heads hash) of every document this device holds a key for, kept current,
    /// for digest reconciliation with devices of the home.
    digest: hearth_crdt::digest::DigestTree,
    /// Digest sessions in progress, by peer.
    reconcilers: HashMap<String, hearth_crdt::digest::Reconciler>,
    /// Counters shown by `sync_counters` and the metrics.
    counters: SyncCounters,
    /// PeerIds of known devices by their Automerge actor, so views name writers by device.
    actor_names: HashMap<automerge::ActorId, String>,
    /// Until when each admitted device counts as live (ms since the epoch), from its
    /// heartbeats; see `heartbeat`.
    alive_until: HashMap<String, u64>,
    /// Every event, for library subscribers and the event bus; nobody listening is normal.
    node_events: broadcast::Sender<crate::events::Event>,
    /// This device's name: the default user of rooms and presence.
    device_name: String,
    /// What each room looked like when last announced, to turn document changes into
    /// member and chat events.
    rooms_seen: HashMap<DocId, rooms::RoomSeen>,
    /// How much chat each room keeps.
    chat_keep: rooms::ChatRetention,
    /// Presence entries as last announced.
    presence_seen: std::collections::BTreeMap<String, hearth_crdt::PresenceEntry>,
    /// When a frame last came from each admitted peer (ms since the epoch).
    last_heard: HashMap<String, u64>,
    /// The node's metrics.
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Local writes waiting for their batch window's flush.
    writes: batching::WriteWindow,
    /// Paired homes' devices and the entities shared each way.
    sharing: sharing::Sharing,
    /// Signed revocations of this home's and paired homes' devices; only ever added to.
    revocations: revocations::Revocations,
    /// Whether the home document has read whole since start (see `is_revoked`).
    home_doc_read: std::cell::Cell<bool>,
    /// The core's own request queue, for tasks it spawns to report back.
    self_tx: Option<mpsc::Sender<Request>>,
    /// Bulk session openings, paced per peer.
    pacing: pacing::Pacing,
    /// The entity view the last change event was built from, so a local write answers with
    /// it instead of reading the document a second time.
    last_view: Option<(DocId, Entity)>,
    /// Test hook: where received frames are recorded, when set.
    #[cfg(feature = "test-hooks")]
    capture: Option<hooks::CaptureSink>,
    /// Store batches waiting for a slot (durability.rs).
    persist_queue: Vec<durability::Pending>,
    /// Slots for store batches in flight.
    persists: std::sync::Arc<tokio::sync::Semaphore>,
    /// What failed store batches left unstored, stored again once the store is back.
    unpersisted: std::sync::Arc<std::sync::Mutex<durability::Unpersisted>>,
    /// Documents whose stored records could not be loaded at start (quarantine.rs).
    quarantine: quarantine::Quarantine,
    /// Each entity's view as last read, with the heads it was read at, so listing every
    /// entity reads only the documents that changed since.
    views: HashMap<DocId, (Vec<automerge::ChangeHash>, Arc<Entity>)>,
    /// Permits for read jobs (`spawn_read`).
    read_jobs: Arc<tokio::sync::Semaphore>,
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
}

/// A stored document as read: its id, its chunks in order, and its next chunk number.
type StoredDoc = (DocId, Vec<Vec<u8>>, u64);

/// Rebuilds documents on `threads` threads, keeping their order.
fn prepare_all(
    actor: &automerge::ActorId,
    docs: Vec<StoredDoc>,
    threads: usize,
) -> Vec<(hearth_crdt::PreparedLoad, u64)> {
    let per = docs.len().div_ceil(threads).max(1);
    let mut parts: Vec<Vec<StoredDoc>> = Vec::new();
    let mut docs = docs.into_iter().peekable();
    while docs.peek().is_some() {
        parts.push(docs.by_ref().take(per).collect());
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|(doc, chunks, next)| {
                            (Engine::<String>::prepare_load(actor, doc, chunks), next)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // A rebuild that panics is caught inside prepare_load; a join error would be a
        // bug here, and losing that part's documents beats taking the node down.
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    tracing::error!("a loader thread failed; its documents stay on disk, unloaded");
                    Vec::new()
                })
            })
            .collect()
    })
}

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
    cancel: CancellationToken,
) -> Result<(CoreHandle, NodeFacts, tokio::task::JoinHandle<()>), Error> {
    let stored = store.get(Keyspace::Meta, HOME_KEY.to_vec()).await?;
    let fresh = stored.is_none();
    let home = match stored {
        Some(bytes) => HomeRecord::decode(&bytes)?,
        None => HomeRecord::create(device_name)?,
    };
    let mut core = Core {
        engine: Engine::new(peer_id_bytes, peers::engine_config()),
        store,
        net,
        home,
        peer_id,
        chunk_seq: HashMap::new(),
        entity_of_doc: HashMap::new(),
        doc_of_entity_id: HashMap::new(),
        keyring: Keyring::default(),
        device: DeviceSecret::generate(),
        admitted: HashMap::new(),
        outbox: Vec::new(),
        pairing: pairing::Pairing::default(),
        digest: hearth_crdt::digest::DigestTree::new(),
        reconcilers: HashMap::new(),
        counters: SyncCounters::default(),
        actor_names: HashMap::new(),
        alive_until: HashMap::new(),
        node_events: broadcast::channel(CHANGE_BUFFER).0,
        device_name: clean_device_name(device_name),
        rooms_seen: HashMap::new(),
        chat_keep,
        presence_seen: Default::default(),
        last_heard: HashMap::new(),
        metrics,
        writes: batching::WriteWindow::new(batch_window),
        sharing: sharing::Sharing::default(),
        revocations: revocations::Revocations::default(),
        home_doc_read: std::cell::Cell::new(false),
        pacing: pacing::Pacing::default(),
        last_view: None,
        self_tx: None,
        #[cfg(feature = "test-hooks")]
        capture: None,
        persist_queue: Vec::new(),
        persists: durability::persist_slots(),
        unpersisted: Default::default(),
        quarantine: Default::default(),
        views: HashMap::new(),
        read_jobs: Arc::new(tokio::sync::Semaphore::new(READ_JOBS)),
    };
    let mut batch = Batch::new();
    core.device = keyring::device_secret(&core.store, &mut batch).await?;
    if !batch.is_empty() {
        core.store.batch(batch).await?;
    }
    core.keyring = Keyring::load(&core.store).await?;
    core.load_shared_in().await;
    core.load_revocations().await;
    core.load_documents().await?;
    core.record_quarantine().await?;
    core.absorb_revocations().await;
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
    core.rebuild_entity_index_lenient();
    core.refresh_actor_homes();
    core.reserve_own_devices().await;
    core.ensure_presence_doc().await?;
    core.remember_rooms_and_presence();
    let held: Vec<_> = core.keyring.ids().map(|(d, _)| d).collect();
    for doc in held {
        core.refresh_digest(doc);
    }

    let facts = NodeFacts {
        home_id: core.home.home_id.clone(),
        home_name: core.home.name.clone(),
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
    /// Reads every document's chunks in key order (snapshot first, then increments) and
    /// loads them. A document with a record that fails its integrity check, or that fails
    /// to load, is quarantined (quarantine.rs): logged, listed, and left on disk untouched,
    /// so nothing stored is lost and the rest of the node still starts.
    async fn load_documents(&mut self) -> Result<(), Error> {
        let mut current: Option<StoredDoc> = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut scan = Scan::all().limit(LOAD_PAGE);
            if let Some(key) = after.clone() {
                scan = scan.after(key);
            }
            let page: Vec<quarantine::LoadedRecord> =
                match self.store.scan(Keyspace::DocChunks, scan).await {
                    Ok(page) => page.into_iter().map(|(k, v)| (k, Ok(v))).collect(),
                    // One damaged record fails the whole page: read this page again record
                    // by record, to tell the damaged ones from the rest.
                    Err(hearth_storage::Error::Integrity { .. }) => {
                        quarantine::scan_chunks_one_by_one(&self.store, after.clone(), LOAD_PAGE)
                            .await?
                    }
                    Err(error) => return Err(error.into()),
                };
            let full = page.len() == LOAD_PAGE;
            let mut complete = Vec::new();
            for (key, value) in page {
                after = Some(key.clone());
                let Some((doc, chunk)) = DocChunk::parse(&key) else {
                    tracing::warn!(key = %hex::encode(&key), "skipping unrecognised chunk key");
                    continue;
                };
                let doc = DocId::from_bytes(doc);
                if current.as_ref().is_some_and(|(d, _, _)| *d != doc)
                    && let Some(done) = current.take()
                {
                    self.finish_stored(done, &mut complete);
                }
                let (_, chunks, next) = current.get_or_insert_with(|| (doc, Vec::new(), 0));
                if let DocChunk::Incremental(seq) = chunk {
                    *next = (*next).max(seq.saturating_add(1));
                }
                match value {
                    Ok(value) => chunks.push(value),
                    Err(reason) => {
                        chunks.clear();
                        self.quarantine.add(doc, reason);
                    }
                }
            }
            if !full && let Some(done) = current.take() {
                self.finish_stored(done, &mut complete);
            }
            self.load_many(complete).await;
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// A document whose records are all read: to load, or, when quarantined, only its
    /// chunk numbers noted.
    fn finish_stored(&mut self, done: StoredDoc, complete: &mut Vec<StoredDoc>) {
        let (doc, _, next) = &done;
        if self.quarantine.contains(*doc) {
            self.quarantine.saw_chunks(*doc, *next);
        } else {
            complete.push(done);
        }
    }

    /// Rebuilds documents from their chunks on every core, then adds them to the engine.
    async fn load_many(&mut self, docs: Vec<StoredDoc>) {
        if docs.is_empty() {
            return;
        }
        let actor = self.engine.actor().clone();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let prepared =
            tokio::task::spawn_blocking(move || prepare_all(&actor, docs, threads)).await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "loading documents failed; their chunks are kept on disk");
                return;
            }
        };
        for (prepared, next_seq) in prepared {
            let doc = prepared.id();
            match self.engine.finish_load(prepared) {
                Ok(()) => {
                    self.chunk_seq.insert(doc, (next_seq, 0));
                }
                Err(error) => {
                    self.quarantine
                        .add(doc, format!("its stored chunks do not load: {error}"));
                    self.quarantine.saw_chunks(doc, next_seq);
                }
            }
        }
    }

    /// Writes a new home's documents and record, and this device's admin certificate; this
    /// device is the home's first member.
    async fn create_home(&mut self, device_name: &str) -> Result<(), Error> {
        let record = self.home.clone();
        let name = record.name.clone();
        let epoch = KeyEpoch::first(*self.engine_actor_bytes());
        let now = now_ms();
        let mut out = self
            .engine
            .create_home(record.home_doc, &record.home_id, epoch, &name, now)
            .map_err(doc_err)?;
        out.extend(
            self.engine
                .create_registry(record.registry_doc, &record.home_id, epoch, now)
                .map_err(doc_err)?,
        );
        let mut batch = self.handle_outputs(out);
        for doc in [record.home_doc, record.registry_doc] {
            self.keyring.insert(doc, epoch, new_key()?, &mut batch);
        }
        let root = record
            .root_secret
            .map(|s| ed25519_dalek::SigningKey::from_bytes(&s))
            .ok_or_else(|| Error::Internal("a new home has no root key".into()))?;
        let device_name = clean_device_name(device_name);
        let cert = DeviceCert::issue(
            &root,
            &self.peer_id,
            self.device.public(),
            &device_name,
            now,
            true,
        )
        .and_then(|c| c.encode())
        .map_err(|e| Error::Internal(format!("cannot issue this device's certificate: {e}")))?;
        let record_for_doc = home_schema::DeviceRecord {
            name: device_name.clone(),
            certificate: cert.clone(),
            revoked_at: None,
        };
        let peer_id = self.peer_id.clone();
        let (_, out) = self
            .engine
            .transact(record.home_doc, now, None, |d, _, _| {
                home_schema::put_device(d, &peer_id, &record_for_doc)
            })
            .map_err(doc_err)?;
        let more = self.handle_outputs(out);
        append(&mut batch, more);
        batch.put(Keyspace::Meta, CERT_KEY.to_vec(), cert);
        // The record goes in the same atomic batch as the documents it names.
        batch.put(Keyspace::Meta, HOME_KEY.to_vec(), record.encode()?);
        self.store.batch(batch).await?;
        tracing::info!(home_id = %record.home_id, "created a new home with this device as its admin");
        Ok(())
    }

    fn engine_actor_bytes(&self) -> &[u8; 16] {
        // The engine's actor is always the 16-byte PeerId digest.
        let bytes = self.engine.actor().to_bytes();
        <&[u8; 16]>::try_from(bytes).unwrap_or(&[0; 16])
    }

    /// This device's certificate, as stored at home creation or at pairing.
    async fn load_certificate(&self) -> Result<Vec<u8>, Error> {
        let bytes = self
            .store
            .get(Keyspace::Meta, CERT_KEY.to_vec())
            .await?
            .ok_or(Error::CorruptRecord {
                what: "device certificate",
                detail: "missing".into(),
            })?;
        match DeviceCert::verify_bytes(&bytes, &self.home.root_public) {
            crate::trust::cert::Verdict::Valid(_) => Ok(bytes),
            other => Err(Error::CorruptRecord {
                what: "device certificate",
                detail: format!("{other:?}"),
            }),
        }
    }

    /// Rebuilds the entity index from the registry. On a device that has not received the
    /// registry yet the index stays empty until it arrives.
    fn rebuild_entity_index_lenient(&mut self) {
        let before = std::mem::take(&mut self.doc_of_entity_id);
        let old_docs = std::mem::take(&mut self.entity_of_doc);
        if let Err(error) = self.rebuild_entity_index() {
            tracing::debug!(%error, "registry not readable yet");
            self.doc_of_entity_id = before;
            self.entity_of_doc = old_docs;
            return;
        }
        // An entity that left the index was deleted (tombstoned in the registry) on
        // another device: announce it with its last state.
        for (id, doc) in before {
            if !self.doc_of_entity_id.contains_key(&id) && self.has_content(doc) {
                match self.entity_view(doc) {
                    Ok(entity) => self.emit_change(entity, None, None, true),
                    Err(error) => tracing::debug!(%id, %error, "deleted entity unreadable"),
                }
                let batch = self.drop_sync_states_of_doc(doc);
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(error) = store.batch(batch).await {
                        tracing::warn!(%error, "could not delete a deleted entity's sync states");
                    }
                });
            }
        }
    }

    fn rebuild_entity_index(&mut self) -> Result<(), Error> {
        let registry = self
            .engine
            .registry(self.home.registry_doc)
            .map_err(doc_err)?;
        self.entity_of_doc = registry
            .entities
            .into_iter()
            .filter(|(_, e)| e.deleted_at.is_none())
            .map(|(id, e)| (e.doc, id))
            .collect();
        self.doc_of_entity_id = self
            .entity_of_doc
            .iter()
            .map(|(doc, id)| (id.clone(), *doc))
            .collect();
        self.index_shared_in();
        Ok(())
    }

    async fn run(
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
        loop {
            let net_stalled = *stall_net.borrow_and_update();
            let window_closes = self.writes.deadline();
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
                    Some(request) if durability::is_write(&request) && self.store.is_failed() => {
                        durability::refuse(request, durability::refusal(&self.store));
                    }
                    Some(Request::Repair { drop, reply }) => {
                        let _ = reply.send(self.repair(drop).await);
                    }
                    Some(Request::CreateInvite { home, ttl_s, reply }) => {
                        let _ = reply.send(self.create_invite(home, ttl_s).await);
                    }
                    Some(request @ (Request::HomePairDone { .. }
                        | Request::ForgetHome { .. }
                        | Request::Share { .. }
                        | Request::RevokeDevice { .. }
                        | Request::Unshare { .. })) => {
                        self.handle_sharing(request).await;
                        self.send_pending().await;
                    }
                    Some(request) => {
                        self.handle(request);
                        self.send_pending().await;
                    }
                    None => break,
                },
                _ = heartbeats.tick(), if !net_stalled => {
                    self.send_heartbeats().await;
                    // Frees opening slots whose peer went quiet.
                    self.drain_attaches().await;
                }
                // Re-evaluates the guard below when the test hook flips.
                Ok(()) = stall_net.changed() => {}
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
            }
            // Waits for a slot when too many batches are in flight: a burst of remote
            // changes then slows the core down instead of piling up tasks.
            self.start_persists().await;
        }
        self.commit_window_now().await;
        tracing::debug!("core stopped");
    }

    /// Reacts to the network.
    async fn on_net_event(&mut self, event: hearth_net::Event) {
        use hearth_net::Event;
        match event {
            Event::Hello { peer, certificate } => {
                let text = peer.to_base58();
                let was_admitted = self.admitted.contains_key(&text);
                self.on_hello(peer, certificate).await;
                if !was_admitted && self.admitted.contains_key(&text) {
                    // Admission counts as hearing from it; its own heartbeats follow.
                    self.heard_alive(&text, heartbeat::HEARTBEAT_TTL_MS);
                    self.notice_peer(text, true);
                    self.send_heartbeats().await;
                }
            }
            Event::Frame { peer, class, bytes } => {
                self.metrics.frame_in(bytes.len());
                self.counters.frames_received += 1;
                self.counters.frame_bytes_received += bytes.len() as u64;
                if !self.still_admitted_as(&peer, &class, "sync") {
                    return;
                }
                self.last_heard.insert(peer.to_base58(), now_ms());
                self.on_frame(peer, class, bytes).await
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
                tracing::info!(peer = %text, ?reason, "peer disconnected");
                if self.admitted.remove(&text).is_some() {
                    self.notice_peer(text.clone(), false);
                }
                self.sharing.foreign.remove(&text);
                self.sharing.pending_hellos.remove(&peer);
                self.pacing.forget_peer(&text);
                self.reconcilers.remove(&text);
                self.last_heard.remove(&text);
                self.alive_until.remove(&text);
                // Keep each session's state so a reconnect resumes rather than restarts.
                let mut batch = Batch::new();
                for (doc, state) in self.engine.detach_peer(&text) {
                    batch.put(Keyspace::SyncStates, sync_state_key(&text, doc), state);
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
            // Heartbeats are between devices of one home; a paired home's device has
            // nothing to say on this stream.
            Event::EphemeralFrame { peer, class, bytes }
                if class == PeerClass::Own
                    && self.still_admitted_as(&peer, &class, "ephemeral") =>
            {
                self.on_ephemeral(peer, &bytes);
            }
            _ => {}
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Ping { reply } => {
                let _ = reply.send(Ok(()));
            }
            #[cfg(feature = "test-hooks")]
            Request::ClearRevocation { peer, reply } => {
                let result = self.debug_clear_revocation(&peer);
                let _ = reply.send(result);
            }
            #[cfg(feature = "test-hooks")]
            Request::SetEntityUnchecked {
                id,
                write,
                header_epoch,
                reply,
            } => {
                let result = self.debug_write_unchecked(&id, write, header_epoch);
                self.reply_after_flush(result, reply);
            }
            Request::SetPolicy { id, policy, reply } => {
                let result = self.set_policy(&id, &policy);
                self.reply_after_flush(result, reply);
            }
            Request::Conflicts { reply } => {
                let _ = reply.send(self.list_conflicts());
            }
            Request::ResolveConflict {
                id,
                field,
                choice,
                reply,
            } => {
                let result = self.resolve(&id, &field, choice);
                self.reply_after_flush(result, reply);
            }
            Request::SetEntity { id, write, reply } => {
                let result = self.set_entity(&id, write);
                self.reply_after_flush(result, reply);
            }
            Request::SetMany { writes, reply } => {
                let result = self.set_many(writes);
                self.reply_after_flush(result, reply);
            }
            Request::GetEntity { id, reply } => {
                let _ = reply.send(self.get_entity(&id));
            }
            Request::ListEntities { reply } => self.list_entities(reply),
            Request::Counters { reply } => {
                let mut counters = self.counters.clone();
                counters.heads_root = self.digest.root_hash().map(hex::encode).unwrap_or_default();
                let _ = reply.send(Ok(counters));
            }
            Request::CreateInvite { reply, .. } => {
                // Answered in the run loop, which can await the network.
                let _ = reply.send(Err(Error::Internal("invite request misrouted".into())));
            }
            Request::SyncReport { reply } => {
                let _ = reply.send(Ok(self.sync_report()));
            }
            Request::PairHome { code, reply } => self.start_home_pairing(&code, reply),
            Request::ListHomes { reply } => {
                self.list_shared(share_lists::ListReply::Homes(reply));
            }
            Request::ListShares { reply } => {
                self.list_shared(share_lists::ListReply::Shares(reply));
            }
            Request::FinishShareList { rows, reply } => self.finish_share_list(rows, reply),
            Request::Store { reply } => {
                let _ = reply.send(Ok(self.store.clone()));
            }
            #[cfg(feature = "test-hooks")]
            Request::Capture { sink, reply } => {
                self.capture = Some(sink);
                let _ = reply.send(Ok(()));
            }
            #[cfg(feature = "test-hooks")]
            Request::OpenFrame { bytes, reply } => {
                let _ = reply.send(self.debug_open_frame(&bytes));
            }
            #[cfg(feature = "test-hooks")]
            Request::SealSync {
                entity,
                payload,
                reply,
            } => {
                let _ = reply.send(self.debug_seal_sync(&entity, payload));
            }
            other => self.handle_more(other),
        }
    }

    /// Requests that wait on the store or the network while changing sharing state.
    async fn handle_sharing(&mut self, request: Request) {
        match request {
            Request::HomePairDone {
                issuer,
                issuer_addrs,
                expected_home,
                result,
                reply,
            } => {
                let outcome = self
                    .finish_home_pairing(issuer, &issuer_addrs, &expected_home, result)
                    .await;
                let _ = reply.send(outcome);
            }
            Request::ForgetHome { home, reply } => {
                let _ = reply.send(self.forget_home(&home).await);
            }
            Request::RevokeDevice { device, reply } => {
                let _ = reply.send(self.revoke_device(&device).await);
            }
            Request::Share {
                entity_id,
                home,
                read_only,
                policy,
                reply,
            } => {
                let _ = reply.send(self.share(&entity_id, &home, read_only, policy).await);
            }
            Request::Unshare {
                entity_id,
                home,
                reply,
            } => {
                let _ = reply.send(self.unshare(&entity_id, &home).await);
            }
            other => self.handle(other),
        }
    }

    fn sync_report(&mut self) -> SyncReport {
        let now = now_ms();
        let held: Vec<DocId> = self.keyring.ids().map(|(d, _)| d).collect();
        let mut peers: Vec<PeerLag> = self
            .admitted
            .keys()
            .map(|peer| PeerLag {
                peer: peer.clone(),
                last_heard_ms: self.last_heard.get(peer).map(|t| now.saturating_sub(*t)),
                docs_behind: held
                    .iter()
                    .filter(|d| !self.engine.is_in_sync(peer, **d))
                    .count() as u64,
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let (shared_out, shared_in) = self.shared_counts();
        SyncReport {
            peers,
            documents: self.engine.documents().count() as u64,
            entities_shared_out: shared_out,
            entities_shared_in: shared_in,
            engine: self.engine.stats(),
            frames_oversized: self.counters.frames_oversized,
        }
    }

    /// Entities shared out (this home's registry entries with a grant to another home)
    /// and in (entity documents held here that another home owns).
    fn shared_counts(&self) -> (u64, u64) {
        let out = self
            .engine
            .registry(self.home.registry_doc)
            .map(|r| {
                r.entities
                    .values()
                    .filter(|e| e.deleted_at.is_none() && !e.shares.is_empty())
                    .count() as u64
            })
            .unwrap_or(0);
        let shared_in = self
            .engine
            .documents()
            .filter(|d| {
                self.engine.header(*d).is_ok_and(|h| {
                    h.kind == hearth_crdt::DocKind::Entity && h.owner_home != self.home.home_id
                })
            })
            .count() as u64;
        (out, shared_in)
    }

    fn set_entity(&mut self, id: &str, write: EntityWrite) -> Result<(Entity, Batch), Error> {
        let update = EntityUpdate {
            state: write.state,
            attributes: write.attributes,
        };
        let now = now_ms();
        let doc = match self.doc_of_entity(id) {
            Some(doc) => {
                self.check_write_rights(doc, id)?;
                doc
            }
            None => {
                let entity_id = id.to_string();
                let (doc, batch) = self.create_shared_doc(
                    DocId::from_bytes(home::random()?),
                    now,
                    write.correlation_id.clone(),
                    |engine, doc, epoch, home| {
                        let mut out = engine
                            .create_entity(doc, &home.home_id, epoch, &entity_id, &update, now)
                            .map_err(doc_err)?;
                        let (_, reg_out) = engine
                            .transact(home.registry_doc, now, None, |d, _, _| {
                                registry::put_entity(d, &entity_id, doc)
                            })
                            .map_err(doc_err)?;
                        out.extend(reg_out);
                        Ok(out)
                    },
                )?;
                self.entity_of_doc.insert(doc, id.to_string());
                self.doc_of_entity_id.insert(id.to_string(), doc);
                // Creating a document reports no change of its own, so announce it here.
                let entity = self.entity_view(doc)?;
                self.emit(entity.clone(), None, write.correlation_id);
                return Ok((entity, batch));
            }
        };
        // The correlation id goes into the same change as the state, so devices that get
        // the change by sync rather than by push still see it.
        let correlation = write.correlation_id.clone();
        let (_, out) = self
            .engine
            .transact(doc, now, write.correlation_id, |d, at, by| {
                hearth_crdt::schema::entity::write(d, &update, at, by)?;
                hearth_crdt::schema::entity::put_correlation_id(d, correlation.as_deref())
            })
            .map_err(doc_err)?;
        self.last_view = None;
        let batch = self.handle_outputs(out);
        let entity = match self.last_view.take() {
            Some((d, entity)) if d == doc => entity,
            _ => self.entity_view(doc)?,
        };
        Ok((entity, batch))
    }

    /// Creates a new document of this home through `create`, with a fresh key wrapped in
    /// the home document for every other device, and pushes it whole to every admitted
    /// device with a sync session opened for each. Entities and rooms are created this
    /// way, so every device of the home can open them when the home document syncs.
    fn create_shared_doc(
        &mut self,
        doc: DocId,
        now: u64,
        correlation_id: Option<String>,
        create: impl FnOnce(
            &mut Engine<String>,
            DocId,
            KeyEpoch,
            &HomeRecord,
        ) -> Result<Vec<Output<String>>, Error>,
    ) -> Result<(DocId, Batch), Error> {
        let epoch = KeyEpoch::first(*self.engine_actor_bytes());
        let key = new_key()?;
        let wraps = self.wrap_for_devices(&key, doc, epoch);
        // The key, wrapped for every other device, rides in the home document so each
        // device can open the new document when it syncs.
        let (_, home_out) = self
            .engine
            .transact(self.home.home_doc, now, None, |d, _, _| {
                for (peer, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, doc, &epoch, peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err)?;
        let mut out = create(&mut self.engine, doc, epoch, &self.home)?;
        out.extend(home_out);
        // The whole new document, to push to every device right away: a new document
        // then needs no sync round trip, so it reaches peers as fast as an update does
        // (and before this node could die after acknowledging).
        let snapshot = out
            .iter()
            .find_map(|o| match o {
                Output::PersistChunk {
                    doc: d,
                    kind: ChunkKind::Snapshot,
                    bytes,
                } if *d == doc => Some(bytes),
                _ => None,
            })
            // A push carries change chunks, not a saved document; the new document is
            // one small change, so converting it costs little.
            .and_then(|bytes| automerge::Automerge::load(bytes).ok())
            .map(|d| d.save_after(&[]));
        let mut batch = self.handle_outputs(out);
        self.keyring.insert(doc, epoch, key, &mut batch);
        let peers: Vec<String> = self.admitted.keys().cloned().collect();
        for peer in peers {
            if let Some(bytes) = &snapshot {
                self.outbox.push((
                    peer.clone(),
                    Frame::Push(hearth_crdt::wire::Push {
                        doc,
                        epoch,
                        correlation_id: correlation_id.clone(),
                        bytes: bytes.clone(),
                    }),
                ));
            }
            // With the whole document pushed, the session starts in sync and sends no
            // opening message: the peer opens its own exchange once it learns the key
            // (`learn_keys`), which also covers a push it could not open yet. An opening
            // message from here too doubled the frames of a burst of new documents, and
            // such bursts overflowed a slow peer's queue.
            let attached = if snapshot.is_some() {
                self.engine
                    .attach_in_sync(peer.clone(), doc, None)
                    .map(|()| Vec::new())
            } else {
                self.engine.attach(peer.clone(), doc, None, now)
            };
            match attached {
                Ok(out) => {
                    let more = self.handle_outputs(out);
                    append(&mut batch, more);
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "cannot open a session for a new document")
                }
            }
        }
        Ok((doc, batch))
    }

    /// Wraps `key` for every unrevoked device in the home document except this one.
    /// Tells the network which peers are this home's devices, so a flood of strangers
    /// never takes the connection slots they need (even before they connect this run).
    async fn reserve_own_devices(&mut self) {
        let Ok(devices) = self.engine.home_devices(self.home.home_doc) else {
            return;
        };
        for peer in devices.keys() {
            if *peer == self.peer_id || self.is_revoked(peer) {
                continue;
            }
            if let Ok(id) = peer.parse::<hearth_net::PeerId>()
                && let Err(error) = self.net.reserve_peer(id).await
            {
                tracing::warn!(%peer, %error, "cannot reserve a slot for a device of this home");
            }
        }
    }

    fn wrap_for_devices(
        &self,
        key: &DocKey,
        doc: DocId,
        epoch: KeyEpoch,
    ) -> Vec<(String, Vec<u8>)> {
        // Only the device records: the whole home view holds every document's wrapped
        // keys, and reading it for each new document made creating D documents O(D^2).
        let Ok(devices) = self.engine.home_devices(self.home.home_doc) else {
            return Vec::new();
        };
        devices
            .iter()
            .filter(|(peer, record)| {
                **peer != self.peer_id
                    && record.revoked_at.is_none()
                    && !self.sharing.revoking.contains(*peer)
                    && !self.revocations.contains(peer)
            })
            .filter_map(|(peer, record)| {
                let cert = DeviceCert::decode(&record.certificate).ok()?;
                match doc_keys::wrap_key(key, doc, epoch, cert.x25519_public()) {
                    Ok(w) => Some((peer.clone(), w.to_bytes().to_vec())),
                    Err(error) => {
                        tracing::warn!(%peer, %error, "cannot wrap a key for device");
                        None
                    }
                }
            })
            .collect()
    }

    /// Records a document's current heads in the digest tree.
    fn refresh_digest(&mut self, doc: DocId) {
        // Another home's entity is never reconciled with this home's devices.
        if self.is_foreign_doc(doc) {
            return;
        }
        if let Ok(heads) = self.engine.heads(doc) {
            self.digest
                .insert(doc, hearth_crdt::digest::heads_hash(&heads));
        }
    }

    fn doc_of_entity(&self, id: &str) -> Option<DocId> {
        self.doc_of_entity_id.get(id).copied()
    }

    fn get_entity(&mut self, id: &str) -> Result<Option<Entity>, Error> {
        match self.doc_of_entity(id) {
            // Listed in the registry but not synced here yet: not readable on this device.
            Some(doc) if !self.has_content(doc) => Ok(None),
            Some(doc) => self.entity_view(doc).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the document's content (at least its header) has arrived.
    fn has_content(&mut self, doc: DocId) -> bool {
        self.engine.heads(doc).is_ok_and(|h| !h.is_empty())
    }

    /// Answers with every readable entity, sorted by id. The core reads again only the
    /// entities whose heads moved since their view was cached (a write or a remote
    /// change refreshes it as it lands), and a read job sorts and copies the views.
    fn list_entities(&mut self, reply: Reply<Vec<Entity>>) {
        let docs: Vec<DocId> = self.entity_of_doc.keys().copied().collect();
        let mut views = Vec::with_capacity(docs.len());
        for doc in docs {
            // Listed in the registry but not synced here yet: not readable on this device.
            let heads = match self.engine.heads(doc) {
                Ok(h) if !h.is_empty() => h,
                _ => continue,
            };
            match self.views.get(&doc) {
                Some((seen, view)) if *seen == heads => views.push(view.clone()),
                _ => match self.entity_view(doc) {
                    Ok(view) => {
                        let view = Arc::new(view);
                        self.views.insert(doc, (heads, view.clone()));
                        views.push(view);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                },
            }
        }
        self.spawn_read(reply, move || {
            views.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(views.iter().map(|v| Entity::clone(v)).collect())
        });
    }

    /// Runs `job` on the blocking pool, at most `READ_JOBS` at once, and sends its
    /// answer. For reads whose cost grows with history or with the number of
    /// documents: `job` works on a snapshot the core took, so the core goes on serving.
    fn spawn_read<T: Send + 'static>(
        &self,
        reply: Reply<T>,
        job: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) {
        let permits = self.read_jobs.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The semaphore is never closed.
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let result = tokio::task::spawn_blocking(job)
                    .await
                    .unwrap_or_else(|e| Err(Error::Internal(format!("read job failed: {e}"))));
                let _ = reply.send(result);
            },
            tracing::error_span!("read_job"),
        ));
    }

    /// The PeerId of the device that writes as `actor`: this device, a member of the home,
    /// or a device of a paired home. An actor no known device maps to is shown in hex.
    fn device_of_actor(&mut self, actor: &automerge::ActorId) -> String {
        if actor == self.engine.actor() {
            return self.peer_id.clone();
        }
        if let Some(name) = self.actor_names.get(actor) {
            return name.clone();
        }
        // A miss means a device this core has not mapped yet: rebuild from the home
        // document, which lists every member and paired device.
        // Devices and paired homes only: the whole home view holds one keyring entry per
        // document.
        let devices = self.engine.home_devices(self.home.home_doc);
        let paired = self.engine.home_paired(self.home.home_doc);
        let known = self.actor_names.len();
        if let (Ok(devices), Ok(paired)) = (devices, paired) {
            let peers = devices
                .keys()
                .chain(paired.values().flat_map(|h| h.devices.keys()));
            for peer in peers {
                if let Ok(id) = peer.parse::<hearth_net::PeerId>() {
                    let actor = hearth_crdt::ids::actor_for_peer(&id.to_bytes());
                    self.actor_names.insert(actor, peer.clone());
                }
            }
        }
        if self.actor_names.len() != known {
            // Cached views may name a writer that now has a name.
            self.views.clear();
        }
        self.actor_names
            .get(actor)
            .cloned()
            .unwrap_or_else(|| actor.to_hex_string())
    }

    fn entity_view(&mut self, doc: DocId) -> Result<Entity, Error> {
        // As the entity's policy shows it: the same on every replica.
        let e = match self.engine.resolved_entity(doc) {
            Ok(resolved) => resolved.entity,
            Err(_) => self.engine.entity(doc).map_err(doc_err)?,
        };
        let heads = self.engine.heads(doc).map_err(doc_err)?;
        let updated_by = self.device_of_actor(&e.updated_by);
        Ok(Entity {
            id: e.id.into(),
            state: e.state,
            attributes: e.attributes,
            updated_at: rfc3339_ms(e.updated_at.wall_ms),
            updated_by: updated_by.into(),
            owner: e.owner.into(),
            version: hex::encode(hearth_crdt::digest::heads_hash(&heads)),
        })
    }

    /// Announces that an admitted device came or went.
    fn notice_peer(&self, peer: String, connected: bool) {
        let device_name = self
            .engine
            .home_devices(self.home.home_doc)
            .ok()
            .and_then(|devices| devices.get(&peer).map(|d| d.name.clone()));
        let peer = peer.into();
        let event = if connected {
            crate::events::Event::PeerConnected { peer, device_name }
        } else {
            crate::events::Event::PeerDisconnected { peer, device_name }
        };
        // Left out of `hearth_events_total`: the connected-peers gauge covers arrivals.
        let _ = self.node_events.send(event);
    }

    fn emit(&self, entity: Entity, from_peer: Option<String>, correlation_id: Option<String>) {
        self.emit_change(entity, from_peer, correlation_id, false);
    }

    fn emit_change(
        &self,
        entity: Entity,
        from_peer: Option<String>,
        correlation_id: Option<String>,
        deleted: bool,
    ) {
        let change = EntityChange {
            entity,
            from_peer: from_peer.map(Into::into),
            correlation_id,
            deleted,
        };
        self.emit_event(crate::events::Event::Entity(Box::new(change)));
    }

    /// Announces an event to library subscribers and counts it by name.
    fn emit_event(&self, event: crate::events::Event) {
        self.metrics.event(event.name());
        let _ = self.node_events.send(event);
    }

    /// Turns engine outputs into one store batch, and change events.
    fn handle_outputs(&mut self, outputs: Vec<Output<String>>) -> Batch {
        let mut batch = Batch::new();
        for output in outputs {
            match output {
                Output::PersistChunk { doc, kind, bytes } => {
                    self.refresh_digest(doc);
                    let (next, live_from) = self.chunk_seq.entry(doc).or_insert((0, 0));
                    match kind {
                        ChunkKind::Snapshot => {
                            batch.put(
                                Keyspace::DocChunks,
                                DocChunk::Snapshot.key(doc.as_bytes()),
                                bytes,
                            );
                            // The snapshot covers every chunk so far; drop them in the
                            // same atomic batch.
                            for seq in *live_from..*next {
                                batch.delete(
                                    Keyspace::DocChunks,
                                    DocChunk::Incremental(seq).key(doc.as_bytes()),
                                );
                            }
                            *live_from = *next;
                        }
                        ChunkKind::Incremental => {
                            batch.put(
                                Keyspace::DocChunks,
                                DocChunk::Incremental(*next).key(doc.as_bytes()),
                                bytes,
                            );
                            *next += 1;
                        }
                    }
                }
                Output::PersistSyncState { peer, doc, state } => {
                    batch.put(Keyspace::SyncStates, sync_state_key(&peer, doc), state);
                }
                Output::Changed {
                    doc,
                    origin,
                    correlation_id,
                    heads,
                    ..
                } if self.entity_of_doc.contains_key(&doc) => {
                    let from_peer = match origin {
                        Origin::Peer(peer) => Some(peer),
                        _ => None,
                    };
                    // A change that came by sync carries no id on the frame; the document
                    // holds the one its writer gave.
                    let correlation_id = match (&from_peer, correlation_id) {
                        (Some(_), None) => self
                            .engine
                            .doc(doc)
                            .ok()
                            .and_then(hearth_crdt::schema::entity::correlation_id),
                        (_, id) => id,
                    };
                    match self.entity_view(doc) {
                        Ok(entity) => {
                            // The writer answers with this same view, read once, and
                            // listings reuse it.
                            self.views.insert(doc, (heads, Arc::new(entity.clone())));
                            self.last_view = Some((doc, entity.clone()));
                            self.emit(entity, from_peer, correlation_id)
                        }
                        Err(error) => {
                            tracing::warn!(%doc, %error, "change left an entity that does not validate")
                        }
                    }
                }
                Output::Changed { doc, origin, .. } => {
                    let from_peer = match origin {
                        Origin::Peer(peer) => Some(peer),
                        _ => None,
                    };
                    self.on_doc_changed(doc, from_peer);
                }
                Output::Send { peer, frame } => self.outbox.push((peer, frame)),
                Output::Conflict(record) => self.on_conflict_record(record),
                Output::Timer { .. } => {
                    // The run loop asks the engine for its next deadline each turn.
                }
                _ => {}
            }
        }
        batch
    }

    /// Persists outputs that no caller waits for (timers, remote changes). The batch
    /// starts once a slot is free (durability.rs).
    fn persist_in_background(&mut self, outputs: Vec<Output<String>>) {
        let batch = self.handle_outputs(outputs);
        if batch.is_empty() {
            return;
        }
        self.queue_persist(batch, Vec::new());
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `peer id length (u8) ‖ peer id ‖ doc id`, the storage crate's layout.
fn sync_state_key(peer: &str, doc: DocId) -> Vec<u8> {
    let peer = &peer.as_bytes()[..peer.len().min(255)];
    let mut key = Vec::with_capacity(1 + peer.len() + 16);
    key.push(peer.len() as u8);
    key.extend_from_slice(peer);
    key.extend_from_slice(doc.as_bytes());
    key
}

fn new_key() -> Result<DocKey, Error> {
    DocKey::generate().map_err(|e| Error::Internal(format!("cannot make a document key: {e}")))
}

/// Moves every operation of `more` to the end of `batch`.
fn append(batch: &mut Batch, more: Batch) {
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
fn clean_device_name(name: &str) -> String {
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

fn doc_err(e: hearth_crdt::Error) -> Error {
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
