//! Typed keyspaces and the suggested key layouts inside them.

use std::fmt;

/// A keyspace: a separate namespace of keys, so that, say, a document id and a peer id can never collide.
///
/// Backends keep every keyspace in one ordered map, behind a one-byte tag (see [`Keyspace::tag`]), so that one
/// atomic batch can span keyspaces. The tags are part of the on-disk format and never change.
///
/// Suggested key layouts (integers big-endian, so that byte order is numeric order and prefix scans come out
/// sorted):
///
/// | keyspace | key | value |
/// | --- | --- | --- |
/// | `Meta` | a short ASCII name, e.g. `device.identity` | node metadata (the store's own record is reserved) |
/// | `Keyring` | doc id (16) ‖ epoch counter (u64) ‖ device id | wrapped document key |
/// | `DocChunks` | see [`DocChunk`]: doc id (16) ‖ `0x00`, or doc id (16) ‖ `0x01` ‖ seq (u64) | Automerge bytes |
/// | `SyncStates` | peer id length (u8) ‖ peer id ‖ doc id (16) | encoded `automerge::sync::State` |
/// | `Outbox` | seq (u64) | a message awaiting delivery |
/// | `Audit` | unix time in ms (u64) ‖ seq (u32) | an audit entry |
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Keyspace {
    /// Node and store metadata.
    Meta,
    /// Document keys, wrapped per device, one per (document, epoch).
    Keyring,
    /// Document snapshots and the incremental chunks saved since.
    DocChunks,
    /// Per-peer, per-document sync states, so that a reconnect resumes.
    SyncStates,
    /// Messages waiting for a peer's acknowledgement.
    Outbox,
    /// The append-only audit log.
    Audit,
}

impl Keyspace {
    /// Every keyspace, in tag order.
    pub const ALL: [Keyspace; 6] = [
        Keyspace::Meta,
        Keyspace::Keyring,
        Keyspace::DocChunks,
        Keyspace::SyncStates,
        Keyspace::Outbox,
        Keyspace::Audit,
    ];

    /// The byte that prefixes this keyspace's keys in a backend.
    pub const fn tag(self) -> u8 {
        match self {
            Keyspace::Meta => 0x01,
            Keyspace::Keyring => 0x02,
            Keyspace::DocChunks => 0x03,
            Keyspace::SyncStates => 0x04,
            Keyspace::Outbox => 0x05,
            Keyspace::Audit => 0x06,
        }
    }

    /// The keyspace a tag byte stands for, if any.
    pub const fn from_tag(tag: u8) -> Option<Keyspace> {
        match tag {
            0x01 => Some(Keyspace::Meta),
            0x02 => Some(Keyspace::Keyring),
            0x03 => Some(Keyspace::DocChunks),
            0x04 => Some(Keyspace::SyncStates),
            0x05 => Some(Keyspace::Outbox),
            0x06 => Some(Keyspace::Audit),
            _ => None,
        }
    }

    /// A short lowercase name, as used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            Keyspace::Meta => "meta",
            Keyspace::Keyring => "keyring",
            Keyspace::DocChunks => "doc_chunks",
            Keyspace::SyncStates => "sync_states",
            Keyspace::Outbox => "outbox",
            Keyspace::Audit => "audit",
        }
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Length of a document id in a [`Keyspace::DocChunks`] key.
pub const DOC_ID_LEN: usize = 16;

/// One record of a document in [`Keyspace::DocChunks`].
///
/// A document is stored as one snapshot (`AutoCommit::save`) plus the incremental chunks saved after it
/// (`save_incremental`), numbered by a per-document sequence. Keys are `doc id ‖ 0x00` for the snapshot and
/// `doc id ‖ 0x01 ‖ seq (u64 big-endian)` for chunks, so a prefix scan over the doc id returns the snapshot first
/// and then the chunks in order, which is exactly the order to load them in. Compaction writes the new snapshot
/// and deletes the chunks it covers in one atomic [`Batch`](crate::Batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DocChunk {
    /// The document's latest full snapshot.
    Snapshot,
    /// An incremental chunk with its sequence number.
    Incremental(u64),
}

const SNAPSHOT_MARK: u8 = 0x00;
const INCREMENTAL_MARK: u8 = 0x01;

impl DocChunk {
    /// The key of this record of document `doc`.
    pub fn key(self, doc: &[u8; DOC_ID_LEN]) -> Vec<u8> {
        let mut key = Vec::with_capacity(DOC_ID_LEN + 9);
        key.extend_from_slice(doc);
        match self {
            DocChunk::Snapshot => key.push(SNAPSHOT_MARK),
            DocChunk::Incremental(seq) => {
                key.push(INCREMENTAL_MARK);
                key.extend_from_slice(&seq.to_be_bytes());
            }
        }
        key
    }

    /// The scan prefix covering every record of document `doc`.
    pub fn prefix(doc: &[u8; DOC_ID_LEN]) -> Vec<u8> {
        doc.to_vec()
    }

    /// Splits a `DocChunks` key into its document id and record, or `None` if it does not follow the layout.
    pub fn parse(key: &[u8]) -> Option<([u8; DOC_ID_LEN], DocChunk)> {
        let (doc, rest) = key.split_first_chunk::<DOC_ID_LEN>()?;
        let chunk = match rest {
            [SNAPSHOT_MARK] => DocChunk::Snapshot,
            [INCREMENTAL_MARK, seq @ ..] => {
                DocChunk::Incremental(u64::from_be_bytes(<[u8; 8]>::try_from(seq).ok()?))
            }
            _ => return None,
        };
        Some((*doc, chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_are_distinct() {
        for ks in Keyspace::ALL {
            assert_eq!(Keyspace::from_tag(ks.tag()), Some(ks));
        }
        assert_eq!(Keyspace::from_tag(0), None);
        assert_eq!(Keyspace::from_tag(0x07), None);
    }

    #[test]
    fn doc_chunk_keys_sort_snapshot_first_then_by_seq() {
        let doc = [7u8; DOC_ID_LEN];
        let mut keys = [
            DocChunk::Incremental(256).key(&doc),
            DocChunk::Incremental(2).key(&doc),
            DocChunk::Snapshot.key(&doc),
            DocChunk::Incremental(u64::MAX).key(&doc),
        ];
        keys.sort();
        let parsed: Vec<_> = keys
            .iter()
            .map(|k| DocChunk::parse(k).map(|(_, c)| c))
            .collect();
        assert_eq!(
            parsed,
            vec![
                Some(DocChunk::Snapshot),
                Some(DocChunk::Incremental(2)),
                Some(DocChunk::Incremental(256)),
                Some(DocChunk::Incremental(u64::MAX)),
            ]
        );
        assert!(keys.iter().all(|k| k.starts_with(&DocChunk::prefix(&doc))));
    }

    #[test]
    fn malformed_doc_chunk_keys_are_rejected() {
        let doc = [1u8; DOC_ID_LEN];
        assert_eq!(DocChunk::parse(&doc), None);
        assert_eq!(DocChunk::parse(&[1u8; 5]), None);
        let mut bad = DocChunk::Incremental(1).key(&doc);
        bad.pop();
        assert_eq!(DocChunk::parse(&bad), None);
        let mut wrong_mark = DocChunk::Snapshot.key(&doc);
        wrong_mark[DOC_ID_LEN] = 9;
        assert_eq!(DocChunk::parse(&wrong_mark), None);
    }
}
