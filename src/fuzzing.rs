//! Entry points for the fuzz targets under `fuzz/` (feature `fuzzing`, never in a
//! release build).
//!
//! Each function takes arbitrary bytes and runs the crate's own decoders on them, followed
//! by the checks the node runs next (certificate verification against a fixed root key,
//! invite parsing at a fixed time, the pairing exchange against a fixed invite book). They
//! return nothing and must never panic: a panic is a bug in the decoder, since every one
//! of these inputs can come from a peer, a damaged store or an API client.
//!
//! [`seeds`] writes small valid inputs for each of them, built with the crate's encoders.
//!
//! | function | decoders |
//! | --- | --- |
//! | [`invite`] | invite codes: decode, parse at a fixed time, re-encode |
//! | [`certificate`] | device certificates, revocations and arbiter namings, verified against a fixed root |
//! | [`pairing`] | pairing messages through both sides of the SPAKE2 exchange, and the sealed joiner info, grant, join package and home record |
//! | [`peer_frame`] | ephemeral messages (heartbeats, alerts, clock probes) and grant frames (grants, home keys, revocations, locks, events, sessions, activities), nested payloads included |
//! | [`store_record`] | records read back from the store |
//! | [`api_request`] | API request bodies (through the API's extractor), WebSocket client frames, seed 001 frames |

use ed25519_dalek::SigningKey;
use hearth_crdt::{DocId, KeyEpoch};
use hearth_net::{DeviceIdentity, PeerId};
use serde_bytes::ByteBuf;

use crate::alerts::wire::AlertMessage;
use crate::trust::cert::{ArbiterNaming, DeviceCert, Revocation};
use crate::trust::invite::{InviteBook, InviteCode, InviteKind, InviteSecret, Issuer};
use crate::trust::keys::WrappedKey;
use crate::trust::messages::{MAX_OWN_SHARE_MESSAGE, ShareMessage};
use crate::trust::pake::{self, IssuerHandshake, Joiner, JoinerInfo, MAX_GRANT_LEN};
use crate::trust::wire::{from_cbor, to_cbor};

/// The fixed clock of every target, Unix seconds.
const NOW_S: u64 = 1_763_790_000;
/// The fixed secret of the invite the pairing target's issuer holds.
const SECRET: [u8; 32] = [0x5e; 32];

/// The root key of the home every target trusts.
fn root() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn root_public() -> [u8; 32] {
    root().verifying_key().to_bytes()
}

/// A fixed device identity: the libp2p protobuf encoding of an Ed25519 keypair.
fn identity(n: u8) -> DeviceIdentity {
    let key = SigningKey::from_bytes(&[n; 32]);
    let mut bytes = vec![0x08, 0x01, 0x12, 0x40];
    bytes.extend_from_slice(&key.to_bytes());
    bytes.extend_from_slice(&key.verifying_key().to_bytes());
    DeviceIdentity::from_bytes(&bytes).expect("a fixed ed25519 keypair decodes")
}

fn issuer_peer() -> PeerId {
    identity(1).to_peer_id()
}

fn joiner_peer() -> PeerId {
    identity(2).to_peer_id()
}

fn issuer() -> Issuer {
    Issuer {
        peer_id: issuer_peer(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        home_id: crate::home::home_id_for(&root_public()),
    }
}

/// Splits `data` into a two-byte big-endian length-prefixed first part and the rest.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (data, &[]);
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    rest.split_at(len)
}

/// Joins two messages the way [`split`] reads them.
fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let len = u16::try_from(first.len()).expect("seed messages are small");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(body);
    out
}

/// Invite codes, as pasted by a person: decoded, parsed at a fixed time; a code that
/// decodes must encode to text that decodes to the same code.
pub fn invite(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(code) = InviteCode::decode(&text) {
        let again = InviteCode::decode(&code.encode()).expect("a re-encoded invite decodes");
        assert!(again == code, "an invite changed in a round trip");
        let _ = code.is_expired(NOW_S);
    }
    let _ = InviteCode::parse(&text, NOW_S);
}

/// Certificates as a hello, a home document or a grant carries them, and the revocations
/// and arbiter namings of the home document, verified against the fixed root key.
pub fn certificate(data: &[u8]) {
    let root = root_public();
    let _ = DeviceCert::verify_bytes(data, &root);
    if let Ok(cert) = DeviceCert::decode(data) {
        let _ = cert.verify(&root);
    }
    let _ = Revocation::verify_bytes(data, &root);
    let _ = Revocation::claimed_home(data);
    let _ = ArbiterNaming::verify_bytes(data, &root);
}

/// The pairing exchange. The first byte picks what the rest is:
/// - 0: the issuer's side: a Start, then (length-prefixed split) a Confirm, against a
///   book holding the fixed invite, from the fixed joiner;
/// - 1: the joiner's side: a Reply to a Start of the fixed invite, then a Grant;
/// - 2..=5: the payloads sealed inside the exchange: joiner info, grant, join package,
///   home record.
pub fn pairing(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let _ = pake::PairMessage::decode(body);
    match mode % 6 {
        0 => {
            let mut book = InviteBook::default();
            let Ok(_) = book.issue(InviteKind::Device, &issuer(), 600, NOW_S, SECRET) else {
                return;
            };
            let (start, confirm) = split(body);
            let Ok((handshake, _reply)) = IssuerHandshake::receive_start(
                &mut book,
                &issuer_peer(),
                &joiner_peer(),
                start,
                NOW_S,
            ) else {
                return;
            };
            if let Ok(verified) = handshake.receive_confirm(&mut book, confirm) {
                let _ = verified.info();
            }
        }
        1 => {
            let Ok(code) = InviteCode::new(
                InviteKind::Device,
                &issuer(),
                NOW_S + 600,
                InviteSecret::from_bytes(SECRET),
            ) else {
                return;
            };
            let info = JoinerInfo {
                x25519_public: [4; 32],
                device_name: "hall speaker".into(),
                extra: ByteBuf::new(),
            };
            let Ok((joiner, _start)) = Joiner::start(&code, &joiner_peer(), info, NOW_S) else {
                return;
            };
            let (reply, grant) = split(body);
            if let Ok((awaiting, _confirm)) = joiner.receive_reply(reply) {
                let _ = awaiting.receive_grant(grant);
            }
        }
        2 => {
            let _ = from_cbor::<JoinerInfo>("joiner info", body, pake::MAX_PAIR_MESSAGE_LEN);
        }
        3 => {
            let _ = from_cbor::<pake::Grant>("pairing grant", body, MAX_GRANT_LEN);
        }
        4 => {
            let _ = from_cbor::<crate::pairing::service::JoinPackage>(
                "join package",
                body,
                MAX_GRANT_LEN,
            );
        }
        _ => {
            let _ = from_cbor::<crate::sharing::service::HomePublic>(
                "home record",
                body,
                crate::sharing::service::MAX_HOME_RECORD,
            );
        }
    }
}

/// Frames of the ephemeral stream (first byte even) or of the grant stream (odd), as a
/// peer sends them; the payload each carries goes to the decoder of its lane.
pub fn peer_frame(data: &[u8]) {
    let Some((&lane, body)) = data.split_first() else {
        return;
    };
    if lane % 2 == 0 {
        match crate::peers::heartbeat::decode_lane(body) {
            Some(crate::peers::heartbeat::Lane::Alert(bytes)) => {
                let _ = AlertMessage::decode(&bytes);
            }
            Some(crate::peers::heartbeat::Lane::Clock(bytes)) => {
                let _ = crate::playback::wire::ClockMessage::decode(&bytes);
            }
            None => {}
        }
        return;
    }
    let Ok(message) = from_cbor::<ShareMessage>("grant message", body, MAX_OWN_SHARE_MESSAGE)
    else {
        return;
    };
    match message {
        ShareMessage::Grant {
            doc,
            wrapped,
            rights,
            ..
        } => {
            let _ = DocId::parse(&doc);
            let _ = WrappedKey::from_bytes(&wrapped);
            let _ = rights.parse::<crate::types::Rights>();
        }
        ShareMessage::Revoke { doc, .. } => {
            let _ = DocId::parse(&doc);
        }
        ShareMessage::HomeKey(key) => {
            let _ = DocId::parse(&key.doc);
            let _ = WrappedKey::from_bytes(&key.wrapped);
        }
        ShareMessage::Revocation { record } => {
            let _ = Revocation::claimed_home(&record);
            let _ = Revocation::verify_bytes(&record, &root_public());
        }
        ShareMessage::Lock { bytes } => {
            let _ = from_cbor::<crate::locks::forward::LockMessage>(
                "lock message",
                &bytes,
                crate::trust::messages::MAX_SHARE_MESSAGE,
            );
        }
        ShareMessage::Event { bytes } => {
            let _ = crate::propagation::wire::EventMessage::decode(&bytes);
        }
        ShareMessage::Session { bytes } => {
            let _ = crate::sessions::wire::SessionMessage::decode(&bytes);
        }
        ShareMessage::Activity { bytes } => {
            let _ = crate::activities::wire::ActivityMessage::decode(&bytes);
        }
    }
}

/// Records read back from the store; the first byte picks which.
pub fn store_record(data: &[u8]) {
    use crate::records::from_json;
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => {
            let _ = crate::home::HomeRecord::decode(body);
        }
        1 => {
            let _ = crate::revocation::set::Revocations::decode(body);
        }
        2 => {
            let _ = from_json::<Vec<String>>("static peers", body);
        }
        3 => {
            let _ = from_json::<crate::AlertRecord>("alert", body);
        }
        4 => crate::core::resident::decode_meta(body),
        5 => {
            let _ = from_json::<Vec<crate::core::quarantine::Quarantined>>("quarantine list", body);
        }
        6 => {
            let _ = from_json::<crate::locks::arbiter::Arbiter>("lock table", body);
        }
        7 => {
            let _ = from_json::<crate::locks::handoff::Role>("lock role", body);
        }
        8 => {
            let _ = from_json::<Vec<(String, crate::sharing::service::SharedIn)>>(
                "shared entities",
                body,
            );
        }
        9 => crate::audit::decode_entry(body),
        10 => {
            let _ = DeviceCert::decode(body);
        }
        _ => {
            let _ = crate::records::parse_keyring_key(body);
        }
    }
}

/// What API clients send: the first byte picks a request body type (read through the
/// API's own extractor), a WebSocket client frame, or a seed 001 frame.
#[cfg(feature = "api")]
pub fn api_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    crate::api::fuzzing::decode(kind, body);
}

/// A seed record, encoded as the store encodes it.
fn json<T: serde::Serialize>(what: &'static str, record: &T) -> Vec<u8> {
    crate::records::to_json(what, record).expect("a seed record encodes")
}

/// Small valid inputs for each target, as (target, name, bytes), built with the crate's
/// own encoders.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_string(), bytes));
    };
    let root = root();
    let device = identity(3).peer_id();

    // Invites: a device invite and a home invite of the fixed issuer.
    for (name, kind) in [("device", InviteKind::Device), ("home", InviteKind::Home)] {
        let code = InviteCode::new(
            kind,
            &issuer(),
            NOW_S + 600,
            InviteSecret::from_bytes(SECRET),
        )
        .expect("a fixed invite is valid");
        add("invite", name, code.encode().into_bytes());
    }

    // Certificates, a revocation and an arbiter naming, signed by the fixed root.
    let cert = DeviceCert::issue(&root, &device, [9; 32], "hall speaker", 1_000, false)
        .and_then(|c| c.encode())
        .expect("a fixed certificate encodes");
    add("certificate", "device-cert", cert.clone());
    let admin = DeviceCert::issue(&root, &device, [9; 32], "admin", 2_000, true)
        .and_then(|c| c.encode())
        .expect("a fixed certificate encodes");
    add("certificate", "admin-cert", admin);
    let revocation = Revocation::issue(&root, &device, 3_000)
        .and_then(|r| r.encode())
        .expect("a fixed revocation encodes");
    add("certificate", "revocation", revocation.clone());
    let naming = ArbiterNaming::issue(&root, &device, 4, 5_000)
        .and_then(|n| n.encode())
        .expect("a fixed naming encodes");
    add("certificate", "arbiter-naming", naming);

    // Pairing: the joiner's Start of the fixed invite and its Confirm, for the issuer; a
    // Reply and a Grant for the joiner, from a real exchange with the issuer.
    let code = InviteCode::new(
        InviteKind::Device,
        &issuer(),
        NOW_S + 600,
        InviteSecret::from_bytes(SECRET),
    )
    .expect("a fixed invite is valid");
    let info = JoinerInfo {
        x25519_public: [4; 32],
        device_name: "hall speaker".into(),
        extra: ByteBuf::from(b"joining".to_vec()),
    };
    let (joiner, start) =
        Joiner::start(&code, &joiner_peer(), info.clone(), NOW_S).expect("a Start encodes");
    let mut book = InviteBook::default();
    book.issue(InviteKind::Device, &issuer(), 600, NOW_S, SECRET)
        .expect("the fixed invite issues");
    let (handshake, reply) =
        IssuerHandshake::receive_start(&mut book, &issuer_peer(), &joiner_peer(), &start, NOW_S)
            .expect("the issuer takes the Start");
    let (awaiting, confirm) = joiner
        .receive_reply(&reply)
        .expect("the joiner takes the Reply");
    let verified = handshake
        .receive_confirm(&mut book, &confirm)
        .expect("the issuer takes the Confirm");
    let package = crate::pairing::service::JoinPackage {
        home_id: crate::home::home_id_for(&root_public()),
        name: "home".into(),
        root_public: root_public(),
        home_doc: DocId::from_bytes([1; 16]),
        registry_doc: DocId::from_bytes([2; 16]),
        keys: vec![(
            DocId::from_bytes([1; 16]),
            KeyEpoch::first([3; 16]),
            [5; 32],
        )],
        peers: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{}", issuer_peer())],
    };
    let package = to_cbor("join package", &package).expect("a join package encodes");
    let grant = pake::Grant {
        certificate: ByteBuf::from(cert.clone()),
        home: ByteBuf::from(package.clone()),
        home_doc: ByteBuf::from(vec![0; 16]),
    };
    let sealed = verified
        .seal_grant(&mut book, &grant, NOW_S)
        .expect("the grant seals");
    awaiting
        .receive_grant(&sealed)
        .expect("the joiner opens the grant");
    add(
        "pairing",
        "issuer-start-confirm",
        tagged(0, &join(&start, &confirm)),
    );
    add(
        "pairing",
        "joiner-reply-grant",
        tagged(1, &join(&reply, &sealed)),
    );
    let refused = pake::refusal(pake::Refusal::WrongSecret).expect("a refusal encodes");
    add("pairing", "refusal", tagged(1, &join(&refused, &[])));
    let info = to_cbor("joiner info", &info).expect("joiner info encodes");
    add("pairing", "joiner-info", tagged(2, &info));
    let grant = to_cbor("pairing grant", &grant).expect("a grant encodes");
    add("pairing", "grant", tagged(3, &grant));
    add("pairing", "join-package", tagged(4, &package));
    let public = crate::sharing::service::HomePublic {
        home_id: crate::home::home_id_for(&root_public()),
        name: "home".into(),
        root_public: root_public(),
        devices: vec![(device.clone(), ByteBuf::from(cert.clone()))],
    };
    let public = to_cbor("home record", &public).expect("a home record encodes");
    add("pairing", "home-record", tagged(5, &public));

    // Peer frames: each lane's messages, as the ephemeral stream and grant frames carry
    // them.
    for (name, bytes) in crate::peers::heartbeat::seeds_for_fuzzing() {
        add("peer_frame", name, tagged(0, &bytes));
    }
    for (name, message) in crate::sharing::service::seeds_for_fuzzing(&revocation) {
        add("peer_frame", name, tagged(1, &message));
    }

    // Store records.
    let home = crate::home::HomeRecord {
        home_id: crate::home::home_id_for(&root_public()),
        name: "home".into(),
        root_public: root_public(),
        root_secret: None,
        home_doc: DocId::from_bytes([1; 16]),
        registry_doc: DocId::from_bytes([2; 16]),
    };
    add(
        "store_record",
        "home",
        tagged(0, &home.encode().expect("a home record encodes")),
    );
    add(
        "store_record",
        "static-peers",
        tagged(2, br#"["/ip4/127.0.0.1/tcp/4001"]"#),
    );
    add("store_record", "cert", tagged(10, &cert));
    add(
        "store_record",
        "keyring-key",
        tagged(
            11,
            &crate::records::keyring_key(DocId::from_bytes([1; 16]), KeyEpoch::first([3; 16])),
        ),
    );
    add(
        "store_record",
        "revocations",
        tagged(1, &crate::revocation::set::seed_for_fuzzing(&revocation)),
    );
    add(
        "store_record",
        "doc-meta",
        tagged(4, &crate::core::resident::seed_for_fuzzing()),
    );
    let quarantined = vec![crate::core::quarantine::Quarantined {
        doc: DocId::from_bytes([1; 16]).to_string(),
        reason: "does not load".into(),
        entity: Some("light.hall".into()),
    }];
    add(
        "store_record",
        "quarantine",
        tagged(5, &json("quarantine list", &quarantined)),
    );
    let arbiter = crate::locks::arbiter::Arbiter::default();
    add(
        "store_record",
        "lock-table",
        tagged(6, &json("lock table", &arbiter)),
    );
    let role = crate::locks::handoff::Role::default();
    add(
        "store_record",
        "lock-role",
        tagged(7, &json("lock role", &role)),
    );

    // API bodies and frames.
    #[cfg(feature = "api")]
    for (kind, name, json) in crate::api::fuzzing::seeds() {
        add("api_request", &name, tagged(kind, json.as_bytes()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::cert::Verdict;

    /// Runs the target a seed was written for.
    fn run(target: &str, bytes: &[u8]) {
        match target {
            "invite" => invite(bytes),
            "certificate" => certificate(bytes),
            "pairing" => pairing(bytes),
            "peer_frame" => peer_frame(bytes),
            "store_record" => store_record(bytes),
            #[cfg(feature = "api")]
            "api_request" => api_request(bytes),
            other => panic!("a seed for an unknown target {other}"),
        }
    }

    #[test]
    fn every_seed_runs_through_its_target_and_its_valid_seeds_decode() {
        let seeds = seeds();
        for (target, name, bytes) in &seeds {
            run(target, bytes);
            let what = format!("{target}/{name}");
            match (*target, name.as_str()) {
                ("invite", _) => {
                    let text = std::str::from_utf8(bytes).unwrap();
                    assert!(InviteCode::parse(text, NOW_S).is_ok(), "{what}");
                }
                ("certificate", "device-cert" | "admin-cert") => assert!(
                    matches!(
                        DeviceCert::verify_bytes(bytes, &root_public()),
                        Verdict::Valid(_)
                    ),
                    "{what}"
                ),
                ("certificate", "revocation") => assert!(
                    matches!(
                        Revocation::verify_bytes(bytes, &root_public()),
                        Verdict::Valid(_)
                    ),
                    "{what}"
                ),
                ("certificate", "arbiter-naming") => assert!(
                    matches!(
                        ArbiterNaming::verify_bytes(bytes, &root_public()),
                        Verdict::Valid(_)
                    ),
                    "{what}"
                ),
                ("peer_frame", _) if bytes[0] == 1 => assert!(
                    from_cbor::<ShareMessage>("grant message", &bytes[1..], MAX_OWN_SHARE_MESSAGE)
                        .is_ok(),
                    "{what}"
                ),
                ("store_record", "home") => {
                    assert!(
                        crate::home::HomeRecord::decode(&bytes[1..]).is_ok(),
                        "{what}"
                    )
                }
                _ => {}
            }
        }
        for target in TARGETS {
            assert!(
                seeds.iter().any(|(t, ..)| *t == target),
                "no seed for {target}"
            );
        }
    }

    /// The node crate's targets, as `fuzz/node` names them.
    const TARGETS: [&str; 6] = [
        "invite",
        "certificate",
        "pairing",
        "peer_frame",
        "store_record",
        "api_request",
    ];

    /// Whether this build has `target` (the API's needs the `api` feature).
    fn built(target: &str) -> bool {
        cfg!(feature = "api") || target != "api_request"
    }

    /// The committed corpus of `target` (fuzz/corpus/<target>), by file name.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut out: Vec<(String, Vec<u8>)> = entries
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    /// Runs `target` on `data`, naming the input if it panics.
    fn run_named(target: &str, what: &str, data: &[u8]) {
        let caught = std::panic::catch_unwind(|| run(target, data));
        assert!(
            caught.is_ok(),
            "{target}: {what} panicked; input ({} bytes): {}",
            data.len(),
            hex::encode(data)
        );
    }

    #[test]
    fn the_committed_corpus_replays_through_every_target() {
        for target in TARGETS.into_iter().filter(|t| built(t)) {
            let inputs = corpus(target);
            assert!(!inputs.is_empty(), "no corpus for {target}");
            for (name, bytes) in &inputs {
                run_named(target, name, bytes);
            }
        }
    }

    /// A small seeded generator for the mutations below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
        }
    }

    /// One mutation of `data`, as libFuzzer's default mutators would make: a bit flip,
    /// a byte set to an edge value, a cut, an insertion, a repeated slice, a splice with
    /// another input, or a little-endian length field set to an edge value.
    fn mutate(data: &mut Vec<u8>, inputs: &[(String, Vec<u8>)], rng: &mut Rng) {
        const EDGES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = EDGES[rng.below(EDGES.len())];
            }
            2 if len > 0 => data.truncate(rng.below(len)),
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            4 if len > 1 => {
                let from = rng.below(len);
                let to = from + 1 + rng.below(len - from);
                let piece = data[from..to].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            5 => {
                let other = &inputs[rng.below(inputs.len())].1;
                let keep = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(keep);
                data.extend_from_slice(&other[from..]);
            }
            _ if len >= 4 => {
                let at = rng.below(len - 3);
                let value: u32 = [0, 1, 0x7fff_ffff, 0xffff_ffff, 1 << 20][rng.below(5)];
                data[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            _ => data.push(rng.next() as u8),
        }
        data.truncate(64 * 1024);
    }

    /// A seeded budget of mutated corpus inputs through every target, a fixed number
    /// each. `fuzz/run.sh --node` fuzzes the same entry points with coverage guidance
    /// under libFuzzer; this runs in every `cargo test`, so CI need not build the node
    /// a second time with coverage instrumentation.
    #[test]
    fn seeded_mutations_of_the_corpus_never_panic() {
        let budget = [
            ("invite", 3000),
            ("certificate", 1500),
            ("pairing", 400),
            ("peer_frame", 3000),
            ("store_record", 3000),
            ("api_request", 2000),
        ];
        for (target, runs) in budget.into_iter().filter(|(t, _)| built(t)) {
            let inputs = corpus(target);
            let mut rng = Rng(0x2026_1122_u64 ^ (target.len() as u64) << 32 | 1);
            for i in 0..runs {
                let mut data = inputs[rng.below(inputs.len())].1.clone();
                for _ in 0..=rng.below(4) {
                    mutate(&mut data, &inputs, &mut rng);
                }
                run_named(target, &format!("mutation {i}"), &data);
            }
        }
    }

    /// The issuer's side goes as far as a real Start takes it: a Reply is made, and a
    /// forged Confirm is refused without a panic.
    #[test]
    fn the_pairing_seed_reaches_the_issuers_reply() {
        let mut book = InviteBook::default();
        book.issue(InviteKind::Device, &issuer(), 600, NOW_S, SECRET)
            .unwrap();
        let seeds = seeds();
        let (_, _, bytes) = seeds
            .iter()
            .find(|(t, n, _)| *t == "pairing" && n == "issuer-start-confirm")
            .unwrap();
        let (start, _) = split(&bytes[1..]);
        let (handshake, _reply) =
            IssuerHandshake::receive_start(&mut book, &issuer_peer(), &joiner_peer(), start, NOW_S)
                .unwrap();
        assert!(handshake.receive_confirm(&mut book, b"forged").is_err());
    }
}
