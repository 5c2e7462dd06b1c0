//! Fuzzes the engine's guarded receive path with pushes and sync messages.
//!
//! libFuzzer's panic hook aborts the process on any panic, even one that the
//! engine's `catch_unwind` guard contains in production. Automerge 0.12 does
//! panic on some crafted changes (one such input is in the corpus: an assertion
//! in its change collector, reached from `save_incremental` after a push), so
//! this target replaces that hook with one that only reports: a panic the
//! guard catches is what production survives, and is counted; a panic that
//! escapes the guard still reaches libFuzzer's own boundary and aborts the run.
//! After every input the document must still read.
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

/// Reports panics without aborting, so the engine's guard gets to catch them.
fn report_panics() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| eprintln!("panic (guard decides): {info}")));
    });
}

fuzz_target!(|data: &[u8]| {
    report_panics();
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
    // Whatever arrived, including input that made Automerge panic inside the
    // guard, reading and writing the document afterwards returns values (a
    // schema error is fine when the input rewrote the layout) and never panics
    // outside the guard.
    let _ = engine.entity(DOC);
    let after = EntityUpdate {
        state: "after".into(),
        attributes: None,
    };
    let _ = engine.update_entity(DOC, &after, 20_000, None);
});
