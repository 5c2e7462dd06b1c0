//! An event as it travels between devices of one home: CBOR inside
//! `ShareMessage::Event`, capped at [`MAX_EVENT_MESSAGE`], unknown fields refused. The
//! source is not on the wire: the receiver takes it from the authenticated connection.
//! The payload travels as JSON text, so its nesting is bounded by serde_json's own
//! recursion limit when it is read.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{MAX_EVENT_PAYLOAD, MAX_EVENT_TARGETS, MAX_EVENT_TYPE_LEN};
use crate::Error;

/// Largest encoded event message: the payload cap plus room for the type, the targets
/// (PeerIds are about 52 bytes) and the correlation id.
pub(crate) const MAX_EVENT_MESSAGE: usize =
    MAX_EVENT_PAYLOAD + MAX_EVENT_TYPE_LEN + MAX_EVENT_TARGETS * 64 + 1024;

// An event message wrapped in its `ShareMessage` still fits what a device of this home may
// send.
const _: () = assert!(MAX_EVENT_MESSAGE + 64 <= crate::trust::messages::MAX_OWN_SHARE_MESSAGE);

/// One event on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventMessage {
    pub(crate) event_type: String,
    pub(crate) targets: Vec<String>,
    /// The payload as compact JSON text (an object).
    pub(crate) payload: String,
    /// Unix ms by the source's clock.
    pub(crate) timestamp_ms: u64,
    pub(crate) correlation_id: Option<String>,
}

impl EventMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::trust::wire::to_cbor("event message", self)
            .map_err(|e| Error::Internal(format!("cannot encode an event: {e}")))
    }

    /// Decodes and checks a message from a peer: size before anything, then shape, type,
    /// targets, payload and correlation id. The payload comes back parsed.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, Map<String, Value>), String> {
        let message: Self =
            crate::trust::wire::from_cbor("event message", bytes, MAX_EVENT_MESSAGE)
                .map_err(|e| e.to_string())?;
        super::check_type(&message.event_type).map_err(|e| e.to_string())?;
        if message.targets.len() > MAX_EVENT_TARGETS {
            return Err(format!("{} targets", message.targets.len()));
        }
        if message.payload.len() > MAX_EVENT_PAYLOAD {
            return Err(format!("payload of {} bytes", message.payload.len()));
        }
        let payload: Map<String, Value> = serde_json::from_str(&message.payload)
            .map_err(|e| format!("payload is not a JSON object: {e}"))?;
        super::check_correlation_id(message.correlation_id.as_deref())
            .map_err(|e| e.to_string())?;
        Ok((message, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> EventMessage {
        EventMessage {
            event_type: "coordination.broadcast".into(),
            targets: vec!["12D3KooWtarget".into()],
            payload: r#"{"say":"hi"}"#.into(),
            timestamp_ms: 1_767_323_045_000,
            correlation_id: Some("req-1".into()),
        }
    }

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn a_message_round_trips_with_its_payload_parsed() {
        let bytes = message().encode().unwrap();
        let (back, payload) = EventMessage::decode(&bytes).unwrap();
        assert_eq!(back, message());
        assert_eq!(payload["say"], "hi");
    }

    #[test]
    fn malformed_oversized_and_reserved_messages_are_refused() {
        let good = message().encode().unwrap();
        let trailing = [&good[..], &[0u8][..]].concat();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\xff\x00\x13".to_vec()),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("trailing bytes", trailing),
            ("oversized", vec![0x40; MAX_EVENT_MESSAGE + 1]),
        ];
        let mut with = |what: &'static str, f: fn(&mut EventMessage)| {
            let mut m = message();
            f(&mut m);
            cases.push((what, cbor(&m)));
        };
        with("reserved type", |m| m.event_type = "entity.changed".into());
        with("bad type", |m| m.event_type = "no dots".into());
        with("payload not an object", |m| m.payload = "[1,2]".into());
        with("payload not JSON", |m| m.payload = "{".into());
        with("deep payload", |m| {
            m.payload = format!("{{\"a\":{}{}}}", "[".repeat(500), "]".repeat(500))
        });
        with("long correlation id", |m| {
            m.correlation_id = Some("c".repeat(200))
        });
        with("too many targets", |m| {
            m.targets = vec!["p".into(); MAX_EVENT_TARGETS + 1]
        });
        with("big payload", |m| {
            m.payload = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_EVENT_PAYLOAD))
        });
        let unknown = cbor(&serde_json::json!({
            "event_type": "a.b", "targets": [], "payload": "{}", "timestamp_ms": 1,
            "correlation_id": null, "extra": 1
        }));
        cases.push(("unknown field", unknown));
        for (what, bytes) in cases {
            assert!(EventMessage::decode(&bytes).is_err(), "{what} accepted");
        }
    }
}
