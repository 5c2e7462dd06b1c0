//! The locks service on the core: runs the arbiter, keeps its table in the store (the
//! Meta record `records::LOCKS_KEY`), releases leases when they end, and announces every
//! change as a `lock.*` event.

use hearth_storage::{Batch, Keyspace};

use super::arbiter::{Arbiter, Ask, Decision, LockError, LockRecord, Released};
use super::forward::{LockMessage, Waiting};
use super::{ArbiterInfo, LockAction, LockAsk, LockInfo, LockOutcome, ReleaseOutcome};
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, Reply, now_ms};
use crate::events::Event;

/// Requests of the locks service.
pub(crate) enum LockRequest {
    Request {
        ask: LockAsk,
        reply: Reply<LockOutcome>,
    },
    Release {
        device: String,
        key: String,
        user_id: String,
        reply: Reply<ReleaseOutcome>,
    },
    Status {
        reply: Reply<Vec<LockInfo>>,
    },
    Device {
        device: String,
        reply: Reply<Option<LockInfo>>,
    },
    /// Who decides locks.
    Arbiter {
        reply: Reply<ArbiterInfo>,
    },
    /// Names another arbiter (on the admin device): see `handoff.rs`.
    NameArbiter {
        device: String,
        force: bool,
        reply: Reply<ArbiterInfo>,
    },
}

impl LockRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        matches!(
            self,
            Self::Request { .. } | Self::Release { .. } | Self::NameArbiter { .. }
        )
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::Request { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Release { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Status { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Device { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Arbiter { reply } | Self::NameArbiter { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The locks service's state.
#[derive(Default)]
pub(crate) struct LockState {
    /// The table, when this device is the arbiter.
    pub(crate) arbiter: Arbiter,
    /// The arbiter's table as it last said, and requests forwarded to it, elsewhere.
    pub(crate) mirror: super::forward::Mirror,
    /// The naming this device's table is for, and whether it yielded it.
    pub(crate) role: super::handoff::Role,
    /// The highest verified naming of the arbiter; none: the admin device decides.
    pub(crate) naming: Option<super::handoff::Named>,
    /// A handoff this (admin) device runs.
    pub(crate) handoff: Option<super::handoff::Handoff>,
    /// A table arriving in parts.
    pub(crate) incoming: super::handoff::Incoming,
}

impl From<LockError> for Error {
    fn from(e: LockError) -> Self {
        match e {
            LockError::NotLocked(_) => Error::NotFound(e.to_string()),
            LockError::WrongKey(_) => Error::Forbidden(e.to_string()),
            LockError::Invalid(_) => Error::Invalid(e.to_string()),
        }
    }
}

/// A lease length in whole seconds; a nonzero one shorter than a second is one second,
/// and zero stays zero (which the arbiter refuses).
fn timeout_secs(timeout: std::time::Duration) -> u64 {
    timeout.as_secs().max(u64::from(!timeout.is_zero()))
}

/// A fresh lock key: 128 random bits in hex.
fn new_lock_key() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no randomness for a lock key: {e}")))?;
    Ok(hex::encode(bytes))
}

impl Core {
    /// Answers a request of the locks service: on the arbiter at once, elsewhere by
    /// forwarding it to the arbiter.
    pub(crate) async fn handle_locks(&mut self, request: LockRequest) {
        // Where a request or release goes: decided here, or forwarded (to this home's
        // arbiter, or for a shared-in entity to its owner's), or refused at once.
        let route = match &request {
            LockRequest::Request { ask, .. } => Some(self.lock_route(&ask.device_name)),
            LockRequest::Release { device, .. } => Some(self.lock_route(device)),
            LockRequest::Status { .. } | LockRequest::Device { .. } => None,
            LockRequest::Arbiter { .. } | LockRequest::NameArbiter { .. } => None,
        };
        let (arbiter, forward_to) = match route {
            Some(Err(error)) => return request.refuse(error),
            Some(Ok(None)) | None => (true, None),
            Some(Ok(Some(peer))) => (false, Some(peer)),
        };
        match request {
            LockRequest::Request { ask, reply } if arbiter => {
                let result = self
                    .decide_lock_or_undo(ask)
                    .await
                    .map(|decided| match decided {
                        Ok((lock, key)) => LockOutcome::Granted {
                            lock: lock.into(),
                            key,
                        },
                        Err((holder, message)) => LockOutcome::Refused {
                            holder: holder.into(),
                            message,
                        },
                    });
                let _ = reply.send(result);
            }
            LockRequest::Request { ask, reply } => {
                let timeout_s = timeout_secs(ask.timeout);
                self.forward_lock(
                    forward_to.unwrap_or_default(),
                    |id| LockMessage::Ask {
                        id,
                        device_name: ask.device_name,
                        lock_type: ask.lock_type,
                        user_id: ask.user_id,
                        timeout_s,
                        reason: ask.reason,
                        plan_uid: ask.plan_uid,
                    },
                    Waiting::Request(reply),
                );
            }
            LockRequest::Release {
                device,
                key,
                user_id,
                reply,
            } if arbiter => {
                let result = self
                    .decide_release_or_undo(&device, &key, &user_id)
                    .await
                    .map(|(lock, forced)| {
                        let lock = LockInfo::from(lock);
                        if forced {
                            ReleaseOutcome::ForceReleased(lock)
                        } else {
                            ReleaseOutcome::Released(lock)
                        }
                    });
                let _ = reply.send(result);
            }
            LockRequest::Release {
                device,
                key,
                user_id,
                reply,
            } => {
                self.forward_lock(
                    forward_to.unwrap_or_default(),
                    |id| LockMessage::Release {
                        id,
                        device_name: device,
                        key,
                        user_id,
                    },
                    Waiting::Release(reply),
                );
            }
            LockRequest::Status { reply } => {
                let now = now_ms();
                let list = self
                    .lock_table()
                    .filter(|l| l.expires_at_ms > now)
                    .map(LockInfo::from)
                    .collect();
                let _ = reply.send(Ok(list));
            }
            LockRequest::Device { device, reply } => {
                // Another home's entity: its owner's arbiter has the table.
                match self.shared_in_lock_route(&device, false) {
                    Some(Ok(owner)) => {
                        return self.forward_lock(
                            owner,
                            |id| LockMessage::Read {
                                id,
                                device_name: device,
                            },
                            Waiting::Read(reply),
                        );
                    }
                    Some(Err(error)) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                    None => {}
                }
                let now = now_ms();
                let lock = self
                    .lock_table()
                    .find(|l| l.device_name == device && l.expires_at_ms > now)
                    .map(LockInfo::from);
                let _ = reply.send(Ok(lock));
            }
            LockRequest::Arbiter { reply } => {
                let _ = reply.send(self.arbiter_info());
            }
            LockRequest::NameArbiter {
                device,
                force,
                reply,
            } => self.start_arbiter_handoff(device, force, reply).await,
        }
    }

    /// The table: the arbiter's own (also while it is being handed over), or elsewhere
    /// its copy.
    fn lock_table(&self) -> Box<dyn Iterator<Item = LockRecord> + '_> {
        if self.is_lock_arbiter() || self.locks.role.yielded_to.is_some() {
            Box::new(self.locks.arbiter.locks().into_iter())
        } else {
            Box::new(self.locks.mirror.table.values().cloned())
        }
    }

    /// Decides a request as one step; when its table cannot be stored, the table goes
    /// back to what it was, so no lease stays held whose key nobody received.
    #[allow(clippy::type_complexity)]
    pub(crate) async fn decide_lock_or_undo(
        &mut self,
        ask: LockAsk,
    ) -> Result<Result<(LockRecord, String), (LockRecord, String)>, Error> {
        let before = self.locks.arbiter.clone();
        let result = self.step(|core, fx| core.decide_lock(ask, fx)).await;
        if result.is_err() {
            self.locks.arbiter = before;
        }
        result
    }

    /// Decides a release as one step, undone like [`Core::decide_lock_or_undo`].
    pub(crate) async fn decide_release_or_undo(
        &mut self,
        device: &str,
        key: &str,
        user_id: &str,
    ) -> Result<(LockRecord, bool), Error> {
        let before = self.locks.arbiter.clone();
        let result = self
            .step(|core, fx| core.decide_release(device, key, user_id, fx))
            .await;
        if result.is_err() {
            self.locks.arbiter = before;
        }
        result
    }

    /// As the arbiter: decides a request. `Ok(Ok((lock, key)))` is a grant,
    /// `Ok(Err((holder, message)))` a refusal.
    #[allow(clippy::type_complexity)]
    pub(crate) fn decide_lock(
        &mut self,
        ask: LockAsk,
        fx: &mut Effects,
    ) -> Result<Result<(LockRecord, String), (LockRecord, String)>, Error> {
        let ask = Ask {
            device_name: ask.device_name,
            lock_type: ask.lock_type,
            user_id: ask.user_id,
            timeout_s: timeout_secs(ask.timeout),
            reason: ask.reason,
            plan_uid: ask.plan_uid,
        };
        let key = new_lock_key()?;
        let decision = self.locks.arbiter.request(ask, now_ms(), key)?;
        Ok(match decision {
            Decision::Granted {
                lock,
                key,
                preempted,
            } => {
                self.persist_locks(fx);
                if let Some(old) = preempted {
                    self.announce(LockAction::Preempted, old, fx);
                }
                self.announce(LockAction::Acquired, lock.clone(), fx);
                self.send_queued(fx);
                Ok((lock, key))
            }
            Decision::Refused { holder, message } => Err((holder, message)),
        })
    }

    /// As the arbiter: releases `device` with `key`; answers the lock and whether it was
    /// forced.
    pub(crate) fn decide_release(
        &mut self,
        device: &str,
        key: &str,
        user_id: &str,
        fx: &mut Effects,
    ) -> Result<(LockRecord, bool), Error> {
        let released = self.locks.arbiter.release(device, key, user_id, now_ms())?;
        self.persist_locks(fx);
        let (lock, forced) = match released {
            Released::ByHolder(lock) => (lock, false),
            Released::Forced(lock) => (lock, true),
        };
        let action = if forced {
            LockAction::ForceReleased
        } else {
            LockAction::Released
        };
        self.announce(action, lock.clone(), fx);
        self.send_queued(fx);
        Ok((lock, forced))
    }

    /// A change, as an event here and a message to every connected device of the home.
    fn announce(&mut self, action: LockAction, lock: LockRecord, fx: &mut Effects) {
        self.announce_lock_change(action, &lock);
        fx.emit(lock_event(action, lock.into()));
    }

    /// Releases every lease that has ended (on the arbiter) and fails forwarded requests
    /// past their time; the run loop calls it at [`Core::next_lock_deadline`].
    pub(crate) async fn expire_locks(&mut self) {
        self.fail_lock_forwards(None);
        self.check_handoff(None).await;
        if !self.is_lock_arbiter() {
            return;
        }
        let _ = self
            .step(|core, fx| {
                let ended = core.locks.arbiter.expire(now_ms());
                if !ended.is_empty() {
                    core.persist_locks(fx);
                }
                for lock in ended {
                    core.announce(LockAction::Expired, lock, fx);
                }
                core.send_queued(fx);
                Ok(())
            })
            .await
            .inspect_err(|error| tracing::warn!(%error, "cannot store the ended leases"));
    }

    /// When the next lease ends or forwarded request runs out of time (ms since the epoch).
    pub(crate) fn next_lock_deadline(&self) -> Option<u64> {
        let lease = if self.is_lock_arbiter() {
            self.locks.arbiter.next_deadline()
        } else {
            None
        };
        [lease, self.next_forward_deadline(), self.handoff_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    fn persist_locks(&mut self, fx: &mut Effects) {
        match crate::records::to_json("lock table", &self.locks.arbiter) {
            Ok(bytes) => {
                let mut batch = Batch::new();
                batch.put(Keyspace::Meta, crate::records::LOCKS_KEY.to_vec(), bytes);
                fx.persist(batch);
            }
            Err(error) => tracing::error!(%error, "cannot encode the lock table"),
        }
    }

    /// Reads the lock table at start. One that does not decode is kept on disk, logged,
    /// and replaced by an empty table, so the node still starts.
    pub(crate) async fn load_locks(&mut self) {
        match self
            .store
            .get(Keyspace::Meta, crate::records::LOCKS_KEY.to_vec())
            .await
        {
            Ok(Some(bytes)) => match crate::records::from_json("lock table", &bytes) {
                Ok(arbiter) => self.locks.arbiter = arbiter,
                Err(error) => tracing::error!(%error, "the stored lock table is unreadable"),
            },
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot read the lock table"),
        }
    }
}

pub(crate) fn lock_event(action: LockAction, lock: LockInfo) -> Event {
    Event::Lock {
        action,
        lock: Box::new(lock),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::LockRequest;
    use crate::core::testing::TestCore;
    use crate::events::Event;
    use crate::locks::{LockAction, LockAsk, LockOutcome, LockType, ReleaseOutcome};

    async fn request(t: &TestCore, ask: LockAsk) -> LockOutcome {
        t.core
            .call(|reply| LockRequest::Request { ask, reply })
            .await
            .unwrap()
            .unwrap()
    }

    fn actions(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<LockAction> {
        let mut out = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::Lock { action, .. } = event {
                out.push(action);
            }
        }
        out
    }

    /// The locks service on a core with no sockets: grant, refusal, preemption, release,
    /// and a lease that ends on time with its event.
    #[tokio::test]
    async fn the_arbiter_grants_refuses_preempts_releases_and_expires() {
        let t = TestCore::start("admin").await;
        let mut events = t.events();
        let LockOutcome::Granted { key, lock } =
            request(&t, LockAsk::new("det1", LockType::ManualOperator, "op")).await
        else {
            panic!("not granted");
        };
        assert_eq!(lock.fencing_token, 1);
        assert!(matches!(
            request(&t, LockAsk::new("det1", LockType::QueueQueued, "queue")).await,
            LockOutcome::Refused { .. }
        ));
        let LockOutcome::Granted { key: m_key, .. } =
            request(&t, LockAsk::new("det1", LockType::Maintenance, "tech")).await
        else {
            panic!("maintenance did not preempt");
        };
        // The preempted holder's key no longer works.
        let stale = t
            .core
            .call(|reply| LockRequest::Release {
                device: "det1".into(),
                key,
                user_id: "op".into(),
                reply,
            })
            .await
            .unwrap();
        assert!(stale.is_err());
        let released = t
            .core
            .call(|reply| LockRequest::Release {
                device: "det1".into(),
                key: m_key,
                user_id: "tech".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(released, ReleaseOutcome::Released(_)));
        assert_eq!(
            actions(&mut events),
            [
                LockAction::Acquired,
                LockAction::Preempted,
                LockAction::Acquired,
                LockAction::Released
            ]
        );

        let mut short = LockAsk::new("det2", LockType::QueueExecuting, "queue");
        short.timeout = Duration::from_secs(1);
        assert!(matches!(
            request(&t, short).await,
            LockOutcome::Granted { .. }
        ));
        // Released by the arbiter's timer, with no request to notice it.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(Event::Lock {
                    action: LockAction::Expired,
                    lock,
                }) = events.recv().await
                {
                    return lock;
                }
            }
        })
        .await
        .expect("the lease did not end on time");
        assert_eq!(ended.device_name, "det2");
        let status = t
            .core
            .call(|reply| LockRequest::Status { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(status.is_empty());
        t.stop().await;
    }

    /// The table is in the store: a restarted arbiter still holds the lease.
    #[tokio::test]
    async fn the_lock_table_is_stored() {
        let t = TestCore::start("admin").await;
        let LockOutcome::Granted { .. } =
            request(&t, LockAsk::new("det1", LockType::ManualOperator, "op")).await
        else {
            panic!("not granted");
        };
        let stored = t
            .store
            .get(
                hearth_storage::Keyspace::Meta,
                crate::records::LOCKS_KEY.to_vec(),
            )
            .await
            .unwrap()
            .expect("stored");
        let table: crate::locks::arbiter::Arbiter =
            crate::records::from_json("lock table", &stored).unwrap();
        assert_eq!(table.lock("det1").unwrap().user_id, "op");
        t.stop().await;
    }

    /// A lock whose table cannot be stored is not granted, is not announced, and leaves
    /// no lease behind; once the store is back, requests are granted again.
    #[tokio::test]
    async fn a_grant_the_store_refused_leaves_no_lease() {
        let (t, fail) = TestCore::start_flaky("admin").await;
        let mut events = t.events();
        assert!(matches!(
            request(&t, LockAsk::new("det1", LockType::ManualOperator, "op")).await,
            LockOutcome::Granted { .. }
        ));
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = t
            .core
            .call(|reply| LockRequest::Request {
                ask: LockAsk::new("det2", LockType::ManualOperator, "op"),
                reply,
            })
            .await
            .unwrap();
        assert!(refused.is_err(), "granted on a failing store: {refused:?}");
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let status = t
            .core
            .call(|reply| LockRequest::Status { reply })
            .await
            .unwrap()
            .unwrap();
        let held: Vec<&str> = status.iter().map(|l| l.device_name.as_str()).collect();
        assert_eq!(held, ["det1"], "the refused grant left a lease");
        assert_eq!(actions(&mut events), [LockAction::Acquired]);
        // The store recovers (its thread probes it), and locks are granted again.
        let granted = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let outcome = t
                    .core
                    .call(|reply| LockRequest::Request {
                        ask: LockAsk::new("det2", LockType::ManualOperator, "op"),
                        reply,
                    })
                    .await
                    .unwrap();
                if let Ok(LockOutcome::Granted { lock, .. }) = outcome {
                    return lock;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("no grant after the store recovered");
        assert_eq!(granted.device_name, "det2");
        t.stop().await;
    }
}
