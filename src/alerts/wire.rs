//! Alerts as they travel between devices: CBOR inside the ephemeral stream's `alert`
//! message (`peers/heartbeat.rs`), capped at [`MAX_ALERT_WIRE`], unknown fields refused.
//!
//! The ephemeral stream is the priority lane: each admitted peer has it beside the sync
//! stream, as its own libp2p stream with its own outbound queue, so an alert never waits
//! behind queued pushes, sync messages or digests, however many a catch-up queued. The
//! source is not on the wire: the receiver takes it from the authenticated connection,
//! and an acknowledgement counts only for the receipt of the device that sent it.

use serde::{Deserialize, Serialize};

use super::{MAX_ALERT_MESSAGE, Severity};
use crate::Error;

/// Largest encoded alert message: the message cap plus room for the id and numbers.
pub(crate) const MAX_ALERT_WIRE: usize = MAX_ALERT_MESSAGE + 512;

/// One message of the alert lane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum AlertMessage {
    /// An alert for the receiving device.
    Alert {
        id: String,
        message: String,
        severity: Severity,
        ttl_s: u64,
        /// Unix ms by the sender's clock.
        sent_at_ms: u64,
        /// Ms of its TTL left when this copy was sent; the receiver counts from arrival.
        left_ms: u64,
    },
    /// The receiving device's answer to an alert: taken (`accepted`), or declined by a
    /// home that has not opted in to the sender's.
    Ack { id: String, accepted: bool },
}

impl AlertMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::trust::wire::to_cbor("alert message", self)
            .map_err(|e| Error::Internal(format!("cannot encode an alert message: {e}")))
    }

    /// Decodes and checks a message from a peer: size before anything, then shape, id,
    /// message, TTL and time left.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let message: Self = crate::trust::wire::from_cbor("alert message", bytes, MAX_ALERT_WIRE)
            .map_err(|e| e.to_string())?;
        match &message {
            Self::Alert {
                id,
                message: text,
                ttl_s,
                left_ms,
                ..
            } => {
                super::check_id(id)?;
                super::check_message(text)?;
                super::check_ttl(*ttl_s)?;
                if *left_ms > ttl_s.saturating_mul(1000) {
                    return Err(format!("{left_ms} ms left of a {ttl_s} s TTL"));
                }
            }
            Self::Ack { id, .. } => super::check_id(id)?,
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> AlertMessage {
        AlertMessage::Alert {
            id: "5Kq9wXyzAbCdEfGhJk".into(),
            message: "smoke in the kitchen".into(),
            severity: Severity::Critical,
            ttl_s: 60,
            sent_at_ms: 1_767_323_045_000,
            left_ms: 59_000,
        }
    }

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn alerts_and_acks_round_trip() {
        for m in [
            alert(),
            AlertMessage::Ack {
                id: "5Kq9wXyzAbCdEfGhJk".into(),
                accepted: false,
            },
        ] {
            assert_eq!(AlertMessage::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn malformed_oversized_and_out_of_range_messages_are_refused() {
        let good = alert().encode().unwrap();
        let trailing = [&good[..], &[0u8][..]].concat();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\xff\x00\x13".to_vec()),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("trailing bytes", trailing),
            ("oversized", vec![0x40; MAX_ALERT_WIRE + 1]),
        ];
        let mut with = |what: &'static str, f: fn(&mut AlertMessage)| {
            let mut m = alert();
            f(&mut m);
            cases.push((what, cbor(&m)));
        };
        with("bad id", |m| {
            if let AlertMessage::Alert { id, .. } = m {
                *id = "../../etc".into()
            }
        });
        with("blank message", |m| {
            if let AlertMessage::Alert { message, .. } = m {
                *message = " ".into()
            }
        });
        with("long message", |m| {
            if let AlertMessage::Alert { message, .. } = m {
                *message = "x".repeat(MAX_ALERT_MESSAGE + 1)
            }
        });
        with("zero ttl", |m| {
            if let AlertMessage::Alert { ttl_s, .. } = m {
                *ttl_s = 0
            }
        });
        with("more left than the ttl", |m| {
            if let AlertMessage::Alert { left_ms, .. } = m {
                *left_ms = 61_000
            }
        });
        cases.push((
            "unknown field",
            cbor(
                &serde_json::json!({"kind": "ack", "id": "5Kq9wXyzAbCdEfGhJk",
                                     "accepted": true, "extra": 1}),
            ),
        ));
        cases.push((
            "unknown kind",
            cbor(&serde_json::json!({"kind": "siren", "id": "5Kq9wXyzAbCdEfGhJk"})),
        ));
        cases.push((
            "unknown severity",
            cbor(
                &serde_json::json!({"kind": "alert", "id": "5Kq9wXyzAbCdEfGhJk",
                "message": "m", "severity": "apocalyptic", "ttl_s": 5, "sent_at_ms": 1,
                "left_ms": 1}),
            ),
        ));
        for (what, bytes) in cases {
            assert!(AlertMessage::decode(&bytes).is_err(), "{what} accepted");
        }
    }
}
