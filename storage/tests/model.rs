//! Model test: random operation sequences against a `BTreeMap`, on both backends, always sealed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hearth_storage::{Batch, Keyspace, MemStore, Scan, Sealed, SledStore, Store, Unlock};
use proptest::prelude::*;

type Model = BTreeMap<(Keyspace, Vec<u8>), Vec<u8>>;

#[derive(Debug, Clone)]
enum ModelOp {
    Put(Keyspace, Vec<u8>, Vec<u8>),
    Delete(Keyspace, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Op {
    Put(Keyspace, Vec<u8>, Vec<u8>),
    Delete(Keyspace, Vec<u8>),
    Batch(Vec<ModelOp>),
    Get(Keyspace, Vec<u8>),
    Scan {
        keyspace: Keyspace,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    },
    Flush,
    /// Drop the store and open it again over the same backend, with the same key.
    Reopen,
}

fn keyspace() -> impl Strategy<Value = Keyspace> {
    prop::sample::select(Keyspace::ALL.to_vec())
}

/// Short keys over a tiny alphabet, so puts, deletes and scans keep hitting the same keys and prefixes.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 0xff]), 0..4)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (keyspace(), key(), value()).prop_map(|(ks, k, v)| ModelOp::Put(ks, k, v)),
        1 => (keyspace(), key()).prop_map(|(ks, k)| ModelOp::Delete(ks, k)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (keyspace(), key(), value()).prop_map(|(ks, k, v)| Op::Put(ks, k, v)),
        2 => (keyspace(), key()).prop_map(|(ks, k)| Op::Delete(ks, k)),
        2 => prop::collection::vec(model_op(), 0..6).prop_map(Op::Batch),
        2 => (keyspace(), key()).prop_map(|(ks, k)| Op::Get(ks, k)),
        3 => (keyspace(), prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 0xff]), 0..2),
              prop::option::of(key()), 0usize..6)
            .prop_map(|(keyspace, prefix, after, limit)| Op::Scan { keyspace, prefix, after, limit }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn apply_model(model: &mut Model, op: &ModelOp) {
    match op {
        ModelOp::Put(ks, k, v) => {
            model.insert((*ks, k.clone()), v.clone());
        }
        ModelOp::Delete(ks, k) => {
            model.remove(&(*ks, k.clone()));
        }
    }
}

fn model_scan(model: &Model, keyspace: Keyspace, scan: &Scan) -> Vec<(Vec<u8>, Vec<u8>)> {
    model
        .iter()
        .filter(|((ks, k), _)| {
            *ks == keyspace
                && k.starts_with(scan.prefix_bytes())
                && scan.start_after().is_none_or(|after| k.as_slice() > after)
        })
        .take(scan.max_entries())
        .map(|((_, k), v)| (k.clone(), v.clone()))
        .collect()
}

/// Runs `ops` against a store and the model; `reopen` closes and reopens the store.
fn check<S: Store>(
    mut store: S,
    ops: &[Op],
    mut reopen: impl FnMut(S) -> S,
) -> Result<(), TestCaseError> {
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Put(ks, k, v) => {
                store.put(*ks, k, v).unwrap();
                apply_model(&mut model, &ModelOp::Put(*ks, k.clone(), v.clone()));
            }
            Op::Delete(ks, k) => {
                store.delete(*ks, k).unwrap();
                apply_model(&mut model, &ModelOp::Delete(*ks, k.clone()));
            }
            Op::Batch(ops) => {
                let mut batch = Batch::new();
                for op in ops {
                    match op {
                        ModelOp::Put(ks, k, v) => batch.put(*ks, k.clone(), v.clone()),
                        ModelOp::Delete(ks, k) => batch.delete(*ks, k.clone()),
                    };
                    apply_model(&mut model, op);
                }
                store.apply_batch(batch).unwrap();
            }
            Op::Get(ks, k) => {
                prop_assert_eq!(
                    store.get(*ks, k).unwrap(),
                    model.get(&(*ks, k.clone())).cloned()
                );
            }
            Op::Scan {
                keyspace,
                prefix,
                after,
                limit,
            } => {
                let mut scan = Scan::prefix(prefix.clone()).limit(*limit);
                if let Some(after) = after {
                    scan = scan.after(after.clone());
                }
                prop_assert_eq!(
                    store.scan(*keyspace, &scan).unwrap(),
                    model_scan(&model, *keyspace, &scan)
                );
            }
            Op::Flush => store.flush().unwrap(),
            Op::Reopen => {
                store.flush().unwrap();
                store = reopen(store);
            }
        }
    }
    // Finally, everything in every keyspace must match, including after one more reopen.
    store = reopen(store);
    for ks in Keyspace::ALL {
        let all = Scan::all().limit(usize::MAX);
        prop_assert_eq!(store.scan(ks, &all).unwrap(), model_scan(&model, ks, &all));
    }
    Ok(())
}

fn open_sealed<S: Store>(inner: S, key_file: &Path, location: &Path) -> Sealed<S> {
    Sealed::open(inner, Unlock::KeyFile(key_file), location).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn sealed_mem_store_matches_model(ops in prop::collection::vec(op(), 0..80)) {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        let location = PathBuf::from("<memory>");
        let store = open_sealed(MemStore::new(), &key_file, &location);
        check(store, &ops, |store| open_sealed(store.into_inner(), &key_file, &location))?;
    }
}

proptest! {
    // Each case opens sled a few times; fewer cases keep the debug-build run short.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sealed_sled_store_matches_model(ops in prop::collection::vec(op(), 0..80)) {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        let path = dir.path().join("store");
        let sled = || SledStore::open(&path, 4 << 20, false).unwrap();
        let store = open_sealed(sled(), &key_file, &path);
        check(store, &ops, |store| {
            // Drop first: sled holds a lock on its directory.
            drop(store);
            open_sealed(sled(), &key_file, &path)
        })?;
    }
}
