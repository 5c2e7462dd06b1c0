//! Node assembly: data dir, store, identity, core and network (and the local API when
//! asked for), started and stopped as one.

use crate::records::{IDENTITY_KEY, NAME_KEY, STATIC_PEERS_KEY};
use std::fs::File;
#[cfg(feature = "api")]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_net::DeviceIdentity;
use hearth_storage::{KeySource, Keyspace, StoreHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::core::{self, CoreHandle};
use crate::entities::Entities;
use crate::{Config, DeviceId, Error, HomeId, NodeBuilder, datadir};

/// One frame recorded by [`Node::debug_capture`].
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Captured {
    /// The sending peer.
    pub peer: String,
    /// `sync` for the sync stream, `ephemeral` for the ephemeral stream.
    pub stream: &'static str,
    /// The bytes as received.
    pub raw: Vec<u8>,
    /// The opened payload, when this node could open it.
    pub opened: Option<Vec<u8>>,
}

/// How long shutdown spends closing peer connections.
const PEER_CLOSE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long shutdown waits for each of the core, network and event bus tasks to stop.
const TASK_STOP_TIMEOUT: Duration = Duration::from_millis(400);
/// How long shutdown waits for the store batches in flight to be flushed.
const PERSIST_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long shutdown waits for the store to flush and close. With the steps above the
/// whole stop stays within about 4 s, even with a failed or hung store.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the MQTT bridge may take to stop, counted from the start of the stop, alongside
/// the other steps.
#[cfg(feature = "mqtt")]
const MQTT_STOP_TIMEOUT: Duration = Duration::from_millis(2500);

/// A new invite code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The code: one line of text to give the joining device.
    pub code: String,
    /// When it expires.
    pub expires_at: crate::Timestamp,
}

/// A running node. Dropping it without [`Node::shutdown`] still releases the data dir
/// lock, but skips the final flush (and leaves `api.addr` behind when it serves the API).
pub struct Node {
    peer_id: DeviceId,
    device_name: String,
    home_id: HomeId,
    data_dir: PathBuf,
    store: StoreHandle,
    net: hearth_net::Handle,
    metrics: Arc<crate::metrics::Metrics>,
    cancel: CancellationToken,
    core_task: Supervised,
    net_task: Supervised,
    /// Set (once) to what ended when the core or the network task ends unasked.
    failure: tokio::sync::watch::Receiver<Option<String>>,
    #[cfg(feature = "test-hooks")]
    core_abort: tokio::task::AbortHandle,
    core: CoreHandle,
    bus: crate::bus::Bus,
    bus_task: JoinHandle<()>,
    retention_task: JoinHandle<()>,
    /// The local API, when the config asked for it.
    #[cfg(feature = "api")]
    api: Option<crate::api::Served>,
    /// The MQTT bridge, when the config asked for it.
    #[cfg(feature = "mqtt")]
    mqtt: Option<crate::mqtt::Running>,
    // Held for the node's lifetime: the OS lock on it keeps a second node off the dir.
    _lock: File,
}

impl Node {
    /// A builder for a node: headless unless `NodeBuilder::api` asks for the local
    /// API. Unset options keep [`Config::default`]'s values.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Opens (or on first start creates) the node in `config.data_dir`, and serves the
    /// local API when `config.api` asks for it (otherwise the node is headless: no HTTP
    /// server, and nothing in the data dir besides the store, its key file and the lock).
    ///
    /// Fails at once when another node holds the data dir, when the store key is wrong, or
    /// when the API address is taken. Not cancel-safe: dropping the future part-way can
    /// leave the store open until the runtime drops its thread handle.
    pub async fn start(config: Config) -> Result<Self, Error> {
        config.users.check()?;
        config.history.check()?;
        if config.batch_window > crate::MAX_BATCH_WINDOW {
            return Err(Error::Invalid(format!(
                "batch window {:?} is longer than the {:?} allowed",
                config.batch_window,
                crate::MAX_BATCH_WINDOW
            )));
        }
        #[cfg(feature = "api")]
        if let Some(api) = &config.api {
            api.seed.check()?;
        }
        #[cfg(feature = "api")]
        let allowed_origins = match &config.api {
            Some(api) => api
                .allowed_origins
                .iter()
                .map(|o| crate::api::guard::normalise_origin(o))
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::Invalid)?,
            None => Vec::new(),
        };
        let dir = config.data_dir.clone();
        datadir::ensure_dir(&dir)?;
        // The MQTT settings are checked before anything is opened; the node id they may
        // derive needs the PeerId, so the check runs again below with it.
        #[cfg(feature = "mqtt")]
        if let Some(mqtt) = &config.mqtt {
            mqtt.check("")?;
        }
        let lock = datadir::lock(&dir)?;

        let key = match &config.passphrase {
            Some(p) => KeySource::Passphrase(p.0.clone()),
            None => KeySource::KeyFile,
        };
        // Opening may run Argon2id and replays sled's log: both block, so keep them off
        // the async workers.
        let open_dir = dir.clone();
        let store = tokio::task::spawn_blocking(move || hearth_storage::open(&open_dir, key))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;

        let identity = load_or_create_identity(&store).await?;
        let device_name = resolve_device_name(&store, config.device_name.as_deref()).await?;
        let cancel = CancellationToken::new();
        let mut config = config;
        if let Some(bytes) = store.get(Keyspace::Meta, STATIC_PEERS_KEY.to_vec()).await? {
            match crate::records::from_json::<Vec<String>>("static peers", &bytes) {
                Ok(peers) => config.static_peers.extend(peers),
                Err(error) => tracing::warn!(%error, "ignoring unreadable stored peer list"),
            }
        }
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let mut net_cfg = net_config(&config, &identity)?;
        net_cfg.metrics = Some(metrics.registry());
        // The certificate must be in the very first hello: a peer dialled at start (a static
        // peer) keeps the certificate it got, and an empty one marks a device still pairing.
        // A brand-new home has none yet; its core issues one before any peer can know it.
        if let Some(cert) = store
            .get(Keyspace::Meta, crate::records::CERT_KEY.to_vec())
            .await?
        {
            net_cfg.certificate = cert;
        }
        let (net, net_events, net_loop) =
            hearth_net::new(net_cfg).map_err(|e| Error::Network(e.to_string()))?;
        let (failed_tx, failure) = tokio::sync::watch::channel(None);
        let net_task = supervise(
            "network",
            tokio::spawn(tracing::Instrument::instrument(
                net_loop.run(cancel.clone()),
                tracing::error_span!("net", peer = %identity.peer_id()),
            )),
            cancel.clone(),
            failed_tx.clone(),
        );
        let (core, facts, core_task) = core::start(
            store.clone(),
            identity.peer_id(),
            &identity.peer_id_bytes(),
            &device_name,
            net.clone(),
            net_events,
            metrics.clone(),
            config.batch_window,
            crate::rooms::service::ChatRetention {
                max_messages: config.chat_max_messages,
                max_age: config.chat_max_age,
            },
            config.users.clone(),
            config.documents_cache_mib as usize * 1024 * 1024,
            config.history.clone(),
            cancel.clone(),
        )
        .await?;
        #[cfg(feature = "test-hooks")]
        let core_abort = core_task.abort_handle();
        let core_task = supervise("core", core_task, cancel.clone(), failed_tx);

        let bus = crate::bus::Bus::new();
        let bus_task = crate::bus::bridge::spawn(
            &core,
            facts.events_from_start,
            bus.clone(),
            crate::bus::bridge::Identity {
                home_id: facts.home_id.clone(),
                peer_id: identity.peer_id(),
            },
            cancel.clone(),
        );

        let retention_task = tokio::spawn(
            crate::audit::run_retention(
                store.clone(),
                core.clone(),
                crate::audit::Retention {
                    max_entries: config.audit_max_entries,
                    max_age: config.audit_max_age,
                },
                cancel.clone(),
            )
            .instrument(tracing::error_span!("retention")),
        );

        #[cfg(feature = "api")]
        let api = match &config.api {
            Some(api) => Some(
                crate::api::serve(
                    api,
                    &allowed_origins,
                    crate::api::NodeView {
                        peer_id: identity.peer_id(),
                        device_name: device_name.clone(),
                        data_dir: dir.clone(),
                        store: crate::store_view::StoreView::new(store.clone()),
                        core: core.clone(),
                        net: net.clone(),
                        home_id: facts.home_id.clone(),
                        home_name: facts.home_name.clone(),
                        metrics: metrics.clone(),
                        bus: bus.clone(),
                    },
                    cancel.clone(),
                )
                .await?,
            ),
            None => None,
        };
        #[cfg(not(feature = "api"))]
        drop(facts.home_name);
        #[cfg(feature = "mqtt")]
        let mqtt = match &config.mqtt {
            Some(mqtt) => Some(crate::mqtt::spawn(
                mqtt.check(&identity.peer_id())?,
                crate::Entities { core: core.clone() },
                crate::Events {
                    rx: core.node_events.subscribe(),
                    core: core.clone(),
                },
                &device_name,
                cancel.clone(),
            )),
            None => None,
        };
        #[cfg(feature = "api")]
        let api_addr = api.as_ref().map(|api| api.addr);
        #[cfg(not(feature = "api"))]
        let api_addr: Option<std::net::SocketAddr> = None;
        tracing::info!(
            peer_id = %identity.peer_id(),
            data_dir = %dir.display(),
            api = api_addr.map(tracing::field::display),
            "node started"
        );

        Ok(Self {
            peer_id: identity.peer_id().into(),
            device_name,
            home_id: facts.home_id.into(),
            data_dir: dir,
            store,
            net,
            metrics,
            cancel,
            core_task,
            net_task,
            failure,
            #[cfg(feature = "test-hooks")]
            core_abort,
            core,
            bus,
            bus_task,
            retention_task,
            #[cfg(feature = "api")]
            api,
            #[cfg(feature = "mqtt")]
            mqtt,
            _lock: lock,
        })
    }

    /// Joins the home of a device invite code as a new device, storing the membership in
    /// `config.data_dir` (which must not hold a home yet). Runs without a node; start one
    /// on the same data dir afterwards. A wrong, used or expired code fails with a message
    /// that says so, and leaves no store behind.
    ///
    /// Not cancel-safe: dropping it mid-exchange can leave a partial store in the dir.
    pub async fn join(code: &str, config: &Config) -> Result<crate::Joined, Error> {
        crate::pairing::join::join(code, config).await
    }

    /// Issues a single-use device invite code that lives for `ttl`. Only the home's admin
    /// device can invite.
    ///
    /// Cancel-safe: a code issued for a dropped call is never shown and simply expires.
    pub async fn invite(&self, ttl: Duration) -> Result<Invite, Error> {
        self.invite_kind(false, ttl).await
    }

    /// A single-use home invite code, valid for `ttl`: another running home passes it to
    /// [`crate::Shares::pair`] (`hearth join CODE`), and the two homes become known to each
    /// other.
    ///
    /// Cancel-safe.
    pub async fn invite_home(&self, ttl: Duration) -> Result<Invite, Error> {
        self.invite_kind(true, ttl).await
    }

    async fn invite_kind(&self, home: bool, ttl: Duration) -> Result<Invite, Error> {
        let invite = self
            .core
            .call(
                |reply| crate::pairing::service::PairingRequest::CreateInvite {
                    home,
                    ttl_s: ttl.as_secs().max(1),
                    reply,
                },
            )
            .await??;
        Ok(Invite {
            code: invite.code,
            expires_at: crate::core::rfc3339_ms(invite.expires_at_s.saturating_mul(1000)),
        })
    }

    /// The addresses the node listens on for peers, as multiaddr text.
    ///
    /// Cancel-safe.
    pub async fn listen_addrs(&self) -> Result<Vec<String>, Error> {
        let addrs = self
            .net
            .listen_addrs()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        Ok(addrs.iter().map(|a| a.to_string()).collect())
    }

    /// PeerIds of the devices currently admitted (connected and proven members of this
    /// home).
    ///
    /// Cancel-safe.
    pub async fn admitted_peers(&self) -> Result<Vec<DeviceId>, Error> {
        let peers = self
            .net
            .connected_peers()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        Ok(peers
            .into_iter()
            .filter(|p| p.admitted)
            .map(|p| p.peer.to_base58().into())
            .collect())
    }

    /// How much waits in this node's outbound sync queue to `peer`, as
    /// `(frames, bytes)`; `None` when the peer is not connected. The queue is bounded by
    /// [`crate::PEER_QUEUE_FRAMES`] and [`crate::PEER_QUEUE_BYTES`]; a peer that lets it
    /// fill is dropped.
    ///
    /// Cancel-safe.
    pub async fn outbound_queue(&self, peer: &DeviceId) -> Result<Option<(usize, usize)>, Error> {
        let peers = self
            .net
            .connected_peers()
            .await
            .map_err(|e| Error::Network(e.to_string()))?;
        Ok(peers
            .into_iter()
            .find(|p| p.peer.to_base58() == peer.as_str())
            .map(|p| (p.queued_frames, p.queued_bytes)))
    }

    /// Test hook: while `stalled`, this node's core reads no network events, as a device
    /// whose sync processing hangs would behave. Its connections stay up and answer pings,
    /// but the frames peers send it are not consumed, so their queues toward it fill.
    /// Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn debug_stall_network_reads(&self, stalled: bool) {
        self.core.stall_net.send_replace(stalled);
    }

    /// Test hook: sends `bytes` as one raw frame to `peer` (base58 PeerId) on the sync
    /// stream, or on the ephemeral stream when `ephemeral`, bypassing the core's encoding
    /// and sealing, so tests can play a member device that sends garbage. Not for
    /// production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_send_raw(
        &self,
        peer: &str,
        ephemeral: bool,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        let peer: hearth_net::PeerId = peer
            .parse()
            .map_err(|_| Error::Invalid(format!("not a PeerId: {peer}")))?;
        let bytes = hearth_net::Bytes::from(bytes);
        let sent = if ephemeral {
            self.net.send_ephemeral(peer, bytes).await
        } else {
            self.net.send(peer, bytes).await
        };
        match sent.map_err(|e| Error::Network(e.to_string()))? {
            hearth_net::SendOutcome::Queued => Ok(()),
            other => Err(Error::Network(format!("frame not queued: {other:?}"))),
        }
    }

    /// What reconnects have cost since start: digest exchanges, and how many documents
    /// needed a sync exchange versus were found already in sync.
    ///
    /// Cancel-safe.
    pub async fn sync_counters(&self) -> Result<crate::SyncCounters, Error> {
        self.core
            .call(|reply| crate::core::NodeRequest::Counters { reply })
            .await?
    }

    /// How far this device is from the home's devices it is connected to: the documents it
    /// holds, and per admitted peer how many of them are not yet in sync with that peer.
    /// A device that just joined starts far behind; `hearth up` shows this as its initial
    /// sync.
    ///
    /// Cancel-safe.
    pub async fn sync_lag(&self) -> Result<crate::SyncLag, Error> {
        let report = self
            .core
            .call(|reply| crate::core::NodeRequest::SyncReport { reply })
            .await??;
        Ok(crate::SyncLag {
            documents: report.documents,
            peers: report
                .peers
                .into_iter()
                .map(|p| (p.peer, p.docs_behind))
                .collect(),
        })
    }

    /// This device's PeerId, in base58.
    pub fn peer_id(&self) -> &DeviceId {
        &self.peer_id
    }

    /// This device's name.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The address the local API actually bound; `None` for a headless node.
    #[cfg(feature = "api")]
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|api| api.addr)
    }

    /// This device's home, by HomeId.
    pub fn home_id(&self) -> &HomeId {
        &self.home_id
    }

    /// The node's entities: read and write. Their changes come with the other events of
    /// [`Node::events`].
    pub fn entities(&self) -> Entities {
        Entities {
            core: self.core.clone(),
        }
    }

    /// Revokes a device of this home (by PeerId or unique device name): it is refused as a
    /// member from now on, and every document of the home moves to a new key that only
    /// the remaining devices (and the homes entities are shared with) receive. Only the
    /// admin device, which holds the home's root key, can revoke.
    pub async fn revoke_device(&self, device: &str) -> Result<crate::RevokedDevice, Error> {
        let device = device.to_string();
        self.core
            .call(
                |reply| crate::revocation::service::RevocationRequest::RevokeDevice {
                    device,
                    reply,
                },
            )
            .await?
    }

    /// Sharing with other homes: pair, share, unshare, list, audit.
    pub fn shares(&self) -> crate::Shares {
        crate::Shares {
            core: self.core.clone(),
        }
    }

    /// Test hook: from now on, records every frame this node receives (as received, and,
    /// for frames it could open, the opened payload too) into the returned list. Not for
    /// production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_capture(
        &self,
    ) -> Result<std::sync::Arc<std::sync::Mutex<Vec<Captured>>>, Error> {
        let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = sink.clone();
        self.core
            .call(|reply| crate::core::hooks::HookRequest::Capture {
                sink: shared,
                reply,
            })
            .await??;
        Ok(sink)
    }

    /// Test hook: tries to open one frame as received from the network (for example one
    /// captured on another node) with this device's document keys. `Ok` means it opened;
    /// the error says why not. Nothing is applied either way. Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_open_frame(&self, bytes: Vec<u8>) -> Result<(), Error> {
        self.core
            .call(|reply| crate::core::hooks::HookRequest::OpenFrame { bytes, reply })
            .await?
    }

    /// Test hook: seals `payload` (an Automerge sync message, well formed or not) as a
    /// sync frame for entity `id`'s document, under the key this device holds for it, so
    /// a test can play a device of a home the entity is shared with that sends crafted
    /// input through [`Node::debug_send_raw`]. Nothing is sent or applied. Not for
    /// production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_seal_sync(&self, id: &str, payload: Vec<u8>) -> Result<Vec<u8>, Error> {
        let entity = id.to_string();
        self.core
            .call(|reply| crate::core::hooks::HookRequest::SealSync {
                entity,
                payload,
                reply,
            })
            .await?
    }

    /// Test hook: writes an entity as [`Entities::set`] does, but without this node's own
    /// check of its home's rights on it, so a test can show that the owner home refuses
    /// what a read-only home wrote. Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_write_unchecked(
        &self,
        id: &str,
        write: crate::EntityWrite,
    ) -> Result<crate::Entity, Error> {
        let id = id.to_string();
        self.core
            .call(
                |reply| crate::core::hooks::HookRequest::SetEntityUnchecked {
                    id,
                    write,
                    header_epoch: None,
                    reply,
                },
            )
            .await?
    }

    /// Test hook: moves an entity document's key epoch to `counter` in a change of this
    /// node's, without any check, as a writer home's library rewriting the header would,
    /// so a test can show that the owner refuses it. Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_write_epoch_unchecked(
        &self,
        id: &str,
        counter: u64,
    ) -> Result<crate::Entity, Error> {
        let id = id.to_string();
        self.core
            .call(
                |reply| crate::core::hooks::HookRequest::SetEntityUnchecked {
                    id,
                    write: crate::EntityWrite::default(),
                    header_epoch: Some(counter),
                    reply,
                },
            )
            .await?
    }

    /// Test hook: whether entity `id`'s document is loaded (`None`: no such entity),
    /// loading nothing. Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_document_loaded(&self, id: &str) -> Result<Option<bool>, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| crate::core::hooks::HookRequest::DocumentLoaded { id, reply })
            .await?
    }

    /// Test hook: the sync sessions of entity `id`'s document, as text. Not for
    /// production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_sessions(&self, id: &str) -> Result<String, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| crate::core::hooks::HookRequest::Sessions { id, reply })
            .await?
    }

    /// Test hook: writes this home's document as a device that wants revoked device
    /// `peer` back would (its `revoked_at` cleared, its signed revocation deleted), so a
    /// test can show that the revocation holds. Not for production use.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_clear_revocation(&self, peer: &str) -> Result<(), Error> {
        let peer = peer.to_string();
        self.core
            .call(|reply| crate::core::hooks::HookRequest::ClearRevocation { peer, reply })
            .await?
    }

    /// The home's rooms: create, join, leave, chat.
    pub fn rooms(&self) -> crate::Rooms {
        crate::Rooms {
            core: self.core.clone(),
        }
    }

    /// Presence: set and read users' status.
    pub fn presence(&self) -> crate::Presence {
        crate::Presence {
            core: self.core.clone(),
        }
    }

    /// Device locks: priority leases decided by the home's arbiter (its admin device).
    pub fn users(&self) -> crate::Users {
        crate::Users {
            core: self.core.clone(),
        }
    }

    /// Notifications for users (seed 001).
    pub fn notifications(&self) -> crate::Notifications {
        crate::Notifications {
            core: self.core.clone(),
        }
    }

    /// Emergency alerts: raise one for the home and the paired homes that take them,
    /// list what this device sent or received, opt in to a paired home's.
    pub fn alerts(&self) -> crate::Alerts {
        crate::Alerts {
            core: self.core.clone(),
        }
    }

    /// User sessions, readable on every device of the home, and their handoff from the
    /// device a session is active on to another.
    pub fn sessions(&self) -> crate::Sessions {
        crate::Sessions {
            core: self.core.clone(),
        }
    }

    /// Group activities (trivia, story, sing-along, synchronised playback): start one run
    /// by this device, read any of the home's, score from any device.
    pub fn activities(&self) -> crate::Activities {
        crate::Activities {
            core: self.core.clone(),
        }
    }

    /// Synchronised playback: start media on several devices at one instant, each by
    /// its own clock, and the clock estimates behind it.
    pub fn playback(&self) -> crate::Playback {
        crate::Playback {
            core: self.core.clone(),
        }
    }

    /// Test hook: moves this node's playback clock by `ms`, as a device whose clock is
    /// set wrong; its peers must find the offset by probing. Forgets this node's clock
    /// samples (not its peers' samples of it).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn debug_clock_skew(&self, ms: i64) -> Result<(), crate::Error> {
        self.core
            .call(|reply| crate::playback::service::PlaybackRequest::Skew { ms, reply })
            .await?
    }

    /// Device locks (seed 004): priority leases decided by the home's arbiter.
    pub fn locks(&self) -> crate::Locks {
        crate::Locks {
            core: self.core.clone(),
        }
    }

    /// Every event of the node from now on, as one stream: entity changes and deletions,
    /// rooms, chat, presence, shares, conflicts, locks, devices of the home coming and
    /// going, and events devices published for this one; [`Events::publish`](crate::Events::publish)
    /// publishes one for the home's devices.
    /// A subscriber that falls more than [`CHANGE_BUFFER`](crate::CHANGE_BUFFER) events
    /// behind skips ahead and is told how many it missed. The bus ([`Node::bus`]) and the
    /// API's WebSocket are fed from the same stream.
    pub fn events(&self) -> crate::Events {
        crate::Events {
            rx: self.core.node_events.subscribe(),
            core: self.core.clone(),
        }
    }

    /// The node's metrics as OpenMetrics text, what the API serves on `/metrics`: for an
    /// integration that serves or records them itself.
    ///
    /// Cancel-safe.
    pub async fn metrics(&self) -> Result<String, Error> {
        self.metrics.scrape(&self.core, &self.net).await
    }

    /// The node's event bus: `entity.changed`, `peer.connected` and the other events of
    /// this node, local and remote; integrations may subscribe and publish.
    pub fn bus(&self) -> &crate::bus::Bus {
        &self.bus
    }

    /// What the MQTT bridge has done so far, or `None` when the node runs none.
    #[cfg(feature = "mqtt")]
    pub fn mqtt_status(&self) -> Option<crate::MqttStatus> {
        self.mqtt.as_ref().map(|m| m.stats.snapshot())
    }

    /// The data dir the node runs on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the API (if it serves one) and removes `api.addr`, flushes and closes the
    /// store, and releases the data dir. Not cancel-safe: finish it, or the final flush may
    /// not happen.
    pub async fn shutdown(self) -> Result<(), Error> {
        // Close peer connections first, so peers see this device leave now and accept its
        // next connection at once, instead of holding a stale session until it times out.
        let net = self.net.clone();
        let _ = tokio::time::timeout(PEER_CLOSE_TIMEOUT, async move {
            if let Ok(peers) = net.connected_peers().await {
                for p in peers {
                    let _ = net.disconnect(p.peer).await;
                }
            }
        })
        .await;
        self.cancel.cancel();
        #[cfg(feature = "api")]
        if let Some(api) = self.api {
            api.stop().await?;
        }
        // The MQTT bridge says `offline` to the broker and leaves while the rest stops; it
        // is waited for at the end, against a deadline counted from now.
        #[cfg(feature = "mqtt")]
        let mqtt_deadline = tokio::time::Instant::now() + MQTT_STOP_TIMEOUT;
        // The core stops at the cancellation, after starting its last batches.
        let core_ended = stop_task("core", self.core_task).await?;
        let net_ended = stop_task("network", self.net_task).await?;
        stop_task("event bus", self.bus_task).await?;
        // A prune in progress finishes before the store closes under it.
        stop_task("retention", self.retention_task).await?;
        // Every persist slot free means every batch the core started has been answered by
        // the store, so closing it now loses none of them.
        let slots = crate::core::MAX_PERSISTS_IN_FLIGHT as u32;
        match tokio::time::timeout(
            PERSIST_DRAIN_TIMEOUT,
            self.core.persists.acquire_many(slots),
        )
        .await
        {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("store batches still in flight at shutdown; they may not be flushed")
            }
        }
        // The store is closed even after a task failed, so what was flushed stays whole.
        match tokio::time::timeout(STORE_CLOSE_TIMEOUT, self.store.close()).await {
            Ok(closed) => closed?,
            Err(_) => tracing::warn!("the store did not close in time; leaving it to the exit"),
        }
        #[cfg(feature = "mqtt")]
        if let Some(mut mqtt) = self.mqtt {
            // Its own limits end it within about 2 s; this is the backstop.
            if tokio::time::timeout_at(mqtt_deadline, &mut mqtt.task)
                .await
                .is_err()
            {
                tracing::warn!("the MQTT bridge did not stop in time; aborting it");
                mqtt.task.abort();
            }
        }
        if let Some(Err(reason)) = core_ended {
            return Err(Error::Task(reason));
        }
        if let Some(Err(reason)) = net_ended {
            return Err(Error::Task(reason));
        }
        tracing::info!("node stopped");
        Ok(())
    }

    /// Resolves when a task the node cannot run without (the core or the network event
    /// loop) has ended while the node was not stopping: it panicked, or returned early.
    /// Yields what ended and how. A node in that state no longer syncs or answers writes,
    /// so its owner should stop it ([`Node::shutdown`]) and report the failure; `hearth up`
    /// exits 1. Never resolves for a healthy node.
    ///
    /// Cancel-safe.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The senders live in the supervising tasks, which only end after sending or
            // at a requested stop: nothing failed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Test hook: aborts the core task, as a crash of the core would end it. Not for
    /// production use; only built with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn debug_abort_core(&self) {
        self.core_abort.abort();
    }
}

/// A node task behind its supervisor: the supervisor's result says whether the task ended
/// as asked (`Ok`) or not (`Err` with what happened).
type Supervised = JoinHandle<Result<(), String>>;

/// Watches `task`: when it ends before `cancel` fired (it returned early, panicked or was
/// aborted), logs an error and reports it on `failed`, which [`Node::failed`] waits on.
fn supervise(
    name: &'static str,
    task: JoinHandle<()>,
    cancel: CancellationToken,
    failed: tokio::sync::watch::Sender<Option<String>>,
) -> Supervised {
    tokio::spawn(async move {
        let ended = task.await;
        let reason = match ended {
            Ok(()) if cancel.is_cancelled() => return Ok(()),
            Ok(()) => format!("the {name} task ended on its own"),
            Err(e) if e.is_panic() => format!("the {name} task panicked"),
            Err(e) => format!("the {name} task was stopped: {e}"),
        };
        tracing::error!(task = name, reason = %reason, "a node task ended; the node cannot go on");
        failed.send_if_modified(|slot| {
            // The first failure is the one worth reporting; a second follows from it.
            if slot.is_none() {
                *slot = Some(reason.clone());
                true
            } else {
                false
            }
        });
        Err(reason)
    })
}

/// Waits (bounded) for a node task to stop after the cancellation, and aborts it if it
/// does not, so a task stuck on a hung store cannot hold the exit.
async fn stop_task<T>(what: &str, mut task: JoinHandle<T>) -> Result<Option<T>, Error> {
    match tokio::time::timeout(TASK_STOP_TIMEOUT, &mut task).await {
        Ok(joined) => joined
            .map(Some)
            .map_err(|e| Error::Task(format!("{what}: {e}"))),
        Err(_) => {
            tracing::warn!(task = what, "did not stop in time; aborting it");
            task.abort();
            Ok(None)
        }
    }
}

/// Longest wait between redials of a peer that went away. hearth-net's own default (30 s)
/// suits a library talking to strangers; a home's devices come back after a restart or a
/// healed partition and must be found again within seconds, and dials are cheap on a LAN.
pub(crate) const NODE_REDIAL_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Parses the public, string-typed network settings into the network layer's config.
fn net_config(config: &Config, identity: &DeviceIdentity) -> Result<hearth_net::Config, Error> {
    let parse = |what: &str, text: &str| {
        text.parse::<hearth_net::Multiaddr>().map_err(|e| {
            Error::Invalid(format!(
                "{what} {text:?} is not a multiaddr ({e}); write it like /ip4/127.0.0.1/tcp/4640"
            ))
        })
    };
    let listen = config
        .listen
        .iter()
        .map(|a| parse("listen address", a))
        .collect::<Result<Vec<_>, _>>()?;
    let static_peers = config
        .static_peers
        .iter()
        .map(|a| parse("peer address", a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(hearth_net::Config {
        identity: identity.clone(),
        listen,
        mdns: config.mdns,
        static_peers,
        max_connections_per_ip: config.max_connections_per_ip,
        redial_max: NODE_REDIAL_MAX,
        ..hearth_net::Config::default()
    })
}

async fn load_or_create_identity(store: &StoreHandle) -> Result<DeviceIdentity, Error> {
    if let Some(bytes) = store.get(Keyspace::Meta, IDENTITY_KEY.to_vec()).await? {
        return Ok(DeviceIdentity::from_bytes(&bytes)?);
    }
    let identity = DeviceIdentity::generate();
    store
        .put(Keyspace::Meta, IDENTITY_KEY.to_vec(), identity.to_bytes())
        .await?;
    tracing::info!(peer_id = %identity.peer_id(), "created device identity");
    Ok(identity)
}

/// A name given on the command line wins and is remembered; otherwise the stored name,
/// otherwise the host name.
async fn resolve_device_name(store: &StoreHandle, given: Option<&str>) -> Result<String, Error> {
    if let Some(name) = given {
        store
            .put(Keyspace::Meta, NAME_KEY.to_vec(), name.as_bytes().to_vec())
            .await?;
        return Ok(name.to_string());
    }
    if let Some(bytes) = store.get(Keyspace::Meta, NAME_KEY.to_vec()).await? {
        return Ok(String::from_utf8_lossy(&bytes).into_owned());
    }
    Ok(host_name())
}

/// The host name, or `hearth-device` where none can be read.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hearth-device".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that was away (restarted, or cut off by a partition) is redialled within
    /// seconds however long it was gone: the backoff stops growing at the node's cap, not
    /// at the network layer's 30 s default.
    #[test]
    fn the_node_caps_the_redial_backoff_at_two_seconds() {
        let identity = DeviceIdentity::generate();
        let net = net_config(&Config::default(), &identity).expect("default config");
        assert_eq!(net.redial_max, NODE_REDIAL_MAX);
        assert!(NODE_REDIAL_MAX <= std::time::Duration::from_secs(2));
        assert!(net.redial_max < hearth_net::Config::default().redial_max);
    }
}
