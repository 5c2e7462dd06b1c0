//! The digest protocol's messages: their CBOR encoding, the caps checked on receipt, and the
//! compact wire forms of hashes, ids and entries.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::error::Error;
use crate::ids::{DOC_ID_LEN, DocId};

use super::tree::{Hash, NibblePath};

/// Version of the digest protocol. It fixes the hashing rules and [`LEAF_MAX`]; a peer speaking
/// another version is refused rather than silently costing a full descent.
///
/// [`LEAF_MAX`]: super::LEAF_MAX
pub const PROTOCOL_VERSION: u8 = 1;

/// Cap on the items in one message, checked on receipt.
pub const MAX_ITEMS_PER_MESSAGE: usize = 256;

/// Cap on the hashes, entries and ids in one message, checked on receipt. Each item also counts
/// one, so empty items cannot be used to pad a message.
pub const MAX_VALUES_PER_MESSAGE: usize = 1024;

/// Upper bound on the CBOR encoding of any message that respects the caps above; the node can use
/// it as the frame cap for digest frames. [`DigestMessage::decode`] refuses longer input.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Reads a byte string of at most `N` bytes without allocating. Sequences of small integers are
/// accepted too, for self-describing formats such as JSON that have no byte strings.
pub(super) struct SmallBytes<const N: usize>;

impl<'de, const N: usize> de::Visitor<'de> for SmallBytes<N> {
    type Value = ([u8; N], usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of at most {N} bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        if v.len() > N {
            return Err(E::invalid_length(v.len(), &self));
        }
        let mut buf = [0u8; N];
        buf[..v.len()].copy_from_slice(v);
        Ok((buf, v.len()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut buf = [0u8; N];
        let mut len = 0;
        while let Some(byte) = seq.next_element::<u8>()? {
            // Stop at the cap instead of reading an endless sequence into memory.
            let slot = buf
                .get_mut(len)
                .ok_or_else(|| de::Error::invalid_length(N + 1, &self))?;
            *slot = byte;
            len += 1;
        }
        Ok((buf, len))
    }
}

/// Reads a byte string of exactly `N` bytes.
fn exact_bytes<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let (buf, len) = d.deserialize_bytes(SmallBytes::<N>)?;
    if len != N {
        return Err(de::Error::invalid_length(len, &SmallBytes::<N>));
    }
    Ok(buf)
}

/// A 32-byte hash, sent as a byte string (serde's default for arrays is a list of integers,
/// which CBOR encodes in up to twice the size).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct WireHash(pub(super) Hash);

impl Serialize for WireHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        exact_bytes::<D, 32>(deserializer).map(Self)
    }
}

/// A doc id as a 16-byte byte string.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct WireId(pub(super) DocId);

impl Serialize for WireId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de> Deserialize<'de> for WireId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        exact_bytes::<D, DOC_ID_LEN>(deserializer).map(|b| Self(DocId::from_bytes(b)))
    }
}

/// One (doc id, heads hash) pair as a single 48-byte byte string.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct WireEntry(pub(super) DocId, pub(super) Hash);

impl Serialize for WireEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; DOC_ID_LEN + 32];
        buf[..DOC_ID_LEN].copy_from_slice(self.0.as_bytes());
        buf[DOC_ID_LEN..].copy_from_slice(&self.1);
        serializer.serialize_bytes(&buf)
    }
}

impl<'de> Deserialize<'de> for WireEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let buf = exact_bytes::<D, { DOC_ID_LEN + 32 }>(deserializer)?;
        let mut id = [0u8; DOC_ID_LEN];
        let mut hash = [0u8; 32];
        id.copy_from_slice(&buf[..DOC_ID_LEN]);
        hash.copy_from_slice(&buf[DOC_ID_LEN..]);
        Ok(Self(DocId::from_bytes(id), hash))
    }
}

/// One message of the digest protocol, to be carried as the payload of a digest frame.
///
/// The contents are private: the node only routes messages (by [`session`](Self::session)) and
/// carries them, as the bytes of a digest frame from [`encode`](Self::encode), read back with
/// [`decode`](Self::decode), which caps the input at [`MAX_MESSAGE_BYTES`]. The type is also
/// `Serialize + Deserialize`, for embedding in another serde envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DigestMessage(pub(super) Wire);

/// The wire shape. Tuple variants with one-letter tags keep the CBOR small: a field name would
/// cost more than most of the values it labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Wire {
    /// (protocol version, session id, root hash or `None` for an empty tree). Opens a session.
    #[serde(rename = "start")]
    Start(u8, u64, Option<WireHash>),
    /// (session id, whether this message ends the sender's turn, items).
    #[serde(rename = "step")]
    Step(u64, bool, Vec<Item>),
}

/// One unit of a turn. `Children` and `Entries` are questions the receiver must answer in its
/// next turn; `Settle` is an answer and asks nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Item {
    /// The sender's node at the path is internal: a bitmap of its non-empty children (bit i for
    /// nibble i) and their hashes in nibble order.
    #[serde(rename = "c")]
    Children(NibblePath, u16, Vec<WireHash>),
    /// The sender holds at most [`LEAF_MAX`](super::LEAF_MAX) documents under the path: all of
    /// them, sorted.
    #[serde(rename = "e")]
    Entries(NibblePath, Vec<WireEntry>),
    /// Answer to `Entries` at the same path, from the sender's side, each list sorted: ids of the
    /// receiver's entries the sender lacks, ids the sender holds that the receiver did not list,
    /// ids both hold with different heads.
    #[serde(rename = "s")]
    Settle(NibblePath, Vec<WireId>, Vec<WireId>, Vec<WireId>),
}

impl Item {
    pub(super) fn path(&self) -> NibblePath {
        match self {
            Item::Children(p, ..) | Item::Entries(p, ..) | Item::Settle(p, ..) => *p,
        }
    }

    /// Hashes carried: child hashes and the heads hash of each entry.
    fn hashes(&self) -> usize {
        match self {
            Item::Children(_, _, hashes) => hashes.len(),
            Item::Entries(_, entries) => entries.len(),
            Item::Settle(..) => 0,
        }
    }

    /// Weight against [`MAX_VALUES_PER_MESSAGE`]: one for the item plus one per value.
    pub(super) fn weight(&self) -> usize {
        1 + match self {
            Item::Children(_, _, hashes) => hashes.len(),
            Item::Entries(_, entries) => entries.len(),
            Item::Settle(_, a, b, c) => a.len() + b.len() + c.len(),
        }
    }
}

/// Counts bytes without storing them.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DigestMessage {
    /// The session this message belongs to.
    pub fn session(&self) -> u64 {
        match &self.0 {
            Wire::Start(_, session, _) | Wire::Step(session, ..) => *session,
        }
    }

    /// Whether this message opens a session: route it to a fresh [`Reconciler`](super::Reconciler).
    pub fn is_start(&self) -> bool {
        matches!(self.0, Wire::Start(..))
    }

    /// Hashes carried: root or child hashes, plus the heads hash of each listed entry.
    pub fn hash_count(&self) -> usize {
        match &self.0 {
            Wire::Start(_, _, root) => usize::from(root.is_some()),
            Wire::Step(_, _, items) => items.iter().map(Item::hashes).sum(),
        }
    }

    /// Length of the CBOR encoding.
    pub fn encoded_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        // Cannot fail: the writer never errors and these types hold no maps or floats.
        let _ = ciborium::into_writer(self, &mut counter);
        counter.0
    }

    /// Encodes as CBOR: the `bytes` of the node's digest frame (`wire::DigestFrame`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail and every field is plain data; should it fail anyway,
        // the peer refuses the empty frame rather than reading a partial one.
        if ciborium::into_writer(self, &mut out).is_err() {
            out.clear();
        }
        out
    }

    /// Decodes CBOR, refusing input longer than [`MAX_MESSAGE_BYTES`] before reading it.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Error::TooLarge {
                what: "digest message",
                len: bytes.len(),
                cap: MAX_MESSAGE_BYTES,
            });
        }
        ciborium::from_reader(bytes)
            .map_err(|e| Error::Wire(format!("malformed digest message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::testing::id;
    use crate::digest::{DigestTree, LEAF_MAX, MAX_DEPTH, Reconciler};
    use proptest::prelude::*;

    #[test]
    fn decode_refuses_oversized_and_garbage_input() {
        assert!(matches!(
            DigestMessage::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(Error::TooLarge { .. })
        ));
        assert!(DigestMessage::decode(&[0xff, 0x00, 0x13]).is_err());
        assert!(DigestMessage::decode(&[]).is_err());
    }

    #[test]
    fn the_largest_legal_message_fits_the_byte_cap() {
        // Worst case per value is an entry (48 bytes plus header); fill the value cap with them
        // and the item cap with the deepest paths.
        let per_item = 1 + LEAF_MAX;
        let items = MAX_VALUES_PER_MESSAGE / per_item;
        let deep = NibblePath::from_nibbles(&[0xf; MAX_DEPTH]).unwrap();
        let full: Vec<Item> = (0..items)
            .map(|_| {
                Item::Entries(
                    deep,
                    (0..LEAF_MAX as u64)
                        .map(|n| WireEntry(id(n), [0xff; 32]))
                        .collect(),
                )
            })
            .collect();
        let message = DigestMessage(Wire::Step(u64::MAX, false, full));
        assert!(
            message.encoded_len() <= MAX_MESSAGE_BYTES,
            "{}",
            message.encoded_len()
        );
        let many = DigestMessage(Wire::Step(
            u64::MAX,
            false,
            vec![Item::Settle(deep, vec![], vec![], vec![WireId(id(1)); 3]); MAX_ITEMS_PER_MESSAGE],
        ));
        assert!(
            many.encoded_len() <= MAX_MESSAGE_BYTES,
            "{}",
            many.encoded_len()
        );
        assert_eq!(DigestMessage::decode(&message.encode()).unwrap(), message);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = DigestMessage::decode(&bytes) {
                let _ = Reconciler::new().handle(&DigestTree::new(), m);
            }
        }
    }
}
