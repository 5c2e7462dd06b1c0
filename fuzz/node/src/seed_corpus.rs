//! Writes the seed corpus from real frames: `cargo run --manifest-path node/Cargo.toml --bin seed_corpus`
//! (run from `fuzz/`). The committed corpus under `corpus/` came from this; the node
//! crate's targets take their seeds from `hearth::fuzzing::seeds`.

use std::fs;
use std::path::Path;

use hearth_crdt::wire::{Frame, encode};
use hearth_crdt::{DocId, DocKind, Engine, EngineConfig, EntityUpdate, KeyEpoch, Output};

const DOC: DocId = DocId::from_bytes([7; 16]);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let epoch = KeyEpoch::first([0; 16]);
    let mut a: Engine<u8> = Engine::new(b"owner", EngineConfig::default());
    let mut b: Engine<u8> = Engine::new(b"peer", EngineConfig::default());
    let first = EntityUpdate {
        state: "off".into(),
        attributes: None,
    };
    a.create_entity(DOC, "home", epoch, "light.fuzz", &first, 1)?;
    b.expect_document(DOC, DocKind::Entity, "home", epoch);
    let mut frames: Vec<Frame> = Vec::new();
    let mut queue: Vec<(u8, u8, Frame)> = Vec::new();
    let sends = |from: u8, out: Vec<Output<u8>>, q: &mut Vec<(u8, u8, Frame)>| {
        for o in out {
            if let Output::Send { peer, frame } = o {
                q.push((from, peer, frame));
            }
        }
    };
    sends(0, a.attach(1, DOC, None, 5)?, &mut queue);
    sends(1, b.attach(0, DOC, None, 5)?, &mut queue);
    for i in 0..3 {
        while let Some((from, to, frame)) = queue.pop() {
            frames.push(frame.clone());
            let target = if to == 0 { &mut a } else { &mut b };
            let out = target.receive(from, frame, 10)?;
            sends(to, out, &mut queue);
        }
        let u = EntityUpdate {
            state: format!("s{i}"),
            attributes: serde_json_map(i),
        };
        sends(
            0,
            a.update_entity(DOC, &u, 20 + i, Some(format!("c{i}")))?,
            &mut queue,
        );
    }
    let envelope_dir = Path::new("corpus/envelope");
    let receive_dir = Path::new("corpus/receive");
    let sync_dir = Path::new("corpus/sync_message");
    fs::create_dir_all(envelope_dir)?;
    fs::create_dir_all(receive_dir)?;
    fs::create_dir_all(sync_dir)?;
    for (i, f) in frames.iter().enumerate() {
        fs::write(envelope_dir.join(format!("frame-{i:02}")), encode(f))?;
        let (selector, payload) = match f {
            Frame::Push(p) => (0u8, &p.bytes),
            Frame::Sync(s) => (1u8 | if s.expects_reply { 2 } else { 0 }, &s.bytes),
            _ => continue,
        };
        let mut seed = vec![selector];
        seed.extend_from_slice(payload);
        fs::write(receive_dir.join(format!("frame-{i:02}")), &seed)?;
        if let Frame::Sync(_) = f {
            // The sync_message target reads only the reply bit.
            seed[0] >>= 1;
            fs::write(sync_dir.join(format!("frame-{i:02}")), seed)?;
        }
    }
    for (name, payload) in compressed_seeds()? {
        let mut seed = vec![1u8];
        seed.extend(payload);
        fs::write(sync_dir.join(name), seed)?;
    }
    let digests = digest_seeds()?;
    let digest_dir = Path::new("corpus/digest");
    fs::create_dir_all(digest_dir)?;
    for (i, seed) in digests.iter().enumerate() {
        fs::write(digest_dir.join(format!("session-{i:02}")), seed)?;
    }
    // The node crate's decoders: its own encoders write valid inputs for each target.
    let node_seeds = hearth::fuzzing::seeds();
    for (target, name, bytes) in &node_seeds {
        let dir = Path::new("corpus").join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
    }
    println!(
        "wrote {} frames, {} digest sessions and {} node seeds",
        frames.len(),
        digests.len(),
        node_seeds.len()
    );
    Ok(())
}

/// Sync messages carrying compressed data, as Automerge itself writes it: a
/// compressed change chunk (`Change::bytes` compresses changes over 256
/// bytes), one that inflates to 4 MiB, and whole documents (`save()`
/// deflates their columns), one modest and one that inflates past the
/// target's 1 MiB cap.
/// Named seed inputs.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn compressed_seeds() -> Result<Seeds, Box<dyn std::error::Error>> {
    use automerge::sync::{ChunkList, Message, MessageVersion};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT, ScalarValue};

    let message = |heads, chunks: Vec<Vec<u8>>| {
        Message {
            heads,
            need: Vec::new(),
            have: Vec::new(),
            changes: ChunkList::from(chunks),
            flags: None,
            version: MessageVersion::V2,
        }
        .encode()
    };
    let mut seeds = Vec::new();
    for (change_name, doc_name, len) in [
        ("compressed-change", "document-deflated", 4096),
        ("compressed-bomb-4mib", "document-bomb-4mib", 4 << 20),
    ] {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "state", "on")?;
        doc.put(ROOT, "blob", ScalarValue::Bytes(vec![0; len]))?;
        doc.commit();
        let mut change = doc
            .get_last_local_change()
            .ok_or("no change after a commit")?;
        let compressed = change.bytes().into_owned();
        assert_eq!(compressed[8], 2, "automerge compressed the change");
        let heads = doc.get_heads();
        seeds.push((change_name, message(heads.clone(), vec![compressed])));
        seeds.push((doc_name, message(heads, vec![doc.save()])));
    }
    Ok(seeds)
}

fn serde_json_map(i: u64) -> Option<hearth_crdt::schema::entity::AttributeMap> {
    let mut m = hearth_crdt::schema::entity::AttributeMap::new();
    m.insert("brightness".into(), (i * 10).into());
    Some(m)
}

/// Two reconcilers over trees that differ in a few documents run a session to its end; each
/// seed is one side's messages of a session, joined by the target's 0xff separator (a message
/// holding that byte is left out, so the target reads every seed as whole messages).
fn digest_seeds() -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
    use hearth_crdt::digest::{DigestTree, Reconciler};
    let mut seeds = Vec::new();
    for (docs, differ) in [(5u32, 1u32), (300, 3), (300, 40)] {
        let mut ours = DigestTree::new();
        let mut theirs = DigestTree::new();
        for i in 0..docs {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            let mut hash = [0u8; 32];
            hash[..4].copy_from_slice(&i.to_le_bytes());
            ours.insert(DocId::from_bytes(id), hash);
            if i < differ {
                hash[31] = 1;
            }
            theirs.insert(DocId::from_bytes(id), hash);
        }
        let mut a = Reconciler::new();
        let mut b = Reconciler::new();
        let mut from_a = vec![a.start(u64::from(docs), &ours)?];
        let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
        for _ in 0..64 {
            let mut from_b = Vec::new();
            for m in from_a.drain(..) {
                sent_a.push(m.encode());
                from_b.extend(b.handle(&theirs, m)?.send);
            }
            for m in from_b {
                sent_b.push(m.encode());
                from_a.extend(a.handle(&ours, m)?.send);
            }
            if from_a.is_empty() {
                break;
            }
        }
        for side in [sent_a, sent_b] {
            let joined: Vec<u8> = side
                .into_iter()
                .filter(|m| !m.contains(&0xff))
                .flat_map(|m| m.into_iter().chain([0xff]))
                .collect();
            if !joined.is_empty() {
                seeds.push(joined);
            }
        }
    }
    Ok(seeds)
}
