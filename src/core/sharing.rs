//! Sharing between homes: home pairing (both sides), admission of paired homes' devices,
//! share and unshare with key rotation, grants on the sync stream, and the checks on
//! every frame a device of another home sends.
//!
//! A device of a paired home is admitted as a foreign peer. It gets grant frames for the
//! entities shared with its home (the entity's current key wrapped for that device) and a
//! sync session for each of them, and nothing else: no digest, no heartbeats, no rooms,
//! no home or registry document. Entities shared with this home are synced with their
//! owner's devices only; this home never relays them, not even to its own devices.

use std::collections::{BTreeMap, HashMap, HashSet};

use hearth_crdt::schema::home as home_schema;
use hearth_crdt::schema::registry::{self, Rights};
use hearth_crdt::wire::{Frame, GrantFrame};
use hearth_crdt::{DocId, DocKind, HomeLookup, KeyEpoch};
use hearth_net::{PeerClass, PeerId};
use hearth_storage::{Batch, Keyspace};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{Core, Reply, Request, doc_err, new_key, now_ms};
use crate::Error;
use crate::shares::{PairedWith, ShareOut};
use crate::trust::cert::{DeviceCert, Verdict};
use crate::trust::invite::{InviteCode, InviteKind};
use crate::trust::keys::{self, WrappedKey};
use crate::trust::pake::JoinerInfo;
use crate::trust::wire::{from_cbor, to_cbor};

/// Meta record holding what other homes share with this one.
const SHARED_IN_KEY: &[u8] = b"shared_in";
/// Shortest time between two audit entries for refused frames of one (peer, document): a
/// peer retrying a refused sync would otherwise fill the log.
const REFUSAL_AUDIT_INTERVAL_MS: u64 = 60_000;

/// A device of a paired home, admitted.
#[derive(Clone, Debug)]
pub(super) struct ForeignPeer {
    pub(super) net: PeerId,
    pub(super) home: String,
    x25519: [u8; 32],
}

/// An entity another home shares with this one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SharedIn {
    pub(super) entity_id: String,
    pub(super) owner: String,
    pub(super) rights: String,
    #[serde(default)]
    pub(super) revoked: bool,
}

/// The sharing state of the core.
#[derive(Default)]
pub(super) struct Sharing {
    /// Admitted devices of paired homes, by PeerId text.
    pub(super) foreign: HashMap<String, ForeignPeer>,
    /// Entities shared with this home, by document.
    pub(super) shared_in: BTreeMap<DocId, SharedIn>,
    /// Certificates of connected peers of other homes waiting on a pairing, so they can
    /// be admitted once it completes.
    pub(super) pending_hellos: HashMap<PeerId, Vec<u8>>,
    /// Issuers this node is pairing with as the joining home.
    pairing_with: HashSet<PeerId>,
    /// When a refused frame of (peer, document) was last audited.
    refusals_audited: HashMap<(String, DocId), u64>,
    /// Devices being revoked right now: refused at hello before the home document says so.
    pub(super) revoking: HashSet<String>,
}

/// A home's public parts, exchanged when two homes pair.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HomePublic {
    home_id: String,
    name: String,
    root_public: [u8; 32],
    /// (PeerId, certificate) of each unrevoked device.
    devices: Vec<(String, ByteBuf)>,
}

/// What travels in a grant frame.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) enum ShareMessage {
    /// The key of an entity's document for one epoch, wrapped for the receiving device.
    Grant {
        entity_id: String,
        doc: String,
        epoch: KeyEpoch,
        wrapped: ByteBuf,
        rights: String,
    },
    /// The receiving home's grant on the entity ended.
    Revoke { entity_id: String, doc: String },
    /// Between devices of one home: a new key of the home or registry document, after a
    /// device revocation (see revoke.rs).
    HomeKey(super::revoke::HomeKey),
    /// A device of the sending home was revoked: the record its home's root key signed.
    Revocation { record: ByteBuf },
}

/// Most entities one home may share with this one; grants past it are refused, so a
/// paired home cannot grow this home's keyring without bound.
const MAX_SHARED_IN_PER_HOME: usize = 4096;

/// Largest grant message accepted.
const MAX_SHARE_MESSAGE: usize = 4096;

/// Largest home record accepted at pairing: what a joining home's record may take in the
/// pairing exchange, on both sides.
const MAX_HOME_RECORD: usize = crate::trust::pake::MAX_JOINER_EXTRA_LEN;

/// Most devices of unknown homes kept waiting on a pairing (their certificates held until
/// it completes); more are refused at hello. An entry goes when its device disconnects.
const MAX_PENDING_HELLOS: usize = 64;

/// Most devices kept for one paired home: the rest of its list, and devices it adds past
/// this, are refused, so a paired home cannot grow this home's document without bound.
pub(crate) const MAX_DEVICES_PER_PAIRED_HOME: usize = 64;

/// Most refused (peer, document) pairs remembered for audit throttling; past it, entries
/// older than the audit interval go, and then the oldest.
const MAX_REFUSALS_TRACKED: usize = 1024;

impl Core {
    // ----- state ----------------------------------------------------------------------

    /// Reads what other homes share with this one.
    pub(super) async fn load_shared_in(&mut self) {
        match self.store.get(Keyspace::Meta, SHARED_IN_KEY.to_vec()).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<Vec<(String, SharedIn)>>(&bytes) {
                Ok(list) => {
                    for (doc, entry) in list {
                        if let Some(doc) = DocId::parse(&doc) {
                            self.sharing.shared_in.insert(doc, entry);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "the list of entities shared with this home does not decode; they stay unsynced")
                }
            },
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot read the entities shared with this home"),
        }
    }

    fn save_shared_in(&self, batch: &mut Batch) {
        let list: Vec<(String, &SharedIn)> = self
            .sharing
            .shared_in
            .iter()
            .map(|(d, e)| (d.to_string(), e))
            .collect();
        if let Ok(bytes) = serde_json::to_vec(&list) {
            batch.put(Keyspace::Meta, SHARED_IN_KEY.to_vec(), bytes);
        }
    }

    /// Whether `doc` belongs to another home: never synced with this home's own devices.
    pub(super) fn is_foreign_doc(&self, doc: DocId) -> bool {
        self.sharing.shared_in.contains_key(&doc)
    }

    /// Adds the entities shared with this home to the entity index, where their ids do not
    /// collide with one of this home's own.
    pub(super) fn index_shared_in(&mut self) {
        let entries: Vec<(DocId, String)> = self
            .sharing
            .shared_in
            .iter()
            .map(|(d, e)| (*d, e.entity_id.clone()))
            .collect();
        for (doc, id) in entries {
            if self.doc_of_entity_id.contains_key(&id) {
                continue;
            }
            self.doc_of_entity_id.insert(id.clone(), doc);
            self.entity_of_doc.insert(doc, id);
        }
    }

    /// Refuses a local write to an entity this home holds only read rights on.
    pub(super) fn check_write_rights(&self, doc: DocId, id: &str) -> Result<(), Error> {
        match self.sharing.shared_in.get(&doc) {
            Some(s) if s.revoked => Err(Error::Forbidden(format!(
                "{id} is no longer shared with this home by its owner"
            ))),
            Some(s) if s.rights != Rights::Write.as_str() => Err(Error::Forbidden(format!(
                "{id} is shared with this home read-only"
            ))),
            _ => Ok(()),
        }
    }

    pub(super) fn paired(&self) -> BTreeMap<String, home_schema::PairedHome> {
        self.engine
            .home_paired(self.home.home_doc)
            .unwrap_or_default()
    }

    /// A paired home named by HomeId or by a name unique among paired homes.
    fn resolve_home(&self, name: &str) -> Result<(String, home_schema::PairedHome), Error> {
        let paired = self.paired();
        if let Some(h) = paired.get(name) {
            return Ok((name.to_string(), h.clone()));
        }
        let mut by_name = paired.into_iter().filter(|(_, h)| h.name == name);
        match (by_name.next(), by_name.next()) {
            (Some(one), None) => Ok(one),
            (Some(_), Some(_)) => Err(Error::Conflict(format!(
                "more than one paired home is named {name:?}; use its HomeId"
            ))),
            _ => Err(Error::NotFound(format!("no paired home {name:?}"))),
        }
    }

    fn my_public(&self) -> HomePublic {
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, d)| d.revoked_at.is_none())
            .map(|(p, d)| (p, ByteBuf::from(d.certificate)))
            .collect();
        HomePublic {
            home_id: self.home.home_id.clone(),
            name: self.home.name.clone(),
            root_public: self.home.root_public,
            devices,
        }
    }

    // ----- pairing ----------------------------------------------------------------------

    /// Joining side of home pairing: starts the exchange with the code's issuer in a task
    /// of its own (it waits on the network), which reports back with
    /// [`Request::HomePairDone`].
    pub(super) fn start_home_pairing(&mut self, code: &str, reply: Reply<PairedWith>) {
        let now_s = now_ms() / 1000;
        let code = match InviteCode::parse(code, now_s) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(Error::Pairing(e.to_string())));
                return;
            }
        };
        if code.kind() != InviteKind::Home {
            let _ = reply.send(Err(Error::Invalid(
                "this is a device code: join a new device with `hearth join CODE --data DIR` while no node runs there".into(),
            )));
            return;
        }
        if code.home_id() == self.home.home_id {
            let _ = reply.send(Err(Error::Invalid(
                "this code was issued by this home itself".into(),
            )));
            return;
        }
        if self.paired().contains_key(code.home_id()) {
            let _ = reply.send(Err(Error::Conflict(format!(
                "already paired with home {}",
                code.home_id()
            ))));
            return;
        }
        let Some(tx) = self.self_tx.clone() else {
            let _ = reply.send(Err(Error::Internal("the core cannot reach itself".into())));
            return;
        };
        let issuer = *code.issuer();
        let issuer_addrs = code.addrs().to_vec();
        self.sharing.pairing_with.insert(issuer);
        let info = JoinerInfo {
            x25519_public: self.device.public(),
            device_name: self.device_name.clone(),
            extra: ByteBuf::from(to_cbor("home record", &self.my_public()).unwrap_or_default()),
        };
        let net = self.net.clone();
        let me = self.net.local_peer_id();
        tokio::spawn(async move {
            let result = crate::join::exchange_with_issuer(&net, &code, &me, info)
                .await
                .map(|grant| grant.home.to_vec());
            let _ = tx
                .send(Request::HomePairDone {
                    issuer,
                    issuer_addrs,
                    expected_home: code.home_id().to_string(),
                    result,
                    reply,
                })
                .await;
        });
    }

    /// Records the issuer's home once the exchange succeeded.
    pub(super) async fn finish_home_pairing(
        &mut self,
        issuer: PeerId,
        issuer_addrs: &[String],
        expected_home: &str,
        result: Result<Vec<u8>, Error>,
    ) -> Result<PairedWith, Error> {
        self.sharing.pairing_with.remove(&issuer);
        let home_bytes = result?;
        let public: HomePublic = from_cbor("home record", &home_bytes, MAX_HOME_RECORD)
            .map_err(|e| Error::Pairing(format!("the other home's record is malformed: {e}")))?;
        if public.home_id != expected_home {
            return Err(Error::Pairing(
                "the other home's record names another home than the code".into(),
            ));
        }
        let paired = self
            .record_paired_home(&public, &issuer.to_base58())
            .await?;
        self.keep_dialled(issuer, issuer_addrs).await;
        self.readmit(issuer).await;
        Ok(paired)
    }

    /// Issuing side of home pairing, once the joining home proved the code: records it and
    /// returns this home's public record for the grant.
    pub(super) async fn grant_home(
        &mut self,
        joiner: &str,
        extra: &[u8],
    ) -> Result<Vec<u8>, String> {
        let public: HomePublic = from_cbor("home record", extra, MAX_HOME_RECORD)
            .map_err(|e| format!("the joining home's record is malformed: {e}"))?;
        if public.home_id == self.home.home_id {
            return Err("a home cannot pair with itself".into());
        }
        self.record_paired_home(&public, joiner)
            .await
            .map_err(|e| e.to_string())?;
        to_cbor("home record", &self.my_public()).map_err(|e| e.to_string())
    }

    /// Called after the grant went out: admits the joining home's device that paired.
    pub(super) async fn after_home_granted(&mut self, joiner: PeerId) {
        self.readmit(joiner).await;
    }

    /// Checks a home's public record and stores it in the home document: the HomeId must
    /// be its root key's, and only devices whose certificates verify under that root are
    /// kept.
    async fn record_paired_home(
        &mut self,
        public: &HomePublic,
        via: &str,
    ) -> Result<PairedWith, Error> {
        if crate::home::home_id_for(&public.root_public) != public.home_id {
            return Err(Error::Pairing(
                "the other home's HomeId does not match its root key".into(),
            ));
        }
        let mut devices = BTreeMap::new();
        for (peer, cert) in &public.devices {
            if let Some(owner) = self.home_of_device(peer, Some(&public.home_id)) {
                tracing::warn!(%peer, home = %public.home_id, %owner, "dropping a device that belongs to another home");
                continue;
            }
            if devices.len() >= MAX_DEVICES_PER_PAIRED_HOME {
                tracing::warn!(home = %public.home_id, cap = MAX_DEVICES_PER_PAIRED_HOME, "dropping devices past the cap");
                break;
            }
            match DeviceCert::verify_bytes(cert, &public.root_public) {
                Verdict::Valid(c) if c.peer_id() == peer => {
                    devices.insert(peer.clone(), cert.to_vec());
                }
                _ => {
                    tracing::warn!(%peer, home = %public.home_id, "dropping a device whose certificate does not verify")
                }
            }
        }
        let name: String = public.name.chars().take(128).collect();
        let record = home_schema::PairedHome {
            name: name.clone(),
            root_key: public.root_public.to_vec(),
            devices,
            by: Some(self.peer_id.clone()),
        };
        let home_id = public.home_id.clone();
        let (_, out) = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::put_paired_home(d, &home_id, &record)
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        self.store.batch(batch).await?;
        self.actor_names.clear();
        self.refresh_actor_homes();
        crate::audit::record_by(&self.store, via, "home.paired", &home_id).await;
        tracing::info!(home = %home_id, %name, "paired with a home");
        Ok(PairedWith {
            home_id: home_id.into(),
            name,
        })
    }

    /// Keeps the other home's issuing device dialled, now and after restarts, so the
    /// homes reconnect without mDNS.
    async fn keep_dialled(&mut self, issuer: PeerId, addrs: &[String]) {
        let key = crate::node::STATIC_PEERS_KEY.to_vec();
        let mut stored: Vec<String> = match self.store.get(Keyspace::Meta, key.clone()).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            _ => Vec::new(),
        };
        for addr in addrs {
            let full = format!("{addr}/p2p/{issuer}");
            let Ok(multiaddr) = full.parse::<hearth_net::Multiaddr>() else {
                continue;
            };
            if let Err(error) = self.net.add_static_peer(multiaddr).await {
                tracing::warn!(%full, %error, "cannot keep the paired home's device dialled");
                continue;
            }
            if !stored.contains(&full) {
                stored.push(full);
            }
        }
        if let Ok(bytes) = serde_json::to_vec(&stored)
            && let Err(error) = self.store.put(Keyspace::Meta, key, bytes).await
        {
            tracing::warn!(%error, "cannot store the paired home's address");
        }
    }

    /// The home a device already belongs to, other than `except`: this home (first), or a
    /// paired home.
    fn home_of_device(&self, peer: &str, except: Option<&str>) -> Option<String> {
        if self
            .engine
            .home_devices(self.home.home_doc)
            .is_ok_and(|d| d.contains_key(peer))
        {
            return Some(self.home.home_id.clone());
        }
        self.paired()
            .into_iter()
            .find(|(id, h)| Some(id.as_str()) != except && h.devices.contains_key(peer))
            .map(|(id, _)| id)
    }

    /// Runs admission again for a connected peer whose hello waited on a pairing.
    async fn readmit(&mut self, peer: PeerId) {
        if let Some(cert) = self.sharing.pending_hellos.remove(&peer) {
            self.on_hello(peer, cert).await;
        }
    }

    // ----- admission ------------------------------------------------------------------

    /// A hello whose certificate names another home. A device of a paired home is
    /// admitted as a foreign peer; any other stays unadmitted while a pairing may still
    /// make it known (it can only pair, and the network drops it at its hello deadline),
    /// and is refused otherwise.
    pub(super) async fn on_foreign_hello(
        &mut self,
        peer: PeerId,
        certificate: Vec<u8>,
        claimed_home: &str,
    ) -> Result<(), String> {
        let peer_text = peer.to_base58();
        let paired = self.paired();
        let Some(home) = paired.get(claimed_home) else {
            let pairing = self.sharing.pairing_with.contains(&peer)
                || self.pairing.book.open_count(now_ms() / 1000) > 0;
            if pairing {
                if self.sharing.pending_hellos.len() >= MAX_PENDING_HELLOS
                    && !self.sharing.pending_hellos.contains_key(&peer)
                {
                    return Err("is of an unknown home, and too many such devices wait".into());
                }
                tracing::debug!(peer = %peer_text, "device of an unknown home; it may only pair");
                self.sharing.pending_hellos.insert(peer, certificate);
                return Ok(());
            }
            return Err("belongs to another home".into());
        };
        let Ok(root) = <[u8; 32]>::try_from(home.root_key.as_slice()) else {
            return Err("belongs to a paired home whose root key is malformed".into());
        };
        if self.revocations.contains(&peer_text) {
            return Err("is a revoked device of its home".into());
        }
        if !home.devices.contains_key(&peer_text) {
            if let Some(owner) = self.home_of_device(&peer_text, Some(claimed_home)) {
                return Err(format!("claims a PeerId that belongs to home {owner}"));
            }
            if home.devices.len() >= MAX_DEVICES_PER_PAIRED_HOME {
                return Err(format!(
                    "belongs to a paired home that already has {MAX_DEVICES_PER_PAIRED_HOME} devices"
                ));
            }
        }
        let cert = match DeviceCert::verify_bytes(&certificate, &root) {
            Verdict::Valid(c) if c.peer_id() == peer_text => c,
            Verdict::Valid(_) => {
                return Err("presented a certificate issued to another device".into());
            }
            _ => return Err("presented a certificate that does not verify".into()),
        };
        match self
            .net
            .admit(peer, PeerClass::Paired(claimed_home.into()))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(error) => return Err(format!("could not be admitted: {error}")),
        }
        tracing::info!(peer = %peer_text, home = claimed_home, device = cert.device_name(), "admitting a device of a paired home");
        self.sharing.foreign.insert(
            peer_text.clone(),
            ForeignPeer {
                net: peer,
                home: claimed_home.to_string(),
                x25519: *cert.x25519_public(),
            },
        );
        if !home.devices.contains_key(&peer_text) {
            // A device that home added after pairing: its certificate verified, so it
            // joins the known device list, and grants reach it from now on.
            let home_id = claimed_home.to_string();
            if let Ok((_, out)) =
                self.engine
                    .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                        home_schema::put_paired_device(d, &home_id, &peer_text, &certificate)
                    })
            {
                self.persist_in_background(out);
                self.actor_names.clear();
                self.refresh_actor_homes();
            }
        }
        // Its home learns of this home's revoked devices first, so it refuses them too.
        let mine = self.home.home_id.clone();
        for record in self.revocations.records_of(&mine) {
            self.queue_share_message(
                &peer_text,
                &ShareMessage::Revocation {
                    record: ByteBuf::from(record),
                },
            );
        }
        self.open_shared_sessions(&peer_text).await;
        Ok(())
    }

    /// Grants and sessions for a newly admitted foreign device: every entity of this home
    /// shared with its home, and every entity its home shares with this one.
    async fn open_shared_sessions(&mut self, peer: &str) {
        let Some(fp) = self.sharing.foreign.get(peer).cloned() else {
            return;
        };
        for (entity_id, doc, share) in self.shares_to(&fp.home) {
            self.send_grant(peer, &fp, &entity_id, doc, share.rights, None);
        }
        let incoming: Vec<DocId> = self
            .sharing
            .shared_in
            .iter()
            .filter(|(_, s)| s.owner == fp.home && !s.revoked)
            .map(|(d, _)| *d)
            .collect();
        for doc in incoming {
            self.attach_foreign(peer, doc).await;
        }
        self.send_pending().await;
    }

    /// This home's entities shared with `home`: (entity id, document, grant).
    fn shares_to(&self, home: &str) -> Vec<(String, DocId, registry::Share)> {
        let Ok(reg) = self.engine.registry(self.home.registry_doc) else {
            return Vec::new();
        };
        reg.entities
            .into_iter()
            .filter(|(_, e)| e.deleted_at.is_none())
            .filter_map(|(id, e)| e.shares.get(home).cloned().map(|s| (id, e.doc, s)))
            .collect()
    }

    /// Wraps the entity's current key for a foreign device, queues the grant and opens the
    /// document's session with it.
    fn send_grant(
        &mut self,
        peer: &str,
        fp: &ForeignPeer,
        entity_id: &str,
        doc: DocId,
        rights: Rights,
        epoch: Option<KeyEpoch>,
    ) {
        // Checked again here, not only at hello: a revocation may arrive while the
        // device is still connected, and no key is ever wrapped for a revoked device.
        if self.revocations.contains(peer) {
            tracing::info!(%peer, %entity_id, "not granting a key to a revoked device");
            return;
        }
        let Some(epoch) = epoch.or_else(|| self.engine.header(doc).ok().map(|h| h.key_epoch))
        else {
            tracing::warn!(%doc, "cannot grant a document that is not loaded");
            return;
        };
        let Some(key) = self.keyring.get(doc, epoch) else {
            tracing::warn!(%doc, "cannot grant a document whose key this device lacks");
            return;
        };
        let wrapped = match keys::wrap_key(key, doc, epoch, &fp.x25519) {
            Ok(w) => w.to_bytes().to_vec(),
            Err(error) => {
                tracing::warn!(%peer, %doc, %error, "cannot wrap a key for a paired device");
                return;
            }
        };
        let message = ShareMessage::Grant {
            entity_id: entity_id.to_string(),
            doc: doc.to_string(),
            epoch,
            wrapped: ByteBuf::from(wrapped),
            rights: rights.as_str().to_string(),
        };
        self.queue_share_message(peer, &message);
        match self.engine.attach(peer.to_string(), doc, None, now_ms()) {
            Ok(out) => self.persist_in_background(out),
            Err(error) => tracing::warn!(%peer, %doc, %error, "cannot open a shared session"),
        }
    }

    pub(super) fn queue_share_message(&mut self, peer: &str, message: &ShareMessage) {
        match to_cbor("grant message", message) {
            Ok(bytes) => self
                .outbox
                .push((peer.to_string(), Frame::Grant(GrantFrame { bytes }))),
            Err(error) => tracing::warn!(%error, "cannot encode a grant"),
        }
    }

    async fn attach_foreign(&mut self, peer: &str, doc: DocId) {
        let Some(epoch) = self.latest_epoch(doc) else {
            return;
        };
        self.ensure_expected(doc, epoch);
        match self.engine.attach(peer.to_string(), doc, None, now_ms()) {
            Ok(out) => self.persist_in_background(out),
            Err(error) => tracing::warn!(%peer, %doc, %error, "cannot open a shared session"),
        }
    }

    fn latest_epoch(&self, doc: DocId) -> Option<KeyEpoch> {
        self.keyring
            .ids()
            .filter(|(d, _)| *d == doc)
            .map(|(_, e)| e)
            .max()
    }

    // ----- frames from foreign devices ------------------------------------------------

    /// A grant frame from a foreign device: a key for an entity its home shares with this
    /// one, or the end of such a grant.
    pub(super) async fn on_grant_frame(&mut self, peer: &str, bytes: &[u8]) {
        // Capped before decoding; trailing bytes are refused too.
        let message: ShareMessage = match from_cbor("grant message", bytes, MAX_SHARE_MESSAGE) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%peer, %error, len = bytes.len(), "malformed grant frame dropped");
                return;
            }
        };
        if let ShareMessage::HomeKey(key) = message {
            if self.admitted.contains_key(peer) {
                self.accept_home_key(peer, key).await;
            } else {
                tracing::warn!(%peer, "home key from a device that is not of this home dropped");
            }
            return;
        }
        let Some(fp) = self.sharing.foreign.get(peer).cloned() else {
            tracing::warn!(%peer, "grant frame from a device that is not of a paired home");
            return;
        };
        match message {
            ShareMessage::HomeKey(_) => {}
            ShareMessage::Revocation { record } => {
                self.on_paired_revocation(peer, &fp.home, &record).await;
            }
            ShareMessage::Grant {
                entity_id,
                doc,
                epoch,
                wrapped,
                rights,
            } => {
                let Some(doc) = DocId::parse(&doc) else {
                    tracing::warn!(%peer, "grant for a malformed document id dropped");
                    return;
                };
                if let Err(reason) = self
                    .accept_grant(&fp, &entity_id, doc, epoch, &wrapped, &rights)
                    .await
                {
                    tracing::warn!(%peer, %doc, %reason, "grant refused");
                    crate::audit::record_by(
                        &self.store,
                        peer,
                        "grant.refused",
                        &format!("{entity_id}: {reason}"),
                    )
                    .await;
                    return;
                }
                self.attach_foreign(peer, doc).await;
                self.send_pending().await;
            }
            ShareMessage::Revoke { entity_id, doc } => {
                let Some(doc) = DocId::parse(&doc) else {
                    return;
                };
                let Some(entry) = self.sharing.shared_in.get_mut(&doc) else {
                    return;
                };
                if entry.owner != fp.home || entry.revoked {
                    return;
                }
                entry.revoked = true;
                let mut batch = Batch::new();
                self.save_shared_in(&mut batch);
                if let Err(error) = self.store.batch(batch).await {
                    tracing::error!(%error, "cannot record a revoked grant");
                }
                let peers: Vec<String> = self.sharing.foreign.keys().cloned().collect();
                for p in peers {
                    self.engine.detach(&p, doc);
                }
                crate::audit::record_by(&self.store, peer, "grant.revoked", &entity_id).await;
                let me = self.home.home_id.clone();
                self.emit_share(&entity_id, &fp.home, &me, "none", Some(peer.to_string()));
                tracing::info!(%entity_id, owner = %fp.home, "a home stopped sharing an entity with this one");
            }
        }
    }

    async fn accept_grant(
        &mut self,
        fp: &ForeignPeer,
        entity_id: &str,
        doc: DocId,
        epoch: KeyEpoch,
        wrapped: &[u8],
        rights: &str,
    ) -> Result<(), String> {
        if rights != "read" && rights != "write" {
            return Err(format!("unknown rights {rights:?}"));
        }
        if entity_id.is_empty() || entity_id.len() > 256 {
            return Err("bad entity id".into());
        }
        // A home cannot grant what it does not own: not a document of this home, and not
        // one another home already shares with this one.
        if self.keyring.ids().any(|(d, _)| d == doc) && !self.is_foreign_doc(doc) {
            return Err("names a document of this home".into());
        }
        if let Some(existing) = self.sharing.shared_in.get(&doc)
            && existing.owner != fp.home
        {
            return Err("names a document another home shares".into());
        }
        if !self.sharing.shared_in.contains_key(&doc)
            && self
                .sharing
                .shared_in
                .values()
                .filter(|s| s.owner == fp.home)
                .count()
                >= MAX_SHARED_IN_PER_HOME
        {
            return Err(format!(
                "its home already shares {MAX_SHARED_IN_PER_HOME} entities with this one"
            ));
        }
        let key = WrappedKey::from_bytes(wrapped)
            .and_then(|w| keys::unwrap_key(&w, doc, epoch, &self.device))
            .map_err(|e| format!("cannot unwrap the key: {e}"))?;
        let mut batch = Batch::new();
        let new_key = !self.keyring.contains(doc, epoch);
        self.keyring.insert(doc, epoch, key, &mut batch);
        let was = self.sharing.shared_in.insert(
            doc,
            SharedIn {
                entity_id: entity_id.to_string(),
                owner: fp.home.clone(),
                rights: rights.to_string(),
                revoked: false,
            },
        );
        self.save_shared_in(&mut batch);
        self.store.batch(batch).await.map_err(|e| e.to_string())?;
        self.ensure_expected_owned(doc, epoch, &fp.home);
        self.index_shared_in();
        let changed = was.as_ref().map(|w| (w.rights.as_str(), w.revoked)) != Some((rights, false));
        if changed {
            let me = self.home.home_id.clone();
            self.emit_share(entity_id, &fp.home, &me, rights, Some(fp.net.to_base58()));
        }
        if changed || new_key {
            crate::audit::record_by(
                &self.store,
                &fp.net.to_base58(),
                "grant.received",
                &format!(
                    "{entity_id} from {} ({rights}, epoch {})",
                    fp.home, epoch.counter
                ),
            )
            .await;
        }
        Ok(())
    }

    fn ensure_expected_owned(&mut self, doc: DocId, epoch: KeyEpoch, owner: &str) {
        if self.engine.header(doc).is_ok() {
            return;
        }
        self.engine
            .expect_document(doc, DocKind::Entity, owner, epoch);
    }

    /// Whether a push or sync frame from a device of paired home `home` may touch its
    /// document, and, for the owner's side, whether the changes it carries are ones that
    /// home may make. Called on the opened frame, before the engine sees it, with the home
    /// the network stamped on the frame when it arrived (never a lookup of the peer now:
    /// by the time a queued frame is read its sender may be gone). Fails closed: anything
    /// not shown to be allowed is refused.
    pub(super) fn authorize_foreign(&self, home: &str, frame: &Frame) -> Result<(), String> {
        let doc = match frame {
            Frame::Push(p) => p.doc,
            Frame::Sync(s) => s.doc,
            _ => return Err("not a push or sync frame".into()),
        };
        if let Some(s) = self.sharing.shared_in.get(&doc) {
            if s.owner != home {
                return Err("the document is not its home's".into());
            }
            if s.revoked {
                return Err("the document is no longer shared with this home".into());
            }
            return Ok(());
        }
        let entity = self.entity_of_doc.get(&doc).cloned().unwrap_or_default();
        let share = self
            .engine
            .registry_entry(self.home.registry_doc, &entity)
            .ok()
            .flatten()
            .filter(|e| e.doc == doc && e.deleted_at.is_none())
            .and_then(|e| e.shares.get(home).cloned());
        let Some(share) = share else {
            return Err("the document is not shared with its home".into());
        };
        let actors = hearth_crdt::payload_actors(frame, self.engine.config())
            .map_err(|e| format!("unreadable changes: {e}"))?;
        if actors.is_empty() {
            return Ok(());
        }
        if share.rights != Rights::Write {
            return Err("its home holds read rights only, and the frame carries changes".into());
        }
        // The engine's actor-to-home table, fed from both homes' device lists.
        let homes = self.engine.actor_homes();
        if let Some(bad) = actors.iter().find(|a| {
            let of = homes.home_of(a);
            of.as_deref() != Some(home) && of.as_deref() != Some(self.home.home_id.as_str())
        }) {
            return Err(format!(
                "carries a change by {bad}, not a device of its home"
            ));
        }
        // A writer home changes the entity's value only, never its header (kind, owner,
        // key epoch), identity or policy: only this home's devices move those.
        self.engine
            .check_grantee_changes(frame)
            .map_err(|e| e.to_string())
    }

    /// Logs and audits a refused frame (at most once a minute per peer and document).
    pub(super) async fn refuse_foreign(&mut self, peer: &str, frame: &Frame, reason: &str) {
        let doc = match frame {
            Frame::Push(p) => p.doc,
            Frame::Sync(s) => s.doc,
            _ => return,
        };
        tracing::warn!(%peer, %doc, %reason, "refusing a frame from a paired home's device");
        self.metrics_refused();
        let now = now_ms();
        let key = (peer.to_string(), doc);
        let due = self
            .sharing
            .refusals_audited
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= REFUSAL_AUDIT_INTERVAL_MS);
        if due {
            let tracked = &mut self.sharing.refusals_audited;
            if tracked.len() >= MAX_REFUSALS_TRACKED {
                tracked.retain(|_, t| now.saturating_sub(*t) < REFUSAL_AUDIT_INTERVAL_MS);
            }
            if tracked.len() >= MAX_REFUSALS_TRACKED
                && let Some(oldest) = tracked
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
            {
                tracked.remove(&oldest);
            }
            tracked.insert(key, now);
            let what = if matches!(frame, Frame::Push(_)) {
                "write.refused"
            } else {
                "sync.refused"
            };
            let entity = self
                .entity_of_doc
                .get(&doc)
                .cloned()
                .unwrap_or_else(|| doc.to_string());
            crate::audit::record_by(&self.store, peer, what, &format!("{entity}: {reason}")).await;
        }
    }

    fn metrics_refused(&mut self) {
        self.counters.frames_refused += 1;
    }

    // ----- share and unshare ----------------------------------------------------------

    pub(super) async fn share(
        &mut self,
        entity_id: &str,
        home: &str,
        read_only: bool,
        policy: Option<String>,
    ) -> Result<ShareOut, Error> {
        let (home_id, _) = self.resolve_home(home)?;
        let doc = self.own_entity_doc(entity_id)?;
        let policy = match &policy {
            Some(p) => Some(hearth_crdt::Policy::parse(p).ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown policy {p:?}; use latest-wins, merge, owner-wins, sharer-wins or user-choice"
                ))
            })?),
            None => None,
        };
        let rights = if read_only {
            Rights::Read
        } else {
            Rights::Write
        };
        let now = now_ms();
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now, None, |d, _, _| {
                registry::share(
                    d,
                    entity_id,
                    &home_id,
                    &registry::Share {
                        rights,
                        policy: policy.map(|p| p.as_str().to_string()),
                        by: Some(self.peer_id.clone()),
                    },
                )
            })
            .map_err(doc_err)?;
        let mut batch = self.handle_outputs(out);
        if let Some(p) = policy {
            let out = self
                .engine
                .set_entity_policy(doc, p, now, None)
                .map_err(doc_err)?;
            let more = self.handle_outputs(out);
            super::append(&mut batch, more);
        }
        self.store.batch(batch).await?;
        crate::audit::record_by(
            &self.store,
            &self.peer_id.clone(),
            "share.granted",
            &format!("{entity_id} with {home_id} ({})", rights.as_str()),
        )
        .await;
        let peers: Vec<(String, ForeignPeer)> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        for (peer, fp) in peers {
            self.send_grant(&peer, &fp, entity_id, doc, rights, None);
        }
        self.send_pending().await;
        self.emit_share(
            entity_id,
            &self.home.home_id.clone(),
            &home_id,
            rights.as_str(),
            None,
        );
        self.share_out(entity_id, &home_id)
    }

    pub(super) async fn unshare(&mut self, entity_id: &str, home: &str) -> Result<ShareOut, Error> {
        let (home_id, _) = self.resolve_home(home)?;
        let doc = self.own_entity_doc(entity_id)?;
        let before = self.share_out(entity_id, &home_id)?;
        self.revoke_share(entity_id, doc, &home_id).await?;
        Ok(ShareOut {
            epoch: self
                .engine
                .header(doc)
                .map(|h| epoch_text(&h.key_epoch))
                .unwrap_or_default(),
            ..before
        })
    }

    /// Removes one grant, tells the home's connected devices, and rotates the entity's key
    /// for everyone who keeps access.
    async fn revoke_share(
        &mut self,
        entity_id: &str,
        doc: DocId,
        home_id: &str,
    ) -> Result<(), Error> {
        let now = now_ms();
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now, None, |d, _, _| {
                registry::unshare(d, entity_id, home_id)
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        self.store.batch(batch).await?;
        let peers: Vec<String> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &peers {
            self.engine.detach(peer, doc);
            self.queue_share_message(
                peer,
                &ShareMessage::Revoke {
                    entity_id: entity_id.to_string(),
                    doc: doc.to_string(),
                },
            );
        }
        crate::audit::record_by(
            &self.store,
            &self.peer_id.clone(),
            "share.revoked",
            &format!("{entity_id} from {home_id}"),
        )
        .await;
        self.rotate(entity_id, doc).await?;
        self.send_pending().await;
        self.emit_share(entity_id, &self.home.home_id.clone(), home_id, "none", None);
        Ok(())
    }

    /// Starts a new epoch for an entity's document with a fresh key, wrapped for this
    /// home's devices (in the home document) and granted to the devices of every home it
    /// is still shared with.
    pub(super) async fn rotate(&mut self, entity_id: &str, doc: DocId) -> Result<KeyEpoch, Error> {
        let now = now_ms();
        let old = self.engine.header(doc).map_err(doc_err)?.key_epoch;
        let epoch = KeyEpoch {
            counter: old.counter.checked_add(1).ok_or_else(|| {
                Error::Internal(format!("{entity_id}: the key epoch counter is exhausted"))
            })?,
            device: *self.engine_actor_bytes(),
        };
        let key = new_key()?;
        let wraps = self.wrap_for_devices(&key, doc, epoch);
        let (_, home_out) = self
            .engine
            .transact(self.home.home_doc, now, None, |d, _, _| {
                for (peer, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, doc, &epoch, peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err)?;
        let mut batch = self.handle_outputs(home_out);
        self.keyring.insert(doc, epoch, key, &mut batch);
        self.store.batch(batch).await?;
        // The new key goes out before the first frame sealed under it.
        self.regrant(entity_id, doc, Some(epoch));
        let out = self
            .engine
            .set_key_epoch(doc, epoch, now)
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        self.store.batch(batch).await?;
        crate::audit::record_by(
            &self.store,
            &self.peer_id.clone(),
            "key.rotated",
            &format!("{entity_id} to epoch {}", epoch.counter),
        )
        .await;
        Ok(epoch)
    }

    /// Sends the entity's current key to every connected device of the homes it is
    /// shared with.
    pub(super) fn regrant(&mut self, entity_id: &str, doc: DocId, epoch: Option<KeyEpoch>) {
        let grants: Vec<(String, ForeignPeer, Rights)> = {
            let shares = self
                .engine
                .registry_entry(self.home.registry_doc, entity_id)
                .ok()
                .flatten()
                .map(|e| e.shares)
                .unwrap_or_default();
            self.sharing
                .foreign
                .iter()
                .filter_map(|(p, f)| {
                    shares
                        .get(&f.home)
                        .map(|s| (p.clone(), f.clone(), s.rights))
                })
                .collect()
        };
        for (peer, fp, rights) in grants {
            self.send_grant(&peer, &fp, entity_id, doc, rights, epoch);
        }
    }

    fn own_entity_doc(&self, entity_id: &str) -> Result<DocId, Error> {
        let entry = self
            .engine
            .registry_entry(self.home.registry_doc, entity_id)
            .map_err(doc_err)?;
        match entry {
            Some(e) if e.deleted_at.is_none() => Ok(e.doc),
            _ if self
                .doc_of_entity_id
                .get(entity_id)
                .is_some_and(|d| self.is_foreign_doc(*d)) =>
            {
                Err(Error::Forbidden(format!(
                    "{entity_id} belongs to another home; only its owner can share it"
                )))
            }
            _ => Err(Error::NotFound(format!(
                "no entity {entity_id} in this home"
            ))),
        }
    }

    fn share_out(&self, entity_id: &str, home_id: &str) -> Result<ShareOut, Error> {
        let entry = self
            .engine
            .registry_entry(self.home.registry_doc, entity_id)
            .map_err(doc_err)?
            .ok_or_else(|| Error::NotFound(format!("no entity {entity_id}")))?;
        let share = entry.shares.get(home_id);
        Ok(ShareOut {
            entity_id: entity_id.into(),
            home: home_id.into(),
            rights: share.map_or(crate::Rights::None, |s| {
                crate::Rights::from_engine(s.rights)
            }),
            policy: self.policy_name(entry.doc),
            epoch: self
                .engine
                .header(entry.doc)
                .map(|h| epoch_text(&h.key_epoch))
                .unwrap_or_default(),
        })
    }

    pub(super) fn policy_name(&self, doc: DocId) -> crate::Policy {
        self.engine
            .doc(doc)
            .ok()
            .and_then(|d| hearth_crdt::policy::read_policy(d).ok())
            .map(crate::Policy::from_engine)
            .unwrap_or_default()
    }

    /// Forgets a paired home: unshares everything shared with it (each entity's key
    /// rotates), stops syncing what it shared with this home, removes it from the home
    /// document and disconnects its devices.
    pub(super) async fn forget_home(&mut self, home: &str) -> Result<PairedWith, Error> {
        let (home_id, record) = self.resolve_home(home)?;
        for (entity_id, doc, _) in self.shares_to(&home_id) {
            self.revoke_share(&entity_id, doc, &home_id).await?;
        }
        let mut batch = Batch::new();
        for entry in self.sharing.shared_in.values_mut() {
            if entry.owner == home_id {
                entry.revoked = true;
            }
        }
        self.save_shared_in(&mut batch);
        let id = home_id.clone();
        let (_, out) = self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::remove_paired_home(d, &id)
            })
            .map_err(doc_err)?;
        let more = self.handle_outputs(out);
        super::append(&mut batch, more);
        self.store.batch(batch).await?;
        let peers: Vec<(String, PeerId)> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, f)| (p.clone(), f.net))
            .collect();
        for (text, peer) in peers {
            self.sharing.foreign.remove(&text);
            self.engine.detach_peer(&text);
            let _ = self
                .net
                .reject(peer, "peer belongs to a home this one forgot")
                .await;
        }
        self.drop_sync_states_of_peers(record.devices.keys().cloned().collect());
        crate::audit::record_by(
            &self.store,
            &self.peer_id.clone(),
            "home.forgotten",
            &home_id,
        )
        .await;
        Ok(PairedWith {
            home_id: home_id.into(),
            name: record.name,
        })
    }
}

impl Core {
    fn emit_share(
        &self,
        entity_id: &str,
        owner: &str,
        home: &str,
        rights: &str,
        from_peer: Option<String>,
    ) {
        self.emit_event(crate::events::Event::Share {
            entity_id: entity_id.into(),
            owner: owner.into(),
            home: home.into(),
            rights: crate::Rights::from_stored(rights),
            granted: rights != "none",
            from_peer: from_peer.map(Into::into),
        });
    }
}

pub(super) fn epoch_text(epoch: &KeyEpoch) -> String {
    home_schema::epoch_key(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> ShareMessage {
        ShareMessage::Grant {
            entity_id: "light.porch".into(),
            doc: DocId::from_bytes([7; 16]).to_string(),
            epoch: KeyEpoch {
                counter: 3,
                device: [9; 16],
            },
            wrapped: ByteBuf::from(vec![1u8; 80]),
            rights: Rights::Read.as_str().into(),
        }
    }

    fn decode(bytes: &[u8]) -> Result<ShareMessage, crate::trust::error::TrustError> {
        from_cbor("grant message", bytes, MAX_SHARE_MESSAGE)
    }

    #[test]
    fn share_messages_round_trip_as_cbor() {
        let messages = [
            grant(),
            ShareMessage::Revoke {
                entity_id: "light.porch".into(),
                doc: DocId::from_bytes([7; 16]).to_string(),
            },
            ShareMessage::HomeKey(super::super::revoke::HomeKey {
                doc: DocId::from_bytes([1; 16]).to_string(),
                epoch: KeyEpoch {
                    counter: 1,
                    device: [2; 16],
                },
                wrapped: ByteBuf::from(vec![3u8; 80]),
            }),
            ShareMessage::Revocation {
                record: ByteBuf::from(vec![4u8; 120]),
            },
        ];
        for message in messages {
            let bytes = to_cbor("grant message", &message).unwrap();
            // Not JSON: a peer that still spoke JSON is refused, not half understood.
            assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_err());
            let back = decode(&bytes).unwrap();
            assert_eq!(to_cbor("grant message", &back).unwrap(), bytes);
        }
        let bytes = to_cbor("grant message", &grant()).unwrap();
        match decode(&bytes).unwrap() {
            ShareMessage::Grant {
                entity_id,
                epoch,
                wrapped,
                rights,
                ..
            } => {
                assert_eq!(entity_id, "light.porch");
                assert_eq!(epoch.counter, 3);
                assert_eq!(wrapped.len(), 80);
                assert_eq!(rights, "read");
            }
            _ => panic!("decoded another kind of message"),
        }
    }

    #[test]
    fn a_grant_from_a_generic_cbor_encoder_decodes() {
        // The shape the integration test of malformed grants sends: it must get past
        // decoding, so that test reaches the checks after it.
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({"Grant": {
                "entity_id": "light.fake", "doc": "11111111111111111111111",
                "epoch": {"counter": 0, "device": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]},
                "wrapped": [1, 2, 3], "rights": "write"}}),
            &mut bytes,
        )
        .unwrap();
        assert!(matches!(decode(&bytes), Ok(ShareMessage::Grant { .. })));
    }

    #[test]
    fn share_messages_with_trailing_bytes_are_refused() {
        let mut bytes = to_cbor("grant message", &grant()).unwrap();
        bytes.push(0x00);
        assert!(decode(&bytes).is_err());
        // A second whole message after the first is refused too.
        let one = to_cbor("grant message", &grant()).unwrap();
        assert!(decode(&[one.clone(), one].concat()).is_err());
    }

    #[test]
    fn oversized_share_messages_are_refused_before_decoding() {
        let big = ShareMessage::Revocation {
            record: ByteBuf::from(vec![0u8; MAX_SHARE_MESSAGE]),
        };
        let bytes = to_cbor("grant message", &big).unwrap();
        assert!(bytes.len() > MAX_SHARE_MESSAGE);
        assert!(matches!(
            decode(&bytes),
            Err(crate::trust::error::TrustError::TooLarge { .. })
        ));
    }

    #[test]
    fn malformed_share_messages_are_refused() {
        let json =
            serde_json::to_vec(&serde_json::json!({"Revoke": {"entity_id": "x", "doc": "y"}}))
                .unwrap();
        let mut unknown_field = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({"Revoke": {"entity_id": "x", "doc": "y", "extra": 1}}),
            &mut unknown_field,
        )
        .unwrap();
        let mut unknown_kind = Vec::new();
        ciborium::into_writer(&serde_json::json!({"Telepathy": {}}), &mut unknown_kind).unwrap();
        let whole = to_cbor("grant message", &grant()).unwrap();
        for bad in [
            &b""[..],
            &b"\xff\x00"[..],
            &json[..],
            &unknown_field[..],
            &unknown_kind[..],
            &whole[..whole.len() - 1],
            &[0x5b; 10_000][..MAX_SHARE_MESSAGE],
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
