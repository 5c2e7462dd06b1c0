//! Presence heartbeats on the ephemeral stream (`/hearth/ephemeral/1`).
//!
//! Every device tells the home's other connected devices, every [`HEARTBEAT_INTERVAL`],
//! that it is alive, and for how long to believe it. Presence derives `offline` from
//! this: a device is live while it is admitted and was heard (a heartbeat, or its
//! admission) within that time. A device whose connection stays up but whose node hangs
//! stops sending heartbeats and goes offline, which connection state alone would miss.
//! Heartbeats are short-lived by nature, so they never touch a document or the store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::{Core, now_ms};

/// How often a device announces itself.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// How long a heartbeat keeps its sender live: three intervals, so one lost or late
/// heartbeat does not flip a device offline.
pub(crate) const HEARTBEAT_TTL_MS: u64 = 3 * HEARTBEAT_INTERVAL.as_millis() as u64;

/// Largest ephemeral message accepted: an alert or clock-lane message in its envelope (a
/// heartbeat takes about twenty bytes).
const MAX_EPHEMERAL_MESSAGE: usize = max(
    crate::alerts::wire::MAX_ALERT_WIRE,
    crate::playback::wire::MAX_CLOCK_WIRE,
) + 64;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// The longest TTL a peer may claim; a larger claim is cut to this.
pub(crate) const MAX_TTL_MS: u64 = 60_000;

/// One ephemeral message. Tagged, so later kinds can share the stream.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Ephemeral {
    /// "I am alive for the next `ttl_ms` milliseconds."
    Heartbeat { ttl_ms: u64 },
    /// A message of the emergency alerts' lane (an alert or an answer to one), CBOR the
    /// alerts service decodes; also from paired homes' devices.
    Alert { bytes: serde_bytes::ByteBuf },
    /// A message of the clock lane (a clock probe or answer, or a synchronised
    /// playback's), CBOR the playback service decodes.
    Clock { bytes: serde_bytes::ByteBuf },
}

/// What an ephemeral frame carries for a service.
pub(crate) enum Lane {
    /// An alert-lane message.
    Alert(Vec<u8>),
    /// A clock-lane message.
    Clock(Vec<u8>),
}

/// Just the tag of an ephemeral message, other fields ignored.
#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}

/// The kinds [`Ephemeral`] knows.
const KNOWN_KINDS: [&str; 3] = ["heartbeat", "alert", "clock"];

/// The kind of a well-formed ephemeral message of a kind this version does not know (a
/// lane a newer device uses): such a message is ignored quietly, not logged as malformed.
/// `None` for anything else.
fn unknown_kind(bytes: &[u8]) -> Option<String> {
    let tagged: KindOnly =
        crate::trust::wire::from_cbor("ephemeral message", bytes, MAX_EPHEMERAL_MESSAGE).ok()?;
    (!KNOWN_KINDS.contains(&tagged.kind.as_str())).then(|| tagged.kind.chars().take(32).collect())
}

fn encode(message: &Ephemeral) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    // Writing a small enum into a Vec cannot fail.
    ciborium::into_writer(message, &mut out).expect("heartbeat encodes");
    out
}

impl Core {
    /// Marks `peer` live until `ttl_ms` from now.
    pub(crate) fn heard_alive(&mut self, peer: &str, ttl_ms: u64) {
        self.peers.alive_for(peer, ttl_ms, now_ms());
    }

    /// Whether `peer` is admitted and was heard within its last TTL.
    pub(crate) fn is_alive(&self, peer: &str) -> bool {
        self.peers.is_alive(peer, now_ms())
    }

    /// Sends a heartbeat to every admitted device of this home. A full ephemeral queue
    /// sheds the heartbeat, which is what it is for: the next one follows.
    pub(crate) async fn send_heartbeats(&mut self) {
        let bytes = hearth_net::Bytes::from(encode(&Ephemeral::Heartbeat {
            ttl_ms: HEARTBEAT_TTL_MS,
        }));
        let peers: Vec<_> = self.peers.admitted.values().copied().collect();
        for peer in peers {
            match self.net.send_ephemeral(peer, bytes.clone()).await {
                Ok(hearth_net::SendOutcome::Queued) => self.metrics.ephemeral(false, bytes.len()),
                Ok(outcome) => tracing::debug!(%peer, ?outcome, "heartbeat not queued"),
                Err(error) => tracing::debug!(%peer, %error, "heartbeat not sent"),
            }
        }
    }

    /// An alert-lane message, in its ephemeral envelope.
    pub(crate) fn ephemeral_alert_frame(&self, bytes: Vec<u8>) -> hearth_net::Bytes {
        hearth_net::Bytes::from(encode(&Ephemeral::Alert {
            bytes: serde_bytes::ByteBuf::from(bytes),
        }))
    }

    /// A clock-lane message, in its ephemeral envelope.
    pub(crate) fn ephemeral_clock_frame(&self, bytes: Vec<u8>) -> hearth_net::Bytes {
        hearth_net::Bytes::from(encode(&Ephemeral::Clock {
            bytes: serde_bytes::ByteBuf::from(bytes),
        }))
    }

    /// An ephemeral frame from an admitted device of this home or of a paired home.
    /// Anything that is not a well-formed message is dropped with a logged reason; an
    /// alert-lane or clock-lane message is handed back for its service. Only this home's
    /// devices send heartbeats.
    pub(crate) fn on_ephemeral(
        &mut self,
        peer: hearth_net::PeerId,
        class: &hearth_net::PeerClass,
        bytes: &[u8],
    ) -> Option<Lane> {
        let text = peer.to_base58();
        #[cfg(feature = "test-hooks")]
        self.capture_raw(&text, "ephemeral", bytes);
        self.metrics.ephemeral(true, bytes.len());
        match crate::trust::wire::from_cbor::<Ephemeral>(
            "ephemeral message",
            bytes,
            MAX_EPHEMERAL_MESSAGE,
        ) {
            Ok(Ephemeral::Heartbeat { ttl_ms }) if *class == hearth_net::PeerClass::Own => {
                self.heard_alive(&text, ttl_ms)
            }
            Ok(Ephemeral::Heartbeat { .. }) => {
                tracing::debug!(peer = %text, "heartbeat from a paired home's device ignored")
            }
            Ok(Ephemeral::Alert { bytes }) => return Some(Lane::Alert(bytes.into_vec())),
            Ok(Ephemeral::Clock { bytes }) => return Some(Lane::Clock(bytes.into_vec())),
            Err(error) => match unknown_kind(bytes) {
                Some(kind) => tracing::debug!(peer = %text, %kind,
                    "ephemeral message of a kind this version does not know ignored"),
                None => {
                    tracing::warn!(peer = %text, %error, len = bytes.len(), "malformed ephemeral message dropped")
                }
            },
        }
        None
    }
}

/// Reads an ephemeral message as [`Core::on_ephemeral`] does, for the fuzz targets: the
/// lane it carries, if any, after the same decoding and unknown-kind check.
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_lane(bytes: &[u8]) -> Option<Lane> {
    match crate::trust::wire::from_cbor::<Ephemeral>(
        "ephemeral message",
        bytes,
        MAX_EPHEMERAL_MESSAGE,
    ) {
        Ok(Ephemeral::Heartbeat { .. }) => None,
        Ok(Ephemeral::Alert { bytes }) => Some(Lane::Alert(bytes.into_vec())),
        Ok(Ephemeral::Clock { bytes }) => Some(Lane::Clock(bytes.into_vec())),
        Err(_) => {
            let _ = unknown_kind(bytes);
            None
        }
    }
}

/// One valid ephemeral message of each kind, for the fuzz targets' seed corpus.
#[cfg(feature = "fuzzing")]
pub(crate) fn seeds_for_fuzzing() -> Vec<(&'static str, Vec<u8>)> {
    use crate::alerts::wire::AlertMessage;
    use crate::playback::wire::ClockMessage;
    let alert = AlertMessage::Alert {
        id: "a1".into(),
        message: "smoke in the hall".into(),
        severity: crate::Severity::Critical,
        ttl_s: 60,
        sent_at_ms: 1_000,
        left_ms: 59_000,
    };
    let ack = AlertMessage::Ack {
        id: "a1".into(),
        accepted: true,
    };
    let probe = ClockMessage::Probe { nonce: 7 };
    let start = ClockMessage::Start {
        id: "p1".into(),
        media: "song.mp3".into(),
        start_at_ms: 2_000,
    };
    let lane = |bytes: Vec<u8>, alert: bool| {
        let bytes = serde_bytes::ByteBuf::from(bytes);
        encode(&if alert {
            Ephemeral::Alert { bytes }
        } else {
            Ephemeral::Clock { bytes }
        })
    };
    let mut out = vec![("heartbeat", encode(&Ephemeral::Heartbeat { ttl_ms: 6000 }))];
    for (name, message) in [("alert", alert), ("alert-ack", ack)] {
        out.push((
            name,
            lane(message.encode().expect("an alert encodes"), true),
        ));
    }
    for (name, message) in [("clock-probe", probe), ("clock-start", start)] {
        out.push((
            name,
            lane(message.encode().expect("a clock message encodes"), false),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn decode(bytes: &[u8]) -> Result<Ephemeral, crate::trust::error::TrustError> {
        crate::trust::wire::from_cbor("ephemeral message", bytes, MAX_EPHEMERAL_MESSAGE)
    }

    #[test]
    pub(crate) fn heartbeats_round_trip_and_garbage_is_refused() {
        let message = Ephemeral::Heartbeat { ttl_ms: 6000 };
        let bytes = encode(&message);
        assert_eq!(decode(&bytes).unwrap(), message);
        let trailing = [&bytes[..], &[0x00]].concat();
        let oversized = [&bytes[..], &[0x00; MAX_EPHEMERAL_MESSAGE][..]].concat();
        for bad in [
            &b""[..],
            &b"\xff\x00"[..],
            &bytes[..bytes.len() - 1],
            &trailing[..],
            &oversized[..],
        ] {
            assert!(decode(bad).is_err());
        }
        let mut unknown = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({"kind": "telepathy", "ttl_ms": 1}),
            &mut unknown,
        )
        .unwrap();
        assert!(decode(&unknown[..]).is_err());
    }

    #[test]
    fn only_a_well_formed_message_of_an_unknown_kind_is_told_apart() {
        let cbor = |value: serde_json::Value| {
            let mut out = Vec::new();
            ciborium::into_writer(&value, &mut out).unwrap();
            out
        };
        assert_eq!(
            unknown_kind(&cbor(
                serde_json::json!({"kind": "telepathy", "bytes": [1]})
            )),
            Some("telepathy".to_string())
        );
        for kind in KNOWN_KINDS {
            // A known kind with bad fields is malformed, not unknown.
            let bad = cbor(serde_json::json!({"kind": kind, "nonsense": 1}));
            assert!(decode(&bad).is_err(), "{kind}");
            assert_eq!(unknown_kind(&bad), None, "{kind}");
        }
        let oversized = cbor(serde_json::json!({"kind": "x".repeat(MAX_EPHEMERAL_MESSAGE)}));
        for bad in [
            &b""[..],
            &b"\xff\x00"[..],
            &cbor(serde_json::json!({"kind": 7}))[..],
            &cbor(serde_json::json!({"no_kind": "x"}))[..],
            &oversized[..],
        ] {
            assert_eq!(unknown_kind(bad), None);
        }
        // Every kind this version sends is one it knows.
        for message in [
            Ephemeral::Heartbeat { ttl_ms: 1 },
            Ephemeral::Alert {
                bytes: serde_bytes::ByteBuf::from(vec![1]),
            },
            Ephemeral::Clock {
                bytes: serde_bytes::ByteBuf::from(vec![1]),
            },
        ] {
            let bytes = encode(&message);
            assert!(decode(&bytes).is_ok());
            let tagged: KindOnly = ciborium::from_reader(&bytes[..]).unwrap();
            assert!(KNOWN_KINDS.contains(&tagged.kind.as_str()));
        }
    }

    #[test]
    pub(crate) fn the_ttl_is_three_intervals() {
        assert_eq!(HEARTBEAT_TTL_MS, 6000);
    }
}
