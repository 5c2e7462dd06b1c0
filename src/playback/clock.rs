//! Clock offsets to the home's other devices, from NTP-style probes: this device sends a
//! probe at `t1` (its clock), the peer notes its arrival `t2` and its answer `t3` (the
//! peer's clock), and the answer arrives here at `t4`. Then
//!
//! - the round trip is `(t4 - t1) - (t3 - t2)`, the time spent on the wire both ways;
//! - the offset (the peer's clock minus this one's) is `((t2 - t1) + (t3 - t4)) / 2`;
//! - however the round trip splits between the two ways, the true offset lies within half
//!   the round trip of that estimate, which is the uncertainty reported.
//!
//! Of the last [`WINDOW`] samples per peer the one with the smallest round trip wins: a
//! sample that waited in a queue on either side has a longer round trip and a wider
//! bound, so filtering by round trip keeps the tightest. Plain state with the times passed
//! in (microseconds), so tests need no clock: each probe carries its wall-clock `t1` and a
//! monotonic reading, and `t4` is `t1` plus the monotonic time elapsed, so a step of the
//! wall clock between probe and answer cannot make a bogus sample.
//!
//! `t2` and `t3` come from the peer unchecked, so the arithmetic is done in `i128` and an
//! answer whose times are more than [`MAX_SKEW_US`] from this device's, or that claims to
//! have held the probe longer than the whole round trip, is refused.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::types::Timestamp;

/// Samples kept per peer; the one with the smallest round trip is used.
pub(crate) const WINDOW: usize = 8;
/// Samples a peer needs before probes go at the regular pace: until then each answer is
/// followed by the next probe at once, so a device just admitted has a filtered estimate
/// within a few round trips.
pub(crate) const WARMUP: u32 = 4;
/// Probes sent and not yet answered, per peer; an older one is forgotten.
const MAX_OUTSTANDING: usize = 4;
/// An answer later than this after its probe is not taken (µs).
const PROBE_EXPIRY_US: i64 = 10_000_000;
/// Peers tracked at once.
const MAX_PEERS: usize = 256;
/// An answer whose `t2` or `t3` is further than this from this device's `t1` or `t4` is
/// refused (µs): one day. A clock a day off is broken, not skewed.
pub(crate) const MAX_SKEW_US: i64 = 86_400_000_000;

/// The estimate of one peer's clock against this device's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClockEstimate {
    /// The peer's clock minus this device's, in ms (fractional).
    pub offset_ms: f64,
    /// The true offset lies within this many ms of `offset_ms`: half the round trip of
    /// the sample used.
    pub uncertainty_ms: f64,
    /// The round trip of the sample used, in ms.
    pub rtt_ms: f64,
    /// Samples in the window the estimate was chosen from.
    pub samples: u32,
    /// Samples taken from this peer since start.
    pub total_samples: u64,
    /// When the last sample was taken (this device's clock).
    pub updated_at: Timestamp,
}

/// One probe's four timestamps, in µs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) t1: i64,
    pub(crate) t2: i64,
    pub(crate) t3: i64,
    pub(crate) t4: i64,
}

impl Sample {
    /// Time on the wire both ways, µs; negative only for timestamps that cannot be.
    /// Computed wide and saturated, so any four times give an answer.
    pub(crate) fn rtt(&self) -> i64 {
        let [t1, t2, t3, t4] = self.wide();
        saturate((t4 - t1) - (t3 - t2))
    }

    /// The peer's clock minus this one's, µs.
    pub(crate) fn offset(&self) -> i64 {
        let [t1, t2, t3, t4] = self.wide();
        saturate(((t2 - t1) + (t3 - t4)) / 2)
    }

    fn wide(&self) -> [i128; 4] {
        [self.t1, self.t2, self.t3, self.t4].map(i128::from)
    }

    /// Whether the times can be: the peer answered after it was asked, held the probe no
    /// longer than the whole round trip, and its clock is within [`MAX_SKEW_US`] of this
    /// one's at both ends.
    fn possible(&self) -> bool {
        let [t1, t2, t3, t4] = self.wide();
        let bound = i128::from(MAX_SKEW_US);
        t3 >= t2
            && t4 >= t1
            && t3 - t2 <= t4 - t1
            && (t2 - t1).abs() <= bound
            && (t3 - t4).abs() <= bound
    }
}

/// `v` clamped into `i64`.
fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// What became of an answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// A sample was added; `more` when the peer is still warming up and the next probe
    /// should go at once.
    Sample { more: bool },
    /// No probe of this nonce is outstanding (late, repeated or made up).
    Unknown,
    /// Timestamps that cannot be (the peer answered before it was asked, held the probe
    /// longer than the round trip, or its clock is more than [`MAX_SKEW_US`] off).
    Impossible,
}

#[derive(Default)]
struct PeerClock {
    /// Nonce, wall-clock `t1` and monotonic time of each probe not yet answered.
    outstanding: VecDeque<(u64, i64, i64)>,
    samples: VecDeque<Sample>,
    total: u64,
    last_t4: i64,
}

/// Every peer's probes and samples.
#[derive(Default)]
pub(crate) struct ClockBook {
    peers: HashMap<String, PeerClock>,
    next_nonce: u64,
}

impl ClockBook {
    /// A probe to `peer` sent at `t1` (wall clock, µs), `mono` by a monotonic clock (µs):
    /// its nonce. `None` when the table of peers is full.
    pub(crate) fn probe(&mut self, peer: &str, t1: i64, mono: i64) -> Option<u64> {
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_PEERS {
            return None;
        }
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let nonce = self.next_nonce;
        let clock = self.peers.entry(peer.to_string()).or_default();
        if clock.outstanding.len() >= MAX_OUTSTANDING {
            clock.outstanding.pop_front();
        }
        clock.outstanding.push_back((nonce, t1, mono));
        Some(nonce)
    }

    /// The answer of `peer` to probe `nonce`, taken here at monotonic time `mono` (µs,
    /// the clock the probe's `mono` was read from): `t4` is the probe's `t1` plus the
    /// monotonic time elapsed.
    pub(crate) fn answer(&mut self, peer: &str, nonce: u64, t2: i64, t3: i64, mono: i64) -> Taken {
        let Some(clock) = self.peers.get_mut(peer) else {
            return Taken::Unknown;
        };
        let Some(at) = clock.outstanding.iter().position(|(n, ..)| *n == nonce) else {
            return Taken::Unknown;
        };
        let Some((_, t1, sent)) = clock.outstanding.remove(at) else {
            return Taken::Unknown;
        };
        let elapsed = mono.saturating_sub(sent);
        if elapsed > PROBE_EXPIRY_US {
            return Taken::Unknown;
        }
        let t4 = t1.saturating_add(elapsed);
        let sample = Sample { t1, t2, t3, t4 };
        if !sample.possible() {
            return Taken::Impossible;
        }
        if clock.samples.len() >= WINDOW {
            clock.samples.pop_front();
        }
        clock.samples.push_back(sample);
        clock.total += 1;
        clock.last_t4 = t4;
        Taken::Sample {
            more: clock.total < u64::from(WARMUP),
        }
    }

    /// The estimate for `peer`: the sample of the window with the smallest round trip.
    pub(crate) fn estimate(&self, peer: &str) -> Option<ClockEstimate> {
        let clock = self.peers.get(peer)?;
        let best = clock.samples.iter().min_by_key(|s| s.rtt())?;
        let rtt = best.rtt();
        Some(ClockEstimate {
            offset_ms: best.offset() as f64 / 1000.0,
            uncertainty_ms: rtt as f64 / 2000.0,
            rtt_ms: rtt as f64 / 1000.0,
            samples: clock.samples.len() as u32,
            total_samples: clock.total,
            updated_at: Timestamp::from_unix_ms((clock.last_t4.max(0) / 1000) as u64),
        })
    }

    /// Every peer with an estimate.
    pub(crate) fn all(&self) -> Vec<(String, ClockEstimate)> {
        let mut out: Vec<_> = self
            .peers
            .keys()
            .filter_map(|p| Some((p.clone(), self.estimate(p)?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Forgets a peer that left: its clock may be set anew before it returns.
    pub(crate) fn forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe over a path of `out` µs one way and `back` µs the other, to a peer whose
    /// clock is `skew` µs ahead, answered `hold` µs after it arrived.
    fn exchange(book: &mut ClockBook, t1: i64, skew: i64, out: i64, back: i64, hold: i64) -> Taken {
        let nonce = book.probe("p", t1, t1).unwrap();
        let t2 = t1 + out + skew;
        let t3 = t2 + hold;
        let t4 = t3 - skew + back;
        book.answer("p", nonce, t2, t3, t4)
    }

    #[test]
    fn a_symmetric_path_gives_the_exact_offset_and_half_the_round_trip() {
        let mut book = ClockBook::default();
        let taken = exchange(&mut book, 1_000_000, 2_500_000, 700, 700, 50);
        assert_eq!(taken, Taken::Sample { more: true });
        let e = book.estimate("p").unwrap();
        assert_eq!(e.offset_ms, 2500.0);
        assert_eq!(e.rtt_ms, 1.4);
        assert_eq!(e.uncertainty_ms, 0.7);
        assert_eq!(e.samples, 1);
    }

    #[test]
    fn the_sample_with_the_smallest_round_trip_wins() {
        let mut book = ClockBook::default();
        let skew = -1_234_000;
        // Queued on the way out (asymmetric, wide), then a clean one, then queued back.
        exchange(&mut book, 0, skew, 40_000, 500, 10);
        exchange(&mut book, 100_000, skew, 600, 400, 10);
        exchange(&mut book, 200_000, skew, 500, 30_000, 10);
        let e = book.estimate("p").unwrap();
        assert_eq!(e.rtt_ms, 1.0);
        // Off by half the asymmetry, within the reported bound.
        assert!((e.offset_ms - (-1234.0 + 0.1)).abs() < 1e-9, "{e:?}");
        assert!((e.offset_ms - (-1234.0)).abs() <= e.uncertainty_ms);
        assert_eq!(e.samples, 3);
    }

    #[test]
    fn the_true_offset_is_always_within_the_bound() {
        let mut book = ClockBook::default();
        let skew = 987_654;
        let mut t = 0;
        for (out, back) in [(1, 90_000), (50_000, 2), (3_000, 3_000), (7, 11), (400, 12)] {
            exchange(&mut book, t, skew, out, back, 123);
            t += 1_000_000;
            let e = book.estimate("p").unwrap();
            assert!(
                (e.offset_ms - skew as f64 / 1000.0).abs() <= e.uncertainty_ms + 0.001,
                "{e:?}"
            );
        }
    }

    #[test]
    fn the_window_keeps_the_last_samples_only() {
        let mut book = ClockBook::default();
        // A very good sample, then WINDOW worse ones push it out.
        exchange(&mut book, 0, 0, 10, 10, 0);
        for i in 1..=WINDOW as i64 {
            exchange(&mut book, i * 1_000_000, 0, 1_000, 1_000, 0);
        }
        let e = book.estimate("p").unwrap();
        assert_eq!(e.rtt_ms, 2.0);
        assert_eq!(e.samples, WINDOW as u32);
        assert_eq!(e.total_samples, WINDOW as u64 + 1);
    }

    #[test]
    fn warm_up_asks_for_more_until_enough_samples() {
        let mut book = ClockBook::default();
        for i in 1..=WARMUP as i64 + 1 {
            let taken = exchange(&mut book, i * 1000, 0, 10, 10, 0);
            assert_eq!(
                taken,
                Taken::Sample {
                    more: i < WARMUP as i64
                },
                "{i}"
            );
        }
    }

    #[test]
    fn unknown_late_repeated_and_impossible_answers_are_not_taken() {
        let mut book = ClockBook::default();
        assert_eq!(book.answer("p", 1, 0, 0, 0), Taken::Unknown);
        let nonce = book.probe("p", 1_000, 1_000).unwrap();
        assert_eq!(book.answer("q", nonce, 0, 0, 2_000), Taken::Unknown);
        assert_eq!(book.answer("p", nonce + 1, 0, 0, 2_000), Taken::Unknown);
        // Answered "before" it was asked by more than the round trip allows.
        assert_eq!(
            book.answer("p", nonce, 5_000, 7_000, 2_000),
            Taken::Impossible
        );
        // The nonce is used up either way.
        assert_eq!(book.answer("p", nonce, 1_500, 1_500, 2_000), Taken::Unknown);
        let nonce = book.probe("p", 3_000, 3_000).unwrap();
        assert_eq!(book.answer("p", nonce, 9, 8, 4_000), Taken::Impossible);
        let nonce = book.probe("p", 0, 0).unwrap();
        assert_eq!(
            book.answer("p", nonce, 1, 1, PROBE_EXPIRY_US + 1),
            Taken::Unknown
        );
        assert!(book.estimate("p").is_none());
        let nonce = book.probe("p", 10, 10).unwrap();
        assert_eq!(
            book.answer("p", nonce, 20, 20, 30),
            Taken::Sample { more: true }
        );
        assert_eq!(book.answer("p", nonce, 20, 20, 30), Taken::Unknown);
    }

    #[test]
    fn outstanding_probes_and_peers_are_bounded() {
        let mut book = ClockBook::default();
        let first = book.probe("p", 0, 0).unwrap();
        for i in 0..MAX_OUTSTANDING as i64 {
            book.probe("p", i, i).unwrap();
        }
        assert_eq!(book.answer("p", first, 1, 1, 10), Taken::Unknown);
        for i in 0..MAX_PEERS {
            book.probe(&format!("x{i}"), 0, 0);
        }
        assert!(book.probe("late", 0, 0).is_none());
        book.forget("x0");
        assert!(book.probe("late", 0, 0).is_some());
    }

    #[test]
    fn extreme_times_from_a_peer_are_refused_without_overflow() {
        let mut book = ClockBook::default();
        let t1 = 1_767_323_045_000_000;
        let day = MAX_SKEW_US;
        for (t2, t3, t4) in [
            (-1, i64::MAX, t1 + 10),
            (i64::MIN, i64::MAX, t1 + 10),
            (i64::MIN, i64::MIN, t1 + 10),
            (i64::MAX, i64::MAX, t1 + 10),
            (i64::MAX, i64::MIN, t1 + 10),
            (0, 0, t1 + 10),
            // A day and a bit off at either end.
            (t1 - day - 1, t1 - day - 1, t1 + 10),
            (t1 + day + 1, t1 + day + 2, t1 + 10),
            // Held longer than the whole round trip.
            (t1 + 1, t1 + 12, t1 + 10),
        ] {
            let nonce = book.probe("p", t1, 0).unwrap();
            let taken = book.answer("p", nonce, t2, t3, t4 - t1);
            assert_eq!(taken, Taken::Impossible, "{t2} {t3} {t4}");
        }
        assert!(book.estimate("p").is_none());
        // Just within a day either way is a (badly set) clock, and taken.
        let nonce = book.probe("p", t1, 0).unwrap();
        let taken = book.answer("p", nonce, t1 + day, t1 + day, 10);
        assert_eq!(taken, Taken::Sample { more: true });
        let e = book.estimate("p").unwrap();
        assert!(
            (e.offset_ms - (day - 5) as f64 / 1000.0).abs() < 1e-9,
            "{e:?}"
        );
        // The sums themselves never overflow, whatever the times.
        let wild = Sample {
            t1: i64::MIN,
            t2: i64::MAX,
            t3: i64::MIN,
            t4: i64::MAX,
        };
        assert_eq!(wild.rtt(), i64::MAX);
        assert_eq!(wild.offset(), 0);
        assert!(!wild.possible());
    }

    #[test]
    fn a_wall_clock_step_between_probe_and_answer_does_not_shorten_the_round_trip() {
        let mut book = ClockBook::default();
        // Sent at wall 10 s, monotonic 5 s; answered 3 ms later by the monotonic clock,
        // whatever the wall clock did meanwhile: t4 is 10.003 s.
        let nonce = book.probe("p", 10_000_000, 5_000_000).unwrap();
        let taken = book.answer("p", nonce, 10_001_000, 10_001_000, 5_003_000);
        assert_eq!(taken, Taken::Sample { more: true });
        let e = book.estimate("p").unwrap();
        assert_eq!(e.rtt_ms, 3.0);
        assert_eq!(e.offset_ms, -0.5);
        // A monotonic reading before the probe's cannot be.
        let nonce = book.probe("p", 10_000_000, 5_000_000).unwrap();
        assert_eq!(
            book.answer("p", nonce, 10_000_000, 10_000_000, 4_000_000),
            Taken::Impossible
        );
    }
}
