//! The sender's outbox: the alerts this device raised, with a receipt per target, and
//! when to send each unsettled one again. Plain state with the time passed in, so the
//! tests need no clock; the service stores each record as its receipts change.
//!
//! Retries back off only while the target is connected: a copy due for a device that is
//! not connected waits, with no timer, until the device is admitted again, and then goes
//! at once with the backoff reset ([`Outbox::reconnected`]).

use std::collections::{BTreeMap, BTreeSet};

use super::{AlertRecord, MAX_SENT_KEPT, ReceiptState};
use crate::types::Timestamp;

/// The first wait before sending an unacknowledged alert again.
pub(crate) const RETRY_FIRST_MS: u64 = 1_000;
/// The longest wait between copies to a connected device.
pub(crate) const RETRY_MAX_MS: u64 = 30_000;

/// When to send one receipt's alert again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Retry {
    /// `None`: waiting for the device to connect.
    next_at: Option<u64>,
    backoff_ms: u64,
}

impl Retry {
    fn now(now: u64) -> Self {
        Self {
            next_at: Some(now),
            backoff_ms: RETRY_FIRST_MS,
        }
    }
}

struct SentAlert {
    record: AlertRecord,
    /// One per receipt, in the same order.
    retry: Vec<Retry>,
}

impl SentAlert {
    fn is_open(&self) -> bool {
        self.record.receipts.iter().any(|r| !r.state.is_settled())
    }
}

/// The alerts this device sent.
#[derive(Default)]
pub(crate) struct Outbox {
    alerts: BTreeMap<String, SentAlert>,
}

impl Outbox {
    /// Adds an alert (new, or loaded from the store); its unsettled receipts are due now.
    pub(crate) fn insert(&mut self, record: AlertRecord, now: u64) {
        let retry = record.receipts.iter().map(|_| Retry::now(now)).collect();
        self.alerts
            .insert(record.alert.id.clone(), SentAlert { record, retry });
    }

    pub(crate) fn get(&self, id: &str) -> Option<&AlertRecord> {
        self.alerts.get(id).map(|a| &a.record)
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.alerts.contains_key(id)
    }

    pub(crate) fn records(&self) -> impl Iterator<Item = &AlertRecord> {
        self.alerts.values().map(|a| &a.record)
    }

    /// Alerts with a receipt that is neither acknowledged, declined nor expired.
    pub(crate) fn open_count(&self) -> usize {
        self.alerts.values().filter(|a| a.is_open()).count()
    }

    /// The copies due by `now` for devices that are `connected`, as (alert id, device),
    /// each counted as an attempt and given its next time by the backoff; a first copy
    /// turns its receipt `delivered`. Copies due for devices that are not connected wait
    /// for [`Outbox::reconnected`]. Also returns the alerts whose receipts changed.
    pub(crate) fn take_due(
        &mut self,
        now: u64,
        connected: impl Fn(&str) -> bool,
    ) -> (Vec<(String, String)>, BTreeSet<String>) {
        let mut due = Vec::new();
        let mut changed = BTreeSet::new();
        for (id, alert) in &mut self.alerts {
            for (receipt, retry) in alert.record.receipts.iter_mut().zip(&mut alert.retry) {
                if receipt.state.is_settled() || retry.next_at.is_none_or(|at| at > now) {
                    continue;
                }
                if !connected(&receipt.device) {
                    retry.next_at = None;
                    continue;
                }
                receipt.attempts = receipt.attempts.saturating_add(1);
                if receipt.state == ReceiptState::Pending {
                    receipt.state = ReceiptState::Delivered;
                    receipt.delivered_at = Some(Timestamp::from_unix_ms(now));
                    changed.insert(id.clone());
                }
                retry.next_at = Some(now + retry.backoff_ms);
                retry.backoff_ms = (retry.backoff_ms * 2).min(RETRY_MAX_MS);
                due.push((id.clone(), receipt.device.to_string()));
            }
        }
        (due, changed)
    }

    /// `device` was admitted (again): its unsettled alerts are due now, with the backoff
    /// reset. Whether it has any.
    pub(crate) fn reconnected(&mut self, device: &str, now: u64) -> bool {
        let mut any = false;
        for alert in self.alerts.values_mut() {
            for (receipt, retry) in alert.record.receipts.iter_mut().zip(&mut alert.retry) {
                if receipt.device == device && !receipt.state.is_settled() {
                    *retry = Retry::now(now);
                    any = true;
                }
            }
        }
        any
    }

    /// Takes `device`'s answer to alert `id`: the receipt turns `acknowledged` (or
    /// `declined`). `Ok(false)` for a receipt already settled (a repeated answer);
    /// `Err` when `device` is no target of the alert, or the alert is unknown here.
    pub(crate) fn answer(
        &mut self,
        id: &str,
        device: &str,
        accepted: bool,
        now: u64,
    ) -> Result<bool, &'static str> {
        let alert = self
            .alerts
            .get_mut(id)
            .ok_or("an answer to no alert of this device")?;
        let receipt = alert
            .record
            .receipts
            .iter_mut()
            .find(|r| r.device == device)
            .ok_or("an answer from a device the alert was not for")?;
        if receipt.state.is_settled() {
            return Ok(false);
        }
        receipt.state = if accepted {
            ReceiptState::Acknowledged
        } else {
            ReceiptState::Declined
        };
        receipt.acknowledged_at = Some(Timestamp::from_unix_ms(now));
        Ok(true)
    }

    /// Turns every unsettled receipt of an alert past its expiry `expired`; returns the
    /// alerts that changed.
    pub(crate) fn expire(&mut self, now: u64) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for (id, alert) in &mut self.alerts {
            if alert.record.alert.expires_at.unix_ms() > now {
                continue;
            }
            for receipt in &mut alert.record.receipts {
                if !receipt.state.is_settled() {
                    receipt.state = ReceiptState::Expired;
                    changed.insert(id.clone());
                }
            }
        }
        changed
    }

    /// When something is next due: a copy for a connected device, or an open alert's
    /// expiry.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut earlier = |at: u64| next = Some(next.map_or(at, |n| n.min(at)));
        for alert in self.alerts.values().filter(|a| a.is_open()) {
            earlier(alert.record.alert.expires_at.unix_ms());
            for (receipt, retry) in alert.record.receipts.iter().zip(&alert.retry) {
                if let (false, Some(at)) = (receipt.state.is_settled(), retry.next_at) {
                    earlier(at);
                }
            }
        }
        next
    }

    /// Drops the oldest settled alerts past [`MAX_SENT_KEPT`]; returns their ids, for
    /// their records to be deleted.
    pub(crate) fn prune(&mut self) -> Vec<String> {
        let excess = self.alerts.len().saturating_sub(MAX_SENT_KEPT);
        if excess == 0 {
            return Vec::new();
        }
        let mut settled: Vec<(u64, String)> = self
            .alerts
            .iter()
            .filter(|(_, a)| !a.is_open())
            .map(|(id, a)| (a.record.alert.sent_at.unix_ms(), id.clone()))
            .collect();
        settled.sort();
        settled.truncate(excess);
        for (_, id) in &settled {
            self.alerts.remove(id);
        }
        settled.into_iter().map(|(_, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{Alert, AlertSource, Direction, Receipt, Severity};

    fn record(id: &str, sent_at: u64, ttl_ms: u64, targets: &[&str]) -> AlertRecord {
        AlertRecord {
            alert: Alert {
                id: id.into(),
                message: "smoke".into(),
                severity: Severity::Critical,
                ttl_s: ttl_ms / 1000,
                sent_at: Timestamp::from_unix_ms(sent_at),
                expires_at: Timestamp::from_unix_ms(sent_at + ttl_ms),
                source: AlertSource {
                    home: "home".into(),
                    device: "me".into(),
                },
            },
            direction: Direction::Sent,
            received_at: None,
            receipts: targets
                .iter()
                .map(|t| Receipt {
                    device: (*t).into(),
                    home: "home".into(),
                    state: ReceiptState::Pending,
                    attempts: 0,
                    delivered_at: None,
                    acknowledged_at: None,
                })
                .collect(),
        }
    }

    fn state(outbox: &Outbox, id: &str, device: &str) -> (ReceiptState, u32) {
        let r = outbox
            .get(id)
            .unwrap()
            .receipts
            .iter()
            .find(|r| r.device == device)
            .unwrap();
        (r.state, r.attempts)
    }

    #[test]
    fn connected_targets_get_it_at_once_then_with_a_growing_backoff_until_they_ack() {
        let mut outbox = Outbox::default();
        outbox.insert(record("a1", 0, 3_600_000, &["b", "c"]), 0);
        let (due, changed) = outbox.take_due(0, |d| d == "b");
        assert_eq!(due, [("a1".to_string(), "b".to_string())]);
        assert!(changed.contains("a1"));
        assert_eq!(state(&outbox, "a1", "b"), (ReceiptState::Delivered, 1));
        // C is not connected: it waits, with no timer, so only B's retry is due next.
        assert_eq!(state(&outbox, "a1", "c"), (ReceiptState::Pending, 0));
        assert_eq!(outbox.next_deadline(), Some(RETRY_FIRST_MS));
        // Retries at 1 s, then 2 s later, then 4 s later, ... capped.
        let mut at = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let next = outbox.next_deadline().unwrap();
            waits.push(next - at);
            at = next;
            let (due, _) = outbox.take_due(at, |d| d == "b");
            assert_eq!(due.len(), 1);
        }
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        // Nothing is due between retries.
        assert!(outbox.take_due(at + 1, |_| true).0.is_empty());
        // B acknowledges: settled, and no more copies; a repeated ack changes nothing.
        assert_eq!(outbox.answer("a1", "b", true, at + 5), Ok(true));
        assert_eq!(outbox.answer("a1", "b", true, at + 6), Ok(false));
        assert_eq!(state(&outbox, "a1", "b").0, ReceiptState::Acknowledged);
        assert!(
            outbox
                .take_due(at + 100_000, |_| true)
                .0
                .iter()
                .all(|(_, d)| d != "b")
        );
    }

    #[test]
    fn a_device_that_returns_gets_its_pending_alerts_at_once() {
        let mut outbox = Outbox::default();
        outbox.insert(record("a1", 0, 3_600_000, &["c"]), 0);
        outbox.insert(record("a2", 10, 3_600_000, &["c"]), 10);
        assert!(outbox.take_due(20, |_| false).0.is_empty());
        // Only the expiries remain as deadlines while C is away.
        assert_eq!(outbox.next_deadline(), Some(3_600_000));
        assert!(outbox.reconnected("c", 5_000));
        let (due, _) = outbox.take_due(5_000, |_| true);
        assert_eq!(due.len(), 2);
        assert!(!outbox.reconnected("nobody", 5_000));
    }

    #[test]
    fn answers_count_only_from_the_targets_they_name() {
        let mut outbox = Outbox::default();
        outbox.insert(record("a1", 0, 60_000, &["b"]), 0);
        assert!(outbox.answer("a1", "mallory", true, 1).is_err());
        assert!(outbox.answer("nope", "b", true, 1).is_err());
        assert_eq!(state(&outbox, "a1", "b").0, ReceiptState::Pending);
        assert_eq!(outbox.answer("a1", "b", false, 1), Ok(true));
        assert_eq!(state(&outbox, "a1", "b").0, ReceiptState::Declined);
        assert_eq!(outbox.open_count(), 0);
    }

    #[test]
    fn unsettled_receipts_expire_with_their_alert_and_are_never_sent_after() {
        let mut outbox = Outbox::default();
        outbox.insert(record("a1", 0, 1_000, &["b", "c"]), 0);
        outbox.take_due(0, |d| d == "b");
        assert_eq!(outbox.answer("a1", "b", true, 10), Ok(true));
        assert!(outbox.expire(999).is_empty());
        assert_eq!(outbox.expire(1_000), BTreeSet::from(["a1".to_string()]));
        assert_eq!(state(&outbox, "a1", "b").0, ReceiptState::Acknowledged);
        assert_eq!(state(&outbox, "a1", "c").0, ReceiptState::Expired);
        outbox.reconnected("c", 2_000);
        assert!(outbox.take_due(2_000, |_| true).0.is_empty());
        assert_eq!(outbox.next_deadline(), None);
        assert_eq!(outbox.open_count(), 0);
    }

    #[test]
    fn only_settled_alerts_are_pruned_oldest_first() {
        let mut outbox = Outbox::default();
        // One open alert, the oldest, and more settled ones than are kept.
        outbox.insert(record("open", 0, 3_600_000, &["b"]), 0);
        for i in 0..MAX_SENT_KEPT as u64 + 2 {
            outbox.insert(record(&format!("s{i:04}"), 100 + i, 1_000, &[]), 0);
        }
        let pruned = outbox.prune();
        assert_eq!(pruned, ["s0000", "s0001", "s0002"]);
        assert!(outbox.contains("open"));
        assert_eq!(outbox.records().count(), MAX_SENT_KEPT);
    }
}
