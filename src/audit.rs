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
    #[serde(skip_serializing_if = "str::is_empty")]
    actor: &'a str,
    subject: &'a str,
}

/// Appends an entry done by this device. A failure is logged, not returned: the action it
/// records has already happened, and refusing it after the fact would help no one.
pub(crate) async fn record(store: &StoreHandle, action: &str, subject: &str) {
    record_by(store, "", action, subject).await;
}

/// Appends an entry, naming the actor: the remote device whose request it was, or this
/// device (empty for the node itself).
pub(crate) async fn record_by(store: &StoreHandle, actor: &str, action: &str, subject: &str) {
    let ms = crate::core::now_ms();
    let mut key = ms.to_be_bytes().to_vec();
    key.extend_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let entry = Entry {
        time: crate::core::rfc3339_ms(ms),
        action,
        actor,
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

/// The entries from `since_ms` (Unix ms) on, oldest first. An entry that does not decode
/// is shown as such rather than hidden.
pub(crate) async fn list(
    store: &StoreHandle,
    since_ms: u64,
) -> Result<Vec<crate::shares::AuditEntry>, crate::Error> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut scan = hearth_storage::Scan::all().limit(hearth_storage::MAX_SCAN_LIMIT);
        if let Some(key) = after.take() {
            scan = scan.after(key);
        } else if since_ms > 0 {
            // Keys are `ms ‖ seq`; everything at or after `since_ms` sorts after this.
            let mut start = (since_ms - 1).to_be_bytes().to_vec();
            start.extend_from_slice(&u32::MAX.to_be_bytes());
            scan = scan.after(start);
        }
        let page = store.scan(Keyspace::Audit, scan).await?;
        let full = page.len() >= hearth_storage::MAX_SCAN_LIMIT;
        for (key, value) in &page {
            out.push(
                serde_json::from_slice(value).unwrap_or_else(|e| crate::shares::AuditEntry {
                    time: String::new(),
                    action: "unreadable".into(),
                    actor: String::new(),
                    subject: format!("entry {} does not decode: {e}", hex::encode(key)),
                }),
            );
        }
        match page.last() {
            Some((key, _)) if full => after = Some(key.clone()),
            _ => break,
        }
    }
    Ok(out)
}
