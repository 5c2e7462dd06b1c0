//! Every store key and record encoding the node uses, in one place.
//!
//! The store (hearth-storage) holds keyspaces; this module says what lives in each:
//!
//! | keyspace | key | value |
//! | --- | --- | --- |
//! | `Meta` | the `*_KEY` constants below | JSON records ([`to_json`]/[`from_json`]), or raw bytes (identity, X25519 secret, certificate) |
//! | `DocChunks` | [`DocChunk`] (`doc id ‖ 0x00` snapshot, `doc id ‖ 0x01 ‖ seq` increments) | Automerge chunks |
//! | `SyncStates` | [`sync_state_key`]: `len(peer) ‖ peer ‖ doc id` | encoded Automerge sync state |
//! | `Keyring` | [`keyring_key`]: `doc id ‖ epoch counter ‖ epoch device` | a document key |
//! | `Audit` | [`audit_key`]: `ms ‖ seq` (big-endian, so keys sort by time) | JSON audit entry |
//! | `Outbox` | [`alert_out_key`]: `alert/` ‖ alert id | JSON alert this device sent, with its receipts |
//! | `Meta` | [`alert_in_key`]: `alerts/in/` ‖ alert id | JSON alert this device received |
//! | `Meta` | [`doc_meta_key`]: `docs/meta/` ‖ doc id | JSON header and heads of a document (core/resident.rs) |
//!
//! The project is unreleased: when an encoding here changes, old stores get no migration.

use hearth_crdt::{DocId, KeyEpoch};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) use hearth_storage::DocChunk;

use crate::Error;

/// The home's record: its id, name, root key and the ids of its home and registry documents.
pub(crate) const HOME_KEY: &[u8] = b"home/record";
/// This device's libp2p identity (protobuf-encoded keypair).
pub(crate) const IDENTITY_KEY: &[u8] = b"device/identity";
/// This device's name.
pub(crate) const NAME_KEY: &[u8] = b"device/name";
/// Peers dialled at every start (JSON list of multiaddrs): `--peer`, the issuer learnt at
/// pairing, paired homes' devices.
pub(crate) const STATIC_PEERS_KEY: &[u8] = b"net/static_peers";
/// This device's X25519 secret.
pub(crate) const X25519_KEY: &[u8] = b"device/x25519";
/// This device's certificate, signed by the home's root key.
pub(crate) const CERT_KEY: &[u8] = b"device/cert";
/// Documents quarantined at start (JSON).
pub(crate) const QUARANTINE_KEY: &[u8] = b"repair/quarantine";
/// Signed revocations of this home's and paired homes' devices (JSON).
pub(crate) const REVOCATIONS_KEY: &[u8] = b"revocations";
/// Entities other homes share with this one (JSON).
pub(crate) const SHARED_IN_KEY: &[u8] = b"shared_in";
/// The lock arbiter's table, keys included (JSON): on the arbiter device, and on a
/// device a handoff placed it on.
pub(crate) const LOCKS_KEY: &[u8] = b"locks/table";
/// This device's part in the lock arbiter naming: the naming its table is for, and
/// whether it yielded it to a handoff (JSON).
pub(crate) const LOCK_ROLE_KEY: &[u8] = b"locks/role";
/// The highest signed lock arbiter naming this device has seen (CBOR, as signed).
pub(crate) const LOCK_NAMING_KEY: &[u8] = b"locks/naming";

/// Prefix of every document's meta record (JSON: header and heads), written in the same
/// batch as the document's chunks, so start-up reads these instead of every document.
pub(crate) const DOC_META_PREFIX: &[u8] = b"docs/meta/";
/// Present once every stored document has a meta record (stores written before them are
/// loaded whole once, and get them).
pub(crate) const DOC_INDEX_KEY: &[u8] = b"docs/index";

/// A document's meta record key (Meta keyspace): `docs/meta/` ‖ doc id.
pub(crate) fn doc_meta_key(doc: DocId) -> Vec<u8> {
    [DOC_META_PREFIX, doc.as_bytes()].concat()
}

/// Prefix of every sent alert's key in the Outbox keyspace.
pub(crate) const ALERT_OUT_PREFIX: &[u8] = b"alert/";
/// Prefix of every received alert's key in the Meta keyspace.
pub(crate) const ALERT_IN_PREFIX: &[u8] = b"alerts/in/";

/// A sent alert's key (Outbox keyspace): `alert/` ‖ its id.
pub(crate) fn alert_out_key(id: &str) -> Vec<u8> {
    [ALERT_OUT_PREFIX, id.as_bytes()].concat()
}

/// A received alert's key (Meta keyspace): `alerts/in/` ‖ its id.
pub(crate) fn alert_in_key(id: &str) -> Vec<u8> {
    [ALERT_IN_PREFIX, id.as_bytes()].concat()
}

/// Length of a [`keyring_key`].
const KEYRING_KEY_LEN: usize = 16 + 8 + 16;

/// A saved sync state's key: `peer id length (u8) ‖ peer id ‖ doc id`.
pub(crate) fn sync_state_key(peer: &str, doc: DocId) -> Vec<u8> {
    let mut key = sync_state_prefix(peer);
    key.extend_from_slice(doc.as_bytes());
    key
}

/// The prefix of every saved sync state with `peer`.
pub(crate) fn sync_state_prefix(peer: &str) -> Vec<u8> {
    let peer = &peer.as_bytes()[..peer.len().min(255)];
    let mut key = Vec::with_capacity(1 + peer.len() + 16);
    key.push(peer.len() as u8);
    key.extend_from_slice(peer);
    key
}

/// A document key's key in the keyring: `doc id ‖ epoch counter (u64 BE) ‖ epoch device`.
pub(crate) fn keyring_key(doc: DocId, epoch: KeyEpoch) -> Vec<u8> {
    let mut key = Vec::with_capacity(KEYRING_KEY_LEN);
    key.extend_from_slice(doc.as_bytes());
    key.extend_from_slice(&epoch.counter.to_be_bytes());
    key.extend_from_slice(&epoch.device);
    key
}

/// The document and epoch a keyring key names; `None` for a key of another shape.
pub(crate) fn parse_keyring_key(key: &[u8]) -> Option<(DocId, KeyEpoch)> {
    if key.len() != KEYRING_KEY_LEN {
        return None;
    }
    let doc = DocId::from_bytes(key[..16].try_into().ok()?);
    let counter = u64::from_be_bytes(key[16..24].try_into().ok()?);
    let device: [u8; 16] = key[24..40].try_into().ok()?;
    Some((doc, KeyEpoch { counter, device }))
}

/// An audit entry's key: `ms since the epoch (u64 BE) ‖ sequence (u32 BE)`.
pub(crate) fn audit_key(ms: u64, seq: u32) -> Vec<u8> {
    let mut key = ms.to_be_bytes().to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The last audit key before `ms`: scanning after it starts at the first entry at `ms`.
pub(crate) fn audit_key_before(ms: u64) -> Vec<u8> {
    audit_key(ms.saturating_sub(1), u32::MAX)
}

/// Encodes a JSON record.
pub(crate) fn to_json<T: Serialize + ?Sized>(
    what: &'static str,
    record: &T,
) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Internal(format!("encode {what}: {e}")))
}

/// Decodes a JSON record; one that does not decode is a corrupt record, named.
pub(crate) fn from_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::CorruptRecord {
        what,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_keys_round_trip_and_refuse_other_shapes() {
        let doc = DocId::from_bytes([7; 16]);
        let epoch = KeyEpoch {
            counter: 3,
            device: [9; 16],
        };
        let key = keyring_key(doc, epoch);
        assert_eq!(parse_keyring_key(&key), Some((doc, epoch)));
        assert_eq!(parse_keyring_key(&key[..39]), None);
    }

    #[test]
    fn sync_state_keys_start_with_their_peer_prefix() {
        let doc = DocId::from_bytes([1; 16]);
        let key = sync_state_key("peer", doc);
        assert!(key.starts_with(&sync_state_prefix("peer")));
        assert_eq!(key.len(), 1 + 4 + 16);
        // A long peer id is cut at 255 bytes, so the length fits its byte.
        let long = "p".repeat(300);
        assert_eq!(sync_state_prefix(&long).len(), 256);
    }

    #[test]
    fn audit_keys_sort_by_time_then_sequence() {
        assert!(audit_key(1, u32::MAX) < audit_key(2, 0));
        assert!(audit_key(2, 0) < audit_key(2, 1));
        assert!(audit_key_before(2) < audit_key(2, 0));
        assert!(audit_key_before(2) >= audit_key(1, u32::MAX));
    }

    #[test]
    fn a_record_that_does_not_decode_is_named() {
        let err = from_json::<Vec<String>>("static peers", b"{").unwrap_err();
        assert!(err.to_string().contains("static peers"), "{err}");
    }
}
