//! Hybrid logical clock.
//!
//! An [`Hlc`] is `(wall_ms, counter, actor)`, compared in that order. The wall
//! part follows the physical clock when it moves forward; the counter orders
//! events that share a millisecond, or that happen while the physical clock
//! stands still or runs backwards; the actor breaks the remaining ties, as
//! DESIGN.md asks ("ties break by HLC, then by ActorId"). The order is total:
//! two distinct actors never produce equal values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Length of the actor part, matching [`crate::actor_bytes_for_peer`].
pub const HLC_ACTOR_LEN: usize = 16;

/// Default for [`HlcClock::with_max_drift`]: how far ahead of our own clock a
/// remote timestamp may be before it is refused. Without a bound, one peer with
/// a clock set to the year 3000 would drag every replica's clock there for good.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 5 * 60 * 1000;

/// A hybrid logical clock reading. `Ord` is the total order used for
/// latest-wins decisions.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, never behind any reading seen before.
    pub wall_ms: u64,
    /// Logical counter within one `wall_ms`.
    pub counter: u32,
    /// Actor (device) that produced the reading.
    pub actor: [u8; HLC_ACTOR_LEN],
}

/// Length of [`Hlc`]'s text form: 16 + 1 + 8 + 1 + 32.
const TEXT_LEN: usize = 58;

impl Hlc {
    /// The smallest reading, below anything a clock produces.
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        counter: 0,
        actor: [0; HLC_ACTOR_LEN],
    };
}

impl fmt::Display for Hlc {
    /// Fixed-width lowercase hex, so that comparing the text compares the
    /// clocks; this is the form stored inside documents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:08x}-", self.wall_ms, self.counter)?;
        for b in self.actor {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({self})")
    }
}

impl FromStr for Hlc {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Parse {
            what: "hybrid logical clock",
            reason: reason.to_owned(),
        };
        // Check the shape before slicing so that no input can index out of
        // bounds or split a multi-byte character.
        let bytes = s.as_bytes();
        if bytes.len() != TEXT_LEN || bytes[16] != b'-' || bytes[25] != b'-' {
            return Err(bad(
                "expected 16 hex digits, '-', 8 hex digits, '-', 32 hex digits",
            ));
        }
        if !bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 16 || i == 25 || matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad("non-hex digit"));
        }
        let wall_ms = u64::from_str_radix(&s[..16], 16).map_err(|e| bad(&e.to_string()))?;
        let counter = u32::from_str_radix(&s[17..25], 16).map_err(|e| bad(&e.to_string()))?;
        let mut actor = [0u8; HLC_ACTOR_LEN];
        for (i, slot) in actor.iter_mut().enumerate() {
            let at = 26 + 2 * i;
            *slot = u8::from_str_radix(&s[at..at + 2], 16).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(Hlc {
            wall_ms,
            counter,
            actor,
        })
    }
}

/// A node's clock. The caller supplies physical time on every call (the crate
/// is sans-IO), so tests can drive skew and backwards jumps directly.
#[derive(Clone, Debug)]
pub struct HlcClock {
    actor: [u8; HLC_ACTOR_LEN],
    last_wall: u64,
    last_counter: u32,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock for `actor` with [`DEFAULT_MAX_DRIFT_MS`].
    pub fn new(actor: [u8; HLC_ACTOR_LEN]) -> Self {
        Self {
            actor,
            last_wall: 0,
            last_counter: 0,
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
        }
    }

    /// Sets how far ahead a remote reading may be, see [`DEFAULT_MAX_DRIFT_MS`].
    pub fn with_max_drift(mut self, max_drift_ms: u64) -> Self {
        self.max_drift_ms = max_drift_ms;
        self
    }

    /// The actor stamped into every reading.
    pub fn actor(&self) -> [u8; HLC_ACTOR_LEN] {
        self.actor
    }

    /// The last reading produced or observed, without advancing.
    pub fn last(&self) -> Hlc {
        Hlc {
            wall_ms: self.last_wall,
            counter: self.last_counter,
            actor: self.actor,
        }
    }

    /// A new reading, strictly greater than every reading this clock produced
    /// or observed before, whatever `physical_ms` says.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        if physical_ms > self.last_wall {
            self.last_wall = physical_ms;
            self.last_counter = 0;
        } else {
            self.bump();
        }
        self.last()
    }

    /// Folds in a reading from another replica so that later local readings
    /// sort after it. Refuses readings that would move the clock further ahead
    /// of `physical_ms` than the drift bound, and leaves the clock untouched in
    /// that case.
    pub fn observe(&mut self, remote: &Hlc, physical_ms: u64) -> Result<()> {
        let newer = (remote.wall_ms, remote.counter) > (self.last_wall, self.last_counter);
        // The bound is measured from physical time alone. Measured from the
        // clock's own last reading, each admitted reading would raise the
        // bound it was checked against, and a writer could walk every replica
        // forward by the drift bound on every write.
        if newer && remote.wall_ms > physical_ms.saturating_add(self.max_drift_ms) {
            return Err(Error::ClockDrift {
                ahead_ms: remote.wall_ms - physical_ms,
                max_ms: self.max_drift_ms,
            });
        }
        if newer {
            self.last_wall = remote.wall_ms;
            self.last_counter = remote.counter;
        }
        Ok(())
    }

    fn bump(&mut self) {
        match self.last_counter.checked_add(1) {
            Some(c) => self.last_counter = c,
            // Four billion events in one millisecond: borrow the next
            // millisecond rather than wrap, which would break monotonicity.
            None => {
                self.last_wall = self.last_wall.saturating_add(1);
                self.last_counter = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: [u8; 16] = [1; 16];
    const B: [u8; 16] = [2; 16];

    #[test]
    fn readings_increase_when_the_physical_clock_goes_backwards() {
        let mut c = HlcClock::new(A);
        let t1 = c.now(10_000);
        let t2 = c.now(5_000);
        let t3 = c.now(5_000);
        assert!(t1 < t2 && t2 < t3);
        assert_eq!(
            t3.wall_ms, 10_000,
            "wall time must not follow the clock backwards"
        );
        let t4 = c.now(10_001);
        assert_eq!((t4.wall_ms, t4.counter), (10_001, 0));
    }

    #[test]
    fn observing_a_skewed_peer_orders_later_local_events_after_it() {
        let mut fast = HlcClock::new(A);
        let mut slow = HlcClock::new(B);
        // The fast peer is 30 s ahead.
        let remote = fast.now(130_000);
        slow.observe(&remote, 100_000).unwrap();
        let local = slow.now(100_001);
        assert!(local > remote);
        assert_eq!(local.wall_ms, 130_000);
    }

    #[test]
    fn readings_too_far_ahead_are_refused_and_leave_the_clock_alone() {
        let mut c = HlcClock::new(A).with_max_drift(1_000);
        let before = c.now(50_000);
        let wild = Hlc {
            wall_ms: u64::MAX,
            counter: 0,
            actor: B,
        };
        assert!(matches!(
            c.observe(&wild, 50_000),
            Err(Error::ClockDrift { .. })
        ));
        assert_eq!(c.last(), before);
    }

    #[test]
    fn readings_just_inside_the_bound_cannot_walk_the_clock_forward() {
        const MINUTE: u64 = 60_000;
        let drift = 5 * MINUTE;
        let mut c = HlcClock::new(A).with_max_drift(drift);
        let physical = 1_000_000_000;
        c.now(physical);
        // Each reading is 4 minutes ahead of the last one the clock took in, so
        // it is always within the bound of the clock's own last reading.
        let mut admitted = 0;
        for step in 1..=20u64 {
            let remote = Hlc {
                wall_ms: c.last().wall_ms + 4 * MINUTE,
                counter: 0,
                actor: B,
            };
            // Physical time moves a little between writes.
            if c.observe(&remote, physical + step * 10).is_ok() {
                admitted += 1;
            }
            assert!(
                c.last().wall_ms <= physical + step * 10 + drift,
                "step {step}: clock at {} ms past physical",
                c.last().wall_ms - physical
            );
        }
        assert_eq!(admitted, 1, "only the first reading is within the bound");
        // A reading behind the clock's last one changes nothing and is not an error.
        let old = Hlc {
            wall_ms: physical + MINUTE,
            counter: 0,
            actor: B,
        };
        let before = c.last();
        c.observe(&old, physical).unwrap();
        assert_eq!(c.last(), before);
    }

    #[test]
    fn counter_overflow_borrows_the_next_millisecond() {
        let mut c = HlcClock::new(A);
        c.observe(
            &Hlc {
                wall_ms: 7,
                counter: u32::MAX,
                actor: B,
            },
            7,
        )
        .unwrap();
        let next = c.now(7);
        assert_eq!((next.wall_ms, next.counter), (8, 0));
    }

    #[test]
    fn ties_break_by_actor() {
        let a = Hlc {
            wall_ms: 5,
            counter: 1,
            actor: A,
        };
        let b = Hlc { actor: B, ..a };
        assert!(a < b);
        assert_ne!(a, b);
    }

    #[test]
    fn text_form_rejects_malformed_input() {
        for bad in [
            "",
            "zz",
            "000000000000000a-00000001-0101010101010101010101010101010",
            "000000000000000A-00000001-01010101010101010101010101010101",
            "000000000000000a+00000001-01010101010101010101010101010101",
            "000000000000000a-0000000é-01010101010101010101010101010101",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad:?} parsed");
        }
    }

    fn arb_hlc() -> impl Strategy<Value = Hlc> {
        (any::<u64>(), any::<u32>(), any::<[u8; 16]>()).prop_map(|(wall_ms, counter, actor)| Hlc {
            wall_ms,
            counter,
            actor,
        })
    }

    proptest! {
        #[test]
        fn text_round_trips_and_preserves_order(a in arb_hlc(), b in arb_hlc()) {
            let (ta, tb) = (a.to_string(), b.to_string());
            prop_assert_eq!(ta.parse::<Hlc>().unwrap(), a);
            prop_assert_eq!(ta.cmp(&tb), a.cmp(&b));
        }

        #[test]
        fn cbor_round_trips(a in arb_hlc()) {
            let mut buf = Vec::new();
            ciborium::into_writer(&a, &mut buf).unwrap();
            let back: Hlc = ciborium::from_reader(&buf[..]).unwrap();
            prop_assert_eq!(back, a);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,80}") {
            let _ = s.parse::<Hlc>();
        }

        /// Any mix of local events and observed remote readings, under any
        /// sequence of physical times (skewed, frozen or going backwards),
        /// yields strictly increasing local readings that sort after
        /// everything observed.
        #[test]
        fn monotonic_under_skew_and_backwards_clocks(
            steps in proptest::collection::vec((0u64..1_000_000, any::<bool>(), 0u64..2_000_000, any::<u32>()), 1..200)
        ) {
            let mut clock = HlcClock::new(A).with_max_drift(1_500_000);
            let mut last_local: Option<Hlc> = None;
            let mut max_seen: Option<Hlc> = None;
            for (physical, remote_event, remote_wall, remote_counter) in steps {
                if remote_event {
                    let remote = Hlc { wall_ms: remote_wall, counter: remote_counter, actor: B };
                    if clock.observe(&remote, physical).is_ok() {
                        max_seen = max_seen.max(Some(remote));
                    }
                } else {
                    let t = clock.now(physical);
                    if let Some(prev) = last_local {
                        prop_assert!(t > prev);
                    }
                    if let Some(seen) = max_seen {
                        prop_assert!((t.wall_ms, t.counter) > (seen.wall_ms, seen.counter));
                    }
                    prop_assert!(t.wall_ms >= physical);
                    last_local = Some(t);
                }
            }
        }
    }
}
