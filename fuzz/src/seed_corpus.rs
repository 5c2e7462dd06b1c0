//! Writes the seed corpus from real frames: `cargo run --bin seed_corpus`
//! (run from `fuzz/`). The committed corpus under `corpus/` came from this.

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
    fs::create_dir_all(envelope_dir)?;
    fs::create_dir_all(receive_dir)?;
    for (i, f) in frames.iter().enumerate() {
        fs::write(envelope_dir.join(format!("frame-{i:02}")), encode(f))?;
        let (selector, payload) = match f {
            Frame::Push(p) => (0u8, &p.bytes),
            Frame::Sync(s) => (1u8 | if s.expects_reply { 2 } else { 0 }, &s.bytes),
            _ => continue,
        };
        let mut seed = vec![selector];
        seed.extend_from_slice(payload);
        fs::write(receive_dir.join(format!("frame-{i:02}")), seed)?;
    }
    println!("wrote {} frames", frames.len());
    Ok(())
}

fn serde_json_map(i: u64) -> Option<hearth_crdt::schema::entity::AttributeMap> {
    let mut m = hearth_crdt::schema::entity::AttributeMap::new();
    m.insert("brightness".into(), (i * 10).into());
    Some(m)
}
