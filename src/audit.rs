//! The audit log: an append-only record of grants, revocations and pairings, in the
//! store's `Audit` keyspace under `unix ms (u64 BE) ‖ seq (u32 BE)`.

use std::sync::atomic::{AtomicU32, Ordering};

use hearth_storage::{Keyspace, StoreHandle};
use serde::Serialize;

/// Disambiguates entries written within one millisecond.
static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Serialize)]
struct Entry<'a> {
    time: String,
    action: &'a str,
    subject: &'a str,
}

/// Appends an entry. A failure is logged, not returned: the action it records has
/// already happened, and refusing it after the fact would help no one.
pub(crate) async fn record(store: &StoreHandle, action: &str, subject: &str) {
    let ms = crate::core::now_ms();
    let mut key = ms.to_be_bytes().to_vec();
    key.extend_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let entry = Entry {
        time: crate::core::rfc3339_ms(ms),
        action,
        subject,
    };
    let value = match serde_json::to_vec(&entry) {
        Ok(v) => v,
        Err(error) => {
            tracing::error!(%error, action, "cannot encode an audit entry");
            return;
        }
    };
    if let Err(error) = store.put(Keyspace::Audit, key, value).await {
        tracing::error!(%error, action, "cannot write an audit entry");
    }
}
