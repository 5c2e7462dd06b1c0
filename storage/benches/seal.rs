//! Sealing costs: seal+open of a 200-byte value, a sealed put+flush against an unsealed one, and what group
//! commit buys when many writers share the store handle.
//!
//! Run with `cargo bench -p hearth-storage --bench seal`.

// criterion_group! generates a public function without docs.
#![allow(missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hearth_storage::{KeySource, Keyspace, MemStore, Options, Sealed, SledStore, Store, Unlock};

/// Size of the value in every benchmark, about one entity update.
const VALUE_LEN: usize = 200;

fn seal_open(c: &mut Criterion) {
    let sealed =
        Sealed::open(MemStore::new(), Unlock::Ephemeral, Path::new("<bench>")).expect("open");
    let value = vec![0x5a; VALUE_LEN];
    c.bench_function("seal+open 200 B", |b| {
        b.iter(|| {
            let boxed = sealed
                .seal_record(Keyspace::DocChunks, b"doc/0001", &value)
                .expect("seal");
            sealed
                .open_record(Keyspace::DocChunks, b"doc/0001", &boxed)
                .expect("open")
        })
    });
}

/// One put followed by one flush, as a lone writer pays it through the store handle.
fn put_flush<S: Store>(store: &mut S, counter: &mut u64, value: &[u8]) {
    *counter += 1;
    store
        .put(Keyspace::DocChunks, &counter.to_be_bytes(), value)
        .expect("put");
    store.flush().expect("flush");
}

fn put_and_flush(c: &mut Criterion) {
    let value = vec![0x5a; VALUE_LEN];
    let mut group = c.benchmark_group("put+flush 200 B");
    for sync_data in [false, true] {
        let suffix = if sync_data { " +fdatasync" } else { "" };

        let dir = tempfile::tempdir().expect("tempdir");
        let mut plain =
            SledStore::open(&dir.path().join("plain"), 64 << 20, sync_data).expect("sled");
        let mut n = 0u64;
        group.bench_function(format!("unsealed sled{suffix}"), |b| {
            b.iter(|| put_flush(&mut plain, &mut n, &value))
        });

        let path = dir.path().join("sealed");
        let sled = SledStore::open(&path, 64 << 20, sync_data).expect("sled");
        let mut sealed = Sealed::open(sled, Unlock::Ephemeral, &path).expect("seal");
        let mut n = 0u64;
        group.bench_function(format!("sealed sled{suffix}"), |b| {
            b.iter(|| put_flush(&mut sealed, &mut n, &value))
        });
    }
    group.finish();
}

/// Concurrent writers per measured round in `group_commit`.
const WRITERS: usize = 64;

/// `WRITERS` puts issued at once through one `StoreHandle`; reported per put. Compare with a lone put+flush.
fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let value = vec![0x5a; VALUE_LEN];
    let mut group = c.benchmark_group("handle put, 64 concurrent writers, per put");
    for sync_data in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            sync_data,
            ..Options::default()
        };
        let store =
            hearth_storage::open_with(dir.path(), KeySource::KeyFile, &options).expect("open");
        let mut n = 0u64;
        let name = if sync_data {
            "sealed sled +fdatasync"
        } else {
            "sealed sled"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters.div_ceil(WRITERS as u64) {
                    let started = Instant::now();
                    runtime.block_on(async {
                        let mut writers = tokio::task::JoinSet::new();
                        for _ in 0..WRITERS {
                            n += 1;
                            let (store, value) = (store.clone(), value.clone());
                            writers.spawn(async move {
                                store.put(Keyspace::Outbox, n.to_be_bytes(), value).await
                            });
                        }
                        while let Some(done) = writers.join_next().await {
                            done.expect("task").expect("put");
                        }
                    });
                    total += started.elapsed();
                }
                // Scale to the iterations criterion asked for.
                total.mul_f64(
                    iters as f64 / (iters.div_ceil(WRITERS as u64) * WRITERS as u64) as f64,
                )
            })
        });
        runtime.block_on(store.close()).expect("close");
    }
    group.finish();
}

criterion_group!(benches, seal_open, put_and_flush, group_commit);
criterion_main!(benches);
