//! hearth-crdt: Hearth's shared state as Automerge documents, sans-IO.
//!
//! The crate does no I/O. An [`Engine`] holds a node's documents and its sync
//! sessions; every call takes the wall-clock time (and any incoming frame) and
//! returns [`Output`]s: frames to send, chunks to persist, change
//! notifications, timers. That makes multi-peer behaviour testable in one
//! process, with a simulated network.
//!
//! - [`schema`]: the header every document carries, typed and validated views
//!   of `entity`, `registry`, `home`, `room`, `presence`, `locks` and
//!   `session` documents, and the engine calls that create and edit them.
//! - [`policy`]: conflict policies applied at read time, explicit
//!   resolution, and audit records of conflicts.
//! - [`history`]: an entity's versions, reads as of a version, restores.
//! - [`hlc`]: the hybrid logical clock behind `updated_at` and latest-wins.
//! - [`engine`]: direct change pushes (the hot path), sync sessions for
//!   catch-up, panic containment.
//! - [`wire`]: versioned CBOR envelopes for pushes, sync messages and digests.
//!
//! The `harness` feature adds `hearth_crdt::harness`, the seeded multi-peer
//! harness this crate's own tests run on: N engines on a simulated network that
//! drops, duplicates and reorders frames by seed, driven until it goes quiet.
//!
//! # Two peers converge
//!
//! ```
//! use hearth_crdt::{DocId, Engine, EngineConfig, EntityUpdate, KeyEpoch, Output};
//!
//! let doc = DocId::from_bytes([1; 16]);
//! let mut alice: Engine<&str> = Engine::new(b"alice", EngineConfig::default());
//! let mut bob: Engine<&str> = Engine::new(b"bob", EngineConfig::default());
//! let epoch = KeyEpoch::first([0; 16]);
//! let first = EntityUpdate { state: "off".into(), attributes: None };
//! alice.create_entity(doc, "home-1", epoch, "light.porch", &first, 1_000)?;
//! bob.expect_document(doc, hearth_crdt::DocKind::Entity, "home-1", epoch);
//!
//! // Deliver frames until both sides fall quiet. A real node seals each
//! // payload and sends it over its sync stream instead.
//! fn pump(a: &mut Engine<&'static str>, b: &mut Engine<&'static str>,
//!         mut queue: Vec<(&'static str, Output<&'static str>)>) {
//!     while let Some((from, out)) = queue.pop() {
//!         let Output::Send { peer, frame } = out else { continue };
//!         let bytes = hearth_crdt::wire::encode(&frame);
//!         let frame = hearth_crdt::wire::decode(&bytes, 1 << 20).unwrap();
//!         let target = if peer == "alice" { &mut *a } else { &mut *b };
//!         let replies = target.receive(from, frame, 2_000).unwrap();
//!         queue.extend(replies.into_iter().map(|o| (peer, o)));
//!     }
//! }
//!
//! let mut q: Vec<_> = alice.attach("bob", doc, None, 1_000)?.into_iter().map(|o| ("alice", o)).collect();
//! q.extend(bob.attach("alice", doc, None, 1_000)?.into_iter().map(|o| ("bob", o)));
//! pump(&mut alice, &mut bob, q);
//! assert_eq!(bob.entity(doc)?.state, "off");
//!
//! // Now in sync, a write travels as a direct push.
//! let on = EntityUpdate { state: "on".into(), attributes: None };
//! let out = alice.update_entity(doc, &on, 3_000, Some("req-1".into()))?;
//! pump(&mut alice, &mut bob, out.into_iter().map(|o| ("alice", o)).collect());
//! assert_eq!(bob.entity(doc)?, alice.entity(doc)?);
//! assert_eq!(bob.heads(doc)?, alice.heads(doc)?);
//! # Ok::<(), hearth_crdt::Error>(())
//! ```

mod chunks;
pub mod digest;
pub mod engine;
pub mod error;
pub mod grantee;
pub mod history;
pub mod hlc;
pub mod ids;
pub mod policy;
pub mod schema;
mod session;
pub mod wire;

#[cfg(any(test, feature = "harness"))]
pub mod harness;
#[cfg(test)]
mod harness_docs;
#[cfg(test)]
mod harness_generations;

pub use automerge::{ActorId, ChangeHash};
pub use engine::{
    ChunkKind, Engine, EngineConfig, EngineStats, Origin, Output, PreparedLoad, payload_actors,
};
pub use error::{Error, Result};
pub use history::{HistorySnapshot, Version, VersionRead};
pub use hlc::{Hlc, HlcClock};
pub use ids::{DOC_ID_LEN, DocId, KeyEpoch, actor_bytes_for_peer, actor_for_peer};
pub use policy::{
    ActorHomes, Candidate, Conflict, ConflictAction, ConflictRecord, Field, HomeLookup, Policy,
    ResolvedEntity,
};
pub use schema::activity::{ActivityPhase, NewActivity};
pub use schema::entity::{Entity, EntityUpdate};
pub use schema::home::Home;
pub use schema::locks::{Lock, LockType, Locks};
pub use schema::presence::{Presence, PresenceEntry, PresenceStatus, PresenceUpdate};
pub use schema::registry::Registry;
pub use schema::room::{
    Activity, ActivityState, ChatMessage, Member, NewMessage, NewRoom, Playback, Room, RoomHead,
};
pub use schema::session::{Handoff, HandoffOutcome, Session};
pub use schema::{DocKind, Header};
