//! Wire types: versioned CBOR envelopes for pushes, sync messages and digests.
//!
//! An envelope is the CBOR array `[version, frame]`. The version is checked
//! from the first two bytes before anything else is parsed, so a frame from a
//! newer build is refused cleanly rather than misread. Payload bytes are opaque
//! here: the engine produces plaintext, the node seals it under the document's
//! key for `epoch` before sending and opens it before handing a frame back.
//!
//! The frame is a positional array led by its kind, so a one-field push spends
//! its bytes on the change rather than on field names:
//!
//! | kind | array |
//! | --- | --- |
//! | push | `[0, doc, epoch, payload]`, or `[0, doc, epoch, payload, correlation id]` |
//! | sync | `[1, doc, epoch, payload]`, or `[1, doc, epoch, payload, true]` when it expects a reply |
//! | digest | `[2, payload]` |
//! | grant | `[3, payload]` |
//!
//! `doc` is the 16-byte id, `epoch` one byte string: the first
//! [`EPOCH_WIRE_PREFIX`] bytes of the epoch's device, then its counter big-endian
//! without leading zero bytes. A decoded
//! frame's epoch holds only that much (see [`KeyEpoch::matches_wire`]); the node
//! finds the whole epoch among the document's keys, and the seal, whose associated
//! data binds the whole epoch, opens only under the right one.
//!
//! [`decode`] checks the caller's size cap before parsing. The CBOR reader
//! never pre-allocates from a declared length (byte strings grow as they are
//! read from the bounded input), so a hostile length prefix cannot make it
//! allocate more than the input it was given.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::ids::{DOC_ID_LEN, DocId, EPOCH_WIRE_PREFIX, KeyEpoch};

/// Envelope version written by this build. Version 1 (field names, whole epochs) is
/// refused by number: every device of a home runs the same envelope.
pub const WIRE_VERSION: u8 = 2;

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
    /// Key epoch the payload is (to be) sealed under. As decoded, only its wire form
    /// ([`KeyEpoch::wire_form`]) is known.
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
    /// Key epoch the payload is (to be) sealed under. As decoded, only its wire form
    /// ([`KeyEpoch::wire_form`]) is known.
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
    let mut out = Vec::with_capacity(payload_len(frame) + 64);
    // Writing into a Vec cannot fail, and every field is plain data.
    if ciborium::into_writer(&(WIRE_VERSION, FrameOut(frame)), &mut out).is_err() {
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
    let (_, repr): (u8, FrameIn) =
        ciborium::from_reader(&mut rest).map_err(|e| Error::Wire(e.to_string()))?;
    // One frame has one encoding: bytes after the envelope are refused, not ignored.
    if !rest.is_empty() {
        return Err(Error::Wire(format!(
            "{} unexpected bytes after the frame",
            rest.len()
        )));
    }
    Ok(repr.0)
}

// Private serde shapes: positional arrays and CBOR byte strings keep a one-field push
// small, and the public types stay free of serde attributes.

const KIND_PUSH: u8 = 0;
const KIND_SYNC: u8 = 1;
const KIND_DIGEST: u8 = 2;
const KIND_GRANT: u8 = 3;

/// A frame being written.
struct FrameOut<'a>(&'a Frame);

/// Bytes written as a CBOR byte string.
struct ByteRef<'a>(&'a [u8]);

impl Serialize for ByteRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// An epoch as one byte string: the device prefix, then the counter big-endian without
/// leading zero bytes (one byte for 0).
struct EpochOut<'a>(&'a KeyEpoch);

impl Serialize for EpochOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let be = self.0.counter.to_be_bytes();
        let zeros = be
            .iter()
            .take(be.len() - 1)
            .take_while(|b| **b == 0)
            .count();
        let mut out = [0u8; EPOCH_WIRE_PREFIX + 8];
        out[..EPOCH_WIRE_PREFIX].copy_from_slice(&self.0.device[..EPOCH_WIRE_PREFIX]);
        let len = EPOCH_WIRE_PREFIX + be.len() - zeros;
        out[EPOCH_WIRE_PREFIX..len].copy_from_slice(&be[zeros..]);
        s.serialize_bytes(&out[..len])
    }
}

impl Serialize for FrameOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        match self.0 {
            Frame::Push(p) => {
                let mut t = s.serialize_tuple(4 + usize::from(p.correlation_id.is_some()))?;
                t.serialize_element(&KIND_PUSH)?;
                t.serialize_element(&ByteRef(p.doc.as_bytes()))?;
                t.serialize_element(&EpochOut(&p.epoch))?;
                t.serialize_element(&ByteRef(&p.bytes))?;
                if let Some(c) = &p.correlation_id {
                    t.serialize_element(c)?;
                }
                t.end()
            }
            Frame::Sync(m) => {
                let mut t = s.serialize_tuple(4 + usize::from(m.expects_reply))?;
                t.serialize_element(&KIND_SYNC)?;
                t.serialize_element(&ByteRef(m.doc.as_bytes()))?;
                t.serialize_element(&EpochOut(&m.epoch))?;
                t.serialize_element(&ByteRef(&m.bytes))?;
                if m.expects_reply {
                    t.serialize_element(&true)?;
                }
                t.end()
            }
            Frame::Digest(d) => (KIND_DIGEST, ByteRef(&d.bytes)).serialize(s),
            Frame::Grant(g) => (KIND_GRANT, ByteRef(&g.bytes)).serialize(s),
        }
    }
}

/// A frame being read.
struct FrameIn(Frame);

impl<'de> Deserialize<'de> for FrameIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FrameIn;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a frame: an array led by its kind")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<FrameIn, A::Error> {
                use serde::de::Error as _;
                let kind: u8 = need(&mut seq, "kind")?;
                let frame = match kind {
                    KIND_PUSH | KIND_SYNC => {
                        let doc = DocId::from_bytes(need::<DocBytes, _>(&mut seq, "doc")?.0);
                        let epoch = need::<EpochIn, _>(&mut seq, "epoch")?.0;
                        let bytes = need::<Bytes, _>(&mut seq, "payload")?.0;
                        if kind == KIND_PUSH {
                            // Absent, or a string: never null, so a push has one encoding.
                            let correlation_id = seq.next_element::<String>()?;
                            if let Some(c) = &correlation_id
                                && c.len() > MAX_CORRELATION_ID_LEN
                            {
                                return Err(A::Error::custom(format!(
                                    "correlation id of {} bytes exceeds {MAX_CORRELATION_ID_LEN}",
                                    c.len()
                                )));
                            }
                            Frame::Push(Push {
                                doc,
                                epoch,
                                correlation_id,
                                bytes,
                            })
                        } else {
                            // Present only when true: one frame, one encoding.
                            let expects_reply = match seq.next_element::<bool>()? {
                                None => false,
                                Some(true) => true,
                                Some(false) => {
                                    return Err(A::Error::custom("a reply flag written as false"));
                                }
                            };
                            Frame::Sync(SyncMessage {
                                doc,
                                epoch,
                                expects_reply,
                                bytes,
                            })
                        }
                    }
                    KIND_DIGEST => Frame::Digest(DigestFrame {
                        bytes: need::<Bytes, _>(&mut seq, "payload")?.0,
                    }),
                    KIND_GRANT => Frame::Grant(GrantFrame {
                        bytes: need::<Bytes, _>(&mut seq, "payload")?.0,
                    }),
                    other => return Err(A::Error::custom(format!("unknown frame kind {other}"))),
                };
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::custom("more fields than the frame kind has"));
                }
                Ok(FrameIn(frame))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The next element of a frame's array, which must be there.
fn need<'de, T: Deserialize<'de>, A: serde::de::SeqAccess<'de>>(
    seq: &mut A,
    what: &'static str,
) -> std::result::Result<T, A::Error> {
    seq.next_element()?
        .ok_or_else(|| serde::de::Error::custom(format!("a frame without its {what}")))
}

/// A 16-byte id as a CBOR byte string.
struct DocBytes([u8; DOC_ID_LEN]);

impl<'de> Deserialize<'de> for DocBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let b = Bytes::deserialize(d)?;
        <[u8; DOC_ID_LEN]>::try_from(b.0.as_slice())
            .map(DocBytes)
            .map_err(|_| serde::de::Error::invalid_length(b.0.len(), &"16 bytes"))
    }
}

/// An epoch's byte string (see [`EpochOut`]), read into its wire form.
struct EpochIn(KeyEpoch);

impl<'de> Deserialize<'de> for EpochIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes = Bytes::deserialize(d)?.0;
        let (prefix, counter) = match bytes.len() {
            n if (EPOCH_WIRE_PREFIX + 1..=EPOCH_WIRE_PREFIX + 8).contains(&n) => {
                bytes.split_at(EPOCH_WIRE_PREFIX)
            }
            n => {
                return Err(serde::de::Error::invalid_length(
                    n,
                    &"an epoch of 5 to 12 bytes: a 4-byte device prefix and its counter",
                ));
            }
        };
        // One epoch, one encoding: no leading zero bytes in the counter.
        if counter.len() > 1 && counter[0] == 0 {
            return Err(serde::de::Error::custom(
                "an epoch counter with a leading zero byte",
            ));
        }
        let mut device = [0; 16];
        device[..EPOCH_WIRE_PREFIX].copy_from_slice(prefix);
        let counter = counter.iter().fold(0u64, |n, b| n << 8 | u64::from(*b));
        Ok(EpochIn(KeyEpoch { counter, device }))
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
        let grant = Frame::Grant(GrantFrame { bytes: vec![1; 3] });
        let no_reply = Frame::Sync(SyncMessage {
            expects_reply: false,
            ..match &sync {
                Frame::Sync(m) => m.clone(),
                _ => unreachable!(),
            }
        });
        for f in [push(), bare_push, sync, no_reply, digest, grant] {
            let bytes = encode(&f);
            // The epoch comes back in its wire form; everything else as it was.
            let mut expected = f.clone();
            if let Frame::Push(Push { epoch, .. }) | Frame::Sync(SyncMessage { epoch, .. }) =
                &mut expected
            {
                *epoch = epoch.wire_form();
            }
            assert_eq!(decode(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap(), expected);
        }
    }

    #[test]
    fn every_epoch_counter_round_trips() {
        for counter in [0, 1, 255, 256, 65_535, 1 << 40, u64::MAX] {
            let f = Frame::Sync(SyncMessage {
                doc: DocId::from_bytes([1; 16]),
                epoch: KeyEpoch {
                    counter,
                    device: [0xee; 16],
                },
                expects_reply: false,
                bytes: vec![1],
            });
            let Frame::Sync(m) = decode(&encode(&f), usize::MAX).unwrap() else {
                panic!("not a sync message");
            };
            assert_eq!(m.epoch.counter, counter);
        }
    }

    #[test]
    fn a_decoded_epoch_names_the_whole_one_by_counter_and_prefix() {
        let whole = KeyEpoch {
            counter: 2,
            device: [3; 16],
        };
        let Frame::Push(p) = decode(&encode(&push()), usize::MAX).unwrap() else {
            panic!("not a push");
        };
        assert!(whole.matches_wire(&p.epoch));
        assert_eq!(p.epoch.device[..EPOCH_WIRE_PREFIX], [3; EPOCH_WIRE_PREFIX]);
        let mut other = whole;
        other.device[0] = 4;
        assert!(!other.matches_wire(&p.epoch));
        other = whole;
        other.counter = 3;
        assert!(!other.matches_wire(&p.epoch));
        // Bytes past the prefix do not take part: the seal tells such epochs apart.
        other = whole;
        other.device[15] = 0;
        assert!(other.matches_wire(&p.epoch));
    }

    #[test]
    fn fields_a_kind_does_not_have_are_refused() {
        // A sync message's reply flag is written only when true.
        let mut false_flag = vec![0x82, WIRE_VERSION, 0x85, KIND_SYNC, 0x50];
        false_flag.extend([9; 16]);
        false_flag.extend([0x45, 0, 0, 0, 0, 0, 0x41, 7, 0xf4]);
        assert!(decode(&false_flag, usize::MAX).is_err());
        let mut extra = encode(&Frame::Digest(DigestFrame { bytes: vec![1] }));
        extra[2] = 0x83;
        extra.push(0x00);
        assert!(decode(&extra, usize::MAX).is_err());
        let mut null_id = encode(&Frame::Push(Push {
            correlation_id: None,
            ..match push() {
                Frame::Push(p) => p,
                _ => unreachable!(),
            }
        }));
        null_id[2] = 0x85;
        null_id.push(0xf6);
        assert!(decode(&null_id, usize::MAX).is_err());
        let unknown = [0x82, WIRE_VERSION, 0x82, 9, 0x41, 1];
        assert!(decode(&unknown, usize::MAX).is_err());
        let short_prefix = {
            let mut b = vec![0x82, WIRE_VERSION, 0x84, KIND_PUSH, 0x50];
            b.extend([9; 16]);
            b.extend([0x44, 0, 0, 0, 0, 0x41, 7]);
            b
        };
        assert!(decode(&short_prefix, usize::MAX).is_err());
        let padded_counter = {
            let mut b = vec![0x82, WIRE_VERSION, 0x84, KIND_PUSH, 0x50];
            b.extend([9; 16]);
            b.extend([0x46, 0, 0, 0, 0, 0, 1, 0x41, 7]);
            b
        };
        assert!(decode(&padded_counter, usize::MAX).is_err());
        let fine = {
            let mut b = vec![0x82, WIRE_VERSION, 0x84, KIND_PUSH, 0x50];
            b.extend([9; 16]);
            b.extend([0x46, 1, 2, 3, 4, 1, 0, 0x41, 7]);
            b
        };
        let Ok(Frame::Push(p)) = decode(&fine, usize::MAX) else {
            panic!("a well-formed push was refused");
        };
        assert_eq!(
            (p.epoch.counter, &p.epoch.device[..4]),
            (256, &[1, 2, 3, 4][..])
        );
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
        // 7 payload bytes + 6 correlation bytes; the rest is framing: version, kind,
        // the 16-byte id, the epoch's counter and prefix, and the length prefixes.
        assert!(bytes.len() <= 13 + 32, "{} bytes", bytes.len());
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
        bytes[1] = 1;
        assert!(matches!(
            decode(&bytes, usize::MAX),
            Err(Error::WireVersion {
                found: 1,
                supported: 2
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
        // [2, [0, <bytes of length 2^62>]]: the reader must fail on the short
        // input, not try to reserve 4 EiB.
        let mut bytes = vec![0x82, WIRE_VERSION, 0x84, 0x00, 0x5b];
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
            let mut bytes = vec![0x82, WIRE_VERSION];
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
