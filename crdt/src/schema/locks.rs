//! Typed view of a home's `locks` document: which device is locked, by whom,
//! with what priority, until when.
//!
//! Layout under the root key `locks`:
//! - `devices.<device>` = map { `holder`: string, `type`: one of the
//!   [`LockType`] names, `token`: uint fencing token, `acquired_at`: uint ms,
//!   `expires_at`: uint ms, `reason`: optional string };
//! - `tokens.<device>` = uint, the highest fencing token ever issued for the
//!   device, kept after a release so that a token is never handed out twice.
//!
//! Arbitration (who may take a lock, preemption by priority) belongs to the
//! owner node's lock service. The view stores the outcome and validates it;
//! it refuses only what would break the fencing guarantee: a new lock whose
//! token does not exceed every token issued before.

use std::collections::BTreeMap;
use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc, ScalarValue};

use super::fields::{MAX_NOTE_BYTES, check_name, check_text, req_name};
use super::room::expect_kind;
use super::{
    DocKind, Header, am, ensure_map, join, keys, opt_str, opt_u64, req_map, req_str, req_u64,
};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::ids::{DocId, KeyEpoch};

/// Root key of the locks map.
pub const LOCKS_KEY: &str = "locks";

/// Kinds of lock, declared in priority order: a lower
/// [`priority`](LockType::priority) number preempts a higher one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LockType {
    /// Maintenance work on the device (priority 0, the highest).
    Maintenance,
    /// A queued job that is running (priority 1).
    QueueExecuting,
    /// A person operating the device by hand (priority 2).
    ManualOperator,
    /// A job waiting in the queue (priority 3, the lowest).
    QueueQueued,
}

impl LockType {
    /// Every lock type, highest priority first.
    pub const ALL: [LockType; 4] = [
        LockType::Maintenance,
        LockType::QueueExecuting,
        LockType::ManualOperator,
        LockType::QueueQueued,
    ];

    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            LockType::Maintenance => "MAINTENANCE",
            LockType::QueueExecuting => "QUEUE_EXECUTING",
            LockType::ManualOperator => "MANUAL_OPERATOR",
            LockType::QueueQueued => "QUEUE_QUEUED",
        }
    }

    /// Inverse of [`LockType::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// Priority number: 0 is the highest.
    pub const fn priority(self) -> u8 {
        match self {
            LockType::Maintenance => 0,
            LockType::QueueExecuting => 1,
            LockType::ManualOperator => 2,
            LockType::QueueQueued => 3,
        }
    }

    /// Whether a request of this type may take a lock held as `held`.
    pub const fn preempts(self, held: LockType) -> bool {
        self.priority() < held.priority()
    }
}

/// One device lock: a lease with a fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// Who holds it (a user, or a service such as the job queue).
    pub holder: String,
    /// Its type, which sets its priority.
    pub lock_type: LockType,
    /// Fencing token: increases with every grant for the device, so the
    /// device can refuse commands from a holder whose lease has passed on.
    pub token: u64,
    /// When it was granted, ms since the Unix epoch.
    pub acquired_at_ms: u64,
    /// When the lease ends unless renewed, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Why it was taken.
    pub reason: Option<String>,
}

impl Lock {
    /// Whether the lease has run out at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

/// The locks document, after validation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Locks {
    /// Current locks by device.
    pub devices: BTreeMap<String, Lock>,
    /// Highest token issued per device, including released locks.
    pub tokens: BTreeMap<String, u64>,
}

impl Locks {
    /// Reads and validates the locks view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let l = req_map(doc, &ROOT, LOCKS_KEY, LOCKS_KEY)?;
        let d = req_map(doc, &l, "devices", "locks.devices")?;
        let mut devices = BTreeMap::new();
        for device in keys(doc, &d) {
            let path = join("locks.devices", &device);
            check_name(&path, &device)?;
            let rec = req_map(doc, &d, &device, &path)?;
            let lock = read_lock(doc, &rec, &path)?;
            devices.insert(device, lock);
        }
        let t = req_map(doc, &l, "tokens", "locks.tokens")?;
        let mut tokens = BTreeMap::new();
        for device in keys(doc, &t) {
            let path = join("locks.tokens", &device);
            check_name(&path, &device)?;
            tokens.insert(device.clone(), req_u64(doc, &t, &device, &path)?);
        }
        Ok(Self { devices, tokens })
    }

    /// The token the next grant for `device` must carry.
    pub fn next_token(&self, device: &str) -> u64 {
        let issued = self.tokens.get(device).copied().unwrap_or(0);
        let held = self.devices.get(device).map_or(0, |l| l.token);
        issued.max(held).saturating_add(1)
    }
}

fn read_lock<D: ReadDoc>(doc: &D, rec: &automerge::ObjId, path: &str) -> Result<Lock> {
    let holder = req_name(doc, rec, "holder", &join(path, "holder"))?;
    let type_path = join(path, "type");
    let text = req_str(doc, rec, "type", &type_path)?;
    let lock_type = LockType::parse(&text)
        .ok_or_else(|| Error::schema(&type_path, format!("unknown lock type {text:?}")))?;
    let token_path = join(path, "token");
    let token = req_u64(doc, rec, "token", &token_path)?;
    if token == 0 {
        return Err(Error::schema(token_path, "fencing tokens start at 1"));
    }
    let acquired_at_ms = req_u64(doc, rec, "acquired_at", &join(path, "acquired_at"))?;
    let expires_path = join(path, "expires_at");
    let expires_at_ms = req_u64(doc, rec, "expires_at", &expires_path)?;
    if expires_at_ms <= acquired_at_ms {
        return Err(Error::schema(expires_path, "must be after acquired_at"));
    }
    let reason_path = join(path, "reason");
    let reason = opt_str(doc, rec, "reason", &reason_path)?;
    if let Some(r) = &reason {
        check_text(&reason_path, r, MAX_NOTE_BYTES)?;
    }
    Ok(Lock {
        holder,
        lock_type,
        token,
        acquired_at_ms,
        expires_at_ms,
        reason,
    })
}

/// Creates the empty locks layout.
pub(crate) fn init<T: Transactable>(doc: &mut T) -> Result<()> {
    let l = ensure_map(doc, &ROOT, LOCKS_KEY)?;
    ensure_map(doc, &l, "devices")?;
    ensure_map(doc, &l, "tokens")?;
    Ok(())
}

/// Stores `lock` on `device`. A renewal (same holder and token as the
/// current lock) may change the expiry and reason; any other grant must
/// carry a token above every token issued for the device before.
pub fn put_lock<T: Transactable>(doc: &mut T, device: &str, lock: &Lock) -> Result<()> {
    let path = join("locks.devices", device);
    check_name(&path, device)?;
    check_name(&join(&path, "holder"), &lock.holder)?;
    if let Some(r) = &lock.reason {
        check_text(&join(&path, "reason"), r, MAX_NOTE_BYTES)?;
    }
    let token_path = join(&path, "token");
    if lock.token == 0 {
        return Err(Error::schema(token_path, "fencing tokens start at 1"));
    }
    if lock.expires_at_ms <= lock.acquired_at_ms {
        return Err(Error::schema(
            join(&path, "expires_at"),
            "must be after acquired_at",
        ));
    }
    let l = ensure_map(doc, &ROOT, LOCKS_KEY)?;
    let d = ensure_map(doc, &l, "devices")?;
    let t = ensure_map(doc, &l, "tokens")?;
    let current = match doc.get(&d, device).map_err(am)? {
        Some((automerge::Value::Object(automerge::ObjType::Map), rec)) => {
            read_lock(doc, &rec, &path).ok()
        }
        _ => None,
    };
    let renewal = current
        .as_ref()
        .is_some_and(|c| c.token == lock.token && c.holder == lock.holder);
    let issued = opt_u64(doc, &t, device, &join("locks.tokens", device))?.unwrap_or(0);
    let last = issued.max(current.as_ref().map_or(0, |c| c.token));
    if !renewal && lock.token <= last {
        return Err(Error::Refused {
            what: "lock grant",
            reason: format!(
                "fencing token {} for {device} does not exceed the last issued token {last}",
                lock.token
            ),
        });
    }
    let rec = ensure_map(doc, &d, device)?;
    super::put_str_if_changed(doc, &rec, "holder", &lock.holder)?;
    super::put_str_if_changed(doc, &rec, "type", lock.lock_type.as_str())?;
    doc.put(&rec, "token", ScalarValue::Uint(lock.token))
        .map_err(am)?;
    doc.put(&rec, "acquired_at", ScalarValue::Uint(lock.acquired_at_ms))
        .map_err(am)?;
    doc.put(&rec, "expires_at", ScalarValue::Uint(lock.expires_at_ms))
        .map_err(am)?;
    match &lock.reason {
        Some(r) => super::put_str_if_changed(doc, &rec, "reason", r)?,
        None => {
            if doc.get(&rec, "reason").map_err(am)?.is_some() {
                doc.delete(&rec, "reason").map_err(am)?;
            }
        }
    }
    if lock.token > issued {
        doc.put(&t, device, ScalarValue::Uint(lock.token))
            .map_err(am)?;
    }
    Ok(())
}

/// Releases the lock on `device` if it carries `token`. Returns false (and
/// writes nothing) when there is no lock or it carries another token: only
/// the holder of the current lease can release it.
pub fn release_lock<T: Transactable>(doc: &mut T, device: &str, token: u64) -> Result<bool> {
    let path = join("locks.devices", device);
    let l = ensure_map(doc, &ROOT, LOCKS_KEY)?;
    let d = ensure_map(doc, &l, "devices")?;
    let held = match doc.get(&d, device).map_err(am)? {
        Some((automerge::Value::Object(automerge::ObjType::Map), rec)) => {
            req_u64(doc, &rec, "token", &join(&path, "token")).ok()
        }
        _ => None,
    };
    if held != Some(token) {
        return Ok(false);
    }
    doc.delete(&d, device).map_err(am)?;
    Ok(true)
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates an empty locks document owned by `owner_home`.
    pub fn create_locks(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Locks, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| init(doc))
    }

    /// The validated locks view.
    pub fn locks(&self, id: DocId) -> Result<Locks> {
        Locks::read(self.doc(id)?)
    }

    /// Stores a granted (or renewed) lock on `device`.
    pub fn put_lock(
        &mut self,
        id: DocId,
        device: &str,
        lock: &Lock,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Locks)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            put_lock(doc, device, lock)
        })
        .map(|(_, out)| out)
    }

    /// Releases the lock on `device` held with `token`; `false` when no such
    /// lock is held.
    pub fn release_lock(
        &mut self,
        id: DocId,
        device: &str,
        token: u64,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(bool, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Locks)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            release_lock(doc, device, token)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn lock(holder: &str, lock_type: LockType, token: u64) -> Lock {
        Lock {
            holder: holder.into(),
            lock_type,
            token,
            acquired_at_ms: 100,
            expires_at_ms: 200,
            reason: Some("firmware".into()),
        }
    }

    fn doc() -> AutoCommit {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        doc
    }

    #[test]
    fn priorities_follow_the_documented_order() {
        let order: Vec<u8> = LockType::ALL.iter().map(|t| t.priority()).collect();
        assert_eq!(order, [0, 1, 2, 3]);
        assert!(LockType::Maintenance.preempts(LockType::QueueExecuting));
        assert!(!LockType::QueueQueued.preempts(LockType::ManualOperator));
        assert!(!LockType::ManualOperator.preempts(LockType::ManualOperator));
        for t in LockType::ALL {
            assert_eq!(LockType::parse(t.as_str()), Some(t));
        }
        assert_eq!(LockType::parse("maintenance"), None);
    }

    #[test]
    fn grant_renew_release_keeps_tokens_monotonic() {
        let mut d = doc();
        put_lock(&mut d, "tv", &lock("ann", LockType::ManualOperator, 1)).unwrap();
        // Renewal: same holder and token, new expiry.
        let mut renewed = lock("ann", LockType::ManualOperator, 1);
        renewed.expires_at_ms = 500;
        put_lock(&mut d, "tv", &renewed).unwrap();
        let l = Locks::read(&d).unwrap();
        assert_eq!(l.devices["tv"], renewed);
        assert!(!l.devices["tv"].is_expired(499) && l.devices["tv"].is_expired(500));
        assert_eq!(l.next_token("tv"), 2);
        // Someone else with a stale or equal token is refused.
        let err = put_lock(&mut d, "tv", &lock("bob", LockType::Maintenance, 1)).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        // Preemption with a fresh token.
        put_lock(&mut d, "tv", &lock("bob", LockType::Maintenance, 2)).unwrap();
        assert!(
            !release_lock(&mut d, "tv", 1).unwrap(),
            "only the current key releases"
        );
        assert!(release_lock(&mut d, "tv", 2).unwrap());
        let l = Locks::read(&d).unwrap();
        assert!(l.devices.is_empty());
        assert_eq!(l.tokens["tv"], 2);
        assert_eq!(l.next_token("tv"), 3, "released tokens are not reused");
        let err = put_lock(&mut d, "tv", &lock("cat", LockType::QueueQueued, 2)).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }));
        assert!(!release_lock(&mut d, "fan", 1).unwrap());
    }

    #[test]
    fn bad_grants_are_refused() {
        let mut d = doc();
        let mut l = lock("ann", LockType::QueueQueued, 0);
        assert!(
            matches!(put_lock(&mut d, "tv", &l), Err(Error::Schema { path, .. }) if path == "locks.devices.tv.token")
        );
        l.token = 1;
        l.expires_at_ms = l.acquired_at_ms;
        assert!(
            matches!(put_lock(&mut d, "tv", &l), Err(Error::Schema { path, .. }) if path == "locks.devices.tv.expires_at")
        );
    }

    #[test]
    fn malformed_locks_from_a_peer_name_the_field() {
        let mut base = doc();
        put_lock(&mut base, "tv", &lock("ann", LockType::QueueExecuting, 3)).unwrap();
        let rec = |d: &AutoCommit| {
            let (_, l) = d.get(ROOT, LOCKS_KEY).unwrap().unwrap();
            let (_, dv) = d.get(&l, "devices").unwrap().unwrap();
            d.get(&dv, "tv").unwrap().unwrap().1
        };
        let cases: [(&str, ScalarValue, &str); 5] = [
            ("type", "SUPERUSER".into(), "locks.devices.tv.type"),
            ("token", ScalarValue::Uint(0), "locks.devices.tv.token"),
            ("token", "three".into(), "locks.devices.tv.token"),
            (
                "expires_at",
                ScalarValue::Uint(1),
                "locks.devices.tv.expires_at",
            ),
            ("holder", ScalarValue::Int(4), "locks.devices.tv.holder"),
        ];
        for (key, value, expected) in cases {
            let mut d = base.clone();
            let r = rec(&d);
            d.put(&r, key, value).unwrap();
            assert!(
                matches!(Locks::read(&d), Err(Error::Schema { path, .. }) if path == expected),
                "{key}"
            );
        }
        let mut d = base.clone();
        let (_, l) = d.get(ROOT, LOCKS_KEY).unwrap().unwrap();
        d.delete(&l, "tokens").unwrap();
        assert!(
            matches!(Locks::read(&d), Err(Error::Schema { path, .. }) if path == "locks.tokens")
        );
    }
}
