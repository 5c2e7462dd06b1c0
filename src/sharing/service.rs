//! Sharing between homes: home pairing (both sides), admission of paired homes' devices,
//! share and unshare with key rotation, grants on the sync stream, and the checks on
//! every frame a device of another home sends.
//!
//! A device of a paired home is admitted as a foreign peer. It gets grant frames for the
//! entities shared with its home (the entity's current key wrapped for that device) and a
//! sync session for each of them, and nothing else: no digest, no heartbeats, no rooms,
//! no home or registry document. Entities shared with this home are synced with their
//! owner's devices only; this home never relays them, not even to its own devices.

use crate::records::SHARED_IN_KEY;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use hearth_crdt::schema::home as home_schema;
use hearth_crdt::schema::registry::{self, Rights};
use hearth_crdt::{DocId, KeyEpoch};
use hearth_net::PeerId;
use hearth_storage::{Batch, Keyspace};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::Error;
use crate::core::{Core, Reply, doc_err};
use crate::shares::ShareOut;

/// Requests of the sharing service: paired homes and what is shared with them.
pub(crate) enum SharingRequest {
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
        rows: Vec<crate::sharing::lists::Row>,
        reply: crate::sharing::lists::ListReply,
    },
}

/// Shortest time between two audit entries for refused frames of one (peer, document): a
/// peer retrying a refused sync would otherwise fill the log.
pub(crate) const REFUSAL_AUDIT_INTERVAL_MS: u64 = 60_000;

/// A device of a paired home, admitted.
#[derive(Clone, Debug)]
pub(crate) struct ForeignPeer {
    pub(crate) net: PeerId,
    pub(crate) home: String,
    pub(crate) x25519: [u8; 32],
    /// Its certificate makes it its home's admin device, which arbitrates its locks.
    pub(crate) admin: bool,
}

/// An entity another home shares with this one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SharedIn {
    pub(crate) entity_id: String,
    pub(crate) owner: String,
    pub(crate) rights: String,
    #[serde(default)]
    pub(crate) revoked: bool,
    /// A grant of the same entity under a later document replaced this one: a grant of
    /// this document (a device of the owner with a stale registry) never brings it back.
    #[serde(default)]
    pub(crate) superseded: bool,
}

/// The sharing state of the core.
#[derive(Default)]
pub(crate) struct Sharing {
    /// Admitted devices of paired homes, by PeerId text.
    pub(crate) foreign: HashMap<String, ForeignPeer>,
    /// Entities shared with this home, by document.
    pub(crate) shared_in: BTreeMap<DocId, SharedIn>,
    /// Certificates of connected peers of other homes waiting on a pairing, so they can
    /// be admitted once it completes.
    pub(crate) pending_hellos: HashMap<PeerId, Vec<u8>>,
    /// Issuers this node is pairing with as the joining home.
    pub(crate) pairing_with: HashSet<PeerId>,
    /// When a refused frame of (peer, document) was last audited.
    pub(crate) refusals_audited: RefusalLog,
    /// Devices being revoked right now: refused at hello before the home document says so.
    pub(crate) revoking: HashSet<String>,
    /// The paired homes as the home document last listed them.
    pub(crate) paired_seen: BTreeSet<String>,
}

/// When each (peer, document) pair last had a refused frame audited: at most one entry a
/// minute per pair, and at most [`MAX_REFUSALS_TRACKED`] pairs remembered.
#[derive(Default)]
pub(crate) struct RefusalLog {
    last: HashMap<(String, DocId), u64>,
}

impl RefusalLog {
    /// Whether a refusal of `doc` from `peer` at `now` is due an audit entry; if so, it is
    /// noted. A full log first forgets pairs whose minute has passed, then the oldest.
    pub(crate) fn due(&mut self, peer: &str, doc: DocId, now: u64) -> bool {
        let key = (peer.to_string(), doc);
        let due = self
            .last
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= REFUSAL_AUDIT_INTERVAL_MS);
        if !due {
            return false;
        }
        if self.last.len() >= MAX_REFUSALS_TRACKED {
            self.last
                .retain(|_, t| now.saturating_sub(*t) < REFUSAL_AUDIT_INTERVAL_MS);
        }
        if self.last.len() >= MAX_REFUSALS_TRACKED
            && let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
        {
            self.last.remove(&oldest);
        }
        self.last.insert(key, now);
        true
    }
}

/// A home's public parts, exchanged when two homes pair.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HomePublic {
    pub(crate) home_id: String,
    pub(crate) name: String,
    pub(crate) root_public: [u8; 32],
    /// (PeerId, certificate) of each unrevoked device.
    pub(crate) devices: Vec<(String, ByteBuf)>,
}

/// Most entities one home may share with this one; grants past it are refused, so a
/// paired home cannot grow this home's keyring without bound.
pub(crate) const MAX_SHARED_IN_PER_HOME: usize = 4096;

/// Largest home record accepted at pairing: what a joining home's record may take in the
/// pairing exchange, on both sides.
pub(crate) const MAX_HOME_RECORD: usize = crate::trust::pake::MAX_JOINER_EXTRA_LEN;

/// Most devices of unknown homes kept waiting on a pairing (their certificates held until
/// it completes); more are refused at hello. An entry goes when its device disconnects.
pub(crate) const MAX_PENDING_HELLOS: usize = 64;

/// Most devices kept for one paired home: the rest of its list, and devices it adds past
/// this, are refused, so a paired home cannot grow this home's document without bound.
pub(crate) const MAX_DEVICES_PER_PAIRED_HOME: usize = 64;

/// Most refused (peer, document) pairs remembered for audit throttling; past it, entries
/// older than the audit interval go, and then the oldest.
pub(crate) const MAX_REFUSALS_TRACKED: usize = 1024;

impl Core {
    // ----- state ----------------------------------------------------------------------

    /// Reads what other homes share with this one.
    pub(crate) async fn load_shared_in(&mut self) {
        match self.store.get(Keyspace::Meta, SHARED_IN_KEY.to_vec()).await {
            Ok(Some(bytes)) => match crate::records::from_json::<Vec<(String, SharedIn)>>(
                "shared entities",
                &bytes,
            ) {
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

    pub(crate) fn save_shared_in(&self, batch: &mut Batch) {
        let list: Vec<(String, &SharedIn)> = self
            .sharing
            .shared_in
            .iter()
            .map(|(d, e)| (d.to_string(), e))
            .collect();
        if let Ok(bytes) = crate::records::to_json("shared entities", &list) {
            batch.put(Keyspace::Meta, SHARED_IN_KEY.to_vec(), bytes);
        }
    }

    /// Whether `doc` belongs to another home: never synced with this home's own devices.
    pub(crate) fn is_foreign_doc(&self, doc: DocId) -> bool {
        self.sharing.shared_in.contains_key(&doc)
    }

    /// Adds the entities shared with this home to the entity index, where their ids do not
    /// collide with one of this home's own.
    pub(crate) fn index_shared_in(&mut self) {
        // One document per entity id: a grant in force wins over one taken back (an
        // entity shared again under a new generation of its document), and an entity of
        // this home, or a grant in force already indexed, keeps its id.
        let mut chosen: HashMap<String, (DocId, bool)> = HashMap::new();
        for (doc, e) in &self.sharing.shared_in {
            match chosen.get(&e.entity_id) {
                Some((_, revoked)) if !*revoked || e.revoked => {}
                _ => {
                    chosen.insert(e.entity_id.clone(), (*doc, e.revoked));
                }
            }
        }
        for (id, (doc, revoked)) in chosen {
            if let Some(current) = self.entities.by_id.get(&id).copied() {
                let replaceable = !revoked
                    && current != doc
                    && self
                        .sharing
                        .shared_in
                        .get(&current)
                        .is_some_and(|s| s.revoked);
                if !replaceable {
                    continue;
                }
                self.entities.of_doc.remove(&current);
                self.entities.views.remove(&current);
            }
            self.entities.by_id.insert(id.clone(), doc);
            self.entities.of_doc.insert(doc, id);
        }
    }

    /// Refuses a local write to an entity this home holds only read rights on.
    pub(crate) fn check_write_rights(&self, doc: DocId, id: &str) -> Result<(), Error> {
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

    pub(crate) fn paired(&self) -> BTreeMap<String, home_schema::PairedHome> {
        self.engine
            .home_paired(self.home.home_doc)
            .unwrap_or_default()
    }

    /// A paired home named by HomeId or by a name unique among paired homes.
    pub(crate) fn resolve_home(
        &self,
        name: &str,
    ) -> Result<(String, home_schema::PairedHome), Error> {
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

    // ----- pairing ----------------------------------------------------------------------

    // ----- admission ------------------------------------------------------------------

    /// This home's entities shared with `home`: (entity id, document, grant).
    pub(crate) fn shares_to(&self, home: &str) -> Vec<(String, DocId, registry::Share)> {
        let Ok(reg) = self.engine.registry(self.home.registry_doc) else {
            return Vec::new();
        };
        reg.entities
            .into_iter()
            .filter(|(_, e)| e.deleted_at.is_none())
            .filter_map(|(id, e)| e.shares.get(home).cloned().map(|s| (id, e.doc, s)))
            .collect()
    }

    pub(crate) fn latest_epoch(&self, doc: DocId) -> Option<KeyEpoch> {
        self.keyring
            .ids()
            .filter(|(d, _)| *d == doc)
            .map(|(_, e)| e)
            .max()
    }

    // ----- frames from foreign devices ------------------------------------------------

    // ----- share and unshare ----------------------------------------------------------

    pub(crate) fn own_entity_doc(&self, entity_id: &str) -> Result<DocId, Error> {
        let entry = self
            .engine
            .registry_entry(self.home.registry_doc, entity_id)
            .map_err(doc_err)?;
        match entry {
            Some(e) if e.deleted_at.is_none() => Ok(e.doc),
            _ if self
                .entities
                .by_id
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

    pub(crate) fn share_out(&self, entity_id: &str, home_id: &str) -> Result<ShareOut, Error> {
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

    pub(crate) fn policy_name(&self, doc: DocId) -> crate::Policy {
        self.engine
            .doc(doc)
            .ok()
            .and_then(|d| hearth_crdt::policy::read_policy(d).ok())
            .map(crate::Policy::from_engine)
            .unwrap_or_default()
    }
}

/// A grant given, changed or ended.
pub(crate) fn share_event(
    entity_id: &str,
    owner: &str,
    home: &str,
    rights: &str,
    from_peer: Option<String>,
) -> crate::events::Event {
    crate::events::Event::Share {
        entity_id: entity_id.into(),
        owner: owner.into(),
        home: home.into(),
        rights: crate::Rights::from_stored(rights),
        granted: rights != "none",
        from_peer: from_peer.map(Into::into),
    }
}

pub(crate) fn epoch_text(epoch: &KeyEpoch) -> String {
    home_schema::epoch_key(epoch)
}

impl SharingRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        matches!(
            self,
            Self::PairHome { .. }
                | Self::ForgetHome { .. }
                | Self::Share { .. }
                | Self::Unshare { .. }
        )
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::PairHome { reply, .. }
            | Self::HomePairDone { reply, .. }
            | Self::ForgetHome { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Share { reply, .. } | Self::Unshare { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ListHomes { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::ListShares { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::FinishShareList { reply, .. } => reply.fail(error),
        }
    }
}

impl Core {
    /// Answers a request of the sharing service.
    pub(crate) async fn handle_sharing(&mut self, request: SharingRequest) {
        match request {
            SharingRequest::PairHome { code, reply } => self.start_home_pairing(&code, reply),
            SharingRequest::HomePairDone {
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
            SharingRequest::ListHomes { reply } => {
                self.list_shared(crate::sharing::lists::ListReply::Homes(reply));
            }
            SharingRequest::ForgetHome { home, reply } => {
                let result = self.step(|core, fx| core.forget_home(&home, fx)).await;
                let _ = reply.send(result);
            }
            SharingRequest::Share {
                entity_id,
                home,
                read_only,
                policy,
                reply,
            } => {
                let result = self
                    .step(|core, fx| core.share(&entity_id, &home, read_only, policy, fx))
                    .await;
                let _ = reply.send(result);
            }
            SharingRequest::Unshare {
                entity_id,
                home,
                reply,
            } => {
                let result = self
                    .step(|core, fx| core.unshare(&entity_id, &home, fx))
                    .await;
                let _ = reply.send(result);
            }
            SharingRequest::ListShares { reply } => {
                self.list_shared(crate::sharing::lists::ListReply::Shares(reply));
            }
            SharingRequest::FinishShareList { rows, reply } => self.finish_share_list(rows, reply),
        }
    }
}

/// One valid grant frame of each kind, for the fuzz targets' seed corpus; `revocation` is
/// a signed revocation record.
#[cfg(feature = "fuzzing")]
pub(crate) fn seeds_for_fuzzing(revocation: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use crate::trust::messages::{HomeKey, ShareMessage};
    use serde_bytes::ByteBuf;
    let doc = DocId::from_bytes([7; 16]).to_string();
    let epoch = KeyEpoch {
        counter: 3,
        device: [9; 16],
    };
    let wrapped = ByteBuf::from([vec![1u8], vec![2; 32 + 24 + 48]].concat());
    let lock = crate::locks::forward::LockMessage::Read {
        id: 1,
        device_name: "hall".into(),
    };
    let lock = crate::trust::wire::to_cbor("lock message", &lock).expect("a lock message encodes");
    let event = crate::propagation::wire::EventMessage {
        event_type: "doorbell.pressed".into(),
        targets: vec!["*".into()],
        payload: r#"{"door":"front"}"#.into(),
        timestamp_ms: 1_000,
        correlation_id: Some("c1".into()),
    };
    let session = crate::sessions::wire::SessionMessage::Offer {
        session: "s1".into(),
        handoff: "h1".into(),
        user: "ana".into(),
        persona: None,
        context: r#"{"page":3}"#.into(),
    };
    let activity = crate::activities::wire::ActivityMessage::Start {
        activity: "a1".into(),
        kind: "quiz".into(),
        devices: vec!["hall".into()],
        config: r#"{"rounds":3}"#.into(),
    };
    let messages = [
        (
            "grant",
            ShareMessage::Grant {
                entity_id: "light.porch".into(),
                doc: doc.clone(),
                epoch,
                wrapped: wrapped.clone(),
                rights: "read".into(),
            },
        ),
        (
            "revoke",
            ShareMessage::Revoke {
                entity_id: "light.porch".into(),
                doc: doc.clone(),
            },
        ),
        (
            "home-key",
            ShareMessage::HomeKey(HomeKey {
                doc,
                epoch,
                wrapped,
            }),
        ),
        (
            "revocation",
            ShareMessage::Revocation {
                record: ByteBuf::from(revocation.to_vec()),
            },
        ),
        (
            "lock",
            ShareMessage::Lock {
                bytes: ByteBuf::from(lock),
            },
        ),
        (
            "event",
            ShareMessage::Event {
                bytes: ByteBuf::from(event.encode().expect("an event encodes")),
            },
        ),
        (
            "session",
            ShareMessage::Session {
                bytes: ByteBuf::from(session.encode().expect("a session message encodes")),
            },
        ),
        (
            "activity",
            ShareMessage::Activity {
                bytes: ByteBuf::from(activity.encode().expect("an activity message encodes")),
            },
        ),
    ];
    messages
        .into_iter()
        .map(|(name, m)| {
            let bytes = crate::trust::wire::to_cbor("grant message", &m).expect("a frame encodes");
            (name, bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_audited_once_a_minute_per_peer_and_document() {
        let mut log = RefusalLog::default();
        let doc = DocId::from_bytes([1; 16]);
        let other = DocId::from_bytes([2; 16]);
        assert!(log.due("p", doc, 1_000));
        assert!(!log.due("p", doc, 1_000 + REFUSAL_AUDIT_INTERVAL_MS - 1));
        assert!(log.due("p", other, 1_001), "another document");
        assert!(log.due("q", doc, 1_002), "another peer");
        assert!(log.due("p", doc, 1_000 + REFUSAL_AUDIT_INTERVAL_MS));
    }

    #[test]
    fn the_refusal_log_stays_under_its_cap() {
        let mut log = RefusalLog::default();
        for n in 0..(MAX_REFUSALS_TRACKED as u64 * 2) {
            let doc = DocId::from_bytes([(n % 251) as u8; 16]);
            assert!(log.due(&format!("peer{n}"), doc, n));
        }
        assert!(log.last.len() <= MAX_REFUSALS_TRACKED);
        // The newest pair is still remembered.
        let n = MAX_REFUSALS_TRACKED as u64 * 2 - 1;
        let doc = DocId::from_bytes([(n % 251) as u8; 16]);
        assert!(!log.due(&format!("peer{n}"), doc, n + 1));
    }
    use crate::trust::messages::{MAX_SHARE_MESSAGE, ShareMessage};
    use crate::trust::wire::{from_cbor, to_cbor};

    pub(crate) fn grant() -> ShareMessage {
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

    pub(crate) fn decode(bytes: &[u8]) -> Result<ShareMessage, crate::trust::error::TrustError> {
        from_cbor("grant message", bytes, MAX_SHARE_MESSAGE)
    }

    #[test]
    pub(crate) fn share_messages_round_trip_as_cbor() {
        let messages = [
            grant(),
            ShareMessage::Revoke {
                entity_id: "light.porch".into(),
                doc: DocId::from_bytes([7; 16]).to_string(),
            },
            ShareMessage::HomeKey(crate::trust::messages::HomeKey {
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
    pub(crate) fn a_grant_from_a_generic_cbor_encoder_decodes() {
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
    pub(crate) fn share_messages_with_trailing_bytes_are_refused() {
        let mut bytes = to_cbor("grant message", &grant()).unwrap();
        bytes.push(0x00);
        assert!(decode(&bytes).is_err());
        // A second whole message after the first is refused too.
        let one = to_cbor("grant message", &grant()).unwrap();
        assert!(decode(&[one.clone(), one].concat()).is_err());
    }

    #[test]
    pub(crate) fn oversized_share_messages_are_refused_before_decoding() {
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
    pub(crate) fn malformed_share_messages_are_refused() {
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
