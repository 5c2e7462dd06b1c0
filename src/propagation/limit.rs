//! How many events each device may make this one deliver: a token bucket per sender, so
//! a device of the home that floods events costs a bounded amount of work here and the
//! rest is dropped. Plain state with the time passed in, so tests need no clock.

use std::collections::HashMap;

/// Events a device may send per second, sustained.
pub(crate) const EVENTS_PER_SECOND: u64 = 50;
/// Events a device may send in one burst.
pub(crate) const EVENT_BURST: u64 = 100;
/// Senders tracked at once; the table is bounded however many devices come and go.
const MAX_SENDERS: usize = 256;
/// At most one log line per sender per this many ms about dropped events.
const LOG_EVERY_MS: u64 = 10_000;

/// What the limiter says about one event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it.
    Take,
    /// Drop it; `log` carries how many were dropped since the last line, when a line is due.
    Drop { log: Option<u64> },
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Tokens, in thousandths, so refills of less than one event per ms add up.
    milli: u64,
    last_ms: u64,
    dropped: u64,
    logged_ms: Option<u64>,
}

/// Token buckets per sender.
#[derive(Default)]
pub(crate) struct RateLimit {
    buckets: HashMap<String, Bucket>,
}

impl RateLimit {
    /// Counts one event from `peer` at `now_ms`.
    pub(crate) fn check(&mut self, peer: &str, now_ms: u64) -> Verdict {
        if !self.buckets.contains_key(peer) && self.buckets.len() >= MAX_SENDERS {
            // Full buckets carry no memory worth keeping: a sender with one starts
            // afresh exactly as it would be.
            self.buckets
                .retain(|_, b| b.milli + refill(b.last_ms, now_ms) < EVENT_BURST * 1000);
            if self.buckets.len() >= MAX_SENDERS {
                return Verdict::Drop { log: None };
            }
        }
        let bucket = self.buckets.entry(peer.to_string()).or_insert(Bucket {
            milli: EVENT_BURST * 1000,
            last_ms: now_ms,
            dropped: 0,
            logged_ms: None,
        });
        bucket.milli = (bucket.milli + refill(bucket.last_ms, now_ms)).min(EVENT_BURST * 1000);
        bucket.last_ms = bucket.last_ms.max(now_ms);
        if bucket.milli >= 1000 {
            bucket.milli -= 1000;
            return Verdict::Take;
        }
        bucket.dropped += 1;
        let due = bucket
            .logged_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= LOG_EVERY_MS);
        if due {
            bucket.logged_ms = Some(now_ms);
            let dropped = std::mem::take(&mut bucket.dropped);
            return Verdict::Drop { log: Some(dropped) };
        }
        Verdict::Drop { log: None }
    }
}

/// Thousandths of a token earned between `from_ms` and `to_ms`.
fn refill(from_ms: u64, to_ms: u64) -> u64 {
    to_ms
        .saturating_sub(from_ms)
        .saturating_mul(EVENTS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_sustained_rate_and_no_more() {
        let mut limit = RateLimit::default();
        let t0 = 1_000_000;
        for i in 0..EVENT_BURST {
            assert_eq!(limit.check("a", t0), Verdict::Take, "event {i}");
        }
        // The first drop is logged with its count; the next ones are not, for a while.
        assert_eq!(limit.check("a", t0), Verdict::Drop { log: Some(1) });
        assert_eq!(limit.check("a", t0), Verdict::Drop { log: None });
        // Another sender has its own bucket.
        assert_eq!(limit.check("b", t0), Verdict::Take);
        // One second later, the rate's worth passes again, and no more.
        let t1 = t0 + 1000;
        let taken = (0..EVENT_BURST)
            .filter(|_| limit.check("a", t1) == Verdict::Take)
            .count();
        assert_eq!(taken as u64, EVENTS_PER_SECOND);
        // The next log line, once due, counts every drop since the last one.
        let t2 = t0 + LOG_EVERY_MS;
        for _ in 0..EVENT_BURST {
            limit.check("a", t2);
        }
        // One drop after the first line at t0, fifty at t1, and this one.
        assert_eq!(limit.check("a", t2), Verdict::Drop { log: Some(52) });
    }

    #[test]
    fn the_table_of_senders_is_bounded() {
        let mut limit = RateLimit::default();
        for i in 0..MAX_SENDERS {
            // Each sender spends a token, so none of them is full and forgettable.
            assert_eq!(limit.check(&format!("p{i}"), 0), Verdict::Take);
        }
        assert_eq!(limit.check("late", 0), Verdict::Drop { log: None });
        assert!(limit.buckets.len() <= MAX_SENDERS);
        // Once they have refilled, their buckets make room.
        assert_eq!(limit.check("late", 10_000), Verdict::Take);
        assert!(limit.buckets.len() <= MAX_SENDERS);
    }
}
