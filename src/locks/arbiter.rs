//! The lock arbiter: a plain state machine. Requests, releases and the clock go in;
//! decisions come out. It never waits and never touches the store or the network; the
//! locks service (`service.rs`) persists its table and announces what it decided.
//!
//! Rules (seed 004): a lower priority number is a higher priority. A request preempts a
//! held lock of lower priority; one of the same or lower priority is refused with the
//! holder's lock. Every grant is a lease with a secret key and a fencing token that only
//! grows (one counter for every device, also across releases). Releasing takes the key; the key of a
//! MAINTENANCE lock the same user holds (on any device) force-releases any lock. A lease
//! past its end is released at [`Arbiter::expire`], which the service runs on time.

use std::collections::BTreeMap;

use hearth_crdt::LockType;
use serde::{Deserialize, Serialize};

/// Longest lease a request may ask for: one day.
pub(crate) const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// Most locks held at once; a request for a new device past it is refused.
pub(crate) const MAX_LOCKS: usize = 4096;
/// Longest device name, user id, reason or plan uid.
pub(crate) const MAX_FIELD_LEN: usize = 256;

/// A held lock, as every reader sees it (never with its key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockRecord {
    pub(crate) device_name: String,
    pub(crate) lock_type: LockType,
    pub(crate) user_id: String,
    pub(crate) reason: Option<String>,
    pub(crate) plan_uid: Option<String>,
    pub(crate) fencing_token: u64,
    pub(crate) acquired_at_ms: u64,
    pub(crate) expires_at_ms: u64,
}

/// A request for a lock.
#[derive(Clone, Debug)]
pub(crate) struct Ask {
    pub(crate) device_name: String,
    pub(crate) lock_type: LockType,
    pub(crate) user_id: String,
    pub(crate) timeout_s: u64,
    pub(crate) reason: Option<String>,
    pub(crate) plan_uid: Option<String>,
}

/// What a request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Granted: the new lock, its key (for the requester only), and the lock it took
    /// over, if any.
    Granted {
        lock: LockRecord,
        key: String,
        preempted: Option<LockRecord>,
    },
    /// Refused: the holder's lock, and why.
    Refused { holder: LockRecord, message: String },
}

/// How a release ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// The holder released it with its key.
    ByHolder(LockRecord),
    /// A MAINTENANCE holder forced it.
    Forced(LockRecord),
}

/// Why a release or a request was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LockError {
    #[error("{0} is not locked")]
    NotLocked(String),
    #[error("the lock key does not match the lock on {0}")]
    WrongKey(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Held {
    lock: LockRecord,
    key: String,
}

/// The arbiter's whole state; serialised as is into the arbiter's store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Arbiter {
    held: BTreeMap<String, Held>,
    /// The last fencing token issued, on any device: one counter, so tokens only grow
    /// on every device and the table does not grow with every name ever locked.
    last_token: u64,
}

impl Arbiter {
    /// Every held lock, by device name.
    pub(crate) fn locks(&self) -> Vec<LockRecord> {
        self.held.values().map(|h| h.lock.clone()).collect()
    }

    /// The lock on `device`, if held.
    #[cfg(test)]
    pub(crate) fn lock(&self, device: &str) -> Option<&LockRecord> {
        self.held.get(device).map(|h| &h.lock)
    }

    /// An empty table whose next fencing token is above `floor`.
    pub(crate) fn starting_after(floor: u64) -> Self {
        Self {
            held: BTreeMap::new(),
            last_token: floor,
        }
    }

    /// The last fencing token issued.
    pub(crate) fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Checks a table that came from another device: within the caps, every lock under
    /// its own name, every field as a request would have it, tokens at most the counter.
    pub(crate) fn check(&self, now: u64) -> Result<(), String> {
        if self.held.len() > MAX_LOCKS {
            return Err(format!("a table of {} locks is refused", self.held.len()));
        }
        for (device, h) in &self.held {
            let l = &h.lock;
            let fields = [
                ("device_name", Some(&l.device_name), false),
                ("user_id", Some(&l.user_id), false),
                ("reason", l.reason.as_ref(), true),
                ("plan_uid", l.plan_uid.as_ref(), true),
            ];
            for (what, value, may_be_empty) in fields {
                if let Some(v) = value {
                    check_field(what, v, may_be_empty).map_err(|e| e.to_string())?;
                }
            }
            if *device != l.device_name
                || l.fencing_token > self.last_token
                || l.expires_at_ms > now.saturating_add(MAX_TIMEOUT_S * 1000 + 60_000)
                || h.key.len() != 32
                || !h.key.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(format!("the lock on {device} in the table is malformed"));
            }
        }
        Ok(())
    }

    /// When the next lease ends (ms since the epoch).
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.held.values().map(|h| h.lock.expires_at_ms).min()
    }

    /// Releases every lease that ended by `now`, and answers them.
    pub(crate) fn expire(&mut self, now: u64) -> Vec<LockRecord> {
        let ended: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.lock.expires_at_ms <= now)
            .map(|(d, _)| d.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|d| self.held.remove(&d).map(|h| h.lock))
            .collect()
    }

    /// Decides a request at `now`; `key` is the fresh secret a grant carries.
    pub(crate) fn request(
        &mut self,
        ask: Ask,
        now: u64,
        key: String,
    ) -> Result<Decision, LockError> {
        check_field("device_name", &ask.device_name, false)?;
        check_field("user_id", &ask.user_id, false)?;
        for (what, value) in [("reason", &ask.reason), ("plan_uid", &ask.plan_uid)] {
            if let Some(v) = value {
                check_field(what, v, true)?;
            }
        }
        if ask.timeout_s == 0 || ask.timeout_s > MAX_TIMEOUT_S {
            return Err(LockError::Invalid(format!(
                "timeout {} s is out of range; use 1 to {MAX_TIMEOUT_S}",
                ask.timeout_s
            )));
        }
        // A lease that ended is gone before anyone asks.
        if self
            .held
            .get(&ask.device_name)
            .is_some_and(|h| h.lock.expires_at_ms <= now)
        {
            self.held.remove(&ask.device_name);
        }
        let preempted = match self.held.get(&ask.device_name) {
            Some(h) if ask.lock_type.priority() < h.lock.lock_type.priority() => {
                Some(h.lock.clone())
            }
            Some(h) => {
                return Ok(Decision::Refused {
                    holder: h.lock.clone(),
                    message: format!(
                        "{} is locked by {} ({}, priority {}); a request of priority {} cannot take it",
                        ask.device_name,
                        h.lock.user_id,
                        h.lock.lock_type.as_str(),
                        h.lock.lock_type.priority(),
                        ask.lock_type.priority()
                    ),
                });
            }
            None if self.held.len() >= MAX_LOCKS => {
                return Err(LockError::Invalid(format!(
                    "{MAX_LOCKS} devices are locked already"
                )));
            }
            None => None,
        };
        let token = self.last_token.saturating_add(1);
        self.last_token = token;
        let lock = LockRecord {
            device_name: ask.device_name.clone(),
            lock_type: ask.lock_type,
            user_id: ask.user_id,
            reason: ask.reason,
            plan_uid: ask.plan_uid,
            fencing_token: token,
            acquired_at_ms: now,
            expires_at_ms: now.saturating_add(ask.timeout_s.saturating_mul(1000)),
        };
        self.held.insert(
            ask.device_name,
            Held {
                lock: lock.clone(),
                key: key.clone(),
            },
        );
        Ok(Decision::Granted {
            lock,
            key,
            preempted,
        })
    }

    /// Releases the lock on `device` with `key`: its own key, or the key of a
    /// MAINTENANCE lock `user_id` holds, which forces it.
    pub(crate) fn release(
        &mut self,
        device: &str,
        key: &str,
        user_id: &str,
        now: u64,
    ) -> Result<Released, LockError> {
        let Some(held) = self.held.get(device).filter(|h| h.lock.expires_at_ms > now) else {
            self.held.remove(device);
            return Err(LockError::NotLocked(device.to_string()));
        };
        if constant_time_eq(held.key.as_bytes(), key.as_bytes()) {
            let lock = held.lock.clone();
            self.held.remove(device);
            return Ok(Released::ByHolder(lock));
        }
        let maintenance = self.held.values().any(|h| {
            h.lock.lock_type == LockType::Maintenance
                && h.lock.user_id == user_id
                && h.lock.expires_at_ms > now
                && constant_time_eq(h.key.as_bytes(), key.as_bytes())
        });
        if maintenance {
            let lock = held.lock.clone();
            self.held.remove(device);
            return Ok(Released::Forced(lock));
        }
        Err(LockError::WrongKey(device.to_string()))
    }
}

fn check_field(what: &str, value: &str, may_be_empty: bool) -> Result<(), LockError> {
    if (!may_be_empty && value.trim().is_empty())
        || value.len() > MAX_FIELD_LEN
        || value.chars().any(char::is_control)
    {
        return Err(LockError::Invalid(format!(
            "{what} must be 1 to {MAX_FIELD_LEN} bytes of printable text"
        )));
    }
    Ok(())
}

/// Compares two keys in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(device: &str, lock_type: LockType, user: &str) -> Ask {
        Ask {
            device_name: device.into(),
            lock_type,
            user_id: user.into(),
            timeout_s: 300,
            reason: None,
            plan_uid: None,
        }
    }

    fn granted(d: Result<Decision, LockError>) -> (LockRecord, String, Option<LockRecord>) {
        match d.unwrap() {
            Decision::Granted {
                lock,
                key,
                preempted,
            } => (lock, key, preempted),
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn a_table_from_another_device_is_checked() {
        let mut a = Arbiter::default();
        a.request(
            ask("lamp", LockType::Maintenance, "ann"),
            1,
            "ab".repeat(16),
        )
        .unwrap();
        assert_eq!(a.check(2), Ok(()));
        let text = serde_json::to_string(&a).unwrap();
        // A lock whose token is above the counter, or whose key is not a key, is refused.
        let mut bad: Arbiter =
            serde_json::from_str(&text.replace(r#""last_token":1"#, r#""last_token":0"#)).unwrap();
        assert!(bad.check(2).is_err());
        bad = serde_json::from_str(&text.replace(&"ab".repeat(16), "zz")).unwrap();
        assert!(bad.check(2).is_err());
        let after = Arbiter::starting_after(1 << 40);
        assert_eq!(after.last_token(), 1 << 40);
        assert!(after.locks().is_empty());
    }

    #[test]
    fn preemption_follows_priority_in_all_sixteen_pairs() {
        for held in LockType::ALL {
            for asked in LockType::ALL {
                let mut arbiter = Arbiter::default();
                granted(arbiter.request(ask("det", held, "a"), 0, "k1".into()));
                let decision = arbiter
                    .request(ask("det", asked, "b"), 1, "k2".into())
                    .unwrap();
                let preempts = asked.priority() < held.priority();
                match decision {
                    Decision::Granted {
                        lock, preempted, ..
                    } => {
                        assert!(preempts, "{asked:?} took {held:?}");
                        assert_eq!(preempted.unwrap().lock_type, held);
                        assert_eq!(lock.fencing_token, 2);
                        assert_eq!(arbiter.lock("det").unwrap().user_id, "b");
                    }
                    Decision::Refused { holder, .. } => {
                        assert!(!preempts, "{asked:?} refused against {held:?}");
                        assert_eq!(holder.user_id, "a");
                        assert_eq!(holder.lock_type, held);
                    }
                }
            }
        }
    }

    #[test]
    fn fencing_tokens_only_grow_across_releases() {
        let mut arbiter = Arbiter::default();
        let (first, key, _) =
            granted(arbiter.request(ask("m1", LockType::ManualOperator, "a"), 0, "k1".into()));
        arbiter.release("m1", &key, "a", 1).unwrap();
        let (second, _, _) =
            granted(arbiter.request(ask("m1", LockType::ManualOperator, "a"), 2, "k2".into()));
        assert!(second.fencing_token > first.fencing_token);
        // Another device's tokens grow too, from the same counter.
        let (other, _, _) =
            granted(arbiter.request(ask("m2", LockType::ManualOperator, "a"), 2, "k3".into()));
        assert!(other.fencing_token > second.fencing_token);
    }

    #[test]
    fn a_stale_or_wrong_key_is_refused() {
        let mut arbiter = Arbiter::default();
        let (_, old_key, _) =
            granted(arbiter.request(ask("m1", LockType::QueueQueued, "a"), 0, "old".into()));
        // Preempted: the old holder's key no longer releases anything.
        granted(arbiter.request(ask("m1", LockType::QueueExecuting, "b"), 1, "new".into()));
        assert_eq!(
            arbiter.release("m1", &old_key, "a", 2),
            Err(LockError::WrongKey("m1".into()))
        );
        assert_eq!(arbiter.lock("m1").unwrap().user_id, "b");
        assert_eq!(
            arbiter.release("m2", "new", "b", 2),
            Err(LockError::NotLocked("m2".into()))
        );
    }

    #[test]
    fn a_maintenance_holder_force_releases_any_lock() {
        let mut arbiter = Arbiter::default();
        granted(arbiter.request(ask("m1", LockType::QueueExecuting, "queue"), 0, "q".into()));
        let (_, mkey, _) =
            granted(arbiter.request(ask("panel", LockType::Maintenance, "tech"), 0, "m".into()));
        // The maintenance key of another user does not count.
        assert!(arbiter.release("m1", &mkey, "someone", 1).is_err());
        match arbiter.release("m1", &mkey, "tech", 1).unwrap() {
            Released::Forced(lock) => assert_eq!(lock.user_id, "queue"),
            other => panic!("{other:?}"),
        }
        assert!(arbiter.lock("m1").is_none());
        assert!(
            arbiter.lock("panel").is_some(),
            "the maintenance lock stays"
        );
    }

    #[test]
    fn leases_end_on_time() {
        let mut arbiter = Arbiter::default();
        let mut a = ask("m1", LockType::ManualOperator, "a");
        a.timeout_s = 2;
        granted(arbiter.request(a, 1_000, "k".into()));
        assert_eq!(arbiter.next_deadline(), Some(3_000));
        assert!(arbiter.expire(2_999).is_empty());
        let ended = arbiter.expire(3_000);
        assert_eq!(ended.len(), 1);
        assert!(arbiter.lock("m1").is_none());
        assert_eq!(arbiter.next_deadline(), None);
        // An ended lease does not block a request even before expire runs.
        let mut b = ask("m2", LockType::QueueQueued, "a");
        b.timeout_s = 1;
        granted(arbiter.request(b, 0, "k".into()));
        granted(arbiter.request(ask("m2", LockType::QueueQueued, "c"), 1_000, "k2".into()));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let mut arbiter = Arbiter::default();
        let mut a = ask("", LockType::ManualOperator, "a");
        assert!(matches!(
            arbiter.request(a.clone(), 0, "k".into()),
            Err(LockError::Invalid(_))
        ));
        a.device_name = "m1".into();
        a.timeout_s = 0;
        assert!(arbiter.request(a.clone(), 0, "k".into()).is_err());
        a.timeout_s = MAX_TIMEOUT_S + 1;
        assert!(arbiter.request(a.clone(), 0, "k".into()).is_err());
        a.timeout_s = 10;
        a.reason = Some("x".repeat(MAX_FIELD_LEN + 1));
        assert!(arbiter.request(a, 0, "k".into()).is_err());
        assert!(arbiter.locks().is_empty());
    }

    #[test]
    fn the_table_survives_a_round_trip_through_its_record() {
        let mut arbiter = Arbiter::default();
        granted(arbiter.request(ask("m1", LockType::Maintenance, "a"), 0, "k".into()));
        let bytes = serde_json::to_vec(&arbiter).unwrap();
        let back: Arbiter = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.locks(), arbiter.locks());
        assert!(back.clone().release("m1", "k", "a", 1).is_ok());
    }
}
