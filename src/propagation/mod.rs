//! Events across devices (seed 000's "event propagation"): a device publishes an event for
//! every device of its home, or for a few named ones, and each of them delivers it to its
//! own subscribers ([`crate::Node::events`], the bus, `/api/ws`) with its correlation id.
//!
//! The event is the seed's: `{type, source_device_id, target_device_ids, payload,
//! timestamp, correlation_id}`; an empty target list means every device of the home. A
//! targeted event goes to its targets only, so no other device ever holds its payload.
//! Between devices it travels as a grant frame on the sync stream (`wire.rs`), which only
//! admitted devices of this home may send; the receiver checks its size, shape and rate
//! (`limit.rs`) before anything else and drops what fails, with a log line.
//!
//! Delivery is at most once and to connected devices only: a target that is not connected
//! is named in the answer ([`PublishReport::not_connected`]) and never receives the event.
//! Emergency alerts, which must reach devices that were away, have an outbox of their own.

pub(crate) mod limit;
pub(crate) mod service;
pub(crate) mod wire;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;
use crate::types::{DeviceId, Timestamp};
use service::PropagationRequest;

/// Largest payload an event may carry, as compact JSON.
pub const MAX_EVENT_PAYLOAD: usize = 32 * 1024;
/// Most devices one event may name as targets.
pub const MAX_EVENT_TARGETS: usize = 64;
/// Longest event type (`<area>.<action>`).
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Event areas and names the node itself announces from its own state. A device may not
/// publish them: a forged `entity.changed` or `peer.connected` would lie to every
/// subscriber of the home.
const RESERVED_AREAS: &[&str] = &[
    "entity", "room", "presence", "share", "peer", "conflict", "lock", "events", "error",
];
/// Seed 000's device names, which are aliases of the node's own events.
const RESERVED_NAMES: &[&str] = &["device.connect", "device.disconnect", "device.state_change"];

/// An event published for devices of the home, as seed 000 shapes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceEvent {
    /// Its name, `<area>.<action>`, e.g. `coordination.broadcast`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The device that published it (its PeerId), as the receiver authenticated it.
    pub source_device_id: DeviceId,
    /// The devices it is for (PeerIds); empty means every device of the home.
    pub target_device_ids: Vec<DeviceId>,
    /// What it says.
    pub payload: Map<String, Value>,
    /// When its source published it, by the source's clock.
    pub timestamp: Timestamp,
    /// The id the publisher gave it, kept on every device it reaches.
    pub correlation_id: Option<String>,
}

/// What to publish: see [`crate::Events::publish`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    /// Its name, `<area>.<action>`, e.g. `coordination.broadcast`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Target devices, each a PeerId or a device name; empty means every device.
    #[serde(default)]
    pub target_device_ids: Vec<String>,
    /// What it says (a JSON object, at most [`MAX_EVENT_PAYLOAD`] bytes).
    pub payload: Map<String, Value>,
    /// An id to find the event by on every device it reaches.
    #[serde(default)]
    pub correlation_id: Option<String>,
}

impl Publish {
    /// An event of type `event_type` for every device, with an empty payload.
    pub fn new(event_type: impl Into<String>) -> Self {
        Self {
            event_type: event_type.into(),
            ..Self::default()
        }
    }

    /// Sends it only to these devices (PeerIds or device names); this device may be one.
    pub fn to<S: Into<String>>(mut self, devices: impl IntoIterator<Item = S>) -> Self {
        self.target_device_ids = devices.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: Map<String, Value>) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// What publishing did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PublishReport {
    /// The event as every device receives it.
    #[serde(flatten)]
    pub event: DeviceEvent,
    /// Whether this device delivered it to its own subscribers (it is a target).
    pub delivered_here: bool,
    /// Other devices it was sent to.
    pub sent_to: Vec<DeviceId>,
    /// Targets that are not connected now; they do not receive it.
    pub not_connected: Vec<DeviceId>,
}

impl crate::Events {
    /// Publishes an event for devices of the home: every device (this one included) when
    /// it names no targets, else only the named ones. Each delivers it to its own
    /// subscribers as [`crate::Event::Device`], and its bus as an event named after its
    /// type. Refused (`Invalid`) for a malformed or reserved type, a payload over
    /// [`MAX_EVENT_PAYLOAD`], too many targets or a long correlation id; `NotFound` for a
    /// target that is no device of the home, `Conflict` for an ambiguous device name.
    ///
    /// Cancel-safe: dropping the future may still publish the event.
    pub async fn publish(&self, event: Publish) -> Result<PublishReport, Error> {
        self.core
            .call(|reply| PropagationRequest::Publish { event, reply })
            .await?
    }

    /// Counters of events between devices, since start.
    pub async fn counters(&self) -> Result<PropagationCounters, Error> {
        self.core
            .call(|reply| PropagationRequest::Counters { reply })
            .await?
    }
}

/// Events between devices, counted since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PropagationCounters {
    /// Events published on this device.
    pub published: u64,
    /// Copies sent to other devices.
    pub sent: u64,
    /// Events received from other devices and delivered here.
    pub received: u64,
    /// Received events dropped: malformed, too large, not for this device, or reserved.
    pub dropped_malformed: u64,
    /// Received events dropped because their sender went over its rate.
    pub dropped_rate: u64,
}

/// Checks an event type: `<area>.<action>` (two or more dotted segments of lowercase
/// letters, digits, `_` and `-`), not one of the node's own names.
pub(crate) fn check_type(name: &str) -> Result<(), Error> {
    if name.len() > MAX_EVENT_TYPE_LEN {
        return Err(Error::Invalid(format!(
            "event type is {} bytes; at most {MAX_EVENT_TYPE_LEN} are allowed",
            name.len()
        )));
    }
    let segments: Vec<&str> = name.split('.').collect();
    let well_formed = segments.len() >= 2
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        });
    if !well_formed {
        return Err(Error::Invalid(format!(
            "invalid event type {:?}: use `<area>.<action>` in lowercase letters, digits, `_` \
             and `-`, e.g. `coordination.broadcast`",
            name.chars().take(64).collect::<String>()
        )));
    }
    if RESERVED_AREAS.contains(&segments[0]) || RESERVED_NAMES.contains(&name) {
        return Err(Error::Invalid(format!(
            "{name} is an event the node announces itself; publish under another area \
             (e.g. `coordination.*`, `emergency.*`, `session.*`)"
        )));
    }
    Ok(())
}

/// Checks a payload's size as compact JSON.
pub(crate) fn check_payload(payload: &Map<String, Value>) -> Result<String, Error> {
    let text = serde_json::to_string(payload)
        .map_err(|e| Error::Invalid(format!("payload does not encode: {e}")))?;
    if text.len() > MAX_EVENT_PAYLOAD {
        return Err(Error::Invalid(format!(
            "payload is {} bytes as JSON; at most {MAX_EVENT_PAYLOAD} are allowed",
            text.len()
        )));
    }
    Ok(text)
}

/// Checks a correlation id's length.
pub(crate) fn check_correlation_id(id: Option<&str>) -> Result<(), Error> {
    match id {
        Some(c) if c.len() > crate::bus::MAX_CORRELATION_ID_LEN => Err(Error::Invalid(format!(
            "correlation id is {} bytes; at most {} are allowed",
            c.len(),
            crate::bus::MAX_CORRELATION_ID_LEN
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_dotted_lowercase_names_outside_the_reserved_areas() {
        for good in [
            "coordination.broadcast",
            "emergency.alert",
            "session.handoff",
            "device.ping",
            "a.b.c-d_2",
        ] {
            assert!(check_type(good).is_ok(), "{good} refused");
        }
        for bad in [
            "",
            "broadcast",
            "a..b",
            "Coordination.broadcast",
            "a.b c",
            "a.*",
            "a.\u{0}",
            "entity.changed",
            "peer.connected",
            "error.occurred",
            "device.connect",
            "device.state_change",
            "events.missed",
        ] {
            assert!(check_type(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_type(&format!("a.{}", "b".repeat(MAX_EVENT_TYPE_LEN))).is_err());
    }

    #[test]
    fn payloads_and_correlation_ids_are_capped() {
        let mut payload = Map::new();
        payload.insert("k".into(), Value::String("x".repeat(MAX_EVENT_PAYLOAD)));
        assert!(check_payload(&payload).is_err());
        payload.insert("k".into(), Value::String("x".repeat(100)));
        assert!(check_payload(&payload).unwrap().len() < 200);
        assert!(check_correlation_id(Some(&"c".repeat(129))).is_err());
        assert!(check_correlation_id(Some("req-1")).is_ok());
        assert!(check_correlation_id(None).is_ok());
    }

    #[test]
    fn the_seed_shape_round_trips_through_json() {
        let event = DeviceEvent {
            event_type: "coordination.broadcast".into(),
            source_device_id: "12D3Koo".into(),
            target_device_ids: vec![],
            payload: serde_json::json!({"m": 1}).as_object().unwrap().clone(),
            timestamp: Timestamp::from_unix_ms(1_767_323_045_500),
            correlation_id: Some("c1".into()),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "coordination.broadcast");
        assert_eq!(json["timestamp"], "2026-01-02T03:04:05.5Z");
        assert_eq!(json["target_device_ids"], serde_json::json!([]));
        let back: DeviceEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }
}
