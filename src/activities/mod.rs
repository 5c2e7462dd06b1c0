//! Group activities (seed 000's "group activity" mode: trivia, story, sing-along,
//! synchronised playback) across devices of one home. An activity is a document of its
//! own (`DocKind::Activity`), so every device of the home reads it; its scores are
//! Automerge counters, one per device, so increments made on several devices at once all
//! count.
//!
//! The device that starts an activity (its initiator) runs it:
//! - the activity is `starting` and the start goes to every device it names (`wire.rs`);
//!   each of them raises `coordination.group_start` and acknowledges on receipt;
//! - once every named device acknowledged, it is `active`; if one has not within
//!   [`ACK_TIMEOUT`], it ends (`ended`, reason `no_ack`) naming the devices that did not
//!   answer. Only acknowledgements move it to `active`, never a timer;
//! - the initiator pauses, resumes, steps and ends it (`paused`, `active`, `ending`,
//!   `ended` with the final scores); any device of the home may add to a device's score
//!   while it is active.
//!
//! Every change of the document, local or from a peer, is announced on every device that
//! holds it (`activity.*`, and `coordination.group_end` with the final scores).

pub(crate) mod service;
pub(crate) mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;
use crate::types::{DeviceId, Timestamp};
use service::ActivityRequest;

/// The activity types a device may start.
pub const ACTIVITY_TYPES: &[&str] = &["trivia", "story", "sing_along", "sync_playback"];
/// How long the initiator waits for every device to acknowledge the start.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most activities of a home that have not ended; starting another is refused.
pub const MAX_LIVE_ACTIVITIES: usize = 16;
/// Most devices one activity names.
pub const MAX_ACTIVITY_DEVICES: usize = hearth_crdt::schema::activity::MAX_ACTIVITY_DEVICES;
/// Largest config, in bytes of compact JSON.
pub const MAX_ACTIVITY_CONFIG: usize = hearth_crdt::schema::activity::MAX_ACTIVITY_CONFIG_BYTES;
/// Largest score change in one call, either way.
pub const MAX_SCORE_DELTA: i64 = 1_000_000;

/// An activity as every device of the home reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Activity {
    /// Its id (the activity document's id, base58).
    pub id: String,
    /// `trivia`, `story`, `sing_along` or `sync_playback`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pending`, `starting`, `active`, `paused`, `ending` or `ended`.
    pub state: String,
    /// Why it ended: `ended` (asked to) or `no_ack` (a device did not acknowledge).
    pub reason: Option<String>,
    /// The device that started it and runs it (PeerId).
    pub initiator: DeviceId,
    /// The devices taking part, in the order given.
    pub devices: Vec<ActivityDevice>,
    /// Its configuration.
    pub config: Map<String, Value>,
    /// The room it runs in, if any (the room's id).
    pub room_id: Option<String>,
    /// The current step.
    pub step: u64,
    /// Score per device (PeerId).
    pub scores: BTreeMap<String, i64>,
    /// Devices that did not acknowledge the start in time (PeerIds).
    pub missing: Vec<DeviceId>,
    /// Scores as frozen when it ended.
    pub final_scores: Option<BTreeMap<String, i64>>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When every device had acknowledged.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

/// One device of an activity.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivityDevice {
    /// Its PeerId.
    pub device_id: DeviceId,
    /// Its name, when known.
    pub device: Option<String>,
    /// When it acknowledged the start.
    pub acknowledged_at: Option<Timestamp>,
    /// Its score.
    pub score: i64,
}

/// An activity to start from this device.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct NewActivity {
    /// One of [`ACTIVITY_TYPES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The devices taking part: PeerIds or device names (this device may be one).
    pub device_ids: Vec<String>,
    /// Its configuration (a JSON object, at most [`MAX_ACTIVITY_CONFIG`] bytes).
    #[serde(default)]
    pub config: Map<String, Value>,
    /// The room it runs in: a room id or a unique room name.
    #[serde(default)]
    pub room_id: Option<String>,
}

/// What the initiator may do to a running activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityAction {
    /// Hold it.
    Pause,
    /// Carry on after a pause.
    Resume,
    /// Move to the next step.
    Step,
    /// End it and publish the final scores.
    End,
}

/// Group activities; see [`crate::Node::activities`].
#[derive(Clone)]
pub struct Activities {
    pub(crate) core: crate::core::CoreHandle,
}

impl Activities {
    /// Starts an activity run by this device: it is `starting` until every device
    /// acknowledged. `Invalid` for an unknown type, no devices or too many, a config over
    /// [`MAX_ACTIVITY_CONFIG`]; `NotFound` for an unknown device or room; `Conflict` for an
    /// ambiguous device name or past [`MAX_LIVE_ACTIVITIES`].
    ///
    /// Cancel-safe: dropping the future may still start it.
    pub async fn start(&self, new: NewActivity) -> Result<Activity, Error> {
        self.core
            .call(|reply| ActivityRequest::Start { new, reply })
            .await?
    }

    /// An activity by id.
    ///
    /// Cancel-safe.
    pub async fn get(&self, id: &str) -> Result<Activity, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| ActivityRequest::Get { id, reply })
            .await?
    }

    /// Every activity of the home this device holds.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<Activity>, Error> {
        self.core
            .call(|reply| ActivityRequest::List { reply })
            .await?
    }

    /// Pauses, resumes, steps or ends an activity this device runs. `Conflict` on another
    /// device (ask the initiator) or in a state that does not allow it.
    ///
    /// Cancel-safe: dropping the future may still do it.
    pub async fn act(&self, id: &str, action: ActivityAction) -> Result<Activity, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| ActivityRequest::Act { id, action, reply })
            .await?
    }

    /// Adds `delta` to `device`'s score (a PeerId or a device name of the activity), from
    /// any device of the home, while the activity is active.
    ///
    /// Cancel-safe: dropping the future may still add it.
    pub async fn score(&self, id: &str, device: &str, delta: i64) -> Result<Activity, Error> {
        let (id, device) = (id.to_string(), device.to_string());
        self.core
            .call(|reply| ActivityRequest::Score {
                id,
                device,
                delta,
                reply,
            })
            .await?
    }
}
