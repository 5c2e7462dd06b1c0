//! The signed, add-only set of revoked devices: this home's own and those of paired homes.
//!
//! A revocation is a record signed by the root key of the device's home (see
//! [`Revocation`]). Records travel in the home document (`home.revocations`, so every
//! device of the home learns them) and, to paired homes, in revocation frames on the sync
//! stream. Whatever the source, a record counts only once it verifies under the root key
//! of the home it names, and the set is only ever added to: each device keeps its own
//! copy in the store, so an entry deleted from the home document, or an unsigned
//! `revoked_at` reset to nothing, undoes no revocation.
//!
//! Every node checks the set at hello (own and foreign devices), before wrapping a key
//! for a device (grants and regrants), and on the actors of the changes it accepts.

use crate::records::REVOCATIONS_KEY;
use std::collections::{BTreeMap, HashSet};

use automerge::ActorId;
use hearth_storage::{Batch, Keyspace};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::trust::cert::{Revocation, Verdict};

/// Most revocations kept. A home revokes a handful of devices in its life; the cap bounds
/// what a paired home can make this one store by sending records for devices it minted.
pub(crate) const MAX_REVOCATIONS: usize = 4096;

/// One verified revocation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// HomeId of the revoked device's home.
    home: String,
    /// The signed record, as issued.
    record: ByteBuf,
}

/// The set, by PeerId of the revoked device.
#[derive(Default)]
pub(crate) struct Revocations {
    by_peer: BTreeMap<String, Entry>,
    /// Automerge actors of the revoked devices, to refuse their changes.
    actors: HashSet<ActorId>,
}

/// What learning a record did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Learnt {
    /// A new revocation of this device, of this home.
    New { peer: String, home: String },
    /// Already known.
    Known,
}

impl Revocations {
    /// Reads the stored set. Entries that do not decode are dropped with a warning: the
    /// home document and paired homes hold the records too, and they are learnt again.
    pub(crate) fn decode(bytes: &[u8]) -> Self {
        let mut set = Self::default();
        match crate::records::from_json::<Vec<(String, Entry)>>("revocations", bytes) {
            Ok(list) => {
                for (peer, entry) in list.into_iter().take(MAX_REVOCATIONS) {
                    set.insert(peer, entry);
                }
            }
            Err(error) => tracing::warn!(%error, "stored revocations do not decode"),
        }
        set
    }

    /// Writes the set into `batch`.
    pub(crate) fn save(&self, batch: &mut Batch) {
        let list: Vec<(&String, &Entry)> = self.by_peer.iter().collect();
        match crate::records::to_json("revocations", &list) {
            Ok(bytes) => {
                batch.put(Keyspace::Meta, REVOCATIONS_KEY.to_vec(), bytes);
            }
            Err(error) => tracing::error!(%error, "cannot encode the revocations"),
        }
    }

    /// The key of the stored set, for reading it at start.
    pub(crate) fn store_key() -> Vec<u8> {
        REVOCATIONS_KEY.to_vec()
    }

    pub(crate) fn insert(&mut self, peer: String, entry: Entry) {
        if let Ok(p) = peer.parse::<hearth_net::PeerId>() {
            self.actors
                .insert(hearth_crdt::actor_for_peer(&p.to_bytes()));
        }
        self.by_peer.insert(peer, entry);
    }

    /// Whether `peer` is revoked.
    pub(crate) fn contains(&self, peer: &str) -> bool {
        self.by_peer.contains_key(peer)
    }

    /// Whether `actor` writes for a revoked device.
    pub(crate) fn has_actor(&self, actor: &ActorId) -> bool {
        self.actors.contains(actor)
    }

    /// Whether any device is revoked at all (the common case is none, which keeps the
    /// per-frame checks free).
    pub(crate) fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }

    /// The records of `home`'s revoked devices.
    pub(crate) fn records_of(&self, home: &str) -> Vec<Vec<u8>> {
        self.by_peer
            .values()
            .filter(|e| e.home == home)
            .map(|e| e.record.to_vec())
            .collect()
    }

    /// PeerIds of `home`'s revoked devices.
    pub(crate) fn peers_of<'a>(&'a self, home: &'a str) -> impl Iterator<Item = &'a String> {
        self.by_peer
            .iter()
            .filter(move |(_, e)| e.home == home)
            .map(|(p, _)| p)
    }

    /// Verifies `record` and adds it. `root_of` gives the root public key of a home this
    /// node trusts (its own, or a paired one); a record of any other home, one that does
    /// not verify, or one past the cap is refused with the reason.
    pub(crate) fn learn(
        &mut self,
        record: &[u8],
        root_of: impl Fn(&str) -> Option<[u8; 32]>,
    ) -> Result<Learnt, String> {
        let home = match Revocation::claimed_home(record) {
            Some(h) => h,
            None => return Err("the revocation does not decode".into()),
        };
        let root = root_of(&home).ok_or("the revocation names a home this one does not know")?;
        let revocation = match Revocation::verify_bytes(record, &root) {
            Verdict::Valid(r) => r,
            Verdict::BadSignature => {
                return Err("the revocation's signature does not verify".into());
            }
            Verdict::WrongHome { .. } => return Err("the revocation names another home".into()),
            Verdict::Malformed(m) => return Err(format!("malformed revocation: {m}")),
        };
        let peer = revocation.peer_id().to_string();
        if self.by_peer.contains_key(&peer) {
            return Ok(Learnt::Known);
        }
        if self.by_peer.len() >= MAX_REVOCATIONS {
            return Err(format!("already {MAX_REVOCATIONS} revocations kept"));
        }
        self.insert(
            peer.clone(),
            Entry {
                home: home.clone(),
                record: ByteBuf::from(record.to_vec()),
            },
        );
        Ok(Learnt::New { peer, home })
    }
}

/// The stored set holding one revocation record, for the fuzz targets' seed corpus.
#[cfg(feature = "fuzzing")]
pub(crate) fn seed_for_fuzzing(record: &[u8]) -> Vec<u8> {
    let home = Revocation::claimed_home(record).unwrap_or_default();
    let entry = Entry {
        home,
        record: ByteBuf::from(record.to_vec()),
    };
    let list = vec![("peer".to_string(), entry)];
    crate::records::to_json("revocations", &list).expect("the set encodes")
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::home::home_id_for;

    pub(crate) fn root(seed: u8) -> (SigningKey, String) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let id = home_id_for(&key.verifying_key().to_bytes());
        (key, id)
    }

    pub(crate) fn peer() -> String {
        hearth_net::PeerId::random().to_base58()
    }

    #[test]
    pub(crate) fn only_records_signed_by_a_known_home_count_and_nothing_is_removed() {
        let (mine, my_id) = root(1);
        let (other, _) = root(2);
        let roots = |home: &str| (home == my_id).then(|| mine.verifying_key().to_bytes());
        let mut set = Revocations::default();
        let lost = peer();

        let forged = Revocation::issue(&other, &lost, 5)
            .unwrap()
            .encode()
            .unwrap();
        assert!(set.learn(&forged, roots).is_err(), "a stranger's record");
        assert!(set.learn(b"\x00garbage", roots).is_err());
        assert!(!set.contains(&lost));

        let good = Revocation::issue(&mine, &lost, 5)
            .unwrap()
            .encode()
            .unwrap();
        assert_eq!(
            set.learn(&good, roots).unwrap(),
            Learnt::New {
                peer: lost.clone(),
                home: my_id.clone()
            }
        );
        assert_eq!(set.learn(&good, roots).unwrap(), Learnt::Known);
        assert!(set.contains(&lost));
        let actor =
            hearth_crdt::actor_for_peer(&lost.parse::<hearth_net::PeerId>().unwrap().to_bytes());
        assert!(set.has_actor(&actor));

        // A tampered copy is refused and the revocation stays.
        let mut tampered = good.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(set.learn(&tampered, roots).is_err());
        assert!(set.contains(&lost));

        // The stored copy comes back whole.
        let mut batch = Batch::new();
        set.save(&mut batch);
        let bytes = batch_value(&batch);
        let back = Revocations::decode(&bytes);
        assert!(back.contains(&lost));
        assert_eq!(back.records_of(&my_id), vec![good]);
    }

    pub(crate) fn batch_value(batch: &Batch) -> Vec<u8> {
        batch
            .ops()
            .iter()
            .find_map(|op| match op {
                hearth_storage::BatchOp::Put { value, .. } => Some(value.clone()),
                _ => None,
            })
            .unwrap()
    }
}
