//! Identifiers shared by every document kind.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Length in bytes of a [`DocId`].
pub const DOC_ID_LEN: usize = 16;

/// A document's identity: 16 random bytes, printed as base58.
///
/// The caller supplies the randomness (the crate is sans-IO), so tests can build
/// deterministic ids with [`DocId::from_bytes`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocId([u8; DOC_ID_LEN]);

impl DocId {
    /// Wraps 16 bytes, normally drawn from a CSPRNG by the caller.
    pub const fn from_bytes(bytes: [u8; DOC_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; DOC_ID_LEN] {
        &self.0
    }

    /// Parses the base58 form; `None` when it is not exactly 16 bytes of base58.
    pub fn parse(text: &str) -> Option<Self> {
        let mut out = [0u8; DOC_ID_LEN];
        // bs58 writes at most `out.len()` bytes and reports overflow as an error,
        // so an oversized string cannot allocate or panic here.
        match bs58::decode(text).onto(&mut out[..]) {
            Ok(DOC_ID_LEN) => Some(Self(out)),
            _ => None,
        }
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

/// Derives the Automerge actor id of a device from its PeerId bytes: the first
/// 16 bytes of SHA-256 over them. Any receiver can therefore map a change back
/// to the device (and so the home) that wrote it, without trusting a claim.
pub fn actor_bytes_for_peer(peer_id_bytes: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(peer_id_bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// A document key epoch. Epochs order by `(counter, device)`, so two devices
/// that rotate a key concurrently both produce valid, distinct epochs.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct KeyEpoch {
    /// Rotation counter, starting at 0 for a document's first key.
    pub counter: u64,
    /// Actor bytes of the device that started the epoch.
    pub device: [u8; 16],
}

/// Bytes of an epoch's device that a frame carries: the counter and this prefix name the
/// epoch among a document's few, and the seal's associated data binds the whole epoch.
pub const EPOCH_WIRE_PREFIX: usize = 4;

impl KeyEpoch {
    /// The first epoch of a document created by `device`.
    pub const fn first(device: [u8; 16]) -> Self {
        Self { counter: 0, device }
    }

    /// The epoch as a frame carries it: the counter and the first
    /// [`EPOCH_WIRE_PREFIX`] bytes of the device, the rest zero.
    pub fn wire_form(&self) -> Self {
        let mut device = [0; 16];
        device[..EPOCH_WIRE_PREFIX].copy_from_slice(&self.device[..EPOCH_WIRE_PREFIX]);
        Self {
            counter: self.counter,
            device,
        }
    }

    /// Whether this (whole) epoch is one that `wire`, an epoch as decoded from a frame,
    /// may name. Several may match; only the right key opens the payload.
    pub fn matches_wire(&self, wire: &KeyEpoch) -> bool {
        self.wire_form() == wire.wire_form()
    }
}

/// The Automerge actor a device writes with, see [`actor_bytes_for_peer`].
pub fn actor_for_peer(peer_id_bytes: &[u8]) -> automerge::ActorId {
    automerge::ActorId::from(&actor_bytes_for_peer(peer_id_bytes)[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_id_round_trips_through_base58() {
        let id = DocId::from_bytes([7; DOC_ID_LEN]);
        assert_eq!(DocId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn doc_id_rejects_wrong_lengths_and_garbage() {
        assert_eq!(DocId::parse(""), None);
        assert_eq!(DocId::parse("0OIl"), None);
        assert_eq!(DocId::parse(&bs58::encode([1u8; 17]).into_string()), None);
        assert_eq!(DocId::parse(&bs58::encode([1u8; 15]).into_string()), None);
    }

    #[test]
    fn actor_is_stable_per_peer_and_differs_between_peers() {
        assert_eq!(
            actor_bytes_for_peer(b"peer-a"),
            actor_bytes_for_peer(b"peer-a")
        );
        assert_ne!(
            actor_bytes_for_peer(b"peer-a"),
            actor_bytes_for_peer(b"peer-b")
        );
    }
}
