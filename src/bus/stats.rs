//! What the bus counts: per event name, per handler, and in total.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::SubscriptionId;

/// Counters for one event name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NameStats {
    /// Events published (after pre-middleware).
    pub published: u64,
    /// Handler calls and stream deliveries.
    pub delivered: u64,
    /// Handler calls that returned an error.
    pub handler_errors: u64,
    /// Handler calls that panicked.
    pub handler_panics: u64,
    /// Time spent in handlers, in total.
    pub handler_time: Duration,
    /// The longest single handler call.
    pub handler_time_max: Duration,
}

/// What the bus has done since it was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BusStats {
    /// Events published (after pre-middleware).
    pub published: u64,
    /// Events a pre-middleware dropped.
    pub dropped_by_middleware: u64,
    /// Events refused for a malformed name or correlation id.
    pub refused: u64,
    /// Streams closed because they fell a whole queue behind.
    pub streams_overflowed: u64,
    /// Per event name (at most [`MAX_STATS_NAMES`](super::MAX_STATS_NAMES), the rest under
    /// [`OTHER_NAMES`](super::OTHER_NAMES)).
    pub by_name: BTreeMap<String, NameStats>,
    /// Live subscriptions (handlers and streams).
    pub subscriptions: usize,
    /// Per live handler subscription, in priority order.
    pub handlers: Vec<HandlerStats>,
}

/// Counters for one handler subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HandlerStats {
    /// The subscription.
    pub subscription: SubscriptionId,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// Its priority.
    pub priority: i32,
    /// Calls.
    pub calls: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Calls that panicked.
    pub panics: u64,
    /// Time spent in it, in total.
    pub total_time: Duration,
    /// The longest single call.
    pub max_time: Duration,
}

impl HandlerStats {
    /// The mean time of one call (zero before the first).
    pub fn average_time(&self) -> Duration {
        match u32::try_from(self.calls) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.total_time / n,
            Err(_) => Duration::from_secs_f64(self.total_time.as_secs_f64() / self.calls as f64),
        }
    }
}
