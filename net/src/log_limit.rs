//! A budget for log lines that strangers can cause.
//!
//! Anyone on the LAN can connect, fail the hello, open refused streams or be refused a
//! connection, and each of those would otherwise write a log line: a flood of them fills
//! the disk and buries the lines that matter. Such lines go through a [`LogLimiter`],
//! which lets a burst through per interval and then counts what it held back, so the
//! next line (or the maintenance tick) can say how many were suppressed.

use std::time::{Duration, Instant};

/// Log lines caused by unadmitted peers written per [`UNADMITTED_LOG_INTERVAL`]; the
/// rest are counted and summarised.
pub const UNADMITTED_LOG_BURST: u32 = 20;

/// The window [`UNADMITTED_LOG_BURST`] applies to.
pub const UNADMITTED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// At most `burst` lines per `interval`, in fixed windows.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    used: u32,
    /// Lines held back and not yet reported.
    suppressed: u64,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write it; `suppressed` lines were held back since the last report, so say so.
    Log { suppressed: u64 },
    /// Drop it; it has been counted.
    Suppress,
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Starts a new window if the current one is over.
    fn roll(&mut self, now: Instant) {
        let over = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if over {
            self.window_start = Some(now);
            self.used = 0;
        }
    }

    /// Decides about one line at `now`.
    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
        self.roll(now);
        if self.used < self.burst {
            self.used += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Lines held back in a window that is now over, to be reported once; `None` while
    /// the window lasts or when nothing was held back. Lets a flood that stopped still
    /// get its summary without waiting for the next line.
    pub(crate) fn flush(&mut self, now: Instant) -> Option<u64> {
        if self.suppressed == 0 {
            return None;
        }
        let over = self
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) >= self.interval);
        if !over {
            return None;
        }
        self.window_start = Some(now);
        self.used = 0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_what_was_held_back() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut limiter = LogLimiter::new(3, Duration::from_secs(10));
        for _ in 0..3 {
            assert_eq!(limiter.check(start), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(limiter.check(start + second), Verdict::Suppress);
        }
        assert_eq!(limiter.flush(start + second * 9), None, "window not over");
        // The first line of the next window carries the count.
        assert_eq!(
            limiter.check(start + second * 10),
            Verdict::Log { suppressed: 5 }
        );
        assert_eq!(
            limiter.check(start + second * 10),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn flush_reports_a_flood_that_stopped() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(1, Duration::from_secs(10));
        assert_eq!(limiter.check(start), Verdict::Log { suppressed: 0 });
        assert_eq!(limiter.check(start), Verdict::Suppress);
        assert_eq!(limiter.check(start), Verdict::Suppress);
        assert_eq!(limiter.flush(start + Duration::from_secs(10)), Some(2));
        assert_eq!(limiter.flush(start + Duration::from_secs(30)), None);
        // Flushing opened a new window, so the next line is let through.
        assert_eq!(
            limiter.check(start + Duration::from_secs(31)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
