//! The digest tree: a Merkle trie over `(doc id, heads hash)`, and the nibble paths that
//! address its nodes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::ids::{DOC_ID_LEN, DocId};

use super::wire::SmallBytes;

/// Children per internal node: one per hex nibble.
pub const FANOUT: usize = 16;

/// Deepest path, in nibbles: a whole 16-byte doc id.
pub const MAX_DEPTH: usize = 2 * DOC_ID_LEN;

/// A subtree holding at most this many documents is a leaf and is sent as its entries.
///
/// Sixteen is about where listing the entries (48 bytes each) costs the same as sending 16 child
/// hashes and then the entries of the one child that differs.
pub const LEAF_MAX: usize = 16;

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

pub(super) type Hash = [u8; 32];

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

// ---------------------------------------------------------------------------------------------
// The tree

/// A node of the canonical trie. Entries themselves live in the tree's sorted map; leaves keep
/// only their count and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Node {
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

pub(super) fn presence_bits(children: &[Option<Hash>; FANOUT]) -> u16 {
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

/// A Merkle trie over `(doc id, heads hash)` with a fan-out of 16; see the [module docs](super).
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

#[cfg(test)]
impl DigestTree {
    /// The stored trie, for tests that compare a tree kept up to date with a rebuilt one.
    pub(super) fn root_node(&self) -> Option<&Node> {
        self.root.as_deref()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::testing::{heads, id, reconcile, tree_of};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

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
}
