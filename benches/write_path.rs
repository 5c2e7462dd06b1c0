//! The library's local write path, end to end in one node: validation, the core's commit
//! (typed entity view, Automerge change, digest refresh), sealing into the store, and the
//! flush the acknowledgement waits for. The CRDT's own paths (push and apply, typed-view
//! writes, digest reconciliation) are in `crdt/benches`, and sealing with the flush in
//! `storage/benches`.
//!
//! Run with `cargo bench -p hearth --bench write_path`.

use std::time::Duration;

use criterion::{Criterion, criterion_main};
use hearth::{Config, EntityWrite, Node};

fn write(state: String) -> EntityWrite {
    EntityWrite {
        state,
        ..EntityWrite::default()
    }
}

fn node(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, window: Duration) -> Node {
    runtime
        .block_on(Node::start(Config {
            data_dir: dir.to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            mdns: false,
            batch_window: window,
            ..Config::default()
        }))
        .expect("node starts")
}

fn bench_writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("entity_write_acknowledged");
    for (name, window) in [
        ("set, no window", Duration::ZERO),
        ("set, 1 ms window", Duration::from_millis(1)),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = node(&runtime, dir.path(), window);
        let entities = node.entities();
        let mut i = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                runtime
                    .block_on(entities.set("light.bench", write(format!("v{i}"))))
                    .expect("write")
            })
        });
        runtime.block_on(node.shutdown()).expect("shutdown");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let node = node(&runtime, dir.path(), Duration::from_millis(1));
    let entities = node.entities();
    let mut i = 0u64;
    group.throughput(criterion::Throughput::Elements(100));
    group.bench_function("set_many, 100 writes over 10 entities", |b| {
        b.iter(|| {
            let writes = (0..100)
                .map(|k| {
                    i += 1;
                    (format!("sensor.s{}", k % 10).into(), write(format!("v{i}")))
                })
                .collect();
            runtime
                .block_on(entities.set_many(writes))
                .expect("batch write")
        })
    });
    runtime.block_on(node.shutdown()).expect("shutdown");
    group.finish();
}

/// What `criterion_group!` would generate, written out so that it can carry documentation
/// under the workspace's `missing_docs` lint.
pub fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_writes(&mut criterion);
}

criterion_main!(benches);
