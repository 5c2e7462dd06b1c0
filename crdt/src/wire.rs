//! Wire types: versioned CBOR envelopes for pushes, sync messages and digests.
//!
//! An envelope is the CBOR array `[version, frame]`. The version is checked
//! from the first two bytes before anything else is parsed, so a frame from a
//! newer build is refused cleanly rather than misread. Payload bytes are opaque
//! here: the engine produces plaintext, the node seals it under the document's
//! key for `epoch` before sending and opens it before handing a frame back.
//!
//! [`decode`] checks the caller's size cap before parsing. The CBOR reader
//! never pre-allocates from a declared length (byte strings grow as they are
//! read from the bounded input), so a hostile length prefix cannot make it
//! allocate more than the input it was given.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::ids::{DOC_ID_LEN, DocId, KeyEpoch};

/// Envelope version written by this build.
pub const WIRE_VERSION: u8 = 1;

/// Default cap on an encoded envelope: 16 MiB of payload plus framing. Large
/// enough for a full-document sync message of a busy entity, small enough
/// that a hostile peer cannot make a node buffer gigabytes (automerge#896).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Longest correlation id carried on a push.
pub const MAX_CORRELATION_ID_LEN: usize = 128;

/// Most bytes an envelope adds around its payload: the version, the frame tag, the
/// document id, the largest key epoch, a correlation id of [`MAX_CORRELATION_ID_LEN`]
/// bytes, the reply flag, the field names and a payload length prefix of up to nine
/// bytes. A worst-case push measures 193 bytes, 197 with the longest prefix (see the test);
/// the rest is headroom.
pub const MAX_ENVELOPE_OVERHEAD: usize = 256;

/// Room kept free in a frame beyond the measured overheads, so a field added to the
/// envelope or the seal later does not silently push a full frame over the cap.
pub const FRAME_SAFETY_MARGIN: usize = 16 * 1024;

/// The largest push or sync payload (plaintext, as the engine produces it) that still
/// fits a frame of `frame_cap` bytes once sealed (`seal_overhead` bytes of nonce, tag
/// and version) and wrapped in an envelope, with [`FRAME_SAFETY_MARGIN`] to spare.
/// Give the engine this as [`crate::EngineConfig::max_sync_message_bytes`] (and no
/// more as `max_push_bytes`), on every node, so nothing it generates is refused by
/// the transport and both sides enforce the same cap.
pub const fn max_payload(frame_cap: usize, seal_overhead: usize) -> usize {
    frame_cap
        .saturating_sub(MAX_ENVELOPE_OVERHEAD)
        .saturating_sub(seal_overhead)
        .saturating_sub(FRAME_SAFETY_MARGIN)
}

/// One frame on a peer's sync stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Live changes (hot path).
    Push(Push),
    /// An Automerge sync-protocol message (catch-up).
    Sync(SyncMessage),
    /// Many-document reconciliation; the digest module owns the payload.
    Digest(DigestFrame),
    /// Sharing between homes: a document key granted to one device of another home, or
    /// the end of a grant. The node owns the payload; the wrapped key inside is sealed to
    /// the receiving device.
    Grant(GrantFrame),
}

/// New changes of one document, pushed to a peer known to be in sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// Document the changes belong to.
    pub doc: DocId,
    /// Key epoch the payload is (to be) sealed under.
    pub epoch: KeyEpoch,
    /// Id of the write that produced the changes, so that events on other
    /// nodes can carry it.
    pub correlation_id: Option<String>,
    /// Concatenated encoded Automerge changes (sealed on the wire).
    pub bytes: Vec<u8>,
}

/// One Automerge sync message for one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncMessage {
    /// Document the session is about.
    pub doc: DocId,
    /// Key epoch the payload is (to be) sealed under.
    pub epoch: KeyEpoch,
    /// The sender waits for an answer. Automerge stays silent towards a peer
    /// whose heads equal its own, which a sender that lost track of the
    /// exchange cannot tell from a lost message; the flag asks for one reply.
    pub expects_reply: bool,
    /// Encoded `automerge::sync::Message` (sealed on the wire).
    pub bytes: Vec<u8>,
}

/// An opaque digest payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestFrame {
    /// Encoded digest message.
    pub bytes: Vec<u8>,
}

/// An opaque sharing payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantFrame {
    /// Encoded grant message.
    pub bytes: Vec<u8>,
}

/// Encodes a frame into an envelope.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let repr = match frame {
        Frame::Push(p) => FrameRepr::Push(PushRepr {
            doc: *p.doc.as_bytes(),
            epoch: EpochRepr::from(&p.epoch),
            correlation_id: p.correlation_id.clone(),
            bytes: Bytes(p.bytes.clone()),
        }),
        Frame::Sync(s) => FrameRepr::Sync(SyncRepr {
            doc: *s.doc.as_bytes(),
            epoch: EpochRepr::from(&s.epoch),
            expects_reply: s.expects_reply,
            bytes: Bytes(s.bytes.clone()),
        }),
        Frame::Digest(d) => FrameRepr::Digest(Bytes(d.bytes.clone())),
        Frame::Grant(g) => FrameRepr::Grant(Bytes(g.bytes.clone())),
    };
    let mut out = Vec::with_capacity(payload_len(frame) + 96);
    // Writing into a Vec cannot fail, and every field is plain data.
    if ciborium::into_writer(&(WIRE_VERSION, repr), &mut out).is_err() {
        out.clear();
    }
    out
}

fn payload_len(frame: &Frame) -> usize {
    match frame {
        Frame::Push(p) => p.bytes.len(),
        Frame::Sync(s) => s.bytes.len(),
        Frame::Digest(d) => d.bytes.len(),
        Frame::Grant(g) => g.bytes.len(),
    }
}

/// Decodes an envelope of at most `max_len` bytes.
pub fn decode(input: &[u8], max_len: usize) -> Result<Frame> {
    if input.len() > max_len {
        return Err(Error::TooLarge {
            what: "wire frame",
            len: input.len(),
            cap: max_len,
        });
    }
    // 0x82 is a two-element CBOR array; versions below 24 are one byte.
    match input {
        [0x82, v, ..] if *v < 24 => {
            if *v != WIRE_VERSION {
                return Err(Error::WireVersion {
                    found: *v,
                    supported: WIRE_VERSION,
                });
            }
        }
        _ => return Err(Error::Wire("not a versioned envelope".into())),
    }
    let mut rest = input;
    let (_, repr): (u8, FrameRepr) =
        ciborium::from_reader(&mut rest).map_err(|e| Error::Wire(e.to_string()))?;
    // One frame has one encoding: bytes after the envelope are refused, not ignored.
    if !rest.is_empty() {
        return Err(Error::Wire(format!(
            "{} unexpected bytes after the frame",
            rest.len()
        )));
    }
    Ok(match repr {
        FrameRepr::Push(p) => {
            if let Some(c) = &p.correlation_id
                && c.len() > MAX_CORRELATION_ID_LEN
            {
                return Err(Error::Wire(format!(
                    "correlation id of {} bytes exceeds {MAX_CORRELATION_ID_LEN}",
                    c.len()
                )));
            }
            Frame::Push(Push {
                doc: DocId::from_bytes(p.doc),
                epoch: p.epoch.into(),
                correlation_id: p.correlation_id,
                bytes: p.bytes.0,
            })
        }
        FrameRepr::Sync(s) => Frame::Sync(SyncMessage {
            doc: DocId::from_bytes(s.doc),
            epoch: s.epoch.into(),
            expects_reply: s.expects_reply,
            bytes: s.bytes.0,
        }),
        FrameRepr::Digest(b) => Frame::Digest(DigestFrame { bytes: b.0 }),
        FrameRepr::Grant(b) => Frame::Grant(GrantFrame { bytes: b.0 }),
    })
}

// Private serde shapes: short keys and CBOR byte strings keep a one-field push
// small, and the public types stay free of serde attributes.

#[derive(Serialize, Deserialize)]
enum FrameRepr {
    #[serde(rename = "p")]
    Push(PushRepr),
    #[serde(rename = "s")]
    Sync(SyncRepr),
    #[serde(rename = "d")]
    Digest(Bytes),
    #[serde(rename = "g")]
    Grant(Bytes),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRepr {
    #[serde(rename = "d", with = "doc_bytes")]
    doc: [u8; DOC_ID_LEN],
    #[serde(rename = "e")]
    epoch: EpochRepr,
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(rename = "b")]
    bytes: Bytes,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncRepr {
    #[serde(rename = "d", with = "doc_bytes")]
    doc: [u8; DOC_ID_LEN],
    #[serde(rename = "e")]
    epoch: EpochRepr,
    #[serde(rename = "r", default, skip_serializing_if = "is_false")]
    expects_reply: bool,
    #[serde(rename = "b")]
    bytes: Bytes,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize)]
struct EpochRepr(u64, #[serde(with = "doc_bytes")] [u8; 16]);

impl From<&KeyEpoch> for EpochRepr {
    fn from(e: &KeyEpoch) -> Self {
        Self(e.counter, e.device)
    }
}

impl From<EpochRepr> for KeyEpoch {
    fn from(e: EpochRepr) -> Self {
        KeyEpoch {
            counter: e.0,
            device: e.1,
        }
    }
}

/// A byte string that serialises as a CBOR byte string rather than an array
/// of integers.
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(
                self,
                v: Vec<u8>,
            ) -> std::result::Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Fixed 16-byte arrays as CBOR byte strings.
mod doc_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let b = super::Bytes::deserialize(d)?;
        <[u8; 16]>::try_from(b.0.as_slice())
            .map_err(|_| serde::de::Error::invalid_length(b.0.len(), &"16 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push() -> Frame {
        Frame::Push(Push {
            doc: DocId::from_bytes([1; 16]),
            epoch: KeyEpoch {
                counter: 2,
                device: [3; 16],
            },
            correlation_id: Some("req-42".into()),
            bytes: vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
        })
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let sync = Frame::Sync(SyncMessage {
            doc: DocId::from_bytes([9; 16]),
            epoch: KeyEpoch::default(),
            expects_reply: true,
            bytes: vec![0x42; 300],
        });
        let digest = Frame::Digest(DigestFrame { bytes: vec![7; 5] });
        let bare_push = Frame::Push(Push {
            correlation_id: None,
            ..match push() {
                Frame::Push(p) => p,
                _ => unreachable!(),
            }
        });
        for f in [push(), bare_push, sync, digest] {
            let bytes = encode(&f);
            assert_eq!(decode(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap(), f);
        }
    }

    #[test]
    fn trailing_bytes_after_a_frame_are_refused() {
        let bytes = encode(&push());
        let trailing = [&bytes[..], &[0x00]].concat();
        assert!(matches!(
            decode(&trailing, DEFAULT_MAX_FRAME_BYTES),
            Err(Error::Wire(_))
        ));
        let twice = [&bytes[..], &bytes[..]].concat();
        assert!(decode(&twice, DEFAULT_MAX_FRAME_BYTES).is_err());
    }

    #[test]
    fn envelope_overhead_is_small() {
        let bytes = encode(&push());
        // 7 payload bytes + 6 correlation bytes; the rest is framing.
        assert!(bytes.len() < 13 + 60, "{} bytes", bytes.len());
    }

    #[test]
    fn a_worst_case_envelope_stays_within_the_overhead() {
        // Every field at its largest, and a payload long enough for the five-byte
        // length prefix; nine-byte prefixes only start at 4 GiB.
        let payload = vec![0xab; 70_000];
        let epoch = KeyEpoch {
            counter: u64::MAX,
            device: [0xff; 16],
        };
        let worst_push = Frame::Push(Push {
            doc: DocId::from_bytes([0xff; 16]),
            epoch,
            correlation_id: Some("\u{7f}".repeat(MAX_CORRELATION_ID_LEN)),
            bytes: payload.clone(),
        });
        let worst_sync = Frame::Sync(SyncMessage {
            doc: DocId::from_bytes([0xff; 16]),
            epoch,
            expects_reply: true,
            bytes: payload.clone(),
        });
        for frame in [worst_push, worst_sync] {
            let overhead = encode(&frame).len() - payload.len();
            // Prefixes above four bytes are only for payloads past 4 GiB, which the
            // length check refuses long before; count them anyway.
            assert!(
                overhead + 4 <= MAX_ENVELOPE_OVERHEAD,
                "{overhead} bytes of envelope"
            );
        }
        let cap = max_payload(4 << 20, 41);
        assert_eq!(
            cap,
            (4 << 20) - MAX_ENVELOPE_OVERHEAD - 41 - FRAME_SAFETY_MARGIN
        );
        assert_eq!(max_payload(100, 41), 0, "a tiny frame saturates at zero");
    }

    #[test]
    fn oversized_frames_are_refused_before_parsing() {
        let bytes = encode(&push());
        let err = decode(&bytes, bytes.len() - 1).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }));
    }

    #[test]
    fn other_versions_are_refused_by_number() {
        let mut bytes = encode(&push());
        bytes[1] = 2;
        assert!(matches!(
            decode(&bytes, usize::MAX),
            Err(Error::WireVersion {
                found: 2,
                supported: 1
            })
        ));
    }

    #[test]
    fn truncations_and_long_correlation_ids_are_errors() {
        let bytes = encode(&push());
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], usize::MAX).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let long = Frame::Push(Push {
            correlation_id: Some("x".repeat(MAX_CORRELATION_ID_LEN + 1)),
            ..match push() {
                Frame::Push(p) => p,
                _ => unreachable!(),
            }
        });
        assert!(matches!(
            decode(&encode(&long), usize::MAX),
            Err(Error::Wire(_))
        ));
    }

    #[test]
    fn a_huge_declared_length_does_not_allocate_it() {
        // [1, {"d": <bytes of length 2^62>}]: the reader must fail on the short
        // input, not try to reserve 4 EiB.
        let mut bytes = vec![0x82, 0x01, 0xa1, 0x61, b'd', 0x5b];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert!(decode(&bytes, 1024).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 4096);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_prefix_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = vec![0x82, 0x01];
            bytes.extend(tail);
            let _ = decode(&bytes, 4096);
        }

        #[test]
        fn mutated_envelopes_never_panic(at in 0usize..64, byte in any::<u8>()) {
            let mut bytes = encode(&push());
            let i = at % bytes.len();
            bytes[i] = byte;
            let _ = decode(&bytes, 4096);
        }
    }
}
