//! This device's key material: its X25519 secret, its certificate, and the document keys
//! it holds. Document keys sit in the `Keyring` keyspace (sealed at rest by the store);
//! the home document carries each key wrapped for every member device, which is how a
//! device learns keys for documents created elsewhere.

use crate::records::X25519_KEY;
use std::collections::HashMap;

use hearth_crdt::{DocId, KeyEpoch};
use hearth_storage::{Batch, Keyspace, Scan, StoreHandle};

use crate::Error;
use crate::trust::keys::{DOC_KEY_LEN, DeviceSecret, DocKey};

/// Most keyring entries read at start, per page.
const PAGE: usize = 4096;

/// Document keys this device holds.
#[derive(Default)]
pub(crate) struct Keyring {
    keys: HashMap<(DocId, KeyEpoch), DocKey>,
    /// The epochs held per document, oldest first.
    epochs: HashMap<DocId, std::collections::BTreeSet<KeyEpoch>>,
}

/// Most key epochs kept per document. Every rotation adds one; a paired home that owns an
/// entity could otherwise make this device keep a key per grant it sends. Frames sealed
/// under an epoch older than the document's current one are refused anyway, so the
/// oldest keys are only history.
pub(crate) const MAX_EPOCHS_PER_DOC: usize = 8;

impl Keyring {
    /// Reads every stored document key. A malformed entry is skipped with a warning; it
    /// stays on disk.
    pub(crate) async fn load(store: &StoreHandle) -> Result<Self, Error> {
        let mut ring = Self::default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut scan = Scan::all().limit(PAGE);
            if let Some(k) = after.take() {
                scan = scan.after(k);
            }
            let page = store.scan(Keyspace::Keyring, scan).await?;
            let full = page.len() == PAGE;
            for (key, value) in page {
                match (
                    crate::records::parse_keyring_key(&key),
                    <[u8; DOC_KEY_LEN]>::try_from(value.as_slice()),
                ) {
                    (Some(id), Ok(bytes)) => {
                        ring.keys.insert(id, DocKey::from_bytes(bytes));
                        ring.epochs.entry(id.0).or_default().insert(id.1);
                    }
                    _ => {
                        tracing::warn!(key = %hex::encode(&key), "skipping a malformed keyring entry")
                    }
                }
                after = Some(key);
            }
            if !full {
                return Ok(ring);
            }
        }
    }

    pub(crate) fn get(&self, doc: DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.keys.get(&(doc, epoch))
    }

    /// The keys of `doc` whose epoch a decoded frame's `wire` epoch (its counter and device
    /// prefix) may name: at most [`MAX_EPOCHS_PER_DOC`], almost always one. Only the
    /// right one opens the frame's seal, whose associated data binds the whole epoch.
    pub(crate) fn matching(
        &self,
        doc: DocId,
        wire: KeyEpoch,
    ) -> impl Iterator<Item = (KeyEpoch, &DocKey)> + '_ {
        self.epochs
            .get(&doc)
            .into_iter()
            .flatten()
            .filter(move |e| e.matches_wire(&wire))
            .filter_map(move |e| Some((*e, self.keys.get(&(doc, *e))?)))
    }

    /// The epoch to seal a frame of `doc` under that the engine made for `epoch` (its
    /// copy's current one): a held epoch of a higher counter, when exactly one held epoch
    /// has the highest counter. A device that learned a rotated key before the change that
    /// moves its copy to the new epoch arrived still holds changes made under the old one;
    /// sealed under the old key, the devices that rotated would refuse them as stale and
    /// the two copies would never meet again. Two held epochs of the highest counter
    /// (devices that rotated concurrently) leave the choice to the document's header, as
    /// paired homes were granted that one only.
    pub(crate) fn seal_epoch(&self, doc: DocId, epoch: KeyEpoch) -> KeyEpoch {
        let Some(held) = self.epochs.get(&doc) else {
            return epoch;
        };
        let Some(newest) = held.last() else {
            return epoch;
        };
        let alone = held.iter().filter(|e| e.counter == newest.counter).count() == 1;
        if newest.counter > epoch.counter && alone {
            *newest
        } else {
            epoch
        }
    }

    pub(crate) fn contains(&self, doc: DocId, epoch: KeyEpoch) -> bool {
        self.keys.contains_key(&(doc, epoch))
    }

    /// Every (document, epoch) held.
    pub(crate) fn ids(&self) -> impl Iterator<Item = (DocId, KeyEpoch)> + '_ {
        self.keys.keys().copied()
    }

    /// Records a key, adding its write to `batch`. Past [`MAX_EPOCHS_PER_DOC`] epochs of
    /// one document, the oldest is dropped (its delete joins `batch` too).
    pub(crate) fn insert(&mut self, doc: DocId, epoch: KeyEpoch, key: DocKey, batch: &mut Batch) {
        batch.put(
            Keyspace::Keyring,
            crate::records::keyring_key(doc, epoch),
            key.expose_secret().to_vec(),
        );
        self.keys.insert((doc, epoch), key);
        let held = self.epochs.entry(doc).or_default();
        held.insert(epoch);
        while held.len() > MAX_EPOCHS_PER_DOC {
            let Some(oldest) = held.pop_first() else {
                break;
            };
            self.keys.remove(&(doc, oldest));
            batch.delete(Keyspace::Keyring, crate::records::keyring_key(doc, oldest));
        }
    }

    /// Forgets every key of `doc` (a deleted generation), adding the deletes to `batch`,
    /// so the document is not expected again after a restart.
    pub(crate) fn forget(&mut self, doc: DocId, batch: &mut Batch) {
        for epoch in self.epochs.remove(&doc).unwrap_or_default() {
            self.keys.remove(&(doc, epoch));
            batch.delete(Keyspace::Keyring, crate::records::keyring_key(doc, epoch));
        }
    }
}

/// Loads the device's X25519 secret, creating it (in `batch`) when absent.
pub(crate) async fn device_secret(
    store: &StoreHandle,
    batch: &mut Batch,
) -> Result<DeviceSecret, Error> {
    match store.get(Keyspace::Meta, X25519_KEY.to_vec()).await? {
        Some(bytes) => {
            let bytes: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::CorruptRecord {
                        what: "device X25519 key",
                        detail: format!("{} bytes instead of 32", bytes.len()),
                    })?;
            Ok(DeviceSecret::from_bytes(bytes))
        }
        None => {
            let secret = DeviceSecret::generate();
            batch.put(
                Keyspace::Meta,
                X25519_KEY.to_vec(),
                secret.expose_secret().to_vec(),
            );
            Ok(secret)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn keyring_keys_round_trip_and_reject_other_lengths() {
        let doc = DocId::from_bytes([3; 16]);
        let epoch = KeyEpoch {
            counter: 7,
            device: [9; 16],
        };
        assert_eq!(
            crate::records::parse_keyring_key(&crate::records::keyring_key(doc, epoch)),
            Some((doc, epoch))
        );
        assert_eq!(crate::records::parse_keyring_key(&[0; 39]), None);
    }

    /// Frames are sealed under the newest epoch held of their document, never an older
    /// one than the engine named.
    #[test]
    fn frames_seal_under_the_newest_epoch_held() {
        let mut ring = Keyring::default();
        let mut batch = Batch::new();
        let doc = DocId::from_bytes([1; 16]);
        let at = |counter| KeyEpoch {
            counter,
            device: [2; 16],
        };
        for counter in [0, 1] {
            ring.insert(doc, at(counter), DocKey::generate().unwrap(), &mut batch);
        }
        assert_eq!(ring.seal_epoch(doc, at(0)), at(1));
        assert_eq!(ring.seal_epoch(doc, at(1)), at(1));
        // Named newer than any held (the seal then fails for want of its key).
        assert_eq!(ring.seal_epoch(doc, at(5)), at(5));
        let other = DocId::from_bytes([9; 16]);
        assert_eq!(ring.seal_epoch(other, at(0)), at(0));
        // Two devices rotated concurrently to counter 2: the header decides, not the key
        // that sorts last (a paired home was granted only the header's).
        let by = |device| KeyEpoch {
            counter: 2,
            device: [device; 16],
        };
        for device in [3, 4] {
            ring.insert(doc, by(device), DocKey::generate().unwrap(), &mut batch);
        }
        assert_eq!(ring.seal_epoch(doc, at(1)), at(1));
        assert_eq!(ring.seal_epoch(doc, by(3)), by(3));
    }

    #[tokio::test]
    pub(crate) async fn stored_keys_load_back() {
        let store = hearth_storage::open_in_memory().unwrap();
        let mut ring = Keyring::default();
        let mut batch = Batch::new();
        let doc = DocId::from_bytes([1; 16]);
        let epoch = KeyEpoch::first([2; 16]);
        let key = DocKey::generate().unwrap();
        ring.insert(doc, epoch, key.clone(), &mut batch);
        store.batch(batch).await.unwrap();
        let loaded = Keyring::load(&store).await.unwrap();
        assert_eq!(loaded.get(doc, epoch), Some(&key));
        assert!(!loaded.contains(doc, KeyEpoch::first([3; 16])));
    }

    #[tokio::test]
    pub(crate) async fn a_document_keeps_at_most_its_newest_epochs() {
        let store = hearth_storage::open_in_memory().unwrap();
        let mut ring = Keyring::default();
        let doc = DocId::from_bytes([1; 16]);
        let other = DocId::from_bytes([2; 16]);
        let epoch = |counter| KeyEpoch {
            counter,
            device: [5; 16],
        };
        let mut batch = Batch::new();
        ring.insert(other, epoch(0), DocKey::generate().unwrap(), &mut batch);
        for counter in 0..100 {
            ring.insert(doc, epoch(counter), DocKey::generate().unwrap(), &mut batch);
        }
        store.batch(batch).await.unwrap();
        for ring in [ring, Keyring::load(&store).await.unwrap()] {
            let held: Vec<u64> = ring
                .ids()
                .filter(|(d, _)| *d == doc)
                .map(|(_, e)| e.counter)
                .collect();
            assert_eq!(held.len(), MAX_EPOCHS_PER_DOC);
            assert!(held.iter().all(|c| *c >= 100 - MAX_EPOCHS_PER_DOC as u64));
            assert!(
                ring.contains(other, epoch(0)),
                "other documents keep theirs"
            );
        }
    }
}
