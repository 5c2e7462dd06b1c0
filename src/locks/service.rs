//! The locks service on the core: runs the arbiter, keeps its table in the store (the
//! Meta record `records::LOCKS_KEY`), releases leases when they end, and announces every
//! change as a `lock.*` event.

use hearth_storage::{Batch, Keyspace};

use super::arbiter::{Arbiter, Ask, Decision, LockError, Released};
use super::{LockAction, LockAsk, LockInfo, LockOutcome, ReleaseOutcome};
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
}

impl LockRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        matches!(self, Self::Request { .. } | Self::Release { .. })
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
        }
    }
}

/// The locks service's state.
#[derive(Default)]
pub(crate) struct LockState {
    pub(crate) arbiter: Arbiter,
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

/// A fresh lock key: 128 random bits in hex.
fn new_lock_key() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no randomness for a lock key: {e}")))?;
    Ok(hex::encode(bytes))
}

impl Core {
    /// Answers a request of the locks service.
    pub(crate) async fn handle_locks(&mut self, request: LockRequest) {
        match request {
            LockRequest::Request { ask, reply } => {
                let result = self.step(|core, fx| core.request_lock(ask, fx)).await;
                let _ = reply.send(result);
            }
            LockRequest::Release {
                device,
                key,
                user_id,
                reply,
            } => {
                let result = self
                    .step(|core, fx| core.release_lock(&device, &key, &user_id, fx))
                    .await;
                let _ = reply.send(result);
            }
            LockRequest::Status { reply } => {
                let result = self.lock_arbiter().map(|a| {
                    let now = now_ms();
                    a.locks()
                        .into_iter()
                        .filter(|l| l.expires_at_ms > now)
                        .map(LockInfo::from)
                        .collect()
                });
                let _ = reply.send(result);
            }
            LockRequest::Device { device, reply } => {
                let now = now_ms();
                let result = self.lock_arbiter().map(|a| {
                    a.lock(&device)
                        .filter(|l| l.expires_at_ms > now)
                        .cloned()
                        .map(LockInfo::from)
                });
                let _ = reply.send(result);
            }
        }
    }

    /// The arbiter, when this device is it: the home's admin device. Elsewhere requests
    /// would need forwarding to it, which is not built, so they fail closed.
    fn lock_arbiter(&self) -> Result<&Arbiter, Error> {
        if self.home.root_secret.is_none() {
            return Err(Error::ArbiterUnreachable(
                "this home's lock arbiter is its admin device; ask it directly (forwarding \
                 lock requests from other devices is not available yet)"
                    .into(),
            ));
        }
        Ok(&self.locks.arbiter)
    }

    fn request_lock(&mut self, ask: LockAsk, fx: &mut Effects) -> Result<LockOutcome, Error> {
        self.lock_arbiter()?;
        let timeout_s = ask.timeout.as_secs().max(u64::from(!ask.timeout.is_zero()));
        let ask = Ask {
            device_name: ask.device_name,
            lock_type: ask.lock_type,
            user_id: ask.user_id,
            timeout_s,
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
                    fx.emit(lock_event(LockAction::Preempted, old.into()));
                }
                let lock = LockInfo::from(lock);
                fx.emit(lock_event(LockAction::Acquired, lock.clone()));
                LockOutcome::Granted { lock, key }
            }
            Decision::Refused { holder, message } => LockOutcome::Refused {
                holder: holder.into(),
                message,
            },
        })
    }

    fn release_lock(
        &mut self,
        device: &str,
        key: &str,
        user_id: &str,
        fx: &mut Effects,
    ) -> Result<ReleaseOutcome, Error> {
        self.lock_arbiter()?;
        let released = self.locks.arbiter.release(device, key, user_id, now_ms())?;
        self.persist_locks(fx);
        Ok(match released {
            Released::ByHolder(lock) => {
                let lock = LockInfo::from(lock);
                fx.emit(lock_event(LockAction::Released, lock.clone()));
                ReleaseOutcome::Released(lock)
            }
            Released::Forced(lock) => {
                let lock = LockInfo::from(lock);
                fx.emit(lock_event(LockAction::ForceReleased, lock.clone()));
                ReleaseOutcome::ForceReleased(lock)
            }
        })
    }

    /// Releases every lease that has ended; the run loop calls it at
    /// [`Core::next_lock_deadline`].
    pub(crate) async fn expire_locks(&mut self) {
        let _ = self
            .step(|core, fx| {
                let ended = core.locks.arbiter.expire(now_ms());
                if !ended.is_empty() {
                    core.persist_locks(fx);
                }
                for lock in ended {
                    fx.emit(lock_event(LockAction::Expired, lock.into()));
                }
                Ok(())
            })
            .await
            .inspect_err(|error| tracing::warn!(%error, "cannot store the ended leases"));
    }

    /// When the next lease ends (ms since the epoch).
    pub(crate) fn next_lock_deadline(&self) -> Option<u64> {
        self.locks.arbiter.next_deadline()
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

fn lock_event(action: LockAction, lock: LockInfo) -> Event {
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
}
