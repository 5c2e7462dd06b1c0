//! hearth-crdt: Hearth's shared state as Automerge documents, sans-IO.

pub mod ids;

pub use ids::{DOC_ID_LEN, DocId, actor_bytes_for_peer};
