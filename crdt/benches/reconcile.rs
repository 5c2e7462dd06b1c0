//! Digest reconciliation cost: time, hashes and bytes of one session for D = 100, 1000 and 10000
//! documents with 1% of them changed, plus the no-change reconnect and one incremental update.
//!
//! Run with `cargo bench -p hearth-crdt --bench reconcile`. Byte and hash counts are printed to
//! stderr during setup; every message goes through CBOR encode and decode, as on the wire.

use criterion::{BenchmarkId, Criterion, criterion_main};
use hearth_crdt::DocId;
use hearth_crdt::digest::{DigestMessage, DigestTree, Reconciler, heads_hash_bytes};
use sha2::{Digest, Sha256};

const SIZES: [u64; 3] = [100, 1000, 10_000];

/// Well-spread ids, as random 16-byte DocIds would be.
fn id(n: u64) -> DocId {
    let digest = Sha256::digest(n.to_be_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    DocId::from_bytes(bytes)
}

fn heads(n: u64) -> [u8; 32] {
    heads_hash_bytes(&[Sha256::digest(n.to_le_bytes()).into()])
}

/// Two trees of `d` documents where 1% of them (at least one) have different heads.
fn trees(d: u64) -> (DigestTree, DigestTree) {
    let a: DigestTree = (0..d).map(|n| (id(n), heads(n))).collect();
    let mut b = a.clone();
    let changed = (d / 100).max(1);
    for k in 0..changed {
        let n = k * (d / changed);
        b.insert(id(n), heads(n + d));
    }
    (a, b)
}

/// Traffic of one session, both directions together.
struct Traffic {
    differing: usize,
    hashes: u64,
    bytes: u64,
    messages: u64,
}

fn reconcile(a_tree: &DigestTree, b_tree: &DigestTree) -> Traffic {
    let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
    let wire = |m: DigestMessage| DigestMessage::decode(&m.encode()).expect("decodes");
    let mut to_b = vec![a.start(1, a_tree).expect("fresh session")];
    let mut differing = 0;
    while !to_b.is_empty() {
        let mut to_a = Vec::new();
        for m in to_b.drain(..) {
            to_a.extend(b.handle(b_tree, wire(m)).expect("honest peer").send);
        }
        for m in to_a {
            let progress = a.handle(a_tree, wire(m)).expect("honest peer");
            differing += progress.finished.map_or(0, |d| d.len());
            to_b.extend(progress.send);
        }
    }
    let (sa, sb) = (a.stats(), b.stats());
    Traffic {
        differing,
        hashes: sa.hashes_sent + sb.hashes_sent,
        bytes: sa.bytes_sent + sb.bytes_sent,
        messages: sa.messages_sent + sb.messages_sent,
    }
}

fn bench_reconcile(c: &mut Criterion) {
    let mut group = c.benchmark_group("reconcile_1pct_changed");
    for d in SIZES {
        let (a, b) = trees(d);
        let t = reconcile(&a, &b);
        eprintln!(
            "reconcile D={d}: {} differing, {} hashes, {} bytes, {} messages",
            t.differing, t.hashes, t.bytes, t.messages
        );
        group.bench_with_input(BenchmarkId::from_parameter(d), &(a, b), |bench, (a, b)| {
            bench.iter(|| reconcile(a, b))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("reconcile_unchanged");
    let (a, _) = trees(10_000);
    let t = reconcile(&a, &a);
    eprintln!(
        "unchanged D=10000: {} hashes, {} bytes, {} messages",
        t.hashes, t.bytes, t.messages
    );
    group.bench_function("10000", |bench| bench.iter(|| reconcile(&a, &a)));
    group.finish();

    let mut group = c.benchmark_group("tree_update_one");
    for d in SIZES {
        let (mut tree, _) = trees(d);
        let mut round = 0u64;
        group.bench_function(BenchmarkId::from_parameter(d), |bench| {
            bench.iter(|| {
                round += 1;
                tree.insert(id(round % d), heads(round))
            })
        });
    }
    group.finish();
}

/// What `criterion_group!` would generate, written out so that it can carry documentation under
/// the workspace's `missing_docs` lint.
pub fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_reconcile(&mut criterion);
}

criterion_main!(benches);
