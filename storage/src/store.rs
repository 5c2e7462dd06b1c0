//! The `Store` trait and the types its methods take.

use std::fmt;

use crate::error::{Error, RecordKey};
use crate::keyspace::Keyspace;

/// Largest key a store accepts, in bytes. Keys hold ids, never payloads.
pub const MAX_KEY_LEN: usize = 1024;

/// Largest value a store accepts, in bytes (before sealing).
pub const MAX_VALUE_LEN: usize = 64 * 1024 * 1024;

/// Most operations one [`Batch`] may carry.
pub const MAX_BATCH_OPS: usize = 100_000;

/// Entries a [`Scan`] returns unless told otherwise.
pub const DEFAULT_SCAN_LIMIT: usize = 1_000;

/// Most entries one [`Scan`] may return; page with [`Scan::after`] beyond it.
pub const MAX_SCAN_LIMIT: usize = 100_000;

/// Room for a sealing envelope on top of [`MAX_VALUE_LEN`], so raw backends accept sealed values of the
/// largest plaintext.
pub(crate) const MAX_STORED_VALUE_LEN: usize = MAX_VALUE_LEN + 128;

/// A key and its value, as returned by a scan.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A key-value store with typed keyspaces.
///
/// The trait is deliberately narrow (point reads and writes, ordered prefix scans, atomic batches and a flush) so
/// that another embedded engine, such as redb, can replace sled behind it. Methods take `&mut self` for writes:
/// a store is owned by one thread (see [`StoreHandle`](crate::StoreHandle)), so no backend needs its own locking.
pub trait Store {
    /// Reads one value.
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// Writes one value, replacing any previous one.
    fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), Error>;

    /// Removes one key. Removing an absent key is not an error.
    fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), Error>;

    /// Lists entries of `keyspace` in key order, as described by `scan`.
    fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, Error>;

    /// Applies every operation of `batch`, in order, atomically: after a crash either all of them are visible or
    /// none is.
    fn apply_batch(&mut self, batch: Batch) -> Result<(), Error>;

    /// Makes every write so far durable (see the crate docs for what sled's flush does and does not promise).
    fn flush(&mut self) -> Result<(), Error>;

    /// Closes and reopens the backend's files, to recover after an I/O failure. Data flushed before stays;
    /// writes that were not flushed may be lost. Backends without files do nothing.
    fn reopen(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// A prefix scan: the keys starting with a prefix, in order, optionally after a given key, up to a limit.
///
/// A scan that returns exactly `limit` entries may have more: continue with `.after(last_key)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    prefix: Vec<u8>,
    after: Option<Vec<u8>>,
    limit: usize,
}

impl Scan {
    /// Every key starting with `prefix`, up to [`DEFAULT_SCAN_LIMIT`] entries.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Scan {
            prefix: prefix.into(),
            after: None,
            limit: DEFAULT_SCAN_LIMIT,
        }
    }

    /// Every key of the keyspace, up to [`DEFAULT_SCAN_LIMIT`] entries.
    pub fn all() -> Self {
        Scan::prefix(Vec::new())
    }

    /// Starts strictly after `key`, to continue a previous page.
    #[must_use]
    pub fn after(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.after = Some(key.into());
        self
    }

    /// Returns at most `limit` entries; clamped to [`MAX_SCAN_LIMIT`].
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit.min(MAX_SCAN_LIMIT);
        self
    }

    /// The prefix every returned key starts with.
    pub fn prefix_bytes(&self) -> &[u8] {
        &self.prefix
    }

    /// The key the scan starts after, if any.
    pub fn start_after(&self) -> Option<&[u8]> {
        self.after.as_deref()
    }

    /// The most entries the scan returns.
    pub fn max_entries(&self) -> usize {
        self.limit
    }

    /// Whether a key (within the keyspace) belongs to this scan's range, ignoring the limit.
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix) && self.after.as_deref().is_none_or(|after| key > after)
    }

    /// The same scan with a different limit, for layers that filter entries out.
    pub(crate) fn with_limit(&self, limit: usize) -> Scan {
        Scan {
            prefix: self.prefix.clone(),
            after: self.after.clone(),
            limit,
        }
    }
}

/// One operation of a [`Batch`].
#[derive(Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Write `value` under `key`.
    Put {
        /// Target keyspace.
        keyspace: Keyspace,
        /// Key.
        key: Vec<u8>,
        /// Value (plaintext until a sealing layer seals it).
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Target keyspace.
        keyspace: Keyspace,
        /// Key.
        key: Vec<u8>,
    },
}

// Values are plaintext at this layer, so Debug shows only their length.
impl fmt::Debug for BatchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchOp::Put {
                keyspace,
                key,
                value,
            } => f
                .debug_struct("Put")
                .field("keyspace", keyspace)
                .field("key", &RecordKey::new(key.clone()))
                .field("value_len", &value.len())
                .finish(),
            BatchOp::Delete { keyspace, key } => f
                .debug_struct("Delete")
                .field("keyspace", keyspace)
                .field("key", &RecordKey::new(key.clone()))
                .finish(),
        }
    }
}

/// Writes applied together, atomically, in order (a later operation on the same key wins).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<BatchOp>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds a write.
    pub fn put(
        &mut self,
        keyspace: Keyspace,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(BatchOp::Put {
            keyspace,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a removal.
    pub fn delete(&mut self, keyspace: Keyspace, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::Delete {
            keyspace,
            key: key.into(),
        });
        self
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Takes the operations out.
    pub fn into_ops(self) -> Vec<BatchOp> {
        self.ops
    }

    /// Adds `other`'s operations after this batch's own.
    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

impl From<Vec<BatchOp>> for Batch {
    fn from(ops: Vec<BatchOp>) -> Self {
        Batch { ops }
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.ops).finish()
    }
}

/// Rejects keys and values above the caps, before anything is allocated for them.
pub(crate) fn check_sizes(key: &[u8], value: Option<&[u8]>, max_value: usize) -> Result<(), Error> {
    if key.len() > MAX_KEY_LEN {
        return Err(Error::TooLarge {
            what: "key",
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if let Some(value) = value
        && value.len() > max_value
    {
        return Err(Error::TooLarge {
            what: "value",
            len: value.len(),
            max: max_value,
        });
    }
    Ok(())
}

/// Rejects a batch above [`MAX_BATCH_OPS`] or holding an oversized key or value.
pub(crate) fn check_batch(batch: &Batch, max_value: usize) -> Result<(), Error> {
    if batch.len() > MAX_BATCH_OPS {
        return Err(Error::TooLarge {
            what: "batch",
            len: batch.len(),
            max: MAX_BATCH_OPS,
        });
    }
    for op in batch.ops() {
        match op {
            BatchOp::Put { key, value, .. } => check_sizes(key, Some(value), max_value)?,
            BatchOp::Delete { key, .. } => check_sizes(key, None, max_value)?,
        }
    }
    Ok(())
}

/// The backend key: keyspace tag followed by the key.
pub(crate) fn full_key(keyspace: Keyspace, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(1 + key.len());
    full.push(keyspace.tag());
    full.extend_from_slice(key);
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_range_respects_prefix_and_after() {
        let scan = Scan::prefix(b"ab".to_vec()).after(b"abc".to_vec());
        assert!(!scan.covers(b"abc"));
        assert!(scan.covers(b"abd"));
        assert!(!scan.covers(b"ac"));
        assert!(!scan.covers(b"a"));
        assert_eq!(Scan::all().limit(usize::MAX).max_entries(), MAX_SCAN_LIMIT);
    }

    #[test]
    fn batch_debug_hides_values() {
        let mut batch = Batch::new();
        batch.put(Keyspace::Keyring, b"k1".to_vec(), b"secret-value".to_vec());
        batch.delete(Keyspace::Outbox, vec![0u8, 1]);
        let shown = format!("{batch:?}");
        assert!(!shown.contains("secret-value"), "{shown}");
        assert!(shown.contains("value_len: 12"), "{shown}");
        assert!(shown.contains("0x0001"), "{shown}");
    }

    #[test]
    fn size_caps_are_enforced() {
        let big_key = vec![0u8; MAX_KEY_LEN + 1];
        assert!(matches!(
            check_sizes(&big_key, None, 10),
            Err(Error::TooLarge { what: "key", .. })
        ));
        assert!(matches!(
            check_sizes(b"k", Some(&[0u8; 11]), 10),
            Err(Error::TooLarge { what: "value", .. })
        ));
        assert!(check_sizes(b"k", Some(&[0u8; 10]), 10).is_ok());
    }
}
