//! The audit log: an append-only record of grants, revocations and pairings, in the
//! store's `Audit` keyspace under `unix ms (u64 BE) ‖ seq (u32 BE)`.
//!
//! It is kept by count and by age ([`Retention`]): the node's retention task prunes it at
//! start, every hour, and soon after every [`PRUNE_EVERY_APPENDS`] appends.

#[cfg(feature = "api")]
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hearth_storage::{Batch, Keyspace, StoreHandle};
use serde::Serialize;

/// Disambiguates entries written within one millisecond.
static SEQ: AtomicU32 = AtomicU32::new(0);
/// Appends in this process since start. The append path holds only a store handle (it is
/// called from every service), so it cannot reach its node's retention task directly; it
/// wakes every node's task through [`PRUNE`] instead, and each prunes its own store.
static APPENDS: AtomicU64 = AtomicU64::new(0);
/// Wakes the retention tasks after [`PRUNE_EVERY_APPENDS`] appends.
pub(crate) static PRUNE: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// How many appends may pass between prunes: the log may exceed its count limit by at
/// most this many entries until the next prune.
pub(crate) const PRUNE_EVERY_APPENDS: u64 = 64;

/// Length of a key: `ms ‖ seq`.
#[cfg(feature = "api")]
const KEY_LEN: usize = 12;

/// How much of the audit log is kept.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Retention {
    pub(crate) max_entries: usize,
    pub(crate) max_age: Duration,
}

#[derive(Serialize)]
struct Entry<'a> {
    time: crate::Timestamp,
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
    let key = crate::records::audit_key(ms, SEQ.fetch_add(1, Ordering::Relaxed));
    let entry = Entry {
        time: crate::core::rfc3339_ms(ms),
        action,
        actor,
        subject,
    };
    let value = match crate::records::to_json("audit entry", &entry) {
        Ok(v) => v,
        Err(error) => {
            tracing::error!(%error, action, "cannot encode an audit entry");
            return;
        }
    };
    if let Err(error) = store.put(Keyspace::Audit, key, value).await {
        tracing::error!(%error, action, "cannot write an audit entry");
        return;
    }
    if APPENDS.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY_APPENDS == PRUNE_EVERY_APPENDS - 1 {
        PRUNE.notify_waiters();
    }
}

/// How often the retention task prunes, besides at start and after appends.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The node's retention task: prunes the log at start, every [`PRUNE_INTERVAL`], and
/// whenever appends wake it, until `cancel` fires. At start and on the hourly tick it has
/// the core prune every room's chat too (the core also prunes a room as it appends).
pub(crate) async fn run_retention(
    store: StoreHandle,
    core: crate::core::CoreHandle,
    keep: Retention,
    cancel: tokio_util::sync::CancellationToken,
) {
    // The first tick is immediate: a node that was off for months prunes at start.
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ticked = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => true,
            _ = PRUNE.notified() => false,
        };
        if ticked {
            let pruned = core
                .call(|reply| crate::rooms::service::RoomRequest::PruneChat { reply })
                .await;
            match pruned {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::debug!(pruned = n, "chat pruned"),
                Ok(Err(error)) => tracing::warn!(%error, "cannot prune chat; will retry"),
                // The core stopped: the node is stopping too.
                Err(_) => return,
            }
        }
        match prune(&store, keep, crate::core::now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "audit log pruned"),
            Err(error) => tracing::warn!(%error, "cannot prune the audit log; will retry"),
        }
    }
}

/// Deletes entries older than `keep.max_age` before `now_ms`, then the oldest beyond
/// `keep.max_entries`. Returns how many went.
pub(crate) async fn prune(
    store: &StoreHandle,
    keep: Retention,
    now_ms: u64,
) -> Result<usize, crate::Error> {
    let max_age_ms = u64::try_from(keep.max_age.as_millis()).unwrap_or(u64::MAX);
    let oldest_kept_ms = now_ms.saturating_sub(max_age_ms);
    let keys = all_keys(store).await?;
    let too_old = keys
        .iter()
        .take_while(|k| key_ms(k) < oldest_kept_ms)
        .count();
    let over = keys.len().saturating_sub(keep.max_entries);
    let doomed = too_old.max(over);
    // Deleted in bounded batches, so one prune of a large log is not one huge write.
    for chunk in keys[..doomed].chunks(1024) {
        let mut batch = Batch::new();
        for key in chunk {
            batch.delete(Keyspace::Audit, key.clone());
        }
        store.batch(batch).await?;
    }
    Ok(doomed)
}

/// Every key of the log, oldest first.
async fn all_keys(store: &StoreHandle) -> Result<Vec<Vec<u8>>, crate::Error> {
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut scan = hearth_storage::Scan::all().limit(hearth_storage::MAX_SCAN_LIMIT);
        if let Some(key) = after.take() {
            scan = scan.after(key);
        }
        let page = store.scan(Keyspace::Audit, scan).await?;
        let full = page.len() >= hearth_storage::MAX_SCAN_LIMIT;
        after = page.last().map(|(k, _)| k.clone());
        keys.extend(page.into_iter().map(|(k, _)| k));
        if !full {
            return Ok(keys);
        }
    }
}

/// The time part of a key (0 for a key too short to hold one).
fn key_ms(key: &[u8]) -> u64 {
    key.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// One page of the log, oldest first, and the cursor of the next older page.
#[cfg(feature = "api")]
pub(crate) struct Page {
    pub(crate) entries: Vec<crate::shares::AuditEntry>,
    /// Pass as `before` for the entries older than these; `None` when there are none.
    pub(crate) next_before: Option<String>,
}

/// The newest `limit` entries from `since_ms` (Unix ms) on and before the cursor `before`
/// (a `next_before` of an earlier page), oldest first. A cursor that is not one is an
/// error that says so.
#[cfg(feature = "api")]
pub(crate) async fn page(
    store: &StoreHandle,
    since_ms: u64,
    before: Option<&str>,
    limit: usize,
) -> Result<Page, crate::Error> {
    let before = match before {
        None => None,
        Some(text) => Some(
            hex::decode(text)
                .ok()
                .filter(|k| k.len() == KEY_LEN)
                .ok_or_else(|| {
                    crate::Error::Invalid(format!(
                        "before {text:?} is not a cursor; pass the next_before of an earlier page"
                    ))
                })?,
        ),
    };
    // Keys only run forwards, so the newest `limit` before the cursor are the last ones a
    // forward scan keeps; the log is bounded by its retention, so the scan is too.
    let mut window: VecDeque<(Vec<u8>, Vec<u8>)> = VecDeque::with_capacity(limit.min(4096) + 1);
    let mut older = false;
    let mut after: Option<Vec<u8>> = None;
    'scan: loop {
        let mut scan = hearth_storage::Scan::all().limit(hearth_storage::MAX_SCAN_LIMIT);
        if let Some(key) = after.take() {
            scan = scan.after(key);
        } else if since_ms > 0 {
            scan = scan.after(since_start(since_ms));
        }
        let page = store.scan(Keyspace::Audit, scan).await?;
        let full = page.len() >= hearth_storage::MAX_SCAN_LIMIT;
        after = page.last().map(|(k, _)| k.clone());
        for entry in page {
            if before.as_ref().is_some_and(|b| entry.0 >= *b) {
                break 'scan;
            }
            window.push_back(entry);
            if window.len() > limit {
                window.pop_front();
                older = true;
            }
        }
        if !full {
            break;
        }
    }
    let next_before = if older {
        window.front().map(|(k, _)| hex::encode(k))
    } else {
        None
    };
    Ok(Page {
        entries: window.iter().map(|(k, v)| decode(k, v)).collect(),
        next_before,
    })
}

/// The scan start for entries at or after `since_ms`: keys are `ms ‖ seq`, so everything
/// from `since_ms` on sorts after this.
fn since_start(since_ms: u64) -> Vec<u8> {
    crate::records::audit_key_before(since_ms)
}

/// An entry as stored; one that does not decode is shown as such rather than hidden, at
/// the time its key gives.
fn decode(key: &[u8], value: &[u8]) -> crate::shares::AuditEntry {
    serde_json::from_slice(value).unwrap_or_else(|e| crate::shares::AuditEntry {
        time: crate::Timestamp::from_unix_ms(key_ms(key)),
        action: "unreadable".into(),
        actor: String::new(),
        subject: format!("entry {} does not decode: {e}", hex::encode(key)),
    })
}

/// The entries from `since_ms` (Unix ms) on, oldest first (the whole retained log).
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
            scan = scan.after(since_start(since_ms));
        }
        let page = store.scan(Keyspace::Audit, scan).await?;
        let full = page.len() >= hearth_storage::MAX_SCAN_LIMIT;
        out.extend(page.iter().map(|(k, v)| decode(k, v)));
        match page.last() {
            Some((key, _)) if full => after = Some(key.clone()),
            _ => break,
        }
    }
    Ok(out)
}

/// Reads a stored audit entry as the log does, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_entry(value: &[u8]) {
    let _ = decode(&[0; 16], value);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    /// Writes an entry stamped `ms`, as `record_by` would have then.
    async fn append_at(store: &StoreHandle, ms: u64, subject: &str) {
        let key = crate::records::audit_key(ms, SEQ.fetch_add(1, Ordering::Relaxed));
        let entry = Entry {
            time: crate::core::rfc3339_ms(ms),
            action: "test.entry",
            actor: "",
            subject,
        };
        let value = serde_json::to_vec(&entry).unwrap();
        store.put(Keyspace::Audit, key, value).await.unwrap();
    }

    fn subjects(entries: &[crate::shares::AuditEntry]) -> Vec<String> {
        entries.iter().map(|e| e.subject.clone()).collect()
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_entries_by_count() {
        let store = hearth_storage::open_in_memory().unwrap();
        let now = 1_000 * DAY_MS;
        for i in 0..30 {
            append_at(&store, now - 30 + i, &i.to_string()).await;
        }
        let keep = Retention {
            max_entries: 10,
            max_age: Duration::from_secs(90 * 86_400),
        };
        assert_eq!(prune(&store, keep, now).await.unwrap(), 20);
        let left = list(&store, 0).await.unwrap();
        let want: Vec<String> = (20..30).map(|i: i32| i.to_string()).collect();
        assert_eq!(subjects(&left), want);
        // Nothing more goes while the log is within its limits.
        assert_eq!(prune(&store, keep, now).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn prune_drops_entries_older_than_the_age_limit() {
        let store = hearth_storage::open_in_memory().unwrap();
        let now = 1_000 * DAY_MS;
        append_at(&store, now - 100 * DAY_MS, "ancient").await;
        append_at(&store, now - 91 * DAY_MS, "old").await;
        append_at(&store, now - 89 * DAY_MS, "recent").await;
        append_at(&store, now, "now").await;
        let keep = Retention {
            max_entries: 10_000,
            max_age: Duration::from_secs(90 * 86_400),
        };
        assert_eq!(prune(&store, keep, now).await.unwrap(), 2);
        assert_eq!(subjects(&list(&store, 0).await.unwrap()), ["recent", "now"]);
    }

    #[tokio::test]
    async fn appends_wake_the_retention_task() {
        let store = hearth_storage::open_in_memory().unwrap();
        let woken = PRUNE.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for i in 0..PRUNE_EVERY_APPENDS {
            record(&store, "test.entry", &i.to_string()).await;
        }
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("no prune after a full interval of appends");
    }

    #[cfg(feature = "api")]
    #[tokio::test]
    async fn pages_walk_back_from_the_newest() {
        let store = hearth_storage::open_in_memory().unwrap();
        let now = 1_000 * DAY_MS;
        for i in 0..25 {
            append_at(&store, now + i, &format!("{i:02}")).await;
        }
        let mut seen = Vec::new();
        let mut before: Option<String> = None;
        let mut pages = 0;
        loop {
            let p = page(&store, 0, before.as_deref(), 10).await.unwrap();
            pages += 1;
            let mut batch = subjects(&p.entries);
            batch.extend(seen);
            seen = batch;
            match p.next_before {
                Some(c) => before = Some(c),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let want: Vec<String> = (0..25).map(|i| format!("{i:02}")).collect();
        assert_eq!(seen, want);
        // The first page is the newest, oldest first within it.
        let first = page(&store, 0, None, 10).await.unwrap();
        assert_eq!(first.entries[0].subject, "15");
        // `since` bounds the walk: no cursor past the oldest entry asked for.
        let since = page(&store, now + 20, None, 10).await.unwrap();
        assert_eq!(since.entries.len(), 5);
        assert!(since.next_before.is_none());
        assert!(page(&store, 0, Some("zz"), 10).await.is_err());
    }
}
