//! Many-document reconciliation: which documents differ between two peers?
//!
//! When two peers reconnect they must find the documents whose heads differ before the per-document
//! sync sessions can run. Comparing every (doc id, heads) pair costs O(D) for D shared documents,
//! even when nothing changed. Instead each side keeps a [`DigestTree`]: a Merkle trie over
//! `(doc id, heads hash)` keyed by the doc id's hex nibbles, with a fan-out of 16 (one nibble per
//! level, at most 32 levels for a 16-byte id). A subtree holding at most [`LEAF_MAX`] documents is
//! a leaf and lists its entries; a bigger one is an internal node whose hash covers its 16
//! children. The shape is a pure function of the set of entries, so two peers holding the same
//! set compute the same hash at every path, however they built or updated their trees.
//!
//! # What the tree covers
//!
//! A tree must cover exactly the documents this peer may hold: digests carry doc ids and heads
//! hashes, and both leak which documents exist. Filtering is the node's job, not this module's:
//! keep one tree per sharing scope (for instance per peer home) and feed it only the documents
//! shared with that scope, then hand the right tree to each peer's [`Reconciler`].
//!
//! # Protocol
//!
//! One [`Reconciler`] per peer session; exactly one side initiates (the node picks, for instance
//! the side with the smaller PeerId, as it does for dialling). The caller draws a random session
//! id, so late messages from an earlier session on the same stream are recognised and refused.
//!
//! 1. The initiator's [`Reconciler::start`] returns `Start`, carrying its root hash.
//! 2. The responder compares it with its own root. Equal roots end the session at once with an
//!    empty reply: a reconnect where nothing changed costs one round trip and one hash in all.
//! 3. Otherwise the sides take turns. Each turn answers every item of the previous one:
//!    - `Children(path)`: "my node at `path` is internal; here are its child hashes". The receiver
//!      compares them with its own children at `path` (computed the same way, even where its own
//!      subtree is a leaf) and expands only the children that differ.
//!    - `Entries(path)`: "I hold at most [`LEAF_MAX`] documents under `path`; here they are". A
//!      receiver that holds at most [`LEAF_MAX`] there too compares both lists and answers with
//!      `Settle`. One that holds more answers with its own `Children(path)` instead, so no answer
//!      ever has to list a large subtree in one item.
//!    - `Settle(path)`: the differences under `path`: ids the receiver listed that the sender
//!      lacks, ids the sender holds that the receiver lacks, and ids whose heads differ.
//! 4. A turn with no question in it (only settles, or nothing) ends the session on both sides;
//!    each then reports the same [`Differences`], seen from its own side.
//!
//! A turn may span several messages (the last one marks the end of the turn), so every message
//! stays within [`MAX_ITEMS_PER_MESSAGE`], [`MAX_VALUES_PER_MESSAGE`] and [`MAX_MESSAGE_BYTES`]
//! even when a fresh device learns of ten thousand documents at once.
//!
//! # Cost
//!
//! Only subtrees whose hashes differ are opened, and a subtree differs only if it holds a changed
//! document. Each changed document therefore opens at most one node per level on its own path:
//! 16 hashes per level over about `log16(D / LEAF_MAX) + 1` levels, plus one leaf of at most
//! [`LEAF_MAX`] entries and its settle. With `d` changed documents out of `D` that is
//! `O(d log D)` hashes, shared prefixes making it less; a single level of 256 buckets would cost
//! `O(D)` entries instead (about 3200 at `D = 10000` with 1% changed). Every path grows by at
//! least one nibble every two turns, so a session lasts at most about 66 turns even against a
//! hostile peer.
//!
//! # Hostile input
//!
//! Every message is checked before it is used: sizes against the caps, paths at most 32 nibbles,
//! entries sorted and under their path, every item an answer to a question this side actually
//! asked, each at most once. A violation is an [`Error`] and fails the session; nothing panics.
//! The ids a peer says it holds are claims: the node must check that the peer may share a
//! document before it opens a sync session for it.
//!
//! # Example
//!
//! ```
//! use hearth_crdt::DocId;
//! use hearth_crdt::digest::{DigestTree, Reconciler, heads_hash_bytes};
//!
//! let doc = |n: u8| DocId::from_bytes([n; 16]);
//! let mut ours: DigestTree = (0..100).map(|n| (doc(n), heads_hash_bytes(&[[n; 32]]))).collect();
//! let theirs = ours.clone();
//! ours.insert(doc(7), heads_hash_bytes(&[[200; 32]])); // a local edit
//!
//! let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
//! let mut to_b = vec![a.start(0x5eed, &ours).unwrap()];
//! let mut result = None;
//! while !to_b.is_empty() {
//!     let mut to_a = Vec::new();
//!     for m in to_b.drain(..) {
//!         to_a.extend(b.handle(&theirs, m).unwrap().send);
//!     }
//!     for m in to_a {
//!         let progress = a.handle(&ours, m).unwrap();
//!         to_b.extend(progress.send);
//!         result = result.or(progress.finished);
//!     }
//! }
//! let differences = result.expect("the initiator finishes");
//! assert_eq!(differences.changed.into_iter().collect::<Vec<_>>(), vec![doc(7)]);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::ids::{DOC_ID_LEN, DocId};

/// Version of the digest protocol. It fixes the hashing rules and [`LEAF_MAX`]; a peer speaking
/// another version is refused rather than silently costing a full descent.
pub const PROTOCOL_VERSION: u8 = 1;

/// Children per internal node: one per hex nibble.
pub const FANOUT: usize = 16;

/// Deepest path, in nibbles: a whole 16-byte doc id.
pub const MAX_DEPTH: usize = 2 * DOC_ID_LEN;

/// A subtree holding at most this many documents is a leaf and is sent as its entries.
///
/// Sixteen is about where listing the entries (48 bytes each) costs the same as sending 16 child
/// hashes and then the entries of the one child that differs.
pub const LEAF_MAX: usize = 16;

/// Cap on the items in one message, checked on receipt.
pub const MAX_ITEMS_PER_MESSAGE: usize = 256;

/// Cap on the hashes, entries and ids in one message, checked on receipt. Each item also counts
/// one, so empty items cannot be used to pad a message.
pub const MAX_VALUES_PER_MESSAGE: usize = 1024;

/// Upper bound on the CBOR encoding of any message that respects the caps above; the node can use
/// it as the frame cap for digest frames. [`DigestMessage::decode`] refuses longer input.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The heads hash of a document: SHA-256 over its sorted, de-duplicated heads.
pub fn heads_hash(heads: &[automerge::ChangeHash]) -> [u8; 32] {
    let raw: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
    heads_hash_bytes(&raw)
}

/// [`heads_hash`] over raw 32-byte change hashes. The order of `heads` does not matter.
pub fn heads_hash_bytes(heads: &[[u8; 32]]) -> [u8; 32] {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hasher = Sha256::new();
    for head in &sorted {
        hasher.update(head);
    }
    hasher.finalize().into()
}

type Hash = [u8; 32];

/// Domain tags keep a leaf's hash from ever equalling an internal node's over the same bytes.
const LEAF_TAG: &[u8] = b"hearth/digest/leaf/1";
const NODE_TAG: &[u8] = b"hearth/digest/node/1";

/// Nibble `i` (0 = high nibble of byte 0) of a doc id. Out-of-range positions read as 0 so that
/// no index can panic; callers never ask past [`MAX_DEPTH`].
fn nibble_of(id: &DocId, i: usize) -> u8 {
    let byte = id.as_bytes().get(i / 2).copied().unwrap_or(0);
    if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A prefix of a doc id, in hex nibbles: the address of a node in a [`DigestTree`].
///
/// At most [`MAX_DEPTH`] nibbles. On the wire it is one byte string: the nibble count, then the
/// nibbles packed two per byte (an odd count leaves a zero low nibble); anything else is refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NibblePath {
    len: u8,
    // Nibbles past `len` are always zero, so derived equality and ordering are by value.
    bytes: [u8; DOC_ID_LEN],
}

impl NibblePath {
    /// The root: the empty prefix.
    pub const ROOT: Self = Self {
        len: 0,
        bytes: [0; DOC_ID_LEN],
    };

    /// Builds a path from nibbles (each below 16), at most [`MAX_DEPTH`] of them.
    pub fn from_nibbles(nibbles: &[u8]) -> Result<Self, Error> {
        if nibbles.len() > MAX_DEPTH {
            return Err(Error::Wire(format!(
                "digest path of {} nibbles is deeper than {MAX_DEPTH}",
                nibbles.len()
            )));
        }
        let mut path = Self::ROOT;
        for &n in nibbles {
            if n >= 16 {
                return Err(Error::Wire(format!(
                    "digest path nibble {n} is not below 16"
                )));
            }
            path = path
                .child(n)
                .ok_or_else(|| Error::Wire("digest path too deep".into()))?;
        }
        Ok(path)
    }

    /// The first `len` nibbles of `id`; `None` past [`MAX_DEPTH`].
    pub fn of_doc(id: &DocId, len: usize) -> Option<Self> {
        if len > MAX_DEPTH {
            return None;
        }
        let mut bytes = *id.as_bytes();
        if len % 2 == 1 {
            bytes[len / 2] &= 0xf0;
        }
        for b in bytes.iter_mut().skip(len.div_ceil(2)) {
            *b = 0;
        }
        Some(Self {
            len: len as u8,
            bytes,
        })
    }

    /// Number of nibbles.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether this is the root.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nibble `i`, if the path is that long.
    pub fn nibble(&self, i: usize) -> Option<u8> {
        (i < self.len()).then(|| {
            let byte = self.bytes[i / 2];
            if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            }
        })
    }

    /// Whether `id` lies under this path.
    pub fn contains(&self, id: &DocId) -> bool {
        Self::of_doc(id, self.len()).is_some_and(|p| p == *self)
    }

    /// The path one nibble deeper; `None` at [`MAX_DEPTH`] or for a nibble of 16 or more.
    pub fn child(&self, nibble: u8) -> Option<Self> {
        if self.len() >= MAX_DEPTH || nibble >= 16 {
            return None;
        }
        let mut next = *self;
        let i = self.len();
        next.bytes[i / 2] |= if i.is_multiple_of(2) {
            nibble << 4
        } else {
            nibble
        };
        next.len += 1;
        Some(next)
    }

    /// The path one nibble shorter; `None` at the root.
    pub fn parent(&self) -> Option<Self> {
        let len = self.len().checked_sub(1)?;
        let mut up = *self;
        up.bytes[len / 2] &= if len % 2 == 0 { 0x00 } else { 0xf0 };
        up.len -= 1;
        Some(up)
    }

    /// Smallest and largest doc ids under this path, for range scans.
    fn bounds(&self) -> (DocId, DocId) {
        let low = self.bytes;
        let mut high = self.bytes;
        let len = self.len();
        if len % 2 == 1 {
            high[len / 2] |= 0x0f;
        }
        for b in high.iter_mut().skip(len.div_ceil(2)) {
            *b = 0xff;
        }
        (DocId::from_bytes(low), DocId::from_bytes(high))
    }
}

impl fmt::Display for NibblePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("/")?;
        for i in 0..self.len() {
            write!(f, "{:x}", self.nibble(i).unwrap_or(0))?;
        }
        Ok(())
    }
}

impl fmt::Debug for NibblePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NibblePath({self})")
    }
}

impl Serialize for NibblePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let packed = self.len().div_ceil(2);
        let mut buf = [0u8; 1 + DOC_ID_LEN];
        buf[0] = self.len;
        buf[1..=packed].copy_from_slice(&self.bytes[..packed]);
        serializer.serialize_bytes(&buf[..=packed])
    }
}

impl<'de> Deserialize<'de> for NibblePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (buf, n) = deserializer.deserialize_bytes(SmallBytes::<{ 1 + DOC_ID_LEN }>)?;
        let Some((&len, packed)) = buf[..n].split_first() else {
            return Err(de::Error::custom("digest path is empty"));
        };
        let len = usize::from(len);
        if len > MAX_DEPTH {
            return Err(de::Error::custom(format_args!(
                "digest path of {len} nibbles is deeper than {MAX_DEPTH}"
            )));
        }
        if packed.len() != len.div_ceil(2) {
            return Err(de::Error::custom(format_args!(
                "digest path of {len} nibbles carries {} bytes",
                packed.len()
            )));
        }
        if len % 2 == 1 && packed[len / 2] & 0x0f != 0 {
            return Err(de::Error::custom(
                "digest path has a non-zero padding nibble",
            ));
        }
        let mut bytes = [0u8; DOC_ID_LEN];
        bytes[..packed.len()].copy_from_slice(packed);
        Ok(Self {
            len: len as u8,
            bytes,
        })
    }
}

/// Reads a byte string of at most `N` bytes without allocating. Sequences of small integers are
/// accepted too, for self-describing formats such as JSON that have no byte strings.
struct SmallBytes<const N: usize>;

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
struct WireHash(Hash);

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
struct WireId(DocId);

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
struct WireEntry(DocId, Hash);

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

// ---------------------------------------------------------------------------------------------
// The tree

/// A node of the canonical trie. Entries themselves live in the tree's sorted map; leaves keep
/// only their count and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Leaf {
        count: usize,
        hash: Hash,
    },
    Internal {
        count: usize,
        hash: Hash,
        children: Box<[Option<Box<Node>>; FANOUT]>,
    },
}

impl Node {
    fn count(&self) -> usize {
        match self {
            Node::Leaf { count, .. } | Node::Internal { count, .. } => *count,
        }
    }

    fn hash(&self) -> Hash {
        match self {
            Node::Leaf { hash, .. } | Node::Internal { hash, .. } => *hash,
        }
    }
}

fn leaf_hash<'a>(entries: impl Iterator<Item = (&'a DocId, &'a Hash)>) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(LEAF_TAG);
    for (id, heads) in entries {
        hasher.update(id.as_bytes());
        hasher.update(heads);
    }
    hasher.finalize().into()
}

fn internal_hash(children: &[Option<Hash>; FANOUT]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(NODE_TAG);
    hasher.update(presence_bits(children).to_be_bytes());
    for hash in children.iter().flatten() {
        hasher.update(hash);
    }
    hasher.finalize().into()
}

fn presence_bits(children: &[Option<Hash>; FANOUT]) -> u16 {
    children
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_some())
        .fold(0, |bits, (i, _)| bits | (1 << i))
}

fn child_hashes_of(children: &[Option<Box<Node>>; FANOUT]) -> [Option<Hash>; FANOUT] {
    std::array::from_fn(|i| children[i].as_ref().map(|c| c.hash()))
}

/// Builds the canonical subtree for `entries`, which are sorted and all share the first `depth`
/// nibbles.
fn build(entries: &[(DocId, Hash)], depth: usize) -> Option<Box<Node>> {
    if entries.is_empty() {
        return None;
    }
    if entries.len() <= LEAF_MAX || depth >= MAX_DEPTH {
        let hash = leaf_hash(entries.iter().map(|(id, h)| (id, h)));
        return Some(Box::new(Node::Leaf {
            count: entries.len(),
            hash,
        }));
    }
    let mut children: Box<[Option<Box<Node>>; FANOUT]> = Box::new(std::array::from_fn(|_| None));
    let mut rest = entries;
    for (nibble, slot) in children.iter_mut().enumerate() {
        // Sorted ids sharing `depth` nibbles are grouped by their next nibble, in order.
        let split = rest.partition_point(|(id, _)| usize::from(nibble_of(id, depth)) == nibble);
        let (here, after) = rest.split_at(split);
        *slot = build(here, depth + 1);
        rest = after;
    }
    let hash = internal_hash(&child_hashes_of(&children));
    Some(Box::new(Node::Internal {
        count: entries.len(),
        hash,
        children,
    }))
}

fn range_under<'a>(
    entries: &'a BTreeMap<DocId, Hash>,
    path: &NibblePath,
) -> std::collections::btree_map::Range<'a, DocId, Hash> {
    let (low, high) = path.bounds();
    entries.range(low..=high)
}

/// Brings the subtree at `slot` (address `path`) up to date after the entry for `id` changed.
/// `delta` is how the number of entries changed: +1 inserted, 0 updated, -1 removed. Only the
/// nodes on `id`'s path are touched; a leaf that outgrows [`LEAF_MAX`] is split, and an internal
/// node that shrinks to [`LEAF_MAX`] collapses into a leaf.
fn refresh(
    slot: &mut Option<Box<Node>>,
    entries: &BTreeMap<DocId, Hash>,
    path: NibblePath,
    id: &DocId,
    delta: isize,
) {
    let count = match slot.as_deref() {
        Some(Node::Internal { count, .. }) => count.saturating_add_signed(delta),
        // Leaves and empty slots hold at most LEAF_MAX + 1 entries now, so counting is cheap.
        _ => range_under(entries, &path).count(),
    };
    if count == 0 {
        *slot = None;
        return;
    }
    let child_path = path.child(nibble_of(id, path.len()));
    if count <= LEAF_MAX || child_path.is_none() {
        let hash = leaf_hash(range_under(entries, &path));
        *slot = Some(Box::new(Node::Leaf { count, hash }));
        return;
    }
    match (slot.as_deref_mut(), child_path) {
        (
            Some(Node::Internal {
                count: stored,
                hash,
                children,
            }),
            Some(child_path),
        ) => {
            let nibble = usize::from(nibble_of(id, path.len()));
            refresh(&mut children[nibble], entries, child_path, id, delta);
            *stored = count;
            *hash = internal_hash(&child_hashes_of(children));
        }
        _ => {
            // A leaf just outgrew LEAF_MAX: rebuild its few entries as an internal node.
            let owned: Vec<(DocId, Hash)> =
                range_under(entries, &path).map(|(k, v)| (*k, *v)).collect();
            *slot = build(&owned, path.len());
        }
    }
}

/// Where a path lands in the stored trie.
enum Located<'a> {
    /// Nothing is stored under the path.
    Empty,
    /// A stored node sits exactly at the path.
    Node(&'a Node),
    /// The path lies strictly inside a stored leaf: at most [`LEAF_MAX`] entries are under it.
    InsideLeaf,
}

/// A Merkle trie over `(doc id, heads hash)` with a fan-out of 16; see the [module docs](self).
///
/// Keep it current with [`insert`](Self::insert), [`update`](Self::update) and
/// [`remove`](Self::remove): each touches only the nodes on one id's path, about
/// `log16(D)` hashes of 16 children plus one small leaf.
#[derive(Clone, Default)]
pub struct DigestTree {
    entries: BTreeMap<DocId, Hash>,
    root: Option<Box<Node>>,
}

impl DigestTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree holds no document.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The heads hash recorded for `id`.
    pub fn get(&self, id: &DocId) -> Option<[u8; 32]> {
        self.entries.get(id).copied()
    }

    /// Every `(doc id, heads hash)`, in doc id order.
    pub fn iter(&self) -> impl Iterator<Item = (DocId, [u8; 32])> + '_ {
        self.entries.iter().map(|(k, v)| (*k, *v))
    }

    /// The entries under `path`, in doc id order.
    pub fn entries_under(&self, path: &NibblePath) -> impl Iterator<Item = (DocId, [u8; 32])> + '_ {
        range_under(&self.entries, path).map(|(k, v)| (*k, *v))
    }

    /// A tree of only the documents `keep` accepts, for instance those shared with one peer's
    /// home. Build it once per scope and keep it current, rather than filtering per session.
    pub fn filtered(&self, mut keep: impl FnMut(&DocId) -> bool) -> DigestTree {
        self.iter().filter(|(id, _)| keep(id)).collect()
    }

    /// Adds a document, or records new heads for one already present. Returns the previous heads
    /// hash.
    pub fn insert(&mut self, id: DocId, heads_hash: [u8; 32]) -> Option<[u8; 32]> {
        let previous = self.entries.insert(id, heads_hash);
        match previous {
            Some(old) if old == heads_hash => {}
            Some(_) => refresh(&mut self.root, &self.entries, NibblePath::ROOT, &id, 0),
            None => refresh(&mut self.root, &self.entries, NibblePath::ROOT, &id, 1),
        }
        previous
    }

    /// Records new heads for a document already present. Returns `false`, changing nothing, when
    /// the document is absent, so that a change to a document outside this tree's scope cannot
    /// widen it by accident.
    pub fn update(&mut self, id: DocId, heads_hash: [u8; 32]) -> bool {
        if !self.entries.contains_key(&id) {
            return false;
        }
        self.insert(id, heads_hash);
        true
    }

    /// Removes a document. Returns its heads hash if it was present.
    pub fn remove(&mut self, id: &DocId) -> Option<[u8; 32]> {
        let previous = self.entries.remove(id)?;
        refresh(&mut self.root, &self.entries, NibblePath::ROOT, id, -1);
        Some(previous)
    }

    /// The root hash; `None` for an empty tree.
    pub fn root_hash(&self) -> Option<[u8; 32]> {
        self.root.as_ref().map(|n| n.hash())
    }

    fn locate(&self, path: &NibblePath) -> Located<'_> {
        let Some(mut node) = self.root.as_deref() else {
            return Located::Empty;
        };
        for depth in 0..path.len() {
            match node {
                Node::Leaf { .. } => return Located::InsideLeaf,
                Node::Internal { children, .. } => {
                    let nibble = usize::from(path.nibble(depth).unwrap_or(0));
                    match children[nibble].as_deref() {
                        Some(child) => node = child,
                        None => return Located::Empty,
                    }
                }
            }
        }
        Located::Node(node)
    }

    /// The hash of the subtree at `path`; `None` when no document lies under it. Paths inside a
    /// leaf are hashed on the fly, exactly as a tree holding only those documents would store
    /// them, so both peers agree whatever their own shapes.
    pub fn node_hash(&self, path: &NibblePath) -> Option<[u8; 32]> {
        match self.locate(path) {
            Located::Empty => None,
            Located::Node(node) => Some(node.hash()),
            Located::InsideLeaf => {
                let mut range = range_under(&self.entries, path).peekable();
                range.peek()?;
                Some(leaf_hash(range))
            }
        }
    }

    /// Number of documents under `path`.
    pub fn count_under(&self, path: &NibblePath) -> usize {
        match self.locate(path) {
            Located::Empty => 0,
            Located::Node(node) => node.count(),
            Located::InsideLeaf => range_under(&self.entries, path).count(),
        }
    }

    /// The hashes of the 16 children of `path` (`None` for an empty child), as
    /// [`node_hash`](Self::node_hash) would give them.
    pub fn child_hashes(&self, path: &NibblePath) -> [Option<[u8; 32]>; FANOUT] {
        let depth = path.len();
        match self.locate(path) {
            Located::Node(Node::Internal { children, .. }) => child_hashes_of(children),
            Located::Empty => [None; FANOUT],
            Located::Node(Node::Leaf { .. }) | Located::InsideLeaf => {
                let mut out = [None; FANOUT];
                if depth >= MAX_DEPTH {
                    return out;
                }
                // At most LEAF_MAX entries: group them by their next nibble and hash each group.
                let entries: Vec<(DocId, Hash)> = self.entries_under(path).collect();
                let mut rest = &entries[..];
                for (nibble, slot) in out.iter_mut().enumerate() {
                    let split =
                        rest.partition_point(|(id, _)| usize::from(nibble_of(id, depth)) == nibble);
                    let (here, after) = rest.split_at(split);
                    if !here.is_empty() {
                        *slot = Some(leaf_hash(here.iter().map(|(id, h)| (id, h))));
                    }
                    rest = after;
                }
                out
            }
        }
    }
}

impl FromIterator<(DocId, [u8; 32])> for DigestTree {
    /// Builds a tree in one pass; a later entry for the same id replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = (DocId, [u8; 32])>>(iter: I) -> Self {
        let entries: BTreeMap<DocId, Hash> = iter.into_iter().collect();
        let sorted: Vec<(DocId, Hash)> = entries.iter().map(|(k, v)| (*k, *v)).collect();
        let root = build(&sorted, 0);
        Self { entries, root }
    }
}

impl fmt::Debug for DigestTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestTree")
            .field("len", &self.len())
            .field("root", &self.root_hash().map(hex_prefix))
            .finish()
    }
}

fn hex_prefix(hash: Hash) -> String {
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Messages

/// One message of the digest protocol, to be carried as the payload of a digest frame.
///
/// The contents are private: the node only routes messages (by [`session`](Self::session)) and
/// carries them, as the bytes of a digest frame from [`encode`](Self::encode), read back with
/// [`decode`](Self::decode), which caps the input at [`MAX_MESSAGE_BYTES`]. The type is also
/// `Serialize + Deserialize`, for embedding in another serde envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DigestMessage(Wire);

/// The wire shape. Tuple variants with one-letter tags keep the CBOR small: a field name would
/// cost more than most of the values it labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Wire {
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
enum Item {
    /// The sender's node at the path is internal: a bitmap of its non-empty children (bit i for
    /// nibble i) and their hashes in nibble order.
    #[serde(rename = "c")]
    Children(NibblePath, u16, Vec<WireHash>),
    /// The sender holds at most [`LEAF_MAX`] documents under the path: all of them, sorted.
    #[serde(rename = "e")]
    Entries(NibblePath, Vec<WireEntry>),
    /// Answer to `Entries` at the same path, from the sender's side, each list sorted: ids of the
    /// receiver's entries the sender lacks, ids the sender holds that the receiver did not list,
    /// ids both hold with different heads.
    #[serde(rename = "s")]
    Settle(NibblePath, Vec<WireId>, Vec<WireId>, Vec<WireId>),
}

impl Item {
    fn path(&self) -> NibblePath {
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
    fn weight(&self) -> usize {
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

    /// Whether this message opens a session: route it to a fresh [`Reconciler`].
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

// ---------------------------------------------------------------------------------------------
// The session state machine

/// The documents that differ between the two sides, seen from the local side. Both sides of a
/// session report the same ids, with `local_only` and `remote_only` swapped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Differences {
    /// Documents this side holds and the peer lacks.
    pub local_only: BTreeSet<DocId>,
    /// Documents the peer says it holds and this side lacks. These are the peer's claims: check
    /// that the peer may share a document before syncing it.
    pub remote_only: BTreeSet<DocId>,
    /// Documents both sides hold, with different heads.
    pub changed: BTreeSet<DocId>,
}

impl Differences {
    /// Every differing document, whichever side holds it.
    pub fn all(&self) -> BTreeSet<DocId> {
        self.local_only
            .iter()
            .chain(&self.remote_only)
            .chain(&self.changed)
            .copied()
            .collect()
    }

    /// Number of differing documents.
    pub fn len(&self) -> usize {
        self.local_only.len() + self.remote_only.len() + self.changed.len()
    }

    /// Whether the two sides hold the same documents with the same heads.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Traffic of one session, as counted by one side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DigestStats {
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Hashes sent: root and child hashes, plus one per listed entry.
    pub hashes_sent: u64,
    /// Hashes received, counted the same way.
    pub hashes_received: u64,
    /// CBOR bytes sent.
    pub bytes_sent: u64,
    /// CBOR bytes received.
    pub bytes_received: u64,
}

/// What [`Reconciler::handle`] produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Messages to send to the peer, in order; empty while the peer's turn is still arriving.
    pub send: Vec<DigestMessage>,
    /// Set once, when the session has finished (after `send` has gone out): every document that
    /// differs. Hand these to the per-document sync sessions.
    pub finished: Option<Differences>,
}

/// A question this side asked in its last turn, awaiting the peer's answer.
#[derive(Debug)]
enum Question {
    /// `Start`: answered by the peer's `Children` or `Entries` at the root, or by nothing when the
    /// roots are equal.
    Root { answered: bool },
    /// `Children`: each differing child is answered at most once, by `Children` or `Entries`.
    Children { answered: u16 },
    /// `Entries`: must be answered exactly once, by `Settle` or by `Children` at the same path.
    Entries {
        sent: Vec<(DocId, Hash)>,
        answered: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    Waiting,
    Finished,
    Failed,
}

/// One side of a digest session with one peer; see the [module docs](self) for the protocol.
///
/// Sans-IO: [`start`](Self::start) and [`handle`](Self::handle) take the local tree and return the
/// messages to send. Pass the same tree (or an up-to-date version of it) on every call. Documents
/// that change during the session may or may not be reported; they travel by live push anyway.
/// A session that hears nothing for a while should be dropped by the node's own timer.
#[derive(Debug)]
pub struct Reconciler {
    phase: Phase,
    session: u64,
    /// Questions of our last turn, which the peer's current turn answers.
    pending: BTreeMap<NibblePath, Question>,
    /// Questions of the turn we are composing.
    next_pending: BTreeMap<NibblePath, Question>,
    /// Items of the turn we are composing.
    outbox: Vec<Item>,
    /// Questions seen in the peer's current turn.
    turn_questions: usize,
    diff: Differences,
    stats: DigestStats,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconciler {
    /// A fresh session: call [`start`](Self::start) to initiate, or pass the peer's `Start` to
    /// [`handle`](Self::handle) to respond.
    pub fn new() -> Self {
        Self {
            phase: Phase::Fresh,
            session: 0,
            pending: BTreeMap::new(),
            next_pending: BTreeMap::new(),
            outbox: Vec::new(),
            turn_questions: 0,
            diff: Differences::default(),
            stats: DigestStats::default(),
        }
    }

    /// Opens a session as the initiator. `session` should be random (the caller supplies
    /// randomness), so that stray messages of an earlier session are refused.
    pub fn start(&mut self, session: u64, tree: &DigestTree) -> Result<DigestMessage, Error> {
        if self.phase != Phase::Fresh {
            return Err(Error::Wire(format!(
                "digest session {:016x} has already begun; start a new one instead",
                self.session
            )));
        }
        self.session = session;
        self.phase = Phase::Waiting;
        self.pending
            .insert(NibblePath::ROOT, Question::Root { answered: false });
        let message = DigestMessage(Wire::Start(
            PROTOCOL_VERSION,
            session,
            tree.root_hash().map(WireHash),
        ));
        self.count_sent(&message);
        Ok(message)
    }

    /// The session id; 0 until the session begins.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Whether the session has finished.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the session failed; it then refuses every further message.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Traffic so far.
    pub fn stats(&self) -> DigestStats {
        self.stats
    }

    /// Handles one message from the peer. Returns the messages to send (once the peer's turn is
    /// complete) and, at the end, the differing documents.
    ///
    /// A message of another session is refused with an error and leaves this session untouched.
    /// Any other invalid message fails the session: the error says why, and every later call
    /// returns an error too. Nothing here panics on peer input.
    pub fn handle(&mut self, tree: &DigestTree, message: DigestMessage) -> Result<Progress, Error> {
        match self.phase {
            Phase::Failed => {
                return Err(self.violation("the session has already failed"));
            }
            Phase::Finished => {
                return Err(self.violation("the session has already finished"));
            }
            Phase::Fresh if !message.is_start() => {
                return Err(Error::Wire(format!(
                    "digest message for session {:016x} reached a session that has not begun",
                    message.session()
                )));
            }
            Phase::Waiting if message.session() != self.session => {
                return Err(Error::Wire(format!(
                    "digest message for session {:016x} reached session {:016x}; ignored",
                    message.session(),
                    self.session
                )));
            }
            _ => {}
        }
        self.stats.messages_received += 1;
        self.stats.hashes_received += message.hash_count() as u64;
        self.stats.bytes_received += message.encoded_len() as u64;
        let result = match message.0 {
            Wire::Start(version, session, root) => self.on_start(tree, version, session, root),
            Wire::Step(_, end_of_turn, items) => self.on_step(tree, end_of_turn, items),
        };
        if result.is_err() {
            self.phase = Phase::Failed;
            self.pending.clear();
            self.next_pending.clear();
            self.outbox.clear();
        }
        result
    }

    fn violation(&self, reason: impl fmt::Display) -> Error {
        Error::Wire(format!("digest session {:016x}: {reason}", self.session))
    }

    fn on_start(
        &mut self,
        tree: &DigestTree,
        version: u8,
        session: u64,
        root: Option<WireHash>,
    ) -> Result<Progress, Error> {
        if self.phase != Phase::Fresh {
            return Err(self.violation("a second start arrived; only one side initiates"));
        }
        self.session = session;
        if version != PROTOCOL_VERSION {
            return Err(Error::WireVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        self.phase = Phase::Waiting;
        self.turn_questions = 1;
        if root.map(|h| h.0) != tree.root_hash() {
            self.expand(tree, NibblePath::ROOT)?;
        }
        self.end_turn()
    }

    fn on_step(
        &mut self,
        tree: &DigestTree,
        end_of_turn: bool,
        items: Vec<Item>,
    ) -> Result<Progress, Error> {
        if items.len() > MAX_ITEMS_PER_MESSAGE {
            return Err(self.violation(format_args!(
                "{} items in one message, over the cap of {MAX_ITEMS_PER_MESSAGE}",
                items.len()
            )));
        }
        let weight: usize = items.iter().map(Item::weight).sum();
        if weight > MAX_VALUES_PER_MESSAGE {
            return Err(self.violation(format_args!(
                "{weight} values in one message, over the cap of {MAX_VALUES_PER_MESSAGE}"
            )));
        }
        if items.is_empty() && !end_of_turn {
            // Only the last message of a turn may be empty; otherwise a peer could stretch a turn
            // forever at no cost to itself.
            return Err(self.violation("an empty message that does not end its turn"));
        }
        for item in items {
            self.on_item(tree, item)?;
        }
        if end_of_turn {
            self.end_turn()
        } else {
            Ok(Progress::default())
        }
    }

    fn on_item(&mut self, tree: &DigestTree, item: Item) -> Result<(), Error> {
        let path = item.path();
        match item {
            Item::Children(_, present, hashes) => {
                if path.len() >= MAX_DEPTH {
                    return Err(
                        self.violation(format_args!("children at {path}, which is a whole doc id"))
                    );
                }
                if present == 0 || hashes.len() != present.count_ones() as usize {
                    return Err(self.violation(format_args!(
                        "children at {path}: bitmap {present:#06x} does not match {} hashes",
                        hashes.len()
                    )));
                }
                self.accept_question(path, true)?;
                let mut theirs = [None; FANOUT];
                let mut given = hashes.into_iter();
                for (i, slot) in theirs.iter_mut().enumerate() {
                    if present & (1 << i) != 0 {
                        *slot = given.next().map(|h| h.0);
                    }
                }
                let ours = tree.child_hashes(&path);
                for nibble in 0..FANOUT as u8 {
                    let i = usize::from(nibble);
                    if theirs[i] != ours[i]
                        && let Some(child) = path.child(nibble)
                    {
                        self.expand(tree, child)?;
                    }
                }
                Ok(())
            }
            Item::Entries(_, entries) => {
                if entries.len() > LEAF_MAX {
                    return Err(self.violation(format_args!(
                        "{} entries at {path}, over the leaf cap of {LEAF_MAX}",
                        entries.len()
                    )));
                }
                if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(
                        self.violation(format_args!("entries at {path} are not sorted and unique"))
                    );
                }
                if let Some(stray) = entries.iter().find(|e| !path.contains(&e.0)) {
                    return Err(
                        self.violation(format_args!("entry {} lies outside {path}", stray.0))
                    );
                }
                self.accept_question(path, false)?;
                if tree.count_under(&path) > LEAF_MAX && path.len() < MAX_DEPTH {
                    // We hold more than a leaf here: answer with our children rather than listing
                    // a subtree of any size in one item.
                    self.ask_children(tree, path)
                } else {
                    self.settle(tree, path, &entries)
                }
            }
            Item::Settle(_, only_yours, only_mine, changed) => {
                self.on_settle(path, &only_yours, &only_mine, &changed)
            }
        }
    }

    /// Checks that a question from the peer answers one of ours, and marks that one answered.
    /// `children` tells whether the question is `Children` (else `Entries`).
    fn accept_question(&mut self, path: NibblePath, children: bool) -> Result<(), Error> {
        self.turn_questions += 1;
        let session = self.session;
        let refuse = |reason: &str| {
            Error::Wire(format!("digest session {session:016x}: {reason} at {path}"))
        };
        if let Some(question) = self.pending.get_mut(&path) {
            return match question {
                Question::Root { answered } if !*answered => {
                    *answered = true;
                    Ok(())
                }
                Question::Entries { answered, .. } if !*answered && children => {
                    *answered = true;
                    Ok(())
                }
                _ => Err(refuse("an answer that does not fit the question asked")),
            };
        }
        let parent = path.parent().zip(path.nibble(path.len().wrapping_sub(1)));
        if let Some((parent, nibble)) = parent
            && let Some(Question::Children { answered }) = self.pending.get_mut(&parent)
        {
            let bit = 1u16 << nibble;
            if *answered & bit != 0 {
                return Err(refuse("a second answer"));
            }
            *answered |= bit;
            return Ok(());
        }
        Err(refuse("an answer to no question"))
    }

    fn on_settle(
        &mut self,
        path: NibblePath,
        only_yours: &[WireId],
        only_mine: &[WireId],
        changed: &[WireId],
    ) -> Result<(), Error> {
        let session = self.session;
        let refuse = |reason: &str| {
            Error::Wire(format!(
                "digest session {session:016x}: settle at {path}: {reason}"
            ))
        };
        let Some(Question::Entries { sent, answered }) = self.pending.get_mut(&path) else {
            return Err(refuse("it answers no entries we sent"));
        };
        if *answered {
            return Err(refuse("a second answer"));
        }
        for list in [only_yours, only_mine, changed] {
            if list.len() > LEAF_MAX {
                return Err(refuse("a list longer than a leaf"));
            }
            if !list.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(refuse("a list that is not sorted and unique"));
            }
        }
        let was_sent = |id: &DocId| sent.binary_search_by(|(s, _)| s.cmp(id)).is_ok();
        if !only_yours.iter().chain(changed).all(|w| was_sent(&w.0)) {
            return Err(refuse("it names ids we did not list"));
        }
        if only_yours.iter().any(|w| changed.contains(w)) {
            return Err(refuse("an id both missing and changed"));
        }
        if !only_mine
            .iter()
            .all(|w| path.contains(&w.0) && !was_sent(&w.0))
        {
            return Err(refuse("it claims ids outside the path or ids we listed"));
        }
        *answered = true;
        // The settle is written from the peer's side: its "yours" is our side.
        self.diff.local_only.extend(only_yours.iter().map(|w| w.0));
        self.diff.remote_only.extend(only_mine.iter().map(|w| w.0));
        self.diff.changed.extend(changed.iter().map(|w| w.0));
        Ok(())
    }

    /// Queues our view of `path` as a question: children when we hold more than a leaf there,
    /// else our entries (possibly none).
    fn expand(&mut self, tree: &DigestTree, path: NibblePath) -> Result<(), Error> {
        if tree.count_under(&path) > LEAF_MAX && path.len() < MAX_DEPTH {
            return self.ask_children(tree, path);
        }
        let sent: Vec<(DocId, Hash)> = tree.entries_under(&path).collect();
        self.outbox.push(Item::Entries(
            path,
            sent.iter().map(|(id, h)| WireEntry(*id, *h)).collect(),
        ));
        self.add_question(
            path,
            Question::Entries {
                sent,
                answered: false,
            },
        )
    }

    fn ask_children(&mut self, tree: &DigestTree, path: NibblePath) -> Result<(), Error> {
        let hashes = tree.child_hashes(&path);
        let present = presence_bits(&hashes);
        self.outbox.push(Item::Children(
            path,
            present,
            hashes.iter().flatten().map(|h| WireHash(*h)).collect(),
        ));
        self.add_question(path, Question::Children { answered: 0 })
    }

    fn add_question(&mut self, path: NibblePath, question: Question) -> Result<(), Error> {
        // Accepted answers form an antichain of paths, so this cannot repeat; refuse rather than
        // trust that if the peer finds a way.
        if self.next_pending.insert(path, question).is_some() {
            return Err(self.violation(format_args!("two questions at {path}")));
        }
        Ok(())
    }

    /// Both sides hold at most a leaf under `path`: compare the lists, record the differences and
    /// tell the peer.
    fn settle(
        &mut self,
        tree: &DigestTree,
        path: NibblePath,
        theirs: &[WireEntry],
    ) -> Result<(), Error> {
        let ours: Vec<(DocId, Hash)> = tree.entries_under(&path).collect();
        let (mut only_theirs, mut only_ours, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        // Merge-join of two sorted lists.
        loop {
            match (theirs.get(i), ours.get(j)) {
                (Some(t), Some(o)) if t.0 == o.0 => {
                    if t.1 != o.1 {
                        changed.push(WireId(t.0));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(t), Some(o)) if t.0 < o.0 => {
                    only_theirs.push(WireId(t.0));
                    i += 1;
                }
                (Some(t), None) => {
                    only_theirs.push(WireId(t.0));
                    i += 1;
                }
                (_, Some(o)) => {
                    only_ours.push(WireId(o.0));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        self.diff
            .remote_only
            .extend(only_theirs.iter().map(|w| w.0));
        self.diff.local_only.extend(only_ours.iter().map(|w| w.0));
        self.diff.changed.extend(changed.iter().map(|w| w.0));
        self.outbox
            .push(Item::Settle(path, only_theirs, only_ours, changed));
        Ok(())
    }

    /// The peer's turn is complete: check it answered what it had to, then send our turn.
    fn end_turn(&mut self) -> Result<Progress, Error> {
        if let Some(path) = self
            .pending
            .iter()
            .find(|(_, q)| {
                matches!(
                    q,
                    Question::Entries {
                        answered: false,
                        ..
                    }
                )
            })
            .map(|(p, _)| *p)
        {
            return Err(self.violation(format_args!(
                "the entries we sent at {path} went unanswered"
            )));
        }
        self.pending = std::mem::take(&mut self.next_pending);
        let asked = std::mem::take(&mut self.turn_questions);
        let send = if asked == 0 {
            // The peer asked nothing: it has finished, and so have we.
            Vec::new()
        } else {
            self.flush()
        };
        let finished = self.pending.is_empty().then(|| {
            self.phase = Phase::Finished;
            self.diff.clone()
        });
        Ok(Progress { send, finished })
    }

    /// Packs the outbox into messages within the caps; the last one ends our turn. An empty
    /// outbox still yields one (empty) message, which tells the peer its questions found nothing.
    fn flush(&mut self) -> Vec<DigestMessage> {
        let mut messages = Vec::new();
        let mut items = Vec::new();
        let mut weight = 0;
        for item in std::mem::take(&mut self.outbox) {
            let w = item.weight();
            if !items.is_empty()
                && (items.len() == MAX_ITEMS_PER_MESSAGE || weight + w > MAX_VALUES_PER_MESSAGE)
            {
                messages.push(DigestMessage(Wire::Step(
                    self.session,
                    false,
                    std::mem::take(&mut items),
                )));
                weight = 0;
            }
            weight += w;
            items.push(item);
        }
        messages.push(DigestMessage(Wire::Step(self.session, true, items)));
        for message in &messages {
            self.count_sent(message);
        }
        messages
    }

    fn count_sent(&mut self, message: &DigestMessage) {
        self.stats.messages_sent += 1;
        self.stats.hashes_sent += message.hash_count() as u64;
        self.stats.bytes_sent += message.encoded_len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A deterministic, well-spread doc id.
    fn id(n: u64) -> DocId {
        let digest = Sha256::digest(n.to_be_bytes());
        let mut bytes = [0u8; DOC_ID_LEN];
        bytes.copy_from_slice(&digest[..DOC_ID_LEN]);
        DocId::from_bytes(bytes)
    }

    fn heads(n: u64) -> Hash {
        heads_hash_bytes(&[Sha256::digest(n.to_le_bytes()).into()])
    }

    fn tree_of(entries: &BTreeMap<DocId, Hash>) -> DigestTree {
        entries.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Both sides of one finished session.
    struct Run {
        a: Differences,
        b: Differences,
        a_stats: DigestStats,
        b_stats: DigestStats,
    }

    impl Run {
        fn hashes(&self) -> u64 {
            self.a_stats.hashes_sent + self.b_stats.hashes_sent
        }
    }

    /// Runs a session between `a` (initiator) and `b`, every message going through CBOR.
    fn reconcile(a_tree: &DigestTree, b_tree: &DigestTree) -> Run {
        let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
        let mut to_b = vec![a.start(0xfeed_f00d, a_tree).unwrap()];
        let (mut a_done, mut b_done) = (None, None);
        for _ in 0..200 {
            let mut to_a = Vec::new();
            for m in to_b.drain(..) {
                let m = DigestMessage::decode(&m.encode()).unwrap();
                let p = b.handle(b_tree, m).unwrap();
                assert!(b_done.is_none() || p.finished.is_none(), "finished twice");
                b_done = b_done.or(p.finished);
                to_a.extend(p.send);
            }
            for m in to_a {
                assert!(m.encoded_len() <= MAX_MESSAGE_BYTES);
                let m = DigestMessage::decode(&m.encode()).unwrap();
                let p = a.handle(a_tree, m).unwrap();
                assert!(a_done.is_none() || p.finished.is_none(), "finished twice");
                a_done = a_done.or(p.finished);
                to_b.extend(p.send);
            }
            if to_b.is_empty() {
                break;
            }
        }
        assert!(
            a.is_finished() && b.is_finished(),
            "the session went quiet unfinished"
        );
        Run {
            a: a_done.unwrap(),
            b: b_done.unwrap(),
            a_stats: a.stats(),
            b_stats: b.stats(),
        }
    }

    /// The true differences between two maps, from `a`'s side.
    fn truth(a: &BTreeMap<DocId, Hash>, b: &BTreeMap<DocId, Hash>) -> Differences {
        let mut d = Differences::default();
        for (k, v) in a {
            match b.get(k) {
                None => {
                    d.local_only.insert(*k);
                }
                Some(w) if w != v => {
                    d.changed.insert(*k);
                }
                Some(_) => {}
            }
        }
        d.remote_only = b.keys().filter(|k| !a.contains_key(k)).copied().collect();
        d
    }

    fn mirrored(d: &Differences) -> Differences {
        Differences {
            local_only: d.remote_only.clone(),
            remote_only: d.local_only.clone(),
            changed: d.changed.clone(),
        }
    }

    #[test]
    fn heads_hash_ignores_order_and_duplicates() {
        let (x, y) = ([1u8; 32], [2u8; 32]);
        assert_eq!(heads_hash_bytes(&[x, y]), heads_hash_bytes(&[y, x, y]));
        assert_ne!(heads_hash_bytes(&[x]), heads_hash_bytes(&[y]));
        let change = automerge::ChangeHash(x);
        assert_eq!(heads_hash(&[change]), heads_hash_bytes(&[x]));
    }

    #[test]
    fn paths_validate_and_round_trip() {
        assert!(NibblePath::from_nibbles(&[0; 33]).is_err());
        assert!(NibblePath::from_nibbles(&[16]).is_err());
        let path = NibblePath::from_nibbles(&[0xa, 0x3, 0xf]).unwrap();
        assert_eq!(path.to_string(), "/a3f");
        assert_eq!(path.parent().unwrap().to_string(), "/a3");
        assert_eq!(path.child(1).unwrap().to_string(), "/a3f1");
        let doc = DocId::from_bytes([0xa3, 0xf7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(path.contains(&doc));
        assert!(!path.child(2).unwrap().contains(&doc));
        assert_eq!(NibblePath::of_doc(&doc, 3), Some(path));
        let full = NibblePath::of_doc(&doc, MAX_DEPTH).unwrap();
        assert_eq!(full.child(0), None);
        for p in [NibblePath::ROOT, path, full] {
            let mut bytes = Vec::new();
            ciborium::into_writer(&p, &mut bytes).unwrap();
            let back: NibblePath = ciborium::from_reader(&bytes[..]).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn malformed_wire_paths_are_refused() {
        let decode = |raw: &[u8]| {
            let mut bytes = Vec::new();
            ciborium::into_writer(&ciborium::Value::Bytes(raw.to_vec()), &mut bytes).unwrap();
            ciborium::from_reader::<NibblePath, _>(&bytes[..])
        };
        assert!(decode(&[]).is_err(), "no length byte");
        assert!(decode(&[33; 18]).is_err(), "deeper than a doc id");
        assert!(decode(&[3, 0xab]).is_err(), "too few bytes for 3 nibbles");
        assert!(decode(&[3, 0xab, 0xcd, 0]).is_err(), "too many bytes");
        assert!(decode(&[3, 0xab, 0xcd]).is_err(), "non-zero padding nibble");
        assert_eq!(decode(&[3, 0xab, 0xc0]).unwrap().to_string(), "/abc");
    }

    #[test]
    fn node_hashes_depend_only_on_the_entries_under_them() {
        let all: BTreeMap<DocId, Hash> = (0..2000).map(|n| (id(n), heads(n))).collect();
        let tree = tree_of(&all);
        assert_eq!(tree.len(), 2000);
        for nibbles in [&[][..], &[3], &[3, 9], &[3, 9, 1], &[3, 9, 1, 4, 4]] {
            let path = NibblePath::from_nibbles(nibbles).unwrap();
            let sub: DigestTree = tree.entries_under(&path).collect();
            assert_eq!(tree.node_hash(&path), sub.node_hash(&path), "at {path}");
            assert_eq!(
                tree.child_hashes(&path),
                sub.child_hashes(&path),
                "at {path}"
            );
            assert_eq!(tree.count_under(&path), sub.len());
            let expected: [Option<Hash>; FANOUT] =
                std::array::from_fn(|i| path.child(i as u8).and_then(|c| tree.node_hash(&c)));
            assert_eq!(tree.child_hashes(&path), expected);
        }
        // A different heads hash anywhere changes the root.
        let mut other = tree.clone();
        other.insert(id(1234), heads(99_999));
        assert_ne!(other.root_hash(), tree.root_hash());
        assert_eq!(DigestTree::new().root_hash(), None);
    }

    #[test]
    fn a_filtered_view_reveals_only_the_kept_documents() {
        let tree: DigestTree = (0..100).map(|n| (id(n), heads(n))).collect();
        let kept = tree.filtered(|d| d.as_bytes()[0] < 0x80);
        assert!(kept.len() < 100 && !kept.is_empty());
        assert!(
            kept.iter()
                .all(|(d, h)| d.as_bytes()[0] < 0x80 && tree.get(&d) == Some(h))
        );
        let peer: DigestTree = kept.iter().collect();
        // A peer holding exactly the shared documents sees no difference, and none of the others.
        let run = reconcile(&kept, &peer);
        assert!(run.a.is_empty());
    }

    #[test]
    fn update_only_touches_documents_already_present() {
        let mut tree: DigestTree = (0..50).map(|n| (id(n), heads(n))).collect();
        let before = tree.root_hash();
        assert!(!tree.update(id(500), heads(1)));
        assert_eq!(tree.root_hash(), before);
        assert!(tree.update(id(7), heads(700)));
        assert_eq!(tree.get(&id(7)), Some(heads(700)));
        assert_ne!(tree.root_hash(), before);
        assert_eq!(tree.remove(&id(7)), Some(heads(700)));
        assert_eq!(tree.remove(&id(7)), None);
        assert_eq!(tree.len(), 49);
    }

    #[test]
    fn ten_changed_of_a_thousand_costs_log_d_hashes_each() {
        let a: BTreeMap<DocId, Hash> = (0..1000).map(|n| (id(n), heads(n))).collect();
        let mut b = a.clone();
        for n in (0..1000).step_by(100) {
            b.insert(id(n), heads(n + 5000));
        }
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a.len(), 10);
        assert_eq!(run.a, truth(&a, &b));
        assert_eq!(run.b, mirrored(&run.a));
        let bound = 10.0 * 16.0 * 1000f64.log(16.0) + 16.0;
        let hashes = run.hashes();
        assert!((hashes as f64) < bound, "{hashes} hashes, bound {bound:.0}");
        // Far below what listing every document would cost.
        assert!(hashes < 1000 / 2, "{hashes} hashes");
    }

    #[test]
    fn no_change_is_one_round_trip() {
        let tree: DigestTree = (0..1000).map(|n| (id(n), heads(n))).collect();
        let run = reconcile(&tree, &tree.clone());
        assert!(run.a.is_empty() && run.b.is_empty());
        assert_eq!(
            (run.a_stats.messages_sent, run.a_stats.messages_received),
            (1, 1)
        );
        assert_eq!(
            (run.b_stats.messages_sent, run.b_stats.messages_received),
            (1, 1)
        );
        assert_eq!(run.hashes(), 1, "only the initiator's root hash travels");
        assert!(run.a_stats.bytes_sent + run.b_stats.bytes_sent < 100);
        assert_eq!(run.a_stats.bytes_sent, run.b_stats.bytes_received);
        // Two empty peers agree just as quickly.
        let empty = reconcile(&DigestTree::new(), &DigestTree::new());
        assert_eq!(empty.a_stats.messages_sent + empty.b_stats.messages_sent, 2);
    }

    #[test]
    fn documents_missing_on_either_side_are_found() {
        let shared: BTreeMap<DocId, Hash> = (0..600).map(|n| (id(n), heads(n))).collect();
        let mut a = shared.clone();
        let mut b = shared;
        for n in 600..610 {
            a.insert(id(n), heads(n));
        }
        for n in 700..705 {
            b.insert(id(n), heads(n));
        }
        b.insert(id(3), heads(3333));
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a.local_only, (600..610).map(id).collect());
        assert_eq!(run.a.remote_only, (700..705).map(id).collect());
        assert_eq!(run.a.changed, [id(3)].into_iter().collect());
        assert_eq!(run.b, mirrored(&run.a));
    }

    #[test]
    fn an_empty_peer_learns_everything_in_capped_messages() {
        let a: BTreeMap<DocId, Hash> = (0..5000).map(|n| (id(n), heads(n))).collect();
        let run = reconcile(&tree_of(&a), &DigestTree::new());
        assert_eq!(run.a.local_only.len(), 5000);
        assert_eq!(run.b.remote_only.len(), 5000);
        // The last turns hold thousands of ids, so they must have been split.
        assert!(run.a_stats.messages_sent + run.b_stats.messages_sent > 10);
        let run = reconcile(&DigestTree::new(), &tree_of(&a));
        assert_eq!(run.a.remote_only.len(), 5000);
    }

    #[test]
    fn deep_shared_prefixes_are_reconciled() {
        // Ids that agree on their first 15 bytes force the tree to its full depth.
        let deep = |n: u8| {
            let mut bytes = [0x42u8; DOC_ID_LEN];
            bytes[15] = n;
            DocId::from_bytes(bytes)
        };
        let a: BTreeMap<DocId, Hash> = (0..=255u8).map(|n| (deep(n), heads(n.into()))).collect();
        let mut b = a.clone();
        b.remove(&deep(17));
        b.insert(deep(200), heads(1));
        let run = reconcile(&tree_of(&a), &tree_of(&b));
        assert_eq!(run.a, truth(&a, &b));
        assert_eq!(run.a.len(), 2);
    }

    /// A session mid-way: `a` started, `b` answered, and `a` holds `b`'s first reply.
    fn mid_session() -> (Reconciler, DigestTree, Vec<DigestMessage>) {
        let a_tree: DigestTree = (0..300).map(|n| (id(n), heads(n))).collect();
        let mut b_tree = a_tree.clone();
        b_tree.insert(id(5), heads(55));
        let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
        let start = a.start(9, &a_tree).unwrap();
        let reply = b.handle(&b_tree, start).unwrap().send;
        (a, a_tree, reply)
    }

    #[test]
    fn a_message_of_another_session_is_refused_without_harm() {
        let (mut a, tree, reply) = mid_session();
        let mut stray = reply[0].clone();
        if let Wire::Step(session, ..) = &mut stray.0 {
            *session = 10;
        }
        assert!(a.handle(&tree, stray).is_err());
        assert!(!a.is_failed());
        for m in reply {
            a.handle(&tree, m).unwrap();
        }
    }

    #[test]
    fn protocol_violations_fail_the_session() {
        let cases: Vec<(&str, Wire)> = vec![
            ("second start", Wire::Start(PROTOCOL_VERSION, 9, None)),
            (
                "unasked path",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(
                        NibblePath::from_nibbles(&[1, 2]).unwrap(),
                        vec![],
                    )],
                ),
            ),
            (
                "settle nobody asked for",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Settle(NibblePath::ROOT, vec![], vec![], vec![])],
                ),
            ),
            (
                "bitmap mismatch",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Children(
                        NibblePath::ROOT,
                        0b11,
                        vec![WireHash([1; 32])],
                    )],
                ),
            ),
            (
                "too many items",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(NibblePath::ROOT, vec![]); MAX_ITEMS_PER_MESSAGE + 1],
                ),
            ),
            (
                "too many entries",
                Wire::Step(
                    9,
                    true,
                    vec![Item::Entries(
                        NibblePath::ROOT,
                        (0..=LEAF_MAX as u64)
                            .map(|n| WireEntry(id(n), [0; 32]))
                            .collect(),
                    )],
                ),
            ),
            ("empty non-final message", Wire::Step(9, false, vec![])),
        ];
        for (what, wire) in cases {
            let (mut a, tree, reply) = mid_session();
            assert!(
                a.handle(&tree, DigestMessage(wire)).is_err(),
                "{what} accepted"
            );
            assert!(a.is_failed(), "{what} did not fail the session");
            assert!(
                a.handle(&tree, reply[0].clone()).is_err(),
                "{what}: failed session went on"
            );
        }
    }

    #[test]
    fn start_and_version_misuse_are_errors() {
        let tree: DigestTree = (0..10).map(|n| (id(n), heads(n))).collect();
        let mut a = Reconciler::new();
        let start = a.start(1, &tree).unwrap();
        assert!(a.start(2, &tree).is_err());
        // Both sides initiating: the second start is refused.
        assert!(a.handle(&tree, start.clone()).is_err());
        let mut b = Reconciler::new();
        let old = DigestMessage(Wire::Start(PROTOCOL_VERSION + 1, 1, None));
        assert!(matches!(
            b.handle(&tree, old),
            Err(Error::WireVersion { .. })
        ));
        let mut c = Reconciler::new();
        let step = DigestMessage(Wire::Step(1, true, vec![]));
        assert!(c.handle(&tree, step).is_err());
        assert!(!c.is_failed(), "a fresh session ignores strays");
        // After the end, nothing more is accepted.
        let mut d = Reconciler::new();
        let done = d.handle(&tree, start).unwrap();
        assert!(done.finished.is_some());
        assert!(d.handle(&tree, done.send[0].clone()).is_err());
    }

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

    #[derive(Debug, Clone)]
    enum Op {
        Change(usize),
        Remove(usize),
        Insert(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                any::<usize>().prop_map(Op::Change),
                any::<usize>().prop_map(Op::Remove),
                any::<u64>().prop_map(Op::Insert),
            ],
            0..40,
        )
    }

    /// Applies `ops` to both a model map and a tree, incrementally.
    fn apply(
        ops: &[Op],
        model: &mut BTreeMap<DocId, Hash>,
        tree: &mut DigestTree,
        make: impl Fn(u64) -> DocId,
    ) {
        for (step, op) in ops.iter().enumerate() {
            let pick = |i: usize| model.keys().nth(i % model.len().max(1)).copied();
            match *op {
                Op::Change(i) => {
                    if let Some(k) = pick(i) {
                        let h = heads(1_000_000 + step as u64);
                        model.insert(k, h);
                        tree.insert(k, h);
                    }
                }
                Op::Remove(i) => {
                    if let Some(k) = pick(i) {
                        model.remove(&k);
                        assert!(tree.remove(&k).is_some());
                    }
                }
                Op::Insert(n) => {
                    let k = make(n);
                    model.insert(k, heads(n));
                    tree.insert(k, heads(n));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random changes, insertions and deletions on both sides are found exactly, with ids
        /// that sometimes share long prefixes so that deep paths and splits are exercised.
        #[test]
        fn reported_differences_are_exact(
            base in 0usize..400,
            shared_prefix in 0usize..15,
            salt in any::<u64>(),
            a_ops in ops(),
            b_ops in ops(),
        ) {
            let make = move |n: u64| {
                let mut bytes = *id(n ^ salt).as_bytes();
                bytes[..shared_prefix].fill(0x5a);
                DocId::from_bytes(bytes)
            };
            let start: BTreeMap<DocId, Hash> = (0..base as u64).map(|n| (make(n), heads(n))).collect();
            let (mut a, mut b) = (start.clone(), start.clone());
            let (mut a_tree, mut b_tree) = (tree_of(&a), tree_of(&b));
            apply(&a_ops, &mut a, &mut a_tree, make);
            apply(&b_ops, &mut b, &mut b_tree, make);
            // Incremental maintenance gives exactly the tree a rebuild would.
            prop_assert_eq!(&a_tree.root, &tree_of(&a).root);
            prop_assert_eq!(&b_tree.root, &tree_of(&b).root);
            let run = reconcile(&a_tree, &b_tree);
            let expected = truth(&a, &b);
            prop_assert_eq!(&run.a, &expected);
            prop_assert_eq!(&run.b, &mirrored(&expected));
            prop_assert_eq!(run.a.is_empty(), a_tree.root_hash() == b_tree.root_hash());
        }

        /// Incremental insert/update/remove matches a fresh build after every step.
        #[test]
        fn incremental_tree_matches_rebuild(ops in prop::collection::vec((any::<bool>(), 0u64..64, 0u64..4), 0..200)) {
            // Few distinct ids sharing 14 bytes, so leaves split and merge back often.
            let make = |n: u64| {
                let mut bytes = [0x33u8; DOC_ID_LEN];
                bytes[14] = (n >> 4) as u8;
                bytes[15] = (n as u8) << 4;
                DocId::from_bytes(bytes)
            };
            let mut model = BTreeMap::new();
            let mut tree = DigestTree::new();
            for (insert, n, h) in ops {
                if insert {
                    prop_assert_eq!(tree.insert(make(n), heads(h)), model.insert(make(n), heads(h)));
                } else {
                    prop_assert_eq!(tree.remove(&make(n)), model.remove(&make(n)));
                }
                prop_assert_eq!(&tree.root, &tree_of(&model).root);
            }
            prop_assert_eq!(tree.len(), model.len());
        }
    }

    fn arb_path() -> impl Strategy<Value = NibblePath> {
        // Mostly short paths, which is where a real session's questions are.
        prop_oneof![
            3 => prop::collection::vec(0u8..16, 0..=2),
            1 => prop::collection::vec(0u8..16, 0..=MAX_DEPTH),
        ]
        .prop_map(|n| NibblePath::from_nibbles(&n).unwrap())
    }

    fn arb_id() -> impl Strategy<Value = WireId> {
        prop_oneof![
            (0u64..400).prop_map(|n| WireId(id(n))),
            any::<[u8; DOC_ID_LEN]>().prop_map(|b| WireId(DocId::from_bytes(b))),
        ]
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let ids = || prop::collection::vec(arb_id(), 0..20);
        prop_oneof![
            (
                arb_path(),
                any::<u16>(),
                prop::collection::vec(any::<[u8; 32]>().prop_map(WireHash), 0..18)
            )
                .prop_map(|(p, bits, h)| Item::Children(p, bits, h)),
            (
                arb_path(),
                prop::collection::vec((arb_id(), any::<[u8; 32]>()), 0..20)
            )
                .prop_map(|(p, e)| Item::Entries(
                    p,
                    e.into_iter().map(|(i, h)| WireEntry(i.0, h)).collect()
                )),
            (arb_path(), ids(), ids(), ids()).prop_map(|(p, a, b, c)| Item::Settle(p, a, b, c)),
        ]
    }

    fn arb_message() -> impl Strategy<Value = DigestMessage> {
        prop_oneof![
            (
                any::<u8>(),
                prop_oneof![Just(9u64), any::<u64>()],
                any::<Option<[u8; 32]>>()
            )
                .prop_map(|(v, s, r)| DigestMessage(Wire::Start(
                    v,
                    s,
                    r.map(WireHash)
                ))),
            (
                prop_oneof![Just(9u64), any::<u64>()],
                any::<bool>(),
                prop::collection::vec(arb_item(), 0..6)
            )
                .prop_map(|(s, end, items)| DigestMessage(Wire::Step(s, end, items))),
        ]
    }

    /// One way of tampering with a message; indexes wrap around whatever is there.
    #[derive(Debug, Clone)]
    enum Tamper {
        FlipEnd,
        DropItem(usize),
        DuplicateItem(usize),
        /// Xors a byte of a hash, an entry's heads hash or a settled id.
        Corrupt(usize, usize, u8),
        DropValue(usize, usize),
        DuplicateValue(usize, usize),
        /// Moves an item one nibble deeper (`Some`) or up to its parent (`None`).
        MovePath(usize, Option<u8>),
        FlipBitmap(usize, u8),
        InventId(usize, u64),
        Session(u64),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        prop_oneof![
            Just(Tamper::FlipEnd),
            any::<usize>().prop_map(Tamper::DropItem),
            any::<usize>().prop_map(Tamper::DuplicateItem),
            (any::<usize>(), any::<usize>(), 1u8..).prop_map(|(i, j, x)| Tamper::Corrupt(i, j, x)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Tamper::DropValue(i, j)),
            (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Tamper::DuplicateValue(i, j)),
            (any::<usize>(), any::<Option<u8>>())
                .prop_map(|(i, n)| Tamper::MovePath(i, n.map(|n| n % 16))),
            (any::<usize>(), 0u8..16).prop_map(|(i, b)| Tamper::FlipBitmap(i, b)),
            (any::<usize>(), 0u64..2000).prop_map(|(i, n)| Tamper::InventId(i, n)),
            any::<u64>().prop_map(Tamper::Session),
        ]
    }

    impl Tamper {
        fn apply(&self, message: &mut DigestMessage) {
            let Wire::Step(session, end, items) = &mut message.0 else {
                return;
            };
            let n = items.len().max(1);
            let item = |i: usize| i % n;
            match *self {
                Tamper::FlipEnd => *end = !*end,
                Tamper::DropItem(i) if !items.is_empty() => {
                    items.remove(item(i));
                }
                Tamper::DuplicateItem(i) if !items.is_empty() => items.push(items[item(i)].clone()),
                Tamper::Session(s) => *session = s,
                _ if items.is_empty() => {}
                Tamper::Corrupt(i, j, x) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => {
                        let k = j % h.len();
                        h[k].0[j % 32] ^= x;
                    }
                    Item::Entries(_, e) if !e.is_empty() => {
                        let k = j % e.len();
                        e[k].1[j % 32] ^= x;
                    }
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            if let Some(w) = list.first_mut() {
                                let mut bytes = *w.0.as_bytes();
                                bytes[j % DOC_ID_LEN] ^= x;
                                w.0 = DocId::from_bytes(bytes);
                            }
                        }
                    }
                    _ => {}
                },
                Tamper::DropValue(i, j) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => {
                        h.remove(j % h.len());
                    }
                    Item::Entries(_, e) if !e.is_empty() => {
                        e.remove(j % e.len());
                    }
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            list.pop();
                        }
                    }
                    _ => {}
                },
                Tamper::DuplicateValue(i, j) => match &mut items[item(i)] {
                    Item::Children(_, _, h) if !h.is_empty() => h.push(h[j % h.len()]),
                    Item::Entries(_, e) if !e.is_empty() => e.push(e[j % e.len()]),
                    Item::Settle(_, a, b, c) => {
                        for list in [a, b, c] {
                            if let Some(w) = list.first().copied() {
                                list.push(w);
                            }
                        }
                    }
                    _ => {}
                },
                Tamper::MovePath(i, to) => {
                    let (Item::Children(p, ..) | Item::Entries(p, ..) | Item::Settle(p, ..)) =
                        &mut items[item(i)];
                    if let Some(moved) = match to {
                        Some(nibble) => p.child(nibble),
                        None => p.parent(),
                    } {
                        *p = moved;
                    }
                }
                Tamper::FlipBitmap(i, bit) => {
                    if let Item::Children(_, bits, _) = &mut items[item(i)] {
                        *bits ^= 1 << bit;
                    }
                }
                Tamper::InventId(i, k) => match &mut items[item(i)] {
                    Item::Entries(_, e) => e.push(WireEntry(id(k), heads(k))),
                    Item::Settle(_, _, b, _) => b.push(WireId(id(k))),
                    Item::Children(..) => {}
                },
                Tamper::DropItem(_) | Tamper::DuplicateItem(_) => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary messages, in any state, give errors or well-formed replies, never panics; an
        /// invalid message leaves the session refusing everything after it.
        #[test]
        fn hostile_messages_are_errors_not_panics(messages in prop::collection::vec(arb_message(), 1..6)) {
            let (a, tree, reply) = mid_session();
            let mut deeper = mid_session().0;
            for m in reply.iter().cloned() {
                deeper.handle(&tree, m).unwrap();
            }
            let mut responder = Reconciler::new();
            responder.handle(&tree, DigestMessage(Wire::Start(PROTOCOL_VERSION, 9, Some(WireHash([7; 32]))))).unwrap();
            let mut started = Reconciler::new();
            started.start(9, &tree).unwrap();
            for mut r in [a, deeper, responder, Reconciler::new(), started] {
                for m in messages.iter().cloned() {
                    let was_failed = r.is_failed();
                    match r.handle(&tree, m) {
                        Ok(progress) => {
                            prop_assert!(!was_failed);
                            for out in &progress.send {
                                prop_assert!(out.encoded_len() <= MAX_MESSAGE_BYTES);
                                if let Wire::Step(_, _, items) = &out.0 {
                                    prop_assert!(items.len() <= MAX_ITEMS_PER_MESSAGE);
                                    prop_assert!(items.iter().map(Item::weight).sum::<usize>() <= MAX_VALUES_PER_MESSAGE);
                                }
                            }
                        }
                        Err(e) => prop_assert!(!e.to_string().is_empty()),
                    }
                }
            }
        }

        /// A peer that tampers with real messages mid-session (changed hashes, dropped,
        /// duplicated or invented values, moved paths, lost turn ends) only ever produces errors
        /// or consistent progress, and a failed session stays failed.
        #[test]
        fn tampered_sessions_are_errors_not_panics(
            tampers in prop::collection::vec((0usize..12, tamper()), 1..4),
            changed in prop::collection::vec(0u64..300, 1..20),
        ) {
            let a_tree: DigestTree = (0..300).map(|n| (id(n), heads(n))).collect();
            let mut b_tree = a_tree.clone();
            for n in changed {
                if n % 3 == 0 { b_tree.remove(&id(n)); } else { b_tree.insert(id(n + 1000 * (n % 2)), heads(n + 7)); }
            }
            let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
            let mut to_b = vec![a.start(9, &a_tree).unwrap()];
            let mut delivered = 0;
            let mut outcome = Ok(());
            'session: for _ in 0..100 {
                let mut to_a = Vec::new();
                for m in to_b.drain(..) {
                    match b.handle(&b_tree, m) {
                        Ok(p) => to_a.extend(p.send),
                        Err(e) => { outcome = Err(e); break 'session; }
                    }
                }
                for mut m in to_a {
                    for (at, tamper) in &tampers {
                        if *at == delivered { tamper.apply(&mut m); }
                    }
                    delivered += 1;
                    let stray = m.session() != 9;
                    match a.handle(&a_tree, m) {
                        Ok(p) => to_b.extend(p.send),
                        // A stray session id is refused and ignored; the session goes on.
                        Err(_) if stray => prop_assert!(!a.is_failed()),
                        Err(e) => { outcome = Err(e); break 'session; }
                    }
                }
                if to_b.is_empty() { break; }
            }
            if outcome.is_err() {
                prop_assert!(a.is_failed() || b.is_failed());
                let probe = DigestMessage(Wire::Step(9, true, vec![]));
                if a.is_failed() { prop_assert!(a.handle(&a_tree, probe.clone()).is_err()); }
                if b.is_failed() { prop_assert!(b.handle(&b_tree, probe).is_err()); }
            }
        }

        /// Corrupted encodings of real messages decode to errors or to messages that are then
        /// handled without panicking.
        #[test]
        fn corrupted_bytes_are_errors_not_panics(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let (mut a, tree, reply) = mid_session();
            for m in reply {
                let mut bytes = m.encode();
                for (at, value) in &flips {
                    let i = at.index(bytes.len());
                    bytes[i] ^= value;
                }
                if truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                if let Ok(decoded) = DigestMessage::decode(&bytes) {
                    let _ = a.handle(&tree, decoded);
                }
            }
        }

        /// Random bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = DigestMessage::decode(&bytes) {
                let _ = Reconciler::new().handle(&DigestTree::new(), m);
            }
        }
    }
}
