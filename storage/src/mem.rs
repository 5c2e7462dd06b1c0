//! An in-memory backend, for tests.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use crate::error::Error;
use crate::keyspace::Keyspace;
use crate::store::{
    Batch, BatchOp, Entry, MAX_STORED_VALUE_LEN, Scan, Store, check_batch, check_sizes, full_key,
};

/// A [`Store`] over an in-memory `BTreeMap`. Nothing survives a drop; `flush` does nothing.
///
/// It lays keys out exactly as [`SledStore`](crate::SledStore) does (keyspace tag, then key), so tests over it
/// exercise the same ordering.
#[derive(Default, Clone)]
pub struct MemStore {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        check_sizes(key, None, MAX_STORED_VALUE_LEN)?;
        Ok(self.map.get(&full_key(keyspace, key)).cloned())
    }

    fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), Error> {
        check_sizes(key, Some(value), MAX_STORED_VALUE_LEN)?;
        self.map.insert(full_key(keyspace, key), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), Error> {
        check_sizes(key, None, MAX_STORED_VALUE_LEN)?;
        self.map.remove(&full_key(keyspace, key));
        Ok(())
    }

    fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, Error> {
        let start = match scan.start_after() {
            Some(after) if after >= scan.prefix_bytes() => {
                Bound::Excluded(full_key(keyspace, after))
            }
            _ => Bound::Included(full_key(keyspace, scan.prefix_bytes())),
        };
        let full_prefix = full_key(keyspace, scan.prefix_bytes());
        Ok(self
            .map
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&full_prefix))
            .take(scan.max_entries())
            .map(|(k, v)| (k[1..].to_vec(), v.clone()))
            .collect())
    }

    fn apply_batch(&mut self, batch: Batch) -> Result<(), Error> {
        // Validate everything first so that a rejected batch changes nothing.
        check_batch(&batch, MAX_STORED_VALUE_LEN)?;
        for op in batch.into_ops() {
            match op {
                BatchOp::Put {
                    keyspace,
                    key,
                    value,
                } => {
                    self.map.insert(full_key(keyspace, &key), value);
                }
                BatchOp::Delete { keyspace, key } => {
                    self.map.remove(&full_key(keyspace, &key));
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

// Values may be plaintext here (when not wrapped in `Sealed`), so Debug shows only the size.
impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStore")
            .field("records", &self.map.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspaces_do_not_leak_into_each_other() {
        let mut store = MemStore::new();
        store.put(Keyspace::Keyring, b"k", b"ring").unwrap();
        store.put(Keyspace::Outbox, b"k", b"out").unwrap();
        store.put(Keyspace::Outbox, b"k2", b"out2").unwrap();
        assert_eq!(
            store.get(Keyspace::Keyring, b"k").unwrap().as_deref(),
            Some(&b"ring"[..])
        );
        let all = store.scan(Keyspace::Keyring, &Scan::all()).unwrap();
        assert_eq!(all, vec![(b"k".to_vec(), b"ring".to_vec())]);
        let after = store
            .scan(Keyspace::Outbox, &Scan::all().after(b"k".to_vec()))
            .unwrap();
        assert_eq!(after, vec![(b"k2".to_vec(), b"out2".to_vec())]);
        assert!(format!("{store:?}").contains("records: 3"));
    }

    #[test]
    fn oversized_batch_changes_nothing() {
        let mut store = MemStore::new();
        let mut batch = Batch::new();
        batch.put(Keyspace::Meta, b"ok".to_vec(), b"v".to_vec());
        batch.put(
            Keyspace::Meta,
            vec![0u8; crate::MAX_KEY_LEN + 1],
            b"v".to_vec(),
        );
        assert!(store.apply_batch(batch).is_err());
        assert_eq!(store.get(Keyspace::Meta, b"ok").unwrap(), None);
    }
}
