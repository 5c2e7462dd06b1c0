//! An activity's start and its acknowledgement between devices of one home: CBOR inside
//! `ShareMessage::Activity`, capped at [`MAX_ACTIVITY_MESSAGE`], unknown fields refused.
//! The sender is not on the wire: the receiver takes it from the authenticated connection.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ACTIVITY_TYPES, MAX_ACTIVITY_CONFIG, MAX_ACTIVITY_DEVICES};
use crate::Error;

/// Longest id or device a message names.
const MAX_FIELD: usize = hearth_crdt::schema::MAX_NAME_BYTES;
/// Largest encoded message: a config at its cap, every device, and the rest.
pub(crate) const MAX_ACTIVITY_MESSAGE: usize =
    MAX_ACTIVITY_CONFIG + MAX_ACTIVITY_DEVICES * (MAX_FIELD + 4) + 512;

// Wrapped in its `ShareMessage`, a message still fits what a device of this home may send.
const _: () = assert!(MAX_ACTIVITY_MESSAGE + 64 <= crate::trust::messages::MAX_OWN_SHARE_MESSAGE);

/// One message of the start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum ActivityMessage {
    /// Initiator to each device: the activity starts, with you.
    Start {
        activity: String,
        kind: String,
        devices: Vec<String>,
        /// Compact JSON text of an object.
        config: String,
    },
    /// Device to initiator: received.
    Ack { activity: String },
}

impl ActivityMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::trust::wire::to_cbor("activity message", self)
            .map_err(|e| Error::Internal(format!("cannot encode an activity message: {e}")))
    }

    /// Decodes and checks a message from a peer: size first, then shape, type, devices
    /// and config; a start's config comes back parsed.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, Map<String, Value>), String> {
        let message: Self =
            crate::trust::wire::from_cbor("activity message", bytes, MAX_ACTIVITY_MESSAGE)
                .map_err(|e| e.to_string())?;
        let bad = |s: &str| s.is_empty() || s.len() > MAX_FIELD;
        match &message {
            Self::Ack { activity } if bad(activity) => Err("activity id".into()),
            Self::Ack { .. } => Ok((message, Map::new())),
            Self::Start {
                activity,
                kind,
                devices,
                config,
            } => {
                if bad(activity) {
                    return Err("activity id".into());
                }
                if !ACTIVITY_TYPES.contains(&kind.as_str()) {
                    return Err(format!(
                        "unknown type {:?}",
                        kind.chars().take(32).collect::<String>()
                    ));
                }
                if devices.is_empty()
                    || devices.len() > MAX_ACTIVITY_DEVICES
                    || devices.iter().any(|d| bad(d))
                {
                    return Err(format!("{} devices, or a bad one", devices.len()));
                }
                if config.len() > MAX_ACTIVITY_CONFIG {
                    return Err(format!("config of {} bytes", config.len()));
                }
                let parsed: Map<String, Value> = serde_json::from_str(config)
                    .map_err(|e| format!("config is not a JSON object: {e}"))?;
                Ok((message, parsed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> ActivityMessage {
        ActivityMessage::Start {
            activity: "A1".into(),
            kind: "trivia".into(),
            devices: vec!["p1".into(), "p2".into()],
            config: r#"{"rounds":10}"#.into(),
        }
    }

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn messages_round_trip_and_a_start_brings_its_config() {
        let (back, config) = ActivityMessage::decode(&start().encode().unwrap()).unwrap();
        assert_eq!(back, start());
        assert_eq!(config["rounds"], 10);
        let ack = ActivityMessage::Ack {
            activity: "A1".into(),
        };
        assert_eq!(
            ActivityMessage::decode(&ack.encode().unwrap()).unwrap().0,
            ack
        );
    }

    #[test]
    fn malformed_and_oversized_messages_are_refused() {
        let good = start().encode().unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\xff\x00".to_vec()),
            ("trailing", [&good[..], &[0][..]].concat()),
            ("oversized", vec![0x40; MAX_ACTIVITY_MESSAGE + 1]),
            (
                "unknown field",
                cbor(&serde_json::json!({"Ack": {"activity": "A", "x": 1}})),
            ),
            (
                "empty id",
                cbor(&serde_json::json!({"Ack": {"activity": ""}})),
            ),
        ];
        let mut with = |what: &'static str, f: fn(&mut ActivityMessage)| {
            let mut m = start();
            f(&mut m);
            cases.push((what, cbor(&m)));
        };
        with("unknown type", |m| {
            if let ActivityMessage::Start { kind, .. } = m {
                *kind = "poker".into();
            }
        });
        with("no devices", |m| {
            if let ActivityMessage::Start { devices, .. } = m {
                devices.clear();
            }
        });
        with("too many devices", |m| {
            if let ActivityMessage::Start { devices, .. } = m {
                *devices = vec!["d".into(); MAX_ACTIVITY_DEVICES + 1];
            }
        });
        with("config not an object", |m| {
            if let ActivityMessage::Start { config, .. } = m {
                *config = "3".into();
            }
        });
        with("config too big", |m| {
            if let ActivityMessage::Start { config, .. } = m {
                *config = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_ACTIVITY_CONFIG));
            }
        });
        for (what, bytes) in cases {
            assert!(ActivityMessage::decode(&bytes).is_err(), "{what} accepted");
        }
    }
}
