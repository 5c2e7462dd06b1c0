//! The clock lane of the ephemeral stream (`peers/heartbeat.rs`): clock probes and their
//! answers, and the messages of a synchronised playback, as CBOR capped at
//! [`MAX_CLOCK_WIRE`], unknown fields refused. Only devices of one home use it. Times are
//! µs (probes) or ms (schedules) since the Unix epoch by the clock of the device that
//! wrote them.

use serde::{Deserialize, Serialize};

use super::MAX_MEDIA;
use crate::Error;

/// Largest encoded clock-lane message: a media name plus room for the id and numbers.
pub(crate) const MAX_CLOCK_WIRE: usize = MAX_MEDIA + 256;

/// One message of the clock lane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ClockMessage {
    /// "What time is it?", sent at the sender's `t1`, which it keeps to itself.
    Probe { nonce: u64 },
    /// The answer: the probe arrived at `t2_us` and this answer left at `t3_us`.
    Answer { nonce: u64, t2_us: i64, t3_us: i64 },
    /// A playback for the receiving device, to start at `start_at_ms` by the sender's
    /// clock.
    Start {
        id: String,
        media: String,
        start_at_ms: u64,
    },
    /// The receiving device's answer to a start: its local start time, and the offset
    /// and uncertainty (µs) it used.
    Scheduled {
        id: String,
        local_start_ms: u64,
        offset_us: i64,
        uncertainty_us: u64,
    },
}

impl ClockMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::trust::wire::to_cbor("clock message", self)
            .map_err(|e| Error::Internal(format!("cannot encode a clock message: {e}")))
    }

    /// Decodes and checks a message from a peer: size first, then shape, id and media.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let message: Self = crate::trust::wire::from_cbor("clock message", bytes, MAX_CLOCK_WIRE)
            .map_err(|e| e.to_string())?;
        match &message {
            Self::Start { id, media, .. } => {
                super::check_id(id)?;
                super::check_media(media)?;
            }
            Self::Scheduled { id, .. } => super::check_id(id)?,
            Self::Probe { .. } | Self::Answer { .. } => {}
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn messages_round_trip_and_a_full_one_fits_the_cap() {
        let full = ClockMessage::Start {
            id: "5Kq9wXyzAbCdEfGhJk5Kq9wXyzAbCdEf".into(),
            media: "é".repeat(MAX_MEDIA / 2),
            start_at_ms: u64::MAX,
        };
        for m in [
            ClockMessage::Probe { nonce: u64::MAX },
            ClockMessage::Answer {
                nonce: 7,
                t2_us: i64::MIN,
                t3_us: i64::MAX,
            },
            full,
            ClockMessage::Scheduled {
                id: "5Kq9wXyzAbCdEfGhJk".into(),
                local_start_ms: 1_767_323_045_000,
                offset_us: -3_000_123,
                uncertainty_us: u64::MAX,
            },
        ] {
            assert_eq!(ClockMessage::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn malformed_and_out_of_range_messages_are_refused() {
        let good = ClockMessage::Probe { nonce: 1 }.encode().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\xff\x00\x13".to_vec()),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing", [&good[..], &[0u8][..]].concat()),
            ("oversized", vec![0x40; MAX_CLOCK_WIRE + 1]),
            (
                "unknown kind",
                cbor(&serde_json::json!({"kind": "rewind", "nonce": 1})),
            ),
            (
                "unknown field",
                cbor(&serde_json::json!({"kind": "probe", "nonce": 1, "t1_us": 5})),
            ),
            (
                "bad id",
                cbor(
                    &serde_json::json!({"kind": "start", "id": "../x", "media": "m",
                                         "start_at_ms": 1}),
                ),
            ),
            (
                "blank media",
                cbor(
                    &serde_json::json!({"kind": "start", "id": "5Kq9wXyzAbCdEfGhJk",
                                         "media": " ", "start_at_ms": 1}),
                ),
            ),
            (
                "negative start",
                cbor(
                    &serde_json::json!({"kind": "start", "id": "5Kq9wXyzAbCdEfGhJk",
                                         "media": "m", "start_at_ms": -1}),
                ),
            ),
        ];
        for (what, bytes) in cases {
            assert!(ClockMessage::decode(&bytes).is_err(), "{what} accepted");
        }
    }
}
