//! Fuzzes the engine's guarded receive path with pushes and sync messages.
//!
//! libFuzzer's panic hook aborts the process on any panic, even one that the
//! engine's `catch_unwind` guard would contain in production. So this target
//! does not test the guard; it tests that the validation in front of
//! Automerge (size caps, chunk-header parsing, message decoding) turns
//! hostile bytes into error values without reaching a panicking path. A crash
//! here is an Automerge panic reachable from the wire: production survives it
//! (the guard resets the session and rebuilds the document), but it belongs
//! upstream and, where possible, behind a pre-check of our own. The guard
//! itself is covered by the crate's unit tests, which inject a panic.
#![no_main]

use std::sync::OnceLock;

use hearth_crdt::wire::{Frame, Push, SyncMessage};
use hearth_crdt::{DocId, Engine, EngineConfig, EntityUpdate, KeyEpoch, payload_actors};
use libfuzzer_sys::fuzz_target;

const DOC: DocId = DocId::from_bytes([7; 16]);

/// A small entity document with some history, built once.
fn template() -> &'static Vec<Vec<u8>> {
    static CHUNKS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CHUNKS.get_or_init(|| {
        let mut e: Engine<u8> = Engine::new(b"owner", EngineConfig::default());
        let epoch = KeyEpoch::first([0; 16]);
        let first = EntityUpdate {
            state: "off".into(),
            attributes: None,
        };
        let mut chunks = Vec::new();
        let mut keep = |out: Vec<hearth_crdt::Output<u8>>| {
            for o in out {
                if let hearth_crdt::Output::PersistChunk { bytes, .. } = o {
                    chunks.push(bytes);
                }
            }
        };
        keep(
            e.create_entity(DOC, "home", epoch, "light.fuzz", &first, 1)
                .expect("create"),
        );
        for i in 0..4 {
            let u = EntityUpdate {
                state: format!("s{i}"),
                attributes: None,
            };
            keep(e.update_entity(DOC, &u, 10 + i, None).expect("update"));
        }
        chunks
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let config = EngineConfig {
        max_push_bytes: 4096,
        max_sync_message_bytes: 4096,
        ..EngineConfig::default()
    };
    let mut engine: Engine<u8> = Engine::new(b"receiver", config.clone());
    engine
        .load_document(DOC, template())
        .expect("template loads");
    let _ = engine.attach(1, DOC, None, 100);
    let epoch = KeyEpoch::first([0; 16]);
    let frame = if selector & 1 == 0 {
        Frame::Push(Push {
            doc: DOC,
            epoch,
            correlation_id: None,
            bytes: payload.to_vec(),
        })
    } else {
        Frame::Sync(SyncMessage {
            doc: DOC,
            epoch,
            expects_reply: selector & 2 != 0,
            bytes: payload.to_vec(),
        })
    };
    let _ = payload_actors(&frame, &config);
    let _ = engine.receive(1, frame, 200);
    let _ = engine.tick(10_000);
    // Whatever arrived, the document still reads (or reports a schema error).
    let _ = engine.entity(DOC);
    assert_eq!(engine.stats().panics_caught, 0);
});
