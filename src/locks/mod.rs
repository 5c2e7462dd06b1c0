//! Device locks (seed 004): priority leases on devices, decided by one arbiter per home.
//!
//! The arbiter is a plain state machine (`arbiter.rs`); the service (`service.rs`) runs
//! it on the core, keeps its table in the store, releases leases on time and announces
//! every change. This module holds the public types and the [`Locks`] handle.
//!
//! The arbiter is the home's admin device. The home's other devices forward requests to
//! it over the sync stream and keep a copy of its table, which it updates with every
//! change (`forward.rs`); when it cannot be reached a request fails at once with
//! [`crate::Error::ArbiterUnreachable`] and nothing is granted, so no two devices ever
//! hold the same lock.

pub(crate) mod arbiter;
pub(crate) mod forward;
pub(crate) mod handoff;
pub(crate) mod service;

use std::time::Duration;

use serde::Serialize;

pub use hearth_crdt::LockType;

use crate::Error;
use crate::core::CoreHandle;
use crate::types::Timestamp;
use service::LockRequest;

/// Lease length when a request names none: 300 s, as in seed 004.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// A held lock as every reader sees it; its key is never part of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockInfo {
    /// The locked device: an entity id or any name.
    pub device_name: String,
    /// Its kind, written by name (`MAINTENANCE`, `QUEUE_EXECUTING`, ...).
    pub lock_type: LockType,
    /// Its priority number: 0 is the highest.
    pub priority: u8,
    /// Who holds it: a label, not an identity.
    pub user_id: String,
    /// Why, if the holder said.
    pub reason: Option<String>,
    /// The plan it serves, if any.
    pub plan_uid: Option<String>,
    /// Grows with every grant on the device, also across releases.
    pub fencing_token: u64,
    /// When it was granted.
    pub acquired_at: Timestamp,
    /// When its lease ends unless released before.
    pub expires_at: Timestamp,
}

impl From<arbiter::LockRecord> for LockInfo {
    fn from(r: arbiter::LockRecord) -> Self {
        Self {
            device_name: r.device_name,
            lock_type: r.lock_type,
            priority: r.lock_type.priority(),
            user_id: r.user_id,
            reason: r.reason,
            plan_uid: r.plan_uid,
            fencing_token: r.fencing_token,
            acquired_at: Timestamp::from_unix_ms(r.acquired_at_ms),
            expires_at: Timestamp::from_unix_ms(r.expires_at_ms),
        }
    }
}

/// What happened to a lock, for [`crate::Event::Lock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockAction {
    /// Granted.
    Acquired,
    /// Released by its holder.
    Released,
    /// Released by a MAINTENANCE holder.
    ForceReleased,
    /// Taken over by a request of higher priority; the event carries the lock that ended.
    Preempted,
    /// Its lease ended.
    Expired,
}

impl LockAction {
    /// The event name, `lock.<action>`.
    pub const fn event_name(self) -> &'static str {
        match self {
            LockAction::Acquired => "lock.acquired",
            LockAction::Released => "lock.released",
            LockAction::ForceReleased => "lock.force_released",
            LockAction::Preempted => "lock.preempted",
            LockAction::Expired => "lock.expired",
        }
    }

    /// The action as seed 004's `lock_update` names it.
    pub const fn as_str(self) -> &'static str {
        match self {
            LockAction::Acquired => "acquired",
            LockAction::Released => "released",
            LockAction::ForceReleased => "force_released",
            LockAction::Preempted => "preempted",
            LockAction::Expired => "expired",
        }
    }
}

/// A lock request.
#[derive(Clone, Debug)]
pub struct LockAsk {
    /// The device to lock.
    pub device_name: String,
    /// Its kind, which sets its priority.
    pub lock_type: LockType,
    /// Who asks (a label).
    pub user_id: String,
    /// Lease length, 1 s to one day.
    pub timeout: Duration,
    /// Why, shown to others.
    pub reason: Option<String>,
    /// The plan it serves.
    pub plan_uid: Option<String>,
}

impl LockAsk {
    /// A request for `device` of `lock_type` by `user_id`, for [`DEFAULT_LOCK_TIMEOUT`].
    pub fn new(device: impl Into<String>, lock_type: LockType, user_id: impl Into<String>) -> Self {
        Self {
            device_name: device.into(),
            lock_type,
            user_id: user_id.into(),
            timeout: DEFAULT_LOCK_TIMEOUT,
            reason: None,
            plan_uid: None,
        }
    }
}

/// What a lock request came to. Its `Debug` form never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// Granted: the lock and its secret key, which releases it.
    Granted {
        /// The lock.
        lock: LockInfo,
        /// The key: only the requester gets it.
        key: String,
    },
    /// Refused: the holder's lock and why.
    Refused {
        /// The lock that stands.
        holder: LockInfo,
        /// Why the request could not take it.
        message: String,
    },
}

impl std::fmt::Debug for LockOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockOutcome::Granted { lock, .. } => f
                .debug_struct("Granted")
                .field("lock", lock)
                .field("key", &"<hidden>")
                .finish(),
            LockOutcome::Refused { holder, message } => f
                .debug_struct("Refused")
                .field("holder", holder)
                .field("message", message)
                .finish(),
        }
    }
}

/// How a release ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Released by its holder.
    Released(LockInfo),
    /// Released by force, with a MAINTENANCE holder's key.
    ForceReleased(LockInfo),
}

/// Which device of the home decides locks (the arbiter), as this device knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArbiterInfo {
    /// The arbiter's PeerId.
    pub peer_id: String,
    /// Its name, when the home document lists it.
    pub device_name: Option<String>,
    /// The naming in force (0: none was made, so the admin device decides).
    pub seq: u64,
    /// Whether it is this device.
    pub this_device: bool,
    /// Whether this device grants locks now (false on the arbiter while it hands over).
    pub granting: bool,
    /// Whether this (admin) device is running a handoff.
    pub handoff_running: bool,
}

/// Device locks; see [`crate::Node::locks`].
#[derive(Clone)]
pub struct Locks {
    pub(crate) core: CoreHandle,
}

impl Locks {
    /// Asks for a lock; a refusal is an answer, not an error.
    pub async fn request(&self, ask: LockAsk) -> Result<LockOutcome, Error> {
        self.core
            .call(|reply| LockRequest::Request { ask, reply })
            .await?
    }

    /// Releases `device` with its key (or a MAINTENANCE holder's key, which forces it).
    pub async fn release(
        &self,
        device: &str,
        key: &str,
        user_id: &str,
    ) -> Result<ReleaseOutcome, Error> {
        let (device, key, user_id) = (device.to_string(), key.to_string(), user_id.to_string());
        self.core
            .call(|reply| LockRequest::Release {
                device,
                key,
                user_id,
                reply,
            })
            .await?
    }

    /// Every held lock, by device name.
    pub async fn status(&self) -> Result<Vec<LockInfo>, Error> {
        self.core
            .call(|reply| LockRequest::Status { reply })
            .await?
    }

    /// The lock on `device`, if held.
    pub async fn device(&self, device: &str) -> Result<Option<LockInfo>, Error> {
        let device = device.to_string();
        self.core
            .call(|reply| LockRequest::Device { device, reply })
            .await?
    }

    /// Which device decides locks.
    pub async fn arbiter(&self) -> Result<ArbiterInfo, Error> {
        self.core
            .call(|reply| LockRequest::Arbiter { reply })
            .await?
    }

    /// Names `device` (a name or PeerId of this home) the lock arbiter; only on the admin
    /// device. The current arbiter stops granting and hands its table over before the
    /// naming is written, so two devices never grant the same lock. `force` names it
    /// without the old table, for an arbiter that is gone for good: its leases are lost.
    pub async fn name_arbiter(&self, device: &str, force: bool) -> Result<ArbiterInfo, Error> {
        let device = device.to_string();
        self.core
            .call(|reply| LockRequest::NameArbiter {
                device,
                force,
                reply,
            })
            .await?
    }

    /// Takes a lock that is released when the guard drops. A refusal is
    /// [`Error::Conflict`] naming the holder.
    pub async fn acquire(&self, ask: LockAsk) -> Result<LockGuard, Error> {
        let user_id = ask.user_id.clone();
        match self.request(ask).await? {
            LockOutcome::Granted { lock, key } => Ok(LockGuard {
                locks: self.clone(),
                lock,
                key,
                user_id,
                released: false,
            }),
            LockOutcome::Refused { message, .. } => Err(Error::Conflict(message)),
        }
    }

    /// Runs `work` while holding the lock, and releases it after, whatever `work` returned.
    pub async fn with_lock<T, F>(&self, ask: LockAsk, work: F) -> Result<T, Error>
    where
        F: AsyncFnOnce(&LockInfo) -> T,
    {
        let guard = self.acquire(ask).await?;
        let out = work(guard.lock()).await;
        guard.release().await?;
        Ok(out)
    }
}

/// A held lock; dropping it releases the lock (in the background). Its `Debug` form
/// never shows the key.
pub struct LockGuard {
    locks: Locks,
    lock: LockInfo,
    key: String,
    user_id: String,
    released: bool,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.lock)
            .field("key", &"<hidden>")
            .finish_non_exhaustive()
    }
}

impl LockGuard {
    /// The lock held.
    pub fn lock(&self) -> &LockInfo {
        &self.lock
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Releases the lock now and says how. A lock preempted or expired meanwhile is
    /// an error naming the device.
    pub async fn release(mut self) -> Result<ReleaseOutcome, Error> {
        let result = self
            .locks
            .release(&self.lock.device_name, &self.key, &self.user_id)
            .await;
        // Only now: a release cancelled half way leaves the drop to release it.
        self.released = true;
        result
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (locks, device, key, user) = (
            self.locks.clone(),
            self.lock.device_name.clone(),
            std::mem::take(&mut self.key),
            self.user_id.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Preempted or expired meanwhile: nothing left to release.
                let _ = locks.release(&device, &key, &user).await;
            });
        }
    }
}
