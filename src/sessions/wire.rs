//! A handoff's messages between devices of one home: CBOR inside
//! `ShareMessage::Session`, capped at [`MAX_SESSION_MESSAGE`], unknown fields refused.
//! Who sent a message is not on the wire: the receiver takes it from the authenticated
//! connection, and each side checks it is the device the handoff names.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::MAX_SESSION_CONTEXT;
use crate::Error;

/// Longest id or name a message carries.
const MAX_FIELD: usize = hearth_crdt::schema::MAX_NAME_BYTES;
/// Largest encoded message: a context at its cap plus the ids and names.
pub(crate) const MAX_SESSION_MESSAGE: usize = MAX_SESSION_CONTEXT + 4 * MAX_FIELD + 256;

// Wrapped in its `ShareMessage`, a message still fits what a device of this home may send.
const _: () = assert!(MAX_SESSION_MESSAGE + 64 <= crate::trust::messages::MAX_OWN_SHARE_MESSAGE);

/// One step of a handoff.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum SessionMessage {
    /// Source to target: take this session (prepared on the source).
    Offer {
        session: String,
        handoff: String,
        user: String,
        persona: Option<String>,
        /// The context snapshot, compact JSON text of an object.
        context: String,
    },
    /// Target to source: taken.
    Accept { session: String, handoff: String },
    /// Target to source: not taken (busy, or the session is not the source's to give).
    Refuse {
        session: String,
        handoff: String,
        reason: String,
    },
    /// Source to target: recorded as completed; the session is the target's.
    Commit { session: String, handoff: String },
    /// Source to target: rolled back; the session stays with the source.
    Abort { session: String, handoff: String },
}

impl SessionMessage {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, Error> {
        crate::trust::wire::to_cbor("session message", self)
            .map_err(|e| Error::Internal(format!("cannot encode a session message: {e}")))
    }

    /// The session and handoff ids it concerns.
    pub(crate) fn ids(&self) -> (&str, &str) {
        match self {
            Self::Offer {
                session, handoff, ..
            }
            | Self::Accept { session, handoff }
            | Self::Refuse {
                session, handoff, ..
            }
            | Self::Commit { session, handoff }
            | Self::Abort { session, handoff } => (session, handoff),
        }
    }

    /// Decodes and checks a message from a peer: size before anything, then shape, then
    /// every field's length; an offer's context comes back parsed.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(Self, Option<Map<String, Value>>), String> {
        let message: Self =
            crate::trust::wire::from_cbor("session message", bytes, MAX_SESSION_MESSAGE)
                .map_err(|e| e.to_string())?;
        let (session, handoff) = message.ids();
        for (what, text) in [("session", session), ("handoff", handoff)] {
            if text.is_empty() || text.len() > MAX_FIELD {
                return Err(format!("{what} id of {} bytes", text.len()));
            }
        }
        let context = match &message {
            Self::Offer {
                user,
                persona,
                context,
                ..
            } => {
                let fields = [Some(user), persona.as_ref()];
                if fields
                    .iter()
                    .flatten()
                    .any(|f| f.is_empty() || f.len() > MAX_FIELD)
                {
                    return Err("user or persona empty or too long".into());
                }
                if context.len() > MAX_SESSION_CONTEXT {
                    return Err(format!("context of {} bytes", context.len()));
                }
                let parsed: Map<String, Value> = serde_json::from_str(context)
                    .map_err(|e| format!("context is not a JSON object: {e}"))?;
                Some(parsed)
            }
            Self::Refuse { reason, .. } if reason.len() > hearth_crdt::schema::MAX_NOTE_BYTES => {
                return Err(format!("reason of {} bytes", reason.len()));
            }
            _ => None,
        };
        Ok((message, context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> SessionMessage {
        SessionMessage::Offer {
            session: "S1".into(),
            handoff: "h1".into(),
            user: "ann".into(),
            persona: Some("chef".into()),
            context: r#"{"page":"recipes"}"#.into(),
        }
    }

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn every_message_round_trips_and_an_offer_brings_its_context() {
        let messages = [
            offer(),
            SessionMessage::Accept {
                session: "S1".into(),
                handoff: "h1".into(),
            },
            SessionMessage::Refuse {
                session: "S1".into(),
                handoff: "h1".into(),
                reason: "busy".into(),
            },
            SessionMessage::Commit {
                session: "S1".into(),
                handoff: "h1".into(),
            },
            SessionMessage::Abort {
                session: "S1".into(),
                handoff: "h1".into(),
            },
        ];
        for m in messages {
            let (back, context) = SessionMessage::decode(&m.encode().unwrap()).unwrap();
            assert_eq!(back, m);
            assert_eq!(context.is_some(), matches!(m, SessionMessage::Offer { .. }));
        }
        let (_, context) = SessionMessage::decode(&offer().encode().unwrap()).unwrap();
        assert_eq!(context.unwrap()["page"], "recipes");
    }

    #[test]
    fn malformed_and_oversized_messages_are_refused() {
        let good = offer().encode().unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("garbage", b"\xff\x00".to_vec()),
            ("truncated", good[..good.len() - 2].to_vec()),
            ("trailing", [&good[..], &[0][..]].concat()),
            ("oversized", vec![0x40; MAX_SESSION_MESSAGE + 1]),
        ];
        let mut with = |what: &'static str, f: fn(&mut SessionMessage)| {
            let mut m = offer();
            f(&mut m);
            cases.push((what, cbor(&m)));
        };
        with("context not an object", |m| {
            if let SessionMessage::Offer { context, .. } = m {
                *context = "[1]".into();
            }
        });
        with("context too big", |m| {
            if let SessionMessage::Offer { context, .. } = m {
                *context = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_SESSION_CONTEXT));
            }
        });
        with("deep context", |m| {
            if let SessionMessage::Offer { context, .. } = m {
                *context = format!("{{\"a\":{}{}}}", "[".repeat(500), "]".repeat(500));
            }
        });
        with("empty user", |m| {
            if let SessionMessage::Offer { user, .. } = m {
                user.clear();
            }
        });
        with("long handoff id", |m| {
            if let SessionMessage::Offer { handoff, .. } = m {
                *handoff = "h".repeat(MAX_FIELD + 1);
            }
        });
        cases.push((
            "unknown field",
            cbor(&serde_json::json!({"Accept": {"session": "S", "handoff": "h", "x": 1}})),
        ));
        cases.push((
            "unknown variant",
            cbor(&serde_json::json!({"Steal": {"session": "S", "handoff": "h"}})),
        ));
        for (what, bytes) in cases {
            assert!(SessionMessage::decode(&bytes).is_err(), "{what} accepted");
        }
    }
}
