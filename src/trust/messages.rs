//! Messages between devices inside grant frames: grants and their end between homes, new
//! home-document keys after a revocation, and signed revocation records. CBOR, capped at
//! [`MAX_SHARE_MESSAGE`], decoded by `trust::wire::from_cbor` (trailing bytes refused).

use hearth_crdt::KeyEpoch;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Largest grant message accepted.
pub(crate) const MAX_SHARE_MESSAGE: usize = 4096;
/// Largest grant message accepted from a device of this home, for an `Event`, a
/// `Session` or an `Activity` only (every other kind stays under [`MAX_SHARE_MESSAGE`]): an event's
/// payload and a session's context may be larger.
pub(crate) const MAX_OWN_SHARE_MESSAGE: usize = 48 * 1024;

/// What travels in a grant frame.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum ShareMessage {
    /// The key of an entity's document for one epoch, wrapped for the receiving device.
    Grant {
        entity_id: String,
        doc: String,
        epoch: KeyEpoch,
        wrapped: ByteBuf,
        rights: String,
    },
    /// The receiving home's grant on the entity ended.
    Revoke { entity_id: String, doc: String },
    /// Between devices of one home: a new key of the home or registry document, after a
    /// device revocation (see the revocation service).
    HomeKey(HomeKey),
    /// A device of the sending home was revoked: the record its home's root key signed.
    Revocation { record: ByteBuf },
    /// Between devices of one home: a device-lock message (requests forwarded to the
    /// arbiter, its answers, and changes of its table), CBOR the locks service decodes.
    Lock { bytes: ByteBuf },
    /// Between devices of one home: an event published for devices of the home, CBOR the
    /// events-across-devices service decodes (`propagation/wire.rs`).
    Event { bytes: ByteBuf },
    /// Between devices of one home: a step of a session handoff, CBOR the sessions
    /// service decodes (`sessions/wire.rs`); it may carry a context snapshot.
    Session { bytes: ByteBuf },
    /// Between devices of one home: a group activity's start and its acknowledgement,
    /// CBOR the activities service decodes (`activities/wire.rs`).
    Activity { bytes: ByteBuf },
}

/// The key of the home or registry document at a new epoch, for one device of the home.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HomeKey {
    pub(crate) doc: String,
    pub(crate) epoch: KeyEpoch,
    pub(crate) wrapped: ByteBuf,
}
