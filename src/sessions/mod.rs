//! User sessions and their handoff between devices (seed 000's "handoff" mode): a
//! session is `{id, user, device, device_id, persona, context}`, one document of the home
//! (`DocKind::Session`), so every device of the home reads it. `device_id` is the PeerId
//! of the device the session is active on, `device` its name.
//!
//! A handoff moves the session, with its context snapshot, to another device in three
//! steps over the home's own connections (`wire.rs`):
//! 1. **prepare** on the source (the device the session is active on): the handoff is
//!    recorded as pending in the document, so no second one starts, and an offer with the
//!    context goes to the target;
//! 2. **accept** on the target: it takes the snapshot and answers;
//! 3. **acknowledge**: the source records the handoff completed (the session is now
//!    active on the target) and confirms it to the target.
//!
//! When the target does not accept within [`HANDOFF_TIMEOUT`] (it is down, hung, or
//! refused), the source rolls back: the handoff is recorded `rolled_back` and the session
//! stays where it was. Both devices raise `session.handoff` events (`started`, then
//! `completed` or `rolled_back`).

pub(crate) mod service;
pub(crate) mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;
use crate::types::{DeviceId, Timestamp};
use service::SessionRequest;

/// How long the source waits for the target to accept before rolling back.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest context snapshot, in bytes of compact JSON. It travels whole in the offer to
/// the target, so it is kept under what a device may send in one message.
pub const MAX_SESSION_CONTEXT: usize = 32 * 1024;
/// Most session documents a home holds; starting another is refused (`Conflict`).
pub const MAX_SESSIONS: usize = 1024;
/// Most handoffs in progress on one device, as source and as target each.
pub const MAX_PENDING_HANDOFFS: usize = 16;

/// A session as every device of the home reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Session {
    /// Its id (the session document's id, base58).
    pub id: String,
    /// The user it belongs to.
    pub user: String,
    /// The name of the device it is active on (`None` when this device does not know it).
    pub device: Option<String>,
    /// The PeerId of the device it is active on.
    pub device_id: DeviceId,
    /// The persona it runs with.
    pub persona: Option<String>,
    /// The context snapshot that moves with it.
    pub context: Map<String, Value>,
    /// When the context was last saved.
    pub context_at: Timestamp,
    /// Its handoffs, oldest first (the last [`hearth_crdt::schema::session::MAX_HANDOFF_HISTORY`]).
    pub handoffs: Vec<Handoff>,
}

/// One handoff of a session.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Handoff {
    /// Its id.
    pub id: String,
    /// The device it left (PeerId).
    pub from: DeviceId,
    /// The device it went, or was to go, to (PeerId).
    pub to: DeviceId,
    /// The target's name, when known.
    pub to_device: Option<String>,
    /// When the source prepared it.
    pub started_at: Timestamp,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
    /// `pending`, `completed` or `rolled_back`.
    pub outcome: String,
}

/// A session to start on this device.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct NewSession {
    /// The user it belongs to.
    pub user: String,
    /// The persona it runs with.
    #[serde(default)]
    pub persona: Option<String>,
    /// Its first context snapshot (a JSON object, at most [`MAX_SESSION_CONTEXT`] bytes).
    #[serde(default)]
    pub context: Map<String, Value>,
}

/// What a handoff came to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HandoffReport {
    /// The session afterwards.
    pub session: Session,
    /// The handoff, `completed` or `rolled_back`.
    pub handoff: Handoff,
    /// Why it rolled back (`timeout`, or the target's refusal).
    pub reason: Option<String>,
}

impl HandoffReport {
    /// Whether the session moved.
    pub fn completed(&self) -> bool {
        self.handoff.outcome == "completed"
    }
}

/// Sessions and handoffs; see [`crate::Node::sessions`].
#[derive(Clone)]
pub struct Sessions {
    pub(crate) core: crate::core::CoreHandle,
}

impl Sessions {
    /// Starts a session on this device. Refused (`Invalid`) for an empty or long user or
    /// persona, or a context over [`MAX_SESSION_CONTEXT`]; `Conflict` past
    /// [`MAX_SESSIONS`].
    ///
    /// Cancel-safe: dropping the future may still start the session.
    pub async fn start(&self, new: NewSession) -> Result<Session, Error> {
        self.core
            .call(|reply| SessionRequest::Start { new, reply })
            .await?
    }

    /// A session by id.
    ///
    /// Cancel-safe.
    pub async fn get(&self, id: &str) -> Result<Session, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| SessionRequest::Get { id, reply })
            .await?
    }

    /// Every session of the home this device holds.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<Session>, Error> {
        self.core
            .call(|reply| SessionRequest::List { reply })
            .await?
    }

    /// Replaces the context snapshot of a session active on this device. `Conflict` when
    /// it is active elsewhere or a handoff is under way.
    ///
    /// Cancel-safe: dropping the future may still save it.
    pub async fn set_context(
        &self,
        id: &str,
        context: Map<String, Value>,
    ) -> Result<Session, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| SessionRequest::SetContext { id, context, reply })
            .await?
    }

    /// Hands a session active on this device over to `to_device` (a PeerId or a device
    /// name), and waits until the target accepted it (`completed`) or
    /// [`HANDOFF_TIMEOUT`] passed (`rolled_back`; the session stays here). `Conflict`
    /// when the session is active on another device (hand it over from there), already
    /// on the target, or being handed over; `NotFound` for an unknown session or device.
    ///
    /// Cancel-safe: dropping the future does not stop the handoff.
    pub async fn handoff(&self, id: &str, to_device: &str) -> Result<HandoffReport, Error> {
        let id = id.to_string();
        let to = to_device.to_string();
        self.core
            .call(|reply| SessionRequest::Handoff { id, to, reply })
            .await?
    }
}
