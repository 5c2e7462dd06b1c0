//! Fuzzes sync messages from a peer through the engine's guarded receive
//! path, and through `payload_actors`, which the node runs on the same frame
//! first. The seeds include compressed change chunks and documents whose
//! deflated columns inflate far past their size: whatever the mutations make
//! of them, nothing may inflate past the engine's caps (libFuzzer's
//! `-rss_limit_mb` and `-malloc_limit_mb` turn a bomb that slips through into
//! a failure), and the document must still read and write afterwards.
//!
//! As in the `receive` target, panics are reported rather than aborting, so
//! the engine's `catch_unwind` guard decides; a panic outside it still aborts.
#![no_main]

use std::sync::OnceLock;

use hearth_crdt::wire::{Frame, SyncMessage};
use hearth_crdt::{DocId, Engine, EngineConfig, EntityUpdate, KeyEpoch, Output, payload_actors};
use libfuzzer_sys::fuzz_target;

const DOC: DocId = DocId::from_bytes([7; 16]);

/// Caps small enough that an input reaching them is cheap to refuse.
fn config() -> EngineConfig {
    EngineConfig {
        max_sync_message_bytes: 64 * 1024,
        max_decoded_frame_bytes: 1024 * 1024,
        max_growth_per_step_bytes: 1024 * 1024,
        ..EngineConfig::default()
    }
}

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
        let mut keep = |out: Vec<Output<u8>>| {
            for o in out {
                if let Output::PersistChunk { bytes, .. } = o {
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
    let config = config();
    let mut engine: Engine<u8> = Engine::new(b"receiver", config.clone());
    engine
        .load_document(DOC, template())
        .expect("template loads");
    let _ = engine.attach(1, DOC, None, 100);
    let frame = Frame::Sync(SyncMessage {
        doc: DOC,
        epoch: KeyEpoch::first([0; 16]),
        expects_reply: selector & 1 != 0,
        bytes: payload.to_vec(),
    });
    let _ = payload_actors(&frame, &config);
    let _ = engine.receive(1, frame, 200);
    let _ = engine.tick(10_000);
    let _ = engine.entity(DOC);
    let after = EntityUpdate {
        state: "after".into(),
        attributes: None,
    };
    let _ = engine.update_entity(DOC, &after, 20_000, None);
});
